"""Launch of the float32 kernels (flash_f32.cu): CUDA-core FlashAttention, forward and backward.

float32 inputs stay float32 in every product (no TF32, no 16-bit operands), so the result is as
accurate as a plain float32 implementation. The backward pass runs three kernels: a per-row
preparation (Delta = rowsum(dO ∘ O)), dK/dV (a block per key tile, walking the
query tiles of every query head of its group) and dQ (a block per query tile, walking key tiles).
Each output element is written by one thread in a fixed order, so the gradients are
deterministic whatever ``deterministic`` says.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy

from . import _build
from ._launch import (
    F32,
    I32,
    I64,
    PTR,
    check_grid,
    make_struct_dtype,
    pack_struct,
    padded_head_dim,
    pointer,
    stride_fields,
    vector_aligned,
)

SOURCE = "flash_f32.cu"
LOG2E = 1.4426950408889634
THREADS = 256  # every kernel runs a 16 x 16 thread grid
_FLOAT = 4     # bytes

FWD_ARGS = make_struct_dtype(
    [("q", PTR), ("k", PTR), ("v", PTR), ("o", PTR), ("lse", PTR), ("tile_ptr", PTR), ("tile_idx", PTR)]
    + [(f"{t}_s{a}", I64) for t in "qkvo" for a in "bhn"]
    + [(n, I32) for n in ("nq", "nk", "d", "dv", "heads", "group", "m_tiles", "mask_heads")]
    + [("scale", F32), ("scale_log2", F32)]
)

_BWD_TENSORS = ("q", "k", "v", "o", "do", "dq", "dk", "dv")
BWD_ARGS = make_struct_dtype(
    [(n, PTR) for n in ("q", "k", "v", "o", "dout", "lse", "dq_out", "dk_out", "dv_out", "delta",
                        "row_ptr", "col_idx", "col_ptr", "row_idx")]
    + [(f"{t}_s{a}", I64) for t in _BWD_TENSORS for a in "bhn"]
    + [(n, I32) for n in ("batch", "nq", "nk", "d", "dv", "heads", "group", "m_tiles", "n_tiles",
                          "mask_heads")]
    + [("scale", F32)]
)


def _operand_stride(cols: int) -> int:
    return cols + 4  # OperandTile<COLS>::STRIDE


def _score_stride(cols: int) -> int:
    return cols if cols % 32 == 16 else cols + 16  # ScoreTile<COLS>::STRIDE


@dataclass(frozen=True)
class F32Tiles:
    """Tile shape of one kernel: `block_m` query rows by `block_n` keys (multiples of 16; each
    thread of the 16 x 16 grid computes block_m/16 x block_n/16 scores)."""

    block_m: int
    block_n: int

    # Shared-memory footprints, in the order the kernels carve them (flash_f32.cu).
    def forward_bytes(self, dqk: int, dv: int) -> int:
        m, n = self.block_m, self.block_n
        return _FLOAT * ((m + n) * _operand_stride(dqk) + n * _operand_stride(dv)
                         + m * _score_stride(n))

    def dq_bytes(self, dqk: int, dv: int) -> int:
        m, n = self.block_m, self.block_n
        return _FLOAT * ((m + n) * (_operand_stride(dqk) + _operand_stride(dv))
                         + m * _score_stride(n))

    def dkdv_bytes(self, dqk: int, dv: int) -> int:
        m, n = self.block_m, self.block_n
        return _FLOAT * ((m + n) * (_operand_stride(dqk) + _operand_stride(dv))
                         + 2 * n * _score_stride(m))


# Preferred tiles per kernel and widest padded head dim, then smaller ones for devices with less
# shared memory per block (sm_86 / sm_89: 99 KiB) or block masks with small blocks. Every size
# divides 64, so masks with 64- or 128-wide blocks run on the first choice that fits.
_FALLBACK = (F32Tiles(32, 32), F32Tiles(32, 16), F32Tiles(16, 16))
_FORWARD_TILES = {64: F32Tiles(64, 64), 128: F32Tiles(64, 32), 256: F32Tiles(64, 32)}
_DQ_TILES = {64: F32Tiles(64, 64), 128: F32Tiles(64, 32), 256: F32Tiles(32, 32)}
_DKDV_TILES = {64: F32Tiles(64, 64), 128: F32Tiles(32, 64), 256: F32Tiles(32, 32)}


def _preferred(table, dqk: int, dv: int) -> F32Tiles:
    widest = max(dqk, dv)
    return next(tiles for limit, tiles in sorted(table.items()) if widest <= limit)


def _choose(table, footprint, dqk: int, dv: int, block_mask, shared_limit: int) -> F32Tiles:
    """The first tiles that fit in `shared_limit` bytes and divide the mask's blocks."""
    candidates = (_preferred(table, dqk, dv),) + _FALLBACK
    fitting = [t for t in candidates if footprint(t, dqk, dv) <= shared_limit]
    if not fitting:
        raise RuntimeError(
            f"the float32 kernels need {footprint(candidates[-1], dqk, dv)} bytes of shared memory "
            f"per block for head dims ({dqk}, {dv}); this device allows {shared_limit}")
    if block_mask is not None:
        bq, bk = (int(x) for x in block_mask.block_size)
        for tiles in fitting:
            if bq % tiles.block_m == 0 and bk % tiles.block_n == 0:
                return tiles
    # No fitting tile divides the mask's blocks: device_csr raises a ValueError that says so.
    return fitting[0]


