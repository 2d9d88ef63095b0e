"""Launch of the warp-specialised Hopper forward kernel (flash_fwd_sm90_tma.cu: TMA producer
warpgroup, one to three wgmma consumer warpgroups, sm_90a) for float16 / bfloat16.

Same entry point as ``sm90_forward.forward``; ``supports()`` says whether a call can take this
path (compute capability 9.0, head dims 32 ≤ D, Dv ≤ 256 in multiples of 32, views TMA can
describe, block masks whose blocks are whole tiles). Everything else falls to the next family.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy

from . import _build, _launch, _tma
from ._launch import (ForwardLaunch, KernelLaunch, element_type, forward_args, mask_type, score_mod_type,
                      vector_aligned, why_not_hopper_16bit)

SOURCE = "flash_fwd_sm90_tma.cu"
ARCH = "sm_90a"
OPTIONS = (f"-arch={ARCH}",)
# Head dims from 32 to 256, padded to multiples of 64 inside the kernel (a 64-column box per 64
# columns; TMA fills the columns past D with zeros, and Q·Kᵀ's k16 steps stop at D's last): D = 32
# runs the D = 64 kernel's GEMMs, D = 80 or 96 the D = 128 ones. A row must be whole 16-byte units
# (D a multiple of 8), as TMA's strides and the 16-byte stores take it (vector_aligned).
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 256
# The head dims of the compile grid (main_variants) and of the tile sweeps.
HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
PERSISTENT_MAX_KEYS = 2048
PERSISTENT_GRID_MAX_KEYS = 4096  # persistent_grid, rows under a band
# Rows without a band up to this many keys take 128-key tiles and the persistent grid at Dv ≤ 128
# (candidate_tiles' `short`, persistent_grid)
UNBANDED_PERSISTENT_MAX_KEYS = 8192
SM_SHARED = 228 * 1024  # an SM's shared memory, of which each resident block reserves 1 KB
STATIC_BARRIERS = 256  # the kernel's static mbarriers and mailbox, at most
# Packed sequences: the most a persistent block ranks longest first, and the static shared memory
# of its ranking (schedule.cuh, LONGEST_FIRST_MAX and LongestFirst)
LONGEST_FIRST_MAX = 128
LONGEST_FIRST_BYTES = 4 * (2 * LONGEST_FIRST_MAX + 2)
MAX_SHARED = SM_SHARED - 1024 - STATIC_BARRIERS  # 227 KB less the barriers: the limit per block


def _padded(d: int) -> int:
    return -(-d // 64) * 64


@dataclass(frozen=True)
class TmaTiles:
    """`consumers` warpgroups of 64 query rows each against `block_n` keys per K/V tile, in
    rings of `stages` buffers; with `pingpong` the consumers take turns issuing their GEMMs;
    `persistent` launches one thread block per SM, each taking the next query tile from a counter
    as it finishes one (``_launch.TileCounters``); with `q_buffers` = 2 a block's query tiles take
    two Q buffers in turn, so that the next tile's Q loads under the previous tile
    (``with_second_q_buffer``)."""

    block_n: int = 128
    stages: int = 2
    consumers: int = 2
    pingpong: bool = False
    persistent: bool = False  # one thread block per SM drawing the tiles (host side only)
    q_buffers: int = 1

    @property
    def block_m(self) -> int:
        return 64 * self.consumers

    @property
    def blocks_per_sm(self) -> int:
        """Thread blocks an SM holds (tma_forward_blocks_per_sm in the kernel): two with one
        consumer, which leaves room for a second block."""
        return 2 if self.consumers == 1 else 1

    @property
    def o_in_v(self) -> bool:
        """Whether O is staged in a V buffer for its stores (TmaForwardLayout::O_IN_V): with one Q
        buffer, where a V buffer holds O; with two, each tile's O goes to its own Q buffer."""
        return self.q_buffers == 1 and self.block_n >= self.block_m

    def o_in_kv(self, d: int, dv: int) -> bool:
        """Whether O is staged in the V and K buffers of the tile's last key tile, one consumer's
        rows in each (TmaForwardLayout::O_IN_KV): one Q buffer and two consumers against key tiles
        shorter than the query tile (the 80-key tiles of Dv > 128). Then, as with `o_in_v`, the Q
        buffer goes back after the tile's last Q·Kᵀ, so that a persistent block's next Q loads
        under the rest of the tile."""
        return (self.q_buffers == 1 and not self.o_in_v and self.consumers == 2 and self.block_n >= 64
                and _padded(d) >= _padded(dv))

    @property
    def threads(self) -> int:
        return 128 * (self.consumers + 1)  # and the producer warpgroup

    def shared_bytes(self, d: int, dv: int) -> int:
        dp, dvp = _padded(d), _padded(dv)
        # Q (also O's staging unless O goes to a V buffer: TmaForwardLayout::O_IN_V), the K and V
        # rings, 1 KB to round the base up to 1024 bytes.
        q_tile = (dp if self.o_in_v else max(dp, dvp)) * self.block_m * 2
        return self.q_buffers * q_tile + self.stages * self.block_n * (dp + dvp) * 2 + 1024

    def exact_record_bytes(self) -> int:
        """The static shared memory an exact mask's variant adds (ExactStage in the kernel): per K
        buffer, the tile's index and bitmask slot (16 bytes) and its bits (one 32-bit word per 32
        keys of each query row)."""
        from ..sparse._exactmask import bitmask_words_per_row

        return self.stages * (16 + self.block_m * bitmask_words_per_row(self.block_n) * 4)


