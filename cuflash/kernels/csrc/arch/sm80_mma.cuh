// sm_80 tensor-core pieces: mma.sync m16n8k16, ldmatrix, padded shared tiles filled by cp.async.
#pragma once
#include "arch/ptx.cuh"

// D(16x8, f32) += A(16x16, row) * B(16x8, col).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if constexpr (T::is_bf16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Row padding of every shared tile: 8 elements (16 bytes) shift consecutive rows by four banks,
// so the eight 16-byte rows an ldmatrix phase reads hit 32 distinct banks.
constexpr int SMEM_PAD = 8;

// Copies rows [row0, row0 + ROWS) x columns [0, COLS) of a row-major global matrix (row stride
// `ld` elements, `nrows` valid rows, `ncols` valid columns) into a padded shared tile, filling
// everything outside the valid region with zeros so that padding never feeds NaN into an mma.
// ALIGNED: base, ld and ncols allow 16-byte copies (checked on the host); otherwise one element
// at a time, synchronously.
template <int ROWS, int COLS, int THREADS, bool ALIGNED>
__device__ __forceinline__ void load_tile(u16* smem, const u16* gmem, i64 ld, int row0, int nrows,
                                          int ncols) {
    constexpr int STRIDE = COLS + SMEM_PAD;
    if constexpr (ALIGNED) {
        constexpr int CHUNKS = COLS / 8;
#pragma unroll
        for (int c = threadIdx.x; c < ROWS * CHUNKS; c += THREADS) {
            const int r = c / CHUNKS;
            const int col = (c % CHUNKS) * 8;
            const int grow = row0 + r;
            const bool valid = grow < nrows && col < ncols;
            const u16* src = valid ? gmem + (i64)grow * ld + col : gmem;
            cp_async_16(smem_addr(smem + r * STRIDE + col), src, valid ? 16 : 0);
        }
    } else {
        for (int e = threadIdx.x; e < ROWS * COLS; e += THREADS) {
            const int r = e / COLS;
            const int col = e % COLS;
            const int grow = row0 + r;
            smem[r * STRIDE + col] =
                (grow < nrows && col < ncols) ? gmem[(i64)grow * ld + col] : (u16)0;
        }
    }
}

// ldmatrix lane addresses and float32 row loads.

// Lane offsets (in elements, inside a tile of row stride `stride`) for ldmatrix.x4 operands.
// [row][k] storage read as an A fragment (ldmatrix): the forward's Q.
__device__ __forceinline__ int ldsm_a_offset(int lane, int stride) {
    return (lane % 16) * stride + (lane / 16) * 8;
}
// [n][k] storage read as two B fragments (ldmatrix), n8 tiles j and j + 1: the forward's K.
// The same addresses with ldmatrix.trans read an A fragment out of [k][m] storage, i.e. the
// transpose of what is stored: dS from dSᵀ.
__device__ __forceinline__ int ldsm_b_offset(int lane, int stride) {
    return ((lane % 8) + (lane / 16) * 8) * stride + ((lane / 8) % 2) * 8;
}
// [k][n] storage read as two B fragments with ldmatrix.trans: the forward's V.
__device__ __forceinline__ int ldsm_bt_offset(int lane, int stride) {
    return ((lane % 8) + ((lane / 8) % 2) * 8) * stride + (lane / 16) * 8;
}

// N consecutive floats (N % 4 == 0, 16-byte aligned on both sides, all in bounds) to shared memory.
template <int N, int THREADS>
__device__ __forceinline__ void load_f32_async(float* smem, const float* gmem) {
#pragma unroll
    for (int c = threadIdx.x; c < N / 4; c += THREADS) cp_async_16(smem_addr(smem + c * 4), gmem + c * 4, 16);
}