@functools.lru_cache(maxsize=None)
def _shared_limit(device_id: int) -> int:
    from cupy.cuda import runtime

    return int(runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id))


def _device_shared_limit() -> int:
    import cupy

    return _shared_limit(cupy.cuda.Device().id)


def _expression(name: str, dqk: int, dv: int, tiles: F32Tiles, *, causal: bool, sparse: bool,
                aligned: bool) -> str:
    return _build.template_expression(
        name, dqk, dv, tiles.block_m, tiles.block_n, causal, sparse, aligned)


def forward_variant(dqk: int, dv: int, tiles: F32Tiles, *, causal: bool, sparse: bool,
                    aligned: bool) -> str:
    return _expression("flash_f32_fwd", dqk, dv, tiles, causal=causal, sparse=sparse,
                       aligned=aligned)


def dkdv_variant(dqk: int, dv: int, tiles: F32Tiles, *, causal: bool, sparse: bool,
                 aligned: bool) -> str:
    return _expression("flash_f32_bwd_dkdv", dqk, dv, tiles, causal=causal, sparse=sparse,
                       aligned=aligned)


def dq_variant(dqk: int, dv: int, tiles: F32Tiles, *, causal: bool, sparse: bool,
               aligned: bool) -> str:
    return _expression("flash_f32_bwd_dq", dqk, dv, tiles, causal=causal, sparse=sparse,
                       aligned=aligned)


PREP_KERNEL = "flash_f32_bwd_prep"


