"""Peak device memory of forward and forward+backward, cuflash next to torch SDPA (flash back end).

    python benchmarks/memory_vs_sdpa.py [--seq-lens 16384,65536] [--heads 16] [--head-dim 64]

Counts the bytes allocated during the call beyond what was held before (inputs excluded;
outputs, lse, gradients and scratch included): CuPy's pool through a memory hook for cuflash,
``torch.cuda.max_memory_allocated`` for SDPA.
"""

from __future__ import annotations

import argparse

import cupy
import ml_dtypes
import numpy

import cuflash
from cuflash.bench import GpuDevice, format_bytes


def cuflash_peaks(device, q, k, v, dout):
    _, forward = device.peak_bytes(lambda: cuflash.attention(q, k, v, return_lse=True))

    def both():
        out, vjp = cuflash.attention_vjp(q, k, v)
        return vjp(dout)

    _, total = device.peak_bytes(both)
    return forward, total


def sdpa_peaks(q, k, v, dout):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    tdo = torch.from_dlpack(dout)
    peaks = []
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for backward in (False, True):
            for x in (tq, tk, tv):
                x.requires_grad_(backward)
                x.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = sdpa(tq, tk, tv)
            if backward:
                out.backward(tdo)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
            del out
    return tuple(peaks)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-lens", default="16384,65536")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    device = GpuDevice()
    print(f"bf16, B=1, H={args.heads}, D={args.head_dim}; bytes allocated during the call, "
          "inputs excluded")
    print(f"{'N':>7} {'q+k+v':>10} | {'cuflash fwd':>12} {'fwd+bwd':>10} | "
          f"{'sdpa-flash fwd':>14} {'fwd+bwd':>10} | {'N×N fp32':>10}")
    for n in map(int, args.seq_lens.split(",")):
        shape = (1, args.heads, n, args.head_dim)
        rng = cupy.random.default_rng()
        q, k, v, dout = (rng.standard_normal(shape, dtype=numpy.float32).astype(ml_dtypes.bfloat16)
                         for _ in range(4))
        inputs = 3 * q.nbytes
        ours = cuflash_peaks(device, q, k, v, dout)
        try:
            theirs = sdpa_peaks(q, k, v, dout)
        except Exception as error:  # torch missing or the back end refused the shape
            print(f"  sdpa-flash: {type(error).__name__}: {error}")
            theirs = (float("nan"), float("nan"))
        scores = 4.0 * args.heads * n * n
        print(f"{n:>7} {format_bytes(inputs):>10} | {format_bytes(ours[0]):>12} "
              f"{format_bytes(ours[1]):>10} | {format_bytes(theirs[0]):>14} "
              f"{format_bytes(theirs[1]):>10} | {format_bytes(scores):>10}", flush=True)
        del q, k, v, dout
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
