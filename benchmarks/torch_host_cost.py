"""Host time of the torch adapter on a GPU, split into its pieces, against torch's SDPA.

    python benchmarks/torch_host_cost.py [--calls N] [--profile]

A small bf16 causal problem, (B, H, N, D) = (2, 4, 128, 32), whose kernels take a few
microseconds, so that back-to-back calls measure the host. Prints µs per call (best of three
runs of N calls, host_cost.py's per_call_us) for:

- the core on CuPy arrays (the cached path): forward, backward;
- the pieces of a CUDA call in ``cuflash.torch``: entering and leaving ``_bridge.cuda_scope``
  (torch's and CuPy's device, torch's stream, the allocator hook), one ``to_cupy`` view, one
  CuPy allocation through torch's allocator with its way back (``to_torch``);
- ``cuflash.torch.attention``: forward under ``no_grad``, forward + ``backward()`` with
  autograd's device thread and without it (``torch.autograd.set_multithreading_enabled``);
- the same through the operators (``torch.ops.cuflash``), as under ``torch.compile``;
- ``torch.nn.functional.scaled_dot_product_attention``: forward, forward + ``backward()``.

``--profile`` adds cProfile of forward + ``backward()`` (autograd single-threaded, so that the
profile sees the backward too). ``torch_host_cost_cpu.py`` prices the adapter's Python without a
GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

import host_cost  # benchmarks/host_cost.py

import cuflash
import cuflash.torch as cuflash_torch
from cuflash.torch import _bridge, _ops

SHAPE = (2, 4, 128, 32)


def per_call_us(fn, calls: int) -> float:
    """Best of three runs of host_cost.py's per-call time, synchronised through torch."""
    return min(host_cost.per_call_us(fn, torch.cuda.synchronize, calls) for _ in range(3))


def cases():
    device = torch.device("cuda")
    q, k, v = (torch.randn(SHAPE, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    with _bridge.cuda_scope(device):
        cq, ck, cv, cdout = (_bridge.to_cupy(x.detach()) for x in (q, k, v, dout))
        cout, clse = cuflash.attention(cq, ck, cv, causal=True, return_lse=True)

    def scope():
        with _bridge.cuda_scope(device):
            pass

    def view():
        with _bridge.cuda_scope(device):
            _bridge.to_cupy(q)

    def allocation():
        import cupy
        with _bridge.cuda_scope(device) as allocator:
            allocator.to_torch(cupy.empty(SHAPE[:3], "float32"))

    def forward():
        with torch.no_grad():
            cuflash_torch.attention(q, k, v, causal=True)

    def forward_backward():
        cuflash_torch.attention(q, k, v, causal=True).backward(dout)

    def operators():
        with torch.no_grad():
            out, lse = torch.ops.cuflash.attention_forward(q, k, v, True, None, -1, -1, 0.0,
                                                           None, -1, False, False)
            torch.ops.cuflash.attention_backward(dout, q, k, v, out, lse, True, None, -1, -1,
                                                 0.0, None, -1, False)

    def sdpa_forward():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_forward_backward():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)

    def core_forward():
        with _bridge.cuda_scope(device):
            cuflash.attention(cq, ck, cv, causal=True)

    def core_backward():
        with _bridge.cuda_scope(device):
            cuflash.attention_backward(cdout, cq, ck, cv, cout, clse, causal=True)

    return {
        "core forward (CuPy arrays, inside cuda_scope)": core_forward,
        "core backward (CuPy arrays, inside cuda_scope)": core_backward,
        "cuda_scope, enter and leave": scope,
        "cuda_scope + one to_cupy view": view,
        "cuda_scope + one allocation through torch and back": allocation,
        "cuflash.torch.attention forward (no_grad)": forward,
        "cuflash.torch.attention forward + backward()": forward_backward,
        "torch.ops.cuflash forward + backward operators (no_grad)": operators,
        "SDPA forward (no_grad)": sdpa_forward,
        "SDPA forward + backward()": sdpa_forward_backward,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("torch_host_cost.py needs a CUDA GPU (torch_host_cost_cpu.py does not)")
    named = cases()
    print(f"| (B, H, N, D) = {SHAPE}, bf16 causal | µs per call |\n|---|---|")
    for name, fn in named.items():
        print(f"| {name} | {per_call_us(fn, args.calls):.1f} |", flush=True)
    torch.autograd.set_multithreading_enabled(False)
    try:
        for name in ("cuflash.torch.attention forward + backward()", "SDPA forward + backward()"):
            us = per_call_us(named[name], args.calls)
            print(f"| {name}, autograd single-threaded | {us:.1f} |", flush=True)
        if args.profile:
            profile = cProfile.Profile()
            fn = named["cuflash.torch.attention forward + backward()"]
            profile.enable()
            for _ in range(args.calls):
                fn()
            torch.cuda.synchronize()
            profile.disable()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(40)
            print(text.getvalue())
    finally:
        torch.autograd.set_multithreading_enabled(True)


if __name__ == "__main__":
    main()
