"""``attention_with_kvcache``: attention of new queries against a KV cache (incremental decoding),
with flash-attn's ``flash_attn_with_kvcache`` semantics.

A call is validated once (``cuflash._kvcache_spec``) and takes one of three routes:

- ``numpy``: NumPy arrays. The new keys are written into the caches, then each batch row's
  visible keys are gathered (a view of a contiguous cache, a copy through the block table of a
  paged one) and attended to with ``cuflash.attention`` (the tiled algorithm of ``cuflash.cpu``),
  with ``Nk`` the row's key count, so that causal, window and ALiBi are bottom-right aligned per
  row by the same rules as everywhere else (``cuflash._mask``). The readable statement of what
  the decode kernel computes.
- ``decode``: CuPy arrays the decode kernel takes (``cuflash.kernels.decode.why_not``): one
  launch appends, one attends every batch row, reading the caches in place. Nothing is read back
  from the device, so a call can be captured in a CUDA graph.
- ``generic``: other CuPy arrays (float32, head dims the kernel does not take, caches whose last
  axis is strided), or no decode kernel at all: the ``numpy`` route's loop on the GPU, each row
  through ``cuflash.attention``'s kernels. It reads the cache lengths (and the index arrays) back
  to the host, so it synchronises and cannot be captured in a CUDA graph; slow but exact.

A call with rotary tables first rotates q and the new keys (``cuflash._rotary``, array operations
on the inputs' device) and takes its route with the rotated arrays.

``kvcache_plan`` says which route a call takes and why.
"""

from __future__ import annotations

import functools
import importlib
import itertools
from dataclasses import dataclass
from typing import Any

import numpy

from . import _calls, _checks, _warnings
from .kernels import _launch
from ._kvcache_spec import (KVCacheSpec, Rotary, check_host_values, check_rotary, page_slots,
                            rotates_queries_in_order, validate)
from ._rotary import rotate

