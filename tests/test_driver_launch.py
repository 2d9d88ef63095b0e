"""Launches through the driver (``_launch.DriverLaunch``) against CuPy's ``RawKernel.__call__``.

Prepared launches go straight to ``cuLaunchKernel`` with parameters kept in persistent buffers
that each call rewrites in place. Here, on the fake device, every launch is also made the
reference way (``KernelLaunch.cupy_arguments``, what the launchers handed CuPy before): the bytes
the driver stand-in reads through ``kernelParams`` (as many per parameter as the kernel's C
signature says) must be exactly those CuPy's own conversion of the reference arguments hands the
driver (a ``CScalar`` copy of each), call after call, as the pointers change.
"""

from __future__ import annotations

import ctypes
import re
import threading
import types
import warnings

import ml_dtypes
import numpy as np
import pytest

import cuflash
from cuflash.kernels import _launch

pytest.importorskip("cupy")

BF16 = ml_dtypes.bfloat16
SHAPE = (2, 4, 256, 64)


def _bytes_cupy_sends(argument) -> bytes:
    """What cupy/cuda/function.pyx hands the driver for a NumPy scalar argument (a CScalar
    holding a copy)."""
    from cupy._core._scalar import CScalar

    held = CScalar(argument)
    return ctypes.string_at(held.ptr, argument.itemsize)


@pytest.fixture
def twice(monkeypatch):
    """Every KernelLaunch call is made through the driver and its reference arguments are
    converted as CuPy would: ``(device, pairs)``, one pair per launch of (the parameters the
    driver read, CuPy's bytes of the reference arguments)."""
    pairs = []
    through_driver = _launch.KernelLaunch.__call__

    def both(self, pointers, stream=None):
        device = self.kernel.device
        before = len(device.parameters)
        through_driver(self, pointers, stream)
        if self.blocks:
            reference = self.cupy_arguments(pointers)
            pairs.append((device.parameters[before:], [tuple(map(_bytes_cupy_sends, reference))]))

    monkeypatch.setattr(_launch.KernelLaunch, "__call__", both)
    return pairs


def _device(monkeypatch, capability):
    from fake_device import FakeDevice

    return FakeDevice(monkeypatch, compute_capability=capability)


def _field(parameters, dtype, name):
    """Field `name` of the argument struct among a launch's parameters."""
    (struct,) = [p for p in parameters if len(p) == dtype.itemsize]
    return int(np.frombuffer(struct, dtype)[name][0])


FORWARD_CASES = {"sm90-tma": ("90", {}), "sm90-tma-window": ("90", dict(window=(64, 0))),
                 "sm80-mma": ("80", {}), "sm80-mma-softcap": ("80", dict(softcap=20.0))}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_parameters_are_the_bytes_cupy_would_send(monkeypatch, twice, case):
    capability, options = FORWARD_CASES[case]
    device = _device(monkeypatch, capability)
    first = [device.empty(SHAPE, BF16) for _ in range(3)]
    second = [device.empty(SHAPE, BF16) for _ in range(3)]
    sent = []
    for q, k, v in (first, first, second, first):  # validated, cached, new pointers, back
        twice.clear()
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, **options)
        ((driver, cupy_bytes),) = twice
        assert driver == cupy_bytes
        (parameters,) = driver
        pointers = [_field(parameters, _launch.FWD_ARGS, name) for name in "qkvo"]
        assert pointers == [q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr]
        assert _field(parameters, _launch.FWD_ARGS, "lse") == lse.data.ptr
        sent.append(parameters)
    if capability == "90":  # the TMA descriptors lead; the stand-in's first word is the address
        for parameters, (q, k, v) in zip(sent, (first, first, second, first)):
            maps = np.frombuffer(parameters[0], np.uint64)
            assert len(parameters) == 4 and maps.size == 48
            assert [int(a) for a in maps[::16]] == [q.data.ptr, k.data.ptr, v.data.ptr]
            assert int(np.frombuffer(parameters[2], np.int32)[0]) > 0  # tile_count
            assert int(np.frombuffer(parameters[3], np.uint64)[0]) == 0  # a grid of one block per tile
    else:
        assert all(len(parameters) == 1 for parameters in sent)


