"""Tensors to arrays and back, without copies, on torch's stream and torch's memory.

CPU tensors become NumPy views (``Tensor.numpy()``; bfloat16 and float8 through an integer
bit-cast, since NumPy knows them only as ``ml_dtypes`` types). CUDA tensors become CuPy views of their
memory (``to_cupy``), through DLPack for dtypes without a CuPy twin here. Inside ``cuda_scope``
CuPy runs on torch's current stream and every CuPy allocation
(results cuflash allocates itself, scratch buffers of the kernels) is a ``torch.empty`` buffer, so
the memory shows in ``torch.cuda.memory_allocated`` and is recorded by a CUDA graph capture; a CuPy
array allocated there comes back to torch as a view of that buffer, whatever its dtype.
"""

import contextlib
import threading

import ml_dtypes
import numpy
import torch

from ..kernels._launch import cupy_module, external_stream

_BF16 = numpy.dtype(ml_dtypes.bfloat16)

_NUMPY_OF_TORCH = {
    torch.float16: numpy.dtype(numpy.float16),
    torch.float32: numpy.dtype(numpy.float32),
    torch.float64: numpy.dtype(numpy.float64),
    torch.bfloat16: _BF16,
}
_TORCH_OF_NUMPY = {v: k for k, v in _NUMPY_OF_TORCH.items()}

# CPU tensors of these dtypes cross to NumPy as a bit-cast: (torch dtype of the same size, the
# ml_dtypes type). cuflash computes in no float8 type, but as arrays of their own dtype they meet
# the core's dtype rule, which names the argument, rather than torch's refusal to convert them.
_BIT_CASTS = {torch.bfloat16: (torch.int16, _BF16), **{
    getattr(torch, name): (torch.uint8, numpy.dtype(getattr(ml_dtypes, name)))
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, name) and hasattr(ml_dtypes, name)}}


def torch_dtype(dtype) -> torch.dtype:
    dtype = numpy.dtype(dtype)
    try:
        return _TORCH_OF_NUMPY[dtype]
    except KeyError:
        raise TypeError(f"no torch dtype for {dtype}") from None


def numpy_dtype(dtype: torch.dtype) -> numpy.dtype:
    """The NumPy dtype that a tensor of ``dtype`` crosses to the core as (``to_numpy``), read
    from the dtype alone; a void dtype of its size for one NumPy has no twin for."""
    if dtype in _NUMPY_OF_TORCH:
        return _NUMPY_OF_TORCH[dtype]
    if dtype in _BIT_CASTS:
        return _BIT_CASTS[dtype][1]
    try:
        return numpy.dtype(str(dtype).removeprefix("torch."))
    except TypeError:
        return numpy.dtype(f"V{dtype.itemsize}")


# ----------------------------------------------------------------------------- CPU

def to_numpy(t: torch.Tensor) -> numpy.ndarray:
    """A NumPy view of a CPU tensor (no copy, any strides)."""
    t = t.detach()
    cast = _BIT_CASTS.get(t.dtype)
    if cast is not None:
        return t.view(cast[0]).numpy().view(cast[1])
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
    cupy = cupy_module()
    dtype = _VIEWABLE.get(t.dtype)
    if dtype is not None:
        numel = t.numel()
        if numel and t.is_contiguous():  # the common case: CuPy's C strides, no span to add up
            span, strides = numel * dtype.itemsize, None
        else:
            itemsize = dtype.itemsize
            strides = tuple(itemsize * s for s in t.stride())
            # Bytes from the first element to one past the last (torch strides are never negative).
            span = 0 if numel == 0 else itemsize + sum((n - 1) * s for n, s in zip(t.shape, strides))
        memory = cupy.cuda.UnownedMemory(t.data_ptr(), span, t, t.get_device())
        return cupy.ndarray(tuple(t.shape), dtype, cupy.cuda.MemoryPointer(memory, 0), strides)
    t = t.detach()
    if t.dtype == torch.bfloat16:
        # Bit-cast both ways, so that no DLPack bfloat16 support is needed on either side.
        return cupy.from_dlpack(_NoSyncExport(t.view(torch.int16))).view(_BF16)
    return cupy.from_dlpack(_NoSyncExport(t))


