// FlashAttention in float32 on the CUDA cores (FFMA): the exact path.
//
// Same algorithm as the tensor-core kernels (online softmax in base 2, K/V tiles staged through
// shared memory, lse saved; the backward pass recomputes P from lse) with every operand kept in
// float32, so the result is as accurate as a plain float32 implementation. The backward pass is
// two kernels that each own what they write (dK/dV: a key tile; dQ: a query tile): no atomics, so
// the gradients are the same bits on every run. Which keys a query sees and what happens to a
// score before the softmax are the mask and score-modifier policies' (mask.cuh, score_mod.cuh).
//
// Every kernel runs 256 threads as a 16 x 16 grid. Thread (ty, tx) owns rows ty, ty + 16, ... of
// an output tile, so the 16 threads of a row form one half-warp and a row reduction is four
// shuffles. Products are register-tiled: gemm_nt (both operands contiguous along the reduction,
// as Q·Kᵀ) and gemm_nn (second operand contiguous along the output columns, as P·V).
#include "args.cuh"

namespace f32 {

constexpr int THREADS = 256;

// Row stride of a Q/K/V/dO tile (head dims are multiples of 32): ≡ 4 mod 32 words, so gemm_nt's
// float4 reads of eight consecutive rows at one column fall in eight distinct bank quads.
template <int COLS>
struct OperandTile {
    static_assert(COLS % 32 == 0, "head dims are padded to multiples of 32");
    static constexpr int STRIDE = COLS + 4;
};

// Row stride of a P/dS tile: ≡ 16 mod 32 words, so the two half-warps of a warp, which store
// rows r and r + 1, write disjoint halves of the banks.
template <int COLS>
struct ScoreTile {
    static_assert(COLS % 16 == 0, "tiles are multiples of 16");
    static constexpr int STRIDE = COLS % 32 == 16 ? COLS : COLS + 16;
};

__device__ __forceinline__ int thread_row() { return threadIdx.x / 16; }
__device__ __forceinline__ int thread_col() { return threadIdx.x % 16; }

__device__ __forceinline__ float lane4(const float4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// acc[i][j] += sum_k a[ty + 16 i][k] * b[tx + 16 j][k], k over [0, K). a and b are shared tiles
// with row strides AS and BS (floats). Each k is added in order: the sums are reproducible.
template <int TM, int TN, int K, int AS, int BS>
__device__ __forceinline__ void gemm_nt(float (&acc)[TM][TN], const float* a, const float* b) {
    static_assert(K % 4 == 0 && AS % 4 == 0 && BS % 4 == 0, "float4 operand reads");
    a += thread_row() * AS;
    b += thread_col() * BS;
#pragma unroll 2
    for (int k = 0; k < K; k += 4) {
        float4 av[TM], bv[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) av[i] = *reinterpret_cast<const float4*>(a + i * 16 * AS + k);
#pragma unroll
        for (int j = 0; j < TN; ++j) bv[j] = *reinterpret_cast<const float4*>(b + j * 16 * BS + k);
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                acc[i][j] = fmaf(av[i].x, bv[j].x, acc[i][j]);
                acc[i][j] = fmaf(av[i].y, bv[j].y, acc[i][j]);
                acc[i][j] = fmaf(av[i].z, bv[j].z, acc[i][j]);
                acc[i][j] = fmaf(av[i].w, bv[j].w, acc[i][j]);
            }
    }
}

// Output columns of gemm_nn: a thread owns CN columns in CN / W runs of W adjacent columns, run c
// starting at (c * 16 + tx) * W, so the 16 threads of a row read one contiguous stretch of b.
template <int CN>
struct NNColumns {
    static constexpr int W = CN % 4 == 0 ? 4 : 2;
    static_assert(CN % W == 0, "head dims are padded to multiples of 32");
    static __device__ __forceinline__ int col(int c) { return ((c / W) * 16 + thread_col()) * W + c % W; }
};

// acc[i][c] += sum_k a[ty + 16 i][k] * b[k][col(c)], k over [0, K), in order.
template <int TM, int CN, int K, int AS, int BS>
__device__ __forceinline__ void gemm_nn(float (&acc)[TM][CN], const float* a, const float* b) {
    constexpr int W = NNColumns<CN>::W;
    static_assert(K % 4 == 0 && AS % 4 == 0 && BS % W == 0, "vector operand reads");
    a += thread_row() * AS;
    b += thread_col() * W;
#pragma unroll 1
    for (int k = 0; k < K; k += 4) {
        float4 av[TM];
#pragma unroll
        for (int i = 0; i < TM; ++i) av[i] = *reinterpret_cast<const float4*>(a + i * 16 * AS + k);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const float* brow = b + (k + kk) * BS;
#pragma unroll
            for (int c = 0; c < CN / W; ++c) {
                float bv[W];
                if constexpr (W == 4) {
                    const float4 x = *reinterpret_cast<const float4*>(brow + c * 16 * W);
                    bv[0] = x.x, bv[1] = x.y, bv[2] = x.z, bv[3] = x.w;
                } else {
                    const float2 x = *reinterpret_cast<const float2*>(brow + c * 16 * W);
                    bv[0] = x.x, bv[1] = x.y;
                }
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int w = 0; w < W; ++w)
                        acc[i][c * W + w] = fmaf(lane4(av[i], kk), bv[w], acc[i][c * W + w]);
            }
        }
    }
}

