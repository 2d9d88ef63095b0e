"""Cached calls and CUDA-graph capture on the GPU (cuflash._calls).

- Calls served from the cache, with new arrays (new pointers, same layout), give bit for bit what
  the validated path gives for the same inputs, and pass the correctness rule.
- A forward and a backward captured into one CUDA graph on a CuPy stream replay to the eager
  results bit for bit, also after the inputs' contents are replaced in place; buffers a call
  frees when it returns (an lse not returned, the backward's workspace) stay reserved for the
  graph.

Backward passes use ``deterministic=True`` so that every family's gradients are reproducible.
"""

from __future__ import annotations

import time
from functools import partial

import ml_dtypes
import numpy as np
import pytest

import cuflash
from cuflash import _calls
from cuflash.kernels import mma_backward
from oracle import (assert_backward_close, assert_forward_close, assert_varlen_forward_close, poisoned,
                    random_array)
from test_varlen import offsets

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
CASES = {
    "causal": dict(causal=True),
    "window-softcap": dict(causal=True, window=(48, 0), softcap=20.0),
    "alibi": dict(alibi=True),
}


def _inputs(xp, rng, shape, dtype=BF16):
    """q, k, v and dout."""
    return tuple(random_array(rng, shape, dtype, xp=xp) for _ in range(4))


def _options(xp, rng, case, hq):
    options = dict(CASES[case])
    if options.pop("alibi", False):
        options["alibi_slopes"] = xp.asarray(rng.uniform(0.01, 0.5, hq).astype(np.float32))
    return options


def _run(q, k, v, dout, options):
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **options)
    return (out, lse, *grads)


def _assert_identical(got, expected, xp):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert bool(xp.array_equal(a.view(np.uint8), b.view(np.uint8))), f"{name} differs"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(1, 16, 128, 64), (2, 4, 300, 128), (2, 2, 200, 96)])
def test_cached_calls_with_new_arrays_give_the_validated_results(xp_gpu, rng, seed, shape, case):
    xp = xp_gpu
    options = _options(xp, rng, case, shape[1])
    _calls.clear()
    _run(*_inputs(xp, rng, shape), options)  # builds the entries
    for _ in range(2):
        q, k, v, dout = _inputs(xp, rng, shape)  # new pointers, same layout
        hits = _calls.stats()["hits"]
        cached = _run(q, k, v, dout, options)
        assert _calls.stats()["hits"] == hits + 2
        _calls.clear()
        validated = _run(q, k, v, dout, options)
        _assert_identical(cached, validated, xp)
        rule_options = {key: value for key, value in options.items() if key != "alibi_slopes"}
        slopes = options.get("alibi_slopes")
        assert_forward_close(cached[0], cached[1], q, k, v, alibi_slopes=slopes,
                             context=f"seed={seed}", **rule_options)
        assert_backward_close(cached[2:], dout, q, k, v, alibi_slopes=slopes,
                              context=f"seed={seed}", **rule_options)


@pytest.mark.parametrize("hopper", [True, False])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(1, 16, 128, 64), (2, 4, 300, 128), (2, 2, 200, 96)])
def test_cached_forward_without_lse_writes_the_same_output(xp_gpu, rng, monkeypatch, shape, case,
                                                            hopper):
    """A cached call that does not return lse allocates none and its kernel stores none (every
    prepared forward family: the TMA and wgmma forwards on Hopper, the sm80 one without)."""
    from cuflash import kernels

    xp = xp_gpu
    if not hopper:
        monkeypatch.setenv(kernels.DISABLE_HOPPER_ENV, "1")
    options = _options(xp, rng, case, shape[1])
    q, k, v, _ = _inputs(xp, rng, shape)
    expected, _ = cuflash.attention(q, k, v, return_lse=True, **options)
    _calls.clear()
    out = poisoned(expected.shape, expected.dtype, xp=xp)
    cuflash.attention(q, k, v, out=out, **options)  # builds the entry
    hits = _calls.stats()["hits"]
    out = poisoned(expected.shape, expected.dtype, xp=xp)  # new pointer, same layout
    assert cuflash.attention(q, k, v, out=out, **options) is out
    assert _calls.stats()["hits"] == hits + 1
    assert bool(xp.array_equal(out.view(np.uint16), expected.view(np.uint16)))


