// FlashAttention forward for Hopper (sm_90a), warp-specialised: one producer warpgroup moves Q, K
// and V with TMA, one to three consumer warpgroups run the wgmma GEMMs and the online softmax.
//
// Thread block: 1 + CONSUMERS warpgroups, BLOCK_M = 64·CONSUMERS query rows of one (batch, head).
//   warpgroup 0, the producer: gives its registers away (setmaxnreg) and one elected thread
//     issues TMA copies: each query tile's Q, then each visited key tile's K and V into rings of
//     STAGES buffers. A "full" mbarrier per buffer counts the bytes in; an "empty" one collects
//     one arrival per consumer before the buffer is refilled.
//   warpgroups 1.., the consumers: 64 query rows each. Per key tile j: S_j = Q·K_jᵀ and
//     O += P_{j-1}·V_{j-1} are issued back to back, then the softmax of S_j (ptxas puts the wait
//     for the second before its exponentials: the other consumers' GEMMs fill the tensor cores
//     meanwhile), then O is rescaled and P_j packed into registers (wgmma's register A operand),
//     never touching shared memory. With PINGPONG the consumers take turns to issue their GEMMs
//     (named barriers), so that one's softmax runs under another's GEMMs.
// With an exact mask the producer also leaves each visited tile's index, bitmask slot and bits
// beside its K buffer (ExactStage), so that the consumers' per-tile mask work reads shared memory.
// Head dims are padded to DP / DVP, multiples of 64 (one 128-byte swizzled box per 64 columns);
// TMA fills columns past D and rows past N with zeros, so padding never reaches a result.
//
// A thread block may own several query tiles: launched with one block per SM it is persistent,
// takes tiles from a counter as it finishes them (TileTickets), and its producer streams the next
// tile's Q, K and V while the consumers finish the previous one. The producer posts each tile's
// index to the consumers through two shared slots ("mailbox"). With Q_BUFFERS = 2 (where shared
// memory holds a second Q buffer: the host decides), tiles take the two Q buffers in turn, so
// that the next tile's Q loads while the consumers still run the previous tile. The epilogue
// stages O in shared memory for 16-byte stores (TmaForwardLayout says where): with two Q buffers
// in the tile's own, each consumer over its own rows, so that none waits for another and the
// last V buffer goes straight back to the producer; with one, in the V buffer of the tile's last
// key tile where one holds the whole O tile (O_IN_V), or in that tile's V and K buffers, one
// consumer's rows in each (O_IN_KV, two consumers against shorter key tiles), so that the next
// tile's Q lands under the last softmax, P·V and stores, else in the Q buffer, released after the
// stores. Where the staged O may outlive its tile (STAGING_OUTLIVES_TILE) and no band bounds the
// rows, a consumer carries each tile's last P·V over to its next tile, issued right after that
// tile's first Q·Kᵀ (carries_last_pv), so that at the seam neither GEMM waits alone; elsewhere
// (under a band, with ping-pong, with O_IN_KV) a tile's staged O is copied out under the next
// tile's first Q·Kᵀ (stage_owed).
#include "args.cuh"
#include "arch/sm90_tma.cuh"

#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "flash_fwd_sm90_tma.cu needs the sm_90a target (-arch=sm_90a)"
#endif

// The three tensors' TMA descriptors: 4-D views (D, N, heads, batch), boxes of 64 columns.
struct QkvMaps {
    TmaDesc q, k, v;
};

// One consumer leaves room for a second block on the SM: the two blocks' tiles run out of phase,
// one's first softmax and epilogue under the other's GEMMs (short rows, where those dominate).
__host__ __device__ constexpr int tma_forward_blocks_per_sm(int consumers) { return consumers == 1 ? 2 : 1; }

// Shared-memory plan of one thread block (all offsets from a 1024-byte aligned base).
template <int DP, int DVP, int BLOCK_N, int STAGES, int Q_BUFFERS_, int CONSUMERS_>
struct TmaForwardLayout {
    static constexpr int CONSUMERS = CONSUMERS_;
    static constexpr int Q_BUFFERS = Q_BUFFERS_;
    static constexpr int BLOCK_M = 64 * CONSUMERS;
    // Where O is staged for its stores. With two Q buffers, in the tile's own, each consumer over
    // its own rows of Q: no consumer waits for another's last P·V, and the last V buffer goes
    // back to the producer at once. With one, in the V buffer of the tile's last key tile where
    // one holds O (BLOCK_N ≥ BLOCK_M rows of DVP columns), so that the next tile's Q can load
    // under the stores; else in the Q buffer. A Q buffer that stages O holds as many 64-column
    // boxes as the wider of Q and O.
    static constexpr bool O_IN_V = Q_BUFFERS == 1 && BLOCK_N >= BLOCK_M;
    // With one Q buffer, two consumers and key tiles shorter than the query tile (the 80-key
    // tiles of Dv > 128), the last key tile's two buffers stage O instead: consumer 0's 64 rows
    // in its V buffer, consumer 1's in its K buffer (each holds 64 rows of DVP columns when
    // BLOCK_N ≥ 64 and DP ≥ DVP). Either way the Q buffer goes back after the tile's last Q·Kᵀ
    // (O_IN_RING), so that a persistent block's next Q loads under the rest of the tile.
    static constexpr bool O_IN_KV = Q_BUFFERS == 1 && !O_IN_V && CONSUMERS == 2 && BLOCK_N >= 64 && DP >= DVP;
    static constexpr bool O_IN_RING = O_IN_V || O_IN_KV;
    // Rows of the swizzled staging tile: the block's, or with O_IN_KV one consumer's.
    static constexpr int O_STAGE_ROWS = O_IN_KV ? 64 : BLOCK_M;
    // Whether the staged O may stay past the start of the block's next tile: the next tile's Q
    // does not need its buffer (then its copy out can run under that tile's first GEMM).
    static constexpr bool STAGING_OUTLIVES_TILE = O_IN_RING || Q_BUFFERS == 2;
    static constexpr u32 Q_LOAD_BYTES = DP / 64 * BLOCK_M * 128;
    static constexpr u32 Q_BYTES = (O_IN_RING || DP >= DVP ? DP : DVP) / 64 * BLOCK_M * 128;
    static constexpr u32 K_STAGE = DP / 64 * BLOCK_N * 128;
    static constexpr u32 V_STAGE = DVP / 64 * BLOCK_N * 128;
    static constexpr u32 K_RING = Q_BUFFERS * Q_BYTES;
    static constexpr u32 V_RING = K_RING + STAGES * K_STAGE;
    // Registers per thread after the hand-over, within the SM's 64K: 128·24 + 256·240 with two
    // consumers, 128·24 + 384·160 with three; with one, two blocks share the SM, each within
    // 32K: 128·24 + 128·232.
    static constexpr int PRODUCER_REGS = 24;
    static constexpr int CONSUMER_REGS = CONSUMERS == 1 ? 232 : CONSUMERS == 2 ? 240 : 160;
    __device__ static u32 q_buffer(u32 base, int stage) { return base + stage * Q_BYTES; }
    // The Q buffers are filled in turn: after `fills` fills, the next takes buffer q_stage(fills),
    // whose barriers are in phase q_parity(fills).
    __device__ static int q_stage(u32 fills) { return fills % Q_BUFFERS; }
    __device__ static u32 q_parity(u32 fills) { return fills / Q_BUFFERS & 1; }
};