template <int TM, int TN>
__device__ __forceinline__ void zero(float (&x)[TM][TN]) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) x[i][j] = 0.f;
}

// Max and sum over the 16 threads of one row (one half-warp).
__device__ __forceinline__ float row_max16(float x) {
#pragma unroll
    for (int o = 8; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float row_sum16(float x) {
#pragma unroll
    for (int o = 8; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Copies rows [row0, row0 + ROWS) x columns [0, COLS) of a row-major global matrix (row stride
// `ld` floats, `nrows` valid rows, `ncols` valid columns) into a shared tile of row stride
// STRIDE, zero-filling everything outside the valid region: zeros, not stale data, so that the
// padding cannot feed NaN into a product. ALIGNED: base and ld allow 16-byte copies (checked on
// the host); a copy that straddles `ncols` reads only the valid floats and zero-fills the rest.
template <int ROWS, int COLS, int STRIDE, bool ALIGNED>
__device__ __forceinline__ void load_tile(float* smem, const float* gmem, i64 ld, int row0,
                                          int nrows, int ncols) {
    if constexpr (ALIGNED) {
        constexpr int CHUNKS = COLS / 4;
#pragma unroll 4
        for (int c = threadIdx.x; c < ROWS * CHUNKS; c += THREADS) {
            const int r = c / CHUNKS;
            const int col = (c % CHUNKS) * 4;
            const int grow = row0 + r;
            const int valid = grow < nrows ? max(0, min(4, ncols - col)) : 0;
            const float* src = valid ? gmem + (i64)grow * ld + col : gmem;
            cp_async_16(smem_addr(smem + r * STRIDE + col), src, valid * 4);
        }
    } else {
        for (int e = threadIdx.x; e < ROWS * COLS; e += THREADS) {
            const int r = e / COLS;
            const int col = e % COLS;
            const int grow = row0 + r;
            smem[r * STRIDE + col] = (grow < nrows && col < ncols) ? gmem[(i64)grow * ld + col] : 0.f;
        }
    }
}

// Writes rows ty + 16 i (from `row0`, below `nrows`) of a gemm_nn accumulator to a row-major
// global matrix, columns below `ncols`, each value passed through `finish(i, x)`.
template <int TM, int CN, bool ALIGNED, typename Finish>
__device__ __forceinline__ void store_rows(float* gmem, i64 ld, const float (&acc)[TM][CN],
                                           int row0, int nrows, int ncols, Finish finish) {
    constexpr int W = NNColumns<CN>::W;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int row = row0 + thread_row() + 16 * i;
        if (row >= nrows) continue;
        float* grow = gmem + (i64)row * ld;
#pragma unroll
        for (int c = 0; c < CN; c += W) {
            const int col = NNColumns<CN>::col(c);
            if (ALIGNED && col + W <= ncols) {
                if constexpr (W == 4) {
                    *reinterpret_cast<float4*>(grow + col) =
                        make_float4(finish(i, acc[i][c]), finish(i, acc[i][c + 1]),
                                    finish(i, acc[i][c + 2]), finish(i, acc[i][c + 3]));
                } else {
                    *reinterpret_cast<float2*>(grow + col) =
                        make_float2(finish(i, acc[i][c]), finish(i, acc[i][c + 1]));
                }
            } else {
#pragma unroll
                for (int w = 0; w < W; ++w)
                    if (col + w < ncols) grow[col + w] = finish(i, acc[i][c + w]);
            }
        }
    }
}

// x as a value the compiler cannot see through: what is derived from it is computed where it is
// used, not once early on and then held in registers (through the key loop, where they are
// scarcest: the forward's budget is 128 per thread).
__device__ __forceinline__ int opaque(int x) {
    asm volatile("" : "+r"(x));
    return x;
}

// The factor that turns a stored score into a natural-log logit: the raw score times the scale
// (identity), or the base-2 logit a modifier stores (score_mod.cuh) times ln 2. The natural-log
// paths (lse, the backward pass's P) use it with an fma, so they carry the scale itself, not
// scale·log2 e rounded to float.
template <class MOD>
__device__ __forceinline__ float natural_factor(float scale) {
    return MOD::identity ? scale : LN2_F;
}

// An S tile (rows m0 + ty + 16 i, keys n0 + tx + 16 j) through the score modifier, then −inf where
// the row does not see the key; the element test runs only on tiles that need it.
template <int BLOCK_M, int BLOCK_N, int TM, int TN, class MASK, class MOD>
__device__ __forceinline__ void modify_and_mask(float (&s)[TM][TN], const MASK& mask, const MOD& mod,
                                                int m0, int n0) {
    m0 = opaque(m0);  // the rows' key bounds and ALiBi offsets: per tile, not hoisted out of the loop
    const int ty = thread_row(), tx = thread_col();
    if constexpr (!MOD::identity) {
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) s[i][j] = mod.apply(s[i][j], m0 + ty + 16 * i, n0 + tx + 16 * j);
    }
    if (mask.partial(m0, BLOCK_M, n0, BLOCK_N)) {
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const auto keys = keys_of_row(mask, m0 + ty + 16 * i);
#pragma unroll
            for (int j = 0; j < TN; ++j)
                if (!keys.contains(n0 + tx + 16 * j)) s[i][j] = -INFINITY;
        }
    }
}

// One key tile of the online softmax, in base 2: exponents s·scale − base with base = max·scale
// (`scale` is the modifier's softmax_scale(): scale·log2 e on raw scores, 1 on base-2 logits), the
// same rounded product every time, so exp2(old base − new base) rescales exactly what earlier
// tiles added. P goes to the shared tile sp (row stride PS), acc and the row sums are rescaled. A
// row that has seen only masked keys keeps max −inf and subtracts 0 instead, so its
// probabilities are exp2(−inf) = 0, never NaN.
template <int PS, int TM, int TN, int CN>
__device__ __forceinline__ void softmax_update(const float (&s)[TM][TN], float (&row_max)[TM],
                                               float (&row_sum)[TM], float (&acc)[TM][CN], float* sp,
                                               float scale) {
    const int ty = thread_row(), tx = thread_col();
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        float mx = row_max[i];
#pragma unroll
        for (int j = 0; j < TN; ++j) mx = fmaxf(mx, s[i][j]);
        mx = row_max16(mx);
        const float base = mx == -INFINITY ? 0.f : __fmul_rn(mx, scale);
        const float alpha = exp2f(__fmul_rn(row_max[i], scale) - base);
        row_max[i] = mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const float p = exp2f(fmaf(s[i][j], scale, -base));
            sp[(ty + 16 * i) * PS + tx + 16 * j] = p;
            sum += p;
        }
        row_sum[i] = row_sum[i] * alpha + sum;
#pragma unroll
        for (int c = 0; c < CN; ++c) acc[i][c] *= alpha;
    }
}

