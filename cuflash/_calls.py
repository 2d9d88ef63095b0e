"""The cached call path: validate and plan a CuPy call once per call signature, then only launch.

A call's signature is everything that decides its validation, its kernel plan and its packed
kernel arguments: the type, shape, strides, dtype, device and 16-byte alignment of every array
argument, every option (with its Python type, so that ``1`` is not taken for ``True``), and the
kernel registry's state (``kernels.dispatch_state``). The first call of a signature takes the
validated path of ``_api``; when its arrays can be read and written in place, the entry kept for
the signature then holds the spec, the output shapes and the prepared launch of the pass
(``kernels.prepare``). Every later call with that signature allocates the outputs it is not
given (and the backward's workspace), writes the arrays' data pointers into a copy of the packed
arguments and launches: no validation, no planning, no views, nothing read back from the device.
Packed-sequence calls (``varlen_forward``, ``varlen_backward``) are keyed the same way, their
device offsets among the arrays (contiguous ones only: others are copied on the validated path)
and the max lengths among the options; a later call checks its
offsets' values first when asked to (``check_offsets``, a read-back), as the validated path does.

A call finds its entry first by a quick key, which names the options by the identity of their
objects (held with the key) beside the arrays' layout and the registry state; only when that
misses (new option objects: a float computed per call, ``1`` for ``True``) is the full signature
built, and an entry found there is then held under the quick key too (``_lookup``).

What is redone per call, because it is not part of the signature:

- the data pointers (only their alignment is in the signature);
- dropout's seed and offset (given beside the options, not among them): checked, then written
  into the launch's arguments, so that a training loop drawing a new seed per call keeps one
  entry;
- ``out=`` must not overlap q, k or v, nor given gradients (``dq=``, ``dk=``, ``dv=``) the
  backward's other arrays or one another, nor either the call's seed array: comparisons of byte
  ranges;
- ALiBi slopes are keyed by their layout; their values are copied to the spec's ``(B, Hq)``
  array on every call, as on the validated path (in a vjp the backward uses the forward's copy).

Block and exact masks are keyed by the mask itself (immutable, hashed by content); the entry keeps
the mask, and with it its device copy, alive. The cache holds at most ``_MAX_MASKS`` masks: past
them the oldest mask's keys are forgotten, so that a loop building a new mask per step does not
keep one alive per entry. A call whose signature holds anything else (an option of
another type, a NumPy array, a list) takes the validated path every time, as do calls whose
inputs would be copied (non-contiguous last axis), whose ``out=`` or given gradients cannot be
written in place, or whose gradients are summed over broadcast axes; their signature is
remembered as such. Given gradients are keyed by their layout like every array argument, and
the key says which of the three are given.

Inside a CUDA graph capture on CuPy's current stream, the buffers a call frees when it returns
(the backward's workspace, an lse not returned, the ALiBi copy), the block mask (whose device
index the kernels read), a dropout seed array (a vjp's copy of one has no other owner) and a
varlen call's device offsets (likewise for a varlen vjp's copy of NumPy offsets, and the pinned
host buffer that copy is made from: ``device_copy``) are kept alive as long as the call's
outputs are, since the graph's replays use them; so is what a vjp's captured backward reads of
its forward (out, lse, the copies: ``hold_after_vjp``). Entries keep no seed array: each call
hands its own in. A call on the validated path (every call of an uncached signature) records
what it allocates instead (``CapturedAllocations``, around ``_api``'s runners: copies of inputs,
temporaries, full-batch gradients of broadcast inputs, workspaces) and keeps all of it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import threading
import weakref
from typing import Any

import numpy

from . import _checks, kernels
from .kernels import _launch

_MAX_ENTRIES = 1024
_entries: dict = {}
_UNCACHED = object()  # a signature seen before whose calls take the validated path
_stats = {"builds": 0, "hits": 0}
_FLOAT32 = numpy.dtype(numpy.float32)


class _NotCacheable(Exception):
    """An argument whose value the signature cannot stand for."""


def clear() -> None:
    """Forget every cached call (the next call of each signature is validated again)."""
    _entries.clear()
    _quick.clear()
    _masks.clear()


def stats() -> dict:
    """``{"builds": entries built, "hits": calls served from an entry, "entries": held}``."""
    return dict(_stats, entries=len(_entries))


# ----------------------------------------------------------------------------- signatures

_ndarray = None  # cupy.ndarray, once CuPy is imported (it never is here)


def _cupy_ndarray():
    global _ndarray
    if _ndarray is None and "cupy" in sys.modules:
        _ndarray = sys.modules["cupy"].ndarray
    return _ndarray


def array_signature(x: Any) -> tuple:
    """What of an array decides a call's validation and launch, its data pointer aside."""
    if x.__class__ is not (_ndarray or _cupy_ndarray()):
        raise _NotCacheable
    data = x.data
    return (x.shape, x.strides, x.dtype, data.ptr & 15, data.device_id)


_SCALARS = frozenset((bool, int, float, str, type(None)))


def option_signature(value: Any):
    """An option's value as a key: CuPy arrays by layout, anything else as ``fixed_signature``
    keys it."""
    if value.__class__ is (_ndarray or _cupy_ndarray()):
        return array_signature(value)
    return fixed_signature(value)


