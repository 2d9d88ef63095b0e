// Which thread block owns which tile, and which tiles it visits: grid decoding, the sequence a
// block works on, and the query / key tile walks, all read off the mask policy (mask.cuh).
#pragma once
#include "mask.cuh"

// ---- The sequence of a batch index: the one home of packed variable-length sequences in CUDA.
//
// A dense call holds B sequences of the same lengths (nq, nk), sequence b at b·(batch stride).
// A varlen call (cuflash.attention_varlen) packs B sequences of different lengths along the row
// axis of (total, H, D) buffers: sequence b owns query rows cu_q[b] .. cu_q[b + 1] and key rows
// cu_k[b] .. cu_k[b + 1]; the host sends a batch stride of 0, nq / nk as the longest lengths, and
// a grid sized for the longest sequence, or a packed grid (packed_tile_at, below) of each
// sequence's own tiles. A kernel asks sequence_of for the sequence's first rows
// and lengths, adds q0 / k0 rows to its base pointers, builds its mask and score modifier from
// the sequence's lengths (so causal, windows and ALiBi are aligned per sequence) and, before any
// barrier, lets blocks whose tile lies past the sequence's end exit. VARLEN = false compiles all
// of it away: q0 = k0 = 0 and the lengths are the call's, so dense kernels keep their code.
struct Sequence {
    int q0, k0;  // first query / key row of the sequence in the packed rows (0 dense)
    int nq, nk;  // its lengths
};
template <bool VARLEN, class Args>
__device__ __forceinline__ Sequence sequence_of(const Args& a, int b) {
    if constexpr (VARLEN) {
        const int q0 = a.cu_q[b], k0 = a.cu_k[b];
        return {q0, k0, a.cu_q[b + 1] - q0, a.cu_k[b + 1] - k0};
    } else {
        return {0, 0, a.nq, a.nk};
    }
}

// A packed sequence as sequence_of<true> gives it, its offsets read again where it is used (asm
// volatile loads, which the compiler neither merges with earlier reads nor hoists out of a loop):
// a kernel whose registers are all taken inside its loop reads the lengths anew for each tile
// instead of keeping them live across it (a dense call's lengths are parameters, never held).
__device__ __forceinline__ int load_again(const int* p) {
    int x;
    asm volatile("ld.global.nc.s32 %0, [%1];" : "=r"(x) : "l"(p));
    return x;
}
template <class Args>
__device__ __forceinline__ Sequence sequence_again(const Args& a, int b) {
    const int q0 = load_again(a.cu_q + b), k0 = load_again(a.cu_k + b);
    return {q0, k0, load_again(a.cu_q + b + 1) - q0, load_again(a.cu_k + b + 1) - k0};
}

// Where the forward's lse values of (sequence b, query head h) start: lse is (B, Hq, Nq) dense
// and (Hq, total_q) varlen (flash-attn's varlen layout).
template <bool VARLEN, class Args>
__device__ __forceinline__ i64 lse_offset(const Args& a, const Sequence& s, int b, int h) {
    if constexpr (VARLEN) return (i64)h * a.total_q + s.q0;
    return ((i64)b * a.heads + h) * a.nq;
}

// A forward's lse value of one row (`lse`: the pointer at lse_offset), unless the call sent no lse:
// a caller that does not keep lse passes a null FwdArgs::lse and allocates none.
template <class Args>
__device__ __forceinline__ void store_lse(const Args& a, float* lse, int row, float value) {
    if (a.lse != nullptr) lse[row] = value;
}