@pytest.mark.parametrize("hkv", [4, 2])
def test_cached_calls_write_given_gradients(xp_gpu, rng, seed, hkv):
    """Gradients given as the torch adapter gives them (``torch.empty_like`` of (B, N, H, D)
    inputs seen as (B, H, N, D)): from the second call on the cached path writes into them and
    returns them, holding bit for bit the validated path's gradients without them."""
    xp = xp_gpu
    b, n, h, d = 2, 300, 4, 64

    def seq_major(heads, values=False):
        shape = (b, n, heads, d)
        x = random_array(rng, shape, BF16, xp=xp) if values else poisoned(shape, BF16, xp=xp)
        return x.transpose(0, 2, 1, 3)

    q, dout = seq_major(h, True), seq_major(h, True)
    k, v = seq_major(hkv, True), seq_major(hkv, True)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    backward = partial(cuflash.attention_backward, dout, q, k, v, out, lse, causal=True,
                       deterministic=True)
    _calls.clear()
    expected = backward()
    for call in range(3):  # validated (builds the entry), then cached
        given = (seq_major(h), seq_major(hkv), seq_major(hkv))
        hits = _calls.stats()["hits"]
        grads = backward(dq=given[0], dk=given[1], dv=given[2])
        assert _calls.stats()["hits"] == hits + (call > 0)
        assert all(g is x for g, x in zip(grads, given))
        for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
            assert bool(xp.array_equal(got.view(np.uint16), want.view(np.uint16))), name
    assert_backward_close(grads, dout, q, k, v, causal=True, context=f"seed={seed}")


def _captured(xp, run):
    """``(stream, expected, captured, graph)``: on a new side stream, ``run()``'s eager results,
    then its results and graph from a capture of a second call."""
    stream = xp.cuda.Stream(non_blocking=True)
    with stream:
        expected = run()
        stream.synchronize()
        stream.begin_capture()
        captured = run()
        graph = stream.end_capture()
    return stream, expected, captured, graph


def _capture_and_replay(xp, run, inputs, rng):
    """Capture ``run()`` (which returns its results) on a side stream after one call outside the
    capture, replay it into NaN-poisoned results and again after new values are written into
    ``inputs``; each replay must give ``run()``'s eager results bit for bit. Returns the captured
    results, as the last replay left them."""
    stream, _, captured, graph = _captured(xp, run)  # the first call compiles and caches
    with stream:
        for x in captured:
            x.fill(np.nan)
        graph.launch()
        stream.synchronize()
    _assert_identical(captured, run(), xp)
    with stream:
        for x in inputs:
            x[...] = random_array(rng, x.shape, x.dtype, xp=xp)
        graph.launch()
        stream.synchronize()
    _assert_identical(captured, run(), xp)
    return captured


@pytest.mark.parametrize("case", CASES)
def test_graph_capture_replays_forward_and_backward(xp_gpu, rng, seed, case):
    xp = xp_gpu
    shape = (2, 8, 256, 64)
    q, k, v, dout = _inputs(xp, rng, shape)
    options = _options(xp, rng, case, shape[1])
    captured = _capture_and_replay(xp, lambda: _run(q, k, v, dout, options), (q, k, v, dout), rng)
    assert_forward_close(captured[0], captured[1], q, k, v, causal=options.get("causal", False),
                         window=options.get("window", (-1, -1)),
                         softcap=options.get("softcap", 0.0),
                         alibi_slopes=options.get("alibi_slopes"), context=f"seed={seed}")


def test_graph_capture_replays_packed_sequences(xp_gpu, rng, seed):
    """attention_varlen and its backward with device offsets and ``check_offsets=False`` (no
    synchronisation) capture into a graph: replays give the eager results bit for bit
    (deterministic backward), and the forward meets the rule."""
    xp = xp_gpu
    lens = [37, 300, 1, 130]
    cu = offsets(lens, xp)
    q, k, v, dout = (random_array(rng, (sum(lens), 4, 64), BF16, xp=xp) for _ in range(4))
    layout, options = (cu, cu, max(lens), max(lens)), dict(causal=True, check_offsets=False)

    def run():
        out, lse = cuflash.attention_varlen(q, k, v, *layout, return_lse=True, **options)
        grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *layout,
                                                  deterministic=True, **options)
        return (out, lse, *grads)

    captured = _capture_and_replay(xp, run, (q, k, v, dout), rng)
    assert_varlen_forward_close(captured[0], captured[1], q, k, v, cu, cu, causal=True,
                                context=f"seed={seed}")


