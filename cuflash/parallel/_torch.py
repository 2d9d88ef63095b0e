"""torch.distributed as the transport (``TorchComm``), torch tensors in and out, and autograd.

``TorchComm`` moves NumPy or CuPy arrays (the arrays cuflash computes on) through
``torch.distributed``: point-to-point ``batch_isend_irecv`` for the ring, on tensors that share
the arrays' memory (DLPack for CuPy, ``torch.from_numpy`` for NumPy), so nothing is copied. On
CUDA the operations are issued on a torch stream wrapping CuPy's current stream, so that torch
orders them after the computation that produced the arrays, and ``wait()`` orders CuPy's
stream after them. The NCCL process group runs them on its own streams: they overlap compute.

Timeouts are torch's: pass ``timeout=`` to ``torch.distributed.init_process_group``; with the
NCCL back end a hung operation is aborted by torch's watchdog after that time, which ends the
process with an error instead of hanging. Gloo (CPU) works too, for tests.
"""

from __future__ import annotations

import datetime

import numpy

from cuflash import _checks

from ._signature import share_refusal
from .comm import (CommBase, _send_and_like, array_module, check_comm, check_rank,
                   check_timeout)

__all__ = ["TorchComm", "call_on_arrays", "group_rank_and_size", "torch_ring_attention"]


def _bytes_tensor(x):
    """A uint8 torch tensor sharing the memory of a C-contiguous NumPy or CuPy array."""
    import torch
    flat = x.reshape(-1)
    if array_module(x) is numpy:
        return torch.from_numpy(flat.view(numpy.uint8))
    import cupy
    return torch.from_dlpack(flat.view(cupy.uint8))


class _StreamScope:
    """torch's current stream = CuPy's current stream, for CuPy arrays; nothing otherwise."""

    def __init__(self, xp):
        self.xp = xp
        self.context = None

    def __enter__(self):
        if self.xp is not numpy:
            import torch
            stream = self.xp.cuda.get_current_stream()
            device = self.xp.cuda.Device().id
            if stream.ptr == 0:  # CuPy's null stream is CUDA's legacy default stream: torch's
                torch_stream = torch.cuda.default_stream(device)
            else:
                torch_stream = torch.cuda.ExternalStream(stream.ptr, device=device)
            self.context = torch.cuda.stream(torch_stream)
            self.context.__enter__()
        return self

    def __exit__(self, *exc):
        if self.context is not None:
            self.context.__exit__(*exc)


class _TorchPending:
    def __init__(self, works, received, keep, xp, timeout):
        self.works, self.received, self.keep, self.xp = works, received, keep, xp
        self.timeout = timeout
        self._done = False

    def wait(self):
        if not self._done:
            with _StreamScope(self.xp):
                for work in self.works:
                    if self.timeout is None:
                        work.wait()
                    else:
                        work.wait(datetime.timedelta(seconds=self.timeout))
            self.keep = None
            self._done = True
        return self.received


def group_rank_and_size(group, what: str) -> tuple[int, int]:
    """This process's rank in the ``torch.distributed`` process ``group`` and its size;
    ``ValueError`` naming ``group`` when this process is not one of its ranks (torch then
    answers rank and size -1). ``what``: what is made of the group, for the message."""
    import torch.distributed as dist
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process is not a member of the process group given "
                         f"(torch.distributed gives it rank -1 there); make {what} of a group "
                         f"only in the processes of its ranks")
    return rank, dist.get_world_size(group)


