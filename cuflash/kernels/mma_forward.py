"""Launch of the tensor-core forward kernel (flash_fwd.cu) for float16 / bfloat16."""

from __future__ import annotations

from dataclasses import dataclass

from . import _build
from ._launch import (ForwardLaunch, KernelLaunch, element_type, forward_args, mask_type,
                      padded_head_dims, score_mod_type, vector_aligned, why_not_16bit_tiled,
                      why_not_device)

SOURCE = "flash_fwd.cu"


@dataclass(frozen=True)
class FwdTiles:
    """Tile shape of one forward variant: `warps` warps, each owning `mt` 16-row query slabs,
    against `block_n` keys per K/V tile; `q_in_regs` keeps Q's fragments in registers for the
    whole key loop (fewer shared-memory reads, more registers)."""

    warps: int
    mt: int
    block_n: int
    q_in_regs: bool

    @property
    def block_m(self) -> int:
        return self.warps * self.mt * 16

    def shared_bytes(self, dqk: int, dv: int) -> int:
        pad = 8
        return 2 * (self.block_m * (dqk + pad) + self.block_n * (dqk + pad) + self.block_n * (dv + pad))


def default_tiles(dqk: int, dv: int, *, dropout: bool = False) -> FwdTiles:
    """Per padded head dim, the fastest tile measured that compiles without register spills. Two
    16-row slabs per warp halve the shared-memory reads per FLOP (each K/V fragment serves both);
    at D = 128 that leaves room for only 32 keys per tile, and at D = 256 for one slab. With
    dropout, Q stays in shared memory at D = 64: its registers go to the Philox rounds."""
    widest = max(dqk, dv)
    if widest <= 64:
        return FwdTiles(warps=4, mt=2, block_n=64, q_in_regs=not (dropout and widest > 32))
    if widest <= 128:
        return FwdTiles(warps=4, mt=2, block_n=32, q_in_regs=False)
    return FwdTiles(warps=4, mt=1, block_n=64, q_in_regs=False)


def tiles_for_mask(tiles: FwdTiles, block_size, dqk: int, dv: int) -> FwdTiles:
    """Tiles that divide the mask's blocks (the kernel walks the mask refined to its own tiles)."""
    bq, bk = block_size
    if bq % tiles.block_m == 0 and bk % tiles.block_n == 0:
        return tiles
    small = FwdTiles(warps=4, mt=1, block_n=64 if bk % 64 == 0 else 32, q_in_regs=max(dqk, dv) <= 128)
    if bq % small.block_m or bk % small.block_n:
        raise ValueError(
            f"the GPU kernels need block sizes that are multiples of {small.block_m} (queries) "
            f"and 32 (keys); the block mask has block size {tuple(block_size)}"
        )
    return small


def variant(spec, tiles: FwdTiles, *, aligned: bool) -> str:
    """The kernel's template expression; the defaulted flags VARLEN and DROPOUT are spelled only
    when a call needs them (``_build.trailing_flags``)."""
    dqk, dvp = padded_head_dims(spec)
    return _build.template_expression(
        "flash_fwd", element_type(spec.dtype), dqk, dvp, tiles.warps, tiles.mt, tiles.block_n,
        tiles.q_in_regs, mask_type(spec), score_mod_type(spec), aligned,
        *_build.trailing_flags(spec.varlen is not None, spec.has_dropout),
    )


def tiles_for(spec) -> FwdTiles:
    """The tile shape a call runs with: the default for its head dims, refined to divide the
    block mask's blocks."""
    dqk, dvp = padded_head_dims(spec)
    tiles = default_tiles(dqk, dvp, dropout=spec.has_dropout)
    if spec.block_mask is not None:
        tiles = tiles_for_mask(tiles, spec.block_mask.block_size, dqk, dvp)
    return tiles


def supports(spec, arrays) -> str | None:
    """None when this family runs the call, else why not: it takes any 16-bit call on sm_80+,
    packed variable-length sequences and dropout included, together too."""
    return why_not_device(arrays[0]) or why_not_16bit_tiled(spec, tiles_for)


def prepare_forward(spec, arrays, *, tiles: FwdTiles | None = None) -> ForwardLaunch:
    """The forward launch for this spec and the layout of 4-D (B, H, N, D) CuPy views
    ``arrays`` = (q, k, v, out) (docs/internals.md; a varlen call's are packed (total, H, D)):
    compiled kernel, grid and packed arguments."""
    d, dv = spec.shapes.d, spec.shapes.dv
    dqk, dvp = padded_head_dims(spec)
    tiles = tiles or tiles_for(spec)
    args, blocks = forward_args(spec, arrays, tile_m=tiles.block_m, tile_n=tiles.block_n)
    aligned = vector_aligned(arrays, (d, dv))
    shared = tiles.shared_bytes(dqk, dvp)
    kernel = _build.get_function(SOURCE, variant(spec, tiles, aligned=aligned), shared_bytes=shared)
    return ForwardLaunch(KernelLaunch(kernel, blocks, tiles.warps * 32, shared, args))


def forward(q, k, v, out, lse, spec, *, tiles: FwdTiles | None = None):
    """Run the forward kernel on 4-D (B, H, N, D) CuPy views; see docs/internals.md."""
    prepare_forward(spec, (q, k, v, out), tiles=tiles)(q, k, v, out, lse, spec)


def main_variants() -> list[tuple[str, str]]:
    """The variants that must compile for every supported architecture without register spills."""
    from ._variants import dropout_spec_grid, spec_grid, varlen_spec_grid

    out = []
    head_dims = (32, 64, 96, 128, 256)
    for spec in spec_grid(head_dims) + varlen_spec_grid() + dropout_spec_grid(head_dims):
        out.append((SOURCE, variant(spec, tiles_for(spec), aligned=spec.shapes.d % 8 == 0)))
    return list(dict.fromkeys(out))


__all__ = ["forward", "prepare_forward", "supports", "FwdTiles", "default_tiles", "tiles_for", "variant", "main_variants"]