// lse = ln Σ exp(logit) = max·nat + ln l − (max·scale − base)·ln 2, with scale and base as in
// softmax_update and nat = natural_factor: the last term is the rounding of base, recovered
// exactly by an fma (0 when scale is 1). −inf for a row that saw no key (l = 0).
__device__ __forceinline__ float natural_lse(float row_max, float l, float scale, float nat) {
    const float base = __fmul_rn(row_max, scale);
    const float base_error = fmaf(row_max, scale, -base);
    return l > 0.f ? fmaf(row_max, nat, fmaf(-base_error, LN2_F, logf(l))) : -INFINITY;
}

}  // namespace f32

// ---------------------------------------------------------------------------------- forward

struct F32FwdArgs {
    const float* q;
    const float* k;
    const float* v;
    float* o;
    float* lse;
    const int* tile_ptr;  // block-sparse: CSR over query tiles (row_ptr / col_idx), else null
    const int* tile_idx;
    i64 q_sb, q_sh, q_sn;  // strides in elements: batch, head, row
    i64 k_sb, k_sh, k_sn;
    i64 v_sb, v_sh, v_sn;
    i64 o_sb, o_sh, o_sn;
    int nq, nk, d, dv;
    int heads, group;  // query heads; query heads per key/value head
    int m_tiles;       // ceil(nq / BLOCK_M)
    int mask_heads;    // block-sparse: 1 = one pattern per head, 0 = shared
    float scale;       // softmax scale
    float scale_log2;  // softmax scale * log2(e)
    MASK_AND_SCORE_FIELDS
};
static_assert(sizeof(F32FwdArgs) == 232, "F32FwdArgs must match FWD_ARGS in float32.py");