// Where the backward's scratch rows (lse2, delta, dq_accum rows) of (sequence b, query head h)
// start. Each sequence's rows are padded to a multiple of SCRATCH_ALIGN (every query tile height
// divides it) and start on such a multiple, so tile loads need no bounds checks and stay 16-byte
// aligned. Dense: (B, Hq, rows_pad). Varlen: (Hq, rows_pad) with rows_pad =
// (ceil(total_q / SCRATCH_ALIGN) + B) · SCRATCH_ALIGN, sequence b's rows at
// (floor(q0 / SCRATCH_ALIGN) + b) · SCRATCH_ALIGN: padding the previous sequence's rows never
// reaches that far, and no sequence's rows reach past rows_pad (the host's mma_backward.Scratch).
constexpr int SCRATCH_ALIGN = 128;  // ROW_ALIGN in mma_backward.py
template <bool VARLEN, class Args>
__device__ __forceinline__ i64 scratch_offset(const Args& a, const Sequence& s, int b, int h) {
    if constexpr (VARLEN) return (i64)h * a.rows_pad + (i64)(s.q0 / SCRATCH_ALIGN + b) * SCRATCH_ALIGN;
    return ((i64)b * a.heads + h) * a.rows_pad;
}

// The ints right after a dense call's dQ accumulator (B·Hq·rows_pad rows of dqk floats), where
// the Hopper fused dQ keeps the counters of one of its two protocols (a call has one or neither:
// the host's mma_backward.Scratch).
template <class Args>
__device__ __forceinline__ int* past_dq_accumulator(const Args& a) {
    return reinterpret_cast<int*>(a.dq_accum + (i64)a.batch * a.heads * a.rows_pad * a.dqk);
}

// The semaphores of the Hopper fused dQ with ordered adds (flash_bwd_sm90.cu, ORDERED_DQ): one
// int per dq_semaphore_rows() scratch rows, past the accumulator, zeroed by flash_bwd_pre
// (ZERO_SEMS: one per block of its rows). A query tile's semaphore is that of its first scratch
// row (tile heights are multiples of it).
__device__ constexpr int dq_semaphore_rows() { return 32; }
template <class Args>
__device__ __forceinline__ int* dq_semaphore(const Args& a, i64 row) {
    return past_dq_accumulator(a) + row / dq_semaphore_rows();
}

// The lane counters of the Hopper fused dQ with adds in any order (flash_bwd_sm90.cu,
// lanes_counted): one int per lane, a (batch b, key/value head hk) pair, past the accumulator,
// zeroed by flash_bwd_pre (ZERO_LANES). Each of the lane's key tiles adds 1 once its dQ adds
// have landed; they all add into the same rows, those of the GQA group's query heads
// hk·group .. (hk + 1)·group − 1 of batch b (QueryTileWalk), which are scratch rows
// lane · group · rows_pad on (lane = b · kv_heads + hk), so the lane's dQ is whole at n_tiles,
// and flash_bwd_dq_convert (AFTER_LANES) may cast it then.
template <class Args>
__device__ __forceinline__ int* dq_lane_counter(const Args& a, int b, int hk) {
    return past_dq_accumulator(a) + b * a.kv_heads + hk;
}
// After them the ticket from which that cast's blocks take their steps in order (zeroed with them).
template <class Args>
__device__ __forceinline__ int* dq_cast_ticket(const Args& a) {
    return past_dq_accumulator(a) + a.batch * a.kv_heads;
}
// After the ticket, the claims of the same protocol's dQ tiles: one int per dq_semaphore_rows()
// scratch rows (a query tile's is that of its first row), zeroed by flash_bwd_pre (ZERO_CLAIMS,
// one per block of its rows). The first key tile to claim a dQ tile (0 -> 1) stores its part
// there instead of adding it and marks the store complete (-> 2); the others add once they see
// 2. So the accumulator needs no zeros where every dQ tile has a part (flash_bwd_sm90.cu,
// write_dq_parts).
template <class Args>
__device__ __forceinline__ int* dq_tile_claim(const Args& a, i64 row) {
    return dq_cast_ticket(a) + 1 + row / dq_semaphore_rows();
}

// Where the Hopper fused dQ keeps row `row`'s columns c..c + 7 (c a multiple of 8) in the float32
// accumulator (FRAGMENT_ORDER; `row` counts scratch rows from the accumulator's start, d floats a
// row): rows go in blocks of 16, and each block's 16·d floats follow a warp's slice of a wgmma
// accumulator — 8-column chunk, then row half (rows 0-7, 8-15), then lane 4g + t holding columns
// 2t, 2t + 1 of row g — so a warp's 16 rows of any chunk-aligned column range are one contiguous
// run: one bulk reduce-add per warp and tile, from staging stores that hit 32 different banks.
// The 8 columns asked for are contiguous too (lanes 4g..4g + 3).
__device__ __forceinline__ i64 dq_fragment_offset(i64 row, int c, int d) {
    const int i = (int)(row % 16);
    return (row - i) * d + ((c / 8) * 2 + i / 8) * 64 + (i % 8) * 8;
}

