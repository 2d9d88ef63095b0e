"""Launch of the KV-cache decode kernels (csrc/flash_decode.cu) for float16 / bfloat16.

``forward`` runs a few query rows per batch row against a contiguous or paged cache: the keys of
each batch row are split over ``splits`` thread blocks (chosen from the occupancy unless given),
whose normalised partial results ``decode_combine`` merges by their log-sum-exp. ``append``
writes new keys and values into the cache in place. ``why_not`` says when the kernels cannot
take a call (the public API then takes its generic route).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from . import _build, _launch
from ._launch import (F32, I32, I64, PTR, KernelLaunch, PackedArgs, check_grid, element_strides, element_type,
                      make_struct_dtype, padded_head_dim, pointer, sm_count)
from .._mask import LOG2E, UNBOUNDED, band, clamped_band

SOURCE = "flash_decode.cu"
WARPS = 4
ROWS = 16         # packed query rows (query positions × the GQA group) per thread block
BLOCK_N = 64      # keys per tile
HELD_PAGES = 256  # paged: page numbers of a batch row held in shared memory (DECODE_HELD_PAGES)
UNBOUNDED_BAND = 1 << 30  # an unbounded band side, in the kernels' int32 arithmetic (mask.cuh)
BLOCKS_PER_SM = 2  # resident decode blocks per SM the split count aims to fill
MIN_SPLIT_TILES = 2  # key tiles per split at least (one-tile splits measured slower: benchmarks/NOTES.md)
MAX_SPLITS = 128
COMBINE_COLUMNS = 32  # output columns per warp of decode_combine (DECODE_COMBINE_COLUMNS)
SHARED_LIMIT = 110 * 1024  # per block: two blocks per SM on Hopper (at D, Dv <= 128)

DECODE_ARGS = make_struct_dtype(
    [(n, PTR) for n in ("q", "k", "v", "o", "lse", "o_part", "lse_part", "seqlens", "block_table",
                        "batch_idx", "alibi", "leftpad")]
    + [(f"{t}_s{a}", I64) for t in "qokv" for a in "bnh"]
    + [("table_stride", I64)]
    + [(n, I32) for n in ("batch", "sq", "heads", "group", "d", "dv", "page_size", "appended", "capacity",
                          "splits", "row_chunks", "window_left", "window_right")]
    + [("scale_log2", F32), ("cap_in", F32), ("cap_out", F32)]
)
APPEND_ARGS = make_struct_dtype(
    [(n, PTR) for n in ("k_new", "v_new", "k", "v", "seqlens", "block_table", "batch_idx")]
    + [(f"{t}_s{a}", I64) for t in ("kn", "vn", "k", "v") for a in "bnh"]
    + [("table_stride", I64)]
    + [(n, I32) for n in ("batch", "appended", "kv_heads", "d", "dv", "page_size", "capacity")]
)


def why_not(q, k_cache, v_cache, block_table=None) -> str | None:
    """None when the decode kernels take these CuPy arrays (paged through ``block_table``), else
    the reason."""
    if q.dtype.name not in ("float16", "bfloat16"):
        return f"takes float16/bfloat16, not {q.dtype.name}"
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return "q, k_cache and v_cache must share one dtype"
    reason = _launch.why_not_device(q)
    if reason:
        return reason
    d, dv = q.shape[-1], v_cache.shape[-1]
    for name, width in (("D", d), ("Dv", dv)):
        if width > 256 or width % 8:
            return f"takes head dims that are multiples of 8 up to 256; {name} = {width}"
    limit = _launch.shared_limit(q.device.id)
    dqk, dvp = padded_head_dim(d, "head dim D"), padded_head_dim(dv, "value head dim Dv")
    # Two ring stages at least (stages_for), and a paged launch's page numbers beside them.
    need = shared_bytes(dqk, dvp, 2, block_table is not None)
    if need > limit:
        return (f"needs {need:,} bytes of shared memory per thread block at D = {d}, Dv = {dv}; "
                f"this GPU allows {limit:,}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        # (byte strides: the launch takes them in whole elements, element_strides)
        if x.strides[-1] != x.itemsize:
            return f"needs {name}'s last axis contiguous"
        if x.data.ptr % 16 or any(s % 16 for s in x.strides[:-1]):
            return f"needs {name}'s rows 16-byte aligned"
    capacity = capacity_of(k_cache, block_table)
    if capacity + q.shape[1] >= 2**31:  # the key bound of a row's last query: csrc/mask.cuh, key_end
        return (f"counts a batch row's keys in int32: its capacity ({capacity:,} keys) plus Sq "
                f"({q.shape[1]}) must be below 2**31")
    return None


def _stage_bytes(dqk: int, dvp: int) -> int:
    """One ring stage: a K and a V tile whose rows are whole 128-byte lines (RingTile in
    flash_decode.cu)."""
    return BLOCK_N * (-(-dqk // 64) + -(-dvp // 64)) * 64 * 2


def _q_tile_bytes(dqk: int) -> int:
    """The packed query rows, padded by 16 bytes."""
    return ROWS * (dqk + 8) * 2


def _held_pages_bytes(paged: bool) -> int:
    """The page numbers a paged block holds (HeldPages in flash_decode.cu)."""
    return 4 * HELD_PAGES if paged else 0


def stages_for(dqk: int, dvp: int, paged: bool, shared_limit: int | None = None) -> int:
    """K/V ring stages: as many as fit two blocks per Hopper SM (at least two), and a block of
    a device with less shared memory (``shared_limit`` bytes per block, ``_launch.shared_limit``:
    99 KiB at compute capability 8.6 and 8.9)."""
    room = min(SHARED_LIMIT, shared_limit or SHARED_LIMIT) - _q_tile_bytes(dqk) - _held_pages_bytes(paged)
    return max(2, min(4, room // _stage_bytes(dqk, dvp)))


def shared_bytes(dqk: int, dvp: int, stages: int, paged: bool) -> int:
    return stages * _stage_bytes(dqk, dvp) + _q_tile_bytes(dqk) + _held_pages_bytes(paged)


@functools.lru_cache(maxsize=None)
def resident_blocks(device_id: int, shared: int) -> int:
    """Decode blocks one SM holds at once, as its shared memory allows (registers allow more)."""
    import cupy

    per_sm = cupy.cuda.runtime.getDeviceProperties(device_id)["sharedMemPerMultiprocessor"]
    return max(1, min(4, per_sm // (shared + 1024)))


def choose_splits(blocks_per_split: int, key_tiles: int, slots: int) -> int:
    """Key splits per batch row. A split count s launches s · ``blocks_per_split`` blocks (batch
    rows × key/value heads × row chunks) into ``slots`` resident places (SMs × blocks per SM);
    memory-bound blocks finish together, so a last wave that is partly empty costs a whole one.
    The fewest splits whose waves are at least 95% full (or, failing that, the fullest), with at
    least ``MIN_SPLIT_TILES`` key tiles each. ``key_tiles`` counts the 64-key tiles of the
    longest row the cache holds (its capacity: the lengths stay on the device)."""
    most = max(1, min(key_tiles // MIN_SPLIT_TILES, MAX_SPLITS))

    def fill(s: int) -> float:
        blocks = s * blocks_per_split
        return blocks / (-(-blocks // slots) * slots)

    best = max(fill(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if fill(s) >= min(0.95, best))


@dataclass(frozen=True)
class Geometry:
    """The launch shape of one decode problem: padded head dims, the GQA group, 16-row chunks
    of the packed query rows, shared memory, and the blocks one key split launches."""

    dqk: int
    dvp: int
    group: int
    row_chunks: int
    shared: int
    blocks_per_split: int

    @classmethod
    def of(cls, batch: int, sq: int, heads: int, kv_heads: int, d: int, dv: int,
           paged: bool, limit: int) -> "Geometry":
        """``limit``: the device's shared memory per thread block."""
        dqk, dvp = padded_head_dim(d, "head dim D"), padded_head_dim(dv, "value head dim Dv")
        group = heads // kv_heads
        row_chunks = -(-(sq * group) // ROWS)
        stages = stages_for(dqk, dvp, paged, limit)
        return cls(dqk, dvp, group, row_chunks, shared_bytes(dqk, dvp, stages, paged),
                   batch * kv_heads * row_chunks)

    def auto_splits(self, capacity: int, device_id: int) -> int:
        return choose_splits(self.blocks_per_split, -(-capacity // BLOCK_N),
                             sm_count(device_id) * resident_blocks(device_id, self.shared))


def _geometry_of(q, k_cache, v_cache, block_table) -> Geometry:
    """The ``Geometry`` of a launch over these arrays, paged where a ``block_table`` is given."""
    return Geometry.of(*q.shape[:3], k_cache.shape[2], q.shape[3], v_cache.shape[3], block_table is not None,
                       _launch.shared_limit(q.device.id))


def chosen_num_splits(q, k_cache, v_cache, seqlens=None, *, block_table=None) -> int:
    """The split count ``forward`` picks with ``num_splits=0`` for these arrays, paged where a
    ``block_table`` is given, as ``forward`` takes them (the capacity of the cache decides, not
    ``seqlens``: the lengths stay on the device)."""
    geometry = _geometry_of(q, k_cache, v_cache, block_table)
    return geometry.auto_splits(capacity_of(k_cache, block_table), q.device.id)


def check_num_splits(q, k_cache, v_cache, num_splits: int, *, block_table=None) -> None:
    """Raises the ValueError ``prepare`` raises for these arrays when ``num_splits`` key splits
    pass one launch; nothing is compiled or launched (``cuflash.kvcache_plan``). ``num_splits``
    0 is checked as one split, without asking the occupancy: the count ``choose_splits`` picks
    exceeds one only where one split's blocks fill less than 95% of their waves, so fewer than
    20 waves, and ``MAX_SPLITS`` times that is far below the bound."""
    _checked_blocks(max(1, num_splits), _geometry_of(q, k_cache, v_cache, block_table))


def _checked_blocks(splits: int, geometry: Geometry) -> int:
    """The decode kernel's thread blocks for ``splits`` key splits, or the ValueError of a
    launch too large, naming num_splits and its bound (``_decode_grid_name``)."""
    return check_grid(splits * geometry.blocks_per_split, _decode_grid_name(splits, geometry))


def _mask_type(causal: bool, window) -> str:
    left, right = band(tuple(window), causal)
    return _build.template_expression("Mask", left != UNBOUNDED, right != UNBOUNDED, False)


def _kernel_band(causal: bool, window, sq: int, capacity: int) -> tuple[int, int]:
    """``(window_left, window_right)`` as the kernel reads them: the band with sides that admit
    every key cut down by ``_mask.clamped_band`` to the Sq query rows and the cache's capacity,
    an unbounded side sent as ``UNBOUNDED_BAND`` (the mask variant does not test it). A bounded
    side keeps its value past 2^30 keys: a left side of 2^30 would hide a row's first keys once it
    sees more than 2^30 + Sq − 1 (the kernel's ``row + shift − left`` stays within int32, as
    ``row + shift + right`` does with ``right ≤ Sq``)."""
    left, right = clamped_band(sq, capacity, *band(tuple(window), causal))
    return tuple(UNBOUNDED_BAND if x == UNBOUNDED else x for x in (left, right))


def variant(dtype, dqk: int, dvp: int, *, causal: bool, window, softcap: bool, alibi: bool,
            paged: bool, shared_limit: int | None = None) -> str:
    return _build.template_expression(
        "flash_decode", element_type(dtype), dqk, dvp, stages_for(dqk, dvp, paged, shared_limit),
        _mask_type(causal, window),
        _build.template_expression("ScoreMod", softcap, alibi), paged,
    )


def _stride_fields(name: str, strides) -> dict:
    """``{name_sb, name_sn, name_sh}`` from the element strides of a 4-D (B, S, H, D) array:
    batch row (page, when paged), position, head."""
    return {f"{name}_s{a}": s for a, s in zip("bnh", strides[:3])}


DECODE_POINTERS = ("q", "k", "v", "o", "lse", "o_part", "lse_part", "seqlens", "block_table", "batch_idx",
                   "alibi", "leftpad")


@dataclass(frozen=True)
class DecodeLaunch:
    """A prepared decode call: everything but the data pointers, which each call fills in. With
    key splits, ``combine`` merges their parts; it is a dependent launch of the decode kernel
    (``_launch.DriverLaunch``), so that its blocks are in place when the splits end, and the
    decode kernel is one of the append's when the call appended keys."""

    decode: KernelLaunch
    combine: KernelLaunch | None
    splits: int
    rows: int  # batch rows × query heads × query positions
    dv: int

    def workspace(self):
        """The splits' partial outputs and lse (float32), or None with one split."""
        if self.splits == 1:
            return None
        return _launch.device_memory(4 * self.splits * self.rows * (self.dv + 1))

    def __call__(self, q, k_cache, v_cache, seqlens, out, lse, alibi, block_table, batch_idx, leftpad,
                 work=None, stream=None) -> None:
        """``work``: ``workspace()`` allocated by the caller beforehand, or None to allocate it here;
        ``stream``: ``_launch.launch_stream()``'s, where the caller has it (None: looked up here)."""
        o_part, lse_part = 0, 0
        if self.splits > 1:
            work = self.workspace() if work is None else work
            o_part, lse_part = work.ptr, work.ptr + self.splits * self.rows * self.dv * 4
        pointers = tuple(x if isinstance(x, int) else pointer(x) for x in (
            q, k_cache, v_cache, out, lse, o_part, lse_part, seqlens, block_table, batch_idx, alibi, leftpad))
        stream = _launch.launch_stream() if stream is None else stream
        self.decode(pointers, stream.ptr)
        if self.combine is not None:
            self.combine(pointers, stream.ptr)
            if stream.is_capturing():  # the graph's replays write the workspace
                from .._calls import keep_alive_with

                keep_alive_with((out, lse), (work,))


def combine_warps(rows: int, dv: int) -> int:
    """decode_combine's warps: one per row and COMBINE_COLUMNS output columns."""
    return rows * -(-dv // COMBINE_COLUMNS)


def _layout(x) -> tuple | None:
    """What a prepared launch depends on of one array: shape, element strides, dtype."""
    return None if x is None else (x.shape, element_strides(x), x.dtype.name)


def capacity_of(k_cache, block_table=None) -> int:
    """Keys one batch row's cache holds: its length, or pages per row × page size."""
    return _capacity(k_cache.shape, None if block_table is None else block_table.shape)


def _capacity(k_cache_shape, table_shape) -> int:
    """``capacity_of`` from the shapes (what a prepared launch keeps)."""
    return k_cache_shape[1] * (1 if table_shape is None else table_shape[1])


def _decode_grid_name(splits: int, geometry: Geometry) -> str:
    """The decode kernel as ``check_grid`` names it: its grid is ``splits`` times the blocks of
    one split, so a split count past one launch is refused naming num_splits and its bound."""
    per_split = geometry.blocks_per_split
    return (f"the decode kernel (num_splits={splits:,} key splits of {per_split:,} thread blocks "
            f"each: B · Hkv · ceil(Sq · Hq / Hkv / {ROWS}); num_splits takes at most "
            f"{(2**31 - 1) // per_split:,} here)")


@functools.lru_cache(maxsize=256)
def _prepared(layouts, device_id: int, appended: int, scale: float, causal: bool, window, softcap: float,
              alibi: bool, num_splits: int) -> DecodeLaunch:
    (q_shape, q_strides, dtype), k_layout, v_layout, o_layout, table_layout = layouts
    batch, sq, heads, d = q_shape
    (_, page_or_capacity, kv_heads, _), k_strides, _ = k_layout
    dv = v_layout[0][3]
    paged = table_layout is not None
    limit = _launch.shared_limit(device_id)
    geometry = Geometry.of(batch, sq, heads, kv_heads, d, dv, paged, limit)
    dqk, dvp, row_chunks, shared = geometry.dqk, geometry.dvp, geometry.row_chunks, geometry.shared
    capacity = _capacity(k_layout[0], table_layout[0] if paged else None)
    splits = num_splits or geometry.auto_splits(capacity, device_id)
    # Checked before anything is packed: a split count past int32 is then a launch too large.
    blocks = _checked_blocks(splits, geometry)
    rows = batch * heads * sq
    warps = check_grid(combine_warps(rows, dv), "the decode combine kernel (one warp per query row and 32 columns)")
    left, right = _kernel_band(causal, window, sq, capacity)
    values = dict(
        **_stride_fields("q", q_strides), **_stride_fields("o", o_layout[1]),
        **_stride_fields("k", k_strides), **_stride_fields("v", v_layout[1]),
        table_stride=table_layout[1][0] if paged else 0,
        batch=batch, sq=sq, heads=heads, group=geometry.group, d=d, dv=dv,
        page_size=page_or_capacity if paged else 0, appended=appended, capacity=capacity,
        splits=splits, row_chunks=row_chunks,
        window_left=left, window_right=right,
        scale_log2=scale * LOG2E, cap_in=scale / softcap if softcap > 0 else 0.0, cap_out=softcap * LOG2E,
    )
    kernel = _build.get_function(SOURCE, variant(dtype, dqk, dvp, causal=causal, window=window,
                                                 softcap=softcap > 0, alibi=alibi, paged=paged,
                                                 shared_limit=limit),
                                 shared_bytes=shared)
    # All of the SM's unified L1/shared memory as shared memory: the blocks per SM that
    # resident_blocks counts on (the caches stream through cp.async.cg, bypassing L1).
    kernel.preferred_shared_memory_carveout = 100
    args = PackedArgs(DECODE_ARGS, DECODE_POINTERS, values)
    combine = None
    if splits > 1:
        combine = KernelLaunch(_build.get_function(SOURCE, _combine_variant(dtype)), -(-warps // 4), 128, 0, args,
                               dependent=True)
    # After an append (``append``, launched just before by the same call) the decode kernel is
    # its dependent, as the merge is the decode kernel's.
    return DecodeLaunch(KernelLaunch(kernel, blocks, WARPS * 32, shared, args, dependent=appended > 0),
                        combine, splits, rows, dv)


def prepare(q, k_cache, v_cache, out, *, appended: int = 0, scale: float, causal: bool, window,
            softcap: float, alibi, block_table=None, num_splits: int = 0) -> DecodeLaunch:
    """The launch ``forward`` makes for the layouts of these arrays and these options, prepared
    once (later calls find it ready). Whatever refuses the call before a kernel runs (a grid too
    large for one launch) refuses it here: a caller that appends first prepares first, and
    allocates its ``workspace()``, so that a refused call has not written the caches."""
    layouts = (_layout(q), _layout(k_cache), _layout(v_cache), _layout(out), _layout(block_table))
    return _prepared(layouts, q.device.id, int(appended), float(scale), bool(causal), tuple(window),
                     float(softcap), alibi is not None, int(num_splits))


def forward(q, k_cache, v_cache, cache_seqlens, out, lse, *, appended: int = 0, scale: float, causal: bool,
            window, softcap: float, alibi, block_table=None, cache_batch_idx=None, cache_leftpad=None,
            num_splits: int = 0, workspace=None, launch=None) -> int:
    """out, lse ← attention of q (B, Sq, Hq, D) over the first cache_seqlens[b] + appended keys
    of each batch row's cache (cache_seqlens: int32 (B,) on the device, the lengths before
    ``appended`` keys were added), from position cache_leftpad[b] on (int32 (B,), contiguous
    caches only; None: from 0); a row whose length lies outside [0, capacity − appended], or
    whose cache_leftpad lies outside [0, cache_seqlens[b]], gets NaN output and lse. Returns the
    split count used. The launch is prepared once per layout and options; later calls only fill
    in the pointers. ``launch``: ``prepare``'s launch for these arrays and options where the
    caller prepared it already (None: prepared here); ``workspace``: its ``workspace()`` where the
    caller allocated it beforehand (None: allocated here)."""
    if launch is None:
        launch = prepare(q, k_cache, v_cache, out, appended=appended, scale=scale, causal=causal,
                         window=window, softcap=softcap, alibi=alibi, block_table=block_table,
                         num_splits=num_splits)
    launch(q, k_cache, v_cache, cache_seqlens, out, lse, alibi, block_table, cache_batch_idx, cache_leftpad,
           workspace)
    return launch.splits


def _combine_variant(dtype) -> str:
    return _build.template_expression("decode_combine", element_type(dtype))


def append(k_new, v_new, k_cache, v_cache, cache_seqlens, *, block_table=None, cache_batch_idx=None,
           launch=None) -> None:
    """Writes k_new / v_new (B, S_new, Hkv, D / Dv) into the caches in place at positions
    cache_seqlens[b] + i (the lengths before the append), through block_table when paged;
    nothing for a row whose length lies outside [0, capacity − S_new]. Prepared once per layout,
    like ``forward``; later calls only fill in the pointers. ``launch``: ``prepare_append``'s for
    these arrays where the caller holds it (None: looked up here)."""
    if launch is None:
        launch = prepare_append(k_new, v_new, k_cache, v_cache, block_table)
    if launch is None:  # nothing to write
        return
    launch(tuple(pointer(x) for x in (k_new, v_new, k_cache, v_cache, cache_seqlens, block_table,
                                      cache_batch_idx)))


def prepare_append(k_new, v_new, k_cache, v_cache, block_table=None):
    """The launch ``append`` makes for the layouts of these arrays (a ``KernelLaunch`` taking
    APPEND_POINTERS), or None when there is nothing to write."""
    layouts = tuple(_layout(x) for x in (k_new, v_new, k_cache, v_cache, block_table))
    return _prepared_append(layouts, k_new.device.id)


APPEND_POINTERS = ("k_new", "v_new", "k", "v", "seqlens", "block_table", "batch_idx")


@functools.lru_cache(maxsize=256)
def _prepared_append(layouts, device_id: int):
    """The prepared append (a ``KernelLaunch``) for these layouts (``_layout`` of k_new, v_new,
    k_cache, v_cache, block_table), or None when there is nothing to write."""
    (kn_shape, kn_strides, _), (vn_shape, vn_strides, _), k_layout, v_layout, table_layout = layouts
    batch, s_new, kv_heads, d = kn_shape
    if batch * s_new * kv_heads == 0:
        return None
    paged = table_layout is not None
    page_or_capacity = k_layout[0][1]
    values = dict(
        **_stride_fields("kn", kn_strides), **_stride_fields("vn", vn_strides),
        **_stride_fields("k", k_layout[1]), **_stride_fields("v", v_layout[1]),
        table_stride=table_layout[1][0] if paged else 0,
        batch=batch, appended=s_new, kv_heads=kv_heads, d=d, dv=vn_shape[3],
        page_size=page_or_capacity if paged else 0,
        capacity=_capacity(k_layout[0], table_layout[0] if paged else None),
    )
    kernel = _build.get_function(SOURCE, _append_variant(paged))
    blocks = check_grid(batch * s_new * kv_heads, "the cache append kernel")
    return KernelLaunch(kernel, blocks, 128, 0, PackedArgs(APPEND_ARGS, APPEND_POINTERS, values))


def _append_variant(paged: bool) -> str:
    return _build.template_expression("kv_append", paged)


def main_variants() -> list[tuple[str, str]]:
    """The variants that must compile for every supported architecture without register spills:
    each head dim contiguous and paged, each band and score modifier at D = 128, the combine
    and append kernels."""
    import numpy

    out = []
    for dtype in ("float16", "bfloat16"):
        for d in (64, 128, 256):
            for paged in (False, True):
                out.append((SOURCE, variant(numpy.dtype(dtype), d, d, causal=False, window=(-1, -1),
                                            softcap=False, alibi=False, paged=paged)))
        out.append((SOURCE, _combine_variant(numpy.dtype(dtype))))
    for causal, window, softcap, alibi in ((True, (-1, -1), False, False), (False, (256, 0), False, False),
                                           (False, (256, -1), False, False),
                                           (False, (-1, -1), True, False), (True, (-1, -1), False, True),
                                           (True, (256, -1), True, True)):
        out.append((SOURCE, variant(numpy.dtype("bfloat16"), 128, 128, causal=causal, window=window,
                                    softcap=softcap, alibi=alibi, paged=True)))
    out.append((SOURCE, variant(numpy.dtype("bfloat16"), 192, 128, causal=True, window=(-1, -1),
                                softcap=False, alibi=False, paged=False)))
    # The ring of devices with 99 KiB of shared memory per thread block (compute capability 8.6
    # and 8.9): fewer stages at D = 128.
    for paged in (False, True):
        out.append((SOURCE, variant(numpy.dtype("bfloat16"), 128, 128, causal=True, window=(-1, -1),
                                    softcap=False, alibi=False, paged=paged, shared_limit=99 * 1024)))
    out += [(SOURCE, _append_variant(paged)) for paged in (False, True)]
    return out


__all__ = ["why_not", "prepare", "forward", "append", "prepare_append", "capacity_of", "choose_splits", "chosen_num_splits",
           "check_num_splits", "stages_for",
           "variant", "main_variants",
           "DECODE_ARGS", "APPEND_ARGS"]