// One thread block owns BLOCK_M query rows of one (batch, head) and walks the key tiles of
// BLOCK_N keys its rows see: S = Q·Kᵀ in registers, score modifier and mask, online softmax, P
// through shared memory, O += P·V. The V load overlaps Q·Kᵀ and the softmax; the next K load
// overlaps P·V.
// Up to head dim 128 two blocks fit in an SM's shared memory (A100 and newer); the 128 registers
// per thread that two blocks leave are enough without spills when Dv <= D, not when Dv > D.
template <int DQK, int DV, int BLOCK_M, int BLOCK_N, class MASK, class MOD, bool ALIGNED>
__global__ void __launch_bounds__(f32::THREADS, (DQK <= 128 && DV <= DQK) ? 2 : 1)
flash_f32_fwd(const F32FwdArgs a) {
    using namespace f32;
    constexpr int TM = BLOCK_M / 16;  // rows of S and O per thread
    constexpr int TN = BLOCK_N / 16;  // columns of S per thread
    constexpr int CN = DV / 16;       // columns of O per thread
    constexpr int QS = OperandTile<DQK>::STRIDE;
    constexpr int VS = OperandTile<DV>::STRIDE;
    constexpr int PS = ScoreTile<BLOCK_N>::STRIDE;

    extern __shared__ __align__(16) float smem[];
    float* sq = smem;
    float* sk = sq + BLOCK_M * QS;
    float* sv = sk + BLOCK_N * QS;
    float* sp = sv + BLOCK_N * VS;

    const QueryTile tile = query_tile_of_block<MASK::banded>(a.m_tiles, a.heads);
    const int b = tile.b, h = tile.h, hk = h / a.group;
    const int m0 = tile.m_tile * BLOCK_M;
    const MOD mod(a, b, h);

    const float* q = a.q + b * a.q_sb + h * a.q_sh;
    const float* k = a.k + b * a.k_sb + hk * a.k_sh;
    const float* v = a.v + b * a.v_sb + hk * a.v_sh;

    float acc[TM][CN];
    float row_max[TM], row_sum[TM];  // row_sum: this thread's columns only, reduced at the end
    zero(acc);
#pragma unroll
    for (int i = 0; i < TM; ++i) row_max[i] = -INFINITY, row_sum[i] = 0.f;

    // The mask and its walk only after Q's copies are issued. A block-sparse walk under a band
    // searches its row of the tile index; placed before the copies, it made ptxas ask for about
    // 150 registers at D = 128 (uncapped), and some builds then spilled when squeezed into the
    // 128 of two blocks per SM. Placed here, it asks for at most 130.
    f32::load_tile<BLOCK_M, DQK, QS, ALIGNED>(sq, q, a.q_sn, m0, a.nq, a.d);
    const MASK mask(a);
    const auto keys = key_tiles_of<BLOCK_M, BLOCK_N>(mask, tile.m_tile, h, a.m_tiles);
    int n_tile = keys.count > 0 ? keys[0] : 0;
    if (keys.count > 0) f32::load_tile<BLOCK_N, DQK, QS, ALIGNED>(sk, k, a.k_sn, n_tile * BLOCK_N, a.nk, a.d);
    cp_async_commit();

    for (int it = 0; it < keys.count; ++it) {
        cp_async_wait_all();
        __syncthreads();  // K tile (and Q) visible; every thread is done with the previous V and P
        f32::load_tile<BLOCK_N, DV, VS, ALIGNED>(sv, v, a.v_sn, n_tile * BLOCK_N, a.nk, a.dv);
        cp_async_commit();

        float s[TM][TN];
        zero(s);
        gemm_nt<TM, TN, DQK, QS, QS>(s, sq, sk);
        modify_and_mask<BLOCK_M, BLOCK_N>(s, mask.template tile<BLOCK_M, BLOCK_N>(m0, n_tile * BLOCK_N, keys.slot(it)),
                                          mod, m0, n_tile * BLOCK_N);
        softmax_update<PS>(s, row_max, row_sum, acc, sp, mod.softmax_scale());

        cp_async_wait_all();
        __syncthreads();  // V tile and P visible; every thread is done with this K tile
        if (it + 1 < keys.count) {
            n_tile = keys[it + 1];
            f32::load_tile<BLOCK_N, DQK, QS, ALIGNED>(sk, k, a.k_sn, n_tile * BLOCK_N, a.nk, a.d);
        }
        cp_async_commit();

        gemm_nn<TM, CN, BLOCK_N, PS, VS>(acc, sp, sv);
    }
    cp_async_wait_all();  // nothing left in flight when no key tile was visited

    // O = acc / l (0 for rows that saw no key); lse in natural log (natural_lse). The addresses
    // come from opaque copies of b and h, so that none of their prologue terms lives through the loop.
    const int bo = opaque(b), ho = opaque(h);
    float l[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        l[i] = row_sum16(row_sum[i]);
        const int row = m0 + thread_row() + 16 * i;
        if (thread_col() == 0 && row < a.nq)
            a.lse[((i64)bo * a.heads + ho) * a.nq + row] =
                natural_lse(row_max[i], l[i], mod.softmax_scale(), natural_factor<MOD>(a.scale));
    }
    f32::store_rows<TM, CN, ALIGNED>(a.o + bo * a.o_sb + ho * a.o_sh, a.o_sn, acc, m0, a.nq, a.dv,
                                     [&](int i, float x) { return l[i] > 0.f ? x / l[i] : 0.f; });
}