def fixed_signature(value: Any):
    """The key of an option value that cannot change (so its identity stands for it, see
    ``_lookup``): scalars with their type, tuples element-wise, dtypes by name, block and exact
    masks as themselves; anything else (a tuple holding an array, say) is not cacheable."""
    cls = value.__class__
    if cls in _SCALARS:
        return cls, value
    if cls is tuple:
        return (tuple, *map(fixed_signature, value))
    if isinstance(value, numpy.dtype) or (cls is type and issubclass(value, numpy.generic)):
        return numpy.dtype, numpy.dtype(value).str
    if cls in _mask_kinds():
        return value  # immutable, hashed by content
    raise _NotCacheable


def _mask_kinds() -> tuple:
    """The block and exact mask classes (none before cuflash.sparse is imported: no mask exists
    then; it is not imported here)."""
    sparse = sys.modules.get("cuflash.sparse")
    return () if sparse is None else (sparse.BlockMask, sparse.ExactMask)


def layout_signature(arrays) -> tuple | None:
    """The part of a call's keys that is read afresh on every call: the arrays' signatures and
    the registry state; ``None`` when an array cannot be cached (a NumPy array, say)."""
    try:
        return (*map(array_signature, arrays), *kernels.dispatch_state())
    except (_NotCacheable, AttributeError):
        return None


def signature(pass_name: str, layout: tuple, values: tuple):
    """The key of one call (``layout``: its ``layout_signature``; ``values``: its option
    values, in the entry point's order), or ``None`` when an option cannot be cached."""
    try:
        return (pass_name, layout, *map(option_signature, values))
    except (_NotCacheable, AttributeError, TypeError):  # TypeError: unhashable, ...
        return None


def _remember(key, entry) -> None:
    if key is None:
        return
    if len(_entries) >= _MAX_ENTRIES:
        clear()
    _entries[key] = entry
    _hold_masks(_masks_among(key[2:]), _entries, key)


# ----------------------------------------------------------------------------- masks held

# The block and exact masks the cache holds, oldest first, each with the keys that hold it (a
# full key names a mask as itself, and its entry holds the mask's device copy; a quick key holds
# the caller's object). A loop that builds a new mask for each step (the documents of each batch)
# would otherwise keep up to _MAX_ENTRIES of them alive, hundreds of MB each at long rows: past
# _MAX_MASKS, the oldest mask's keys are forgotten (its calls are validated again should it come
# back). Calls without a mask never reach this.
_MAX_MASKS = 32
_masks: dict = {}  # id(mask) -> (mask, [(table, key), ...])


def _masks_among(parts) -> list:
    """The block and exact masks among a key's parts or a call's option values."""
    kinds = _mask_kinds()
    return [part for part in parts if part.__class__ in kinds] if kinds else []


def _has_masks(entry) -> bool:
    spec = getattr(entry, "spec", None)
    return spec is not None and (spec.block_mask is not None or spec.exact_mask is not None)


def _hold_masks(masks, table: dict, key) -> None:
    """Record that ``table[key]`` holds ``masks``; past _MAX_MASKS, forget the oldest masks'
    keys."""
    for mask in masks:
        held = _masks.get(id(mask))
        if held is None:
            while len(_masks) >= _MAX_MASKS:
                # Another thread may forget the same oldest mask between these two lines.
                _, places = _masks.pop(next(iter(_masks), None), (None, ()))
                for place, old_key in places:
                    place.pop(old_key, None)
            held = _masks[id(mask)] = (mask, [])
        held[1].append((table, key))


def _clear_quick() -> None:
    """Forget every quick key, and that the masks were held by them."""
    _quick.clear()
    for mask_id, (mask, places) in list(_masks.items()):
        places[:] = [(table, key) for table, key in places if table is not _quick]
        if not places:
            _masks.pop(mask_id, None)  # (or another thread's eviction did)


# ----------------------------------------------------------------------------- lookup

# Entries by quick key (below), each with the option objects its key names by identity.
_MAX_QUICK = 256
_quick: dict = {}


def _lookup(pass_name: str, arrays, values: tuple, slopes):
    """``(entry, key)`` of one call: its entry (``None`` when its signature has none yet) and
    its signature (``None`` when it cannot be cached, or was not needed).

    The full signature tags every option with its type, a few microseconds per call. The quick
    key names the options by the identity of their objects instead, beside the arrays' layout
    (and the ALiBi slopes', since an array's shape can be set in place); it keeps those objects
    alive, so that no identity is reused while it is held. Every option the signature accepts
    but an array cannot change (``fixed_signature``), so the same objects have the same
    signature. A call that repeats a call site's options (literals, defaults, a model's
    constants) finds its entry by the quick key; one with new objects (a float computed per
    call, ``1`` for ``True``) takes the full signature, and an entry found there is then held
    under its quick key too."""
    layout = layout_signature(arrays)
    if layout is None:
        return None, None
    try:
        quick = (pass_name, layout, *map(id, values),
                 None if slopes is None else array_signature(slopes))
    except (_NotCacheable, AttributeError):
        quick = None
    held = _quick.get(quick)
    if held is not None:
        return held[1], None
    key = signature(pass_name, layout, values)
    entry = _entries.get(key) if key is not None else None
    if quick is not None and entry is not None and entry is not _UNCACHED:
        if len(_quick) >= _MAX_QUICK:
            _clear_quick()
        _quick[quick] = (values, entry)
        if _has_masks(entry):
            _hold_masks(_masks_among(values), _quick, quick)
    return entry, key


