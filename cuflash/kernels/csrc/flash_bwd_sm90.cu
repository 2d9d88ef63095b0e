// FlashAttention backward for Hopper (sm_90a): warpgroup MMA (wgmma) with operands in shared memory.
//
// Two kernels after flash_bwd_pre (flash_bwd.cu: Delta = rowsum(dO∘O), lse2 = lse·log2 e with
// +inf for rows that attend to nothing and in the padding up to rows_pad), the deterministic
// sequence; by default the first also forms dQ and the second does not run (ATOMIC_DQ below):
//
//   flash_bwd_sm90_dkdv  one thread block per BLOCK_N = 64·WG keys of one (batch, key/value head);
//                        warpgroup w owns 64 of them (the M extent of one wgmma). Keys are the
//                        wgmma rows: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ land in the accumulator layout that
//                        packs straight into register A operands of dV += Pᵀ dO and dK += dSᵀ Q.
//                        Query tiles (Q, dO, lse2, Delta) of every query head of the GQA group
//                        stream through two shared buffers; dK and dV stay in registers and are
//                        written once, so no atomics.
//   flash_bwd_sm90_dq    one thread block per 64·WG query rows of one (batch, head), walking its
//                        key tiles like the forward: S = Q Kᵀ and dP = dO Vᵀ are recomputed and
//                        dQ += dS K accumulates in registers, written once. At 256 columns its
//                        warp-specialised form, flash_bwd_sm90_dq_ws, runs instead (TMA
//                        producer, two consumers), unless a block mask has 64-row blocks.
//
// Recomputing S and dP in the dq kernel costs two extra GEMMs per tile pair (seven instead of
// five), but every operand is one of the layouts the forward kernel already reads (K-major A and B
// from a row-major tile; MN-major B from a row-major [k][n] tile; A from registers) and no
// gradient is ever accumulated by two thread blocks: results are bit-identical from run to run.
//
// D is the tile's head dim, 64, 128 or 256 (warp-specialised dK/dV kernel only, its consumers
// keeping dV and dK one each, dQ always from a dq kernel: dkdv_split_query_tile), for both Q/K and
// V/dO, with 16-byte aligned rows; everything else runs flash_bwd.cu. Narrower head dims a.d and
// a.dv (multiples of 8) run the tile of the next of these with zero columns: loads fill the
// columns past a.d (Q, K) and a.dv (V, dO) with zeros, so S and dP are exact and dK, dV and dQ
// come out zero there, and the stores skip them. The GEMMs then do D / a.d times the useful work.
// VARLEN: packed variable-length sequences, as in flash_bwd.cu (schedule.cuh, sequence_of): the
// grids cover the longest sequence (the warp-specialised dK/dV kernel's each sequence's own key
// tiles, packed_tile_at), each block offsets its rows by its sequence's first row,
// builds its mask and score modifier from the sequence's lengths and exits before any barrier
// when its tile lies past the sequence's end.
// F32_GRADS: the gradients are stored as float32 (epilogue.cuh, grad_rows), as in flash_bwd.cu.
// DROPOUT (dropout.cuh): the forward's mask Z is drawn again per tile while the tile's first two
// GEMMs run, in the NumPy path's order: dV accumulates (P ∘ Z)ᵀ dO (P packed, then its dropped
// halves cleared) and is scaled by the rescale once at the end; dP = (dO Vᵀ) ∘ Z · rescale and
// dS = P ∘ (dP − Delta), as in flash_bwd.cu (the rescale in softmax_grad's multiply-add).
//
// ATOMIC_DQ: the dK/dV kernel also forms dQ, so the dq kernel is not launched: five GEMMs per
// tile pair instead of seven. Each warpgroup writes its dSᵀ (bf16/f16) into a shared tile, and
// after a barrier the block's dS (query rows × all BLOCK_N keys) times K lands in registers, one
// 64-row by DQ_N-column part per warpgroup. Each warp stages its 16 rows of it in shared memory,
// and the TMA unit adds them as bulk float32 reduce-adds into flash_bwd.cu's dQ accumulator
// (zeroed by flash_bwd_pre, cast by flash_bwd_dq_convert), which keeps the order of the warps'
// accumulator fragments (schedule.cuh, dq_fragment_offset) so that a warp's part, and a whole
// tile's, is one contiguous run: an 8-byte red.global.add per thread and pair cost an L2 request
// per 32-byte sector (1,536 per tile pair at D = 128), and a bulk reduce-add per row (row-major
// accumulator) cost 16 serialised issues per warp and tile. In the cp.async kernel each warp
// issues its own add; in the warp-specialised one a writer warp adds the whole tile
// (write_dq_parts). Float adds from several blocks in any order: not bit-identical run to run,
// so deterministic calls take the dq kernel, unless ORDERED_DQ (warp-specialised kernel, dense
// and banded masks) orders the adds.
#include "args.cuh"
#include "arch/sm90_tma.cuh"

#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "flash_bwd_sm90.cu needs the sm_90a target (-arch=sm_90a)"
#endif


// ---------------------------------------------------------------------------------------------
// The dK/dV kernel's fused dQ (ATOMIC_DQ): how the BLOCK_M × D tile dS·K is dealt out to the WG
// warpgroups, each computing 64 query rows × N columns over all 64·WG keys of the block. With
// 64·WG query rows, warpgroup w takes rows 64w.. and every column; with 64, columns w·N.. . BY_TURNS
// (64 rows whose D / WG columns would be narrower than the 64 of the narrowest part the
// kernels instantiate; the warp-specialised kernel only): the whole tile, by one warpgroup in
// turn (`forms`), so that each forms every other tile's dQ.
// Each warpgroup that forms by turns hands its tiles to the writer through a channel of its own
// (staging floats, header and the "dq_full" / "dq_empty" pair), so that each of its waits on
// "dq_empty" is at most one phase from the one it means, as a parity wait needs. In the loop the
// dSᵀ barrier (sync(2) in dkdv_query_tile) keeps the two warpgroups within a tile of each other,
// but the end marker (DqPartsToWriter::finish) follows no such barrier: through one shared
// channel its wait could find the phase two tiles back, pass early and complete "dq_full" for a
// tile the other warpgroup was still staging (the writer then stopped short or read a tile half
// staged, and waited for ever for an end marker overwritten by that tile's header).
template <int D, int WG, int BLOCK_M>
struct FusedDq {
    static constexpr bool BY_ROWS = BLOCK_M == 64 * WG;
    static_assert(BY_ROWS || BLOCK_M == 64, "a query tile of 64 rows, or 64 per warpgroup");
    static constexpr bool BY_TURNS = !BY_ROWS && D / WG < 64;
    static_assert(!BY_TURNS || WG == 2, "turns of two warpgroups, one per double-buffer stage");
    static constexpr int CHANNELS = BY_TURNS ? WG : 1;  // to the writer: one per forming warpgroup
    static constexpr int N = BY_ROWS || BY_TURNS ? D : D / WG;
    static constexpr int PARTS = BY_TURNS ? 1 : WG;  // warpgroups that stage a part of each tile
    static constexpr int BLOCK_N = 64 * WG;
    __device__ static int row0(int wg) { return BY_ROWS ? 64 * wg : 0; }
    __device__ static int col0(int wg) { return BY_ROWS || BY_TURNS ? 0 : N * wg; }
    // Whether warpgroup `wg` forms a part of the tile in double-buffer stage `stage` (which
    // alternates from one query tile to the next).
    __device__ static bool forms(int wg, int stage) { return !BY_TURNS || wg == stage % WG; }
    // The channel of the tile in stage `stage`, and the parity of the tiles that went through it
    // before (`phase`: the stage ring's, which turns over every two tiles). Channel c's
    // "dq_full" lies 16 bytes after channel c − 1's, its "dq_empty" 8 bytes after its "dq_full".
    __device__ static int channel(int stage) { return CHANNELS == 1 ? 0 : stage; }
    __device__ static u32 channel_parity(int stage, u32 phase) { return CHANNELS == 1 ? (u32)stage : phase; }
    __device__ static u32 channel_full(u32 full0, int channel) { return full0 + 16 * (u32)channel; }
    // A = dS read MN-major from the dSᵀ tile (keys are its rows, 64 queries per box): this
    // warpgroup's rows are box row0 / 64. k16 steps are 16 key rows, 2048 bytes.
    __device__ static u64 ds_desc(u32 sds, int wg) { return sw128_desc(sds + (row0(wg) / 64) * BLOCK_N * 128, BLOCK_N * 128); }
    // B = K read MN-major (K = keys, N = head-dim columns), from box col0 / 64 on.
    __device__ static u64 k_desc(u32 sk, int wg) { return sw128_desc(sk + (col0(wg) / 64) * BLOCK_N * 128, BLOCK_N * 128); }
    // Staging floats of the tile's dQ in shared memory, in the accumulator's order
    // (dq_fragment_offset): a warp's 16 rows by N columns are one contiguous run, and the
    // tile's runs lie as in the accumulator, so that the whole tile is one run too.
    static constexpr int STAGE_BYTES = PARTS * 64 * N * 4;  // one channel's
    __device__ static u32 stage_offset(int wg, int warp) {
        return 4 * (u32)dq_fragment_offset(row0(wg) + 16 * warp, col0(wg), D);
    }
};

// A warp's dSᵀ (or Pᵀ) fragments (the A operands `df` of dK += dSᵀ Q: keys `row` and row + 8,
// queries 16kk + 2t.. and 16kk + 8 + 2t.., counted from query chunk `chunk0`, 8 queries a chunk)
// into the 128-byte-swizzled transposed tile of ROWS keys.
template <int ROWS, int KM>
__device__ __forceinline__ void store_ds_transposed(u32 sds, const u32 (&df)[KM][4], int row, int t,
                                                    int chunk0 = 0) {
#pragma unroll
    for (int kk = 0; kk < KM; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = row + 8 * (i & 1), chunk = chunk0 + 2 * kk + (i >> 1);
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sds + sw128_offset<ROWS>(r, chunk) + 4 * t),
                         "r"(df[kk][i])
                         : "memory");
        }
}

// A warp's 16 rows of an m64nN float32 accumulator (NB blocks of 8 columns; this thread's rows
// g and g + 8) into its staging floats at `stage`, in the accumulator's order.
template <int NB>
__device__ __forceinline__ void stage_part(u32 stage, const float (&x)[NB][4], int lane) {
#pragma unroll
    for (int j = 0; j < NB; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half)
            asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n"
                         ::"r"(stage + ((2 * j + half) * 32 + lane) * 8),
                         "f"(x[j][2 * half]), "f"(x[j][2 * half + 1])
                         : "memory");
}

// The same, added into the dQ accumulator's run that starts at `dst` (dq_fragment_offset of
// the warp's first row and the part's first column), through `stage` (the warp's 16·8·NB staging
// floats, in the same order): one bulk reduce-add, from lane 0. Lane 0 first waits until its
// previous one has read the staging floats, so they may be rewritten.
template <int NB>
__device__ __forceinline__ void add_part_by_bulk(float* dst, u32 stage, const float (&x)[NB][4], int lane) {
    if (lane == 0) bulk_wait_read();
    __syncwarp();
    stage_part<NB>(stage, x, lane);
    fence_proxy_async_shared();
    __syncwarp();
    if (lane == 0) {
        bulk_reduce_add_f32(dst, stage, NB * 8 * 16 * 4);
        bulk_commit();
    }
}

// Where a warp's part of the fused dQ goes. DqPartsByWarp (the cp.async dK/dV kernel): the warp
// adds it itself (add_part_by_bulk). DqPartsToWriter (the warp-specialised kernel): the warp
// stages it once the writer has read the previous tile's staging floats ("dq_empty"), and
// arrives on "dq_full"; the producer warpgroup's writer warp adds the whole tile
// (write_dq_parts), so that no consumer waits on a reduce-add or on another block's turn.
struct DqPartsByWarp {
    template <int NB>
    __device__ __forceinline__ void add(float* dst, i64, u32 stage, const float (&x)[NB][4], int lane) const {
        add_part_by_bulk<NB>(dst, stage, x, lane);
    }
};
// What the writer needs of a staged tile, written by the first consumer thread beside the
// staging floats: the tile's first scratch row (−1: no more tiles) and (ordered adds) this key
// tile's rank there. The writer reads it after "dq_full", before "dq_empty".
struct DqTileHeader {
    i64 row;
    int rank;  // right after row
};
// Written through its shared address (one register in the consumers, where a pointer takes two).
// (Older NVRTC releases reject offsetof in an asm operand: rank's offset is row's size.)
__device__ __forceinline__ void write_dq_header(u32 header, i64 row, int rank) {
    asm volatile("st.shared.b64 [%0], %1;\n st.shared.b32 [%0 + %3], %2;\n" ::"r"(header), "l"(row), "r"(rank),
                 "n"(sizeof(i64))
                 : "memory");
}
// The policy holds shared addresses only (the consumers have no registers to spare); "dq_empty"
// is the mbarrier after "dq_full". PARTS: the warpgroups that stage a part of each tile
// (FusedDq::PARTS); the first thread of the first of them writes the header.
template <int PARTS>
struct DqPartsToWriter {
    u32 full;    // mbarrier: every consumer warp's part staged; full + 8: the staging floats read
    u32 tiles;   // (the parity of) the query tiles this block has staged through this channel before
    u32 header;  // the DqTileHeader's shared address
    int rank;
    template <int NB>
    __device__ __forceinline__ void add(float*, i64 tile_row, u32 stage, const float (&x)[NB][4], int lane) const {
        hand_over(tile_row, rank, lane, [&] {
            stage_part<NB>(stage, x, lane);
            fence_proxy_async_shared();  // the staging stores come before the writer's bulk read
        });
    }
    // After the block's last tile: the header that ends the writer's loop.
    __device__ __forceinline__ void finish(int lane) const {
        hand_over(-1, 0, lane, [] {});
    }
    // Once the writer has read the previous tile's staging floats: the header, this warp's
    // staging (`stage`), then this warp's arrival on "dq_full".
    template <class Stage>
    __device__ __forceinline__ void hand_over(i64 row, int rank_, int lane, Stage stage) const {
        mbar_wait(full + 8, (tiles & 1) ^ 1);
        if (PARTS == 1 ? threadIdx.x % 128 == 0 : threadIdx.x == 128) write_dq_header(header, row, rank_);
        stage();
        __syncwarp();
        if (lane == 0) mbar_arrive(full);
    }
};