NUMPY, DECODE, GENERIC = "numpy", "decode", "generic"


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens,
                           block_table=None, cache_batch_idx=None, causal=False, scale=None,
                           window=(-1, -1), softcap=0.0, alibi_slopes=None, num_splits=0,
                           return_lse=False, out=None, rotary_cos=None, rotary_sin=None,
                           rotary_interleaved=True, cache_leftpad=None):
    """Attention of ``q`` against a KV cache, after appending ``k`` and ``v`` to it in place.

    flash-attn's ``flash_attn_with_kvcache`` with cuflash's option names (``scale``,
    ``window``, ``return_lse``); docs/api.md, "Attention with a KV cache", maps the two.

    Parameters
    ----------
    q : array ``(B, Sq, Hq, D)``
        The new queries of each batch row (``Sq = 1`` for one decoding step).
    k_cache, v_cache : arrays ``(B_cache, S_cache, Hkv, D)`` and ``(…, Dv)``, or pages
        ``(num_pages, page_size, Hkv, D)`` and ``(…, Dv)`` with ``block_table``
        The caches. Batch row ``b`` uses cache row ``cache_batch_idx[b]`` (default ``b``, of
        ``B_cache ≥ B`` rows) of a contiguous cache, or the pages ``block_table[b]`` of a paged
        one. ``Hq`` is a multiple of ``Hkv`` (grouped-query attention). Written in place when
        ``k`` and ``v`` are given.
    k, v : arrays ``(B, S_new, Hkv, D)`` and ``(B, S_new, Hkv, Dv)``, optional
        New keys and values, written into the caches at positions ``cache_seqlens[b]`` …
        ``cache_seqlens[b] + S_new - 1`` of each batch row before attending, each into a slot
        no other row appends to or reads as cached. Inputs that share memory with the caches
        are copied first: the call reads them as they were passed.
    cache_seqlens : int or int32 array ``(B,)``
        Keys already in each row's cache, before ``k`` and ``v`` are appended. Batch row ``b``
        attends to ``L_b = cache_seqlens[b] + S_new`` keys. Not updated by the call (as in
        flash-attn): add ``S_new`` yourself for the next step.
    block_table : int32 array ``(B, max_pages)``, optional
        A paged cache: key ``p`` of batch row ``b`` is row ``p % page_size`` of page
        ``block_table[b, p // page_size]``. ``page_size`` must be a multiple of 16. A row holds
        at most ``max_pages · page_size`` keys.
    cache_batch_idx : int32 array ``(B,)``, optional
        Contiguous caches only: the cache row of each batch row (``B_cache`` may then differ from
        ``B``).
    causal, scale, window, softcap, alibi_slopes
        As in ``cuflash.attention``, aligned to the bottom right of each batch row's scores:
        query ``i`` sees key ``j`` when ``j ≤ i + L_b − Sq`` (causal), and the ALiBi distance is
        ``|i + L_b − Sq − j|``. ``alibi_slopes``: float32 ``(Hq,)`` or ``(B, Hq)``.
    num_splits : int
        Key splits of the decode kernel (0: chosen from the device's occupancy; 1: none). The
        result is the same up to rounding; the NumPy and generic routes ignore it.
    return_lse : bool
        Also return the log-sum-exp of each row, float32 ``(B, Hq, Sq)`` (natural log).
    out : array ``(B, Sq, Hq, Dv)``, optional
        Where to write the result (any strides, not overlapping the inputs).
    rotary_cos, rotary_sin : arrays ``(seqlen_ro, rotary_dim / 2)`` of q's dtype, optional
        Rotary position embedding of the first ``rotary_dim`` dimensions of ``q`` and ``k``
        (flash-attn's): the new keys are rotated to positions ``cache_seqlens[b] + i`` and
        appended rotated; the queries are rotated to positions ``cache_seqlens[b] + i`` when the
        call is causal or has a window (a side of at least the capacity counting as none), else
        all to ``cache_seqlens[b]``. Needs ``k`` and ``v``, and a row for every position of the
        cache (``seqlen_ro ≥ capacity``) and every position a query turns to. ``q`` and ``k``
        themselves are not modified. Computed by array operations before the kernels
        (``cuflash._rotary``), not inside them.
    rotary_interleaved : bool
        Which dimensions the rotation pairs: ``2i`` and ``2i + 1`` (True, flash-attn's default),
        or ``i`` and ``i + rotary_dim / 2`` (False, GPT-NeoX style).
    cache_leftpad : int32 array ``(B,)``, optional
        Contiguous caches only (as in flash-attn): batch row ``b``'s first
        ``cache_leftpad[b]`` cache positions are padding (a batch of prompts padded on the left).
        The row then attends to positions ``cache_leftpad[b]`` … ``cache_seqlens[b] + S_new −
        1``, ``L_b = cache_seqlens[b] + S_new − cache_leftpad[b]`` keys, with causal, window and
        ALiBi aligned to them as above; ``cache_seqlens`` still counts from position 0 (the
        appends go there, and the rotary embedding turns to those positions). ``0 ≤
        cache_leftpad[b] ≤ cache_seqlens[b]``.

    Returns
    -------
    out : array ``(B, Sq, Hq, Dv)`` in q's dtype, and with ``return_lse`` ``lse`` ``(B, Hq, Sq)``.
    A query row that sees no key (``L_b = 0``, or masked by causal or a window) gives 0 and
    lse ``-inf``.

    Lengths in a CuPy array are not read on the host by the decode route (see docs/api.md for
    what it does with lengths outside ``[0, capacity − S_new]``).

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> rng = np.random.default_rng(0)
    >>> k_cache = np.zeros((2, 64, 2, 16), np.float32); v_cache = np.zeros_like(k_cache)
    >>> q, k, v = rng.standard_normal((3, 2, 1, 2, 16), dtype=np.float32)
    >>> lengths = np.array([5, 9], np.int32)
    >>> cuflash.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths).shape
    (2, 1, 2, 16)
    """
    given = (q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx,
             cache_leftpad, out, alibi_slopes)
    entry = key = None
    if rotary_cos is None and rotary_sin is None:
        entry, key = _calls.entry_of(*_signature_arrays(*given), (
            causal, scale, window, softcap, num_splits, return_lse, rotary_interleaved))
        if entry is not None:
            done = entry(*given)
            if done is not None:
                _calls.count_hit()
                return done
    spec, return_lse, rotary = _validated(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
        cache_batch_idx=cache_batch_idx, causal=causal, scale=scale, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes, num_splits=num_splits, return_lse=return_lse,
        out=out, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, cache_leftpad=cache_leftpad)
    xp = spec.xp
    launches = None
    with _checks.device_context(q):
        # Under a CUDA graph capture, what the array operations before the kernels allocate
        # (copies apart from the caches, the rotation's intermediates) is kept with the result:
        # the graph writes it again at each replay (_run_decode keeps the kernels' buffers).
        with _calls.CapturedAllocations(q) as allocations:
            q, k, v, k_cache, v_cache = _call_arrays(spec, rotary, q, k, v, k_cache, v_cache)
        result = xp.empty(spec.out_shape, spec.dtype) if out is None else out
        lse = xp.empty(spec.lse_shape, numpy.float32)
        # The kernels read q in place when they can, else a copy, made once for both steps.
        ready_q = q if xp is numpy else _checks.kernel_readable(q)
        route, _, decode = _choose(spec, ready_q, k_cache, v_cache)
        if route == DECODE:
            launches = _run_decode(spec, decode, ready_q, k_cache, v_cache, k, v, result, lse)
        else:
            _run_rows(spec, q, k_cache, v_cache, k, v, result, lse)
    allocations.keep((result,), spec)
    if key is not None and entry is None:
        _calls.remember(key, _DecodeEntry.of(spec, rotary, launches, given, (ready_q, k, v),
                                             return_lse))
    return (result, lse) if return_lse else result