def forward(q, k, v, out, lse, *, scale, causal, block_mask=None, tiles: F32Tiles | None = None):
    """out, lse ← attention(q, k, v) on 4-D (B, H, N, D) float32 CuPy views; see
    docs/internals.md."""
    batch, heads, nq, d = q.shape
    kv_heads, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    dqk = padded_head_dim(d, "head dim D")
    dvp = padded_head_dim(dv, "value head dim Dv")
    if tiles is None:
        tiles = _choose(_FORWARD_TILES, F32Tiles.forward_bytes, dqk, dvp, block_mask,
                        _device_shared_limit())
    m_tiles = -(-nq // tiles.block_m)
    blocks = m_tiles * heads * batch
    check_grid(blocks, "the float32 forward kernel")

    tile_ptr = tile_idx = None
    if block_mask is not None:
        csr = block_mask.device_csr(tiles.block_m, tiles.block_n)
        tile_ptr, tile_idx = csr.row_ptr, csr.col_idx
    aligned = vector_aligned((q, k, v, out))
    expression = forward_variant(dqk, dvp, tiles, causal=causal, sparse=block_mask is not None,
                                 aligned=aligned)
    shared = tiles.forward_bytes(dqk, dvp)
    args = pack_struct(
        FWD_ARGS,
        q=pointer(q), k=pointer(k), v=pointer(v), o=pointer(out), lse=pointer(lse),
        tile_ptr=pointer(tile_ptr), tile_idx=pointer(tile_idx),
        **stride_fields("qkvo", (q, k, v, out)),
        nq=nq, nk=nk, d=d, dv=dv, heads=heads, group=heads // kv_heads, m_tiles=m_tiles,
        mask_heads=int(block_mask is not None and block_mask.num_heads is not None),
        scale=scale, scale_log2=scale * LOG2E,
    )
    kernel = _build.get_function(SOURCE, expression, shared_bytes=shared)
    kernel((blocks,), (THREADS,), (args,), shared_mem=shared)


def backward(dout, q, k, v, out, lse, dq, dk, dv, *, scale, causal, block_mask=None,
             deterministic=False, tiles: tuple[F32Tiles, F32Tiles] | None = None):
    """dq, dk, dv ← gradients of attention on 4-D float32 CuPy views (docs/internals.md); dk/dv
    summed over each GQA group.

    ``deterministic`` is accepted for the common signature and has no effect: no kernel here
    uses atomics, so repeated calls always give identical bits. ``tiles`` overrides the
    (dK/dV, dQ) tile shapes.
    """
    import cupy

    del deterministic
    batch, heads, nq, d = q.shape
    kv_heads, nk, dvh = k.shape[1], k.shape[2], v.shape[3]
    dqk = padded_head_dim(d, "head dim D")
    dvp = padded_head_dim(dvh, "value head dim Dv")
    if tiles is None:
        limit = _device_shared_limit()
        tiles = (_choose(_DKDV_TILES, F32Tiles.dkdv_bytes, dqk, dvp, block_mask, limit),
                 _choose(_DQ_TILES, F32Tiles.dq_bytes, dqk, dvp, block_mask, limit))
    kv_tiles, q_tiles = tiles
    dkdv_blocks = -(-nk // kv_tiles.block_n) * kv_heads * batch
    dq_blocks = -(-nq // q_tiles.block_m) * heads * batch
    rows = batch * heads * nq
    prep_blocks = -(-rows // (THREADS // 32))
    for blocks in (dkdv_blocks, dq_blocks, prep_blocks):
        check_grid(blocks, "the float32 backward kernels")

    sparse = block_mask is not None
    mask_heads = int(sparse and block_mask.num_heads is not None)
    row_ptr = col_idx = col_ptr = row_idx = None
    if sparse:
        kv_csr = block_mask.device_csr(kv_tiles.block_m, kv_tiles.block_n)
        q_csr = block_mask.device_csr(q_tiles.block_m, q_tiles.block_n)
        col_ptr, row_idx = kv_csr.col_ptr, kv_csr.row_idx
        row_ptr, col_idx = q_csr.row_ptr, q_csr.col_idx

    delta = cupy.empty(rows, dtype=numpy.float32)
    aligned = vector_aligned((q, k, v, out, dout, dq, dk, dv))
    tensors = (q, k, v, out, dout, dq, dk, dv)
    common = dict(
        q=pointer(q), k=pointer(k), v=pointer(v), o=pointer(out), dout=pointer(dout),
        lse=pointer(lse), dq_out=pointer(dq), dk_out=pointer(dk), dv_out=pointer(dv),
        delta=pointer(delta),
        row_ptr=pointer(row_ptr), col_idx=pointer(col_idx), col_ptr=pointer(col_ptr),
        row_idx=pointer(row_idx), **stride_fields(_BWD_TENSORS, tensors),
        batch=batch, nq=nq, nk=nk, d=d, dv=dvh, heads=heads, group=heads // kv_heads,
        mask_heads=mask_heads, scale=scale,
    )

    def launch(expression, launch_tiles, blocks, shared):
        if launch_tiles is None:
            m_tiles = n_tiles = 0
        else:
            m_tiles = -(-nq // launch_tiles.block_m)
            n_tiles = -(-nk // launch_tiles.block_n)
        args = pack_struct(BWD_ARGS, m_tiles=m_tiles, n_tiles=n_tiles, **common)
        kernel = _build.get_function(SOURCE, expression, shared_bytes=shared)
        kernel((blocks,), (THREADS,), (args,), shared_mem=shared)

    launch(PREP_KERNEL, None, prep_blocks, 0)
    options = dict(causal=causal, sparse=sparse, aligned=aligned)
    launch(dkdv_variant(dqk, dvp, kv_tiles, **options), kv_tiles, dkdv_blocks,
           kv_tiles.dkdv_bytes(dqk, dvp))
    launch(dq_variant(dqk, dvp, q_tiles, **options), q_tiles, dq_blocks,
           q_tiles.dq_bytes(dqk, dvp))


def variants_for(dqk: int, dv: int, *, causal: bool, sparse: bool = False, aligned: bool = True):
    """The (source, expression) pairs that one problem's forward and backward compile, with the
    preferred tiles."""
    options = dict(causal=causal, sparse=sparse, aligned=aligned)
    return [
        (SOURCE, forward_variant(dqk, dv, _preferred(_FORWARD_TILES, dqk, dv), **options)),
        (SOURCE, dkdv_variant(dqk, dv, _preferred(_DKDV_TILES, dqk, dv), **options)),
        (SOURCE, dq_variant(dqk, dv, _preferred(_DQ_TILES, dqk, dv), **options)),
    ]


def main_variants():
    """(source, expression) pairs for the compile check: head dims 64, 128 and 256, causal and
    not, forward and backward, plus the row preparation kernel."""
    pairs = [(SOURCE, PREP_KERNEL)]
    for dim in (64, 128, 256):
        for causal in (False, True):
            pairs += variants_for(dim, dim, causal=causal)
    return pairs


def flops(batch: int, heads: int, nq: int, nk: int, d: int, dv: int, *, causal: bool) -> float:
    """Matmul FLOPs of the forward pass as the papers count them (causal: half)."""
    total = 2.0 * batch * heads * nq * nk * (d + dv)
    return total / 2 if causal else total


__all__ = ["forward", "backward", "F32Tiles", "main_variants", "variants_for", "flops"]