// ---------------------------------------------------------------------------------------------
// What every dK/dV kernel's shared-memory plan starts with (all offsets from a 1024-byte aligned
// base): K and V of BLOCK_N keys, then two stages of Q and dO of BLOCK_M rows; tail() is the
// first byte after them.
template <int D, int BLOCK_N_, int BLOCK_M_>
struct DkdvStages {
    static constexpr int BLOCK_N = BLOCK_N_, BLOCK_M = BLOCK_M_;
    static constexpr u32 KV_BYTES = BLOCK_N * D * 2;  // K or V
    static constexpr u32 QT_BYTES = BLOCK_M * D * 2;  // one Q or dO stage
    u32 sk;               // the aligned base's shared address: K starts there
    unsigned char* base;  // the same as a pointer into the kernel's shared array, for plain loads
    __device__ __forceinline__ explicit DkdvStages(unsigned char* raw)
        : sk((smem_addr(raw) + 1023u) & ~1023u), base(raw + (((smem_addr(raw) + 1023u) & ~1023u) - smem_addr(raw))) {}
    template <class X>
    __device__ __forceinline__ X* at(u32 addr) const { return reinterpret_cast<X*>(base + (addr - sk)); }
    __device__ __forceinline__ u32 sv() const { return sk + KV_BYTES; }
    __device__ __forceinline__ u32 sq(int stage) const { return sk + 2 * KV_BYTES + stage * QT_BYTES; }
    __device__ __forceinline__ u32 sdo(int stage) const { return sk + 2 * KV_BYTES + (2 + stage) * QT_BYTES; }
    __device__ __forceinline__ u32 tail() const { return sk + 2 * KV_BYTES + 4 * QT_BYTES; }
};

// Where the fused dQ of the tile in ring slot `at` goes to the writer: its channel's header and
// barrier pair (from channel 0's "dq_full", `dq_full0`), and the parity of the tiles that went
// through that channel before it.
template <class DQ, class Plan>
__device__ __forceinline__ DqPartsToWriter<DQ::PARTS> dq_channel(const Plan& plan, u32 dq_full0, const RingSlot<2>& at,
                                                                 int rank) {
    const int channel = DQ::channel(at.stage);
    return {DQ::channel_full(dq_full0, channel), DQ::channel_parity(at.stage, at.phase), plan.dq_header(channel), rank};
}

// The dK/dV kernels' shared-memory plan: K, V; two stages of Q and dO; (ATOMIC_DQ) the dSᵀ tile
// and the dQ parts' staging floats; per stage lse2 and Delta rows (floats); (ATOMIC_DQ) each
// stage's first scratch row.
template <int D, int WG, int BLOCK_M, bool ATOMIC_DQ>
struct DkdvSmem : DkdvStages<D, WG * 64, BLOCK_M> {
    using DQ = FusedDq<D, WG, BLOCK_M>;
    __device__ __forceinline__ explicit DkdvSmem(unsigned char* raw) : DkdvStages<D, WG * 64, BLOCK_M>(raw) {}
    __device__ __forceinline__ u32 sds() const { return this->tail(); }
    __device__ __forceinline__ u32 sdq(int channel = 0) const {
        return sds() + WG * 64 * BLOCK_M * 2 + channel * DQ::STAGE_BYTES;
    }
    __device__ __forceinline__ u32 rows(int stage) const {  // lse2[BLOCK_M], then Delta[BLOCK_M]
        return (ATOMIC_DQ ? sdq(DQ::CHANNELS) : sds()) + stage * 2 * BLOCK_M * 4;
    }
    __device__ __forceinline__ u32 scratch_row(int stage) const { return rows(2) + stage * 8; }
    __device__ __forceinline__ u32 dq_header(int channel = 0) const {  // DqTileHeader
        return scratch_row(2) + channel * (u32)sizeof(DqTileHeader);
    }
};

// The k16 steps of the two GEMMs over the head dims (S over D, dP over Dv) that hold a column
// below the call's D or Dv (the kernels' QK_DIM, DP_DIM: rounded up to 16 by the host). The tiles
// are 64, 128 or 256 columns wide, padded with zeros that add nothing: D = 96 runs the
// 128-column tile in 6 of its 8 steps, D = 192 the 256-column one in 12 of 16. Compile-time
// counts: a runtime bound around wgmma makes ptxas serialise them or spill.
template <int QK_DIM, int DP_DIM>
struct HeadSteps {  // carries the two dims down (k16_steps, box_columns)
    static constexpr int QK = QK_DIM, DP = DP_DIM;
};

// One of Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (64 keys × N queries) over the first DIM columns, as one commit
// group: A = 64 rows of K / V (K-major over the head dim, a tile of KV_ROWS rows per box), B = N
// rows of the Q / dO tile (K-major, a tile of Q_ROWS rows per box).
template <typename T, int N, int KV_ROWS, int Q_ROWS, int DIM>
__device__ __forceinline__ void issue_transposed_score(float (&acc)[N / 2], u64 desc_a, u64 desc_b) {
#pragma unroll
    for (int kk = 0; kk < k16_steps(DIM); ++kk)
        wgmma_ss<T, N, 0, 0>(acc, desc_a + kmajor_step(kk, KV_ROWS), desc_b + kmajor_step(kk, Q_ROWS), kk > 0);
    wgmma_commit();
}

// Sᵀ and dPᵀ, issued as two commit groups.
template <typename T, int D, int N, int KV_ROWS, int Q_ROWS, int QK_DIM, int DP_DIM>
__device__ __forceinline__ void issue_transposed_scores(float (&s)[N / 2], float (&dp)[N / 2], u64 desc_k, u64 desc_q,
                                                        u64 desc_v, u64 desc_do, HeadSteps<QK_DIM, DP_DIM>) {
    static_assert(QK_DIM <= D && DP_DIM <= D, "steps within the tile");
    wgmma_fence();
    issue_transposed_score<T, N, KV_ROWS, Q_ROWS, QK_DIM>(s, desc_k, desc_q);
    issue_transposed_score<T, N, KV_ROWS, Q_ROWS, DP_DIM>(dp, desc_v, desc_do);
}

// Where a dK/dV kernel finds an exact tile's bits for its transposed tiles (Sᵀ: keys as rows):
// read by query row from memory and handed over by shuffles (TransposedSource), or as each
// thread's own two words in shared memory once barrier `ready` completes phase `phase`
// (ThreadWordsSource: the warp-specialised kernel lays them out there, thread_words_of_tile).
// Other masks read nothing (TransposedSource; thread words only exist for exact masks).
// tile_bits_from runs once the tile's GEMMs are issued: it loads the words to shuffle, or waits
// for the thread words (every tile, full ones too, so that the warps that lay them out are never
// a stage behind) and loads this thread's two.
struct TransposedSource {};
struct ThreadWordsSource {
    const u32* words;
    u32 ready, phase;
};
// Bit 2j + e of word `half` allows this thread's key row g + 8·half against query column
// 8j + 2t + e of the tile (all set where the tile has no bits).
struct ThreadKeyBits {
    u32 word[2];
};
template <class TILE>
__device__ __forceinline__ TransposedBits<TILE> tile_bits_from(const TILE& tile, TransposedSource, int key_row0,
                                                               int lane) {
    TransposedBits<TILE> bits;
    bits.load(tile, key_row0, lane);
    return bits;
}
template <class TILE>
__device__ __forceinline__ ThreadKeyBits tile_bits_from(const TILE& tile, const ThreadWordsSource& source,
                                                        int key_row0, int lane) {
    static_assert(TILE::exact, "thread words exist for exact masks only");
    mbar_wait(source.ready, source.phase);
    ThreadKeyBits bits{{~0u, ~0u}};
    if (tile.has_bits()) {
        const u32* words = source.words + (key_row0 - tile.key0 + lane / 4) * 4 + lane % 4;
        bits.word[0] = words[0];
        bits.word[1] = words[8 * 4];
    }
    return bits;
}
template <int NT, class TILE>
__device__ __forceinline__ void mask_probs_transposed(float (&s)[NT][4], const TILE& tile, const ThreadKeyBits& bits,
                                                      int key_row, int query0, int t) {
    static_assert(TILE::exact && NT <= 16, "an exact tile; a thread's columns of one key row in one word");
    if (tile.has_bits()) {
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (!(bits.word[half] & (1u << (2 * j + e)))) s[j][half * 2 + e] = 0.f;
    }
    mask_probs_transposed(s, tile.band, key_row, query0, t);
}

// One consumer warpgroup's share of one query tile in a dK/dV kernel: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ,
// Pᵀ and dSᵀ, dV += Pᵀ dO and dK += dSᵀ Q into the accumulators and (ATOMIC_DQ) this
// warpgroup's part of dS K added into the float32 dQ accumulator. `stage` picks the Q / dO
// buffer and its lse2, Delta and scratch rows. `sync(id)` waits for every consumer thread of the
// block under named barrier `id` (the dSᵀ tile is shared by the warpgroups); `parts` takes the
// warp's part of dQ (DqPartsByWarp or DqPartsToWriter); `source` says where an exact tile's bits
// are (TransposedSource or ThreadWordsSource).
template <typename T, int D, int WG, int BLOCK_M, class MASK, class MOD, bool DROPOUT, bool ATOMIC_DQ, class Steps,
          class Sync, class Parts = DqPartsByWarp, class Source = TransposedSource>