def candidate_tiles(d: int, dv: int, *, banded: bool, exact: bool = False, plain: bool = False,
                    short: bool = False, few_keys: bool = False, short_band: bool = False,
                    long_causal: bool = False, dropout: bool = False) -> list[TmaTiles]:
    """Tile shapes for these head dims, best first (the H200 sweeps are in benchmarks/NOTES.md):
    - D = Dv = 64, `plain` (no mask; ALiBi only where it fits, ``_three_consumers_fit``) or
      `long_causal` (causal alone, or with such ALiBi, over rows of more than
      PERSISTENT_MAX_KEYS keys): three consumers taking turns (ping-pong), where the softmax
      dominates;
    - D = Dv = 64, `few_keys` (a block or exact mask that keeps at most PERSISTENT_MAX_KEYS
      keys per query row on average, or a band alone over packed sequences of at most that many
      keys; no score modifier or dropout): one consumer, two blocks per SM, so that one block's
      first softmax and epilogue, a large part of a tile that visits few key tiles, run under the
      other's GEMMs;
    - D = Dv = 64, `short_band` (a causal or window band alone over dense rows of at most
      PERSISTENT_MAX_KEYS keys): two consumers, two stages. Level with one consumer in bursts of
      calls and 6-7% faster at the power cap, where one consumer's 64-row tiles read each K/V
      tile from L2 twice as often and run at lower clocks (benchmarks/NOTES.md, "Bursts and the
      power cap");
    - Dv ≤ 128: 176-key tiles unmasked (fewer rescales per key), 128 under a band (finer
      skipping of masked tiles), an exact mask (its rows of bits hold at most 128 keys), for
      `short` rows (at most UNBANDED_PERSISTENT_MAX_KEYS keys, where 176 measured slower: with
      two Q buffers, which only 128-key tiles leave room for, 128 ran 4% faster at 4K and 8K
      keys on an H200, benchmarks/NOTES.md, "O staged in its own Q buffer") and with
      `dropout` (128 measured 9-17% faster at D = 128: benchmarks/NOTES.md, "Dropout's key
      tiles in the Hopper forward");
    - Dv > 128: 80-key tiles, the widest whose S still fits beside a 256-wide O in registers.
    Then narrower fall-backs, for shared memory and block masks. (ptxas compiles the consumers
    within the launch's even share of registers, 168 or 128, whatever setmaxnreg grants later.)"""
    # Three consumers are compiled within 128 registers each: a block or exact mask, a window's
    # left edge, softcap, packed sequences, or ALiBi other than at D = Dv = 64
    # (``_three_consumers_fit``) beside causal spill there, and dropout is slower there (and an
    # exact mask's bits spill beside a 256-wide O at 80 keys): the next shape then.
    if max(d, dv) <= 64:
        three = [TmaTiles(128, 2, consumers=3, pingpong=True)] if plain or long_causal else []
        one = [TmaTiles(128, 2, consumers=1)] if few_keys else []
        two = [TmaTiles(128, 2)] if short_band else []
        return three + one + two + [TmaTiles(128, 3), TmaTiles(64, 3)]
    if _padded(dv) <= 128:
        widths = (128, 64) if banded or exact or short or dropout else (176, 128, 64)
    else:
        widths = (64,) if exact else (80, 64)
    return [TmaTiles(block_n, 2) for block_n in widths]


