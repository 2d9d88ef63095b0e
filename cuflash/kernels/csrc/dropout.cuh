// Attention dropout in the kernels: the random contract of cuflash/_dropout.py, the one CUDA home
// of it. Element (b, h, i, j) of P (h the query head, i the query row, j the key) is kept when
//
//   word (j mod 4) of Philox4x32-10(counter = (j div 4, i, b·Hq + h, offset), key = seed halves)
//
// is >= threshold (threshold = min(2³² − 1, floor(p · 2³²)), computed on the host). One Philox call
// gives the draws of 4 consecutive keys of one row, a "quad".
//
// The mma.sync m16n8 accumulator gives a thread the column pairs (2t, 2t+1) of rows g and g + 8 of
// each 16×8 block: 4 elements out of 4 different-or-shared quads depending on which axis holds the
// keys. Either way the 32 lanes of a warp need exactly 32 Philox calls per 16×8 block (128 draws),
// so each lane makes one call and the lanes trade the comparisons' bits with shuffles:
//
//   keys along columns (forward, dQ kernel): lanes t and t^1 of a row group share a quad; the even
//     lane draws row g, the odd one row g + 8, and one shuffle swaps the halves each one needs.
//   keys along rows (dK/dV kernel's Sᵀ): rows g of lanes with g = 4a .. 4a + 3 form a quad; the 4
//     lanes of such a group (same t) draw the 4 (quad, query) pairs they hold and swap a 4 × 4
//     transpose of bits in 3 shuffles.
//
// Cost per element: a quarter of a Philox call (10 rounds of two 32×32→64-bit products) plus a
// shuffle or less; computing every element's call in its own thread would cost 2× (keys along
// columns) or 4× (along rows) the Philox work.
#pragma once
#include "arch/ptx.cuh"

// The fields of an argument struct that carry the dropout parameters (FwdArgs, BwdArgs).
#define DROPOUT_FIELDS                                                                          \
    u32 drop_threshold;  /* an element is kept when its draw >= this */                         \
    u32 drop_seed_lo;    /* Philox key: seed mod 2^32 */                                        \
    u32 drop_seed_hi;    /* ... and seed div 2^32 */                                            \
    u32 drop_offset;     /* Philox counter word 3 */                                            \
    float drop_rescale;  /* float32(1 / (1 - p)): 1 without dropout */

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, u32 k0, u32 k1) {
    constexpr u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round) {
            k0 += W0;
            k1 += W1;
        }
        const u32 hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        const u32 hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    }
    return c;
}

// The 4 comparisons of one Philox call as bits 0..3 (bit w: word w >= threshold).
__device__ __forceinline__ u32 kept_words(uint4 w, u32 threshold) {
    return u32(w.x >= threshold) | u32(w.y >= threshold) << 1 | u32(w.z >= threshold) << 2 |
           u32(w.w >= threshold) << 3;
}

// The dropout mask of one (batch, query head): which elements of its P a warp keeps, per 16×8
// accumulator block. Bit i of the returned masks is element i = half·2 + e of the thread's block
// (rows row0 + 8·half, columns col0 + 2t + e, the layout of softmax.cuh). Every lane of the warp
// must call together (shuffles).
struct DropoutMask {
    u32 k0, k1, bh, offset, threshold;
    float rescale;  // 1 / (1 − p)

    template <class Args>
    __device__ __forceinline__ DropoutMask(const Args& a, int b, int h)
        : k0(a.drop_seed_lo), k1(a.drop_seed_hi), bh(u32(b) * u32(a.heads) + u32(h)), offset(a.drop_offset),
          threshold(a.drop_threshold), rescale(a.drop_rescale) {}

    __device__ __forceinline__ u32 quad(u32 key_quad, u32 query) const {
        return kept_words(philox4x32_10(make_uint4(key_quad, query, bh, offset), k0, k1), threshold);
    }

    // Rows are queries: row0 is this thread's query of half 0 (row group g included), key0 the
    // block's first key (a multiple of 8).
    __device__ __forceinline__ u32 keys_along_columns(int row0, int key0, int lane) const {
        const int t = lane % 4, odd = t & 1;
        const u32 mine = quad(u32(key0) / 4 + t / 2, u32(row0 + 8 * odd));
        const u32 theirs = __shfl_xor_sync(0xffffffffu, mine, 1);
        // Words 2t % 4 and 2t % 4 + 1 of each half: the even lane holds words 0, 1, the odd one 2, 3.
        return odd ? (theirs >> 2) | (mine & 0xCu) : (mine & 0x3u) | (theirs & 0x3u) << 2;
    }