BACKWARD_CASES = {"sm90-ws": ("90", {}, {}), "sm90-cp-async": ("90", {}, {"CUFLASH_SM90_BWD_WS": "0"}),
                  "sm90-ordered-dq": ("90", dict(deterministic=True), {}),
                  "sm90-dq-kernel": ("90", dict(deterministic=True), {"CUFLASH_SM90_ORDERED_DQ": "0"}),
                  "sm80-mma": ("80", {}, {}), "sm80-deterministic": ("80", dict(deterministic=True), {}),
                  "sm90-split-tile": ("90", {}, {})}
# The cases' (B, H, N, D), where not SHAPE: the 256-column tile runs the warp-specialised dQ kernel.
CASE_SHAPES = {"sm90-split-tile": (2, 4, 256, 256)}


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_backward_parameters_are_the_bytes_cupy_would_send(monkeypatch, twice, case):
    capability, options, environment = BACKWARD_CASES[case]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    device = _device(monkeypatch, capability)
    shape = CASE_SHAPES.get(case, SHAPE)
    first = [device.empty(shape, BF16) for _ in range(4)]
    second = [device.empty(shape, BF16) for _ in range(4)]
    lse = device.empty(shape[:3], np.float32)
    kernels_seen = set()
    for q, k, v, dout in (first, first, second, first):
        twice.clear()
        dq, dk, dv = cuflash.attention_backward(dout, q, k, v, dout, lse, causal=True, **options)
        assert len(twice) == 3  # preprocessing, dK/dV, then dQ or its conversion
        for driver, cupy_bytes in twice:
            assert driver == cupy_bytes
            (parameters,) = driver
            assert [_field(parameters, _launch.BWD_ARGS, name)
                    for name in ("q", "k", "v", "dout", "grad_q", "grad_k", "grad_v")] == [
                x.data.ptr for x in (q, k, v, dout, dq, dk, dv)]
            if len(parameters) == 2:  # warp-specialised dK/dV or dQ: descriptors of q, k, v, dout
                maps = np.frombuffer(parameters[0], np.uint64)
                assert [int(a) for a in maps[::16]] == [x.data.ptr for x in (q, k, v, dout)]
        kernels_seen.update(launch[0].partition("<")[0] for launch in device.take_launches())
    # The warp-specialised dK/dV kernel runs on the Hopper fake unless its switch says 0.
    assert ("flash_bwd_sm90_dkdv_ws" in kernels_seen) == (
        capability == "90" and environment.get("CUFLASH_SM90_BWD_WS") != "0")


def test_launches_bind_the_context_once_per_thread_and_use_the_current_stream(monkeypatch):
    device = _device(monkeypatch, "90")
    q, k, v, dout = (device.empty(SHAPE, BF16) for _ in range(4))
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    cuflash.attention_backward(dout, q, k, v, out, lse)
    assert len(device.contexts_bound) == 1 and len(device.take_launches()) == 4
    device.streams.append(0x6000)  # the fake driver checks each launch's stream against this
    cuflash.attention(q, k, v)
    assert len(device.take_launches()) == 1
    worker = threading.Thread(target=lambda: cuflash.attention(q, k, v))
    worker.start()
    worker.join()
    assert len(device.contexts_bound) == 2 and len(device.take_launches()) == 1


def test_descriptors_are_written_only_when_their_address_changes(monkeypatch):
    from cuflash.kernels import _tma

    device = _device(monkeypatch, "90")
    encoded = []
    encode = _tma._encode
    monkeypatch.setattr(_tma, "_encode", lambda address, *layout: encoded.append(address)
                        or encode(address, *layout))
    q, k, v = (device.empty(SHAPE, BF16) for _ in range(3))
    cuflash.attention(q, k, v)
    cuflash.attention(q, k, v)  # builds the entry; its buffer is new
    encoded.clear()
    cuflash.attention(q, k, v)
    assert encoded == []
    q2 = device.empty(SHAPE, BF16)
    cuflash.attention(q2, k, v)
    assert encoded == [q2.data.ptr]


