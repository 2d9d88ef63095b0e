"""Launch of the float32 kernels (flash_f32.cu): CUDA-core FlashAttention, forward and backward.

float32 inputs stay float32 in every product (no TF32, no 16-bit operands), so the result is as
accurate as a plain float32 implementation. The backward pass runs three kernels: a per-row
preparation (Delta = rowsum(dO ∘ O)), dK/dV (a block per key tile, walking the
query tiles of every query head of its group) and dQ (a block per query tile, walking key tiles).
Each output element is written by one thread in a fixed order, so the gradients are
deterministic whatever ``deterministic`` says. Masks (causal, window, block mask) and score
modifiers (softcap, ALiBi) are the kernels' template policies, keyed from the call's
``AttentionSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from . import _build, _launch
from ._launch import (
    F32,
    I32,
    I64,
    LOG2E,
    MASK_AND_SCORE_FIELDS,
    NO_TILE_INDEX,
    PTR,
    check_grid,
    make_struct_dtype,
    mask_and_score_values,
    mask_heads,
    mask_type,
    pack_struct,
    padded_head_dims,
    pointer,
    score_mod_type,
    stride_fields,
    tile_index,
    vector_aligned,
    why_not_dropout,
    why_not_lengths,
    why_not_varlen,
)

SOURCE = "flash_f32.cu"
THREADS = 256  # every kernel runs a 16 x 16 thread grid
_FLOAT = 4     # bytes

# F32FwdArgs in flash_f32.cu.
FWD_ARGS = make_struct_dtype(
    [("q", PTR), ("k", PTR), ("v", PTR), ("o", PTR), ("lse", PTR), ("tile_ptr", PTR), ("tile_idx", PTR)]
    + [(f"{t}_s{a}", I64) for t in "qkvo" for a in "bhn"]
    + [(n, I32) for n in ("nq", "nk", "d", "dv", "heads", "group", "m_tiles", "mask_heads")]
    + [("scale", F32), ("scale_log2", F32)]
    + MASK_AND_SCORE_FIELDS
)
assert FWD_ARGS.itemsize == 232, "FWD_ARGS must match F32FwdArgs in csrc/flash_f32.cu"

# F32BwdArgs in flash_f32.cu: tile_ptr / tile_idx are the block mask's CSR for the dQ kernel and
# its transpose for the dK/dV kernel.
_BWD_TENSORS = ("q", "k", "v", "o", "do", "dq", "dk", "dv")
BWD_ARGS = make_struct_dtype(
    [(n, PTR) for n in ("q", "k", "v", "o", "dout", "lse", "dq_out", "dk_out", "dv_out", "delta",
                        "tile_ptr", "tile_idx")]
    + [(f"{t}_s{a}", I64) for t in _BWD_TENSORS for a in "bhn"]
    + [(n, I32) for n in ("batch", "nq", "nk", "d", "dv", "heads", "group", "m_tiles", "n_tiles",
                          "mask_heads")]
    + [("scale", F32), ("scale_log2", F32)]
    + MASK_AND_SCORE_FIELDS
)
assert BWD_ARGS.itemsize == 376, "BWD_ARGS must match F32BwdArgs in csrc/flash_f32.cu"


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

# Each kernel: its template name, preferred tiles and shared-memory footprint.
_KERNELS = {
    "forward": ("flash_f32_fwd", _FORWARD_TILES, F32Tiles.forward_bytes),
    "dkdv": ("flash_f32_bwd_dkdv", _DKDV_TILES, F32Tiles.dkdv_bytes),
    "dq": ("flash_f32_bwd_dq", _DQ_TILES, F32Tiles.dq_bytes),
}
PREP_KERNEL = "flash_f32_bwd_prep"




def _preferred(table, dqk: int, dv: int) -> F32Tiles:
    widest = max(dqk, dv)
    return next(tiles for limit, tiles in sorted(table.items()) if widest <= limit)


def _fitting(kernel: str, spec, shared_limit: int) -> list[F32Tiles]:
    """The candidate tiles of `kernel` ("forward", "dkdv" or "dq") that fit in `shared_limit`
    bytes of shared memory per block, preferred first and smallest last."""
    _, table, footprint = _KERNELS[kernel]
    dqk, dv = padded_head_dims(spec)
    candidates = (_preferred(table, dqk, dv),) + _FALLBACK
    fitting = [t for t in candidates if footprint(t, dqk, dv) <= shared_limit]
    if not fitting:
        raise RuntimeError(
            f"the float32 kernels need {footprint(candidates[-1], dqk, dv)} bytes of shared memory "
            f"per block for head dims ({dqk}, {dv}); this device allows {shared_limit}")
    return fitting


def _divides(tiles: F32Tiles, block_mask) -> bool:
    bq, bk = (int(x) for x in block_mask.block_size)
    return bq % tiles.block_m == 0 and bk % tiles.block_n == 0


def tiles_for(kernel: str, spec, shared_limit: int) -> F32Tiles:
    """The tiles `kernel` ("forward", "dkdv" or "dq") runs this call with on a device that allows
    `shared_limit` bytes of shared memory per block: the first that fit and divide the block
    mask's blocks."""
    fitting = _fitting(kernel, spec, shared_limit)
    if spec.block_mask is not None:
        for tiles in fitting:
            if _divides(tiles, spec.block_mask):
                return tiles
    # No fitting tile divides the mask's blocks: device_csr raises a ValueError that says so.
    return fitting[0]


