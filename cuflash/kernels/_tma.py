"""TMA descriptors (CUtensorMap) for the Hopper kernels, encoded on the host through the driver.

A kernel that copies with TMA takes one 128-byte descriptor per tensor by value. This module
encodes them for 4-D (B, H, N, D) views of 16-bit arrays, boxes of ``box_rows`` rows × 64
columns in the 128-byte swizzle the wgmma operand tiles use; elements outside the tensor arrive
as zeros. The driver function is called through ctypes: it is part of every NVIDIA driver
(``libcuda.so.1``), so nothing beyond CuPy is needed.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy

from ._launch import by_value

BOX_COLUMNS = 64           # 64 16-bit values: one 128-byte swizzled row
_DESCRIPTOR_BYTES = 128
_MAX_STRIDE = 1 << 40      # the driver's limit on a global stride, in bytes
_MAX_DIM = 1 << 32

# CUtensorMap enums (cuda.h)
_DATA_TYPE = {"float16": 6, "bfloat16": 9}
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_ZEROS = 0


def tma_view(x):
    """The 4-D (B, H, N, D) view TMA describes: the array itself, or a varlen call's packed
    (total, H, D) array as one batch of `total` rows (the kernels add each sequence's first row
    to their row coordinates)."""
    return x.transpose(1, 0, 2)[None] if x.ndim == 3 else x


def why_not_expressible(x) -> str | None:
    """None when a 4-D view can be described to TMA, else the reason: the driver wants a
    contiguous last axis, no empty axis (a packed call without keys, say), a 16-byte aligned base
    and leading strides that are positive multiples of 16 bytes (a stride-0 broadcast axis cannot
    be described)."""
    if x.ndim != 4 or x.strides[3] != x.itemsize:
        return "TMA needs a contiguous last axis"
    if 0 in x.shape:
        return "TMA cannot describe an empty axis"
    if x.data.ptr % 16:
        return "TMA needs a 16-byte aligned base pointer"
    for size, stride in zip(x.shape[:3], x.strides[:3]):
        if size > 1 and (stride <= 0 or stride % 16 or stride >= _MAX_STRIDE):
            return "TMA needs positive leading strides in whole 16-byte units (no broadcast axes)"
    if any(n >= _MAX_DIM for n in x.shape):
        return "TMA takes dimensions below 2**32"
    return None


@functools.lru_cache(maxsize=1)
def _encode_function():
    function = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return function


@dataclass(frozen=True)
class TensorLayout:
    """All that a descriptor of a 4-D view (B, H, N, D) holds besides its address, for boxes of
    ``box_rows`` × 64 elements: checked once (``of``), then ``descriptor(address)`` per call.
    Box coordinates are (column, row, head, batch)."""

    shape: tuple
    byte_strides: tuple
    dtype_name: str
    box_rows: int

    @classmethod
    def of(cls, x, box_rows: int) -> "TensorLayout":
        reason = why_not_expressible(x)
        if reason:
            raise ValueError(reason)
        return cls(tuple(x.shape), tuple(x.strides), x.dtype.name, box_rows)

    def descriptor(self, address: int) -> numpy.ndarray:
        """The 16 uint64 words of the descriptor for data at ``address`` (read-only)."""
        return numpy.frombuffer(self.descriptor_bytes(address), dtype=numpy.uint64)

    def descriptor_bytes(self, address: int) -> bytes:
        """The descriptor for data at ``address`` as the 128 bytes a launch copies into its
        parameters (shared between calls)."""
        return _encode(address, self.shape, self.byte_strides, self.dtype_name, self.box_rows)


# A descriptor is a pure function of these: calls that reuse their buffers (training loops over
# a caching allocator) skip the driver call.
@functools.lru_cache(maxsize=256)
def _encode(address: int, shape, byte_strides, dtype_name: str, box_rows: int) -> bytes:
    batch, heads, rows, cols = shape
    # Axes of size 1 are never stepped along; any legal stride describes them.
    strides = [s if n > 1 else 16 for n, s in zip((rows, heads, batch), byte_strides[2::-1])]
    dims = (ctypes.c_uint64 * 4)(cols, rows, heads, batch)
    strides_in_bytes = (ctypes.c_uint64 * 3)(*strides)
    box = (ctypes.c_uint32 * 4)(BOX_COLUMNS, box_rows, 1, 1)
    element_strides = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    # CUtensorMap must be 64-byte aligned: over-allocate and align by hand.
    raw = ctypes.create_string_buffer(_DESCRIPTOR_BYTES + 64)
    aligned = (ctypes.addressof(raw) + 63) & ~63
    status = _encode_function()(
        aligned, _DATA_TYPE[dtype_name], 4, address, dims, strides_in_bytes, box, element_strides,
        _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZEROS)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {status} for shape "
                           f"{shape}, strides {byte_strides}, box {box_rows}x{BOX_COLUMNS}")
    return ctypes.string_at(aligned, _DESCRIPTOR_BYTES)


@functools.lru_cache(maxsize=None)
def descriptors_dtype(count: int) -> numpy.dtype:
    """A kernel parameter of `count` descriptors: 64-byte aligned as CUtensorMap requires (CuPy
    places a structured argument at its dtype's alignment)."""
    import cupy

    return cupy.make_aligned_dtype(
        numpy.dtype({"names": ["bits"], "formats": [(numpy.uint64, (16 * count,))]}), alignment=64)


def pack(descriptors) -> numpy.void:
    """Descriptors as one by-value kernel argument (a struct of TmaDesc in csrc/arch/sm90_tma.cuh)."""
    record = numpy.frombuffer(b"".join(descriptors), descriptors_dtype(len(descriptors)))
    return by_value(record)