def entry_of(pass_name: str, arrays, values: tuple):
    """``(entry, key)`` for a module that keeps its own kind of entry here (``cuflash._kvcache``):
    the entry held for this call's signature (``None`` when there is none yet, and when its calls
    take the validated path), and the key to ``remember`` a new one under (``None`` when there is
    nothing to remember: the call cannot be cached, or its signature is known). ``arrays``: the
    call's CuPy arrays, in an order that ``pass_name`` fixes; ``values``: its other arguments."""
    entry, key = _lookup(pass_name, arrays, values, None)
    if entry is _UNCACHED:
        return None, None
    return entry, key


def remember(key, entry) -> None:
    """Keep ``entry`` under ``key`` (``entry_of``'s), or with ``None`` remember that the
    signature's calls take the validated path."""
    if entry is not None:
        _stats["builds"] += 1
    _remember(key, _UNCACHED if entry is None else entry)


def count_hit() -> None:
    """Count a call served from an entry of ``entry_of`` (``stats``)."""
    _stats["hits"] += 1


# ----------------------------------------------------------------------------- graph capture

def stream_capturing() -> bool:
    """Whether CuPy's current stream is capturing a CUDA graph."""
    import cupy

    return cupy.cuda.get_current_stream().is_capturing()


def _release(_buffers) -> None:
    pass


def _device_buffers(spec) -> tuple:
    """What a cached call's kernels read besides its arrays: the ALiBi copy, the masks' device
    index, the dropout seed array (a vjp's copy of it has no other owner), a varlen call's
    device offsets (a varlen vjp's copy of NumPy offsets has no other owner either)."""
    buffers = spec.alibi, spec.block_mask, spec.exact_mask, spec.dropout_state
    return buffers if spec.varlen is None else (*buffers, spec.varlen.cu_q, spec.varlen.cu_k)


def keep_alive_with(outputs, buffers) -> None:
    """Keep ``buffers`` alive until every one of ``outputs`` is gone (a captured graph writes
    them on each replay). ``buffers`` must not hold any of ``outputs``: an output held by a
    finalizer would never be gone, nor what the finalizers hold."""
    for output in outputs:
        weakref.finalize(output, _release, buffers)


def device_copy(host, xp):
    """A C-contiguous copy of NumPy array ``host`` on the current device (``xp``: CuPy), made on
    the current stream. CuPy's copy (``cupy.asarray``) goes through a pinned staging buffer that
    it lets go once the stream has passed the copy; under capture the graph's copy reads it at
    every replay, so there the staging buffer is the call's own, alive as long as the copy
    (which the call keeps with its results)."""
    if not stream_capturing():
        return xp.ascontiguousarray(xp.asarray(host))
    copy, staged = _launch.copy_to_device(host, xp.cuda.get_current_stream())
    keep_alive_with((copy,), (staged,))
    return copy


class CapturedAllocations:
    """Every buffer a call allocates while CuPy's current stream captures a CUDA graph, to keep
    alive with the call's results (``keep``): the graph's replays read and write them after the
    call has let them go, and CuPy would hand their memory to the next allocation. The validated
    paths allocate more than the cached ones (copies of inputs, temporaries for strides the
    kernels cannot write, full-batch gradients of broadcast inputs, workspaces), so rather than
    list them, this records what the current allocator hands out. Outside a capture, and for
    NumPy arrays, it does nothing."""

    __slots__ = ("buffers", "_scope")

    def __init__(self, x):
        # (a CuPy array's class lives in the cupy package, as _checks.array_module tells them)
        capturing = type(x).__module__.partition(".")[0] == "cupy" and stream_capturing()
        self.buffers = [] if capturing else None
        self._scope = None

    def __enter__(self):
        if self.buffers is not None:
            import cupy

            allocate, buffers = cupy.cuda.get_allocator(), self.buffers

            def recorded(size):
                memory = allocate(size)
                buffers.append(memory)
                return memory

            self._scope = cupy.cuda.using_allocator(recorded)
            self._scope.__enter__()
        return self

    def __exit__(self, *exc):
        if self._scope is not None:
            self._scope.__exit__(*exc)
        return False

    def keep(self, outputs, spec) -> None:
        """Keep what was recorded, and the spec (its ALiBi copy, its masks' device copies, a
        varlen call's offsets, all made before or outside the call's allocations), alive while
        any of ``outputs`` is."""
        if self.buffers is not None:
            keep_alive_with(outputs, (self.buffers, spec))


# ----------------------------------------------------------------------------- other streams

def current_stream(x):
    """CuPy's current stream on the device of ``x`` (where a call of its arrays runs); ``None``
    for a NumPy array."""
    if _checks.array_module(x) is numpy:
        return None
    with _checks.device_context(x):
        return _launch.cupy_module().cuda.get_current_stream()


