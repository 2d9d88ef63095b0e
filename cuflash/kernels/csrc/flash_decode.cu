// KV-cache decode: a few query rows of each batch row against its cache (contiguous or paged),
// split over the keys (mma.sync tensor cores, sm_80+).
//
// Decode reads every cached key and value once and does little arithmetic on them, so it runs at
// the pace of device memory, and only when enough of it is in flight: one thread block per
// (batch row, key/value head) would leave most of the GPU idle. So:
//   - the query rows of one GQA group are packed into one 16-row tile (row r is query position
//     r / group of query head hk·group + r % group), so each K/V byte is read once per group;
//   - the keys a batch row sees are dealt to `splits` thread blocks in whole 64-key tiles; each
//     writes its normalised partial output and lse, and decode_combine merges them by their
//     log-sum-exp (a single split writes the output directly);
//   - K/V tiles stream through a STAGES-deep cp.async ring (in the layout of RingTile below), and
//     the four warps of a block take 16 keys each of every tile with their own online softmax,
//     merged through shared memory at the end.
// Which keys a row sees and how a score is modified are the shared policies (mask.cuh,
// score_mod.cuh), built per batch row from its own key count.
#include "args.cuh"

#include "arch/sm80_mma.cuh"
#include "sm80_pieces.cuh"

// Mirrored by DECODE_ARGS in kernels/decode.py.
struct DecodeArgs {
    const u16* q;            // (B, Sq, Hq, D) strides below
    const u16* k;            // contiguous: (B_cache, S_cache, Hkv, D); paged: (pages, page_size, Hkv, D)
    const u16* v;
    u16* o;                  // (B, Sq, Hq, Dv)
    float* lse;              // (B, Hq, Sq) contiguous, natural log
    float* o_part;           // splits > 1: (splits, B, Hq, Sq, Dv) float32, normalised
    float* lse_part;         // splits > 1: (splits, B, Hq, Sq)
    const int* seqlens;      // (B,): each batch row's cache length before the append
    const int* block_table;  // paged: (B, table_stride) page numbers, else null
    const int* batch_idx;    // contiguous: cache batch row of each batch row, or null (identity)
    const float* alibi;      // ALiBi slopes, (B, Hq) contiguous, or null
    const int* leftpad;      // contiguous: (B,) each batch row's first attended position, or null
    i64 q_sb, q_sn, q_sh;    // strides in elements: batch, position, head
    i64 o_sb, o_sn, o_sh;
    i64 k_sb, k_sn, k_sh;    // batch row (page when paged), position, head
    i64 v_sb, v_sn, v_sh;
    i64 table_stride;
    int batch, sq, heads, group, d, dv;
    int page_size;           // paged: keys per page
    int appended, capacity;  // keys appended by this call; keys a batch row's cache holds
    int splits, row_chunks;  // key splits per batch row; 16-row chunks of the packed rows
    int window_left, window_right;  // key band, unbounded sides as 2^30 (mask.cuh)
    float scale_log2, cap_in, cap_out;
};
static_assert(sizeof(DecodeArgs) == 264, "DecodeArgs must match DECODE_ARGS in kernels/decode.py");

// What the mask and score-modifier policies read, for one batch row: its Sq query rows against
// its own key count.
struct DecodeRowView {
    int nq, nk, window_left, window_right, heads;
    const float* alibi;
    float scale_log2, cap_in, cap_out;
    const int* tile_ptr;
    const int* tile_idx;
    int mask_heads;
    const int* tile_slot;
    const u32* tile_bits;

    __device__ __forceinline__ DecodeRowView(const DecodeArgs& a, int nk_)
        : nq(a.sq), nk(nk_), window_left(a.window_left), window_right(a.window_right), heads(a.heads),
          alibi(a.alibi), scale_log2(a.scale_log2), cap_in(a.cap_in), cap_out(a.cap_out), tile_ptr(nullptr),
          tile_idx(nullptr), mask_heads(0), tile_slot(nullptr), tile_bits(nullptr) {}
};

