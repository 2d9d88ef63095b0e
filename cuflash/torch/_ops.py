"""The custom operators ``cuflash::attention_forward`` / ``cuflash::attention_backward``, and
``cuflash::attention_varlen_forward`` / ``cuflash::attention_varlen_backward`` for packed
sequences.

All are ``torch.library.custom_op``s with fake (meta) implementations, so ``torch.compile``
traces through them without graph breaks; each forward carries ``register_autograd``, whose
backward calls its backward operator and saves only q, k, v, out and the log-sum-exp (and the
offsets, or the dropout seed).

In eager mode the public functions reach the same bodies through ``call_forward`` /
``call_varlen_forward`` instead: a plain ``torch.autograd.Function`` with the operators' context
and backward rules, without the dispatcher (``_runs_eagerly`` says when; the operators stay what
``torch.compile``, tensor subclasses, meta tensors, dispatch modes and functorch transforms see).
The operators' autograd costs about 50 µs of Python per forward for these 14-15 arguments (torch
rebuilds the schema's argument list once per argument to fill in defaults), more than the rest of
a small call.

On CUDA tensors the bodies serve a signature's later calls from ``_cached``: the core's prepared
launch, fed the tensors' pointers and torch's stream, without crossing to CuPy.

A mask (a block-sparse ``BlockMask`` or an element-exact ``ExactMask``) is not a tensor: the
operators take an int handle into a registry of masks (``block_mask_handle``); -1 means no
mask.
"""

import ctypes
import inspect
import itertools
import threading
from typing import Optional

import numpy
import torch
from torch.autograd import forward_ad

import cuflash
from cuflash import _api, _checks

from . import _bridge, _cached

NO_MASK = -1


# ----------------------------------------------------------------------------- block masks

_mask_lock = threading.Lock()
_mask_ids: dict = {}   # mask -> handle; BlockMask compares by value, so equal masks share one
_masks: dict = {}      # handle -> mask
_handles = itertools.count()  # a handle is never given out twice, even once its mask is gone
# The masks that calls registered and none has run with yet: handle -> the calls under way on
# it (one that registered it, and each that took the same mask before it ran). A refused call
# leaves the registry as it found it: the last of them refused takes the mask out again; the
# first one that runs keeps it for good (``claim_mask``, ``release_mask``).
_pending: dict = {}
# Of those, the ones that torch.compile is tracing a call on: one claim each, however many times
# Dynamo traces that call (after a graph break it traces the frame again, and a frame compiled up
# to a call runs that call as a frame of its own, each trace taking the handle anew; a count would
# keep the claims of the traces it dropped, and the mask of a refused call with them). The
# operator's fake implementation settles it, since a refused trace never returns to the traced
# code. A trace that never reaches the operator (fullgraph=True refusing a graph break between
# the handle and the call) leaves its claim, and the mask, to the next trace of a call on it:
# nothing tells a dropped trace from one whose call a graph break hands to code that Dynamo
# compiles later (a resume function, holding the handle), which must still find the mask.
_traced: set = set()
# Mask objects that a trace took while the registry holds an equal one: id -> mask, kept alive for
# good, as the registry keeps its own. A graph guards on the identity of the object it was traced
# with; freed, its address could go to another mask, which would pass that guard and run with
# this one's handle.
_traced_twins: dict = {}


def _check_is_mask(mask) -> None:
    from cuflash.sparse import BlockMask, ExactMask

    if not isinstance(mask, (BlockMask, ExactMask)):
        raise TypeError(f"block_mask_handle takes a cuflash.sparse.BlockMask or ExactMask, a "
                        f"handle (int) or None, got {type(mask).__name__}")


def _register(mask) -> tuple:
    """``(handle, new)``, registering ``mask`` where no equal one is held; with ``_mask_lock``."""
    handle = _mask_ids.get(mask)
    if handle is not None:
        return handle, False
    handle = next(_handles)
    _masks[handle] = mask
    _mask_ids[mask] = handle
    return handle, True


def block_mask_handle(block_mask) -> int:
    """The int handle of ``block_mask``, a ``cuflash.sparse.BlockMask`` or ``ExactMask``
    (registering it on first use); -1 for ``None``; a handle is returned as it is.

    The registry keeps every mask registered here alive for the life of the process; equal
    ``cuflash.sparse.BlockMask`` objects share one handle.
    """
    if block_mask is None:
        return NO_MASK
    if isinstance(block_mask, int) and not isinstance(block_mask, bool):
        lookup_block_mask(block_mask, "block_mask")  # validates
        return block_mask
    _check_is_mask(block_mask)
    with _mask_lock:
        handle, _ = _register(block_mask)
        _settle(handle)  # asked for by name: kept, whatever the calls under way on it do
    return handle


