"""Python time of the torch adapter without a GPU: what ``cuflash.torch`` adds around the core.

    python benchmarks/torch_host_cost_cpu.py [--calls N] [--repeats R]

Small CPU tensors; ``cuflash.attention`` and ``cuflash.attention_backward`` are replaced by
stand-ins that return arrays made once, so the figures are the adapter's own time per call:
argument checks, the operators' dispatch and autograd, tensors crossing to arrays and back.
What the core costs on a GPU (``host_cost.py``), and the CUDA-side work of the crossing (torch's
stream and device, CuPy views of CUDA memory, torch's allocator), are not in them. Best of R × N
calls, µs per call.
"""

from __future__ import annotations

import argparse

import numpy
import pytest
import torch

import cuflash
import cuflash.torch as cuflash_torch
from host_cost_cpu import best_us  # benchmarks/host_cost_cpu.py

SHAPE = (2, 4, 128, 32)  # (B, H, N, D); the stand-ins make the size irrelevant


def _stand_ins(monkeypatch):
    """The core's two entry points as functions that only hand back arrays made once."""
    b, h, n, d = SHAPE
    lse = numpy.zeros((b, h, n), numpy.float32)
    grads = tuple(numpy.zeros(SHAPE, numpy.float32) for _ in range(3))

    def attention(q, k, v, *, out=None, return_lse=False, **options):
        return (out, lse) if return_lse else out

    def attention_backward(dout, q, k, v, out, lse, *, dq=None, dk=None, dv=None, **options):
        return (dq, dk, dv) if dq is not None else grads

    monkeypatch.setattr(cuflash, "attention", attention)
    monkeypatch.setattr(cuflash, "attention_backward", attention_backward)


def cases():
    q, k, v = (torch.randn(SHAPE, requires_grad=True) for _ in range(3))
    dout = torch.randn(SHAPE)
    bshd = [x.detach().transpose(1, 2).requires_grad_(True) for x in (q, k, v)]
    dout_bshd = dout.transpose(1, 2)

    def forward():
        with torch.no_grad():
            cuflash_torch.attention(q, k, v, causal=True)

    def forward_backward():
        cuflash_torch.attention(q, k, v, causal=True).backward(dout)

    def sdpa_forward_backward():
        cuflash_torch.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)

    def flash_attn_forward_backward():
        cuflash_torch.flash_attn_func(*bshd, causal=True).backward(dout_bshd)

    return (("attention, forward (no_grad)", forward),
            ("attention, forward + backward()", forward_backward),
            ("scaled_dot_product_attention, forward + backward()", sdpa_forward_backward),
            ("flash_attn_func, forward + backward()", flash_attn_forward_backward))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print("| call (CPU tensors, core stood in) | µs per call |\n|---|---|")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _stand_ins(monkeypatch)
        for name, fn in cases():
            fn()  # the first call of a signature is validated and planned
            print(f"| {name} | {best_us(fn, args.calls, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