__device__ __forceinline__ void dkdv_query_tile(const BwdArgs& a, const MASK& mask, const MOD& mod,
                                                const DropoutMask& drop, const DkdvSmem<D, WG, BLOCK_M, ATOMIC_DQ>& sm,
                                                int wg, int stage, int m0, int n0, int slot,
                                                float (&dk_acc)[D / 2], float (&dv_acc)[D / 2], Steps steps,
                                                Sync sync, const Parts& parts = Parts{},
                                                const Source& source = Source{}) {
    constexpr int BLOCK_N = WG * 64;
    constexpr int CT = BLOCK_M / 8;  // 8-column blocks of Sᵀ
    constexpr int KM = BLOCK_M / 16;  // k16 steps over the query tile
    using DQ = FusedDq<D, WG, BLOCK_M>;
    const int warp = (threadIdx.x / 32) % 4;  // rows 16·warp..+15 of the warpgroup's 64 keys
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int key_row0 = n0 + wg * 64 + warp * 16;  // the warp's first key
    const float* lse2 = sm.template at<const float>(sm.rows(stage));
    const float* delta = lse2 + BLOCK_M;

    // Sᵀ = K Qᵀ, dPᵀ = V dOᵀ: A = this warpgroup's 64 rows of K / V (K-major over d, 64 rows =
    // 8 atoms = 8192 bytes into each box), B = the Q / dO tile (K-major over d).
    // dV += Pᵀ dO, dK += dSᵀ Q: B = dO / Q read MN-major (K = query rows, N = d): k16 step kk
    // starts 16 rows (2048 bytes) further, the next 64-column box is BLOCK_M·128 bytes further.
    const u64 desc_k = sw128_desc(sm.sk + wg * 64 * 128, 16);
    const u64 desc_v = sw128_desc(sm.sv() + wg * 64 * 128, 16);
    const u64 desc_q = sw128_desc(sm.sq(stage), 16);
    const u64 desc_do = sw128_desc(sm.sdo(stage), 16);
    const u64 desc_q_mn = sw128_desc(sm.sq(stage), BLOCK_M * 128);
    const u64 desc_do_mn = sw128_desc(sm.sdo(stage), BLOCK_M * 128);
    float s[BLOCK_M / 2], dp[BLOCK_M / 2];
    GradFactors<MOD, CT> grad;  // unused: recovered from Pᵀ below (the stores are dead code)
    u32 pf[KM][4], df[KM][4];

    const auto tile_mask = mask.template tile<BLOCK_M, BLOCK_N>(m0, n0, slot);
    issue_transposed_scores<T, D, BLOCK_M, BLOCK_N, BLOCK_M>(s, dp, desc_k, desc_q, desc_v, desc_do, steps);
    KeepWords<true, CT> keep;  // this warp's 16 keys against the tile's queries, while Sᵀ and dPᵀ run
    if constexpr (DROPOUT) keep_words<true, CT>(keep, drop, key_row0 + g, m0, lane);
    const auto bits = tile_bits_from(tile_mask, source, key_row0, lane);  // an exact mask's, likewise

    // Pᵀ from Sᵀ while dPᵀ runs. Query rows past Nq and rows that attend to nothing have
    // lse2 = +inf, so P = 0 there; element masks only where the warp's 16 keys hold a pair the
    // mask hides (keys past Nk are masked too, though their dK/dV rows are never written).
    // lse2 and Delta are loaded ahead at 64-row query tiles without a score modifier or dropout
    // (elsewhere their registers spill).
    constexpr bool AHEAD = BLOCK_M == 64 && MOD::identity && !DROPOUT;
    const ColumnPairs<CT, AHEAD> lse2_pairs(lse2, t);
    wgmma_wait<1>();
    reg_fence(s);
    recompute_probs_transposed(as_blocks<CT>(s), grad, tile_mask, mod, false, key_row0 + g, m0, t, lse2_pairs);
    if (tile_mask.partial(m0, BLOCK_M, key_row0, 16))
        mask_probs_transposed(as_blocks<CT>(s), tile_mask, bits, key_row0 + g, m0, t);
    pack_a<T, KM>(pf, s);
    if constexpr (DROPOUT) drop_packed(pf, keep);

    // dV += Pᵀ dO, running while dSᵀ is formed.
    reg_fence_frag(pf);
    reg_fence(dv_acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KM; ++kk)
        wgmma_rs<T, D, 1>(dv_acc, pf[kk], desc_do_mn + ((u32)(kk * 2048) >> 4), 1);
    wgmma_commit();

    // dSᵀ = Pᵀ ∘ (dPᵀ − Delta[query]).
    const ColumnPairs<CT, AHEAD> delta_pairs(delta, t);
    wgmma_wait<1>();
    reg_fence(dp);
    if constexpr (DROPOUT) drop_grads(as_blocks<CT>(dp), keep);
    // The softcap factor comes back from Pᵀ: 32 more live registers would spill at D = 128.
    softmax_grad_recovered<CT>(as_blocks<CT>(dp), as_blocks<CT>(s), mod, [&](int j, int i) {
        const float2 l2 = lse2_pairs(j, t), dl = delta_pairs(j, t);
        return ElementCoords{m0 + 8 * j + 2 * t + (i & 1), key_row0 + g + (i / 2) * 8, i & 1 ? l2.y : l2.x,
                             i & 1 ? dl.y : dl.x};
    }, DROPOUT ? drop.rescale : 1.f);
    pack_a<T, KM>(df, dp);

    // dK += dSᵀ Q (scaled once at the end).
    reg_fence_frag(df);
    reg_fence(dk_acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KM; ++kk)
        wgmma_rs<T, D, 1>(dk_acc, df[kk], desc_q_mn + ((u32)(kk * 2048) >> 4), 1);
    wgmma_commit();
    if constexpr (ATOMIC_DQ) {  // dSᵀ into shared memory while dK runs
        sync(2);  // every warpgroup's dQ part of the previous tile has read the dSᵀ tile
        store_ds_transposed<BLOCK_N, KM>(sm.sds(), df, (wg * 4 + warp) * 16 + g, t);
        fence_proxy_async_shared();
        sync(1);  // both warpgroups' dSᵀ stored
    }
    wgmma_wait<0>();
    // The register operands stay untouched until the products that read them have landed.
    reg_fence_frag(pf);
    reg_fence_frag(df);
    reg_fence(dv_acc);
    reg_fence(dk_acc);
    if constexpr (ATOMIC_DQ) {
        if (!DQ::forms(wg, stage)) return;
        // dQ part = dS K, in the registers the Pᵀ and dSᵀ operands have just freed.
        float dq[DQ::N / 2];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk)
            wgmma_ss<T, DQ::N, 1, 1>(dq, DQ::ds_desc(sm.sds(), wg) + ((u32)(kk * 2048) >> 4),
                                     DQ::k_desc(sm.sk, wg) + ((u32)(kk * 2048) >> 4), kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        reg_fence(dq);
        // The accumulator's rows are D floats here (the host sets a.dqk to the tile's D). The
        // tile's first scratch row is kept in shared memory, not in a register through the tile
        // (the kernel has none to spare).
        const i64 tile_row = *sm.template at<const i64>(sm.scratch_row(stage));
        const i64 r = tile_row + DQ::row0(wg) + warp * 16;
        parts.add(a.dq_accum + dq_fragment_offset(r, DQ::col0(wg), D), tile_row,
                  sm.sdq(DQ::channel(stage)) + DQ::stage_offset(wg, warp), as_blocks<DQ::N / 8>(dq), lane);
    }
}

// dK·scale (store_dk) or dV (store_dv) of one consumer warpgroup's 64 keys, the real ones of its
// first COLS columns (a.d or a.dv), once; key tiles that no query sees write zeros.
template <typename T, int COLS, bool F32_GRADS>
__device__ __forceinline__ void store_dk(const BwdArgs& a, int b, int hk, const Sequence& seq, int key_row0,
                                         float (&dk_acc)[COLS / 2]) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    const float factor[2] = {a.scale, a.scale};
    store_rows<T, true>(grad_rows<F32_GRADS>(a.grad_k) + b * a.gk_sb + hk * a.gk_sh + seq.k0 * a.gk_sn, a.gk_sn,
                        seq.nk, a.d, as_blocks<COLS / 8>(dk_acc), key_row0 + g, 0, t, factor);
}
template <typename T, int COLS, bool DROPOUT, bool F32_GRADS>
__device__ __forceinline__ void store_dv(const BwdArgs& a, int b, int hk, const Sequence& seq, int key_row0,
                                         float (&dv_acc)[COLS / 2]) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    const float dv_scale = DROPOUT ? a.drop_rescale : 1.f;  // dV = rescale · Σ (P ∘ Z)ᵀ dO
    const float factor[2] = {dv_scale, dv_scale};
    store_rows<T, true>(grad_rows<F32_GRADS>(a.grad_v) + b * a.gv_sb + hk * a.gv_sh + seq.k0 * a.gv_sn, a.gv_sn,
                        seq.nk, a.dv, as_blocks<COLS / 8>(dv_acc), key_row0 + g, 0, t, factor);
}
template <typename T, int K_COLS, int V_COLS, bool DROPOUT, bool F32_GRADS>
__device__ __forceinline__ void store_dkdv(const BwdArgs& a, int b, int hk, const Sequence& seq, int key_row0,
                                           float (&dk_acc)[K_COLS / 2], float (&dv_acc)[V_COLS / 2]) {
    store_dk<T, K_COLS, F32_GRADS>(a, b, hk, seq, key_row0, dk_acc);
    store_dv<T, V_COLS, DROPOUT, F32_GRADS>(a, b, hk, seq, key_row0, dv_acc);
}

// ---------------------------------------------------------------------------------------------
// dK, dV for one key tile of BLOCK_N = 64·WG keys; query tiles of BLOCK_M rows, loaded by every
// thread with cp.async into two stages.
template <typename T, int D, int WG, int BLOCK_M, class MASK, class MOD, bool DROPOUT = false,
          bool F32_GRADS = false, bool ATOMIC_DQ = false, bool VARLEN = false, int QK_DIM = D, int DP_DIM = D>
__global__ void __launch_bounds__(WG * 128, 1)
flash_bwd_sm90_dkdv(const BwdArgs a) {
    wait_for_previous_kernel();
    let_next_kernel_start();
    constexpr int THREADS = WG * 128;
    constexpr int BLOCK_N = WG * 64;
    static_assert(D == 64 || D == 128, "head dim must be 64 or 128");
    static_assert(BLOCK_M == 64 || BLOCK_M == 128, "query tile must be 64 or 128 rows");
    using DQ = FusedDq<D, WG, BLOCK_M>;
    // (Its warps add their own parts, each from its own staging floats: no turns.)
    static_assert(!ATOMIC_DQ || (DQ::N >= 64 && !DQ::BY_TURNS), "fused dQ needs parts of at least 64 columns");

    // Dynamic shared memory is only 16-byte aligned; the swizzle needs 1024 (the host adds 1 KB).
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const DkdvSmem<D, WG, BLOCK_M, ATOMIC_DQ> sm(smem_raw);

    const KvTile tile = kv_tile_of_block(a.n_tiles, a.kv_heads);
    const int b = tile.b, hk = tile.hk, n_tile = tile.n_tile;
    const int n0 = n_tile * BLOCK_N;
    const Sequence seq = sequence_of<VARLEN>(a, b);
    if (VARLEN && n0 >= seq.nk) return;  // past this sequence's end (before any barrier)
    const MASK mask(a, seq.nq, seq.nk);
    QueryTileWalk<BLOCK_M, BLOCK_N, MASK> walk(mask, a, n_tile, hk,
                                               VARLEN ? (seq.nq + BLOCK_M - 1) / BLOCK_M : a.m_tiles);

    auto load_query_tile = [&](int hh, int tile, int stage) {
        const int m0 = tile * BLOCK_M;
        load_tile_sw128<BLOCK_M, D, THREADS>(sm.sq(stage), a.q + b * a.q_sb + hh * a.q_sh + seq.q0 * a.q_sn,
                                             a.q_sn, m0, seq.nq, a.d);
        load_tile_sw128<BLOCK_M, D, THREADS>(sm.sdo(stage), a.dout + b * a.do_sb + hh * a.do_sh + seq.q0 * a.do_sn,
                                             a.do_sn, m0, seq.nq, a.dv);
        const i64 r = scratch_offset<VARLEN>(a, seq, b, hh) + m0;
        float* rows = sm.template at<float>(sm.rows(stage));
        load_f32_async<BLOCK_M, THREADS>(rows, a.lse2 + r);
        load_f32_async<BLOCK_M, THREADS>(rows + BLOCK_M, a.delta + r);
        if (ATOMIC_DQ && threadIdx.x == 0) *sm.template at<i64>(sm.scratch_row(stage)) = r;
    };

    int m_tile = walk.valid() ? walk.m_tile() : 0;
    if (walk.valid()) {
        load_tile_sw128<BLOCK_N, D, THREADS>(sm.sk, a.k + b * a.k_sb + hk * a.k_sh + seq.k0 * a.k_sn, a.k_sn, n0, seq.nk,
                                             a.d);
        load_tile_sw128<BLOCK_N, D, THREADS>(sm.sv(), a.v + b * a.v_sb + hk * a.v_sh + seq.k0 * a.v_sn, a.v_sn, n0,
                                             seq.nk, a.dv);
        load_query_tile(walk.h, m_tile, 0);
    }
    cp_async_commit();

    const int wg = threadIdx.x / 128;
    float dk_acc[D / 2], dv_acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk_acc[i] = dv_acc[i] = 0.f;

    int stage = 0;
    while (walk.valid()) {
        const MOD mod(a, b, walk.h, seq.nq, seq.nk);
        const DropoutMask drop(a, b, walk.h);
        const int m0 = m_tile * BLOCK_M;
        cp_async_wait<0>();
        fence_proxy_async_shared();
        __syncthreads();  // this query tile visible; every warpgroup is done with the other stage

        auto ahead = walk;
        ahead.next();
        const bool has_next = ahead.valid();
        const int next_m_tile = has_next ? ahead.m_tile() : 0;
        if (has_next) load_query_tile(ahead.h, next_m_tile, stage ^ 1);
        cp_async_commit();

        // The block's barrier at the loop's top already orders the dSᵀ tile's reuse (id 2).
        dkdv_query_tile<T, D, WG, BLOCK_M, MASK, MOD, DROPOUT, ATOMIC_DQ>(
            a, mask, mod, drop, sm, wg, stage, m0, n0, walk.slot(), dk_acc, dv_acc,
            HeadSteps<QK_DIM, DP_DIM>{}, [](int id) { if (id == 1) __syncthreads(); });

        walk = ahead;
        m_tile = next_m_tile;
        stage ^= 1;
    }
    cp_async_wait<0>();
    if constexpr (ATOMIC_DQ) {
        if (threadIdx.x % 32 == 0) bulk_wait();  // the staging floats stay until the last reduce-add is done
    }
    store_dkdv<T, D, D, DROPOUT, F32_GRADS>(a, b, hk, seq, n0 + wg * 64 + (threadIdx.x / 32) % 4 * 16, dk_acc, dv_acc);
}

