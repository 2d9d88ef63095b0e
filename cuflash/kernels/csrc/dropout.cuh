// Attention dropout in the kernels: the random contract of cuflash/_dropout.py, the one CUDA home
// of it. Element (b, h, i, j) of P (h the query head, i the query row, j the key) is kept when
//
//   byte (j mod 16) of Philox4x32-7(counter = (j div 16, i, b·Hq + h, offset), key = seed halves)
//
// is >= threshold (threshold = min(255, round(p · 256)), computed on the host). One Philox call
// gives the draws of 16 consecutive keys of one row, a "chunk"; its 16 comparisons are made four
// bytes at a time (kept_nibble).
//
// The mma.sync m16n8 accumulator gives a thread the column pairs (2t, 2t+1) of rows g and g + 8 of
// each 16×8 block. A chunk's 16 elements are therefore spread over the lanes, so each call is
// made by one lane and its 16 keep bits are shuffled to the lanes that hold the elements:
//
//   keys along columns (forward, dQ kernel): the 4 lanes of a row group (same g) need the chunks
//     of their 2 rows; each makes a quarter of those calls, and 4 shuffles gather them.
//   keys along rows (dK/dV kernel's Sᵀ, 16 keys per warp tile = one chunk per query): the 8 lanes
//     of a column pair (same t) need the chunks of their 2·NT queries; each makes an eighth of
//     those calls, and up to 8 shuffles gather them.
//
// Cost per element: a sixteenth of a Philox call (7 rounds of two 32×32→64-bit products), a
// quarter of a 4-byte comparison and a few bit moves.
#pragma once
#include "arch/ptx.cuh"

// The fields of an argument struct that carry the dropout parameters (FwdArgs, BwdArgs).
#define DROPOUT_FIELDS                                                                          \
    u32 drop_threshold;  /* an element is kept when its draw >= this */                         \
    u32 drop_seed_lo;    /* Philox key: seed mod 2^32 */                                        \
    u32 drop_seed_hi;    /* ... and seed div 2^32 */                                            \
    u32 drop_offset;     /* Philox counter word 3 */                                            \
    float drop_rescale;  /* float32 _dropout.rescale(p): 1 without dropout */

// Seven rounds, as flash-attn's mask; _dropout.ROUNDS, which the tests hold the kernels' masks to.
constexpr int PHILOX_ROUNDS = 7;

