"""Python time of cached calls without a GPU: what cuflash's host path costs per call.

    python benchmarks/host_cost_cpu.py [--calls N] [--repeats R]

Cached bf16 causal forward and backward calls at (B, H, N, D) = (1, 16, 128, 64) and
(8, 16, 512, 64), and the same tokens as B packed sequences (``attention_varlen``, device
offsets, ``check_offsets=False``), on ``tests/fake_device.py``'s fake device, as compute
capability 9.0 (TMA forward, wgmma backward) and 8.0 (sm80 mma). The allocations (``cupy.empty``,
``_launch.new_array``, ``_launch.device_memory``), the driver's launches (``cuLaunchKernel`` and,
for dependent launches, ``cuLaunchKernelEx``) and the device and stream
queries are stand-ins that cost next to nothing; a launch that goes through CuPy's
``RawKernel.__call__`` keeps what CuPy does per argument before the driver call (``CScalar``
for a NumPy scalar, ``CNumpyArray`` for an array). So the figures are cuflash's Python plus
CuPy's argument conversion, without CuPy's allocation, launch, device and stream calls (which
``host_cost.py`` measures on a GPU). Best of R × N calls, µs per call. Beside them, the same
calls as first calls: every cache entry forgotten before each (``cuflash._calls.clear``), so each
is validated, planned and prepared, as the first call of a signature is (a packed-sequence
training step that brings new maximum lengths makes one per pass); best of R × N / 10. Then a
KV-cache decode step (``attention_with_kvcache``, with and without a key appended) the same two
ways.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import cuflash  # noqa: E402
from fake_device import FakeDevice, FakeKernel  # noqa: E402

SHAPES = ((1, 16, 128, 64), (8, 16, 512, 64))


def _cupy_conversion(self, grid, block, args, shared_mem=0):
    """What CuPy's Function.__call__ does with each argument before the driver call."""
    from cupy._core._scalar import CScalar
    from cupy.cuda.function import CNumpyArray

    return [CNumpyArray(a) if isinstance(a, numpy.ndarray) else CScalar(a) for a in args]


def _cheap_stand_ins(monkeypatch, device, addresses=2):
    """Allocations from a few arrays made once (``addresses`` of each shape and dtype, handed out
    in turn, as a caching allocator hands a loop's outputs a few addresses over and over: the
    TMA descriptors of outputs are then rewritten as they are in such a loop), memoised TMA
    descriptors, launches and queries that do nothing."""
    import cupy

    from cuflash.kernels import _launch, _tma

    made = {}

    def empty(shape, dtype=float, order="C"):
        key = (shape, dtype)
        if key not in made:
            made[key] = itertools.cycle([device.empty(shape, dtype) for _ in range(addresses)])
        return next(made[key])

    monkeypatch.setattr(cupy, "empty", empty)
    monkeypatch.setattr(_launch, "new_array", empty)
    monkeypatch.setattr(_launch, "device_memory", lambda nbytes: empty((nbytes,), numpy.uint8).data)
    # The real encoder is memoised by address: so is its stand-in here.
    monkeypatch.setattr(_tma, "_encode", functools.lru_cache(maxsize=256)(_tma._encode))
    monkeypatch.setattr(FakeKernel, "__call__", _cupy_conversion)
    monkeypatch.setattr(cupy.cuda.driver, "launchKernel", lambda *args: None, raising=False)
    monkeypatch.setattr(_launch, "launch_kernel_ex", lambda *args: None)


