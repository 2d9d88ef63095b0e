// The online softmax of the tensor-core forward kernels, in base 2, on one thread's share of a
// score tile in the mma accumulator layout: NT blocks of 4 floats, {row g: cols 2t, 2t+1; row
// g + 8: cols 2t, 2t+1}, the four lanes of a quad holding one row between them. Both the sm80
// (mma.sync) and the sm90 (wgmma) accumulators have this layout.
#pragma once
#include "mask.cuh"

// Scores of keys a row does not see become −inf (the softmax then gives them weight 0). `row0` is
// the row of this thread's half 0, key0 the key of block 0's column 0 (half 1 is row0 + 8;
// columns are key0 + 8j + 2t + e).
template <int NT, class MASK>
__device__ __forceinline__ void mask_scores(float (&s)[NT][4], const MASK& mask, int row0, int key0,
                                            int t) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const KeyRange keys = keys_of_row(mask, row0 + half * 8);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                if (!keys.contains(key0 + j * 8 + 2 * t + e)) s[j][half * 2 + e] = -INFINITY;
    }
}

// Score modifier (score_mod.cuh) applied in place, same coordinates as mask_scores.
template <int NT, class MOD>
__device__ __forceinline__ void modify_scores(float (&s)[NT][4], const MOD& mod, int row0, int key0,
                                              int t) {
    if constexpr (!MOD::identity) {
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    s[j][half * 2 + e] = mod.apply(s[j][half * 2 + e], row0 + half * 8, key0 + j * 8 + 2 * t + e);
    }
}

// One key tile's update: the running row maxima and sums absorb S, S becomes P (unnormalised, in
// float) and alpha[half] is the factor that rescales what was accumulated before. `scale` is the
// score modifier's softmax_scale().
template <int NT>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], float (&row_max)[2], float (&row_sum)[2],
                                               float scale, float (&alpha)[2]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float mx = row_max[half];
#pragma unroll
        for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][half * 2], s[j][half * 2 + 1]));
        mx = quad_max(mx);
        // A row that has seen only masked keys keeps max -inf; subtract 0 instead of -inf.
        const float base = mx == -INFINITY ? 0.f : mx * scale;
        alpha[half] = fast_exp2(row_max[half] * scale - base);
        row_max[half] = mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float p = fast_exp2(fmaf(s[j][half * 2 + e], scale, -base));
                s[j][half * 2 + e] = p;
                sum += p;
            }
        row_sum[half] = row_sum[half] * alpha[half] + sum;
    }
}

// The end of a row: 1 / l for the output (0 for a row that saw no key) and the natural-log lse
// (−inf for such a row). `sum` is this lane's partial row sum.
struct RowResult {
    float inv, lse;
};
__device__ __forceinline__ RowResult finish_row(float row_max, float sum, float scale) {
    const float l = quad_sum(sum);
    return {l > 0.f ? 1.f / l : 0.f, l > 0.f ? (row_max * scale + __log2f(l)) * LN2_F : -INFINITY};
}

// A score tile held as NT·4 consecutive floats (the wgmma accumulator) seen as NT blocks of 4.
template <int NT>
__device__ __forceinline__ float (&as_blocks(float (&s)[NT * 4]))[NT][4] {
    return *reinterpret_cast<float(*)[NT][4]>(&s[0]);
}