class _TorchBuffer:
    """The owner of one CuPy allocation made by ``TorchAllocator``: its ``torch.empty`` bytes. The
    type marks the allocations whose arrays ``to_torch`` can view without DLPack."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor


class TorchAllocator:
    """A CuPy allocator that hands out ``torch.empty`` memory on one device.

    Each CuPy allocation owns its torch buffer (``UnownedMemory(owner=_TorchBuffer)``); the buffer
    goes back to torch's caching allocator when CuPy drops the last array using it.
    """

    __slots__ = ("device", "index")

    def __init__(self, device: torch.device):
        self.device = device
        self.index = device.index

    def __call__(self, size: int):
        cupy = cupy_module()
        buffer = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        memory = cupy.cuda.UnownedMemory(buffer.data_ptr(), size, _TorchBuffer(buffer), self.index)
        return cupy.cuda.MemoryPointer(memory, 0)

    def to_torch(self, a) -> torch.Tensor:
        """The torch tensor for a CuPy array: a view of its buffer when this allocator made it
        (any allocator of this kind: the buffer says where it lives)."""
        memory = a.data.mem
        owner = getattr(memory, "_owner", None)
        if owner.__class__ is not _TorchBuffer:
            return _from_cupy_dlpack(a)
        buffer = owner.tensor
        dtype = torch_dtype(a.dtype)
        itemsize = a.dtype.itemsize
        offset = a.data.ptr - memory.ptr
        if (buffer.numel() % itemsize or offset % itemsize
                or any(stride % itemsize or stride < 0 for stride in a.strides)):
            return _from_cupy_dlpack(a)
        strides = tuple(stride // itemsize for stride in a.strides)
        return buffer.view(dtype).as_strided(a.shape, strides, offset // itemsize)


def _from_cupy_dlpack(a) -> torch.Tensor:
    """DLPack import of a CuPy array (bfloat16 through an int16 bit-cast)."""
    if a.dtype == _BF16:
        return torch.from_dlpack(a.view(numpy.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


def current_raw_stream(index: int) -> int:
    """The handle of torch's current stream on device ``index`` (0: the legacy default stream),
    without making a ``torch.cuda.Stream`` object (3 µs per call on an H200 host)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


class _PerThread(threading.local):
    """Per thread: CuPy stream objects by (device, torch stream handle), and one
    ``TorchAllocator`` per device (it holds no state of its own)."""

    def __init__(self):
        self.streams = {}
        self.allocators = {}


_per_thread = _PerThread()


def _cupy_stream(handle: int, index: int):
    """The CuPy stream object for torch's stream ``handle`` on device ``index``."""
    key = (index, handle)
    wrapped = _per_thread.streams.get(key)
    if wrapped is None:
        cupy = cupy_module()
        # torch's default stream is CUDA's legacy default stream (handle 0)
        wrapped = cupy.cuda.Stream.null if handle == 0 else external_stream(handle, index)
        _per_thread.streams[key] = wrapped
    return wrapped


def _allocator(index: int) -> TorchAllocator:
    allocator = _per_thread.allocators.get(index)
    if allocator is None:
        allocator = _per_thread.allocators[index] = TorchAllocator(torch.device("cuda", index))
    return allocator


class cuda_scope:
    """Run CuPy on ``device``, on torch's current stream, allocating through torch.

    Entering gives the ``TorchAllocator`` in use, whose ``to_torch`` turns CuPy results into
    tensors. A class rather than a generator, and switching devices only when the current one
    differs: a small call enters it once or twice, and each microsecond counts there.
    """

    __slots__ = ("_index", "_exits")

    def __init__(self, device: torch.device):
        self._index = device.index if device.index is not None else torch.cuda.current_device()

    def __enter__(self) -> TorchAllocator:
        cupy = cupy_module()
        index = self._index
        exits = []
        try:
            # torch and CuPy both follow the CUDA runtime's current device
            if torch.cuda.current_device() != index or cupy.cuda.runtime.getDevice() != index:
                for scope in (torch.cuda.device(index), cupy.cuda.Device(index)):
                    scope.__enter__()
                    exits.append(scope.__exit__)
            stream = _cupy_stream(current_raw_stream(index), index)
            stream.__enter__()
            exits.append(stream.__exit__)
            allocator = _allocator(index)
            using = cupy.cuda.using_allocator(allocator)
            using.__enter__()
            exits.append(using.__exit__)
        except BaseException:
            self._exits = exits
            self.__exit__(None, None, None)
            raise
        self._exits = exits
        return allocator

    def __exit__(self, *exc):
        exits, self._exits = self._exits, ()
        for leave in reversed(exits):
            leave(*exc)
        return False


class _CudaCoreScope(cuda_scope):
    __slots__ = ()

    def __enter__(self):
        return to_cupy, super().__enter__().to_torch


_CPU_SCOPE = contextlib.nullcontext((to_numpy, from_numpy))


def core_scope(device: torch.device):
    """Where the core runs for tensors on ``device``: a context giving ``(to_core, to_torch)``,
    how tensors cross to the core's arrays (CuPy on CUDA, inside ``cuda_scope``; NumPy on the
    CPU) and how the core's new arrays come back as tensors."""
    if device.type == "cuda":
        return _CudaCoreScope(device)
    if device.type == "cpu":
        return _CPU_SCOPE
    raise ValueError(f"cuflash runs on CUDA and CPU tensors, got a tensor on {device}")
