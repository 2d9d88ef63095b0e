"""Launch of the tensor-core backward kernels (flash_bwd.cu) for float16 / bfloat16.

The gradients are computed as in FlashAttention-2, recomputing the attention probabilities from
q, k and the forward's log-sum-exp instead of storing them; device memory stays linear in the
sequence length. Three or four launches on the current stream:

1. ``flash_bwd_pre``: ``Delta = rowsum(dout * out)`` and the log-sum-exp in base 2, per query row.
2. ``flash_bwd_dkdv``: one thread block per tile of keys of one (batch, key/value head) walks the
   query tiles that see those keys, for every query head of the GQA group, and writes dk and dv
   once (summed over the group in registers: no atomics, deterministic).
3. dq, in one of two ways:

   - default (``spec.deterministic`` false): the dk/dv kernel also adds each tile's ``dS K``
     into a float32 accumulator with atomic adds, and ``flash_bwd_dq_convert`` casts it to dq. The
     order in which the thread blocks' additions land varies from run to run, so dq can differ
     in its last bits between identical calls (dk and dv never do). Fastest.
   - ``spec.deterministic``: no float atomics anywhere. ``flash_bwd_dq``, one thread block per
     query tile, walks its key tiles in a fixed order, recomputes the probabilities and dP, and
     writes dq once: repeated calls give bit-identical dq, dk and dv. It recomputes ``Q Kᵀ`` and
     ``dO Vᵀ`` a second time (7 matrix products per tile pair instead of 5), so it is slower, and
     it needs no float32 dq accumulator (less scratch memory).

Scratch memory (see ``workspace_bytes``): two float32 values per query row and head (Delta and the
base-2 log-sum-exp), plus, on the default path, a float32 dq accumulator of
``B·Hq·Nq·D`` values (rows rounded up to 128, D up to a multiple of 32).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy

from . import _build, _launch
from ._launch import (
    BWD_ARGS,
    LOG2E,
    NO_TILE_INDEX,
    KernelLaunch,
    PackedArgs,
    call_fields,
    check_grid,
    current_stream,
    dropout_values,
    dropout_words,
    element_type,
    mask_and_score_values,
    mask_heads,
    mask_type,
    padded_head_dim,
    padded_head_dims,
    pointer,
    score_mod_type,
    stride_fields,
    tile_index,
    varlen_pointers,
    varlen_values,
    vector_aligned,
    why_not_16bit_tiled,
)

SOURCE = "flash_bwd.cu"
ROW_ALIGN = 128  # scratch rows per (batch, head) are a multiple of this: every query tile divides it
PRE_ROWS = 32    # rows per thread block of flash_bwd_pre
SEMAPHORE_ROWS = PRE_ROWS  # scratch rows per semaphore of ordered dq adds (csrc/schedule.cuh, dq_semaphore_rows)
# The most blocks per SM of the dq cast lane by lane (csrc/flash_bwd.cu, CONVERT_BLOCKS_PER_SM):
# its grid, which walks the accumulator, holds no more than the SMs hold at once.
CONVERT_BLOCKS_PER_SM = 8
CONVERT_THREADS = 256  # a block of the cast lane by lane (CONVERT_THREADS in the kernel)
CONVERT_STEP = 4 * CONVERT_THREADS  # chunks (8 columns of a row) a block takes a ticket for: four a thread
SMEM_PAD = 8


@dataclass(frozen=True)
class BwdTiles:
    """Tile shape of one backward variant.

    dk/dv kernel: ``warps`` warps; each group of ``col_split`` warps owns ``mt`` 16-key slabs, so
    a thread block holds ``block_n = warps / col_split · mt · 16`` keys; query tiles of
    ``block_m`` rows stream through shared memory in ``stages`` buffers (2: the next tile loads
    during the whole step; 1: during the dq part only). ``col_split > 1`` splits the query
    columns of Sᵀ and the head-dim columns of dK/dV between the warps of a slab (for large head
    dims, whose dK + dV would not fit in registers otherwise) and passes Pᵀ and dSᵀ through shared
    memory. A warp's query columns are processed in ``col_passes`` passes (fewer live registers
    for Sᵀ and dPᵀ, same loads and barriers). ``kv_in_regs`` keeps the warp's K and V fragments
    in registers for the whole loop.

    Deterministic dq kernel: ``dq_warps`` warps of ``dq_mt`` 16-row query slabs
    (``dq_block_m`` rows) against key tiles of ``dq_block_n``; ``dq_in_regs`` keeps the Q and dO
    fragments in registers.
    """

    warps: int
    mt: int
    col_split: int
    col_passes: int
    block_m: int
    stages: int
    kv_in_regs: bool
    dq_warps: int
    dq_mt: int
    dq_block_n: int
    dq_in_regs: bool

    def __post_init__(self):
        if self.warps % self.col_split or self.block_m % (16 * self.col_split * self.col_passes):
            raise ValueError(f"{self}: warps must be a multiple of col_split, block_m of "
                             "16 * col_split * col_passes")
        if self.stages not in (1, 2):
            raise ValueError(f"{self}: stages must be 1 or 2")
        for name, rows in (("block_m", self.block_m), ("dq_block_m", self.dq_block_m)):
            if ROW_ALIGN % rows:
                raise ValueError(f"{self}: {name}={rows} must divide {ROW_ALIGN}")
        if self.dq_block_n % 16:
            raise ValueError(f"{self}: dq_block_n must be a multiple of 16")

    @property
    def block_n(self) -> int:
        return self.warps // self.col_split * self.mt * 16

    @property
    def dq_block_m(self) -> int:
        return self.dq_warps * self.dq_mt * 16

    def dkdv_shared_bytes(self, dqk: int, dv: int, *, atomic_dq: bool) -> int:
        bm, bn = self.block_m, self.block_n
        halves = bn * (dqk + SMEM_PAD) + bn * (dv + SMEM_PAD)
        halves += self.stages * bm * ((dqk + SMEM_PAD) + (dv + SMEM_PAD))
        exchanged = int(self.col_split > 1) + int(self.col_split > 1 or atomic_dq)  # Pᵀ, dSᵀ
        halves += exchanged * bn * (bm + SMEM_PAD)
        return 2 * halves + 4 * 2 * self.stages * bm

    def dq_shared_bytes(self, dqk: int, dv: int) -> int:
        bm, bn = self.dq_block_m, self.dq_block_n
        return 2 * (bm * (dqk + SMEM_PAD) + bm * (dv + SMEM_PAD)
                    + 2 * bn * (dqk + SMEM_PAD) + 2 * bn * (dv + SMEM_PAD))


# Devices whose thread blocks take at most 99 KiB of shared memory (compute capability 8.6 and
# 8.9): the other candidates need 104-159 KiB at head dims up to 128 (the dK/dV kernel's two
# stages of Q and dO, the dQ kernel's 64-key K and V tiles); this one 78 KiB (one stage, 32-key
# tiles in the dQ kernel, which keeps its fragments in registers: without them it spills there).
# Last among the candidates, so taken only where the others do not fit (default_tiles): its
# tiles divide no block size the one before it does not.
_SMALL_SHARED = BwdTiles(warps=4, mt=1, col_split=1, col_passes=2, block_m=64, stages=1,
                         kv_in_regs=False, dq_warps=4, dq_mt=1, dq_block_n=32, dq_in_regs=True)


# Candidates per widest padded head dim, preferred first; a block mask takes the first whose
# tiles divide its block size. Register use and spills: see main_variants() and the compile test.
_CANDIDATES = {
    64: (
        BwdTiles(warps=8, mt=1, col_split=1, col_passes=1, block_m=64, stages=2, kv_in_regs=True,
                 dq_warps=4, dq_mt=1, dq_block_n=64, dq_in_regs=True),
        BwdTiles(warps=4, mt=1, col_split=1, col_passes=1, block_m=64, stages=2, kv_in_regs=True,
                 dq_warps=4, dq_mt=1, dq_block_n=64, dq_in_regs=True),
    ),
    128: (
        BwdTiles(warps=8, mt=1, col_split=1, col_passes=2, block_m=64, stages=2, kv_in_regs=False,
                 dq_warps=4, dq_mt=1, dq_block_n=64, dq_in_regs=False),
        BwdTiles(warps=4, mt=1, col_split=1, col_passes=2, block_m=64, stages=2, kv_in_regs=False,
                 dq_warps=4, dq_mt=1, dq_block_n=64, dq_in_regs=False),
        _SMALL_SHARED,
    ),
    256: (
        BwdTiles(warps=8, mt=1, col_split=2, col_passes=1, block_m=64, stages=1, kv_in_regs=False,
                 dq_warps=4, dq_mt=1, dq_block_n=32, dq_in_regs=False),
    ),
}


# Exact masks at head dims up to 128: the bit tests need a few registers, which four column
# passes of the dK/dV kernel (half the live Sᵀ / dPᵀ of two) and 32-key tiles of the dQ kernel
# make room for.
_EXACT_CANDIDATES = {
    128: tuple(BwdTiles(**{**tiles.__dict__, "col_passes": 4, "dq_block_n": 32})
               for tiles in _CANDIDATES[128]),
}


# Dropout at head dims up to 128: the Philox rounds need the registers that four column passes of
# the dK/dV kernel free (the dQ kernel keeps its 64-key tiles: at 32 keys ptxas aims at 128
# registers and spills, so no dropout tile fits 99 KiB).
_DROPOUT_CANDIDATES = {
    128: tuple(dataclasses.replace(tiles, col_passes=4) for tiles in _CANDIDATES[128]
               if tiles is not _SMALL_SHARED),
}


def _candidates(dqk: int, dv: int, *, exact: bool = False, dropout: bool = False):
    widest = max(dqk, dv)
    for limit in sorted(_CANDIDATES):
        if widest <= limit:
            if exact and limit in _EXACT_CANDIDATES:
                return _EXACT_CANDIDATES[limit]
            if dropout and limit in _DROPOUT_CANDIDATES:
                return _DROPOUT_CANDIDATES[limit]
            return _CANDIDATES[limit]
    raise ValueError(f"head dims up to 256 are supported, got padded widths {dqk} and {dv}")


def shared_bytes(tiles: BwdTiles, dqk: int, dv: int) -> int:
    """The most shared memory a thread block of the backward's kernels takes with ``tiles``."""
    return max(tiles.dkdv_shared_bytes(dqk, dv, atomic_dq=False),
               tiles.dkdv_shared_bytes(dqk, dv, atomic_dq=True), tiles.dq_shared_bytes(dqk, dv))


