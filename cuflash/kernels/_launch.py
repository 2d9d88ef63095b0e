"""What every kernel launch needs: element types, padded head dims, alignment, argument structs."""

from __future__ import annotations

import numpy

MAX_HEAD_DIM = 256
HEAD_DIM_STEP = 32  # head dims are padded inside the kernel to a multiple of this

# Pointers travel as uint64, strides as int64 (in elements), sizes as int32, scalars as float32.
PTR, I64, I32, F32 = numpy.uint64, numpy.int64, numpy.int32, numpy.float32


def element_type(dtype) -> str:
    """The kernel's element tag for a 16-bit dtype."""
    name = dtype if isinstance(dtype, str) else numpy.dtype(dtype).name
    if name == "float16":
        return "f16_t"
    if name == "bfloat16":
        return "bf16_t"
    raise TypeError(f"the tensor-core kernels take float16 or bfloat16, not {name}")


def padded_head_dim(d: int, what: str) -> int:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"the GPU kernels support {what} from 1 to {MAX_HEAD_DIM}; got {what}={d}"
        )
    return -(-d // HEAD_DIM_STEP) * HEAD_DIM_STEP


def element_strides(x) -> tuple[int, ...]:
    return tuple(s // x.itemsize for s in x.strides)


def vector_aligned(arrays, widths) -> bool:
    """True when 16-byte loads/stores are legal on every array: aligned base pointers, leading
    strides in whole 16-byte units, and row widths (head dims) that end on a 16-byte boundary."""
    for x in arrays:
        if x.data.ptr % 16:
            return False
        if any((s * x.itemsize) % 16 for s in element_strides(x)[:-1]):
            return False
    return all((w * 2) % 16 == 0 for w in widths)


def make_struct_dtype(fields) -> numpy.dtype:
    """A NumPy structured dtype with the C layout of a kernel's argument struct."""
    return numpy.dtype([(name, kind) for name, kind in fields], align=True)


def pack_struct(dtype: numpy.dtype, **values) -> numpy.ndarray:
    """One argument struct, passed to the kernel by value (CuPy sends a size-1 structured array's
    bytes as the parameter)."""
    missing = set(dtype.names) - set(values)
    if missing:
        raise KeyError(f"kernel arguments missing: {sorted(missing)}")
    record = numpy.zeros(1, dtype=dtype)
    for name, value in values.items():
        record[name] = value
    return record


def pointer(x) -> int:
    return 0 if x is None else int(x.data.ptr)