constexpr int DECODE_WARPS = 4;
constexpr int DECODE_ROWS = 16;                  // packed query rows per thread block
constexpr int DECODE_BLOCK_N = DECODE_WARPS * 16;  // keys per tile: 16 per warp
// Paged: the page numbers of a batch row's first pages held in shared memory (HeldPages).
constexpr int DECODE_HELD_PAGES = 256;

// The keys batch row b sees (its cache length plus the keys this call appends), or −1 when its
// length lies outside [0, capacity − appended]. Lengths stay on the device, unchecked by the
// host: such a row's keys are neither written nor read, and its output and lse are NaN.
// Args: DecodeArgs or AppendArgs.
template <class Args>
__device__ __forceinline__ int visible_keys(const Args& a, int b) {
    const int before = a.seqlens[b];
    return before < 0 || before > a.capacity - a.appended ? -1 : before + a.appended;
}
#define NAN_F __int_as_float(0x7fc00000)

// Batch row b's first attended cache position (its keys before it are padding: flash-attn's
// cache_leftpad; contiguous caches only), 0 without padding.
__device__ __forceinline__ int first_key(const DecodeArgs& a, int b) { return a.leftpad ? a.leftpad[b] : 0; }

// The keys batch row b attends: positions first_key … visible_keys − 1, counted from its first
// (the policies' key index), or −1 when its length or its padding (beyond its cached keys) is out
// of range.
__device__ __forceinline__ int attended_keys(const DecodeArgs& a, int b) {
    const int end = visible_keys(a, b), first = first_key(a, b);
    return end < 0 || first < 0 || first > end - a.appended ? -1 : end - first;
}

// One packed query row: its query position and head.
struct PackedRow {
    int pos, head;
};
__device__ __forceinline__ PackedRow packed_row(const DecodeArgs& a, int hk, int row) {
    return {row / a.group, hk * a.group + row % a.group};
}

// Where key `key` of batch row b lies in a cache: its batch row (page, when paged) and position
// in it. Args: DecodeArgs or AppendArgs (the same paging fields).
struct CacheSlot {
    i64 row;
    int pos;
};
// Key `key` of a paged row: the index of its page in the row's block table, and its position in
// that page. Pages hold a multiple of 16 keys (checked by the host), so `advance` by up to 16
// keys crosses at most one page boundary.
struct PagePosition {
    int page, pos;
    __device__ static __forceinline__ PagePosition of(int key, int page_size) {
        const int page = key / page_size;
        return {page, key - page * page_size};
    }
    __device__ __forceinline__ void advance(int keys, int page_size) {
        pos += keys;
        if (pos >= page_size) pos -= page_size, ++page;
    }
};
// The cache row (page number) of page `page` of batch row b, from its block table.
template <class Args>
__device__ __forceinline__ i64 table_page(const Args& a, int b, int page) {
    return a.block_table[b * a.table_stride + page];
}
template <bool PAGED, class Args>
__device__ __forceinline__ CacheSlot cache_slot(const Args& a, int b, int key) {
    if constexpr (PAGED) {
        const PagePosition at = PagePosition::of(key, a.page_size);
        return {table_page(a, b, at.page), at.pos};
    }
    return {a.batch_idx ? a.batch_idx[b] : b, key};
}