def default_tiles(dqk: int, dv: int, block_size=None, *, exact: bool = False,
                  dropout: bool = False, shared_limit: int | None = None) -> BwdTiles:
    """The tile shape for padded head dims (dqk, dv) (``exact``: for an exact mask, ``dropout``:
    with dropout): the first candidate whose kernels fit ``shared_limit`` bytes of shared memory
    per thread block (the device's, ``_launch.shared_limit``; None: every candidate) and, with a
    block mask's ``(bq, bk)``, whose query and key tiles divide the blocks."""
    candidates = _candidates(dqk, dv, exact=exact, dropout=dropout)
    if shared_limit is not None:
        fitting = tuple(t for t in candidates if shared_bytes(t, dqk, dv) <= shared_limit)
        if not fitting:
            need = min(shared_bytes(t, dqk, dv) for t in candidates)
            raise ValueError(
                f"the sm_80 backward at head dims ({dqk}, {dv}){' with dropout' * dropout} needs "
                f"{need:,} bytes of shared memory per thread block; this GPU allows {shared_limit:,}")
        candidates = fitting
    if block_size is None:
        return candidates[0]
    bq, bk = (int(n) for n in block_size)
    for tiles in candidates:
        if (bq % tiles.block_m == 0 and bk % tiles.block_n == 0
                and bq % tiles.dq_block_m == 0 and bk % tiles.dq_block_n == 0):
            return tiles
    needs = " or ".join(dict.fromkeys(f"bq % {t.block_m} == 0, bk % {t.block_n} == 0" for t in candidates))
    raise ValueError(
        f"the GPU backward with head dims ({dqk}, {dv}) needs block masks whose block size "
        f"(bq, bk) satisfies {needs}; got block_size=({bq}, {bk}) (64 and 128 always work)")


