"""Cached calls of the operators' bodies on CUDA tensors: the core's prepared launches, fed the
tensors' data pointers and torch's current stream.

The core caches a call by the layout of its CuPy arrays (``cuflash._calls``). Reaching it from
torch costs a CuPy view per tensor, a scope that hands CuPy torch's stream and allocator, and an
allocation through that hook per buffer the core makes: on an H200 host more than the core's own
cached call (``benchmarks/torch_host_cost.py``). So the first call of a signature takes that road
and keeps the core's entry (its spec and prepared launch) under the tensors' own layout and the
options; each later call allocates its outputs and the backward's workspace with torch and
launches the entry's kernels with the tensors' data pointers on torch's current stream.

A key holds what the core's key holds for these calls: the shape, strides, dtype, device and
16-byte alignment of each tensor the call reads or writes, the options (``causal`` and ``scale``
with their types; the mask by its handle, which is never reused) and the kernel registry's state
(``kernels.dispatch_state``). The outputs, the lse and the workspace are new torch allocations,
aligned as the core's own. Calls that stay on the core's road: ALiBi slopes (the core copies
their values per call), dropout (its seed is a launch argument), and signatures the core itself
does not cache (inputs it would copy, float32 calls, say). A call off the current device makes
its device current for the launch, as the core's cached calls do.

Buffers are torch's: the workspace returns to torch's caching allocator when the call returns,
for reuse by later work on the same stream, as any temporary of a torch operator does (under
CUDA graph capture, within the graph's private pool).
"""

from __future__ import annotations

import torch

from cuflash import _calls, kernels
from cuflash.kernels import _launch

from . import _bridge

_MAX_ENTRIES = 256
_entries: dict = {}
_UNCACHED = object()  # a key seen before whose calls take the core's road
_stats = {"builds": 0, "hits": 0}


def clear() -> None:
    """Forget every entry (each signature's next call takes the core's road again)."""
    _entries.clear()


def stats() -> dict:
    """``{"builds": entries built, "hits": calls served from an entry, "entries": held}``."""
    return dict(_stats, entries=len(_entries))


def cacheable(q, alibi_slopes, dropout_p) -> bool:
    """Whether a call may be served here: CUDA tensors, no ALiBi slopes, no dropout."""
    return alibi_slopes is None and dropout_p == 0.0 and q.is_cuda


def _lookup(pass_name: str, tensors, options: tuple):
    """``(entry, None)`` of a call with an entry; ``(None, key)`` when its signature has none yet
    (a build keeps one under ``key``); ``(None, None)`` when its calls take the core's road."""
    key = (pass_name, *[(t.shape, t.stride(), t.dtype, t.get_device(), t.data_ptr() & 15)
                        for t in tensors], options, *kernels.dispatch_state())
    entry = _entries.get(key)
    if entry is None:
        return None, key
    return (None, None) if entry is _UNCACHED else (entry, None)


def _remember(key, entry) -> None:
    if len(_entries) >= _MAX_ENTRIES:
        _entries.clear()
    _entries[key] = _UNCACHED if entry is None else entry


def _run(launch, pointers, device: int) -> None:
    """``launch.launch_call_values(pointers, ...)`` on torch's current stream of ``device``, with
    that device current (a driver launch runs in the current device's context)."""
    cuda = _launch.cupy_module().cuda
    if cuda.runtime.getDevice() != device:
        with cuda.Device(device):
            return _run(launch, pointers, device)
    _launch.bind_context(device)
    launch.launch_call_values(pointers, _bridge.current_raw_stream(device))


# ----------------------------------------------------------------------------- forward

def forward(q, k, v, out, options: tuple):
    """``(lse, None)`` of a cached forward written into ``out`` (``options``: the operator's, see
    the module doc), or ``(None, key)`` as ``_lookup`` gives it (``build_forward`` then keeps an
    entry under a key that is not None)."""
    entry, key = _lookup("forward", (q, k, v, out), options)
    if entry is None:
        return None, key
    lse = q.new_empty(entry.lse_shape, dtype=torch.float32)
    pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr())
    # FWD_POINTERS: no ALiBi slopes, no packed-sequence offsets here
    _run(entry.launch, (*pointers, 0, 0, 0), q.get_device())
    _stats["hits"] += 1
    return lse, None


def build_forward(key, q, k, v, out, options: dict):
    """Run a forward on CuPy views (inside ``_bridge.cuda_scope``) with ``attention``'s keywords
    ``options``, writing ``out``, and keep its entry under ``key``: the lse array."""
    _, lse, entry = _calls.prepared_forward(q, k, v, out, options)
    _remember(key, entry)
    _stats["builds"] += 1
    return lse


# ----------------------------------------------------------------------------- backward

def backward(dout, q, k, v, out, lse, grads, options: tuple):
    """``(True, None)`` once a cached backward wrote ``grads`` (dq, dk, dv, laid out as
    ``torch.empty_like`` lays out q, k and v: a function of their layout, which the key holds);
    else ``(False, key)`` as ``forward``."""
    entry, key = _lookup("backward", (dout, q, k, v, out, lse), options)
    if entry is None:
        return False, key
    dq, dk, dv = grads
    pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dout.data_ptr(),
                lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr())
    launch = entry.launch
    workspace = q.new_empty(max(launch.scratch.nbytes, 1), dtype=torch.uint8)
    # BWD_POINTERS: the workspace's three parts, then no ALiBi slopes or packed-sequence offsets
    _run(launch, (*pointers, *launch.scratch.pointers(workspace.data_ptr()), 0, 0, 0),
         q.get_device())
    _stats["hits"] += 1
    return True, None


def build_backward(key, dout, q, k, v, out, lse, grads, options: dict) -> None:
    """Run a backward on CuPy views (inside ``_bridge.cuda_scope``) writing ``grads``, with
    ``attention_backward``'s keywords ``options``, and keep its entry under ``key``."""
    _, entry = _calls.prepared_backward(dout, q, k, v, out, lse, options, grads)
    _remember(key, entry)
    _stats["builds"] += 1