def _fake_counter_runtime(monkeypatch, slabs):
    """``(counters, capturing, memsets, events)``: a ``TileCounters`` of 3 counters a slab over
    a runtime that records them (``slabs``: the addresses its mallocs return, in turn; streams
    in ``capturing`` capture; each event's ``done`` is set by the test)."""
    cupy = pytest.importorskip("cupy")
    from cuflash.kernels import _launch

    runtime = cupy.cuda.runtime
    capturing, memsets, events, slabs = set(), [], [], iter(slabs)

    class Event:
        def __init__(self, disable_timing=False):
            self.ended, self.stream, self.queries = False, None, 0
            events.append(self)

        def record(self, stream):
            self.stream = stream.ptr

        @property
        def done(self):
            self.queries += 1
            return self.ended

        @done.setter
        def done(self, value):
            self.ended = value

    monkeypatch.setattr(runtime, "getDevice", lambda: 0)
    monkeypatch.setattr(runtime, "streamIsCapturing", lambda stream: int(stream in capturing))
    monkeypatch.setattr(runtime, "malloc", lambda size: next(slabs))
    monkeypatch.setattr(runtime, "memsetAsync", lambda ptr, value, size, stream: memsets.append((ptr, value, size, stream)))
    monkeypatch.setattr(cupy.cuda, "Event", Event)
    monkeypatch.setattr(_launch, "external_stream", lambda ptr, device: types.SimpleNamespace(ptr=ptr))
    counters = _launch.TileCounters()
    counters.SLAB = 3
    return counters, capturing, memsets, events


def test_tile_counters_one_per_stream_and_one_per_captured_launch(monkeypatch):
    """A persistent grid's counter: launches on one stream share one (they run in turn); every
    launch captured into a graph gets its own; slabs are allocated as they fill up. Every new
    counter is zero before its first launch: a slab made outside a capture is zeroed whole on
    its stream, and once a later call outside any capture has seen that memset end, its counters
    need no memset of their own (so a captured launch adds no memset node to its graph); until
    then other streams and captured launches take counters of a side slab, and those and the
    counters of slabs made during a capture are each zeroed on their stream."""
    a, b, c, d, e = (1 << n for n in range(40, 45))
    counters, capturing, memsets, events = _fake_counter_runtime(monkeypatch, (a, b, c, d, e))
    assert counters.pointer(5) == a and memsets == [(a, 0, 24, 5)]  # the slab, zeroed whole
    assert counters.pointer(5) == a and len(memsets) == 1
    assert [(event.stream, event.done) for event in events] == [(5, False)]
    assert counters.pointer(6) == b and memsets[-1] == (b, 0, 8, 6)  # a side slab's
    capturing.add(7)
    assert [counters.pointer(7), counters.pointer(7)] == [b + 8, b + 16]  # own counters
    assert memsets[-2:] == [(b + 8, 0, 8, 7), (b + 16, 0, 8, 7)] and len(events) == 1
    capturing.clear()
    events[0].done = True
    count = len(memsets)
    assert counters.pointer(8) == a + 8 and len(memsets) == count  # a seen zeroed
    capturing.add(10)
    assert counters.pointer(10) == a + 16 and len(memsets) == count  # no memset node
    assert counters.pointer(10) == c and memsets[-1] == (c, 0, 8, 10)  # c made in the capture
    capturing.clear()
    assert counters.pointer(9) == c + 8 and memsets[-1] == (c + 8, 0, 8, 9)  # c never zeroed whole
    assert counters.pointer(11) == c + 16 and memsets[-1] == (c + 16, 0, 8, 11)
    assert counters.pointer(12) == d and memsets[-1] == (d, 0, 24, 12)
    capturing.add(10)
    assert counters.pointer(10) == e and memsets[-1] == (e, 0, 8, 10)  # d's memset not seen to end
    capturing.clear()
    events[1].done = True
    count = len(memsets)
    assert counters.pointer(12) == d and len(memsets) == count  # sees it end
    capturing.add(10)
    assert counters.pointer(10) == d + 8 and len(memsets) == count  # no memset node
    capturing.clear()
    # Another device's slab is zeroed on its own, and its event is queried only while that device
    # is current.
    cupy = pytest.importorskip("cupy")
    device = [1]
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: device[0])
    counters_f = 1 << 45
    monkeypatch.setattr(cupy.cuda.runtime, "malloc", lambda size: counters_f)
    assert counters.pointer(5) == counters_f and memsets[-1] == (counters_f, 0, 24, 5)
    device[0] = 0
    assert counters.pointer(5) == a and events[-1].queries == 0
    device[0] = 1
    events[-1].done = True
    assert counters.pointer(5) == counters_f and events[-1].queries == 1
    capturing.add(10)
    count = len(memsets)
    assert counters.pointer(10) == counters_f + 8 and len(memsets) == count  # no memset node


