// Which keys a query sees: the one home of that rule in CUDA (its Python twin is cuflash/_mask.py).
//
// Query row i sees key j when j < Nk and
//
//     i + shift − left  ≤  j  ≤  i + shift + right,        shift = Nk − Nq (bottom-right aligned),
//
// and, with a block mask, when the (query tile, key tile) block is kept; with an exact mask, when
// the pair is allowed by the element pattern. Causal is the band
// (unbounded, 0), a sliding window (left, right) is flash-attn's window_size. The host sends the
// band already clamped (cuflash/_spec.py, AttentionSpec.kernel_band): an unbounded left side as
// Nk and an unbounded right side as Nq, which admit every key yet keep every sum below in int32.
//
// A mask policy answers, for any tile shape:
//   key_begin / key_end (row)     the keys one row sees, as a half-open range (per-element test)
//   row_begin / row_end (key)     the rows that see one key
//   partial(rows, keys)           whether a tile holds a pair that is not seen (needs the test)
//   key_tiles_of (schedule.cuh)   the key tiles a query tile visits
//   QueryTileWalk (schedule.cuh)  the query tiles a key tile is seen by
//   tile(row0, key0, slot)        the mask of one tile of the walk, for the per-element tests
// LEFT / RIGHT say whether that side of the band is bounded at all; an unbounded side compiles
// away (dense attention has neither, causal only RIGHT), so each call pays only for the bounds
// it has: every live register counts in kernels that keep two thread blocks per SM.
//
// EXACT (an exact mask, cuflash.sparse.ExactMask) walks the tile CSR of the non-empty tiles of the
// element pattern (SPARSE is true too). Each tile the walk visits carries a slot (tile_slot, one
// per CSR entry): −1 for a full tile, which runs exactly as an unmasked one, else the index of its
// bitmask in tile_bits: BLOCK_M rows of ceil(BLOCK_N / 32) words, bit c % 32 of word c / 32 of row
// r set when query row0 + r sees key key0 + c. tile() turns (mask, slot) into an ExactTile whose
// partial() and element tests (keys_of_row, rows_of_key, sees) combine the band with the bits.
#pragma once
#include "arch/ptx.cuh"

template <class MASK, int BLOCK_M, int BLOCK_N>
struct ExactTile;

template <bool LEFT, bool RIGHT, bool SPARSE, bool EXACT = false>
struct Mask {
    static_assert(SPARSE || !EXACT, "an exact mask walks the tile CSR of its non-empty tiles");
    static constexpr bool banded = LEFT || RIGHT;
    static constexpr bool sparse = SPARSE;
    static constexpr bool exact = EXACT;
    static constexpr bool left_bounded = LEFT;
    static constexpr bool right_bounded = RIGHT;
    int nq, nk, shift, left, right;
    const int* tile_ptr;  // block-sparse or exact: CSR over query tiles (or its transpose), else null
    const int* tile_idx;
    int mask_heads;       // block-sparse or exact: 1 = one pattern per query head, 0 = one shared
    const int* tile_slot;  // exact: per CSR entry, −1 (full tile) or the tile's bitmask index
    const u32* tile_bits;  // exact: the partial tiles' bitmasks

    template <class Args>
    __device__ __forceinline__ explicit Mask(const Args& a) : Mask(a, a.nq, a.nk) {}
    // The mask of one sequence of nq_ queries and nk_ keys (a varlen call's, schedule.cuh).
    template <class Args>
    __device__ __forceinline__ Mask(const Args& a, int nq_, int nk_)
        : nq(nq_), nk(nk_), shift(nk_ - nq_), left(a.window_left), right(a.window_right),
          tile_ptr(a.tile_ptr), tile_idx(a.tile_idx), mask_heads(a.mask_heads),
          tile_slot(a.tile_slot), tile_bits(a.tile_bits) {}

    // The mask of the BLOCK_M × BLOCK_N tile at (row0, key0) that the walk gives `slot`: the mask
    // itself unless it is exact.
    template <int BLOCK_M, int BLOCK_N>
    __device__ __forceinline__ auto tile(int row0, int key0, int slot) const {
        if constexpr (EXACT) {
            return ExactTile<Mask, BLOCK_M, BLOCK_N>(*this, row0, key0, slot);
        } else {
            return *this;
        }
    }

