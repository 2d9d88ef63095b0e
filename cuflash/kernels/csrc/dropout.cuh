// Attention dropout in the kernels: the random contract of cuflash/_dropout.py, the one CUDA home
// of it. Element (b, h, i, j) of P (h the query head, i the query row, j the key) is kept when
//
//   byte (j mod 16) of Philox4x32-7(counter = (j div 16, i, b·Hq + h, offset), key = seed halves)
//
// is >= threshold (threshold = min(255, round(p · 256)), computed on the host). One Philox call
// gives the draws of 16 consecutive keys of one row, a "chunk"; byte n of it is byte n mod 4 of
// its word n div 4.
//
// The mma.sync m16n8 accumulator gives a thread the column pairs (2t, 2t+1) of rows g and g + 8 of
// each 16×8 block. A chunk's 16 elements are therefore spread over the lanes, so each call is
// made by one lane, and its 16 keep flags are shuffled to the lanes that hold the elements:
//
//   keys along columns (forward, dQ kernel): the 4 lanes of a row group (same g) need the chunks
//     of their 2 rows; each makes a quarter of those calls, and 4 shuffles gather them.
//   keys along rows (dK/dV kernel's Sᵀ, 16 keys per warp tile = one chunk per query): the 8 lanes
//     of a column pair (same t) need the chunks of their 2·NT queries; each makes an eighth of
//     those calls, and up to 8 shuffles gather them.
//
// The flags travel and stay where they fall: a lane's calls m = 0, 1 put the flag of byte n at
// bit 8 (n mod 4) + 4m + n div 4 of one word (chunk_flags), so that the flags a lane needs of a
// word it is handed sit at fixed distances from one lane-dependent bit; one rotation and one
// mask move them into the lane's keep word, at the bit keep_bit gives each element. Nothing is
// gathered bit by bit.
//
// Cost per element: a sixteenth of a Philox call (7 rounds of two 32×32→64-bit products), a
// sixteenth of 20 instructions of comparisons and flag placement, an eighth of a rotation, and to
// apply it to packed 16-bit P half of a byte permutation and of an AND (drop_packed).
#pragma once
#include "arch/ptx.cuh"

// The fields of an argument struct that carry the dropout parameters (FwdArgs, BwdArgs).
#define DROPOUT_FIELDS                                                                          \
    const u64* drop_state;  /* (seed, offset) read when it runs, or null: the words below */    \
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

// Bit 7 of each byte (the other bits are not defined): that byte of x >= the same byte of t4
// (the threshold in all 4 bytes). Bit 7 of each byte of `low` compares the low 7 bits (x | 0x80
// minus t mod 128 never borrows into the next byte); the top bits decide where they differ: x's
// top bit or that comparison where t's top bit is clear, both where it is set. That is
// (x & low) | ((x | low) & ~t4), one 3-input logic operation, written as one (the compiler's own
// form of it took four).
__device__ __forceinline__ u32 byte_flags(u32 x, u32 t4) {
    const u32 low = (x | 0x80808080u) - (t4 & 0x7F7F7F7Fu);
    u32 flags;
    asm("lop3.b32 %0, %1, %2, %3, 0xD4;" : "=r"(flags) : "r"(x), "r"(low), "r"(t4));
    return flags;
}

// The 16 comparisons of one Philox call, byte n's flag at bit 8 (n mod 4) + 4m + n div 4: the
// bits of a lane's call m (0 or 1) leave those of its other call free, so both travel in one word.
__device__ __forceinline__ u32 chunk_flags(uint4 w, u32 t4, int m) {
    constexpr u32 HIGH = 0x80808080u;
    const u32 flags = (byte_flags(w.x, t4) & HIGH) >> 7 | (byte_flags(w.y, t4) & HIGH) >> 6 |
                      (byte_flags(w.z, t4) & HIGH) >> 5 | (byte_flags(w.w, t4) & HIGH) >> 4;
    return flags << (4 * m);
}

