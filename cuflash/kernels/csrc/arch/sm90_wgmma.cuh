// sm_90a pieces: warpgroup MMA (wgmma), its 128-byte-swizzled shared operand tiles and
// descriptors, proxy fences and named barriers.
#pragma once
#include "arch/sm80_mma.cuh"

// Warpgroup MMA (wgmma) and what surrounds it. wgmma exists only on the sm_90a target (not sm_90,
// not sm_80), so this section is compiled only there and the other kernels never see it.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Operand tiles live in shared memory in the 128-byte swizzle: a tile of ROWS rows and 64·B
// columns of 16-bit values is B "boxes" of 64 columns, each ROWS × 128 bytes, one after the
// other; inside a box, row r takes bytes [128 r, 128 r + 128) and its 16-byte chunk j (columns
// 8j..8j+7) sits at chunk position j XOR (r % 8). That is the pattern the hardware applies to
// address bits 4–6 from bits 7–9, so every box must start 1024-byte aligned. Eight rows make
// one 1024-byte swizzle atom; consecutive atoms are 1024 bytes apart along the rows.
template <int ROWS>
__device__ __forceinline__ u32 sw128_offset(int row, int chunk) {
    return (chunk >> 3) * (ROWS * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// Matrix descriptor of a 128-byte-swizzled operand starting at shared address `addr`:
// start >> 4 in bits 0–13, LBO >> 4 in bits 16–29, SBO >> 4 in bits 32–45, swizzle mode 1
// (128 bytes) in bits 62–63. SBO is always the 1024-byte step between 8-row atoms. LBO matters
// only for MN-major operands wider than one box (the byte distance between boxes along N); for
// K-major operands, whose K extent per instruction (16 elements, 32 bytes) stays inside one
// 128-byte row, it is unused (any value, 16 by convention).
__device__ __forceinline__ u64 sw128_desc(u32 addr, u32 lbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(1024 >> 4) << 32) |
           (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N committed wgmma groups of this warpgroup are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Orders this thread's earlier generic-proxy writes to shared memory (stores, cp.async) before
// later async-proxy reads (wgmma operands); a barrier then extends that to other threads.
__device__ __forceinline__ void fence_proxy_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Barrier over `threads` threads (a multiple of 32) under id `id` (1..15; 0 is __syncthreads).
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Arrives on named barrier `id` without waiting (the other side of a named_barrier).
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// wgmma reads and writes its registers asynchronously, which the compiler cannot see: pinning
// each register with an empty asm keeps reads of a result after the wgmma_wait that completes
// it, and writes of an operand before the wgmma that consumes it.
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void reg_fence(u32 (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// The k16 steps of a GEMM that reduces over `columns` columns of a head dim: a tile padded past
// them holds zeros, which the steps after these would only add.
__host__ __device__ constexpr int k16_steps(int columns) { return (columns + 15) / 16; }

// `columns` rounded up to whole 64-column boxes (the 128-byte swizzle's atom of 16-bit values):
// the width a tile takes, and the boxes of it that hold one of those columns.
__host__ __device__ constexpr int box_columns(int columns) { return (columns + 63) / 64 * 64; }

// Accumulator register lists of m64nNk16 (N / 2 floats per thread).
#define SM90_R32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define SM90_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define SM90_D32(d)  \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
    "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
    "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
    "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define SM90_D64(d) SM90_D32(d),  \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), \
    "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), \
    "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), \
    "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), \
    "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// Accumulator lists of the key-tile widths 80 and 176 (Q·Kᵀ only).
#define SM90_R40 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}"
#define SM90_R88 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}"
#define SM90_D40(d) \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
    "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
    "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
    "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
    "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
#define SM90_D88(d) \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
    "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
    "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
    "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
    "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), \
    "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), \
    "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), \
    "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
    "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), \
    "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), \
    "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), \
    "+f"(d[85]), "+f"(d[86]), "+f"(d[87])

// D(64 × N, f32) (+)= A(64 × 16) · B(16 × N), both operands in shared memory (descriptors);
// accumulate == 0 overwrites D. TRANS_A / TRANS_B = 1 for MN-major operands.
template <typename T, int N, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], u64 desc_a, u64 desc_b, int accumulate) {
    static_assert(N == 64 || N == 80 || N == 128 || N == 176, "wgmma_ss: N must be 64, 80, 128 or 176");
#define SM90_SS(SHAPE, REGS, TAIL, ACC)                                                            \
    if constexpr (T::is_bf16) {                                                                    \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " TAIL ", 0;\n"                              \
                     "wgmma.mma_async.sync.aligned." SHAPE ".f32.bf16.bf16 " REGS                  \
                     : ACC                                                                          \
                     : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B));     \
    } else {                                                                                       \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " TAIL ", 0;\n"                              \
                     "wgmma.mma_async.sync.aligned." SHAPE ".f32.f16.f16 " REGS                    \
                     : ACC                                                                          \
                     : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B));     \
    }
    if constexpr (N == 176) {
        SM90_SS("m64n176k16", SM90_R88 ", %88, %89, p, 1, 1, %91, %92;\n}\n", "%90", SM90_D88(d))
    } else if constexpr (N == 128) {
        SM90_SS("m64n128k16", SM90_R64 ", %64, %65, p, 1, 1, %67, %68;\n}\n", "%66", SM90_D64(d))
    } else if constexpr (N == 80) {
        SM90_SS("m64n80k16", SM90_R40 ", %40, %41, p, 1, 1, %43, %44;\n}\n", "%42", SM90_D40(d))
    } else {
        SM90_SS("m64n64k16", SM90_R32 ", %32, %33, p, 1, 1, %35, %36;\n}\n", "%34", SM90_D32(d))
    }
