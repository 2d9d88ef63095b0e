// FlashAttention forward for Hopper (sm_90a): warpgroup MMA (wgmma) with operands in shared memory.
//
// One thread block owns BLOCK_M = 64·WG query rows of one (batch, head); each warpgroup (128
// threads) owns 64 of them, the M extent of one wgmma. K and V tiles of BLOCK_N keys stream
// through a ring of STAGES shared buffers, filled with cp.async by all threads in the 128-byte
// swizzle that wgmma reads without bank conflicts. Per key tile j a warpgroup issues S_j = Q·K_jᵀ
// and O += P_{j-1}·V_{j-1} back to back, runs the online softmax of S_j while the tensor cores
// work on P_{j-1}·V_{j-1}, then rescales O once that product has landed. S and O accumulate in
// registers; P goes from registers straight into the next P·V (wgmma's register A operand).
//
// Only D = Dv ∈ {64, 128}, 16-byte aligned rows: the launcher falls back to flash_fwd.cu for
// everything else.
#include "args.cuh"
#include "arch/sm90_wgmma.cuh"

#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "flash_fwd_sm90.cu needs the sm_90a target (-arch=sm_90a)"
#endif

template <typename T, int D, int WG, int BLOCK_N, int STAGES, class MASK, class MOD>
// At D = 64 two thread blocks fit an SM's shared memory; the bound keeps their registers within
// the SM's too (128 per thread), which is worth 1.36x on causal calls. An exact mask's bit tests
// need a few registers more than 128 leave: its variants hold one block per SM.
__global__ void __launch_bounds__(WG * 128, (D <= 64 && !MASK::exact) ? 2 : 1)
flash_fwd_sm90(const FwdArgs a) {
    constexpr int THREADS = WG * 128;
    constexpr int BLOCK_M = WG * 64;
    constexpr int Q_BYTES = BLOCK_M * D * 2;
    constexpr int KV_BYTES = BLOCK_N * D * 2;  // one K or V stage
    constexpr int NT = BLOCK_N / 8;            // 8-column blocks of S (4 accumulators each)
    constexpr int OT = D / 8;                  // 8-column blocks of O
    constexpr int KQK = D / 16;                // k16 steps of Q·Kᵀ
    constexpr int KPV = BLOCK_N / 16;          // k16 steps of P·V
    static_assert(D == 64 || D == 128, "head dim must be 64 or 128");
    static_assert(BLOCK_N == 64 || BLOCK_N == 128, "BLOCK_N must be 64 or 128");
    static_assert(STAGES >= 2, "the K/V ring needs at least two stages");

    // Dynamic shared memory is only 16-byte aligned; the swizzle needs 1024 (the host adds 1 KB).
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const u32 sq = (smem_addr(smem_raw) + 1023u) & ~1023u;
    const u32 sk = sq + Q_BYTES;
    const u32 sv = sk + STAGES * KV_BYTES;

    const QueryTile tile = query_tile_of_block<MASK::banded>(a.m_tiles, a.heads);
    const int b = tile.b, h = tile.h, m_tile = tile.m_tile;
    const int hk = h / a.group;
    const MASK mask(a);
    const MOD mod(a, b, h);

    const u16* q = a.q + b * a.q_sb + h * a.q_sh;
    const u16* k = a.k + b * a.k_sb + hk * a.k_sh;
    const u16* v = a.v + b * a.v_sb + hk * a.v_sh;
    const int m0 = m_tile * BLOCK_M;
    const auto key_tile = key_tiles_of<BLOCK_M, BLOCK_N>(mask, m_tile, h, a.m_tiles);
    const int n_count = key_tile.count;

    const int wg = threadIdx.x / 128;
    const int warp = (threadIdx.x / 32) % 4;  // warp inside the warpgroup: rows 16·warp..+15
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;     // accumulator row group and column pair
    const int warp_row0 = m0 + wg * 64 + warp * 16;

    // Descriptors. Q·Kᵀ: both operands K-major (rows of Q and K contiguous along D); k16 step kk
    // reads columns 16kk..16kk+15, i.e. box kk / 4 at byte 32·(kk % 4) of each 128-byte row; this
    // warpgroup's Q rows start 64 rows (8 atoms, 8192 bytes) into each Q box.
    // P·V: V is [key][d] row-major, so B (K = keys, N = d) is MN-major: k16 step kk starts 16 key
    // rows (2048 bytes) further, and the N extent crosses from one 64-column box to the next
    // BLOCK_N·128 bytes further (LBO).
    const u64 desc_q = sw128_desc(sq + wg * 64 * 128, 16);
    const u64 desc_k = sw128_desc(sk, 16);
    const u64 desc_v = sw128_desc(sv, BLOCK_N * 128);

    float o[OT * 4];
    float s[NT * 4];
    u32 pf[KPV][4];
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < OT * 4; ++i) o[i] = 0.f;

    // Issue S = Q·K_stageᵀ (one wgmma group).
    auto issue_qk = [&](int stage) {
        const u64 dk = desc_k + ((u32)(stage * KV_BYTES) >> 4);
#pragma unroll
        for (int kk = 0; kk < KQK; ++kk)
            wgmma_ss<T, BLOCK_N, 0, 0>(s, desc_q + kmajor_step(kk, BLOCK_M), dk + kmajor_step(kk, BLOCK_N), kk > 0);
        wgmma_commit();
    };
    // Issue O += P·V_stage (one wgmma group).
    auto issue_pv = [&](int stage) {
        const u64 dv = desc_v + ((u32)(stage * KV_BYTES) >> 4);
#pragma unroll
        for (int kk = 0; kk < KPV; ++kk) wgmma_rs<T, D, 1>(o, pf[kk], dv + ((u32)(kk * 2048) >> 4), 1);
        wgmma_commit();
    };

    // Score modifier and masks, then the online softmax of S in place (S becomes P in float);
    // returns each row's rescale factor for O. Element masks only where the tile holds keys some
    // row of this warp does not see.
    auto softmax = [&](int j, float (&alpha)[2]) {
        const int n0 = key_tile[j] * BLOCK_N;
        const auto tile_mask = mask.template tile<BLOCK_M, BLOCK_N>(m0, n0, key_tile.slot(j));
        float (&sb)[NT][4] = as_blocks<NT>(s);
        modify_scores(sb, mod, warp_row0 + g, n0, t);
        if (tile_mask.partial(warp_row0, 16, n0, BLOCK_N)) mask_scores(sb, tile_mask, warp_row0 + g, n0, t);
        online_softmax(sb, row_max, row_sum, mod.softmax_scale(), alpha);
    };

    // cp.async groups: g(-1) = {Q, K_0}; g(i) = {V_i, K_{i+1}} for i >= 0, each clipped to the
    // tiles that exist (an empty group is still committed so the counting stays uniform). Step j
    // (S_j, PV_{j-1}) needs g(j-1) and, once its barrier has passed, refills the buffers of step
    // j - 1 with g(j + STAGES - 2); so STAGES - 2 groups may stay in flight at every wait.
    auto load_group = [&](int i) {
        if (i < n_count) {
            load_tile_sw128<BLOCK_N, D, THREADS>(sv + (i % STAGES) * KV_BYTES, v, a.v_sn, key_tile[i] * BLOCK_N, a.nk);
        }
        if (i + 1 < n_count) {
            load_tile_sw128<BLOCK_N, D, THREADS>(sk + ((i + 1) % STAGES) * KV_BYTES, k, a.k_sn, key_tile[i + 1] * BLOCK_N, a.nk);
        }
        cp_async_commit();
    };

    if (n_count > 0) {
        load_tile_sw128<BLOCK_M, D, THREADS>(sq, q, a.q_sn, m0, a.nq);
        load_tile_sw128<BLOCK_N, D, THREADS>(sk, k, a.k_sn, key_tile[0] * BLOCK_N, a.nk);
        cp_async_commit();
#pragma unroll
        for (int i = 0; i + 2 < STAGES; ++i) load_group(i);

        // Step 0: S_0 only.
        cp_async_wait<STAGES - 2>();
        fence_proxy_async_shared();
        __syncthreads();
        wgmma_fence();
        issue_qk(0);
        load_group(STAGES - 2);
        wgmma_wait<0>();
        reg_fence(s);
        {
            float alpha[2];
            softmax(0, alpha);
        }
        pack_a<T, KPV>(pf, s);

        // Steps 1 .. n_count - 1: the tensor cores run S_j, then P_{j-1}·V_{j-1}; the softmax of
        // S_j overlaps the second, and O is rescaled once it has landed.
        for (int j = 1; j < n_count; ++j) {
            cp_async_wait<STAGES - 2>();
            fence_proxy_async_shared();
            __syncthreads();  // K_j, V_{j-1} visible; every warpgroup is done with step j - 1
            reg_fence(s);
            reg_fence(o);
            wgmma_fence();
            issue_qk(j % STAGES);
            issue_pv((j - 1) % STAGES);
            load_group(j + STAGES - 2);
            wgmma_wait<1>();
            reg_fence(s);
            float alpha[2];
            softmax(j, alpha);
            wgmma_wait<0>();
            reg_fence(o);
            rescale_rows(as_blocks<OT>(o), alpha);
            pack_a<T, KPV>(pf, s);
        }

        // Last step: P_{n-1}·V_{n-1}.
        cp_async_wait<0>();
        fence_proxy_async_shared();
        __syncthreads();
        reg_fence(o);
        wgmma_fence();
        issue_pv((n_count - 1) % STAGES);
        wgmma_wait<0>();
        reg_fence(o);
    }

    // Epilogue: O = acc / l (0 for rows that saw no key), lse = ln(sum) + max·scale. O goes
    // through this warpgroup's own rows of the Q tile (no other warpgroup reads them, and its
    // last Q·Kᵀ has completed).
    float* lse = a.lse + ((i64)b * a.heads + h) * a.nq;
    const int row0 = m0 + wg * 64;  // this warpgroup's first row
    float inv[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = warp * 16 + g + half * 8;  // row inside the warpgroup
        const RowResult res = finish_row(row_max[half], row_sum[half], mod.softmax_scale());
        inv[half] = res.inv;
        if (t == 0 && row0 + r < a.nq) store_lse(a, lse, row0 + r, res.lse);
    }
    store_rows_sw128<T, D, BLOCK_M>(a.o + b * a.o_sb + h * a.o_sh, a.o_sn, a.nq, o, inv, sq + wg * 64 * 128,
                                    row0, wg, warp, g, t);
}
