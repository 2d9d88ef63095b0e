// Argument structs of the 16-bit kernels, passed by value. Each has a twin NumPy structured
// dtype on the host (FWD_ARGS in _launch.py, BWD_ARGS in mma_backward.py); the size checks
// catch a field added on one side only.
#pragma once
#include "common.cuh"

struct FwdArgs {
    const u16* q;
    const u16* k;
    const u16* v;
    u16* o;
    float* lse;
    const int* tile_ptr;  // block-sparse: CSR over query tiles (see sparse docs), else null
    const int* tile_idx;
    i64 q_sb, q_sh, q_sn;  // strides in elements: batch, head, row
    i64 k_sb, k_sh, k_sn;
    i64 v_sb, v_sh, v_sn;
    i64 o_sb, o_sh, o_sn;
    int nq, nk, d, dv;
    int heads, group;      // query heads; query heads per key/value head
    int m_tiles;           // ceil(nq / BLOCK_M)
    int mask_heads;        // block-sparse: 1 = one pattern per head, 0 = shared
    float scale_log2;      // softmax scale * log2(e)
};
static_assert(sizeof(FwdArgs) == 192, "FwdArgs must match FWD_ARGS in _launch.py");

// One struct for every backward kernel (preprocessing, mma.sync and wgmma variants).
struct BwdArgs {
    const u16* q;
    const u16* k;
    const u16* v;
    const u16* o;
    const u16* dout;
    const float* lse;      // natural log, (B, Hq, Nq) contiguous
    u16* grad_q;
    u16* grad_k;
    u16* grad_v;
    float* lse2;           // scratch (B, Hq, rows_pad): lse * log2(e), +inf where lse = -inf
    float* delta;          // scratch (B, Hq, rows_pad): rowsum(dO * O)
    float* dq_accum;       // scratch (B, Hq, rows_pad, dqk): dS K without the scale, or null
    const int* tile_ptr;   // block-sparse: CSR (dq kernel) or its transpose (dkdv kernel)
    const int* tile_idx;
    i64 q_sb, q_sh, q_sn;  // strides in elements: batch, head, row
    i64 k_sb, k_sh, k_sn;
    i64 v_sb, v_sh, v_sn;
    i64 o_sb, o_sh, o_sn;
    i64 do_sb, do_sh, do_sn;
    i64 gq_sb, gq_sh, gq_sn;
    i64 gk_sb, gk_sh, gk_sn;
    i64 gv_sb, gv_sh, gv_sn;
    int batch, nq, nk, d, dv;
    int heads, kv_heads, group;  // query heads, key/value heads, query heads per key/value head
    int m_tiles, n_tiles;        // query and key tiles of the kernel being launched
    int rows_pad;                // scratch rows per (batch, head)
    int dqk;                     // dq_accum row length (padded head dim)
    int mask_heads;              // block-sparse: 1 = one pattern per head, 0 = shared
    float scale;
    float scale_log2;            // scale * log2(e)
};
static_assert(sizeof(BwdArgs) == 368, "BwdArgs must match BWD_ARGS in mma_backward.py");

// The (query head, query tile) pairs a dK/dV thread block visits for its key tile n_tile of one
// (batch, key/value head): the query heads of the GQA group in order and, for each, the query
// tiles from the first one the causal mask lets see the key tile (dense) or its column of the
// transposed block-sparse index. A value type, so the next pair can be looked at ahead.
template <int BLOCK_M, int BLOCK_N, bool CAUSAL, bool SPARSE>
struct QueryTileWalk {
    const int* col_ptr;
    const int* row_idx;
    int n_tile, n_tiles, m_tiles, mask_heads, m_begin, h_end;
    int h, pos, end;

    __device__ __forceinline__ QueryTileWalk(const BwdArgs& a, int n_tile_, int hk)
        : col_ptr(a.tile_ptr), row_idx(a.tile_idx), n_tile(n_tile_), n_tiles(a.n_tiles),
          m_tiles(a.m_tiles), mask_heads(a.mask_heads), m_begin(0), h_end((hk + 1) * a.group) {
        if constexpr (CAUSAL) {
            const int first_row = n_tile * BLOCK_N - (a.nk - a.nq);  // first row that sees the tile
            m_begin = first_row <= 0 ? 0 : first_row >= a.nq ? a.m_tiles : first_row / BLOCK_M;
        }
        open(hk * a.group);
        skip_empty_heads();
    }
    __device__ __forceinline__ bool valid() const { return pos < end; }
    __device__ __forceinline__ int m_tile() const {
        if constexpr (SPARSE) return row_idx[pos];
        return pos;
    }
    __device__ __forceinline__ void next() {
        ++pos;
        skip_empty_heads();
    }

  private:
    __device__ __forceinline__ void open(int head) {
        h = head;
        if constexpr (SPARSE) {
            const int* ptr = col_ptr + (mask_heads ? head * (n_tiles + 1) : 0) + n_tile;
            pos = ptr[0];
            end = ptr[1];
            if constexpr (CAUSAL) pos = lower_bound_index(row_idx, pos, end, m_begin);
        } else {
            pos = m_begin;
            end = m_tiles;
        }
    }
    __device__ __forceinline__ void skip_empty_heads() {
        while (pos >= end && h + 1 < h_end) open(h + 1);
    }
};
