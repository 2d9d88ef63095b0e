"""Launch of the Hopper backward kernels (flash_bwd_sm90.cu, wgmma, sm_90a) for float16 / bfloat16.

Same entry point as ``mma_backward.backward``; ``supports()`` says whether a call can take this
path (compute capability 9.0, D = Dv ∈ {64, 128}, 16-byte aligned rows, block masks whose blocks
are whole tiles). Everything else belongs to ``mma_backward``.

Three launches: ``flash_bwd_pre`` from flash_bwd.cu (Delta and base-2 lse, padded rows), then
``flash_bwd_sm90_dkdv`` (dK, dV) and ``flash_bwd_sm90_dq`` (dQ). No gradient is accumulated with
atomics, so results are bit-identical from run to run whatever ``deterministic`` says; the
scratch memory is that of the deterministic mma path (``mma_backward.workspace_bytes(...,
deterministic=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass


from . import _build, mma_backward
from ._launch import (KernelLaunch, check_grid, element_type, mask_type, score_mod_type, tile_index,
                      vector_aligned, why_not_dropout_kernel, why_not_hopper_16bit,
                      why_not_varlen)

SOURCE = "flash_bwd_sm90.cu"
ARCH = "sm_90a"  # wgmma has no encoding for any other target; main_variants() compile only here
OPTIONS = (f"-arch={ARCH}",)
HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class Sm90BwdTiles:
    """Tile shapes of the two kernels.

    dk/dv kernel: ``dkdv_warpgroups`` × 64 keys per thread block (one 64-key slab per
    warpgroup), query tiles of ``dkdv_block_m`` rows double-buffered in shared memory.
    dq kernel: ``dq_warpgroups`` × 64 query rows per thread block, key tiles of ``dq_block_n``
    keys double-buffered.
    """

    dkdv_warpgroups: int = 2
    dkdv_block_m: int = 64
    dq_warpgroups: int = 2
    dq_block_n: int = 64

    def __post_init__(self):
        if self.dkdv_block_m not in (64, 128) or self.dq_block_n not in (64, 128):
            raise ValueError(f"{self}: dkdv_block_m and dq_block_n must be 64 or 128")
        if self.dkdv_warpgroups not in (1, 2) or self.dq_warpgroups not in (1, 2):
            # Three warpgroups leave too few registers per thread: the accumulators spill.
            raise ValueError(f"{self}: 1 or 2 warpgroups per kernel")

    @property
    def dkdv_block_n(self) -> int:
        return 64 * self.dkdv_warpgroups

    @property
    def dq_block_m(self) -> int:
        return 64 * self.dq_warpgroups

    def dkdv_shared_bytes(self, d: int) -> int:
        # K, V, two stages of Q and dO, two stages of lse2 + Delta, 1 KB for the 1024-byte alignment.
        bm, bn = self.dkdv_block_m, self.dkdv_block_n
        return 2 * d * (2 * bn + 4 * bm) + 4 * 4 * bm + 1024

    def dq_shared_bytes(self, d: int) -> int:
        bm, bn = self.dq_block_m, self.dq_block_n
        return 2 * d * (2 * bm + 4 * bn) + 1024


def default_tiles(d: int, *, dropout: bool = False) -> Sm90BwdTiles:
    """128 keys per dk/dv block, 128 query rows per dq block against 64-key tiles. Query tiles of
    the dk/dv block: 128 rows at D = 64 (10% faster on an H200, benchmarks/NOTES.md), 64 at
    D = 128 (dK + dV of 64 keys × 128 columns already take 128 registers per thread) and with
    dropout (its keep bits and Philox rounds spill beside a 128-row Sᵀ and dPᵀ)."""
    wide = d <= 64 and not dropout
    return Sm90BwdTiles(dkdv_warpgroups=2, dkdv_block_m=128 if wide else 64, dq_warpgroups=2,
                        dq_block_n=64)


def variant_dkdv(spec, tiles: Sm90BwdTiles) -> str:
    return _build.template_expression(
        "flash_bwd_sm90_dkdv", element_type(spec.dtype), spec.shapes.d, tiles.dkdv_warpgroups,
        tiles.dkdv_block_m, mask_type(spec), score_mod_type(spec),
        *_build.trailing_flags(spec.has_dropout, spec.float32_grads),
    )


def variant_dq(spec, tiles: Sm90BwdTiles) -> str:
    return _build.template_expression(
        "flash_bwd_sm90_dq", element_type(spec.dtype), spec.shapes.d, tiles.dq_warpgroups,
        tiles.dq_block_n, mask_type(spec), score_mod_type(spec),
        *_build.trailing_flags(spec.has_dropout, spec.float32_grads),
    )


def supports(spec, arrays) -> str | None:
    """None when ``backward`` can run this call, else why not: a compute-capability 9.0 device,
    float16 or bfloat16, D = Dv ∈ {64, 128}, 16-byte aligned base pointers and row strides of
    every array, and block masks whose blocks are whole multiples of both kernels' tiles."""
    reason = why_not_dropout_kernel(spec) or why_not_varlen(spec, "Hopper wgmma backward")
    if reason:
        return reason
    q = arrays[0]
    reason = why_not_hopper_16bit(spec, q)
    if reason:
        return reason
    d, dv = spec.shapes.d, spec.shapes.dv
    if d != dv or d not in HEAD_DIMS:
        return f"takes D = Dv in {HEAD_DIMS}; got D={d}, Dv={dv}"
    if not vector_aligned(list(arrays), (d, dv)):
        return "needs 16-byte aligned rows and strides"
    if spec.block_mask is not None:
        tiles = default_tiles(d, dropout=spec.has_dropout)
        bq, bk = spec.block_mask.block_size
        if (bq % tiles.dkdv_block_m or bq % tiles.dq_block_m
                or bk % tiles.dkdv_block_n or bk % tiles.dq_block_n):
            return f"needs block-mask blocks that are multiples of 128x128; got {bq}x{bk}"
    return None


