"""What every kernel launch needs: element types, padded head dims, alignment, argument structs."""

from __future__ import annotations

import contextlib
import functools
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy

from . import _build
from .. import _dropout
from .._mask import LOG2E

MAX_HEAD_DIM = 256
HEAD_DIM_STEP = 32  # head dims are padded inside the kernel to a multiple of this

# Pointers travel as uint64, strides as int64 (in elements), sizes as int32, scalars as float32.
PTR, I64, I32, F32, U32 = numpy.uint64, numpy.int64, numpy.int32, numpy.float32, numpy.uint32


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


def padded_head_dims(spec) -> tuple[int, int]:
    """The call's head dims D and Dv padded as the kernels hold them."""
    return (padded_head_dim(spec.shapes.d, "head dim D"),
            padded_head_dim(spec.shapes.dv, "value head dim Dv"))


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
    argument structs name them. A varlen call's packed (total, H, D) arrays get batch stride 0:
    the kernels find each sequence's rows through the offsets (csrc/schedule.cuh, sequence_of)."""
    fields = {}
    for name, x in zip(names, arrays):
        if x.ndim == 3:
            sb, (sn, sh, _) = 0, element_strides(x)
        else:
            sb, sh, sn, _ = element_strides(x)
        fields.update({f"{name}_sb": sb, f"{name}_sh": sh, f"{name}_sn": sn})
    return fields


def varlen_values(spec) -> dict:
    """The argument fields of packed variable-length sequences (``cu_q``, ``cu_k`` are pointers
    filled per call, see forward_call_values): ``total_q`` (lse's head stride), 0 for a dense
    call."""
    return {"total_q": 0 if spec.varlen is None else spec.varlen.total_q}


def varlen_pointers(spec) -> tuple[int, int]:
    """The device offsets (cu_q, cu_k) of a varlen call, (0, 0) for a dense one."""
    if spec.varlen is None:
        return 0, 0
    return pointer(spec.varlen.cu_q), pointer(spec.varlen.cu_k)


# At least the keys of any family's key tile: a dense call's key tiles are counted in int32 as
# (Nk + tile − 1) / tile (csrc/schedule.cuh, key_tiles_of).
KEY_TILE_BOUND = 256


def why_not_lengths(spec) -> str | None:
    """The reason no kernel takes a call whose query and key counts add up to 2**31 or more
    (None for any other call): the kernels hold Nq and Nk in int32 and their band arithmetic
    (csrc/mask.cuh: ``row + shift + right + 1``, ``key − shift + left + 1``) reaches Nq + Nk.
    For packed sequences, whose band sides are cut to the longest sequence's bound and the rows
    in all (``AttentionSpec.band_extent``), the sum of those. A dense call's keys plus a key
    tile's padding must stay below 2**31 too (a call with very few query rows could pass the
    first rule with them); packed calls' tiles have ``_why_not_packed_tiles``."""
    nq, nk = spec.band_extent()
    if nq + nk >= 2**31:
        what = "Nq + Nk" if spec.varlen is None else "min(max_seqlen_q, total_q) + min(max_seqlen_k, total_k)"
        return f"counts query rows and keys in int32: {what} must be below 2**31, got {nq:,} and {nk:,}"
    if spec.varlen is None and nk + KEY_TILE_BOUND - 1 >= 2**31:
        return (f"counts key tiles in int32: Nk plus a key tile's padding ({KEY_TILE_BOUND - 1}) must "
                f"be below 2**31, got {nk:,}")
    return None


def why_not_tile_rows(spec, tile_m: int, tile_n: int) -> str | None:
    """The reason a family whose query tiles hold `tile_m` rows and key tiles `tile_n` keys
    cannot take a call whose tiles reach past int32 (None for any other call). Dense calls: its
    kernels count a tile's rows in int32 up to the tile's end, padding rows included, so Nq
    rounded up to whole tiles must not pass 2**31. Tiles of a power of two rows never do (2**31
    is a whole number of them, and ``why_not_lengths`` keeps Nq below it); the Hopper TMA
    forward's 192-row tiles can. Packed sequences: ``_why_not_packed_tiles``."""
    if spec.varlen is not None:
        return _why_not_packed_tiles(spec.varlen, tile_m, tile_n)
    nq = spec.band_extent()[0]
    end = -(-nq // tile_m) * tile_m
    if end <= 2**31:
        return None
    return (f"counts query rows in int32 up to the end of its {tile_m}-row query tiles: Nq "
            f"rounded up to them must not pass 2**31, got {end:,}")


def _why_not_packed_tiles(varlen, tile_m: int, tile_n: int) -> str | None:
    """A packed call's reason for ``why_not_tile_rows``. The kernels that cut each sequence into
    its own tiles (the Hopper TMA forward's query tiles, its key tiles' count, the warp-specialised
    dK/dV kernel's key tiles) form in int32 a tile's rows in the packed (total, H, D) arrays,
    the sequence's first row plus the tile's, for tiles up to one past the sequence's end, and
    the sequence's rows rounded up to whole tiles (n + tile − 1). For any sequence those stay
    within the packed rows plus a tile's padding, total + tile − 1, which must be below 2**31:
    the host knows the totals, not where each sequence starts (the offsets stay on the
    device)."""
    for rows, total, tile, unit in (("q", varlen.total_q, tile_m, "query"),
                                    ("k", varlen.total_k, tile_n, "key")):
        if total + tile - 1 >= 2**31:
            return (f"counts packed rows in int32 up to a tile past a sequence's end: total_{rows} "
                    f"plus a {tile}-row {unit} tile's padding ({tile - 1}) must be below 2**31, "
                    f"got {total + tile - 1:,}")
    return None


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


@functools.lru_cache(maxsize=None)
def sm_count(device_id: int) -> int:
    """Streaming multiprocessors of a device (looked up once per device)."""
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]


