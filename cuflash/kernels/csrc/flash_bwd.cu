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
//   flash_bwd_dq_convert  dQ accumulator * scale -> dQ in the input dtype.
//   flash_bwd_dq          the deterministic alternative to ATOMIC_DQ: one thread block per query
//                         tile walks its key tiles, recomputes P and dP, and writes dQ once.
//
// Scratch rows (lse2, delta, dq_accum) are padded per (batch, head) to rows_pad, a multiple of
// every query tile height, with lse2 = +inf and delta = 0 in the padding: tile loads and
// accumulator updates then need no bounds checks and masked query rows drop out by themselves.
#include "args.cuh"


constexpr float LOG2E_F = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// Preprocessing: 32 rows per block, 8 threads per row.
constexpr int PRE_ROWS = 32;

template <typename T, bool ALIGNED, bool ZERO_DQ>
__global__ void __launch_bounds__(256)
flash_bwd_pre(const BwdArgs a) {
    const int row_blocks = a.rows_pad / PRE_ROWS;
    const int rb = blockIdx.x % row_blocks;
    const int bh = blockIdx.x / row_blocks;
    const int h = bh % a.heads, b = bh / a.heads;
    const int row = rb * PRE_ROWS + threadIdx.x / 8;
    const int part = threadIdx.x % 8;

    float acc = 0.f;
    if (row < a.nq) {
        const u16* o = a.o + b * a.o_sb + h * a.o_sh + row * a.o_sn;
        const u16* g = a.dout + b * a.do_sb + h * a.do_sh + row * a.do_sn;
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
    const i64 idx = (i64)bh * a.rows_pad + row;
    if (part == 0) {
        a.delta[idx] = acc;
        const float l = row < a.nq ? a.lse[(i64)bh * a.nq + row] : -INFINITY;
        a.lse2[idx] = l == -INFINITY ? INFINITY : l * LOG2E_F;
    }
    if constexpr (ZERO_DQ) {
        float4* acc4 = reinterpret_cast<float4*>(a.dq_accum + ((i64)bh * a.rows_pad + rb * PRE_ROWS) * a.dqk);
        const int n4 = PRE_ROWS * a.dqk / 4;
        for (int i = threadIdx.x; i < n4; i += 256) acc4[i] = make_float4(0.f, 0.f, 0.f, 0.f);
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
template <typename T, int DQK, int DV, int WARPS, int MT, int WC, int PASSES, int BLOCK_M, int STAGES,
          bool KV_IN_REGS, bool CAUSAL, bool SPARSE, bool ALIGNED, bool ATOMIC_DQ>
__global__ void __launch_bounds__(WARPS * 32)
flash_bwd_dkdv(const BwdArgs a) {
    constexpr int THREADS = WARPS * 32;
    constexpr int WN = WARPS / WC;           // key slabs of MT * 16 rows
    constexpr int BLOCK_N = WN * MT * 16;
    constexpr int KS = DQK + SMEM_PAD, QS = DQK + SMEM_PAD;  // shared row strides (elements)
    constexpr int VS = DV + SMEM_PAD, OS = DV + SMEM_PAD;
    constexpr int PS = BLOCK_M + SMEM_PAD;
    constexpr int CM = BLOCK_M / WC;         // query columns of S^T per warp
    constexpr int CMP = CM / PASSES;         // ... per pass
    constexpr int CTP = CMP / 8;             // their n8 tiles
    constexpr int KMP = CMP / 16;            // k16 steps of P^T dO, dS^T Q per pass
    constexpr int KT = DQK / WC / 8;         // n8 tiles of dK per warp
    constexpr int VT = DV / WC / 8;          // n8 tiles of dV per warp
    constexpr int KQK = DQK / 16, KVD = DV / 16, KM = BLOCK_M / 16;  // k16 steps
    constexpr bool P_SMEM = WC > 1;
    constexpr bool DS_SMEM = WC > 1 || ATOMIC_DQ;
    static_assert(WARPS % WC == 0 && CMP % 16 == 0 && CMP * PASSES == CM && KT % 2 == 0 && VT % 2 == 0,
                  "tile shape");
    static_assert(STAGES == 1 || STAGES == 2, "one or two query-tile buffers");

    extern __shared__ __align__(16) u16 smem[];
    u16* sk = smem;
    u16* sv = sk + BLOCK_N * KS;
    u16* sq = sv + BLOCK_N * VS;
    u16* sdo = sq + STAGES * BLOCK_M * QS;
    u16* sp = sdo + STAGES * BLOCK_M * OS;
    u16* sds = sp + (P_SMEM ? BLOCK_N * PS : 0);
    float* sl = reinterpret_cast<float*>(sds + (DS_SMEM ? BLOCK_N * PS : 0));
    float* sd = sl + STAGES * BLOCK_M;

    const KvTile tile = kv_tile_of_block(a.n_tiles, a.kv_heads);
    const int b = tile.b, hk = tile.hk, n_tile = tile.n_tile;
    const int n0 = n_tile * BLOCK_N;
    const int offset = a.nk - a.nq;  // query row i sees key columns j <= i + offset

    QueryTileWalk<BLOCK_M, BLOCK_N, CAUSAL, SPARSE> walk(a, n_tile, hk);

    auto load_query_tile = [&](int hh, int tile, int stage) {
        const int m0 = tile * BLOCK_M;
        load_tile<BLOCK_M, DQK, THREADS, ALIGNED>(sq + stage * BLOCK_M * QS, a.q + b * a.q_sb + hh * a.q_sh,
                                                  a.q_sn, m0, a.nq, a.d);
        load_tile<BLOCK_M, DV, THREADS, ALIGNED>(sdo + stage * BLOCK_M * OS, a.dout + b * a.do_sb + hh * a.do_sh,
                                                 a.do_sn, m0, a.nq, a.dv);
        const i64 r = ((i64)b * a.heads + hh) * a.rows_pad + m0;
        load_f32_async<BLOCK_M, THREADS>(sl + stage * BLOCK_M, a.lse2 + r);
        load_f32_async<BLOCK_M, THREADS>(sd + stage * BLOCK_M, a.delta + r);
    };

    load_tile<BLOCK_N, DQK, THREADS, ALIGNED>(sk, a.k + b * a.k_sb + hk * a.k_sh, a.k_sn, n0, a.nk, a.d);
    load_tile<BLOCK_N, DV, THREADS, ALIGNED>(sv, a.v + b * a.v_sb + hk * a.v_sh, a.v_sn, n0, a.nk, a.dv);
    int m_tile = walk.valid() ? walk.m_tile() : 0;
    if (walk.valid()) load_query_tile(walk.h, m_tile, 0);
    cp_async_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;  // accumulator row group and column pair
    const int wn = warp % WN, wc = warp / WN;
    const int kr0 = wn * MT * 16;          // the warp's first key row in the tile
    const int c0 = wc * CM;                // its first query column of S^T
    const int dk0 = wc * (DQK / WC), dv0 = wc * (DV / WC);  // its first dK / dV column

    // ldmatrix lane addresses (bytes); query-tile operands add the stage offset.
    const u32 sk_a = smem_addr(sk) + (kr0 * KS + ldsm_a_offset(lane, KS)) * 2;    // K slab, A
    const u32 sv_a = smem_addr(sv) + (kr0 * VS + ldsm_a_offset(lane, VS)) * 2;    // V slab, A
    const u32 sq_b = smem_addr(sq) + (c0 * QS + ldsm_b_offset(lane, QS)) * 2;     // Q^T, B
    const u32 sdo_b = smem_addr(sdo) + (c0 * OS + ldsm_b_offset(lane, OS)) * 2;   // dO^T, B
    const u32 sq_bt = smem_addr(sq) + (dk0 + ldsm_bt_offset(lane, QS)) * 2;       // Q, B
    const u32 sdo_bt = smem_addr(sdo) + (dv0 + ldsm_bt_offset(lane, OS)) * 2;     // dO, B
    const u32 sp_a = smem_addr(sp) + (kr0 * PS + ldsm_a_offset(lane, PS)) * 2;    // P^T, A
    const u32 sds_a = smem_addr(sds) + (kr0 * PS + ldsm_a_offset(lane, PS)) * 2;  // dS^T, A
    const u32 sds_at = smem_addr(sds) + ldsm_b_offset(lane, PS) * 2;              // dS, A (trans)
    const u32 sk_bt = smem_addr(sk) + ldsm_bt_offset(lane, KS) * 2;               // K, B

    float dk_acc[MT][KT][4], dv_acc[MT][VT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int j = 0; j < KT; ++j) dk_acc[mt][j][0] = dk_acc[mt][j][1] = dk_acc[mt][j][2] = dk_acc[mt][j][3] = 0.f;
#pragma unroll
        for (int j = 0; j < VT; ++j) dv_acc[mt][j][0] = dv_acc[mt][j][1] = dv_acc[mt][j][2] = dv_acc[mt][j][3] = 0.f;
    }
    u32 kf[KV_IN_REGS ? MT : 1][KV_IN_REGS ? KQK : 1][4];
    u32 vf[KV_IN_REGS ? MT : 1][KV_IN_REGS ? KVD : 1][4];

    // dQ += dS K for the current query tile, added to the float32 accumulator. The product is
    // split over warps by rows (QM 16-row slabs each) and 16-column chunks of the head dim, and
    // done in passes of at most 32 accumulator registers, since dK and dV stay live meanwhile.
    constexpr int RS = BLOCK_M / 16;
    constexpr int QM = (RS % 2 == 0 && RS / 2 <= WARPS) ? 2 : 1;
    constexpr int ROW_GROUPS = RS / QM;
    constexpr int COL_GROUPS = WARPS / ROW_GROUPS;
    constexpr int CH = DQK / 16;
    constexpr int QC = (CH + COL_GROUPS - 1) / COL_GROUPS;
    constexpr int PASS = QC * QM <= 4 ? QC : (4 / QM > 0 ? 4 / QM : 1);
    static_assert(!ATOMIC_DQ || (ROW_GROUPS <= WARPS && WARPS % ROW_GROUPS == 0), "dQ warp layout");
    auto dq_phase = [&](int hh, int m0) {
        const int wr = warp % ROW_GROUPS, wcol = warp / ROW_GROUPS;
        const int r0 = wr * QM * 16;
        float* acc_base = a.dq_accum + (((i64)b * a.heads + hh) * a.rows_pad + m0 + r0) * DQK;
#pragma unroll
        for (int p0 = 0; p0 < QC; p0 += PASS) {
            float acc[QM][2 * PASS][4];
#pragma unroll
            for (int qm = 0; qm < QM; ++qm)
#pragma unroll
                for (int j = 0; j < 2 * PASS; ++j) acc[qm][j][0] = acc[qm][j][1] = acc[qm][j][2] = acc[qm][j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
                u32 da[QM][4];
#pragma unroll
                for (int qm = 0; qm < QM; ++qm) ldmatrix_x4_trans(da[qm], sds_at + (kk * 16 * PS + r0 + qm * 16) * 2);
#pragma unroll
                for (int i = 0; i < PASS; ++i) {
                    const int chunk = wcol * QC + p0 + i;
                    if (p0 + i < QC && chunk < CH) {
                        u32 kb[4];
                        ldmatrix_x4_trans(kb, sk_bt + (kk * 16 * KS + chunk * 16) * 2);
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
                if (p0 + i < QC && chunk < CH) {
#pragma unroll
                    for (int qm = 0; qm < QM; ++qm)
#pragma unroll
                        for (int jj = 0; jj < 2; ++jj) {
                            float* p = acc_base + (qm * 16 + g) * DQK + chunk * 16 + jj * 8 + 2 * t;
                            red_add_f32x2(p, acc[qm][2 * i + jj][0], acc[qm][2 * i + jj][1]);
                            red_add_f32x2(p + 8 * DQK, acc[qm][2 * i + jj][2], acc[qm][2 * i + jj][3]);
                        }
                }
            }
        }
    };

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
            if (has_next) load_query_tile(ahead.h, next_m_tile, stage ^ 1);
            cp_async_commit();
        }

        if constexpr (KV_IN_REGS) {
            if (it == 0) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                    for (int kk = 0; kk < KQK; ++kk) ldmatrix_x4(kf[mt][kk], sk_a + (mt * 16 * KS + kk * 16) * 2);
#pragma unroll
                    for (int kk = 0; kk < KVD; ++kk) ldmatrix_x4(vf[mt][kk], sv_a + (mt * 16 * VS + kk * 16) * 2);
                }
            }
        }

        const u32 q_stage = stage * BLOCK_M * QS * 2, o_stage = stage * BLOCK_M * OS * 2;

#pragma unroll 1
        for (int pass = 0; pass < PASSES; ++pass) {
            const int cp = c0 + pass * CMP;  // first query column of this pass
            const float* lse2 = sl + stage * BLOCK_M + cp;
            const float* delta = sd + stage * BLOCK_M + cp;

            // S^T = K Q^T, then P^T = exp2(S^T * scale * log2 e - lse2) in place.
            float s[MT][CTP][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < CTP; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KQK; ++kk) {
                u32 ka[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if constexpr (KV_IN_REGS) {
#pragma unroll
                        for (int r = 0; r < 4; ++r) ka[mt][r] = kf[mt][kk][r];
                    } else {
                        ldmatrix_x4(ka[mt], sk_a + (mt * 16 * KS + kk * 16) * 2);
                    }
                }
#pragma unroll
                for (int j = 0; j < CTP; j += 2) {
                    u32 qb[4];
                    ldmatrix_x4(qb, sq_b + q_stage + ((pass * CMP + j * 8) * QS + kk * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_16816<T>(s[mt][j], ka[mt], qb[0], qb[1]);
                        mma_16816<T>(s[mt][j + 1], ka[mt], qb[2], qb[3]);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < CTP; ++j) {
                const float2 l2 = *reinterpret_cast<const float2*>(lse2 + j * 8 + 2 * t);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    s[mt][j][0] = fast_exp2(fmaf(s[mt][j][0], a.scale_log2, -l2.x));
                    s[mt][j][1] = fast_exp2(fmaf(s[mt][j][1], a.scale_log2, -l2.y));
                    s[mt][j][2] = fast_exp2(fmaf(s[mt][j][2], a.scale_log2, -l2.x));
                    s[mt][j][3] = fast_exp2(fmaf(s[mt][j][3], a.scale_log2, -l2.y));
                }
            }
            // Element masks only where the warp's block crosses the causal diagonal or the end of
            // K; query rows past Nq already give P = 0 through lse2 = +inf.
            const int key_base = n0 + kr0;
            const bool partial = key_base + MT * 16 > a.nk ||
                                 (CAUSAL && key_base + MT * 16 - 1 > m0 + cp + offset);
            if (partial) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int key = key_base + mt * 16 + g + half * 8;
                        // Query rows before this one cannot see the key.
                        const int col_min = CAUSAL ? key - offset : -2147483647;
#pragma unroll
                        for (int j = 0; j < CTP; ++j)
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const int col = m0 + cp + j * 8 + 2 * t + e;
                                if (key >= a.nk || col < col_min) s[mt][j][half * 2 + e] = 0.f;
                            }
                    }
            }

            if constexpr (!P_SMEM) {
                // dV += P^T dO, P^T straight from the accumulators.
#pragma unroll
                for (int kk = 0; kk < KMP; ++kk) {
                    u32 pa[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        pa[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                        pa[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                        pa[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                        pa[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                    }
#pragma unroll
                    for (int j = 0; j < VT; j += 2) {
                        u32 ob[4];
                        ldmatrix_x4_trans(ob, sdo_bt + o_stage + ((cp + kk * 16) * OS + j * 8) * 2);
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            mma_16816<T>(dv_acc[mt][j], pa[mt], ob[0], ob[1]);
                            mma_16816<T>(dv_acc[mt][j + 1], pa[mt], ob[2], ob[3]);
                        }
                    }
                }
            } else {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int j = 0; j < CTP; ++j) {
                        u16* row = sp + (kr0 + mt * 16 + g) * PS + cp + j * 8 + 2 * t;
                        *reinterpret_cast<u32*>(row) = pack2<T>(s[mt][j][0], s[mt][j][1]);
                        *reinterpret_cast<u32*>(row + 8 * PS) = pack2<T>(s[mt][j][2], s[mt][j][3]);
                    }
            }

            // dP^T = V dO^T, then dS^T = P^T * (dP^T - Delta) in place.
            float dp[MT][CTP][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < CTP; ++j) dp[mt][j][0] = dp[mt][j][1] = dp[mt][j][2] = dp[mt][j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KVD; ++kk) {
                u32 va[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if constexpr (KV_IN_REGS) {
#pragma unroll
                        for (int r = 0; r < 4; ++r) va[mt][r] = vf[mt][kk][r];
                    } else {
                        ldmatrix_x4(va[mt], sv_a + (mt * 16 * VS + kk * 16) * 2);
                    }
                }
#pragma unroll
                for (int j = 0; j < CTP; j += 2) {
                    u32 ob[4];
                    ldmatrix_x4(ob, sdo_b + o_stage + ((pass * CMP + j * 8) * OS + kk * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_16816<T>(dp[mt][j], va[mt], ob[0], ob[1]);
                        mma_16816<T>(dp[mt][j + 1], va[mt], ob[2], ob[3]);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < CTP; ++j) {
                const float2 d2 = *reinterpret_cast<const float2*>(delta + j * 8 + 2 * t);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    dp[mt][j][0] = s[mt][j][0] * (dp[mt][j][0] - d2.x);
                    dp[mt][j][1] = s[mt][j][1] * (dp[mt][j][1] - d2.y);
                    dp[mt][j][2] = s[mt][j][2] * (dp[mt][j][2] - d2.x);
                    dp[mt][j][3] = s[mt][j][3] * (dp[mt][j][3] - d2.y);
                }
            }
            if constexpr (DS_SMEM) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int j = 0; j < CTP; ++j) {
                        u16* row = sds + (kr0 + mt * 16 + g) * PS + cp + j * 8 + 2 * t;
                        *reinterpret_cast<u32*>(row) = pack2<T>(dp[mt][j][0], dp[mt][j][1]);
                        *reinterpret_cast<u32*>(row + 8 * PS) = pack2<T>(dp[mt][j][2], dp[mt][j][3]);
                    }
            }

            if constexpr (!P_SMEM) {
                // dK += dS^T Q, dS^T straight from the accumulators (scaled at the end).
#pragma unroll
                for (int kk = 0; kk < KMP; ++kk) {
                    u32 da[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        da[mt][0] = pack2<T>(dp[mt][2 * kk][0], dp[mt][2 * kk][1]);
                        da[mt][1] = pack2<T>(dp[mt][2 * kk][2], dp[mt][2 * kk][3]);
                        da[mt][2] = pack2<T>(dp[mt][2 * kk + 1][0], dp[mt][2 * kk + 1][1]);
                        da[mt][3] = pack2<T>(dp[mt][2 * kk + 1][2], dp[mt][2 * kk + 1][3]);
                    }
#pragma unroll
                    for (int j = 0; j < KT; j += 2) {
                        u32 qb[4];
                        ldmatrix_x4_trans(qb, sq_bt + q_stage + ((cp + kk * 16) * QS + j * 8) * 2);
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            mma_16816<T>(dk_acc[mt][j], da[mt], qb[0], qb[1]);
                            mma_16816<T>(dk_acc[mt][j + 1], da[mt], qb[2], qb[3]);
                        }
                    }
                }
            }
        }

        // P^T / dS^T in shared memory complete; with one buffer, every warp is done with Q and dO.
        if constexpr (P_SMEM || ATOMIC_DQ || STAGES == 1) __syncthreads();

        if constexpr (P_SMEM) {
            // dV += P^T dO and dK += dS^T Q over all query columns, for this warp's head-dim columns.
#pragma unroll
            for (int kk = 0; kk < KM; ++kk) {
                u32 pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(pa[mt], sp_a + (mt * 16 * PS + kk * 16) * 2);
#pragma unroll
                for (int j = 0; j < VT; j += 2) {
                    u32 ob[4];
                    ldmatrix_x4_trans(ob, sdo_bt + o_stage + (kk * 16 * OS + j * 8) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_16816<T>(dv_acc[mt][j], pa[mt], ob[0], ob[1]);
                        mma_16816<T>(dv_acc[mt][j + 1], pa[mt], ob[2], ob[3]);
                    }
                }
            }
#pragma unroll
            for (int kk = 0; kk < KM; ++kk) {
                u32 da[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(da[mt], sds_a + (mt * 16 * PS + kk * 16) * 2);
#pragma unroll
                for (int j = 0; j < KT; j += 2) {
                    u32 qb[4];
                    ldmatrix_x4_trans(qb, sq_bt + q_stage + (kk * 16 * QS + j * 8) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_16816<T>(dk_acc[mt][j], da[mt], qb[0], qb[1]);
                        mma_16816<T>(dk_acc[mt][j + 1], da[mt], qb[2], qb[3]);
                    }
                }
            }
            if constexpr (STAGES == 1) __syncthreads();  // every warp is done with Q and dO
        }

        if constexpr (STAGES == 1) {
            // The next query tile loads while this one's dQ is computed.
            if (has_next) load_query_tile(ahead.h, next_m_tile, 0);
            cp_async_commit();
        }

        if constexpr (ATOMIC_DQ) dq_phase(walk.h, m0);

        walk = ahead;
        m_tile = next_m_tile;
        if constexpr (STAGES == 2) stage ^= 1;
    }
    cp_async_wait_all();

    // Epilogue: dK * scale and dV, once. Key tiles no query sees write zeros.
    u16* dk = a.grad_k + b * a.gk_sb + hk * a.gk_sh;
    u16* dv = a.grad_v + b * a.gv_sb + hk * a.gv_sh;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = n0 + kr0 + mt * 16 + g + half * 8;
            if (row < a.nk) {
                u16* krow = dk + (i64)row * a.gk_sn;
                u16* vrow = dv + (i64)row * a.gv_sn;
#pragma unroll
                for (int j = 0; j < KT; ++j) {
                    const int col = dk0 + j * 8 + 2 * t;
                    const float x0 = dk_acc[mt][j][half * 2] * a.scale, x1 = dk_acc[mt][j][half * 2 + 1] * a.scale;
                    if (ALIGNED && col + 1 < a.d) {
                        *reinterpret_cast<u32*>(krow + col) = pack2<T>(x0, x1);
                    } else {
                        if (col < a.d) krow[col] = from_float<T>(x0);
                        if (col + 1 < a.d) krow[col + 1] = from_float<T>(x1);
                    }
                }
#pragma unroll
                for (int j = 0; j < VT; ++j) {
                    const int col = dv0 + j * 8 + 2 * t;
                    const float x0 = dv_acc[mt][j][half * 2], x1 = dv_acc[mt][j][half * 2 + 1];
                    if (ALIGNED && col + 1 < a.dv) {
                        *reinterpret_cast<u32*>(vrow + col) = pack2<T>(x0, x1);
                    } else {
                        if (col < a.dv) vrow[col] = from_float<T>(x0);
                        if (col + 1 < a.dv) vrow[col + 1] = from_float<T>(x1);
                    }
                }
            }
        }
}

