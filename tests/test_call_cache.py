"""The cached call path (cuflash._calls) on CuPy arrays, host side only: no GPU is needed.

The arrays are CuPy arrays over made-up pointers (tests/fake_device.py); kernel launches are
recorded instead of run. A repeated call must reuse its entry and send the kernels exactly the
bytes the validated path would send; anything that changes validation, plan or arguments must
give another entry. The GPU results of cached calls are checked in test_gpu_calls.py.
"""

from __future__ import annotations

import functools
import time

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import _calls
from cuflash.kernels import _launch

pytest.importorskip("cupy")

BF16 = ml_dtypes.bfloat16
SHAPE = (2, 4, 128, 64)


@pytest.fixture(params=["90", "80"], ids=["sm90", "sm80"])
def device(request, monkeypatch):
    from fake_device import FakeDevice

    return FakeDevice(monkeypatch, compute_capability=request.param)


def _qkv(device, shape=SHAPE, dtype=BF16):
    return tuple(device.empty(shape, dtype) for _ in range(3))


def _builds():
    return _calls.stats()["builds"]


def _uncached(device, call):
    """The launches `call` makes on the validated path (every cache entry forgotten)."""
    _calls.clear()
    device.take_launches()
    call()
    return device.take_launches()


@pytest.mark.parametrize("return_lse", [True, False])
def test_a_repeated_forward_reuses_its_entry_and_sends_the_same_arguments(device, return_lse):
    q, k, v = _qkv(device)

    def call():
        return cuflash.attention(q, k, v, causal=True, return_lse=return_lse)

    call()
    assert _builds() == 1
    device.take_launches()
    result = call()
    cached = device.take_launches()
    assert _builds() == 1 and _calls.stats()["hits"] == 1
    assert len(cached) == 1
    # A call that does not return lse allocates none, and its kernel stores none.
    assert isinstance(result, tuple) == return_lse
    assert (_lse_pointer(cached) != 0) == return_lse
    uncached = _uncached(device, call)
    # Only the output and lse pointers (fresh allocations, or none) may differ.
    assert _output_fields_blank(cached) == _output_fields_blank(uncached)


def _lse_pointer(launches):
    """The lse pointer (field 4 of FWD_ARGS) of a forward launch."""
    return int.from_bytes(launches[0][4][32:40], "little")


def _output_fields_blank(launches):
    """The launches with the out and lse fields of FWD_ARGS blanked out."""
    return [(expression, grid, block, shared, record[:24] + b"P" * 16 + record[40:])
            for expression, grid, block, shared, record in launches]


def test_new_arrays_of_the_same_layout_reuse_the_entry_with_their_pointers(device):
    q, k, v = _qkv(device)
    cuflash.attention(q, k, v)
    device.take_launches()
    q2, k2, v2 = _qkv(device)
    cuflash.attention(q2, k2, v2)
    (launch,) = device.take_launches()
    assert _builds() == 1
    record = launch[4]
    assert [int.from_bytes(record[8 * i:8 * i + 8], "little") for i in range(3)] == [
        x.data.ptr for x in (q2, k2, v2)]


@pytest.mark.parametrize("change", [
    dict(causal=False), dict(scale=0.1), dict(window=(16, 0)), dict(softcap=20.0),
    dict(scale=0.125 + 1e-9), dict(window=(-1, 3))])
def test_each_option_gives_its_own_entry(device, change):
    q, k, v = _qkv(device)
    base = dict(causal=True, scale=0.125, window=(-1, -1), softcap=0.0)
    cuflash.attention(q, k, v, **base)
    cuflash.attention(q, k, v, **dict(base, **change))
    assert _builds() == 2
    launches = device.take_launches()
    assert launches[0][4] != launches[1][4] or launches[0][0] != launches[1][0]


def test_shape_dtype_stride_and_alignment_give_their_own_entries(device):
    q, k, v = _qkv(device)
    cuflash.attention(q, k, v)
    cuflash.attention(*_qkv(device, shape=(2, 4, 256, 64)))            # shape
    cuflash.attention(*_qkv(device, dtype=np.float16))                 # dtype
    t = device.empty((2, 128, 4, 64), BF16).transpose(0, 2, 1, 3)     # strides
    cuflash.attention(t, t, t)
    offset = device.empty((2 * 4 * 128 * 64 + 4,), BF16)[4:].reshape(SHAPE)  # 16-byte alignment
    cuflash.attention(offset, k, v)
    assert _builds() == 5
    cuflash.attention(t, t, t)
    assert _builds() == 5


def test_a_bool_option_given_as_an_int_is_refused_every_time(device):
    q, k, v = _qkv(device)
    cuflash.attention(q, k, v, causal=True)
    for _ in range(2):
        with pytest.raises(TypeError, match="causal must be True or False"):
            cuflash.attention(q, k, v, causal=1)


def test_out_overlapping_an_input_is_refused_on_the_cached_path(device):
    q, k, v = _qkv(device)
    out = device.empty(SHAPE, BF16)
    cuflash.attention(q, k, v, out=out)
    cuflash.attention(q, k, v, out=out)
    assert _builds() == 1
    with pytest.raises(ValueError, match="share memory with k"):
        cuflash.attention(q, k, k, out=k)  # new signature: validated
    with pytest.raises(ValueError, match="share memory with q"):
        cuflash.attention(q, k, v, out=q)  # out's layout equals the cached one's: checked per call


def test_alibi_slopes_are_keyed_by_layout_and_copied_per_call(device):
    q, k, v = _qkv(device)
    slopes = device.empty((4,), np.float32)
    cuflash.attention(q, k, v, alibi_slopes=slopes)
    cuflash.attention(q, k, v, alibi_slopes=device.empty((4,), np.float32))
    assert _builds() == 1
    cuflash.attention(q, k, v, alibi_slopes=device.empty((2, 4), np.float32))
    assert _builds() == 2


def test_a_repeated_backward_reuses_its_entry_and_sends_the_same_arguments(device):
    q, k, v = _qkv(device)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    dout = device.empty(SHAPE, BF16)
    first = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    builds = _builds()
    device.take_launches()
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    cached = device.take_launches()
    assert _builds() == builds
    assert [g.shape for g in grads] == [g.shape for g in first] == [SHAPE] * 3
    uncached = _uncached(device, lambda: cuflash.attention_backward(
        dout, q, k, v, out, lse, causal=True, deterministic=True))
    assert [launch[:4] for launch in cached] == [launch[:4] for launch in uncached]
    assert len(cached) == 3
    # The gradient and workspace pointers are fresh each call; nothing else differs.
    assert [len(launch[4]) for launch in cached] == [len(launch[4]) for launch in uncached]
    fixed = slice(0, 6 * 8), slice(12 * 8, None)  # q k v o dout lse | the rest after dq_accum
    for a, b in zip(cached, uncached):
        assert all(a[4][part] == b[4][part] for part in fixed)


@pytest.mark.parametrize("return_lse", [True, False])
def test_cached_calls_allocate_their_outputs_and_one_workspace(device, monkeypatch, return_lse):
    """A cached forward allocates out (and lse when returned); a cached backward dq, dk, dv as
    arrays and its workspace as raw memory of the prepared size, and nothing else: no
    ``cupy.empty`` (whose wrapper costs more per call)."""
    import cupy

    from cuflash.kernels import _launch

    q, k, v = _qkv(device)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    dout = device.empty(SHAPE, BF16)
    cuflash.attention(q, k, v, causal=True, return_lse=return_lse)
    cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    made = []
    for name, module in (("new_array", _launch), ("device_memory", _launch), ("empty", cupy)):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, real=real, name=name: made.append(
            (name, args)) or real(*args))
    hits = _calls.stats()["hits"]
    cuflash.attention(q, k, v, causal=True, return_lse=return_lse)
    assert made == [("new_array", (SHAPE, np.dtype(BF16)))] + (
        [("new_array", (SHAPE[:3], np.dtype(np.float32)))] if return_lse else [])
    made.clear()
    cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    assert _calls.stats()["hits"] == hits + 2
    cached = list(made)
    made.clear()
    _calls.clear()
    cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)  # the validated path
    assert [m[0] for m in cached] == ["new_array"] * 3 + ["device_memory"]
    assert [m for m in made if m[0] == "device_memory"] == [cached[-1]]  # the same workspace size


def _pass_call(device, name):
    """A call of pass ``name`` (dense or packed), its forward's results made first."""
    if name.startswith("varlen"):
        q, k, v, dout = (device.empty((700, 4, 64), BF16) for _ in range(4))
        cu = device.empty((4,), np.int32)
        layout = (cu, cu, 300, 300)
        out, lse = cuflash.attention_varlen(q, k, v, *layout, causal=True, return_lse=True,
                                            check_offsets=False)
        if name == "varlen forward":
            return lambda: cuflash.attention_varlen(q, k, v, *layout, causal=True,
                                                    check_offsets=False)
        return lambda: cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *layout,
                                                         causal=True, check_offsets=False)
    q, k, v = _qkv(device)
    dout = device.empty(SHAPE, BF16)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    if name == "forward":
        return lambda: cuflash.attention(q, k, v, causal=True)
    return lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)


@pytest.mark.parametrize("name", ["forward", "backward", "varlen forward", "varlen backward"])
def test_a_first_call_prepares_one_launch_for_its_run_and_its_entry(device, monkeypatch, name):
    """The validated run and the cache entry built after it share the launch prepared for the
    run (preparing it took a few hundred microseconds of host time each), which is let go with
    the call; the next call launches it through the entry."""
    from cuflash import kernels

    call = _pass_call(device, name)
    _calls.clear()
    builds, hits = _builds(), _calls.stats()["hits"]
    prepared = []
    real = kernels._prepared
    monkeypatch.setattr(kernels, "_prepared", lambda family, spec, arrays: prepared.append(
        real(family, spec, arrays)) or prepared[-1])
    call()
    assert len(prepared) == 1 and prepared[0] is not None and _builds() == builds + 1
    assert any(prepared[0] in (getattr(entry, "launch", None),
                               getattr(getattr(entry, "dense", None), "launch", None))
               for entry in _calls._entries.values())
    assert kernels._reused.launches is None
    call()
    assert len(prepared) == 1 and _builds() == builds + 1 and _calls.stats()["hits"] == hits + 1