// One K or V tile of the ring: BLOCK_N rows of ROW elements (the head dim rounded up to whole
// 128-byte lines), the 16-byte chunk c of row r stored at chunk c ^ (r % 8) of its line.
// Why not the mma.sync kernels' rows padded by 16 bytes: there every other row starts in the
// middle of a 32-byte sector of shared memory, and a cp.async whose destination straddles
// sectors fetched its source sectors from L2 twice (ncu on the H200: 1.5x the L2 sectors of the
// bytes read, a third of them L2 hits, DRAM at 85% of peak; benchmarks/NOTES.md). Whole lines
// keep every copy in place, and the XOR keeps an ldmatrix's eight rows on distinct banks.
template <int WIDTH>
struct RingTile {
    static constexpr int ROW = (WIDTH + 63) / 64 * 64;  // elements per row
    static constexpr int BYTES = DECODE_BLOCK_N * ROW * 2;
    // Byte offset of chunk `chunk` (8 elements) of row `row`.
    __device__ static __forceinline__ u32 offset(int row, int chunk) {
        return row * ROW * 2 + ((chunk ^ (row % 8)) << 4);
    }
};

// The page numbers of a paged batch row whose table has at most DECODE_HELD_PAGES entries, read
// into shared memory by the whole block at its start, beside the row's length: each tile's copies
// then find their pages there instead of reading the table once per row they copy (four table
// reads per thread and tile at 16-key pages, between the copies of one tile and the next). A
// longer table is read as the tiles come (held = 0).
template <bool PAGED>
struct HeldPages {
    const int* pages;  // shared memory
    int held;

    // Starts the reads (every thread of the block); `ready()` must run before `page_row`. All of
    // a thread's loads are issued before its stores: a store through the generic `shared` pointer
    // could alias the next load for all the compiler knows.
    __device__ __forceinline__ HeldPages(const DecodeArgs& a, int b, int* shared) : pages(shared), held(0) {
        if constexpr (PAGED) {
            const int row_pages = a.page_size > 0 ? a.capacity / a.page_size : 0;
            held = row_pages <= DECODE_HELD_PAGES ? row_pages : 0;
            const int* row = a.block_table + b * a.table_stride;
            int page[DECODE_HELD_PAGES / (DECODE_WARPS * 32)];
#pragma unroll
            for (int j = 0; j < DECODE_HELD_PAGES / (DECODE_WARPS * 32); ++j) {
                const int i = threadIdx.x + j * DECODE_WARPS * 32;
                if (i < held) page[j] = row[i];
            }
#pragma unroll
            for (int j = 0; j < DECODE_HELD_PAGES / (DECODE_WARPS * 32); ++j) {
                const int i = threadIdx.x + j * DECODE_WARPS * 32;
                if (i < held) shared[i] = page[j];
            }
        }
    }
    // The pages are in shared memory for every thread (a barrier when paged).
    __device__ __forceinline__ void ready() const {
        if constexpr (PAGED) {
            if (held > 0) __syncthreads();  // the same for every thread of the block
        }
    }
    // The cache row holding page `page` of batch row b (paged only).
    __device__ __forceinline__ i64 page_row(const DecodeArgs& a, int b, int page) const {
        return page < held ? pages[page] : table_page(a, b, page);
    }
};