# ----------------------------------------------------------------------------- the route

@dataclass(frozen=True)
class KVCachePlan:
    """Which route ``attention_with_kvcache`` takes for one call (``kvcache_plan``), and why."""

    spec: KVCacheSpec
    route: str        # "numpy", "decode" or "generic"
    reason: str       # why this route (for "generic": why not the decode kernel)

    def __str__(self) -> str:
        return f"call: {self.spec.describe()}\nroute: {self.route} ({self.reason})"


def kvcache_plan(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                 cache_batch_idx=None, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                 alibi_slopes=None, num_splits=0, return_lse=False, out=None, rotary_cos=None,
                 rotary_sin=None, rotary_interleaved=True, cache_leftpad=None) -> KVCachePlan:
    """The route ``attention_with_kvcache`` would take for these arguments, and why; validated
    the same way, and nothing is written or run (q is neither rotated nor copied: the route of
    the array the call would make stands for it). A ``num_splits`` whose decode launch would
    pass 2**31 thread blocks raises the ValueError the call raises.

    >>> import numpy as np, cuflash
    >>> q = np.zeros((1, 1, 2, 8), np.float32); cache = np.zeros((1, 32, 2, 8), np.float32)
    >>> cuflash.kvcache_plan(q, cache, cache, cache_seqlens=3).route
    'numpy'
    """
    spec, _, rotary = _validated(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
        cache_batch_idx=cache_batch_idx, causal=causal, scale=scale, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes, num_splits=num_splits, return_lse=return_lse,
        out=out, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, cache_leftpad=cache_leftpad)
    with _checks.device_context(q):
        q, k_cache, v_cache = _planned_arrays(spec, rotary, q, k_cache, v_cache)
        q = q if spec.xp is numpy else _checks.kernel_readable(q)
        route, reason, decode = _choose(spec, q, k_cache, v_cache)
        if route == DECODE:
            # The call's launch refuses a split count past one launch when it is prepared, with
            # a ValueError and nothing written: the plan raises it too, as it does the
            # arguments' own errors, rather than name a route the call then refuses.
            decode.check_num_splits(q, k_cache, v_cache, spec.num_splits, block_table=spec.block_table)
    return KVCachePlan(spec, route, reason)