def test_a_prepared_launch_is_shared_only_by_the_same_spec_and_layout(device):
    """Inside ``reusing_launches``: the same spec object and array layouts give the launch
    prepared first; another spec, another layout (strides, 16-byte alignment) or another pass
    each get their own."""
    from cuflash import _api, kernels

    q, k, v = _qkv(device)
    out = device.empty(SHAPE, BF16)
    spec = _api._spec(q, k, v, causal=True)[1]
    other_spec = _api._spec(q, k, v, causal=True)[1]
    unaligned = device.laid_out(SHAPE, BF16, "unaligned")
    padded = device.laid_out(SHAPE, BF16, "padded")
    with kernels.reusing_launches():
        first = kernels.prepare("forward", spec, (q, k, v, out))
        assert kernels.prepare("forward", spec, (*_qkv(device), device.empty(SHAPE, BF16))) is first
        assert kernels.prepare("forward", other_spec, (q, k, v, out)) is not first
        assert kernels.prepare("forward", spec, (q, k, v, padded)) is not first
        assert kernels.prepare("forward", spec, (q, k, v, unaligned)) is not first
    assert kernels.prepare("forward", spec, (q, k, v, out)) is not first  # outside: prepared anew


SEEDS_AND_OFFSETS = [(2, 0), (2**64 - 1, 7), (1, 2**32 - 1), (12345, 3)]


def _dropout_calls(device, varlen=False):
    """``(forward(seed, offset), backward(seed, offset))`` of one problem with dropout."""
    if varlen:
        q, k, v = (device.empty((700, 4, 64), BF16) for _ in range(3))
        cu = device.empty((4,), np.int32)
        layout = (cu, cu, 300, 300)
        out, lse = cuflash.attention_varlen(q, k, v, *layout, causal=True, return_lse=True,
                                            check_offsets=False)
        dout = device.empty(out.shape, BF16)

        def forward(seed, offset):
            return cuflash.attention_varlen(q, k, v, *layout, causal=True, dropout_p=0.1,
                                            dropout_seed=seed, dropout_offset=offset,
                                            check_offsets=False)

        def backward(seed, offset):
            return cuflash.attention_varlen_backward(
                dout, q, k, v, out, lse, *layout, causal=True, dropout_p=0.1, dropout_seed=seed,
                dropout_offset=offset, check_offsets=False)

        return forward, backward
    q, k, v = _qkv(device)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    dout = device.empty(SHAPE, BF16)

    def forward(seed, offset):
        return cuflash.attention(q, k, v, causal=True, dropout_p=0.1, dropout_seed=seed,
                                 dropout_offset=offset)

    def backward(seed, offset):
        return cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, dropout_p=0.1,
                                          dropout_seed=seed, dropout_offset=offset)

    return forward, backward


def _fresh_fields_blank(launches, backward):
    """The launches with the fields a call allocates afresh blanked out (out and lse; or the
    gradients and the workspace: BWD_ARGS fields 6-11)."""
    if not backward:
        return _output_fields_blank(launches)
    return [(expression, grid, block, shared, record[:48] + b"P" * 48 + record[96:])
            for expression, grid, block, shared, record in launches]


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_dropout_seeds_and_offsets_share_one_entry_and_reach_the_kernels(device, varlen, backward):
    """A training loop draws a new dropout seed for every call: calls that differ only in their
    seed or offset keep one entry, and each sends the bytes the validated path sends for its own
    seed and offset."""
    call = _dropout_calls(device, varlen)[backward]
    call(1, 0)
    builds = _builds()
    cached = []
    for seed, offset in SEEDS_AND_OFFSETS:
        device.take_launches()
        call(seed, offset)
        cached.append(device.take_launches())
    assert _builds() == builds
    assert len({tuple(launch[4] for launch in launches) for launches in cached}) == len(cached)
    for (seed, offset), launches in zip(SEEDS_AND_OFFSETS, cached):
        uncached = _uncached(device, lambda: call(seed, offset))
        assert _fresh_fields_blank(launches, backward) == _fresh_fields_blank(uncached, backward)


@pytest.mark.parametrize("seed, offset, error, match", [
    (-1, 0, ValueError, r"dropout_seed must be an int in \[0, 2\*\*64\)"),
    (2**64, 0, ValueError, "dropout_seed must be an int"),
    (1.5, 0, TypeError, "dropout_seed must be an int"),
    (None, 0, ValueError, "needs an explicit dropout_seed"),
    (1, 2**32, ValueError, "dropout_offset must be an int"),
    (1, "0", TypeError, "dropout_offset must be an int"),
])
def test_a_cached_dropout_call_checks_its_seed_and_offset(device, seed, offset, error, match):
    forward, backward = _dropout_calls(device)
    for call in (forward, backward):
        call(1, 0)
        call(2, 0)
        with pytest.raises(error, match=match):
            call(seed, offset)


def _seed_words(launch, backward):
    """``(drop_state, seed lo, seed hi, offset)`` as a launch's argument bytes hold them."""
    fields = (_launch.BWD_ARGS if backward else _launch.FWD_ARGS).fields
    record = launch[4]
    state = fields["drop_state"][1]
    return (int.from_bytes(record[state:state + 8], "little"),
            *(int.from_bytes(record[fields[name][1]:fields[name][1] + 4], "little")
              for name in ("drop_seed_lo", "drop_seed_hi", "drop_offset")))


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_a_seed_array_reaches_the_kernels_as_its_address(device, varlen, backward):
    """A CuPy seed array is read by the kernels when they run: its address is sent in place of
    the seed words (all 0), cached and uncached alike, in the entry an int seed uses."""
    call = _dropout_calls(device, varlen)[backward]
    call(5, 1)
    builds = _builds()
    arrays = [device.empty((2,), np.uint64) for _ in range(2)]
    for seed in (*arrays, 9, arrays[0]):
        device.take_launches()
        call(seed, 0)
        launches = device.take_launches()
        words = (0, 9, 0, 0) if isinstance(seed, int) else (seed.data.ptr, 0, 0, 0)
        assert {_seed_words(launch, backward) for launch in launches} == {words}
        uncached = _uncached(device, lambda: call(seed, 0))
        assert _fresh_fields_blank(launches, backward) == _fresh_fields_blank(uncached, backward)
        call(5, 1)  # an int seed through the entry that call made
    assert _builds() == builds + 4  # the four uncached calls alone


def _on_device_1(shape, dtype):
    import cupy
    from cupy.cuda import memory

    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    mem = memory.UnownedMemory(0x7100 << 32, size, None, device_id=1)
    return cupy.ndarray(shape, dtype, memptr=memory.MemoryPointer(mem, 0))


@pytest.mark.parametrize("make, offset, error, match", [
    (lambda d: d.empty((2,), np.int64), 0, TypeError, r"uint64 array .*got dtype int64"),
    (lambda d: d.empty((3,), np.uint64), 0, ValueError, r"got shape \(3,\)"),
    (lambda d: d.empty((4,), np.uint64)[::2], 0, ValueError, "not contiguous"),
    (lambda d: d.empty((17,), np.uint8)[1:].view(np.uint64), 0, ValueError,
     "aligned to 8 bytes"),
    (lambda d: d.empty((2,), np.uint64), 1, ValueError, "dropout_offset must be 0"),
    (lambda d: d.empty((2,), np.uint64), None, TypeError, "dropout_offset must be an int"),
    (lambda d: np.zeros(2, np.uint64), 0, TypeError, "on device 0 like q, got numpy.ndarray"),
    (lambda d: [1, 2], 0, TypeError, r"an int in \[0, 2\*\*64\), or a uint64 array"),
    (lambda d: _on_device_1((2,), np.uint64), 0, ValueError,
     "dropout_seed must be on device 0 like q, got device 1"),
])
def test_a_seed_array_is_checked(device, make, offset, error, match):
    forward, backward = _dropout_calls(device)
    for call in (forward, backward):
        call(1, 0)  # cached, then refused there
        with pytest.raises(error, match=match):
            call(make(device), offset)
        _calls.clear()  # and on the validated path
        with pytest.raises(error, match=match):
            call(make(device), offset)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("cached", [False, True], ids=["validated", "cached"])
@pytest.mark.parametrize("p", [0.1, 0.0])
def test_a_vjp_s_seed_copy_lives_with_the_captured_results(device, monkeypatch, varlen, cached,
                                                          p):
    """attention_vjp (and attention_varlen_vjp) copies a seed array (with dropout only) for both
    passes; under capture the graph writes the copy at every replay, so it must live as long as
    the call's results, not die with the vjp."""
    import gc
    import weakref

    import cupy
    import fake_device

    copies = []

    class SeedArray(cupy.ndarray):  # a CuPy array whose copies the test can watch
        def copy(self, order="C"):
            made = device.empty((2,), np.uint64)
            copies.append(weakref.ref(made))
            return made

    SeedArray.__module__ = "cupy.seed_array"
    state = device.empty((2,), np.uint64).view(SeedArray)
    if varlen:
        q, k, v, dout = (device.empty((700, 4, 64), BF16) for _ in range(4))
        cu = device.empty((4,), np.int32)

        def vjp_of():
            return cuflash.attention_varlen_vjp(q, k, v, cu, cu, 300, 300, causal=True,
                                                dropout_p=p, dropout_seed=state,
                                                check_offsets=False)
    else:
        q, k, v, dout = (device.empty(SHAPE, BF16) for _ in range(4))

        def vjp_of():
            return cuflash.attention_vjp(q, k, v, causal=True, dropout_p=p, dropout_seed=state)

    def step():
        out, vjp = vjp_of()
        return [out, *vjp(dout)]

    if cached:
        step()
    monkeypatch.setattr(fake_device.FakeStream, "is_capturing", lambda self: True)
    monkeypatch.setattr(_calls, "stream_capturing", lambda: True)
    copies.clear()
    results = step()
    gc.collect()
    assert len(copies) == (1 if p else 0)  # without dropout nothing reads it: no copy
    assert all(copy() is not None for copy in copies)
    del results
    gc.collect()
    assert all(copy() is None for copy in copies)