// Where a lane's keep word holds the flag of element i (= half·2 + e) of block j (j < 8; the
// layout of softmax.cuh: row or key half, column 8j + 2t + e). Keys along columns: the flags of
// call k = 2 (j div 2) + half come from lane k mod 4 of the row group, its call m = k div 4, at
// bits 8e + 4m + 2 (j mod 2) of that lane's word past the lane's own; the four source lanes' bits
// interleave at offsets 0, 1, 16, 17. Keys along rows: query c = 2j + e's call comes from lane
// s = c mod 8 of the column pair, call m = c div 8, at bits 4m + 2·half; the eight source lanes'
// bits interleave at offsets 8 (s mod 2) + the columns' offset of s div 2. Either way the two
// elements of a 16-bit pair (e = 0, 1) sit 8 bits apart, in bytes 0 and 1 or 2 and 3
// (drop_packed).
__device__ __forceinline__ constexpr int column_source_offset(int s) { return s % 2 + 16 * (s / 2); }
__device__ __forceinline__ constexpr int row_source_offset(int s) { return 8 * (s % 2) + column_source_offset(s / 2); }

template <bool KEYS_ALONG_ROWS>
__device__ __forceinline__ constexpr int keep_bit(int j, int i) {
    if constexpr (KEYS_ALONG_ROWS) {
        const int c = 2 * j + i % 2;
        return row_source_offset(c % 8) + 4 * (c / 8) + 2 * (i / 2);
    } else {
        const int k = 2 * (j / 2) + i / 2;
        return column_source_offset(k % 4) + 4 * (k / 4) + 8 * (i % 2) + 2 * (j % 2);
    }
}

// The dropout mask of one (batch, query head). Its keep words hold the flags of up to 8 16×8
// accumulator blocks of a thread at the bits keep_bit gives. Every lane of the warp must call
// together (shuffles).
struct DropoutMask {
    u32 k0, k1, bh, offset, t4;
    float rescale;  // 1 / (1 − threshold / 256)

    template <class Args>
    __device__ __forceinline__ DropoutMask(const Args& a, int b, int h)
        : k0(a.drop_seed_lo), k1(a.drop_seed_hi), bh(u32(b) * u32(a.heads) + u32(h)), offset(a.drop_offset),
          t4(a.drop_threshold * 0x01010101u), rescale(a.drop_rescale) {
        // A seed array on the device: a captured graph's replays draw the mask of whatever it
        // holds when they run. The offset is its low 32 bits (the host cannot check the rest).
        if (a.drop_state != nullptr) {
            const u64 seed = a.drop_state[0];
            k0 = u32(seed);
            k1 = u32(seed >> 32);
            offset = u32(a.drop_state[1]);
        }
    }

    // The same mask for query head h of batch b (the seed and offset stay).
    template <class Args>
    __device__ __forceinline__ void at_head(const Args& a, int b, int h) {
        bh = u32(b) * u32(a.heads) + u32(h);
    }

    // Keep flags of keys 16·key_chunk .. 16·key_chunk + 15 of one query row, placed for call m.
    __device__ __forceinline__ u32 chunk(u32 key_chunk, u32 query, int m) const {
        return chunk_flags(philox4x32(make_uint4(key_chunk, query, bh, offset), k0, k1), t4, m);
    }

    // Rows are queries: row0 is this thread's query of half 0 (row group g included), key0 the
    // first key of the NT blocks (a multiple of 16). The row group's 4 lanes need NT chunks,
    // k = 0 .. NT − 1 of (half, chunk) = (k % 2, k / 2); lane t makes calls k = t + 4m. Lane t's
    // elements of a chunk are its bytes 2t + e (block 2·chunk) and 8 + 2t + e (the next block):
    // in a source's word, bits 16 (t mod 2) + t div 2 + 8e + 4m + 2·block parity.
    template <int NT>
    __device__ __forceinline__ u32 keys_along_columns(int row0, int key0, int lane) const {
        static_assert(NT % 2 == 0 && NT <= 8, "whole chunks, in one word");
        constexpr int CALLS = (NT + 3) / 4;  // per lane
        const int t = lane % 4;
        u32 mine = 0;
#pragma unroll 1
        for (int m = 0; m < CALLS; ++m) {
            const int k = t + 4 * m;
            if (k < NT) mine |= chunk(u32(key0) / 16 + k / 2, u32(row0 + 8 * (k % 2)), m);
        }
        const int own = 16 * (t % 2) + t / 2;
        u32 keep = 0;
#pragma unroll
        for (int src = 0; src < 4 && src < NT; ++src) {
            const u32 theirs = __shfl_sync(0xffffffffu, mine, (lane & ~3) | src);
            const int to = column_source_offset(src);
            keep |= __funnelshift_r(theirs, theirs, u32(own - to)) & 0x5555u << to;
        }
        return keep;
    }

