"""What every kernel launch needs: element types, padded head dims, alignment, argument structs."""

from __future__ import annotations

import functools

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


def vector_aligned(arrays, widths=()) -> bool:
    """True when 16-byte loads/stores are legal on every array: aligned base pointers, leading
    strides in whole 16-byte units, and row widths (head dims, in elements of the first array)
    that end on a 16-byte boundary; no widths for kernels whose partial copies zero-fill."""
    for x in arrays:
        if x.data.ptr % 16:
            return False
        if any((s * x.itemsize) % 16 for s in element_strides(x)[:-1]):
            return False
    itemsize = arrays[0].itemsize
    return all((w * itemsize) % 16 == 0 for w in widths)


def stride_fields(names, arrays) -> dict:
    """``{name_sb, name_sh, name_sn}`` element strides of 4-D (B, H, N, D) arrays, as the
    argument structs name them."""
    fields = {}
    for name, x in zip(names, arrays):
        sb, sh, sn, _ = element_strides(x)
        fields.update({f"{name}_sb": sb, f"{name}_sh": sh, f"{name}_sn": sn})
    return fields


def check_grid(blocks: int, what: str) -> int:
    """`blocks` if one 1-D launch can hold them, else a ValueError naming the kernel."""
    if blocks >= 2**31:
        raise ValueError(f"problem too large for one launch of {what}: {blocks} thread blocks "
                         "(limit 2**31 - 1)")
    return blocks


@functools.lru_cache(maxsize=None)
def _compute_capability(device_id: int) -> str:
    import cupy

    return cupy.cuda.Device(device_id).compute_capability


def on_hopper(x) -> bool:
    """Whether CuPy array `x` lives on a compute-capability 9.0 device (looked up once per device)."""
    return _compute_capability(x.device.id) == "90"


def make_struct_dtype(fields) -> numpy.dtype:
    """A NumPy structured dtype with the C layout of a kernel's argument struct."""
    return numpy.dtype([(name, kind) for name, kind in fields], align=True)


def pack_struct(dtype: numpy.dtype, **values) -> numpy.ndarray:
    """One argument struct, passed to the kernel by value: CuPy sends a size-1 structured
    array's bytes as the parameter. The record is handed over as one opaque field of the same
    size and alignment, because CuPy inspects every field of a structured argument on each
    launch, which cost tens of microseconds per call for these 30–50-field structs."""
    missing = set(dtype.names) - set(values)
    if missing:
        raise KeyError(f"kernel arguments missing: {sorted(missing)}")
    record = numpy.array([tuple(values[name] for name in dtype.names)], dtype=dtype)
    return record.view(_opaque(dtype.itemsize))


@functools.lru_cache(maxsize=None)
def _opaque(itemsize: int) -> numpy.dtype:
    if itemsize % 8:
        raise ValueError(f"argument structs are 8-byte aligned; got {itemsize} bytes")
    return numpy.dtype([("bytes", numpy.uint64, (itemsize // 8,))])


def pointer(x) -> int:
    return 0 if x is None else int(x.data.ptr)


LOG2E = 1.4426950408889634

# The argument struct of both forward kernels (FwdArgs in flash_fwd.cu, Sm90FwdArgs in
# flash_fwd_sm90.cu: same layout, checked there with a static_assert on its size).
FWD_ARGS = make_struct_dtype(
    [("q", PTR), ("k", PTR), ("v", PTR), ("o", PTR), ("lse", PTR), ("tile_ptr", PTR), ("tile_idx", PTR)]
    + [(f"{t}_s{a}", I64) for t in "qkvo" for a in "bhn"]
    + [(n, I32) for n in ("nq", "nk", "d", "dv", "heads", "group", "m_tiles", "mask_heads")]
    + [("scale_log2", F32)]
)


def forward_args(q, k, v, out, lse, *, scale, block_mask, tile_m, tile_n):
    """The forward kernels' argument struct for 4-D views, and the grid size (thread blocks):
    one block per `tile_m` query rows of each (batch, head). With a block mask, its CSR refined
    to (tile_m, tile_n) tiles."""
    batch, heads, nq, d = q.shape
    kv_heads, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    m_tiles = -(-nq // tile_m)
    blocks = check_grid(m_tiles * heads * batch, "the forward kernel")
    tile_ptr = tile_idx = None
    if block_mask is not None:
        csr = block_mask.device_csr(tile_m, tile_n)
        tile_ptr, tile_idx = csr.row_ptr, csr.col_idx
    args = pack_struct(
        FWD_ARGS,
        q=pointer(q), k=pointer(k), v=pointer(v), o=pointer(out), lse=pointer(lse),
        tile_ptr=pointer(tile_ptr), tile_idx=pointer(tile_idx), **stride_fields("qkvo", (q, k, v, out)),
        nq=nq, nk=nk, d=d, dv=dv, heads=heads, group=heads // kv_heads, m_tiles=m_tiles,
        mask_heads=int(block_mask is not None and block_mask.num_heads is not None),
        scale_log2=scale * LOG2E,
    )
    return args, blocks