// Grids of lanes ((batch, head) pairs) of `tiles` tiles each, a lane's tiles next to each other
// in the grid's order, heaviest first: the blocks that run side by side then share the lane's
// operands in L2. Under causal a lane's tiles run from heavy to light, so in that order the grid
// ends on the last lanes' heaviest tiles, started once the rest of the GPU was already at work.
// With `tail_lanes` > 0 the last tail_lanes lanes go tile by tile across them instead (every
// one's first tile, then every one's second...), so that the grid ends on light tiles. The host
// picks the count (_launch.tail_lanes: the lanes of about two waves of blocks). Returns the lane
// and the tile's place in its lane of the grid's `index`-th tile, in the index's type (unsigned
// from blockIdx, as the dK/dV kernels have always divided it).
template <typename I>
struct LaneTile {
    I lane, tile;
};
// The masks under which a lane's tiles run from heavy to light: a band bounded on the right alone
// (causal, or a window (-1, w)), with no block or exact mask. A kernel reads the host's count
// only under these (and leaves out what was not measured with it), so that no other variant's
// code changes.
template <class MASK>
__device__ constexpr bool lanes_run_heavy_to_light() {
    return MASK::right_bounded && !MASK::left_bounded && !MASK::sparse;
}
template <typename I>
__device__ __forceinline__ LaneTile<I> lane_tile_at(I index, I tiles, I lanes, int tail_lanes) {
    if (tail_lanes > 0) {
        const I tail = tail_lanes, first_tail_index = (lanes - tail) * tiles;
        if (index >= first_tail_index) return {lanes - tail + (index - first_tail_index) % tail,
                                               (index - first_tail_index) / tail};
    }
    return {index / tiles, index % tiles};
}

// The query tile a thread block owns, from a 1-D grid of m_tiles × heads × batch blocks (or
// tile `index` of that order, for kernels whose blocks walk several): the
// tiles of one head next to each other (they share K/V in L2), and with a banded mask (causal,
// window) the last tiles first: under causal they are the heaviest, so short tiles fill the tail
// of the launch; `tail_lanes` of the `lanes` (m_tiles × heads × batch / m_tiles) as lane_tile_at.
struct QueryTile {
    int b, h, m_tile;
};
template <bool HEAVY_LAST>
__device__ __forceinline__ QueryTile query_tile_at(int index, int m_tiles, int heads, int lanes = 0,
                                                   int tail_lanes = 0) {
    const LaneTile<int> at = lane_tile_at(index, m_tiles, lanes, tail_lanes);
    return {at.lane / heads, at.lane % heads, HEAVY_LAST ? m_tiles - 1 - at.tile : at.tile};
}
template <bool HEAVY_LAST>
__device__ __forceinline__ QueryTile query_tile_of_block(int m_tiles, int heads, int tail_lanes = 0) {
    return query_tile_at<HEAVY_LAST>(blockIdx.x, m_tiles, heads, (int)gridDim.x / m_tiles, tail_lanes);
}