def _nothing_beyond_a_band(spec) -> bool:
    """Whether a call holds nothing beyond a causal or window band: no block or exact mask, score
    modifier or dropout (beside any of those, three consumers spill)."""
    return not (spec.sparse or spec.exact or spec.score_modified or spec.has_dropout)


def _three_consumers_fit(spec) -> bool:
    """Whether the three-consumer tile, compiled within 128 registers a consumer, suits this
    call's options: nothing beyond a band, or ALiBi alone beside it at D = Dv = 64 over dense rows
    (no spills under NVRTC 13.0 and 13.5, unmasked and causal; against two consumers 6-9% faster
    unmasked from 2K keys and causal at 16K, level at 4K causal, 3.5% slower unmasked at 1K:
    benchmarks/NOTES.md). Softcap (16-48 bytes) and a window's left edge (88) spill there.
    Dropout fits at D = Dv = 64 but ran up to 9% slower than on two consumers with three stages
    (not profiled; likely its softmax with the draws outlasts the other consumers' GEMMs, so
    taking turns only adds waits)."""
    if _nothing_beyond_a_band(spec):
        return True
    if spec.sparse or spec.exact or spec.has_softcap or spec.has_dropout or spec.varlen is not None:
        return False
    return spec.has_alibi and spec.shapes.d == spec.shapes.dv == 64


def few_keys(spec) -> bool:
    """Whether a call's query tiles visit few key tiles and take one consumer
    (``candidate_tiles``): a block or exact mask (with a band or not) that keeps at most
    PERSISTENT_MAX_KEYS keys per query row on average, or a band alone over packed sequences of
    at most that many keys; no score modifier or dropout."""
    if spec.score_modified or spec.has_dropout:
        return False
    if spec.exact:
        return spec.exact_mask.density * spec.shapes.nk <= PERSISTENT_MAX_KEYS
    if spec.sparse:
        return spec.block_mask.element_density * spec.shapes.nk <= PERSISTENT_MAX_KEYS
    return spec.banded and spec.varlen is not None and spec.shapes.nk <= PERSISTENT_MAX_KEYS


def short_band(spec) -> bool:
    """Whether a dense call is a causal or window band alone over rows of at most
    PERSISTENT_MAX_KEYS keys (``candidate_tiles``: two consumers, two stages)."""
    return (spec.banded and spec.varlen is None and spec.shapes.nk <= PERSISTENT_MAX_KEYS
            and _nothing_beyond_a_band(spec))


def long_causal(spec) -> bool:
    """Whether a call is a band bounded on the right alone (causal, or a window (-1, w)) over
    rows of more than PERSISTENT_MAX_KEYS keys, with nothing else: no block or exact mask, softcap,
    dropout or packed sequences, and ALiBi only where ``_three_consumers_fit``
    (``candidate_tiles``: three consumers, 9-13% faster than two at 4K-16K keys on an H200;
    shorter rows take two, ``short_band``)."""
    return (spec.right_bounded_alone and spec.shapes.nk > PERSISTENT_MAX_KEYS
            and spec.varlen is None and _three_consumers_fit(spec))


