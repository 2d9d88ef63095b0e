"""CuPy arrays without a GPU, for tests of the host side of the CuPy path.

``FakeDevice`` (a context manager built on pytest's ``monkeypatch``) makes ``cupy.empty`` return
arrays over made-up device pointers (CuPy's array metadata needs no driver) and stubs every point
where the call path talks to the driver: the current device, the compute capability, kernel
compilation and launch, TMA descriptors, the capture query, the ALiBi slopes' copy. Launches are
recorded (kernel expression, grid, block, argument bytes), so a test can compare what two calls
would have sent to the GPU.
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np


class FakeKernel:
    def __init__(self, device, expression):
        self.device, self.expression = device, expression
        self.max_dynamic_shared_size_bytes = 1 << 20

    def __call__(self, grid, block, args, shared_mem=0):
        # The argument struct (an opaque record); what a kernel takes beside it (TMA
        # descriptors, a count) is kept apart, in side_arguments.
        args = [_by_value(a) for a in args]
        (record,) = [a for a in args if a.dtype.names == ("bytes",)]
        self.device.side_arguments.append(tuple(a for a in args if a is not record))
        self.device.launches.append((self.expression, grid, block, shared_mem, record.tobytes()))


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
        monkeypatch.setattr(_checks, "device_context", lambda x: contextlib.nullcontext())
        monkeypatch.setattr(_launch, "_compute_capability", lambda device_id: compute_capability)
        monkeypatch.setattr(_build, "get_function", get_function)
        # TMA descriptors come from the driver: a stand-in holding what the real one encodes.
        monkeypatch.setattr(_tma, "_encode", lambda address, shape, strides, dtype_name, box_rows: np.array(
            ([address, box_rows, *shape, *strides] + [0] * 16)[:16], np.uint64))
        monkeypatch.setattr(_launch, "sm_count", lambda device_id: 132)
        monkeypatch.setattr(_calls, "stream_capturing", lambda: False)
        monkeypatch.setattr(_checks, "alibi_copy",  # the copy itself needs the device
                            lambda slopes, shapes, xp: empty((shapes.b, shapes.hq), np.float32))
        _calls.clear()
        monkeypatch.setattr(_calls, "_stats", {"builds": 0, "hits": 0})

    def take_launches(self):
        launches, self.launches = self.launches, []
        return launches