// mbarriers: full/empty for each of the (at most two) Q buffers, for each K and V buffer and for
// each mailbox slot (every consumer thread reads the slot, so every one arrives on its "empty"
// barrier).
template <int STAGES>
struct TmaForwardBarriers {
    u32 base;
    __device__ __forceinline__ u32 q(int s) const { return base + 8 * s; }
    __device__ __forceinline__ u32 q_empty(int s) const { return base + 8 * (2 + s); }
    __device__ __forceinline__ u32 k_full(int s) const { return base + 8 * (4 + s); }
    __device__ __forceinline__ u32 k_empty(int s) const { return base + 8 * (4 + STAGES + s); }
    __device__ __forceinline__ u32 v_full(int s) const { return base + 8 * (4 + 2 * STAGES + s); }
    __device__ __forceinline__ u32 v_empty(int s) const { return base + 8 * (4 + 3 * STAGES + s); }
    __device__ __forceinline__ u32 tile_full(int s) const { return base + 8 * (4 + 4 * STAGES + s); }
    __device__ __forceinline__ u32 tile_empty(int s) const { return base + 8 * (6 + 4 * STAGES + s); }
    static constexpr int COUNT = 8 + 4 * STAGES;

    __device__ __forceinline__ void init(int consumers) const {
        for (int s = 0; s < 2; ++s) {
            mbar_init(q(s), 1);
            mbar_init(q_empty(s), consumers);
            mbar_init(tile_full(s), 1);
            mbar_init(tile_empty(s), 128 * consumers);
        }
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(k_full(s), 1);
            mbar_init(v_full(s), 1);
            mbar_init(k_empty(s), consumers);
            mbar_init(v_empty(s), consumers);
        }
        mbar_init_fence();
    }
};

// Ping-pong between consumer warpgroups: consumer c issues its GEMMs only in its turn (named
// barrier FIRST_ID + c, 256 threads: its own 128 syncing, the previous consumer's 128 arriving),
// then hands the turn on. Without PINGPONG every call is a no-op.
template <bool PINGPONG, int CONSUMERS>
struct GemmTurns {
    static constexpr int FIRST_ID = 8;  // ids below are the epilogue's (1 + warpgroup)
    int me, next;
    __device__ __forceinline__ explicit GemmTurns(int c) : me(FIRST_ID + c), next(FIRST_ID + (c + 1) % CONSUMERS) {}
    // Consumer 0 goes first: the last one hands it the first turn.
    __device__ __forceinline__ void open(int c) const {
        if (PINGPONG && c == CONSUMERS - 1) named_barrier_arrive(FIRST_ID, 256);
    }
    __device__ __forceinline__ void begin() const {
        if (PINGPONG) named_barrier(me, 256);
    }
    __device__ __forceinline__ void end() const {
        if (PINGPONG) named_barrier_arrive(next, 256);
    }
    // The last consumer's final hand-over is still pending on consumer 0's barrier: consume it,
    // so that no arrival outlives the loop.
    __device__ __forceinline__ void close(int c) const {
        if (PINGPONG && c == 0) named_barrier(FIRST_ID, 256);
    }
};

// Exact masks: what the producer leaves beside each K ring buffer for the consumers, so that they
// read a visited tile's index, bitmask slot and bits from shared memory, with no global load or
// address arithmetic of their own (mask.cuh, AccumulatorBits::load_shared). The bits arrive by a
// bulk copy counted on the buffer's "full" barrier; a full tile (slot −1) has none.
template <bool EXACT, int BLOCK_M, int BLOCK_N>
struct ExactStage {
    static constexpr int WORDS = RowBits<BLOCK_N>::WORDS;
    static constexpr u32 BITS_BYTES = BLOCK_M * WORDS * 4;
    int n_tile, slot, pad[2];
    u32 bits[BLOCK_M * WORDS];
};
template <int BLOCK_M, int BLOCK_N>
struct ExactStage<false, BLOCK_M, BLOCK_N> {  // other masks leave nothing
    int n_tile, slot;
};

// What a K load carries beside the tile (load_ring_tile, arch/sm90_tma.cuh): nothing
// (NothingBeside), or an exact mask's record.
template <int BLOCK_M, int BLOCK_N>
struct ExactBeside {
    using Stage = ExactStage<true, BLOCK_M, BLOCK_N>;
    Stage* stage;
    int n_tile, slot;
    const u32* tile_bits;
    // Once the buffer is free: the tile's index and slot, and the bytes its bits add.
    __device__ __forceinline__ u32 post() const {
        stage->n_tile = n_tile;
        stage->slot = slot;
        return slot >= 0 ? Stage::BITS_BYTES : 0;
    }
    __device__ __forceinline__ void load(u32 full) const {
        if (slot >= 0) bulk_load(smem_addr(stage->bits), tile_bitmask_row<BLOCK_M, BLOCK_N>(tile_bits, slot, 0), Stage::BITS_BYTES, full);
    }
};