// ---------------------------------------------------------------------------------------------
// Head dims past 128 (the D = 256 tile; warp-specialised kernel only). dK and dV of 64 keys × D
// columns would take D floats per thread each, more than one consumer has for both, so the two
// consumers share one 64-key tile and split the work by gradient (dkdv_split_query_tile):
// warpgroup 0 forms Sᵀ = K Qᵀ, Pᵀ and dV += Pᵀ dO over all of dV's columns, warpgroup 1
// dPᵀ = V dOᵀ, dSᵀ and dK += dSᵀ Q over all of dK's. dSᵀ needs P, which warpgroup 0 hands over
// in float32 through shared memory; nothing else passes between them, so warpgroup 0 runs up to
// a tile ahead, and each tile pair takes four GEMMs that read each operand once. (Splitting dK
// and dV by columns needed Pᵀ and dSᵀ in both consumers, two hand-overs per tile each way;
// splitting by gradient with Sᵀ formed twice instead of handed over took five GEMMs.) No fused
// dQ: its staging floats (64 rows × D) do not fit beside two stages of Q and dO, so dQ is a dq
// kernel's (flash_bwd_sm90_dq_ws, or with a block mask of 64-row blocks flash_bwd_sm90_dq).
// Shared-memory plan: K, V; two stages of Q and dO; P in float32, in warpgroup 0's accumulator
// order; per stage lse2 and Delta rows.
template <int D>
struct SplitDkdvSmem : DkdvStages<D, 64, 64> {
    using Stages = DkdvStages<D, 64, 64>;
    static constexpr u32 P_BYTES = Stages::BLOCK_N * Stages::BLOCK_M * 4;  // P in float32
    __device__ __forceinline__ explicit SplitDkdvSmem(unsigned char* raw) : Stages(raw) {}
    __device__ __forceinline__ u32 sp32() const { return this->tail(); }
    __device__ __forceinline__ u32 rows(int stage) const {  // lse2[BLOCK_M], then Delta[BLOCK_M]
        return sp32() + P_BYTES + stage * 2 * Stages::BLOCK_M * 4;
    }
};

// The shared-memory plan of a dK/dV kernel: keys split across the warpgroups (D ≤ 128) or
// gradients (D = 256).
template <int D, int WG, int BLOCK_M, bool ATOMIC_DQ, bool SPLIT = (D > 128)>
struct DkdvLayout {
    using type = DkdvSmem<D, WG, BLOCK_M, ATOMIC_DQ>;
};
template <int D, int WG, int BLOCK_M, bool ATOMIC_DQ>
struct DkdvLayout<D, WG, BLOCK_M, ATOMIC_DQ, true> {
    using type = SplitDkdvSmem<D>;
};

// N / 2 floats of an accumulator from float OFFSET on, as an m64nN accumulator.
template <int N, int OFFSET, int ACC>
__device__ __forceinline__ float (&accumulator_part(float (&acc)[ACC]))[N / 2] {
    static_assert(OFFSET + N / 2 <= ACC, "within the accumulator");
    return *reinterpret_cast<float(*)[N / 2]>(&acc[OFFSET]);
}

// acc[:, 0 .. COLS] += (the 64 × 64 transposed tile in `frag`, this thread's A fragments) · (the
// first COLS columns of the Q or dO stage at `tile`, read MN-major: a k16 step is 16 query rows,
// 2048 bytes; the next 64-column box 64·128 bytes further): an m64n128 wgmma per step and, past
// 128 columns, an m64n64 or m64n128 one.
template <typename T, int COLS, int ACC>
__device__ __forceinline__ void issue_gradient_update(float (&acc)[ACC], u32 (&frag)[4][4], u32 tile) {
    constexpr int LOW = COLS < 128 ? COLS : 128, HIGH = COLS - LOW;
    const u64 desc = sw128_desc(tile, 64 * 128);
    reg_fence_frag(frag);
    reg_fence(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        wgmma_rs<T, LOW, 1>(accumulator_part<LOW, 0>(acc), frag[kk], desc + ((u32)(kk * 2048) >> 4), 1);
        if constexpr (HIGH > 0)
            wgmma_rs<T, HIGH, 1>(accumulator_part<HIGH, LOW / 2>(acc), frag[kk],
                                 desc + ((u32)(2 * 64 * 128 + kk * 2048) >> 4), 1);
    }
    wgmma_commit();
}

// P (warpgroup 0's Sᵀ accumulator after the softmax) in float32 for warpgroup 1, whose dPᵀ
// accumulator holds the same elements in the same threads: thread i's floats 4c..4c+3 at
// 16·(128c + i), so that each warp's 16-byte stores and loads cover 512 consecutive bytes.
template <int N>
__device__ __forceinline__ void store_p32(u32 sp32, const float (&p)[N]) {
    const u32 at = sp32 + (threadIdx.x % 128) * 16;
#pragma unroll
    for (int c = 0; c < N / 4; ++c)
        asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(at + c * 128 * 16), "f"(p[4 * c]),
                     "f"(p[4 * c + 1]), "f"(p[4 * c + 2]), "f"(p[4 * c + 3])
                     : "memory");
}
template <int N>
__device__ __forceinline__ void load_p32(float (&p)[N], u32 sp32) {
    const u32 at = sp32 + (threadIdx.x % 128) * 16;
#pragma unroll
    for (int c = 0; c < N / 4; ++c)
        asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                     : "=f"(p[4 * c]), "=f"(p[4 * c + 1]), "=f"(p[4 * c + 2]), "=f"(p[4 * c + 3])
                     : "r"(at + c * 128 * 16)
                     : "memory");
}

// The split kernel's named barriers between the two consumers (256 threads: one warpgroup
// arrives, the other waits). Ids past the kernel's 3 + warpgroup.
enum SplitBarrier : int {
    P_READY = 5,  // warpgroup 0 has stored P
    P_FREE = 6,   // warpgroup 1 has read it: after every tile; warpgroup 0 waits before its next
                  // store, and once after its last tile
};

// One consumer warpgroup's share of one query tile, split by gradient (see SplitDkdvSmem).
// Warpgroup 0: Sᵀ = K Qᵀ, P (stored once warpgroup 1 has read the previous tile's; `later`: not
// the block's first tile), dV += Pᵀ dO into `acc`. Warpgroup 1: dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘
// (dPᵀ − Delta) once P is stored, dK += dSᵀ Q into `acc` (scaled once at the end).
template <typename T, int D, class MASK, class MOD, class Steps, int ACC>
__device__ __forceinline__ void dkdv_split_query_tile(const BwdArgs& a, const MASK& mask, const MOD& mod,
                                                      const SplitDkdvSmem<D>& sm, int wg, int stage, int m0, int n0,
                                                      int slot, bool later, float (&acc)[ACC], Steps) {
    using SM = SplitDkdvSmem<D>;
    constexpr int BLOCK_M = SM::BLOCK_M, BLOCK_N = SM::BLOCK_N;
    constexpr int CT = BLOCK_M / 8;   // 8-column blocks of Sᵀ and dPᵀ
    constexpr int KM = BLOCK_M / 16;  // k16 steps over the query tile
    static_assert(KM == 4, "64-row query tiles");
    static_assert(!MASK::exact, "an exact mask's bits are loaded per whole query tile");
    const int warp = (threadIdx.x / 32) % 4;  // keys 16·warp..+15 of the tile
    const int t = threadIdx.x % 4;
    const int key_row0 = n0 + warp * 16 + threadIdx.x % 32 / 4;  // this thread's first key
    const float* lse2 = sm.template at<const float>(sm.rows(stage));
    const float* delta = lse2 + BLOCK_M;
    constexpr bool AHEAD = MOD::identity;
    float x[BLOCK_M / 2];  // Sᵀ, then P (warpgroup 0); dPᵀ, then dSᵀ (warpgroup 1)
    u32 frag[KM][4];       // Pᵀ (warpgroup 0) or dSᵀ (warpgroup 1) as A fragments
    if (wg == 0) {
        wgmma_fence();
        issue_transposed_score<T, BLOCK_M, BLOCK_N, BLOCK_M, Steps::QK>(x, sw128_desc(sm.sk, 16),
                                                                       sw128_desc(sm.sq(stage), 16));
        const auto tile_mask = mask.template tile<BLOCK_M, BLOCK_N>(m0, n0, slot);
        const ColumnPairs<CT, AHEAD> lse2_pairs(lse2, t);
        GradFactors<MOD, CT> grad;  // unused: warpgroup 1 recovers it from P (the stores are dead code)
        wgmma_wait<0>();
        reg_fence(x);
        recompute_probs_transposed(as_blocks<CT>(x), grad, tile_mask, mod, false, key_row0, m0, t, lse2_pairs);
        if (tile_mask.partial(m0, BLOCK_M, n0 + warp * 16, 16))
            mask_probs_transposed(as_blocks<CT>(x), tile_mask, key_row0, m0, t);
        pack_a<T, KM>(frag, x);
        if (later) named_barrier(P_FREE, 256);
        store_p32(sm.sp32(), x);
        named_barrier_arrive(P_READY, 256);
        issue_gradient_update<T, box_columns(Steps::DP)>(acc, frag, sm.sdo(stage));
    } else {
        wgmma_fence();
        issue_transposed_score<T, BLOCK_M, BLOCK_N, BLOCK_M, Steps::DP>(x, sw128_desc(sm.sv(), 16),
                                                                       sw128_desc(sm.sdo(stage), 16));
        const ColumnPairs<CT, AHEAD> lse2_pairs(lse2, t), delta_pairs(delta, t);
        wgmma_wait<0>();
        reg_fence(x);
        named_barrier(P_READY, 256);
        float p[BLOCK_M / 2];
        load_p32(p, sm.sp32());
        named_barrier_arrive(P_FREE, 256);
        softmax_grad_recovered<CT>(as_blocks<CT>(x), as_blocks<CT>(p), mod, [&](int j, int i) {
            const float2 l2 = lse2_pairs(j, t), dl = delta_pairs(j, t);
            return ElementCoords{m0 + 8 * j + 2 * t + (i & 1), key_row0 + (i / 2) * 8, i & 1 ? l2.y : l2.x,
                                 i & 1 ? dl.y : dl.x};
        });
        pack_a<T, KM>(frag, x);
        issue_gradient_update<T, box_columns(Steps::QK)>(acc, frag, sm.sq(stage));
    }
    wgmma_wait<0>();
    reg_fence_frag(frag);
    reg_fence(acc);
}

// The warp-specialised kernel's dQ writer (one elected thread of the producer warpgroup's second
// warp): per visited query tile, once every consumer warp has staged its part ("dq_full"), the
// tile's BLOCK_M × D floats go into the accumulator as one bulk reduce-add (the staging floats lie
// in the accumulator's order), and "dq_empty" is signalled as soon as the TMA unit has read them.
// The tile's first scratch row and rank come from the consumers' header (DqTileHeader), which also
// ends the loop: the writer runs within the producer's 24 registers, with no walk of its own.
// ORDERED (bit-identical sums run to run): the key tile whose rank among those that visit the dQ
// tile is r (schedule.cuh, key_tile_rank) adds its part after the r before it have landed. The
// tile's semaphore (schedule.cuh, dq_semaphore) counts the parts that have landed: the writer
// waits for it to reach the rank before its add, and adds 1 as soon as the add has completed.
// That round trip is the writer's, off the consumers' path; releasing the tile one tile later
// instead (so that the writer never waits on it) made each key tile start about two tile-steps
// after the one before it: 0.66-0.81x the default's backward without a mask at N <= 8K, against
// 0.85-0.95x this way (benchmarks/NOTES.md, "Hopper backward v8"). The grid launches key tiles
// in the order of their ranks (kv_tile_of_block), so a block waits only on blocks launched
// before it (its consumers wait on its writer through "dq_empty"); the rank-0 block of every dQ
// tile never waits. A wait that lasts a quarter of a second can only be a rank the semaphore
// never reaches (the tile walks and key_tile_rank disagreeing): the writer then adds unordered
// (wait_until_equal_gpu gives up), so that such a bug shows as gradients that differ from run to
// run, the tests' check, rather than as a hung GPU.
// DQ::CHANNELS: the tiles come through the channels as the consumers send them (tile t in
// stage t % 2, FusedDq::channel), each channel's header and staging floats after the one before.
// `lane_counter` (lanes_counted; null elsewhere): once the block's last add has completed, the
// writer adds 1 to its lane's counter, with release semantics.
// The first part of a dQ tile is stored, not added, so that the accumulator needs no zeros where
// every dQ tile gets a part (the host's sm90_backward.dq_zeros_needed): ORDERED, rank 0's;
// CLAIMED (claims_dq_tiles), that of the key tile that claims the tile first (schedule.cuh,
// dq_tile_claim), which the others wait for before their adds. Where a tile may get no part, the
// accumulator is zeroed all the same and the first store writes over zeros.
template <bool ORDERED, bool CLAIMED, class DQ, int D, int BLOCK_M>
__device__ __forceinline__ void write_dq_parts(const BwdArgs& a, const volatile DqTileHeader* headers, u32 sdq0,
                                               u32 full0, int* lane_counter) {
    for (u32 tiles = 0;; ++tiles) {
        const int channel = DQ::channel(tiles % 2);
        const u32 full = DQ::channel_full(full0, channel), empty = full + 8;
        const u32 sdq = sdq0 + channel * DQ::STAGE_BYTES;
        mbar_wait(full, DQ::channel_parity(tiles % 2, (tiles / 2) & 1));
        const volatile DqTileHeader* header = headers + channel;
        const i64 r = header->row;
        if (r < 0) break;
        // ORDERED: the tile's semaphore, which counts its landed parts; CLAIMED: its claim.
        int* turn = nullptr;
        bool first = false;
        if constexpr (ORDERED) {
            turn = dq_semaphore(a, r);
            const int rank = header->rank;
            wait_until_equal_gpu(turn, rank);
            first = rank == 0;
        } else if constexpr (CLAIMED) {
            turn = dq_tile_claim(a, r);
            first = atomicCAS(turn, 0, 1) == 0;
            if (!first) wait_until_equal_gpu(turn, 2);
        }
        if (first)
            bulk_store(a.dq_accum + r * D, sdq, BLOCK_M * D * 4);
        else
            bulk_reduce_add_f32(a.dq_accum + r * D, sdq, BLOCK_M * D * 4);
        bulk_commit();
        bulk_wait_read();
        mbar_arrive(empty);
        if (ORDERED || first) {
            bulk_wait();
            fence_proxy_async_global();  // the store or add (async proxy) before the release
            red_release_gpu_add(turn, 1);
        }
    }
    bulk_wait();
    if (lane_counter != nullptr) {
        fence_proxy_async_global();  // the adds (async proxy) before the release (generic proxy)
        red_release_gpu_add(lane_counter, 1);
    }
}