// ---------------------------------------------------------------------------------- backward

struct F32BwdArgs {
    const float* q;
    const float* k;
    const float* v;
    const float* o;
    const float* dout;
    const float* lse;
    float* dq_out;  // gradients, (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
    float* dk_out;
    float* dv_out;
    float* delta;         // workspace (B, Hq, Nq): rowsum(dO ∘ O)
    const int* tile_ptr;  // block-sparse: CSR over query tiles (dQ) or its transpose (dK/dV)
    const int* tile_idx;
    i64 q_sb, q_sh, q_sn;  // strides in elements: batch, head, row
    i64 k_sb, k_sh, k_sn;
    i64 v_sb, v_sh, v_sn;
    i64 o_sb, o_sh, o_sn;
    i64 do_sb, do_sh, do_sn;
    i64 dq_sb, dq_sh, dq_sn;
    i64 dk_sb, dk_sh, dk_sn;
    i64 dv_sb, dv_sh, dv_sn;
    int batch, nq, nk, d, dv;
    int heads, group;  // query heads; query heads per key/value head
    int m_tiles;       // ceil(nq / tile rows) of the kernel launched
    int n_tiles;       // ceil(nk / tile keys) of the kernel launched
    int mask_heads;    // block-sparse: 1 = one pattern per head, 0 = shared
    float scale;
    float scale_log2;  // scale * log2(e)
    MASK_AND_SCORE_FIELDS
};
static_assert(sizeof(F32BwdArgs) == 376, "F32BwdArgs must match BWD_ARGS in float32.py");

// Per query row: Delta = rowsum(dO ∘ O). One warp per row.
__global__ void __launch_bounds__(f32::THREADS) flash_f32_bwd_prep(const F32BwdArgs a) {
    const i64 row = (i64)blockIdx.x * (f32::THREADS / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= (i64)a.batch * a.heads * a.nq) return;  // whole warps leave together
    const int n = (int)(row % a.nq);
    const int h = (int)((row / a.nq) % a.heads);
    const int b = (int)(row / a.nq / a.heads);
    const float* o = a.o + b * a.o_sb + h * a.o_sh + n * a.o_sn;
    const float* dout = a.dout + b * a.do_sb + h * a.do_sh + n * a.do_sn;
    float sum = 0.f;
    for (int c = lane; c < a.dv; c += 32) sum = fmaf(dout[c], o[c], sum);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) a.delta[row] = sum;
}