// One query tile of the persistent walk: which (batch, head, rows), the sequence it belongs to
// (VARLEN: packed sequences, schedule.cuh; else the whole call), its mask and score modifier
// (built from the sequence's lengths), and the key tiles it visits. A varlen tile past its
// sequence's end is skipped by producer and consumers alike. Tile `index` of the grid's
// `tile_count`, in its order (schedule.cuh: query_tile_at and lane_tile_at; for packed sequences,
// whose grid holds each sequence's own tiles, packed_tile_at, or on a persistent grid
// longest_first_tile_at): how many of the last
// lanes go tile by tile (_launch.tail_lanes) is read only where the host may ask for it
// (TAIL_ORDER): a band bounded on the right alone (causal), no block or exact mask, no packed
// sequences and no dropout (not measured with it).
template <int BLOCK_M, int BLOCK_N, class MASK, bool VARLEN, bool DROPOUT>
struct TmaTileWork {
    using Mask = MASK;
    static constexpr bool PACKED = VARLEN;
    static constexpr bool TAIL_ORDER = lanes_run_heavy_to_light<MASK>() && !VARLEN && !DROPOUT;
    int b, h, m0;
    Sequence seq;
    KeyTiles<MASK::sparse, MASK::exact> key_tile;
    __device__ __forceinline__ TmaTileWork(const FwdArgs& a, int index, int tile_count) {
        if constexpr (VARLEN) {
            const PackedTile tile = packed_tile_of<BLOCK_M, MASK::banded>(index, a.heads, a.cu_q, a.batch);
            b = tile.b;
            h = tile.lane;
            m0 = tile.tile * BLOCK_M;
        } else {
            const QueryTile tile = query_tile_at<MASK::banded>(index, a.m_tiles, a.heads, tile_count / a.m_tiles,
                                                               TAIL_ORDER ? a.tail_lanes : 0);
            b = tile.b;
            h = tile.h;
            m0 = tile.m_tile * BLOCK_M;
        }
        seq = sequence_of<VARLEN>(a, b);
    }
    __device__ __forceinline__ bool past_end() const { return VARLEN && m0 >= seq.nq; }
    // The kernel's mask, or the sequence's.
    __device__ __forceinline__ MASK mask_of(const MASK& kernel_mask, const FwdArgs& a) const {
        if constexpr (VARLEN) return MASK(a, seq.nq, seq.nk);
        return kernel_mask;
    }
    template <class MOD>
    __device__ __forceinline__ MOD mod_of(const FwdArgs& a) const {
        if constexpr (VARLEN) return MOD(a, b, h, seq.nq, seq.nk);
        return MOD(a, b, h);
    }
    __device__ __forceinline__ void walk(const MASK& mask, const FwdArgs& a) {
        key_tile = key_tiles_of<BLOCK_M, BLOCK_N>(mask, m0 / BLOCK_M, h, a.m_tiles);
    }
    // TMA coordinates: the packed rows of a varlen call are one batch of `total` rows.
    __device__ __forceinline__ int q_row(int row) const { return seq.q0 + row; }
    __device__ __forceinline__ int k_row(int key) const { return seq.k0 + key; }
    __device__ __forceinline__ int batch() const { return VARLEN ? 0 : b; }
    // Where the tile's (batch, head) lse values start.
    __device__ __forceinline__ i64 lse_start(const FwdArgs& a) const { return lse_offset<VARLEN>(a, seq, b, h); }
};

// The query tiles' indices, posted by the producer's thread to the consumers through two shared
// slots filled in turn; an index past the last tile tells them to stop. `n` counts the indices
// posted (or taken) so far: slot n % 2, its barriers' phase parity (n / 2) % 2.
struct TileMailbox {
    volatile int* slots;  // two ints of shared memory
    template <int STAGES>
    __device__ __forceinline__ void post(const TmaForwardBarriers<STAGES>& bar, u32 n, int index) const {
        mbar_wait(bar.tile_empty(n % 2), (n / 2 % 2) ^ 1);
        slots[n % 2] = index;
        mbar_arrive(bar.tile_full(n % 2));
    }
    template <int STAGES>
    __device__ __forceinline__ int take(const TmaForwardBarriers<STAGES>& bar, u32 n) const {
        mbar_wait(bar.tile_full(n % 2), n / 2 % 2);
        const int index = slots[n % 2];
        mbar_arrive(bar.tile_empty(n % 2));
        return index;
    }
};