@pytest.mark.parametrize("return_lse", [False, True])
def test_a_cached_forward_asks_the_stream_about_capture_only_for_what_a_replay_needs(
        device, monkeypatch, return_lse):
    """Under capture a cached forward keeps its lse (which every replay writes) alive with its
    output; a call with no lse and no buffers of its own keeps nothing, so it does not ask the
    stream whether it captures (a driver query per call). A fake device whose stream captures
    once the call is cached."""
    import gc
    import weakref

    import fake_device

    q, k, v = _qkv(device)
    cuflash.attention(q, k, v, causal=True, return_lse=return_lse)  # cached from here
    asked = []

    def capturing(self):
        asked.append(self)
        return True

    monkeypatch.setattr(fake_device.FakeStream, "is_capturing", capturing)
    hits = _calls.stats()["hits"]
    result = cuflash.attention(q, k, v, causal=True, return_lse=return_lse)
    assert _calls.stats()["hits"] == hits + 1
    assert len(asked) == return_lse
    if not return_lse:
        return
    out, lse = result
    lse_ref = weakref.ref(lse)
    del lse, result
    gc.collect()
    assert lse_ref() is not None  # a replay would write it: it lives as long as out
    del out
    gc.collect()
    assert lse_ref() is None


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_a_refused_vjp_copies_no_seed_array(device, varlen):
    """A vjp copies a seed array for its two passes only once the forward's checks have passed:
    a refused call (here for k's head dimension) copies nothing, and names what the forward
    names."""
    import cupy

    copies = []

    class SeedArray(cupy.ndarray):  # a CuPy array whose copies the test can watch
        def copy(self, order="C"):
            copies.append(self)
            return device.empty((2,), np.uint64)

    SeedArray.__module__ = "cupy.seed_array"
    state = device.empty((2,), np.uint64).view(SeedArray)
    dropout = dict(dropout_p=0.1, dropout_seed=state)
    if varlen:
        q, v = (device.empty((700, 4, 64), BF16) for _ in range(2))
        k = device.empty((700, 4, 32), BF16)
        cu = device.empty((4,), np.int32)
        args = (q, k, v, cu, cu, 300, 300)
        forward, vjp = cuflash.attention_varlen, cuflash.attention_varlen_vjp
        dropout.update(check_offsets=False)
    else:
        q, v = (device.empty(SHAPE, BF16) for _ in range(2))
        k = device.empty(SHAPE[:-1] + (32,), BF16)
        args = (q, k, v)
        forward, vjp = cuflash.attention, cuflash.attention_vjp
    with pytest.raises(ValueError) as expected:
        forward(*args, **dropout)
    with pytest.raises(ValueError) as got:
        vjp(*args, **dropout)
    assert str(got.value) == str(expected.value)
    assert len(copies) == 0, "the seed array was copied"


@pytest.mark.parametrize("cached", [False, True], ids=["validated", "cached"])
def test_a_varlen_vjp_s_device_offsets_live_with_the_captured_gradients(device, monkeypatch,
                                                                        cached):
    """attention_varlen_vjp copies NumPy offsets to the device once, for both passes; the
    backward's kernels read that copy, which nothing but the vjp holds. Under capture the graph
    reads it at every replay, so it must live as long as the gradients, cached call or not."""
    import gc
    import weakref

    import cupy
    import fake_device

    copies = []

    def to_device(x, dtype=None):  # (the copy itself needs the device)
        if isinstance(x, cupy.ndarray):
            return x
        made = device.empty(x.shape, x.dtype)
        copies.append(weakref.ref(made))
        return made

    monkeypatch.setattr(cupy, "asarray", to_device)
    monkeypatch.setattr(_launch, "copy_to_device", lambda host, stream: (to_device(host), host))
    q, k, v, dout = (device.empty((700, 4, 64), BF16) for _ in range(4))
    offsets = np.array([0, 300, 500, 700], np.int32)

    def step():
        out, vjp = cuflash.attention_varlen_vjp(q, k, v, offsets, offsets, 300, 300, causal=True)
        return out, vjp(dout)

    if cached:
        step()
    hits = _calls.stats()["hits"]
    monkeypatch.setattr(fake_device.FakeStream, "is_capturing", lambda self: True)
    monkeypatch.setattr(_calls, "stream_capturing", lambda: True)
    copies.clear()
    out, grads = step()
    assert _calls.stats()["hits"] == hits + cached
    captured = list(copies)
    # The capture ends; the next step's vjp (new offsets copies) follows.
    monkeypatch.setattr(fake_device.FakeStream, "is_capturing", lambda self: False)
    monkeypatch.setattr(_calls, "stream_capturing", lambda: False)
    step()
    del out
    gc.collect()
    assert captured and all(copy() is not None for copy in captured)
    del grads
    _calls.clear()  # (an entry built by the captured step keeps its spec, offsets and all)
    gc.collect()
    assert all(copy() is None for copy in captured)


@pytest.mark.parametrize("call", ["forward", "backward", "vjp"])
def test_numpy_offsets_staged_under_capture_live_with_the_results(device, monkeypatch, call):
    """A packed call with NumPy offsets copies them to the device through a pinned host buffer;
    under capture the graph's copy reads that buffer at every replay, so it must live as long as
    the call's results. (CuPy's own staging buffer, which ``cupy.asarray`` lets go once the
    stream has passed the copy, is stood in for here by one that nothing keeps.)"""
    import gc
    import weakref

    import cupy
    import fake_device

    staged = []

    def staging(host):
        buffer = np.array(host)  # (pinned memory needs the device)
        staged.append(weakref.ref(buffer))
        return buffer

    def to_device(x, dtype=None):  # CuPy's: through a staging buffer it lets go of
        if isinstance(x, cupy.ndarray):
            return x
        staging(x)
        return device.empty(x.shape, x.dtype)

    monkeypatch.setattr(cupy, "asarray", to_device)
    monkeypatch.setattr(_launch, "copy_to_device",
                        lambda host, stream: (device.empty(host.shape, host.dtype), staging(host)))
    q, k, v, dout = (device.empty((700, 4, 64), BF16) for _ in range(4))
    offsets = np.array([0, 300, 500, 700], np.int32)
    if call == "backward":
        out, lse = (device.empty((700, 4, 64), BF16), device.empty((4, 700), np.float32))
    monkeypatch.setattr(fake_device.FakeStream, "is_capturing", lambda self: True)
    monkeypatch.setattr(_calls, "stream_capturing", lambda: True)
    if call == "forward":
        results = cuflash.attention_varlen(q, k, v, offsets, offsets, 300, 300, causal=True)
    elif call == "backward":
        results = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, offsets, offsets,
                                                    300, 300, causal=True)
    else:
        out, vjp = cuflash.attention_varlen_vjp(q, k, v, offsets, offsets, 300, 300, causal=True)
        results = (out, vjp(dout))
        del out, vjp
    gc.collect()
    assert staged and all(buffer() is not None for buffer in staged)
    del results
    _calls.clear()
    gc.collect()
    assert all(buffer() is None for buffer in staged)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_a_vjp_s_copies_outlive_a_backward_on_another_stream(device, monkeypatch, varlen):
    """A vjp's backward reads what its forward allocated on the forward's stream (the ALiBi
    slopes copy, the copy of a seed array, the device copy of NumPy offsets, out and lse). CuPy's
    pool hands memory freed by the vjp back to that stream, whose later work could write it while
    a backward run on another stream still reads it: there the copies live on until that stream
    has run past the backward (an event recorded on it after the backward's kernels), not only
    as long as the vjp, and then go without waiting for a later call. On the forward's own
    stream nothing is held past the vjp."""
    import gc
    import weakref

    import cupy

    copies = []

    def watched(made):
        copies.append(weakref.ref(made))
        return made

    class SeedArray(cupy.ndarray):  # a CuPy array whose copies the test can watch
        def copy(self, order="C"):
            return watched(device.empty((2,), np.uint64))

    SeedArray.__module__ = "cupy.seed_array"
    state = device.empty((2,), np.uint64).view(SeedArray)
    monkeypatch.setattr(cuflash._checks, "alibi_copy", lambda slopes, shapes, xp: watched(
        device.empty((shapes.b, shapes.hq), np.float32)))
    monkeypatch.setattr(cupy, "asarray", lambda x, dtype=None: x if isinstance(x, cupy.ndarray)
                        else watched(device.empty(x.shape, x.dtype)))
    slopes = device.empty((4,), np.float32)
    options = dict(causal=True, alibi_slopes=slopes, dropout_p=0.1, dropout_seed=state)
    if varlen:
        q, k, v, dout = (device.empty((700, 4, 64), BF16) for _ in range(4))
        offsets = np.array([0, 300, 500, 700], np.int32)

        def vjp_of():
            return cuflash.attention_varlen_vjp(q, k, v, offsets, offsets, 300, 300, **options)
    else:
        q, k, v, dout = (device.empty(SHAPE, BF16) for _ in range(4))

        def vjp_of():
            return cuflash.attention_vjp(q, k, v, **options)

    vjp_of()[1](dout)  # (the entries it builds keep their first call's copies)
    for other_stream in (False, True):
        copies.clear()
        out, vjp = vjp_of()
        made = list(copies)  # by the forward, for both passes
        assert len(made) == (4 if varlen else 2)  # slopes, seed (and cu_q, cu_k)
        if other_stream:
            device.streams.append(0x6000)
        grads = vjp(dout)
        device.streams[1:] = []
        del out, vjp, grads
        _calls.clear()  # (a varlen entry keeps the last offsets it was called with)
        gc.collect()
        if not other_stream:
            assert all(copy() is None for copy in made)
            continue
        time.sleep(0.05)  # (time enough for copies let go too early to be gone)
        gc.collect()
        assert all(copy() is not None for copy in made)
        (event,) = [e for e in device.events if e.stream == 0x6000]
        assert not event.done
        event.done = True  # the stream has passed the backward: with no later call,
        _wait_until(lambda: gc.collect() is not None and all(copy() is None for copy in made))