# What vjps' backwards run on other streams than their forwards read, each with an event recorded
# on the backward's stream after its kernels and that stream's device: (event, device, what it
# holds), oldest first. A thread (``_waiter``) lets each go once its stream has passed it, alive
# while anything is held: a program that makes one such call gets the memory back all the same,
# where waiting for a later call to let it go would keep it as long as the program runs.
_held_past_streams: collections.deque = collections.deque()
_held_lock = threading.Lock()
_waiter = None


def hold_after_vjp(forward_stream, x, buffers, grads) -> None:
    """After a vjp's backward on ``x``'s device, which returned ``grads``: keep ``buffers`` (what
    the forward allocated and the backward read: out, lse, the spec's copies) alive as long as
    the backward may read them, which may be past the vjp.

    Under a capture, as long as ``grads`` (``keep_alive_with``): every replay of the graph reads
    them, and the forward, run before the capture, may have left the lse to the vjp alone.
    Where the backward ran on another stream than ``forward_stream`` (its forward's,
    ``current_stream``), until that stream has run what is queued on it now: CuPy's pool hands
    memory back to the stream it was allocated on, the forward's, whose later work would write
    it once the vjp is gone, while the backward's kernels may still read it on theirs. Those are
    let go by a thread that waits for their stream to pass them (``_let_go_as_streams_pass``)."""
    if forward_stream is None:
        return
    stream = current_stream(x)
    if stream.is_capturing():
        keep_alive_with(grads, buffers)
        return
    if stream.ptr == forward_stream.ptr:
        return
    with _checks.device_context(x):
        event = stream.record(_launch.blocking_event())
    global _waiter
    with _held_lock:
        _held_past_streams.append((event, x.data.device_id, buffers))
        # (a thread of the parent process is not alive in a forked child)
        if _waiter is None or not _waiter.is_alive():
            _waiter = threading.Thread(target=_let_go_as_streams_pass, daemon=True,
                                       name="cuflash-stream-holds")
            _waiter.start()


def _let_go_as_streams_pass() -> None:
    """Wait for the oldest held event, let its buffers go, and so on until nothing is held."""
    global _waiter
    while True:
        with _held_lock:
            if not _held_past_streams:
                _waiter = None
                return
            held = _held_past_streams[0]
        _launch.wait_for(held[0], held[1])
        with _held_lock:
            _held_past_streams.popleft()
        del held  # (outside the lock: the buffers' memory goes back to CuPy's pool here)


# ----------------------------------------------------------------------------- dropout per call

# A call's dropout seed and offset travel beside its options, not among them: the key holds the
# options only, and the launch writes the seed and offset per call (``_launch.dropout_words``),
# so that a training loop, which draws a new seed for every call, keeps one entry.

def _validated_options(options: dict, dropout: tuple) -> dict:
    """``options`` with ``dropout`` = (seed, offset) among them, as the validated path takes
    them."""
    return dict(options, dropout_seed=dropout[0], dropout_offset=dropout[1])


def _without_seed_array(spec):
    """The spec an entry keeps: without the first call's seed array, which each call hands in
    anew (``_with_call_dropout``), so that the cache holds no caller's array (nor a vjp's copy)
    alive."""
    return spec if spec.dropout_state is None else dataclasses.replace(spec, dropout_state=None)


def _call_dropout(spec, dropout_p, dropout: tuple, q):
    """This call's dropout ``(seed, offset, seed array)``, checked as the validated path checks
    them (``_checks.check_dropout``; q gives a seed array's module and device), or ``None`` where
    they are ``spec``'s own."""
    seed, offset = dropout
    if not spec.dropout_p and seed is None and offset.__class__ is int and offset == 0:
        return None  # no dropout, nothing given: the common case, no check needed
    xp = _checks.array_module(q) if _checks.is_seed_array(seed) else None
    _, seed, offset, state = _checks.check_dropout(dropout_p, seed, offset, spec.shapes, xp=xp,
                                                   device_of=q)
    if (seed == spec.dropout_seed and offset == spec.dropout_offset
            and state is spec.dropout_state):
        return None
    return seed, offset, state


def _with_dropout(spec, call_dropout):
    """``spec`` with the dropout ``(seed, offset, seed array)`` of ``_call_dropout`` (``spec``
    itself for ``None``)."""
    if call_dropout is None:
        return spec
    seed, offset, state = call_dropout
    return dataclasses.replace(spec, dropout_seed=seed, dropout_offset=offset,
                               dropout_state=state)


def _with_call_dropout(spec, dropout_p, dropout: tuple, q):
    """``spec`` with this call's dropout seed and offset (or seed array), checked as the validated
    path checks them; ``spec`` itself where they are its own."""
    seed, offset = dropout
    if not spec.dropout_p and seed is None and offset.__class__ is int and offset == 0:
        return spec  # (as _call_dropout: the common case, one call less)
    return _with_dropout(spec, _call_dropout(spec, dropout_p, dropout, q))


# ----------------------------------------------------------------------------- forward