def _planned_arrays(spec: KVCacheSpec, rotary: Rotary | None, q, k_cache, v_cache):
    """``(q, k_cache, v_cache)`` with the layout ``_call_arrays`` gives them, without rotating or
    copying anything: where the call would replace q (rotated, or copied apart from the caches
    it appends to: a new C-contiguous array either way), an uninitialised array of its shape and
    dtype stands in for it."""
    if rotary is not None or (spec.s_new and _shares_caches(spec.xp, q, (k_cache, v_cache))):
        q = spec.xp.empty(q.shape, q.dtype)
    return (q, *_batch_rows(spec, k_cache, v_cache))


def _validated(q, k_cache, v_cache, k, v, *, return_lse, out, rotary_cos, rotary_sin,
               rotary_interleaved, **options) -> tuple[KVCacheSpec, bool, Any]:
    """``(spec, return_lse, rotary)`` of one call, every argument checked (the call itself and
    ``kvcache_plan`` alike); ``rotary``: a ``Rotary`` or ``None``."""
    spec = validate(q, k_cache, v_cache, k, v, **options)
    rotary = check_rotary(rotary_cos, rotary_sin, rotary_interleaved, spec, q)
    return_lse = _checks.check_bool(return_lse, "return_lse")
    if out is not None:
        inputs = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v}
        _checks.check_out(out, spec.out_shape, spec.dtype, spec.xp,
                          {name: x for name, x in inputs.items() if x is not None})
    return spec, return_lse, rotary


def _call_arrays(spec: KVCacheSpec, rotary: Rotary | None, q, k, v, k_cache, v_cache):
    """``(q, k, v, k_cache, v_cache)`` as the routes take them: the inputs an append would
    change copied first (they are read as they were passed, as the docs promise, not after the
    writes), q and k rotated, and a contiguous cache without ``cache_batch_idx`` cut to its first
    B rows (flash-attn's rows of a cache larger than the batch)."""
    if spec.s_new:
        q, k, v = (_apart_from_caches(spec.xp, x, (k_cache, v_cache)) for x in (q, k, v))
    if rotary is not None:
        q, k = _rotated(spec, rotary, q, k)
    return (q, k, v, *_batch_rows(spec, k_cache, v_cache))


def _batch_rows(spec: KVCacheSpec, k_cache, v_cache):
    """The caches, a contiguous one without ``cache_batch_idx`` cut to its first B rows."""
    if not spec.paged and spec.cache_batch_idx is None and k_cache.shape[0] > spec.b:
        return k_cache[:spec.b], v_cache[:spec.b]
    return k_cache, v_cache


def _apart_from_caches(xp, x, caches):
    """``x``, or a copy of it where it shares memory with one of ``caches``."""
    return x.copy() if _shares_caches(xp, x, caches) else x


def _shares_caches(xp, x, caches) -> bool:
    return any(_checks.overlaps(x, cache, xp) for cache in caches)


def _rotated(spec: KVCacheSpec, rotary: Rotary, q, k):
    """``(q, k)`` rotated by the call's rotary embedding (new arrays), at flash-attn's positions:
    new key ``i`` of batch row ``b`` at ``cache_seqlens[b] + i``; query ``i`` there too when
    ``rotates_queries_in_order``, else every query of the row at ``cache_seqlens[b]``. The
    positions stay on the device when the lengths are (nothing is read back)."""
    xp = spec.xp
    if spec.lengths is None:  # a CuPy array, not read here
        start = spec.seqlens.astype(numpy.int64)[:, None]
    elif xp is numpy:
        start = spec.lengths[:, None]
    else:  # one int for every row, known on the host
        start = int(spec.lengths[0])

    def positions(count, step):
        return xp.broadcast_to(start + step * xp.arange(count), (spec.b, count))

    ordered = rotates_queries_in_order(spec)
    turn = functools.partial(rotate, cos=rotary.cos, sin=rotary.sin,
                             interleaved=rotary.interleaved)
    # quiet: an overflow of the rounding to q's dtype is told by the check below, by name
    with _warnings.quiet_if_numpy(xp):
        rotated = (turn(q, positions=positions(spec.sq, 1 if ordered else 0)),
                   turn(k, positions=positions(spec.s_new, 1)))
    if xp is numpy:  # on the GPU a check would make every call wait for the device
        _warnings.check_rotated(rotated, (q, k, rotary.cos, rotary.sin),
                                "cuflash.attention_with_kvcache")
    return rotated