def _wait_until(condition, seconds=5.0):
    """Wait for ``condition()`` (what a thread of the library does), failing after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.01)


def test_seeds_without_dropout_change_nothing(device):
    q, k, v = _qkv(device)
    cuflash.attention(q, k, v, causal=True)
    device.take_launches()
    cuflash.attention(q, k, v, causal=True, dropout_seed=7, dropout_offset=3)
    seeded = device.take_launches()
    cuflash.attention(q, k, v, causal=True)
    plain = device.take_launches()
    assert _builds() == 1
    assert _output_fields_blank(seeded) == _output_fields_blank(plain)
    with pytest.raises(TypeError, match="dropout_seed must be an int"):
        cuflash.attention(q, k, v, causal=True, dropout_seed="7")


def test_deterministic_gives_its_own_backward_entry(device):
    q, k, v = _qkv(device)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    dout = device.empty(SHAPE, BF16)
    cuflash.attention_backward(dout, q, k, v, out, lse)
    builds = _builds()
    cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True)
    assert _builds() == builds + 1


def test_vjp_goes_through_the_cache(device):
    q, k, v = _qkv(device)
    dout = device.empty(SHAPE, BF16)
    for _ in range(3):
        out, vjp = cuflash.attention_vjp(q, k, v, causal=True)
        vjp(dout)
    assert _builds() == 2  # one forward and one backward entry
    assert _calls.stats()["hits"] == 4


def test_numpy_calls_are_never_cached():
    _calls.clear()
    q = np.zeros((1, 2, 16, 32), np.float32)
    cuflash.attention(q, q, q)
    assert _calls.stats()["entries"] == 0


def test_backward_of_2d_inputs_is_not_cached(device):
    q, k, v = _qkv(device, shape=(128, 64))
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert _builds() == 1  # the forward writes 2-D outputs in place
    entry = _calls._BackwardEntry.build(device.cupy, cuflash._api._spec(q, k, v)[1], out, q, k,
                                        v, out, lse, (q, k, v))
    assert entry is _calls._UNCACHED


def test_a_cached_hopper_forward_encodes_its_tma_descriptors_for_each_call(monkeypatch):
    """The TMA descriptors hold the data addresses: a cached call must describe its own arrays."""
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    cuflash.attention(*_qkv(device))
    q, k, v = _qkv(device)
    device.side_arguments.clear()
    cuflash.attention(q, k, v)
    assert _builds() == 1 and _calls.stats()["hits"] == 1
    ((maps, tile_count, tile_counter),) = device.side_arguments
    assert int(tile_counter) == 0  # as many thread blocks as tiles: no counter
    addresses = maps["bits"][0][::16]  # the stand-in descriptor starts with the address
    assert [int(a) for a in addresses] == [q.data.ptr, k.data.ptr, v.data.ptr]
    assert int(tile_count) == SHAPE[0] * SHAPE[1] * -(-SHAPE[2] // 192)


def test_a_persistent_hopper_forward_sends_its_streams_tile_counter(monkeypatch):
    """More query tiles than the SMs hold: one block per SM, with the address of the counter of
    the stream the call runs on (a counter per stream; launches on one stream run in turn)."""
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    q, k, v = _qkv(device, (2, 16, 1100, 128))  # 2 · 16 · 9 tiles of 128 rows
    for stream in (0x5000, 0x6000, 0x5000):
        device.streams.append(stream)
        device.take_launches()
        device.side_arguments.clear()
        cuflash.attention(q, k, v, causal=True)
        ((_, grid, _, _, _),) = device.take_launches()
        ((_, tile_count, tile_counter),) = device.side_arguments
        assert (grid, int(tile_count)) == ((132,), 2 * 16 * 9)
        assert int(tile_counter) == stream << 16  # the stand-in's counter address for the stream


# ----------------------------------------------------------------------------- what is sent

# The argument fields a cached call fills from fresh allocations (outputs, lse, the backward's
# workspace, the ALiBi copy): they differ from call to call, whatever the path.
FRESH_FIELDS = {"forward": ("o", "lse", "alibi"),
                "backward": ("grad_q", "grad_k", "grad_v", "lse2", "delta", "dq_accum", "alibi")}


def _sent(device, call, fresh=FRESH_FIELDS):
    """What `call` sends the kernels: per launch (expression, grid, block, shared memory,
    argument bytes with the `fresh` fields zeroed), and the bytes of the other arguments."""
    from cuflash.kernels import _launch

    device.take_launches()
    device.side_arguments.clear()
    call()
    layouts = {"forward": _launch.FWD_ARGS, "backward": _launch.BWD_ARGS}
    launches = []
    for expression, grid, block, shared, record in device.take_launches():
        (pass_name,) = [name for name, dtype in layouts.items() if dtype.itemsize == len(record)]
        # A view of a copy of the bytes: NumPy's copy of a record with padding may leave the
        # padding uninitialised, and the bytes sent are what is compared.
        args = np.frombuffer(bytearray(record), layouts[pass_name])
        for name in fresh[pass_name]:
            args[name] = 0
        launches.append((expression, grid, block, shared, args.tobytes()))
    return launches, [tuple(a.tobytes() for a in side) for side in device.side_arguments]


def _on_fake_device(monkeypatch, device, mask):
    """``mask`` with its device tile index in made-up device memory (the real one uploads)."""
    device.holds_block_masks(monkeypatch)
    return mask


def _case_options(case, device, monkeypatch):
    if case == "alibi":
        return dict(alibi_slopes=device.empty((SHAPE[1],), np.float32))
    if case == "block-mask":
        from cuflash.sparse import BlockMask

        layout = np.tril(np.ones((2, 2), np.int8))  # 128 x 128 blocks of 256 x 256 scores
        return dict(block_mask=_on_fake_device(monkeypatch, device,
                                               BlockMask.from_dense(layout, block_size=128)))
    return {"causal": dict(causal=True),
            "window-softcap": dict(window=(32, 0), softcap=20.0),
            "dropout": dict(dropout_p=0.1, dropout_seed=2**40 + 7, dropout_offset=3)}[case]


@pytest.mark.parametrize("case", ["causal", "window-softcap", "alibi", "dropout", "block-mask"])
def test_cached_calls_send_what_the_validated_path_sends(device, monkeypatch, case):
    """Forward and backward: the validated call (which builds the entries), the call found by its
    full signature and the call found by its quick key launch the same kernels with the same
    grid, block, shared memory and argument bytes (fresh allocations aside)."""
    shape = SHAPE[:2] + (256, SHAPE[3])
    q, k, v, dout = (device.empty(shape, BF16) for _ in range(4))
    options = _case_options(case, device, monkeypatch)
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    calls = (lambda: cuflash.attention(q, k, v, return_lse=True, **options),
             lambda: cuflash.attention_backward(dout, q, k, v, out, lse, **options))
    _calls.clear()
    builds = _builds()
    validated = [_sent(device, call) for call in calls]
    assert _builds() == builds + 2 and all(launches for launches, _ in validated)
    for _ in range(2):  # found by the full signature, then by the quick key
        hits = _calls.stats()["hits"]
        assert [_sent(device, call) for call in calls] == validated
        assert _calls.stats()["hits"] == hits + 2 and _builds() == builds + 2
    assert len(_calls._quick) == 2


# ----------------------------------------------------------------------------- given gradients

def _seq_major(device, shape=SHAPE, dtype=BF16):
    """A (B, H, N, D) array laid out (B, N, H, D) in memory: what ``torch.empty_like`` gives for
    a (B, N, H, D) tensor seen as (B, H, N, D), as the torch adapter passes its gradients."""
    b, h, n, d = shape
    return device.empty((b, n, h, d), dtype).transpose(0, 2, 1, 3)


def _seq_major_problem(device):
    q, k, v, dout = (_seq_major(device) for _ in range(4))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    return dout, q, k, v, out, lse


def _backward_fields(device, *names):
    """The fields ``names`` of each backward launch since the last look."""
    from cuflash.kernels import _launch

    return [tuple(int(np.frombuffer(record, _launch.BWD_ARGS)[name][0]) for name in names)
            for *_, record in device.take_launches() if len(record) == _launch.BWD_ARGS.itemsize]


def test_given_gradients_are_cached_and_written_in_place(device):
    problem = _seq_major_problem(device)
    (h, n, d), builds = SHAPE[1:], _builds()
    for call in range(3):  # validated, then found by the full signature, then by the quick key
        grads = tuple(_seq_major(device) for _ in range(3))
        hits = _calls.stats()["hits"]
        got = cuflash.attention_backward(*problem, causal=True, dq=grads[0], dk=grads[1],
                                         dv=grads[2])
        assert all(g is given for g, given in zip(got, grads))
        assert _calls.stats()["hits"] == hits + (call > 0) and _builds() == builds + 1
        sent = _backward_fields(device, "grad_q", "grad_k", "grad_v", "gq_sh", "gq_sn", "gv_sn")
        assert sent and all(fields == (*(g.data.ptr for g in grads), d, h * d, h * d)
                            for fields in sent)


def test_cached_given_gradients_send_what_the_validated_path_sends(device):
    problem = _seq_major_problem(device)
    grads = dict(dq=_seq_major(device), dk=_seq_major(device), dv=_seq_major(device))

    def call():
        cuflash.attention_backward(*problem, causal=True, deterministic=True, **grads)

    # Only the workspace differs from call to call: the gradients' pointers are the given ones.
    workspace = dict(FRESH_FIELDS, backward=("lse2", "delta", "dq_accum", "alibi"))
    validated = _sent(device, call, workspace)
    hits = _calls.stats()["hits"]
    assert _sent(device, call, workspace) == validated and _calls.stats()["hits"] == hits + 1


def test_each_layout_and_choice_of_given_gradients_has_its_own_entry(device):
    """Entries for given gradients of other strides, and for another choice of gradients of one
    layout, launch with those gradients' own strides."""
    problem = _seq_major_problem(device)
    (h, n, d), builds = SHAPE[1:], _builds()
    sent = []
    for grads in (dict(dq=_seq_major(device)), dict(dq=device.empty(SHAPE, BF16)),
                  dict(dk=_seq_major(device)), dict(dq=_seq_major(device))):
        cuflash.attention_backward(*problem, causal=True, **grads)
        sent.append(_backward_fields(device, "gq_sn", "gk_sn")[0])
    assert _builds() == builds + 3  # the last call is the first's signature
    assert sent == [(h * d, d), (d, d), (d, h * d), (h * d, d)]


def test_given_gradients_written_through_a_temporary_are_not_cached(device):
    dout, q, k, v, out, lse = _seq_major_problem(device)
    spec = cuflash._api._spec(q, k, v)[1]
    strided = device.empty(SHAPE[:3] + (2 * SHAPE[3],), BF16)[..., ::2]
    grads = (strided, device.empty(SHAPE, BF16), device.empty(SHAPE, BF16))
    assert _calls._BackwardEntry.build(device.cupy, spec, dout, q, k, v, out, lse, grads,
                                       given=(strided, None, None)) is _calls._UNCACHED


def test_misaligned_given_gradients_are_not_cached(device):
    problem = _seq_major_problem(device)
    offset = device.empty((SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3] + 4,), BF16)
    dq = offset[4:].reshape(SHAPE)  # 8 bytes past a 16-byte boundary
    builds, hits = _builds(), _calls.stats()["hits"]
    for _ in range(2):
        assert cuflash.attention_backward(*problem, causal=True, dq=dq)[0] is dq
    assert _builds() == builds and _calls.stats()["hits"] == hits


def test_given_gradients_overlapping_are_refused_on_the_cached_path(device, monkeypatch):
    dout, q, k, v, out, lse = _seq_major_problem(device)

    def grads(**given):
        return dict(dict(dq=_seq_major(device), dk=_seq_major(device), dv=_seq_major(device)),
                    **given)

    for _ in range(2):
        cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, **grads())

    def validated(*args, **kwargs):
        raise AssertionError("the cached path passed this call on")

    monkeypatch.setattr(cuflash._api, "validated_backward", validated)
    shared = _seq_major(device)
    out_memory = device.cupy.lib.stride_tricks.as_strided(out, SHAPE, shared.strides)
    # Each of the cached layout: the overlap is found per call, from the pointers.
    for given, message in [(dict(dq=q), "dq must not share memory with q"),
                           (dict(dk=dout), "dk must not share memory with dout"),
                           (dict(dv=out_memory), "dv must not share memory with out"),
                           (dict(dq=shared, dv=shared), "dv must not share memory with dq")]:
        with pytest.raises(ValueError, match=message):
            cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, **grads(**given))