def best_us(fn, calls, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--addresses", type=int, default=2,
                        help="addresses cupy.empty's stand-in cycles through per shape (default 2)")
    args = parser.parse_args()
    print("| fake device | shape | forward µs | backward µs | first forward µs | first backward µs |\n"
          "|---|---|---|---|---|---|")
    for capability in ("90", "80"):
        for shape in SHAPES:
            with _fake_device(capability, args) as (_, device):
                times = time_calls(*dense_calls(device, shape), args)
            print(f"| {capability[0]}.{capability[1]} | {shape} | " + _cells(times))
            with _fake_device(capability, args) as (_, device):
                times = time_calls(*packed_calls(device, shape), args)
            b, h, n, d = shape
            packed = f"{b} packed sequence{'s' * (b > 1)} of {n}: ({b * n}, {h}, {d})"
            print(f"| {capability[0]}.{capability[1]} | {packed} | " + _cells(times))
    print("\n| fake device | KV-cache decode step | call µs | first call µs |\n|---|---|---|---|")
    for capability in ("90", "80"):
        for appends in (False, True):
            with _fake_device(capability, args) as (monkeypatch, device):
                call = decode_call(monkeypatch, device, appends)
                call()
                times = (best_us(call, args.calls, args.repeats),
                         best_us(_first(call), max(args.calls // 10, 1), args.repeats))
            what = DECODE_STEP + (", one key appended" if appends else "")
            print(f"| {capability[0]}.{capability[1]} | {what} | " + _cells(times))


@contextlib.contextmanager
def _fake_device(capability: str, args):
    """``(monkeypatch, device)``: a fake device of this compute capability with the cheap
    stand-ins, undone at the block's end."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        device = FakeDevice(monkeypatch, compute_capability=capability)
        _cheap_stand_ins(monkeypatch, device, args.addresses)
        yield monkeypatch, device


DECODE_STEP = "B = 8, 32K cache, Hq = 32, Hkv = 8, D = 128, one query"


def decode_call(monkeypatch, device, appends: bool):
    """One decode step of ``DECODE_STEP`` (``attention_with_kvcache``, lengths in a device
    array, causal), appending a key per batch row or not."""
    from cuflash.kernels import decode

    # the split count's occupancy: an H100's SMs and blocks per SM (the device queries need a
    # driver)
    monkeypatch.setattr(decode, "sm_count", lambda device_id: 132)
    monkeypatch.setattr(decode, "resident_blocks", lambda device_id, shared: 228 * 1024 // (shared + 1024))
    b, cache, hq, hkv, d = 8, 32768, 32, 8, 128
    q = device.empty((b, 1, hq, d), ml_dtypes.bfloat16)
    k_cache, v_cache = (device.empty((b, cache, hkv, d), ml_dtypes.bfloat16) for _ in range(2))
    new = tuple(device.empty((b, 1, hkv, d), ml_dtypes.bfloat16) for _ in range(2)) if appends else ()
    lengths = device.empty((b,), numpy.int32)

    def call():
        cuflash.attention_with_kvcache(q, k_cache, v_cache, *new, cache_seqlens=lengths,
                                       causal=True)

    return call


def _cells(times) -> str:
    return " | ".join(f"{t:.1f}" for t in times) + " |"


def dense_calls(device, shape):
    """The forward and backward calls timed at one dense shape."""
    q, k, v, dout = (device.empty(shape, ml_dtypes.bfloat16) for _ in range(4))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)

    def forward():
        cuflash.attention(q, k, v, causal=True)

    def backward():
        cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)

    return forward, backward


def packed_calls(device, shape):
    """The same tokens as packed sequences of one length (``attention_varlen``, device offsets,
    ``check_offsets=False``: no read-back)."""
    b, h, n, d = shape
    q, k, v, dout = (device.empty((b * n, h, d), ml_dtypes.bfloat16) for _ in range(4))
    cu = device.empty((b + 1,), numpy.int32)
    layout = (cu, cu, n, n)
    out, lse = cuflash.attention_varlen(q, k, v, *layout, causal=True, return_lse=True,
                                        check_offsets=False)

    def forward():
        cuflash.attention_varlen(q, k, v, *layout, causal=True, check_offsets=False)

    def backward():
        cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *layout, causal=True,
                                          check_offsets=False)

    return forward, backward


def time_calls(forward, backward, args):
    """Per call, µs: cached forward and backward, then each as a first call."""
    forward(), backward()
    cached = best_us(forward, args.calls, args.repeats), best_us(backward, args.calls, args.repeats)
    first = [best_us(_first(call), max(args.calls // 10, 1), args.repeats)
             for call in (forward, backward)]
    return (*cached, *first)


def _first(call):
    """``call`` with every cache entry forgotten before it (the clearing itself is timed too: a
    few dictionaries emptied)."""
    from cuflash import _calls

    def first():
        _calls.clear()
        call()

    return first


if __name__ == "__main__":
    main()