// Whether the warp-specialised dK/dV kernel counts each lane's finished key tiles, so that
// flash_bwd_dq_convert can cast a lane's dQ as soon as it is whole, beside the grid's last wave
// (AFTER_LANES; schedule.cuh, dq_lane_counter): where it adds dQ in any order into a dense call's
// accumulator. (Ordered adds have their semaphores where the counters would be; packed
// sequences lay their scratch out by sequence, not lane.) The host's twin:
// sm90_backward.lanes_counted.
template <bool ATOMIC_DQ, bool ORDERED_DQ, bool VARLEN>
__device__ constexpr bool lanes_counted() {
    return ATOMIC_DQ && !ORDERED_DQ && !VARLEN;
}

// Whether the dQ writer of adds in any order claims each dQ tile, storing the first part
// (write_dq_parts): where its lanes are counted (the claims lie past the counters), under a band.
// Without one a head's key tiles walk the query tiles side by side and would all claim each tile
// at once, then wait for one store; there the writers add into a zeroed accumulator instead
// (benchmarks/NOTES.md, "dQ tiles stored first"). The host's twin: sm90_backward.stores_first_parts.
template <bool ATOMIC_DQ, bool ORDERED_DQ, bool VARLEN, class MASK>
__device__ constexpr bool claims_dq_tiles() {
    return lanes_counted<ATOMIC_DQ, ORDERED_DQ, VARLEN>() && MASK::banded;
}

// ---------------------------------------------------------------------------------------------
// The same, warp-specialised (dense calls): warpgroup 0 is a producer whose one elected thread
// loads K and V once and each query tile's Q and dO (TMA, 128-byte swizzled boxes, zeros past
// the tensor's end) and lse2 and Delta rows (bulk copies) into two stages guarded by mbarriers;
// warpgroups 1..WG are the consumers, with the producer's registers (setmaxnreg). Consumers
// release a stage after its last read; no block-wide barrier runs in the loop. ATOMIC_DQ: the
// producer warpgroup's second warp is the dQ writer (write_dq_parts), which at the end tells its
// lane's counter that the key tile's adds have landed (lanes_counted); ORDERED_DQ: its adds in
// key-tile order (dense and banded masks); ROTATED_DQ: without a band, each key tile's walk
// starts at its own query tile (schedule.cuh, key_tile_rank), so the ordered adds do not queue.
// D = 256: the two consumers share one 64-key tile, one keeping dV and the other dK
// (dkdv_split_query_tile), without the fused dQ, dropout or exact masks.
struct BwdMaps {
    TmaDesc q, k, v, dout;
};

// ---- exact masks in the warp-specialised dK/dV kernel: each tile's bits as its threads' words
//
// The consumers hold Sᵀ (keys as rows), and an exact mask stores its bits by query row. Read as
// they are stored, a thread finds its elements' bits by a shuffle per query column and tests
// them one by one (TransposedBits: about four instructions per element, the exact backward's
// whole extra cost at D = 64, benchmarks/NOTES.md). Against 128-row query tiles (THREAD_WORDS
// in the kernel) two of the producer warpgroup's idle warps lay each partial tile's bits out in
// shared memory as the consumers' threads hold their elements, while the consumers work on the
// tile before: per key c of the tile and column t (lane % 4) one word whose bit 2j + e is query
// column 8j + 2t + e (ThreadKeyBits). A thread then loads two words and tests a constant bit per
// element. The words come from a 32 × 32 bit transpose per 32 query rows and 32 keys (five
// shuffle rounds), then from each 32-query word the eight columns a thread holds. The
// producer's thread posts each tile's bitmask slot in the stage's record once the stage is free,
// and arrives on the stage's "slot posted" barrier before it issues the stage's loads; the two
// warps wait for that barrier (their loads of the bits then run beside the stage's copies), write
// the record's words and arrive on the stage's "bits ready" barrier, which the consumers wait for
// before their first read. After the block's last tile the producer posts NO_MORE_TILES.
constexpr int NO_MORE_TILES = -2;
template <int BLOCK_N>
struct ThreadWordsStage {
    int slot, pad[3];        // the tile's bitmask (−1: a full tile), or NO_MORE_TILES
    u32 words[BLOCK_N * 4];  // key c of the tile, column t: word 4c + t
};
// The two stages' records: static shared memory of the kernels that call this (exact masks only).
template <int BLOCK_N>
__device__ __forceinline__ ThreadWordsStage<BLOCK_N>* thread_words_stages() {
    __shared__ __align__(16) ThreadWordsStage<BLOCK_N> stages[2];
    return stages;
}

// Lane l holds row l of a 32 × 32 bit matrix (bit c: column c); afterwards it holds column l (bit
// r: row r). Each round swaps the off-diagonal blocks of one size between lane pairs.
__device__ __forceinline__ u32 transpose_bits_32(u32 x, int lane) {
#pragma unroll
    for (int s = 16; s > 0; s /= 2) {
        const u32 low = s == 16 ? 0x0000FFFFu : s == 8 ? 0x00FF00FFu : s == 4 ? 0x0F0F0F0Fu : s == 2 ? 0x33333333u
                                                                                                  : 0x55555555u;
        const u32 y = __shfl_xor_sync(0xffffffffu, x, s);
        x = (lane & s) ? (x & ~low) | ((y >> s) & low) : (x & low) | ((y & low) << s);
    }
    return x;
}

// Of one key's word over 32 queries, the columns 8m + 2t + e (m < 4) that thread column t holds,
// as bits 2m + e.
__device__ __forceinline__ u32 thread_columns(u32 word, int t) {
    u32 y = (word >> (2 * t)) & 0x03030303u;
    y = (y | (y >> 6)) & 0x000F000Fu;
    return (y | (y >> 12)) & 0xFFu;
}

// Bitmask `slot` of the exact mask (query-major in memory) as the tile's thread words, this
// warp's share: the 32-key groups part, part + PARTS, ...
template <int BLOCK_M, int BLOCK_N, int PARTS>
__device__ __forceinline__ void thread_words_of_tile(u32* words, const u32* tile_bits, int slot, int part, int lane) {
    constexpr int ROW_WORDS = RowBits<BLOCK_N>::WORDS, GROUPS = BLOCK_M / 32;
    static_assert(BLOCK_M % 32 == 0 && BLOCK_M <= 128 && BLOCK_N % 32 == 0, "whole 32 × 32 blocks, 8 bits per group");
    const u32* rows = tile_bitmask_row<BLOCK_M, BLOCK_N>(tile_bits, slot, 0);
#pragma unroll 1
    for (int w = part; w < ROW_WORDS; w += PARTS) {
        u32 out[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int i = 0; i < GROUPS; ++i) {
            // key 32w + lane against query rows 32i .. 32i + 31
            const u32 key_word = transpose_bits_32(__ldg(rows + (32 * i + lane) * ROW_WORDS + w), lane);
#pragma unroll
            for (int t = 0; t < 4; ++t) out[t] |= thread_columns(key_word, t) << (8 * i);
        }
        *reinterpret_cast<uint4*>(words + (32 * w + lane) * 4) = make_uint4(out[0], out[1], out[2], out[3]);
    }
}

// Packed sequences: a tile that ends past its sequence holds the next sequence's first rows there
// (TMA reads whole boxes of the packed rows), where a dense call's hold TMA's zeros. Their P is 0
// (keys: the band's test; queries: lse2 = +inf), but 0 · inf is NaN, and a non-finite query row
// would make its S, and so its P, NaN: an infinite or NaN value there would reach this sequence's
// gradients. So each consumer zeros rows `rows` .. ROWS − 1 of the tile's two buffers (K and V,
// or Q and dO) itself before its GEMMs read them, and meets its own warpgroup at barrier `id`.
// Two consumers may write the same zeros at once, which changes no value: between the buffers'
// load and their release nothing but zeros is written to those rows (as the forward's
// clear_values_past_end). `rows` ≥ 1: a walked tile holds a row of the sequence.
template <int FIRST_BOXES, int SECOND_BOXES, int ROWS>
__device__ __forceinline__ void clear_rows_past_end(u32 first, u32 second, int rows, int id) {
    if (rows < ROWS) {
        zero_ring_rows<FIRST_BOXES, ROWS>(first, rows, threadIdx.x % 128, 128);
        zero_ring_rows<SECOND_BOXES, ROWS>(second, rows, threadIdx.x % 128, 128);
        named_barrier(id, 128);
    }
}

template <typename T, int D, int WG, int BLOCK_M, class MASK, class MOD, bool DROPOUT = false,
          bool F32_GRADS = false, bool ATOMIC_DQ = false, bool ORDERED_DQ = false, bool ROTATED_DQ = false,
          bool VARLEN = false, int QK_DIM = D, int DP_DIM = D>