// ---------------------------------------------------------------------------------------------
// dQ accumulator -> dQ: one thread per 8 columns of one row.
template <typename T, bool ALIGNED>
__global__ void __launch_bounds__(256)
flash_bwd_dq_convert(const BwdArgs a) {
    const int chunks = (a.d + 7) / 8;
    const i64 idx = (i64)blockIdx.x * 256 + threadIdx.x;
    const i64 row_all = idx / chunks;
    if (row_all >= (i64)a.batch * a.heads * a.nq) return;
    const int c = (int)(idx % chunks) * 8;
    const int row = (int)(row_all % a.nq);
    const int bh = (int)(row_all / a.nq);
    const int h = bh % a.heads, b = bh / a.heads;
    const float* src = a.dq_accum + ((i64)bh * a.rows_pad + row) * a.dqk + c;
    u16* dst = a.grad_q + b * a.gq_sb + h * a.gq_sh + row * a.gq_sn + c;
    const float4 x = *reinterpret_cast<const float4*>(src);
    const float4 y = *reinterpret_cast<const float4*>(src + 4);
    const float s = a.scale;
    if constexpr (ALIGNED) {
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
            if (c + e < a.d) dst[e] = from_float<T>(vals[e] * s);
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic dQ: one thread block owns BLOCK_M query rows of one (batch, head), each warp MT
// 16-row slabs of them, and walks the key tiles that the rows see (a range, or a CSR row).
// K/V tiles are double-buffered; S = Q K^T and dP = dO V^T are recomputed, dS = P * (dP - Delta)
// converts to A fragments in registers, and dQ += dS K accumulates in registers.
template <typename T, int DQK, int DV, int WARPS, int MT, int BLOCK_N, bool QDO_IN_REGS, bool CAUSAL,
          bool SPARSE, bool ALIGNED>
__global__ void __launch_bounds__(WARPS * 32)
flash_bwd_dq(const BwdArgs a) {
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

    const QueryTile tile = query_tile_of_block<CAUSAL>(a.m_tiles, a.heads);
    const int b = tile.b, h = tile.h, m_tile = tile.m_tile;
    const int hk = h / a.group;
    const int m0 = m_tile * BLOCK_M;
    const int offset = a.nk - a.nq;
    const auto key_tile = key_tiles_of<BLOCK_M, BLOCK_N, CAUSAL, SPARSE>(
        m_tile, h, a.m_tiles, a.nq, a.nk, a.tile_ptr, a.tile_idx, a.mask_heads);
    const int n_count = key_tile.count;

    const u16* k = a.k + b * a.k_sb + hk * a.k_sh;
    const u16* v = a.v + b * a.v_sb + hk * a.v_sh;
    load_tile<BLOCK_M, DQK, THREADS, ALIGNED>(sq, a.q + b * a.q_sb + h * a.q_sh, a.q_sn, m0, a.nq, a.d);
    load_tile<BLOCK_M, DV, THREADS, ALIGNED>(sdo, a.dout + b * a.do_sb + h * a.do_sh, a.do_sn, m0, a.nq, a.dv);
    int n_tile = n_count > 0 ? key_tile[0] : 0;
    if (n_count > 0) {
        load_tile<BLOCK_N, DQK, THREADS, ALIGNED>(sk, k, a.k_sn, n_tile * BLOCK_N, a.nk, a.d);
        load_tile<BLOCK_N, DV, THREADS, ALIGNED>(sv, v, a.v_sn, n_tile * BLOCK_N, a.nk, a.dv);
    }
    cp_async_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int row0 = m0 + warp * MT * 16;  // the warp's first query row

    // Per-row constants of the rows this thread holds (scratch rows are padded: no bounds check).
    float lse2[MT][2], delta[MT][2];
    {
        const i64 base = ((i64)b * a.heads + h) * a.rows_pad + row0 + g;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                lse2[mt][half] = a.lse2[base + mt * 16 + half * 8];
                delta[mt][half] = a.delta[base + mt * 16 + half * 8];
            }
    }

    const u32 sq_a = smem_addr(sq) + (warp * MT * 16 * QS + ldsm_a_offset(lane, QS)) * 2;
    const u32 sdo_a = smem_addr(sdo) + (warp * MT * 16 * OS + ldsm_a_offset(lane, OS)) * 2;
    const u32 sk_b = smem_addr(sk) + ldsm_b_offset(lane, KS) * 2;
    const u32 sv_b = smem_addr(sv) + ldsm_b_offset(lane, VS) * 2;
    const u32 sk_bt = smem_addr(sk) + ldsm_bt_offset(lane, KS) * 2;

    float acc[MT][QT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < QT; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.f;
    u32 qf[QDO_IN_REGS ? MT : 1][QDO_IN_REGS ? KQK : 1][4];
    u32 of[QDO_IN_REGS ? MT : 1][QDO_IN_REGS ? KVD : 1][4];

    int stage = 0;
    for (int it = 0; it < n_count; ++it) {
        cp_async_wait_all();
        __syncthreads();  // this K/V tile visible; every warp is done with the other stage
        const int n0 = n_tile * BLOCK_N;
        if (it + 1 < n_count) {
            const int next = key_tile[it + 1];
            load_tile<BLOCK_N, DQK, THREADS, ALIGNED>(sk + (stage ^ 1) * BLOCK_N * KS, k, a.k_sn, next * BLOCK_N, a.nk, a.d);
            load_tile<BLOCK_N, DV, THREADS, ALIGNED>(sv + (stage ^ 1) * BLOCK_N * VS, v, a.v_sn, next * BLOCK_N, a.nk, a.dv);
            n_tile = next;
        }
        cp_async_commit();

        if constexpr (QDO_IN_REGS) {
            if (it == 0) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                    for (int kk = 0; kk < KQK; ++kk) ldmatrix_x4(qf[mt][kk], sq_a + (mt * 16 * QS + kk * 16) * 2);
#pragma unroll
                    for (int kk = 0; kk < KVD; ++kk) ldmatrix_x4(of[mt][kk], sdo_a + (mt * 16 * OS + kk * 16) * 2);
                }
            }
        }
        const u32 k_stage = stage * BLOCK_N * KS * 2, v_stage = stage * BLOCK_N * VS * 2;

        // S = Q K^T and dP = dO V^T.
        float s[MT][NT][4], dp[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
                dp[mt][j][0] = dp[mt][j][1] = dp[mt][j][2] = dp[mt][j][3] = 0.f;
            }
#pragma unroll
        for (int kk = 0; kk < KQK; ++kk) {
            u32 qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (QDO_IN_REGS) {
#pragma unroll
                    for (int r = 0; r < 4; ++r) qa[mt][r] = qf[mt][kk][r];
                } else {
                    ldmatrix_x4(qa[mt], sq_a + (mt * 16 * QS + kk * 16) * 2);
                }
            }
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                u32 kb[4];
                ldmatrix_x4(kb, sk_b + k_stage + (j * 8 * KS + kk * 16) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(s[mt][j], qa[mt], kb[0], kb[1]);
                    mma_16816<T>(s[mt][j + 1], qa[mt], kb[2], kb[3]);
                }
            }
        }