def decode_module():
    """``cuflash.kernels.decode``, or the ``ImportError`` that importing it raised."""
    try:
        return importlib.import_module("cuflash.kernels.decode")
    except ImportError as error:
        return error


def _choose(spec: KVCacheSpec, q, k_cache, v_cache):
    """``(route, reason, decode module or None)``."""
    if spec.xp is numpy:
        return NUMPY, "NumPy arrays: cuflash.attention's NumPy path, one batch row at a time", None
    decode = decode_module()
    if isinstance(decode, ImportError):
        return GENERIC, f"no decode kernel: importing cuflash.kernels.decode failed ({decode})", None
    why_not = decode.why_not(q, k_cache, v_cache, spec.block_table)
    if why_not is not None:
        return GENERIC, f"the decode kernel does not take this call: {why_not}", None
    return DECODE, f"cuflash.kernels.decode: {_decode_launches(spec)}", decode


def _decode_launches(spec: KVCacheSpec) -> str:
    """The launches the decode route makes for this call (``_run_decode``), in words: the append
    where the call appends keys, the attention, and the merge of its key splits where it has
    several (``num_splits`` 0: as many as the device's occupancy asks for, known once it is
    asked)."""
    launches = ["one append launch"] if spec.s_new else []
    launches.append("one attention launch")
    if spec.num_splits > 1:
        launches.append(f"one merging its {spec.num_splits} key splits")
    elif spec.num_splits == 0:
        launches.append("one merging its key splits where the device's occupancy asks for several")
    return ", ".join(launches[:-1]) + (" and " if len(launches) > 1 else "") + launches[-1]



# ----------------------------------------------------------------------------- numpy and generic

@dataclass(frozen=True)
class _HostIndex:
    """The lengths and index arrays of a call as NumPy arrays (read back from the GPU by the
    generic route)."""

    lengths: numpy.ndarray        # int64 (B,), before the append
    block_table: numpy.ndarray | None
    cache_batch_idx: numpy.ndarray | None
    leftpads: numpy.ndarray | None  # int64 (B,): each row's first attended key


def _host_index(spec: KVCacheSpec, num_rows: int) -> _HostIndex:
    if spec.xp is numpy:  # checked by validate()
        return _HostIndex(spec.lengths, spec.block_table, spec.cache_batch_idx, spec.leftpads)

    def host(x):
        return None if x is None else x.get()

    lengths = spec.lengths if spec.lengths is not None else host(spec.seqlens).astype(numpy.int64)
    leftpads = None if spec.leftpad is None else host(spec.leftpad).astype(numpy.int64)
    index = _HostIndex(lengths, host(spec.block_table), host(spec.cache_batch_idx), leftpads)
    check_host_values(spec, index.lengths, index.block_table, index.cache_batch_idx,
                      index.leftpads, num_rows=num_rows)
    return index


def _cache_slots(spec: KVCacheSpec, index: _HostIndex, row: int, start: int, stop: int):
    """The index into a cache of keys ``start … stop − 1`` of batch row ``row``: a row and a
    slice of a contiguous cache, or pages and offsets through the block table."""
    if not spec.paged:
        cache_row = row if index.cache_batch_idx is None else int(index.cache_batch_idx[row])
        return cache_row, slice(start, stop)
    pages, offsets = page_slots(index.block_table, row, numpy.arange(start, stop), spec.page_size)
    return spec.xp.asarray(pages), spec.xp.asarray(offsets)


def _run_rows(spec: KVCacheSpec, q, k_cache, v_cache, k, v, out, lse) -> None:
    """Append every row's new keys, then attend each row with ``cuflash.attention`` (one
    numerical warning for the call, however many rows overflow)."""
    index = _host_index(spec, k_cache.shape[0])
    if spec.xp is not numpy:
        _check_a_kernel_attends(spec, index)
    if k is not None:  # every write before any read, as one kernel launch would order them
        for row in range(spec.b):
            start = int(index.lengths[row])
            slots = _cache_slots(spec, index, row, start, start + spec.s_new)
            k_cache[slots] = k[row]
            v_cache[slots] = v[row]
    with _warnings.once_for("cuflash.attention_with_kvcache"):
        for row in range(spec.b):
            _attend_row(spec, index, row, q, k_cache, v_cache, out, lse)