def persistent_grid(spec, tiles: TmaTiles) -> bool:
    """Whether a call's query tiles go to a persistent grid (one block per SM, or two with one
    consumer, drawing tiles from a counter as they finish), with key tiles of at least 128:
    calls (bands, score modifiers, dropout and packed sequences allowed) over rows of at most
    PERSISTENT_GRID_MAX_KEYS keys, or UNBANDED_PERSISTENT_MAX_KEYS without a band (packed
    sequences: the longest, and only with 128-key tiles, those measured), and block or exact
    masks at any length. The grid hides a block's start-up and the next tile's
    loads under the previous tile's softmax and stores: measured on an H200 against one block
    per tile (benchmarks/NOTES.md, "The persistent Hopper forward", three runs) +7-22% at 1K
    causal keys and 0-12% at 1K unmasked, within ±4% at 2K-4K (+1-2% on average), 2-5% slower on
    causal rows of 16K keys (where a block's fixed cost is a small share). The 80-key tiles of
    Dv > 128 take it with two Q buffers (D ≤ 192; in 2-s loops at the power cap at D = 160 and
    192, +4-7% at 1K keys, +2-3% at 2K, ±1% at 4K), and with one where O is staged in the last
    key tile's buffers (`TmaTiles.o_in_kv`) without a band only (at D = 256, +4% at 1K keys,
    +1-2% at 2K-8K, but 1-5% slower than one block per tile under causal at 2K-8K; "O staged in
    the last K and V buffers"). A mask's query tiles visit few key tiles, and unequal numbers
    of them, so a block's fixed cost is a large share at any row length: 16K keys, D = 64 and
    128 ("Masks on the persistent grid"), +7-13% on butterfly and 2-D local masks, +2-11% on
    exact document and graph masks and their block twins, within ±3% on uniform random block
    masks. Packed sequences' tiles (each sequence's own, schedule.cuh's packed_tile_at, ranked
    longest first by each persistent block when there are at most LONGEST_FIRST_MAX sequences)
    are of unequal work too: 16K tokens in 11 documents of 193-3504 tokens at D = 128, in index
    order 7.5% faster unmasked and 4% causal than one block per tile over the same tiles on an
    H200, then ranked 3% and 8% more on an H100 ("Packed sequences: each sequence's own tiles,
    the persistent grid, longest first"). The launcher keeps one block per tile when the tiles do
    not outnumber the blocks the SMs hold."""
    masked = spec.sparse or spec.exact
    max_keys = PERSISTENT_GRID_MAX_KEYS if spec.banded else UNBANDED_PERSISTENT_MAX_KEYS
    d, dv = spec.shapes.d, spec.shapes.dv
    # The 80-key tiles of Dv > 128, where O is not staged in the one Q buffer: in each tile's own
    # (two Q buffers, D ≤ 192), or in the last key tile's K and V buffers, then without a band.
    wide = (not masked and _padded(dv) > 128 and spec.varlen is None
            and (tiles.q_buffers == 2 or (tiles.o_in_kv(d, dv) and not spec.banded)))
    return (tiles.block_n >= 128 or wide) and (masked or spec.shapes.nk <= max_keys)


def fits_shared_memory(spec, tiles: TmaTiles) -> bool:
    """Whether `tiles` (with an exact mask's records beside K, or packed sequences' ranking) fit
    the shared memory each of the SM's `blocks_per_sm` resident blocks has."""
    d, dv = spec.shapes.d, spec.shapes.dv
    used = (tiles.shared_bytes(d, dv) + (tiles.exact_record_bytes() if spec.exact else 0)
            + (LONGEST_FIRST_BYTES if spec.varlen is not None else 0))
    return used <= SM_SHARED // tiles.blocks_per_sm - 1024 - STATIC_BARRIERS


def with_second_q_buffer(spec, tiles: TmaTiles) -> TmaTiles:
    """`tiles` with a second Q buffer where it fits: on a persistent grid the next tile's Q then
    loads under the previous tile's key tiles, not after its last Q·Kᵀ (or, where O is staged in
    the Q buffer, after its stores). One block per tile never touches it."""
    second = dataclasses.replace(tiles, q_buffers=2)
    return second if fits_shared_memory(spec, second) else tiles


def call_candidates(spec, *, few: bool | None = None) -> list[TmaTiles]:
    """``candidate_tiles`` for this call's head dims and options, best first: the shapes
    ``tiles_for`` tries (and ``supports`` names when none fits). `few` overrides
    ``few_keys(spec)``."""
    plain = not spec.banded and _three_consumers_fit(spec)
    short = spec.shapes.nk <= UNBANDED_PERSISTENT_MAX_KEYS  # matters only without a band
    return candidate_tiles(spec.shapes.d, spec.shapes.dv, banded=spec.banded, exact=spec.exact, plain=plain,
                           short=short, few_keys=few_keys(spec) if few is None else few,
                           short_band=short_band(spec), long_causal=long_causal(spec), dropout=spec.has_dropout)