__global__ void __launch_bounds__((WG + 1) * 128, 1)
flash_bwd_sm90_dkdv_ws(const __grid_constant__ BwdMaps maps, const __grid_constant__ BwdArgs a) {
    wait_for_previous_kernel();
    let_next_kernel_start();
    constexpr bool SPLIT = D > 128;  // dK and dV split by gradient (dkdv_split_query_tile)
    constexpr int BLOCK_N = SPLIT ? 64 : WG * 64;
    constexpr int CONSUMERS = WG * 128;
    // 64-column boxes of K and Q, and of V and dO, that hold a real column. The split kernel loads
    // only those: the boxes past them would feed nothing but dK and dV columns that are never
    // stored (it forms no dQ). Elsewhere every box is loaded (zeros past the real columns).
    constexpr int QK_BOXES = (SPLIT ? box_columns(QK_DIM) : D) / 64, DP_BOXES = (SPLIT ? box_columns(DP_DIM) : D) / 64;
    using SM = typename DkdvLayout<D, WG, BLOCK_M, ATOMIC_DQ>::type;
    static_assert(D == 64 || D == 128 || D == 256, "head dim must be 64, 128 or 256");
    static_assert(!SPLIT || (WG == 2 && BLOCK_M == 64 && !ATOMIC_DQ && !DROPOUT && !MASK::exact),
                  "D = 256: two consumers, 64-row query tiles, no fused dQ, dropout or exact mask");
    static_assert(!ORDERED_DQ || (ATOMIC_DQ && !MASK::sparse), "ordered adds of the fused dQ, dense or banded");
    static_assert(!ROTATED_DQ || (ORDERED_DQ && !MASK::banded), "rotated walks: ordered adds without a band");
    // Packed sequences (TMA rows offset by the sequence's first row, as in the TMA forward): not
    // beside the ordered adds, whose semaphores follow a dense call's accumulator, dropout, the
    // split tile or a block or exact mask, none of which the host sends here with them; and
    // under a right bound, whose test hides the next sequence's keys (keys_past_end_banded).
    static_assert(!VARLEN || (!ORDERED_DQ && !DROPOUT && !SPLIT && !MASK::sparse && !MASK::exact
                              && MASK::right_bounded),
                  "packed sequences: a right bound; no ordered adds, dropout, split tile or block mask");
    static_assert(BLOCK_M == 64 || BLOCK_M == 128, "query tile must be 64 or 128 rows");
    using DQ = FusedDq<D, WG, BLOCK_M>;
    static_assert(!ATOMIC_DQ || DQ::N >= 64, "fused dQ needs parts of at least 64 columns");
    // An exact mask's bits as the threads' words (thread_words_of_tile) against 128-row query
    // tiles; 64-row tiles (D = 128, dropout) read the bits as stored: at D = 128 the per-tile
    // hand-over cost more than the shuffles it saves on an H200 (benchmarks/NOTES.md).
    constexpr bool THREAD_WORDS = MASK::exact && BLOCK_M == 128;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    // mbarriers: K and V in; each stage's Q, dO, lse2, Delta in; each stage free again;
    // (ATOMIC_DQ) every consumer warp's dQ part staged, the staging floats read by the writer;
    // (THREAD_WORDS) each stage's slot posted and its thread words laid out.
    // (DQ::CHANNELS == 2: the second channel's pair where thread words' barriers would be.)
    static_assert(!(THREAD_WORDS && DQ::CHANNELS > 1), "thread words beside a second dQ channel");
    // The writer adds a channel's staging floats as one tile (write_dq_parts).
    static_assert(!ATOMIC_DQ || DQ::STAGE_BYTES == BLOCK_M * D * 4, "a channel's staging floats are one tile");
    __shared__ __align__(8) u64 barrier_words[THREAD_WORDS ? 11 : 5 + 2 * DQ::CHANNELS];
    ThreadWordsStage<BLOCK_N>* exact_stages = nullptr;
    if constexpr (THREAD_WORDS) exact_stages = thread_words_stages<BLOCK_N>();
    const u32 kv_full = smem_addr(barrier_words);
    auto full = [&](int stage) { return kv_full + 8 * (1 + stage); };
    auto empty = [&](int stage) { return kv_full + 8 * (3 + stage); };
    const u32 dq_full0 = kv_full + 8 * 5;  // the dQ channels' barrier pairs (FusedDq::channel_full)
    auto bits_ready = [&](int stage) { return kv_full + 8 * (7 + stage); };
    auto slot_posted = [&](int stage) { return kv_full + 8 * (9 + stage); };
    const SM sm(smem_raw);
    if (threadIdx.x == 0) {
        mbar_init(kv_full, 1);
        for (int stage = 0; stage < 2; ++stage) {
            mbar_init(full(stage), 1);
            mbar_init(empty(stage), WG);
            if constexpr (THREAD_WORDS) {
                mbar_init(bits_ready(stage), 64);  // every thread of the two warps
                mbar_init(slot_posted(stage), 1);
            }
        }
        for (int channel = 0; channel < DQ::CHANNELS; ++channel) {
            mbar_init(DQ::channel_full(dq_full0, channel), DQ::PARTS * 4);
            mbar_init(DQ::channel_full(dq_full0, channel) + 8, 1);
        }
        mbar_init_fence();
    }
    __syncthreads();

    // The tail's order only where the host may ask for it (_launch.tail_lanes): a band
    // bounded on the right alone, no block or exact mask, no dropout (not measured with it), and
    // no ordered adds, which keep each lane's key tiles together (their blocks wait on one another).
    constexpr bool TAIL_ORDER = lanes_run_heavy_to_light<MASK>() && !ORDERED_DQ && !DROPOUT && !VARLEN;
    // Packed sequences: each sequence's own key tiles, the sequences ranked by query count,
    // longest first (schedule.cuh), a lane's key tiles in order as kv_tile_of_block's.
    if constexpr (VARLEN)
        rank_longest_first<BLOCK_N>(longest_first_storage(), a.cu_q, a.cu_k, a.batch, true,
                                    LONGEST_FIRST_EACH_BLOCK_MAX);
    const KvTile tile = [&] {
        if constexpr (VARLEN) {
            const PackedTile at = packed_tile_of<BLOCK_N, false>((int)blockIdx.x, a.kv_heads, a.cu_k, a.batch);
            return KvTile{at.b, at.lane, at.tile};
        } else {
            return kv_tile_of_block<ORDERED_DQ && descending_key_tiles<MASK>()>(a.n_tiles, a.kv_heads,
                                                                              TAIL_ORDER ? a.tail_lanes : 0);
        }
    }();
    const int b = tile.b, hk = tile.hk, n_tile = tile.n_tile;
    const int n0 = n_tile * BLOCK_N;
    const Sequence seq = sequence_of<VARLEN>(a, b);
    if (VARLEN && n0 >= seq.nk) return;  // past this sequence's end (every thread, after the init)
    const int m_tiles = VARLEN ? (seq.nq + BLOCK_M - 1) / BLOCK_M : a.m_tiles;
    // TMA coordinates: a varlen call's packed rows are one batch of `total` rows (tma_view), rows
    // past the sequence's end the next sequence's. As keys a band's test hides them (the host
    // gives a packed call without a right bound one past every key: keys_past_end_banded); as
    // queries their P is 0 (lse2 is +inf in the padded scratch rows).
    const int map_batch = VARLEN ? 0 : b;
    const MASK mask(a, seq.nq, seq.nk);
    using Walk = QueryTileWalk<BLOCK_M, BLOCK_N, MASK, ROTATED_DQ>;
    Walk block_walk(mask, a, n_tile, hk, m_tiles);

    if (threadIdx.x < 128) {
        release_registers<24>();
        if constexpr (ATOMIC_DQ && !SPLIT) {
            if (threadIdx.x / 32 == 1) {
                if (elect_one_lane())
                    write_dq_parts<ORDERED_DQ, claims_dq_tiles<ATOMIC_DQ, ORDERED_DQ, VARLEN, MASK>(), DQ, D, BLOCK_M>(
                        a, sm.template at<const DqTileHeader>(sm.dq_header()), sm.sdq(), dq_full0,
                        lanes_counted<ATOMIC_DQ, ORDERED_DQ, VARLEN>() ? dq_lane_counter(a, b, hk) : nullptr);
                return;
            }
        }
        if constexpr (THREAD_WORDS) {
            if (threadIdx.x >= 64) {  // warps 2 and 3: each stage's thread words
                const int part = threadIdx.x / 32 - 2, lane = threadIdx.x % 32;
                for (RingSlot<2> at;; at.advance()) {
                    mbar_wait(slot_posted(at.stage), at.phase);
                    const int tile_slot = *static_cast<volatile int*>(&exact_stages[at.stage].slot);
                    if (tile_slot == NO_MORE_TILES) break;
                    if (tile_slot >= 0)
                        thread_words_of_tile<BLOCK_M, BLOCK_N, 2>(exact_stages[at.stage].words, a.tile_bits, tile_slot,
                                                                  part, lane);
                    mbar_arrive(bits_ready(at.stage));
                }
                return;
            }
        }
        if (threadIdx.x >= 32 || !elect_one_lane()) return;
        // After the block's last tile (or none): the two warps stop at the next stage.
        auto no_more_tiles = [&](RingSlot<2> at) {
            if constexpr (THREAD_WORDS) {
                mbar_wait(empty(at.stage), at.phase ^ 1);
                exact_stages[at.stage].slot = NO_MORE_TILES;
                mbar_arrive(slot_posted(at.stage));
            }
        };
        // Beside the writer, the producer builds its walk anew after the hand-over: the block's
        // walk kept live across setmaxnreg made the heaviest masked variant spill there. Without
        // the writer the block's walk fits, and building one here spills at D = 64 instead.
        auto walk = ATOMIC_DQ ? Walk(MASK(a, seq.nq, seq.nk), a, n_tile, hk, m_tiles) : block_walk;
        if (!walk.valid()) {
            no_more_tiles(RingSlot<2>{});
            return;
        }
        tma_prefetch_desc(&maps.q);
        tma_prefetch_desc(&maps.dout);
        mbar_arrive_expect_bytes(kv_full, (QK_BOXES + DP_BOXES) * BLOCK_N * 128);
#pragma unroll
        for (int box = 0; box < D / 64; ++box) {
            if (box < QK_BOXES)
                tma_load_4d(sm.sk + box * BLOCK_N * 128, &maps.k, kv_full, 64 * box, seq.k0 + n0, hk, map_batch);
            if (box < DP_BOXES)
                tma_load_4d(sm.sv() + box * BLOCK_N * 128, &maps.v, kv_full, 64 * box, seq.k0 + n0, hk, map_batch);
        }
        RingSlot<2> slot;
        for (; walk.valid(); walk.next(), slot.advance()) {
            const int m0 = walk.m_tile() * BLOCK_M;
            const i64 r = scratch_offset<VARLEN>(a, seq, b, walk.h) + m0;
            mbar_wait(empty(slot.stage), slot.phase ^ 1);
            if constexpr (ATOMIC_DQ) *sm.template at<i64>(sm.scratch_row(slot.stage)) = r;
            if constexpr (THREAD_WORDS) {
                exact_stages[slot.stage].slot = walk.slot();
                mbar_arrive(slot_posted(slot.stage));
            }
            mbar_arrive_expect_bytes(full(slot.stage), (QK_BOXES + DP_BOXES) * BLOCK_M * 128 + 2 * BLOCK_M * 4);
#pragma unroll
            for (int box = 0; box < D / 64; ++box) {
                if (box < QK_BOXES)
                    tma_load_4d(sm.sq(slot.stage) + box * BLOCK_M * 128, &maps.q, full(slot.stage), 64 * box,
                                seq.q0 + m0, walk.h, map_batch);
                if (box < DP_BOXES)
                    tma_load_4d(sm.sdo(slot.stage) + box * BLOCK_M * 128, &maps.dout, full(slot.stage), 64 * box,
                                seq.q0 + m0, walk.h, map_batch);
            }
            bulk_load(sm.rows(slot.stage), a.lse2 + r, BLOCK_M * 4, full(slot.stage));
            bulk_load(sm.rows(slot.stage) + BLOCK_M * 4, a.delta + r, BLOCK_M * 4, full(slot.stage));
        }
        no_more_tiles(slot);
        return;
    }

    claim_registers<240>();
    const int wg = threadIdx.x / 128 - 1;
    auto walk = block_walk;
    if (walk.valid()) mbar_wait(kv_full, 0);
    if constexpr (VARLEN) {  // the key tile's rows past the sequence's keys
        if (walk.valid()) clear_rows_past_end<QK_BOXES, DP_BOXES, BLOCK_N>(sm.sk, sm.sv(), seq.nk - n0, 3 + wg);
    }
    // Every warp of this warpgroup is done reading a stage (the GEMMs, lse2, Delta and the
    // scratch row): only then may its leader release it.
    auto release = [&](int stage) {
        named_barrier(3 + wg, 128);
        if (threadIdx.x % 128 == 0) mbar_arrive(empty(stage));
    };
    RingSlot<2> slot;
    if constexpr (SPLIT) {
        // Warpgroup 0 keeps dV, warpgroup 1 dK, each over the columns of its boxes.
        constexpr int V_COLS = box_columns(DP_DIM), K_COLS = box_columns(QK_DIM);
        constexpr int ACC = (V_COLS > K_COLS ? V_COLS : K_COLS) / 2;
        float acc[ACC];
#pragma unroll
        for (int i = 0; i < ACC; ++i) acc[i] = 0.f;
        bool later = false;  // past the block's first query tile
        for (; walk.valid(); walk.next(), slot.advance()) {
            const MOD mod(a, b, walk.h, seq.nq, seq.nk);
            mbar_wait(full(slot.stage), slot.phase);
            dkdv_split_query_tile<T, D, MASK, MOD>(a, mask, mod, sm, wg, slot.stage, walk.m_tile() * BLOCK_M, n0,
                                                   walk.slot(), later, acc, HeadSteps<QK_DIM, DP_DIM>{});
            later = true;
            release(slot.stage);
        }
        if (wg == 0 && later) named_barrier(P_FREE, 256);  // warpgroup 1 has read the last P
        const int key_row0 = n0 + (threadIdx.x / 32) % 4 * 16;
        if (wg == 0)
            store_dv<T, V_COLS, DROPOUT, F32_GRADS>(a, b, hk, seq, key_row0, accumulator_part<V_COLS, 0>(acc));
        else
            store_dk<T, K_COLS, F32_GRADS>(a, b, hk, seq, key_row0, accumulator_part<K_COLS, 0>(acc));
    } else {
        float dk_acc[D / 2], dv_acc[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) dk_acc[i] = dv_acc[i] = 0.f;
        // The mask's key and counter words are read once, not per query tile; only the head
        // moves (GQA walks the group's query heads).
        DropoutMask drop(a, b, walk.valid() ? walk.h : 0);
        for (; walk.valid(); walk.next(), slot.advance()) {
            const MOD mod(a, b, walk.h, seq.nq, seq.nk);
            drop.at_head(a, b, walk.h);
            mbar_wait(full(slot.stage), slot.phase);
            const auto bits_source = [&] {  // where an exact tile's bits are
                if constexpr (THREAD_WORDS)
                    return ThreadWordsSource{exact_stages[slot.stage].words, bits_ready(slot.stage), slot.phase};
                else
                    return TransposedSource{};
            }();
            const int m_tile = walk.m_tile();
            int rank = 0;
            if constexpr (ORDERED_DQ)
                rank = key_tile_rank<BLOCK_M, BLOCK_N, MASK, ROTATED_DQ>(mask, m_tile, walk.h, a.m_tiles, n_tile,
                                                                         a.n_tiles);
            // D = 128 with an exact causal mask and no fused dQ: the warpgroup index is derived
            // again per tile from threadIdx, read anew (asm volatile, which the compiler cannot
            // merge with the first read), rather than kept live through the loop with the
            // warp's key offset, where NVRTC 13.0's ptxas spills it at the consumers' 240
            // registers. The same value; other variants keep their code.
            int tile_wg = wg;
            if constexpr (D == 128 && MASK::exact && MASK::right_bounded && MOD::identity && !ATOMIC_DQ) {
                u32 thread;
                asm volatile("mov.u32 %0, %%tid.x;" : "=r"(thread));
                tile_wg = (int)(thread / 128) - 1;
            }
            // Packed sequences read their lengths again for each tile (sequence_again) and build
            // the mask and score modifier from them, so that nothing of the sequence stays live
            // across the loop (`mod` above is dead code there); a dense call's are parameters.
            // The call is spelled twice on purpose: choosing the mask through a reference, or one
            // lambda around the call, changed the dense variants' code (benchmarks/NOTES.md).
            if constexpr (VARLEN) {
                const Sequence tile_seq = sequence_again(a, b);
                clear_rows_past_end<QK_BOXES, DP_BOXES, BLOCK_M>(sm.sq(slot.stage), sm.sdo(slot.stage),
                                                                 tile_seq.nq - m_tile * BLOCK_M, 3 + tile_wg);
                dkdv_query_tile<T, D, WG, BLOCK_M, MASK, MOD, DROPOUT, ATOMIC_DQ>(
                    a, MASK(a, tile_seq.nq, tile_seq.nk), MOD(a, b, walk.h, tile_seq.nq, tile_seq.nk), drop, sm,
                    tile_wg, slot.stage, m_tile * BLOCK_M, n0, walk.slot(), dk_acc, dv_acc,
                    HeadSteps<QK_DIM, DP_DIM>{}, [](int id) { named_barrier(id, CONSUMERS); },
                    dq_channel<DQ>(sm, dq_full0, slot, rank), bits_source);
            } else {
                dkdv_query_tile<T, D, WG, BLOCK_M, MASK, MOD, DROPOUT, ATOMIC_DQ>(
                    a, mask, mod, drop, sm, tile_wg, slot.stage, m_tile * BLOCK_M, n0, walk.slot(), dk_acc, dv_acc,
                    HeadSteps<QK_DIM, DP_DIM>{}, [](int id) { named_barrier(id, CONSUMERS); },
                    dq_channel<DQ>(sm, dq_full0, slot, rank),
                    bits_source);
            }
            release(slot.stage);
        }
        if constexpr (ATOMIC_DQ) {
            if (DQ::forms(wg, slot.stage))  // the warpgroup(s) whose turn the next tile would be
                dq_channel<DQ>(sm, dq_full0, slot, 0).finish(threadIdx.x % 32);
        }
        if constexpr (VARLEN)  // the sequence read again, as in the loop (and spelled twice likewise)
            store_dkdv<T, D, D, DROPOUT, F32_GRADS>(a, b, hk, sequence_again(a, b),
                                                    n0 + wg * 64 + (threadIdx.x / 32) % 4 * 16, dk_acc, dv_acc);
        else
            store_dkdv<T, D, D, DROPOUT, F32_GRADS>(a, b, hk, seq, n0 + wg * 64 + (threadIdx.x / 32) % 4 * 16,
                                                    dk_acc, dv_acc);
    }
}