def forward(q, k, v, out, options: dict, dropout: tuple, return_lse, copy_seed=False):
    """``(result, lse, spec)`` of one forward call (``options``: ``_api._spec``'s but the dropout
    seed and offset, which are ``dropout``). ``copy_seed``: the call runs with a copy of a CuPy
    seed array, made once it is checked (``_api._seed_copied``; the spec returned holds it)."""
    slopes = options["alibi_slopes"]
    entry, key = _lookup("forward", (q, k, v) if out is None else (q, k, v, out),
                         (*options.values(), return_lse), slopes)
    if entry is not None and entry is not _UNCACHED:
        spec = _with_call_dropout(entry.spec, options["dropout_p"], dropout, q)
        if copy_seed:
            from . import _api

            spec = _api._seed_copied(spec)
        done = entry(q, k, v, out, slopes, spec)
        if done is not None:
            _stats["hits"] += 1
            return done
    from . import _api

    with kernels.reusing_launches():  # the run's launch serves the entry
        xp, spec, result, lse = _api.validated_forward(q, k, v, out,
                                                       _validated_options(options, dropout),
                                                       return_lse, copy_seed)
        if key is not None and entry is None:
            _remember(key, _ForwardEntry.build(xp, spec, q, k, v, out, result, return_lse))
    return result, lse, spec


def prepared_forward(q, k, v, out, options: dict):
    """``(result, lse, entry)`` of one forward call with ``return_lse=True``, validated and run
    (``options``: ``attention``'s keywords, any subset), with the entry that would serve later
    calls of its signature (``None`` when they would take the validated path): for callers that
    key calls themselves (``cuflash.torch``) and then launch ``entry.launch`` with their own
    pointers."""
    from . import _api

    with kernels.reusing_launches():
        xp, spec, result, lse = _api.validated_forward(q, k, v, out, options, True)
        entry = _ForwardEntry.build(xp, spec, q, k, v, out, result, True)
    return result, lse, (None if entry is _UNCACHED else entry)


@dataclasses.dataclass(frozen=True)
class _ForwardEntry:
    spec: Any             # validated; its alibi is the first call's copy
    launch: Any           # kernels.prepare("forward", ...)
    out_shape: tuple
    lse_shape: tuple
    out_range: tuple      # byte range of out= (None when the call allocates it)
    input_ranges: tuple
    registries: tuple     # keeps dispatch_state()'s identities unique
    keeps_lse: bool       # return_lse: else no lse is allocated and the kernel stores none
    holds_buffers: bool   # spec has device buffers (_device_buffers) that a captured call reads

    @classmethod
    def build(cls, xp, spec, q, k, v, out, result, return_lse):
        """The entry for this call's signature, or _UNCACHED."""
        if xp is numpy:
            return _UNCACHED
        s = spec.shapes
        with _checks.device_context(q):
            views = [_checks.view_4d(x, s.batch, xp) for x in (q, k, v)]
            views.append(_checks.writable_4d(result, s.b))
            if any(view is None for view in views):
                return _UNCACHED
            launch = kernels.prepare("forward", spec, tuple(views))
        return cls.of_launch(spec, launch, s.out_shape, s.lse_shape, (q, k, v), out, return_lse)

    @classmethod
    def of_launch(cls, spec, launch, out_shape, lse_shape, inputs, out, keeps_lse):
        """The entry of a prepared launch (``None``: _UNCACHED); ``inputs`` = (q, k, v), whose
        byte ranges a given ``out`` must keep apart from."""
        if launch is None:
            return _UNCACHED
        _stats["builds"] += 1
        spec = _without_seed_array(spec)
        return cls(spec, launch, out_shape, lse_shape,
                   None if out is None else _checks.byte_range(out),
                   tuple(_checks.byte_range(x) for x in inputs),
                   (kernels.REGISTRY["forward"], kernels.REGISTRY["backward"]), keeps_lse,
                   any(buffer is not None for buffer in _device_buffers(spec)))

    def __call__(self, q, k, v, out, slopes, spec=None):
        """``spec``: the call's, where it differs from the entry's only in what the launch reads
        per call (a varlen call's offsets)."""
        cupy = _launch.cupy_module()
        device = cupy.cuda.runtime.getDevice()
        if q.data.device_id != device:
            with q.device:
                return self(q, k, v, out, slopes, spec)
        spec = self.spec if spec is None else spec
        if out is None:
            result = _launch.new_array(self.out_shape, spec.dtype)
        else:
            _check_apart("out", out.data.ptr, self.out_range,
                         (*zip("qkv", (q.data.ptr, k.data.ptr, v.data.ptr), self.input_ranges),
                          *_seed_apart(spec)))
            result = out
        lse = _launch.new_array(self.lse_shape, _FLOAT32) if self.keeps_lse else None
        if result.data.ptr & 15 or (lse is not None and lse.data.ptr & 15):
            return None  # the prepared launch assumed alignment
        if slopes is not None:
            spec = dataclasses.replace(spec, alibi=_checks.alibi_copy(slopes, spec.shapes, cupy))
        stream = _launch.launch_stream(device)
        self.launch(q, k, v, result, lse, spec, stream.ptr)
        # A replay of a captured call writes its lse and reads its buffers: a call with neither
        # (no lse, and the entry's own spec, which holds none) does not ask whether the stream
        # captures (a driver query, 0.4-0.7 µs of host time).
        if (lse is not None or spec is not self.spec or self.holds_buffers) and stream.is_capturing():
            keep_alive_with((result,), (lse, *_device_buffers(spec)))
        return result, lse, spec