    __device__ __forceinline__ int key_begin(int row) const {
        if constexpr (LEFT) return max(0, row + shift - left);
        return 0;
    }
    __device__ __forceinline__ int key_end(int row) const {
        if constexpr (RIGHT) return min(nk, row + shift + right + 1);
        return nk;
    }
    __device__ __forceinline__ int row_begin(int key) const {
        if constexpr (RIGHT) return max(0, key - shift - right);
        return 0;
    }
    __device__ __forceinline__ int row_end(int key) const {
        if constexpr (LEFT) return min(nq, key - shift + left + 1);
        return nq;
    }

    // Whether rows [row0, row0 + rows) × keys [key0, key0 + keys) hold a pair that is not seen:
    // keys past Nk, keys right of the top row's band, or keys left of the bottom row's band.
    __device__ __forceinline__ bool partial(int row0, int rows, int key0, int keys) const {
        bool some_hidden = key0 + keys > nk;
        if constexpr (RIGHT) some_hidden = some_hidden || key0 + keys - 1 > row0 + shift + right;
        if constexpr (LEFT) some_hidden = some_hidden || key0 < row0 + rows - 1 + shift - left;
        return some_hidden;
    }
};

// The keys one row sees, hoisted out of the per-element loops; a side the mask does not bound
// is not tested.
template <bool LEFT>
struct KeyRange {
    int begin, end;
    __device__ __forceinline__ bool contains(int key) const { return (!LEFT || key >= begin) && key < end; }
};
template <class MASK>
__device__ __forceinline__ auto keys_of_row(const MASK& mask, int row) {
    return KeyRange<MASK::left_bounded>{mask.key_begin(row), mask.key_end(row)};
}

// The rows that see one key, for tiles held transposed (keys as rows). A key past Nk is seen by
// no row: its range starts past every row. The end is tested only when the band's left side
// bounds it.
template <bool LEFT>
struct RowRange {
    int begin, end;
    __device__ __forceinline__ bool contains(int row) const { return row >= begin && (!LEFT || row < end); }
};
template <class MASK>
__device__ __forceinline__ auto rows_of_key(const MASK& mask, int key) {
    constexpr int NO_ROW = 0x7fffffff;
    return RowRange<MASK::left_bounded>{key >= mask.nk ? NO_ROW : mask.row_begin(key), mask.row_end(key)};
}

// Whether a tile's mask can hide pairs inside the tile (a band or an exact mask's bits): only
// then do partial tiles need the per-element test in layouts where keys past Nk are harmless.
template <class MASK>
__device__ __forceinline__ constexpr bool hides_pairs(const MASK&) {
    return MASK::banded;
}

// A pair test: whether query `row` sees `key`.
template <class MASK>
__device__ __forceinline__ bool sees(const MASK& mask, int row, int key) {
    return keys_of_row(mask, row).contains(key);
}

// ---- exact masks: one tile of the walk, its band and its bits

// One row of a tile's bits, held in registers (BLOCK_N <= 128 keys: at most four words).
template <int BLOCK_N>
struct RowBits {
    static_assert(BLOCK_N <= 128, "a tile row of bits is at most four words");
    static constexpr int WORDS = (BLOCK_N + 31) / 32;  // 32-bit words per tile row in memory
    u32 word[WORDS];

    __device__ __forceinline__ void load(const u32* row) {
#pragma unroll
        for (int i = 0; i < WORDS; ++i) word[i] = __ldg(row + i);
    }
    __device__ __forceinline__ void fill() {
#pragma unroll
        for (int i = 0; i < WORDS; ++i) word[i] = ~0u;
    }
    // Bit c (0 <= c < BLOCK_N), the word picked by selects: an indexed register array would
    // go to local memory.
    __device__ __forceinline__ bool test(int c) const {
        u32 x = word[0];
#pragma unroll
        for (int i = 1; i < WORDS; ++i)
            if (c >= 32 * i) x = word[i];
        return (x >> (c & 31)) & 1u;
    }
};