#pragma unroll
        for (int kk = 0; kk < KVD; ++kk) {
            u32 oa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (QDO_IN_REGS) {
#pragma unroll
                    for (int r = 0; r < 4; ++r) oa[mt][r] = of[mt][kk][r];
                } else {
                    ldmatrix_x4(oa[mt], sdo_a + (mt * 16 * OS + kk * 16) * 2);
                }
            }
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                u32 vb[4];
                ldmatrix_x4(vb, sv_b + v_stage + (j * 8 * VS + kk * 16) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(dp[mt][j], oa[mt], vb[0], vb[1]);
                    mma_16816<T>(dp[mt][j + 1], oa[mt], vb[2], vb[3]);
                }
            }
        }

        // P = exp2(S * scale * log2 e - lse2), masked to 0 on partial tiles; dS = P * (dP - Delta).
        const bool partial = n0 + BLOCK_N > a.nk || (CAUSAL && n0 + BLOCK_N - 1 > row0 + offset);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = row0 + mt * 16 + g + half * 8;
                const int limit = CAUSAL ? min(a.nk, row + offset + 1) : a.nk;
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        float p = fast_exp2(fmaf(s[mt][j][half * 2 + e], a.scale_log2, -lse2[mt][half]));
                        if (partial && n0 + j * 8 + 2 * t + e >= limit) p = 0.f;
                        dp[mt][j][half * 2 + e] = p * (dp[mt][j][half * 2 + e] - delta[mt][half]);
                    }
            }

        // dQ += dS K (scaled at the end).
