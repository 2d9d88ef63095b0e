// FlashAttention forward, FlashAttention-2 loop order, mma.sync tensor cores (sm_80+).
//
// One thread block owns BLOCK_M query rows of one (batch, head); each warp owns MT 16-row slabs
// of them. K/V tiles of BLOCK_N keys stream through shared memory: the V load overlaps the Q·Kᵀ
// product and the softmax, the next K load overlaps P·V. Softmax is online and in base 2; O and
// lse are written once at the end. The mask (mask.cuh) and the score modifier (score_mod.cuh)
// are template policies: which keys are visited, which elements are masked and how scores are
// modified is theirs to say.
//
// VARLEN: packed variable-length sequences (schedule.cuh, sequence_of). The grid covers the
// longest sequence; a block whose query tile lies past its own sequence's end exits at once.
//
// DROPOUT (dropout.cuh): the dropped elements of each P tile are cleared after the row sums took
// them, in the 16-bit pairs P is rounded to for P·V (a dropped element rounds to +0 either way);
// the output is scaled by 1 / (1 − p) once, at the end (the NumPy path's order, docs/internals.md
// "Dropout"). lse is that of the undropped softmax.
#include "args.cuh"

#include "arch/sm80_mma.cuh"
#include "sm80_pieces.cuh"

template <typename T, int DQK, int DV, int WARPS, int MT, int BLOCK_N, bool Q_IN_REGS, class MASK,
          class MOD, bool ALIGNED, bool VARLEN = false, bool DROPOUT = false>
