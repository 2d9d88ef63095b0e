// FlashAttention backward, FlashAttention-2 loop order, mma.sync tensor cores (sm_80+).
//
// Nothing of size Nq x Nk is stored: P and dS are recomputed tile by tile from Q, K and the
// forward's log-sum-exp. The kernels, in launch order:
//
//   flash_bwd_pre         Delta = rowsum(dO * O); lse in base 2, +inf for rows that attend to
//                         nothing, so that their P recomputes to exactly 0 (never inf - inf);
//                         zeroes the float32 dQ accumulator when one is used.
//   flash_bwd_dkdv        one thread block per BLOCK_N keys of one (batch, key/value head). dK and
//                         dV stay in registers while the block walks every query tile, of every
//                         query head of the GQA group, that sees these keys, so dK/dV need no
//                         atomics. Keys are the MMA rows: S^T = K Q^T lands with P^T in the
//                         accumulator layout that converts to A fragments of P^T dO and
//                         dS^T Q directly. With ATOMIC_DQ it also adds dS K into the dQ
//                         accumulator (dS^T goes through shared memory and comes back transposed
//                         by ldmatrix.trans).
//   flash_bwd_dq_convert  dQ accumulator * scale -> dQ in the input dtype (or float32); also for
//                         the Hopper fused dQ's accumulator (FRAGMENT_ORDER), there lane by lane
//                         beside the dK/dV grid's last wave where that counts its lanes
//                         (AFTER_LANES).
//   flash_bwd_dq          the deterministic alternative to ATOMIC_DQ: one thread block per query
//                         tile walks its key tiles, recomputes P and dP, and writes dQ once.
//
// The mask (mask.cuh) and the score modifier (score_mod.cuh) are template policies, as in the
// forward: which tiles are visited and which pairs are masked is the mask's to say, and P is
// recomputed as mod.prob(mod.apply(s)), with dS = P * (dP - Delta) * grad where the modifier has a
// gradient factor (softcap: kept per element by flash_bwd_dq, recovered from P by flash_bwd_dkdv,
// which has no registers to spare). The final `* scale` of dK and dQ covers the rest of dlogit/ds.
//
// Scratch rows (lse2, delta, dq_accum) are padded per (batch, head) to rows_pad, a multiple of
// every query tile height, with lse2 = +inf and delta = 0 in the padding: tile loads and
// accumulator updates then need no bounds checks and masked query rows drop out by themselves.
// Where a (batch, head)'s scratch rows start is scratch_offset's to say (schedule.cuh).
//
// VARLEN: packed variable-length sequences (schedule.cuh, sequence_of). Every grid covers the
// longest sequence; a block whose tile lies past its own sequence's end exits at once.
//
// DROPOUT (dropout.cuh; flash_bwd_dkdv and flash_bwd_dq): the forward's mask Z is drawn again per
// tile, in the NumPy path's order (docs/internals.md "Dropout"): dV accumulates (P ∘ Z)ᵀ dO and is
// scaled by 1 / (1 − p) once at the end, dP = (dO Vᵀ) ∘ Z · 1 / (1 − p), dS = P ∘ (dP − Delta),
// where Delta = rowsum(dO ∘ O) of the forward's (dropped) output is what flash_bwd_pre computes.
//
// F32_GRADS: dQ, dK and dV are stored as float32 rather than rounded to the input dtype
// (epilogue.cuh, grad_rows), for callers that add partial gradients of several calls.
#include "args.cuh"

#include "arch/sm80_mma.cuh"
#include "sm80_pieces.cuh"

// ---------------------------------------------------------------------------------------------
// Preprocessing: 32 rows per block, 8 threads per row.
constexpr int PRE_ROWS = 32;

// VARLEN: m_tiles is the row blocks of the longest sequence's padded rows. ZERO_SEMS (dense
// calls): also zero the ordered fused dQ's semaphore of each block's rows; ZERO_LANES (dense
// calls): the lane counters of the fused dQ's cast lane by lane, each by the first block of its
// lane's first query head; ZERO_CLAIMS (beside them): the claim of each block's rows
// (schedule.cuh). Ordered adds and claimed ones store a dQ tile's first part instead of adding it
// (flash_bwd_sm90.cu, write_dq_parts), so the host leaves out ZERO_DQ beside them where every dQ
// tile gets a part.
template <typename T, bool ALIGNED, bool ZERO_DQ, bool VARLEN = false, bool ZERO_SEMS = false,
          bool ZERO_LANES = false, bool ZERO_CLAIMS = false>