// K and V rows [key0, key0 + BLOCK_N) of batch row b, head hk, into one ring stage (shared
// addresses sk, sv); zeros past `key_end` and past the head dims, so padding never feeds NaN
// into an mma. Eight threads copy one key row's 128-byte runs (each copy instruction of a warp
// then covers four whole lines), and find the row's place in the caches (`pages`) once for K
// and V.
// Key `key` of a contiguous row lies at cache position `first + key` (first_key).
template <int D, int DV, bool PAGED>
__device__ __forceinline__ void load_kv_tile(u32 sk, u32 sv, const DecodeArgs& a, const HeldPages<PAGED>& pages,
                                             int b, int hk, int key0, int key_end, int first) {
    constexpr int PER_ROW = 8, ROWS_PER_PASS = DECODE_WARPS * 32 / PER_ROW;
    const int part = threadIdx.x % PER_ROW;
    // Each K/V byte is read once per call: evicted from L2 first, it leaves the rest in place
    // (1-2% faster decode at 134 MB of cache on the H200, benchmarks/NOTES.md).
    const unsigned long long once = l2_evict_first_policy();
    // Paged: this thread's rows, ROWS_PER_PASS = 16 keys apart, step from page to page: one
    // division per tile instead of one per row (the prologue's address arithmetic lies between the
    // length's arrival and the first copies).
    static_assert(ROWS_PER_PASS <= 16, "a step may cross one page boundary at most");
    PagePosition at{0, 0};
    if constexpr (PAGED) at = PagePosition::of(key0 + threadIdx.x / PER_ROW, a.page_size);
#pragma unroll
    for (int r = threadIdx.x / PER_ROW; r < DECODE_BLOCK_N; r += ROWS_PER_PASS) {
        const bool row_valid = key0 + r < key_end;
        const u16* k = a.k;
        const u16* v = a.v;
        if (row_valid) {
            const CacheSlot slot = PAGED ? CacheSlot{pages.page_row(a, b, at.page), at.pos}
                                         : cache_slot<false>(a, b, first + key0 + r);
            k += slot.row * a.k_sb + slot.pos * a.k_sn + hk * a.k_sh;
            v += slot.row * a.v_sb + slot.pos * a.v_sn + hk * a.v_sh;
        }
        if constexpr (PAGED) at.advance(ROWS_PER_PASS, a.page_size);
#pragma unroll
        for (int c = part; c < D / 8; c += PER_ROW) {
            const bool valid = row_valid && c * 8 < a.d;
            cp_async_16_with_policy(sk + RingTile<D>::offset(r, c), valid ? k + c * 8 : a.k, valid ? 16 : 0, once);
        }
#pragma unroll
        for (int c = part; c < DV / 8; c += PER_ROW) {
            const bool valid = row_valid && c * 8 < a.dv;
            cp_async_16_with_policy(sv + RingTile<DV>::offset(r, c), valid ? v + c * 8 : a.v, valid ? 16 : 0, once);
        }
    }
}

// S (16 rows × this warp's 16 keys) = Q · Kᵀ: Q from its padded tile (SmemA), K's rows from the
// swizzled tile at `sk`, read as ldsm_b_offset would read a plain [n][k] tile.
template <typename T, int D, class A>
__device__ __forceinline__ void decode_scores(float (&s)[1][2][4], const A& q, u32 sk, int warp, int lane) {
    const int row = warp * 16 + lane % 8 + (lane / 16) * 8;
    const int half = (lane / 8) % 2;
    warp_gemm<T, false, D / 16>(s, q, [=](int kk, int) { return sk + RingTile<D>::offset(row, 2 * kk + half); });
}

// O (16 rows × DV) += P (16 rows × this warp's 16 keys) · V, V's rows from the swizzled tile at
// `sv`, read as ldsm_bt_offset would read a plain [k][n] tile.
template <typename T, int DV>
__device__ __forceinline__ void decode_values(float (&acc)[1][DV / 8][4], const float (&s)[1][2][4], u32 sv,
                                              int warp, int lane) {
    const int row = warp * 16 + lane % 8 + ((lane / 8) % 2) * 8;
    const int half = lane / 16;
    warp_gemm<T, true, 1>(acc, packed_a<T>(s),
                          [=](int, int pair) { return sv + RingTile<DV>::offset(row, 2 * pair + half); });
}

// This thread's two accumulator rows (g and g + 8 of the tile): their query positions and
// score modifiers (ALiBi slopes differ per head). Rows past the packed rows borrow the last one:
// their results are never stored.
template <class MOD>
struct RowPair {
    int pos[2];
    MOD mod[2];
};
template <class MOD>
__device__ __forceinline__ RowPair<MOD> row_pair(const DecodeArgs& a, const DecodeRowView& view, int b, int hk,
                                                 int row, int packed) {
    const PackedRow r0 = packed_row(a, hk, min(row, packed - 1));
    const PackedRow r1 = packed_row(a, hk, min(row + 8, packed - 1));
    return {{r0.pos, r1.pos}, {MOD(view, b, r0.head), MOD(view, b, r1.head)}};
}