def claim_mask(mask, traced: bool = False) -> tuple:
    """``(handle, claimed)`` of a call with ``mask`` (a mask or a handle, as ``attention`` takes
    it): a mask not yet registered is registered for the call, which must then say how it ended
    (``release_mask``) when ``claimed`` is true, as must a call that takes a mask some call
    registered and none has run with yet. A handle, or a mask that a call has run with, is
    claimed by nobody: the registry keeps it for good. ``traced``: a call torch.compile traces,
    whose end the operator's fake implementation tells (``release_traced_mask``); the traces of
    a mask make one claim between them (``_traced``)."""
    if isinstance(mask, int):
        return mask, False  # (a handle the caller checked: _one_mask)
    with _mask_lock:
        handle, new = _register(mask)
        if not new and handle not in _pending:
            return handle, False
        if traced and handle in _traced:
            return handle, True  # the same call traced again: its claim stands
        _pending[handle] = _pending.get(handle, 0) + 1
        if traced:
            _traced.add(handle)
        return handle, True


def release_mask(handle: int, ran: bool) -> None:
    """A call that claimed ``handle`` (``claim_mask``) has ended: it ran (the registry keeps the
    mask for good) or was refused (the mask is taken out again once no call is left on it)."""
    with _mask_lock:
        _release(handle, ran)


def _release(handle: int, ran: bool) -> None:
    """``release_mask``, with ``_mask_lock``."""
    calls = _pending.get(handle)
    if calls is None:  # kept already: a call ran with it, or block_mask_handle gave it out
        return
    if ran or calls == 1:
        _settle(handle)
        if not ran:
            del _mask_ids[_masks.pop(handle)]
    else:
        _pending[handle] = calls - 1


def _settle(handle: int) -> None:
    """No call is left to decide whether ``handle`` stays; with ``_mask_lock``."""
    _pending.pop(handle, None)
    _traced.discard(handle)


def trace_mask_handle(mask_id: int) -> int:
    """The handle that a graph torch.compile traces holds for the mask whose ``id`` is
    ``mask_id`` (``claim_mask``): the operator's fake implementation says how the call ended
    (``release_traced_mask``). Run while Dynamo traces the call, which holds the mask: the object
    at that address is alive, and is the mask."""
    mask = ctypes.cast(mask_id, ctypes.py_object).value
    handle = claim_mask(mask, traced=True)[0]
    if _masks.get(handle) is not mask:
        _traced_twins[mask_id] = mask
    return handle


def release_traced_mask(handle: int, ran: bool) -> None:
    """The fake implementation of a call with ``handle`` accepted it (``ran``: the graph holds
    the handle) or refused it: the ``release_mask`` of a traced call that claimed it, if any
    (meta tensors and fake tensors in eager code reach the fake implementation too, their calls
    settling for themselves).

    Accepted, the mask is kept for good, even where the graph's first run of the call is then
    refused (by the kernel choice on a GPU, which no fake implementation foresees): the graph
    holds the handle and may run the call again, at sizes that dynamic shapes let through
    without a new trace, and must find its mask then."""
    if handle not in _traced:  # (one set lookup: no lock needed where nothing is pending)
        return
    with _mask_lock:
        if handle not in _traced:
            return
        _traced.remove(handle)
        _release(handle, ran)


def is_registered(mask) -> bool:
    """Whether ``mask`` (a mask or a handle) is in the registry already: a handle always is (or
    is refused as one), a mask once ``block_mask_handle`` or a call has taken it or an equal one
    (and, for a call, until that call is refused)."""
    return isinstance(mask, int) or mask in _mask_ids  # (one dict lookup: no lock needed)


def lookup_block_mask(handle: int, name: str = "block_mask"):
    """The mask registered under ``handle`` (None for -1); a ValueError naming the argument
    ``name`` for a handle that was never given out."""
    if handle == NO_MASK:
        return None
    mask = _masks.get(handle)
    if mask is None:
        raise ValueError(f"{name} = {handle} is not a mask handle from "
                         f"cuflash.torch.block_mask_handle")
    return mask


def mask_options(handle: int) -> dict:
    """The core's keyword for the mask behind ``handle`` (``mask_keyword``)."""
    return mask_keyword(lookup_block_mask(handle))


def mask_keyword(mask) -> dict:
    """The core's keyword for ``mask``: ``block_mask=`` for a block-sparse pattern, ``mask=`` for
    an exact one, nothing without a mask."""
    if mask is None:
        return {}
    from cuflash.sparse import ExactMask  # after the common case: an import costs a microsecond

    return {"mask" if isinstance(mask, ExactMask) else "block_mask": mask}


# ----------------------------------------------------------------------------- core options

def _parameters(function) -> frozenset:
    return frozenset(inspect.signature(function).parameters)


# Read once: the functions below are traced by torch.compile, which need not follow inspect.
_CORE_OPTIONS = _parameters(cuflash.attention) & _parameters(cuflash.attention_backward)


def core_supports(*names: str) -> bool:
    """Whether ``cuflash.attention`` and ``cuflash.attention_backward`` take these keywords."""
    return set(names) <= _CORE_OPTIONS


def check_options(window, softcap, alibi_slopes, dropout_p=0.0) -> None:
    """NotImplementedError naming each non-default option the installed core lacks."""
    requested = ["dropout_p"] if dropout_p != 0.0 else []
    if tuple(window) != (-1, -1):
        requested.append("window")
    if softcap != 0.0:
        requested.append("softcap")
    if alibi_slopes is not None:
        requested.append("alibi_slopes")
    for name in requested:
        if not core_supports(name):
            raise NotImplementedError(
                f"{name} is not supported by the installed cuflash core "
                f"(cuflash.attention has no {name!r} argument); leave it at its default")


