"""Launch of the tensor-core forward kernel (flash_fwd.cu) for float16 / bfloat16."""

from __future__ import annotations

from dataclasses import dataclass

from . import _build
from ._launch import element_type, forward_args, padded_head_dim, vector_aligned

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


def default_tiles(dqk: int, dv: int) -> FwdTiles:
    """Per padded head dim, the fastest tile measured that compiles without register spills. Two
    16-row slabs per warp halve the shared-memory reads per FLOP (each K/V fragment serves both);
    at D = 128 that leaves room for only 32 keys per tile, and at D = 256 for one slab."""
    widest = max(dqk, dv)
    if widest <= 64:
        return FwdTiles(warps=4, mt=2, block_n=64, q_in_regs=True)
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


def variant(dtype, dqk: int, dv: int, tiles: FwdTiles, *, causal: bool, sparse: bool, aligned: bool) -> str:
    return _build.template_expression(
        "flash_fwd", element_type(dtype), dqk, dv, tiles.warps, tiles.mt, tiles.block_n,
        tiles.q_in_regs, causal, sparse, aligned,
    )


def forward(q, k, v, out, lse, *, scale, causal, block_mask=None, tiles: FwdTiles | None = None):
    """Run the forward kernel on 4-D (B, H, N, D) CuPy views; see docs/internals.md."""
    d, dv = q.shape[3], v.shape[3]
    dqk = padded_head_dim(d, "head dim D")
    dvp = padded_head_dim(dv, "value head dim Dv")
    tiles = tiles or default_tiles(dqk, dvp)
    if block_mask is not None:
        tiles = tiles_for_mask(tiles, block_mask.block_size, dqk, dvp)
    args, blocks = forward_args(q, k, v, out, lse, scale=scale, block_mask=block_mask,
                                tile_m=tiles.block_m, tile_n=tiles.block_n)
    aligned = vector_aligned((q, k, v, out), (d, dv))
    expression = variant(q.dtype, dqk, dvp, tiles, causal=causal, sparse=block_mask is not None, aligned=aligned)
    shared = tiles.shared_bytes(dqk, dvp)
    kernel = _build.get_function(SOURCE, expression, shared_bytes=shared)
    kernel((blocks,), (tiles.warps * 32,), (args,), shared_mem=shared)


def main_variants() -> list[tuple[str, str]]:
    """The variants that must compile for every supported architecture without register spills."""
    out = []
    for dtype in ("float16", "bfloat16"):
        for d in (32, 64, 96, 128, 256):
            tiles = default_tiles(d, d)
            for causal in (False, True):
                out.append((SOURCE, variant(dtype, d, d, tiles, causal=causal, sparse=False, aligned=True)))
        out.append((SOURCE, variant(dtype, 128, 128, default_tiles(128, 128), causal=True, sparse=True, aligned=True)))
    out.append((SOURCE, variant("float16", 64, 128, default_tiles(64, 128), causal=False, sparse=False, aligned=False)))
    return out


def flops(batch: int, heads: int, nq: int, nk: int, d: int, dv: int, *, causal: bool) -> float:
    """Matmul FLOPs of the forward pass as the papers count them (causal: half)."""
    total = 2.0 * batch * heads * nq * nk * (d + dv)
    return total / 2 if causal else total


__all__ = ["forward", "FwdTiles", "default_tiles", "variant", "flops"]