// The score modifier, then the band, on one warp's 16 × 16 score tile (NT = 2 blocks of 8 keys).
template <class MASK, class MOD>
__device__ __forceinline__ void modify_and_mask(float (&s)[2][4], const MASK& mask, const RowPair<MOD>& rows,
                                                bool partial, int key0, int t) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int pos = rows.pos[half];
        const auto keys = keys_of_row(mask, pos);
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = key0 + j * 8 + 2 * t + e;
                float& x = s[j][half * 2 + e];
                if constexpr (!MOD::identity) x = rows.mod[half].apply(x, pos, key);
                if (partial && !keys.contains(key)) x = -INFINITY;
            }
    }
}

// Two blocks per SM (what shared memory allows at D, Dv <= 128) stated to ptxas: given that room,
// it keeps more of the loop's addresses in registers (139 instead of 126 at D = 128) and issues
// about 3% fewer instructions, and the stream reaches 92% of DRAM peak instead of 87%
// (benchmarks/NOTES.md).
template <typename T, int D, int DV, int STAGES, class MASK, class MOD, bool PAGED>
__global__ void __launch_bounds__(DECODE_WARPS * 32, 2)
flash_decode(const DecodeArgs a) {
    wait_for_previous_kernel();  // a dependent of the append (kernels/decode.py)
    let_next_kernel_start();
    constexpr int BLOCK_N = DECODE_BLOCK_N, ROWS = DECODE_ROWS;
    constexpr int QS = D + SMEM_PAD;
    constexpr int STAGE = RingTile<D>::BYTES + RingTile<DV>::BYTES;  // bytes per ring stage
    constexpr int OT = DV / 8;

    // The ring first: its tiles' lines must start on 128-byte boundaries (RingTile).
    extern __shared__ __align__(128) u16 smem[];
    u16* ring = smem;
    u16* sq = ring + STAGES * STAGE / 2;
    int* held_pages = reinterpret_cast<int*>(sq + ROWS * QS);  // paged only (DECODE_HELD_PAGES)

    // Block order: row chunks of one key split next to each other (they read the same K/V).
    int index = blockIdx.x;
    const int chunk = index % a.row_chunks;
    index /= a.row_chunks;
    const int split = index % a.splits;
    index /= a.splits;
    const int kv_heads = a.heads / a.group;
    const int hk = index % kv_heads, b = index / kv_heads;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int packed = a.sq * a.group;
    const int row0 = chunk * ROWS;

    const int nk = attended_keys(a, b);
    const int first = PAGED ? 0 : first_key(a, b);
    const HeldPages<PAGED> pages(a, b, held_pages);  // read beside the length
    const DecodeRowView view(a, max(nk, 0));
    const MASK mask(view);

    // The keys this chunk's rows see (the band is monotone in the row), dealt to the splits in
    // whole tiles.
    const int pos_first = row0 / a.group, pos_last = min(packed - 1, row0 + ROWS - 1) / a.group;
    const int key_lo = mask.key_begin(pos_first), key_hi = mask.key_end(pos_last);
    const int span_tiles = key_hi > key_lo ? (key_hi - key_lo + BLOCK_N - 1) / BLOCK_N : 0;
    const int per_split = (span_tiles + a.splits - 1) / a.splits;
    const int first_tile = split * per_split;
    const int n_tiles = max(0, min(per_split, span_tiles - first_tile));
    const int key_first = key_lo + first_tile * BLOCK_N;

    const RowPair<MOD> rows = row_pair<MOD>(a, view, b, hk, row0 + g, packed);
    const float scale = rows.mod[0].softmax_scale();

    // Q: the chunk's packed rows, zeros past the last one and past D.
    for (int c = threadIdx.x; c < ROWS * (D / 8); c += DECODE_WARPS * 32) {
        const int r = c / (D / 8), col = (c % (D / 8)) * 8;
        const bool valid = row0 + r < packed && col < a.d;
        const u16* src = a.q;
        if (valid) {
            const PackedRow pr = packed_row(a, hk, row0 + r);
            src = a.q + b * a.q_sb + pr.pos * a.q_sn + pr.head * a.q_sh + col;
        }
        cp_async_16(smem_addr(sq + r * QS + col), src, valid ? 16 : 0);
    }
    const u32 ring_addr = smem_addr(ring);
    auto stage_k = [&](int stage) { return ring_addr + stage * STAGE; };  // the stage's K tile
    pages.ready();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_tiles)
            load_kv_tile<D, DV, PAGED>(stage_k(s), stage_k(s) + RingTile<D>::BYTES, a, pages, b, hk,
                                       key_first + s * BLOCK_N, key_hi, first);
        cp_async_commit();
    }

    const SmemA<QS> q_frags{smem_addr(sq) + ldsm_a_offset(lane, QS) * 2};

    float acc[1][OT][4];
    zero_acc(acc);
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

    for (int it = 0; it < n_tiles; ++it) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile `it` visible; every warp is done with the stage refilled below
        const int ahead = it + STAGES - 1;
        if (ahead < n_tiles) {
            const u32 stage = stage_k(ahead % STAGES);
            load_kv_tile<D, DV, PAGED>(stage, stage + RingTile<D>::BYTES, a, pages, b, hk,
                                       key_first + ahead * BLOCK_N, key_hi, first);
        }
        cp_async_commit();

        const u32 sk = stage_k(it % STAGES);
        const u32 sv = sk + RingTile<D>::BYTES;
        float s[1][2][4];
        zero_acc(s);
        decode_scores<T, D>(s, q_frags, sk, warp, lane);

        const int key0 = key_first + it * BLOCK_N + warp * 16;
        const bool partial = mask.partial(pos_first, pos_last - pos_first + 1, key0, 16);
        modify_and_mask(s[0], mask, rows, partial, key0, t);
        float alpha[2];
        online_softmax(s[0], row_max, row_sum, scale, alpha);
        rescale_rows(acc[0], alpha);
        decode_values<T, DV>(acc, s, sv, warp, lane);
    }
    cp_async_wait_all();
    __syncthreads();  // the ring is free: it holds the warps' partial results now

    // Merge the four warps' partial rows: each warp's (max · scale, sum) per row, and its
    // accumulator.
    float* part_o = reinterpret_cast<float*>(ring);  // [warp][ROWS][DV]
    float* part_m = part_o + DECODE_WARPS * ROWS * DV;  // [warp][ROWS]
    float* part_l = part_m + DECODE_WARPS * ROWS;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = g + half * 8;
        const float l = quad_sum(row_sum[half]);
        if (t == 0) {
            part_m[warp * ROWS + r] = row_max[half] == -INFINITY ? -INFINITY : row_max[half] * scale;
            part_l[warp * ROWS + r] = l;
        }