#undef SM90_SS
}

// D(64 × N, f32) (+)= A(64 × 16, registers) · B(16 × N, shared). The A fragment has the
// mma.m16n8k16 A layout, warp w of the warpgroup holding rows 16w..16w+15. TRANS_B = 1 for an
// MN-major B (a row-major [k][n] tile such as V).
template <typename T, int N, int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const u32 (&a)[4], u64 desc_b, int accumulate) {
    static_assert(N == 64 || N == 128, "wgmma_rs: N must be 64 or 128");
#define SM90_RS(SHAPE, TY, REGS, TAIL, ACC)                                                        \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " TAIL ", 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " REGS                   \
                 : ACC                                                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate),        \
                   "n"(TRANS_B))
    if constexpr (N == 128) {
        if constexpr (T::is_bf16) {
            SM90_RS("m64n128k16", "bf16", SM90_R64 ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n", "%69", SM90_D64(d));
        } else {
            SM90_RS("m64n128k16", "f16", SM90_R64 ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n", "%69", SM90_D64(d));
        }
    } else {
        if constexpr (T::is_bf16) {
            SM90_RS("m64n64k16", "bf16", SM90_R32 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n", "%37", SM90_D32(d));
        } else {
            SM90_RS("m64n64k16", "f16", SM90_R32 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n", "%37", SM90_D32(d));
        }
    }
#undef SM90_RS
}

// Rows [row0, row0 + ROWS) × columns [0, D) of a row-major global matrix (row stride `ld`
// elements, `nrows` valid rows, `ncols` valid columns, a multiple of 8) into a swizzled shared
// tile at `dst`; rows and columns past the ends are zero-filled (src-size 0) so padding never
// feeds NaN into a wgmma. THREADS is a multiple of D / 8, so each thread copies one fixed chunk
// column of rows THREADS / (D / 8) apart.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile_sw128(u32 dst, const u16* src, i64 ld, int row0, int nrows,
                                                int ncols = D) {
    constexpr int CHUNKS = D / 8;              // 16-byte chunks per row
    constexpr int ROW_STEP = THREADS / CHUNKS;  // rows between one thread's copies
    constexpr int COPIES = (ROWS + ROW_STEP - 1) / ROW_STEP;
    static_assert(THREADS % CHUNKS == 0, "each thread copies one fixed chunk column");
    // A row step of a multiple of 8 keeps the swizzle term fixed, so the offset advances by a
    // constant; narrower steps (one warpgroup, 256 columns: 4 rows) recompute it per copy.
    constexpr bool FIXED_SWIZZLE = ROW_STEP % 8 == 0;
    const int chunk = threadIdx.x % CHUNKS;
    const int r0 = threadIdx.x / CHUNKS;
    const bool column_valid = chunk * 8 < ncols;
    const u32 dst0 = dst + sw128_offset<ROWS>(r0, chunk);
    const u16* p = src + (i64)(row0 + r0) * ld + chunk * 8;
    const i64 step = (i64)ROW_STEP * ld;
#pragma unroll
    for (int c = 0; c < COPIES; ++c, p += step) {
        const int r = r0 + c * ROW_STEP;
        if (ROWS % ROW_STEP == 0 || r < ROWS) {
            const bool valid = column_valid && row0 + r < nrows;
            const u32 to = FIXED_SWIZZLE ? dst0 + c * ROW_STEP * 128 : dst + sw128_offset<ROWS>(r, chunk);
            cp_async_16(to, valid ? p : src, valid ? 16 : 0);
        }
    }
}

// Descriptor offset (16-byte units) of k16 step kk of a K-major operand whose tile has `rows`
// rows: columns 16kk.. sit in box kk / 4, 32 bytes per step inside the 128-byte row.
__device__ __forceinline__ u32 kmajor_step(int kk, int rows) {
    return ((kk / 4) * rows * 128 + (kk % 4) * 32) >> 4;
}

// Accumulator pairs (2 floats each; k16 step kk covers column blocks 2kk, 2kk + 1) as the
// mma.m16n8k16 A fragments that wgmma takes from registers.
template <typename T, int KS>
__device__ __forceinline__ void pack_a(u32 (&f)[KS][4], const float (&x)[KS * 8]) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        f[kk][0] = pack2<T>(x[8 * kk + 0], x[8 * kk + 1]);
        f[kk][1] = pack2<T>(x[8 * kk + 2], x[8 * kk + 3]);
        f[kk][2] = pack2<T>(x[8 * kk + 4], x[8 * kk + 5]);
        f[kk][3] = pack2<T>(x[8 * kk + 6], x[8 * kk + 7]);
    }
}
template <int KS>
__device__ __forceinline__ void reg_fence_frag(u32 (&f)[KS][4]) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) reg_fence(f[kk]);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