// ---- Packed sequences' tiles in a grid without the longest sequence's padding.
//
// A grid sized for the longest sequence gives every sequence the longest one's tiles per head:
// most of a short sequence's blocks only start and leave. The Hopper TMA forward (query tiles)
// and warp-specialised dK/dV kernel (key tiles) instead give sequence b of a varlen call the
// tile slots S_b .. S_{b+1} − 1 of TILE rows, S_b = floor(cu[b] / TILE) + b: as
// floor((x + n) / T) − floor(x / T) lies between floor(n / T) and ceil(n / T), sequence b's
// slots hold its ceil(n_b / TILE) tiles and at most one past its end, and
// S_B = floor(total / TILE) + B bounds them all without reading the offsets (the host's
// _launch.packed_tile_slots). Sequence b's blocks are lanes · S_b .. lanes · S_{b+1} − 1 (lanes:
// its heads), a lane's tiles next to each other as lane_tile_at orders a dense call's, last
// first with HEAVY_LAST; its empty slot, if any, is then first and leaves at once.
struct PackedTile {
    int b, lane, tile;
};
// Block `index` of a layout whose r-th sequence's slots start at first_slot(r), nondecreasing
// from first_slot(0) = 0, with `slot` = index / lanes below first_slot(count): the last r whose
// slots start at or before the block's (a sequence without tiles starts where the next does),
// sequence_of(r), and the block's lane and tile within r's slots.
template <bool HEAVY_LAST, class FirstSlot, class SequenceOf>
__device__ __forceinline__ PackedTile tile_in_slots(int index, int lanes, int count, FirstSlot first_slot,
                                                    SequenceOf sequence_of) {
    const int slot = index / lanes;  // lanes · first_slot(r) ≤ index exactly where first_slot(r) ≤ slot
    int lo = 0, hi = count;          // first_slot(lo) ≤ slot < first_slot(hi)
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (first_slot(mid) <= slot) lo = mid;
        else hi = mid;
    }
    const int first = first_slot(lo), width = first_slot(lo + 1) - first;
    const int local = index - lanes * first, tile = local % width;
    return {sequence_of(lo), local / width, HEAVY_LAST ? width - 1 - tile : tile};
}
template <int TILE, bool HEAVY_LAST>
__device__ __forceinline__ PackedTile packed_tile_at(int index, int lanes, const int* cu, int batch) {
    // S_0 = 0, and every block's slot is below S_B (packed_tile_slots)
    return tile_in_slots<HEAVY_LAST>(
        index, lanes, batch, [&](int b) { return __ldg(cu + b) / TILE + b; }, [](int b) { return b; });
}

// ---- Packed sequences longest first.
//
// Blocks start (or a persistent grid's blocks draw tiles) in index order. In the packed grid's
// order a long sequence that comes late keeps a few SMs on its heavy tiles after the others ran
// dry: varlen_bench's 11 documents, sorted longest first, ran the TMA forward 8-11% faster under
// causal and 2% unmasked on an H100. So a persistent block of the TMA forward, and each block of
// the warp-specialised dK/dV kernel, ranks the sequences at its start by the length its tiles'
// work grows with (key counts for query tiles, query counts for key tiles), longest first (ties
// in index order), and lays their tiles out in that order: rank r's ceil(n / TILE) tiles per
// lane from slot first[r] on, each lane's tiles next to each other as in packed_tile_at. The
// slots past the last (packed_tile_slots leaves at most one a sequence and lane) lie past every
// sequence's end. One warp ranks, in time that grows with the square of the sequences: up to
// LONGEST_FIRST_MAX of them once per persistent block, up to LONGEST_FIRST_EACH_BLOCK_MAX where
// every block of a grid ranks; more keep the packed grid's order.
constexpr int LONGEST_FIRST_MAX = 128;  // LONGEST_FIRST_MAX in sm90_tma_forward.py
constexpr int LONGEST_FIRST_EACH_BLOCK_MAX = 32;
struct LongestFirst {
    int sequence[LONGEST_FIRST_MAX];   // the sequence of rank r
    int first[LONGEST_FIRST_MAX + 1];  // rank r's first tile slot; first[count]: the tiles' end
    int count;                         // the sequences ranked; 0: the packed grid's order
};
static_assert(sizeof(LongestFirst) == 4 * (2 * LONGEST_FIRST_MAX + 2),
              "LongestFirst must match LONGEST_FIRST_BYTES in sm90_tma_forward.py");
