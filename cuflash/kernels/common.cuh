// Building blocks shared by the tensor-core kernels (sm_80 and newer).
//
// No CUDA headers are included: NVRTC finds none without a toolkit, so 16-bit values travel as
// raw bits (uint16_t / packed pairs in uint32_t) and every conversion is one PTX instruction.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define INFINITY __int_as_float(0x7f800000)

// Element type tags: the kernels are templated on these, not on CUDA's half types.
struct f16_t {
    static constexpr bool is_bf16 = false;
};
struct bf16_t {
    static constexpr bool is_bf16 = true;
};

template <typename T>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if constexpr (T::is_bf16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

template <typename T>
__device__ __forceinline__ float to_float(u16 x) {
    if constexpr (T::is_bf16) {
        return __uint_as_float(((u32)x) << 16);
    } else {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    }
}

template <typename T>
__device__ __forceinline__ u16 from_float(float f) {
    u16 r;
    if constexpr (T::is_bf16) {
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    } else {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    }
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

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

// 16-byte asynchronous copy; src_bytes == 0 writes zeros (rows past N, columns past D).
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

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

// Reductions over the four lanes that share one accumulator row.
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Bottom-right causal alignment: query row i sees key columns j <= i + (Nk - Nq).
__device__ __forceinline__ int causal_key_limit(int row, int nq, int nk) { return row + nk - nq; }

// ---- backward helpers ----

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

// Fire-and-forget float32 adds to global memory (the result is not needed, so RED, not ATOM).
// sm_90 adds two neighbouring floats in one instruction; p must be 8-byte aligned.
__device__ __forceinline__ void red_add_f32x2(float* p, float x, float y) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(x) : "memory");
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p + 1), "f"(y) : "memory");
#endif
}

// First index in [lo, hi) of the ascending array `a` whose value is >= `value` (hi if none).
__device__ __forceinline__ int lower_bound_index(const int* a, int lo, int hi, int value) {
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (a[mid] < value) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// Dot product of two packed pairs of 16-bit values, in float32.
template <typename T>
__device__ __forceinline__ float dot2(u32 x, u32 y) {
    return to_float<T>((u16)(x & 0xffffu)) * to_float<T>((u16)(y & 0xffffu)) +
           to_float<T>((u16)(x >> 16)) * to_float<T>((u16)(y >> 16));
}
