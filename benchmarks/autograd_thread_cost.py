"""What autograd's device thread costs a Python-defined backward on CUDA tensors.

    python benchmarks/autograd_thread_cost.py

Three ``torch.autograd.Function``s on an 8-element CUDA tensor, each timed as forward +
``backward()`` per call (best of three runs of 2,000 calls, synchronised at the end), with
autograd's multithreading on (the backward runs on the device's autograd thread) and off (it
runs on the calling thread):

- ``Plain``: a backward that returns its gradient;
- ``CupyBackward``: a backward that also asks CuPy for its current stream and device and
  allocates 64 bytes (the calls cuflash's backward makes around its kernels);
- ``PythonLoop``: a backward that also runs a 2,000-step Python loop (timed alone first).

The differences between the two modes price the thread handoff and show whether Python or CuPy
runs slower on autograd's thread (benchmarks/NOTES.md, "Per-call host cost, re-measured").
"""

from __future__ import annotations

import time

import cupy
import numpy
import torch


def _loop() -> int:
    total = 0
    for i in range(2000):
        total += i
    return total


class Plain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a * 1

    @staticmethod
    def backward(ctx, grad):
        return grad


class CupyBackward(Plain):
    @staticmethod
    def backward(ctx, grad):
        cupy.cuda.get_current_stream()
        cupy.cuda.runtime.getDevice()
        cupy.empty(16, numpy.float32)
        return grad


class PythonLoop(Plain):
    @staticmethod
    def backward(ctx, grad):
        _loop()
        return grad


def best_us(fn, calls: int = 2000) -> float:
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main():
    x = torch.randn(8, device="cuda", requires_grad=True)
    print(f"2,000-step Python loop alone: {best_us(_loop):.1f} µs")
    print("| Function | with the device thread | without | difference |\n|---|---|---|---|")
    for function in (Plain, CupyBackward, PythonLoop):
        times = []
        for threaded in (True, False):
            torch.autograd.set_multithreading_enabled(threaded)
            times.append(best_us(lambda: function.apply(x).sum().backward()))
        torch.autograd.set_multithreading_enabled(True)
        print(f"| {function.__name__} | {times[0]:.1f} µs | {times[1]:.1f} µs | "
              f"{times[0] - times[1]:.1f} µs |")


if __name__ == "__main__":
    main()