__global__ void __launch_bounds__(256)
flash_bwd_pre(const BwdArgs a) {
    let_next_kernel_start();
    static_assert(!ZERO_SEMS || (!VARLEN && PRE_ROWS == dq_semaphore_rows()),
                  "semaphores: one per block of rows of a dense call's accumulator");
    static_assert(!ZERO_LANES || (!VARLEN && !ZERO_SEMS && PRE_ROWS == dq_semaphore_rows()),
                  "lane counters: after a dense call's accumulator, where no semaphores are");
    static_assert(!ZERO_CLAIMS || ZERO_LANES, "tile claims: after the lane counters");
    const int row_blocks = VARLEN ? a.m_tiles : a.rows_pad / PRE_ROWS;
    const int rb = blockIdx.x % row_blocks;
    const int bh = blockIdx.x / row_blocks;
    const int h = bh % a.heads, b = bh / a.heads;
    const Sequence seq = sequence_of<VARLEN>(a, b);
    // Past the sequence's padded scratch rows: nothing of this sequence to write.
    if (VARLEN && rb * PRE_ROWS >= (seq.nq + SCRATCH_ALIGN - 1) / SCRATCH_ALIGN * SCRATCH_ALIGN) return;
    const int row = rb * PRE_ROWS + threadIdx.x / 8;
    const int part = threadIdx.x % 8;

    float acc = 0.f;
    if (row < seq.nq) {
        const u16* o = a.o + b * a.o_sb + h * a.o_sh + seq.q0 * a.o_sn + row * a.o_sn;
        const u16* g = a.dout + b * a.do_sb + h * a.do_sh + seq.q0 * a.do_sn + row * a.do_sn;
        if constexpr (ALIGNED) {
            for (int c = part * 8; c < a.dv; c += 64) {
                const uint4 x = *reinterpret_cast<const uint4*>(o + c);
                const uint4 y = *reinterpret_cast<const uint4*>(g + c);
                acc += dot2<T>(x.x, y.x) + dot2<T>(x.y, y.y) + dot2<T>(x.z, y.z) + dot2<T>(x.w, y.w);
            }
        } else {
            for (int c = part; c < a.dv; c += 8) acc += to_float<T>(o[c]) * to_float<T>(g[c]);
        }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    acc += __shfl_xor_sync(0xffffffffu, acc, 4);
    const i64 scratch = scratch_offset<VARLEN>(a, seq, b, h);
    const i64 idx = scratch + row;
    if (part == 0) {
        a.delta[idx] = acc;
        const float l = row < seq.nq ? a.lse[lse_offset<VARLEN>(a, seq, b, h) + row] : -INFINITY;
        a.lse2[idx] = l == -INFINITY ? INFINITY : l * LOG2E_F;
    }
    if constexpr (ZERO_DQ) {
        float4* acc4 = reinterpret_cast<float4*>(a.dq_accum + (scratch + rb * PRE_ROWS) * a.dqk);
        const int n4 = PRE_ROWS * a.dqk / 4;
        for (int i = threadIdx.x; i < n4; i += 256) acc4[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    if constexpr (ZERO_SEMS) {
        if (threadIdx.x == 0) *dq_semaphore(a, scratch + rb * PRE_ROWS) = 0;
    }
    if constexpr (ZERO_LANES) {
        if (threadIdx.x == 0 && rb == 0 && h % a.group == 0) *dq_lane_counter(a, b, h / a.group) = 0;
        if (threadIdx.x == 0 && blockIdx.x == 0) *dq_cast_ticket(a) = 0;
    }
    if constexpr (ZERO_CLAIMS) {
        if (threadIdx.x == 0) *dq_tile_claim(a, scratch + rb * PRE_ROWS) = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// dK, dV (and atomically dQ) for one key tile.
//
// Warp w owns the MT 16-key slabs starting at key (w % WN) * MT * 16 of the tile. With WC == 1
// it computes S^T/dP^T for all BLOCK_M query columns and dK/dV for all head-dim columns, P^T and
// dS^T never leave registers. With WC > 1 (large head dims, where dK + dV of a whole slab would
// not fit in registers) the WC warps of one slab split the query columns of S^T/dP^T and the
// head-dim columns of dK/dV, and exchange P^T and dS^T through shared memory.

// The kernel's shared buffers: K and V of the key tile, STAGES buffers of the query tile (Q, dO,
// lse2, Delta), and P^T / dS^T when they are exchanged.
struct DkdvSmem {
    u16 *sk, *sv, *sq, *sdo, *sp, *sds;
    float *sl, *sd;
};

// One warp's place in the tile: accumulator row group g and column pair t, its first key row kr0,
// first query column c0, first dK / dV columns, and its ldmatrix lane addresses (bytes; query-tile
// operands add the stage offset). sp / sds: this thread's element (row kr0 + g, column 2t) of the
// exchanged P^T / dS^T.
struct DkdvWarp {
    int g, t, kr0, c0, dk0, dv0;
    u32 sk_a, sv_a, sq_b, sdo_b, sq_bt, sdo_bt, sp_a, sds_a, sds_at, sk_bt;
    u16 *sp, *sds;
};

template <int DQK_, int DV_, int WARPS, int MT_, int WC, int PASSES, int BLOCK_M_, int STAGES, bool ATOMIC_DQ>
struct DkdvShape {
    static constexpr int DQK = DQK_, DV = DV_, MT = MT_, BLOCK_M = BLOCK_M_;
    static constexpr int THREADS = WARPS * 32;
    static constexpr int WN = WARPS / WC;           // key slabs of MT * 16 rows
    static constexpr int BLOCK_N = WN * MT * 16;
    static constexpr int KS = DQK + SMEM_PAD, QS = DQK + SMEM_PAD;  // shared row strides (elements)
    static constexpr int VS = DV + SMEM_PAD, OS = DV + SMEM_PAD;
    static constexpr int PS = BLOCK_M + SMEM_PAD;
    static constexpr int CM = BLOCK_M / WC;         // query columns of S^T per warp
    static constexpr int CMP = CM / PASSES;         // ... per pass
    static constexpr int CTP = CMP / 8;             // their n8 tiles
    static constexpr int KMP = CMP / 16;            // k16 steps of P^T dO, dS^T Q per pass
    static constexpr int KT = DQK / WC / 8;         // n8 tiles of dK per warp
    static constexpr int VT = DV / WC / 8;          // n8 tiles of dV per warp
    static constexpr int KQK = DQK / 16, KVD = DV / 16, KM = BLOCK_M / 16;  // k16 steps
    static constexpr bool P_SMEM = WC > 1;
    static constexpr bool DS_SMEM = WC > 1 || ATOMIC_DQ;
    static_assert(WARPS % WC == 0 && CMP % 16 == 0 && CMP * PASSES == CM && KT % 2 == 0 && VT % 2 == 0,
                  "tile shape");
    static_assert(STAGES == 1 || STAGES == 2, "one or two query-tile buffers");

    // dQ += dS K (ATOMIC_DQ): split over warps by rows (QM 16-row slabs each) and 16-column chunks
    // of the head dim, in passes of at most 32 accumulator registers (dK and dV stay live).
    static constexpr int RS = BLOCK_M / 16;
    static constexpr int QM = (RS % 2 == 0 && RS / 2 <= WARPS) ? 2 : 1;
    static constexpr int ROW_GROUPS = RS / QM;
    static constexpr int COL_GROUPS = WARPS / ROW_GROUPS;
    static constexpr int CH = DQK / 16;
    static constexpr int QC = (CH + COL_GROUPS - 1) / COL_GROUPS;
    static constexpr int PASS = QC * QM <= 4 ? QC : (4 / QM > 0 ? 4 / QM : 1);
    static_assert(!ATOMIC_DQ || (ROW_GROUPS <= WARPS && WARPS % ROW_GROUPS == 0), "dQ warp layout");

    static __device__ __forceinline__ DkdvSmem carve(u16* smem) {
        DkdvSmem s;
        s.sk = smem;
        s.sv = s.sk + BLOCK_N * KS;
        s.sq = s.sv + BLOCK_N * VS;
        s.sdo = s.sq + STAGES * BLOCK_M * QS;
        s.sp = s.sdo + STAGES * BLOCK_M * OS;
        s.sds = s.sp + (P_SMEM ? BLOCK_N * PS : 0);
        s.sl = reinterpret_cast<float*>(s.sds + (DS_SMEM ? BLOCK_N * PS : 0));
        s.sd = s.sl + STAGES * BLOCK_M;
        return s;
    }

    static __device__ __forceinline__ DkdvWarp warp_of(const DkdvSmem& s, int warp, int lane) {
        DkdvWarp w;
        w.g = lane / 4;
        w.t = lane % 4;
        w.kr0 = (warp % WN) * MT * 16;
        w.c0 = (warp / WN) * CM;
        w.dk0 = (warp / WN) * (DQK / WC);
        w.dv0 = (warp / WN) * (DV / WC);
        w.sk_a = smem_addr(s.sk) + (w.kr0 * KS + ldsm_a_offset(lane, KS)) * 2;    // K slab, A
        w.sv_a = smem_addr(s.sv) + (w.kr0 * VS + ldsm_a_offset(lane, VS)) * 2;    // V slab, A
        w.sq_b = smem_addr(s.sq) + (w.c0 * QS + ldsm_b_offset(lane, QS)) * 2;     // Q^T, B
        w.sdo_b = smem_addr(s.sdo) + (w.c0 * OS + ldsm_b_offset(lane, OS)) * 2;   // dO^T, B
        w.sq_bt = smem_addr(s.sq) + (w.dk0 + ldsm_bt_offset(lane, QS)) * 2;       // Q, B
        w.sdo_bt = smem_addr(s.sdo) + (w.dv0 + ldsm_bt_offset(lane, OS)) * 2;     // dO, B
        w.sp_a = smem_addr(s.sp) + (w.kr0 * PS + ldsm_a_offset(lane, PS)) * 2;    // P^T, A
        w.sds_a = smem_addr(s.sds) + (w.kr0 * PS + ldsm_a_offset(lane, PS)) * 2;  // dS^T, A
        w.sds_at = smem_addr(s.sds) + ldsm_b_offset(lane, PS) * 2;                // dS, A (trans)
        w.sk_bt = smem_addr(s.sk) + ldsm_bt_offset(lane, KS) * 2;                 // K, B
        w.sp = s.sp + (w.kr0 + w.g) * PS + 2 * w.t;
        w.sds = s.sds + (w.kr0 + w.g) * PS + 2 * w.t;
        return w;
    }
};

// Q, dO, lse2 and Delta of query tile m_tile of head hh into buffer `stage` (asynchronous).
template <class S, bool ALIGNED, bool VARLEN>
__device__ __forceinline__ void load_query_tile(const BwdArgs& a, const DkdvSmem& s, const Sequence& seq, int b,
                                                int hh, int m_tile, int stage) {
    constexpr int BM = S::BLOCK_M;
    const int m0 = m_tile * BM;
    load_tile<BM, S::DQK, S::THREADS, ALIGNED>(s.sq + stage * BM * S::QS,
                                               a.q + b * a.q_sb + hh * a.q_sh + seq.q0 * a.q_sn, a.q_sn, m0, seq.nq,
                                               a.d);
    load_tile<BM, S::DV, S::THREADS, ALIGNED>(s.sdo + stage * BM * S::OS,
                                              a.dout + b * a.do_sb + hh * a.do_sh + seq.q0 * a.do_sn, a.do_sn, m0,
                                              seq.nq, a.dv);
    const i64 r = scratch_offset<VARLEN>(a, seq, b, hh) + m0;
    load_f32_async<BM, S::THREADS>(s.sl + stage * BM, a.lse2 + r);
    load_f32_async<BM, S::THREADS>(s.sd + stage * BM, a.delta + r);
}

// One pass over the warp's CMP query columns `pass` (query row col_base + cp is column cp of the
// tile): S^T = K Q^T → P^T, then dV += P^T dO (or P^T to shared memory), dP^T = V dO^T → dS^T,
// then dK += dS^T Q (or dS^T to shared memory only). lse2 / delta: the stage's rows.
template <class S, typename T, bool DROPOUT, class MASK, class MOD, class KA, class VA>
__device__ __forceinline__ void dkdv_pass(float (&dk_acc)[S::MT][S::KT][4], float (&dv_acc)[S::MT][S::VT][4],
                                          const KA& ka, const VA& va, const DkdvWarp& w, int pass, u32 q_stage,
                                          u32 o_stage, const float* lse2, const float* delta, const MASK& mask,
                                          const MOD& mod, const DropoutMask& drop, int key_base, int col_base) {
    constexpr int MT = S::MT, CTP = S::CTP, QS = S::QS, OS = S::OS;
    const int cp = w.c0 + pass * S::CMP;  // first query column of this pass

    float s[MT][CTP][4];
    zero_acc(s);
    warp_gemm<T, false, S::KQK>(s, ka, w.sq_b + q_stage + pass * S::CMP * QS * 2, 32, 16 * QS * 2);
    GradFactors<MOD, CTP> grad;  // unused: the softcap factor is recovered from P^T (dead stores)
    const bool partial = mask.partial(col_base + cp, S::CMP, key_base, MT * 16);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        recompute_probs_transposed(s[mt], grad, mask, mod, partial, key_base + mt * 16 + w.g, col_base + cp, w.t,
                                   ColumnPairs<CTP, false>(lse2 + cp, w.t));
    if constexpr (DROPOUT) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            mark_dropped(s[mt], drop, key_base + mt * 16 + w.g, col_base + cp, w.g * 4 + w.t);
    }
    if constexpr (!S::P_SMEM) {
        warp_gemm<T, true, S::KMP>(dv_acc, packed_a<T, DROPOUT>(s), w.sdo_bt + o_stage + cp * OS * 2, 16 * OS * 2,
                                   32);
    } else {
        store_pairs_smem<T, S::PS, DROPOUT>(w.sp + cp, s);
    }

    float dp[MT][CTP][4];
    zero_acc(dp);
    warp_gemm<T, false, S::KVD>(dp, va, w.sdo_b + o_stage + pass * S::CMP * OS * 2, 32, 16 * OS * 2);
    if constexpr (DROPOUT) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) unmark_dropped(s[mt], dp[mt]);
    }
    // dS^T; the softcap factor comes back from P^T (keeping it would cost CTP * 4 registers more,
    // and the D = 128 variants have none to spare).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        softmax_grad_recovered<CTP>(dp[mt], s[mt], mod, [&](int j, int i) {
            const int col = cp + j * 8 + 2 * w.t, e = i % 2;
            const float2 l2 = *reinterpret_cast<const float2*>(lse2 + col);
            const float2 d2 = *reinterpret_cast<const float2*>(delta + col);
            return ElementCoords{col_base + col + e, key_base + mt * 16 + w.g + (i / 2) * 8, e ? l2.y : l2.x,
                                 e ? d2.y : d2.x};
        }, DROPOUT ? drop.rescale : 1.f);
    if constexpr (S::DS_SMEM) store_pairs_smem<T, S::PS>(w.sds + cp, dp);
    if constexpr (!S::P_SMEM) {
        // dK += dS^T Q, scaled at the end.
        warp_gemm<T, true, S::KMP>(dk_acc, packed_a<T>(dp), w.sq_bt + q_stage + cp * QS * 2, 16 * QS * 2, 32);
    }
}