def _core_options(window_left, window_right, softcap, alibi_slopes, convert):
    """Keyword arguments for the core: only the options that differ from their defaults."""
    options = {}
    if (window_left, window_right) != (-1, -1):
        options["window"] = (int(window_left), int(window_right))
    if softcap != 0.0:
        options["softcap"] = float(softcap)
    if alibi_slopes is not None:
        options["alibi_slopes"] = convert(alibi_slopes)
    return options


# ----------------------------------------------------------------------------- dropout
#
# The dropout seed travels as a tensor: a tensor can be drawn inside a compiled graph (an int read
# out of a tensor would break the graph). Outside a CUDA-graph capture it is a CPU int64 scalar
# holding the seed's 64 bits, which the launch reads without waiting for the GPU, and the offset
# is a plain int. While torch's current stream captures a graph it is instead an int64
# ``(seed, offset)`` pair on the inputs' device, drawn there by torch's CUDA generator: the core
# gets a view of its memory as a seed array (docs/api.md, "Dropout"), which the kernels read when
# they run, so every replay reads the pair that torch's graph-safe generator drew for it.

def seed_tensor(seed: int) -> torch.Tensor:
    """The int64 scalar that carries ``seed``, an int in [0, 2**64) (its bits, two's
    complement): on the CPU, whatever torch's default device (a seed on the meta device would
    send the call to the operators' fake implementations, which return uninitialised memory)."""
    return torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64,
                        device="cpu")


def seed_value(seed: torch.Tensor) -> int:
    """The seed, an int in [0, 2**64), that a ``seed_tensor`` carries: what the operators pass on
    to the core. Only for the CPU scalar: a pair drawn on the device (``draw_device_seed``) is
    never read on the host, which would synchronise."""
    return int(seed) % 2**64


def draw_seed() -> torch.Tensor:
    """A fresh seed, in [0, 2**63 - 1), from torch's CPU default generator
    (``torch.default_generator``, which ``torch.manual_seed`` seeds) whatever the device of the
    attention's tensors: a seed drawn on a GPU would have to be read back for the launch, a
    synchronisation per call (``draw_device_seed`` is the exception, for graph captures). The
    device is named: under ``torch.set_default_device`` the draw would go to that device's
    generator."""
    return torch.randint(2**63 - 1, (), dtype=torch.int64, device="cpu")


def draw_device_seed(device: torch.device, offset: int = 0) -> torch.Tensor:
    """A fresh ``(seed, offset)`` pair, int64 ``(2,)`` on ``device``: the seed in
    [0, 2**63 - 1) from torch's CUDA generator of that device, the offset as given. A graph that
    captures the draw draws anew at each replay (torch's graph-safe generator state), and the
    kernels read the pair then (``seed_array``)."""
    seed = torch.randint(2**63 - 1, (2,), dtype=torch.int64, device=device)
    seed.select(0, 1).fill_(offset)  # a fill kernel, no host-to-device copy (capturable)
    return seed


def graph_capturing(device: torch.device) -> bool:
    """Whether a dropout seed for tensors on ``device`` is drawn by ``draw_device_seed``: CUDA
    tensors while torch's current stream captures a CUDA graph. Never while torch.compile traces
    (a trace sees no capture, and the traced CPU draw stays what it was)."""
    return (device.type == "cuda" and not torch.compiler.is_compiling()
            and torch.cuda.is_current_stream_capturing())


def seed_array(seed: torch.Tensor, device: torch.device, to_core):
    """The core's seed array for a ``(seed, offset)`` pair: a uint64 view of the pair's memory
    (``to_core``: a CuPy view on CUDA, NumPy on the CPU), no copy and no read, so that a captured
    launch holds the address torch's graph writes at each replay. The view holds the tensor."""
    if seed.shape != (2,) or seed.dtype != torch.int64 or seed.device != device:
        raise ValueError(f"dropout_seed as a (seed, offset) pair must be an int64 tensor of shape "
                         f"(2,) on the inputs' device ({device}), got {seed.dtype} "
                         f"{tuple(seed.shape)} on {seed.device}")
    return to_core(seed).view(numpy.uint64)


def _integer_seed(seed: torch.Tensor) -> torch.Tensor:
    """A scalar seed tensor of an integer dtype: a float or bool one would be read through
    ``int()`` as another seed than it shows (1.5 as 1)."""
    if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
        raise TypeError(f"dropout_seed must be an integer tensor (a scalar seed, or an int64 "
                        f"(seed, offset) pair), got a {seed.dtype} scalar")
    return seed


def _dropout_options(dropout_p, dropout_seed, dropout_offset, device, to_core,
                     read_seed=seed_value) -> dict:
    """The core's dropout keywords, none without dropout (so that ``dropout_p = 0`` runs exactly
    the call without it): the scalar seed as an int (``read_seed``), a pair as a seed array
    (``seed_array``)."""
    if dropout_p == 0.0:
        return {}
    if dropout_seed is None:
        seed = None
    elif dropout_seed.dim() == 0:
        seed = read_seed(_integer_seed(dropout_seed))
    else:
        seed = seed_array(dropout_seed, device, to_core)
    return dict(dropout_p=dropout_p, dropout_seed=seed, dropout_offset=dropout_offset)