def prepare_backward(spec, arrays, *, tiles: Sm90BwdTiles | None = None):
    """The backward launches (a ``mma_backward.BackwardLaunch``) for this spec and the layout of
    4-D (B, H, N, D) CuPy views ``arrays`` = (q, k, v, dout, out, dq, dk, dv); see
    docs/internals.md. The caller checks ``supports()`` first. Always deterministic (no
    atomics): every gradient element is written by exactly one thread block, whatever
    ``spec.deterministic`` says."""
    q, k, v, dout, out, dq, dk, dv = arrays
    batch, heads, nq, d = q.shape
    kv_heads, nk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    if d != dv_dim or d not in HEAD_DIMS:
        raise ValueError(f"the sm_90 backward kernels take D = Dv in {HEAD_DIMS}; got D={d}, Dv={dv_dim}")
    tiles = tiles or default_tiles(d, dropout=spec.has_dropout)
    scratch = mma_backward.Scratch.of(spec, atomic_dq=False)
    args = mma_backward.argument_packer(spec, arrays, rows_pad=scratch.rows_pad)

    # 1. Delta and lse2 (flash_bwd.cu's preprocessing; `out` may be any view).
    launches = [mma_backward.preprocess_launch(
        args, spec, rows_pad=scratch.rows_pad, aligned=vector_aligned((out, dout), (dv_dim,)),
        zero_dq=False)]

    # 2. dK, dV: one block per key tile; 3. dQ: one block per query tile.
    kernels = (
        (variant_dkdv, tiles.dkdv_block_m, tiles.dkdv_block_n, tiles.dkdv_shared_bytes(d),
         tiles.dkdv_warpgroups, True),
        (variant_dq, tiles.dq_block_m, tiles.dq_block_n, tiles.dq_shared_bytes(d),
         tiles.dq_warpgroups, False),
    )
    for variant, tile_m, tile_n, shared, warpgroups, by_key in kernels:
        m_tiles, n_tiles = -(-nq // tile_m), -(-nk // tile_n)
        index = tile_index(spec, tile_m, tile_n, by_key=by_key)
        expression = variant(spec, tiles)
        kernel = _build.get_function(SOURCE, expression, shared_bytes=shared, options=OPTIONS)
        blocks = check_grid(n_tiles * kv_heads * batch if by_key else m_tiles * heads * batch,
                            expression)
        launches.append(KernelLaunch(kernel, blocks, 128 * warpgroups, shared,
                                     args(m_tiles, n_tiles, index)))
    return mma_backward.BackwardLaunch(scratch, tuple(launches))


def backward(dout, q, k, v, out, lse, dq, dk, dv, spec, *, tiles: Sm90BwdTiles | None = None):
    """Write dq, dk, dv for 4-D (B, H, N, D) CuPy views; see docs/internals.md and
    ``prepare_backward``."""
    arrays = (q, k, v, dout, out, dq, dk, dv)
    prepare_backward(spec, arrays, tiles=tiles)(dout, q, k, v, out, lse, dq, dk, dv, spec)


def main_variants() -> list[tuple[str, str]]:
    """The variants that must compile for ARCH (sm_90a only) without register spills."""
    from ._variants import dropout_spec_grid, float32_grads_specs, spec_grid

    dropout = [spec for spec in dropout_spec_grid(HEAD_DIMS) if spec.shapes.d == spec.shapes.dv]
    out = []
    for spec in spec_grid(HEAD_DIMS) + float32_grads_specs(HEAD_DIMS) + dropout:
        tiles = default_tiles(spec.shapes.d, dropout=spec.has_dropout)
        out += [(SOURCE, variant_dkdv(spec, tiles)), (SOURCE, variant_dq(spec, tiles))]
    return list(dict.fromkeys(out))


__all__ = ["backward", "prepare_backward", "supports", "main_variants", "Sm90BwdTiles", "default_tiles", "ARCH"]