def _attend_row(spec: KVCacheSpec, index: _HostIndex, row: int, q, k_cache, v_cache, out,
                lse) -> None:
    from ._api import attention

    first = 0 if index.leftpads is None else int(index.leftpads[row])  # keys before it: padding
    end = int(index.lengths[row]) + spec.s_new
    heads_first = out[row].transpose(1, 0, 2)  # (Hq, Sq, Dv): cuflash.attention's layout
    if end == first:  # nothing to attend to
        heads_first[...] = 0
        lse[row] = -numpy.inf
        return
    slots = _cache_slots(spec, index, row, first, end)
    _, lse[row] = attention(
        q[row].transpose(1, 0, 2), k_cache[slots].transpose(1, 0, 2),
        v_cache[slots].transpose(1, 0, 2), causal=spec.causal, scale=spec.scale,
        window=spec.window, softcap=spec.softcap,
        alibi_slopes=None if spec.alibi is None else spec.alibi[row], return_lse=True,
        out=heads_first)


def _check_a_kernel_attends(spec: KVCacheSpec, index: _HostIndex) -> None:
    """Raise before the appends when no GPU kernel would attend the rows (a head dim above the
    kernels' limit, a row of 2**31 keys, say): the caches must not be written by a call that
    then fails. Asked of ``cuflash.kernel_plan`` with stand-ins of the rows' dtype, head counts
    and dims and the longest row's keys (as ``_attend_row`` counts them), broadcast from one
    key each: what decides is the count, and nothing of its size is allocated."""
    from ._plan import kernel_plan

    xp = spec.xp
    keys = index.lengths + spec.s_new
    if index.leftpads is not None:
        keys = keys - index.leftpads
    longest = max(1, int(keys.max()))  # (a row without keys launches nothing)
    q = xp.empty((spec.hq, spec.sq, spec.d), spec.dtype)
    k = xp.broadcast_to(xp.empty((spec.hkv, 1, spec.d), spec.dtype), (spec.hkv, longest, spec.d))
    v = xp.broadcast_to(xp.empty((spec.hkv, 1, spec.dv), spec.dtype),
                        (spec.hkv, longest, spec.dv))
    plan = kernel_plan(q, k, v, causal=spec.causal, scale=spec.scale, window=spec.window,
                       softcap=spec.softcap,
                       alibi_slopes=None if spec.alibi is None else spec.alibi[0])
    if plan.forward.family is None:
        raise ValueError(f"no GPU kernel attends this call's rows, so nothing was written to the "
                         f"caches ({spec.describe()}):\n{plan.forward.describe()}")


# ----------------------------------------------------------------------------- decode kernel

def _lengths_on_device(xp, b: int, length: int):
    """Lengths given as an int, as the decode kernels read them: int32 ``(B,)`` on the device."""
    return xp.full(b, length, numpy.int32)