namespace f32 {

// The backward pass recomputes P = exp(logit − lse) from the natural-log lse as stored, the logit
// as value · natural_factor inside one fma: in base 2 the products s·scale·log2 e and lse·log2 e
// would each add a rounding of the size of the exponent to every P. `lse_of` gives +inf for rows
// past Nq and for rows that attend to nothing (lse = -inf), so that their P is exp(-inf) = 0.
__device__ __forceinline__ float lse_of(const float* lse, int row, int nq) {
    const float x = row < nq ? lse[row] : -INFINITY;
    return x == -INFINITY ? INFINITY : x;
}

// lse (as lse_of gives it) and Δ of the query rows first + 16 k of head h.
template <int N>
__device__ __forceinline__ void query_stats(float (&lse_q)[N], float (&delta_q)[N], const F32BwdArgs& a,
                                            int b, int h, int first) {
    const float* lse = a.lse + ((i64)b * a.heads + h) * a.nq;
    const float* delta = a.delta + ((i64)b * a.heads + h) * a.nq;
#pragma unroll
    for (int k = 0; k < N; ++k) {
        const int row = first + 16 * k;
        lse_q[k] = lse_of(lse, row, a.nq);
        delta_q[k] = row < a.nq ? delta[row] : 0.f;
    }
}

// P and dS = P ∘ (dP − Δ) of one score tile into shared tiles of row stride PS: P = 0 where the
// query does not see the key (tested only when `partial`), and dS times the modifier's dlogit/ds
// / scale. The tile's rows are row0 + ty + 16 i, its columns col0 + tx + 16 j: queries × keys (dQ),
// or with TRANSPOSED keys × queries (the dK/dV kernel's Sᵀ, which also keeps Pᵀ in sp); lse and
// delta are per query.
template <bool TRANSPOSED, int PS, int TM, int TN, class MASK, class MOD>
__device__ __forceinline__ void probs_and_grads(const float (&s)[TM][TN], const float (&dp)[TM][TN],
                                                const float (&lse)[TRANSPOSED ? TN : TM],
                                                const float (&delta)[TRANSPOSED ? TN : TM],
                                                const MASK& mask, const MOD& mod, bool partial,
                                                int row0, int col0, float nat, float* sp, float* sds) {
    const int ty = thread_row(), tx = thread_col();
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int row = row0 + ty + 16 * i, col = col0 + tx + 16 * j;
            const int query = TRANSPOSED ? col : row, key = TRANSPOSED ? row : col;
            const int qi = TRANSPOSED ? j : i;
            float grad;
            const float x = mod.apply(s[i][j], query, key, grad);
            float p = expf(fmaf(x, nat, -lse[qi]));
            if (partial && !sees(mask, query, key)) p = 0.f;
            float ds = p * (dp[i][j] - delta[qi]);
            if constexpr (MOD::has_grad_factor) ds *= grad;
            if constexpr (TRANSPOSED) sp[(ty + 16 * i) * PS + tx + 16 * j] = p;
            sds[(ty + 16 * i) * PS + tx + 16 * j] = ds;
        }
}

}  // namespace f32

