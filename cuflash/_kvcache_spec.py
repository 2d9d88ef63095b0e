"""One ``attention_with_kvcache`` call, validated: the frozen ``KVCacheSpec`` its routes read.

Everything a call's arrays say through their shapes, dtypes and modules is checked here, once,
before anything is written. Values held on the host (a Python ``int`` for ``cache_seqlens``,
NumPy index arrays) are checked too (``check_host_values``); values held in CuPy arrays are not
read here: reading them would make the call wait for the GPU and could not be captured in a CUDA
graph. ``cuflash._kvcache`` says what each route does about those.

Errors are ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, wrong value), naming
what was given and what is allowed.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy

from . import _checks

# Pages hold whole multiples of 16 keys: the kernels' key tiles then start on a page boundary
# and the smallest tile (16 keys) never straddles two pages.
PAGE_MULTIPLE = 16


@dataclass(frozen=True)
class KVCacheSpec:
    """Shapes, dtype and options of one call.

    ``capacity`` is how many keys one batch row's cache holds: ``S_cache`` for a contiguous cache,
    ``max_pages · page_size`` for a paged one. ``s_new`` is the number of keys appended (0 without
    ``k``/``v``). ``lengths`` holds the cache lengths before the append as a NumPy int64 ``(B,)``
    array when they are known on the host (an ``int``, or NumPy inputs), else ``None``; then
    ``seqlens`` is the caller's CuPy int32 ``(B,)`` array. ``leftpad`` is the caller's int32
    ``(B,)`` ``cache_leftpad`` (the first key each row attends, keys before it being padding) or
    ``None``, and ``leftpads`` its values as NumPy int64 when they are known on the host (NumPy
    inputs), else ``None``. ``alibi`` is ``None`` or a new
    C-contiguous float32 ``(B, Hq)`` array of the inputs' module (the caller's slopes copied).
    ``window`` is the caller's ``(left, right)`` as Python ints.
    """

    xp: Any
    dtype: numpy.dtype
    b: int
    sq: int
    hq: int
    hkv: int
    d: int
    dv: int
    paged: bool
    page_size: int          # keys per page (paged), or S_cache (contiguous)
    capacity: int
    s_new: int
    scale: float
    causal: bool
    window: tuple[int, int]
    softcap: float
    num_splits: int
    lengths: Any = field(compare=False, repr=False)
    seqlens: Any = field(compare=False, repr=False)
    block_table: Any = field(compare=False, repr=False)
    cache_batch_idx: Any = field(compare=False, repr=False)
    alibi: Any = field(compare=False, repr=False)
    leftpad: Any = field(default=None, compare=False, repr=False)
    leftpads: Any = field(default=None, compare=False, repr=False)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.b, self.sq, self.hq, self.dv)

    @property
    def lse_shape(self) -> tuple[int, int, int]:
        return (self.b, self.hq, self.sq)

    def describe(self) -> str:
        """The call in one line, for reports."""
        cache = (f"paged cache (page_size={self.page_size}, capacity {self.capacity})"
                 if self.paged else f"contiguous cache (capacity {self.capacity})")
        parts = [self.dtype.name, f"B={self.b}", f"Sq={self.sq}", f"Hq={self.hq}",
                 f"Hkv={self.hkv}", f"D={self.d}", f"Dv={self.dv}", cache]
        if self.leftpad is not None:
            parts.append("cache_leftpad")
        if self.s_new:
            parts.append(f"append {self.s_new}")
        if self.causal:
            parts.append("causal")
        if self.window != (-1, -1):
            parts.append(f"window={self.window}")
        if self.softcap:
            parts.append(f"softcap={self.softcap:g}")
        if self.alibi is not None:
            parts.append("alibi")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- the call

@dataclass(frozen=True)
class Rotary:
    """The rotary embedding of one call (flash-attn's ``rotary_cos`` / ``rotary_sin``): tables
    ``(seqlen_ro, rotary_dim / 2)`` of q's dtype and module, row ``p`` for position ``p``, and
    which dimensions pair up (``interleaved``: 0 & 1, 2 & 3, ...; else ``i`` & ``i + rotary_dim
    / 2``, GPT-NeoX style)."""

    cos: Any
    sin: Any
    interleaved: bool


def check_rotary(rotary_cos, rotary_sin, rotary_interleaved, spec: KVCacheSpec,
                 q) -> Rotary | None:
    """The call's rotary embedding, checked against its spec; ``None`` without tables."""
    interleaved = _checks.check_bool(rotary_interleaved, "rotary_interleaved")
    if rotary_cos is None and rotary_sin is None:
        return None
    if rotary_cos is None or rotary_sin is None:
        raise ValueError(_unpaired("rotary_cos", rotary_cos, "rotary_sin"))
    if not spec.s_new:
        raise ValueError("rotary_cos and rotary_sin rotate the new keys as they are appended: "
                         "give k and v too (as flash-attn requires)")
    tables = {"q": q, "rotary_cos": rotary_cos, "rotary_sin": rotary_sin}
    _checks.common_module(tables)
    _checks.check_dtypes(tables)
    shape = tuple(rotary_cos.shape)
    if len(shape) != 2 or tuple(rotary_sin.shape) != shape or shape[1] == 0:
        raise ValueError(f"rotary_cos and rotary_sin must both have shape (seqlen_ro, rotary_dim "
                         f"/ 2), got {shape} and {tuple(rotary_sin.shape)}")
    if 2 * shape[1] > spec.d:
        raise ValueError(f"rotary_dim = 2 · {shape[1]} (the tables' columns) must be at most the "
                         f"head dimension D = {spec.d}")
    if shape[0] < spec.capacity:
        raise ValueError(f"rotary_cos and rotary_sin must have a row for every position of the "
                         f"cache: at least {spec.capacity} rows (its capacity), got {shape[0]}")
    if rotates_queries_in_order(spec) and spec.sq > spec.s_new:
        # More queries than new keys: the last queries turn to positions past the appended keys.
        if spec.lengths is not None:
            rows, of = int(spec.lengths.max()) + spec.sq, "the largest cache_seqlens"
        else:  # lengths on the device, not read here: the largest they may be
            rows, of = spec.capacity - spec.s_new + spec.sq, (
                f"the largest cache_seqlens a device array may hold, capacity − S_new = "
                f"{spec.capacity - spec.s_new}")
        if shape[0] < rows:
            raise ValueError(
                f"rotary_cos and rotary_sin must have a row for every position they turn: the "
                f"{spec.sq} queries of a causal or windowed call go to positions cache_seqlens + "
                f"0 … {spec.sq - 1}, up to {rows - 1} for {of}, so at least {rows} rows, got "
                f"{shape[0]}")
    return Rotary(rotary_cos, rotary_sin, interleaved)


def rotates_queries_in_order(spec: KVCacheSpec) -> bool:
    """Whether the rotary embedding turns query ``i`` of a row to position ``cache_seqlens + i``
    (else every query of the row to ``cache_seqlens``): flash-attn does so for causal and for
    windowed calls, a window side of at least the capacity counting as none (it masks nothing),
    so that two calls with the same mask rotate alike."""
    return spec.causal or any(0 <= side < spec.capacity for side in spec.window)


def validate(q, k_cache, v_cache, k, v, *, cache_seqlens, block_table, cache_batch_idx,
             causal, scale, window, softcap, alibi_slopes, num_splits,
             cache_leftpad=None) -> KVCacheSpec:
    """Check one call (nothing is read from a device, nothing is written) into a spec."""
    arrays = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    if (k is None) != (v is None):
        raise ValueError(_unpaired("k", k, "v"))
    if k is not None:
        arrays.update(k=k, v=v)
    xp = _checks.common_module(arrays)
    dtype = _checks.check_dtypes(arrays)
    for name, x in arrays.items():
        _check_4d(name, x)

    b, sq, hq, d = q.shape
    paged = block_table is not None
    layout = ("(num_pages, page_size, Hkv, {})" if paged else "(B_cache, S_cache, Hkv, {})")
    _check_caches(k_cache, v_cache, d, hq, layout)
    hkv, dv = k_cache.shape[2], v_cache.shape[3]

    if paged:
        for name, x in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if x is not None:
                raise ValueError(f"{name} applies to a contiguous cache only (as in flash-attn): "
                                 f"with a block_table, each batch row's pages are listed in its "
                                 f"row of the table")
        _check_index_array("block_table", block_table, (b, None), xp, q)
        page_size = k_cache.shape[1]
        if page_size % PAGE_MULTIPLE:
            raise ValueError(
                f"with a block_table the caches are pages (num_pages, page_size, Hkv, D) and "
                f"page_size must be a multiple of {PAGE_MULTIPLE}, got k_cache "
                f"{tuple(k_cache.shape)} (page_size {page_size}); a contiguous cache "
                f"(B_cache, S_cache, Hkv, D) takes no block_table")
        capacity = block_table.shape[1] * page_size
    else:
        page_size = capacity = k_cache.shape[1]
        if cache_batch_idx is None:
            if k_cache.shape[0] < b:
                raise ValueError(
                    f"a contiguous cache without cache_batch_idx holds batch row b in its row b: "
                    f"k_cache must have at least {b} rows, as q {tuple(q.shape)} has, got "
                    f"{tuple(k_cache.shape)}")
        else:
            _check_index_array("cache_batch_idx", cache_batch_idx, (b,), xp, q)
        if cache_leftpad is not None:
            _check_index_array("cache_leftpad", cache_leftpad, (b,), xp, q)
    leftpads = (cache_leftpad.astype(numpy.int64)
                if cache_leftpad is not None and xp is numpy else None)

    s_new = 0
    if k is not None:
        s_new = k.shape[1]
        for name, x, width in (("k", k, d), ("v", v, dv)):
            expected = (b, s_new, hkv, width)
            if tuple(x.shape) != expected:
                raise ValueError(f"{name} must have shape (B, S_new, Hkv, {'Dv' if name == 'v' else 'D'}) "
                                 f"= {expected}, got {tuple(x.shape)}")
        if xp is numpy:
            for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
                if not cache.flags.writeable:
                    raise ValueError(f"{name} must be writable to append k and v, got a "
                                     f"read-only array")
        # A cache that repeats its memory (an expanded or broadcast view) holds several batch
        # rows, positions or heads in one slot: their appends would overwrite each other.
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            repeated = [axis for axis, (n, stride) in enumerate(zip(cache.shape, cache.strides))
                        if n > 1 and stride == 0]
            if repeated:
                raise ValueError(
                    f"{name} must not repeat memory along an axis to append k and v, got "
                    f"{tuple(cache.shape)} with stride 0 along axis {repeated[0]} (an expanded or "
                    f"broadcast view): appends to that axis would be written into one slot")
            if _checks.has_overlapping_elements(tuple(cache.shape), tuple(cache.strides),
                                                cache.itemsize):
                raise ValueError(
                    f"{name} must not have overlapping elements to append k and v, got strides "
                    f"{tuple(cache.strides)} for shape {tuple(cache.shape)}: an append would be "
                    f"written over part of another slot")
        # Caches that share memory would take the new values over the new keys. NumPy tells
        # exactly (a packed buffer's k and v halves do not overlap); CuPy's test of byte ranges
        # would refuse those halves too, so there only caches that start at one address (one
        # array passed as both) are refused: they share at least their first slot.
        if (_checks.overlaps(k_cache, v_cache, xp) if xp is numpy
                else k_cache.data.ptr == v_cache.data.ptr):
            raise ValueError("k_cache and v_cache must not share memory to append k and v: "
                             "the new values would be written over the new keys")
        if s_new > capacity:
            raise ValueError(f"k and v append {s_new} keys, more than a batch row's cache holds "
                             f"({capacity})")

    lengths, seqlens = _check_seqlens(cache_seqlens, b, xp, q)
    causal = _checks.check_bool(causal, "causal")
    scale = _checks.check_scale(scale, d)
    window = _checks.check_window(window)
    softcap = _checks.check_softcap(softcap, scale)
    num_splits = _check_num_splits(num_splits)
    shapes = _checks.Shapes(batch=(b,), hq=hq, hkv=hkv, nq=sq, nk=capacity, d=d, dv=dv)
    with _checks.device_context(q):
        alibi = _checks.check_alibi(alibi_slopes, shapes, xp, device_of=q)

    spec = KVCacheSpec(xp=xp, dtype=dtype, b=b, sq=sq, hq=hq, hkv=hkv, d=d, dv=dv, paged=paged,
                       page_size=page_size, capacity=capacity, s_new=s_new, scale=scale,
                       causal=causal, window=window, softcap=softcap, num_splits=num_splits,
                       lengths=lengths, seqlens=seqlens, block_table=block_table,
                       cache_batch_idx=cache_batch_idx, alibi=alibi, leftpad=cache_leftpad,
                       leftpads=leftpads)
    if xp is numpy:
        check_host_values(spec, lengths, block_table, cache_batch_idx, leftpads,
                          num_rows=k_cache.shape[0])
    elif lengths is not None:
        check_host_values(spec, lengths, None, None, None, num_rows=k_cache.shape[0])
    return spec


# ----------------------------------------------------------------------------- values

def check_host_values(spec: KVCacheSpec, lengths, block_table, cache_batch_idx, leftpads, *,
                      num_rows: int) -> None:
    """The checks that read values: the lengths (``None``: unknown here), NumPy index arrays
    and ``cache_leftpad``'s values (``None``: unknown or absent), and that appended keys land in
    slots of their own.

    ``num_rows``: the caches' first axis (pages, or cache rows).
    """
    if lengths is not None:
        room = spec.capacity - spec.s_new
        bad = numpy.flatnonzero((lengths < 0) | (lengths > room))
        if bad.size:
            row = int(bad[0])
            what = (f"cache_seqlens[{row}] = {int(lengths[row])}" if lengths.size > 1
                    and not numpy.all(lengths == lengths[0]) else
                    f"cache_seqlens = {int(lengths[row])}")
            appended = (f" with {spec.s_new} key{'s' * (spec.s_new != 1)} appended" if spec.s_new else "")
            raise ValueError(
                f"{what} is outside [0, {room}]: a batch row's cache holds {spec.capacity} "
                f"keys{appended}" + (" (the writes would pass the end of the cache)"
                                     if spec.s_new and lengths[row] > room else ""))
    if leftpads is not None and lengths is not None:
        _check_leftpads(lengths, leftpads)
    if cache_batch_idx is not None:
        _check_in_range("cache_batch_idx", numpy.asarray(cache_batch_idx), num_rows,
                        "rows of the cache")
    if block_table is not None and lengths is not None:
        used = -(-(lengths + spec.s_new) // spec.page_size)  # pages each row reads
        table = numpy.asarray(block_table)
        for row in range(spec.b):
            _check_in_range(f"block_table[{row}, :{int(used[row])}]", table[row, :used[row]],
                            num_rows, "pages (k_cache.shape[0])")
    if spec.s_new and lengths is not None:
        _check_distinct_slots(spec, lengths, block_table, cache_batch_idx, leftpads)


def _check_leftpads(lengths, leftpads) -> None:
    """A row's padding ends at or before its cached keys do: ``0 ≤ cache_leftpad[b] ≤
    cache_seqlens[b]`` (the lengths before the append)."""
    bad = numpy.flatnonzero((leftpads < 0) | (leftpads > lengths))
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"cache_leftpad[{row}] = {int(leftpads[row])} must lie in [0, "
                         f"cache_seqlens[{row}] = {int(lengths[row])}]: the keys of a batch row's "
                         f"cache before cache_leftpad are padding, and its cached keys end at "
                         f"cache_seqlens")


def page_slots(table: Any, rows: Any, positions: Any, page_size: int):
    """Where keys ``positions`` of batch rows ``rows`` live in a paged cache: ``(pages,
    offsets)``, NumPy int64, key ``j`` of row ``r`` in page ``table[r, j // page_size]`` at offset
    ``j % page_size``. ``table`` is a host array; ``rows`` an int or an array like ``positions``."""
    positions = numpy.asarray(positions, dtype=numpy.int64)
    table = numpy.asarray(table)
    # One flat take: half the time of indexing the two axes apart, over many keys
    pages = numpy.take(table, rows * table.shape[1] + positions // page_size).astype(numpy.int64)
    return pages, positions % page_size


def _check_distinct_slots(spec, lengths, block_table, cache_batch_idx, leftpads) -> None:
    """Every appended key must go to a slot of its own: not one another batch row appends to
    (which value would land there would depend on the order of the writes), nor one that holds a
    key some row reads as cached (a shared prefix page, a cache row shared through
    cache_batch_idx), which the write would change under that row. Checked when every index is
    known on the host; rows that share no cache memory need no check."""
    if spec.paged:
        if block_table is None:
            return
        table = numpy.asarray(block_table).astype(numpy.int64)

        def slots_of(row, positions):
            pages, offsets = page_slots(table, row, positions, spec.page_size)
            return pages * spec.page_size + offsets
    else:
        if cache_batch_idx is None:
            # Batch row b alone uses cache row b, or the index is on the device (not read here).
            return
        rows = numpy.asarray(cache_batch_idx).astype(numpy.int64)

        def slots_of(row, positions):
            return rows[row] * spec.capacity + positions

    first = numpy.zeros(spec.b, numpy.int64) if leftpads is None else leftpads  # padding: not read
    appended = [int(n) + numpy.arange(spec.s_new) for n in lengths]
    held = [numpy.arange(int(first[row]), int(n)) for row, n in enumerate(lengths)]
    keys = appended + held  # each row's key positions, the appends first
    owner = numpy.concatenate([numpy.full(len(x), row)
                               for row, x in zip([*range(spec.b)] * 2, keys)])
    position = numpy.concatenate(keys)
    slots = numpy.concatenate([slots_of(row, x) for row, x in zip([*range(spec.b)] * 2, keys)])
    is_append = numpy.arange(len(slots)) < spec.b * spec.s_new
    order = numpy.argsort(slots, kind="stable")  # appends first among equal slots
    same = slots[order[1:]] == slots[order[:-1]]
    clash = numpy.flatnonzero(same & is_append[order[:-1]])
    if clash.size:
        first, second = order[clash[0]], order[clash[0] + 1]
        raise ValueError(_slot_clash(spec, (int(owner[first]), int(position[first])),
                                     (int(owner[second]), int(position[second])),
                                     bool(is_append[second]), int(slots[first])))


def _slot_clash(spec, appended, other, other_is_append: bool, slot: int) -> str:
    """The refusal of an append (``appended``: its batch row and key position) into the slot of
    ``other`` (another key appended, or one held as cached), naming the entries of the index
    argument that send both keys there."""
    (row, key), (other_row, other_key) = appended, other
    if spec.paged:
        names = (f"block_table[{row}, {key // spec.page_size}] and block_table[{other_row}, "
                 f"{other_key // spec.page_size}] both name page {slot // spec.page_size}")
    else:
        names = (f"cache_batch_idx[{row}] and cache_batch_idx[{other_row}] both name cache row "
                 f"{slot // spec.capacity}")
    if other_is_append:
        rows, whose = ((f"batch row {row}", "its") if row == other_row
                       else (f"batch rows {row} and {other_row}", "their"))
        return (f"{names}: {rows} would append keys into the same slot ({whose} keys {key} and "
                f"{other_key}); appended keys must go to distinct slots")
    holder = "it holds" if row == other_row else f"batch row {other_row} holds"
    return (f"{names}: batch row {row} would append its key {key} over key {other_key} that "
            f"{holder} in its cache; appended keys must go to slots no row reads as cached")


def _check_in_range(name, values, limit, what) -> None:
    bad = numpy.flatnonzero((values < 0) | (values >= limit))
    if bad.size:
        raise ValueError(f"{name} must index the {limit} {what}, got {int(values.flat[bad[0]])}")


# ----------------------------------------------------------------------------- pieces

def _unpaired(first: str, first_value, second: str) -> str:
    """The refusal of a pair of which one half is given (in words that fit arrays and the
    tensors of cuflash.torch alike)."""
    given, missing = (second, first) if first_value is None else (first, second)
    return f"give {first} and {second} together or neither: {given} is given and {missing} is None"


def _check_4d(name, x) -> None:
    shapes = {"q": "(B, Sq, Hq, D)", "k_cache": "(B_cache, S_cache, Hkv, D) or (num_pages, "
              "page_size, Hkv, D)", "v_cache": "(B_cache, S_cache, Hkv, Dv) or (num_pages, "
              "page_size, Hkv, Dv)", "k": "(B, S_new, Hkv, D)", "v": "(B, S_new, Hkv, Dv)"}
    if x.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions {shapes[name]}, got shape "
                         f"{tuple(x.shape)}")
    if 0 in x.shape:
        raise ValueError(f"{name} must not have an empty axis, got shape {tuple(x.shape)}")


def _check_caches(k_cache, v_cache, d, hq, layout) -> None:
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache must have q's head dimension D = {d} in its last axis, "
                         f"{layout.format('D')}, got {tuple(k_cache.shape)}")
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(f"v_cache must match k_cache in its first three axes "
                         f"{layout.format('Dv')}, got k_cache {tuple(k_cache.shape)} and "
                         f"v_cache {tuple(v_cache.shape)}")
    hkv = k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"the number of query heads must be a multiple of the number of "
                         f"key/value heads, got {hq} query heads and {hkv} in the caches "
                         f"(k_cache {tuple(k_cache.shape)})")