def test_graph_capture_replays_dropout_and_exact_masks(xp_gpu, rng, seed):
    """A dropout call (one seed, the mask redrawn by every replay alike) and an exact-mask call
    capture and replay bit for bit."""
    from cuflash.sparse import ExactMask, document

    xp = xp_gpu
    shape = (2, 4, 600, 64)
    q, k, v, dout = _inputs(xp, rng, shape)
    for options in (dict(causal=True, dropout_p=0.2, dropout_seed=int(rng.integers(2**63))),
                    dict(mask=ExactMask.from_scipy(document([100, 333, 167], causal=True)))):
        _capture_and_replay(xp, lambda: _run(q, k, v, dout, options), (q, k, v, dout), rng)


def test_uncached_calls_keep_their_buffers_for_a_captured_graph(xp_gpu, rng):
    """Calls that take the validated path every time (k and v broadcast along the batch, whose
    gradients are summed from full-batch temporaries; a transposed q, copied before the kernels
    read it) allocate more than cached ones: under a capture, all of it must stay with the graph.
    The pool would hand those blocks to the arrays made after the capture; the replay must
    neither write into them nor read what they hold."""
    xp = xp_gpu
    b, h, n, d = 3, 4, 192, 64
    q = random_array(rng, (b, h, n, d), BF16, xp=xp)
    q_odd = xp.ascontiguousarray(q.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # read through a copy
    k, v = (random_array(rng, (1, h, n, d), BF16, xp=xp) for _ in range(2))
    dout = random_array(rng, (b, h, n, d), BF16, xp=xp)
    options = dict(causal=True, deterministic=True)

    def run():
        out, lse = cuflash.attention(q_odd, k, v, causal=True, return_lse=True)
        return (out, lse) + tuple(cuflash.attention_backward(dout, q_odd, k, v, out, lse, **options))

    stream, expected, captured, graph = _captured(xp, run)
    with stream:
        for x in captured:
            x.fill(np.nan)
        # Blocks of the sizes the calls let go, filled with a marker: a bfloat16 (B, H, N, D)
        # array (the copies of q, the full-batch dk and dv), float32 rows (lse, Delta) and a
        # float32 (B, H, N, D) accumulator (dQ).
        counts = {b * h * n * d // 2: 6, b * h * n: 4, b * h * n * d: 2}
        markers = [xp.full((size,), 7.0, np.float32) for size, count in counts.items()
                   for _ in range(count)]
        graph.launch()
        stream.synchronize()
    assert all(bool((m == 7.0).all()) for m in markers)
    _assert_identical(captured, expected, xp)


def test_buffers_freed_by_a_captured_call_stay_reserved_for_the_graph(xp_gpu, rng):
    xp = xp_gpu
    b, h, n, d = 2, 4, 256, 64
    q, k, v, dout = _inputs(xp, rng, (b, h, n, d))
    stream = xp.cuda.Stream(non_blocking=True)
    with stream:
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
        stream.synchronize()
        stream.begin_capture()
        g_out = cuflash.attention(q, k, v, causal=True)  # its lse is not returned
        g_out2, g_lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        grads = cuflash.attention_backward(dout, q, k, v, g_out2, g_lse, causal=True,
                                           deterministic=True)
        graph = stream.end_capture()
        # Same sizes on the same stream: CuPy's pool would hand out the freed blocks here.
        lse_sized = xp.full((b, h, n), 7.0, np.float32)
        workspace = mma_backward.workspace_bytes(b, h, n, d, deterministic=True) // 4
        workspace_sized = xp.full((workspace,), 7.0, np.float32)
        graph.launch()
        stream.synchronize()
    assert bool((lse_sized == 7.0).all())
    assert bool((workspace_sized == 7.0).all())
    assert not bool(xp.isnan(g_out).any()) and all(not bool(xp.isnan(g).any()) for g in grads)


def test_graph_capture_replays_packed_sequences_with_numpy_offsets(xp_gpu, rng, seed):
    """NumPy offsets are copied to the device by every replay, from a pinned buffer the graph
    reads: once the capture is over, pinned blocks of that size handed out and filled with other
    values must not change what the replays give."""
    import cupyx

    xp = xp_gpu
    lens = [37, 300, 1, 130]
    cu = offsets(lens, np)
    q, k, v, dout = (random_array(rng, (sum(lens), 4, 64), BF16, xp=xp) for _ in range(4))
    layout = (cu, cu, max(lens), max(lens))

    def run():
        out, lse = cuflash.attention_varlen(q, k, v, *layout, causal=True, return_lse=True)
        grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *layout, causal=True,
                                                  deterministic=True)
        return (out, lse, *grads)

    stream, expected, captured, graph = _captured(xp, run)
    with stream:
        stream.synchronize()
        others = [cupyx.empty_pinned(cu.shape, cu.dtype) for _ in range(64)]
        for other in others:
            other[...] = np.arange(cu.size, dtype=cu.dtype)[::-1] * 1000
        for x in captured:
            x.fill(np.nan)
        graph.launch()
        stream.synchronize()
    _assert_identical(captured, expected, xp)


def _spin_kernel(xp):
    """A one-thread kernel that runs for the given number of clock cycles."""
    return xp.RawKernel(r'''extern "C" __global__ void spin(long long cycles) {
        const long long start = clock64(); while (clock64() - start < cycles) {} }''', "spin")


def test_vjp_on_another_stream_reads_what_its_forward_made(xp_gpu, rng, seed):
    """A vjp's backward queued on another stream behind long work, the vjp dropped at once, and
    the forward's stream then handed blocks of out's and lse's sizes and filled with NaN: the
    gradients must be those of a backward on the forward's own stream (the forward's buffers
    held until the other stream has run the backward)."""
    xp = xp_gpu
    shape = (2, 4, 384, 64)
    q, k, v, dout = _inputs(xp, rng, shape)
    slopes = xp.asarray(rng.uniform(0.01, 0.5, shape[1]).astype(np.float32))
    options = dict(causal=True, alibi_slopes=slopes, deterministic=True)
    out, vjp = cuflash.attention_vjp(q, k, v, **options)
    expected = vjp(dout)
    xp.cuda.Device().synchronize()
    spin = _spin_kernel(xp)
    forward_stream, other = xp.cuda.Stream(non_blocking=True), xp.cuda.Stream(non_blocking=True)
    for _ in range(3):
        with forward_stream:
            out, vjp = cuflash.attention_vjp(q, k, v, **options)
        other.wait_event(forward_stream.record())
        with other:
            spin((1,), (1,), (np.int64(200_000_000),))  # about 0.1 s: the backward queued behind it
            grads = vjp(dout)
        del out, vjp
        with forward_stream:
            fills = [xp.full(shape, np.nan, BF16) for _ in range(4)]
            fills += [xp.full(shape[:3], np.nan, np.float32) for _ in range(4)]
            fills += [xp.full(shape[1:2], np.nan, np.float32) for _ in range(4)]
        other.synchronize()
        forward_stream.synchronize()
        for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
            assert bool(xp.array_equal(got.view(np.uint16), want.view(np.uint16))), name
        del fills


def test_vjp_on_another_stream_gives_its_buffers_back_once_that_stream_passes(xp_gpu, rng):
    """With no later call: the forward's out and lse, held while the other stream's backward is
    queued behind long work, go back to the pool once that stream has run it."""
    xp = xp_gpu
    shape = (2, 4, 384, 64)
    q, k, v, dout = _inputs(xp, rng, shape)
    pool = xp.get_default_memory_pool()
    forward_stream, other = xp.cuda.Stream(non_blocking=True), xp.cuda.Stream(non_blocking=True)
    with forward_stream:
        out, vjp = cuflash.attention_vjp(q, k, v, causal=True)
    other.wait_event(forward_stream.record())
    with other:
        _spin_kernel(xp)((1,), (1,), (np.int64(1_000_000_000),))  # about half a second
        grads = vjp(dout)
    del out, vjp
    held = pool.used_bytes()
    other.synchronize()
    deadline = time.monotonic() + 5.0
    while pool.used_bytes() >= held and time.monotonic() < deadline:
        time.sleep(0.01)
    out_and_lse = 2 * int(np.prod(shape)) + 4 * int(np.prod(shape[:3]))
    assert held - pool.used_bytes() >= out_and_lse
    assert all(bool(xp.isfinite(g).all()) for g in grads)