def tiles_for(spec, *, few: bool | None = None) -> TmaTiles:
    """The first candidate that fits shared memory and whose tiles a block mask's blocks are
    whole multiples of, persistent where ``persistent_grid`` says so, with a second Q buffer
    where it fits. `few` overrides ``few_keys(spec)`` (the variants list asks for both)."""
    for tiles in call_candidates(spec, few=few):
        if not fits_shared_memory(spec, tiles):
            continue
        if spec.block_mask is not None:
            bq, bk = spec.block_mask.block_size
            if bq % tiles.block_m or bk % tiles.block_n:
                continue
        tiles = with_second_q_buffer(spec, tiles)
        return dataclasses.replace(tiles, persistent=persistent_grid(spec, tiles))
    return None


def describe_call(spec, arrays=None) -> str:
    """The tile shape this call runs with (``cuflash.kernel_plan``; the same for any views
    ``arrays`` the family takes)."""
    tiles = tiles_for(spec)
    if tiles is None:
        return ""
    return (f"{tiles.block_m}-row query tiles against {tiles.block_n}-key tiles, "
            f"{tiles.consumers} consumer warpgroup{'s' if tiles.consumers > 1 else ''}"
            + (" taking turns" if tiles.pingpong else "")
            + (", two thread blocks per SM" if tiles.blocks_per_sm == 2 else "")
            + (", a persistent grid where the tiles outnumber the blocks the SMs hold" if tiles.persistent else ""))


def variant(spec, tiles: TmaTiles) -> str:
    """The kernel's template expression; its defaulted flags VARLEN and DROPOUT are spelled only
    up to the last true one (_build.trailing_flags)."""
    flags = _build.trailing_flags(spec.varlen is not None, spec.has_dropout)
    return _build.template_expression(
        "flash_fwd_sm90_tma", element_type(spec.dtype), spec.shapes.d, spec.shapes.dv, tiles.block_n,
        tiles.stages, tiles.q_buffers, tiles.consumers, tiles.pingpong, mask_type(spec), score_mod_type(spec), *flags,
    )


def supports(spec, arrays) -> str | None:
    """None when ``forward`` can run this call, else why not."""
    q, k, v, out = arrays
    reason = why_not_hopper_16bit(spec, q)
    if reason:
        return reason
    d, dv = spec.shapes.d, spec.shapes.dv
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and MIN_HEAD_DIM <= dv <= MAX_HEAD_DIM):
        return f"takes D and Dv from {MIN_HEAD_DIM} to {MAX_HEAD_DIM}; got D={d}, Dv={dv}"
    if max(d, dv) <= 32 and spec.shapes.nk <= PERSISTENT_MAX_KEYS:
        # Padded to 64, half of each GEMM is zeros: measured slower than the mma.sync kernel
        # on short rows (causal, 1K keys: 0.83x), faster on long ones (benchmarks/NOTES.md).
        return f"at D, Dv <= 32 takes rows of more than {PERSISTENT_MAX_KEYS} keys; got {spec.shapes.nk}"
    if not vector_aligned((q, k, v, out), (d, dv)):
        return "needs 16-byte aligned rows and strides"
    for name, x in (("q", q), ("k", k), ("v", v)):
        reason = _tma.why_not_expressible(_tma.tma_view(x))
        if reason:
            return f"{name}: {reason}"
    tiles = tiles_for(spec)
    if tiles is None:
        # the shapes tiles_for tried, once each (they differ in stages or consumers beside)
        shapes = ", ".join(dict.fromkeys(f"{t.block_m}x{t.block_n}" for t in call_candidates(spec)))
        if spec.block_mask is None:
            return f"no tile shape ({shapes}) fits shared memory at D={d}, Dv={dv}"
        bq, bk = spec.block_mask.block_size
        return f"needs block-mask blocks that are multiples of one of its tile shapes ({shapes}); got {bq}x{bk}"
    return _launch.why_not_tile_rows(spec, tiles.block_m, tiles.block_n)


