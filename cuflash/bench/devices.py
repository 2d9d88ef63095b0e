"""Where attention runs when it is measured: the CPU (NumPy) or the current CUDA device (CuPy).

A device times calls, measures their peak memory, says how much memory is free and makes random
inputs, the same way on both sides, so that ``cuflash check``, ``cuflash memory`` and ``cuflash
bench`` report comparable numbers.
"""

from __future__ import annotations

import functools
import os
import time
import tracemalloc
from typing import Callable

import numpy

__all__ = ["CpuDevice", "GpuDevice", "Unavailable", "device_properties", "format_bytes",
           "select_device"]


class Unavailable(Exception):
    """An implementation cannot run here; the message says why (shown as "n/a (...)")."""


def format_bytes(n: float) -> str:
    """Bytes in binary units: ``512 B``, ``3.5 KiB``, ``12.0 MiB``, ``1.50 GiB``, ``2.00 TiB``."""
    if n < 1024:
        return f"{int(n)} B"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    if n < 2**30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.2f} GiB" if n < 2**40 else f"{n / 2**40:,.2f} TiB"


class CpuDevice:
    """NumPy arrays: the tiled CPU path. Peak memory is tracemalloc's (NumPy reports its data
    buffers to it), which slows every allocation while it traces: a run measured for its peak
    is never the one timed (``times`` runs untraced)."""

    name = "cpu"
    xp = numpy
    out_of_memory = (MemoryError,)

    @property
    def description(self) -> str:
        return f"CPU, NumPy {numpy.__version__}, {os.cpu_count()} cores"

    def asarray(self, a):
        return numpy.asarray(a)

    def to_numpy(self, a):
        return numpy.asarray(a)

    def synchronize(self):
        pass

    def times(self, fn: Callable, *, warmup: int = 0, repeats: int = 1) -> list[float]:
        """Seconds taken by each of ``repeats`` calls of ``fn``, after ``warmup`` calls."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times

    def peak_bytes(self, fn: Callable):
        """``(fn(), bytes)``: the most memory ``fn`` held at once beyond what was held before."""
        # cuflash loads its NumPy path on the first call: load it first, so that the import's
        # Python objects, which tracemalloc would count, are not charged to the call.
        import cuflash.cpu  # noqa: F401
        started_here = not tracemalloc.is_tracing()
        if started_here:
            tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        try:
            result = fn()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            if started_here:
                tracemalloc.stop()
        return result, max(0, peak - before)

    def free_bytes(self) -> int:
        """Memory available to a new allocation (MemAvailable), or the physical size."""
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def random(self, shape, dtype, seed):
        rng = numpy.random.default_rng(seed)
        return rng.standard_normal(shape, dtype=numpy.float32).astype(dtype)


class GpuDevice:
    """CuPy arrays on the current CUDA device.

    Peak memory counts the bytes of CuPy's memory pool handed out to arrays (a CuPy memory hook
    follows every allocation and release), the analogue of ``torch.cuda.max_memory_allocated``.
    It does not count the pool's cached free blocks, the CUDA context or library workspaces.
    """

    name = "gpu"

    def __init__(self):
        import cupy
        self.xp = cupy
        self.out_of_memory = (cupy.cuda.memory.OutOfMemoryError,)
        self.properties = device_properties()

    @property
    def description(self) -> str:
        p = self.properties
        return (f"{p['name']} (GPU {p['id']}, sm_{p['major']}{p['minor']}, "
                f"{p['multiprocessors']} SMs, {format_bytes(p['total_memory'])})")

    def asarray(self, a):
        return self.xp.asarray(a)

    def to_numpy(self, a):
        return self.xp.asnumpy(a)

    def synchronize(self):
        self.xp.cuda.get_current_stream().synchronize()

    def times(self, fn: Callable, *, warmup: int = 1, repeats: int = 10) -> list[float]:
        """Seconds of GPU time of each of ``repeats`` calls (CUDA events on the current stream),
        after ``warmup`` calls."""
        cupy = self.xp
        stream = cupy.cuda.get_current_stream()
        for _ in range(warmup):
            fn()
        events = []
        for _ in range(repeats):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            fn()
            end.record(stream)
            events.append((start, end))
        events[-1][1].synchronize()
        return [cupy.cuda.get_elapsed_time(start, end) / 1e3 for start, end in events]

    def peak_bytes(self, fn: Callable):
        """``(fn(), bytes)``: the most pool memory ``fn`` held at once beyond what was held
        before (after the work finished on the device)."""
        hook = _peak_hook_class()()
        with hook:
            result = fn()
            self.synchronize()
        return result, hook.peak

    def free_bytes(self) -> int:
        """Free device memory plus what CuPy's pool holds cached and could hand out again."""
        free, _ = self.xp.cuda.runtime.memGetInfo()
        return int(free) + int(self.xp.get_default_memory_pool().free_bytes())

    def random(self, shape, dtype, seed):
        values = self.xp.random.default_rng(seed).standard_normal(shape, dtype=self.xp.float32)
        try:
            return values.astype(dtype)
        except Exception:  # a CuPy that cannot cast to this dtype on the device: cast on the host
            return self.xp.asarray(self.xp.asnumpy(values).astype(dtype))


@functools.cache
def _peak_hook_class():
    """A CuPy ``MemoryHook`` keeping the pool bytes in use and their maximum (built on first use,
    so that this module imports without CuPy)."""
    from cupy.cuda.memory_hook import MemoryHook

    class PeakMemoryHook(MemoryHook):
        name = "cuflash-peak-memory"

        def __init__(self):
            self.in_use = 0
            self.peak = 0

        def malloc_postprocess(self, **kwargs):
            if kwargs.get("mem_ptr"):
                self.in_use += kwargs["mem_size"]
                self.peak = max(self.peak, self.in_use)

        def free_postprocess(self, **kwargs):
            self.in_use -= kwargs["mem_size"]

    return PeakMemoryHook


def device_properties(device_id: int | None = None) -> dict:
    """Name, compute capability, SM count, memory, shared memory and clock of a CUDA device."""
    import cupy
    device_id = cupy.cuda.Device().id if device_id is None else device_id
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    return {
        "id": device_id,
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "major": int(props["major"]),
        "minor": int(props["minor"]),
        "multiprocessors": int(props["multiProcessorCount"]),
        "shared_memory_per_block": int(props["sharedMemPerBlock"]),
        "shared_memory_per_block_optin": int(props.get("sharedMemPerBlockOptin", 0)),
        "total_memory": int(props["totalGlobalMem"]),
        "clock_khz": int(props.get("clockRate", 0)),  # 0 where the runtime no longer says
    }


def select_device(requested: str = "auto"):
    """``(device, note)`` for ``"gpu"``, ``"cpu"`` or ``"auto"`` (the GPU when the kernels can run).

    ``note`` says why the CPU was chosen under ``"auto"`` (empty otherwise). Asking for ``"gpu"``
    where the kernels cannot run raises ``Unavailable`` with the reason.
    """
    if requested not in ("auto", "gpu", "cpu"):
        raise ValueError(f"device must be 'auto', 'gpu' or 'cpu', got {requested!r}")
    if requested == "cpu":
        return CpuDevice(), ""
    from cuflash import kernels
    usable, reason = kernels.availability()
    if usable:
        return GpuDevice(), ""
    if requested == "gpu":
        raise Unavailable(f"the GPU kernels cannot run here: {reason}")
    return CpuDevice(), f"GPU kernels not usable: {reason}"