def _seed_apart(spec) -> tuple:
    """The call's CuPy seed array among the arrays an output must keep apart from, as
    ``_check_apart`` takes them (``_checks.with_seed_array``; none without one): per call, since
    each call hands its own in."""
    state = spec.dropout_state
    return () if state is None else (("dropout_seed", state.data.ptr, _checks.byte_range(state)),)


def _check_apart(name: str, ptr: int, byte_range: tuple, others) -> None:
    """The array the call writes as its argument ``name`` (data pointer ``ptr``) must not overlap
    any of ``others``, ``(name, data pointer, byte range)`` triples: the rule of
    ``_checks.check_out``, by the byte ranges of the entry's first call (which the signature
    fixes)."""
    for other, other_ptr, other_range in others:
        if _checks.ranges_overlap(ptr, byte_range, other_ptr, other_range):
            raise ValueError(f"{name} must not share memory with {other}")


# ----------------------------------------------------------------------------- backward

# The pass name in the key of a backward call, by which of dq, dk, dv it gives: their layouts
# follow the other arrays' in the key, which must also say whose they are.
_BACKWARD_NAMES = {
    given: " ".join(["backward"] + [name for name, g in zip(_checks.GRAD_NAMES, given) if g])
    for given in itertools.product((False, True), repeat=3)}


def backward(dout, q, k, v, out, lse, options: dict, dropout: tuple, alibi=None,
             grads=(None, None, None)):
    """``(dq, dk, dv)`` of one backward call (``options`` and ``dropout`` as ``forward`` takes
    them). ``alibi``: the spec's slopes copy to use instead of a new one (a vjp's forward copy);
    ``grads``: the arrays given for dq, dk, dv (``None`` where not given), written and
    returned."""
    slopes = options["alibi_slopes"]
    dq, dk, dv = grads
    given = (dq is not None, dk is not None, dv is not None)
    arrays = (dout, q, k, v, out, lse)
    if True in given:
        arrays += tuple(g for g in grads if g is not None)
    entry, key = _lookup(_BACKWARD_NAMES[given], arrays, tuple(options.values()), slopes)
    if entry is not None and entry is not _UNCACHED:
        done = entry(dout, q, k, v, out, lse, grads, slopes, alibi,
                     _with_call_dropout(entry.spec, options["dropout_p"], dropout, q))
        if done is not None:
            _stats["hits"] += 1
            return done
    from . import _api

    with kernels.reusing_launches():  # the run's launch serves the entry
        xp, spec, result = _api.validated_backward(dout, q, k, v, out, lse,
                                                   _validated_options(options, dropout),
                                                   alibi=alibi, grads=grads)
        if key is not None and entry is None:
            _remember(key, _BackwardEntry.build(xp, spec, dout, q, k, v, out, lse, result,
                                                given=grads))
    return result


def prepared_backward(dout, q, k, v, out, lse, options: dict, grads):
    """``((dq, dk, dv), entry)`` of one backward call writing the given ``grads``, as
    ``prepared_forward``."""
    from . import _api

    with kernels.reusing_launches():
        xp, spec, result = _api.validated_backward(dout, q, k, v, out, lse, options, grads=grads)
        entry = _BackwardEntry.build(xp, spec, dout, q, k, v, out, lse, result, given=grads)
    return result, (None if entry is _UNCACHED else entry)