__device__ __forceinline__ uint4 philox4x32(uint4 c, u32 k0, u32 k1) {
    constexpr u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < PHILOX_ROUNDS; ++round) {
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

// Bits 0..3: byte c of x >= the byte threshold (t4 = threshold in all 4 bytes). Bit 7 of each byte
// of `low` compares the low 7 bits (x | 0x80 minus t mod 128 never borrows into the next byte);
// the top bits decide where they differ. The product moves bits 7, 15, 23, 31 to bits 28..31
// with no carries between its terms.
__device__ __forceinline__ u32 kept_nibble(u32 x, u32 t4) {
    constexpr u32 HIGH = 0x80808080u;
    const u32 low = (x | HIGH) - (t4 & ~HIGH);
    const u32 ge = ((x & ~t4) | (~(x ^ t4) & low)) & HIGH;
    return ge * 0x00204081u >> 28;
}

// The 16 comparisons of one Philox call as bits 0..15 (bit c: byte c >= threshold).
__device__ __forceinline__ u32 kept_bytes(uint4 w, u32 t4) {
    return kept_nibble(w.x, t4) | kept_nibble(w.y, t4) << 4 | kept_nibble(w.z, t4) << 8 | kept_nibble(w.w, t4) << 12;
}

// The dropout mask of one (batch, query head). Its keep words hold 4 bits per 16×8 accumulator
// block of a thread: bit 4j + i is element i = half·2 + e of block j (rows row0 + 8·half, columns
// col0 + 8j + 2t + e, the layout of softmax.cuh). Every lane of the warp must call together
// (shuffles).
struct DropoutMask {
    u32 k0, k1, bh, offset, t4;
    float rescale;  // 1 / (1 − threshold / 256)

    template <class Args>
    __device__ __forceinline__ DropoutMask(const Args& a, int b, int h)
        : k0(a.drop_seed_lo), k1(a.drop_seed_hi), bh(u32(b) * u32(a.heads) + u32(h)), offset(a.drop_offset),
          t4(a.drop_threshold * 0x01010101u), rescale(a.drop_rescale) {}

    // Keep bits of keys 16·key_chunk .. 16·key_chunk + 15 of one query row.
    __device__ __forceinline__ u32 chunk(u32 key_chunk, u32 query) const {
        return kept_bytes(philox4x32(make_uint4(key_chunk, query, bh, offset), k0, k1), t4);
    }

    // Rows are queries: row0 is this thread's query of half 0 (row group g included), key0 the
    // first key of the NT blocks (a multiple of 16). The row group's 4 lanes need NT chunks,
    // k = 0 .. NT − 1 of (half, chunk) = (k % 2, k / 2); lane t makes calls k = t + 4m.
    template <int NT>
    __device__ __forceinline__ u32 keys_along_columns(int row0, int key0, int lane) const {
        static_assert(NT % 2 == 0 && NT <= 8, "whole chunks, 4 bits per block in one word");
        constexpr int CALLS = (NT + 3) / 4;  // per lane; 16 bits each
        const int t = lane % 4;
        u32 mine = 0;
#pragma unroll 1
        for (int m = 0; m < CALLS; ++m) {
            const int k = t + 4 * m;
            if (k < NT) mine |= chunk(u32(key0) / 16 + k / 2, u32(row0 + 8 * (k % 2))) << (16 * m);
        }
        u32 keep = 0;
#pragma unroll
        for (int src = 0; src < 4 && src < NT; ++src) {
            // Lane t's elements of a chunk are its bytes 2t, 2t + 1 (first block) and 8 + 2t, 9 + 2t.
            const u32 theirs = __shfl_sync(0xffffffffu, mine, (lane & ~3) | src) >> (2 * t);
#pragma unroll
            for (int m = 0; m < CALLS; ++m) {
                const int k = src + 4 * m, half = k % 2, block = 2 * (k / 2);
                if (k < NT) {
                    const u32 bits = theirs >> (16 * m);
                    keep |= (bits & 3u) << (4 * block + 2 * half) | (bits >> 8 & 3u) << (4 * block + 4 + 2 * half);
                }
            }
        }
        return keep;
    }

    // Rows are keys (Sᵀ): key0 is this thread's key of half 0 (row group g included; the tile's
    // first key, key0 − g, a multiple of 16), query0 the first query of the NT blocks. The 8 lanes
    // of column pair t need the chunks of queries query0 + 8j + 2t + e, c = 2j + e = 0 .. 2·NT − 1;
    // lane g makes calls c = g + 8m.
    template <int NT>
    __device__ __forceinline__ u32 keys_along_rows(int key0, int query0, int lane) const {
        static_assert(NT <= 8, "4 bits per block in one word");
        constexpr int CALLS = (2 * NT + 7) / 8;  // per lane; 16 bits each
        const int t = lane % 4, g = lane / 4;
        const u32 key_chunk = u32(key0 - g) / 16;
        u32 mine = 0;
#pragma unroll 1
        for (int m = 0; m < CALLS; ++m) {
            const int c = g + 8 * m;
            if (c < 2 * NT) mine |= chunk(key_chunk, u32(query0 + 8 * (c / 2) + 2 * t + c % 2)) << (16 * m);
        }
        u32 keep = 0;
#pragma unroll
        for (int src = 0; src < 8 && src < 2 * NT; ++src) {
            // Lane g's elements of a chunk are its bytes g (half 0) and g + 8 (half 1).
            const u32 theirs = __shfl_sync(0xffffffffu, mine, 4 * src + t) >> g;
#pragma unroll
            for (int m = 0; m < CALLS; ++m) {
                const int c = src + 8 * m, j = c / 2, e = c % 2;
                if (c < 2 * NT) {
                    const u32 bits = theirs >> (16 * m);
                    keep |= (bits & 1u) << (4 * j + e) | (bits >> 8 & 1u) << (4 * j + 2 + e);
                }
            }
        }
        return keep;
    }
};

__device__ __forceinline__ bool kept(u32 keep, int i) { return keep >> i & 1u; }

// Keep words: the bits of NT blocks in words of 8 blocks each, element i of block j at bit
// 4 (j mod 8) + i of word j / 8 (the Hopper tiles have up to 22 blocks per row).
template <int NT>
using KeepWords = u32[(NT + 7) / 8];

template <int W>
__device__ __forceinline__ bool kept(const u32 (&keep)[W], int j, int i) { return kept(keep[j / 8], 4 * (j % 8) + i); }

// Where the kernels draw the mask is a matter of registers, found by compiling every variant:
// the sm80 forward and dQ kernel draw a tile's bits before its S exists (slab_keep_bits), when
// only the accumulators are live; the sm80 dK/dV kernel draws them where it applies them
// (mark_dropped); the Hopper kernels draw them while their GEMMs run (keep_words). The calls of
// one lane run one after the other (unroll 1: unrolled, the scheduler interleaves the Philox
// calls and their registers add up).

// The keep bits of MT 16-row slabs (slab mt at rows row0 + 16·mt) of NT ≤ 8 blocks each (block
// j at key col0 + 8j, col0 a multiple of 16, in bits 4j .. 4j + 3 of the slab's word), drawn
// slab after slab: unrolled, the slabs' Philox calls interleave and their registers add up, so a
// 64-bit word carries the bits out of a loop that is not.
template <int MT, int NT>
__device__ __forceinline__ void slab_keep_bits(u32 (&keep)[MT][1], const DropoutMask& mask, int row0, int col0,
                                               int lane) {
    static_assert(MT <= 2, "keep bits of at most two slabs in one 64-bit word");
    u64 slabs = 0;
#pragma unroll 1
    for (int mt = 0; mt < MT; ++mt)
        slabs |= u64(mask.template keys_along_columns<NT>(row0 + 16 * mt, col0, lane)) << (32 * mt);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) keep[mt][0] = u32(slabs >> (32 * mt));
}

