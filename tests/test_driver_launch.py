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
import threading

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
                  "sm80-mma": ("80", {}, {}), "sm80-deterministic": ("80", dict(deterministic=True), {})}


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_backward_parameters_are_the_bytes_cupy_would_send(monkeypatch, twice, case):
    capability, options, environment = BACKWARD_CASES[case]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    device = _device(monkeypatch, capability)
    first = [device.empty(SHAPE, BF16) for _ in range(4)]
    second = [device.empty(SHAPE, BF16) for _ in range(4)]
    lse = device.empty(SHAPE[:3], np.float32)
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
            if len(parameters) == 2:  # warp-specialised dK/dV: descriptors of q, k, v, dout
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


def test_tile_counters_one_per_stream_and_one_per_captured_launch(monkeypatch):
    """A persistent grid's counter: launches on one stream share one (they run in turn); every
    launch captured into a graph gets its own; each new counter is zeroed on its stream first;
    slabs are allocated as they fill up."""
    cupy = pytest.importorskip("cupy")
    from cuflash.kernels import _launch

    runtime = cupy.cuda.runtime
    capturing, memsets, slabs = set(), [], iter((1 << 40, 1 << 41))
    monkeypatch.setattr(runtime, "getDevice", lambda: 0)
    monkeypatch.setattr(runtime, "streamIsCapturing", lambda stream: int(stream in capturing))
    monkeypatch.setattr(runtime, "malloc", lambda size: next(slabs))
    monkeypatch.setattr(runtime, "memsetAsync", lambda ptr, value, size, stream: memsets.append((ptr, value, size, stream)))
    counters = _launch.TileCounters()
    counters.SLAB = 3
    first = counters.pointer(5)
    assert counters.pointer(5) == first
    second = counters.pointer(6)
    capturing.add(7)
    captured = [counters.pointer(7), counters.pointer(7)]
    assert [first, second, *captured] == [1 << 40, (1 << 40) + 8, (1 << 40) + 16, 1 << 41]
    assert memsets == [(p, 0, 8, s) for p, s in zip((first, second, *captured), (5, 6, 7, 7))]
    capturing.clear()
    assert counters.pointer(7) == (1 << 41) + 8  # the stream's own, after the capture