@dataclasses.dataclass(frozen=True)
class _BackwardEntry:
    spec: Any
    launch: Any           # kernels.prepare("backward", ...)
    apart: tuple | None   # byte ranges of the arrays given gradients must not overlap
                          # (_checks.GRAD_APART_FROM); None when no gradient is given
    grad_ranges: tuple    # byte range of each given gradient, None where not given
    registries: tuple

    @classmethod
    def build(cls, xp, spec, dout, q, k, v, out, lse, grads, given=(None, None, None)):
        """The entry for this call's signature (``grads``: its results; ``given``: the arrays
        it was given for them, ``None`` where not given), or _UNCACHED."""
        if xp is numpy:
            return _UNCACHED
        s = spec.shapes
        # Gradients summed over broadcast axes (or of 2-D inputs) are new arrays: not cached.
        if any(x.ndim < 3 or x.shape[:-3] != s.batch for x in (q, k, v)):
            return _UNCACHED
        if not lse.flags.c_contiguous:
            return _UNCACHED
        # The launch is prepared for 16-byte aligned gradients (see __call__): an entry for
        # given ones that are not (their signature holds their alignment) would never serve.
        if any(g.data.ptr & 15 for g in grads):
            return _UNCACHED
        with _checks.device_context(q):
            views = [_checks.view_4d(x, s.batch, xp) for x in (q, k, v, dout, out)]
            # What the back end wrote on the validated path: the new arrays' full-batch form, or
            # the given arrays' writable views (None: written through a temporary).
            views += [g.reshape((s.b,) + g.shape[-3:]) if d is None else _checks.writable_4d(g, s.b)
                      for g, d in zip(grads, given)]
            if any(view is None for view in views):
                return _UNCACHED
            launch = kernels.prepare("backward", spec, tuple(views))
        return cls.of_launch(spec, launch, (q, k, v, dout, out, lse), given)

    @classmethod
    def of_launch(cls, spec, launch, arrays, given):
        """The entry of a prepared launch (``None``: _UNCACHED); ``arrays`` = (q, k, v, dout,
        out, lse), whose byte ranges given gradients must keep apart from."""
        if launch is None:
            return _UNCACHED
        _stats["builds"] += 1
        apart = None
        if any(d is not None for d in given):
            apart = tuple(map(_checks.byte_range, arrays))
        return cls(_without_seed_array(spec), launch, apart,
                   tuple(None if d is None else _checks.byte_range(d) for d in given),
                   (kernels.REGISTRY["forward"], kernels.REGISTRY["backward"]))

    def __call__(self, dout, q, k, v, out, lse, grads, slopes, alibi, spec=None):
        """``spec`` as for ``_ForwardEntry``."""
        cupy = _launch.cupy_module()
        device = cupy.cuda.runtime.getDevice()
        if q.data.device_id != device:
            with q.device:
                return self(dout, q, k, v, out, lse, grads, slopes, alibi, spec)
        spec = self.spec if spec is None else spec
        if self.apart is not None:
            self._check_apart(grads, (q, k, v, dout, out, lse), spec)
        dq, dk, dv = grads
        if dq is None or dk is None or dv is None:
            grad_dtype = spec.grad_dtype
            if dq is None:
                dq = _launch.new_array(q.shape, grad_dtype)
            if dk is None:
                dk = _launch.new_array(k.shape, grad_dtype)
            if dv is None:
                dv = _launch.new_array(v.shape, grad_dtype)
        if (dq.data.ptr | dk.data.ptr | dv.data.ptr) & 15:  # the launch assumed alignment
            return None
        if slopes is not None:
            if alibi is None:
                alibi = _checks.alibi_copy(slopes, spec.shapes, cupy)
            spec = dataclasses.replace(spec, alibi=alibi)
        stream = _launch.launch_stream(device)
        workspace = self.launch(dout, q, k, v, out, lse, dq, dk, dv, spec, stream.ptr)
        if stream.is_capturing():
            keep_alive_with((dq, dk, dv), (workspace, *_device_buffers(spec)))
        return dq, dk, dv

    def _check_apart(self, grads, arrays, spec) -> None:
        """Each given gradient must not overlap ``arrays`` (those of ``GRAD_APART_FROM``), the
        call's seed array nor a given gradient before it (the rule of ``_checks.check_out``, as
        ``_api._check_given_grads`` applies it)."""
        others = [(name, x.data.ptr, x_range)
                  for name, x_range, x in zip(_checks.GRAD_APART_FROM, self.apart, arrays)]
        others += _seed_apart(spec)
        for name, grad, grad_range in zip(_checks.GRAD_NAMES, grads, self.grad_ranges):
            if grad is not None:
                ptr = grad.data.ptr
                _check_apart(name, ptr, grad_range, others)
                others.append((name, ptr, grad_range))


# ----------------------------------------------------------------------------- packed sequences

def varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, out, options: dict, dropout: tuple,
                   return_lse, hosts=(None, None)):
    """``(result, lse, spec)`` of one ``attention_varlen`` call (``options``: its keywords but
    ``out``, ``return_lse`` and the dropout seed and offset, which are ``dropout``). Cached as a
    dense call is, with the offsets among the arrays keyed by their layout (CuPy offsets only:
    NumPy ones are copied to the device per call) and the max lengths among the options; a
    cached call checks the offsets' values as the validated path does (``check_offsets``), then
    launches with them. ``hosts``: the offsets on the host where the caller read them already
    (a paged call), checked instead of read back again."""
    slopes = options["alibi_slopes"]
    arrays = (q, k, v, cu_q, cu_k) if out is None else (q, k, v, cu_q, cu_k, out)
    entry, key = _lookup("varlen forward", arrays, (max_q, max_k, *options.values(), return_lse),
                         slopes)
    if entry is not None and entry is not _UNCACHED:
        # The dropout arguments are checked before the offsets' values, as _api._varlen_spec
        # checks them: a call wrong in both raises what the validated path raises.
        call_dropout = _call_dropout(entry.dense.spec, options["dropout_p"], dropout, q)
        done = entry.dense(q, k, v, out, slopes, entry.spec_of(cu_q, cu_k, call_dropout, hosts))
        if done is not None:
            _stats["hits"] += 1
            return done
    from . import _api

    with kernels.reusing_launches():  # the run's launch serves the entry
        xp, spec, result, lse = _api.validated_varlen_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, out, _validated_options(options, dropout),
            return_lse, hosts)
        if key is not None and entry is None:
            built = _varlen_forward_entry(xp, spec, q, k, v, out, result, (cu_q, cu_k))
            _remember(key, _VarlenEntry.of(built, options["check_offsets"]))
    return result, lse, spec


