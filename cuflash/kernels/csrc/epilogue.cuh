// Stores of results to global memory: in the input dtype, or as float32 for gradients asked for
// in float32 (callers that sum partial gradients, such as ring attention, round only once).
#pragma once
#include "arch/ptx.cuh"
#include "arch/sm90_wgmma.cuh"

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
// of `nrows` rows × `ncols` columns with row stride `ld`, of 16-bit T or float32 elements E.
// The same pair as float32 (T only names the inputs' dtype): one 64-bit store when aligned.
template <typename T, bool ALIGNED>
__device__ __forceinline__ void store_pair(float* row, int col, int ncols, float x0, float x1) {
    if (ALIGNED && col + 1 < ncols) {
        *reinterpret_cast<float2*>(row + col) = make_float2(x0, x1);
    } else {
        if (col < ncols) row[col] = x0;
        if (col + 1 < ncols) row[col + 1] = x1;
    }
}

// A gradient output's element: the input dtype's 16 bits, or float32 with F32_GRADS. The
// argument structs carry every gradient pointer as u16*; grad_rows gives it its real type
// before any offset is added.
template <bool F32_GRADS> struct GradElement { typedef u16 type; };
template <> struct GradElement<true> { typedef float type; };

template <bool F32_GRADS>
__device__ __forceinline__ typename GradElement<F32_GRADS>::type* grad_rows(u16* p) {
    return reinterpret_cast<typename GradElement<F32_GRADS>::type*>(p);
}

// One gradient element as stored: rounded to T, or the float itself with F32_GRADS.
template <typename T, bool F32_GRADS>
__device__ __forceinline__ typename GradElement<F32_GRADS>::type grad_value(float x) {
    if constexpr (F32_GRADS) return x;
    else return from_float<T>(x);
}

template <typename T, bool ALIGNED, int NT, typename E>
__device__ __forceinline__ void store_rows(E* out, i64 ld, int nrows, int ncols, const float (&acc)[NT][4],
                                           int row0, int col0, int t, const float (&factor)[2]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + half * 8;
        if (row < nrows) {
            E* r = out + (i64)row * ld;
#pragma unroll
            for (int j = 0; j < NT; ++j)
                store_pair<T, ALIGNED>(r, col0 + j * 8 + 2 * t, ncols, acc[j][half * 2] * factor[half],
                                       acc[j][half * 2 + 1] * factor[half]);
        }
    }
}

// Zeros into rows [row0, row0 + rows) (those below `nrows`) × the first `ncols` columns (a
// multiple of 8, rows 16-byte aligned) of a row-major output, by `threads` threads (this one is
// `thread`): for rows that see no key at all.
__device__ __forceinline__ void store_zero_rows(u16* out, i64 ld, int nrows, int ncols, int row0, int rows,
                                                int thread, int threads) {
    const int chunks = ncols / 8;
    for (int i = thread; i < rows * chunks; i += threads) {
        const int row = row0 + i / chunks;
        if (row < nrows) *reinterpret_cast<uint4*>(out + (i64)row * ld + (i % chunks) * 8) = make_uint4(0, 0, 0, 0);
    }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// A warpgroup's 64 rows of a wgmma accumulator (D columns, OT = D / 8 blocks of 4 floats per
// thread), each row multiplied by factor[half], into rows row0.. of a row-major output of `nrows`
// rows with row stride `ld`, through the warpgroup's own 64 rows of a 128-byte-swizzled shared
// tile at `stage` (a tile of ROWS rows): every global store is then a whole 16-byte chunk of a
// row. Only the first `ncols` columns (a multiple of 8) are stored: D may be a padded width.
// Warpgroup `wg` synchronises on named barrier 1 + wg; `warp` is the warp inside the warpgroup,
// (g, t) the lane's accumulator row group and column pair.
// In two halves: stage_rows_sw128 writes the shared tile (after it the accumulator is free),
// flush_rows_sw128 copies it out (a few registers: it can run under the next GEMMs).
template <typename T, int D, int ROWS>
__device__ __forceinline__ void stage_rows_sw128(const float (&acc)[D / 2], const float (&factor)[2], u32 stage,
                                                 int warp, int g, int t) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = warp * 16 + g + half * 8;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            const u32 x = pack2<T>(acc[4 * i + half * 2] * factor[half], acc[4 * i + half * 2 + 1] * factor[half]);
            const u32 addr = stage + sw128_offset<ROWS>(r, i) + 4 * t;
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(x) : "memory");
        }
    }
}

template <int D, int ROWS>
__device__ __forceinline__ void flush_rows_sw128(u16* out, i64 ld, int nrows, u32 stage, int row0, int wg,
                                                 int ncols = D) {
    named_barrier(1 + wg, 128);
    constexpr int CHUNKS = D / 8;
#pragma unroll
    for (int c = 0; c < 64 * CHUNKS / 128; ++c) {
        const int idx = c * 128 + threadIdx.x % 128;
        const int r = idx / CHUNKS, chunk = idx % CHUNKS;
        const int row = row0 + r;
        if (row < nrows && chunk * 8 < ncols) {
            uint4 x;
            asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w)
                         : "r"(stage + sw128_offset<ROWS>(r, chunk))
                         : "memory");
            *reinterpret_cast<uint4*>(out + (i64)row * ld + chunk * 8) = x;
        }
    }
}

template <typename T, int D, int ROWS>
__device__ __forceinline__ void store_rows_sw128(u16* out, i64 ld, int nrows, const float (&acc)[D / 2],
                                                 const float (&factor)[2], u32 stage, int row0, int wg,
                                                 int warp, int g, int t, int ncols = D) {
    stage_rows_sw128<T, D, ROWS>(acc, factor, stage, warp, g, t);
    flush_rows_sw128<D, ROWS>(out, ld, nrows, stage, row0, wg, ncols);
}
#endif