def variant(kernel: str, spec, tiles: F32Tiles, *, aligned: bool) -> str:
    """The template expression of `kernel` ("forward", "dkdv" or "dq") for this call."""
    name = _KERNELS[kernel][0]
    return _build.template_expression(
        name, *padded_head_dims(spec), tiles.block_m, tiles.block_n, mask_type(spec), score_mod_type(spec),
        aligned)


def supports(spec, arrays) -> str | None:
    """None when this family runs the call (forward and backward alike), else why not: it takes
    float32, head dims up to 256, and block masks whose blocks some tile that fits the device's
    shared memory divides (multiples of 16 everywhere)."""
    reason = (_launch.why_not_device(arrays[0]) or why_not_dropout(spec)
              or why_not_varlen(spec, "float32"))
    if reason:
        return reason
    if spec.dtype.name != "float32":
        return f"takes float32 only, not {spec.dtype.name}"
    reason = why_not_lengths(spec)
    if reason:
        return reason
    try:
        limit = _launch.shared_limit(arrays[0].device.id)
        fitting = [_fitting(kernel, spec, limit) for kernel in _KERNELS]
    except (ValueError, RuntimeError) as error:
        return str(error)
    if spec.block_mask is not None:
        for candidates in fitting:
            if not any(_divides(tiles, spec.block_mask) for tiles in candidates):
                bq, bk = spec.block_mask.block_size
                return (f"needs block-mask blocks that are multiples of {candidates[-1].block_m} "
                        f"(queries) and {candidates[-1].block_n} (keys); got {bq}x{bk}")
    return None