def _run_decode(spec: KVCacheSpec, decode, q, k_cache, v_cache, k, v, out, lse):
    """The decode kernel's append and attention (``q`` already readable in place); nothing read
    back from the device. Lengths in a CuPy array are checked by the kernels themselves: a row
    whose length lies outside ``[0, capacity − S_new]`` writes nothing to its cache and gets NaN
    output and lse. Returns the launches, ``(attention, append or None)``."""
    xp = spec.xp
    if spec.lengths is not None:  # an int, checked on the host: all rows alike
        before = _lengths_on_device(xp, spec.b, int(spec.lengths[0]))
    else:
        before = xp.ascontiguousarray(spec.seqlens)
    table = None if spec.block_table is None else xp.ascontiguousarray(spec.block_table)
    rows = None if spec.cache_batch_idx is None else xp.ascontiguousarray(spec.cache_batch_idx)
    leftpad = None if spec.leftpad is None else xp.ascontiguousarray(spec.leftpad)
    temporaries = [before, table, rows, leftpad, spec.alibi, q]
    # (the kernel writes out through its strides in whole elements)
    target = out if _checks.kernel_ready(out) else xp.empty(spec.out_shape, spec.dtype)
    options = dict(appended=spec.s_new, scale=spec.scale, causal=spec.causal, window=spec.window,
                   softcap=spec.softcap, alibi=spec.alibi, block_table=table,
                   num_splits=spec.num_splits)
    # The attention's launch is prepared, and its workspace allocated, before any append: a call
    # it refuses (a split count past one launch) or that finds no memory for the splits'
    # partials must not have written the caches.
    launch = decode.prepare(q, k_cache, v_cache, target, **options)
    work = launch.workspace()
    appending = None
    if k is not None:
        k, v = _checks.kernel_readable(k), _checks.kernel_readable(v)
        temporaries += [k, v]
        appending = decode.prepare_append(k, v, k_cache, v_cache, table)
        decode.append(k, v, k_cache, v_cache, before, block_table=table, cache_batch_idx=rows,
                      launch=appending)
    decode.forward(q, k_cache, v_cache, before, target, lse, cache_batch_idx=rows,
                   cache_leftpad=leftpad, workspace=work, launch=launch, **options)
    if target is not out:
        out[...] = target
    if xp is not numpy and _calls.stream_capturing():  # a replayed graph reuses these buffers
        # (held by out, which the caller keeps with the graph, and without out itself: an
        # output among what its own finalizer holds would never be freed)
        _calls.keep_alive_with((out,), (temporaries, None if target is out else target, lse))
    return launch, appending


# ----------------------------------------------------------------------------- cached calls

# Which optional arrays a call gives, in the order its signature lists them after q, the caches and
# cache_seqlens (``_signature_arrays``): each combination is its own name in the call cache.
_OPTIONAL_ARRAYS = ("k", "v", "block_table", "cache_batch_idx", "cache_leftpad", "out",
                    "alibi_slopes")
_SIGNATURE_NAMES = {
    given: " ".join(["kvcache"] + [name for name, g in zip(_OPTIONAL_ARRAYS, given) if g])
    for given in itertools.product((False, True), repeat=len(_OPTIONAL_ARRAYS))}


def _signature_arrays(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx,
                      cache_leftpad, out, alibi_slopes) -> tuple:
    """``(name, arrays)`` that key a call in the call cache (``cuflash._calls.entry_of``): q, the
    caches, ``cache_seqlens`` and the optional arrays given, the name saying which. Lengths given
    as an ``int`` are named, not listed: their value changes from step to step, and each call's
    is checked (``_DecodeEntry``). A call with any of the others not a CuPy array is not cached."""
    optional = (k, v, block_table, cache_batch_idx, cache_leftpad, out, alibi_slopes)
    name = _SIGNATURE_NAMES[tuple(x is not None for x in optional)]
    given = tuple(x for x in optional if x is not None)
    if cache_seqlens.__class__ is int:
        return name + " int lengths", (q, k_cache, v_cache, *given)
    return name, (q, k_cache, v_cache, cache_seqlens, *given)