#pragma unroll
        for (int j = 0; j < OT; ++j)
            *reinterpret_cast<float2*>(part_o + (warp * ROWS + r) * DV + j * 8 + 2 * t) =
                make_float2(acc[0][j][half * 2], acc[0][j][half * 2 + 1]);
    }
    __syncthreads();

    // Thread (row r, lane c of 8) finishes columns c, c + 8, ... of row r.
    constexpr int COL_THREADS = DECODE_WARPS * 32 / ROWS;
    const int r = threadIdx.x / COL_THREADS, c0 = threadIdx.x % COL_THREADS;
    if (row0 + r >= packed) return;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < DECODE_WARPS; ++w) m = fmaxf(m, part_m[w * ROWS + r]);
    float weight[DECODE_WARPS], l = 0.f;
#pragma unroll
    for (int w = 0; w < DECODE_WARPS; ++w) {
        const float mw = part_m[w * ROWS + r];
        weight[w] = mw == -INFINITY ? 0.f : fast_exp2(mw - m);
        l += weight[w] * part_l[w * ROWS + r];
    }
    const float inv = nk < 0 ? NAN_F : l > 0.f ? 1.f / l : 0.f;
    const float lse = nk < 0 ? NAN_F : l > 0.f ? (m + __log2f(l)) * LN2_F : -INFINITY;
    const PackedRow pr = packed_row(a, hk, row0 + r);
    const i64 out_row = ((i64)b * a.heads + pr.head) * a.sq + pr.pos;  // (B, Hq, Sq) order
    if (a.splits == 1) {
        u16* o = a.o + b * a.o_sb + pr.pos * a.o_sn + pr.head * a.o_sh;
        for (int col = c0; col < a.dv; col += COL_THREADS) {
            float x = 0.f;
#pragma unroll
            for (int w = 0; w < DECODE_WARPS; ++w) x += weight[w] * part_o[(w * ROWS + r) * DV + col];
            o[col] = from_float<T>(x * inv);
        }
        if (c0 == 0) a.lse[out_row] = lse;
    } else {
        const i64 part_row = (i64)split * a.batch * a.heads * a.sq + out_row;
        float* o = a.o_part + part_row * a.dv;
        for (int col = c0; col < a.dv; col += COL_THREADS) {
            float x = 0.f;
#pragma unroll
            for (int w = 0; w < DECODE_WARPS; ++w) x += weight[w] * part_o[(w * ROWS + r) * DV + col];
            o[col] = x * inv;
        }
        if (c0 == 0) a.lse_part[part_row] = lse;
    }
}