__global__ void __launch_bounds__(WARPS * 32)
flash_fwd(const FwdArgs a) {
    constexpr int THREADS = WARPS * 32;
    constexpr int BLOCK_M = WARPS * MT * 16;
    constexpr int QS = DQK + SMEM_PAD;  // shared row strides (elements)
    constexpr int KS = DQK + SMEM_PAD;
    constexpr int VS = DV + SMEM_PAD;
    constexpr int NT = BLOCK_N / 8;     // n8 tiles of S
    constexpr int OT = DV / 8;          // n8 tiles of O
    constexpr int KQK = DQK / 16;       // k16 steps of Q·Kᵀ

    extern __shared__ __align__(16) u16 smem[];
    u16* sq = smem;
    u16* sk = sq + BLOCK_M * QS;
    u16* sv = sk + BLOCK_N * KS;

    const QueryTile tile = query_tile_of_block<MASK::banded>(a.m_tiles, a.heads);
    const int b = tile.b, h = tile.h, m_tile = tile.m_tile;
    const Sequence seq = sequence_of<VARLEN>(a, b);
    const int m0 = m_tile * BLOCK_M;
    if (VARLEN && m0 >= seq.nq) return;  // past this sequence's end (before any barrier)
    const int hk = h / a.group;
    const MASK mask(a, seq.nq, seq.nk);
    const MOD mod(a, b, h, seq.nq, seq.nk);

    const u16* q = a.q + b * a.q_sb + h * a.q_sh + seq.q0 * a.q_sn;
    const u16* k = a.k + b * a.k_sb + hk * a.k_sh + seq.k0 * a.k_sn;
    const u16* v = a.v + b * a.v_sb + hk * a.v_sh + seq.k0 * a.v_sn;
    const auto key_tile = key_tiles_of<BLOCK_M, BLOCK_N>(mask, m_tile, h, a.m_tiles);
    const int n_count = key_tile.count;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;  // accumulator row group and column pair

    float acc[MT][OT][4];
    float row_max[MT][2], row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int j = 0; j < OT; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.f;
        row_max[mt][0] = row_max[mt][1] = -INFINITY;
        row_sum[mt][0] = row_sum[mt][1] = 0.f;
    }

    load_tile<BLOCK_M, DQK, THREADS, ALIGNED>(sq, q, a.q_sn, m0, seq.nq, a.d);
    int n_tile = n_count > 0 ? key_tile[0] : 0;
    if (n_count > 0) load_tile<BLOCK_N, DQK, THREADS, ALIGNED>(sk, k, a.k_sn, n_tile * BLOCK_N, seq.nk, a.d);
    cp_async_commit();

    // ldmatrix lane addresses (byte offsets inside a tile) for A, B and transposed-B operands.
    const u32 a_off = ((lane % 16) * QS + (lane / 16) * 8) * 2;
    const u32 b_off = (((lane % 8) + (lane / 16) * 8) * KS + ((lane / 8) % 2) * 8) * 2;
    const u32 vt_off = (((lane % 8) + ((lane / 8) % 2) * 8) * VS + (lane / 16) * 8) * 2;
    const u32 sq_warp = smem_addr(sq) + warp * MT * 16 * QS * 2 + a_off;
    const u32 sk_lane = smem_addr(sk) + b_off;
    const u32 sv_lane = smem_addr(sv) + vt_off;

    u32 qf[Q_IN_REGS ? MT : 1][Q_IN_REGS ? KQK : 1][4];

    for (int it = 0; it < n_count; ++it) {
        cp_async_wait_all();
        __syncthreads();  // K tile (and Q) visible; every warp is done with the previous V
        load_tile<BLOCK_N, DV, THREADS, ALIGNED>(sv, v, a.v_sn, n_tile * BLOCK_N, seq.nk, a.dv);
        cp_async_commit();

        if constexpr (Q_IN_REGS) {
            if (it == 0) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int kk = 0; kk < KQK; ++kk)
                        ldmatrix_x4(qf[mt][kk], sq_warp + (mt * 16 * QS + kk * 16) * 2);
            }
        }

        // The tile's dropout mask, drawn before S exists (dropout.cuh, slab_keep_bits).
        const int n0 = n_tile * BLOCK_N;
        const int warp_row0 = m0 + warp * MT * 16;
        KeepWords<false, NT> keep[MT];
        if constexpr (DROPOUT) slab_keep_bits<MT, NT>(keep, DropoutMask(a, b, h), warp_row0 + g, n0, lane);

        // S = Q·Kᵀ; Q from registers or shared memory, K from shared memory.
        float s[MT][NT][4];
        zero_acc(s);
        warp_gemm<T, false, KQK>(s, cached_a<Q_IN_REGS, QS>(qf, sq_warp), sk_lane, 16 * 2, 16 * KS * 2);

        // Score modifier, then element masks only where the tile holds keys some row does not see.
        const auto tile_mask = mask.template tile<BLOCK_M, BLOCK_N>(m0, n0, key_tile.slot(it));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) modify_scores(s[mt], mod, warp_row0 + mt * 16 + g, n0, t);
        if (tile_mask.partial(warp_row0, MT * 16, n0, BLOCK_N)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mask_scores(s[mt], tile_mask, warp_row0 + mt * 16 + g, n0, t);
        }

        // Online softmax in base 2; P packed to 16-bit A fragments for P·V.
        u32 pf[MT][NT / 2][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float alpha[2];
            online_softmax(s[mt], row_max[mt], row_sum[mt], mod.softmax_scale(), alpha);
            rescale_rows(acc[mt], alpha);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < NT / 2; ++kk) {
                pf[mt][kk][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pf[mt][kk][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pf[mt][kk][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pf[mt][kk][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
        if constexpr (DROPOUT) {  // the dropped elements of P cleared in its 16-bit pairs
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) drop_packed(pf[mt], keep[mt]);
        }

        cp_async_wait_all();
        __syncthreads();  // V tile visible; every warp is done with this K tile
        if (it + 1 < n_count) {
            n_tile = key_tile[it + 1];
            load_tile<BLOCK_N, DQK, THREADS, ALIGNED>(sk, k, a.k_sn, n_tile * BLOCK_N, seq.nk, a.d);
        }
        cp_async_commit();

#pragma unroll
        for (int kk = 0; kk < NT / 2; ++kk)
#pragma unroll
            for (int j = 0; j < OT; j += 2) {
                u32 vb[4];
                ldmatrix_x4_trans(vb, sv_lane + (kk * 16 * VS + j * 8) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(acc[mt][j], pf[mt][kk], vb[0], vb[1]);
                    mma_16816<T>(acc[mt][j + 1], pf[mt][kk], vb[2], vb[3]);
                }
            }
    }

    // Epilogue: O = acc / l (· 1 / (1 − p) with dropout; 0 for rows that saw no key),
    // lse = ln(sum) + max·scale.
    u16* o = a.o + b * a.o_sb + h * a.o_sh + seq.q0 * a.o_sn;
    float* lse = a.lse + lse_offset<VARLEN>(a, seq, b, h);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int row0 = m0 + (warp * MT + mt) * 16 + g;
        float inv[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const RowResult r = finish_row(row_max[mt][half], row_sum[mt][half], mod.softmax_scale());
            inv[half] = DROPOUT ? r.inv * a.drop_rescale : r.inv;
            if (t == 0 && row0 + half * 8 < seq.nq) store_lse(a, lse, row0 + half * 8, r.lse);
        }
        store_rows<T, ALIGNED>(o, a.o_sn, seq.nq, a.dv, acc[mt], row0, 0, t, inv);
    }
}