def test_a_slab_zeroing_still_queued_zeroes_no_other_stream_s_counter(monkeypatch):
    """A new slab is zeroed whole by a memset on the stream that asked first, which runs only
    once the work queued there before it has: it may run in the middle of a later launch on
    another stream, or of a graph replay. A counter of that slab in such a launch would be
    cleared mid-launch, its blocks would never count to the end, and it would stay non-zero for
    the next launch on that stream (whose blocks would then skip their tiles past the grid). So
    until that memset is seen to end, every other counter comes from memory it does not cover."""
    a, side = 1 << 40, 1 << 41
    counters, capturing, memsets, events = _fake_counter_runtime(monkeypatch, (a, side))
    assert counters.pointer(5) == a and memsets == [(a, 0, 24, 5)]
    capturing.add(7)
    others = [counters.pointer(6), counters.pointer(7)]
    covered = range(a, a + 24)
    assert not any(counter in covered for counter in others)
    # each zeroed on its own stream, after the launches that stream queued before it
    assert memsets[1:] == [(others[0], 0, 8, 6), (others[1], 0, 8, 7)]


def _thread_capture_mode(monkeypatch):
    """``[mode]``: the calling thread's capture mode (global, 0, at first), as a fake
    ``cuThreadExchangeStreamCaptureMode`` keeps it."""
    modes = [0]

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int))  # as the driver is called
    def exchange(mode):
        modes[0], mode.contents.value = mode.contents.value, modes[0]
        return 0

    monkeypatch.setattr(_launch, "_cu_thread_exchange_capture_mode", lambda: exchange)
    return modes


def test_seeing_a_slab_zeroed_leaves_other_threads_captures_alone(monkeypatch):
    """A launch outside any capture asks whether the current slab's memset has ended: an event
    query from the launching thread. While another thread captures a CUDA graph in the global
    mode (torch's default), that query from a thread in the global mode invalidates the
    capture: it is made in the thread-local mode, and the thread's own mode comes back after."""
    counters, capturing, memsets, events = _fake_counter_runtime(monkeypatch, (1 << 40,))
    modes, at_query = _thread_capture_mode(monkeypatch), []
    counters.pointer(5)
    done = type(events[0]).done
    monkeypatch.setattr(type(events[0]), "done", property(
        lambda event: at_query.append(modes[0]) or done.fget(event), done.fset))
    events[0].done = True
    counters.pointer(6)
    assert at_query == [_launch._CAPTURE_MODE_THREAD_LOCAL]
    assert modes == [0]  # the thread's own (global) mode again


def test_a_slab_is_allocated_in_the_relaxed_capture_mode(monkeypatch):
    """cudaMalloc is an unsafe call while the calling thread captures (a captured launch that
    needs a new slab: the first, or one while the current slab's zeroing is unconfirmed), and,
    in the global mode, while any other thread captures in the global mode (torch's default):
    it failed and invalidated the capture. The slab is allocated in the relaxed mode, and the
    thread's own mode comes back after."""
    a, b, c = (1 << n for n in range(40, 43))
    counters, capturing, memsets, events = _fake_counter_runtime(monkeypatch, ())
    modes, at_malloc, slabs = _thread_capture_mode(monkeypatch), [], iter((a, b, c))
    monkeypatch.setattr(pytest.importorskip("cupy").cuda.runtime, "malloc",
                        lambda size: at_malloc.append(modes[0]) or next(slabs))
    capturing.add(7)
    assert counters.pointer(7) == a  # the first slab, made during a capture
    capturing.clear()
    assert counters.pointer(5) == a + 8  # never zeroed whole: a counter of its own
    counters.SLAB = 2
    assert counters.pointer(6) == b  # a slab made outside any capture
    capturing.add(8)
    assert counters.pointer(8) == c  # its zeroing unconfirmed: a side slab
    relaxed = 2  # CU_STREAM_CAPTURE_MODE_RELAXED in cuda.h
    assert at_malloc == [relaxed, relaxed, relaxed] and modes == [0]