// The producer's one thread, for one query tile that visits any key tile: K_j and V_j for every
// visited key tile, each into the next ring buffer once the consumers have released it, and Q
// once they have released the Q buffer. The thread waits for each buffer in the order it issues
// them, so after a block's first tile the loads go in the order their buffers free up while the
// consumers finish the previous tile. The ring positions run on from one query tile to the next.
template <class L, int BLOCK_N, int STAGES, class Work>
__device__ __forceinline__ void produce_tile(const QkvMaps& maps, const TmaForwardBarriers<STAGES>& bar, u32 base,
                                             ExactStage<Work::Mask::exact, L::BLOCK_M, BLOCK_N>* exact,
                                             const Work& work, const FwdArgs& a, RingSlot<STAGES>& slot,
                                             u32& q_fills) {
    constexpr int K_BOXES = L::K_STAGE / (BLOCK_N * 128), V_BOXES = L::V_STAGE / (BLOCK_N * 128);
    const int n_count = work.key_tile.count, hk = work.h / a.group;
    auto key_row = [&](int n_tile) { return work.k_row(n_tile * BLOCK_N); };
    auto load_k = [&](int j) {
        const int n_tile = work.key_tile[j];
        const auto beside = [&] {
            if constexpr (Work::Mask::exact)
                return ExactBeside<L::BLOCK_M, BLOCK_N>{&exact[slot.stage], n_tile, work.key_tile.slot(j),
                                                        a.tile_bits};
            else
                return NothingBeside{};
        }();
        load_ring_tile<K_BOXES, BLOCK_N>(base + L::K_RING + slot.stage * L::K_STAGE, &maps.k, bar.k_full(slot.stage),
                                         bar.k_empty(slot.stage), slot.phase, key_row(n_tile), hk, work.batch(),
                                         beside);
    };
    auto load_v = [&](int j) {  // the second of a key tile's two loads: the ring moves on
        load_ring_tile<V_BOXES, BLOCK_N>(base + L::V_RING + slot.stage * L::V_STAGE, &maps.v, bar.v_full(slot.stage),
                                         bar.v_empty(slot.stage), slot.phase, key_row(work.key_tile[j]), hk,
                                         work.batch());
        slot.advance();
    };
    // Q goes first where its buffer is free: a block's first, or with two Q buffers, the one the
    // tile before the previous released. With one, the previous tile still holds it. Then, with
    // O_IN_RING, only K_0 goes ahead of Q: its buffer is free once the previous tile's second-last
    // Q·Kᵀ is done, the Q buffer once its last one is, and V_0's only once that tile's softmax has
    // run (with O_IN_V the buffer after it stages the tile's O until its stores), so Q loads
    // under the previous tile's last softmax. Otherwise the Q buffer stages O and frees up last.
    const bool q_waits = L::Q_BUFFERS == 1 && q_fills > 0;
    const int kv_ahead = q_waits && !L::O_IN_RING ? min(n_count, STAGES) : 0;
    for (int j = 0; j < kv_ahead; ++j) {
        load_k(j);
        load_v(j);
    }
    const bool k0_ahead = q_waits && L::O_IN_RING;
    if (k0_ahead) load_k(0);
    const int qb = L::q_stage(q_fills);
    mbar_wait(bar.q_empty(qb), L::q_parity(q_fills) ^ 1);
    ++q_fills;
    mbar_arrive_expect_bytes(bar.q(qb), L::Q_LOAD_BYTES);
#pragma unroll
    for (int c = 0; c < L::CONSUMERS; ++c)
#pragma unroll
        for (int box = 0; box < K_BOXES; ++box)
            tma_load_4d(L::q_buffer(base, qb) + (box * L::BLOCK_M + c * 64) * 128, &maps.q, bar.q(qb), 64 * box,
                        work.q_row(work.m0 + 64 * c), work.h, work.batch());
    if (k0_ahead) load_v(0);
    for (int j = kv_ahead + k0_ahead; j < n_count; ++j) {
        load_k(j);
        load_v(j);
    }
}

// The producer's one thread: draws the block's query tiles, posts each to the consumers and loads
// what it needs (a tile past its sequence's end or that visits no key tile needs nothing). The
// next tile is drawn before this one's loads, so that the draw's latency runs under them.
template <class L, int BLOCK_N, int STAGES, bool VARLEN, bool DROPOUT, class MASK>
__device__ __forceinline__ void produce(const QkvMaps& maps, const TmaForwardBarriers<STAGES>& bar, u32 base,
                                        ExactStage<MASK::exact, L::BLOCK_M, BLOCK_N>* exact,
                                        const TileMailbox& mailbox, const TileTickets& tickets, const MASK& mask,
                                        const FwdArgs& a) {
    tma_prefetch_desc(&maps.q);
    tma_prefetch_desc(&maps.k);
    tma_prefetch_desc(&maps.v);
    RingSlot<STAGES> slot;
    u32 q_fills = 0;
    for (int index = tickets.first(), n = 0;; ++n) {
        mailbox.post(bar, n, index);
        if (index >= tickets.tile_count) break;
        const int next = tickets.next(index);
        TmaTileWork<L::BLOCK_M, BLOCK_N, MASK, VARLEN, DROPOUT> work(a, index, tickets.tile_count);
        if (!work.past_end()) {
            work.walk(work.mask_of(mask, a), a);
            if (work.key_tile.count > 0) produce_tile<L, BLOCK_N, STAGES>(maps, bar, base, exact, work, a, slot, q_fills);
        }
        index = next;
    }
    tickets.finish();
}

// O(64 × DVP) += P(64 × BLOCK_N, registers) · V(BLOCK_N × DVP, shared, row-major): in slices of
// at most 128 columns (wgmma's N), slice c starting 2c boxes (2c·BLOCK_N·128 bytes) into V.
template <typename T, int DVP, int BLOCK_N>
__device__ __forceinline__ void issue_pv(float (&o)[DVP / 2], const u32 (&p)[BLOCK_N / 16][4], u32 v_stage) {
    constexpr int SLICE = DVP % 128 == 0 ? 128 : 64;
#pragma unroll
    for (int c = 0; c < DVP / SLICE; ++c) {
        float (&oc)[SLICE / 2] = *reinterpret_cast<float(*)[SLICE / 2]>(&o[c * SLICE / 2]);
        const u64 desc = sw128_desc(v_stage + c * (SLICE / 64) * BLOCK_N * 128, BLOCK_N * 128);
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) wgmma_rs<T, SLICE, 1>(oc, p[kk], desc + ((u32)(kk * 2048) >> 4), 1);
    }
    wgmma_commit();
}

// S(64 × BLOCK_N) = Q(64 × D) · Kᵀ, both K-major in shared memory. The k16 steps stop at the
// last that holds a column below D: past it the padded boxes hold only TMA's zeros, which add
// nothing (at D = 96, two of eight steps).
template <typename T, int D, int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ void issue_qk(float (&s)[BLOCK_N / 2], u64 desc_q, u32 k_stage) {
    const u64 desc_k = sw128_desc(k_stage, 16);
#pragma unroll
    for (int kk = 0; kk < k16_steps(D); ++kk)
        wgmma_ss<T, BLOCK_N, 0, 0>(s, desc_q + kmajor_step(kk, BLOCK_M), desc_k + kmajor_step(kk, BLOCK_N), kk > 0);
    wgmma_commit();
}