// The block's ranking, in static shared memory (only the kernels that call it hold it).
__device__ __forceinline__ LongestFirst& longest_first_storage() {
    __shared__ LongestFirst order;
    return order;
}
// Every thread of the block calls it (it synchronises the block); the first warp ranks the
// `batch` sequences by their lengths in `work` (offsets) and cuts their tiles from `tiles_of`
// where `ranked` (the same in every thread) and batch ≤ `most`. (Ranked by every thread of the
// dK/dV kernel's block, its consumers spilled 72-116 bytes; by one warp, none.)
template <int TILE>
__device__ __forceinline__ void rank_longest_first(LongestFirst& order, const int* work, const int* tiles_of,
                                                   int batch, bool ranked, int most) {
    ranked = ranked && batch <= most;
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        if (lane == 0) order.count = ranked ? batch : 0;
        if (ranked) {
            int* keys = order.first;  // each sequence's length in `work`, until the ranks are out
            for (int b = lane; b < batch; b += 32) keys[b] = work[b + 1] - work[b];
            __syncwarp();
            for (int b = lane; b < batch; b += 32) {
                const int key = keys[b];
                int rank = 0;
                for (int c = 0; c < batch; ++c) rank += keys[c] > key || (keys[c] == key && c < b);
                order.sequence[rank] = b;
            }
            __syncwarp();
            int end = 0;  // the tiles' prefix sums in rank order, 32 ranks at a time
            for (int r0 = 0; r0 < batch; r0 += 32) {
                const int r = r0 + lane;
                int tiles = 0;
                if (r < batch) {
                    const int b = order.sequence[r];
                    tiles = (tiles_of[b + 1] - tiles_of[b] + TILE - 1) / TILE;
                }
                for (int o = 1; o < 32; o *= 2) {
                    const int x = __shfl_up_sync(0xffffffffu, tiles, o);
                    if (lane >= o) tiles += x;
                }
                if (r < batch) order.first[r + 1] = end + tiles;
                end += __shfl_sync(0xffffffffu, tiles, 31);
            }
            if (lane == 0) order.first[0] = 0;
        }
    }
    __syncthreads();
}
// Tile `index` of a ranked block (order.count > 0), as packed_tile_at's.
template <int TILE, bool HEAVY_LAST>
__device__ __forceinline__ PackedTile longest_first_tile_at(int index, int lanes, const LongestFirst& order) {
    const int count = order.count;
    // Past the last tile: rank 0's tile just past its end.
    if (index / lanes >= order.first[count]) return {order.sequence[0], 0, order.first[1]};
    return tile_in_slots<HEAVY_LAST>(
        index, lanes, count, [&](int r) { return order.first[r]; }, [&](int r) { return order.sequence[r]; });
}
// Tile `index` of a packed grid (of `lanes` lanes a sequence, tiles of TILE rows cut from `cu`):
// in the block's ranking where rank_longest_first made one, else in the packed grid's order.
template <int TILE, bool HEAVY_LAST>
__device__ __forceinline__ PackedTile packed_tile_of(int index, int lanes, const int* cu, int batch) {
    const LongestFirst& order = longest_first_storage();
    return order.count > 0 ? longest_first_tile_at<TILE, HEAVY_LAST>(index, lanes, order)
                           : packed_tile_at<TILE, HEAVY_LAST>(index, lanes, cu, batch);
}

// The key/value tile a dK/dV thread block owns, from a 1-D grid of n_tiles blocks for each lane
// (a (batch, key/value head) pair, kv_heads × batch of them): the key tiles of one lane next to
// each other, in order (under causal the first key tiles, seen by the most query rows, are the
// heaviest and go first), or REVERSED; `tail_lanes` as lane_tile_at.
struct KvTile {
    int b, hk, n_tile;
};
template <bool REVERSED = false>
__device__ __forceinline__ KvTile kv_tile_of_block(int n_tiles, int kv_heads, int tail_lanes = 0) {
    const LaneTile<unsigned> at = lane_tile_at<unsigned>(blockIdx.x, n_tiles, gridDim.x / n_tiles, tail_lanes);
    const int lane = at.lane, n_tile = at.tile;
    return {lane / kv_heads, lane % kv_heads, REVERSED ? n_tiles - 1 - n_tile : n_tile};
}

