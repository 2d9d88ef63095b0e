// What happens to a score between Q·Kᵀ and the softmax: the one home of that rule in CUDA (its
// Python twin is cuflash/_mask.py). With s = q·k the raw score of query row i and key j:
//
//     identity   logit = scale·s
//     softcap    logit = c·tanh(scale·s / c)                      (Gemma 2; c > 0)
//     ALiBi      logit = (the above) − slope_h · |i + Nk − Nq − j|  (BLOOM, MPT)
//
// The kernels' softmax runs in base 2 and multiplies what it reads by softmax_scale(). The
// identity leaves raw scores where they are and sets that factor to scale·log2 e, so unmodified
// calls run exactly the instructions they always did; a modifier rewrites each score into
// logit·log2 e and the factor becomes 1 (fmaf(x, 1, −m) is exactly x − m).
//
// Backward: dlogit/ds = scale·(1 − tanh²) under softcap and scale otherwise. Every kernel already
// applies `scale` once at the end (to dQ and dK), so grad_factor is 1 − tanh² or 1.
#pragma once
#include "arch/ptx.cuh"

// tanh from one ex2 and one fast division: absolute error about 1e-7, so c·tanh stays within a
// few float32 ulps of the exact logit (tanh.approx.f32 would be 1000× coarser).
__device__ __forceinline__ float tanh_accurate(float x) {
    const float e = fast_exp2(2.f * LOG2E_F * x);
    return 1.f - __fdividef(2.f, 1.f + e);
}

template <bool SOFTCAP, bool ALIBI>
struct ScoreMod {
    static constexpr bool identity = !SOFTCAP && !ALIBI;
    static constexpr bool has_grad_factor = SOFTCAP;  // dlogit/ds differs from scale
    static constexpr bool per_element = ALIBI;       // depends on (row, key)
    float scale_log2;  // scale·log2 e
    float cap_in;      // scale / c
    float cap_out;     // c·log2 e
    float slope_log2;  // ALiBi slope of this (batch, query head) · log2 e
    int shift;         // Nk − Nq

    template <class Args>
    __device__ __forceinline__ ScoreMod(const Args& a, int b, int h) : ScoreMod(a, b, h, a.nq, a.nk) {}
    // The modifier of one sequence of nq queries and nk keys (a varlen call's, schedule.cuh):
    // ALiBi's distance is aligned to the bottom right of each sequence.
    template <class Args>
    __device__ __forceinline__ ScoreMod(const Args& a, int b, int h, int nq, int nk)
        : scale_log2(a.scale_log2), cap_in(a.cap_in), cap_out(a.cap_out), slope_log2(0.f),
          shift(nk - nq) {
        if constexpr (ALIBI) slope_log2 = a.alibi[(i64)b * a.heads + h] * LOG2E_F;
    }

    // The factor the softmax multiplies each stored value by.
    __device__ __forceinline__ float softmax_scale() const { return identity ? scale_log2 : 1.f; }

    // Raw score → what the softmax reads (the raw score itself for the identity).
    __device__ __forceinline__ float apply(float s, int row, int key) const {
        float unused;
        return apply(s, row, key, unused);
    }
    // ... and dlogit/ds / scale in `grad`.
    __device__ __forceinline__ float apply(float s, int row, int key, float& grad) const {
        grad = 1.f;
        if constexpr (identity) return s;
        float x;
        if constexpr (SOFTCAP) {
            const float t = tanh_accurate(s * cap_in);
            grad = 1.f - t * t;
            x = cap_out * t;
        } else {
            x = s * scale_log2;
        }
        if constexpr (ALIBI) x -= slope_log2 * (float)abs(row + shift - key);
        return x;
    }

    // grad_factor recovered from P instead of kept per element (for kernels short of registers):
    // under softcap logit·log2 e = log2 P + lse2 (+ the ALiBi term) = c·log2 e · tanh, so
    // 1 − tanh² follows from P to about 1e-7. P = 0 (masked, underflowed) gives 0: dS is 0 there.
    __device__ __forceinline__ float grad_from_prob(float p, float lse2, int row, int key) const {
        if constexpr (!SOFTCAP) return 1.f;
        float x = __log2f(p) + lse2;
        if constexpr (ALIBI) x += slope_log2 * (float)abs(row + shift - key);
        const float t = __fdividef(x, cap_out);
        return p > 0.f ? 1.f - t * t : 0.f;
    }

    // P recomputed in the backward pass from the base-2 lse: the same expression for every
    // modifier, exp2(value · softmax_scale − lse2).
    __device__ __forceinline__ float prob(float value, float lse2) const {
        return fast_exp2(fmaf(value, softmax_scale(), -lse2));
    }
};