// ---------------------------------------------------------------------------------------------
// The dQ kernels: one thread block per query tile of BLOCK_M = 64·WG rows of one (batch, head),
// walking its key tiles like the forward; S = Q Kᵀ and dP = dO Vᵀ are recomputed and dQ += dS K
// accumulates in registers, written once.

// What the dQ kernels hold per warpgroup: dQ's registers, and the lse2 and Delta of this thread's
// two rows.
template <int D>
struct DqRows {
    float acc[D / 2];
    float lse2[2], delta[2];
};

// Waits and releases around one key tile's GEMMs (dq_key_tile) where a producer feeds the ring
// buffers: before S (K in), before dP (V in), after dP (V free) and after dQ (K free). The
// cp.async kernel syncs its block around the whole step instead: every hook a no-op.
struct NoRingHooks {
    __device__ __forceinline__ void k_ready() const {}
    __device__ __forceinline__ void v_ready() const {}
    __device__ __forceinline__ void v_done() const {}
    __device__ __forceinline__ void k_done() const {}
};

// One key tile of one warpgroup's 64 query rows: S = Q Kᵀ and dP = dO Vᵀ (both K-major in shared
// memory, as the forward's Q·Kᵀ: desc_q / desc_do at this warpgroup's rows, desc_k / desc_v at the
// first K and V buffers, desc_k_mn at the first K buffer read MN-major, `kst` / `vst` the tile's
// buffers' offsets from those, in descriptor units of 16 bytes),
// P from S while dP runs, dS = P ∘ (dP − Delta[row]), then dQ += dS K, K read MN-major as the
// forward's P·V reads V (k16 step: 16 key rows = 2048 bytes; next box BLOCK_N·128 bytes), in
// slices of at most 128 columns (wgmma's N here) up to the last 64-column box holding a column
// below QK_DIM (the boxes past it would only add zeros). The tile is the walk's j-th
// (`key_tile`), read only once the GEMMs are issued (earlier, its registers spill the heaviest
// cp.async variant). `warp_row0`: the warp's first query row; `lane`: this thread's in its warp
// (the caller's: read again here, it spilled that variant too).
template <typename T, int D, int BLOCK_M, int BLOCK_N, int QK_DIM, int DP_DIM, bool DROPOUT, class MASK, class MOD,
          class Walk, class Hooks>
__device__ __forceinline__ void dq_key_tile(const MASK& mask, const MOD& mod, const DropoutMask& drop, u64 desc_q,
                                            u64 desc_do, u64 desc_k, u64 desc_v, u64 desc_k_mn, u32 kst, u32 vst,
                                            int m0, const Walk& key_tile, int j, int warp_row0, int lane,
                                            DqRows<D>& rows, const Hooks& hooks) {
    constexpr int NT = BLOCK_N / 8;           // 8-column blocks of S
    constexpr int KN = BLOCK_N / 16;          // k16 steps over the key tile
    constexpr int SLICE = D < 128 ? D : 128;  // dQ columns per wgmma
    constexpr int DQ_COLS = box_columns(QK_DIM), SLICES = DQ_COLS / SLICE, REST = DQ_COLS % SLICE;
    const int g = lane / 4, t = lane % 4;
    float s[BLOCK_N / 2], dp[BLOCK_N / 2];
    GradFactors<MOD, NT> grad;
    u32 df[KN][4];

    hooks.k_ready();
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < k16_steps(QK_DIM); ++kk)
        wgmma_ss<T, BLOCK_N, 0, 0>(s, desc_q + kmajor_step(kk, BLOCK_M), desc_k + kst + kmajor_step(kk, BLOCK_N),
                                   kk > 0);
    wgmma_commit();
    hooks.v_ready();
#pragma unroll
    for (int kk = 0; kk < k16_steps(DP_DIM); ++kk)
        wgmma_ss<T, BLOCK_N, 0, 0>(dp, desc_do + kmajor_step(kk, BLOCK_M), desc_v + vst + kmajor_step(kk, BLOCK_N),
                                   kk > 0);
    wgmma_commit();
    const int n0 = key_tile[j] * BLOCK_N;
    KeepWords<false, NT> keep;  // the tile's dropout mask, drawn while S and dP run
    if constexpr (DROPOUT) keep_words<false, NT>(keep, drop, warp_row0 + g, n0, lane);
    const auto tile_mask = mask.template tile<BLOCK_M, BLOCK_N>(m0, n0, key_tile.slot(j));
    AccumulatorBits<decltype(tile_mask)> bits;  // an exact mask's, likewise
    bits.load(tile_mask, warp_row0 + g, t);

    // P from S while dP runs; zero where the mask hides the key.
    wgmma_wait<1>();
    reg_fence(s);
    recompute_probs(as_blocks<NT>(s), grad, tile_mask, mod, false, warp_row0 + g, n0, t, rows.lse2);
    if (tile_mask.partial(warp_row0, 16, n0, BLOCK_N))
        mask_scores(as_blocks<NT>(s), tile_mask, bits, warp_row0 + g, n0, t, 0.f);

    // dS = P ∘ (dP − Delta[row]).
    wgmma_wait<0>();
    reg_fence(dp);
    hooks.v_done();
    if constexpr (DROPOUT) drop_grads(as_blocks<NT>(dp), keep);
    softmax_grad<NT, MOD>(as_blocks<NT>(dp), as_blocks<NT>(s), grad, [&](int, int i) { return rows.delta[i / 2]; },
                          DROPOUT ? drop.rescale : 1.f);
    pack_a<T, KN>(df, dp);

    // dQ += dS K (scaled once at the end).
    reg_fence_frag(df);
    reg_fence(rows.acc);
    wgmma_fence();
#pragma unroll
    for (int c = 0; c < SLICES; ++c) {
        float (&dq_c)[SLICE / 2] = *reinterpret_cast<float(*)[SLICE / 2]>(&rows.acc[c * SLICE / 2]);
        const u32 slice = (u32)(c * (SLICE / 64) * BLOCK_N * 128) >> 4;
#pragma unroll
        for (int kk = 0; kk < KN; ++kk)
            wgmma_rs<T, SLICE, 1>(dq_c, df[kk], desc_k_mn + kst + slice + ((u32)(kk * 2048) >> 4), 1);
    }
    if constexpr (REST > 0) {
        float (&dq_r)[REST / 2] = *reinterpret_cast<float(*)[REST / 2]>(&rows.acc[SLICES * SLICE / 2]);
        const u32 slice = (u32)(SLICES * (SLICE / 64) * BLOCK_N * 128) >> 4;
#pragma unroll
        for (int kk = 0; kk < KN; ++kk)
            wgmma_rs<T, REST, 1>(dq_r, df[kk], desc_k_mn + kst + slice + ((u32)(kk * 2048) >> 4), 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence_frag(df);
    reg_fence(rows.acc);
    hooks.k_done();
}

// dQ·scale, once, for this thread's two rows (warp_row0 + g and + 8): rows that see no key
// write zeros.
template <typename T, int D, bool F32_GRADS>
__device__ __forceinline__ void store_dq(const BwdArgs& a, int b, int h, const Sequence& seq, int warp_row0,
                                         DqRows<D>& rows) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    const float dq_factor[2] = {a.scale, a.scale};
    store_rows<T, true>(grad_rows<F32_GRADS>(a.grad_q) + b * a.gq_sb + h * a.gq_sh + seq.q0 * a.gq_sn, a.gq_sn,
                        seq.nq, a.d, as_blocks<D / 8>(rows.acc), warp_row0 + g, 0, t, dq_factor);
}

template <int D>
__device__ __forceinline__ void zero_dq(DqRows<D>& rows) {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) rows.acc[i] = 0.f;
}

// Every thread loads (cp.async); key tiles of BLOCK_N keys double-buffered.
template <typename T, int D, int WG, int BLOCK_N, class MASK, class MOD, bool DROPOUT = false,
          bool F32_GRADS = false, bool VARLEN = false, int QK_DIM = D, int DP_DIM = D>