// The splits' partial outputs of each (batch row, head, query position) merged by their lse:
// out = Σ exp(lse_s − lse) · o_s with lse = log Σ exp(lse_s). Splits that saw no key (lse −inf,
// partial output 0) weigh 0.
// One warp per (row, 32 output columns), DECODE_COMBINE_COLUMNS: a small decode has few rows (32
// at batch 1), and the time of a combine is that of its chain of dependent loads. Lane l holds
// split l's lse and its weight (then splits 32 + l, ...); the columns of the first 32 splits are
// loaded before the weights are known, beside the lse loads, so that the common case (at most
// 32 splits) waits on one round trip to memory.
constexpr int DECODE_COMBINE_COLUMNS = 32;
template <typename T>
__global__ void __launch_bounds__(128)
decode_combine(const DecodeArgs a) {
    wait_for_previous_kernel();
    const int rows = a.batch * a.heads * a.sq;  // rows · column chunks below 2^31: the host checks
    const int chunks = (a.dv + DECODE_COMBINE_COLUMNS - 1) / DECODE_COMBINE_COLUMNS;
    const int item = blockIdx.x * 4 + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (item >= rows * chunks) return;
    const int row = item / chunks;
    const int col = (item % chunks) * DECODE_COMBINE_COLUMNS + lane;
    const int pos = row % a.sq;
    const int head = (row / a.sq) % a.heads;
    const int b = row / a.sq / a.heads;
    u16* out = a.o + b * a.o_sb + pos * a.o_sn + head * a.o_sh;
    const bool first_chunk = item % chunks == 0;
    if (attended_keys(a, b) < 0) {
        if (col < a.dv) out[col] = from_float<T>(NAN_F);
        if (first_chunk && lane == 0) a.lse[row] = NAN_F;
        return;
    }
    const i64 split_stride = (i64)rows * a.dv;  // between two splits' partial outputs
    const float* part = a.o_part + (i64)row * a.dv + col;
    const int first = min(32, a.splits);
    float y[32];
#pragma unroll
    for (int u = 0; u < 32; ++u) y[u] = u < first && col < a.dv ? part[u * split_stride] : 0.f;
    auto split_lse = [&](int s) { return s < a.splits ? a.lse_part[(i64)s * rows + row] : -INFINITY; };
    const float lse0 = split_lse(lane);

    float m = lse0;
    for (int s = 32 + lane; s < a.splits; s += 32) m = fmaxf(m, split_lse(s));
#pragma unroll
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    auto unscaled_weight = [&](float ls) { return ls == -INFINITY ? 0.f : __expf(ls - m); };
    float total = unscaled_weight(lse0);
    for (int s = 32 + lane; s < a.splits; s += 32) total += unscaled_weight(split_lse(s));
#pragma unroll
    for (int o = 16; o > 0; o /= 2) total += __shfl_xor_sync(0xffffffffu, total, o);
    const float inv = total > 0.f ? 1.f / total : 0.f;

    float x = 0.f;
    const float weight0 = unscaled_weight(lse0) * inv;  // this lane's split
#pragma unroll
    for (int u = 0; u < 32; ++u) {
        const float w = __shfl_sync(0xffffffffu, weight0, u);
        if (w != 0.f) x += w * y[u];
    }
    // Splits past the first 32: their loads issued eight at a time, once the weights are known.
    for (int s0 = 32; s0 < a.splits; s0 += 32) {
        const float weight = unscaled_weight(split_lse(s0 + lane)) * inv;
        const int count = min(32, a.splits - s0);
        for (int i = 0; i < count; i += 8) {
            float w[8], z[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                w[u] = __shfl_sync(0xffffffffu, weight, i + u);
                z[u] = w[u] != 0.f && col < a.dv ? part[(i64)(s0 + i + u) * split_stride] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < 8; ++u) x += w[u] * z[u];
        }
    }
    if (col < a.dv) out[col] = from_float<T>(x);
    if (first_chunk && lane == 0) a.lse[row] = total > 0.f ? m + __logf(total) : -INFINITY;
}