def _cached_options(causal, scale, window_left, window_right, softcap, block_mask) -> tuple:
    """The options as the operators' cache keys a call (``_cached``): causal and scale with their
    types, as the core's own keys hold each option's type; the mask by its handle."""
    return (causal.__class__, causal, scale.__class__, scale, window_left, window_right, softcap,
            block_mask)


# ----------------------------------------------------------------------------- shapes

def _out_shapes(q, k, v):
    """Shapes of (out, lse) as ``cuflash.attention`` gives them, and whether out has a head axis.

    A 2-D input is one head ``(1, N, D)``; when q, k and v are all 2-D, so are the outputs.
    Shapes these cannot be read from raise the core's ValueError.
    """
    if q.dim() == k.dim() == v.dim() == 2:
        return (q.shape[0], v.shape[1]), (q.shape[0],), False
    if min(q.dim(), k.dim(), v.dim()) < 2:
        _checks.attention_shapes(q, k, v)
    batch = q.shape[:-3]
    if not batch == k.shape[:-3] == v.shape[:-3]:  # equal leading axes need no broadcasting
        try:
            batch = torch.broadcast_shapes(batch, k.shape[:-3], v.shape[:-3])
        except RuntimeError:
            _checks.attention_shapes(q, k, v)
            raise
    batch = tuple(batch)
    hq = q.shape[-3] if q.dim() >= 3 else 1
    nq, dv = q.shape[-2], v.shape[-1]
    return batch + (hq, nq, dv), batch + (hq, nq), True


def _empty_out(q, k, v, seq_major: bool):
    """The output ``(..., Hq, Nq, Dv)``; with ``seq_major`` its memory is ``(..., Nq, Hq, Dv)``."""
    shape, _, heads = _out_shapes(q, k, v)
    if seq_major and heads:
        return q.new_empty(shape[:-3] + (shape[-2], shape[-3], shape[-1])).transpose(-3, -2)
    return q.new_empty(shape)


def _empty_lse(q, k, v):
    return q.new_empty(_out_shapes(q, k, v)[1], dtype=torch.float32)


def _empty_grads(q, k, v):
    """Gradient buffers like the inputs, strides included (the core writes into them)."""
    return tuple(torch.empty_like(x) for x in (q, k, v))


# ----------------------------------------------------------------------------- fake calls
#
# The fake implementations refuse what the call they stand for refuses: the core's own checks run
# on NumPy stand-ins of the tensors (zero-stride arrays of their shapes and dtypes, no memory).
# Symbolic sizes and options of torch.compile are read as their example values: NumPy would make
# constants of them (a guard, a recompilation per size), and the real call checks every value it
# meets.

class _NoExample(Exception):
    """A symbolic value without an example value (data-dependent): nothing can be checked."""


def _example(value):
    """``value``, or torch.compile's example value of a symbolic int, float or bool."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        if not value.node.has_hint():
            raise _NoExample
        return value.node.hint
    return value


def _stand_in(x: Optional[torch.Tensor]):
    """A read-only NumPy array of ``x``'s shape and dtype holding zeros, without memory."""
    if x is None:
        return None
    shape = tuple(_example(n) for n in x.shape)
    return numpy.broadcast_to(numpy.zeros((), _bridge.numpy_dtype(x.dtype)), shape)


def _zeroed(x: torch.Tensor) -> numpy.ndarray:
    """A NumPy array of ``x``'s shape and dtype holding zeros, with memory: the stand-in of a
    (seed, offset) pair, which the core takes only C-contiguous and reads (16 bytes)."""
    return numpy.zeros(tuple(_example(n) for n in x.shape), _bridge.numpy_dtype(x.dtype))


def _fake_dropout_options(dropout_p, dropout_seed, dropout_offset, device) -> dict:
    """The dropout keywords of a checked fake call, made as the call makes them
    (``_dropout_options``): a seed's value is never read there (a scalar stands in as 0, a pair
    as zeros), but a missing seed, or a pair the call refuses, is refused as the call refuses
    it."""
    return _dropout_options(_example(dropout_p), dropout_seed, _example(dropout_offset), device,
                            _zeroed, lambda seed: 0)


def _fake_options(causal, scale, window_left, window_right, softcap, alibi_slopes, deterministic,
                  dropout_p, dropout_seed, dropout_offset, device) -> dict:
    """The core's keywords of a fake call on tensors of ``device``, its ALiBi slopes as a
    stand-in."""
    options = _core_options(*map(_example, (window_left, window_right, softcap)),
                            _stand_in(alibi_slopes), lambda stand_in: stand_in)
    options.update(causal=_example(causal), scale=_example(scale),
                   deterministic=_example(deterministic),
                   **_fake_dropout_options(dropout_p, dropout_seed, dropout_offset, device))
    return options