// Row `row` (from the tile's first) of the bitmask in `tile_bits` of the partial tile a walk gives
// `slot`: each bitmask is BLOCK_M rows of RowBits<BLOCK_N>::WORDS words.
template <int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ const u32* tile_bitmask_row(const u32* tile_bits, int slot, int row) {
    return tile_bits + ((i64)slot * BLOCK_M + row) * RowBits<BLOCK_N>::WORDS;
}

template <class MASK, int BLOCK_M, int BLOCK_N>
struct ExactTile {
    // softmax.cuh tests elements of partial tiles only where a mask can hide pairs inside one.
    static constexpr bool banded = true;
    static constexpr bool exact = true;
    static constexpr bool left_bounded = MASK::left_bounded;
    static constexpr int WORDS = RowBits<BLOCK_N>::WORDS;
    const MASK& band;  // the kernel's mask (a reference: no copy of its fields to keep live)
    int slot;  // the tile's bitmask (−1: a full tile); an index, not a pointer: one register less
    int row0, key0;

    __device__ __forceinline__ ExactTile(const MASK& mask, int row0_, int key0_, int slot_)
        : band(mask), slot(slot_), row0(row0_), key0(key0_) {}

    __device__ __forceinline__ bool has_bits() const { return slot >= 0; }
    // The words of query `row` of the tile (has_bits() only).
    __device__ __forceinline__ const u32* row_words(int row) const {
        return tile_bitmask_row<BLOCK_M, BLOCK_N>(band.tile_bits, slot, row - row0);
    }
    __device__ __forceinline__ bool partial(int r0, int rows, int k0, int keys) const {
        return has_bits() || band.partial(r0, rows, k0, keys);
    }
    // The row's bits (all set in a full tile).
    __device__ __forceinline__ RowBits<BLOCK_N> row_bits(int row) const {
        RowBits<BLOCK_N> r;
        if (has_bits()) r.load(row_words(row));
        else r.fill();
        return r;
    }
};

template <bool LEFT, int BLOCK_N>
struct ExactKeyRange {
    KeyRange<LEFT> band;
    RowBits<BLOCK_N> bits;
    int key0;
    __device__ __forceinline__ bool contains(int key) const { return band.contains(key) && bits.test(key - key0); }
};
template <class MASK, int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ auto keys_of_row(const ExactTile<MASK, BLOCK_M, BLOCK_N>& tile, int row) {
    return ExactKeyRange<MASK::left_bounded, BLOCK_N>{keys_of_row(tile.band, row), tile.row_bits(row), tile.key0};
}

// For tiles held transposed: one key's bit in each query row, read as the element is tested.
template <class TILE>
struct ExactRowRange {
    RowRange<TILE::left_bounded> band;
    const TILE& tile;
    int c;  // the key's column in the tile
    __device__ __forceinline__ bool contains(int row) const {
        if (!tile.has_bits()) return band.contains(row);
        return ((__ldg(tile.row_words(row) + c / 32) >> (c % 32)) & 1u) && band.contains(row);
    }
};
template <class MASK, int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ auto rows_of_key(const ExactTile<MASK, BLOCK_M, BLOCK_N>& tile, int key) {
    return ExactRowRange<ExactTile<MASK, BLOCK_M, BLOCK_N>>{rows_of_key(tile.band, key), tile, key - tile.key0};
}

template <class MASK, int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ bool sees(const ExactTile<MASK, BLOCK_M, BLOCK_N>& tile, int row, int key) {
    if (!keys_of_row(tile.band, row).contains(key)) return false;
    const int c = key - tile.key0;
    return !tile.has_bits() || ((__ldg(tile.row_words(row) + c / 32) >> (c % 32)) & 1u);
}

// ---- exact masks: a thread's bits, loaded ahead of the element tests
//
// The generic tests above find an element's word by selects and read it per row (or, transposed,
// per element); on a partial tile that cost several times the softmax's own work. The mma
// accumulator layouts fix which bits a thread needs, so these load them once per tile, before the
// GEMM that makes the scores completes (the caller issues load() first and waits afterwards), and
// each element test is one AND with a constant. Other masks get an empty stand-in, so a kernel
// can load "the tile's bits" whatever its mask.

