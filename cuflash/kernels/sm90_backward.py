"""Launch of the Hopper backward kernels (flash_bwd_sm90.cu, wgmma, sm_90a) for float16 / bfloat16.

Same entry point as ``mma_backward.backward``; ``supports()`` says whether a call can take this
path (compute capability 9.0, D and Dv up to 256, 16-byte aligned rows, block masks whose blocks
are whole tiles; packed variable-length sequences too). Everything else belongs to
``mma_backward``. The kernels hold one head dim for Q/K and V/dO, 64, 128 or 256
(``tile_head_dim``): narrower calls run it with zero columns past D and Dv, which the loads fill
and the stores skip. At 256 (D or Dv above 128) the warp-specialised dK/dV kernel's two consumers
share one 64-key tile, one keeping dV and the other dK, and dQ always comes from a dQ kernel (the
deterministic sequence, whatever ``deterministic`` says), the warp-specialised one
(``flash_bwd_sm90_dq_ws``, ``dq_ring``) unless a block mask has 64-row blocks: no fused dQ, no
cp.async dK/dV kernel, no dropout, exact masks or packed sequences there (``why_not_options``).

Two launch sequences, both starting with ``flash_bwd_pre`` from flash_bwd.cu (Delta and base-2
lse, padded rows):
- default (``deterministic=False``): ``flash_bwd_sm90_dkdv`` with the fused dQ (dK, dV, and dS·K
  added by bulk reduce-adds into a float32 dQ accumulator that flash_bwd_pre zeroes), then
  ``flash_bwd_dq_convert``. Five GEMMs per tile pair; the float adds of several blocks land in
  any order. Scratch is that of the mma path's default, ``mma_backward.workspace_bytes``: lse2,
  Delta and the accumulator, 4·D bytes per query row and head (256 MiB at B = 1, Hq = 16,
  Nq = 64K, D = 64), with D the tile's head dim (128 at D = 96). Dense calls in the
  warp-specialised kernel (``lanes_counted``) also count each lane's ((batch, key/value head))
  finished key tiles, 4 bytes per lane, so that the cast takes a lane as soon as its dQ is
  whole, beside the grid's last wave (``CAST_DQ_BY_LANE``), and under a band keep a claim per
  32 query rows and head (4 bytes): the first key tile to claim a dQ tile stores its part, the
  others add theirs after it, so that where every dQ tile gets a part the accumulator needs no
  zeros (``claims_dq_tiles``, ``dq_zeros_needed``).
- ``deterministic=True`` where ``ordered_dq`` says (warp-specialised kernel, no block-sparse or
  exact mask): the first sequence with the fused dQ's adds in key-tile order (flash_bwd_sm90.cu,
  ORDERED_DQ: one semaphore per 32 scratch rows, zeroed by flash_bwd_pre; rank 0's part is
  stored, so the same zeros go as in the default), bit-identical run to run with five GEMMs per
  tile pair. Scratch: the default's plus 4 bytes per 32 query rows and head.
- other ``deterministic=True`` calls: ``flash_bwd_sm90_dkdv`` (dK, dV) and ``flash_bwd_sm90_dq``
  (dQ, with S and dP recomputed: seven GEMMs per tile pair). No gradient is accumulated by two
  blocks, so results are bit-identical from run to run; scratch is lse2 and Delta only.
Calls the fused dQ cannot take (``fused_dq_pays``: dropout's 64-row query tiles at D = 64 in the
cp.async kernel, whose warpgroups cannot take turns at forming dQ as the warp-specialised one's
do; packed sequences at D = 64 in the cp.async kernel) run the deterministic sequence whatever
``deterministic`` says.

The dK/dV kernel is ``flash_bwd_sm90_dkdv_ws`` wherever it fits (``producer_fits``, views TMA can
describe): a TMA producer warpgroup feeds two consumer warpgroups through mbarriers.
``CUFLASH_SM90_BWD_WS=0`` keeps the cp.async kernel (every thread loads), for comparison. Packed
sequences take the warp-specialised kernel with the fused dQ (their TMA rows offset by each
sequence's first row, a right bound past every key where the call has none:
``keys_past_end_banded``); with dropout or ``deterministic`` they take the cp.async kernel. The
fused dQ's accumulator keeps the order of the warps' wgmma fragments (csrc/schedule.cuh,
``dq_fragment_offset``), which ``flash_bwd_dq_convert`` undoes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from .. import _mask
from .._mask import UNBOUNDED
from . import _build, _launch, _tma, mma_backward
from ._launch import (KernelLaunch, check_grid, element_type, mask_type, score_mod_type, tile_index,
                      vector_aligned, why_not_hopper_16bit)

SOURCE = "flash_bwd_sm90.cu"
ARCH = "sm_90a"  # wgmma has no encoding for any other target; main_variants() compile only here
OPTIONS = (f"-arch={ARCH}",)
HEAD_DIMS = (64, 128, 256)  # the tile's head dim: a call's D and Dv, padded to the next of these
SPLIT_HEAD_DIM = 256  # the tile whose dK/dV consumers split the gradients (flash_bwd_sm90.cu, SplitDkdvSmem)


def tile_head_dim(spec) -> int:
    """The head dim of the tiles that run this call: D and Dv padded to 64, 128 or 256 (either
    larger than 256: 0, which no kernel of this family takes)."""
    widest = max(spec.shapes.d, spec.shapes.dv)
    return next((d for d in HEAD_DIMS if widest <= d), 0)


@dataclass(frozen=True)
class Sm90BwdTiles:
    """Tile shapes of the two kernels.

    dk/dv kernel: ``dkdv_warpgroups`` × 64 keys per thread block (one 64-key slab per
    warpgroup), query tiles of ``dkdv_block_m`` rows double-buffered in shared memory; with
    ``split_gradients`` (the 256-column tile) one 64-key slab whose dV one warpgroup keeps and dK
    the other, against 64-row query tiles.
    dq kernel: ``dq_warpgroups`` × 64 query rows per thread block, key tiles of ``dq_block_n``
    keys double-buffered.
    """

    dkdv_warpgroups: int = 2
    dkdv_block_m: int = 64
    dq_warpgroups: int = 2
    dq_block_n: int = 64
    split_gradients: bool = False

    def __post_init__(self):
        if self.dkdv_block_m not in (64, 128) or self.dq_block_n not in (64, 128):
            raise ValueError(f"{self}: dkdv_block_m and dq_block_n must be 64 or 128")
        if self.dkdv_warpgroups not in (1, 2) or self.dq_warpgroups not in (1, 2):
            # Three warpgroups leave too few registers per thread: the accumulators spill.
            raise ValueError(f"{self}: 1 or 2 warpgroups per kernel")
        if self.split_gradients and (self.dkdv_warpgroups, self.dkdv_block_m) != (2, 64):
            raise ValueError(f"{self}: split gradients take two warpgroups and 64-row query tiles")

    @property
    def dkdv_block_n(self) -> int:
        return 64 if self.split_gradients else 64 * self.dkdv_warpgroups

    @property
    def dq_block_m(self) -> int:
        return 64 * self.dq_warpgroups

    def dkdv_shared_bytes(self, d: int, *, atomic_dq: bool = False) -> int:
        # K, V, two stages of Q and dO, (the fused dQ's dSᵀ tile and the staging floats of its dQ
        # parts, 64 rows per warpgroup, or by turns a whole tile per warpgroup: one channel to
        # the writer each,) two stages of lse2 + Delta, (two scratch-row indices and the dQ
        # writer's tile header per channel,) 1 KB for the 1024-byte alignment.
        # Split gradients: P in float32 instead of the fused dQ's.
        bm, bn = self.dkdv_block_m, self.dkdv_block_n
        by_turns = self.fused_dq_by_turns(d)
        parts, channels = (1, self.dkdv_warpgroups) if by_turns else (self.dkdv_warpgroups, 1)
        fused = 2 * bn * bm + channels * (parts * 64 * self.fused_dq_columns(d) * 4 + 16) + 16
        p_float32 = 4 * bn * bm if self.split_gradients else 0
        return 2 * d * (2 * bn + 4 * bm) + (fused if atomic_dq else 0) + p_float32 + 4 * 4 * bm + 1024

    def fused_dq_columns(self, d: int) -> int:
        """Columns of the dQ part each dK/dV warpgroup computes with the fused dQ (flash_bwd_sm90.cu,
        FusedDq): all D when the query tile has a 64-row part per warpgroup or when the
        warpgroups take turns (``fused_dq_by_turns``), else D / warpgroups of a 64-row tile; 0
        for other shapes (one warpgroup against 128 rows, split gradients), which it cannot deal
        out."""
        if self.split_gradients:
            return 0
        if self.dkdv_block_m == 64 * self.dkdv_warpgroups or self.fused_dq_by_turns(d):
            return d
        if self.dkdv_block_m == 64:
            return d // self.dkdv_warpgroups
        return 0

    def fused_dq_by_turns(self, d: int) -> bool:
        """Whether the fused dQ of a 64-row query tile goes whole to one warpgroup in turn
        (FusedDq::BY_TURNS; the warp-specialised kernel only): where D / warpgroups would be
        narrower than the 64-column parts the kernels instantiate (D = 64 with two warpgroups)."""
        return (not self.split_gradients and self.dkdv_block_m == 64 and self.dkdv_warpgroups > 1
                and d // self.dkdv_warpgroups < 64)

    def dq_shared_bytes(self, d: int) -> int:
        bm, bn = self.dq_block_m, self.dq_block_n
        return 2 * d * (2 * bm + 4 * bn) + 1024


def default_tiles(d: int, *, dropout: bool = False) -> Sm90BwdTiles:
    """128 keys per dk/dv block, 64 query rows per dq block (one warpgroup) against 64-key tiles.
    Query tiles of the dk/dv block: 128 rows at D = 64 (10% faster on an H200,
    benchmarks/NOTES.md), 64 at D = 128 (dK + dV of 64 keys × 128 columns already take 128
    registers per thread) and with dropout (its keep bits and Philox rounds spill beside a
    128-row Sᵀ and dPᵀ). The dq kernel's one warpgroup lets two to four blocks share an SM, so
    one block's softmax runs under another's GEMMs: 0-15% faster than two warpgroups in
    lockstep on an H200 (benchmarks/NOTES.md, "The Hopper dQ kernel with one warpgroup"). The
    256-column tile: 64 keys whose dV and dK the two dk/dv warpgroups keep one each (two stages
    of 64-row K and V tiles and a 64-row Q and dO take the dq block 192 KB of shared memory)."""
    if d == SPLIT_HEAD_DIM:
        return Sm90BwdTiles(dkdv_warpgroups=2, dkdv_block_m=64, dq_warpgroups=1, dq_block_n=64,
                            split_gradients=True)
    wide = d <= 64 and not dropout
    return Sm90BwdTiles(dkdv_warpgroups=2, dkdv_block_m=128 if wide else 64, dq_warpgroups=1,
                        dq_block_n=64)


def fused_dq_pays(spec, tiles: Sm90BwdTiles, producer: bool) -> bool:
    """Whether the fused dQ is the faster sequence for this call in the dK/dV kernel ``producer``
    names (warp-specialised or not): each warpgroup's dQ part must be at least 64 columns wide
    (the narrowest wgmma tile the kernels instantiate), and parts formed by turns need the
    warp-specialised kernel's dQ writer. Packed sequences at D = 64 in the cp.async kernel take
    the two kernels: its fused variant spills 16 bytes there."""
    d = tile_head_dim(spec)
    return (tiles.fused_dq_columns(d) >= 64 and (producer or not tiles.fused_dq_by_turns(d))
            and not (d == 64 and spec.varlen is not None and not producer))


def fuses_dq(spec, tiles: Sm90BwdTiles, producer: bool) -> bool:
    """Whether the dK/dV kernel also forms dQ (float32 adds in any order): for calls that do not
    ask for ``deterministic``, where it pays."""
    return not spec.deterministic and fused_dq_pays(spec, tiles, producer)


def ordered_dq_fits(spec, tiles: Sm90BwdTiles) -> bool:
    """Whether the fused dQ can add in key-tile order for this call (flash_bwd_sm90.cu,
    ORDERED_DQ: bit-identical sums): where it pays, in the warp-specialised kernel, with no
    block-sparse or exact mask (whose key tiles per query tile are no range) and no packed
    sequences (the semaphores follow a dense call's accumulator)."""
    return (fused_dq_pays(spec, tiles, True) and producer_fits(spec) and spec.block_mask is None
            and not spec.exact and spec.varlen is None)


def ordered_dq(spec, tiles: Sm90BwdTiles, producer: bool) -> bool:
    """Whether a ``deterministic`` call takes the fused dQ with ordered adds instead of the dQ
    kernel: where the dK/dV kernel runs warp-specialised and ``ordered_dq_fits`` (0.84-1.04x the
    default's backward on an H200, against 0.77-0.95x for the dQ kernel: benchmarks/NOTES.md,
    "Hopper backward v8"), unless CUFLASH_SM90_ORDERED_DQ=0 asks for the dQ kernel."""
    from . import ORDERED_DQ_ENV

    return (spec.deterministic and producer and os.environ.get(ORDERED_DQ_ENV) != "0"
            and ordered_dq_fits(spec, tiles))


# At most this many key tiles per (batch, key/value head) rotate their walks (rotated_dq).
ROTATED_MAX_KEY_TILES = 16


def rotated_dq(spec, tiles: Sm90BwdTiles) -> bool:
    """Whether an ordered fused dQ (``ordered_dq``) rotates its walks (flash_bwd_sm90.cu,
    ROTATED_DQ): each key tile starts at its own query tile, so that a head's key tiles do not
    queue behind one another at each query tile's adds. Without a band, dropout or float32
    gradients (not measured with them), with at least as many query tiles as key tiles and at most
    ROTATED_MAX_KEY_TILES key tiles per head (its blocks then also wait on blocks launched after
    them, so all must be in flight at once). On an H200 it took the deterministic backward at 2K
    keys from 0.85x the default's speed to 0.97x (D = 64) and from 0.87x to 0.96x (D = 128); a
    first version that also rotated 64 key tiles (8K keys at D = 128) lost 3-5% there
    (benchmarks/NOTES.md, "Rotated walks for the ordered dQ")."""
    s = spec.shapes
    m_tiles, n_tiles = -(-s.nq // tiles.dkdv_block_m), -(-s.nk // tiles.dkdv_block_n)
    return (not (spec.banded or spec.has_dropout or spec.float32_grads)
            and n_tiles <= min(m_tiles, ROTATED_MAX_KEY_TILES))


def planned_producer(spec, arrays=None) -> bool:
    """Whether the dK/dV kernel runs warp-specialised for this call (``warp_specialised``): for
    the views ``arrays`` (q, k, v, dout, out, dq, dk, dv), or where none are given for views TMA
    can describe (freshly allocated ones)."""
    return producer_wanted(spec) if arrays is None else warp_specialised(spec, arrays)


def describe_call(spec, arrays=None) -> str:
    """The launch sequence this call runs (``cuflash.kernel_plan``) with the views ``arrays``
    (``planned_producer``): views TMA cannot describe keep the cp.async dK/dV kernel."""
    producer = planned_producer(spec, arrays)
    dkdv = "warp-specialised dK/dV kernel" if producer else "dK/dV kernel"
    tiles = default_tiles(tile_head_dim(spec), dropout=spec.has_dropout)
    if fuses_dq(spec, tiles, producer):
        return f"the {dkdv} forming dQ too (float32 adds in any order: not bit-identical run to run)"
    if ordered_dq(spec, tiles, producer):
        return (f"the {dkdv} forming dQ too, its float32 adds in key-tile order (bit-identical run "
                f"to run)")
    dq = ("warp-specialised dQ kernel" if dq_ring(spec, tiles) else "dQ kernel")
    return f"a {dkdv}, then a {dq} (bit-identical run to run)"


# Whether the cast of a fused dQ whose lanes are counted (``lanes_counted``) goes lane by lane
# beside the dK/dV grid's last wave (True) or after the whole grid. Read when a call is prepared:
# to compare, set it and clear the prepared calls (``cuflash._calls.clear()``). Either way the
# dK/dV kernel counts, so dK and dV come from the same code.
CAST_DQ_BY_LANE = True


def lanes_counted(spec, ordered: bool, atomic_dq: bool, producer: bool) -> bool:
    """Whether the dK/dV kernel counts each lane's ((batch, key/value head)) finished key tiles
    in the workspace, so that the dQ cast can start on a lane as soon as its dQ is whole: the
    warp-specialised kernel (``producer``) adding dQ in any order (``atomic_dq`` and not
    ``ordered``, whose semaphores take the counters' place) into a dense call's accumulator.
    The kernel's twin of this rule: csrc/flash_bwd_sm90.cu, lanes_counted."""
    return producer and atomic_dq and not ordered and spec.varlen is None


def dq_route(spec, tiles: Sm90BwdTiles, producer: bool) -> tuple[bool, bool, bool]:
    """``(ordered, atomic_dq, counted)``: whether the dK/dV kernel adds dQ in key-tile order
    (``ordered_dq``), whether it forms dQ at all, in any order or ordered (else a dQ kernel
    does), and whether it counts its lanes' finished key tiles (``lanes_counted``)."""
    ordered = ordered_dq(spec, tiles, producer)
    atomic_dq = fuses_dq(spec, tiles, producer) or ordered
    return ordered, atomic_dq, lanes_counted(spec, ordered, atomic_dq, producer)


# Whether a fused dQ that stores each dQ tile's first part (ordered adds, or lanes counted) goes
# without the accumulator's zeros where every dQ tile gets a part (True), or has them written all
# the same (False). Read when a call is prepared: to compare, set it and clear the prepared calls
# (``cuflash._calls.clear()``). Either way the dK/dV kernel stores first parts.
SKIP_DQ_ZEROS = True


def claims_dq_tiles(spec, counted: bool) -> bool:
    """Whether the dK/dV kernel's adds in any order, whose lanes are counted (``counted``),
    claim their dQ tiles, the first claim storing its part: under a band (the kernel's twin:
    csrc/flash_bwd_sm90.cu, claims_dq_tiles)."""
    return counted and spec.banded


def stores_first_parts(spec, ordered: bool, counted: bool) -> bool:
    """Whether the dK/dV kernel stores each dQ tile's first part instead of adding it
    (csrc/flash_bwd_sm90.cu, write_dq_parts): ordered adds (rank 0's), and claimed ones
    (``claims_dq_tiles``: the first claim's)."""
    return ordered or claims_dq_tiles(spec, counted)


def dq_zeros_needed(spec, ordered: bool, atomic_dq: bool, counted: bool) -> bool:
    """Whether flash_bwd_pre zeroes the fused dQ's float32 accumulator (route ``dq_route``):
    wherever the dK/dV kernel forms dQ, except where it stores each dQ tile's first part
    (``stores_first_parts``) and every dQ tile gets a part: no block or exact mask, and every
    query row sees a key."""
    if not atomic_dq:
        return False
    s = spec.shapes
    every_tile_has_a_part = (spec.block_mask is None and not spec.exact and spec.varlen is None
                             and _mask.every_row_sees_a_key(s.nq, s.nk, *spec.band()))
    return not (SKIP_DQ_ZEROS and stores_first_parts(spec, ordered, counted) and every_tile_has_a_part)


def scratch_of(spec, ordered: bool, atomic_dq: bool, counted: bool) -> mma_backward.Scratch:
    """The workspace of this call's backward on the route ``dq_route`` gives: lse2 and Delta,
    and where the dK/dV kernel forms dQ its float32 accumulator (rows of the tile's D floats,
    fragment order), with the ordered adds' semaphores or (``counted``: ``lanes_counted``) the
    lane counters, 4 bytes per (batch, key/value head), and where those adds claim their dQ tiles
    (``claims_dq_tiles``) the claims, 4 bytes per 32 query rows and head."""
    return mma_backward.Scratch.of(spec, atomic_dq=atomic_dq, dqk=tile_head_dim(spec), semaphores=ordered,
                                   lane_counters=counted, tile_claims=claims_dq_tiles(spec, counted))


def workspace_of(spec, arrays=None) -> dict[str, int]:
    """The device memory this call's backward allocates besides the gradients, by part
    (``cuflash.kernel_plan``; for the kernel ``describe_call`` names for the same views)."""
    tiles = default_tiles(tile_head_dim(spec), dropout=spec.has_dropout)
    return scratch_of(spec, *dq_route(spec, tiles, planned_producer(spec, arrays))).parts()


def step_dims(spec) -> tuple[int, ...]:
    """The kernels' trailing ``QK_DIM, DP_DIM``: D and Dv rounded up to 16, the columns the
    k16 steps of S = Q·Kᵀ and dP = dO·Vᵀ cover (csrc/flash_bwd_sm90.cu, HeadSteps); ``()``
    where both fill the tile (its default), as at D = Dv = 64, 128 and 256."""
    tile = tile_head_dim(spec)
    dims = tuple(-(-x // 16) * 16 for x in (spec.shapes.d, spec.shapes.dv))
    return () if dims == (tile, tile) else dims


def _flags_and_steps(spec, *flags: bool) -> tuple:
    """A variant's trailing flags, then its step_dims: every flag spelled where step dims
    follow them, else only up to the last true one (_build.trailing_flags)."""
    dims = step_dims(spec)
    return (*map(bool, flags), *dims) if dims else _build.trailing_flags(*flags)


def variant_dkdv(spec, tiles: Sm90BwdTiles, *, atomic_dq: bool = False) -> str:
    return _build.template_expression(
        "flash_bwd_sm90_dkdv", element_type(spec.dtype), tile_head_dim(spec), tiles.dkdv_warpgroups,
        tiles.dkdv_block_m, mask_type(spec), score_mod_type(spec),
        *_flags_and_steps(spec, spec.has_dropout, spec.float32_grads, atomic_dq, spec.varlen is not None),
    )


def variant_dkdv_ws(spec, tiles: Sm90BwdTiles, *, atomic_dq: bool = False,
                    ordered_dq: bool = False, rotated_dq: bool = False) -> str:
    """The warp-specialised dK/dV kernel (a TMA producer warpgroup); ``ordered_dq``: the fused
    dQ's adds in key-tile order; ``rotated_dq``: their walks rotated."""
    return _build.template_expression(
        "flash_bwd_sm90_dkdv_ws", element_type(spec.dtype), tile_head_dim(spec), tiles.dkdv_warpgroups,
        tiles.dkdv_block_m, mask_type(spec), score_mod_type(spec),
        *_flags_and_steps(spec, spec.has_dropout, spec.float32_grads, atomic_dq or ordered_dq, ordered_dq,
                          rotated_dq, spec.varlen is not None),
    )


# Query rows per thread block of the warp-specialised dQ kernel (DqRingSmem::BLOCK_M).
DQ_RING_BLOCK_M = 128


def dq_ring(spec, tiles: Sm90BwdTiles) -> bool:
    """Whether the call's dQ kernel is the warp-specialised ``flash_bwd_sm90_dq_ws`` (a TMA
    producer and two consumer warpgroups over 128-row query tiles): the 256-column tile, unless a
    block mask's blocks are not whole 128-row tiles (they need only be multiples of the cp.async
    dQ kernel's 64 rows, which then runs). That kernel holds one warpgroup per SM at this width
    (192 KB of shared memory)."""
    mask = spec.block_mask
    return tiles.split_gradients and (mask is None or mask.block_size[0] % DQ_RING_BLOCK_M == 0)


def dq_ring_shared_bytes(spec) -> int:
    """Dynamic shared memory of ``flash_bwd_sm90_dq_ws`` for this call (DqRingSmem in
    flash_bwd_sm90.cu): Q and dO (the boxes that hold a real column), two K buffers, two V buffers
    where 227 KB holds them, else one, the lse2 and Delta rows and 1 KB for the alignment. The
    number of V buffers is the kernel's own (DqRingSmem::V_STAGES, by this same rule): the launch
    must give it every byte it lays out. Its mbarriers (at most 72 bytes) are static shared
    memory, beside these bytes and under the same 227 KB: every figure here is a whole number of
    KB, so the rule leaves them at least 1 KB (tests/test_sm90_backward_shared.py)."""
    qk_dim, dp_dim = step_dims(spec) or (SPLIT_HEAD_DIM, SPLIT_HEAD_DIM)
    qk_boxes, dp_boxes = -(-qk_dim // 64), -(-dp_dim // 64)
    bm, bn = DQ_RING_BLOCK_M, 64
    fixed = (qk_boxes + dp_boxes) * bm * 128 + 2 * qk_boxes * bn * 128 + 2 * bm * 4 + 1024
    v_stage = dp_boxes * bn * 128
    return fixed + (2 if fixed + 2 * v_stage <= 227 * 1024 else 1) * v_stage


def variant_dq_ws(spec) -> str:
    """The warp-specialised dQ kernel of the 256-column tile (``dq_ring``)."""
    return _build.template_expression(
        "flash_bwd_sm90_dq_ws", element_type(spec.dtype), SPLIT_HEAD_DIM, 64, mask_type(spec),
        score_mod_type(spec), *_flags_and_steps(spec, spec.float32_grads),
    )


def variant_dq(spec, tiles: Sm90BwdTiles) -> str:
    return _build.template_expression(
        "flash_bwd_sm90_dq", element_type(spec.dtype), tile_head_dim(spec), tiles.dq_warpgroups,
        tiles.dq_block_n, mask_type(spec), score_mod_type(spec),
        *_flags_and_steps(spec, spec.has_dropout, spec.float32_grads, spec.varlen is not None),
    )


def supports(spec, arrays) -> str | None:
    """None when ``backward`` can run this call, else why not: a compute-capability 9.0 device,
    float16 or bfloat16, D and Dv up to 256 (above 128: views TMA can describe, and the options
    ``why_not_options`` allows), 16-byte aligned base pointers, row strides and row widths of
    every array, block masks whose blocks are whole multiples of both kernels' tiles, and packed
    rows that the tiles' int32 arithmetic can count (``_launch.why_not_tile_rows``)."""
    q = arrays[0]
    reason = why_not_hopper_16bit(spec, q) or mma_backward.why_not_scratch(spec)
    if reason:
        return reason
    d, dv = spec.shapes.d, spec.shapes.dv
    if not tile_head_dim(spec):
        return f"takes D and Dv up to {HEAD_DIMS[-1]}; got D={d}, Dv={dv}"
    reason = why_not_options(spec)
    if reason:
        return reason
    if not vector_aligned(list(arrays), (d, dv)):
        return "needs 16-byte aligned rows and strides"
    if tile_head_dim(spec) == SPLIT_HEAD_DIM and not warp_specialised(spec, arrays):
        from . import WARP_SPECIALISED_BACKWARD_ENV

        return (f"takes D or Dv above 128 only in the warp-specialised dK/dV kernel: views TMA can "
                f"describe, and {WARP_SPECIALISED_BACKWARD_ENV} not 0")
    tiles = default_tiles(tile_head_dim(spec), dropout=spec.has_dropout)
    if spec.block_mask is not None:
        bq, bk = spec.block_mask.block_size
        rows = math.lcm(tiles.dkdv_block_m, tiles.dq_block_m)
        keys = math.lcm(tiles.dkdv_block_n, tiles.dq_block_n)
        if bq % rows or bk % keys:
            return f"needs block-mask blocks that are multiples of {rows}x{keys}; got {bq}x{bk}"
    # Packed sequences: the warp-specialised dK/dV kernel cuts each into its own key tiles, at
    # packed rows counted in int32 (the family's largest tiles bound what its kernels form).
    return _launch.why_not_tile_rows(spec, max(tiles.dkdv_block_m, tiles.dq_block_m),
                                     max(tiles.dkdv_block_n, tiles.dq_block_n))


def why_not_options(spec) -> str | None:
    """The options this family's kernels cannot combine (None if it can): dropout beside softcap
    or ALiBi on 128-column tiles (D or Dv above 64), which no dK/dV kernel of it compiles within
    255 registers without spills; on the 256-column tile (D or Dv above 128), dropout, exact masks
    and packed sequences, which its split dK/dV kernel does not implement. The mma.sync family
    takes those calls."""
    d = tile_head_dim(spec)
    if spec.has_dropout and d == 128 and (spec.has_softcap or spec.has_alibi):
        return "does not take dropout beside softcap or ALiBi with D or Dv above 64"
    if d == SPLIT_HEAD_DIM:
        for present, what in ((spec.has_dropout, "dropout"), (spec.exact, "exact masks"),
                              (spec.varlen is not None, "packed sequences")):
            if present:
                return f"does not take {what} with D or Dv above 128"
    return None


def producer_fits(spec) -> bool:
    """Whether the warp-specialised dK/dV kernel takes this call: calls whose consumers compile
    within the 240 registers setmaxnreg gives them without spills (dropout beside a score
    modifier spills 4-24 bytes; exact masks on the 64-column tile, ``exact_fits_narrow_tile``),
    and packed sequences with the fused dQ: neither dropout nor ``deterministic`` (the variants
    without the fused dQ spill 4-8 bytes; the cp.async kernel keeps those calls)."""
    return (not (spec.varlen is not None and (spec.has_dropout or spec.deterministic))
            and not (spec.exact and tile_head_dim(spec) == 64 and not exact_fits_narrow_tile(spec))
            and not (spec.has_dropout and (spec.has_softcap or spec.has_alibi)))


def keys_past_end_banded(spec):
    """The spec the warp-specialised dK/dV kernel runs a packed-sequence call under. Its TMA
    loads bring the next sequence's keys past a sequence's end where dense calls get zeros, which
    a mask without a right bound leaves in Pᵀ (zero keys add nothing to dQ; these would). So a
    call without one takes a right bound of the longest query length, which every key of a
    sequence passes, and the band's test then drops the keys past Nk (csrc/softmax.cuh,
    mask_probs_transposed): the same keys are seen, through the band variant of the kernel. (No
    more than total_q, which every sequence's length is within too, so that the band's int32
    arithmetic cannot wrap for a max_seqlen_q given far larger than needed.)"""
    left, right = spec.band()
    if spec.varlen is None or right != UNBOUNDED:
        return spec
    return dataclasses.replace(spec, window=(left, min(spec.shapes.nq, spec.varlen.total_q)))


def exact_fits_narrow_tile(spec) -> bool:
    """Whether an exact mask on the 64-column tile (D, Dv ≤ 64) compiles in the warp-specialised
    dK/dV kernel without spills, as compiled with NVRTC 13.0 and 13.5: the variants with the
    fused dQ (adds in any order; with dropout, on its 64-row tiles, formed by turns) and at most
    a right-hand band (causal) and softcap. A left-hand band spills 4-12 bytes there, ALiBi 40,
    and the variant without the fused dQ (what deterministic calls launch) 4-8."""
    tiles = default_tiles(tile_head_dim(spec), dropout=spec.has_dropout)
    left, _ = spec.band()
    return fuses_dq(spec, tiles, True) and left == UNBOUNDED and not spec.has_alibi


def producer_wanted(spec) -> bool:
    """Whether the call should take the warp-specialised dK/dV kernel: wherever it fits, unless
    CUFLASH_SM90_BWD_WS=0 asks for the cp.async kernel (for comparison)."""
    from . import WARP_SPECIALISED_BACKWARD_ENV

    return os.environ.get(WARP_SPECIALISED_BACKWARD_ENV) != "0" and producer_fits(spec)


def warp_specialised(spec, arrays) -> bool:
    """Whether the dK/dV kernel runs warp-specialised (flash_bwd_sm90_dkdv_ws: a TMA producer
    warpgroup feeding the consumers through mbarriers): ``producer_wanted``, and q, k, v and
    dout are views TMA can describe."""
    if not producer_wanted(spec):
        return False
    q, k, v, dout = arrays[:4]
    return all(_tma.why_not_expressible(_tma.tma_view(x)) is None for x in (q, k, v, dout))


# BWD_POINTERS of the tensors the warp-specialised dK/dV kernel reads through TMA: q, k, v, dout.
WARP_SPECIALISED_MAP_POINTERS = (0, 1, 2, 4)


def prepare_backward(spec, arrays, *, tiles: Sm90BwdTiles | None = None):
    """The backward launches (a ``mma_backward.BackwardLaunch``) for this spec and the layout of
    4-D (B, H, N, D) CuPy views ``arrays`` = (q, k, v, dout, out, dq, dk, dv) (a varlen call's are
    packed (total, H, D): every grid covers the longest sequence but the warp-specialised dK/dV
    kernel's, which holds each sequence's own key tiles); see docs/internals.md and the
    module docstring for the two launch sequences. The caller checks ``supports()`` first."""
    q, k, v, dout, out, dq, dk, dv = arrays
    s = spec.shapes
    batch, heads, nq = s.b, s.hq, s.nq
    kv_heads, nk, dv_dim = s.hkv, s.nk, s.dv
    d = tile_head_dim(spec)
    if not d:
        raise ValueError(f"the sm_90 backward kernels take D and Dv up to {HEAD_DIMS[-1]}; "
                         f"got D={s.d}, Dv={dv_dim}")
    tiles = tiles or default_tiles(d, dropout=spec.has_dropout)
    producer = warp_specialised(spec, arrays)
    if producer:
        spec = keys_past_end_banded(spec)
    if tiles.split_gradients and not producer:
        raise ValueError("split dK/dV gradients (D or Dv above 128) need the warp-specialised kernel")
    ordered, atomic_dq, counted = dq_route(spec, tiles, producer)
    scratch = scratch_of(spec, ordered, atomic_dq, counted)
    args = mma_backward.argument_packer(spec, arrays, rows_pad=scratch.rows_pad, dqk=d)

    # 1. Delta and lse2 (flash_bwd.cu's preprocessing; `out` may be any view), and the zeroed
    # dQ accumulator of the fused dQ where it needs zeros (and the semaphores of its ordered adds,
    # or its lane counters and tile claims).
    launches = [mma_backward.preprocess_launch(
        args, spec, rows_pad=scratch.rows_pad, aligned=vector_aligned((out, dout), (dv_dim,)),
        zero_dq=dq_zeros_needed(spec, ordered, atomic_dq, counted), zero_semaphores=ordered, zero_lanes=counted,
        zero_claims=scratch.tile_claims > 0)]

    # 2. dK, dV (and the fused dQ): one block per key tile; 3. dQ: one block per query tile, or
    # the accumulator's cast.
    if producer:
        dkdv = variant_dkdv_ws(spec, tiles, atomic_dq=atomic_dq, ordered_dq=ordered,
                               rotated_dq=ordered and rotated_dq(spec, tiles))
    else:
        dkdv = variant_dkdv(spec, tiles, atomic_dq=atomic_dq)
    kernels = [(dkdv, tiles.dkdv_block_m, tiles.dkdv_block_n, tiles.dkdv_shared_bytes(d, atomic_dq=atomic_dq),
                tiles.dkdv_warpgroups + producer, True)]
    ring = not atomic_dq and dq_ring(spec, tiles)
    if ring:
        kernels.append((variant_dq_ws(spec), DQ_RING_BLOCK_M, tiles.dq_block_n, dq_ring_shared_bytes(spec),
                        3, False))  # a producer and two consumer warpgroups
    elif not atomic_dq:
        kernels.append((variant_dq(spec, tiles), tiles.dq_block_m, tiles.dq_block_n,
                        tiles.dq_shared_bytes(d), tiles.dq_warpgroups, False))
    for expression, tile_m, tile_n, shared, warpgroups, by_key in kernels:
        m_tiles, n_tiles = -(-nq // tile_m), -(-nk // tile_n)
        if expression == dkdv:
            dkdv_key_tiles = n_tiles  # each lane's count once its key tiles have added (lanes_after)
        index = tile_index(spec, tile_m, tile_n, by_key=by_key)
        kernel = _build.get_function(SOURCE, expression, shared_bytes=shared, options=OPTIONS)
        if expression == dkdv and producer and spec.varlen is not None:  # each sequence's own key tiles
            blocks = _launch.packed_tile_slots(spec.varlen.total_k, batch, tile_n) * kv_heads
        else:
            blocks = n_tiles * kv_heads * batch if by_key else m_tiles * heads * batch
        blocks = check_grid(blocks, expression)
        maps = ()
        if expression == dkdv and producer:  # boxes of a query tile's rows (Q, dO), a key tile's (K, V)
            maps = tuple(_tma.TensorLayout.of(_tma.tma_view(x), rows)
                         for x, rows in ((q, tile_m), (k, tile_n), (v, tile_n), (dout, tile_m)))
        elif ring:  # the dQ kernel's: 64 query rows a box, one per consumer
            maps = tuple(_tma.TensorLayout.of(x, 64) for x in (q, k, v, dout))
        # The last lanes tile by tile: the warp-specialised dK/dV kernel's (key tiles; ordered adds
        # keep lane order, their blocks waiting on their lane's) and the warp-specialised dQ
        # kernel's (query tiles); one block per SM either way.
        tail = 0
        if (by_key and producer and not ordered) or (not by_key and ring):
            lanes, tiles_per_lane = (kv_heads * batch, n_tiles) if by_key else (heads * batch, m_tiles)
            tail = _launch.tail_lanes(spec, lanes, tiles_per_lane, _launch.sm_count(q.data.device_id))
        launches.append(KernelLaunch(kernel, blocks, 128 * warpgroups, shared, args(m_tiles, n_tiles, index, tail),
                                     maps=maps, map_pointers=WARP_SPECIALISED_MAP_POINTERS if maps else ()))
    if atomic_dq:
        # Lane by lane: each lane's count is its key tiles, the dK/dV grid's per lane.
        lanes_after = ((dkdv_key_tiles, _launch.sm_count(q.data.device_id))
                       if counted and CAST_DQ_BY_LANE else None)
        launches.append(mma_backward.convert_launch(args, spec, aligned=vector_aligned((dq,), (s.d,)),
                                                    fragment_order=True, lanes_after=lanes_after))
    return mma_backward.BackwardLaunch(scratch, tuple(launches))


def backward(dout, q, k, v, out, lse, dq, dk, dv, spec, *, tiles: Sm90BwdTiles | None = None):
    """Write dq, dk, dv for 4-D (B, H, N, D) CuPy views; see docs/internals.md and
    ``prepare_backward``."""
    arrays = (q, k, v, dout, out, dq, dk, dv)
    prepare_backward(spec, arrays, tiles=tiles)(dout, q, k, v, out, lse, dq, dk, dv, spec)


def main_variants() -> list[tuple[str, str]]:
    """The variants that must compile for ARCH (sm_90a only) without register spills."""
    from ._variants import (dropout_spec_grid, exact_mask_stand_in, feature_specs, float32_grads_specs,
                            spec_grid, spec_of, varlen_spec_grid)

    dropout = [spec for spec in dropout_spec_grid(HEAD_DIMS) if spec.shapes.d == spec.shapes.dv]
    varlen = [spec for spec in varlen_spec_grid()
              if spec.shapes.d == spec.shapes.dv and spec.shapes.d in HEAD_DIMS]
    # The 256-column tile's masks and score modifiers (the grid's features are at D = 128),
    # and D = 192 with Dv = 128 on it (dV two 64-column boxes wide), and D = 64 with Dv = 256
    # (dK one box wide).
    split = feature_specs(SPLIT_HEAD_DIM) + [spec_of(dtype, 192, 128) for dtype in ("float16", "bfloat16")]
    split += [spec_of("bfloat16", 64, 256)]
    # Head dims short of their tile: S and dP stop at the last k16 step below D or Dv (step_dims).
    short = [spec_of("bfloat16", 96, causal=causal) for causal in (False, True)] + [spec_of("float16", 160)]
    short += [spec_of("float16", 96, causal=True, dropout_p=0.1, dropout_seed=1)]
    # What an exact mask on the 64-column tile takes to the warp-specialised kernel beside what
    # the grid has (exact_fits_narrow_tile): softcap, and dropout in both dtypes, without and
    # with causal.
    narrow_exact = [spec_of("bfloat16", 64, causal=causal, softcap=30.0, exact_mask=exact_mask_stand_in())
                    for causal in (False, True)]
    narrow_exact += [spec_of(dtype, 64, causal=causal, exact_mask=exact_mask_stand_in(),
                             dropout_p=0.1, dropout_seed=1)
                     for dtype in ("float16", "bfloat16") for causal in (False, True)]
    out = []
    specs = spec_grid(HEAD_DIMS) + float32_grads_specs(HEAD_DIMS) + dropout + varlen + split + short + narrow_exact
    for spec in (spec for spec in specs if why_not_options(spec) is None):
        tiles = default_tiles(tile_head_dim(spec), dropout=spec.has_dropout)
        if not tiles.split_gradients:  # the cp.async dK/dV kernel has no split gradients
            out.append((SOURCE, variant_dkdv(spec, tiles)))
        if dq_ring(spec, tiles):
            out.append((SOURCE, variant_dq_ws(spec)))
        if not dq_ring(spec, tiles) or spec.block_mask is not None:  # (64-row blocks: dQ kernel)
            out.append((SOURCE, variant_dq(spec, tiles)))
        if fused_dq_pays(spec, tiles, False):
            out.append((SOURCE, variant_dkdv(spec, tiles, atomic_dq=True)))
        if producer_fits(spec):
            spec = keys_past_end_banded(spec)
            # the variant without the fused dQ, which the same options launch with deterministic=True
            if producer_fits(dataclasses.replace(spec, deterministic=True)):
                out.append((SOURCE, variant_dkdv_ws(spec, tiles)))
            if fused_dq_pays(spec, tiles, True):
                out.append((SOURCE, variant_dkdv_ws(spec, tiles, atomic_dq=True)))
            if ordered_dq_fits(spec, tiles):
                out.append((SOURCE, variant_dkdv_ws(spec, tiles, ordered_dq=True)))
                if rotated_dq(spec, tiles):
                    out.append((SOURCE, variant_dkdv_ws(spec, tiles, ordered_dq=True, rotated_dq=True)))
    return list(dict.fromkeys(out))


__all__ = ["backward", "prepare_backward", "supports", "describe_call", "workspace_of", "main_variants", "Sm90BwdTiles", "default_tiles", "ARCH"]