def _check_index_array(name, x, shape, xp, q) -> None:
    """An int32 array of the inputs' module and device with ``shape`` (``None``: any length)."""
    what = f"an int32 {xp.__name__}.ndarray of shape {_shape_text(shape)}"
    try:
        module = _checks.array_module(x, name)
    except TypeError:
        if isinstance(x, numpy.ndarray):
            raise
        raise TypeError(f"{name} must be {what}, got {_checks._type_name(x)}") from None
    if module is not xp:
        raise TypeError(f"{name} must be {what} like q, got {_checks._type_name(x)}")
    if _checks._device_id(x) != _checks._device_id(q):
        raise ValueError(f"{name} must be on device {_checks._device_id(q)} like q, got device "
                         f"{_checks._device_id(x)}")
    _checks.check_index_dtype(name, x)
    if x.ndim != len(shape) or any(n is not None and m != n for m, n in zip(x.shape, shape)) \
            or 0 in x.shape:
        raise ValueError(f"{name} must have shape {_shape_text(shape)}, got {tuple(x.shape)}")


def _shape_text(shape) -> str:
    names = ["max_pages" if n is None else str(n) for n in shape]
    return f"({', '.join(names)}{',' if len(names) == 1 else ''})"


def _check_seqlens(cache_seqlens, b, xp, q):
    """``(lengths, seqlens)``: host lengths (NumPy int64 ``(B,)``) when known there, and the
    caller's array (``None`` for an int)."""
    if _checks.is_integer(cache_seqlens):
        length = int(cache_seqlens)
        if abs(length) >= 2**63:
            raise ValueError(f"cache_seqlens = {length} is not a length a cache can hold")
        return numpy.full(b, length, dtype=numpy.int64), None
    if cache_seqlens is None or isinstance(cache_seqlens, (bool, numpy.bool_, numbers.Number)):
        raise TypeError(f"cache_seqlens must be an int or an int32 array of shape ({b},) (the "
                        f"number of keys in each batch row's cache before k and v are "
                        f"appended), got {cache_seqlens!r}")
    _check_index_array("cache_seqlens", cache_seqlens, (b,), xp, q)
    if xp is numpy:
        return cache_seqlens.astype(numpy.int64), cache_seqlens
    return None, cache_seqlens


def _check_num_splits(num_splits) -> int:
    if not _checks.is_integer(num_splits):
        raise TypeError(f"num_splits must be an int (0 = chosen automatically), got "
                        f"{num_splits!r}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be 0 (chosen automatically) or a positive number of "
                         f"key splits, got {num_splits}")
    return int(num_splits)