def forward(q, k, v, out, lse, spec, *, tiles: F32Tiles | None = None):
    """out, lse ← attention(q, k, v) on 4-D (B, H, N, D) float32 CuPy views; see
    docs/internals.md."""
    batch, heads, nq, d = q.shape
    kv_heads, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    dqk, dvp = padded_head_dims(spec)
    tiles = tiles or tiles_for("forward", spec, _launch.shared_limit(q.device.id))
    m_tiles = -(-nq // tiles.block_m)
    blocks = check_grid(m_tiles * heads * batch, "the float32 forward kernel")

    expression = variant("forward", spec, tiles, aligned=vector_aligned((q, k, v, out)))
    shared = tiles.forward_bytes(dqk, dvp)
    args = pack_struct(
        FWD_ARGS,
        q=pointer(q), k=pointer(k), v=pointer(v), o=pointer(out), lse=pointer(lse),
        **tile_index(spec, tiles.block_m, tiles.block_n), **stride_fields("qkvo", (q, k, v, out)),
        nq=nq, nk=nk, d=d, dv=dv, heads=heads, group=heads // kv_heads, m_tiles=m_tiles,
        mask_heads=mask_heads(spec), scale=spec.scale, scale_log2=spec.scale * LOG2E,
        **mask_and_score_values(spec),
    )
    kernel = _build.get_function(SOURCE, expression, shared_bytes=shared)
    kernel((blocks,), (THREADS,), (args,), shared_mem=shared)


def workspace_of(spec, arrays=None) -> dict[str, int]:
    """The device memory this call's backward allocates besides the gradients, by part
    (``cuflash.kernel_plan``): Delta, one float per query row and head (for any views
    ``arrays``)."""
    s = spec.shapes
    return {"Delta": 4 * s.b * s.hq * s.nq}


def backward(dout, q, k, v, out, lse, dq, dk, dv, spec,
             *, tiles: tuple[F32Tiles, F32Tiles] | None = None):
    """dq, dk, dv ← gradients of attention on 4-D float32 CuPy views (docs/internals.md); dk/dv
    summed over each GQA group.

    ``spec.deterministic`` has no effect: no kernel here uses atomics, so repeated calls always
    give identical bits. ``tiles`` overrides the (dK/dV, dQ) tile shapes.
    """
    import cupy

    batch, heads, nq, d = q.shape
    kv_heads, nk, dvh = k.shape[1], k.shape[2], v.shape[3]
    dqk, dvp = padded_head_dims(spec)
    if tiles is None:
        limit = _launch.shared_limit(q.device.id)
        tiles = (tiles_for("dkdv", spec, limit), tiles_for("dq", spec, limit))
    kv_tiles, q_tiles = tiles
    dkdv_blocks = -(-nk // kv_tiles.block_n) * kv_heads * batch
    dq_blocks = -(-nq // q_tiles.block_m) * heads * batch
    rows = batch * heads * nq
    prep_blocks = -(-rows // (THREADS // 32))
    for blocks in (dkdv_blocks, dq_blocks, prep_blocks):
        check_grid(blocks, "the float32 backward kernels")

    delta = cupy.empty(rows, dtype=numpy.float32)
    tensors = (q, k, v, out, dout, dq, dk, dv)
    aligned = vector_aligned(tensors)
    common = dict(
        q=pointer(q), k=pointer(k), v=pointer(v), o=pointer(out), dout=pointer(dout),
        lse=pointer(lse), dq_out=pointer(dq), dk_out=pointer(dk), dv_out=pointer(dv),
        delta=pointer(delta), **stride_fields(_BWD_TENSORS, tensors),
        batch=batch, nq=nq, nk=nk, d=d, dv=dvh, heads=heads, group=heads // kv_heads,
        mask_heads=mask_heads(spec), scale=spec.scale, scale_log2=spec.scale * LOG2E,
        **mask_and_score_values(spec),
    )

    def launch(expression, blocks, shared, launch_tiles=None, by_key=False):
        m_tiles = n_tiles = 0
        index = NO_TILE_INDEX
        if launch_tiles is not None:
            m_tiles = -(-nq // launch_tiles.block_m)
            n_tiles = -(-nk // launch_tiles.block_n)
            index = tile_index(spec, launch_tiles.block_m, launch_tiles.block_n, by_key=by_key)
        args = pack_struct(BWD_ARGS, m_tiles=m_tiles, n_tiles=n_tiles, **index, **common)
        kernel = _build.get_function(SOURCE, expression, shared_bytes=shared)
        kernel((blocks,), (THREADS,), (args,), shared_mem=shared)

    launch(PREP_KERNEL, prep_blocks, 0)
    launch(variant("dkdv", spec, kv_tiles, aligned=aligned), dkdv_blocks,
           kv_tiles.dkdv_bytes(dqk, dvp), kv_tiles, by_key=True)
    launch(variant("dq", spec, q_tiles, aligned=aligned), dq_blocks,
           q_tiles.dq_bytes(dqk, dvp), q_tiles)


def main_variants() -> list[tuple[str, str]]:
    """(source, expression) pairs for the compile check: the row preparation kernel, then the
    forward, dK/dV and dQ kernels with their preferred tiles for every spec of the variant grid
    (head dims 64, 128 and 256, dense and causal; each mask policy and score modifier at 128)."""
    from ._variants import spec_grid

    pairs = [(SOURCE, PREP_KERNEL)]
    for spec in spec_grid(head_dims=(64, 128, 256), dtypes=("float32",)):
        for kernel, (_, table, _) in _KERNELS.items():
            tiles = _preferred(table, *padded_head_dims(spec))
            pairs.append((SOURCE, variant(kernel, spec, tiles, aligned=True)))
    return list(dict.fromkeys(pairs))


__all__ = ["forward", "backward", "workspace_of", "supports", "F32Tiles", "tiles_for", "variant", "main_variants",
           "FWD_ARGS", "BWD_ARGS"]
