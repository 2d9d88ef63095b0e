"""The torch implementations timed next to cuflash: SDPA restricted to one back end (flash,
cuDNN) and compiled FlexAttention, on the same arrays handed over through DLPack.

torch is imported only when one of them is asked for; where it is missing, each raises
``Unavailable("torch not importable")``, which the tables show as "n/a (torch not importable)".
"""

from __future__ import annotations

import functools
from typing import Callable

import ml_dtypes
import numpy

from cuflash.bench.devices import Unavailable
from cuflash.bench.problems import SPARSE_BLOCK, Inputs

__all__ = ["compiled_flex_attention", "flex_block_mask", "flex_runner", "import_torch",
           "sdpa_runner", "to_torch", "torch_times"]


def import_torch():
    """torch, or ``Unavailable("torch not importable")``."""
    try:
        import torch
    except Exception as error:  # ImportError, or a broken install raising something else
        raise Unavailable("torch not importable") from error
    return torch


def to_torch(torch, x):
    """A torch tensor sharing ``x``'s memory, through DLPack.

    bfloat16 goes through a uint16 view where the DLPack exporter does not know the type.
    """
    try:
        return torch.from_dlpack(x)
    except Exception:
        if numpy.dtype(x.dtype) != numpy.dtype(ml_dtypes.bfloat16):
            raise
        return torch.from_dlpack(x.view(numpy.uint16)).view(torch.bfloat16)


def _torch_inputs(torch, inputs: Inputs, with_grad: bool):
    key = "grad" if with_grad else "plain"
    if key not in inputs.torch_views:
        q, k, v, dout = (to_torch(torch, x) for x in (inputs.q, inputs.k, inputs.v, inputs.dout))
        if with_grad:
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        inputs.torch_views[key] = (q, k, v, dout)
    return inputs.torch_views[key]


def sdpa_runner(backend: str, inputs: Inputs, mode: str, *, causal: bool) -> Callable:
    """torch SDPA restricted to one back end (``"FLASH_ATTENTION"``, ``"CUDNN_ATTENTION"``)."""
    torch = import_torch()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as error:
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel") \
            from error
    if not hasattr(SDPBackend, backend):
        raise Unavailable(f"torch {torch.__version__} has no SDPBackend.{backend}")
    chosen = getattr(SDPBackend, backend)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v, dout = _torch_inputs(torch, inputs, with_grad=mode != "fwd")

    def forward():
        with sdpa_kernel(chosen):
            return sdpa(q, k, v, is_causal=causal)

    def forward_backward():
        with sdpa_kernel(chosen):
            out = sdpa(q, k, v, is_causal=causal)
            return torch.autograd.grad(out, (q, k, v), dout)

    return forward if mode == "fwd" else forward_backward


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, compiled once per process and reused.

    Shapes are static (one compiled graph per shape, as FlexAttention is meant to run); the
    recompile limit is raised so that a sweep over many shapes does not fall back to eager mode.
    """
    torch = import_torch()
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as error:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention") from error
    dynamo_config = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, limit):
            setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 256))
    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(torch, *, seq_len: int, causal: bool, device, layout=None,
                    block_size: int = SPARSE_BLOCK):
    """FlexAttention's BlockMask for ``causal`` and/or a block ``layout`` ``(H', Nb, Nb)``.

    The layout is looked up in the mask function, so create_block_mask finds the same kept
    blocks (all of them full, no element masking) as cuflash's BlockMask with these blocks.
    Returns None for dense non-causal attention.
    """
    if layout is None and not causal:
        return None
    from torch.nn.attention.flex_attention import create_block_mask
    table = None if layout is None else torch.as_tensor(layout, device=device)
    per_head = table is not None and table.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx if causal else q_idx >= 0
        if table is not None:
            keep = keep & table[h if per_head else 0, q_idx // block_size, kv_idx // block_size]
        return keep

    heads = table.shape[0] if per_head else None
    return create_block_mask(mask_mod, None, heads, seq_len, seq_len, device=device,
                             BLOCK_SIZE=block_size)


def flex_runner(inputs: Inputs, mode: str, *, causal: bool, layout=None,
                block_size: int = SPARSE_BLOCK) -> Callable:
    torch = import_torch()
    flex = compiled_flex_attention()
    q, k, v, dout = _torch_inputs(torch, inputs, with_grad=mode != "fwd")
    mask = flex_block_mask(torch, seq_len=q.shape[-2], causal=causal, device=q.device,
                           layout=layout, block_size=block_size)

    def forward():
        return flex(q, k, v, block_mask=mask)

    def forward_backward():
        out = flex(q, k, v, block_mask=mask)
        return torch.autograd.grad(out, (q, k, v), dout)

    return forward if mode == "fwd" else forward_backward


def torch_times(device, fn: Callable, *, warmup: int, repeats: int) -> list[float]:
    """Like ``device.times`` for torch work: CUDA events of torch's current stream."""
    torch = import_torch()
    if device.name == "cpu":
        return device.times(fn, warmup=warmup, repeats=repeats)
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(repeats):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]