// What a consumer warpgroup still owes a query tile once its loop over the key tiles is done:
// the last P·V (P in its registers, V in ring buffer `v_stage`), then O / l and lse stored.
struct TileOwed {
    u16* out;     // the tile's (batch, head) rows of O
    float* lse;   // ... and of lse
    int nq, row0, v_stage, q_buffer;
    float row_max[2], row_sum[2], scale;
    int v_keys;   // packed sequences: the keys of the sequence in the last V tile (clear_values_past_end)
};

// Packed sequences: a sequence's last key tile ends past its keys (TMA reads whole boxes of the
// packed rows), and those rows of its V buffer hold the next sequence's first values, where a
// dense call's hold TMA's zeros. Their P is 0, but 0 · inf is NaN: an infinite or NaN value
// there would reach this sequence's O. So before the tile's P·V (its query tile's last, the one a
// warpgroup owes) each consumer zeros all those rows itself and orders its zeros before its own
// P·V with a barrier over its warpgroup (its own id, c + 2, as the stores'). Another consumer may
// write the same zeros while this one's P·V reads them: that changes no value, since between the
// buffer's load and its release (every consumer's, after its P·V) nothing but zeros is written to
// those rows. A share each would need a barrier over all consumers, which holds them in step
// (with ping-pong it undoes their offset): 1-3% slower than this on short documents (H100,
// benchmarks/NOTES.md). `keys` ≥ 1: a visited tile holds a key of the sequence.
template <class L, int BLOCK_N, bool VARLEN>
__device__ __forceinline__ void clear_values_past_end(u32 v_buffer, int keys) {
    if constexpr (VARLEN) {
        if (keys < BLOCK_N) {
            zero_ring_rows<L::V_STAGE / (BLOCK_N * 128), BLOCK_N>(v_buffer, keys, threadIdx.x % 128, 128);
            named_barrier(threadIdx.x / 128 + 1, 128);
        }
    }
}

// O / l and lse of the rows a warpgroup owes (its last P·V done): O goes through the staging
// buffer (with O_IN_V the V buffer of the tile's last key tile, with O_IN_KV that tile's V
// buffer for consumer 0 and its K buffer for consumer 1, in both cases once every consumer's
// last P·V has read them; else the warpgroup's own rows of the tile's Q buffer), which is then
// released.
// Rows that saw no key give 0 and −inf. In two halves, as store_rows_sw128: stage_tile writes
// lse and the staging buffer (after it O's registers are free) and returns where this
// warpgroup's rows are; flush_tile copies them out and releases the buffer.
template <typename T, class L, int DVP, bool DROPOUT>
__device__ __forceinline__ u32 stage_tile(const FwdArgs& a, const TileOwed& owed, const float (&o)[DVP / 2],
                                          u32 base) {
    const int c = threadIdx.x / 128 - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    float inv[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = warp * 16 + g + half * 8;
        const RowResult res = finish_row(owed.row_max[half], owed.row_sum[half], owed.scale);
        inv[half] = DROPOUT ? res.inv * a.drop_rescale : res.inv;  // · 1 / (1 − p) with dropout
        if (t == 0 && owed.row0 + r < owed.nq) store_lse(a, owed.lse, owed.row0 + r, res.lse);
    }
    u32 staging = L::q_buffer(base, owed.q_buffer) + c * 64 * 128;
    if constexpr (L::O_IN_RING) named_barrier(1, 128 * L::CONSUMERS);
    if constexpr (L::O_IN_V) staging = base + L::V_RING + owed.v_stage * L::V_STAGE + c * 64 * 128;
    if constexpr (L::O_IN_KV)
        staging = c == 0 ? base + L::V_RING + owed.v_stage * L::V_STAGE : base + L::K_RING + owed.v_stage * L::K_STAGE;
    stage_rows_sw128<T, DVP, L::O_STAGE_ROWS>(o, inv, staging, warp, g, t);
    return staging;
}

template <class L, int DVP, int STAGES>
__device__ __forceinline__ void flush_tile(const FwdArgs& a, const TileOwed& owed, u32 staging,
                                           const TmaForwardBarriers<STAGES>& bar) {
    const int c = threadIdx.x / 128 - 1;
    flush_rows_sw128<DVP, L::O_STAGE_ROWS>(owed.out, a.o_sn, owed.nq, staging, owed.row0, c + 1, a.dv);
    fence_proxy_async_shared();  // these reads of the buffer come before the next TMA write to it
    named_barrier(c + 2, 128);   // (the store's own barrier id) every thread has read its rows
    if (threadIdx.x % 128 == 0) {
        // With O_IN_KV each consumer's arrival on both buffers stands for its own rows: the two
        // buffers go back once both consumers' rows are out.
        if constexpr (L::O_IN_KV) mbar_arrive(bar.k_empty(owed.v_stage));
        mbar_arrive(L::O_IN_RING ? bar.v_empty(owed.v_stage) : bar.q_empty(owed.q_buffer));
    }
}

// Whether a warpgroup carries a tile's last P·V over to its next tile, issued with that tile's
// first Q·Kᵀ: then the tensor cores run it under the next tile's first softmax, and that
// Q·Kᵀ under nothing but it, instead of each waiting alone at the tiles' seam. It needs the
// next tile's Q loaded before the stores (STAGING_OUTLIVES_TILE) and GEMMs issued
// without turns (ping-pong counts them per tile). Not under a band, where it gained nothing on an
// H200, timed twice (−3% to +1.5% at 1K-4K keys; benchmarks/NOTES.md, "the seam between two
// tiles", "O staged in its own Q buffer"). Not with O_IN_KV either: the next tile's second K
// load waits for the stores out of the last K buffer, which carrying would put behind the next
// tile's first softmax.
template <class L, bool PINGPONG, class MASK>
__device__ __forceinline__ constexpr bool carries_last_pv() {
    return L::STAGING_OUTLIVES_TILE && !L::O_IN_KV && !PINGPONG && !MASK::banded;
}