def _check_fake_call(q, k, v, causal, scale, window_left, window_right, softcap, alibi_slopes,
                     block_mask, deterministic, dropout_p, dropout_seed, dropout_offset):
    """The core's checks of ``attention_forward``'s call (``cuflash._api._spec``): the array
    module and spec of the stand-ins, or None where nothing could be checked."""
    try:
        arrays = [_stand_in(x) for x in (q, k, v)]
        options = _fake_options(causal, scale, window_left, window_right, softcap, alibi_slopes,
                                deterministic, dropout_p, dropout_seed, dropout_offset, q.device)
    except _NoExample:
        return None
    return _api._spec(*arrays, **options, **mask_options(block_mask))


def check_call_on_stand_ins(q, k, v, mask, alibi_slopes, options: dict) -> None:
    """The core's checks of a call (``cuflash._api._spec`` on stand-ins of q, k, v and the
    slopes), for a call that must be refused before the operator's: one with a mask not yet
    registered, which a refused call must not register, and one whose slopes the torch side
    refuses (then not a tensor but an object the core refuses: it is passed as it is), in the
    core's order. ``options`` are the core's keywords but the mask and the slopes. Shapes only
    torch.compile knows symbolically are left to the operator."""
    try:
        q, k, v = map(_stand_in, (q, k, v))
        if isinstance(alibi_slopes, torch.Tensor):
            alibi_slopes = _stand_in(alibi_slopes)
    except _NoExample:
        return
    _api._spec(q, k, v, alibi_slopes=alibi_slopes, **options, **mask_keyword(mask))


def _check_fake_varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            causal, scale, window_left, window_right, softcap, alibi_slopes,
                            deterministic, dropout_p, dropout_seed, dropout_offset):
    """The core's checks of ``attention_varlen_forward``'s call but those of the offsets'
    values, which a fake call does not hold (``cuflash._api._varlen_checks``): the array module
    and spec of the stand-ins, or None where nothing could be checked."""
    try:
        arrays = [_stand_in(x) for x in (q, k, v, cu_seqlens_q, cu_seqlens_k)]
        options = _fake_options(causal, scale, window_left, window_right, softcap, alibi_slopes,
                                deterministic, dropout_p, dropout_seed, dropout_offset, q.device)
        lengths = _example(max_seqlen_q), _example(max_seqlen_k)
    except _NoExample:
        return None
    xp, _, spec = _api._varlen_checks(*arrays, *lengths, _checks.varlen_shapes, **options)
    return xp, spec


def _check_fake_backward_arrays(checked, dout, q, out, lse, result_shapes) -> None:
    """The core's checks of the arrays a backward call reads besides q, k and v
    (``cuflash._api._check_backward_arrays``), after the forward's checks that gave ``checked``
    (``(xp, spec)``, or None where nothing could be checked); ``result_shapes(spec, q)``: the
    shapes of the forward's out and lse."""
    if checked is None:
        return
    try:
        dout, q, out, lse = map(_stand_in, (dout, q, out, lse))
    except _NoExample:
        return
    xp, spec = checked
    _api._check_backward_arrays(spec, xp, dout, q, out, lse, result_shapes(spec, q))


# ----------------------------------------------------------------------------- forward

