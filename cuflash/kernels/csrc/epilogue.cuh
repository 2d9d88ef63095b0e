// Stores of results to global memory in the input dtype.
#pragma once
#include "arch/ptx.cuh"

// Columns col and col + 1 of one output row of `ncols` valid columns: one 32-bit store when both
// are in range and the row allows it (ALIGNED, checked on the host), else element by element.
template <typename T, bool ALIGNED>
__device__ __forceinline__ void store_pair(u16* row, int col, int ncols, float x0, float x1) {
    if (ALIGNED && col + 1 < ncols) {
        *reinterpret_cast<u32*>(row + col) = pack2<T>(x0, x1);
    } else {
        if (col < ncols) row[col] = from_float<T>(x0);
        if (col + 1 < ncols) row[col + 1] = from_float<T>(x1);
    }
}

// One thread's two rows (half 0: row0, half 1: row0 + 8) of an mma accumulator tile of NT blocks
// of 8 columns starting at column col0, each multiplied by factor[half], into a row-major output
// of `nrows` rows × `ncols` columns with row stride `ld`.
template <typename T, bool ALIGNED, int NT>
__device__ __forceinline__ void store_rows(u16* out, i64 ld, int nrows, int ncols, const float (&acc)[NT][4],
                                           int row0, int col0, int t, const float (&factor)[2]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + half * 8;
        if (row < nrows) {
            u16* r = out + (i64)row * ld;
#pragma unroll
            for (int j = 0; j < NT; ++j)
                store_pair<T, ALIGNED>(r, col0 + j * 8 + 2 * t, ncols, acc[j][half * 2] * factor[half],
                                       acc[j][half * 2 + 1] * factor[half]);
        }
    }
}