// New keys and values (B, S_new, Hkv, D / Dv) written into the caches at positions
// seqlens[b] + i (seqlens: the lengths before the append), one 16-bit element per thread-step;
// nothing for a row whose length is out of range (visible_keys).
// Mirrored by APPEND_ARGS in kernels/decode.py.
struct AppendArgs {
    const u16* k_new;
    const u16* v_new;
    u16* k;
    u16* v;
    const int* seqlens;
    const int* block_table;
    const int* batch_idx;
    i64 kn_sb, kn_sn, kn_sh;
    i64 vn_sb, vn_sn, vn_sh;
    i64 k_sb, k_sn, k_sh;
    i64 v_sb, v_sn, v_sh;
    i64 table_stride;
    int batch, appended, kv_heads, d, dv, page_size, capacity;
};
static_assert(sizeof(AppendArgs) == 192, "AppendArgs must match APPEND_ARGS in kernels/decode.py");

template <bool PAGED>
__global__ void __launch_bounds__(128)
kv_append(const AppendArgs a) {
    let_next_kernel_start();
    // One thread block per new (batch row, position, head) row.
    int index = blockIdx.x;
    const int hk = index % a.kv_heads;
    index /= a.kv_heads;
    const int i = index % a.appended, b = index / a.appended;
    if (visible_keys(a, b) < 0) return;
    const u16* kn = a.k_new + b * a.kn_sb + i * a.kn_sn + hk * a.kn_sh;
    const u16* vn = a.v_new + b * a.vn_sb + i * a.vn_sn + hk * a.vn_sh;
    const CacheSlot slot = cache_slot<PAGED>(a, b, a.seqlens[b] + i);
    u16* k = a.k + slot.row * a.k_sb + slot.pos * a.k_sn + hk * a.k_sh;
    u16* v = a.v + slot.row * a.v_sb + slot.pos * a.v_sn + hk * a.v_sh;
    for (int c = threadIdx.x; c < a.d; c += blockDim.x) k[c] = kn[c];
    for (int c = threadIdx.x; c < a.dv; c += blockDim.x) v[c] = vn[c];
}