def _forward_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: Optional[float], window_left: int, window_right: int,
                      softcap: float, alibi_slopes: Optional[torch.Tensor], block_mask: int,
                      seq_major: bool, deterministic: bool, dropout_p: float = 0.0,
                      dropout_seed: Optional[torch.Tensor] = None, dropout_offset: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ``cuflash.attention`` on tensors in the (..., H, N, D) layout.

    ``seq_major`` lays the output's memory out as (..., N, H, Dv) (the layout flash-attn returns)
    instead of (..., H, N, Dv). ``deterministic`` does nothing here: it is kept for the backward.
    ``dropout_seed`` is required when ``dropout_p > 0``: a CPU int64 scalar (``seed_tensor``), or
    an int64 ``(seed, offset)`` pair on q's device (``draw_device_seed``) with
    ``dropout_offset = 0``, which the kernels read when they run.
    """
    out = _empty_out(q, k, v, seq_major)
    key = None
    if _cached.cacheable(q, alibi_slopes, dropout_p):
        lse, key = _cached.forward(q, k, v, out, _cached_options(causal, scale, window_left,
                                                                 window_right, softcap, block_mask))
        if lse is not None:
            return out, lse
    with _bridge.core_scope(q.device) as (to_core, to_torch):
        options = _core_options(window_left, window_right, softcap, alibi_slopes, to_core)
        options.update(_dropout_options(dropout_p, dropout_seed, dropout_offset, q.device,
                                        to_core))
        options.update(causal=causal, scale=scale, **mask_options(block_mask))
        views = [to_core(x) for x in (q, k, v, out)]
        if key is not None:
            lse = _cached.build_forward(key, *views, options)
        else:
            _, lse = cuflash.attention(*views[:3], return_lse=True, out=views[3], **options)
        return out, to_torch(lse)


attention_forward = torch.library.custom_op("cuflash::attention_forward", _forward_body,
                                            mutates_args=())


@attention_forward.register_fake
def _(q, k, v, causal, scale, window_left, window_right, softcap, alibi_slopes, block_mask,
      seq_major, deterministic, dropout_p=0.0, dropout_seed=None, dropout_offset=0):
    try:
        _check_fake_call(q, k, v, causal, scale, window_left, window_right, softcap,
                         alibi_slopes, block_mask, deterministic, dropout_p, dropout_seed,
                         dropout_offset)
    except BaseException:
        release_traced_mask(block_mask, ran=False)
        raise
    release_traced_mask(block_mask, ran=True)  # kept, whatever the graph's runs do (see there)
    return _empty_out(q, k, v, seq_major), _empty_lse(q, k, v)


# ----------------------------------------------------------------------------- backward

def _backward_body(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool,
                       scale: Optional[float], window_left: int, window_right: int,
                       softcap: float, alibi_slopes: Optional[torch.Tensor], block_mask: int,
                       deterministic: bool, dropout_p: float = 0.0,
                       dropout_seed: Optional[torch.Tensor] = None, dropout_offset: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``cuflash.attention_backward``; the dropout arguments must be the
    forward's, which regenerate its mask."""
    grads = _empty_grads(q, k, v)
    key = None
    if _cached.cacheable(q, alibi_slopes, dropout_p):
        keyed = _cached_options(causal, scale, window_left, window_right, softcap, block_mask)
        done, key = _cached.backward(dout, q, k, v, out, lse, grads,
                                     (*keyed, deterministic.__class__, deterministic))
        if done:
            return grads
    with _bridge.core_scope(q.device) as (to_core, _):
        options = _core_options(window_left, window_right, softcap, alibi_slopes, to_core)
        options.update(_dropout_options(dropout_p, dropout_seed, dropout_offset, q.device,
                                        to_core))
        options.update(causal=causal, scale=scale, deterministic=deterministic,
                       **mask_options(block_mask))
        views = [to_core(x) for x in (dout, q, k, v, out, lse)]
        given = [to_core(g) for g in grads]
        if key is not None:
            _cached.build_backward(key, *views, given, options)
        else:
            dq, dk, dv = given
            cuflash.attention_backward(*views, dq=dq, dk=dk, dv=dv, **options)
        return grads


attention_backward = torch.library.custom_op("cuflash::attention_backward", _backward_body,
                                             mutates_args=())


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, causal, scale, window_left, window_right, softcap, alibi_slopes,
      block_mask, deterministic, dropout_p=0.0, dropout_seed=None, dropout_offset=0):
    checked = _check_fake_call(q, k, v, causal, scale, window_left, window_right, softcap,
                               alibi_slopes, block_mask, deterministic, dropout_p, dropout_seed,
                               dropout_offset)
    _check_fake_backward_arrays(checked, dout, q, out, lse, _api._result_shapes)
    return _empty_grads(q, k, v)


# ----------------------------------------------------------------------------- autograd

def _no_grads_after_qkv(ctx) -> tuple:
    """No gradient for each input of an operator after q, k and v (options, offsets, ...)."""
    return (None,) * (len(ctx.needs_input_grad) - 3)


def _setup_context(ctx, inputs, output):
    (q, k, v, causal, scale, window_left, window_right, softcap, alibi_slopes, block_mask,
     _seq_major, deterministic, dropout_p, dropout_seed, dropout_offset) = inputs
    out, lse = output
    # The backward gets the forward's very seed and offset: the same dropout mask.
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, dropout_seed)
    ctx.options = (causal, scale, window_left, window_right, softcap, block_mask, deterministic,
                   dropout_p, dropout_offset)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse


def _backward_rule(run_backward):
    """The forward's autograd backward, with ``run_backward`` computing (dq, dk, dv): the backward
    operator, or its body in eager mode."""

    def backward(ctx, dout, _dlse):
        no_grads = _no_grads_after_qkv(ctx)
        if dout is None:  # only lse was used: nothing flows back
            return (None,) * 3 + no_grads
        q, k, v, out, lse, alibi_slopes, dropout_seed = ctx.saved_tensors
        (causal, scale, window_left, window_right, softcap, block_mask, deterministic, dropout_p,
         dropout_offset) = ctx.options
        dq, dk, dv = run_backward(
            dout, q, k, v, out, lse, causal, scale, window_left, window_right, softcap,
            alibi_slopes, block_mask, deterministic, dropout_p, dropout_seed, dropout_offset)
        return (dq, dk, dv) + no_grads

    return backward


attention_forward.register_autograd(_backward_rule(attention_backward),
                                    setup_context=_setup_context)


# ----------------------------------------------------------------------------- packed sequences
#
# ``cuflash::attention_varlen_forward`` / ``cuflash::attention_varlen_backward``: the core's
# ``attention_varlen`` / ``attention_varlen_backward`` on packed ``(total, H, D)`` tensors. As in
# flash-attn, the offsets of CUDA tensors are not read back to be checked (no host
# synchronisation, so the calls can be captured in a CUDA graph); CPU offsets are always checked
# by the core (docs/torch.md, "Packed sequences").

