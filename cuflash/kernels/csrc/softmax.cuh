// The online softmax of the tensor-core forward kernels, in base 2, on one thread's share of a
// score tile in the mma accumulator layout: NT blocks of 4 floats, {row g: cols 2t, 2t+1; row
// g + 8: cols 2t, 2t+1}, the four lanes of a quad holding one row between them. Both the sm80
// (mma.sync) and the sm90 (wgmma) accumulators have this layout.
#pragma once
#include "mask.cuh"

// Scores of keys a row does not see become `hidden`: −inf before the softmax (which then gives
// them weight 0), 0 for probabilities. `row0` is the row of this thread's half 0, key0 the key of
// block 0's column 0 (half 1 is row0 + 8; columns are key0 + 8j + 2t + e).
template <int NT, class MASK>
__device__ __forceinline__ void mask_scores(float (&s)[NT][4], const MASK& mask, int row0, int key0,
                                            int t, float hidden = -INFINITY) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const auto keys = keys_of_row(mask, row0 + half * 8);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                if (!keys.contains(key0 + j * 8 + 2 * t + e)) s[j][half * 2 + e] = hidden;
    }
}

// The same with the tile's bits loaded ahead (mask.cuh, AccumulatorBits; a no-op stand-in for
// masks other than exact tiles). key0 must be the tile's first key. An exact tile without bits is
// full: only its band can hide pairs. The bits are clear past Nk, so only a band adds a test.
template <int NT, class TILE>
__device__ __forceinline__ void mask_scores(float (&s)[NT][4], const TILE& tile, const AccumulatorBits<TILE>&,
                                            int row0, int key0, int t, float hidden = -INFINITY) {
    mask_scores(s, tile, row0, key0, t, hidden);
}
template <int NT, class MASK, int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ void mask_scores(float (&s)[NT][4], const ExactTile<MASK, BLOCK_M, BLOCK_N>& tile,
                                            const AccumulatorBits<ExactTile<MASK, BLOCK_M, BLOCK_N>>& bits,
                                            int row0, int key0, int t, float hidden = -INFINITY) {
    if (!tile.has_bits()) {
        mask_scores(s, tile.band, row0, key0, t, hidden);
        return;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const auto band = keys_of_row(tile.band, row0 + half * 8);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                bool seen = bits.allows(half, j, e);
                if constexpr (MASK::banded) seen = seen && band.contains(key0 + j * 8 + 2 * t + e);
                if (!seen) s[j][half * 2 + e] = hidden;
            }
    }
}
template <int NT, class MASK, int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ void mask_scores(float (&s)[NT][4], const ExactTile<MASK, BLOCK_M, BLOCK_N>& tile,
                                            int row0, int key0, int t, float hidden = -INFINITY) {
    AccumulatorBits<ExactTile<MASK, BLOCK_M, BLOCK_N>> bits;
    bits.load(tile, row0, t);
    mask_scores(s, tile, bits, row0, key0, t, hidden);
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

// What was accumulated before (an mma accumulator tile of NT blocks, row halves 0 and 1) times
// the online softmax's rescale factor alpha of each row half.
template <int NT>
__device__ __forceinline__ void rescale_rows(float (&acc)[NT][4], const float (&alpha)[2]) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        acc[j][0] *= alpha[0];
        acc[j][1] *= alpha[0];
        acc[j][2] *= alpha[1];
        acc[j][3] *= alpha[1];
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

// ---- backward: P recomputed from the raw scores and the forward's base-2 lse

// Per-element dlogit/ds / scale, kept only under a modifier that has one (score_mod.cuh).
template <class MOD, int NT>
using GradFactors = float[MOD::has_grad_factor ? NT : 1][4];

// S (rows = queries: row0 for half 0, row0 + 8 for half 1; columns key0 + 8j + 2t + e) becomes P
// in place: the modifier's logit, exp2 against the row's lse2, 0 where the mask hides the key
// (tested only on `partial` tiles, element by element: this keeps the sm80 kernels' register
// allocation spill-free; a kernel that prefers one branch per tile passes partial = false and
// calls mask_scores(..., 0.f) itself). grad receives the modifier's factor.
template <int NT, class MASK, class MOD>
__device__ __forceinline__ void recompute_probs(float (&s)[NT][4], GradFactors<MOD, NT>& grad, const MASK& mask,
                                                const MOD& mod, bool partial, int row0, int key0, int t,
                                                const float (&lse2)[2]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + half * 8;
        const auto keys = keys_of_row(mask, row);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = key0 + j * 8 + 2 * t + e;
                float gr;
                float p = mod.prob(mod.apply(s[j][half * 2 + e], row, key, gr), lse2[half]);
                if (partial && !keys.contains(key)) p = 0.f;
                s[j][half * 2 + e] = p;
                if constexpr (MOD::has_grad_factor) grad[j][half * 2 + e] = gr;
            }
    }
}

// A thread's per-query values (lse2, Delta) of a transposed tile's columns 8j + 2t, 8j + 2t + 1.
// AHEAD: loaded from shared memory into registers at once, ahead of their use, so that they can
// be issued before a wgmma wait (whose memory clobber would otherwise hold the loads back until
// the scores are in); that takes 2·NT registers. Otherwise each is loaded where it is used.
template <int NT, bool AHEAD>
struct ColumnPairs {
    const float* rows;
    __device__ __forceinline__ ColumnPairs(const float* rows_, int) : rows(rows_) {}
    __device__ __forceinline__ float2 operator()(int j, int t) const {
        return *reinterpret_cast<const float2*>(rows + j * 8 + 2 * t);
    }
};
template <int NT>
struct ColumnPairs<NT, true> {
    float2 v[NT];
    __device__ __forceinline__ ColumnPairs(const float* rows, int t) {
#pragma unroll
        for (int j = 0; j < NT; ++j) v[j] = *reinterpret_cast<const float2*>(rows + j * 8 + 2 * t);
    }
    __device__ __forceinline__ float2 operator()(int j, int) const { return v[j]; }
};