// One consumer warpgroup's registers and ring positions, carried from tile to tile: S, O and P
// (wgmma's register A operand), where the K and V rings stand, the Q buffers' fills so far, and
// what it owes the previous tile (`owes`: carries_last_pv; `staged`: its rows, staged at
// `staging`, still to be copied out, see flush_staged).
template <int NT, int OT, int KPV, int STAGES>
struct ConsumerState {
    float o[OT * 4], s[NT * 4];
    u32 pf[KPV][4];
    RingSlot<STAGES> ks, vs;
    u32 q_fills = 0;
    bool owes = false, staged = false;
    u32 staging;
    TileOwed owed;
};

// The rows of st.owed (their last P·V done) into the staging buffer, and copied out at once, or
// with `defer` where the staged O may outlive its tile (STAGING_OUTLIVES_TILE), left there
// (st.staged) until flush_staged: a tile settled alone (settle_alone) then goes out once the next
// tile's first Q·Kᵀ is issued, under it, instead of with the tensor cores idle at the seam (+3-8%
// under causal at 1K-4K keys on an H200; benchmarks/NOTES.md, "the stores under the next tile's
// first GEMM"). With O in the one Q buffer, which the next tile's Q needs, the copy never waits.
template <typename T, class L, int DVP, int STAGES, bool DROPOUT, class State>
__device__ __forceinline__ void stage_owed(const FwdArgs& a, State& st, const TmaForwardBarriers<STAGES>& bar,
                                           u32 base, bool defer) {
    const u32 staging = stage_tile<T, L, DVP, DROPOUT>(a, st.owed, st.o, base);
    st.owes = false;
    if (L::STAGING_OUTLIVES_TILE && defer) {
        st.staging = staging;
        st.staged = true;
    } else {
        flush_tile<L, DVP>(a, st.owed, staging, bar);
    }
}

template <class L, int DVP, int STAGES, class State>
__device__ __forceinline__ void flush_staged(const FwdArgs& a, State& st, const TmaForwardBarriers<STAGES>& bar) {
    if (L::STAGING_OUTLIVES_TILE && st.staged) {
        flush_tile<L, DVP>(a, st.owed, st.staging, bar);
        st.staged = false;
    }
}

// The V buffer of an owed P·V back to the producer once that GEMM is done; where O is staged in
// it (O_IN_RING) it goes back only after the stores (flush_tile).
template <class L, int STAGES, class State>
__device__ __forceinline__ void release_owed_v(State& st, const TmaForwardBarriers<STAGES>& bar) {
    if (!L::O_IN_RING && threadIdx.x % 128 == 0) mbar_arrive(bar.v_empty(st.vs.stage));
    st.vs.advance();
}

// The last P·V a warpgroup owes, issued alone (no next tile to go with: the block's last, or one
// that visits no key tile; or every tile's without carries_last_pv), then its rows staged, the
// copy deferred (stage_owed).
template <typename T, class L, int DVP, int BLOCK_N, int STAGES, bool PINGPONG, bool DROPOUT, bool VARLEN,
          class State>
__device__ __forceinline__ void settle_alone(const FwdArgs& a, State& st, const TmaForwardBarriers<STAGES>& bar,
                                             u32 base, const GemmTurns<PINGPONG, L::CONSUMERS>& turns, int c) {
    mbar_wait(bar.v_full(st.vs.stage), st.vs.phase);
    clear_values_past_end<L, BLOCK_N, VARLEN>(base + L::V_RING + st.vs.stage * L::V_STAGE, st.owed.v_keys);
    reg_fence(st.o);
    reg_fence_frag(st.pf);
    turns.begin();
    wgmma_fence();
    issue_pv<T, DVP, BLOCK_N>(st.o, st.pf, base + L::V_RING + st.vs.stage * L::V_STAGE);
    turns.end();
    wgmma_wait<0>();
    reg_fence(st.o);
    release_owed_v<L>(st, bar);
    turns.close(c);
    stage_owed<T, L, DVP, STAGES, DROPOUT>(a, st, bar, base, true);
}

// One consumer warpgroup's share of one query tile: 64 rows against every visited key tile. The
// tile's last P·V and its stores are owed (`st.owed`) when the loop ends: paid at once (the
// stores' copy out deferred to the next tile's first Q·Kᵀ, stage_owed), or with carries_last_pv
// by the warpgroup's next tile, or after the block's last (settle_alone). With
// O_IN_RING the Q buffer is released once the tile's last Q·Kᵀ is done (`release_q`), for the
// producer to load the next tile's Q under the rest.
template <typename T, class L, int D, int DVP, int BLOCK_N, int STAGES, bool PINGPONG, class MASK, class MOD,
          bool DROPOUT, class Work, class State>