def test_given_gradients_of_another_module_or_device_are_refused(device):
    import cupy
    from cupy.cuda import memory

    problem = _seq_major_problem(device)
    with pytest.raises(TypeError, match="dk must be a cupy.ndarray like q, got numpy.ndarray"):
        cuflash.attention_backward(*problem, causal=True, dk=np.empty(SHAPE, BF16))
    mem = memory.UnownedMemory(0x7000 << 32, 2 * int(np.prod(SHAPE)), None, device_id=1)
    elsewhere = cupy.ndarray(SHAPE, BF16, memptr=memory.MemoryPointer(mem, 0))
    with pytest.raises(ValueError, match="dv must be on device 0 like q, got device 1"):
        cuflash.attention_backward(*problem, causal=True, dv=elsewhere)


def _bytes_cupy_sends(argument, size):
    """The parameter bytes CuPy hands the driver for a NumPy scalar argument (what
    cupy/cuda/function.pyx does with one: a CScalar holding a copy)."""
    import ctypes

    from cupy._core._scalar import CScalar

    held = CScalar(argument)  # its copy lives as long as it does
    return ctypes.string_at(held.ptr, size)


def test_structs_reach_cupy_as_scalars_that_hold_the_packed_bytes():
    """The launchers hand CuPy each struct (and the TMA descriptors) as a NumPy scalar
    (_launch.by_value); CuPy sends the bytes a 1-element record would have sent."""
    from cuflash.kernels import _launch, _tma

    values = {name: index for index, name in enumerate(_launch.FWD_ARGS.names)}
    # A call with dropout's per-call fields: 64-bit pointers, then dropout's 32-bit words
    fields = _launch.FWD_POINTERS + _launch.DROPOUT_WORDS
    packed = _launch.PackedArgs(_launch.FWD_ARGS, fields, values)
    per_call = (tuple(range(1 << 40, (1 << 40) + len(_launch.FWD_POINTERS)))
                + tuple(range(0xFFFFFFF0, 0xFFFFFFF0 + len(_launch.DROPOUT_WORDS))))
    argument = packed.pack(per_call)
    assert isinstance(argument, np.void)
    record = np.zeros(1, _launch.FWD_ARGS)
    for name in _launch.FWD_ARGS.names:
        record[name] = values[name]
    for name, value in zip(fields, per_call):
        record[name] = value
    assert _bytes_cupy_sends(argument, record.nbytes) == record.tobytes()

    descriptors = [np.arange(16, dtype=np.uint64) * (i + 3) for i in range(3)]
    maps = _tma.pack(descriptors)
    assert isinstance(maps, np.void)
    assert _bytes_cupy_sends(maps, 384) == np.concatenate(descriptors).tobytes()


# ----------------------------------------------------------------------------- quick keys

def _warm(device, q, k, v, **options):
    """Three calls: the quick key of these options then holds the entry."""
    for _ in range(3):
        cuflash.attention(q, k, v, **options)
    assert len(_calls._quick) == 1


def test_a_quick_key_tells_option_types_apart(device):
    q, k, v = _qkv(device)
    _warm(device, q, k, v, causal=True, scale=1.0)
    with pytest.raises(TypeError, match="causal must be True or False"):
        cuflash.attention(q, k, v, causal=1, scale=1.0)
    cuflash.attention(q, k, v, causal=True, scale=1)  # equal to 1.0, but another signature
    assert _builds() == 2
    cuflash.attention(q, k, v, causal=True, scale=float("1.0"))  # a new object, same signature
    assert _builds() == 2


def test_a_quick_key_tells_alignment_and_device_apart(device):
    import cupy
    from cupy.cuda import memory

    q, k, v = _qkv(device)
    _warm(device, q, k, v, causal=True)
    offset = device.empty((2 * 4 * 128 * 64 + 4,), BF16)[4:].reshape(SHAPE)
    cuflash.attention(offset, k, v, causal=True)
    assert _builds() == 2

    def on_device_1():
        mem = memory.UnownedMemory(0x7000 << 32, 2 * 4 * 128 * 64 * 2, None, device_id=1)
        return cupy.ndarray(SHAPE, BF16, memptr=memory.MemoryPointer(mem, 0))

    cuflash.attention(on_device_1(), on_device_1(), on_device_1(), causal=True)
    assert _builds() == 3


def test_a_quick_key_reads_the_layout_of_alibi_slopes_reshaped_in_place(device):
    q, k, v = _qkv(device)
    slopes = device.empty((4,), np.float32)
    _warm(device, q, k, v, alibi_slopes=slopes)
    slopes.shape = (1, 4)  # the same object, another layout
    cuflash.attention(q, k, v, alibi_slopes=slopes)
    assert _builds() == 2


# ----------------------------------------------------------------------------- switches

def test_environment_switches_take_effect_on_the_next_cached_call(monkeypatch):
    """The Hopper switch and the warp-specialised backward's switch are part of every call's key,
    read afresh per call: setting or clearing one changes the next call's kernels."""
    from fake_device import FakeDevice

    from cuflash import kernels

    device = FakeDevice(monkeypatch, compute_capability="90")
    q, k, v, dout = (device.empty(SHAPE, BF16) for _ in range(4))

    def kernel_names():
        device.take_launches()
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
        return [launch[0].partition("<")[0] for launch in device.take_launches()]

    hopper = kernel_names()
    assert hopper[0] == "flash_fwd_sm90_tma" and hopper[2] == "flash_bwd_sm90_dkdv_ws"
    assert kernel_names() == hopper and _calls.stats()["hits"] == 2
    monkeypatch.setenv(kernels.WARP_SPECIALISED_BACKWARD_ENV, "0")
    assert kernel_names()[::2] == ["flash_fwd_sm90_tma", "flash_bwd_sm90_dkdv"]
    monkeypatch.setenv(kernels.DISABLE_HOPPER_ENV, "1")
    for _ in range(2):  # validated, then cached
        assert kernel_names()[::2] == ["flash_fwd", "flash_bwd_dkdv"]
    monkeypatch.delenv(kernels.DISABLE_HOPPER_ENV)
    monkeypatch.delenv(kernels.WARP_SPECIALISED_BACKWARD_ENV)
    assert kernel_names() == hopper


def test_switch_values_follow_every_change_made_through_os_environ(monkeypatch):
    import os

    from cuflash import kernels

    names = (kernels.DISABLE_HOPPER_ENV, kernels.WARP_SPECIALISED_BACKWARD_ENV,
             kernels.ORDERED_DQ_ENV)
    for name in names:
        monkeypatch.delenv(name, raising=False)

    def as_os_environ_has_them():
        return tuple(None if os.environ.get(name) is None else os.environ.get(name).encode()
                     for name in names)

    assert kernels.switch_values() == as_os_environ_has_them() == (None, None, None)
    for value in ("1", "0", "", "yes"):
        os.environ[names[0]] = value
        monkeypatch.setenv(names[1], value)
        os.environ.update({names[2]: value})
        assert kernels.switch_values() == as_os_environ_has_them() == (value.encode(),) * 3
    del os.environ[names[0]]
    os.environ.pop(names[1])
    os.environ.pop(names[2])
    assert kernels.switch_values() == (None, None, None)


# ----------------------------------------------------------------------------- packed sequences

def _varlen_arrays(device, options, total=700, hq=4, hkv=2, d=64):
    """q, k, v, dout and device offsets of a packed call (new pointers on every call), and the
    options with made-up ALiBi slopes where asked."""
    q, dout = (device.empty((total, hq, d), BF16) for _ in range(2))
    k, v = (device.empty((total, hkv, d), BF16) for _ in range(2))
    options = dict(options)
    if options.pop("alibi", False):
        options["alibi_slopes"] = device.empty((hq,), np.float32)
    return (q, k, v, dout, device.empty((4,), np.int32), device.empty((4,), np.int32)), options


@pytest.mark.parametrize("options", [dict(causal=True), dict(window=(40, 0), softcap=20.0),
                                     dict(alibi=True), dict(causal=True, deterministic=True)],
                         ids=["causal", "window-softcap", "alibi", "deterministic"])
def test_cached_varlen_calls_send_what_the_validated_path_sends(device, options):
    """Repeated attention_varlen calls and their backward, with new arrays and offsets of one
    layout each time, reuse one entry per pass and launch what the validated path launches for
    the same arrays: the same kernels, grids and arguments, the offsets' pointers those of the
    call."""
    from cuflash.kernels import _launch

    for call in range(3):
        builds, hits = _builds(), _calls.stats()["hits"]
        (q, k, v, dout, cu_q, cu_k), opts = _varlen_arrays(device, options)
        deterministic = opts.pop("deterministic", False)
        layout = (cu_q, cu_k, 300, 290)

        def forward():
            return cuflash.attention_varlen(q, k, v, *layout, check_offsets=False, return_lse=True,
                                            **opts)

        out, lse = forward()

        def backward():
            return cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *layout,
                                                     check_offsets=False, deterministic=deterministic,
                                                     **opts)

        backward()  # entries built by the first call, found by the later ones' new arrays
        expected = (builds + 2, hits) if call == 0 else (builds, hits + 2)
        assert (_builds(), _calls.stats()["hits"]) == expected
        cached = [_sent(device, forward), _sent(device, backward)]
        assert _builds() == builds + 2 * (call == 0)
        for launches in (cached[0][0], cached[1][0]):
            for *_, record in launches:
                forward_args = len(record) == _launch.FWD_ARGS.itemsize
                fields = np.frombuffer(record, _launch.FWD_ARGS if forward_args else _launch.BWD_ARGS)
                sent = (int(fields["cu_q"][0]), int(fields["cu_k"][0]))
                assert sent == (cu_q.data.ptr, cu_k.data.ptr)
        _calls.clear()
        assert [_sent(device, forward), _sent(device, backward)] == cached
        forward(), backward()  # (the entries the validated calls built, for the next arrays)