    // Rows are keys (Sᵀ): key0 is this thread's key of half 0 (row group g included; the tile's
    // first key, key0 − g, a multiple of 16), query0 the first query of the NT blocks. The 8 lanes
    // of column pair t need the chunks of queries query0 + 8j + 2t + e, c = 2j + e = 0 .. 2·NT − 1;
    // lane g makes calls c = g + 8m. Lane g's elements of a chunk are its bytes g (half 0) and
    // g + 8 (half 1): in a source's word, bits 8 (g mod 4) + g div 4 + 4m + 2·half.
    template <int NT>
    __device__ __forceinline__ u32 keys_along_rows(int key0, int query0, int lane) const {
        static_assert(NT <= 8, "in one word");
        constexpr int CALLS = (2 * NT + 7) / 8;  // per lane
        const int t = lane % 4, g = lane / 4;
        const u32 key_chunk = u32(key0 - g) / 16;
        u32 mine = 0;
#pragma unroll 1
        for (int m = 0; m < CALLS; ++m) {
            const int c = g + 8 * m;
            if (c < 2 * NT) mine |= chunk(key_chunk, u32(query0 + 8 * (c / 2) + 2 * t + c % 2), m);
        }
        const int own = 8 * (g % 4) + g / 4;
        u32 keep = 0;
#pragma unroll
        for (int src = 0; src < 8 && src < 2 * NT; ++src) {
            const u32 theirs = __shfl_sync(0xffffffffu, mine, 4 * src + t);
            const int to = row_source_offset(src);
            keep |= __funnelshift_r(theirs, theirs, u32(own - to)) & 0x55u << to;
        }
        return keep;
    }
};

// A thread's keep flags of NT blocks in words of 8 blocks each (the Hopper tiles have up to 22
// blocks per row), at the bits keep_bit gives: keys along rows (Sᵀ) or along columns (P).
template <bool KEYS_ALONG_ROWS, int NT>
struct KeepWords {
    u32 word[(NT + 7) / 8];

    // The bit of word j / 8 that holds element i of block j.
    __device__ __forceinline__ static constexpr int bit(int j, int i) { return keep_bit<KEYS_ALONG_ROWS>(j % 8, i); }

    // Whether element i of block j is kept (j and i known when compiling: one bit test).
    __device__ __forceinline__ bool operator()(int j, int i) const { return word[j / 8] >> bit(j, i) & 1u; }
};

// Where the kernels draw the mask is a matter of registers, found by compiling every variant:
// the sm80 forward and dQ kernel draw a tile's bits before its S exists (slab_keep_bits), when
// only the accumulators are live; the sm80 dK/dV kernel draws them where it applies them
// (mark_dropped); the Hopper kernels draw them while their GEMMs run (keep_words). The calls of
// one lane run one after the other (unroll 1: unrolled, the scheduler interleaves the Philox
// calls and their registers add up).

// The keep flags of MT 16-row slabs (slab mt at rows row0 + 16·mt) of NT ≤ 8 blocks each (block
// j at key col0 + 8j, col0 a multiple of 16), drawn slab after slab: unrolled, the slabs' Philox
// calls interleave and their registers add up, so a 64-bit word carries the flags out of a loop
// that is not.
template <int MT, int NT>
__device__ __forceinline__ void slab_keep_bits(KeepWords<false, NT> (&keep)[MT], const DropoutMask& mask, int row0,
                                               int col0, int lane) {
    static_assert(MT <= 2 && NT <= 8, "keep flags of at most two slabs in one 64-bit word");
    u64 slabs = 0;
#pragma unroll 1
    for (int mt = 0; mt < MT; ++mt)
        slabs |= u64(mask.template keys_along_columns<NT>(row0 + 16 * mt, col0, lane)) << (32 * mt);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) keep[mt].word[0] = u32(slabs >> (32 * mt));
}