class TorchComm(CommBase):
    """A communicator over a ``torch.distributed`` process group (default: the world).

    ``torch.distributed.init_process_group`` must have been called (``torchrun`` sets the
    environment it reads). With the NCCL back end the arrays are CuPy arrays on the process's
    GPU (``torch.cuda.set_device(local_rank)`` before the first call); with Gloo, NumPy arrays.

    ``timeout`` (seconds) bounds each ``wait()`` where the back end supports it; the process
    group's own ``timeout`` is the one that guards every operation.
    """

    def __init__(self, group=None, *, timeout: float | None = None):
        timeout = check_timeout(timeout)
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchComm needs torch.distributed.init_process_group() first "
                               "(torchrun sets the environment it reads)")
        self.dist = dist
        self.group = group
        self.rank, self.size = group_rank_and_size(group, "a TorchComm")
        self.timeout = timeout
        self.backend = str(dist.get_backend(group))

    def _peer(self, rank: int) -> int:
        if self.group is None:
            return rank
        return self.dist.get_global_rank(self.group, rank)

    def _ops(self, sends, recvs):
        """Issue point-to-point operations: ``sends``/``recvs`` are (tensor, rank) lists."""
        dist = self.dist
        ops = [dist.P2POp(dist.isend, t, self._peer(r), self.group) for t, r in sends]
        ops += [dist.P2POp(dist.irecv, t, self._peer(r), self.group) for t, r in recvs]
        if not ops:
            return []
        return dist.batch_isend_irecv(ops)

    def exchange(self, send, dst, src, recv_like=None):
        # torch.distributed would fail, or wait, for a peer that is no rank of the group.
        dst, src = check_rank(dst, "dst", self.size), check_rank(src, "src", self.size)
        send, like = _send_and_like(send, recv_like)
        if not send and not like:
            from .comm import Done
            return Done([])
        xp = array_module((send or like)[0])
        send = [xp.ascontiguousarray(x) for x in send]
        received = [xp.empty(x.shape, x.dtype) for x in like]
        with _StreamScope(xp):
            works = self._ops([(_bytes_tensor(x), dst) for x in send if x.size],
                              [(_bytes_tensor(x), src) for x in received if x.size])
        return _TorchPending(works, received, send, xp, self.timeout)

    def all_to_all(self, arrays):
        """``arrays[j]`` to rank ``j``, of any shape; what two ranks send each other must have
        one dtype (``ValueError`` on every rank otherwise)."""
        arrays = self._all_to_all_arrays(arrays, None)
        xp = array_module(arrays[0])
        shapes = self._received_shapes(arrays)
        received = [arrays[self.rank].copy() if src == self.rank
                    else xp.empty(shapes[src], arrays[src].dtype) for src in range(self.size)]
        with _StreamScope(xp):
            works = self._ops(
                [(_bytes_tensor(x), dst) for dst, x in enumerate(arrays)
                 if dst != self.rank and x.size],
                [(_bytes_tensor(x), src) for src, x in enumerate(received)
                 if src != self.rank and x.size])
        return _TorchPending(works, received, arrays, xp, self.timeout).wait()

    def _device(self):
        import torch
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_gather_host(self, x: numpy.ndarray) -> list[numpy.ndarray]:
        """All-gather a small NumPy array of one shape on every rank."""
        import torch
        t = torch.from_numpy(numpy.ascontiguousarray(x)).to(self._device())
        parts = [torch.empty_like(t) for _ in range(self.size)]
        work = self.dist.all_gather(parts, t, group=self.group, async_op=True)
        if self.timeout is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=self.timeout))
        return [p.cpu().numpy() for p in parts]

    def all_gather(self, x):
        xp = array_module(x)
        host = x.get() if xp is not numpy else numpy.asarray(x)
        parts = self._all_gather_host(host)
        return [xp.asarray(p) for p in parts]

    def barrier(self) -> None:
        self._all_gather_host(numpy.zeros(1, numpy.int32))


# ----------------------------------------------------------------------------- tensors

def call_on_arrays(fn, *tensors, names=None):
    """``fn(*arrays)`` for the arrays of torch tensors (no copies), the results as tensors.

    CUDA tensors become CuPy arrays on torch's current stream with torch's allocator (see
    ``cuflash.torch``); CPU tensors become NumPy arrays. Each must be a tensor, all on one
    device (``names``: the arguments' names for the errors).
    """
    from cuflash.torch import _api, _bridge
    names = names or [f"argument {i}" for i in range(len(tensors))]
    _api._check_tensors(**dict(zip(names, tensors)))
    device = tensors[0].device

    def convert_back(result, to_tensor):
        if isinstance(result, tuple):
            return tuple(convert_back(r, to_tensor) for r in result)
        if isinstance(result, list):
            return [convert_back(r, to_tensor) for r in result]
        return to_tensor(result)

    if device.type == "cuda":
        with _bridge.cuda_scope(device) as allocator:
            arrays = [_bridge.to_cupy(t) for t in tensors]
            return convert_back(fn(*arrays), allocator.to_torch)
    arrays = [_bridge.to_numpy(t) for t in tensors]
    return convert_back(fn(*arrays), lambda a: _bridge.from_numpy(numpy.ascontiguousarray(a)))


def torch_ring_attention(q, k, v, *, comm, causal: bool = False, layout: str = "zigzag",
                         window=(-1, -1), softcap: float = 0.0, scale: float | None = None,
                         deterministic: bool = False):
    """:func:`cuflash.parallel.ring_attention` on torch tensors, differentiable in q, k, v.

    The backward pass runs :func:`cuflash.parallel.ring_attention_backward`, which exchanges
    messages too: every rank must call ``backward`` (the same number of times, in the same
    order), as with any sequence-parallel layer. First derivatives only, as in
    ``cuflash.torch``: a gradient taken with ``create_graph=True`` raises when differentiated.
    """
    import torch

    from cuflash.torch._ops import _first_order

    from .ring import ring_attention, ring_attention_backward

    options = dict(comm=comm, causal=causal, layout=layout, window=window, softcap=softcap,
                   scale=scale)
    check_comm(comm)
    try:
        deterministic = _checks.check_bool(deterministic, "deterministic")
    except TypeError as error:  # the other ranks wait in the forward's comparison: tell them
        share_refusal(comm, error)
        raise

    class _RingAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = ring_attention(q, k, v, return_lse=True, **options)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        @_first_order  # the gradients are computed off the graph: refuse to differentiate them
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            return tuple(ring_attention_backward(dout.contiguous(), q, k, v, out, lse,
                                                 deterministic=deterministic, **options))

    return _RingAttention.apply(q, k, v)
