"""Context parallelism: exact attention over a sequence sharded across GPUs (or simulated ranks).

- :func:`ring_attention`, :func:`ring_attention_backward`, :func:`ring_attention_vjp`: ring
  attention; key/value chunks travel around the ranks, partial results merge by log-sum-exp.
- :func:`ulysses_attention`, :func:`ulysses_attention_backward`: all-to-all over heads.
- :func:`shard`, :func:`unshard`, :func:`positions`: the ``contiguous`` and ``zigzag`` layouts.
- Communicators: :class:`LocalRing` (P ranks in one process, for tests and CPUs),
  :class:`NcclComm` (CuPy + NCCL, one process per GPU), :class:`TorchComm` (torch.distributed).
- ``python -m cuflash.parallel.launch --gpus N script.py``: one process per GPU.
- :func:`check_sharded`: ring attention against one device and float64.

See docs/parallel.md. ``import cuflash.parallel`` needs neither CuPy, NCCL nor torch.
"""

from .comm import (CommError, CommTimeout, Communicator, LocalComm, LocalRing,  # noqa: F401
                   Pending)
from .layout import LAYOUTS, positions, segments, shard, unshard
from .ring import merge, ring_attention, ring_attention_backward, ring_attention_vjp
from .ulysses import ulysses_attention, ulysses_attention_backward

__all__ = ["CommError", "CommTimeout", "Communicator", "LAYOUTS", "LocalComm", "LocalRing",
           "NcclComm", "Pending", "TorchComm", "check_sharded", "merge", "positions",
           "ring_attention", "ring_attention_backward", "ring_attention_vjp", "segments",
           "shard", "torch_ring_attention", "ulysses_attention", "ulysses_attention_backward",
           "unshard"]


def __getattr__(name):
    # Imported on first use: NcclComm needs CuPy, TorchComm torch, check_sharded the checker.
    if name == "NcclComm":
        from .nccl import NcclComm
        return NcclComm
    if name in ("TorchComm", "torch_ring_attention"):
        from . import _torch
        return getattr(_torch, name)
    if name in ("check_sharded", "ShardedCheck"):
        from . import check
        return getattr(check, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