@functools.lru_cache(maxsize=None)
def shared_limit(device_id: int) -> int:
    """The most shared memory one thread block of a device may take (its opt-in limit: 227 KiB
    on Hopper, 163 KiB on the A100, 99 KiB on compute capability 8.6 and 8.9), looked up once
    per device. The families pick tiles that fit it, or pass the call on."""
    from cupy.cuda import runtime

    return int(runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id))


# The waves of thread blocks (or a persistent grid's tiles per resident block) at the end of a
# grid whose lanes start tile by tile (tail_lanes).
TAIL_WAVES = 2


def tail_lanes(spec, lanes: int, tiles_per_lane: int, resident_blocks: int) -> int:
    """How many of a grid's last lanes start tile by tile across them (schedule.cuh,
    ``lane_tile_at``): the grid of the Hopper forward (query tiles), of the warp-specialised
    dK/dV kernel (key tiles) or of the warp-specialised dQ kernel of the 256-column tile (query
    tiles), `lanes` (batch, head) pairs of `tiles_per_lane` tiles, each lane's tiles next to each
    other (the blocks running side by side then share its K/V, or Q and dO, in L2), its heaviest
    tile first. Under a band bounded on the right alone (causal, a window (-1, w)) a lane's tiles
    run from heavy to light, so in lane order the grid would end on the last lanes' heaviest
    tiles, started once the rest of the GPU was already at work: the lanes of about the last
    TAIL_WAVES waves of `resident_blocks` blocks then go tile by tile (every one's first tile,
    then every one's second...), and the grid ends on light tiles. 0 (lane order) otherwise: a
    lane's tiles weigh alike without such a band, or as a block or exact mask has them; packed
    sequences weigh by their lengths; dropout was not measured with it."""
    if (not spec.right_bounded_alone or spec.sparse or spec.exact or spec.varlen is not None
            or spec.has_dropout):
        return 0
    return min(lanes, -(-TAIL_WAVES * resident_blocks // tiles_per_lane))


def why_not_device(x) -> str | None:
    """None for CuPy array `x` on a device of compute capability 8.0 or newer, which every
    kernel needs (cp.async, bfloat16 mma.sync), else the reason a family cannot take it: asked of
    the arrays' device, not the current one."""
    capability = _compute_capability(x.device.id)
    if int(capability) >= 80:
        return None
    return (f"needs compute capability 8.0 or newer; device {x.device.id} has "
            f"{_build.capability_text(capability)}")


def on_hopper(x) -> bool:
    """Whether CuPy array `x` lives on a compute-capability 9.0 device (looked up once per device)."""
    return _compute_capability(x.device.id) == "90"


def why_not_16bit(spec) -> str | None:
    """None for a float16/bfloat16 call whose lengths the kernels can count (``why_not_lengths``),
    else the reason a tensor-core family cannot take it."""
    if spec.dtype.name not in ("float16", "bfloat16"):
        return f"takes float16/bfloat16, not {spec.dtype.name}"
    return why_not_lengths(spec)


def why_not_16bit_tiled(spec, tiles_for) -> str | None:
    """None for a float16/bfloat16 call that ``tiles_for(spec)`` finds tiles for, else the
    reason (``tiles_for`` raises ValueError naming what no tile shape fits). The sm80 families
    that use it draw the dropout mask (over packed sequences too: the sequence is the mask's
    batch index, its rows and keys counted within it, as ``cuflash.cpu`` draws it)."""
    reason = why_not_16bit(spec)
    if reason:
        return reason
    try:
        tiles_for(spec)
    except ValueError as error:
        return str(error)
    return None


def why_not_dropout(spec) -> str | None:
    """The reason a family without dropout (the Hopper wgmma forward, float32) gives for a call
    with dropout (None for any other call): only the kernels that include csrc/dropout.cuh draw
    the mask of ``cuflash._dropout``, so the registry passes such a call on to them."""
    if not spec.has_dropout:
        return None
    return (f"dropout (dropout_p={spec.dropout_p:g}) runs in the sm80-mma, sm90-tma forward and "
            f"sm90-wgmma backward kernels only")


def why_not_varlen(spec, family: str) -> str | None:
    """The reason a family without packed variable-length sequences cannot take a varlen call
    (None for any other call)."""
    return None if spec.varlen is None else packed_unsupported(family)


def packed_unsupported(family: str) -> str:
    """The reason a family without packed variable-length sequences gives for them."""
    return (f"packed variable-length sequences (attention_varlen) are not implemented in the "
            f"{family} kernels")


def why_not_hopper_16bit(spec, x) -> str | None:
    """None for a float16/bfloat16 call on a compute-capability 9.0 device (array `x`'s), else
    the reason a Hopper family cannot take it."""
    if not on_hopper(x):
        return "needs compute capability 9.0 (Hopper)"
    return why_not_16bit(spec)


def make_struct_dtype(fields) -> numpy.dtype:
    """A NumPy structured dtype with the C layout of a kernel's argument struct."""
    return numpy.dtype([(name, kind) for name, kind in fields], align=True)


def by_value(record: numpy.ndarray) -> numpy.void:
    """A packed 1-element record as the kernel argument CuPy passes by value most cheaply: its
    NumPy scalar. CuPy (cupy/cuda/function.pyx, ``_pointer``) copies a scalar's bytes once
    (``CScalar``), while a size-1 array goes through its ``__array_interface__``, which spells
    out a structured dtype on every launch (about 3 µs per argument). Both send the same bytes.
    Every launcher hands its structs to CuPy through here."""
    return record[0]


def pack_struct(dtype: numpy.dtype, **values) -> numpy.void:
    """One argument struct, passed to the kernel by value (``by_value``). The record is handed
    over as one opaque field of the same size and alignment, because CuPy inspects every field
    of a structured argument on each launch, which cost tens of microseconds per call for these
    30–50-field structs."""
    return PackedArgs(dtype, (), values).pack(())


class PackedArgs:
    """An argument struct packed once, of which each launch re-fills only the fields that change
    from call to call: the data pointers and dropout's seed words (``call_fields``).

    Everything else depends on the call's layout and options alone (sizes, strides, masks), so a
    prepared launch packs it once (``packed``); ``write_call_values(buffer, values)`` writes the
    ``call_fields`` (uint64 pointers and uint32 words, in that order) into a buffer holding those
    bytes, and ``pack(values)`` does so into a fresh copy, as the argument CuPy's ``RawKernel``
    takes."""

    def __init__(self, dtype: numpy.dtype, call_fields, values: dict):
        call_fields = tuple(call_fields)
        missing = set(dtype.names) - set(values) - set(call_fields)
        if missing:
            raise KeyError(f"kernel arguments missing: {sorted(missing)}")
        record = numpy.zeros(1, dtype)
        for name in dtype.names:
            if name not in call_fields:
                record[name] = values[name]
        self.packed = record.tobytes()
        self._opaque = _opaque(dtype.itemsize)
        self._runs = _call_field_runs(dtype, call_fields)

    def write_call_values(self, buffer, values) -> None:
        for packer, offset, start, stop in self._runs:
            packer.pack_into(buffer, offset, *values[start:stop])

    def pack(self, values) -> numpy.void:
        buffer = bytearray(self.packed)
        self.write_call_values(buffer, values)
        return by_value(numpy.frombuffer(buffer, self._opaque))


# The per-call field kinds PackedArgs writes, by struct code: a pointer, a uint32 word.
_CALL_FIELD_CODES = {numpy.dtype(PTR): "Q", numpy.dtype(U32): "I"}


def _call_field_runs(dtype: numpy.dtype, names) -> tuple:
    """``(struct.Struct, byte offset, first, stop)`` per run of adjacent per-call fields among
    ``names`` (taken in order): one ``pack_into`` writes a whole run."""
    runs = []  # [codes, offset, first, stop, end offset]
    for index, name in enumerate(names):
        field, offset = dtype.fields[name][:2]
        code = _CALL_FIELD_CODES.get(field)
        if code is None:
            raise TypeError(f"argument {name} is neither a pointer nor a uint32 field")
        if runs and runs[-1][4] == offset:  # right after the run before
            runs[-1][0] += code
            runs[-1][3] = index + 1
        else:
            runs.append([code, offset, index, index + 1, None])
        runs[-1][4] = offset + field.itemsize
    return tuple((struct.Struct("<" + codes), offset, start, stop)
                 for codes, offset, start, stop, _ in runs)


# ---- launches through the driver

_cupy = None  # the cupy module, once a launch needs it (this module imports without CuPy)


def cupy_module():
    """The cupy module (imported at the first launch: this module imports without CuPy)."""
    global _cupy
    if _cupy is None:
        import cupy

        _cupy = cupy
    return _cupy


class _StreamHandle:
    """A raw ``cudaStream_t`` in the CUDA stream protocol, for ``cupy.cuda.Stream.from_external``."""

    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def external_stream(handle: int, device: int):
    """A CuPy stream object for the stream ``handle`` of device ``device``, made elsewhere (CuPy
    neither owns nor destroys it). CuPy 14 deprecates ``ExternalStream`` for ``from_external``,
    which CuPy 13 lacks."""
    cuda = cupy_module().cuda
    if hasattr(cuda.Stream, "from_external"):
        return cuda.Stream.from_external(_StreamHandle(handle))
    return cuda.ExternalStream(handle, device)


def new_array(shape: tuple, dtype):
    """An uninitialised C-ordered CuPy array from CuPy's current allocator: ``cupy.empty``
    without its Python wrapper, which took 0.7 of its 3.4 µs per call on the H200 host (a
    cached call allocates its outputs this way)."""
    return cupy_module().ndarray(shape, dtype)


def device_memory(nbytes: int):
    """``nbytes`` of device memory from CuPy's current allocator, as a ``MemoryPointer`` (freed
    when the last reference goes): for workspaces the kernels reach only through pointers.
    0.7 µs per call on the H200 host, where an array of the same bytes took 3.4 µs."""
    return cupy_module().cuda.alloc(nbytes)


def copy_to_device(host, stream):
    """``(array, staged)``: a new C-contiguous CuPy array holding NumPy array ``host``, copied
    asynchronously on ``stream`` from ``staged``, a pinned host copy of ``host``. The copy reads
    ``staged`` when the stream gets to it, and a CUDA graph that captured it at every replay:
    the caller keeps ``staged`` alive that long."""
    import cupyx

    staged = cupyx.empty_pinned(host.shape, host.dtype)
    staged[...] = host
    array = new_array(host.shape, host.dtype)
    if array.nbytes:
        # The runtime's copy, not ndarray.set: CuPy refuses host-to-device copies while the
        # stream captures, though a copy from pinned memory is a valid graph node.
        runtime = cupy_module().cuda.runtime
        runtime.memcpyAsync(array.data.ptr, staged.ctypes.data, array.nbytes,
                            runtime.memcpyHostToDevice, stream.ptr)
    return array, staged


def blocking_event():
    """A new CUDA event on the current device whose waiters sleep until it passes
    (``cudaEventBlockingSync``) rather than spin a core, and that keeps no time."""
    return cupy_module().cuda.Event(block=True, disable_timing=True)


# CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: a thread in this mode is held to the rules of its own
# captures only. CU_STREAM_CAPTURE_MODE_RELAXED: to none, not even those of its own captures.
_CAPTURE_MODE_THREAD_LOCAL = 1
_CAPTURE_MODE_RELAXED = 2


@functools.lru_cache(maxsize=None)
def _driver_function(name: str, *argtypes):
    """ctypes' function ``name`` of the driver library (returning a ``CUresult``), or None where
    the library or the function is missing: what CuPy does not expose."""
    import ctypes

    try:
        function = getattr(ctypes.CDLL("libcuda.so.1"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


def _cu_thread_exchange_capture_mode():
    """``cuThreadExchangeStreamCaptureMode``, or None where the driver library is missing."""
    import ctypes

    return _driver_function("cuThreadExchangeStreamCaptureMode", ctypes.POINTER(ctypes.c_int))


@contextlib.contextmanager
def capture_mode(mode: int):
    """This thread in the capture mode ``mode`` inside the block, in its own mode again after.

    A thread in the global mode (the default) may make no unsafe call (an event wait or query,
    cudaMalloc) while it captures, or while any thread captures in the global mode (torch's
    default): the call fails and invalidates the capture. The thread-local mode
    (_CAPTURE_MODE_THREAD_LOCAL) heeds only the thread's own captures; the relaxed mode
    (_CAPTURE_MODE_RELAXED) none, for a call that neither waits for the device nor needs to be
    recorded (cudaMalloc of memory kept for the life of the process)."""
    import ctypes

    exchange = _cu_thread_exchange_capture_mode()
    if exchange is None:
        yield
        return
    mode = ctypes.c_int(mode)
    exchange(ctypes.byref(mode))  # the thread's previous mode comes back in `mode`
    try:
        yield
    finally:
        exchange(ctypes.byref(mode))


def wait_for(event, device: int) -> None:
    """Block this thread, which captures nothing, until ``event`` (of device ``device``) has
    passed, in the thread-local capture mode (see ``capture_mode``). The device is made current
    too, and left so (not CuPy's ``Device`` context, whose exit sets the thread's previous
    device, 0, again): setting a device makes its context, memory on a device the program may
    never use."""
    with capture_mode(_CAPTURE_MODE_THREAD_LOCAL):
        cupy_module().cuda.runtime.setDevice(device)
        event.synchronize()


class _BoundContexts(threading.local):
    def __init__(self):
        self.devices = set()


_bound = _BoundContexts()


def launch_stream(device: int | None = None):
    """CuPy's current stream (its object) on the current device (`device`, when the caller
    has asked the runtime already), once that device's context is bound to this thread, as
    CuPy's own launches find them (``_get_stream`` and ``runtime._ensure_context`` in
    cupy/cuda/function.pyx, which Python cannot call). The runtime binds a device's primary
    context to a thread lazily, at the thread's first runtime call that needs one; a driver
    launch on a thread where none came yet would find no context. A call looks this up once,
    not per kernel, and asks the same object whether it captures."""
    cuda = cupy_module().cuda
    if device is None:
        device = cuda.runtime.getDevice()
    bind_context(device)
    return cuda.get_current_stream()


def bind_context(device: int) -> None:
    """Bind the current device's (``device``'s) primary context to this thread, once per thread
    and device (see ``launch_stream``), before a driver launch."""
    bound = _bound.devices
    if device not in bound:
        # a runtime call that needs the context, as CuPy makes
        cupy_module().cuda.runtime.memGetInfo()
        bound.add(device)


def current_stream() -> int:
    """The handle of ``launch_stream()``."""
    return launch_stream().ptr


# ---- dependent launches (programmatic dependent launch, compute capability 9.0)

# Whether the kernels of a call after its first are launched as dependents of the one before them
# where the device allows it (``dependent_launches``). Read when a prepared launch first runs:
# to compare, set it before any call (or clear the prepared calls).
DEPENDENT_LAUNCHES = True

# cuLaunchKernelEx's CUlaunchConfig (grid x, y, z; block x, y, z; dynamic shared bytes; stream;
# attribute array; attribute count) and one CUlaunchAttribute (id, then a 64-byte value union),
# as cuda.h lays them out on 64-bit hosts. A launch rewrites only the stream, which follows the
# seven sizes.
_CONFIG_SIZES = "<7I4x"
LAUNCH_CONFIG = struct.Struct(_CONFIG_SIZES + "QQI4x")
LAUNCH_ATTRIBUTE = struct.Struct("<I4xi60x")
_CONFIG_STREAM = struct.Struct("<Q")
_CONFIG_STREAM_OFFSET = struct.calcsize(_CONFIG_SIZES)
PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def dependent_launches(device: int) -> bool:
    """Whether kernels on ``device`` may be launched as programmatic dependents: on compute
    capability 9.0, where the kernels compile the waits in (csrc/arch/ptx.cuh,
    ``wait_for_previous_kernel``) and where their gain was measured, with a driver that has
    ``cuLaunchKernelEx`` (CUDA 12.0 on, found as ``libcuda.so.1``; elsewhere every kernel is
    launched the usual way)."""
    return DEPENDENT_LAUNCHES and _compute_capability(device) == "90" and launch_kernel_ex_supported()


@functools.lru_cache(maxsize=None)  # (looked up at every launch: one call, no arguments)
def _cu_launch_kernel_ex():
    """``cuLaunchKernelEx``, or None where the driver library or the function is missing."""
    import ctypes

    return _driver_function("cuLaunchKernelEx", *(ctypes.c_void_p,) * 4)


def launch_kernel_ex_supported() -> bool:
    return _cu_launch_kernel_ex() is not None


def launch_kernel_ex(config: int, function: int, kernel_params: int) -> None:
    """``cuLaunchKernelEx(config, function, kernel_params, NULL)`` (addresses), which CuPy does not
    wrap; a failure raises CuPy's ``CUDADriverError``, as its own launches do."""
    status = _cu_launch_kernel_ex()(config, function, kernel_params, None)
    if status:
        from cupy_backends.cuda.api.driver import CUDADriverError

        raise CUDADriverError(status)


class DriverLaunch:
    """One kernel launched straight through the driver (``cuLaunchKernel``, the call CuPy's
    ``RawKernel.__call__`` ends in), with its by-value parameters kept in one persistent buffer.

    CuPy converts every argument afresh on each launch (a copy of each struct into a
    ``CScalar``, a vector of pointers to them): 5-12 µs per launch with these structs on the
    H200 host. Here the parameter bytes (``params``: a writable byte memoryview per parameter,
    each 64-byte aligned as a CUtensorMap wants) and the array of pointers to them are built
    once; a call rewrites what changed in place and launches. The driver copies the parameters
    before cuLaunchKernel returns, so they can be rewritten at once for the next launch;
    ``lock`` keeps threads launching the same prepared call from rewriting them under each other
    (CuPy runs cuLaunchKernel without the GIL). ``kernel``: CuPy's RawKernel, compiled for the
    current device.

    ``dependent``: launch it as a programmatic dependent of the kernel before it in the stream
    (``cuLaunchKernelEx`` with programmatic stream serialization), where the current device
    allows it (``dependent_launches``): its blocks may then start while that kernel still runs,
    and wait for it inside (csrc/arch/ptx.cuh). Only for a kernel that waits at its start, and
    whose stream predecessor is a kernel of the same call (never the caller's work)."""

    def __init__(self, kernel, grid: int, block: int, shared: int, params, dependent: bool = False):
        self._launch_kernel = cupy_module().cuda.driver.launchKernel
        sizes = [len(p) for p in params]
        offsets = [64 * sum(-(-n // 64) for n in sizes[:i]) for i in range(len(sizes))]
        total = offsets[-1] + sizes[-1]
        self._storage = numpy.zeros(total + 64, numpy.uint8)
        base = -self._storage.ctypes.data % 64
        views = [self._storage[base + o:base + o + n] for o, n in zip(offsets, sizes)]
        for view, data in zip(views, params):
            view[:] = numpy.frombuffer(data, numpy.uint8)
        # Byte memoryviews: a slice assignment or a pack_into through one costs a fraction of
        # NumPy's.
        self.params = tuple(memoryview(view) for view in views)
        self._pointers = numpy.array([view.ctypes.data for view in views], numpy.uintp)
        self._function = kernel.kernel  # CuPy's Function: its module stays loaded while held
        # CuPy launches at least one block and one thread in each dimension; so does this.
        self._shape = (self._function.ptr, max(1, grid), 1, 1, max(1, block), 1, 1, shared)
        self._kernel_params = self._pointers.ctypes.data
        self.lock = threading.Lock()
        # ``launch(stream)``: launch on `stream` with the parameters as they are now (hold
        # ``lock`` while writing them and launching). Chosen here, once: cuLaunchKernel, or for a
        # dependent cuLaunchKernelEx with its config (and the config's one attribute), each call
        # writing its stream in.
        self.launch = self._launch
        if dependent and dependent_launches(cupy_module().cuda.runtime.getDevice()):
            config = numpy.zeros(LAUNCH_CONFIG.size + LAUNCH_ATTRIBUTE.size, numpy.uint8)
            LAUNCH_ATTRIBUTE.pack_into(config, LAUNCH_CONFIG.size, PROGRAMMATIC_STREAM_SERIALIZATION, 1)
            LAUNCH_CONFIG.pack_into(config, 0, *self._shape[1:], 0, config.ctypes.data + LAUNCH_CONFIG.size, 1)
            self._config_bytes, self._config_address = memoryview(config), config.ctypes.data  # the view holds it
            self.launch = self._launch_dependent

    def _launch(self, stream: int) -> None:
        self._launch_kernel(*self._shape, stream, self._kernel_params, 0)

    def _launch_dependent(self, stream: int) -> None:
        _CONFIG_STREAM.pack_into(self._config_bytes, _CONFIG_STREAM_OFFSET, stream)
        launch_kernel_ex(self._config_address, self._shape[0], self._kernel_params)


class _Slab:
    """32 KiB of counters (``TileCounters.SLAB``) on one device, handed out once each."""

    __slots__ = ("memory", "used", "zeroing", "zeroed")

    def __init__(self, memory: int):
        self.memory, self.used = memory, 0
        self.zeroing = None  # an event after the memset of the whole slab, when there was one
        self.zeroed = False  # that memset is known to have ended (seen outside any capture)


# cudaStreamPerThread (CU_STREAM_PER_THREAD): one handle that names each thread's own default stream
# (CuPy's Stream.ptds, every thread's current stream under CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1).
PER_THREAD_STREAM = 2


class TileCounters:
    """The counters persistent kernels draw their tiles from (``TileTickets`` in
    csrc/arch/sm90_tma.cuh): two ints that must be zero when a launch starts and that its last
    thread block sets back to zero. One counter serves every launch on a stream, since they run
    one after the other (the per-thread default stream's handle names a stream of each thread's
    own: a counter per thread). A launch captured into a CUDA graph gets a counter of its own: the
    graph's replays may run beside later launches on the stream it was captured from. Counters
    are carved from 32 KiB slabs, one at a time per device, never freed (a captured launch's
    counter lives as long as its graph may).

    A new counter must be zero before its first launch. A slab made outside a capture is zeroed
    whole on the stream that needed it, and once a later call outside any capture has seen that
    memset end, its unused counters are handed out as they are: a captured launch then needs no
    memset node of its own in the graph (one node less per persistent launch on each replay).
    Until then no other counter comes from it: that memset runs after whatever its stream had
    queued, so it could clear another stream's counter (or a captured launch's, whose graph may
    replay on any stream) in the middle of a launch, whose blocks would then never count to the
    end and leave it non-zero for the next. Those counters come from a side slab, never zeroed
    whole, as do those of slabs made during a capture: each is zeroed by a memset on its stream
    (captured with the launch when capturing)."""

    SLAB = 4096  # counters per slab

    def __init__(self):
        self._lock = threading.Lock()
        self._by_stream: dict[tuple[int, int], int] = {}
        self._per_thread = threading.local()  # its by_stream: PER_THREAD_STREAM's counters
        self._slabs: dict[int, _Slab] = {}  # device -> the slab counters are drawn from
        # device -> the slab of counters wanted while the current slab's zeroing may be pending
        self._side: dict[int, _Slab] = {}
        # device -> its current slab while that slab's zeroing memset has not been seen to end
        # (a full slab hands out nothing more, so only the current one matters)
        self._unconfirmed: dict[int, _Slab] = {}

    def pointer(self, stream: int) -> int:
        """The address of the counter for a launch on ``stream`` (a handle) on the current device."""
        runtime = cupy_module().cuda.runtime
        device = runtime.getDevice()
        if runtime.streamIsCapturing(stream):
            return self._new(device, stream, capturing=True)
        if self._unconfirmed:
            self._confirm_zeroed(device)
        by_stream = self._by_stream
        if stream == PER_THREAD_STREAM:  # the calling thread's own stream
            by_stream = self._per_thread.__dict__.setdefault("by_stream", {})
        counter = by_stream.get((device, stream))
        if counter is None:
            counter = by_stream.setdefault((device, stream), self._new(device, stream, capturing=False))
        return counter

    def _confirm_zeroed(self, device: int) -> None:
        """Mark the current slab of ``device`` (the current one) zeroed once its memset has ended
        (an event query, outside any capture of this thread; in the thread-local capture mode,
        so that it leaves other threads' captures alone)."""
        with self._lock:
            slab = self._unconfirmed.get(device)
            if slab is None:
                return
            with capture_mode(_CAPTURE_MODE_THREAD_LOCAL):
                ended = slab.zeroing.done
            if ended:
                slab.zeroed = True
                del self._unconfirmed[device]

    def _new(self, device: int, stream: int, *, capturing: bool) -> int:
        """A counter of its own, zero before any launch that follows on ``stream``."""
        cupy = cupy_module()
        with self._lock:
            slabs = self._slabs
            slab = slabs.get(device)
            if device in self._unconfirmed and slab.used < self.SLAB:
                # its zeroing may still be queued (see the class's doc): a side slab's counter
                slabs = self._side
                slab = slabs.get(device)
            fresh = slab is None or slab.used == self.SLAB
            if fresh:
                # not recorded by a capture, and kept for the life of the process
                with capture_mode(_CAPTURE_MODE_RELAXED):
                    memory = cupy.cuda.runtime.malloc(8 * self.SLAB)
                slab = slabs[device] = _Slab(memory)
                if slabs is self._slabs:
                    self._unconfirmed.pop(device, None)
                    if not capturing:
                        cupy.cuda.runtime.memsetAsync(slab.memory, 0, 8 * self.SLAB, stream)
                        slab.zeroing = cupy.cuda.Event(disable_timing=True)
                        slab.zeroing.record(external_stream(stream, device))
                        self._unconfirmed[device] = slab
            counter = slab.memory + 8 * slab.used
            slab.used += 1
            # zeroed already: the whole slab, known to be, or just now on this very stream
            zero = slab.zeroed or (fresh and slab.zeroing is not None)
        if not zero:
            cupy.cuda.runtime.memsetAsync(counter, 0, 8, stream)
        return counter


tile_counters = TileCounters()


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch of a prepared call: the compiled function, its 1-D grid and block, its
    dynamic shared memory, its packed arguments and the scalars the kernel takes after them
    (``tail``: NumPy scalars), then, with ``tile_counter``, the address of the stream's
    ``TileCounters`` counter (a persistent grid); calling it with the values of the arguments'
    per-call fields (``PackedArgs``) launches it on CuPy's current stream (or `stream`). A kernel
    that reads tensors through TMA takes their descriptors first: ``maps``
    (``_tma.TensorLayout`` of each) with ``map_pointers`` (the index of each one's address in
    those values); a call encodes the descriptors of addresses that changed.

    Launches go through a ``DriverLaunch``, built at the first call (``_writer``); ``cupy_arguments``
    are the same parameters as CuPy's RawKernel takes them (the reference the tests hold the
    driver's bytes to, ``launch_through_cupy``)."""

    kernel: Any
    blocks: int
    threads: int
    shared: int
    args: PackedArgs
    tail: tuple = ()
    maps: tuple = ()
    map_pointers: tuple = ()
    tile_counter: bool = False
    dependent: bool = False  # a programmatic dependent of the launch before it (DriverLaunch)
    # The function that writes a call's per-call values and launches, from the first call.
    _state: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __call__(self, values, stream: int | None = None) -> None:
        launch = self._state[0] if self._state else self._writer()
        launch(values, current_stream() if stream is None else stream)

    def _writer(self):
        """``launch(values, stream)`` of this kernel through a new ``DriverLaunch``: rewrite
        the descriptors whose address changed and the per-call fields, then launch, under the
        driver's lock."""
        if self.blocks == 0:  # nothing to do (a varlen call without keys); CUDA refuses 0 blocks
            def launch(values, stream):
                pass
            self._state[:] = [launch]
            return launch
        map_count = len(self.maps)
        params = [b"\0" * 128 * map_count] if map_count else []
        params += [self.args.packed, *(numpy.asarray(x).tobytes() for x in self.tail)]
        if self.tile_counter:
            params.append(bytes(8))
        driver = DriverLaunch(self.kernel, self.blocks, self.threads, self.shared, params,
                              dependent=self.dependent)
        lock, args = driver.lock, driver.params[1 if map_count else 0]
        write_call_values = self.args.write_call_values
        launch_driver = driver.launch
        descriptors = driver.params[0] if map_count else None
        counter = driver.params[-1] if self.tile_counter else None
        maps = tuple(zip(range(map_count), self.maps, self.map_pointers))
        described = [None] * map_count  # the address each descriptor in the buffer describes

        def launch(values, stream):
            with lock:
                for i, layout, index in maps:
                    address = values[index]
                    if described[i] != address:  # a descriptor holds its tensor's address
                        descriptors[128 * i:128 * (i + 1)] = layout.descriptor_bytes(address)
                        described[i] = address
                write_call_values(args, values)
                if counter is not None:
                    struct.pack_into("<Q", counter, 0, tile_counters.pointer(stream))
                launch_driver(stream)

        self._state[:] = [launch]
        return launch

    def cupy_arguments(self, values) -> tuple:
        """The arguments CuPy's RawKernel takes for the same launch."""
        from . import _tma

        descriptors = [layout.descriptor(values[i]) for layout, i in zip(self.maps, self.map_pointers)]
        head = (_tma.pack(descriptors),) if descriptors else ()
        counter = (numpy.uint64(tile_counters.pointer(current_stream())),) if self.tile_counter else ()
        return (*head, self.args.pack(values), *self.tail, *counter)

    def launch_through_cupy(self, values) -> None:
        """The same launch through CuPy's RawKernel.__call__ (slower: the reference)."""
        if self.blocks:
            self.kernel((self.blocks,), (self.threads,), self.cupy_arguments(values),
                        shared_mem=self.shared)


@functools.lru_cache(maxsize=None)
def _opaque(itemsize: int) -> numpy.dtype:
    if itemsize % 8:
        raise ValueError(f"argument structs are 8-byte aligned; got {itemsize} bytes")
    return numpy.dtype([("bytes", numpy.uint64, (itemsize // 8,))])


def pointer(x) -> int:
    return 0 if x is None else int(x.data.ptr)



# ---- mask and score modifier: template keys and argument fields (csrc/mask.cuh, score_mod.cuh)

# The fields every argument struct ends with (MASK_AND_SCORE_FIELDS in csrc/args.cuh). The exact
# mask's tile_slot / tile_bits depend on the launch's tile shape: tile_index() gives them, with
# the tile CSR; mask_and_score_values() the rest.
MASK_AND_SCORE_FIELDS = [("tile_slot", PTR), ("tile_bits", PTR), ("alibi", PTR),
                         ("window_left", I32), ("window_right", I32), ("cap_in", F32),
                         ("cap_out", F32)]


def mask_and_score_values(spec) -> dict:
    """The values of MASK_AND_SCORE_FIELDS for one call, but for tile_index()'s."""
    left, right = spec.kernel_band()
    softcap = spec.softcap
    return {
        "alibi": pointer(spec.alibi), "window_left": left, "window_right": right,
        "cap_in": spec.scale / softcap if softcap > 0 else 0.0,
        "cap_out": softcap * LOG2E,
    }


# ---- dropout: argument fields (DROPOUT_FIELDS in csrc/dropout.cuh), after the mask fields

DROPOUT_FIELDS = [("drop_state", PTR), ("drop_threshold", U32), ("drop_seed_lo", U32),
                  ("drop_seed_hi", U32), ("drop_offset", U32), ("drop_rescale", F32)]

# The dropout fields a launch with dropout writes per call, after its pointers: calls that differ
# only in their seed or offset (a training loop draws a seed per step) share one prepared launch.
# A launch without dropout keeps them as packed (0), and writes its pointers alone. drop_state is
# the seed array the kernels read when they run (a CuPy dropout_seed), or 0: the words.
DROPOUT_WORDS = ("drop_state", "drop_seed_lo", "drop_seed_hi", "drop_offset")


def dropout_values(spec) -> dict:
    """The values of DROPOUT_FIELDS for one call (threshold 0 and factor 1 without dropout; the
    kernels read them only in their DROPOUT variants)."""
    p = spec.dropout_p
    return {"drop_threshold": _dropout.threshold(p), "drop_rescale": _dropout.rescale(p),
            **dict(zip(DROPOUT_WORDS, _seed_words(spec)))}


def call_fields(pointers: tuple, spec) -> tuple:
    """The fields a launch of this call re-fills per call: ``pointers``, then DROPOUT_WORDS
    with dropout."""
    return pointers + DROPOUT_WORDS if spec.has_dropout else pointers


def _seed_words(spec) -> tuple:
    seed = spec.dropout_seed
    return pointer(spec.dropout_state), seed & 0xFFFFFFFF, seed >> 32, spec.dropout_offset


def dropout_words(spec) -> tuple:
    """The DROPOUT_WORDS values of one call, after its pointers (none without dropout)."""
    return _seed_words(spec) if spec.has_dropout else ()


def mask_type(spec) -> str:
    """The kernels' mask policy for this call (csrc/mask.cuh)."""
    left, right = spec.band()
    if spec.exact_mask is not None:
        return _build.template_expression("Mask", left != -1, right != -1, True, True)
    return _build.template_expression("Mask", left != -1, right != -1, spec.sparse)


def score_mod_type(spec) -> str:
    """The kernels' score modifier for this call (csrc/score_mod.cuh)."""
    return _build.template_expression("ScoreMod", spec.has_softcap, spec.has_alibi)


def block_mask_csr(spec, tile_m: int, tile_n: int, *, by_key: bool = False):
    """The block mask (or the exact mask's non-empty tiles) at (tile_m, tile_n) tiles as
    ``(ptr, idx)``: per query tile (its CSR) or, ``by_key``, per key tile (the transpose);
    ``(None, None)`` without a mask."""
    if spec.exact_mask is not None:
        bits = spec.exact_mask.device_tile_bits(tile_m, tile_n)
        return (bits.col_ptr, bits.row_idx) if by_key else (bits.row_ptr, bits.col_idx)
    if spec.block_mask is None:
        return None, None
    csr = spec.block_mask.device_csr(tile_m, tile_n)
    return (csr.col_ptr, csr.row_idx) if by_key else (csr.row_ptr, csr.col_idx)


# tile_index() for launches that walk no tiles.
NO_TILE_INDEX = {"tile_ptr": 0, "tile_idx": 0, "tile_slot": 0, "tile_bits": 0}


def tile_index(spec, tile_m: int, tile_n: int, *, by_key: bool = False) -> dict:
    """The argument fields of the tile walk of one launch at (tile_m, tile_n) tiles:
    ``tile_ptr`` / ``tile_idx`` (block_mask_csr) and, for an exact mask, each tile's bitmask
    slot (``tile_slot``, in the same order) and the bitmasks (``tile_bits``)."""
    ptr, idx = block_mask_csr(spec, tile_m, tile_n, by_key=by_key)
    slot = bits = None
    if spec.exact_mask is not None:
        tiles = spec.exact_mask.device_tile_bits(tile_m, tile_n)
        slot, bits = (tiles.col_slot if by_key else tiles.row_slot), tiles.bits
    return {"tile_ptr": pointer(ptr), "tile_idx": pointer(idx), "tile_slot": pointer(slot),
            "tile_bits": pointer(bits)}


# The argument struct of both 16-bit forward kernels (FwdArgs in csrc/args.cuh).
FWD_ARGS = make_struct_dtype(
    [("q", PTR), ("k", PTR), ("v", PTR), ("o", PTR), ("lse", PTR), ("tile_ptr", PTR), ("tile_idx", PTR),
     ("cu_q", PTR), ("cu_k", PTR)]
    + [(f"{t}_s{a}", I64) for t in "qkvo" for a in "bhn"]
    + [(n, I32) for n in ("nq", "nk", "d", "dv", "heads", "group", "m_tiles", "mask_heads",
                          "total_q")]
    + [("scale_log2", F32)]
    + MASK_AND_SCORE_FIELDS + DROPOUT_FIELDS + [("tail_lanes", I32), ("batch", I32)]
)
assert FWD_ARGS.itemsize == 288, "FWD_ARGS must match FwdArgs in csrc/args.cuh"

# The argument struct of every 16-bit backward kernel (BwdArgs in csrc/args.cuh).
BWD_ARGS = make_struct_dtype(
    [(n, PTR) for n in ("q", "k", "v", "o", "dout", "lse", "grad_q", "grad_k", "grad_v", "lse2",
                        "delta", "dq_accum", "tile_ptr", "tile_idx", "cu_q", "cu_k")]
    + [(f"{t}_s{a}", I64) for t in ("q", "k", "v", "o", "do", "gq", "gk", "gv") for a in "bhn"]
    + [(n, I32) for n in ("batch", "nq", "nk", "d", "dv", "heads", "kv_heads", "group", "m_tiles",
                          "n_tiles", "rows_pad", "dqk", "mask_heads", "total_q")]
    + [("scale", F32), ("scale_log2", F32)]
    + MASK_AND_SCORE_FIELDS + DROPOUT_FIELDS + [("tail_lanes", I32)]
)
assert BWD_ARGS.itemsize == 456, "BWD_ARGS must match BwdArgs in csrc/args.cuh"


def mask_heads(spec) -> int:
    """1 when the block or exact mask holds one pattern per query head, else 0."""
    mask = spec.exact_mask if spec.exact_mask is not None else spec.block_mask
    return int(mask is not None and mask.num_heads is not None)


# The pointer fields of FWD_ARGS a forward launch re-fills per call, in this order, then
# DROPOUT_WORDS with dropout (call_fields; see forward_call_values).
FWD_POINTERS = ("q", "k", "v", "o", "lse", "alibi", "cu_q", "cu_k")


def forward_call_values(q, k, v, out, lse, spec) -> tuple[int, ...]:
    """The per-call values of one forward call (``call_fields(FWD_POINTERS, spec)``); any views
    with the prepared layout will do (only their data pointers are read). ``lse`` may be None:
    the kernels then store none."""
    return (q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, pointer(lse), pointer(spec.alibi),
            *varlen_pointers(spec), *dropout_words(spec))


def packed_tile_slots(total: int, sequences: int, tile: int) -> int:
    """The tile slots per lane of a packed grid (schedule.cuh, packed_tile_at): floor(total /
    tile) + B, enough for every sequence's ceil(n_b / tile) tiles of `tile` rows (`total` packed
    rows) and at most one empty slot each, known without reading the offsets."""
    return total // tile + sequences


def forward_args(spec, arrays, *, tile_m, tile_n, resident_blocks=0, packed_grid=False) -> tuple[PackedArgs, int]:
    """The forward kernels' argument struct for 4-D views ``arrays`` = (q, k, v, out) (their
    layout; its per-call fields are filled per call), and the grid size (thread blocks):
    one block per `tile_m` query rows of each (batch, head). With a block or exact mask, its tile
    index at (tile_m, tile_n) tiles (kept alive by the mask, which the spec holds). A varlen
    call's arrays are packed (total, H, D): its grid covers the longest sequence's tiles, or
    with `packed_grid` (the Hopper TMA forward) each sequence's own (``packed_tile_slots``).
    `resident_blocks`: the blocks the SMs hold at once, for a kernel that reads ``tail_lanes``
    (the Hopper TMA forward; 0 leaves the grid in lane order)."""
    s = spec.shapes
    batch, heads, nq, d = s.b, s.hq, s.nq, s.d
    kv_heads, nk, dv = s.hkv, s.nk, s.dv
    m_tiles = -(-nq // tile_m)
    if packed_grid and spec.varlen is not None:
        blocks = packed_tile_slots(spec.varlen.total_q, batch, tile_m) * heads
    else:
        blocks = m_tiles * heads * batch
    blocks = check_grid(blocks, "the forward kernel")
    values = dict(
        **tile_index(spec, tile_m, tile_n), **stride_fields("qkvo", arrays),
        tail_lanes=tail_lanes(spec, heads * batch, m_tiles, resident_blocks),
        nq=nq, nk=nk, d=d, dv=dv, heads=heads, group=heads // kv_heads, m_tiles=m_tiles,
        mask_heads=mask_heads(spec), scale_log2=spec.scale * LOG2E, batch=batch,
        **mask_and_score_values(spec), **varlen_values(spec), **dropout_values(spec),
    )
    return PackedArgs(FWD_ARGS, call_fields(FWD_POINTERS, spec), values), blocks


class ForwardLaunch:
    """A prepared forward pass: ``launch(q, k, v, out, lse, spec)`` with the entry point's
    arguments (views of the prepared layout) only fills in the per-call values (their pointers,
    dropout's seed words) and launches, on `stream` (a handle) or CuPy's current stream."""

    def __init__(self, launch: KernelLaunch):
        self.launch = launch

    def __call__(self, q, k, v, out, lse, spec, stream: int | None = None) -> None:
        self.launch(forward_call_values(q, k, v, out, lse, spec), stream)

    def launch_call_values(self, values, stream: int) -> None:
        """Launch with the per-call values ``values`` (``forward_call_values``) on ``stream``
        (a handle)."""
        self.launch(values, stream)