// The key tiles (of BLOCK_N keys) that query tile m_tile (of BLOCK_M rows) visits, in ascending
// order: the band's tile range (dense), or the part of the tile CSR's row inside it
// (block-sparse or exact, one pattern per head or one shared). slot(i) is the i-th tile's
// bitmask slot for Mask::tile (exact masks; −1 otherwise).
template <bool SPARSE, bool EXACT>
struct KeyTiles {
    const int* idx;
    const int* slots;
    int first, count;
    __device__ __forceinline__ int operator[](int i) const {
        if constexpr (SPARSE) return idx[first + i];
        return first + i;
    }
    __device__ __forceinline__ int slot(int i) const {
        if constexpr (EXACT) return slots[first + i];
        return -1;
    }
};
template <int BLOCK_M, int BLOCK_N, class MASK>
__device__ __forceinline__ KeyTiles<MASK::sparse, MASK::exact> key_tiles_of(const MASK& mask, int m_tile, int h,
                                                              int m_tiles) {
    const int row0 = m_tile * BLOCK_M;
    int n_begin = 0, n_end = (mask.nk + BLOCK_N - 1) / BLOCK_N;
    if constexpr (MASK::banded) {
        n_begin = mask.key_begin(row0) / BLOCK_N;
        n_end = max(0, (mask.key_end(row0 + BLOCK_M - 1) + BLOCK_N - 1) / BLOCK_N);
    }
    if constexpr (MASK::sparse) {
        const int* ptr = mask.tile_ptr + (mask.mask_heads ? h * (m_tiles + 1) : 0);
        int first = ptr[m_tile], last = ptr[m_tile + 1];
        if constexpr (MASK::banded) {
            first = lower_bound_index(mask.tile_idx, first, last, n_begin);
            last = lower_bound_index(mask.tile_idx, first, last, n_end);
        }
        return {mask.tile_idx, mask.tile_slot, first, last - first};
    }
    return {mask.tile_idx, mask.tile_slot, n_begin, max(0, n_end - n_begin)};
}

// The place of key tile n_tile among the key tiles that visit query tile m_tile (dense and banded
// masks: a range), in the order the ordered fused dQ adds them (flash_bwd_sm90.cu, ORDERED_DQ):
// descending under a mask bounded on the right (causal, windows), whose key tiles'
// walks start at the band's edge, so that the last key tile of a query tile's range gets there
// first; ascending otherwise (every walk starts at query tile 0). The dK/dV grid launches key
// tiles in the same order (kv_tile_of_block), a head's key tiles next to each other (last first
// when descending), so a block only waits on blocks launched before it, and the blocks that run
// side by side share their head's Q and dO in L2.
//
// ROTATED (ordered adds without a mask): key tile j of N starts its walk at query tile
// floor(j·M / N) of M and wraps around (QueryTileWalk), so that a head's key tiles reach a query
// tile one step after another instead of all at once, each behind the one before it; a tile's
// rank is then the order in which the walks get there. It needs distinct starts (M ≥ N), and
// every key tile of a head in flight at once, since a block then also waits on blocks launched
// after it: few key tiles per head, far fewer than any Hopper GPU's SMs (one dK/dV block per
// SM). The host picks the calls (sm90_backward.rotated_dq).
__device__ __forceinline__ int rotated_walk_start(int n_tile, int n_tiles, int m_tiles) {
    return n_tile * m_tiles / n_tiles;  // 32-bit: N is small, and M < 2^26 for any int length
}
template <class MASK>
__device__ constexpr bool descending_key_tiles() { return MASK::right_bounded; }
template <int BLOCK_M, int BLOCK_N, class MASK, bool ROTATED = false>
__device__ __forceinline__ int key_tile_rank(const MASK& mask, int m_tile, int h, int m_tiles, int n_tile,
                                             int n_tiles) {
    static_assert(!MASK::sparse, "a tile CSR's key tiles are no range");
    static_assert(!ROTATED || !MASK::banded, "rotated walks cover every query tile");
    if constexpr (ROTATED) {
        // Walks that start at or before m_tile (their starts increase with the key tile).
        const int started = ((m_tile + 1) * n_tiles + m_tiles - 1) / m_tiles;
        // Those after n_tile's own start got here first; past the wrap, also all after it.
        return m_tile >= rotated_walk_start(n_tile, n_tiles, m_tiles) ? started - n_tile - 1
                                                                       : n_tiles - n_tile - 1 + started;
    }
    const auto tiles = key_tiles_of<BLOCK_M, BLOCK_N>(mask, m_tile, h, m_tiles);
    if constexpr (descending_key_tiles<MASK>()) return tiles.first + tiles.count - 1 - n_tile;
    return n_tile - tiles.first;
}