__global__ void __launch_bounds__(WG * 128, 1)
flash_bwd_sm90_dq(const BwdArgs a) {
    wait_for_previous_kernel();
    constexpr int THREADS = WG * 128;
    constexpr int BLOCK_M = WG * 64;
    constexpr int Q_BYTES = BLOCK_M * D * 2;   // Q or dO
    constexpr int KV_BYTES = BLOCK_N * D * 2;  // one K or V stage
    static_assert(QK_DIM <= D && DP_DIM <= D, "steps within the tile");
    static_assert(D == 64 || D == 128 || (D == 256 && WG == 1), "head dim must be 64 or 128, or 256 with one warpgroup");
    static_assert(BLOCK_N == 64 || BLOCK_N == 128, "key tile must be 64 or 128 keys");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    const u32 sq = (smem_addr(smem_raw) + 1023u) & ~1023u;
    const u32 sdo = sq + Q_BYTES;
    const u32 sk = sdo + Q_BYTES;        // two stages
    const u32 sv = sk + 2 * KV_BYTES;    // two stages

    const QueryTile tile = query_tile_of_block<MASK::banded>(a.m_tiles, a.heads);
    const int b = tile.b, h = tile.h, m_tile = tile.m_tile;
    const int hk = h / a.group;
    const int m0 = m_tile * BLOCK_M;
    const Sequence seq = sequence_of<VARLEN>(a, b);
    if (VARLEN && m0 >= seq.nq) return;  // past this sequence's end (before any barrier)
    const MASK mask(a, seq.nq, seq.nk);
    const MOD mod(a, b, h, seq.nq, seq.nk);
    const DropoutMask drop(a, b, h);
    const auto key_tile = key_tiles_of<BLOCK_M, BLOCK_N>(mask, m_tile, h, a.m_tiles);
    const int n_count = key_tile.count;

    const u16* k = a.k + b * a.k_sb + hk * a.k_sh + seq.k0 * a.k_sn;
    const u16* v = a.v + b * a.v_sb + hk * a.v_sh + seq.k0 * a.v_sn;
    if (n_count > 0) {
        load_tile_sw128<BLOCK_M, D, THREADS>(sq, a.q + b * a.q_sb + h * a.q_sh + seq.q0 * a.q_sn, a.q_sn, m0, seq.nq,
                                             a.d);
        load_tile_sw128<BLOCK_M, D, THREADS>(sdo, a.dout + b * a.do_sb + h * a.do_sh + seq.q0 * a.do_sn, a.do_sn, m0,
                                             seq.nq, a.dv);
        load_tile_sw128<BLOCK_N, D, THREADS>(sk, k, a.k_sn, key_tile[0] * BLOCK_N, seq.nk, a.d);
        load_tile_sw128<BLOCK_N, D, THREADS>(sv, v, a.v_sn, key_tile[0] * BLOCK_N, seq.nk, a.dv);
    }
    cp_async_commit();

    const int wg = threadIdx.x / 128;
    const int warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;
    const int warp_row0 = m0 + wg * 64 + warp * 16;

    // lse2 and Delta of the two rows this thread holds (padded scratch; beyond it, an empty row;
    // a sequence's scratch rows are padded to a multiple of the tile).
    DqRows<D> rows;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = warp_row0 + g + half * 8;
        const i64 idx = scratch_offset<VARLEN>(a, seq, b, h) + row;
        rows.lse2[half] = VARLEN || row < a.rows_pad ? a.lse2[idx] : INFINITY;
        rows.delta[half] = VARLEN || row < a.rows_pad ? a.delta[idx] : 0.f;
    }
    zero_dq(rows);
    const u64 desc_q = sw128_desc(sq + wg * 64 * 128, 16);
    const u64 desc_do = sw128_desc(sdo + wg * 64 * 128, 16);
    const u64 desc_k = sw128_desc(sk, 16), desc_v = sw128_desc(sv, 16), desc_k_mn = sw128_desc(sk, BLOCK_N * 128);

    for (int j = 0; j < n_count; ++j) {
        const int stage = j & 1;
        cp_async_wait<0>();
        fence_proxy_async_shared();
        __syncthreads();  // K_j, V_j visible; every warpgroup is done with the other stage
        if (j + 1 < n_count) {
            const int next = key_tile[j + 1] * BLOCK_N;
            load_tile_sw128<BLOCK_N, D, THREADS>(sk + (stage ^ 1) * KV_BYTES, k, a.k_sn, next, seq.nk, a.d);
            load_tile_sw128<BLOCK_N, D, THREADS>(sv + (stage ^ 1) * KV_BYTES, v, a.v_sn, next, seq.nk, a.dv);
        }
        cp_async_commit();
        const u32 st = (u32)(stage * KV_BYTES) >> 4;
        dq_key_tile<T, D, BLOCK_M, BLOCK_N, QK_DIM, DP_DIM, DROPOUT>(
            mask, mod, drop, desc_q, desc_do, desc_k, desc_v, desc_k_mn, st, st, m0, key_tile, j, warp_row0, lane, rows,
            NoRingHooks{});
    }
    cp_async_wait<0>();
    store_dq<T, D, F32_GRADS>(a, b, h, seq, warp_row0, rows);
}

// ---------------------------------------------------------------------------------------------
// The dQ kernel of the 256-column tile, warp-specialised (no exact mask, dropout or packed
// sequences, as its dK/dV kernel; block masks whose blocks are whole 128-row tiles). The cp.async
// dQ kernel holds one warpgroup there (a 64-row Q and dO and two stages of K and V take 192 KB),
// so each SM runs one warpgroup whose softmax leaves the tensor cores idle. Here warpgroup 0 is a
// producer whose one elected thread loads, by TMA, the tile's Q and dO (128 rows: 64 per
// consumer) with its lse2 and Delta rows, then each visited key tile's K and V into rings guarded
// by mbarriers; warpgroups 1 and 2, the consumers, take 64 rows each and walk the same key
// tiles, each at its own pace, so that one's softmax runs under the other's GEMMs. Only the
// 64-column boxes that hold a real column are loaded (K and Q up to QK_DIM, V and dO up to
// DP_DIM). K is held from S to dQ's GEMM, V only for dP: K takes two ring buffers, V two where
// shared memory holds them (DqRingSmem), else one, which the producer refills once both
// consumers' dP are done.
template <int QK_BOXES, int DP_BOXES, int BLOCK_N>
struct DqRingSmem {
    static constexpr int BLOCK_M = 128;
    static constexpr u32 Q_BYTES = QK_BOXES * BLOCK_M * 128, DO_BYTES = DP_BOXES * BLOCK_M * 128;
    static constexpr u32 K_STAGE = QK_BOXES * BLOCK_N * 128, V_STAGE = DP_BOXES * BLOCK_N * 128;
    static constexpr int K_STAGES = 2;
    // lse2 and Delta rows, and 1 KB for the 1024-byte alignment: the rest must hold the rings.
    static constexpr u32 FIXED = Q_BYTES + DO_BYTES + K_STAGES * K_STAGE + 2 * BLOCK_M * 4 + 1024;
    static constexpr int V_STAGES = FIXED + 2 * V_STAGE <= 227 * 1024 ? 2 : 1;
    static constexpr u32 BYTES = FIXED + V_STAGES * V_STAGE;
    static_assert(BYTES <= 227 * 1024, "the dQ ring kernel's shared memory");
    u32 sq, sdo, sk, sv, rows;
    __device__ __forceinline__ explicit DqRingSmem(unsigned char* raw) {
        sq = (smem_addr(raw) + 1023u) & ~1023u;
        sdo = sq + Q_BYTES;
        sk = sdo + DO_BYTES;
        sv = sk + K_STAGES * K_STAGE;
        rows = sv + V_STAGES * V_STAGE;  // lse2[BLOCK_M], then Delta[BLOCK_M]
    }
};

// The consumers' hooks (dq_key_tile) over the two rings: wait for a buffer's "full" barrier,
// and once this warp is done with it arrive on its "empty" one (every consumer warp arrives).
struct DqRingHooks {
    u32 k_full, k_empty, v_full, v_empty;  // this step's barriers
    u32 k_phase, v_phase;
    __device__ __forceinline__ void k_ready() const { mbar_wait(k_full, k_phase); }
    __device__ __forceinline__ void v_ready() const { mbar_wait(v_full, v_phase); }
    __device__ __forceinline__ void v_done() const {
        if (threadIdx.x % 32 == 0) mbar_arrive(v_empty);
    }
    __device__ __forceinline__ void k_done() const {
        if (threadIdx.x % 32 == 0) mbar_arrive(k_empty);
    }
};

template <typename T, int D, int BLOCK_N, class MASK, class MOD, bool F32_GRADS = false, int QK_DIM = D,
          int DP_DIM = D>
__global__ void __launch_bounds__(3 * 128, 1)
flash_bwd_sm90_dq_ws(const __grid_constant__ BwdMaps maps, const __grid_constant__ BwdArgs a) {
    wait_for_previous_kernel();
    constexpr int QK_BOXES = box_columns(QK_DIM) / 64, DP_BOXES = box_columns(DP_DIM) / 64;
    using SM = DqRingSmem<QK_BOXES, DP_BOXES, BLOCK_N>;
    constexpr int BLOCK_M = SM::BLOCK_M, K_STAGES = SM::K_STAGES, V_STAGES = SM::V_STAGES;
    constexpr int CONSUMER_WARPS = 8;
    static_assert(D == 256 && BLOCK_N == 64, "the 256-column tile, against 64-key tiles");
    static_assert(!MASK::exact, "no exact masks on this tile");
    static_assert(QK_DIM <= D && DP_DIM <= D, "steps within the tile");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    // mbarriers: Q, dO and the rows in; each K buffer in and free; each V buffer in and free.
    __shared__ __align__(8) u64 barrier_words[1 + 2 * K_STAGES + 2 * V_STAGES];
    const u32 q_full = smem_addr(barrier_words);
    auto k_full = [&](int s) { return q_full + 8 * (1 + s); };
    auto k_empty = [&](int s) { return q_full + 8 * (1 + K_STAGES + s); };
    auto v_full = [&](int s) { return q_full + 8 * (1 + 2 * K_STAGES + s); };
    auto v_empty = [&](int s) { return q_full + 8 * (1 + 2 * K_STAGES + V_STAGES + s); };
    const SM sm(smem_raw);
    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        for (int s = 0; s < K_STAGES; ++s) {
            mbar_init(k_full(s), 1);
            mbar_init(k_empty(s), CONSUMER_WARPS);
        }
        for (int s = 0; s < V_STAGES; ++s) {
            mbar_init(v_full(s), 1);
            mbar_init(v_empty(s), CONSUMER_WARPS);
        }
        mbar_init_fence();
    }
    __syncthreads();

    // The tail's order only where the host may ask for it (_launch.tail_lanes): a band bounded on
    // the right alone, no block or exact mask.
    constexpr bool TAIL_ORDER = lanes_run_heavy_to_light<MASK>();
    const QueryTile tile = query_tile_of_block<MASK::banded>(a.m_tiles, a.heads, TAIL_ORDER ? a.tail_lanes : 0);
    const int b = tile.b, h = tile.h, m_tile = tile.m_tile;
    const int m0 = m_tile * BLOCK_M;
    const Sequence seq = sequence_of<false>(a, b);
    const MASK mask(a, seq.nq, seq.nk);
    const auto key_tile = key_tiles_of<BLOCK_M, BLOCK_N>(mask, m_tile, h, a.m_tiles);
    const int n_count = key_tile.count;

    if (threadIdx.x < 128) {
        release_registers<24>();
        if (threadIdx.x >= 32 || !elect_one_lane() || n_count == 0) return;
        const int hk = h / a.group;
        tma_prefetch_desc(&maps.k);
        tma_prefetch_desc(&maps.v);
        const i64 r = scratch_offset<false>(a, seq, b, h) + m0;
        mbar_arrive_expect_bytes(q_full, SM::Q_BYTES + SM::DO_BYTES + 2 * BLOCK_M * 4);
#pragma unroll
        for (int c = 0; c < 2; ++c) {
#pragma unroll
            for (int box = 0; box < QK_BOXES; ++box)
                tma_load_4d(sm.sq + (box * BLOCK_M + c * 64) * 128, &maps.q, q_full, 64 * box, m0 + 64 * c, h, b);
#pragma unroll
            for (int box = 0; box < DP_BOXES; ++box)
                tma_load_4d(sm.sdo + (box * BLOCK_M + c * 64) * 128, &maps.dout, q_full, 64 * box, m0 + 64 * c, h, b);
        }
        bulk_load(sm.rows, a.lse2 + r, BLOCK_M * 4, q_full);
        bulk_load(sm.rows + BLOCK_M * 4, a.delta + r, BLOCK_M * 4, q_full);
        RingSlot<K_STAGES> ks;
        RingSlot<V_STAGES> vs;
        for (int j = 0; j < n_count; ++j, ks.advance(), vs.advance()) {
            const int n0 = key_tile[j] * BLOCK_N;
            load_ring_tile<QK_BOXES, BLOCK_N>(sm.sk + ks.stage * SM::K_STAGE, &maps.k, k_full(ks.stage),
                                              k_empty(ks.stage), ks.phase, n0, hk, b);
            load_ring_tile<DP_BOXES, BLOCK_N>(sm.sv + vs.stage * SM::V_STAGE, &maps.v, v_full(vs.stage),
                                              v_empty(vs.stage), vs.phase, n0, hk, b);
        }
        return;
    }

    claim_registers<240>();
    const int wg = threadIdx.x / 128 - 1;
    const int warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;
    const int warp_row0 = m0 + wg * 64 + warp * 16;
    const MOD mod(a, b, h, seq.nq, seq.nk);
    const DropoutMask drop(a, b, h);
    DqRows<D> rows;
    zero_dq(rows);
    if (n_count > 0) {
        mbar_wait(q_full, 0);
        // (the tile's rows lie within the padded scratch: it is a whole number of 128-row tiles)
        const float* scratch = reinterpret_cast<const float*>(smem_raw + (sm.rows - smem_addr(smem_raw)));
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = warp_row0 - m0 + g + half * 8;
            rows.lse2[half] = scratch[row];
            rows.delta[half] = scratch[BLOCK_M + row];
        }
    }
    const u64 desc_q = sw128_desc(sm.sq + wg * 64 * 128, 16);
    const u64 desc_do = sw128_desc(sm.sdo + wg * 64 * 128, 16);
    const u64 desc_k = sw128_desc(sm.sk, 16), desc_v = sw128_desc(sm.sv, 16);
    const u64 desc_k_mn = sw128_desc(sm.sk, BLOCK_N * 128);
    RingSlot<K_STAGES> ks;
    RingSlot<V_STAGES> vs;
    for (int j = 0; j < n_count; ++j, ks.advance(), vs.advance()) {
        const DqRingHooks hooks{k_full(ks.stage), k_empty(ks.stage), v_full(vs.stage), v_empty(vs.stage), ks.phase,
                                vs.phase};
        const u32 kst = (ks.stage * SM::K_STAGE) >> 4, vst = (vs.stage * SM::V_STAGE) >> 4;
        dq_key_tile<T, D, BLOCK_M, BLOCK_N, QK_DIM, DP_DIM, false>(
            mask, mod, drop, desc_q, desc_do, desc_k, desc_v, desc_k_mn, kst, vst, m0, key_tile, j, warp_row0,
            lane, rows, hooks);
    }
    store_dq<T, D, F32_GRADS>(a, b, h, seq, warp_row0, rows);
}