@dataclass(frozen=True)
class _DecodeEntry:
    """What a call of the decode route leaves in the call cache: a later call with the same
    array layouts and options allocates its outputs and launches the prepared kernels, without
    the validation, the route's choice and the launches' lookup (about three quarters of the
    call's host time). What may differ between calls of one signature is checked per call: the
    current device, and where the arrays lie. A call whose new keys or queries share memory with
    a cache it appends to (the validated path copies them first), that appends to caches starting
    at one address or whose ``out`` overlaps an input (both of which it refuses), returns ``None``
    from the entry and takes the validated path."""

    out_shape: tuple
    lse_shape: tuple
    dtype: Any
    launch: Any    # decode.prepare's
    append: Any    # decode.prepare_append's, or None without new keys
    ranges: tuple  # byte ranges of q, k_cache, v_cache, k, v, out (None where not given)
    return_lse: bool
    most_keys: int | None  # lengths given as an int: the largest they may be; else None
    slopes_shapes: Any     # with ALiBi slopes: the problem's shapes, for their copy; else None

    @classmethod
    def of(cls, spec: KVCacheSpec, rotary, launches, given, ready, return_lse: bool):
        """The entry for a call the validated path just ran (``launches``: ``_run_decode``'s,
        None on another route; ``given``: the call's arrays as ``attention_with_kvcache`` takes
        them; ``ready``: q, k and v as the kernels read them), or None where its later calls
        must take that path too: a rotary embedding (array operations before the kernels), or
        any array the path copied rather than read or wrote in place (ALiBi slopes aside, which
        each call copies as that path does)."""
        q, k_cache, v_cache, k, v, seqlens, table, rows, leftpad, out, _ = given
        if launches is None or rotary is not None:
            return None
        if any(ready_x is not x or (x is not None and not _checks.kernel_ready(x))
               for ready_x, x in zip(ready, (q, k, v))):
            return None
        arrays = (table, rows, leftpad) if spec.lengths is not None else (seqlens, table, rows, leftpad)
        if any(x is not None and not x.flags.c_contiguous for x in arrays):
            return None
        if out is not None and not _checks.kernel_ready(out):
            return None
        ranges = tuple(None if x is None else _checks.byte_range(x)
                       for x in (q, k_cache, v_cache, k, v, out))
        # (an int's lengths are known on the host: the signature has no array for them)
        most_keys = None if spec.lengths is None else spec.capacity - spec.s_new
        slopes_shapes = None if spec.alibi is None else _checks.Shapes(
            batch=(spec.b,), hq=spec.hq, hkv=spec.hkv, nq=spec.sq, nk=spec.capacity, d=spec.d,
            dv=spec.dv)
        return cls(spec.out_shape, spec.lse_shape, spec.dtype, *launches, ranges, return_lse,
                   most_keys, slopes_shapes)

    def __call__(self, q, k_cache, v_cache, k, v, seqlens, table, rows, leftpad, out, slopes):
        """The call's result as the validated path returns it, or None where that path must
        run it (see the class)."""
        device = _launch.cupy_module().cuda.runtime.getDevice()
        if q.data.device_id != device:
            return None
        arrays = (q, k_cache, v_cache, k, v, out)
        pointers = [None if x is None else x.data.ptr for x in arrays]
        ranges = self.ranges
        if k is not None and (pointers[1] == pointers[2] or any(
                _checks.ranges_overlap(pointers[i], ranges[i], pointers[c], ranges[c])
                for i in (0, 3, 4) for c in (1, 2))):
            return None
        if out is not None and any(
                _checks.ranges_overlap(pointers[5], ranges[5], pointers[i], ranges[i])
                for i in range(5) if pointers[i] is not None):
            return None
        if self.most_keys is not None:  # lengths as an int, checked as validation checks it
            if not 0 <= seqlens <= self.most_keys:
                return None  # (which raises there, naming the length and the room)
            seqlens = _lengths_on_device(_launch.cupy_module(), self.out_shape[0], seqlens)
        alibi = None  # the kernels read (B, Hq) float32 slopes: a copy per call, as validation makes
        if self.slopes_shapes is not None:
            alibi = _checks.alibi_copy(slopes, self.slopes_shapes, _launch.cupy_module())
        result = _launch.new_array(self.out_shape, self.dtype) if out is None else out
        lse = _launch.new_array(self.lse_shape, numpy.float32)
        work = self.launch.workspace()
        stream = _launch.launch_stream(device)  # (one lookup for the call's launches)
        if self.append is not None:
            self.append((pointers[3], pointers[4], pointers[1], pointers[2], seqlens.data.ptr,
                         _launch.pointer(table), _launch.pointer(rows)), stream.ptr)
        self.launch(q, k_cache, v_cache, seqlens, result, lse, alibi, table, rows, leftpad, work,
                    stream)
        if stream.is_capturing():  # as _run_decode keeps them
            _calls.keep_alive_with((result,), ((seqlens, table, rows, leftpad, alibi, q, k, v), lse))
        return (result, lse) if self.return_lse else result