    // Rows are keys (Sᵀ): key0 is this thread's key of half 0 (row group g included; the block's
    // first key a multiple of 16), query0 the block's first query.
    __device__ __forceinline__ u32 keys_along_rows(int key0, int query0, int lane) const {
        const int t = lane % 4, r = (lane / 4) % 4;  // r: this lane's key within its quad
        // This lane draws the (quad, query) pair of its group's element r: half r / 2, column r % 2.
        const u32 mine = quad(u32(key0) / 4 + 2 * (r / 2), u32(query0 + 2 * t + r % 2));
        // Element i is word r of the draw of group lane i (lane ^ (r ^ i) << 2).
        u32 keep = (mine >> r & 1u) << r;
#pragma unroll
        for (int k = 1; k < 4; ++k) {
            const u32 theirs = __shfl_xor_sync(0xffffffffu, mine, k * 4);
            keep |= (theirs >> r & 1u) << (r ^ k);
        }
        return keep;
    }
};

// The keep bits of one 16×8 block of a thread. KEYS_ALONG_ROWS: an Sᵀ block, row0 the thread's
// key of half 0 and col0 the block's first query (keys_along_rows); else a P block, row0 the
// thread's query and col0 the block's first key (keys_along_columns).
template <bool KEYS_ALONG_ROWS>
__device__ __forceinline__ u32 block_keep(const DropoutMask& mask, int row0, int col0, int lane) {
    return KEYS_ALONG_ROWS ? mask.keys_along_rows(row0, col0, lane) : mask.keys_along_columns(row0, col0, lane);
}

__device__ __forceinline__ bool kept(u32 keep, int i) { return keep >> i & 1u; }

// Where the kernels draw the mask is a matter of registers, found by compiling every variant:
// the forward draws a tile's bits before its S exists, one block at a time (keep_bits), which
// made room in the D = 64 tiles; the backward kernels draw each block's bits where they apply
// them (drop_grads, mark_dropped), which spilled less there than bits kept across the products.

// The keep bits of NT consecutive P blocks of a thread (block j at key col0 + 8j) in bits
// 4j .. 4j + 3 of one word, one block at a time (unroll 1: unrolled, the scheduler interleaves
// the Philox calls and their registers add up).
template <int NT>
__device__ __forceinline__ u32 keep_bits(const DropoutMask& mask, int row0, int col0, int lane) {
    static_assert(NT <= 8, "4 bits per block in one word");
    u32 keep = 0;
#pragma unroll 1
    for (int j = 0; j < NT; ++j) keep |= block_keep<false>(mask, row0, col0 + 8 * j, lane) << (4 * j);
    return keep;
}

// P with the elements whose keep bit (keep_bits) is clear set to 0: the forward's P before P·V.
template <int NT>
__device__ __forceinline__ void drop_probs(float (&p)[NT][4], u32 keep) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (!kept(keep, 4 * j + i)) p[j][i] = 0.f;
}

// dP of the kept elements times 1 / (1 − p), 0 for the dropped ones (the deterministic dQ
// kernel's P blocks, block j at key key0 + 8j), as the NumPy path computes it before
// dS = P ∘ (dP − Δ).
template <int NT>
__device__ __forceinline__ void drop_grads(float (&dp)[NT][4], const DropoutMask& mask, int row0, int key0,
                                           int lane) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const u32 keep = block_keep<false>(mask, row0, key0 + 8 * j, lane);
#pragma unroll
        for (int i = 0; i < 4; ++i) dp[j][i] = kept(keep, i) ? dp[j][i] * mask.rescale : 0.f;
    }
}

// The dK/dV kernel needs the mask twice per element (P ∘ Z for dV, then Z for dP) and has no
// registers to spare between the two: the sign of P carries it (P ≥ 0, so −P marks a dropped
// element; for P = 0 the mark does not matter, dS and P ∘ Z are 0 either way). mark_dropped
// marks Pᵀ (block j at query query0 + 8j), dropped_prob gives P ∘ Z of a marked element, and
// unmark_dropped restores P and applies the mask and 1 / (1 − p) to dPᵀ.
template <int NT>
__device__ __forceinline__ void mark_dropped(float (&p)[NT][4], const DropoutMask& mask, int key0, int query0,
                                             int lane) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const u32 keep = block_keep<true>(mask, key0, query0 + 8 * j, lane);
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (!kept(keep, i)) p[j][i] = -p[j][i];
    }
}

__device__ __forceinline__ float dropped_prob(float marked) { return fmaxf(marked, 0.f); }

template <int NT>
__device__ __forceinline__ void unmark_dropped(float (&p)[NT][4], float (&dp)[NT][4], float rescale) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            dp[j][i] = signbit(p[j][i]) ? 0.f : dp[j][i] * rescale;
            p[j][i] = fabsf(p[j][i]);
        }
}