// The (query head, query tile) pairs a dK/dV thread block visits for its key tile n_tile of one
// (batch, key/value head): the query heads of the GQA group in order and, for each, the query
// tiles whose rows see the key tile: a range (dense) or the part of its column of the transposed
// block-sparse (or exact) index inside that range; slot() is the current tile's bitmask slot for
// Mask::tile (exact masks; −1 otherwise). A value type, so the next pair can be looked at ahead.
// ROTATED: each head's query tiles from rotated_walk_start on, wrapping around (key_tile_rank);
// the start is worked out where it is needed, not held (the producer has 24 registers).
template <int BLOCK_M, int BLOCK_N, class MASK, bool ROTATED = false>
struct QueryTileWalk {
    static_assert(!ROTATED || !(MASK::banded || MASK::sparse), "rotated walks cover every query tile");
    const int* col_ptr;
    const int* row_idx;
    const int* slots;
    int n_tile, n_tiles, m_tiles, mask_heads, m_begin, m_end, h_end;
    int h, pos, end;

    template <class Args>
    __device__ __forceinline__ QueryTileWalk(const MASK& mask, const Args& a, int n_tile_, int hk)
        : QueryTileWalk(mask, a, n_tile_, hk, a.m_tiles) {}
    // m_tiles_: the query tiles of the sequence (a varlen call's sequences differ in length).
    template <class Args>
    __device__ __forceinline__ QueryTileWalk(const MASK& mask, const Args& a, int n_tile_, int hk, int m_tiles_)
        : col_ptr(mask.tile_ptr), row_idx(mask.tile_idx), slots(mask.tile_slot), n_tile(n_tile_), n_tiles(a.n_tiles),
          m_tiles(m_tiles_), mask_heads(mask.mask_heads), m_begin(0), m_end(m_tiles_),
          h_end((hk + 1) * a.group) {
        if constexpr (MASK::banded) {
            const int key0 = n_tile * BLOCK_N;
            const int first_row = mask.row_begin(key0);
            m_begin = first_row >= mask.nq ? m_tiles_ : first_row / BLOCK_M;
            m_end = max(0, (mask.row_end(key0 + BLOCK_N - 1) + BLOCK_M - 1) / BLOCK_M);
        }
        open(hk * a.group);
        skip_empty_heads();
    }
    __device__ __forceinline__ bool valid() const { return pos < end; }
    __device__ __forceinline__ int m_tile() const {
        if constexpr (MASK::sparse) return row_idx[pos];
        if constexpr (ROTATED) {
            const int m = pos + rotated_walk_start(n_tile, n_tiles, m_tiles);  // pos counts from m_begin = 0
            return m < m_end ? m : m - m_end;
        }
        return pos;
    }
    __device__ __forceinline__ int slot() const {
        if constexpr (MASK::exact) return slots[pos];
        return -1;
    }
    __device__ __forceinline__ void next() {
        ++pos;
        skip_empty_heads();
    }

  private:
    __device__ __forceinline__ void open(int head) {
        h = head;
        if constexpr (MASK::sparse) {
            const int* ptr = col_ptr + (mask_heads ? head * (n_tiles + 1) : 0) + n_tile;
            pos = ptr[0];
            end = ptr[1];
            if constexpr (MASK::banded) {
                pos = lower_bound_index(row_idx, pos, end, m_begin);
                end = lower_bound_index(row_idx, pos, end, m_end);
            }
        } else {
            pos = m_begin;
            end = m_end;
        }
    }
    __device__ __forceinline__ void skip_empty_heads() {
        while (pos >= end && h + 1 < h_end) open(h + 1);
    }
};