// dK, dV for one key tile of BLOCK_N keys of one (batch, key/value head): the block walks the
// query tiles (BLOCK_M rows) that see the key tile, for every query head of the group, and
// accumulates in registers
//     Sᵀ = K·Qᵀ, Pᵀ = exp(logitᵀ − lse), dPᵀ = V·dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − Δ) (∘ dlogit/ds / scale),
//     dV += Pᵀ·dO, dK += scale · dSᵀ·Q,
// so that every element of dK and dV is written once, by one thread, in a fixed order. The next
// dO tile loads while dK += dSᵀ·Q runs; dPᵀ runs while the next Q tile lands.
template <int DQK, int DV, int BLOCK_M, int BLOCK_N, class MASK, class MOD, bool ALIGNED>
__global__ void __launch_bounds__(f32::THREADS, 1)
flash_f32_bwd_dkdv(const F32BwdArgs a) {
    using namespace f32;
    constexpr int TM = BLOCK_N / 16;  // key rows per thread
    constexpr int TN = BLOCK_M / 16;  // query columns of Sᵀ per thread
    constexpr int CK = DQK / 16;      // columns of dK per thread
    constexpr int CV = DV / 16;       // columns of dV per thread
    constexpr int QS = OperandTile<DQK>::STRIDE;
    constexpr int VS = OperandTile<DV>::STRIDE;
    constexpr int PS = ScoreTile<BLOCK_M>::STRIDE;

    extern __shared__ __align__(16) float smem[];
    float* sk = smem;
    float* sv = sk + BLOCK_N * QS;
    float* sq = sv + BLOCK_N * VS;
    float* sdo = sq + BLOCK_M * QS;
    float* spt = sdo + BLOCK_M * VS;  // Pᵀ
    float* sdst = spt + BLOCK_N * PS; // dSᵀ

    const KvTile tile = kv_tile_of_block(a.n_tiles, a.heads / a.group);
    const int b = tile.b, hk = tile.hk, n0 = tile.n_tile * BLOCK_N;
    const MASK mask(a);
    QueryTileWalk<BLOCK_M, BLOCK_N, MASK> walk(mask, a, tile.n_tile, hk);
    // dK/dV rows past Nk are never stored, so only the band's edges call for the element test.
    const int valid_keys = min(BLOCK_N, a.nk - n0);

    const float* k = a.k + b * a.k_sb + hk * a.k_sh;
    const float* v = a.v + b * a.v_sb + hk * a.v_sh;
    auto q_of = [&](int h) { return a.q + b * a.q_sb + h * a.q_sh; };
    auto do_of = [&](int h) { return a.dout + b * a.do_sb + h * a.do_sh; };

    float dk_acc[TM][CK], dv_acc[TM][CV];
    zero(dk_acc);
    zero(dv_acc);

    if (walk.valid()) {
        const int m0 = walk.m_tile() * BLOCK_M;
        f32::load_tile<BLOCK_N, DQK, QS, ALIGNED>(sk, k, a.k_sn, n0, a.nk, a.d);
        f32::load_tile<BLOCK_N, DV, VS, ALIGNED>(sv, v, a.v_sn, n0, a.nk, a.dv);
        f32::load_tile<BLOCK_M, DV, VS, ALIGNED>(sdo, do_of(walk.h), a.do_sn, m0, a.nq, a.dv);
        cp_async_commit();
        f32::load_tile<BLOCK_M, DQK, QS, ALIGNED>(sq, q_of(walk.h), a.q_sn, m0, a.nq, a.d);
        cp_async_commit();
    }

    while (walk.valid()) {
        const int h = walk.h;
        const int m0 = walk.m_tile() * BLOCK_M;
        const MOD mod(a, b, h);
        float lse_c[TN], delta_c[TN];  // for this thread's query columns
        query_stats(lse_c, delta_c, a, b, h, m0 + thread_col());

        cp_async_wait<1>();
        __syncthreads();  // dO (K, V) visible
        float st[TM][TN], dpt[TM][TN];
        zero(dpt);
        gemm_nt<TM, TN, DV, VS, VS>(dpt, sv, sdo);

        cp_async_wait<0>();
        __syncthreads();  // Q visible
        zero(st);
        gemm_nt<TM, TN, DQK, QS, QS>(st, sk, sq);

        const auto tile_mask = mask.template tile<BLOCK_M, BLOCK_N>(m0, n0, walk.slot());
        const bool partial = hides_pairs(tile_mask) && tile_mask.partial(m0, BLOCK_M, n0, valid_keys);
        probs_and_grads<true, PS>(st, dpt, lse_c, delta_c, tile_mask, mod, partial, n0, m0,
                                  natural_factor<MOD>(a.scale), spt, sdst);
        __syncthreads();  // Pᵀ, dSᵀ visible
        gemm_nn<TM, CV, BLOCK_M, PS, VS>(dv_acc, spt, sdo);

        walk.next();
        __syncthreads();  // every thread is done with dO
        if (walk.valid())
            f32::load_tile<BLOCK_M, DV, VS, ALIGNED>(sdo, do_of(walk.h), a.do_sn, walk.m_tile() * BLOCK_M,
                                                     a.nq, a.dv);
        cp_async_commit();

        gemm_nn<TM, CK, BLOCK_M, PS, QS>(dk_acc, sdst, sq);
        __syncthreads();  // every thread is done with Q, Pᵀ and dSᵀ
        if (walk.valid())
            f32::load_tile<BLOCK_M, DQK, QS, ALIGNED>(sq, q_of(walk.h), a.q_sn, walk.m_tile() * BLOCK_M,
                                                      a.nq, a.d);
        cp_async_commit();
    }
    cp_async_wait_all();

    // Key tiles that no query reaches get zeros: every element is written.
    f32::store_rows<TM, CK, ALIGNED>(a.dk_out + b * a.dk_sb + hk * a.dk_sh, a.dk_sn, dk_acc, n0, a.nk,
                                     a.d, [&](int, float x) { return x * a.scale; });
    f32::store_rows<TM, CV, ALIGNED>(a.dv_out + b * a.dv_sb + hk * a.dv_sh, a.dv_sn, dv_acc, n0, a.nk,
                                     a.dv, [](int, float x) { return x; });
}