def _varlen_core_arguments(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                           scale, window_left, window_right, softcap, alibi_slopes, to_core):
    """The core's positional offsets and lengths, and its keywords, for one varlen call."""
    options = _core_options(window_left, window_right, softcap, alibi_slopes, to_core)
    options.update(causal=causal, scale=scale, check_offsets=False)
    return (to_core(cu_seqlens_q), to_core(cu_seqlens_k), max_seqlen_q, max_seqlen_k), options


def _empty_varlen_out(q, v):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))


def _empty_varlen_lse(q):
    return q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _varlen_forward_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                         scale: Optional[float], window_left: int, window_right: int,
                         softcap: float, alibi_slopes: Optional[torch.Tensor],
                         deterministic: bool, dropout_p: float = 0.0,
                         dropout_seed: Optional[torch.Tensor] = None, dropout_offset: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ``cuflash.attention_varlen``: out ``(total_q, Hq, Dv)``, lse
    ``(Hq, total_q)`` float32. ``deterministic`` does nothing here: it is kept for the
    backward. The dropout arguments as for ``attention_forward``."""
    out = _empty_varlen_out(q, v)
    with _bridge.core_scope(q.device) as (to_core, to_torch):
        offsets, options = _varlen_core_arguments(
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
            window_right, softcap, alibi_slopes, to_core)
        options.update(_dropout_options(dropout_p, dropout_seed, dropout_offset, q.device,
                                        to_core))
        _, lse = cuflash.attention_varlen(*map(to_core, (q, k, v)), *offsets, return_lse=True,
                                          out=to_core(out), **options)
        return out, to_torch(lse)


attention_varlen_forward = torch.library.custom_op(
    "cuflash::attention_varlen_forward", _varlen_forward_body, mutates_args=())


@attention_varlen_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
      window_left, window_right, softcap, alibi_slopes, deterministic, dropout_p=0.0,
      dropout_seed=None, dropout_offset=0):
    _check_fake_varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            causal, scale, window_left, window_right, softcap, alibi_slopes,
                            deterministic, dropout_p, dropout_seed, dropout_offset)
    return _empty_varlen_out(q, v), _empty_varlen_lse(q)


def _varlen_backward_body(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                          max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                          scale: Optional[float], window_left: int, window_right: int,
                          softcap: float, alibi_slopes: Optional[torch.Tensor],
                          deterministic: bool, dropout_p: float = 0.0,
                          dropout_seed: Optional[torch.Tensor] = None, dropout_offset: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``cuflash.attention_varlen_backward``, contiguous; the dropout arguments
    must be the forward's."""
    with _bridge.core_scope(q.device) as (to_core, to_torch):
        offsets, options = _varlen_core_arguments(
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
            window_right, softcap, alibi_slopes, to_core)
        options.update(_dropout_options(dropout_p, dropout_seed, dropout_offset, q.device,
                                        to_core))
        grads = cuflash.attention_varlen_backward(
            *map(to_core, (dout, q, k, v, out, lse)), *offsets, deterministic=deterministic,
            **options)
        return tuple(to_torch(g) for g in grads)


attention_varlen_backward = torch.library.custom_op(
    "cuflash::attention_varlen_backward", _varlen_backward_body, mutates_args=())


@attention_varlen_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      scale, window_left, window_right, softcap, alibi_slopes, deterministic, dropout_p=0.0,
      dropout_seed=None, dropout_offset=0):
    checked = _check_fake_varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, causal, scale, window_left, window_right,
                                      softcap, alibi_slopes, deterministic, dropout_p,
                                      dropout_seed, dropout_offset)
    _check_fake_backward_arrays(checked, dout, q, out, lse, _api._packed_result_shapes)
    return tuple(x.new_empty(x.shape) for x in (q, k, v))


def _setup_varlen_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
     window_right, softcap, alibi_slopes, deterministic, dropout_p, dropout_seed,
     dropout_offset) = inputs
    out, lse = output
    # The backward gets the forward's very seed and offset: the same dropout mask.
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, dropout_seed)
    ctx.options = (max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, softcap,
                   deterministic, dropout_p, dropout_offset)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse


def _varlen_backward_rule(run_backward):
    """The varlen forward's autograd backward, with ``run_backward`` computing (dq, dk, dv): the
    backward operator, or its body in eager mode."""

    def backward(ctx, dout, _dlse):
        no_grads = _no_grads_after_qkv(ctx)
        if dout is None:  # only lse was used: nothing flows back
            return (None,) * 3 + no_grads
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, dropout_seed = ctx.saved_tensors
        (max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, softcap,
         deterministic, dropout_p, dropout_offset) = ctx.options
        dq, dk, dv = run_backward(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            causal, scale, window_left, window_right, softcap, alibi_slopes, deterministic,
            dropout_p, dropout_seed, dropout_offset)
        return (dq, dk, dv) + no_grads

    return backward


attention_varlen_forward.register_autograd(_varlen_backward_rule(attention_varlen_backward),
                                           setup_context=_setup_varlen_context)