def test_cached_varlen_calls_check_their_offsets_each_time(device, monkeypatch):
    """With check_offsets=True (the default) a cached call reads back and checks the offsets it
    is given, as the validated path does, and raises on bad ones; with False it reads nothing."""
    from cuflash import _checks

    checked, bad = [], set()

    def recorded(cu_q, cu_k, totals, max_lengths, check_offsets, read=(None, None)):
        checked.append((cu_q.data.ptr, cu_k.data.ptr, totals, max_lengths, check_offsets))
        if check_offsets and cu_q.data.ptr in bad:
            raise ValueError("cu_seqlens_q must start at 0, got 1 first")
        return None, None

    monkeypatch.setattr(_checks, "checked_offsets", recorded)
    for check in (True, False):
        for call in range(3):
            (q, k, v, _, cu_q, cu_k), _ = _varlen_arrays(device, {})
            cuflash.attention_varlen(q, k, v, cu_q, cu_k, 300, 290, check_offsets=check)
            assert checked[-1] == (cu_q.data.ptr, cu_k.data.ptr, (700, 700), (300, 290), check)
        hits = _calls.stats()["hits"]
        bad.add(cu_q.data.ptr)
        if check:
            with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
                cuflash.attention_varlen(q, k, v, cu_q, cu_k, 300, 290, check_offsets=check)
        else:
            cuflash.attention_varlen(q, k, v, cu_q, cu_k, 300, 290, check_offsets=check)
            assert _calls.stats()["hits"] == hits + 1


def test_cached_varlen_calls_with_offsets_taken_in_turn_send_their_own(device):
    """Two offset arrays of one layout taken in turn (as layers may be handed the offsets of two
    batches): each cached call, forward and backward, sends the pointers of the offsets it was
    given, whichever were given before it."""
    from cuflash.kernels import _launch

    (q, k, v, dout, *offsets), _ = _varlen_arrays(device, {})
    others = [device.empty((4,), np.int32) for _ in range(2)]
    out, lse = cuflash.attention_varlen(q, k, v, *offsets, 300, 290, causal=True, return_lse=True,
                                        check_offsets=False)
    for cu_q, cu_k in [offsets, offsets, others, offsets, others, others, offsets]:
        layout = (cu_q, cu_k, 300, 290)
        sent = [_sent(device, lambda: cuflash.attention_varlen(
                    q, k, v, *layout, causal=True, check_offsets=False)),
                _sent(device, lambda: cuflash.attention_varlen_backward(
                    dout, q, k, v, out, lse, *layout, causal=True, check_offsets=False))]
        for launches, _ in sent:
            for *_, record in launches:
                layout_of = _launch.FWD_ARGS if len(record) == _launch.FWD_ARGS.itemsize else _launch.BWD_ARGS
                fields = np.frombuffer(record, layout_of)
                assert (int(fields["cu_q"][0]), int(fields["cu_k"][0])) == (cu_q.data.ptr, cu_k.data.ptr)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_strided_device_offsets_reach_the_kernels_as_a_contiguous_copy(device, monkeypatch,
                                                                       backward):
    """The kernels read B + 1 contiguous int32 offsets: offsets given as a strided CuPy view are
    copied by the validated path, and a later call of the same layout must not send the view
    itself (whose every other int32 is not an offset)."""
    import cupy

    copies = []

    def contiguous(x, dtype=None):  # (the copy itself needs the device)
        if x.flags.c_contiguous:
            return x
        copies.append(device.empty(x.shape, x.dtype))
        return copies[-1]

    monkeypatch.setattr(cupy, "asarray", lambda x, dtype=None: x)
    monkeypatch.setattr(cupy, "ascontiguousarray", contiguous)
    (q, k, v, dout, *_), _ = _varlen_arrays(device, {})
    cu = device.empty((4,), np.int32)
    out, lse = cuflash.attention_varlen(q, k, v, cu, cu, 300, 290, return_lse=True,
                                        check_offsets=False)
    for _ in range(3):
        strided = device.empty((8,), np.int32)[::2]
        layout = (strided, strided, 300, 290)
        copies.clear()
        device.take_launches()
        if backward:
            cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *layout, check_offsets=False)
        else:
            cuflash.attention_varlen(q, k, v, *layout, check_offsets=False)
        launches = device.take_launches()
        assert launches and len(copies) == 2
        for *_, record in launches:
            layout_of = _launch.FWD_ARGS if len(record) == _launch.FWD_ARGS.itemsize else _launch.BWD_ARGS
            fields = np.frombuffer(record, layout_of)
            assert (int(fields["cu_q"][0]), int(fields["cu_k"][0])) == tuple(c.data.ptr for c in copies)


def test_varlen_vjp_backward_takes_the_cache(device):
    """A packed vjp's backward is a cached call from the second vjp of a layout on, and launches
    what the validated path launches (with the forward's ALiBi copy)."""
    (q, k, v, dout, cu_q, cu_k), options = _varlen_arrays(device, dict(causal=True, alibi=True))
    for call in range(3):
        out, vjp = cuflash.attention_varlen_vjp(q, k, v, cu_q, cu_k, 300, 290, check_offsets=False,
                                                **options)
        hits = _calls.stats()["hits"]
        cached = _sent(device, lambda: vjp(dout))
        assert _calls.stats()["hits"] == hits + (call > 0)
    _calls.clear()
    assert _sent(device, lambda: vjp(dout)) == cached


# ----------------------------------------------------------------------------- any problem

@st.composite
def _problems(draw):
    """A problem the kernels take, with every feature a cached call keys: shapes (odd lengths,
    GQA, Dv ≠ D), dtype, a (B, N, H, D) memory layout, and options."""
    dtype = draw(st.sampled_from([np.float16, BF16]))  # (the fake device has no float32 kernel)
    d, dv = draw(st.sampled_from([(32, 32), (64, 64), (96, 96), (128, 128), (256, 256),
                                  (192, 128), (64, 128)]))
    hkv = draw(st.sampled_from([1, 2]))
    shape = dict(b=draw(st.integers(1, 2)), hq=hkv * draw(st.sampled_from([1, 3])), hkv=hkv,
                 nq=draw(st.integers(1, 300)), nk=draw(st.integers(1, 300)), d=d, dv=dv)
    options = {}
    if draw(st.booleans()):
        options["causal"] = True
    if draw(st.booleans()):
        options["window"] = (draw(st.integers(-1, 90)), draw(st.integers(-1, 90)))
    if draw(st.booleans()):
        options["softcap"] = draw(st.sampled_from([5.0, 30.0]))
    if draw(st.booleans()):
        options["scale"] = draw(st.sampled_from([0.05, 0.3]))
    if draw(st.booleans()):
        options["alibi_slopes"] = "alibi"  # made on the fake device by the test
    if draw(st.booleans()):
        options.update(dropout_p=0.2, dropout_seed=draw(st.integers(0, 2**64 - 1)),
                       dropout_offset=draw(st.integers(0, 9)))
    return dtype, shape, draw(st.booleans()), draw(st.booleans()), options


def _assert_entries_serve_other_arrays(device, problem_calls):
    """``problem_calls()`` makes new arrays of one layout and returns a forward and a backward
    call on them. Entries built and launched with one set must serve another, launching what the
    validated path launches for it: stale pointers or TMA descriptors fail."""
    first, second = problem_calls(), problem_calls()
    _calls.clear()
    for call in first:
        call(), call()  # builds the entries; a launch from them describes the first arrays
    hits, builds = _calls.stats()["hits"], _builds()
    cached = [_sent(device, call) for call in second]
    assert (_calls.stats()["hits"], _builds()) == (hits + 2, builds)
    _calls.clear()
    validated = [_sent(device, call) for call in second]
    assert _builds() == builds + 2 and all(launches for launches, _ in validated)
    assert cached == validated


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(problem=_problems())
def test_cached_calls_send_what_the_validated_path_sends_for_any_problem(device, problem):
    """Random shapes, dtypes, layouts and options: forward and backward calls served by entries
    that other arrays of the same layout built launch what the validated path launches for
    theirs: the same kernels, grids, blocks, shared memory and argument bytes, their own
    pointers and TMA descriptors (fresh allocations aside)."""
    dtype, s, seq_major, deterministic, options = problem

    def array(*dims):
        b, h, n, last = dims
        if seq_major:
            return device.empty((b, n, h, last), dtype).transpose(0, 2, 1, 3)
        return device.empty(dims, dtype)

    if options.get("alibi_slopes") == "alibi":
        options = dict(options, alibi_slopes=device.empty((s["hq"],), np.float32))

    def problem_calls():
        q, dout = array(s["b"], s["hq"], s["nq"], s["d"]), array(s["b"], s["hq"], s["nq"], s["dv"])
        k, v = array(s["b"], s["hkv"], s["nk"], s["d"]), array(s["b"], s["hkv"], s["nk"], s["dv"])
        out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
        return (lambda: cuflash.attention(q, k, v, return_lse=True, **options),
                lambda: cuflash.attention_backward(dout, q, k, v, out, lse,
                                                   deterministic=deterministic, **options))

    _assert_entries_serve_other_arrays(device, problem_calls)


@st.composite
def _packed_problems(draw):
    """A packed problem: the dense problem's dtype, head dims, heads and options, with B
    sequences in (total, H, D) arrays (their offsets are made-up device memory: with
    check_offsets=False only the totals and the max lengths reach the launch)."""
    dtype, s, _, deterministic, options = draw(_problems())
    batch = draw(st.integers(1, 4))
    totals = {n: draw(st.integers(1, 700)) for n in ("nq", "nk")}
    lengths = {n: draw(st.integers(1, totals[n])) for n in ("nq", "nk")}
    return dtype, dict(s, b=batch, **totals), lengths, deterministic, options


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(problem=_packed_problems())
def test_cached_packed_calls_send_what_the_validated_path_sends_for_any_problem(device, problem):
    """As for dense calls above, with packed sequences: the launches of cached calls made with
    other arrays and offsets of one layout equal the validated path's, pointers included."""
    dtype, s, lengths, deterministic, options = problem
    if options.get("alibi_slopes") == "alibi":
        options = dict(options, alibi_slopes=device.empty((s["b"], s["hq"]), np.float32))

    def problem_calls():
        q, dout = (device.empty((s["nq"], s["hq"], d), dtype) for d in (s["d"], s["dv"]))
        k, v = (device.empty((s["nk"], s["hkv"], d), dtype) for d in (s["d"], s["dv"]))
        layout = (device.empty((s["b"] + 1,), np.int32), device.empty((s["b"] + 1,), np.int32),
                  lengths["nq"], lengths["nk"])
        out, lse = cuflash.attention_varlen(q, k, v, *layout, return_lse=True, check_offsets=False,
                                            **options)
        return (lambda: cuflash.attention_varlen(q, k, v, *layout, return_lse=True,
                                                 check_offsets=False, **options),
                lambda: cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *layout,
                                                          check_offsets=False,
                                                          deterministic=deterministic, **options))

    _assert_entries_serve_other_arrays(device, problem_calls)


