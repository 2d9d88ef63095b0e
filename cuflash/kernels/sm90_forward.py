"""Launch of the Hopper forward kernel (flash_fwd_sm90.cu, wgmma, sm_90a) for float16 / bfloat16.

Same entry point as ``mma_forward.forward``; ``supports()`` says whether a call can take this path
(compute capability 9.0, D = Dv ∈ {64, 128}, 16-byte aligned rows, block masks whose blocks are
whole tiles). Everything else belongs to ``mma_forward``.
"""

from __future__ import annotations

from dataclasses import dataclass


from . import _build
from ._launch import (ForwardLaunch, KernelLaunch, element_type, forward_args, mask_type,
                      score_mod_type, vector_aligned, why_not_dropout, why_not_hopper_16bit,
                      why_not_varlen)

SOURCE = "flash_fwd_sm90.cu"
ARCH = "sm_90a"  # wgmma has no encoding for any other target; main_variants() compile only here
OPTIONS = (f"-arch={ARCH}",)
HEAD_DIMS = (64, 128)



@dataclass(frozen=True)
class Sm90Tiles:
    """Tile shape of one variant: `warpgroups` × 64 query rows against `block_n` keys per K/V
    tile, with a ring of `stages` K and V buffers."""

    warpgroups: int = 2
    block_n: int = 128
    stages: int = 2

    @property
    def block_m(self) -> int:
        return 64 * self.warpgroups

    @property
    def threads(self) -> int:
        return 128 * self.warpgroups

    def shared_bytes(self, d: int) -> int:
        # Q, the K and V rings, and 1 KB to round the base up to the swizzle's 1024-byte alignment.
        return 2 * d * (self.block_m + 2 * self.stages * self.block_n) + 1024


def default_tiles(d: int) -> Sm90Tiles:
    """Measured best on an H200 (benchmarks/NOTES.md): at D = 64, 64-key tiles three stages deep
    (396-412 TFLOP/s against 336-373 for 128-key tiles); at D = 128, 128-key tiles, two stages."""
    if d <= 64:
        return Sm90Tiles(warpgroups=2, block_n=64, stages=3)
    return Sm90Tiles(warpgroups=2, block_n=128, stages=2)


def variant(spec, tiles: Sm90Tiles) -> str:
    return _build.template_expression(
        "flash_fwd_sm90", element_type(spec.dtype), spec.shapes.d, tiles.warpgroups, tiles.block_n,
        tiles.stages, mask_type(spec), score_mod_type(spec),
    )


def supports(spec, arrays) -> str | None:
    """None when ``forward`` can run this call, else why not: it needs a compute-capability 9.0
    device, float16 or bfloat16, D = Dv ∈ {64, 128}, 16-byte aligned base pointers and row
    strides, and block masks whose blocks are whole multiples of the tile."""
    reason = why_not_dropout(spec) or why_not_varlen(spec, "Hopper wgmma forward")
    if reason:
        return reason
    q, k, v, out = arrays
    reason = why_not_hopper_16bit(spec, q)
    if reason:
        return reason
    d, dv = spec.shapes.d, spec.shapes.dv
    if d != dv or d not in HEAD_DIMS:
        return f"takes D = Dv in {HEAD_DIMS}; got D={d}, Dv={dv}"
    if not vector_aligned((q, k, v, out), (d, dv)):
        return "needs 16-byte aligned rows and strides"
    if spec.block_mask is not None:
        tiles = default_tiles(d)
        bq, bk = spec.block_mask.block_size
        if bq % tiles.block_m or bk % tiles.block_n:
            return (f"needs block-mask blocks that are multiples of its {tiles.block_m}x{tiles.block_n} "
                    f"tiles; got {bq}x{bk}")
    return None


def prepare_forward(spec, arrays, *, tiles: Sm90Tiles | None = None) -> ForwardLaunch:
    """The forward launch for this spec and the layout of 4-D (B, H, N, D) CuPy views
    ``arrays`` = (q, k, v, out) (docs/internals.md): compiled kernel, grid and packed arguments.
    The caller checks ``supports()`` first."""
    q, k, v, out = arrays
    d, dv = q.shape[3], v.shape[3]
    if d != dv or d not in HEAD_DIMS:
        raise ValueError(f"the sm_90 forward kernel takes D = Dv in {HEAD_DIMS}; got D={d}, Dv={dv}")
    tiles = tiles or default_tiles(d)
    args, blocks = forward_args(spec, arrays, tile_m=tiles.block_m, tile_n=tiles.block_n)
    shared = tiles.shared_bytes(d)
    kernel = _build.get_function(SOURCE, variant(spec, tiles), shared_bytes=shared, options=OPTIONS)
    return ForwardLaunch(KernelLaunch(kernel, blocks, tiles.threads, shared, args))


def forward(q, k, v, out, lse, spec, *, tiles: Sm90Tiles | None = None):
    """Run the Hopper forward kernel on 4-D (B, H, N, D) CuPy views; see docs/internals.md.
    The caller checks ``supports()`` first."""
    prepare_forward(spec, (q, k, v, out), tiles=tiles)(q, k, v, out, lse, spec)


def main_variants() -> list[tuple[str, str]]:
    """The variants that must compile for ARCH (sm_90a only) without register spills."""
    from ._variants import spec_grid

    return [(SOURCE, variant(spec, default_tiles(spec.shapes.d))) for spec in spec_grid(HEAD_DIMS)]


__all__ = ["forward", "prepare_forward", "supports", "main_variants", "Sm90Tiles", "default_tiles", "variant", "ARCH"]
