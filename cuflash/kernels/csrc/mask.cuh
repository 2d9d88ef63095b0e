// Which keys a query sees: the one home of that rule in CUDA (its Python twin is cuflash/_mask.py).
//
// Query row i sees key j when j < Nk and
//
//     i + shift − left  ≤  j  ≤  i + shift + right,        shift = Nk − Nq (bottom-right aligned),
//
// and, with a block mask, when the (query tile, key tile) block is kept. Causal is the band
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
// LEFT / RIGHT say whether that side of the band is bounded at all; an unbounded side compiles
// away (dense attention has neither, causal only RIGHT), so each call pays only for the bounds
// it has: every live register counts in kernels that keep two thread blocks per SM.
#pragma once
#include "arch/ptx.cuh"

template <bool LEFT, bool RIGHT, bool SPARSE>
struct Mask {
    static constexpr bool banded = LEFT || RIGHT;
    static constexpr bool sparse = SPARSE;
    static constexpr bool left_bounded = LEFT;
    int nq, nk, shift, left, right;
    const int* tile_ptr;  // block-sparse: CSR over query tiles (or its transpose), else null
    const int* tile_idx;
    int mask_heads;       // block-sparse: 1 = one pattern per query head, 0 = one shared

    template <class Args>
    __device__ __forceinline__ explicit Mask(const Args& a)
        : nq(a.nq), nk(a.nk), shift(a.nk - a.nq), left(a.window_left), right(a.window_right),
          tile_ptr(a.tile_ptr), tile_idx(a.tile_idx), mask_heads(a.mask_heads) {}

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