#pragma unroll
        for (int kk = 0; kk < KN; ++kk) {
            u32 da[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                da[mt][0] = pack2<T>(dp[mt][2 * kk][0], dp[mt][2 * kk][1]);
                da[mt][1] = pack2<T>(dp[mt][2 * kk][2], dp[mt][2 * kk][3]);
                da[mt][2] = pack2<T>(dp[mt][2 * kk + 1][0], dp[mt][2 * kk + 1][1]);
                da[mt][3] = pack2<T>(dp[mt][2 * kk + 1][2], dp[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int j = 0; j < QT; j += 2) {
                u32 kb[4];
                ldmatrix_x4_trans(kb, sk_bt + k_stage + (kk * 16 * KS + j * 8) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(acc[mt][j], da[mt], kb[0], kb[1]);
                    mma_16816<T>(acc[mt][j + 1], da[mt], kb[2], kb[3]);
                }
            }
        }
        stage ^= 1;
    }
    cp_async_wait_all();

    // Epilogue: dQ * scale, once; rows that see no key write zeros.
    u16* dq = a.grad_q + b * a.gq_sb + h * a.gq_sh;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = row0 + mt * 16 + g + half * 8;
            if (row < a.nq) {
                u16* qrow = dq + (i64)row * a.gq_sn;
#pragma unroll
                for (int j = 0; j < QT; ++j) {
                    const int col = j * 8 + 2 * t;
                    const float x0 = acc[mt][j][half * 2] * a.scale, x1 = acc[mt][j][half * 2 + 1] * a.scale;
                    if (ALIGNED && col + 1 < a.d) {
                        *reinterpret_cast<u32*>(qrow + col) = pack2<T>(x0, x1);
                    } else {
                        if (col < a.d) qrow[col] = from_float<T>(x0);
                        if (col + 1 < a.d) qrow[col + 1] = from_float<T>(x1);
                    }
                }
            }
        }
}