# ----------------------------------------------------------------------------- eager calls

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _runs_eagerly(*tensors) -> bool:
    """Whether a call may skip the operators and run their bodies (``call_forward``): not while
    torch.compile, export or ``torch.jit.trace`` traces, under no functorch transform, dispatch
    mode or function mode, and with plain tensors only (no subclass: FakeTensor, DTensor, ...),
    all of which must meet the operators, as must meta tensors (their fake implementations). The
    first tensor is q, whose device the others share. ``None`` stands for an absent optional
    tensor."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return (not tensors[0].is_meta
            and not torch._C._are_functorch_transforms_active()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and all(x is None or type(x) in _PLAIN_TENSORS for x in tensors))


class _NotDifferentiable(torch.autograd.Function):
    """Gradients that raise when differentiated: the eager functions' answer to
    ``create_graph=True``, where the operators' backward (which has no autograd) raises too.
    ``apply(count, *grads_then_sources)`` returns the first ``count`` tensors; the others are
    what the gradients depend on, taken only so that every path back to them meets this node."""

    @staticmethod
    def forward(ctx, count, *tensors):
        return tuple(g.view_as(g) for g in tensors[:count])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("cuflash attention has no second derivative: its gradients cannot be "
                           "differentiated (create_graph=True)")


def _first_order(rule):
    """The backward ``rule``, with gradients that refuse to be differentiated when the graph of
    the backward is recorded: unmarked, they would silently not depend on q, k and v. The
    refusing node takes the incoming gradients and the saved tensors as inputs, so that a
    derivative along any one path through them (``torch.autograd.grad(dq, w)`` for a ``w`` that
    q or the incoming gradient depends on) raises too, rather than leaving that path out."""

    def backward(ctx, *grads):
        with torch.no_grad():
            result = rule(ctx, *grads)
        if not torch.is_grad_enabled():
            return result
        present = [i for i, g in enumerate(result) if g is not None]
        sources = [x for x in (*grads, *ctx.saved_tensors) if x is not None and x.requires_grad]
        marked = _NotDifferentiable.apply(
            len(present), *(result[i].detach().requires_grad_() for i in present), *sources)
        result = list(result)
        for i, g in zip(present, marked):
            result[i] = g
        return tuple(result)

    return backward


def _eager_function(name: str, body, setup_context, backward):
    """A ``torch.autograd.Function`` made of an operator's body, context and backward rule
    (first order only, as the operators are). Its forward takes the context first: a Function
    with a separate ``setup_context`` binds its arguments through ``inspect.signature`` on every
    call (about 60 µs for these)."""

    def forward(ctx, *args):
        output = body(*args)
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(_first_order(backward)),
    })


def _refuse_forward_mode(q, k, v) -> None:
    """NotImplementedError for a q, k or v that carries a forward-mode tangent (a dual tensor of
    ``torch.autograd.forward_ad``, or ``torch.func.jvp``): neither road has a forward-mode
    derivative, and both would return the output without a tangent (torch's custom operators
    drop it too), which reads as a derivative of 0."""
    # No dual level open: no tangent anywhere (a private attribute; without it, every call checks).
    if getattr(forward_ad, "_current_level", 0) < 0:
        return
    if any(forward_ad.unpack_dual(x).tangent is not None for x in (q, k, v)):
        raise NotImplementedError(
            "cuflash attention has no forward-mode derivative, but its query, key or value "
            "carries a tangent (forward_ad.make_dual, torch.func.jvp); use reverse mode "
            "(backward, torch.autograd.grad)")


def _eager_call(operator, function, body, tensors, args):
    """``operator(*args)``, or in eager mode the same through ``function`` (an
    ``_eager_function``) when a gradient is wanted, else ``body`` alone; ``tensors``: the tensor
    arguments among ``args``, q, k and v first."""
    _refuse_forward_mode(*tensors[:3])
    if not _runs_eagerly(*tensors):
        return operator(*args)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        return function.apply(*args)
    return body(*args)


_EagerAttention = _eager_function("EagerAttention", _forward_body, _setup_context,
                                  _backward_rule(_backward_body))


def call_forward(q, k, v, causal, scale, window_left, window_right, softcap, alibi_slopes,
                 block_mask, seq_major, deterministic, dropout_p, dropout_seed, dropout_offset):
    """``attention_forward`` with every argument given: (out, lse), differentiable as the
    operator is, through the operator or in eager mode straight through its body."""
    args = (q, k, v, causal, scale, window_left, window_right, softcap, alibi_slopes, block_mask,
            seq_major, deterministic, dropout_p, dropout_seed, dropout_offset)
    return _eager_call(attention_forward, _EagerAttention, _forward_body,
                       (q, k, v, alibi_slopes, dropout_seed), args)


_EagerVarlenAttention = _eager_function("EagerVarlenAttention", _varlen_forward_body,
                                        _setup_varlen_context,
                                        _varlen_backward_rule(_varlen_backward_body))


def call_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                        scale, window_left, window_right, softcap, alibi_slopes, deterministic,
                        dropout_p=0.0, dropout_seed=None, dropout_offset=0):
    """``attention_varlen_forward``, through the operator or in eager mode its body
    (``call_forward``)."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
            window_left, window_right, softcap, alibi_slopes, deterministic, dropout_p,
            dropout_seed, dropout_offset)
    return _eager_call(attention_varlen_forward, _EagerVarlenAttention, _varlen_forward_body,
                       (q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, dropout_seed), args)
