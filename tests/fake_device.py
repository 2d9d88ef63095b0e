"""CuPy arrays without a GPU, for tests of the host side of the CuPy path.

``FakeDevice`` (a context manager built on pytest's ``monkeypatch``) makes ``cupy.empty`` and
``_launch.new_array`` return arrays over made-up device pointers, and ``_launch.device_memory``
such memory (CuPy's array metadata needs no driver), and stubs every point
where the call path talks to the driver: the current device, the compute capability, kernel
compilation and launch, TMA descriptors, the capture query, the ALiBi slopes' copy. Launches are
recorded (kernel expression, grid, block, argument bytes), so a test can compare what two calls
would have sent to the GPU.

A launch reaches the fake by any road a real one takes: CuPy's ``RawKernel.__call__``
(``FakeKernel.__call__``: the arguments as CuPy gets them) or the driver's ``cuLaunchKernel``
(``launch_kernel``, standing in for ``cupy.cuda.driver.launchKernel``: it reads each parameter
through the ``kernelParams`` pointers, as many bytes as the kernel's C signature in csrc/ says,
as the driver does), or ``cuLaunchKernelEx`` for a dependent launch (``launch_kernel_ex``,
standing in for ``_launch.launch_kernel_ex``: the same, after reading the launch config, and
listed in ``dependent``). All of them record the same thing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import re
import threading
import types
from pathlib import Path

import numpy as np

CSRC = Path(__file__).resolve().parent.parent / "cuflash" / "kernels" / "csrc"


class FakeKernel:
    def __init__(self, device, expression):
        self.device, self.expression = device, expression
        self.max_dynamic_shared_size_bytes = 1 << 20
        self.kernel = FakeFunction(next(device.function_pointers))  # RawKernel.kernel
        device.functions[self.kernel.ptr] = self

    def __call__(self, grid, block, args, shared_mem=0):
        self.record(grid, block, [_by_value(a) for a in args], shared_mem)

    def record(self, grid, block, args, shared_mem):
        # The argument struct (an opaque record); what a kernel takes beside it (TMA
        # descriptors, a count) is kept apart, in side_arguments.
        self.device.parameters.append(tuple(a.tobytes() for a in args))
        (record,) = [a for a in args if a.dtype.names == ("bytes",)]
        self.device.side_arguments.append(tuple(a for a in args if a is not record))
        self.device.launches.append((self.expression, grid, block, shared_mem, record.tobytes()))

    @property
    def parameters(self) -> tuple:
        """The dtype of each parameter of this kernel, from its C signature."""
        return tuple(_PARAMETER_TYPES[kind]() for kind in kernel_signatures()[self.name])

    @property
    def name(self) -> str:
        return self.expression.partition("<")[0]


class FakeFunction:
    def __init__(self, ptr):
        self.ptr = ptr


class FakeStream:
    """CuPy's current stream as the launches read it: its handle, never capturing; the events
    recorded on it are listed in ``events`` (the device's), each ``done`` once a test says so."""

    def __init__(self, ptr, events=None):
        self.ptr, self.events = ptr, [] if events is None else events

    def is_capturing(self) -> bool:
        return False

    def record(self, event=None):
        event = FakeEvent(self.ptr) if event is None else event
        event.stream = self.ptr
        self.events.append(event)
        return event


class FakeEvent:
    """An event recorded on stream ``stream`` (a handle); ``done`` when a test sets it, which
    lets a thread waiting in ``synchronize`` go on."""

    def __init__(self, stream):
        self.stream, self._passed = stream, threading.Event()

    @property
    def done(self) -> bool:
        return self._passed.is_set()

    @done.setter
    def done(self, passed: bool) -> None:
        self._passed.set() if passed else self._passed.clear()

    def synchronize(self) -> None:
        self._passed.wait()


# The by-value parameter types of the kernels (csrc/args.cuh, arch/sm90_tma.cuh), as NumPy
# dtypes of their size and alignment (argument structs as the opaque records by_value sends).
def _parameter_types() -> dict:
    from cuflash.kernels import _launch, _tma, decode

    return {"FwdArgs": lambda: _launch._opaque(_launch.FWD_ARGS.itemsize),
            "BwdArgs": lambda: _launch._opaque(_launch.BWD_ARGS.itemsize),
            "DecodeArgs": lambda: _launch._opaque(decode.DECODE_ARGS.itemsize),
            "AppendArgs": lambda: _launch._opaque(decode.APPEND_ARGS.itemsize),
            "QkvMaps": lambda: _tma.descriptors_dtype(3),
            "BwdMaps": lambda: _tma.descriptors_dtype(4),
            "int": lambda: np.dtype(np.int32),
            "int*": lambda: np.dtype(np.uint64)}


class _Types(dict):
    def __missing__(self, kind):
        types = _parameter_types()
        if kind not in types:
            raise KeyError(f"fake_device: no size known for kernel parameter type {kind}")
        return types[kind]


_PARAMETER_TYPES = _Types()
_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?"
                     r"(\w+)\(([^)]*)\)")