// The keep words of any number NT of blocks of one 16-row slab, 8 blocks at a time: keys along
// columns (P; block j at key col0 + 8j, col0 a multiple of 16, NT even) or along rows (Sᵀ; block
// j at query col0 + 8j).
template <bool KEYS_ALONG_ROWS, int NT, int WORD = 0>
__device__ __forceinline__ void keep_words(KeepWords<KEYS_ALONG_ROWS, NT>& keep, const DropoutMask& mask, int row0,
                                           int col0, int lane) {
    if constexpr (8 * WORD < NT) {
        constexpr int BLOCKS = NT - 8 * WORD < 8 ? NT - 8 * WORD : 8;
        if constexpr (KEYS_ALONG_ROWS)
            keep.word[WORD] = mask.template keys_along_rows<BLOCKS>(row0, col0 + 64 * WORD, lane);
        else
            keep.word[WORD] = mask.template keys_along_columns<BLOCKS>(row0, col0 + 64 * WORD, lane);
        keep_words<KEYS_ALONG_ROWS, NT, WORD + 1>(keep, mask, row0, col0, lane);
    }
}

// dP of the kept elements, 0 for the dropped ones (the dQ kernels' P blocks, the Hopper dK/dV
// kernel's Pᵀ blocks). The NumPy path's dP ∘ Z · rescale takes its rescale in softmax_grad's
// multiply-add (dp_scale), not here.
template <int NT, class Keep>
__device__ __forceinline__ void drop_grads(float (&dp)[NT][4], const Keep& kept) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) dp[j][i] = kept(j, i) ? dp[j][i] : 0.f;
}

// P ∘ Z from P already packed as 16-bit A fragments (sm90_wgmma.cuh, pack_a; mma.sync's are
// alike: register r of k16 step kk holds elements 2 (r mod 2), +1 of block 2kk + r / 2, the first
// in the low half): the dropped halves cleared (+0 in both 16-bit formats). A pair's flags sit 8
// bits apart (keep_bit), so one shift puts them at the top bits of two bytes and one byte
// permutation that replicates each selected byte's top bit makes the pair's mask.
template <int KS, class Keep>
__device__ __forceinline__ void drop_packed(u32 (&f)[KS][4], const Keep& keep) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int j = 2 * kk + r / 2, bit = keep.bit(j, 2 * (r % 2)), byte = bit / 8;
            const u32 flags = keep.word[j / 8] << (7 - bit % 8);
            // bytes (byte, byte, byte + 1, byte + 1), each its top bit replicated (selector's bit 3)
            constexpr u32 REPLICATE = 0x8888u;
            const u32 select = REPLICATE | u32(byte) * 0x0011u | u32(byte + 1) * 0x1100u;
            u32 mask;
            asm("prmt.b32 %0, %1, 0, %2;" : "=r"(mask) : "r"(flags), "r"(select));
            f[kk][r] &= mask;
        }
}

// The dK/dV kernel needs the mask twice per element (P ∘ Z for dV, then Z for dP) and has no
// registers to spare between the two: the sign of P carries it (P ≥ 0, so −P marks a dropped
// element; for P = 0 the mark does not matter, dS and P ∘ Z are 0 either way). mark_dropped
// marks Pᵀ (block j at query query0 + 8j; key0 − g a multiple of 16), dropped_prob gives P ∘ Z
// of a marked element, and unmark_dropped restores P and applies the mask to dPᵀ (the rescale
// comes in softmax_grad_recovered, as after drop_grads).
template <int NT>
__device__ __forceinline__ void mark_dropped(float (&p)[NT][4], const DropoutMask& mask, int key0, int query0,
                                             int lane) {
    KeepWords<true, NT> kept;
    keep_words(kept, mask, key0, query0, lane);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (!kept(j, i)) p[j][i] = -p[j][i];
}

__device__ __forceinline__ float dropped_prob(float marked) { return fmaxf(marked, 0.f); }

template <int NT>
__device__ __forceinline__ void unmark_dropped(float (&p)[NT][4], float (&dp)[NT][4]) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            dp[j][i] = signbit(p[j][i]) ? 0.f : dp[j][i];
            p[j][i] = fabsf(p[j][i]);
        }
}