_VARLEN_BACKWARD_NAMES = {given: "varlen " + name for given, name in _BACKWARD_NAMES.items()}


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, options: dict,
                    dropout: tuple, grads=(None, None, None), alibi=None):
    """``(dq, dk, dv)`` of one ``attention_varlen_backward`` call, cached as ``varlen_forward``
    caches the forward (``grads`` and ``alibi`` as ``backward`` takes them)."""
    slopes = options["alibi_slopes"]
    given = (grads[0] is not None, grads[1] is not None, grads[2] is not None)
    arrays = (dout, q, k, v, out, lse, cu_q, cu_k)
    if True in given:
        arrays += tuple(g for g in grads if g is not None)
    entry, key = _lookup(_VARLEN_BACKWARD_NAMES[given], arrays,
                         (max_q, max_k, *options.values()), slopes)
    if entry is not None and entry is not _UNCACHED:
        call_dropout = _call_dropout(entry.dense.spec, options["dropout_p"], dropout, q)
        done = entry.dense(dout, q, k, v, out, lse, grads, slopes, alibi,
                           entry.spec_of(cu_q, cu_k, call_dropout))
        if done is not None:
            _stats["hits"] += 1
            return done
    from . import _api

    with kernels.reusing_launches():  # the run's launch serves the entry
        xp, spec, result = _api.validated_varlen_backward(
            dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
            _validated_options(options, dropout), grads, alibi)
        if key is not None and entry is None:
            built = _varlen_backward_entry(xp, spec, dout, q, k, v, out, lse, result, grads,
                                           (cu_q, cu_k))
            _remember(key, _VarlenEntry.of(built, options["check_offsets"]))
    return result


@dataclasses.dataclass(frozen=True)
class _VarlenEntry:
    """A varlen call's entry: the dense entry that launches it, given the call's spec, which
    differs from the entry's only in its offsets (read back and checked when
    ``check_offsets``, as the validated path does)."""
    dense: Any            # _ForwardEntry or _BackwardEntry of the packed arrays
    check_offsets: bool
    # (cu_q, cu_k, spec) of the last call: a training step hands every layer the same offset
    # arrays, whose spec is then the last one (without check_offsets nothing is read back, so
    # the spec depends on the arrays alone). One tuple, replaced whole, so threads never see a
    # spec beside another call's arrays.
    last: list = dataclasses.field(default_factory=lambda: [(None, None, None)], compare=False)

    @classmethod
    def of(cls, dense, check_offsets: bool):
        return dense if dense is _UNCACHED else cls(dense, check_offsets)

    def spec_of(self, cu_q, cu_k, call_dropout=None, hosts=(None, None)):
        """The call's spec: the entry's with these offsets (checked with ``check_offsets``, or
        from ``hosts`` where read already) and ``call_dropout`` (``_call_dropout``: ``None``
        where the entry's)."""
        last_q, last_k, spec = self.last[0]
        if cu_q is not last_q or cu_k is not last_k:
            layout = self.dense.spec.varlen
            hosts = _checks.checked_offsets(cu_q, cu_k, (layout.total_q, layout.total_k),
                                            (layout.max_q, layout.max_k), self.check_offsets,
                                            hosts)
            layout = dataclasses.replace(layout, cu_q=cu_q, cu_k=cu_k, host_q=hosts[0],
                                         host_k=hosts[1])
            spec = dataclasses.replace(self.dense.spec, varlen=layout)
            if not self.check_offsets:
                self.last[0] = (cu_q, cu_k, spec)
        return spec if call_dropout is None else _with_dropout(spec, call_dropout)


def _offsets_read_in_place(spec, offsets) -> bool:
    """Whether the kernels of this validated varlen call read the caller's ``offsets``
    (cu_q, cu_k) themselves: not where they were copied (contiguous int32 on the device, as the
    kernels read them), which a later call of the layout would have to copy again."""
    return spec.varlen.cu_q is offsets[0] and spec.varlen.cu_k is offsets[1]


def _varlen_forward_entry(xp, spec, q, k, v, out, result, offsets):
    """The dense entry launching this varlen forward, or _UNCACHED: where the validated path
    would copy an input or the offsets (``offsets``: the call's cu_q, cu_k) or write through a
    temporary, or launch nothing (no rows). The lse is always kept, as the validated path stores
    it."""
    layout = spec.varlen
    if xp is numpy or not layout.total_q or not _offsets_read_in_place(spec, offsets):
        return _UNCACHED
    if not all(_checks.kernel_ready(x) for x in (q, k, v, result)):
        return _UNCACHED
    with _checks.device_context(q):
        launch = kernels.prepare("forward", spec, (q, k, v, result))
    return _ForwardEntry.of_launch(spec, launch, result.shape, (spec.shapes.hq, layout.total_q),
                                   (q, k, v), out, True)


def _varlen_backward_entry(xp, spec, dout, q, k, v, out, lse, results, given, offsets):
    """The dense entry launching this varlen backward, or _UNCACHED (as ``_varlen_forward_entry``;
    ``results``: the call's gradients, ``given``: the arrays it was given for them)."""
    if xp is numpy or not spec.varlen.total_q or not lse.flags.c_contiguous:
        return _UNCACHED
    if not _offsets_read_in_place(spec, offsets):
        return _UNCACHED
    if not all(_checks.kernel_ready(x) for x in (dout, q, k, v, out, *results)):
        return _UNCACHED
    if any(g.data.ptr & 15 for g in results):
        return _UNCACHED
    with _checks.device_context(q):
        launch = kernels.prepare("backward", spec, (q, k, v, dout, out, *results))
    return _BackwardEntry.of_launch(spec, launch, (q, k, v, dout, out, lse), given)