@functools.lru_cache(maxsize=None)
def kernel_signatures() -> dict:
    """Each kernel's parameter types, by name, from the sources in csrc/."""
    signatures = {}
    for path in CSRC.glob("*.cu"):
        for name, params in _KERNEL.findall(path.read_text()):
            kinds = [[word for word in p.split() if word not in ("const", "__grid_constant__")][0]
                     for p in params.split(",") if p.strip()]
            signatures[name] = tuple(kinds)
    return signatures


def _by_value(argument):
    """A copy of a by-value kernel argument as an array: a structured NumPy scalar (how the
    launchers pass their structs, _launch.by_value) as the 1-element record it holds."""
    if isinstance(argument, np.void):
        return np.asarray(argument).reshape(1).copy()
    return np.asarray(argument).copy()


class FakeDevice:
    """Install with ``FakeDevice(monkeypatch, compute_capability="90")``."""

    def __init__(self, monkeypatch, compute_capability="90"):
        import cupy
        from cupy.cuda import memory

        from cuflash import _calls, _checks
        from cuflash.kernels import _build, _launch, _tma

        self.cupy, self.launches, self.compiled, self.side_arguments = cupy, [], [], []
        self.functions, self.function_pointers = {}, itertools.count(0x7000)
        self.streams, self.contexts_bound, self.parameters = [0x5000], [], []
        pointers = itertools.count(1)

        def empty(shape, dtype=float, order="C"):
            dtype = np.dtype(dtype)
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            size = max(int(np.prod(shape)) * dtype.itemsize, 1)
            mem = memory.UnownedMemory(next(pointers) << 32, size, None, device_id=0)
            return cupy.ndarray(shape, dtype, memptr=memory.MemoryPointer(mem, 0))

        def get_function(source, expression, **options):
            self.compiled.append(expression)
            return FakeKernel(self, expression)

        self.empty = empty
        monkeypatch.setattr(cupy, "empty", empty)
        monkeypatch.setattr(_launch, "new_array", empty)
        monkeypatch.setattr(_launch, "device_memory", lambda nbytes: empty(nbytes, np.uint8).data)
        # (the pinned buffer a host array is copied from: host memory standing in for it)
        monkeypatch.setattr(_launch, "copy_to_device",
                            lambda host, stream: (empty(host.shape, host.dtype), np.array(host)))
        monkeypatch.setattr(_checks, "device_context", lambda x: contextlib.nullcontext())
        monkeypatch.setattr(_launch, "_compute_capability", lambda device_id: compute_capability)
        monkeypatch.setattr(_build, "get_function", get_function)
        # TMA descriptors come from the driver: a stand-in holding what the real one encodes.
        monkeypatch.setattr(_tma, "_encode", lambda address, shape, strides, dtype_name, box_rows: np.array(
            ([address, box_rows, *shape, *strides] + [0] * 16)[:16], np.uint64).tobytes())
        monkeypatch.setattr(_launch, "sm_count", lambda device_id: 132)
        # Shared memory a thread block may take: Hopper's, the A100's, else 8.6's and 8.9's.
        limit = {"90": 227 * 1024, "80": 163 * 1024}.get(compute_capability, 99 * 1024)
        monkeypatch.setattr(_launch, "shared_limit", lambda device_id: limit)
        # A persistent grid's tile counter, one per stream (TileCounters allocates on the device).
        monkeypatch.setattr(_launch, "tile_counters", types.SimpleNamespace(pointer=lambda stream: stream << 16))
        monkeypatch.setattr(_calls, "stream_capturing", lambda: False)
        monkeypatch.setattr(cupy.cuda.driver, "launchKernel", self.launch_kernel)
        monkeypatch.setattr(_launch, "launch_kernel_ex", self.launch_kernel_ex)
        monkeypatch.setattr(_launch, "launch_kernel_ex_supported", lambda: True)
        self.dependent = []  # (kernel expression, grid) of each launch made as a dependent
        monkeypatch.setattr(_launch, "_bound", _launch._BoundContexts())  # no context bound yet
        monkeypatch.setattr(_launch, "_cupy", None)  # as in a process that launched nothing yet
        monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 0)
        monkeypatch.setattr(cupy.cuda.runtime, "memGetInfo",
                            lambda: self.contexts_bound.append(0) or (1 << 30, 1 << 30))
        self.events = []  # recorded on the current stream (FakeStream.record)
        monkeypatch.setattr(cupy.cuda, "get_current_stream",
                            lambda: FakeStream(self.streams[-1], self.events))
        monkeypatch.setattr(_launch, "blocking_event", lambda: FakeEvent(None))
        monkeypatch.setattr(_launch, "wait_for", lambda event, device: event.synchronize())
        monkeypatch.setattr(_checks, "alibi_copy",  # the copy itself needs the device
                            lambda slopes, shapes, xp: empty((shapes.b, shapes.hq), np.float32))
        _calls.clear()
        monkeypatch.setattr(_calls, "_stats", {"builds": 0, "hits": 0})

    def launch_kernel(self, function, gx, gy, gz, bx, by, bz, shared_mem, stream, kernel_params,
                      extra):
        """cuLaunchKernel: the parameters are read through `kernel_params` (void **), each as
        many bytes as the kernel's signature gives it, and recorded as a RawKernel launch is."""
        kernel = self.functions[function]
        assert (gy, gz, by, bz, extra) == (1, 1, 1, 1, 0) and stream == self.streams[-1]
        types = kernel.parameters
        addresses = (ctypes.c_void_p * len(types)).from_address(kernel_params)
        args = [np.frombuffer(ctypes.string_at(address, dtype.itemsize), dtype).copy()
                for address, dtype in zip(addresses, types)]
        args = [a if a.dtype.names else a.reshape(()) for a in args]  # scalars as _by_value has them
        kernel.record((gx,), (bx,), args, shared_mem)

    def launch_kernel_ex(self, config, function, kernel_params):
        """cuLaunchKernelEx: the CUlaunchConfig at `config` read as the driver reads it; its one
        attribute must be programmatic stream serialization, switched on. Recorded as
        ``launch_kernel`` records, and listed in ``dependent``."""
        from cuflash.kernels import _launch

        head = ctypes.string_at(config, _launch.LAUNCH_CONFIG.size)
        *shape, stream, attributes, count = _launch.LAUNCH_CONFIG.unpack(head)
        assert count == 1
        attribute = _launch.LAUNCH_ATTRIBUTE.unpack(ctypes.string_at(attributes, _launch.LAUNCH_ATTRIBUTE.size))
        assert attribute == (_launch.PROGRAMMATIC_STREAM_SERIALIZATION, 1)
        self.launch_kernel(function, *shape, stream, kernel_params, 0)
        self.dependent.append(self.launches[-1][:2])

    def laid_out(self, shape, dtype, layout: str, *, pad: int = 8):
        """A made-up (B, H, N, D) array in ``layout``: "sequence-major" ((B, N, H, D) in memory),
        "unaligned" (one element past an allocation's start), "padded" (rows of D + ``pad``
        elements), else C-contiguous."""
        b, h, n, last = shape
        if layout == "sequence-major":
            return self.empty((b, n, h, last), dtype).transpose(0, 2, 1, 3)
        if layout == "unaligned":
            return self.empty((b * h * n * last + 1,), dtype)[1:].reshape(b, h, n, last)
        if layout == "padded":
            return self.empty((b, h, n, last + pad), dtype)[..., :last]
        return self.empty(shape, dtype)

    def take_launches(self):
        launches, self.launches = self.launches, []
        return launches

    def holds_block_masks(self, monkeypatch) -> None:
        """Block masks' device tile index in made-up device memory of this device (the real one
        uploads it), made once per mask and tile shape."""
        from cuflash.sparse import BlockMask
        from cuflash.sparse._csr import TileCSR

        def device_csr(mask, tile_m, tile_n):
            return mask._cache.setdefault(("fake", tile_m, tile_n), TileCSR(
                *(self.empty(a.shape, a.dtype) for a in mask.tile_csr(tile_m, tile_n))))

        monkeypatch.setattr(BlockMask, "device_csr", device_csr)