__device__ __forceinline__ void consume_tile(const FwdArgs& a, const MASK& mask, const Work& work,
                                             const TmaForwardBarriers<STAGES>& bar, u32 base,
                                             const ExactStage<MASK::exact, L::BLOCK_M, BLOCK_N>* exact, State& st) {
    constexpr int BLOCK_M = L::BLOCK_M;
    constexpr int NT = BLOCK_N / 8, OT = DVP / 8, KPV = BLOCK_N / 16;
    constexpr bool CARRY = carries_last_pv<L, PINGPONG, MASK>();
    const int c = threadIdx.x / 128 - 1;      // consumer index: rows m0 + 64c ..
    const int warp = (threadIdx.x / 32) % 4;  // rows 16·warp.. of those
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int warp_row0 = work.m0 + c * 64 + warp * 16;
    const bool leader = threadIdx.x % 128 == 0;  // arrives on the "empty" barriers for the warpgroup
    const int n_count = work.key_tile.count;
    const MOD mod = work.template mod_of<MOD>(a);
    const DropoutMask drop(a, work.b, work.h);
    const int qb = L::q_stage(st.q_fills);  // this tile's Q buffer
    const u64 desc_q = sw128_desc(L::q_buffer(base, qb) + c * 64 * 128, 16);
    auto k_stage = [&](int stage) { return base + L::K_RING + stage * L::K_STAGE; };
    auto v_stage = [&](int stage) { return base + L::V_RING + stage * L::V_STAGE; };
    float (&o)[OT * 4] = st.o;
    float (&s)[NT * 4] = st.s;
    u32 (&pf)[KPV][4] = st.pf;
    RingSlot<STAGES>& ks = st.ks;
    RingSlot<STAGES>& vs = st.vs;
    const GemmTurns<PINGPONG, L::CONSUMERS> turns(c);

    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    // This tile's rows and their softmax state, for the stores whenever they come.
    auto rows_owed = [&](int last_v) {
        const int v_keys = Work::PACKED && n_count > 0 ? work.seq.nk - work.key_tile[n_count - 1] * BLOCK_N : BLOCK_N;
        return TileOwed{a.o + work.b * a.o_sb + work.h * a.o_sh + work.seq.q0 * a.o_sn, a.lse + work.lse_start(a),
                        work.seq.nq, work.m0 + c * 64, last_v, qb, {row_max[0], row_max[1]}, {row_sum[0], row_sum[1]},
                        mod.softmax_scale(), v_keys};
    };

    if (n_count == 0) {  // no buffer: the zeros go straight out (after what the last tile owes)
        if (st.owes) {
            turns.open(c);
            settle_alone<T, L, DVP, BLOCK_N, STAGES, PINGPONG, DROPOUT, Work::PACKED>(a, st, bar, base, turns, c);
        }
        flush_staged<L, DVP>(a, st, bar);
        const TileOwed rows = rows_owed(0);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = warp * 16 + g + half * 8;
            const RowResult res = finish_row(row_max[half], row_sum[half], rows.scale);
            if (t == 0 && rows.row0 + r < rows.nq) store_lse(a, rows.lse, rows.row0 + r, res.lse);
        }
        store_zero_rows(rows.out, a.o_sn, rows.nq, a.dv, rows.row0, 64, threadIdx.x % 128, 128);
        return;
    }

    // The j-th visited tile's mask and this thread's bits of it (exact masks), read while the
    // GEMM that makes its S runs: the tile index from global memory (block-sparse walks), or an
    // exact mask's index, slot and bits from what the producer left beside K (ExactStage).
    using TileMask = decltype(mask.template tile<BLOCK_M, BLOCK_N>(0, 0, 0));
    struct TileAhead {
        int n0;
        TileMask mask;
        AccumulatorBits<TileMask> bits;
    };
    auto tile_ahead = [&](int j) {
        if constexpr (MASK::exact) {
            const auto& stage = exact[ks.stage];
            const int n0 = stage.n_tile * BLOCK_N;
            TileAhead ahead{n0, mask.template tile<BLOCK_M, BLOCK_N>(work.m0, n0, stage.slot), {}};
            ahead.bits.load_shared(ahead.mask, stage.bits, warp_row0 + g - work.m0, t);
            return ahead;
        } else {
            const int n0 = work.key_tile[j] * BLOCK_N;
            TileAhead ahead{n0, mask.template tile<BLOCK_M, BLOCK_N>(work.m0, n0, work.key_tile.slot(j)), {}};
            ahead.bits.load(ahead.mask, warp_row0 + g, t);
            return ahead;
        }
    };
    // A K buffer goes back to the producer once this warpgroup is done with it: its GEMM (the
    // leader waited for it) and, with an exact mask, every thread's reads of the record beside it.
    // With O_IN_KV the last key tile's stages O: it goes back after the stores (flush_tile).
    auto release_k = [&](int j) {
        if constexpr (MASK::exact) named_barrier(c + 2, 128);
        if (leader && !(L::O_IN_KV && j == n_count - 1)) mbar_arrive(bar.k_empty(ks.stage));
    };

    // Modifier, mask (only where the tile holds keys some row of this warp does not see; an
    // exact mask's bits only on its partial tiles) and the online softmax of that tile's S in
    // place; alpha rescales what O held before. DROPOUT: the tile's keep flags, drawn after the
    // row sums took every element; the dropped elements of P are cleared once P is packed for
    // P·V (pack_p), a mask per pair (dropout.cuh).
    KeepWords<false, NT> keep;
    auto softmax = [&](const TileAhead& tile, float (&alpha)[2]) {
        const int n0 = tile.n0;
        float (&sb)[NT][4] = as_blocks<NT>(s);
        modify_scores(sb, mod, warp_row0 + g, n0, t);
        if (tile.mask.partial(warp_row0, 16, n0, BLOCK_N)) mask_scores(sb, tile.mask, tile.bits, warp_row0 + g, n0, t);
        online_softmax(sb, row_max, row_sum, mod.softmax_scale(), alpha);
        if constexpr (DROPOUT) keep_words<false, NT>(keep, drop, warp_row0 + g, n0, lane);
    };
    auto pack_p = [&] {
        pack_a<T, KPV>(pf, s);
        if constexpr (DROPOUT) drop_packed(pf, keep);
    };

    auto release_q = [&](int j) {
        if (L::O_IN_RING && leader && j == n_count - 1) mbar_arrive(bar.q_empty(qb));
    };

    // The first key tile: S_0 = Q·K_0ᵀ, with the previous tile's last P·V behind it (CARRY), whose
    // O is stored once the softmax of S_0 has run under it.
    const bool owes = CARRY && st.owes;
    turns.open(c);
    mbar_wait(bar.q(qb), L::q_parity(st.q_fills));
    ++st.q_fills;
    mbar_wait(bar.k_full(ks.stage), ks.phase);
    if (owes) {
        reg_fence(o);
        reg_fence_frag(pf);
    }
    turns.begin();
    wgmma_fence();
    issue_qk<T, D, BLOCK_M, BLOCK_N>(s, desc_q, k_stage(ks.stage));
    if (owes) {
        mbar_wait(bar.v_full(vs.stage), vs.phase);
        clear_values_past_end<L, BLOCK_N, Work::PACKED>(v_stage(vs.stage), st.owed.v_keys);
        issue_pv<T, DVP, BLOCK_N>(o, pf, v_stage(vs.stage));
    } else if constexpr (CARRY) {
        wgmma_commit();  // an empty group, so that the waits below count alike on both paths
    }
    turns.end();
    flush_staged<L, DVP>(a, st, bar);  // the previous tile's rows, where settle_alone left them
    {
        const TileAhead tile = tile_ahead(0);
        wgmma_wait<CARRY ? 1 : 0>();
        reg_fence(s);
        release_k(0);
        release_q(0);
        ks.advance();
        float alpha[2];
        softmax(tile, alpha);
    }
    if constexpr (CARRY) {
        wgmma_wait<0>();
        reg_fence(o);
        reg_fence_frag(pf);
        if (owes) release_owed_v<L>(st, bar);
    }
    pack_p();
    if (owes) stage_owed<T, L, DVP, STAGES, DROPOUT>(a, st, bar, base, false);