// Rows held as rows (columns are keys): rows `row` and row + 8 of the tile, columns 8j + 2t + e
// from the tile's first key. Each row's words are shifted right by 2t, so that column 8j + 2t + e
// is bit 8·(j % 4) + e of word j / 4: a constant per element.
template <class TILE>
struct AccumulatorBits {
    __device__ __forceinline__ void load(const TILE&, int, int) {}
};
template <class MASK, int BLOCK_M, int BLOCK_N>
struct AccumulatorBits<ExactTile<MASK, BLOCK_M, BLOCK_N>> {
    static constexpr int WORDS = RowBits<BLOCK_N>::WORDS;
    u32 word[2][WORDS];
    __device__ __forceinline__ void load(const ExactTile<MASK, BLOCK_M, BLOCK_N>& tile, int row, int t) {
        fill(tile, row, t, [&tile](int r, int i) { return __ldg(tile.row_words(r) + i); });
    }
    // The same from a copy of the tile's bitmask in shared memory (`rows`: its first row's words),
    // `row` counted from the tile's first row.
    __device__ __forceinline__ void load_shared(const ExactTile<MASK, BLOCK_M, BLOCK_N>& tile, const u32* rows, int row,
                                                int t) {
        fill(tile, row, t, [rows](int r, int i) { return rows[r * WORDS + i]; });
    }
    // Rows `row` and `row` + 8 of the tile's bits, shifted to this thread's columns (all set in a
    // full tile); `word_at(r, i)` reads word i of row r.
    template <class WordAt>
    __device__ __forceinline__ void fill(const ExactTile<MASK, BLOCK_M, BLOCK_N>& tile, int row, int t,
                                         const WordAt& word_at) {
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int i = 0; i < WORDS; ++i)
                word[half][i] = tile.has_bits() ? word_at(row + 8 * half, i) >> (2 * t) : ~0u;
    }
    // Whether the bits allow column 8j + 2t + e of row half `half`.
    __device__ __forceinline__ bool allows(int half, int j, int e) const {
        return word[half][j / 4] & (1u << (8 * (j % 4) + e));
    }
};

// A kernel's `const auto` tile gives the same bits.
template <class TILE>
struct AccumulatorBits<const TILE> : AccumulatorBits<TILE> {};

// Tiles held transposed (keys as rows, query columns 8j + 2t + e from the tile's first row): a
// warp's 16 keys are 16 consecutive bits of one word in every query row's bitmask. Lane l loads
// that half-word of query rows 32i + l; column_bits() hands a thread the half-word of one of its
// query columns by a shuffle, in which key row g + 8·half is bit g + 8·half.
template <class TILE>
struct TransposedBits {
    __device__ __forceinline__ void load(const TILE&, int, int) {}
};
template <class MASK, int BLOCK_M, int BLOCK_N>
struct TransposedBits<ExactTile<MASK, BLOCK_M, BLOCK_N>> {
    static_assert(BLOCK_M % 32 == 0, "query tiles of whole 32-row groups");
    u32 word[BLOCK_M / 32];
    // key_row0: the warp's first key; its offset in the tile is a multiple of 16.
    __device__ __forceinline__ void load(const ExactTile<MASK, BLOCK_M, BLOCK_N>& tile, int key_row0, int lane) {
        const int c0 = key_row0 - tile.key0;
#pragma unroll
        for (int i = 0; i < BLOCK_M / 32; ++i)
            word[i] = tile.has_bits() ? __ldg(tile.row_words(tile.row0 + 32 * i + lane) + c0 / 32) >> (c0 % 32) : ~0u;
    }
    // Needs the whole warp: the 16 keys' bits of query column 8j + 2t + e.
    __device__ __forceinline__ u32 column_bits(int j, int e, int t) const {
        return __shfl_sync(0xffffffffu, word[j / 4], 8 * (j % 4) + 2 * t + e);
    }
};
template <class TILE>
struct TransposedBits<const TILE> : TransposedBits<TILE> {};