// The same for Sᵀ (rows = keys: key_row0 for half 0, + 8 for half 1; columns are queries
// query0 + 8j + 2t + e, whose lse2 are lse2[8j + 2t + e]).
template <int NT, class MASK, class MOD, bool AHEAD>
__device__ __forceinline__ void recompute_probs_transposed(float (&s)[NT][4], GradFactors<MOD, NT>& grad,
                                                           const MASK& mask, const MOD& mod, bool partial,
                                                           int key_row0, int query0, int t,
                                                           const ColumnPairs<NT, AHEAD>& lse2) {
    // Only a band hides pairs here. Keys past Nk need no mask in this layout: their K and V rows
    // are zero-filled, their dK/dV rows are never stored and their dS meets zero K rows in dQ;
    // leaving them unmasked keeps a per-element select out of every dense step.
    const bool masked = MASK::banded && partial;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int key = key_row0 + half * 8;
        const auto rows = rows_of_key(mask, key);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const float2 l2 = lse2(j, t);
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int query = query0 + j * 8 + 2 * t + e;
                float gr;
                float p = mod.prob(mod.apply(s[j][half * 2 + e], query, key, gr), e ? l2.y : l2.x);
                if (masked && !rows.contains(query)) p = 0.f;
                s[j][half * 2 + e] = p;
                if constexpr (MOD::has_grad_factor) grad[j][half * 2 + e] = gr;
            }
        }
    }
}

// The transposed tile's mask as a separate pass, for kernels that prefer one branch per tile to
// a select per element (the Hopper dK/dV kernel): call recompute_probs_transposed with
// partial = false, then this where the tile is partial.
template <int NT, class MASK>
__device__ __forceinline__ void mask_probs_transposed(float (&s)[NT][4], const MASK& mask, int key_row0,
                                                      int query0, int t) {
    if constexpr (MASK::banded) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const auto rows = rows_of_key(mask, key_row0 + half * 8);
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (!rows.contains(query0 + j * 8 + 2 * t + e)) s[j][half * 2 + e] = 0.f;
        }
    }
}

// The same with the tile's bits loaded ahead (mask.cuh, TransposedBits; a no-op stand-in for
// masks other than exact tiles). query0 must be the tile's first row and key_row this thread's
// first key (the warp's first key + g). The whole warp must call it: the bits travel by shuffles.
template <int NT, class TILE>
__device__ __forceinline__ void mask_probs_transposed(float (&s)[NT][4], const TILE& tile, const TransposedBits<TILE>&,
                                                      int key_row, int query0, int t) {
    mask_probs_transposed(s, tile, key_row, query0, t);
}
template <int NT, class MASK, int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ void mask_probs_transposed(float (&s)[NT][4], const ExactTile<MASK, BLOCK_M, BLOCK_N>& tile,
                                                      const TransposedBits<ExactTile<MASK, BLOCK_M, BLOCK_N>>& bits,
                                                      int key_row, int query0, int t) {
    static_assert(NT * 8 == BLOCK_M, "one column block per 8 query rows of the tile");
    if (tile.has_bits()) {
        const int g = threadIdx.x % 32 / 4;
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const u32 x = bits.column_bits(j, e, t) >> g;
                if (!(x & 1u)) s[j][e] = 0.f;         // key row g
                if (!(x & 0x100u)) s[j][2 + e] = 0.f;  // key row g + 8
            }
    }
    mask_probs_transposed(s, tile.band, key_row, query0, t);
}

// dS = P ∘ (dP · dp_scale − Delta) (∘ the modifier's factor), in place in dp; delta(j, e) is the
// Delta of the element's query. dp_scale is dropout's rescale, which the dropped elements' zero
// leaves at zero (drop_grads, unmark_dropped), so one fused multiply-add applies it where a
// separate product per element would cost an instruction more; 1 without dropout (an FFMA by 1:
// the subtraction's bits and cost).
template <int NT, class MOD, class DeltaOf>
__device__ __forceinline__ void softmax_grad(float (&dp)[NT][4], const float (&p)[NT][4],
                                             const GradFactors<MOD, NT>& grad, DeltaOf delta, float dp_scale = 1.f) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float ds = p[j][i] * fmaf(dp[j][i], dp_scale, -delta(j, i));
            if constexpr (MOD::has_grad_factor) ds *= grad[j][i];
            dp[j][i] = ds;
        }
}

// The same with the modifier's factor recovered from P (ScoreMod::grad_from_prob) rather than
// kept in registers; at(j, i) gives the element's {row, key, lse2, delta}; dp_scale as above.
struct ElementCoords {
    int row, key;
    float lse2, delta;
};
template <int NT, class MOD, class At>
__device__ __forceinline__ void softmax_grad_recovered(float (&dp)[NT][4], const float (&p)[NT][4], const MOD& mod,
                                                       At at, float dp_scale = 1.f) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const ElementCoords c = at(j, i);
            float ds = p[j][i] * fmaf(dp[j][i], dp_scale, -c.delta);
            if constexpr (MOD::has_grad_factor) ds *= mod.grad_from_prob(p[j][i], c.lse2, c.row, c.key);
            dp[j][i] = ds;
        }
}

// A score tile held as NT·4 consecutive floats (the wgmma accumulator) seen as NT blocks of 4.
template <int NT>
__device__ __forceinline__ float (&as_blocks(float (&s)[NT * 4]))[NT][4] {
    return *reinterpret_cast<float(*)[NT][4]>(&s[0]);
}