#pragma unroll
    for (int i = 0; i < OT * 4; ++i) o[i] = 0.f;

    for (int j = 1; j < n_count; ++j) {
        mbar_wait(bar.k_full(ks.stage), ks.phase);
        reg_fence(s);
        reg_fence(o);
        reg_fence_frag(pf);
        turns.begin();
        wgmma_fence();
        issue_qk<T, D, BLOCK_M, BLOCK_N>(s, desc_q, k_stage(ks.stage));
        mbar_wait(bar.v_full(vs.stage), vs.phase);
        issue_pv<T, DVP, BLOCK_N>(o, pf, v_stage(vs.stage));
        turns.end();
        const TileAhead tile = tile_ahead(j);
        wgmma_wait<1>();
        reg_fence(s);
        release_k(j);
        release_q(j);
        float alpha[2];
        softmax(tile, alpha);
        wgmma_wait<0>();
        reg_fence(o);
        reg_fence_frag(pf);
        if (leader) mbar_arrive(bar.v_empty(vs.stage));
        rescale_rows(as_blocks<OT>(o), alpha);
        pack_p();
        ks.advance();
        vs.advance();
    }

    // What the tile owes now: its last P·V, V in the buffer `vs` stands at, then the stores.
    st.owed = rows_owed(vs.stage);
    st.owes = true;
    if constexpr (!CARRY) settle_alone<T, L, DVP, BLOCK_N, STAGES, PINGPONG, DROPOUT, Work::PACKED>(a, st, bar, base, turns, c);
}

template <typename T, int D, int DV, int BLOCK_N, int STAGES, int Q_BUFFERS, int CONSUMERS, bool PINGPONG, class MASK,
          class MOD, bool VARLEN = false, bool DROPOUT = false>
__global__ void __launch_bounds__(128 * (CONSUMERS + 1), tma_forward_blocks_per_sm(CONSUMERS))
flash_fwd_sm90_tma(const __grid_constant__ QkvMaps maps, const __grid_constant__ FwdArgs a, int tile_count,
                   int* tile_counter) {
    constexpr int DP = box_columns(D), DVP = box_columns(DV);
    using L = TmaForwardLayout<DP, DVP, BLOCK_N, STAGES, Q_BUFFERS, CONSUMERS>;
    static_assert(BLOCK_N == 64 || BLOCK_N == 80 || BLOCK_N == 128 || BLOCK_N == 176,
                  "BLOCK_N must be 64, 80, 128 or 176 (the Q·Kᵀ wgmma widths wrapped)");
    static_assert(DP <= 256 && DVP <= 256, "head dims up to 256");
    static_assert(CONSUMERS >= 1 && CONSUMERS <= 3, "one to three consumer warpgroups");
    static_assert(Q_BUFFERS == 1 || Q_BUFFERS == 2, "one or two Q buffers");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ __align__(8) u64 barrier_words[TmaForwardBarriers<STAGES>::COUNT];
    __shared__ int mailbox_slots[2];
    __shared__ __align__(16) ExactStage<MASK::exact, L::BLOCK_M, BLOCK_N> exact_stages[STAGES];
    const u32 base = (smem_addr(smem_raw) + 1023u) & ~1023u;  // the swizzle needs 1024-byte alignment
    const TmaForwardBarriers<STAGES> bar{smem_addr(barrier_words)};
    if (threadIdx.x == 0) bar.init(L::CONSUMERS);
    __syncthreads();
    // Packed sequences on a persistent grid: longest first (schedule.cuh).
    if constexpr (VARLEN)
        rank_longest_first<L::BLOCK_M>(longest_first_storage(), a.cu_k, a.cu_q, a.batch, tile_counter != nullptr,
                                       LONGEST_FIRST_MAX);
    const MASK mask(a);
    const TileMailbox mailbox{mailbox_slots};

    if (threadIdx.x < 128) {
        release_registers<L::PRODUCER_REGS>();
        if (threadIdx.x < 32 && elect_one_lane())
            produce<L, BLOCK_N, STAGES, VARLEN, DROPOUT>(maps, bar, base, exact_stages, mailbox,
                                                TileTickets{tile_counter, tile_count}, mask, a);
        return;
    }
    claim_registers<L::CONSUMER_REGS>();
    ConsumerState<BLOCK_N / 8, DVP / 8, BLOCK_N / 16, STAGES> st;
    for (u32 n = 0;; ++n) {
        const int index = mailbox.take(bar, n);
        if (index >= tile_count) break;
        TmaTileWork<L::BLOCK_M, BLOCK_N, MASK, VARLEN, DROPOUT> work(a, index, tile_count);
        if (work.past_end()) continue;
        const MASK tile_mask = work.mask_of(mask, a);
        work.walk(tile_mask, a);
        consume_tile<T, L, D, DVP, BLOCK_N, STAGES, PINGPONG, MASK, MOD, DROPOUT>(a, tile_mask, work, bar, base,
                                                                                  exact_stages, st);
    }
    if (st.owes) {  // the block's last tile
        const int c = threadIdx.x / 128 - 1;
        const GemmTurns<PINGPONG, L::CONSUMERS> turns(c);
        turns.open(c);
        settle_alone<T, L, DVP, BLOCK_N, STAGES, PINGPONG, DROPOUT, VARLEN>(a, st, bar, base, turns, c);
    }
    flush_staged<L, DVP>(a, st, bar);
}
