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

// The query tile a thread block owns, from a 1-D grid of m_tiles × heads × batch blocks: the
// tiles of one head next to each other (they share K/V in L2), and with a causal mask the
// heaviest (last) tiles first so that short tiles fill the tail of the launch.
struct QueryTile {
    int b, h, m_tile;
};
template <bool CAUSAL>
__device__ __forceinline__ QueryTile query_tile_of_block(int m_tiles, int heads) {
    int bid = blockIdx.x;
    const int m_tile_rev = bid % m_tiles;
    bid /= m_tiles;
    return {bid / heads, bid % heads, CAUSAL ? m_tiles - 1 - m_tile_rev : m_tile_rev};
}

// The key/value tile a dK/dV thread block owns, from a 1-D grid of n_tiles × kv_heads × batch blocks:
// the key tiles of one head next to each other, in order (with a causal mask the first key
// tiles, seen by the most query rows, are the heaviest and go first).
struct KvTile {
    int b, hk, n_tile;
};
__device__ __forceinline__ KvTile kv_tile_of_block(int n_tiles, int kv_heads) {
    const int bid = blockIdx.x / n_tiles;
    return {bid / kv_heads, bid % kv_heads, (int)(blockIdx.x % n_tiles)};
}

// The key tiles (of BLOCK_N keys) that query tile m_tile (of BLOCK_M rows) visits, in ascending
// order: all of them (dense) or its row of the tile CSR (block-sparse, one pattern per head or
// one shared), cut where the causal mask hides every row of the tile.
template <bool SPARSE>
struct KeyTiles {
    const int* idx;
    int first, count;
    __device__ __forceinline__ int operator[](int i) const {
        if constexpr (SPARSE) return idx[first + i];
        return i;
    }
};
template <int BLOCK_M, int BLOCK_N, bool CAUSAL, bool SPARSE>
__device__ __forceinline__ KeyTiles<SPARSE> key_tiles_of(int m_tile, int h, int m_tiles, int nq,
                                                        int nk, const int* tile_ptr,
                                                        const int* tile_idx, int mask_heads) {
    KeyTiles<SPARSE> tiles{tile_idx, 0, (nk + BLOCK_N - 1) / BLOCK_N};
    if constexpr (SPARSE) {
        const int* ptr = tile_ptr + (mask_heads ? h * (m_tiles + 1) : 0);
        tiles.first = ptr[m_tile];
        tiles.count = ptr[m_tile + 1] - tiles.first;
    }
    if constexpr (CAUSAL) {
        const int n_limit = min(nk, causal_key_limit(m_tile * BLOCK_M + BLOCK_M - 1, nq, nk) + 1);
        if constexpr (SPARSE) {
            while (tiles.count > 0 && tiles[tiles.count - 1] * BLOCK_N >= n_limit) --tiles.count;
        } else {
            tiles.count = max(0, (n_limit + BLOCK_N - 1) / BLOCK_N);
        }
    }
    return tiles;
}

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

// ---- sm_90a helpers ----
// Warpgroup MMA (wgmma) and what surrounds it. wgmma exists only on the sm_90a target (not sm_90,
// not sm_80), so this section is compiled only there and the other kernels never see it.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

typedef unsigned long long u64;

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
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Barrier over `threads` threads (a multiple of 32) under id `id` (1..15; 0 is __syncthreads).
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
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

// D(64 × N, f32) (+)= A(64 × 16) · B(16 × N), both operands in shared memory (descriptors);
// accumulate == 0 overwrites D. TRANS_A / TRANS_B = 1 for MN-major operands.
template <typename T, int N, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], u64 desc_a, u64 desc_b, int accumulate) {
    static_assert(N == 64 || N == 128, "wgmma_ss: N must be 64 or 128");
#define SM90_SS(SHAPE, TY, REGS, TAIL, ACC)                                                        \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " TAIL ", 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " REGS                   \
                 : ACC                                                                              \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B))
    if constexpr (N == 128) {
        if constexpr (T::is_bf16) {
            SM90_SS("m64n128k16", "bf16", SM90_R64 ", %64, %65, p, 1, 1, %67, %68;\n}\n", "%66", SM90_D64(d));
        } else {
            SM90_SS("m64n128k16", "f16", SM90_R64 ", %64, %65, p, 1, 1, %67, %68;\n}\n", "%66", SM90_D64(d));
        }
    } else {
        if constexpr (T::is_bf16) {
            SM90_SS("m64n64k16", "bf16", SM90_R32 ", %32, %33, p, 1, 1, %35, %36;\n}\n", "%34", SM90_D32(d));
        } else {
            SM90_SS("m64n64k16", "f16", SM90_R32 ", %32, %33, p, 1, 1, %35, %36;\n}\n", "%34", SM90_D32(d));
        }
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
// elements, `nrows` valid rows) into a swizzled shared tile at `dst`; rows past the end are
// zero-filled (src-size 0) so padding never feeds NaN into a wgmma. THREADS is a multiple of
// D / 8, so each thread copies one fixed chunk column and rows that step by a multiple of 8:
// its swizzle term (row % 8) never changes and the shared offset advances by a constant.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile_sw128(u32 dst, const u16* src, i64 ld, int row0, int nrows) {
    constexpr int CHUNKS = D / 8;              // 16-byte chunks per row
    constexpr int ROW_STEP = THREADS / CHUNKS;  // rows between one thread's copies
    constexpr int COPIES = (ROWS + ROW_STEP - 1) / ROW_STEP;
    static_assert(THREADS % CHUNKS == 0 && ROW_STEP % 8 == 0, "swizzle term must stay fixed");
    const int chunk = threadIdx.x % CHUNKS;
    const int r0 = threadIdx.x / CHUNKS;
    const u32 dst0 = dst + sw128_offset<ROWS>(r0, chunk);
    const u16* p = src + (i64)(row0 + r0) * ld + chunk * 8;
    const i64 step = (i64)ROW_STEP * ld;
#pragma unroll
    for (int c = 0; c < COPIES; ++c, p += step) {
        const int r = r0 + c * ROW_STEP;
        if (ROWS % ROW_STEP == 0 || r < ROWS) {
            const bool valid = row0 + r < nrows;
            cp_async_16(dst0 + c * ROW_STEP * 128, valid ? p : src, valid ? 16 : 0);
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