def prepare_forward(spec, arrays, *, tiles: TmaTiles | None = None) -> ForwardLaunch:
    """The launch for this spec and the layout of 4-D (B, H, N, D) CuPy views ``arrays`` =
    (q, k, v, out): compiled kernel, grid, packed arguments and TMA layouts (Q in boxes of one
    consumer's 64 rows, K and V in key tiles). The caller checks ``supports()`` first."""
    q, k, v, out = arrays
    d, dv = spec.shapes.d, spec.shapes.dv
    tiles = tiles or tiles_for(spec)
    resident = _launch.sm_count(q.device.id) * tiles.blocks_per_sm  # a persistent grid fills every SM once
    args, blocks = forward_args(spec, arrays, tile_m=tiles.block_m, tile_n=tiles.block_n, resident_blocks=resident,
                                packed_grid=True)
    shared = tiles.shared_bytes(d, dv)
    kernel = _build.get_function(SOURCE, variant(spec, tiles), shared_bytes=shared, options=OPTIONS)
    persistent = tiles.persistent and blocks > resident
    grid = resident if persistent else blocks
    layouts = (_tma.TensorLayout.of(_tma.tma_view(q), 64), _tma.TensorLayout.of(_tma.tma_view(k), tiles.block_n),
               _tma.TensorLayout.of(_tma.tma_view(v), tiles.block_n))
    # The kernel's last two parameters: the tile count and the tile counter of a persistent grid
    # (a null one for a grid of one block per tile).
    tail = (numpy.int32(blocks),) if persistent else (numpy.int32(blocks), numpy.uint64(0))
    # Each call encodes the descriptors of q, k and v (FWD_POINTERS 0, 1, 2) whose addresses
    # changed.
    return ForwardLaunch(KernelLaunch(kernel, grid, tiles.threads, shared, args, tail=tail, maps=layouts,
                                      map_pointers=(0, 1, 2), tile_counter=persistent))


def forward(q, k, v, out, lse, spec, *, tiles: TmaTiles | None = None):
    """Run the kernel on 4-D (B, H, N, D) CuPy views; the caller checks ``supports()`` first."""
    prepare_forward(spec, (q, k, v, out), tiles=tiles)(q, k, v, out, lse, spec)


def main_variants() -> list[tuple[str, str]]:
    """The variants that must compile for ARCH (sm_90a only) without register spills."""
    from ._variants import _block_mask, _Slopes, dropout_spec_grid, spec_grid, spec_of, varlen_spec_grid

    # The tile shape depends on the options at D = 64 (three consumers only unmasked or causal) and at
    # Dv > 128 (exact masks): their masked and modified variants too.
    features = (dict(window=(256, 0)), dict(softcap=30.0), dict(causal=True, softcap=30.0))
    specs = (spec_grid((32, 64, 96, 128, 256)) + [spec_of(dtype, 192, 128) for dtype in ("float16", "bfloat16")]
             + [spec_of("bfloat16", d, **options) for d in (64, 256) for options in features])
    # Of the packed-sequence and dropout grids (built for the sm80 kernels), what this kernel takes.
    specs += [spec for spec in varlen_spec_grid() + dropout_spec_grid(HEAD_DIMS)
              if spec.shapes.d in HEAD_DIMS and spec.shapes.dv in HEAD_DIMS
              and tiles_for(spec) is not None]
    # Under a band or a mask at D = 64 the tile shape also depends on how many keys a row keeps
    # (few_keys): block masks there too (the sparse sweep's head dim), each with both shapes.
    specs += [spec_of("bfloat16", 64, causal=causal, block_mask=_block_mask()) for causal in (False, True)]
    # Causal rows longer than that take three consumers (long_causal), at D = 32 too; so does
    # ALiBi at D = 64, unmasked or over such rows.
    specs += [spec_of(dtype, d, causal=True, nq=4096) for dtype in ("float16", "bfloat16") for d in (32, 64)]
    specs += [spec_of(dtype, 64, causal=causal, nq=4096, alibi=_Slopes())
              for dtype in ("float16", "bfloat16") for causal in (False, True)]
    # Head dims between the grid's, each padded to its 64-column boxes: 40 and 48 (one box, 3 of 4
    # k16 steps), 80 and 112 (two), 136 (three), and Dv ≠ D among them.
    specs += [spec_of("bfloat16", d, dv, causal=causal) for d, dv in ((40, 40), (48, 48), (80, 80), (112, 112),
                                                                       (136, 136), (80, 64))
              for causal in (False, True)]
    shapes = [(spec, few) for spec in specs for few in ((True, False) if few_keys(spec) else (None,))]
    # Options the kernel does not template on (a varlen call's GQA, say) give repeats: one each.
    return list(dict.fromkeys((SOURCE, variant(spec, tiles_for(spec, few=few))) for spec, few in shapes))


__all__ = ["forward", "prepare_forward", "supports", "describe_call", "main_variants", "TmaTiles", "candidate_tiles",
           "call_candidates", "tiles_for",
           "persistent_grid", "variant", "ARCH"]
