"""Tensors to arrays and back, without copies, on torch's stream and torch's memory.

CPU tensors become NumPy views (``Tensor.numpy()``; bfloat16 through an int16 bit-cast, since
NumPy knows bfloat16 only as ``ml_dtypes.bfloat16``). CUDA tensors become CuPy views of their
memory (``to_cupy``), through DLPack for dtypes without a CuPy twin here. Inside ``cuda_scope``
CuPy runs on torch's current stream and every CuPy allocation
(results cuflash allocates itself, scratch buffers of the kernels) is a ``torch.empty`` buffer, so
the memory shows in ``torch.cuda.memory_allocated`` and is recorded by a CUDA graph capture; a CuPy
array allocated there comes back to torch as a view of that buffer, whatever its dtype.
"""

import contextlib
import threading
import weakref

import ml_dtypes
import numpy
import torch

_BF16 = numpy.dtype(ml_dtypes.bfloat16)

_NUMPY_OF_TORCH = {
    torch.float16: numpy.dtype(numpy.float16),
    torch.float32: numpy.dtype(numpy.float32),
    torch.float64: numpy.dtype(numpy.float64),
    torch.bfloat16: _BF16,
}
_TORCH_OF_NUMPY = {v: k for k, v in _NUMPY_OF_TORCH.items()}


def torch_dtype(dtype) -> torch.dtype:
    dtype = numpy.dtype(dtype)
    try:
        return _TORCH_OF_NUMPY[dtype]
    except KeyError:
        raise TypeError(f"no torch dtype for {dtype}") from None


# ----------------------------------------------------------------------------- CPU