def rows_padded(nq: int) -> int:
    return -(-nq // ROW_ALIGN) * ROW_ALIGN


def workspace_bytes(B: int, Hq: int, Nq: int, D: int, *, deterministic: bool = False) -> int:
    """Device scratch memory of one backward call, in bytes: float32 Delta and base-2 lse per
    query row and head, plus (default path) the float32 dq accumulator. Query rows are rounded
    up to 128 and D to a multiple of 32. For B=1, Hq=16, Nq=65536, D=64: 8 MiB + 256 MiB."""
    rows = B * Hq * rows_padded(Nq)
    total = 2 * 4 * rows
    if not deterministic:
        total += 4 * rows * padded_head_dim(D, "head dim D")
    return total


# Every kernel's template ends with defaulted flags: VARLEN; the dK/dV and dQ kernels' VARLEN,
# DROPOUT, then F32_GRADS (float32 gradients), the dQ conversion's VARLEN, F32_GRADS. They are
# spelled only up to the last one set (_build.trailing_flags), so other variants keep their
# expressions.
def _spec_flags(spec) -> tuple:
    return _build.trailing_flags(spec.varlen is not None, spec.has_dropout, spec.float32_grads)


def variant_pre(dtype, *, aligned: bool, zero_dq: bool, varlen: bool = False,
                zero_semaphores: bool = False, zero_lanes: bool = False, zero_claims: bool = False) -> str:
    """zero_semaphores: also those of the Hopper fused dQ's ordered adds; zero_lanes: the lane
    counters of its cast lane by lane; zero_claims: the claims of its dQ tiles (``Scratch``)."""
    return _build.template_expression("flash_bwd_pre", element_type(dtype), aligned, zero_dq,
                                      *_build.trailing_flags(varlen, zero_semaphores, zero_lanes, zero_claims))


def variant_dkdv(spec, tiles: BwdTiles, *, aligned: bool, atomic_dq: bool) -> str:
    dqk, dvp = padded_head_dims(spec)
    return _build.template_expression(
        "flash_bwd_dkdv", element_type(spec.dtype), dqk, dvp, tiles.warps, tiles.mt, tiles.col_split,
        tiles.col_passes, tiles.block_m, tiles.stages, tiles.kv_in_regs, mask_type(spec),
        score_mod_type(spec), aligned, atomic_dq, *_spec_flags(spec),
    )


def variant_dq(spec, tiles: BwdTiles, *, aligned: bool) -> str:
    dqk, dvp = padded_head_dims(spec)
    return _build.template_expression(
        "flash_bwd_dq", element_type(spec.dtype), dqk, dvp, tiles.dq_warps, tiles.dq_mt,
        tiles.dq_block_n, tiles.dq_in_regs, mask_type(spec), score_mod_type(spec), aligned,
        *_spec_flags(spec),
    )


def variant_convert(dtype, *, aligned: bool, varlen: bool = False, float32_grads: bool = False,
                    fragment_order: bool = False, after_lanes: bool = False) -> str:
    """fragment_order: the accumulator of the Hopper fused dQ (flash_bwd_sm90.cu), not row-major;
    after_lanes: cast lane by lane as its lanes' counters fill (``convert_launch``)."""
    return _build.template_expression("flash_bwd_dq_convert", element_type(dtype), aligned,
                                      *_build.trailing_flags(varlen, float32_grads, fragment_order, after_lanes))


def tiles_for(spec, shared_limit: int | None = None) -> BwdTiles:
    """The tile shape a call runs with on a device whose thread blocks take ``shared_limit``
    bytes of shared memory (``default_tiles``): the first candidate for its head dims whose
    tiles divide the block mask's blocks (the default without one)."""
    dqk, dvp = padded_head_dims(spec)
    return default_tiles(dqk, dvp, None if spec.block_mask is None else spec.block_mask.block_size,
                         exact=spec.exact_mask is not None, dropout=spec.has_dropout,
                         shared_limit=shared_limit)


# kernel_plan's words for the deterministic launch sequence, in this family and the Hopper one.
TWO_KERNELS = "a dK/dV kernel, then a dQ kernel (bit-identical run to run)"


def describe_call(spec, arrays=None) -> str:
    """The launch sequence this call runs (``cuflash.kernel_plan``; the same for any views
    ``arrays``)."""
    if spec.deterministic:
        return TWO_KERNELS
    return "the dK/dV kernel adding dQ by float32 atomics (in any order: not bit-identical run to run)"


def scratch_of(spec) -> Scratch:
    """The workspace of this call's backward: with the float32 dq accumulator unless
    ``spec.deterministic``."""
    return Scratch.of(spec, atomic_dq=not spec.deterministic)


def workspace_of(spec, arrays=None) -> dict[str, int]:
    """The device memory this call's backward allocates besides the gradients, by part
    (``cuflash.kernel_plan``; the same for any views ``arrays``)."""
    return scratch_of(spec).parts()


def supports(spec, arrays) -> str | None:
    """None when this family runs the call, else why not: any 16-bit call on sm_80+ whose block
    mask (if any) has blocks the tiles divide, packed variable-length sequences and dropout
    included, together too. `arrays` (q, k, v, dout, out, dq, dk, dv) may
    have any alignment."""
    reason = _launch.why_not_device(arrays[0])
    if reason:
        return reason
    limit = _launch.shared_limit(arrays[0].device.id)  # any alignment: element-wise variants
    return why_not_16bit_tiled(spec, lambda spec: tiles_for(spec, limit)) or why_not_scratch(spec)


def scratch_rows_pad(spec) -> int:
    """The workspace rows of one (batch, head), or of one head for a varlen call
    (``Scratch.rows_pad``)."""
    if spec.varlen is None:
        return rows_padded(spec.shapes.nq)
    return (-(-spec.varlen.total_q // ROW_ALIGN) + spec.shapes.b) * ROW_ALIGN


def why_not_scratch(spec) -> str | None:
    """The reason no 16-bit backward kernel (this family's or the Hopper one's, which share this
    workspace) takes a call whose workspace rows per head (``scratch_rows_pad``) reach 2**31
    (None for any other call): the kernels hold that count (``rows_pad``) in int32. Within
    ``_launch.why_not_lengths`` a dense call's Nq rounded up to 128 can still reach it, and a
    varlen call's every sequence rounded up to 128 rows can with many short sequences."""
    rows_pad = scratch_rows_pad(spec)
    if rows_pad < 2**31:
        return None
    what = ("Nq rounded up to 128" if spec.varlen is None
            else "(ceil(total_q / 128) + B sequences) * 128")
    return (f"counts a head's workspace rows in int32: {what} must be below 2**31, got "
            f"{rows_pad:,}")


@dataclass(frozen=True)
class Scratch:
    """The workspace of one backward call (see workspace_bytes), as one allocation of floats:
    ``rows`` base-2 lse values, ``rows`` Delta values, then ``accum`` values of the dq
    accumulator (atomic dq only; 0 otherwise), then ``semaphores`` int32 values (the Hopper fused
    dQ's ordered adds: one per 32 rows, csrc/schedule.cuh's dq_semaphore; 0 otherwise) or
    ``lane_counters`` int32 values (the Hopper fused dQ's adds in any order, whose cast then goes
    lane by lane: one per (batch, key/value head), csrc/schedule.cuh's dq_lane_counter, and the
    cast's ticket, dq_cast_ticket; 0 otherwise), which take the same place, the latter followed by
    ``tile_claims`` int32 values where that protocol claims its dQ tiles (one per 32 rows,
    dq_tile_claim; 0 otherwise). ``rows_pad`` is the
    rows per (batch, head), or for a varlen call the rows per head: every sequence's rows rounded
    up to ROW_ALIGN, each starting on a multiple of it, ``(ceil(total_q / ROW_ALIGN) + B) ·
    ROW_ALIGN`` in all (where each sequence starts is csrc/schedule.cuh's scratch_offset)."""

    rows_pad: int
    rows: int
    accum: int
    semaphores: int = 0
    lane_counters: int = 0
    tile_claims: int = 0

    @classmethod
    def of(cls, spec, *, atomic_dq: bool, dqk: int | None = None,
           semaphores: bool = False, lane_counters: bool = False, tile_claims: bool = False) -> "Scratch":
        """``dqk``: the accumulator's row length, when a family pads D further than this
        module's kernels do (``padded_head_dims``); ``semaphores``: those of ordered adds into
        the accumulator (dense calls); ``lane_counters``: those of its cast lane by lane (dense
        calls, adds in any order); ``tile_claims``: beside the lane counters, the claims of
        the dQ tiles."""
        s = spec.shapes
        rows_pad = scratch_rows_pad(spec)
        rows = (s.hq if spec.varlen is not None else s.b * s.hq) * rows_pad
        if (semaphores or lane_counters) and not (atomic_dq and spec.varlen is None):
            raise ValueError("semaphores and lane counters follow a dense call's dq accumulator")
        if semaphores and lane_counters:
            raise ValueError("semaphores and lane counters take the same place: one or the other")
        if tile_claims and not lane_counters:
            raise ValueError("tile claims follow the lane counters")
        return cls(rows_pad, rows, rows * (dqk or padded_head_dims(spec)[0]) if atomic_dq else 0,
                   rows // SEMAPHORE_ROWS if semaphores else 0, s.b * s.hkv + 1 if lane_counters else 0,
                   rows // SEMAPHORE_ROWS if tile_claims else 0)

    def allocate(self):
        """``(memory, (lse2, delta, dq_accum))``: the allocation (a CuPy ``MemoryPointer``) and
        the three pointers (0 for an absent accumulator; the semaphores or lane counters follow
        it, at ``counters_offset``). Every part
        starts 512-byte aligned (rows_pad is a multiple of 128, CuPy's blocks are 512-byte
        aligned)."""
        memory = _launch.device_memory(self.nbytes)
        return memory, self.pointers(memory.ptr)

    @property
    def nbytes(self) -> int:
        return 4 * (2 * self.rows + self.accum + self.semaphores + self.lane_counters + self.tile_claims)

    def parts(self) -> dict[str, int]:
        """Its bytes by what they hold (``cuflash.kernel_plan``'s workspace line)."""
        parts = {"base-2 lse and Delta": 8 * self.rows}
        if self.accum:
            parts["float32 dQ accumulator"] = 4 * self.accum
        if self.semaphores:
            parts["semaphores of the ordered dQ adds"] = 4 * self.semaphores
        if self.lane_counters:
            parts["lane counters of the dQ cast"] = 4 * self.lane_counters
        if self.tile_claims:
            parts["claims of the dQ tiles"] = 4 * self.tile_claims
        return parts

    @property
    def counters_offset(self) -> int:
        """The byte offset of the semaphores or lane counters in the workspace."""
        return 4 * (2 * self.rows + self.accum)

    def pointers(self, base: int) -> tuple[int, int, int]:
        """``(lse2, delta, dq_accum)`` in a workspace of ``nbytes`` at ``base`` (512-byte
        aligned), as ``allocate`` places them."""
        return base, base + 4 * self.rows, base + 8 * self.rows if self.accum else 0


# The pointer fields of BWD_ARGS a backward launch re-fills per call, in this order, then
# DROPOUT_WORDS with dropout (call_fields; BackwardLaunch).
BWD_POINTERS = ("q", "k", "v", "o", "dout", "lse", "grad_q", "grad_k", "grad_v", "lse2", "delta",
                "dq_accum", "alibi", "cu_q", "cu_k")


class BackwardLaunch:
    """A prepared backward pass: ``launch(dout, q, k, v, out, lse, dq, dk, dv, spec)`` with the
    entry point's arguments (views of the prepared layout; only their pointers are read)
    allocates the workspace, fills in the per-call values (pointers, dropout's seed words) and
    runs the launches in order, on `stream` (a handle) or CuPy's current stream. Returns the workspace buffer (the caller may keep it
    alive, as a captured graph needs).

    Every launch after the first is a programmatic dependent of the one before it
    (``KernelLaunch.dependent``): where the device allows, its blocks start while that kernel
    finishes and wait for it inside, so the call's kernels follow one another without a gap. Each
    of them waits at its start (csrc/arch/ptx.cuh); the first waits for the caller's work as any
    launch does."""

    def __init__(self, scratch: Scratch, launches: tuple[KernelLaunch, ...]):
        self.scratch = scratch
        self.launches = launches[:1] + tuple(dataclasses.replace(launch, dependent=True)
                                             for launch in launches[1:])

    def __call__(self, dout, q, k, v, out, lse, dq, dk, dv, spec, stream: int | None = None):
        workspace, (lse2, delta, dq_accum) = self.scratch.allocate()
        values = (q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, dout.data.ptr, lse.data.ptr,
                  dq.data.ptr, dk.data.ptr, dv.data.ptr, lse2, delta, dq_accum,
                  pointer(spec.alibi), *varlen_pointers(spec), *dropout_words(spec))
        self.launch_call_values(values, current_stream() if stream is None else stream)
        return workspace

    def launch_call_values(self, values, stream: int) -> None:
        """Run the launches in order with the per-call values ``values`` (BWD_POINTERS, the
        workspace's from ``scratch.pointers``, then dropout's words) on ``stream`` (a handle)."""
        for launch in self.launches:
            launch(values, stream)


def argument_packer(spec, arrays, *, rows_pad: int, dqk: int | None = None):
    """``args(m_tiles=0, n_tiles=0, index=NO_TILE_INDEX, tail_lanes=0)``: the packed BWD_ARGS of
    each launch of a backward call with the layout of 4-D views ``arrays`` = (q, k, v, dout, out,
    dq, dk, dv) (they differ only in the launch's tile counts, tile index, ``tile_index``, and the
    dK/dV grid's order, ``_launch.tail_lanes``; the per-call fields, BWD_POINTERS and dropout's
    words, are filled per call). A varlen call's arrays are packed (total, H, D).
    ``dqk``: the dq accumulator's row length, as for ``Scratch.of``."""
    q, k, v, dout, out, dq, dk, dv = arrays
    s = spec.shapes
    batch, heads, nq, d = s.b, s.hq, s.nq, s.d
    kv_heads, nk, dv_dim = s.hkv, s.nk, s.dv
    fields = dict(
        batch=batch, nq=nq, nk=nk, d=d, dv=dv_dim, heads=heads, kv_heads=kv_heads,
        group=heads // kv_heads, rows_pad=rows_pad,
        dqk=dqk or padded_head_dims(spec)[0],  # the dq accumulator's row length
        mask_heads=mask_heads(spec), scale=spec.scale, scale_log2=spec.scale * LOG2E,
        **stride_fields(("q", "k", "v", "o", "do", "gq", "gk", "gv"), (q, k, v, out, dout, dq, dk, dv)),
        **mask_and_score_values(spec), **varlen_values(spec), **dropout_values(spec),
    )

    def args(m_tiles=0, n_tiles=0, index=NO_TILE_INDEX, tail_lanes=0):
        return PackedArgs(BWD_ARGS, call_fields(BWD_POINTERS, spec),
                          dict(fields, m_tiles=m_tiles, n_tiles=n_tiles, tail_lanes=tail_lanes, **index))

    return args


def preprocess_launch(args, spec, *, rows_pad: int, aligned: bool, zero_dq: bool,
                      zero_semaphores: bool = False, zero_lanes: bool = False,
                      zero_claims: bool = False) -> KernelLaunch:
    """The flash_bwd_pre launch: Delta, base-2 lse (and the zeroed dq accumulator, and its
    semaphores or lane counters and tile claims). `aligned`: out and dout allow 16-byte loads. A varlen call's
    grid covers the longest sequence's padded rows for each (sequence, head), its row blocks sent
    as m_tiles."""
    varlen = spec.varlen is not None
    kernel = _build.get_function(SOURCE, variant_pre(spec.dtype, aligned=aligned, zero_dq=zero_dq,
                                                     varlen=varlen, zero_semaphores=zero_semaphores,
                                                     zero_lanes=zero_lanes, zero_claims=zero_claims))
    row_blocks = (rows_padded(spec.shapes.nq) if varlen else rows_pad) // PRE_ROWS
    blocks = check_grid(row_blocks * spec.shapes.hq * spec.shapes.b, "flash_bwd_pre")
    return KernelLaunch(kernel, blocks, 256, 0, args(m_tiles=row_blocks if varlen else 0))


def convert_launch(args, spec, *, aligned: bool, fragment_order: bool = False,
                   lanes_after: tuple[int, int] | None = None) -> KernelLaunch:
    """The flash_bwd_dq_convert launch: one thread per 8 columns of each row of dq. A varlen
    call's grid covers the longest sequence's rows for each (sequence, head), its blocks per
    (sequence, head) sent as m_tiles. ``fragment_order``: the accumulator is the Hopper fused
    dQ's (schedule.cuh, dq_fragment_offset). ``lanes_after = (key_tiles, sms)`` (a dense call's
    fused dQ whose dK/dV kernel counts its lanes' key tiles, ``sm90_backward.lanes_counted``):
    the cast lane by lane, each lane once its counter reaches ``key_tiles`` (sent as n_tiles), on
    at most CONVERT_BLOCKS_PER_SM blocks per SM of ``sms`` that take steps of CONVERT_STEP chunks
    from a ticket, in order (csrc/flash_bwd.cu, AFTER_LANES)."""
    s = spec.shapes
    varlen = spec.varlen is not None
    kernel = _build.get_function(SOURCE, variant_convert(spec.dtype, aligned=aligned, varlen=varlen,
                                                         float32_grads=spec.float32_grads,
                                                         fragment_order=fragment_order,
                                                         after_lanes=lanes_after is not None))
    chunks = -(-s.d // 8)
    if lanes_after is not None:
        key_tiles, sms = lanes_after
        steps = -(-s.b * s.hq * s.nq * chunks // CONVERT_STEP)
        return KernelLaunch(kernel, min(steps, CONVERT_BLOCKS_PER_SM * sms), CONVERT_THREADS, 0,
                            args(n_tiles=key_tiles))
    if varlen:
        per_head = -(-s.nq * chunks // 256)
        blocks = check_grid(per_head * s.hq * s.b, "flash_bwd_dq_convert")
        return KernelLaunch(kernel, blocks, 256, 0, args(m_tiles=per_head))
    blocks = check_grid(-(-s.b * s.hq * s.nq * chunks // 256), "flash_bwd_dq_convert")
    return KernelLaunch(kernel, blocks, 256, 0, args())


def prepare_backward(spec, arrays, *, tiles: BwdTiles | None = None) -> BackwardLaunch:
    """The backward launches for this spec and the layout of 4-D (B, H, N, D) views ``arrays`` =
    (q, k, v, dout, out, dq, dk, dv); see docs/internals.md (a varlen call's are packed
    (total, H, D): every grid covers the longest sequence). dq goes through the float32
    accumulator and atomic adds unless ``spec.deterministic``."""
    s = spec.shapes
    batch, heads, nq, d = s.b, s.hq, s.nq, s.d
    kv_heads, nk, dv_dim = s.hkv, s.nk, s.dv
    dqk, dvp = padded_head_dims(spec)
    tiles = tiles or tiles_for(spec, _launch.shared_limit(arrays[0].device.id))
    atomic_dq = not spec.deterministic
    aligned = vector_aligned(arrays, (d, dv_dim))
    scratch = scratch_of(spec)
    args = argument_packer(spec, arrays, rows_pad=scratch.rows_pad)

    # 1. Delta, lse2, zeroed dq accumulator.
    launches = [preprocess_launch(args, spec, rows_pad=scratch.rows_pad, aligned=aligned,
                                  zero_dq=atomic_dq)]

    # 2. dK, dV (and dQ through atomics).
    m_tiles, n_tiles = -(-nq // tiles.block_m), -(-nk // tiles.block_n)
    index = tile_index(spec, tiles.block_m, tiles.block_n, by_key=True)
    shared = tiles.dkdv_shared_bytes(dqk, dvp, atomic_dq=atomic_dq)
    expression = variant_dkdv(spec, tiles, aligned=aligned, atomic_dq=atomic_dq)
    kernel = _build.get_function(SOURCE, expression, shared_bytes=shared)
    blocks = check_grid(n_tiles * kv_heads * batch, "flash_bwd_dkdv")
    launches.append(KernelLaunch(kernel, blocks, tiles.warps * 32, shared,
                                 args(m_tiles, n_tiles, index)))

    # 3. dQ.
    if atomic_dq:
        launches.append(convert_launch(args, spec, aligned=aligned))
    else:
        m_tiles, n_tiles = -(-nq // tiles.dq_block_m), -(-nk // tiles.dq_block_n)
        index = tile_index(spec, tiles.dq_block_m, tiles.dq_block_n)
        shared = tiles.dq_shared_bytes(dqk, dvp)
        expression = variant_dq(spec, tiles, aligned=aligned)
        kernel = _build.get_function(SOURCE, expression, shared_bytes=shared)
        blocks = check_grid(m_tiles * heads * batch, "flash_bwd_dq")
        launches.append(KernelLaunch(kernel, blocks, tiles.dq_warps * 32, shared,
                                     args(m_tiles, n_tiles, index)))
    return BackwardLaunch(scratch, tuple(launches))


def backward(dout, q, k, v, out, lse, dq, dk, dv, spec, *, tiles: BwdTiles | None = None):
    """Write dq, dk, dv for 4-D (B, H, N, D) CuPy views; see docs/internals.md. dq goes through
    the float32 accumulator and atomic adds unless ``spec.deterministic``."""
    arrays = (q, k, v, dout, out, dq, dk, dv)
    prepare_backward(spec, arrays, tiles=tiles)(dout, q, k, v, out, lse, dq, dk, dv, spec)


def main_variants() -> list[tuple[str, str]]:
    """The variants that must compile for every supported architecture without register spills:
    for every spec of the grid (both dtypes x head dims x dense/causal, and each mask policy and
    score modifier), the dk/dv kernel with and without atomic dq and the deterministic dq
    kernel; block-sparse fallback tiles (64-row blocks), unaligned views, float32 gradients, and
    the small per-row kernels (the dQ cast also for the Hopper fused dQ's accumulator order, and
    lane by lane)."""
    from ..sparse import BlockMask, ExactMask
    from ._variants import (dropout_spec_grid, float32_grads_specs, spec_grid, spec_of,
                            varlen_spec_grid)

    out = []
    for dtype in ("float16", "bfloat16"):
        for aligned in (False, True):
            for zero_dq in (True, False):
                out.append((SOURCE, variant_pre(dtype, aligned=aligned, zero_dq=zero_dq)))
            # with the semaphores of the Hopper fused dQ's ordered adds (sm90_backward.ordered_dq),
            # or the lane counters of its cast lane by lane (sm90_backward.lanes_counted)
            # (with the claims of its dQ tiles under a band; without ZERO_DQ where every dQ tile's
            # first part is stored, sm90_backward.dq_zeros_needed)
            for zero_dq in (True, False):
                out.append((SOURCE, variant_pre(dtype, aligned=aligned, zero_dq=zero_dq, zero_semaphores=True)))
                out.append((SOURCE, variant_pre(dtype, aligned=aligned, zero_dq=zero_dq, zero_lanes=True,
                                                zero_claims=True)))
            out.append((SOURCE, variant_pre(dtype, aligned=aligned, zero_dq=True, zero_lanes=True)))
            out += [(SOURCE, variant_convert(dtype, aligned=aligned, fragment_order=order))
                    for order in (False, True)]
            out.append((SOURCE, variant_convert(dtype, aligned=aligned, fragment_order=True, after_lanes=True)))

    def both_paths(spec, aligned=True, shared_limit=None):
        tiles = tiles_for(spec, shared_limit)
        return [(SOURCE, variant_dkdv(spec, tiles, aligned=aligned, atomic_dq=True)),
                (SOURCE, variant_dkdv(spec, tiles, aligned=aligned, atomic_dq=False)),
                (SOURCE, variant_dq(spec, tiles, aligned=aligned))]

    head_dims = (32, 64, 96, 128, 256)
    for spec in spec_grid(head_dims) + dropout_spec_grid(head_dims):
        out += both_paths(spec)
    # The tiles of devices with 99 KiB of shared memory per thread block (default_tiles).
    for dtype in ("float16", "bfloat16"):
        for causal in (False, True):
            out += both_paths(spec_of(dtype, 128, causal=causal), shared_limit=99 * 1024)
    exact = ExactMask.from_dense(numpy.tril(numpy.ones((256, 256), bool)))
    out += both_paths(spec_of("bfloat16", 128, nq=256, nk=256, exact_mask=exact), shared_limit=99 * 1024)
    small_blocks = BlockMask.from_dense(numpy.ones((16, 16), bool), block_size=64)
    for d in (64, 128):
        out += both_paths(spec_of("float16", d, causal=True, block_mask=small_blocks))
    out += both_paths(spec_of("float16", 64, 128), aligned=False)

    for spec in float32_grads_specs(head_dims):
        out += both_paths(spec)
    out += both_paths(dataclasses.replace(spec_of("bfloat16", 96, 64), float32_grads=True),
                      aligned=False)
    out += both_paths(spec_of("bfloat16", 128, causal=True, dropout_p=0.1, dropout_seed=1,
                              float32_grads=True))
    for aligned in (False, True):
        out += [(SOURCE, variant_convert("bfloat16", aligned=aligned, float32_grads=True, fragment_order=order))
                for order in (False, True)]
        out.append((SOURCE, variant_convert("bfloat16", aligned=aligned, float32_grads=True, fragment_order=True,
                                            after_lanes=True)))

    for dtype in ("float16", "bfloat16"):
        for aligned in (False, True):
            for zero_dq in (True, False):
                out.append((SOURCE, variant_pre(dtype, aligned=aligned, zero_dq=zero_dq, varlen=True)))
            out += [(SOURCE, variant_convert(dtype, aligned=aligned, varlen=True, fragment_order=order))
                    for order in (False, True)]
    for spec in varlen_spec_grid():
        out += both_paths(spec)
    return list(dict.fromkeys(out))


__all__ = ["backward", "prepare_backward", "supports", "describe_call", "workspace_of", "BwdTiles", "default_tiles", "tiles_for", "workspace_bytes",
           "main_variants"]