// dQ for one query tile of BLOCK_M rows of one (batch, head): the block walks the key tiles of
// BLOCK_N keys its rows see and accumulates dQ += scale · dS·K in registers,
//     S = Q·Kᵀ, P = exp(logit − lse), dP = dO·Vᵀ, dS = P ∘ (dP − Δ) (∘ dlogit/ds / scale).
// The next V tile loads while dS·K runs.
template <int DQK, int DV, int BLOCK_M, int BLOCK_N, class MASK, class MOD, bool ALIGNED>
__global__ void __launch_bounds__(f32::THREADS, 1)
flash_f32_bwd_dq(const F32BwdArgs a) {
    using namespace f32;
    constexpr int TM = BLOCK_M / 16;  // query rows per thread
    constexpr int TN = BLOCK_N / 16;  // key columns of S per thread
    constexpr int CQ = DQK / 16;      // columns of dQ per thread
    constexpr int QS = OperandTile<DQK>::STRIDE;
    constexpr int VS = OperandTile<DV>::STRIDE;
    constexpr int PS = ScoreTile<BLOCK_N>::STRIDE;

    extern __shared__ __align__(16) float smem[];
    float* sq = smem;
    float* sdo = sq + BLOCK_M * QS;
    float* sk = sdo + BLOCK_M * VS;
    float* sv = sk + BLOCK_N * QS;
    float* sds = sv + BLOCK_N * VS;

    const QueryTile tile = query_tile_of_block<MASK::banded>(a.m_tiles, a.heads);
    const int b = tile.b, h = tile.h, hk = h / a.group;
    const int m0 = tile.m_tile * BLOCK_M;
    const MASK mask(a);
    const MOD mod(a, b, h);
    const auto keys = key_tiles_of<BLOCK_M, BLOCK_N>(mask, tile.m_tile, h, a.m_tiles);

    const float* k = a.k + b * a.k_sb + hk * a.k_sh;
    const float* v = a.v + b * a.v_sb + hk * a.v_sh;

    float lse_r[TM], delta_r[TM];  // for this thread's rows
    query_stats(lse_r, delta_r, a, b, h, m0 + thread_row());
    float dq_acc[TM][CQ];
    zero(dq_acc);

    int n_tile = keys.count > 0 ? keys[0] : 0;
    if (keys.count > 0) {
        f32::load_tile<BLOCK_M, DQK, QS, ALIGNED>(sq, a.q + b * a.q_sb + h * a.q_sh, a.q_sn, m0, a.nq, a.d);
        f32::load_tile<BLOCK_M, DV, VS, ALIGNED>(sdo, a.dout + b * a.do_sb + h * a.do_sh, a.do_sn, m0, a.nq, a.dv);
        f32::load_tile<BLOCK_N, DQK, QS, ALIGNED>(sk, k, a.k_sn, n_tile * BLOCK_N, a.nk, a.d);
        f32::load_tile<BLOCK_N, DV, VS, ALIGNED>(sv, v, a.v_sn, n_tile * BLOCK_N, a.nk, a.dv);
    }
    cp_async_commit();

    for (int it = 0; it < keys.count; ++it) {
        cp_async_wait_all();
        __syncthreads();  // K and V tiles visible; every thread is done with the previous dS
        float s[TM][TN], dp[TM][TN];
        zero(s);
        gemm_nt<TM, TN, DQK, QS, QS>(s, sq, sk);
        zero(dp);
        gemm_nt<TM, TN, DV, VS, VS>(dp, sdo, sv);

        const int n0 = n_tile * BLOCK_N;
        const auto tile_mask = mask.template tile<BLOCK_M, BLOCK_N>(m0, n0, keys.slot(it));
        probs_and_grads<false, PS>(s, dp, lse_r, delta_r, tile_mask, mod, tile_mask.partial(m0, BLOCK_M, n0, BLOCK_N),
                                   m0, n0, natural_factor<MOD>(a.scale), nullptr, sds);
        __syncthreads();  // dS visible; every thread is done with V
        if (it + 1 < keys.count)
            f32::load_tile<BLOCK_N, DV, VS, ALIGNED>(sv, v, a.v_sn, keys[it + 1] * BLOCK_N, a.nk, a.dv);
        cp_async_commit();

        gemm_nn<TM, CQ, BLOCK_N, PS, QS>(dq_acc, sds, sk);
        __syncthreads();  // every thread is done with K
        if (it + 1 < keys.count) {
            n_tile = keys[it + 1];
            f32::load_tile<BLOCK_N, DQK, QS, ALIGNED>(sk, k, a.k_sn, n_tile * BLOCK_N, a.nk, a.d);
        }
        cp_async_commit();
    }
    cp_async_wait_all();

    // Query tiles that see no key get zeros: every element is written.
    f32::store_rows<TM, CQ, ALIGNED>(a.dq_out + b * a.dq_sb + h * a.dq_sh, a.dq_sn, dq_acc, m0, a.nq,
                                     a.d, [&](int, float x) { return x * a.scale; });
}
