// Argument structs of the 16-bit kernels, passed by value. Each has a twin NumPy structured
// dtype on the host (FWD_ARGS and BWD_ARGS in _launch.py); the size checks catch a field added
// on one side only. Both end with the same mask and score-modifier fields, which the policies
// of mask.cuh and score_mod.cuh read by name, then the dropout fields (dropout.cuh).
#pragma once
#include "schedule.cuh"
#include "score_mod.cuh"
#include "softmax.cuh"
#include "epilogue.cuh"
#include "dropout.cuh"

// The fields every argument struct ends with (the float32 kernels' structs too).
#define MASK_AND_SCORE_FIELDS                                                                  \
    const int* tile_slot;  /* exact mask: bitmask slot per tile_idx entry (mask.cuh), or null */  \
    const u32* tile_bits;  /* exact mask: bitmasks of the partial tiles, or null */              \
    const float* alibi;  /* ALiBi slopes, (B, Hq) contiguous, or null */                        \
    int window_left;     /* key band, clamped on the host (mask.cuh) */                          \
    int window_right;                                                                          \
    float cap_in;        /* softcap: scale / c */                                              \
    float cap_out;       /* softcap: c * log2(e) */

struct FwdArgs {
    const u16* q;
    const u16* k;
    const u16* v;
    u16* o;
    float* lse;           // (B, Hq, Nq) or varlen (Hq, total_q); null: not stored (store_lse)
    const int* tile_ptr;  // block-sparse: CSR over query tiles (see sparse docs), else null
    const int* tile_idx;
    const int* cu_q;       // packed sequences (varlen): B + 1 query row offsets, else null
    const int* cu_k;       // ... and key row offsets (schedule.cuh, sequence_of)
    i64 q_sb, q_sh, q_sn;  // strides in elements: batch, head, row (varlen: batch stride 0)
    i64 k_sb, k_sh, k_sn;
    i64 v_sb, v_sh, v_sn;
    i64 o_sb, o_sh, o_sn;
    int nq, nk, d, dv;     // varlen: nq, nk are the longest sequence's lengths
    int heads, group;      // query heads; query heads per key/value head
    int m_tiles;           // ceil(nq / BLOCK_M)
    int mask_heads;        // block-sparse: 1 = one pattern per head, 0 = shared
    int total_q;           // varlen: packed query rows (lse is (Hq, total_q)); 0 dense
    float scale_log2;      // softmax scale * log2(e)
    MASK_AND_SCORE_FIELDS
    DROPOUT_FIELDS
    int tail_lanes;        // the TMA forward's last lanes taken query tile by query tile (schedule.cuh)
    int batch;             // B: sequences (varlen: of the TMA forward's packed grid, schedule.cuh)
};
static_assert(sizeof(FwdArgs) == 288, "FwdArgs must match FWD_ARGS in _launch.py");

// One struct for every backward kernel (preprocessing, mma.sync and wgmma variants).
struct BwdArgs {
    const u16* q;
    const u16* k;
    const u16* v;
    const u16* o;
    const u16* dout;
    const float* lse;      // natural log, (B, Hq, Nq) contiguous; varlen (Hq, total_q)
    u16* grad_q;
    u16* grad_k;
    u16* grad_v;
    float* lse2;           // scratch rows (scratch_offset): lse * log2(e), +inf where lse = -inf
    float* delta;          // scratch rows: rowsum(dO * O)
    float* dq_accum;       // scratch rows of dqk floats: dS K without the scale, or null
    const int* tile_ptr;   // block-sparse: CSR (dq kernel) or its transpose (dkdv kernel)
    const int* tile_idx;
    const int* cu_q;       // packed sequences (varlen): B + 1 query row offsets, else null
    const int* cu_k;       // ... and key row offsets (schedule.cuh, sequence_of)
    i64 q_sb, q_sh, q_sn;  // strides in elements: batch, head, row (varlen: batch stride 0)
    i64 k_sb, k_sh, k_sn;
    i64 v_sb, v_sh, v_sn;
    i64 o_sb, o_sh, o_sn;
    i64 do_sb, do_sh, do_sn;
    i64 gq_sb, gq_sh, gq_sn;
    i64 gk_sb, gk_sh, gk_sn;
    i64 gv_sb, gv_sh, gv_sn;
    int batch, nq, nk, d, dv;    // varlen: nq, nk are the longest sequence's lengths
    int heads, kv_heads, group;  // query heads, key/value heads, query heads per key/value head
    int m_tiles, n_tiles;        // query and key tiles of the kernel being launched
    int rows_pad;                // scratch rows per (batch, head); varlen: per head (scratch_offset)
    int dqk;                     // dq_accum row length (padded head dim)
    int mask_heads;              // block-sparse: 1 = one pattern per head, 0 = shared
    int total_q;                 // varlen: packed query rows (lse is (Hq, total_q)); 0 dense
    float scale;
    float scale_log2;            // scale * log2(e)
    MASK_AND_SCORE_FIELDS
    DROPOUT_FIELDS
    int tail_lanes;              // the grid's last lanes taken tile by tile (schedule.cuh): the dK/dV
                                 // kernel's key tiles, the warp-specialised dQ kernel's query tiles
};
static_assert(sizeof(BwdArgs) == 456, "BwdArgs must match BWD_ARGS in _launch.py");