def to_numpy(t: torch.Tensor) -> numpy.ndarray:
    """A NumPy view of a CPU tensor (no copy, any strides)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_BF16)
    return t.numpy()


def from_numpy(a: numpy.ndarray) -> torch.Tensor:
    """A tensor sharing ``a``'s memory."""
    if a.dtype == _BF16:
        return torch.from_numpy(a.view(numpy.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# ----------------------------------------------------------------------------- CUDA

class _NoSyncExport:
    """Exports a tensor by DLPack without a stream handshake.

    The consumer (CuPy) runs on the very stream torch is using (``cuda_scope``), so the event
    record/wait that ``Tensor.__dlpack__(stream=...)`` would add is unnecessary; during a CUDA
    graph capture it would even be recorded into the graph.
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        options = {key: value for key, value in
                   (("max_version", max_version), ("dl_device", dl_device), ("copy", copy))
                   if value is not None}
        try:
            return self.tensor.__dlpack__(stream=-1, **options)
        except TypeError:
            # A torch without some DLPack 1.0 keywords. The export is a view of the tensor on
            # its own device either way, so only a requested copy cannot be honoured.
            if copy:
                raise
        try:
            return self.tensor.__dlpack__(stream=-1, max_version=max_version)
        except TypeError:
            return self.tensor.__dlpack__(stream=-1)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


# dtypes whose CUDA tensors become CuPy views directly from their pointer and strides: a DLPack
# export and import measured 12-80 µs per tensor on an H200 host, against 22 µs for a whole cached
# call of the core, and a call crosses four to six tensors.
_VIEWABLE = {**_NUMPY_OF_TORCH, torch.int32: numpy.dtype(numpy.int32), torch.int64: numpy.dtype(numpy.int64)}


def to_cupy(t: torch.Tensor):
    """A CuPy view of a CUDA tensor (no copy, any strides); call inside ``cuda_scope``. The view
    keeps the tensor alive (its memory's owner)."""
    import cupy
    dtype = _VIEWABLE.get(t.dtype)
    if dtype is not None:
        itemsize = dtype.itemsize
        shape, strides = t.shape, tuple(itemsize * s for s in t.stride())
        # Bytes from the first element to one past the last (torch strides are never negative).
        span = 0 if t.numel() == 0 else itemsize + sum((n - 1) * s for n, s in zip(shape, strides))
        memory = cupy.cuda.UnownedMemory(t.data_ptr(), span, t, t.get_device())
        return cupy.ndarray(tuple(shape), dtype, cupy.cuda.MemoryPointer(memory, 0), strides)
    t = t.detach()
    if t.dtype == torch.bfloat16:
        # Bit-cast both ways, so that no DLPack bfloat16 support is needed on either side.
        return cupy.from_dlpack(_NoSyncExport(t.view(torch.int16))).view(_BF16)
    return cupy.from_dlpack(_NoSyncExport(t))


class TorchAllocator:
    """A CuPy allocator that hands out ``torch.empty`` memory on one device.

    Each CuPy allocation owns its torch buffer (``UnownedMemory(owner=buffer)``); the buffer goes
    back to torch's caching allocator when CuPy drops the last array using it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers = weakref.WeakValueDictionary()  # data pointer -> torch buffer

    def __call__(self, size: int):
        import cupy
        buffer = torch.empty(max(int(size), 1), dtype=torch.uint8, device=self.device)
        pointer = buffer.data_ptr()
        self._buffers[pointer] = buffer
        memory = cupy.cuda.UnownedMemory(pointer, int(size), buffer, self.device.index)
        return cupy.cuda.MemoryPointer(memory, 0)

    def to_torch(self, a) -> torch.Tensor:
        """The torch tensor for a CuPy array: a view of its buffer when this allocator made it."""
        buffer = self._buffers.get(a.data.mem.ptr)
        dtype = torch_dtype(a.dtype)
        itemsize = a.dtype.itemsize
        offset = a.data.ptr - (buffer.data_ptr() if buffer is not None else 0)
        if (buffer is None or offset % itemsize
                or any(stride % itemsize or stride < 0 for stride in a.strides)):
            return _from_cupy_dlpack(a)
        result = torch.empty((0,), dtype=dtype, device=self.device)
        result.set_(buffer.untyped_storage(), offset // itemsize, tuple(a.shape),
                    tuple(stride // itemsize for stride in a.strides))
        return result


def _from_cupy_dlpack(a) -> torch.Tensor:
    """DLPack import of a CuPy array (bfloat16 through an int16 bit-cast)."""
    if a.dtype == _BF16:
        return torch.from_dlpack(a.view(numpy.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


_streams = threading.local()


def _cupy_stream(stream: torch.cuda.Stream, device_index: int):
    """A CuPy stream object for torch's ``stream`` (cached per thread by handle)."""
    import cupy
    cache = getattr(_streams, "cache", None)
    if cache is None:
        cache = _streams.cache = {}
    key = (device_index, stream.cuda_stream)
    wrapped = cache.get(key)
    if wrapped is None:
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if stream.cuda_stream == 0:  # torch's default stream is CUDA's legacy default stream
            wrapped = cupy.cuda.Stream.null
        elif from_external is not None and hasattr(stream, "__cuda_stream__"):
            wrapped = from_external(stream)
        else:
            wrapped = cupy.cuda.ExternalStream(stream.cuda_stream, device_index)
        cache[key] = wrapped
    return wrapped


@contextlib.contextmanager
def cuda_scope(device: torch.device):
    """Run CuPy on ``device``, on torch's current stream, allocating through torch.

    Yields the ``TorchAllocator`` in use, whose ``to_torch`` turns CuPy results into tensors.
    """
    import cupy
    index = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device("cuda", index)
    with torch.cuda.device(index), cupy.cuda.Device(index):
        stream = _cupy_stream(torch.cuda.current_stream(index), index)
        allocator = TorchAllocator(device)
        with stream, cupy.cuda.using_allocator(allocator):
            yield allocator


@contextlib.contextmanager
def core_scope(device: torch.device):
    """Where the core runs for tensors on ``device``: yields ``(to_core, to_torch)``, how tensors
    cross to the core's arrays (CuPy on CUDA, inside ``cuda_scope``; NumPy on the CPU) and how
    the core's new arrays come back as tensors."""
    if device.type == "cuda":
        with cuda_scope(device) as allocator:
            yield to_cupy, allocator.to_torch
    elif device.type == "cpu":
        yield to_numpy, from_numpy
    else:
        raise ValueError(f"cuflash runs on CUDA and CPU tensors, got a tensor on {device}")