def test_the_per_thread_default_stream_has_a_counter_per_thread(monkeypatch):
    """The per-thread default stream's handle (CuPy's Stream.ptds, every thread's current stream
    under CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1) names each thread's own stream: persistent
    launches of two threads on it may run at once, so each thread gets a counter of its own
    (one shared counter would hand the tickets of both grids out together). The legacy default
    stream is one stream for every thread: one counter."""
    import threading

    from cuflash.kernels import _launch

    counters, *_ = _fake_counter_runtime(monkeypatch, [1 << 40, 1 << 41, 1 << 42])
    counters.SLAB = 8
    drawn = {}

    def draw(name):
        drawn[name] = [counters.pointer(_launch.PER_THREAD_STREAM) for _ in range(2)] + [counters.pointer(0)]

    threads = [threading.Thread(target=draw, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
        thread.join()
    draw("main")
    own = [counters_of[0] for counters_of in drawn.values()]
    assert all(counters_of[0] == counters_of[1] for counters_of in drawn.values())  # one per thread
    assert len(set(own)) == 3  # ... of its own
    assert len({counters_of[2] for counters_of in drawn.values()}) == 1  # the legacy stream's


# ---- dependent launches (programmatic dependent launch)

class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute of cuda.h: the id, padding to 8 bytes, a 64-byte value union."""
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig of cuda.h."""
    _fields_ = [*((name, ctypes.c_uint) for name in ("gx", "gy", "gz", "bx", "by", "bz", "shared")),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p), ("count", ctypes.c_uint)]


def test_external_streams_wrap_the_handle_without_a_deprecation_warning(monkeypatch):
    cupy = pytest.importorskip("cupy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream = _launch.external_stream(0x1234, 0)
    assert isinstance(stream, cupy.cuda.Stream) and stream.ptr == 0x1234
    # CuPy 13 has no from_external: the stream of its ExternalStream, with the device given
    made = []
    fake_cuda = types.SimpleNamespace(
        Stream=type("Stream", (), {}), ExternalStream=lambda handle, device: made.append((handle, device)) or "old")
    monkeypatch.setattr(_launch, "cupy_module", lambda: types.SimpleNamespace(cuda=fake_cuda))
    assert _launch.external_stream(0x1234, 3) == "old" and made == [(0x1234, 3)]


def test_launch_config_has_the_drivers_layout():
    assert (_launch.LAUNCH_CONFIG.size, _launch.LAUNCH_ATTRIBUTE.size) == (
        ctypes.sizeof(_LaunchConfig), ctypes.sizeof(_LaunchAttribute))
    config = _LaunchConfig.from_buffer_copy(
        _launch.LAUNCH_CONFIG.pack(7, 1, 1, 384, 1, 1, 99_000, 0x5000, 0x1234, 1))
    assert (config.gx, config.bx, config.shared, config.stream, config.attrs, config.count) == (
        7, 384, 99_000, 0x5000, 0x1234, 1)
    attribute = _LaunchAttribute.from_buffer_copy(
        _launch.LAUNCH_ATTRIBUTE.pack(_launch.PROGRAMMATIC_STREAM_SERIALIZATION, 1))
    assert (attribute.id, attribute.value) == (6, 1)


# The sm80 family's backward on a Hopper device (the Hopper kernels switched off).
MMA_ON_HOPPER = {"sm80-mma-on-hopper": ("90", {}, {"CUFLASH_DISABLE_SM90": "1"}),
                 "sm80-deterministic-on-hopper": ("90", dict(deterministic=True), {"CUFLASH_DISABLE_SM90": "1"})}


def _backward_dependents(monkeypatch, case):
    """``(launches, dependents)`` of each of two backward calls (the validated one, then the
    cached one) of BACKWARD_CASES[case] (or MMA_ON_HOPPER[case]) on the fake device."""
    capability, options, environment = {**BACKWARD_CASES, **MMA_ON_HOPPER}[case]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    device = _device(monkeypatch, capability)
    shape = CASE_SHAPES.get(case, SHAPE)
    q, k, v, dout = (device.empty(shape, BF16) for _ in range(4))
    lse = device.empty(shape[:3], np.float32)
    calls = []
    for _ in range(2):
        device.dependent.clear()
        cuflash.attention_backward(dout, q, k, v, dout, lse, causal=True, **options)
        calls.append((device.take_launches(), list(device.dependent)))
    return calls


@pytest.mark.parametrize("case", [*BACKWARD_CASES, *MMA_ON_HOPPER])
def test_a_backwards_later_kernels_are_dependents_of_the_one_before(monkeypatch, case):
    """On compute capability 9.0 every kernel of a backward call but the first is launched as a
    programmatic dependent, whichever family runs it; elsewhere none is."""
    hopper = {**BACKWARD_CASES, **MMA_ON_HOPPER}[case][0] == "90"
    for launches, dependents in _backward_dependents(monkeypatch, case):
        assert len(launches) == 3
        assert dependents == ([launch[:2] for launch in launches[1:]] if hopper else [])


def test_dependent_launches_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(_launch, "DEPENDENT_LAUNCHES", False)
    for launches, dependents in _backward_dependents(monkeypatch, "sm90-ws"):
        assert len(launches) == 3 and dependents == []


def _decode_launches(monkeypatch, capability, splits, appended=0):
    """``(launches, dependents)`` of a decode call on the fake device (``appended`` new keys)."""
    cupy = pytest.importorskip("cupy")
    from cuflash.kernels import decode

    device = _device(monkeypatch, capability)
    q = cupy.empty((2, 1, 8, 64), BF16)
    k_cache, v_cache = (cupy.empty((2, 4096, 2, 64), BF16) for _ in range(2))
    new = {}
    if appended:
        new = dict(k=cupy.empty((2, appended, 2, 64), BF16), v=cupy.empty((2, appended, 2, 64), BF16))
    decode._prepared.cache_clear()
    decode._prepared_append.cache_clear()
    try:
        cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=cupy.empty((2,), np.int32),
                                       num_splits=splits, **new)
    finally:
        decode._prepared.cache_clear()
        decode._prepared_append.cache_clear()
    return device.take_launches(), device.dependent


@pytest.mark.parametrize("capability", ["90", "80"])
@pytest.mark.parametrize("appended", [0, 3])
def test_a_decode_calls_kernels_after_its_first_are_dependents(monkeypatch, capability, appended):
    """The merge depends on the decode kernel, and the decode kernel on the append when the call
    appends keys (on compute capability 9.0; elsewhere nothing is a dependent)."""
    for splits in (4, 1):
        launches, dependents = _decode_launches(monkeypatch, capability, splits, appended)
        names = [launch[0].partition("<")[0] for launch in launches]
        assert names == ["kv_append"] * bool(appended) + ["flash_decode"] + ["decode_combine"] * (splits > 1)
        assert dependents == ([launch[:2] for launch in launches[1:]] if capability == "90" else [])


def _kernel_body_start(name: str) -> str:
    """The text of kernel ``name``'s body from its opening brace on (csrc/*.cu)."""
    from fake_device import CSRC

    for path in CSRC.glob("*.cu"):
        text = path.read_text()
        found = re.search(r"__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?"
                          + name + r"\(", text)
        if found:
            return text[text.index("{", found.end()):]
    raise AssertionError(f"kernel {name} not found in csrc")


# The one dependent that touches memory before it waits for the kernel before it: the dQ cast
# lane by lane (csrc/flash_bwd.cu, AFTER_LANES) reads each lane's counter and takes its steps
# from the ticket after them, all zeroed by flash_bwd_pre before any dK/dV block (each of which
# waited for it) let the cast start, and only casts a lane once its counter says its adds have
# landed; at its end it waits for the dK/dV kernel.
WAITS_LANE_BY_LANE = {"flash_bwd_dq_convert": "if constexpr (AFTER_LANES) {"}


def test_every_kernel_launched_as_a_dependent_waits_before_anything_else(monkeypatch):
    """A dependent's blocks may start while the kernel before it runs: each must wait for it
    before its first memory access, so its first statement is the wait (after the lane-by-lane
    branch of WAITS_LANE_BY_LANE, whose own code ends with the wait)."""
    names = set()
    for case in ("sm90-ws", "sm90-cp-async", "sm90-ordered-dq", "sm90-dq-kernel", "sm90-split-tile", *MMA_ON_HOPPER):
        with monkeypatch.context() as patch:
            for _, dependents in _backward_dependents(patch, case):
                names.update(expression.partition("<")[0] for expression, _ in dependents)
    with monkeypatch.context() as patch:
        names.update(expression.partition("<")[0] for expression, _ in _decode_launches(patch, "90", 4, 2)[1])
    assert names == {"flash_bwd_sm90_dkdv_ws", "flash_bwd_sm90_dkdv", "flash_bwd_sm90_dq", "flash_bwd_sm90_dq_ws",
                     "flash_bwd_dkdv",
                     "flash_bwd_dq", "flash_bwd_dq_convert", "flash_decode", "decode_combine"}
    for name in sorted(names):
        statements = _kernel_body_start(name)[1:].lstrip()
        if name in WAITS_LANE_BY_LANE:
            assert statements.startswith(WAITS_LANE_BY_LANE[name]), name
            branch = statements[:statements.index("}") + 1]
            assert "cast_dq_lane_by_lane<" in branch and branch.rstrip("}").rstrip().endswith("return;"), name
            statements = statements[len(branch):].lstrip()
        assert statements.startswith("wait_for_previous_kernel();"), name
    from fake_device import CSRC

    text = (CSRC / "flash_bwd.cu").read_text()
    lane_by_lane = text[text.index("void cast_dq_lane_by_lane("):]
    assert lane_by_lane[:lane_by_lane.index("\n}")].rstrip().endswith("wait_for_previous_kernel();")


def test_no_dependent_launches_without_the_drivers_function(monkeypatch):
    """A driver without cuLaunchKernelEx (before CUDA 12.0, or no libcuda.so.1): every kernel is
    launched the usual way."""
    from cuflash.kernels import _launch as launch

    _device(monkeypatch, "90")
    monkeypatch.setattr(launch, "launch_kernel_ex_supported", lambda: False)
    assert not launch.dependent_launches(0)
    monkeypatch.setattr(launch, "launch_kernel_ex_supported", lambda: True)
    assert launch.dependent_launches(0)
    monkeypatch.setattr(launch, "_compute_capability", lambda device: "80")
    assert not launch.dependent_launches(0)


def test_a_kernel_that_fails_to_compile_at_run_time_is_named(monkeypatch):
    """NVRTC's log of a run-time compile names neither the variant nor the device (only a
    temporary file's lines): the error says which template expression of which source failed
    for which device, with the log after it."""
    import cupy
    from cupy.cuda.compiler import CompileException

    from cuflash.kernels import _build

    class Device:  # device 1, an sm_86 card, current
        def __init__(self, device_id=1):
            self.id, self.compute_capability = device_id, "86"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Module:
        def __init__(self, **kwargs):
            pass

        def get_function(self, expression):
            raise CompileException('kern.cu(12): error: identifier "no_such_type" is undefined',
                                   "", "kern", ())

    monkeypatch.setattr(cupy.cuda, "Device", Device)
    monkeypatch.setattr(cupy, "RawModule", Module)
    monkeypatch.setattr(_build, "_module", _build._module.__wrapped__)  # no memo of the stand-ins
    expression = "flash_fwd<no_such_type, 64>"
    with pytest.raises(RuntimeError) as raised:
        _build.get_function("flash_fwd.cu", expression)
    message = str(raised.value)
    assert message.startswith(f"flash_fwd.cu: {expression} failed to compile for device 1 "
                              "(compute capability 8.6)")
    assert 'identifier "no_such_type" is undefined' in message
    assert isinstance(raised.value.__cause__, CompileException)


def test_waiting_for_a_held_stream_leaves_other_threads_captures_alone(monkeypatch):
    """The thread that lets go of a vjp's buffers once another stream has passed them waits on
    an event. While another thread captures a CUDA graph in the global mode (torch's default), a
    wait from a thread in that mode invalidates the capture: the waiting thread switches itself
    to the thread-local mode first, then waits with the event's device current, and leaves it
    current; its own mode comes back after."""
    done = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int))  # as the driver is called
    def exchange(mode):
        done.append(("capture mode", mode.contents.value))
        mode.contents.value = 0  # the driver hands the previous mode back
        return 0

    runtime = types.SimpleNamespace(getDevice=lambda: 0,
                                    setDevice=lambda device: done.append(("device", device)))
    event = types.SimpleNamespace(synchronize=lambda: done.append(("wait",)))
    monkeypatch.setattr(_launch, "_cu_thread_exchange_capture_mode", lambda: exchange)
    monkeypatch.setattr(_launch, "_cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=runtime, Device=lambda device: pytest.fail("a Device context sets device 0 back"))))
    _launch.wait_for(event, 1)
    # Device 1 stays current: setting device 0 again would make its context, on a device the
    # program may never use.
    assert done == [("capture mode", _launch._CAPTURE_MODE_THREAD_LOCAL), ("device", 1), ("wait",),
                    ("capture mode", 0)]
    assert _launch._CAPTURE_MODE_THREAD_LOCAL == 1  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL in cuda.h