// The keep words of any number NT of blocks of one 16-row slab, 8 blocks at a time: keys along
// columns (P; block j at key col0 + 8j, col0 a multiple of 16, NT even) or along rows (Sᵀ; block
// j at query col0 + 8j).
template <bool KEYS_ALONG_ROWS, int NT, int WORD = 0>
__device__ __forceinline__ void keep_words(KeepWords<NT>& keep, const DropoutMask& mask, int row0, int col0,
                                           int lane) {
    if constexpr (8 * WORD < NT) {
        constexpr int BLOCKS = NT - 8 * WORD < 8 ? NT - 8 * WORD : 8;
        if constexpr (KEYS_ALONG_ROWS)
            keep[WORD] = mask.template keys_along_rows<BLOCKS>(row0, col0 + 64 * WORD, lane);
        else
            keep[WORD] = mask.template keys_along_columns<BLOCKS>(row0, col0 + 64 * WORD, lane);
        keep_words<KEYS_ALONG_ROWS, NT, WORD + 1>(keep, mask, row0, col0, lane);
    }
}

// P with the dropped elements set to 0: the forward's P before P·V.
template <int NT, int W>
__device__ __forceinline__ void drop_probs(float (&p)[NT][4], const u32 (&keep)[W]) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (!kept(keep, j, i)) p[j][i] = 0.f;
}

// dP of the kept elements times the rescale, 0 for the dropped ones, as the NumPy path computes
// it before dS = P ∘ (dP − Δ) (the dQ kernels' P blocks, the Hopper dK/dV kernel's Pᵀ blocks).
template <int NT, int W>
__device__ __forceinline__ void drop_grads(float (&dp)[NT][4], const u32 (&keep)[W], float rescale) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) dp[j][i] = kept(keep, j, i) ? dp[j][i] * rescale : 0.f;
}

// P ∘ Z from P already packed as wgmma A fragments (sm90_wgmma.cuh, pack_a: register r of k16
// step kk holds elements 2 (r mod 2), +1 of block 2kk + r / 2, the first in the low half): the
// dropped halves cleared (+0 in both 16-bit formats), P itself left whole for dS.
template <int KS, int W>
__device__ __forceinline__ void drop_packed(u32 (&f)[KS][4], const u32 (&keep)[W]) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int j = 2 * kk + r / 2, i = 2 * (r % 2);
            f[kk][r] &= (kept(keep, j, i) ? 0x0000FFFFu : 0u) | (kept(keep, j, i + 1) ? 0xFFFF0000u : 0u);
        }
}

// The dK/dV kernel needs the mask twice per element (P ∘ Z for dV, then Z for dP) and has no
// registers to spare between the two: the sign of P carries it (P ≥ 0, so −P marks a dropped
// element; for P = 0 the mark does not matter, dS and P ∘ Z are 0 either way). mark_dropped
// marks Pᵀ (block j at query query0 + 8j; key0 − g a multiple of 16), dropped_prob gives P ∘ Z
// of a marked element, and unmark_dropped restores P and applies the mask and the rescale to dPᵀ.
template <int NT>
__device__ __forceinline__ void mark_dropped(float (&p)[NT][4], const DropoutMask& mask, int key0, int query0,
                                             int lane) {
    const u32 keep = mask.template keys_along_rows<NT>(key0, query0, lane);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (!kept(keep, 4 * j + i)) p[j][i] = -p[j][i];
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