@st.composite
def _odd_layout_problems(draw):
    """A dense problem whose arrays each take a layout of their own (sequence-major, a pointer
    off 16-byte alignment, padded rows, k and v broadcast along the batch with stride 0), with
    out= and gradients given or not, return_lse, a seed int or array, and a block or exact
    mask."""
    dtype, shape, _, deterministic, options = draw(_problems())
    layouts = st.sampled_from(["contiguous", "sequence-major", "unaligned", "padded", "stride-0"])
    layout = {name: draw(layouts) for name in ("q", "k", "v", "dout", "out", "dq", "dk", "dv")}
    if "dropout_p" in options and draw(st.booleans()):
        options = dict(options, dropout_seed="array", dropout_offset=0)
    mask = draw(st.sampled_from([None, "block", "exact"]))
    given = dict(out=draw(st.booleans()), grads=tuple(draw(st.booleans()) for _ in range(3)),
                 return_lse=draw(st.booleans()))
    return dtype, shape, layout, deterministic, options, mask, given


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(problem=_odd_layout_problems())
def test_cached_calls_send_what_the_validated_path_sends_for_odd_layouts(device, monkeypatch,
                                                                         problem):
    """As for any problem above, with each array in a layout of its own and the arguments a
    signature keys beside the layouts: entries built with other arrays of the same layout send
    what the validated path sends (given out= and gradients at their own pointers)."""
    import cupy

    from cuflash.sparse import ExactMask
    from cuflash.sparse._exactmask import TileBits

    dtype, s, layout, deterministic, options, mask, given = problem

    def array(name, b, h, n, last):
        if layout[name] == "stride-0" and name in ("k", "v"):
            one = device.empty((1, h, n, last), dtype)
            return cupy.lib.stride_tricks.as_strided(one, (b, h, n, last), (0,) + one.strides[1:])
        return device.laid_out((b, h, n, last), dtype, layout[name])

    options = dict(options)
    if options.get("alibi_slopes") == "alibi":
        options["alibi_slopes"] = device.empty((s["hq"],), np.float32)
    if mask == "block":
        from cuflash.sparse import BlockMask

        blocks = np.random.default_rng(0).random((-(-s["nq"] // 128), -(-s["nk"] // 128))) < 0.6
        options["block_mask"] = _on_fake_device(monkeypatch, device, BlockMask.from_dense(
            blocks, block_size=128, shape=(s["nq"], s["nk"])))
    elif mask == "exact":
        def device_tile_bits(self, tile_m, tile_n):
            return self._cache.setdefault(("fake", tile_m, tile_n), TileBits(
                *(device.empty(a.shape, a.dtype) for a in self.tile_bits(tile_m, tile_n))))

        monkeypatch.setattr(ExactMask, "device_tile_bits", device_tile_bits)
        options["mask"] = ExactMask.from_dense(np.random.default_rng(1).random((s["nq"], s["nk"])) < 0.6)

    def problem_calls():
        seeded = dict(options)
        if seeded.get("dropout_seed") == "array":
            seeded["dropout_seed"] = device.empty((2,), np.uint64)
        q, dout = array("q", s["b"], s["hq"], s["nq"], s["d"]), array("dout", s["b"], s["hq"], s["nq"], s["dv"])
        k, v = array("k", s["b"], s["hkv"], s["nk"], s["d"]), array("v", s["b"], s["hkv"], s["nk"], s["dv"])
        out = array("out", s["b"], s["hq"], s["nq"], s["dv"]) if given["out"] else None
        grads = {name: array(name, *x.shape) for name, x, wanted in zip(("dq", "dk", "dv"), (q, k, v),
                                                                        given["grads"]) if wanted}
        result, lse = cuflash.attention(q, k, v, return_lse=True, **seeded)
        return (lambda: cuflash.attention(q, k, v, return_lse=given["return_lse"], out=out, **seeded),
                lambda: cuflash.attention_backward(dout, q, k, v, result, lse, deterministic=deterministic,
                                                   **grads, **seeded))

    fresh = {"forward": ("lse", "alibi") if given["out"] else FRESH_FIELDS["forward"],
             "backward": tuple(field for field, wanted in zip(("grad_q", "grad_k", "grad_v"), given["grads"])
                               if not wanted) + FRESH_FIELDS["backward"][3:]}
    first, second = problem_calls(), problem_calls()
    _calls.clear()
    for call in first:
        call(), call()
    cached = [_sent(device, call, fresh) for call in second]
    _calls.clear()
    assert [_sent(device, call, fresh) for call in second] == cached


# ----------------------------------------------------------------------------- masks held

def _distinct_block_masks(monkeypatch, device, count):
    """``count`` block masks of 256 x 256 scores, each of another pattern (no two equal)."""
    from cuflash.sparse import BlockMask

    rng = np.random.default_rng(0)
    layouts = set()
    while len(layouts) < count:
        layouts.add(tuple(rng.integers(0, 2, 16).astype(np.int8)))
    return [_on_fake_device(monkeypatch, device, BlockMask.from_dense(
        np.array(layout, np.int8).reshape(4, 4) | np.eye(4, dtype=np.int8), block_size=64))
        for layout in sorted(layouts)]


def test_a_new_mask_per_step_is_not_kept_alive_by_the_cache(device, monkeypatch):
    """A loop that builds a new mask for each step (the documents of each batch, say) keeps at
    most _MAX_MASKS of them alive through the cache, not one per entry; the cached calls still
    send what the validated path sends."""
    q, k, v = (device.empty((1, 2, 256, 64), BF16) for _ in range(3))
    _calls.clear()
    masks = _distinct_block_masks(monkeypatch, device, _calls._MAX_MASKS + 20)
    for mask in masks:
        before = _sent(device, lambda: cuflash.attention(q, k, v, block_mask=mask))
        for _ in range(2):  # found by its signature, then by its quick key
            assert _sent(device, lambda: cuflash.attention(q, k, v, block_mask=mask)) == before
    held = _masks_the_cache_holds()
    assert held and len(held) <= _calls._MAX_MASKS
    assert held <= {id(mask) for mask in masks[-_calls._MAX_MASKS:]}  # the newest


def test_masks_forgotten_by_two_threads_at_once(monkeypatch):
    """Two threads past _MAX_MASKS may both pick the same oldest mask to forget: the second
    finds it gone (here the first thread's pop runs inside the second's) and goes on, where it
    raised KeyError."""
    class RacedOnce(dict):
        raced = False

        def pop(self, *args):
            if not self.raced and args[0] in self:
                self.raced = True
                dict.pop(self, args[0])  # the other thread, first
            return dict.pop(self, *args)

    table = {}
    masks = RacedOnce((index, (object(), [(table, index)])) for index in range(_calls._MAX_MASKS))
    table.update((index, None) for index in range(_calls._MAX_MASKS))
    monkeypatch.setattr(_calls, "_masks", masks)
    newest = object()
    _calls._hold_masks([newest], table, "newest key")
    assert masks.raced and id(newest) in masks and len(masks) <= _calls._MAX_MASKS


def _masks_the_cache_holds() -> set:
    """The ids of the masks the cache's keys and entries refer to."""
    held = set()
    for key, entry in _calls._entries.items():
        held.update(id(part) for part in _calls._masks_among(key[2:]))
        spec = getattr(entry, "spec", None)
        if spec is not None and spec.block_mask is not None:
            held.add(id(spec.block_mask))
    for values, entry in _calls._quick.values():
        held.update(id(part) for part in _calls._masks_among(values))
        if entry.spec.block_mask is not None:
            held.add(id(entry.spec.block_mask))
    return held


def test_a_model_s_few_masks_stay_cached(device, monkeypatch):
    """Masks used over and over (one per layer) are built once and then found every step."""
    q, k, v = (device.empty((1, 2, 256, 64), BF16) for _ in range(3))
    masks = _distinct_block_masks(monkeypatch, device, 4)
    _calls.clear()
    for mask in masks:
        cuflash.attention(q, k, v, block_mask=mask)
    builds, hits = _builds(), _calls.stats()["hits"]
    for _ in range(3):
        for mask in masks:
            cuflash.attention(q, k, v, block_mask=mask)
    assert _builds() == builds and _calls.stats()["hits"] == hits + 12
    before = _sent(device, lambda: cuflash.attention(q, k, v, block_mask=masks[0]))
    assert _sent(device, lambda: cuflash.attention(q, k, v, block_mask=masks[0])) == before


# ----------------------------------------------------------------------------- seed arrays

def _seed_in(array):
    """A CuPy seed array (uint64 (seed, offset)) over the first 16 bytes of ``array``."""
    import cupy

    return cupy.ndarray((2,), np.uint64, memptr=array.data)


def _twice_then_validated(call, message):
    """``call`` raises ``message`` on the cached path (an entry for its layout held) and on the
    validated path (every entry forgotten)."""
    for _ in range(2):
        with pytest.raises(ValueError, match=message):
            call()
        _calls.clear()


@pytest.mark.parametrize("varlen", [False, True])
def test_out_overlapping_the_seed_array_is_refused(device, varlen):
    """The kernels read a CuPy seed array while they write out=: an out over it is refused, as
    one over an input is, on the validated and the cached path alike."""
    if varlen:
        q, k, v = _qkv(device, (256, 4, 64))
        cu = device.empty((3,), np.int32)

        def call(out, seed):
            return cuflash.attention_varlen(q, k, v, cu, cu, 128, 128, dropout_p=0.1,
                                            dropout_seed=seed, check_offsets=False, out=out)
    else:
        q, k, v = _qkv(device)

        def call(out, seed):
            return cuflash.attention(q, k, v, dropout_p=0.1, dropout_seed=seed, out=out)

    out = device.empty(q.shape[:-1] + (64,), BF16)
    for _ in range(2):
        call(out, device.empty((2,), np.uint64))
    assert _builds() == 1 and _calls.stats()["hits"] == 1
    _twice_then_validated(lambda: call(out, _seed_in(out)), "out must not share memory with "
                                                            "dropout_seed")


def test_given_gradients_overlapping_the_seed_array_are_refused(device):
    """As out= for the forward: the backward kernels read the seed array while they write the
    given gradients."""
    dout, q, k, v, out, lse = _seq_major_problem(device)
    dq = _seq_major(device)

    def call(seed):
        return cuflash.attention_backward(dout, q, k, v, out, lse, dropout_p=0.1,
                                          dropout_seed=seed, dq=dq)

    builds = _builds()
    for _ in range(2):
        call(device.empty((2,), np.uint64))
    assert _builds() == builds + 1
    _twice_then_validated(lambda: call(_seed_in(dq)),
                          "dq must not share memory with dropout_seed")


def test_a_vjp_captured_without_its_forward_keeps_the_forward_s_lse_for_the_graph(device,
                                                                                  monkeypatch):
    """A forward run before a capture, its vjp's backward captured into a CUDA graph: every
    replay of the graph reads the forward's lse, which only the vjp holds. It lives as long as
    the backward's gradients do, the vjp gone or not, as what a captured call frees does."""
    import gc
    import weakref

    from fake_device import FakeStream

    q, k, v = _qkv(device)
    dout = device.empty(SHAPE, BF16)
    cuflash.attention_vjp(q, k, v, causal=True)[1](dout)  # (the entries of both passes)
    made = []
    new_array = _launch.new_array

    def watched(shape, dtype):
        made.append((tuple(shape), np.dtype(dtype), weakref.ref(x := new_array(shape, dtype))))
        return x

    monkeypatch.setattr(_launch, "new_array", watched)
    out, vjp = cuflash.attention_vjp(q, k, v, causal=True)
    (lse,) = [x for shape, dtype, x in made if (shape, dtype) == (SHAPE[:3], np.float32)]
    capturing = [True]
    monkeypatch.setattr(FakeStream, "is_capturing", lambda self: capturing[0])
    monkeypatch.setattr(_calls, "stream_capturing", lambda: capturing[0])
    grads = vjp(dout)
    capturing[0] = False
    del vjp
    gc.collect()
    assert lse() is not None
    del grads
    gc.collect()
    assert lse() is None


# ----------------------------------------------------------------------------- KV-cache decode

# Decode calls of the cached path's shapes of call, each as the keywords of ``_decode_call``.
DECODE_CASES = {
    "contiguous": {},
    "appending": dict(append=True),
    "paged, appending": dict(paged=True, append=True),
    "cache_batch_idx": dict(batch_idx=True),
    "cache_leftpad": dict(leftpad=True),
    "out= and lse": dict(out=True, return_lse=True),
    "key splits": dict(num_splits=4),
    "occupancy's splits, appending": dict(num_splits=0, append=True),
    "first rows of a larger cache": dict(cache_rows=3),
    "lengths as an int, appending": dict(int_lengths=True, append=True),
    "ALiBi slopes (Hq,)": dict(slopes=(8,)),
    "ALiBi slopes (B, Hq), appending": dict(slopes=(2, 8), append=True),
    "float16, Dv = 128, 5 queries, window and softcap": dict(
        dtype=np.float16, dv=128, sq=5, options=dict(causal=False, window=(64, 0), softcap=30.0)),
}


@pytest.fixture
def fresh_decode_launches():
    """The decode module's prepared launches forgotten before and after the test: they hold
    the kernels of the fake device they were made on."""
    from cuflash.kernels import decode

    for prepared in (decode._prepared, decode._prepared_append):
        prepared.cache_clear()
    yield
    for prepared in (decode._prepared, decode._prepared_append):
        prepared.cache_clear()


def _decode_call(device, monkeypatch, *, paged=False, append=False, batch_idx=False,
                 leftpad=False, out=False, return_lse=False, num_splits=1, cache_rows=2,
                 int_lengths=False, dtype=BF16, dv=64, sq=1, options=(), slopes=None):
    """A decode call (B = 2, Hq = 8, Hkv = 2, D = 64, Dv = ``dv``, ``sq`` queries, causal
    unless ``options`` say otherwise) on made-up arrays, made anew by each call of the function
    returned, over the same arrays."""
    from cuflash.kernels import decode

    # the split count's occupancy (the device queries need a driver)
    monkeypatch.setattr(decode, "sm_count", lambda device_id: 132)
    monkeypatch.setattr(decode, "resident_blocks", lambda device_id, shared: 2)
    b, hq, hkv, d = 2, 8, 2, 64
    q = device.empty((b, sq, hq, d), dtype)
    shape = (16, 32, hkv) if paged else (cache_rows, 512, hkv)
    k_cache, v_cache = device.empty(shape + (d,), dtype), device.empty(shape + (dv,), dtype)
    new = (device.empty((b, 1, hkv, d), dtype), device.empty((b, 1, hkv, dv), dtype))
    index = device.empty((b,), np.int32)
    if int_lengths:  # their device copy, made by each call
        import cupy

        monkeypatch.setattr(cupy, "full", lambda shape, value, dtype: device.empty(shape, dtype))
    options = {**dict(cache_seqlens=100 if int_lengths else device.empty((b,), np.int32),
                      num_splits=num_splits, return_lse=return_lse, causal=True), **dict(options)}
    if paged:
        options["block_table"] = device.empty((b, 16), np.int32)
    if batch_idx:
        options["cache_batch_idx"] = index
    if leftpad:
        options["cache_leftpad"] = index
    if out:
        options["out"] = device.empty((b, sq, hq, dv), dtype)
    if slopes:
        options["alibi_slopes"] = device.empty(slopes, np.float32)
    args = (q, k_cache, v_cache, *(new if append else ()))
    return lambda **changes: cuflash.attention_with_kvcache(*args, **{**options, **changes})


def _without_fresh_pointers(launches, copied=()):
    """The launches with the pointers a call allocates anew blanked (out, lse, the splits'
    partials, and the fields ``copied`` names: the copies a call makes, of lengths given as an
    int or of ALiBi slopes; fields of DECODE_ARGS and APPEND_ARGS)."""
    from cuflash.kernels import decode

    fresh = ("o", "lse", "o_part", "lse_part", *copied)
    blanked = []
    for expression, grid, block, shared, record in launches:
        struct = decode.APPEND_ARGS if expression.startswith("kv_append") else decode.DECODE_ARGS
        args = np.frombuffer(record, struct).copy()
        for name in fresh:
            if name in struct.names:
                args[name] = 0
        record = args.tobytes()
        blanked.append((expression, grid, block, shared, record))
    return blanked


@pytest.mark.parametrize("case", DECODE_CASES)
def test_a_repeated_decode_call_launches_what_the_validated_path_launches(
        device, monkeypatch, fresh_decode_launches, case):
    """A decode call's second call is served from its entry (no validation: ``_validated`` is
    not reached) and sends the kernels exactly the bytes the validated path sends, but for the
    pointers of what each call allocates; its results have the validated path's shapes."""
    from cuflash import _kvcache

    call = _decode_call(device, monkeypatch, **DECODE_CASES[case])
    first = call()
    if "int_lengths" in DECODE_CASES[case]:  # a new value each step: the same entry
        call = functools.partial(call, cache_seqlens=101)
    hits = _calls.stats()["hits"]
    validated = _kvcache._validated
    monkeypatch.setattr(_kvcache, "_validated", lambda *a, **k: pytest.fail("validated again"))
    device.take_launches()
    cached_result = call()
    cached = device.take_launches()
    assert _calls.stats()["hits"] == hits + 1
    monkeypatch.setattr(_kvcache, "_validated", validated)
    uncached = _uncached(device, call)
    copied = [name for name, option in (("seqlens", "int_lengths"), ("alibi", "slopes"))
              if option in DECODE_CASES[case]]
    assert _without_fresh_pointers(cached, copied) == _without_fresh_pointers(uncached, copied)
    from cuflash.kernels import decode

    for expression, *_, record in cached + uncached:  # the copies blanked above are passed
        if not expression.startswith("kv_append"):
            args = np.frombuffer(record, decode.DECODE_ARGS)[0]
            assert (int(args["alibi"]) != 0) == ("slopes" in DECODE_CASES[case])
            assert int(args["seqlens"]) != 0
    names = [launch[0].partition("<")[0] for launch in cached]
    options = DECODE_CASES[case]
    assert names == (["kv_append"] if options.get("append") else []) + ["flash_decode"] + (
        ["decode_combine"] if options.get("num_splits", 1) != 1 else [])
    shapes = [x.shape for x in (first if isinstance(first, tuple) else (first,))]
    assert [x.shape for x in (cached_result if isinstance(cached_result, tuple)
                              else (cached_result,))] == shapes


def test_decode_calls_the_entry_cannot_serve_take_the_validated_path(device, monkeypatch,
                                                                    fresh_decode_launches):
    """Calls of a kept signature that the validated path treats apart take it, and the entry
    stays: new keys that lie in a cache (copied first there), one array as both caches of an
    append, an out= overlapping an input and lengths given as an int out of range (refused
    there, with its errors)."""
    import cupy

    from cuflash import _kvcache

    monkeypatch.setattr(cupy, "full", lambda shape, value, dtype: device.empty(shape, dtype))
    reached = []
    validated = _kvcache._validated
    monkeypatch.setattr(_kvcache, "_validated",
                        lambda *args, **options: reached.append(1) or validated(*args, **options))
    b, hq, hkv, d = 2, 8, 2, 64
    q = device.empty((b, 1, hq, d), BF16)
    k_cache, v_cache = (device.empty((b, 512, hkv, d), BF16) for _ in range(2))
    new = device.empty((b, 1, hkv, d), BF16)
    defaults = dict(cache_seqlens=device.empty((b,), np.int32), num_splits=1)

    def validates(*args, **options) -> bool:
        """Whether the call took the validated path."""
        reached.clear()
        cuflash.attention_with_kvcache(q, k_cache, v_cache, *args, **{**defaults, **options})
        return bool(reached)

    assert validates(new, new) and not validates(new, new)  # kept, then served
    # New keys in the k cache's memory, laid out as `new` (the validated path's copy apart from
    # the caches is stood in for: the fake device cannot copy).
    lying = k_cache.reshape(-1)[:new.size].reshape(new.shape)
    with monkeypatch.context() as no_copy:
        no_copy.setattr(_kvcache, "_apart_from_caches", lambda xp, x, caches: x)
        assert validates(lying, new) and validates(new, lying)
    assert not validates(new, new)  # the entry is still there
    with pytest.raises(ValueError, match="k_cache and v_cache must not share memory"):
        cuflash.attention_with_kvcache(q, k_cache, k_cache, new, new, **defaults)
    out = device.empty((b, 1, hq, d), BF16)
    assert validates(out=out) and not validates(out=out)
    with pytest.raises(ValueError, match="out must not share memory with q"):
        validates(out=q)  # laid out as out
    assert validates(cache_seqlens=7) and not validates(cache_seqlens=9)  # kept, then served
    with pytest.raises(ValueError, match="cache_seqlens = 600 is outside"):
        validates(cache_seqlens=600)  # (a 512-key cache)
