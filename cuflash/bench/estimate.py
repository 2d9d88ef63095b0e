"""How long attention takes on a device, estimated before a long request runs.

On the CPU the NumPy path is timed once per process on a small problem of the same heads, head
dimension (both bounded) and dtype (a fraction of a second), and the time scales with the FLOPs. On the GPU the
rate is a fraction of the device's tensor-core peak, worked out from its SM count, clock and
compute capability; :func:`compile_seconds` adds the first compile of each kernel variant.
Either way the result is an estimate, meant to tell seconds from hours.
"""

from __future__ import annotations

import functools
import time

import numpy

from cuflash.bench.problems import BACKWARD_FLOP_FACTOR, DTYPES, forward_flops

__all__ = ["attention_bytes", "attention_seconds", "compile_seconds", "flops_per_second",
           "kernel_variants"]

# Calibration on the CPU: one problem of this many tokens (eight 128-row tiles each way, enough
# for the cost per tile to dominate) and at most this many heads and this head dimension (more
# heads per tile, and longer products, are cheaper per FLOP, so the estimate errs on the long
# side; and the calibration stays small whatever the request asks for).
CALIBRATION_TOKENS = 1024
CALIBRATION_HEADS = 8
CALIBRATION_HEAD_DIM = 256

# Dense 16-bit tensor-core FLOP per clock per SM (float32 accumulation) by compute capability;
# others get FALLBACK_TENSOR_FLOP_PER_CLOCK (the consumer parts of sm_86/sm_89/sm_120).
TENSOR_FLOP_PER_CLOCK = {(8, 0): 2048, (9, 0): 4096, (10, 0): 8192}
FALLBACK_TENSOR_FLOP_PER_CLOCK = 512
CUDA_CORE_FLOP_PER_CLOCK = 256  # float32: 128 lanes, one FMA each
GPU_EFFICIENCY = 0.35  # the fraction of the peak an attention kernel is assumed to reach
GPU_CALL_SECONDS = 2e-4  # host cost of one call (validation, launch)

# The first call of each kernel variant in a process compiles it with NVRTC (or, where an earlier
# process compiled it, loads it from CuPy's on-disk kernel cache, CUPY_CACHE_DIR). Measured with
# cuflash.kernels._build.compile_offline for sm_90a (NVRTC of CUDA 13, on a 2-core AMD EPYC host
# without a GPU), one variant a program: 0.6-1.0 s for the bfloat16 TMA forward at D = 64, 128
# and 256, 0.4-0.7 s for the warp-specialised dK/dV kernel at D = 64 and 256, 0.3 s for the dQ
# kernel at D = 128. Charged at 2 s, a round figure above the slowest, leaving room for CuPy's
# own work (hashing the source, writing its cache, loading the module) and slower hosts.
KERNEL_COMPILE_SECONDS = 2.0
# Kernels one call launches, a variant each: the forward's one; with the backward three more in
# every family (preprocessing, dK/dV, then dQ or the cast of its float32 accumulator).
KERNELS_PER_CALL = {"fwd": 1, "fwdbwd": 4}


# Below this many FLOPs a CPU request is about as quick as the calibration itself: it is not
# calibrated, and this rate (a slow machine's) stands in.
CPU_SMALL_FLOPS = 2e9
CPU_ASSUMED_FLOPS = 5e9


def flops_per_second(device, *, heads: int, head_dim: int, dtype, backward: bool = False,
                     flops: float | None = None) -> float:
    """The attention FLOP rate assumed for ``device`` (forward, or backward when asked), for a
    request of ``flops`` FLOPs (None: any size)."""
    dtype = numpy.dtype(DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    if device.name == "cpu":
        if flops is not None and flops < CPU_SMALL_FLOPS:
            return CPU_ASSUMED_FLOPS
        return _cpu_rate(min(heads, CALIBRATION_HEADS), min(head_dim, CALIBRATION_HEAD_DIM),
                         dtype.name, backward)
    p = device.properties
    clock_hz = p.get("clock_khz", 0) * 1e3 or 1.5e9
    if dtype.itemsize == 4:
        per_clock = CUDA_CORE_FLOP_PER_CLOCK
    else:
        per_clock = TENSOR_FLOP_PER_CLOCK.get((p["major"], p["minor"]),
                                              FALLBACK_TENSOR_FLOP_PER_CLOCK)
    return GPU_EFFICIENCY * p["multiprocessors"] * clock_hz * per_clock


def attention_seconds(device, *, batch: int, heads: int, seq_len: int, head_dim: int, dtype,
                      causal: bool = False, fraction: float = 1.0, backward: bool = False,
                      calls: int = 1) -> float:
    """Seconds of ``calls`` forward calls (followed by a backward each when ``backward``)."""
    flops = forward_flops(batch, heads, seq_len, seq_len, head_dim, causal=causal,
                          fraction=fraction)
    rate = functools.partial(flops_per_second, device, heads=batch * heads, head_dim=head_dim,
                             dtype=dtype, flops=calls * flops)
    one = flops / rate()
    if backward:
        one += BACKWARD_FLOP_FACTOR * flops / rate(backward=True)
    overhead = GPU_CALL_SECONDS * (2 if backward else 1) if device.name == "gpu" else 0.0
    return calls * (one + overhead)


def kernel_variants(calls: int, modes) -> int:
    """At most how many kernel variants ``calls`` distinct calls compile, each run in ``modes``
    ("fwd", "fwdbwd"; the forward's kernel is the same in both). An upper bound: calls that
    differ only in what the kernels do not specialise on (the batch, often the length) share
    variants."""
    return calls * max(KERNELS_PER_CALL[mode] for mode in modes)


def compile_seconds(device, variants: int) -> float:
    """Seconds of the first compile of ``variants`` kernel variants on ``device`` (the NumPy
    path compiles nothing); on a warm CuPy cache they take less."""
    return variants * KERNEL_COMPILE_SECONDS if device.name == "gpu" else 0.0


def attention_bytes(*, batch: int, heads: int, seq_len: int, head_dim: int, itemsize: int,
                    backward: bool, numpy_path: bool) -> int:
    """Memory one timed call holds at its peak, its inputs included: q, k, v and an output
    gradient, out and the three gradients in the input dtype, and the float32 row sums (lse,
    Delta); with ``backward``, the float32 dq accumulator. The NumPy path (``numpy_path``) also
    works on float32 copies of each of those eight arrays (measured: up to 44 bytes an element
    in bfloat16)."""
    elements = batch * heads * seq_len * head_dim
    rows = batch * heads * seq_len
    total = 8 * elements * itemsize + 8 * rows + (4 * elements if backward else 0)
    return total + (8 * elements * 4 if numpy_path else 0)


@functools.cache
def _cpu_rate(heads: int, head_dim: int, dtype_name: str, backward: bool) -> float:
    """FLOP/s of the NumPy path on one small problem, the faster of two runs."""
    import cuflash

    rng = numpy.random.default_rng(0)
    shape = (1, heads, CALIBRATION_TOKENS, head_dim)
    dtype = DTYPES[dtype_name]
    q, k, v, dout = (rng.standard_normal(shape, dtype=numpy.float32).astype(dtype)
                     for _ in range(4))
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    flops = forward_flops(1, heads, CALIBRATION_TOKENS, CALIBRATION_TOKENS, head_dim)
    if backward:
        flops *= BACKWARD_FLOP_FACTOR
        run = lambda: cuflash.attention_backward(dout, q, k, v, out, lse)  # noqa: E731
    else:
        run = lambda: cuflash.attention(q, k, v)  # noqa: E731
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return flops / max(best, 1e-6)