// WC > 1: dV += P^T dO and dK += dS^T Q over all query columns, from the exchanged P^T / dS^T,
// for the warp's head-dim columns.
template <class S, typename T>
__device__ __forceinline__ void dkdv_from_smem(float (&dk_acc)[S::MT][S::KT][4], float (&dv_acc)[S::MT][S::VT][4],
                                               const DkdvWarp& w, u32 q_stage, u32 o_stage) {
    warp_gemm<T, true, S::KM>(dv_acc, SmemA<S::PS>{w.sp_a}, w.sdo_bt + o_stage, 16 * S::OS * 2, 32);
    warp_gemm<T, true, S::KM>(dk_acc, SmemA<S::PS>{w.sds_a}, w.sq_bt + q_stage, 16 * S::QS * 2, 32);
}

// dQ += dS K for one query tile, added to the float32 accumulator rows `dq_rows` (row 0 = the
// tile's first row, DQK floats per row). dS comes back from dS^T in shared memory through
// ldmatrix.trans.
template <class S, typename T>
__device__ __forceinline__ void dq_atomic_add(float* dq_rows, const DkdvWarp& w, int warp) {
    constexpr int QM = S::QM, QC = S::QC, PASS = S::PASS, DQK = S::DQK, PS = S::PS, KS = S::KS;
    const int wr = warp % S::ROW_GROUPS, wcol = warp / S::ROW_GROUPS;
    const int r0 = wr * QM * 16;
    float* acc_base = dq_rows + (i64)r0 * DQK;
#pragma unroll
    for (int p0 = 0; p0 < QC; p0 += PASS) {
        float acc[QM][2 * PASS][4];
        zero_acc(acc);
#pragma unroll
        for (int kk = 0; kk < S::BLOCK_N / 16; ++kk) {
            u32 da[QM][4];
#pragma unroll
            for (int qm = 0; qm < QM; ++qm) ldmatrix_x4_trans(da[qm], w.sds_at + (kk * 16 * PS + r0 + qm * 16) * 2);
#pragma unroll
            for (int i = 0; i < PASS; ++i) {
                const int chunk = wcol * QC + p0 + i;
                if (p0 + i < QC && chunk < S::CH) {
                    u32 kb[4];
                    ldmatrix_x4_trans(kb, w.sk_bt + (kk * 16 * KS + chunk * 16) * 2);
#pragma unroll
                    for (int qm = 0; qm < QM; ++qm) {
                        mma_16816<T>(acc[qm][2 * i], da[qm], kb[0], kb[1]);
                        mma_16816<T>(acc[qm][2 * i + 1], da[qm], kb[2], kb[3]);
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < PASS; ++i) {
            const int chunk = wcol * QC + p0 + i;
            if (p0 + i < QC && chunk < S::CH) {
#pragma unroll
                for (int qm = 0; qm < QM; ++qm)
#pragma unroll
                    for (int jj = 0; jj < 2; ++jj) {
                        float* p = acc_base + (qm * 16 + w.g) * DQK + chunk * 16 + jj * 8 + 2 * w.t;
                        red_add_f32x2(p, acc[qm][2 * i + jj][0], acc[qm][2 * i + jj][1]);
                        red_add_f32x2(p + 8 * DQK, acc[qm][2 * i + jj][2], acc[qm][2 * i + jj][3]);
                    }
            }
        }
    }
}

// The column passes a dK/dV variant runs: the tile's PASSES, doubled for D = 32 without a mask,
// a score modifier, the atomic dQ or dropout, which NVRTC 13.0's ptxas spills at one pass in the 128 registers of
// two blocks per SM (13.5's does not). Twice the passes hold half the query columns of Sᵀ and dPᵀ
// at a time and change nothing else: each element of Sᵀ, dPᵀ, dK and dV comes from the same
// products, accumulated in the same order, so the results are bit-identical (and the time on an
// H200 within 1%). The D = 128 variant with a banded block mask, softcap, ALiBi and the atomic
// dQ spills 24 bytes under 13.0 as well, but ran 6% faster spilling than with doubled passes: it
// keeps its PASSES. Every other variant keeps its compiled code: the policies' flags are matched
// off their template arguments, which instantiates neither policy ahead of the kernel's own first
// use (that order is the order of the constants a module emits).
template <int DQK, int WC, int PASSES, int BLOCK_M, bool ATOMIC_DQ, bool DROPOUT, class MASK, class MOD>
struct DkdvPasses;
template <int DQK, int WC, int PASSES, int BLOCK_M, bool ATOMIC_DQ, bool DROPOUT, bool LEFT, bool RIGHT, bool SPARSE,
          bool EXACT, bool SOFTCAP, bool ALIBI>
struct DkdvPasses<DQK, WC, PASSES, BLOCK_M, ATOMIC_DQ, DROPOUT, Mask<LEFT, RIGHT, SPARSE, EXACT>,
                  ScoreMod<SOFTCAP, ALIBI>> {
    static __device__ constexpr int run() {
        const bool halves = (BLOCK_M / WC / PASSES) % 32 == 0;  // passes stay whole k16 steps
        const bool light = DQK == 32 && PASSES == 1 && !LEFT && !RIGHT && !SPARSE && !EXACT && !SOFTCAP && !ALIBI &&
                           !ATOMIC_DQ && !DROPOUT;
        return halves && light ? 2 * PASSES : PASSES;
    }
};

template <typename T, int DQK, int DV, int WARPS, int MT, int WC, int PASSES, int BLOCK_M, int STAGES,
          bool KV_IN_REGS, class MASK, class MOD, bool ALIGNED, bool ATOMIC_DQ, bool VARLEN = false,
          bool DROPOUT = false, bool F32_GRADS = false>
__global__ void __launch_bounds__(WARPS * 32)
flash_bwd_dkdv(const BwdArgs a) {
    wait_for_previous_kernel();
    let_next_kernel_start();
    constexpr int RUN_PASSES = DkdvPasses<DQK, WC, PASSES, BLOCK_M, ATOMIC_DQ, DROPOUT, MASK, MOD>::run();
    using S = DkdvShape<DQK, DV, WARPS, MT, WC, RUN_PASSES, BLOCK_M, STAGES, ATOMIC_DQ>;
    constexpr int BLOCK_N = S::BLOCK_N, THREADS = S::THREADS;

    extern __shared__ __align__(16) u16 smem[];
    const DkdvSmem sm = S::carve(smem);

    const KvTile tile = kv_tile_of_block(a.n_tiles, a.kv_heads);
    const int b = tile.b, hk = tile.hk;
    const int n0 = tile.n_tile * BLOCK_N;
    const Sequence seq = sequence_of<VARLEN>(a, b);
    if (VARLEN && n0 >= seq.nk) return;  // past this sequence's end (before any barrier)
    const MASK mask(a, seq.nq, seq.nk);
    const int m_tiles = VARLEN ? (seq.nq + BLOCK_M - 1) / BLOCK_M : a.m_tiles;
    QueryTileWalk<BLOCK_M, BLOCK_N, MASK> walk(mask, a, tile.n_tile, hk, m_tiles);

    load_tile<BLOCK_N, DQK, THREADS, ALIGNED>(sm.sk, a.k + b * a.k_sb + hk * a.k_sh + seq.k0 * a.k_sn, a.k_sn, n0,
                                              seq.nk, a.d);
    load_tile<BLOCK_N, DV, THREADS, ALIGNED>(sm.sv, a.v + b * a.v_sb + hk * a.v_sh + seq.k0 * a.v_sn, a.v_sn, n0,
                                             seq.nk, a.dv);
    int m_tile = walk.valid() ? walk.m_tile() : 0;
    if (walk.valid()) load_query_tile<S, ALIGNED, VARLEN>(a, sm, seq, b, walk.h, m_tile, 0);
    cp_async_commit();

    const int warp = threadIdx.x / 32;
    const DkdvWarp w = S::warp_of(sm, warp, threadIdx.x % 32);

    float dk_acc[MT][S::KT][4], dv_acc[MT][S::VT][4];
    zero_acc(dk_acc);
    zero_acc(dv_acc);
    u32 kf[KV_IN_REGS ? MT : 1][KV_IN_REGS ? S::KQK : 1][4];
    u32 vf[KV_IN_REGS ? MT : 1][KV_IN_REGS ? S::KVD : 1][4];
    const auto ka = cached_a<KV_IN_REGS, S::KS>(kf, w.sk_a);
    const auto va = cached_a<KV_IN_REGS, S::VS>(vf, w.sv_a);

    int stage = 0;
    for (int it = 0; walk.valid(); ++it) {
        const int m0 = m_tile * BLOCK_M;
        cp_async_wait_all();
        __syncthreads();  // this query tile visible; every warp is done with the previous one

        auto ahead = walk;
        ahead.next();
        const bool has_next = ahead.valid();
        const int next_m_tile = has_next ? ahead.m_tile() : 0;
        if constexpr (STAGES == 2) {
            if (has_next) load_query_tile<S, ALIGNED, VARLEN>(a, sm, seq, b, ahead.h, next_m_tile, stage ^ 1);
            cp_async_commit();
        }
        if constexpr (KV_IN_REGS) {
            if (it == 0) {
                load_a_frags<S::KS>(kf, w.sk_a);
                load_a_frags<S::VS>(vf, w.sv_a);
            }
        }

        const MOD mod(a, b, walk.h, seq.nq, seq.nk);
        const DropoutMask drop(a, b, walk.h);
        const auto tile_mask = mask.template tile<BLOCK_M, BLOCK_N>(m0, n0, walk.slot());
        const u32 q_stage = stage * BLOCK_M * S::QS * 2, o_stage = stage * BLOCK_M * S::OS * 2;
#pragma unroll 1
        for (int pass = 0; pass < RUN_PASSES; ++pass)
            dkdv_pass<S, T, DROPOUT>(dk_acc, dv_acc, ka, va, w, pass, q_stage, o_stage, sm.sl + stage * BLOCK_M,
                                     sm.sd + stage * BLOCK_M, tile_mask, mod, drop, n0 + w.kr0, m0);

        // P^T / dS^T in shared memory complete; with one buffer, every warp is done with Q and dO.
        if constexpr (S::P_SMEM || ATOMIC_DQ || STAGES == 1) __syncthreads();
        if constexpr (S::P_SMEM) {
            dkdv_from_smem<S, T>(dk_acc, dv_acc, w, q_stage, o_stage);
            if constexpr (STAGES == 1) __syncthreads();  // every warp is done with Q and dO
        }
        if constexpr (STAGES == 1) {
            // The next query tile loads while this one's dQ is computed.
            if (has_next) load_query_tile<S, ALIGNED, VARLEN>(a, sm, seq, b, ahead.h, next_m_tile, 0);
            cp_async_commit();
        }
        if constexpr (ATOMIC_DQ) {
            dq_atomic_add<S, T>(a.dq_accum + (scratch_offset<VARLEN>(a, seq, b, walk.h) + m0) * DQK, w, warp);
        }

        walk = ahead;
        m_tile = next_m_tile;
        if constexpr (STAGES == 2) stage ^= 1;
    }
    cp_async_wait_all();
    if constexpr (DROPOUT) {  // dV = 1 / (1 − p) · Σ (P ∘ Z)ᵀ dO
        const float rescale[2] = {a.drop_rescale, a.drop_rescale};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) rescale_rows(dv_acc[mt], rescale);
    }

    // Epilogue: dK * scale and dV, once. Key tiles no query sees write zeros.
    const float dk_scale[2] = {a.scale, a.scale}, one[2] = {1.f, 1.f};
    auto* dk = grad_rows<F32_GRADS>(a.grad_k) + b * a.gk_sb + hk * a.gk_sh + seq.k0 * a.gk_sn;
    auto* dv = grad_rows<F32_GRADS>(a.grad_v) + b * a.gv_sb + hk * a.gv_sh + seq.k0 * a.gv_sn;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int row0 = n0 + w.kr0 + mt * 16 + w.g;
        store_rows<T, ALIGNED>(dk, a.gk_sn, seq.nk, a.d, dk_acc[mt], row0, w.dk0, w.t, dk_scale);
        store_rows<T, ALIGNED>(dv, a.gv_sn, seq.nk, a.dv, dv_acc[mt], row0, w.dv0, w.t, one);
    }
}

// ---------------------------------------------------------------------------------------------
// dQ accumulator -> dQ: one thread per 8 columns of one row (a chunk). Dense: the threads cover
// every row of every (batch, head) in turn. VARLEN: m_tiles blocks of 256 threads cover the
// longest sequence's rows of each (sequence, head); threads past their sequence's rows exit.
// FRAGMENT_ORDER: the accumulator is in the Hopper fused dQ's order (schedule.cuh,
// dq_fragment_offset), not row-major.
// AFTER_LANES (dense calls, the Hopper fused dQ with adds in any order): the cast starts beside
// the dK/dV grid's last wave instead of after it, a lane (batch, key/value head) at a time, as
// soon as the lane's counter says all of its key tiles' adds have landed (schedule.cuh,
// dq_lane_counter; flash_bwd_sm90.cu, lanes_counted): cast_dq_lane_by_lane.
struct DqChunk {
    int b, h, row, c;  // (batch or sequence, query head), query row, first column
};

// Chunk `idx` of a dense call's dQ, in the order (batch, head, row, column), `chunks` a row.
// That order is lane by lane too: a lane's query heads are next to each other.
__device__ __forceinline__ DqChunk dense_dq_chunk(const BwdArgs& a, i64 idx, int chunks) {
    const i64 row_all = idx / chunks;
    const int bh = (int)(row_all / a.nq);
    return {bh / a.heads, bh % a.heads, (int)(row_all % a.nq), (int)(idx % chunks) * 8};
}

// One chunk: its 8 accumulator floats times the scale, into dQ. FROM_L2: the floats are read past
// L1 (ld.global.cg), as they are added by other SMs while the reading kernel already runs.
template <typename T, bool ALIGNED, bool VARLEN, bool F32_GRADS, bool FRAGMENT_ORDER, bool FROM_L2 = false>
__device__ __forceinline__ void cast_dq_chunk(const BwdArgs& a, const Sequence& seq, const DqChunk& at) {
    const int c = at.c;
    const i64 scratch_row = scratch_offset<VARLEN>(a, seq, at.b, at.h) + at.row;
    const float* src = a.dq_accum + (FRAGMENT_ORDER ? dq_fragment_offset(scratch_row, c, a.dqk) : scratch_row * a.dqk + c);
    auto* dst = grad_rows<F32_GRADS>(a.grad_q) + at.b * a.gq_sb + at.h * a.gq_sh + seq.q0 * a.gq_sn + at.row * a.gq_sn + c;
    const float4* src4 = reinterpret_cast<const float4*>(src);
    const float4 x = FROM_L2 ? __ldcg(src4) : src4[0];
    const float4 y = FROM_L2 ? __ldcg(src4 + 1) : src4[1];
    const float s = a.scale;
    if constexpr (F32_GRADS && ALIGNED) {
        *reinterpret_cast<float4*>(dst) = make_float4(x.x * s, x.y * s, x.z * s, x.w * s);
        *reinterpret_cast<float4*>(dst + 4) = make_float4(y.x * s, y.y * s, y.z * s, y.w * s);
    } else if constexpr (ALIGNED) {
        uint4 out;
        out.x = pack2<T>(x.x * s, x.y * s);
        out.y = pack2<T>(x.z * s, x.w * s);
        out.z = pack2<T>(y.x * s, y.y * s);
        out.w = pack2<T>(y.z * s, y.w * s);
        *reinterpret_cast<uint4*>(dst) = out;
    } else {
        const float vals[8] = {x.x, x.y, x.z, x.w, y.x, y.y, y.z, y.w};
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (c + e < a.d) dst[e] = grad_value<T, F32_GRADS>(vals[e] * s);
    }
}

// The lane-by-lane cast's blocks per SM, at most (CONVERT_BLOCKS_PER_SM in mma_backward.py, which
// sizes its grid): every thread an SM holds, where the blocks' registers allow.
constexpr int CONVERT_BLOCKS_PER_SM = 8;
constexpr int CONVERT_THREADS = 256;                // a block (mma_backward.py's twins of these two)
constexpr int CONVERT_STEP = 4 * CONVERT_THREADS;  // chunks a block takes at a time, four a thread

// Until lane (b, hk)'s counter reaches its key tiles (n_tiles: the dK/dV grid's per lane), so
// that its dQ is whole; should it never come (a bug), once the whole dK/dV grid has ended
// instead (wait_until_equal_gpu gives up), so that the cast cannot hang. Returns whether it waited
// for the grid, after which every lane is whole.
__device__ __forceinline__ bool wait_for_lane(const BwdArgs& a, int b, int hk) {
    const int* counter = dq_lane_counter(a, b, hk);
    if (wait_until_equal_gpu(counter, a.n_tiles)) return false;
    wait_for_previous_kernel();
    return true;
}

// AFTER_LANES: a grid of at most CONVERT_BLOCKS_PER_SM blocks per SM casts the chunks in their
// dense order, which is lane by lane, CONVERT_STEP at a time, each block taking its next step from
// a ticket (dq_cast_ticket), so that the steps are taken in that order: a block waits only on a
// lane no earlier step's lane follows, never with finished lanes' steps queued behind it in its
// own share (a fixed grid stride measured slower than the cast after the grid: benchmarks/NOTES.md,
// "The dQ cast lane by lane"). Before a step's first chunk of a lane it has not waited for, thread
// 0 waits for that lane (acquire loads: what the dK/dV blocks added before their release is then
// visible) and the block synchronises. The kernel is a dependent of the dK/dV kernel, which lets
// it start once all of its blocks have started, so the cast's blocks only ever take SMs that grid
// has left, and spin only on lanes whose key tiles are all running. Its lane counters and ticket
// (zeroed by flash_bwd_pre, which every dK/dV block waited for) are the one thing it touches
// before waiting for a lane; at its end it waits for the dK/dV kernel, so that its own end still
// implies that kernel's (dK, dV).
template <typename T, bool ALIGNED, bool F32_GRADS>
__device__ __forceinline__ void cast_dq_lane_by_lane(const BwdArgs& a) {
    __shared__ i64 step_first;  // the chunk the block's current step starts at
    const int chunks = (a.d + 7) / 8;
    const i64 lane_chunks = (i64)a.group * a.nq * chunks;
    const i64 total = lane_chunks * a.batch * a.kv_heads;
    const Sequence seq = sequence_of<false>(a, 0);
    i64 ready = -1;           // (thread 0's) the last lane this block has waited for
    bool grid_ended = false;  // (thread 0's) the fallback waited for the whole dK/dV grid
    for (;;) {
        if (threadIdx.x == 0) {
            const i64 first = (i64)atomicAdd(dq_cast_ticket(a), 1) * CONVERT_STEP;
            if (first < total) {
                const i64 last_lane = (min(first + CONVERT_STEP, total) - 1) / lane_chunks;
                for (i64 lane = max(ready + 1, first / lane_chunks); lane <= last_lane && !grid_ended; ++lane)
                    grid_ended = wait_for_lane(a, (int)(lane / a.kv_heads), (int)(lane % a.kv_heads));
                ready = max(ready, last_lane);
            }
            step_first = first;
        }
        __syncthreads();
        const i64 first = step_first;
        __syncthreads();  // read by every thread before thread 0 takes the next step
        if (first >= total) break;
#pragma unroll
        for (int k = 0; k < CONVERT_STEP / CONVERT_THREADS; ++k) {
            const i64 idx = first + k * CONVERT_THREADS + threadIdx.x;
            if (idx < total)
                cast_dq_chunk<T, ALIGNED, false, F32_GRADS, true, true>(a, seq, dense_dq_chunk(a, idx, chunks));
        }
    }
    wait_for_previous_kernel();
}

template <typename T, bool ALIGNED, bool VARLEN = false, bool F32_GRADS = false, bool FRAGMENT_ORDER = false,
          bool AFTER_LANES = false>
__global__ void __launch_bounds__(CONVERT_THREADS, AFTER_LANES ? CONVERT_BLOCKS_PER_SM : 0)
flash_bwd_dq_convert(const BwdArgs a) {
    if constexpr (AFTER_LANES) {  // waits for each lane, and at its end for the dK/dV kernel
        static_assert(FRAGMENT_ORDER && !VARLEN, "lane by lane: a dense call's fused dQ");
        cast_dq_lane_by_lane<T, ALIGNED, F32_GRADS>(a);
        return;
    }
    wait_for_previous_kernel();
    const int chunks = (a.d + 7) / 8;
    DqChunk at;
    if constexpr (VARLEN) {
        const int part = blockIdx.x % a.m_tiles, bh = blockIdx.x / a.m_tiles;
        const int idx = part * 256 + threadIdx.x;
        at = {bh / a.heads, bh % a.heads, idx / chunks, (idx % chunks) * 8};
    } else {
        const i64 idx = (i64)blockIdx.x * 256 + threadIdx.x;
        if (idx >= (i64)a.batch * a.heads * a.nq * chunks) return;
        at = dense_dq_chunk(a, idx, chunks);
    }
    const Sequence seq = sequence_of<VARLEN>(a, at.b);
    if (VARLEN && at.row >= seq.nq) return;
    cast_dq_chunk<T, ALIGNED, VARLEN, F32_GRADS, FRAGMENT_ORDER>(a, seq, at);
}

// ---------------------------------------------------------------------------------------------
// Deterministic dQ: one thread block owns BLOCK_M query rows of one (batch, head), each warp MT
// 16-row slabs of them, and walks the key tiles that the rows see (key_tiles_of: a range, or the
// part of a CSR row inside it). K/V tiles are double-buffered; S = Q K^T and dP = dO V^T are
// recomputed, dS = P * (dP - Delta) converts to A fragments in registers, and dQ += dS K
// accumulates in registers.
template <typename T, int DQK, int DV, int WARPS, int MT, int BLOCK_N, bool QDO_IN_REGS, class MASK,
          class MOD, bool ALIGNED, bool VARLEN = false, bool DROPOUT = false, bool F32_GRADS = false>
// VARLEN: one block per SM at least (minBlocks 1). A sequence's lengths are loaded values, not
// kernel parameters ptxas can reload at will; left to its default the register allocator caps
// the D = 64 causal variant at 168 registers and spills. Dense variants keep their bounds (0: none).
__global__ void __launch_bounds__(WARPS * 32, VARLEN ? 1 : 0)
flash_bwd_dq(const BwdArgs a) {
    wait_for_previous_kernel();
    constexpr int THREADS = WARPS * 32;
    constexpr int BLOCK_M = WARPS * MT * 16;
    constexpr int QS = DQK + SMEM_PAD, KS = DQK + SMEM_PAD;
    constexpr int OS = DV + SMEM_PAD, VS = DV + SMEM_PAD;
    constexpr int NT = BLOCK_N / 8;   // n8 tiles of S
    constexpr int QT = DQK / 8;       // n8 tiles of dQ
    constexpr int KQK = DQK / 16, KVD = DV / 16, KN = BLOCK_N / 16;  // k16 steps
    static_assert(NT % 2 == 0 && QT % 2 == 0, "tile shape");

    extern __shared__ __align__(16) u16 smem[];
    u16* sq = smem;
    u16* sdo = sq + BLOCK_M * QS;
    u16* sk = sdo + BLOCK_M * OS;     // two stages
    u16* sv = sk + 2 * BLOCK_N * KS;  // two stages

    const QueryTile tile = query_tile_of_block<MASK::banded>(a.m_tiles, a.heads);
    const int b = tile.b, h = tile.h, m_tile = tile.m_tile;
    const Sequence seq = sequence_of<VARLEN>(a, b);
    const int m0 = m_tile * BLOCK_M;
    if (VARLEN && m0 >= seq.nq) return;  // past this sequence's end (before any barrier)
    const int hk = h / a.group;
    const MASK mask(a, seq.nq, seq.nk);
    const MOD mod(a, b, h, seq.nq, seq.nk);
    const DropoutMask drop(a, b, h);
    const auto key_tile = key_tiles_of<BLOCK_M, BLOCK_N>(mask, m_tile, h, a.m_tiles);
    const int n_count = key_tile.count;

    const u16* k = a.k + b * a.k_sb + hk * a.k_sh + seq.k0 * a.k_sn;
    const u16* v = a.v + b * a.v_sb + hk * a.v_sh + seq.k0 * a.v_sn;
    load_tile<BLOCK_M, DQK, THREADS, ALIGNED>(sq, a.q + b * a.q_sb + h * a.q_sh + seq.q0 * a.q_sn, a.q_sn, m0, seq.nq,
                                              a.d);
    load_tile<BLOCK_M, DV, THREADS, ALIGNED>(sdo, a.dout + b * a.do_sb + h * a.do_sh + seq.q0 * a.do_sn, a.do_sn, m0,
                                             seq.nq, a.dv);
    int n_tile = n_count > 0 ? key_tile[0] : 0;
    if (n_count > 0) {
        load_tile<BLOCK_N, DQK, THREADS, ALIGNED>(sk, k, a.k_sn, n_tile * BLOCK_N, seq.nk, a.d);
        load_tile<BLOCK_N, DV, THREADS, ALIGNED>(sv, v, a.v_sn, n_tile * BLOCK_N, seq.nk, a.dv);
    }
    cp_async_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int row0 = m0 + warp * MT * 16;  // the warp's first query row

    const u32 sq_a = smem_addr(sq) + (warp * MT * 16 * QS + ldsm_a_offset(lane, QS)) * 2;
    const u32 sdo_a = smem_addr(sdo) + (warp * MT * 16 * OS + ldsm_a_offset(lane, OS)) * 2;
    const u32 sk_b = smem_addr(sk) + ldsm_b_offset(lane, KS) * 2;
    const u32 sv_b = smem_addr(sv) + ldsm_b_offset(lane, VS) * 2;
    const u32 sk_bt = smem_addr(sk) + ldsm_bt_offset(lane, KS) * 2;
    const i64 scratch_rows = scratch_offset<VARLEN>(a, seq, b, h);

    float acc[MT][QT][4];
    zero_acc(acc);
    u32 qf[QDO_IN_REGS ? MT : 1][QDO_IN_REGS ? KQK : 1][4];
    u32 of[QDO_IN_REGS ? MT : 1][QDO_IN_REGS ? KVD : 1][4];
    const auto qa = cached_a<QDO_IN_REGS, QS>(qf, sq_a);
    const auto oa = cached_a<QDO_IN_REGS, OS>(of, sdo_a);

    int stage = 0;
    for (int it = 0; it < n_count; ++it) {
        cp_async_wait_all();
        __syncthreads();  // this K/V tile visible; every warp is done with the other stage
        const int n0 = n_tile * BLOCK_N;
        if (it + 1 < n_count) {
            const int next = key_tile[it + 1];
            load_tile<BLOCK_N, DQK, THREADS, ALIGNED>(sk + (stage ^ 1) * BLOCK_N * KS, k, a.k_sn, next * BLOCK_N,
                                                      seq.nk, a.d);
            load_tile<BLOCK_N, DV, THREADS, ALIGNED>(sv + (stage ^ 1) * BLOCK_N * VS, v, a.v_sn, next * BLOCK_N,
                                                     seq.nk, a.dv);
            n_tile = next;
        }
        cp_async_commit();
        if constexpr (QDO_IN_REGS) {
            if (it == 0) {
                load_a_frags<QS>(qf, sq_a);
                load_a_frags<OS>(of, sdo_a);
            }
        }
        const u32 k_stage = stage * BLOCK_N * KS * 2, v_stage = stage * BLOCK_N * VS * 2;
        KeepWords<false, NT> keep[MT];  // the tile's dropout mask, drawn before S exists (dropout.cuh)
        if constexpr (DROPOUT) slab_keep_bits<MT, NT>(keep, drop, row0 + g, n0, lane);

        // S = Q K^T and dP = dO V^T; P in place of S, dS = P * (dP - Delta) in place of dP.
        float s[MT][NT][4], dp[MT][NT][4];
        zero_acc(s);
        zero_acc(dp);
        warp_gemm<T, false, KQK>(s, qa, sk_b + k_stage, 32, 16 * KS * 2);
        warp_gemm<T, false, KVD>(dp, oa, sv_b + v_stage, 32, 16 * VS * 2);
        // lse2 and Delta of this thread's rows (scratch rows are padded: no bounds check), read
        // here rather than kept in registers through the loop.
        const i64 rows = scratch_rows + row0 + g;
        const auto tile_mask = mask.template tile<BLOCK_M, BLOCK_N>(m0, n0, key_tile.slot(it));
        const bool partial = tile_mask.partial(row0, MT * 16, n0, BLOCK_N);
        GradFactors<MOD, NT> grad[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float lse2[2] = {a.lse2[rows + mt * 16], a.lse2[rows + mt * 16 + 8]};
            const float delta[2] = {a.delta[rows + mt * 16], a.delta[rows + mt * 16 + 8]};
            recompute_probs(s[mt], grad[mt], tile_mask, mod, partial, row0 + mt * 16 + g, n0, t, lse2);
            if constexpr (DROPOUT) drop_grads(dp[mt], keep[mt]);
            softmax_grad<NT, MOD>(dp[mt], s[mt], grad[mt], [&](int, int i) { return delta[i / 2]; },
                                  DROPOUT ? drop.rescale : 1.f);
        }

        // dQ += dS K (scaled at the end).
        warp_gemm<T, true, KN>(acc, packed_a<T>(dp), sk_bt + k_stage, 16 * KS * 2, 32);
        stage ^= 1;
    }
    cp_async_wait_all();

    // Epilogue: dQ * scale, once; rows that see no key write zeros.
    const float dq_scale[2] = {a.scale, a.scale};
    // D = 256 with an exact banded mask: the block's (batch, head) and the warp's first row are
    // derived again from blockIdx and threadIdx, read anew (asm volatile, which the compiler cannot
    // merge with the first reads), rather than kept live through the key loop, where NVRTC 13.0's
    // ptxas spills them at 255 registers. The same values; other variants keep their code.
    int out_b = b, out_h = h, out_row0 = row0;
    if constexpr (DQK == 256 && MASK::exact && MASK::banded) {
        u32 block, thread;
        asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(block));
        asm volatile("mov.u32 %0, %%tid.x;" : "=r"(thread));
        const QueryTile again = query_tile_at<MASK::banded>((int)block, a.m_tiles, a.heads);
        out_b = again.b;
        out_h = again.h;
        out_row0 = again.m_tile * BLOCK_M + (int)(thread / 32) * MT * 16;
    }
    auto* dq = grad_rows<F32_GRADS>(a.grad_q) + out_b * a.gq_sb + out_h * a.gq_sh + seq.q0 * a.gq_sn;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        store_rows<T, ALIGNED>(dq, a.gq_sn, seq.nq, a.d, acc[mt], out_row0 + mt * 16 + g, 0, t, dq_scale);
}
