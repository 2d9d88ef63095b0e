"""cuflash.parallel on the CPU: ring and Ulysses attention on a simulated ring (LocalRing), the
per-pair mask plan, the log-sum-exp merge, the layouts, failures, torch, and the launcher.

Every ring result is gathered (``unshard``) and checked against the float64 oracle with the
project's rule (``oracle.assert_forward_close`` / ``assert_backward_close``), and compared with
single-process ``cuflash.attention`` / ``attention_backward``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest
from oracle import assert_backward_close, assert_forward_close, random_array

import cuflash
from cuflash import _mask
from cuflash.parallel import (CommError, CommTimeout, LocalRing, merge, positions,
                              ring_attention, ring_attention_backward, ring_attention_vjp,
                              segments, shard, ulysses_attention, ulysses_attention_backward,
                              unshard)
from cuflash.parallel import _plan
from cuflash.parallel.comm import CommBase

F32 = np.float32
BF16 = np.dtype(ml_dtypes.bfloat16)


def _shards(x, size, layout, axis=-2):
    return [shard(x, r, size, layout, axis=axis) for r in range(size)]


def _run_ring(size, layout, q, k, v, dout, **options):
    """Ring forward (with lse) and backward on a LocalRing; results gathered."""
    return _run_sharded(ring_attention, ring_attention_backward, size, layout, q, k, v, dout,
                        **options)


def _run_sharded(forward, backward, size, layout, q, k, v, dout, **options):
    """``forward`` (with lse) and ``backward`` of one sequence-parallel scheme on a LocalRing of
    ``size`` ranks, each given its shards; the results gathered."""

    def rank(comm, q, k, v, dout):
        out, lse = forward(q, k, v, comm=comm, layout=layout, return_lse=True, **options)
        grads = backward(dout, q, k, v, out, lse, comm=comm, layout=layout, **options)
        return out, lse, grads

    results = LocalRing(size).run(rank, *(_shards(x, size, layout) for x in (q, k, v, dout)))
    out = unshard([r[0] for r in results], layout)
    lse = unshard([r[1] for r in results], layout, axis=-1)
    grads = tuple(unshard([r[2][i] for r in results], layout) for i in range(3))
    return out, lse, grads


def _check_against_single(out, lse, grads, q, k, v, dout, context, **options):
    assert_forward_close(out, lse, q, k, v, context=context, **options)
    assert_backward_close(grads, dout, q, k, v, context=context, **options)
    ref_out, ref_lse = cuflash.attention(q, k, v, return_lse=True, **options)
    ref_grads = cuflash.attention_backward(dout, q, k, v, ref_out, ref_lse, **options)
    tol = 1e-5 if q.dtype == F32 else 3e-2
    np.testing.assert_allclose(out.astype(F32), ref_out.astype(F32), atol=tol, rtol=0)
    seen = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), seen), context
    np.testing.assert_allclose(lse[seen], ref_lse[seen], atol=tol, rtol=0)
    for got, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(got.astype(F32), ref.astype(F32), atol=10 * tol, rtol=0)


# ----------------------------------------------------------------------------- the plan

def _every_rank_error(rank, size=2, expected=Exception, match=None):
    """The errors ``rank(comm)`` raises on each of ``size`` local ranks, by rank; the run itself
    must raise ``expected`` (matching ``match``)."""
    raised = {}

    def recorded(comm):
        try:
            return rank(comm)
        except Exception as error:
            raised[comm.rank] = error
            raise

    with pytest.raises(expected, match=match):
        LocalRing(size, timeout=10).run(recorded)
    return raised


def assert_every_rank_refuses(rank, match="other shapes"):
    """``rank(comm)`` run on two local ranks raises a ValueError matching ``match`` on each of
    them: a mismatch between ranks' calls fails everywhere, rather than on one rank while the
    others wait."""
    raised = _every_rank_error(rank, expected=ValueError, match=match)
    assert all(isinstance(raised.get(r), ValueError) and match in str(raised[r])
               for r in range(2)), raised


def _covered(layout, size, nq_local, nk_local, left, right):
    """How often the calls of every rank and step cover each global (query, key) pair."""
    nq, nk = nq_local * size, nk_local * size
    count = np.zeros((nq, nk), np.int64)
    for rank in range(size):
        qpos = positions(nq, rank, size, layout)
        for step in range(size):
            source = (rank - step) % size
            kpos = positions(nk, source, size, layout)
            for call in _plan.plan_step(layout, size, rank, source, nq_local, nk_local, left,
                                        right):
                rows = np.arange(*call.rows)
                cols = np.arange(*call.cols)
                l_, r_ = _mask.band(call.window, call.causal)
                keep = _mask.visible(len(rows), len(cols), l_, r_)
                count[np.ix_(qpos[rows], kpos[cols])] += keep
    return count


BANDS = [(-1, -1), (-1, 0), (0, -1), (0, 0), (3, 0), (5, 2), (1, 7), (-1, 4), (9, -1),
         (40, 0), (0, 40)]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_plan_covers_the_global_mask_exactly_once(layout, size):
    """Every (query, key) pair the global band admits is computed by exactly one call of one
    step of one rank, and no other pair is."""
    lengths = [(4, 4), (6, 6), (4, 8), (8, 4), (2, 6)] if layout == "zigzag" else \
        [(3, 3), (5, 5), (2, 5), (5, 2), (1, 4)]
    for (nq_local, nk_local), (left, right) in itertools.product(lengths, BANDS):
        nq, nk = nq_local * size, nk_local * size
        expected = _mask.visible(nq, nk, left, right).astype(np.int64)
        got = _covered(layout, size, nq_local, nk_local, left, right)
        assert np.array_equal(got, expected), (layout, size, nq_local, nk_local, left, right)


def test_plan_uses_plain_calls_for_the_usual_cases():
    """Zigzag causal: one causal call on the diagonal step, one dense call per other step;
    contiguous causal: future chunks skipped; non-causal: one dense call per step."""
    dense = ((-1, -1), False)
    for size in (2, 4):
        for rank in range(size):
            for step in range(size):
                source = (rank - step) % size
                calls = _plan.plan_step("zigzag", size, rank, source, 8, 8, -1, 0)
                assert len(calls) == 1
                call = calls[0]
                if source == rank:
                    assert (call.rows, call.cols, call.causal) == ((0, 8), (0, 8), True)
                elif source < rank:  # both query chunks see the first key chunk fully
                    assert (call.rows, call.cols) == ((0, 8), (0, 4))
                    assert (call.window, call.causal) == dense
                else:  # the second query chunk sees both key chunks fully
                    assert (call.rows, call.cols) == ((4, 8), (0, 8))
                    assert (call.window, call.causal) == dense
                calls = _plan.plan_step("contiguous", size, rank, source, 8, 8, -1, 0)
                assert len(calls) == (0 if source > rank else 1)
                if source < rank:
                    assert (calls[0].window, calls[0].causal) == dense
                calls = _plan.plan_step("zigzag", size, rank, source, 8, 8, -1, -1)
                assert [(c.rows, c.cols, c.window, c.causal) for c in calls] == [
                    ((0, 8), (0, 8), (-1, -1), False)]


def test_plan_window_offsets():
    """A window pair is one trimmed call whose local window is the global band, shifted."""
    # 2 ranks, contiguous, 8 rows each, window (3, 0): rank 1 sees only the last 3 keys of
    # rank 0's chunk, from its first 3 rows.
    calls = _plan.plan_step("contiguous", 2, 1, 0, 8, 8, 3, 0)
    assert len(calls) == 1
    call = calls[0]
    assert call.rows == (0, 3) and call.cols == (5, 8)
    # rows 8, 9, 10 see keys 5..7 with j >= i − 3: a lower triangle plus the diagonal above it
    l_, r_ = _mask.band(call.window, call.causal)
    keep = _mask.visible(3, 3, l_, r_)
    assert keep.tolist() == [[True, True, True], [False, True, True], [False, False, True]]
    assert _plan.plan_step("contiguous", 2, 0, 1, 8, 8, 3, 0) == ()  # the future
    assert _plan.plan_step("contiguous", 4, 3, 0, 8, 8, 3, 0) == ()  # too far back


# ----------------------------------------------------------------------------- ring: exactness

CASES = [  # (causal, window)
    (False, (-1, -1)),
    (True, (-1, -1)),
    (False, (21, 9)),
    (True, (33, -1)),
    (False, (-1, 5)),
]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("causal, window", CASES)
def test_ring_matches_single_process(size, layout, causal, window, seed, rng):
    n = {2: 96, 3: 144, 4: 192}[size] if layout == "contiguous" else \
        {2: 120, 3: 168, 4: 240}[size]
    q = random_array(rng, (2, 4, n, 16), F32)
    k = random_array(rng, (2, 2, n, 16), F32)  # grouped-query: 2 query heads per kv head
    v = random_array(rng, (2, 2, n, 24), F32)  # Dv != D
    dout = random_array(rng, (2, 4, n, 24), F32)
    options = dict(causal=causal, window=window)
    out, lse, grads = _run_ring(size, layout, q, k, v, dout, **options)
    _check_against_single(out, lse, grads, q, k, v, dout,
                          f"seed={seed} P={size} {layout} {options}", **options)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_query_and_key_lengths_differ(layout, seed, rng):
    """Nq != Nk: causal and the window are aligned bottom-right on the WHOLE problem; with
    Nq > Nk the first query rows see nothing (out 0, lse −inf, gradients 0)."""
    size = 3
    for nq, nk, causal, window in [(72, 144, True, (-1, -1)), (144, 72, True, (-1, -1)),
                                   (144, 72, False, (10, 0)), (72, 144, False, (30, 5))]:
        q = random_array(rng, (1, 2, nq, 16), F32)
        k = random_array(rng, (1, 2, nk, 16), F32)
        v = random_array(rng, (1, 2, nk, 16), F32)
        dout = random_array(rng, q.shape, F32)
        options = dict(causal=causal, window=window)
        out, lse, grads = _run_ring(size, layout, q, k, v, dout, **options)
        _check_against_single(out, lse, grads, q, k, v, dout,
                              f"seed={seed} {layout} Nq={nq} Nk={nk} {options}", **options)
        if nq > nk and causal:
            assert np.isneginf(lse[..., : nq - nk]).all()
            assert (out[..., : nq - nk, :] == 0).all()


def test_ring_softcap_scale_and_broadcast(seed, rng):
    size, layout = 2, "zigzag"
    q = random_array(rng, (2, 4, 96, 32), F32)
    k = random_array(rng, (1, 4, 96, 32), F32)  # broadcast over the batch axis
    v = random_array(rng, (1, 4, 96, 32), F32)
    dout = random_array(rng, q.shape, F32)
    options = dict(causal=True, softcap=5.0, scale=0.3)
    out, lse, grads = _run_ring(size, layout, q, k, v, dout, **options)
    _check_against_single(out, lse, grads, q, k, v, dout, f"seed={seed} {options}", **options)


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)])
def test_ring_16_bit(dtype, seed, rng):
    """16-bit inputs: the output merges float32 partials, and each ring step's gradients come
    back from cuflash in float32 (grad_dtype), so output and gradients are rounded to the input
    dtype once and stay within the single-call rule."""
    q = random_array(rng, (1, 4, 128, 32), dtype)
    k = random_array(rng, (1, 4, 128, 32), dtype)
    v = random_array(rng, (1, 4, 128, 32), dtype)
    dout = random_array(rng, q.shape, dtype)
    out, lse, grads = _run_ring(4, "zigzag", q, k, v, dout, causal=True)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    context = f"seed={seed} {dtype}"
    assert_forward_close(out, lse, q, k, v, causal=True, context=context)
    # The naive baseline's row term from the ring's own rounded output (reference
    # .naive_attention_backward): at D = 32 a row term of its own left the bound to luck.
    assert_backward_close(grads, dout, q, k, v, causal=True, out=out, context=context)


def test_ring_two_dimensional_inputs(rng):
    q, k, v, dout = (random_array(rng, (64, 16), F32) for _ in range(4))
    out, lse, grads = _run_ring(2, "zigzag", q, k, v, dout, causal=True)
    assert out.shape == (64, 16) and lse.shape == (64,)
    ref_out, ref_lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)


def test_ring_vjp_equals_forward_and_backward(rng):
    size, layout = 3, "zigzag"
    q, k, v, dout = (random_array(rng, (1, 2, 96, 16), F32) for _ in range(4))
    options = dict(causal=True, window=(20, -1))

    def rank(comm, q, k, v, dout):
        out, vjp = ring_attention_vjp(q, k, v, comm=comm, layout=layout, **options)
        return out, vjp(dout)

    results = LocalRing(size).run(rank, *(_shards(x, size, layout) for x in (q, k, v, dout)))
    out, _, grads = _run_ring(size, layout, q, k, v, dout, **options)
    np.testing.assert_array_equal(unshard([r[0] for r in results], layout), out)
    for i in range(3):
        np.testing.assert_array_equal(unshard([r[1][i] for r in results], layout), grads[i])


def test_ring_is_deterministic(rng):
    q, k, v, dout = (random_array(rng, (1, 2, 96, 16), F32) for _ in range(4))
    first = _run_ring(3, "zigzag", q, k, v, dout, causal=True)
    second = _run_ring(3, "zigzag", q, k, v, dout, causal=True)
    for a, b in zip(first[:2] + first[2], second[:2] + second[2]):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- the merge

def test_merge_of_key_halves_is_attention(rng):
    """Attention over keys [0, m) merged with attention over [m, n) is attention over all."""
    q = random_array(rng, (2, 3, 40, 16), F32)
    k = random_array(rng, (2, 3, 70, 16), F32)
    v = random_array(rng, (2, 3, 70, 16), F32)
    a = cuflash.attention(q, k[..., :30, :], v[..., :30, :], return_lse=True)
    b = cuflash.attention(q, k[..., 30:, :], v[..., 30:, :], return_lse=True)
    out, lse = merge(*a, *b)
    ref_out, ref_lse = cuflash.attention(q, k, v, return_lse=True)
    assert out.dtype == F32 and lse.dtype == F32
    np.testing.assert_allclose(out, ref_out, atol=2e-6)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-6)


def test_merge_negative_infinity_rows():
    """Rows that saw nothing on one side take the other side; on both sides stay 0 / −inf;
    never NaN (and no floating-point warnings)."""
    out_a = np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [0.0, 0.0]], F32)
    lse_a = np.array([0.5, -np.inf, -np.inf, 1.0], F32)
    out_b = np.array([[0.0, 0.0], [5.0, 6.0], [0.0, 0.0], [7.0, 8.0]], F32)
    lse_b = np.array([-np.inf, 2.0, -np.inf, 1.0], F32)
    with np.errstate(all="raise"):
        out, lse = merge(out_a, lse_a, out_b, lse_b)
    np.testing.assert_array_equal(out[0], [1.0, 2.0])
    np.testing.assert_array_equal(out[1], [5.0, 6.0])
    np.testing.assert_array_equal(out[2], [0.0, 0.0])
    np.testing.assert_allclose(out[3], [3.5, 4.0])
    assert lse[0] == F32(0.5) and lse[1] == F32(2.0) and np.isneginf(lse[2])
    np.testing.assert_allclose(lse[3], 1.0 + np.log(2.0), rtol=1e-6)
    assert not np.isnan(out).any() and not np.isnan(lse).any()


@pytest.mark.parametrize("unseen", [np.nan, np.inf, -np.inf])
def test_merge_ignores_the_out_of_rows_that_saw_nothing(unseen):
    """A side whose lse is −inf saw no key and has no weight, whatever its out holds there (NaN
    or ±inf, as other implementations leave in such rows): the merge takes the other side, or
    gives 0 when neither saw a key, as documented. It used to multiply that out by a weight of
    0 and return NaN. A NaN in a row that saw keys still shows."""
    out_a = np.array([[unseen, unseen], [unseen, unseen], [1.0, np.nan]], F32)
    lse_a = np.array([-np.inf, -np.inf, 0.0], F32)
    out_b = np.array([[5.0, 6.0], [unseen, unseen], [unseen, unseen]], F32)
    lse_b = np.array([2.0, -np.inf, -np.inf], F32)
    with np.errstate(all="raise"):
        out, lse = merge(out_a, lse_a, out_b, lse_b)
    np.testing.assert_array_equal(out[0], [5.0, 6.0])
    np.testing.assert_array_equal(out[1], [0.0, 0.0])
    assert out[2, 0] == 1.0 and np.isnan(out[2, 1])
    np.testing.assert_array_equal(lse, np.array([2.0, -np.inf, 0.0], F32))


@pytest.mark.parametrize("shapes", [((2, 3, 4), (2, 3), (2, 3, 4), (3,)),
                                    ((2, 3, 4), (3,), (2, 3, 4), (2, 3)),
                                    ((2, 3, 4), (2, 3), (1, 3, 4), (1, 3)),
                                    ((2, 3, 4), (2, 3), (2, 3, 2), (2, 3)),
                                    ((2, 3, 4), (2, 3), (2, 3, 4), (2, 2)),
                                    ((), (), (), ())])
def test_merge_refuses_results_of_other_shapes(shapes):
    """Both sides must be results of the same rows: an lse without the head axis used to be
    broadcast over the heads without an error, and other mismatches failed inside NumPy (so
    did outs without axes, which have no Dv axis for the rows' weights)."""
    arrays = [np.zeros(shape, F32) for shape in shapes]
    with pytest.raises(ValueError, match=re.escape(
            f"out_a {shapes[0]}, lse_a {shapes[1]}, out_b {shapes[2]}, lse_b {shapes[3]}")):
        merge(*arrays)


def test_merge_shard_and_unshard_refuse_what_is_not_an_array():
    """A nested list (or a NumPy array beside a non-array) is refused by name with TypeError;
    it used to fail with AttributeError ("'list' object has no attribute 'shape'")."""
    x = np.zeros((2, 4), F32)
    lse = np.zeros(2, F32)
    with pytest.raises(TypeError, match="out_b must be a numpy.ndarray or cupy.ndarray, got list"):
        merge(x, lse, x.tolist(), lse)
    with pytest.raises(TypeError, match="x must be a NumPy or CuPy array or a torch tensor, "
                                        "got list"):
        shard(x.tolist(), 0, 2)
    with pytest.raises(TypeError, match=re.escape("parts[1] must be a NumPy or CuPy array or a "
                                                  "torch tensor, got list")):
        unshard([x, x.tolist()], "contiguous")


def test_ring_rows_that_see_nothing(rng):
    """A window that leaves whole query chunks with no key on most steps, and rows with no
    key at all (Nq > Nk, causal): out exactly 0 and lse −inf there, no NaN anywhere."""
    q = random_array(rng, (1, 2, 192, 16), F32)
    k = random_array(rng, (1, 2, 96, 16), F32)
    v = random_array(rng, (1, 2, 96, 16), F32)
    dout = random_array(rng, q.shape, F32)
    options = dict(causal=True, window=(4, -1))
    out, lse, grads = _run_ring(4, "zigzag", q, k, v, dout, **options)
    assert np.isneginf(lse[..., :96]).all() and (out[..., :96, :] == 0).all()
    assert (grads[0][..., :96, :] == 0).all()
    assert not any(np.isnan(x).any() for x in (out, lse) + grads)
    assert_forward_close(out, lse, q, k, v, **options)
    assert_backward_close(grads, dout, q, k, v, **options)


# ----------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_shard_unshard_round_trip(layout, rng):
    for size in range(1, 6):
        n = 2 * size * 3
        x = rng.standard_normal((2, 3, n, 4))
        parts = _shards(x, size, layout)
        assert all(p.shape == (2, 3, n // size, 4) for p in parts)
        np.testing.assert_array_equal(unshard(parts, layout), x)
        # the positions are those the shard holds
        for r, part in enumerate(parts):
            np.testing.assert_array_equal(part, x[:, :, positions(n, r, size, layout)])
        # another axis (lse-like arrays)
        y = rng.standard_normal((3, n))
        np.testing.assert_array_equal(unshard(_shards(y, size, layout, axis=-1), layout,
                                              axis=-1), y)
        # every position is held by exactly one rank
        held = np.sort(np.concatenate([positions(n, r, size, layout) for r in range(size)]))
        np.testing.assert_array_equal(held, np.arange(n))


def test_zigzag_chunks():
    """With P ranks the sequence is 2P chunks; rank r holds chunks r and 2P − 1 − r."""
    size, chunk = 4, 3
    n = 2 * size * chunk
    for r in range(size):
        expected = list(range(r * chunk, (r + 1) * chunk)) + \
            list(range((2 * size - 1 - r) * chunk, (2 * size - r) * chunk))
        assert positions(n, r, size, "zigzag").tolist() == expected
        assert segments(2 * chunk, r, size, "zigzag") == (
            (0, r * chunk, chunk), (chunk, (2 * size - 1 - r) * chunk, chunk))


def test_uneven_lengths_are_refused(rng):
    x = np.zeros((1, 2, 100, 8), F32)
    with pytest.raises(ValueError, match=r"N = 100.*P = 3.*'contiguous'"):
        shard(x, 0, 3, "contiguous")
    with pytest.raises(ValueError, match=r"N = 100.*P = 4.*'zigzag'.*2·P = 8"):
        shard(x, 0, 4, "zigzag")
    with pytest.raises(ValueError, match=r"N = 90.*P = 4.*'zigzag'"):
        positions(90, 0, 4, "zigzag")
    # Local chunks of odd length cannot be zigzag halves.
    q = np.zeros((1, 2, 25, 8), F32)
    with pytest.raises(ValueError, match=r"zigzag.*multiple of 2·P = 4.*N = 50, which is not"):
        LocalRing(2).run(lambda comm, q: ring_attention(q, q, q, comm=comm), [q, q])


def test_ranks_and_sizes_must_be_integers():
    """A float or bool rank or size is refused by name, not truncated (rank 0.5 used to give
    rank 0's part, LocalRing(2.5) two ranks)."""
    x = np.zeros((1, 16, 8), F32)
    with pytest.raises(TypeError, match="rank must be an int, got 0.5"):
        shard(x, 0.5, 2, "zigzag")
    with pytest.raises(TypeError, match="size must be an int, got True"):
        shard(x, 0, True, "contiguous")
    with pytest.raises(TypeError, match="size must be an int, got 2.5"):
        positions(16, 0, 2.5, "zigzag")
    with pytest.raises(TypeError, match="n must be an int, got 16.0"):
        positions(16.0, 0, 2, "zigzag")
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        positions(16, 2, 2, "zigzag")
    # A negative rank is out of the same range (it was "rank must be at least 0"), as a
    # communicator's peers are.
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got -1"):
        shard(x, -1, 2, "zigzag")
    with pytest.raises(TypeError, match="size must be an int, got 2.5"):
        LocalRing(2.5)
    with pytest.raises(ValueError, match="size must be at least 1, got 0"):
        LocalRing(0)
    assert LocalRing(np.int64(2)).size == 2


def test_odd_local_length_message_does_not_call_n_a_multiple(rng):
    # 3 rows on each of 2 ranks: N = 6, which 2·P = 4 does not divide.
    q = np.zeros((1, 1, 3, 8), F32)
    with pytest.raises(ValueError) as raised:
        LocalRing(2).run(lambda comm, q: ring_attention(q, q, q, comm=comm), [q, q])
    message = str(raised.value)
    assert "N = 6 that is a multiple" not in message
    assert "N = 6, which is not" in message and "multiple of 2·P = 4" in message


def test_unsupported_options_are_refused():
    q = np.zeros((1, 2, 8, 8), F32)
    with pytest.raises(NotImplementedError, match="alibi"):
        LocalRing(1).run(lambda comm: ring_attention(q, q, q, comm=comm,
                                                     alibi_slopes=np.ones(2, F32)))
    with pytest.raises(ValueError, match="layout"):
        LocalRing(1).run(lambda comm: ring_attention(q, q, q, comm=comm, layout="striped"))
    with pytest.raises(TypeError, match="communicator"):
        ring_attention(q, q, q, comm=None)


@pytest.mark.parametrize("attention", ["ring", "ring backward", "ulysses", "torch ring"])
@pytest.mark.parametrize("comm", [None, 5, LocalRing(2)])
def test_comm_must_be_a_communicator(attention, comm):
    """comm is checked as a communicator, naming the ones there are: a LocalRing given instead
    of one of its comms used to fail with "'LocalRing' object has no attribute 'all_gather'"."""
    q = np.zeros((1, 2, 8, 8), F32)
    lse = np.zeros((1, 2, 8), F32)
    if attention == "torch ring":
        torch = pytest.importorskip("torch")
        from cuflash.parallel import torch_ring_attention
        t = torch.from_numpy(q)
        call = lambda: torch_ring_attention(t, t, t, comm=comm)  # noqa: E731
    else:
        call = {"ring": lambda: ring_attention(q, q, q, comm=comm),
                "ring backward": lambda: ring_attention_backward(q, q, q, q, q, lse, comm=comm),
                "ulysses": lambda: ulysses_attention(q, q, q, comm=comm)}[attention]
    with pytest.raises(TypeError, match=r"comm must be a communicator \(LocalRing\(P\)\.comms"
                                        r"\[r\], NcclComm or TorchComm\), got "
                                        + type(comm).__name__):
        call()


@pytest.mark.parametrize("option, value, error", [
    ("softcap", True, TypeError), ("softcap", "5", TypeError), ("softcap", -1.0, ValueError),
    ("scale", True, TypeError), ("scale", "0.3", TypeError), ("scale", 0.0, ValueError),
    ("return_lse", "no", TypeError), ("validate", None, TypeError),
    ("deterministic", "yes", TypeError)])
def test_ring_options_are_checked_as_cuflash_attention_checks_them(option, value, error):
    """Every ring option is refused by name, as ``cuflash.attention`` refuses it, before any
    step runs (a bool ``softcap`` or ``scale`` is not silently 1.0)."""
    q = np.zeros((1, 2, 8, 8), F32)

    def call(comm):
        if option == "deterministic":
            _, vjp = ring_attention_vjp(q, q, q, comm=comm, deterministic=value)
            return vjp(q)
        return ring_attention(q, q, q, comm=comm, **{option: value})

    with pytest.raises(error, match=option):
        LocalRing(2).run(call)


# ----------------------------------------------------------------------------- failures

def test_mismatched_ranks_raise_instead_of_hanging():
    """A rank with another chunk shape, or other options, is an error on every rank."""
    a = np.zeros((1, 2, 16, 8), F32)
    b = np.zeros((1, 2, 12, 8), F32)
    with pytest.raises(ValueError, match="other shapes"):
        LocalRing(2).run(lambda comm, q: ring_attention(q, q, q, comm=comm), [a, b])
    with pytest.raises(ValueError, match="other shapes"):
        LocalRing(2).run(lambda comm, c: ring_attention(a, a, a, comm=comm, causal=c),
                         [True, False])


def test_a_failing_rank_does_not_hang_the_others():
    """Rank 1 raises before sending: rank 0, waiting for it, fails at once naming it, and run()
    raises rank 1's own error."""
    q = np.zeros((1, 2, 16, 8), F32)

    def rank(comm):
        if comm.rank == 1:
            raise ValueError("rank 1 broke")
        return ring_attention(q, q, q, comm=comm, validate=False)

    start = time.monotonic()
    with pytest.raises(ValueError, match="rank 1 broke"):
        LocalRing(3, timeout=30).run(rank)
    assert time.monotonic() - start < 10


def test_a_hanging_rank_times_out():
    q = np.zeros((1, 2, 16, 8), F32)
    seen = {}

    def rank(comm):
        if comm.rank == 1:
            time.sleep(1.0)  # hangs (then leaves without calling)
            return None
        try:
            return ring_attention(q, q, q, comm=comm, validate=False)
        except CommTimeout as error:
            seen["error"] = str(error)
            raise

    start = time.monotonic()
    with pytest.raises(CommError):
        LocalRing(2, timeout=0.2).run(rank)
    assert time.monotonic() - start < 10
    assert "within 0.2 s" in seen["error"] and "rank 1" in seen["error"]


def test_calls_in_different_orders_are_detected():
    def rank(comm):
        if comm.rank == 0:
            comm.all_gather(np.zeros(1))
        else:
            comm.shift([np.zeros(1)]).wait()

    with pytest.raises(CommError, match="same order|do not make the same calls"):
        LocalRing(2, timeout=5).run(rank)


def test_local_all_to_all_refuses_other_dtypes_between_two_ranks_on_every_rank():
    """As under NCCL and torch.distributed: ranks 0 and 1 send each other float32 and float64,
    and every rank (rank 2 too, whose pairs agree) raises one ValueError naming the pair."""
    def rank(comm):
        dtype = np.float64 if comm.rank == 1 else np.float32
        try:
            comm.all_to_all([np.zeros(2, dtype) for _ in range(comm.size)])
        except ValueError as error:
            return str(error)
        return None

    messages = LocalRing(3).run(rank)
    assert all(m is not None and "one dtype in each direction" in m and "rank 0" in m
               and "rank 1" in m for m in messages), messages


def test_local_ring_collectives():
    def rank(comm):
        x = np.array([comm.rank + 1.0])
        gathered = [float(y[0]) for y in comm.all_gather(x)]
        total = float(comm.all_reduce(x)[0])
        moved = comm.all_to_all([np.array([10 * comm.rank + j]) for j in range(comm.size)])
        comm.barrier()
        shifted = comm.shift([x], offset=2).wait()[0]
        return gathered, total, [int(m[0]) for m in moved], float(shifted[0])

    results = LocalRing(4).run(rank)
    for r, (gathered, total, moved, shifted) in enumerate(results):
        assert gathered == [1.0, 2.0, 3.0, 4.0] and total == 10.0
        assert moved == [10 * s + r for s in range(4)]
        assert shifted == (r - 2) % 4 + 1.0


@pytest.mark.parametrize("size, offset", [(1, 1), (1, 0), (2, 2), (3, 1)])
def test_a_shifted_array_is_a_copy_on_every_ring(size, offset):
    """What a rank receives is a copy of what was sent, so that the sender may reuse its buffer
    at once (as LocalRing promises): a shift to the rank itself (a ring of one rank, or an
    offset of a multiple of the size) used to hand back the sent array itself, so that the
    receiver saw the sender's later writes."""
    def rank(comm):
        buffer = np.full(3, comm.rank + 1.0)
        pending = comm.shift([buffer], offset=offset)
        buffer[...] = -1.0  # reused by the sender before the receiver waits
        return pending.wait()[0]

    for r, received in enumerate(LocalRing(size, timeout=10).run(rank)):
        np.testing.assert_array_equal(received, np.full(3, (r - offset) % size + 1.0))


_BAD_PEERS = [(1.0, TypeError, "must be an int"), (True, TypeError, "must be an int"),
              (np.float32(1), TypeError, "must be an int"),
              (2, ValueError, r"must be in \[0, 2\)"), (-1, ValueError, r"must be in \[0, 2\)")]


@pytest.mark.parametrize("peer, error, message", _BAD_PEERS)
@pytest.mark.parametrize("name", ["dst", "src"])
def test_local_exchange_refuses_a_peer_that_is_no_rank_by_name(name, peer, error, message):
    """exchange took int(peer): dst=1.0 or True was rank 1, and 1.7 too."""
    def rank(comm):
        peers = {"dst": 1 - comm.rank, "src": 1 - comm.rank}
        peers[name] = peer
        return comm.exchange([np.zeros(1)], **peers)

    with pytest.raises(error, match=f"{name} {message}"):
        LocalRing(2, timeout=10).run(rank)


@pytest.mark.parametrize("offset", [1.0, True, 0.5, "1"])
def test_shift_refuses_an_offset_that_is_no_int_by_name(offset):
    with pytest.raises(TypeError, match="offset must be an int"):
        LocalRing(2, timeout=10).run(lambda comm: comm.shift([np.zeros(1)], offset=offset))


class _NoDevice:
    """Stands for CuPy where a check must come before any use of the device or of NCCL."""

    def __getattr__(self, name):
        raise AssertionError(f"cupy.{name} used before the arguments were checked")


@pytest.mark.parametrize("communicator", ["NcclComm", "TorchComm"])
@pytest.mark.parametrize("peer, error, message", _BAD_PEERS)
@pytest.mark.parametrize("name", ["dst", "src"])
def test_device_exchange_refuses_a_peer_that_is_no_rank_before_any_transfer(
        communicator, name, peer, error, message):
    """NcclComm.exchange handed int(dst) and int(src) to NCCL unchecked, and TorchComm.exchange
    dst and src to torch.distributed: 1.0 and True were rank 1, and a rank past the ring was
    left to the transport to fail (or wait) on."""
    if communicator == "TorchComm":
        pytest.importorskip("torch")
    from cuflash import parallel
    kind = getattr(parallel, communicator)
    comm = kind.__new__(kind)
    comm.rank, comm.size, comm.cupy, comm.dist = 0, 2, _NoDevice(), _NoDevice()
    peers = {"dst": 1, "src": 1, name: peer}
    with pytest.raises(error, match=f"{name} {message}"):
        comm.exchange([np.zeros(1)], **peers)


@pytest.mark.parametrize("rank, size, error, message", [
    (0, 2.0, TypeError, "size must be an int"), (0, True, TypeError, "size must be an int"),
    (0, 0, ValueError, "size must be at least 1"), (1.0, 2, TypeError, "rank must be an int"),
    (False, 2, TypeError, "rank must be an int"), (2, 2, ValueError, r"rank must be in \[0, 2\)"),
    (-1, 2, ValueError, r"rank must be in \[0, 2\)")])
def test_nccl_comm_refuses_a_rank_or_size_that_is_no_int_before_cupy(rank, size, error, message,
                                                                      monkeypatch):
    """NcclComm(1.0, 2.0, uid) took int() of both; the checks come before CuPy or NCCL is
    touched."""
    from cuflash.parallel import nccl
    monkeypatch.setattr(nccl, "_nccl", lambda: pytest.fail("NCCL loaded before the checks"))
    monkeypatch.setitem(sys.modules, "cupy", _NoDevice())
    with pytest.raises(error, match=message):
        nccl.NcclComm(rank, size, bytes(128))


@pytest.mark.parametrize("variables, error, message", [
    (dict(RANK="one"), ValueError, "RANK must be an int, got 'one'"),
    (dict(WORLD_SIZE="2.0"), ValueError, "WORLD_SIZE must be an int, got '2.0'"),
    (dict(WORLD_SIZE="0"), ValueError, "WORLD_SIZE must be at least 1, got 0"),
    (dict(LOCAL_RANK="x"), ValueError, "LOCAL_RANK must be an int, got 'x'"),
    (dict(LOCAL_RANK="-1"), ValueError, "LOCAL_RANK must be at least 0, got -1"),
    (dict(RANK="2"), ValueError, r"RANK must be in \[0, 2\), got 2"),
    (dict(CUFLASH_COMM_TIMEOUT="soon"), ValueError, "CUFLASH_COMM_TIMEOUT must be a number"),
    (dict(CUFLASH_NCCL_ID="zz"), ValueError, "CUFLASH_NCCL_ID must be .*128 bytes.*, got 'zz'"),
    (dict(CUFLASH_NCCL_ID="ab" * 127), ValueError, "CUFLASH_NCCL_ID must be .*got 127 bytes"),
    (dict(timeout=0), ValueError, "timeout must be a positive number of seconds or None")])
def test_nccl_from_env_names_a_bad_variable_before_the_device_is_chosen(variables, error, message,
                                                                        monkeypatch):
    """from_env read RANK, WORLD_SIZE and LOCAL_RANK with int(): a bad value was "invalid
    literal for int()", naming nothing, and a RANK past WORLD_SIZE (or a bad timeout) was
    refused only after the GPU had been chosen and the unique id written or waited for."""
    from cuflash.parallel import nccl
    monkeypatch.setattr(nccl, "_nccl", lambda: pytest.fail("NCCL loaded before the checks"))
    monkeypatch.setitem(sys.modules, "cupy", _NoDevice())
    monkeypatch.setenv("CUFLASH_NCCL_ID_FILE", "/nonexistent/id")
    variables = dict(variables)
    timeout = variables.pop("timeout", "env")
    for name, value in dict(dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0"), **variables).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(error, match=message):
        nccl.NcclComm.from_env(timeout=timeout)


class _Stop(Exception):
    """Raised by a stand-in for NCCL, once the arguments have been read."""


@pytest.mark.parametrize("variable, seconds", [("5", 5.0), ("none", None), (None, 600.0)])
def test_nccl_comm_timeout_defaults_to_the_environment(variable, seconds, monkeypatch):
    """NcclComm's timeout defaults to CUFLASH_COMM_TIMEOUT, else 600 s, as docs/parallel.md and
    the module say; the constructor (and from_torch) took 600 s whatever the variable said, so
    that `--timeout` of the launcher reached from_env alone."""
    from cuflash.parallel import nccl

    def stop():
        raise _Stop

    monkeypatch.setattr(nccl, "_nccl", stop)
    monkeypatch.setitem(sys.modules, "cupy", object())
    if variable is None:
        monkeypatch.delenv("CUFLASH_COMM_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("CUFLASH_COMM_TIMEOUT", variable)
    comm = nccl.NcclComm.__new__(nccl.NcclComm)
    with pytest.raises(_Stop):
        comm.__init__(0, 1, bytes(128))
    assert comm.timeout == seconds
    with pytest.raises(_Stop):
        comm.__init__(0, 1, bytes(128), timeout=7)  # an argument wins
    assert comm.timeout == 7.0


def test_all_reduce_refuses_an_unknown_operation_before_sending():
    """all_reduce names the operations it knows, on every rank and before any message (an
    unknown one was a KeyError, raised after the all-gather)."""
    sent = []

    def rank(comm):
        exchange = comm.exchange
        comm.exchange = lambda *a, **k: sent.append(comm.rank) or exchange(*a, **k)
        original = comm.all_to_all
        comm.all_to_all = lambda *a: sent.append(comm.rank) or original(*a)
        return comm.all_reduce(np.ones(1), op="prod")

    with pytest.raises(ValueError, match="op must be one of 'sum', 'max', 'min', got 'prod'"):
        LocalRing(2, timeout=10).run(rank)
    assert sent == []


@pytest.mark.parametrize("function, option", [
    ("ring_attention", "return_lse"), ("ring_attention_backward", "deterministic"),
    ("ring_attention_vjp", "deterministic"), ("ulysses_attention", "return_lse"),
    ("ulysses_attention_backward", "deterministic")])
@pytest.mark.parametrize("validate", [True, False])
def test_bool_options_are_refused_before_any_transfer(function, option, validate, rng):
    """return_lse and deterministic are refused before the ranks exchange any data, as the
    other options are: ring attention used to read them after the comparison of the ranks'
    calls, and Ulysses' backward (validate=False) only after its all-to-alls. With
    validate=True the refusal rides the comparison's one all-gather (so that every rank
    learns of it); with validate=False nothing is sent."""
    q = random_array(rng, (1, 2, 8, 8), F32)
    lse = np.zeros((1, 2, 8), F32)
    arrays = (q, q, q) if function in ("ring_attention", "ring_attention_vjp",
                                       "ulysses_attention") else (q, q, q, q, q, lse)
    call = {"ring_attention": ring_attention, "ring_attention_backward": ring_attention_backward,
            "ring_attention_vjp": ring_attention_vjp, "ulysses_attention": ulysses_attention,
            "ulysses_attention_backward": ulysses_attention_backward}[function]
    sent = []

    def rank(comm):
        _record_messages(comm, sent)
        return call(*arrays, comm=comm, validate=validate, **{option: "yes"})

    with pytest.raises(TypeError, match=f"{option} must be True or False"):
        LocalRing(2, timeout=10).run(rank)
    assert sorted(sent) == ([(0, "all_gather"), (1, "all_gather")] if validate else [])


def _record_messages(comm, sent):
    """Make ``comm`` append ``(rank, operation)`` to ``sent`` for each exchange, all-to-all and
    all-gather it starts (an all-gather's own all-to-all is not counted twice)."""
    exchange, all_to_all, all_gather = comm.exchange, comm.all_to_all, comm.all_gather
    inside = []

    def gather(x):
        sent.append((comm.rank, "all_gather"))
        inside.append(True)
        try:
            return all_gather(x)
        finally:
            inside.pop()

    def to_all(arrays):
        if not inside:
            sent.append((comm.rank, "all_to_all"))
        return all_to_all(arrays)

    def swap(*args, **kwargs):
        sent.append((comm.rank, "exchange"))
        return exchange(*args, **kwargs)

    comm.exchange, comm.all_to_all, comm.all_gather = swap, to_all, gather


@pytest.mark.parametrize("option, value, error", [
    ("causal", "yes", TypeError), ("window", (2.5, -1), TypeError), ("window", (-3, 0), ValueError),
    ("softcap", -1.0, ValueError), ("scale", "big", TypeError)])
@pytest.mark.parametrize("backward", [False, True])
def test_ulysses_options_are_refused_before_any_message_without_validation(option, value,
                                                                          error, backward, rng):
    """With validate=False, Ulysses attention still refuses its options before the all-to-alls,
    as ring attention does; they used to reach cuflash.attention unchecked, after them."""
    q = random_array(rng, (1, 2, 8, 8), F32)
    lse = np.zeros((1, 2, 8), F32)
    sent = []

    def rank(comm):
        all_to_all = comm.all_to_all
        comm.all_to_all = lambda *a: sent.append(comm.rank) or all_to_all(*a)
        options = {option: value, "comm": comm, "validate": False}
        if backward:
            return ulysses_attention_backward(q, q, q, q, q, lse, **options)
        return ulysses_attention(q, q, q, **options)

    with pytest.raises(error, match=option):
        LocalRing(2, timeout=10).run(rank)
    assert sent == []


# ----------------------------------------------------------------------------- Ulysses

@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ulysses_matches_single_process(layout, seed, rng):
    size = 2
    q = random_array(rng, (1, 4, 96, 16), F32)
    k = random_array(rng, (1, 2, 96, 16), F32)
    v = random_array(rng, (1, 2, 96, 16), F32)
    dout = random_array(rng, q.shape, F32)
    slopes = (2.0 ** -np.arange(1, 5)).astype(F32)
    options = dict(causal=True, window=(40, -1), softcap=8.0, alibi_slopes=slopes)
    out, lse, grads = _run_sharded(ulysses_attention, ulysses_attention_backward, size, layout,
                                   q, k, v, dout, **options)
    _check_against_single(out, lse, grads, q, k, v, dout, f"seed={seed} {layout}", **options)


def test_ulysses_needs_divisible_heads():
    q = np.zeros((1, 3, 16, 8), F32)
    with pytest.raises(ValueError, match="multiples of 2"):
        LocalRing(2).run(lambda comm: ulysses_attention(q, q, q, comm=comm))


@pytest.mark.parametrize("shape", [(8,), (2,), (3, 4)])
def test_ulysses_slopes_are_checked_against_every_head(shape):
    """The slopes are those of all Hq heads: a wrong shape is refused naming alibi_slopes and
    Hq, not cut into per-rank slices (8 slopes for 4 heads used to run with the first 4)."""
    q = np.zeros((4, 16, 8), F32)
    slopes = np.ones(shape, F32)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(Hq,\) = \(4,\)"):
        LocalRing(2).run(lambda comm: ulysses_attention(q, q, q, comm=comm,
                                                        alibi_slopes=slopes))
    with pytest.raises(ValueError, match=r"alibi_slopes.*\(4,\)"):
        LocalRing(2).run(lambda comm: ulysses_attention_backward(
            q, q, q, q, q, np.zeros((4, 8), F32), comm=comm, alibi_slopes=slopes))
    with pytest.raises(TypeError, match="return_lse"):
        LocalRing(2).run(lambda comm: ulysses_attention(q, q, q, comm=comm, return_lse="no"))


# ----------------------------------------------------------------------------- the check

def test_check_sharded_on_the_cpu():
    from cuflash.parallel import check_sharded
    result = check_sharded(ranks=3, device="cpu", seq_len=192, heads=4, kv_heads=2,
                           head_dim=16, rows=48, window=(40, 3))
    assert result.passed, result.report()
    assert [c.name for c in result.comparisons] == ["out", "lse", "dq", "dk", "dv"]
    report = result.report()
    assert "PASS" in report and "3 ranks (simulated, cpu)" in report
    assert "backward: dout random on those rows" in report
    assert result.record()["passed"] is True
    assert set(result.times) == {"ring_forward_and_backward_simulated"}


@pytest.mark.parametrize("option, value, error", [
    ("ranks", 2.5, TypeError), ("ranks", True, TypeError), ("seq_len", 32.5, TypeError),
    ("heads", 0, ValueError), ("kv_heads", 0, ValueError), ("head_dim", 0, ValueError),
    ("rows", 0, ValueError), ("rows", -1, ValueError), ("seed", -1, ValueError),
    ("repeats", 0, ValueError), ("causal", "no", TypeError), ("backward", None, TypeError),
    ("window", (2.7, 1), TypeError), ("softcap", True, TypeError), ("timeout", -1, ValueError)])
def test_check_sharded_refuses_bad_arguments_by_name(option, value, error):
    """Every argument is checked before the problem is built, by the rules ring attention
    applies, instead of being coerced (causal="no" used to run a causal check, kv_heads=0 a
    check with kv_heads = heads, window=(2.7, 1) one with window (2, 1))."""
    from cuflash.parallel import check_sharded
    arguments = dict(ranks=2, device="cpu", seq_len=32, heads=2, head_dim=8, rows=8)
    arguments[option] = value
    with pytest.raises(error, match=option):
        check_sharded(**arguments)


@pytest.mark.parametrize("mode", [None, "processes", "simulated"])
@pytest.mark.parametrize("option, value, error", [
    ("heads", 0, ValueError), ("seq_len", 30, ValueError), ("dtype", "int8", ValueError),
    ("causal", "no", TypeError)])
def test_check_sharded_refuses_a_bad_argument_before_looking_for_gpus(mode, option, value, error,
                                                                       monkeypatch):
    """On a machine without the GPUs asked for, a bad argument was refused as "CuPy sees no
    CUDA device" (or "needs 2 GPUs"): the arguments are checked first, by name."""
    from cuflash.parallel import check, check_sharded
    monkeypatch.setattr(check, "gpu_count", lambda: 0)
    arguments = dict(ranks=2, device="gpu", mode=mode, seq_len=32, heads=2, head_dim=8, rows=8)
    arguments[option] = value
    with pytest.raises(error, match=option):
        check_sharded(**arguments)
    with pytest.raises(RuntimeError, match="CuPy sees no CUDA device"):
        check_sharded(**dict(arguments, **{option: dict(heads=2, seq_len=32, dtype="float32",
                                                        causal=True)[option]}))


@pytest.mark.parametrize("dtype, name", [
    (np.dtype(np.float32), "float32"), (np.float16, "float16"), (BF16, "bfloat16"),
    (ml_dtypes.bfloat16, "bfloat16"), ("float32", "float32")])
def test_check_sharded_takes_a_numpy_dtype_by_its_name(dtype, name):
    """A NumPy dtype was taken as it was: report() failed on it, and the record could not be
    written as JSON (nor, with processes, the configuration the ranks read). It is held by its
    name now."""
    from cuflash.parallel import check_sharded
    result = check_sharded(ranks=2, device="cpu", seq_len=32, heads=1, head_dim=8, rows=8,
                           dtype=dtype)
    assert result.config["dtype"] == name
    assert f", {name}, " in result.report().splitlines()[0]
    assert json.loads(json.dumps(result.record()))["config"]["dtype"] == name


def test_check_sharded_record_is_strict_json_without_a_timeout():
    """timeout=inf (waits without a deadline; --timeout inf) was written to the record as
    Infinity, which is no JSON: strict readers refused the --json file. It is null now, as
    the record's other values that are not finite."""
    from cuflash.parallel import check_sharded
    result = check_sharded(ranks=2, device="cpu", seq_len=32, heads=1, head_dim=8, rows=8,
                           timeout=float("inf"), backward=False)
    record = json.loads(json.dumps(result.record(), allow_nan=False))
    assert record["config"]["timeout"] is None and record["config"]["seq_len"] == 32


@pytest.mark.parametrize("dtype, error", [
    (np.float64, ValueError), ("float64", ValueError), (np.int8, ValueError),
    (3, TypeError), (True, TypeError)])
def test_check_sharded_refuses_other_dtypes_by_name(dtype, error):
    from cuflash.parallel import check_sharded
    with pytest.raises(error, match="dtype must be one of float16, bfloat16, float32"):
        check_sharded(ranks=2, device="cpu", seq_len=32, heads=1, head_dim=8, rows=8,
                      dtype=dtype)


def test_check_sharded_refuses_processes_on_the_cpu_by_name(monkeypatch):
    """mode="processes" with device="cpu" (always simulated) was a RuntimeError saying that
    0 GPUs were visible, however many were: refused as the options' conflict now."""
    from cuflash.parallel import check
    monkeypatch.setattr(check, "gpu_count", lambda: 8)
    monkeypatch.setattr(check, "_problem", lambda config: pytest.fail("problem built"))
    with pytest.raises(ValueError, match="mode='processes' needs device='gpu'"):
        check.check_sharded(ranks=2, device="cpu", mode="processes", seq_len=32, heads=2,
                            head_dim=8, rows=8)


@pytest.mark.parametrize("heads, kv_heads", [(4, 3), (2, 4)])
def test_check_sharded_refuses_kv_heads_that_do_not_divide_heads(heads, kv_heads, monkeypatch):
    """kv_heads must divide heads (grouped-query attention): refused by name before the
    problem is built or any rank runs; the error used to come from inside the ranks, naming the
    shapes of one rank's shards (and, with processes, only after the launch, as a failed run)."""
    from cuflash.parallel import check
    monkeypatch.setattr(check, "_problem", lambda config: pytest.fail("problem built"))
    with pytest.raises(ValueError, match=f"kv_heads = {kv_heads} must divide heads = {heads}"):
        check.check_sharded(ranks=2, device="cpu", seq_len=32, heads=heads, kv_heads=kv_heads,
                            head_dim=8, rows=8)


def test_check_sharded_forward_only_names_what_it_did():
    from cuflash.parallel import check_sharded
    result = check_sharded(ranks=2, device="cpu", seq_len=64, heads=1, head_dim=16, rows=16,
                           backward=False)
    assert result.passed, result.report()
    report = result.report()
    assert "dout" not in report and "backward" not in report
    assert report.splitlines()[1] == "reference: float64 on 16 of 64 query rows"
    assert set(result.times) == {"ring_forward_simulated"}
    assert "simulated ring, every rank a thread of this process" in report


def test_check_sharded_deadline_stops_the_rank_processes(tmp_path):
    """Past its deadline (10 × timeout) the check raises TimeoutError with the rank processes
    stopped; they used to keep running (and holding their GPUs) after the error, the launcher
    left waiting for them in a thread of its own."""
    from cuflash.parallel.check import _launch_with_deadline
    from cuflash.parallel.launch import launch
    pid_file = tmp_path / "pid"
    command = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w')"
                                     f".write(str(os.getpid())); time.sleep(60)"]
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 3 s"):
        _launch_with_deadline(launch, command, {"ranks": 1, "timeout": 0.3})
    assert time.monotonic() - start < 30
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # stopped and reaped
    os.kill(pid, 9)
    raise AssertionError(f"rank process {pid} still ran after the deadline")


def test_check_sharded_memory_stays_within_the_estimate_it_is_refused_by():
    """``cuflash check --gpus N`` refuses a sharded check whose estimated memory does not fit;
    the estimate counts a float64 reference that runs one head and one chunk of rows at a time,
    but check_sharded ran its float64 and baseline references over every head at once (at 1M
    tokens, score matrices of ~17 GB each), and went past the estimate. Now its peak stays
    within it."""
    import tracemalloc

    from cuflash.bench.devices import CpuDevice
    from cuflash.cli.check import _sharded_estimate
    from cuflash.parallel import check_sharded
    n, heads, head_dim, rows = 1024, 8, 32, 1024
    cuflash.attention(*(np.ones((1, 1, 8, 8), F32),) * 3)  # the NumPy path loaded first
    tracemalloc.start()
    try:
        result = check_sharded(ranks=2, device="cpu", seq_len=n, heads=heads, kv_heads=4,
                               head_dim=head_dim, rows=rows, softcap=5.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.passed, result.report()
    _, needed, _ = _sharded_estimate(CpuDevice(), "simulated", 2, n, heads, head_dim,
                                     np.dtype(F32), rows, True, True, 1)
    assert peak <= needed


@pytest.mark.parametrize("name", ["out", "lse"])
def test_check_sharded_fails_a_nan_outside_the_sampled_rows(name, monkeypatch):
    """out and lse are compared with float64 on the sampled rows only; a NaN anywhere else in
    out failed the check, but one in lse passed it."""
    from cuflash.check.verify import sample_rows
    from cuflash.parallel import check
    n, rows, seed = 32, 8, 0
    outside = int(np.setdiff1d(np.arange(n), sample_rows(n, rows, seed))[0])
    holder = next(r for r in range(2) if outside in positions(n, r, 2, "zigzag"))
    local = int(np.flatnonzero(positions(n, holder, 2, "zigzag") == outside)[0])
    run = check._run_simulated

    def poisoned(config, *arrays):
        shards, times = run(config, *arrays)
        shards[holder][name][0, 0, local] = np.nan
        return shards, times

    monkeypatch.setattr(check, "_run_simulated", poisoned)
    result = check.check_sharded(ranks=2, device="cpu", seq_len=n, heads=1, head_dim=8,
                                 rows=rows, seed=seed, backward=False)
    assert not result.passed, result.report()


def test_check_sharded_never_passes_an_infinite_error():
    """The check's verdict is the project's rule (cuflash.check.rule.passes): an infinite error
    fails even when the naive baseline overflowed too; check_sharded used to compare against
    the infinite bound itself and report PASS for a result that had overflowed."""
    from cuflash.parallel.check import Comparison, ShardedCheck
    inf = float("inf")
    overflowed = Comparison("dq", error=inf, naive_error=inf, rows="all", single_difference=inf)
    assert not overflowed.passed
    assert Comparison("dq", error=0.5, naive_error=inf, rows="all",
                      single_difference=0.0).passed  # as rule.passes: a finite error passes
    assert not ShardedCheck(config={}, comparisons=[overflowed]).passed


# ----------------------------------------------------------------------------- torch

def test_torch_tensors_and_autograd(rng):
    torch = pytest.importorskip("torch")
    import cuflash.torch
    from cuflash.parallel import torch_ring_attention
    size, layout = 2, "zigzag"
    q, k, v, dout = (torch.from_numpy(random_array(rng, (1, 2, 64, 16), F32))
                     for _ in range(4))
    ref = cuflash.torch.attention(*(x.clone().requires_grad_() for x in (q, k, v)),
                                  causal=True)

    def rank(comm, q, k, v, dout):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = torch_ring_attention(*leaves, comm=comm, causal=True, layout=layout)
        out.backward(dout)
        return out.detach(), [x.grad for x in leaves]

    parts = [[shard(x, r, size, layout) for r in range(size)] for x in (q, k, v, dout)]
    results = LocalRing(size).run(rank, *parts)
    out = unshard([r[0] for r in results], layout)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    cuflash.torch.attention(*leaves, causal=True).backward(dout)
    for i in range(3):
        torch.testing.assert_close(unshard([r[1][i] for r in results], layout), leaves[i].grad,
                                   atol=1e-5, rtol=0)


def _gloo_rank(rank, size, port, n, seed, queue):
    """One process of the TorchComm test: ring attention over torch.distributed (Gloo)."""
    import datetime

    import torch.distributed as dist

    from cuflash.parallel import TorchComm
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        comm = TorchComm(timeout=60)
        rng = np.random.default_rng(seed)
        q, k, v, dout = (rng.standard_normal((1, 2, n, 16), dtype=F32) for _ in range(4))
        parts = [shard(x, rank, size, "zigzag") for x in (q, k, v, dout)]
        out, lse = ring_attention(*parts[:3], comm=comm, causal=True, return_lse=True)
        grads = ring_attention_backward(parts[3], *parts[:3], out, lse, comm=comm, causal=True)
        heads = ulysses_attention(*parts[:3], comm=comm, layout="zigzag", causal=True)
        queue.put((rank, out, lse, grads, heads))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_comm_over_gloo_processes(rng):
    """TorchComm with real processes (Gloo on the CPU): the same answers as one process."""
    pytest.importorskip("torch")
    import multiprocessing

    from cuflash.parallel.launch import _free_port
    size, n, seed = 2, 64, int(rng.integers(1 << 31))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_gloo_rank, args=(r, size, port, n, seed, queue))
                 for r in range(size)]
    for p in processes:
        p.start()
    try:
        results = sorted((queue.get(timeout=120) for _ in range(size)), key=lambda r: r[0])
    finally:
        for p in processes:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in processes)
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal((1, 2, n, 16), dtype=F32) for _ in range(4))
    out = unshard([r[1] for r in results], "zigzag")
    lse = unshard([r[2] for r in results], "zigzag", axis=-1)
    grads = tuple(unshard([r[3][i] for r in results], "zigzag") for i in range(3))
    _check_against_single(out, lse, grads, q, k, v, dout, f"seed={seed} gloo", causal=True)
    np.testing.assert_allclose(unshard([r[4] for r in results], "zigzag"), out, atol=1e-5)


# ----------------------------------------------------------------------------- the launcher

def _launch(tmp_path, body, gpus, **options):
    from cuflash.parallel.launch import launch
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return launch([sys.executable, str(script)], gpus, **options)


def test_launcher_environment_and_rendezvous(tmp_path):
    """Every process gets its rank and the rendezvous file; rank 0's bytes reach all ranks."""
    code = _launch(tmp_path, f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from cuflash.parallel.nccl import rendezvous_file
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        assert os.environ["LOCAL_RANK"] == str(rank) and size == 3
        assert os.environ["MASTER_PORT"]
        data = rendezvous_file(os.environ["CUFLASH_NCCL_ID_FILE"], rank, 30,
                               lambda: bytes(range(128)))
        assert data == bytes(range(128)), data
        open(os.path.join({str(tmp_path)!r}, f"ok{{rank}}"), "w").close()
        """, 3, timeout=30)
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("ok*")) == ["ok0", "ok1", "ok2"]


@pytest.mark.parametrize("given, inherited, expected", [
    ({"master_addr": "10.1.2.3", "master_port": 29511},
     {"MASTER_ADDR": "192.168.0.9", "MASTER_PORT": "29600"}, ("10.1.2.3", "29511")),
    ({}, {"MASTER_ADDR": "192.168.0.9", "MASTER_PORT": "29600"}, ("192.168.0.9", "29600")),
    ({}, {}, ("127.0.0.1", None))])
def test_launcher_master_address_and_port(given, inherited, expected, tmp_path):
    """An address or port given to the launcher beats the one in its environment, which beats
    the defaults; the address given used to lose to an inherited MASTER_ADDR, so the ranks met
    at another host than the one named."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("MASTER_ADDR", "MASTER_PORT")}
    code = _launch(tmp_path, f"""
        import os
        with open(os.path.join({str(tmp_path)!r}, "master"), "w") as f:
            f.write(os.environ["MASTER_ADDR"] + " " + os.environ["MASTER_PORT"])
        """, 1, env=dict(env, **inherited), **given)
    assert code == 0
    addr, port = (tmp_path / "master").read_text().split()
    assert addr == expected[0]
    assert port == expected[1] if expected[1] else int(port) > 0


def test_unique_id_file_is_written_whole_for_its_owner(tmp_path):
    """Rank 0's NCCL unique id goes through cuflash._files.write_atomically (the one atomic
    writer), readable by its owner alone, with nothing left beside it."""
    from cuflash.parallel.nccl import read_unique_id, write_unique_id
    path = tmp_path / "nccl.id"
    write_unique_id(str(path), bytes(range(128)))
    assert read_unique_id(str(path), 1) == bytes(range(128))
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["nccl.id"]


def test_launcher_stops_every_rank_when_one_fails(tmp_path):
    start = time.monotonic()
    code = _launch(tmp_path, """
        import os, sys, time
        if os.environ["RANK"] == "1":
            sys.exit(3)
        time.sleep(60)
        """, 2, grace=1.0)
    assert code == 3
    assert time.monotonic() - start < 30


def test_launcher_exit_status_of_a_rank_killed_by_a_signal(tmp_path):
    """A rank killed by a signal makes the launcher exit as a shell reports such a process,
    128 + the signal (137 for SIGKILL); it used to pass Popen's -9 to sys.exit, which the shell
    saw as 247."""
    script = tmp_path / "script.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-m", "cuflash.parallel.launch", "--gpus", "2",
                             str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 137, (result.returncode, result.stderr)


@pytest.mark.parametrize("exit_code", [0, 3])
def test_launcher_removes_the_unique_id_from_a_given_rendezvous_directory(exit_code, tmp_path):
    """With --rdzv-dir, the NCCL unique id rank 0 wrote there is removed when the run ends,
    whether it succeeded or failed; it used to stay, for the ranks of another node of a later
    run in that directory to read before its node 0 replaced it."""
    rdzv = tmp_path / "rdzv"
    code = _launch(tmp_path, f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from cuflash.parallel.nccl import rendezvous_file
        rank = int(os.environ["RANK"])
        rendezvous_file(os.environ["CUFLASH_NCCL_ID_FILE"], rank, 30, lambda: bytes(128))
        sys.exit({exit_code} if rank == 1 else 0)
        """, 2, rdzv_dir=str(rdzv), timeout=30)
    assert code == exit_code
    assert rdzv.is_dir() and list(rdzv.iterdir()) == []


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_launcher_stopped_by_a_signal_stops_its_ranks_and_removes_its_files(signal_name,
                                                                             tmp_path):
    """A launcher stopped by SIGTERM (a scheduler, ``kill``) or SIGHUP (its terminal closed)
    stops its rank processes and removes the rendezvous directory, and exits as a shell
    reports a process killed by that signal; it used to die at once, leaving the ranks running
    (and holding their GPUs) and the directory with the NCCL id behind."""
    import signal
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        with open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"]), "w") as f:
            f.write(str(os.getpid()) + "\\n" + os.environ["CUFLASH_NCCL_ID_FILE"])
        time.sleep(60)
        """))
    launcher = subprocess.Popen([sys.executable, "-m", "cuflash.parallel.launch", "--gpus", "2",
                                 "--grace", "5", str(script)])
    files = [tmp_path / "rank0", tmp_path / "rank1"]
    try:
        deadline = time.monotonic() + 60
        while not all(f.exists() and f.read_text().count("\n") == 1 for f in files):
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.05)
        launcher.send_signal(getattr(signal, signal_name))
        code = launcher.wait(30)
    finally:
        launcher.kill()
        launcher.wait()
    ranks = [f.read_text().split("\n") for f in files]
    running = []
    for pid, _ in ranks:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            continue
        running.append(pid)
        os.kill(int(pid), signal.SIGKILL)
    assert not running, f"rank processes {running} outlived the launcher"
    assert code == 128 + getattr(signal, signal_name)
    assert not os.path.exists(os.path.dirname(ranks[0][1]))


@pytest.mark.parametrize("option, value, error", [
    ("gpus", 2.5, TypeError), ("gpus", True, TypeError), ("gpus", "2", TypeError),
    ("nnodes", 1.5, TypeError), ("node_rank", 0.0, TypeError), ("timeout", "3", TypeError),
    ("timeout", float("nan"), ValueError), ("grace", "5", TypeError),
    ("grace", -1.0, ValueError), ("grace", float("nan"), ValueError),
    ("deadline", "3", TypeError), ("deadline", 0, ValueError), ("master_port", 0, ValueError),
    ("master_port", 65536, ValueError), ("master_port", -1, ValueError),
    ("master_port", 29500.5, TypeError), ("master_port", "29500", TypeError)])
def test_launch_refuses_bad_numbers_by_name_before_starting(option, value, error, tmp_path):
    """launch() checks its numbers before it starts a process, naming the one refused; it used
    to truncate gpus=2.5 to 2 processes (True to 1), and a grace or deadline that was not a
    number failed with an unnamed TypeError only once the processes had run. A master_port of 0
    was silently replaced by the environment's or a free one, and any other bad port handed to
    the processes."""
    from cuflash.parallel.launch import launch
    marker = tmp_path / "started"
    arguments = dict(gpus=1)
    arguments[option] = value
    gpus = arguments.pop("gpus")
    with pytest.raises(error, match=option.replace("_", "-")):
        launch([sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"], gpus,
               **arguments)
    assert not marker.exists()


@pytest.mark.parametrize("option, value, error, message", [
    ("rdzv_dir", 5, TypeError, "--rdzv-dir must be a directory's name"),
    ("rdzv_dir", b"/tmp/rdzv", TypeError, "--rdzv-dir must be a directory's name"),
    ("rdzv_dir", "", ValueError, "--rdzv-dir must name a directory, got an empty name"),
    ("master_addr", 5, TypeError, "--master-addr must be a host name or address"),
    ("env", [("A", "1")], TypeError, "env must be a dict of environment variables")])
def test_launch_refuses_other_arguments_by_name_before_starting(option, value, error, message,
                                                                tmp_path):
    """A rendezvous directory that is no str failed inside os.makedirs without naming
    --rdzv-dir (bytes: "Can't mix strings and bytes"), an empty one as "--rdzv-dir : cannot
    make the directory", an env that is no dict as "dictionary update sequence", and a
    master_addr that is no str was handed to the processes as its str()."""
    from cuflash.parallel.launch import launch
    marker = tmp_path / "started"
    with pytest.raises(error, match=re.escape(message)):
        launch([sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"], 1,
               **{option: value})
    assert not marker.exists()


@pytest.mark.parametrize("command", ["python script.py", b"python", [], ["python", 3]])
def test_launch_refuses_a_command_that_is_not_a_list_of_arguments(command):
    """The command is an argv list of strings, checked before a process starts: a string used
    to be taken apart into its characters (FileNotFoundError for 'p'), an empty list failed
    inside subprocess with IndexError, a number among the arguments with an unnamed TypeError."""
    from cuflash.parallel.launch import launch
    with pytest.raises((TypeError, ValueError), match="command must be"):
        launch(command, 1)


def test_launcher_command_line_errors():
    result = subprocess.run([sys.executable, "-m", "cuflash.parallel.launch", "--gpus", "0",
                             "x.py"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "at least 1" in result.stderr


@pytest.mark.parametrize("nodes, message", [
    (["--nnodes", "0"], "--nnodes must be at least 1, got 0"),
    (["--nnodes", "2", "--node-rank", "2"], "--node-rank must be in [0, 2), got 2"),
    (["--nnodes", "2", "--node-rank", "-1"], "--node-rank must be in [0, 2), got -1")])
def test_launcher_refuses_node_ranks_outside_the_nodes(nodes, message, tmp_path):
    """A node rank past --nnodes (or a negative one) used to start processes whose RANK was
    outside [0, WORLD_SIZE), which failed or waited in the program instead."""
    result = subprocess.run([sys.executable, "-m", "cuflash.parallel.launch", "--gpus", "1",
                             *nodes, "--rdzv-dir", str(tmp_path), "-m", "this"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Zen of Python" not in result.stdout


# ----------------------------------------------------------------------------- added checks

@pytest.mark.parametrize("option, values", [
    ("causal", (True, False)), ("window", ((3, -1), (5, -1))), ("softcap", (0.0, 4.0)),
    ("layout", ("contiguous", "zigzag")), ("scale", (None, 0.5)),
    ("alibi_slopes", ((0.5, 0.25, 0.125, 0.0625), (0.5, 0.25, 0.125, 1.0)))])
def test_ulysses_ranks_with_other_options_raise(option, values, rng):
    """Every rank computes whole sequences for its own heads, so a rank with other options used
    to return wrong rows for its heads without an error; now every rank raises ValueError."""
    size = 2
    q, k, v = (random_array(rng, (1, 4, 4 * size + 4, 16), F32) for _ in range(3))
    parts = [_shards(x, size, "contiguous") for x in (q, k, v)]

    def rank(comm, q, k, v):
        value = values[comm.rank]
        if option == "alibi_slopes":
            value = np.asarray(value, F32)
        return ulysses_attention(q, k, v, comm=comm, **{option: value})

    with pytest.raises(ValueError, match="other shapes, dtype or options"):
        LocalRing(size, timeout=10).run(rank, *parts)


def test_ulysses_ranks_with_other_shapes_raise_naming_the_arrays(rng):
    size = 2
    a = random_array(rng, (1, 4, 12, 16), F32)
    b = random_array(rng, (1, 4, 10, 16), F32)
    with pytest.raises(ValueError, match=r"other shapes.*q is \(1, 4, 12, 16\) float32 on rank 0 "
                                         r"and \(1, 4, 10, 16\) float32 on rank 1"):
        LocalRing(size, timeout=10).run(lambda comm, x: ulysses_attention(x, x, x, comm=comm),
                                        [a, b])
    dout = random_array(rng, (1, 4, 12, 16), F32)
    lse = np.zeros((1, 4, 12), F32)
    with pytest.raises(ValueError, match="other shapes"):
        LocalRing(size, timeout=10).run(
            lambda comm, c: ulysses_attention_backward(dout, a, a, a, dout, lse, comm=comm,
                                                       causal=c), [True, False])
    # validate=False skips the comparison (and the all-gather).
    out = LocalRing(size).run(
        lambda comm: ulysses_attention(a, a, a, comm=comm, validate=False))
    assert out[0].shape == a.shape


@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_inputs_are_checked_as_cuflash_attention_checks_them(attention, rng):
    """Arrays that cuflash.attention refuses are refused by name on every rank: a list used to
    fail with AttributeError, a 0-d q with IndexError, ring attention returned zeros and
    lse −inf for keys of length 0 (cuflash.attention refuses an empty axis), and an empty head
    dim was a ZeroDivisionError (its default scale)."""
    size = 2
    call = ring_attention if attention == "ring" else ulysses_attention
    q = random_array(rng, (1, 2, 6, 8), F32)
    empty = np.zeros((1, 2, 0, 8), F32)
    no_dim = np.zeros((1, 2, 6, 0), F32)
    cases = [((q.tolist(), q, q), TypeError, "q must be a numpy.ndarray or cupy.ndarray"),
             ((q, q, q.tolist()), TypeError, "v must be a numpy.ndarray or cupy.ndarray"),
             ((q, empty, empty), ValueError, r"k must not have an empty axis"),
             ((empty, q, q), ValueError, r"q must not have an empty axis"),
             ((no_dim, no_dim, no_dim), ValueError, r"q must not have an empty axis"),
             ((q, q.astype(np.float16), q), TypeError, "q and k must have the same dtype")]
    cases.append(((np.zeros((), F32), q, q), ValueError,
                  "q must have at least 2 dim" if attention == "ring" else "needs a head axis"))
    for (a, b, c), error, message in cases:
        with pytest.raises(error, match=message):
            LocalRing(size, timeout=10).run(lambda comm: call(a, b, c, comm=comm))


@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_backward_arrays_must_be_arrays(attention, rng):
    backward = ring_attention_backward if attention == "ring" else ulysses_attention_backward
    q = random_array(rng, (1, 2, 6, 8), F32)
    lse = np.zeros((1, 2, 6), F32)
    for args, name in [((q.tolist(), q, q, q, q, lse), "dout"), ((q, q, q, q, q.tolist(), lse),
                                                                 "out"),
                       ((q, q, q, q, q, lse.tolist()), "lse")]:
        with pytest.raises(TypeError, match=f"{name} must be a numpy.ndarray"):
            LocalRing(2, timeout=10).run(lambda comm: backward(*args, comm=comm))


@pytest.mark.parametrize("odd_one", ["k and v dtype", "v heads", "k head dim"])
def test_ring_ranks_whose_keys_or_values_differ_raise_on_every_rank(odd_one, rng):
    """The comparison of the ranks' calls covers k and v whole (it used to compare q's dtype
    and v's last axis only, so a rank whose k and v differed in dtype or heads passed it and
    the others waited for chunks of another size)."""
    q = random_array(rng, (1, 4, 8, 8), F32)
    kv = random_array(rng, (1, 4, 8, 8), F32)
    other = {"k and v dtype": (kv.astype(np.float16), kv.astype(np.float16)),
             "v heads": (kv, kv[:, :2]),
             "k head dim": (kv[..., :6], kv)}[odd_one]

    def rank(comm):
        k, v = other if comm.rank == 1 else (kv, kv)
        return ring_attention(q, k, v, comm=comm)

    assert_every_rank_refuses(rank)


def test_layout_axes_and_lengths_are_integers():
    """axis=True used to shard axis 1 (the heads) as if it were an int, a float axis failed
    with a message about tuple indices, and segments took a negative or fractional length."""
    x = np.arange(2 * 4 * 12 * 3, dtype=F32).reshape(2, 4, 12, 3)
    for bad, error in [(True, TypeError), (1.5, TypeError), ("-2", TypeError)]:
        with pytest.raises(error, match="axis must be an int"):
            shard(x, 0, 2, "contiguous", axis=bad)
        with pytest.raises(error, match="axis must be an int"):
            unshard([x, x], "contiguous", axis=bad)
    with pytest.raises(ValueError, match="axis must be between -4 and 3, got 4"):
        shard(x, 0, 2, axis=4)
    assert np.array_equal(shard(x, 1, 2, "zigzag", axis=np.int64(-2)),
                          shard(x, 1, 2, "zigzag", axis=2))
    with pytest.raises(ValueError, match="n_local must be at least 0, got -4"):
        segments(-4, 0, 2, "zigzag")
    with pytest.raises(TypeError, match="n_local must be an int"):
        segments(4.5, 0, 2, "contiguous")


def test_local_ring_timeout_is_checked():
    """A timeout that is not a positive number of seconds is refused by name when the ring is
    made (timeout="5" used to fail inside a rank's wait with an arithmetic error, timeout=-1
    made every wait time out at once, timeout=True meant one second)."""
    for bad, error in [("5", TypeError), (True, TypeError), (-1, ValueError), (0, ValueError),
                       (float("nan"), ValueError)]:
        with pytest.raises(error, match="timeout"):
            LocalRing(2, timeout=bad)
    assert LocalRing(2, timeout=np.float32(2.5)).timeout == 2.5
    assert LocalRing(2, timeout=None).timeout is None
    assert LocalRing(2, timeout=float("inf")).timeout is None
    moved = LocalRing(2, timeout=float("inf")).run(
        lambda comm: comm.shift([np.array([comm.rank])]).wait()[0][0])
    assert moved == [1, 0]


@pytest.mark.parametrize("odd_one", ["dout", "out", "lse"])
def test_ring_backward_compares_dout_out_and_lse_between_ranks(odd_one, rng):
    """A rank whose dout, out or lse differs from the others' is found by the comparison of
    the calls, on every rank (it used to fail on its own while the others waited for its
    gradients)."""
    q = random_array(rng, (1, 2, 8, 8), F32)
    lse = np.zeros((1, 2, 8), F32)

    def rank(comm):
        arrays = {"dout": q, "out": q, "lse": lse}
        if comm.rank == 1:
            arrays[odd_one] = {"dout": q[:, :, :6], "out": q.astype(np.float16),
                               "lse": lse[:, :1]}[odd_one]
        return ring_attention_backward(arrays["dout"], q, q, q, arrays["out"], arrays["lse"],
                                       comm=comm)

    assert_every_rank_refuses(rank)


def test_ring_backward_of_many_dimensions_is_still_compared(rng):
    """Seven leading axes: the comparison of q, k, v, dout, out and lse still fits."""
    shape = (1,) * 7 + (2, 4, 8)
    q = random_array(rng, shape, F32)
    dout = random_array(rng, shape, F32)

    def rank(comm):
        out, lse = ring_attention(q, q, q, comm=comm, layout="contiguous", return_lse=True)
        return ring_attention_backward(dout, q, q, q, out, lse, comm=comm, layout="contiguous")

    grads = LocalRing(2, timeout=10).run(rank)
    assert grads[0][0].shape == shape


@pytest.mark.parametrize("layout, window", [("contiguous", (-1, -1)), ("zigzag", (-1, -1)),
                                            ("zigzag", (2, 0))])
@pytest.mark.parametrize("odd_one", ["dout", "out"])
def test_ring_backward_refuses_dout_and_out_of_other_rows(layout, window, odd_one, rng):
    """dout and out must be this rank's rows of the output: a dout or out with more rows than
    q used to be cut silently to the rows of each step's calls (the extra rows ignored), and
    one with fewer rows was refused with the shape of a step's sub-block."""
    q = random_array(rng, (1, 2, 4, 8), F32)
    k = random_array(rng, (1, 2, 16, 8), F32)

    def rank(comm):
        out, lse = ring_attention(q, k, k, comm=comm, layout=layout, window=window,
                                  return_lse=True)
        arrays = {"dout": out, "out": out}
        arrays[odd_one] = np.zeros((1, 2, rows, 8), F32)
        return ring_attention_backward(arrays["dout"], q, k, k, arrays["out"], lse, comm=comm,
                                       layout=layout, window=window)

    for rows in (6, 2):
        with pytest.raises(ValueError, match=fr"{odd_one} must have shape \(1, 2, 4, 8\), "
                                             fr"got \(1, 2, {rows}, 8\)"):
            LocalRing(2, timeout=10).run(rank)


def test_ring_vjp_checks_dout_as_the_backward_does(rng):
    """vjp(dout) takes dout through ring_attention_backward's checks: a list used to fail with
    AttributeError, and a rank whose dout differed in dtype failed alone while the others waited
    for its gradients."""
    q = random_array(rng, (1, 2, 8, 8), F32)

    def rank(comm, dout):
        _, vjp = ring_attention_vjp(q, q, q, comm=comm, causal=True)
        return vjp(dout)

    with pytest.raises(TypeError, match="dout must be a numpy.ndarray"):
        LocalRing(2, timeout=10).run(rank, [q.tolist(), q.tolist()])
    assert_every_rank_refuses(lambda comm: rank(comm, q if comm.rank == 0 else q.astype(BF16)))


@pytest.mark.parametrize("odd_one, shape", [("dout", (1, 4, 6, 8)), ("out", (1, 4, 2, 8)),
                                            ("lse", (1, 4, 2)), ("lse", (1, 2, 4))])
def test_ulysses_backward_names_the_local_shapes(odd_one, shape, rng):
    """A dout, out or lse of the wrong shape is refused with the shape this rank must pass (the
    error used to come after the all-to-alls, naming shapes of the head-sharded arrays that the
    caller never saw: "lse must have shape (1, 2, 8), got (1, 2, 4)")."""
    q = random_array(rng, (1, 4, 4, 8), F32)
    arrays = {"dout": q, "out": q, "lse": np.zeros((1, 4, 4), F32)}
    arrays[odd_one] = np.zeros(shape, F32)
    expected = (1, 4, 4) if odd_one == "lse" else (1, 4, 4, 8)
    with pytest.raises(ValueError, match=re.escape(f"{odd_one} must have shape {expected}, got "
                                                   f"{shape}")):
        LocalRing(2, timeout=10).run(lambda comm: ulysses_attention_backward(
            arrays["dout"], q, q, q, arrays["out"], arrays["lse"], comm=comm))


@pytest.mark.parametrize("shapes, message", [
    (((1, 4, 8, 8), (1, 6, 8, 8), (1, 6, 8, 8)),
     "got 4 query heads (q (1, 4, 8, 8)) and 6 key/value heads (k (1, 6, 8, 8))"),
    (((1, 2, 8, 8), (1, 2, 8, 4), (1, 2, 8, 8)),
     "got q (1, 2, 8, 8) and k (1, 2, 8, 4)"),
    (((1, 2, 8, 8), (1, 2, 8, 8), (1, 2, 6, 8)),
     "got k (1, 2, 8, 8) and v (1, 2, 6, 8)"),
    (((1, 2, 0, 8), (1, 2, 8, 8), (1, 2, 8, 8)),
     "q must not have an empty axis, got shape (1, 2, 0, 8)")])
@pytest.mark.parametrize("backward", [False, True])
def test_ulysses_names_the_local_shapes_of_q_k_v(shapes, message, backward, rng):
    """q, k and v that cuflash.attention refuses are refused with the shapes this rank passed
    (the errors used to come after the all-to-alls, naming the head-sharded arrays the caller
    never saw: "got 2 query heads ... and 3 key/value heads" for 4 and 6)."""
    q, k, v = (random_array(rng, shape, F32) for shape in shapes)
    dout = np.zeros(shapes[0][:-1] + shapes[2][-1:], F32)
    lse = np.zeros(shapes[0][:-1], F32)

    def rank(comm):
        if backward:
            return ulysses_attention_backward(dout, q, k, v, dout, lse, comm=comm)
        return ulysses_attention(q, k, v, comm=comm)

    with pytest.raises(ValueError, match=re.escape(message)):
        LocalRing(2, timeout=10).run(rank)


@pytest.mark.parametrize("backward", [False, True])
def test_ulysses_with_slopes_compares_the_ranks_before_checking_q_k_v(backward, rng):
    """With alibi_slopes, a rank whose q and k cuflash.attention refuses still takes part in
    the comparison of the ranks' calls, so that every rank raises: the slopes' check read the
    shapes of q, k, v before it, so that rank raised alone while the others waited for it in
    the comparison (with NCCL, until the communicator's timeout)."""
    good = [random_array(rng, (1, 2, 8, 8), F32) for _ in range(3)]
    bad = [good[0], random_array(rng, (1, 2, 8, 4), F32), good[2]]  # k of another head size
    slopes = np.array([0.5, 0.25], F32)
    out = np.zeros((1, 2, 8, 8), F32)
    lse = np.zeros((1, 2, 8), F32)

    def rank(comm):
        q, k, v = bad if comm.rank == 0 else good
        if backward:
            return ulysses_attention_backward(out, q, k, v, out, lse, comm=comm,
                                              alibi_slopes=slopes)
        return ulysses_attention(q, k, v, comm=comm, alibi_slopes=slopes)

    assert_every_rank_refuses(rank)


@pytest.mark.parametrize("odd_shape", [(1, 3, 8, 8), (8, 8)])
@pytest.mark.parametrize("backward", [False, True])
def test_ulysses_ranks_whose_heads_do_not_split_raise_on_every_rank(odd_shape, backward, rng):
    """A rank whose q has a head count that does not split over the ranks (or no head axis),
    beside ranks whose q does, is a mismatch between the ranks' calls: every rank raises. That
    rank used to refuse its heads before the comparison, alone, while the others waited for it
    in the comparison (with NCCL, until the communicator's timeout)."""
    good = random_array(rng, (1, 2, 8, 8), F32)
    odd = random_array(rng, odd_shape, F32)
    out = np.zeros((1, 2, 8, 8), F32)
    lse = np.zeros((1, 2, 8), F32)

    def rank(comm):
        q = odd if comm.rank == 0 else good
        if backward:
            return ulysses_attention_backward(out, q, good, good, out, lse, comm=comm)
        return ulysses_attention(q, good, good, comm=comm)

    assert_every_rank_refuses(rank)


@pytest.mark.parametrize("backward", [False, True])
def test_ring_ranks_with_and_without_a_sequence_axis_raise_on_every_rank(backward, rng):
    """A rank whose q has no sequence axis (1-D), beside ranks whose q has one, is a mismatch
    between the ranks' calls: every rank raises, as for any other shape. That rank used to
    refuse q before the comparison, alone, while the others waited for it in the comparison
    (with NCCL, until the communicator's timeout)."""
    good = random_array(rng, (8, 8), F32)
    flat = random_array(rng, (8,), F32)
    lse = np.zeros(8, F32)

    def rank(comm):
        q = flat if comm.rank == 0 else good
        if backward:
            return ring_attention_backward(good, q, good, good, good, lse, comm=comm)
        return ring_attention(q, good, good, comm=comm)

    assert_every_rank_refuses(rank)


def test_ring_attention_refuses_tensors_that_require_grad(rng):
    """ring_attention and ring_attention_backward on torch tensors return tensors without
    autograd history: a tensor that requires grad is refused while autograd records (its
    gradient used to be lost silently), and taken under torch.no_grad()."""
    torch = pytest.importorskip("torch")
    q = torch.from_numpy(random_array(rng, (1, 2, 16, 8), F32))

    def rank(comm, q, leaf):
        with pytest.raises(ValueError, match="k requires grad, but ring_attention returns"):
            ring_attention(q, leaf, q, comm=comm, validate=False)
        with torch.no_grad():
            out, lse = ring_attention(q, leaf, q, comm=comm, return_lse=True)
        assert not out.requires_grad
        with pytest.raises(ValueError, match="dout requires grad, but ring_attention_backward"):
            ring_attention_backward(leaf, q, q, q, out, lse, comm=comm, validate=False)

    LocalRing(2).run(rank, [shard(q, r, 2) for r in range(2)],
                     [shard(q, r, 2).clone().requires_grad_() for r in range(2)])


def test_torch_ring_attention_refuses_a_second_derivative(rng):
    """A gradient taken with create_graph=True raises when differentiated, as cuflash.torch's do;
    it used to come back detached from q, k and v, so a penalty on it silently added nothing to
    their gradients."""
    torch = pytest.importorskip("torch")
    from cuflash.parallel import torch_ring_attention
    q, k, v = (torch.from_numpy(random_array(rng, (1, 2, 16, 8), F32)) for _ in range(3))

    def rank(comm, q, k, v):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = torch_ring_attention(*leaves, comm=comm, causal=True)
        (dq,) = torch.autograd.grad(out.sum(), leaves[0], create_graph=True)
        assert dq.requires_grad
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(dq.square().sum(), leaves[1], allow_unused=True)

    LocalRing(2).run(rank, *([shard(x, r, 2) for r in range(2)] for x in (q, k, v)))


def test_torch_ring_attention_checks_deterministic_before_the_forward(rng):
    """deterministic is refused when the layer is called, as the other options are (it used to
    be read only by the backward pass, after every rank had run the forward)."""
    torch = pytest.importorskip("torch")
    from cuflash.parallel import torch_ring_attention
    q = torch.from_numpy(random_array(rng, (1, 2, 8, 8), F32)).requires_grad_()
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        LocalRing(2).run(lambda comm: torch_ring_attention(q, q, q, comm=comm,
                                                           deterministic="yes"))


@pytest.mark.parametrize("arguments, status, message", [
    (["--ranks", "0"], 2, "ranks must be at least 1, got 0"),
    (["--ranks", "3", "--seq-len", "100"], 2, "N must be a multiple of 2·P = 6"),
    (["--rows", "0"], 2, "rows must be at least 1, got 0"),
    (["--mode", "processes"], 2, "mode='processes' needs device='gpu'"),
    (["--json", "no-such-directory/check.json"], 2,
     "--json no-such-directory/check.json: directory 'no-such-directory' does not exist")])
def test_check_command_line_errors(arguments, status, message, tmp_path):
    """python -m cuflash.parallel.check refuses bad arguments with one line and exit status 2
    (it used to end in a traceback), and a --json file it cannot write before the check runs
    (it used to fail after the whole check, losing its result)."""
    result = subprocess.run([sys.executable, "-m", "cuflash.parallel.check", "--device", "cpu",
                             "--seq-len", "64", "--heads", "1", "--head-dim", "8", *arguments],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == status, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""


def test_check_json_that_cannot_be_written_leaves_the_old_file(tmp_path):
    """--json replaces the file whole or not at all (cuflash._files.write_atomically, as the
    CLI's --png and --plot): a write that fails part way (here past a file-size limit, as on a
    full disk) used to leave the file truncated, its old bytes gone, and end in a traceback.
    Now the report is printed, the error names --json in one line (exit status 1), and the old
    file stays; a write that succeeds leaves the record."""
    path = tmp_path / "check.json"
    path.write_bytes(b"an earlier record " * 8)
    arguments = ["--device", "cpu", "--seq-len", "64", "--heads", "1", "--head-dim", "8",
                 "--json", str(path)]

    def check(limit):
        script = f"""
import resource, signal, sys
from cuflash.parallel.check import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.exit(main({arguments!r}))
"""
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    result = check(256)
    assert result.returncode == 1, result.stderr
    assert "PASS" in result.stdout
    assert f"--json {path}: cannot write it" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert path.read_bytes() == b"an earlier record " * 8
    assert [p.name for p in tmp_path.iterdir()] == ["check.json"]
    result = check(2**20)
    assert result.returncode == 0, result.stderr
    assert json.loads(path.read_text())["passed"] is True


@pytest.mark.parametrize("value, seconds", [("", 600.0), ("30", 30.0), ("2.5", 2.5),
                                            ("0", None), ("0.0", None), ("none", None),
                                            ("None", None), ("inf", None)])
def test_comm_timeout_from_the_environment(value, seconds, monkeypatch):
    """CUFLASH_COMM_TIMEOUT: seconds, or 0/none for no deadline, however 0 is written (the
    launcher's --timeout 0 writes "0.0", which used to give every wait a deadline of 0 s)."""
    from cuflash.parallel.nccl import env_timeout
    monkeypatch.setenv("CUFLASH_COMM_TIMEOUT", value)
    assert env_timeout() == seconds


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_bad_comm_timeout_in_the_environment_is_named(value, monkeypatch):
    from cuflash.parallel.nccl import env_timeout
    monkeypatch.setenv("CUFLASH_COMM_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"CUFLASH_COMM_TIMEOUT.*got '{value}'"):
        env_timeout()


def test_launcher_timeout_reaches_the_ranks(tmp_path):
    """--timeout 0 disables the deadline in every rank, as CUFLASH_COMM_TIMEOUT=0 does; a
    negative or NaN timeout is refused by the launcher."""
    code = _launch(tmp_path, f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from cuflash.parallel.nccl import env_timeout
        assert env_timeout() is None, os.environ["CUFLASH_COMM_TIMEOUT"]
        """, 2, timeout=0.0)
    assert code == 0
    for bad in ("-1", "nan"):
        result = subprocess.run([sys.executable, "-m", "cuflash.parallel.launch", "--gpus", "1",
                                 "--timeout", bad, "x.py"], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and "--timeout" in result.stderr, result.stderr


@pytest.mark.parametrize("communicator", ["NcclComm", "TorchComm"])
@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError),
                                        (float("nan"), ValueError), ("60", TypeError)])
def test_communicator_timeouts_are_checked(communicator, bad, error):
    """NcclComm and TorchComm take LocalRing's rule for timeout (a positive number of seconds or
    None): NcclComm(timeout=0) used to give creating the communicator, and every wait, a
    deadline of 0 s."""
    if communicator == "TorchComm":
        pytest.importorskip("torch")
        from cuflash.parallel import TorchComm as make

        def call():
            make(timeout=bad)
    else:
        from cuflash.parallel import NcclComm as make

        def call():
            make(0, 1, bytes(128), timeout=bad)
    with pytest.raises(error, match="timeout must be a positive number of seconds or None"):
        call()


def _stub_group(monkeypatch):
    """A torch.distributed world of 2 ranks, this process rank 0, and a group outside it."""
    import torch.distributed as dist
    outsider = object()

    def in_group(value):
        return lambda group=None: -1 if group is outsider else value

    for name, value in [("is_available", True), ("is_initialized", True), ("get_rank", 0),
                        ("get_world_size", 2), ("get_backend", "gloo")]:
        monkeypatch.setattr(dist, name, in_group(value))
    return outsider


def test_torch_comm_refuses_a_group_this_process_is_not_in(monkeypatch):
    """torch.distributed gives rank -1 and size -1 in a group the process does not belong to:
    TorchComm took them as its rank and size (or failed in get_backend without naming the
    group). It is refused by name now."""
    pytest.importorskip("torch")
    from cuflash.parallel import TorchComm
    outsider = _stub_group(monkeypatch)
    assert TorchComm().size == 2  # the stub's world
    with pytest.raises(ValueError, match="group: this process is not a member of the process "
                                         "group given .* make a TorchComm"):
        TorchComm(outsider)


def test_nccl_from_torch_refuses_a_group_this_process_is_not_in(monkeypatch):
    """NcclComm.from_torch took the rank -1 and size -1 of such a group and broadcast the unique
    id over it: refused by name now, as TorchComm refuses it, before anything is sent."""
    pytest.importorskip("torch")
    import torch.distributed as dist

    from cuflash.parallel import NcclComm, nccl
    outsider = _stub_group(monkeypatch)
    monkeypatch.setattr(nccl, "_nccl", lambda: pytest.fail("NCCL loaded before the checks"))
    monkeypatch.setattr(dist, "broadcast_object_list",
                        lambda *a, **k: pytest.fail("the unique id sent before the checks"))
    with pytest.raises(ValueError, match="group: this process is not a member of the process "
                                         "group given .* make an NcclComm"):
        NcclComm.from_torch(outsider, device=0)


def test_torch_and_numpy_arrays_do_not_mix(rng):
    """Ring attention on tensors names an argument that is no tensor (a NumPy k next to a
    tensor q used to fail with "'numpy.ndarray' object has no attribute 'detach'")."""
    torch = pytest.importorskip("torch")
    x = random_array(rng, (1, 2, 8, 8), F32)
    t = torch.from_numpy(x)
    lse = torch.zeros((1, 2, 8))
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got ndarray"):
        LocalRing(2, timeout=10).run(lambda comm: ring_attention(t, x, t, comm=comm))
    with pytest.raises(TypeError, match="lse must be a torch.Tensor, got ndarray"):
        LocalRing(2, timeout=10).run(lambda comm: ring_attention_backward(
            t, t, t, t, t, lse.numpy(), comm=comm))


def test_launcher_on_several_nodes_makes_up_no_master_address(tmp_path):
    """On several nodes each launcher would pick its own free port and name 127.0.0.1, so that
    torch.distributed's ranks could never meet: what is not given is left unset there; given
    values still pass through."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("MASTER_ADDR", "MASTER_PORT")}
    body = f"""
        import os
        with open(os.path.join({str(tmp_path)!r}, "master" + os.environ["RANK"]), "w") as f:
            f.write(repr((os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))))
        """
    rdzv = str(tmp_path / "rdzv")
    assert _launch(tmp_path, body, 1, nnodes=2, node_rank=1, rdzv_dir=rdzv, env=env) == 0
    assert (tmp_path / "master1").read_text() == repr((None, None))
    assert _launch(tmp_path, body, 1, nnodes=2, node_rank=0, rdzv_dir=rdzv, env=env,
                   master_addr="10.0.0.7", master_port=29511) == 0
    assert (tmp_path / "master0").read_text() == repr(("10.0.0.7", "29511"))


@pytest.mark.parametrize("attention", ["ring", "ulysses"])
@pytest.mark.parametrize("backward", [False, True])
def test_ranks_with_and_without_axes_in_q_raise_on_every_rank(attention, backward, rng):
    """A rank whose q has no axis at all (0-d), beside ranks whose q has four, is a mismatch
    between the ranks' calls: every rank raises the same ValueError, naming q and the shapes
    of every rank. That rank used to refuse q before the comparison, alone, while the others
    waited for it there (with NCCL, until the communicator's timeout)."""
    good = random_array(rng, (1, 2, 8, 8), F32)
    lse = np.zeros((1, 2, 8), F32)
    forward = ring_attention if attention == "ring" else ulysses_attention
    backward_call = (ring_attention_backward if attention == "ring"
                     else ulysses_attention_backward)

    def rank(comm):
        q = np.zeros((), F32) if comm.rank == 0 else good
        if backward:
            return backward_call(good, q, good, good, good, lse, comm=comm)
        return forward(q, good, good, comm=comm)

    raised = _every_rank_error(rank)
    assert all(isinstance(raised.get(r), ValueError) for r in range(2)), raised
    assert str(raised[0]) == str(raised[1])
    assert "q is () float32 on rank 0" in str(raised[0])
    assert "(1, 2, 8, 8) float32 on rank 1" in str(raised[0])


@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_a_mismatch_names_the_argument_and_the_shapes_of_every_rank(attention, rng):
    """Ranks whose k differ in their number of axes raise one ValueError on every rank, naming
    k and what each rank passed (it used to name this rank's arrays only, not which of them
    differed nor what the other ranks passed)."""
    q = random_array(rng, (1, 2, 8, 8), F32)
    flat = q[0]
    call = ring_attention if attention == "ring" else ulysses_attention

    def rank(comm):
        k = flat if comm.rank == 1 else q
        return call(q, k, q, comm=comm, validate=True)

    raised = _every_rank_error(rank)
    assert all(isinstance(raised.get(r), ValueError) for r in range(2)), raised
    message = str(raised[0])
    assert message == str(raised[1])
    assert "k is (1, 2, 8, 8) float32 on rank 0 and (2, 8, 8) float32 on rank 1" in message


def test_a_mismatch_of_options_names_the_option_and_every_rank_value(rng):
    q = random_array(rng, (1, 2, 8, 8), F32)
    raised = _every_rank_error(
        lambda comm: ring_attention(q, q, q, comm=comm, window=(2, 0) if comm.rank else (-1, -1),
                                    scale=0.25 * (1 + comm.rank)))
    message = str(raised[0])
    assert message == str(raised[1])
    # scale before window: the order cuflash.attention checks them in.
    assert "scale is 0.25 on rank 0 and 0.5 on rank 1" in message


@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_a_rank_whose_call_is_too_long_to_compare_fails_with_every_rank(attention, rng):
    """A rank whose arrays have so many axes that its call takes more values than the
    comparison holds used to refuse alone, before the comparison, while the others waited
    for it there; now every rank raises."""
    good = random_array(rng, (1, 2, 8, 8), F32)
    deep = good.reshape((1,) * 40 + good.shape)
    call = ring_attention if attention == "ring" else ulysses_attention

    def rank(comm):
        x = deep if comm.rank == 1 else good
        return call(x, x, x, comm=comm)

    raised = _every_rank_error(rank)
    assert all(isinstance(raised.get(r), ValueError) and "validate=False" in str(raised[r])
               for r in range(2)), raised


def _gloo_all_to_all_rank(rank, size, port, queue, case):
    """One process of a TorchComm all-to-all test over Gloo: ``case`` "axes" sends arrays of
    rank + 1 axes, "dtypes" float32 from rank 0 and int32 from rank 1, "count" one array too
    few from rank 1; what all_to_all returns
    (or the text of what it raised) goes to ``queue``."""
    import datetime

    import torch.distributed as dist

    from cuflash.parallel import TorchComm
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        comm = TorchComm(timeout=60)
        if case == "axes":
            arrays = [np.full((2,) * (rank + 1), 10 * rank + dst, F32) for dst in range(size)]
        elif case == "count":
            arrays = [np.zeros(3, F32)] * (size - rank)  # one array short on rank 1
        else:
            dtype = np.float32 if rank == 0 else np.int32
            arrays = [np.full(3, 1 + rank, dtype) for _ in range(size)]
        try:
            queue.put((rank, comm.all_to_all(arrays)))
        except Exception as error:  # reported to the test, which reads it
            queue.put((rank, f"{type(error).__name__}: {error}"))
    finally:
        dist.destroy_process_group()


def _gloo_all_to_all(case: str, size: int = 2) -> dict:
    """Each rank's result of ``_gloo_all_to_all_rank`` for ``case``, run in ``size`` processes."""
    pytest.importorskip("torch")
    import multiprocessing

    from cuflash.parallel.launch import _free_port
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_gloo_all_to_all_rank, args=(r, size, port, queue, case))
                 for r in range(size)]
    for p in processes:
        p.start()
    try:
        return dict(queue.get(timeout=60) for _ in range(size))
    finally:
        for p in processes:
            p.join(30)
            if p.is_alive():
                p.kill()


@pytest.mark.slow
def test_torch_comm_all_to_all_of_arrays_with_other_numbers_of_axes():
    """Ranks whose arrays have other numbers of axes exchange them as a LocalRing does: each
    rank receives what each sender sent, in the sender's shape. The exchange of the shapes
    used to gather arrays of one width per rank (its own largest number of axes), so that the
    ranks' all-gather of them did not match."""
    size = 2
    results = _gloo_all_to_all("axes", size)
    for rank in range(size):
        received = results[rank]
        assert not isinstance(received, str), received
        for src, x in enumerate(received):
            assert x.shape == (2,) * (src + 1)
            assert np.all(x == 10 * src + rank)


@pytest.mark.parametrize("bad", [3, None, "generator", {0: "a", 1: "b"}])
def test_per_rank_arguments_without_a_length_are_refused_by_name(bad):
    """unshard's parts, LocalRing.run's per-rank arguments and all_to_all's arrays that are not
    a sequence (an int, None, a generator, a mapping) are refused with a TypeError naming the
    argument and what it takes; they used to fail inside with "object of type 'int' has no
    len()", or (a mapping) read its keys as the parts."""
    x = np.zeros((1, 2, 8, 4), F32)
    parts = [shard(x, r, 2) for r in range(2)]

    def fresh():
        return (p for p in parts) if bad == "generator" else bad

    with pytest.raises(TypeError, match=r"parts must be a list or tuple .*got "):
        unshard(fresh())
    ring = LocalRing(2, timeout=10)
    with pytest.raises(TypeError, match=r"argument 0 of run\(\) must be a list or tuple .*got "):
        ring.run(lambda comm, a: a, fresh())
    with pytest.raises(TypeError, match=r"arrays must be a list or tuple .*got "):
        ring.comms[0].all_to_all(fresh())


def test_local_ring_run_refuses_a_function_that_cannot_be_called():
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        LocalRing(2, timeout=10).run(3)


_NOT_A_LIST_OF_ARRAYS = [
    ("generator", "send must be a list or tuple of arrays, got generator"),
    ("array", "send must be a list or tuple of arrays, got ndarray"),
    ("int", "send must be a list or tuple of arrays, got int"),
    ("list of ints", r"send\[1\] must be an array \(NumPy or CuPy\), got int")]


def _not_a_list_of_arrays(kind):
    arrays = [np.zeros(2, F32), np.ones(2, F32)]
    return {"generator": (x for x in arrays), "array": arrays[0], "int": 3,
            "list of ints": [arrays[0], 1]}[kind]


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("kind, message", _NOT_A_LIST_OF_ARRAYS)
def test_local_shift_refuses_a_send_that_is_no_list_of_arrays_by_name(size, kind, message):
    """shift and exchange iterated whatever send was: a generator was used up by the sending,
    so that the receiver expected nothing and failed with a CommError about shapes; a lone
    array went as a list of its elements; an int failed with "'int' object is not
    iterable"."""
    def rank(comm):
        return comm.shift(_not_a_list_of_arrays(kind)).wait()

    with pytest.raises(TypeError, match=message):
        LocalRing(size, timeout=10).run(rank)

    def exchange(comm):
        peer = (comm.rank + 1) % comm.size
        return comm.exchange([np.zeros(2, F32)], peer, peer,
                             recv_like=_not_a_list_of_arrays(kind))

    with pytest.raises(TypeError, match=message.replace("send", "recv_like")):
        LocalRing(size, timeout=10).run(exchange)


@pytest.mark.parametrize("communicator", ["NcclComm", "TorchComm"])
@pytest.mark.parametrize("kind, message", _NOT_A_LIST_OF_ARRAYS)
def test_device_exchange_refuses_a_send_that_is_no_list_of_arrays_before_any_transfer(
        communicator, kind, message):
    """TorchComm.exchange used up a generator to find the arrays' module and then sent and
    received nothing, while the peer waited; NcclComm sent a generator's arrays but received
    none."""
    if communicator == "TorchComm":
        pytest.importorskip("torch")
    from cuflash import parallel
    kind_of_comm = getattr(parallel, communicator)
    comm = kind_of_comm.__new__(kind_of_comm)
    comm.rank, comm.size, comm.cupy, comm.dist = 0, 2, _NoDevice(), _NoDevice()
    with pytest.raises(TypeError, match=message):
        comm.exchange(_not_a_list_of_arrays(kind), 1, 1)


@pytest.mark.parametrize("arguments, error, message", [
    (dict(unique_id=bytes(127)), ValueError, "unique_id must be NCCL's unique id, 128 bytes"),
    (dict(unique_id="ab" * 128), TypeError, "unique_id must be NCCL's unique id.*got str"),
    (dict(unique_id=3), TypeError, "unique_id must be NCCL's unique id.*got int"),
    (dict(unique_id=(0,) * 127), ValueError, "unique_id must be NCCL's unique id.*got 127"),
    (dict(unique_id=(300,) * 128), ValueError, "unique_id must be NCCL's unique id"),
    (dict(device=1.5), TypeError, "device must be an int"),
    (dict(device=True), TypeError, "device must be an int"),
    (dict(device=-1), ValueError, "device must be at least 0")])
def test_nccl_comm_refuses_a_bad_unique_id_or_device_before_cupy(arguments, error,
                                                                message, monkeypatch):
    """NcclComm checks every argument before CuPy or NCCL is touched, as it says: a unique id
    of another length was a CommError once the GPU had been chosen, a str went to NCCL as a
    tuple of its characters, and the device went to CuPy unchecked."""
    from cuflash.parallel import nccl
    monkeypatch.setattr(nccl, "_nccl", lambda: pytest.fail("NCCL loaded before the checks"))
    monkeypatch.setitem(sys.modules, "cupy", _NoDevice())
    arguments = dict(dict(unique_id=bytes(128)), **arguments)
    with pytest.raises(error, match=message):
        nccl.NcclComm(0, 2, arguments.pop("unique_id"), **arguments)


@pytest.mark.slow
def test_torch_comm_all_to_all_refuses_arrays_of_other_dtypes_on_every_rank():
    """A rank receives into buffers of the dtype of what it sends to the sender: arrays of
    another dtype of the same size were taken bit for bit (rank 1's int32 ones read as float32
    on rank 0), of another size an abort of the process. Every rank now raises one ValueError
    naming the ranks and the dtypes."""
    results = _gloo_all_to_all("dtypes")
    expected = ("ValueError: all_to_all needs arrays of one dtype in each direction: rank 0 "
                "sends rank 1 float32, rank 1 sends rank 0 int32")
    assert results == {0: expected, 1: expected}


def test_launcher_names_a_rendezvous_directory_it_cannot_make(tmp_path):
    """--rdzv-dir naming a file (or a path under one) ended the launcher in a traceback
    (FileExistsError, NotADirectoryError); it is refused by name, before any process starts,
    with the command line's status 2."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    marker = tmp_path / "started"
    (tmp_path / "script.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for rdzv in (blocker, blocker / "below"):
        result = subprocess.run(
            [sys.executable, "-m", "cuflash.parallel.launch", "--gpus", "1", "--rdzv-dir",
             str(rdzv), "script.py"], capture_output=True, text=True, timeout=60,
            cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert f"--rdzv-dir {rdzv}: cannot make the directory" in result.stderr
        assert "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_a_forward_beside_a_backward_is_named_alike_on_every_rank(attention, rng):
    """A rank in the backward pass beside a rank in the forward pass: every rank raises one
    ValueError saying that the ranks' calls take other arguments, rather than naming q as if
    its shape differed."""
    q = random_array(rng, (1, 2, 8, 8), F32)
    lse = np.zeros((1, 2, 8), F32)
    forward = ring_attention if attention == "ring" else ulysses_attention
    backward = ring_attention_backward if attention == "ring" else ulysses_attention_backward

    def rank(comm):
        if comm.rank == 1:
            return backward(q, q, q, q, q, lse, comm=comm)
        return forward(q, q, q, comm=comm)

    raised = _every_rank_error(rank, size=3)
    assert all(isinstance(raised.get(r), ValueError) for r in range(3)), raised
    message = str(raised[0])
    assert message == str(raised[1]) == str(raised[2])
    assert "the calls on ranks 0, 2 and on rank 1 take other arguments" in message
    assert "q is" not in message


# ----------------------------------------------------------------------------- refusals

class _NcclLikeRing(LocalRing):
    """A LocalRing whose waits, like NCCL's, never learn that the peer has failed or returned:
    a rank waiting for a message that does not come waits until the timeout (CommTimeout),
    where a LocalRing fails at once. What a hang under NCCL is, seen in seconds."""

    def _take(self, src, dst, tag):
        deadline = time.monotonic() + self.timeout
        with self._lock:
            while not self._boxes[src, dst]:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommTimeout(f"rank {dst}: no {tag!r} message from rank {src} "
                                      f"within {self.timeout:g} s")
                self._lock.wait(left)
            got, payload = self._boxes[src, dst].popleft()
            if got != tag:
                raise CommError(f"rank {dst}: expected a {tag!r} message, got {got!r}")
            return payload


def _errors_on_a_waiting_ring(rank, size=2, timeout=5.0):
    """The error each rank of ``rank(comm)`` raises on an ``_NcclLikeRing`` (every rank must
    raise), and the seconds the run took."""
    raised = {}

    def recorded(comm):
        try:
            rank(comm)
        except Exception as error:
            raised[comm.rank] = error
            raise
        raise AssertionError(f"rank {comm.rank} returned")

    start = time.monotonic()
    with pytest.raises(Exception):
        _NcclLikeRing(size, timeout=timeout).run(recorded)
    return raised, time.monotonic() - start


def _assert_every_rank_refuses(raised, seconds, refusing, error, message, size=2):
    """Each rank raised ``error``, none a timeout, in less than the timeout: ``refusing`` its
    own error (matching ``message``), every other rank one naming it and quoting it."""
    assert sorted(raised) == list(range(size)), raised
    assert not any(isinstance(e, CommError) for e in raised.values()), raised
    assert seconds < 4, seconds
    for r, e in raised.items():
        assert isinstance(e, error), (r, e)
        assert re.search(message, str(e)), (r, e)
        if r != refusing:
            assert f"rank {refusing} refused its arguments ({error.__name__}: " in str(e), e


_LOCAL_REFUSALS = [
    ("causal", "yes", TypeError, "causal must be True or False"),
    ("window", (1.5, 0), TypeError, "window"),
    ("layout", "spiral", ValueError, "layout must be one of"),
    ("scale", 0.0, ValueError, "scale"),
    ("softcap", -1.0, ValueError, "softcap"),
    ("validate", None, TypeError, "validate must be True or False"),
    ("k", "a list", TypeError, "k"),
    ("return_lse", "no", TypeError, "return_lse must be True or False"),
    ("deterministic", 1, TypeError, "deterministic must be True or False")]


@pytest.mark.parametrize("attention", ["ring", "ring backward", "ring vjp", "ulysses",
                                       "ulysses backward"])
@pytest.mark.parametrize("argument, value, error, message", _LOCAL_REFUSALS)
def test_a_refusal_on_one_rank_is_raised_on_every_rank(attention, argument, value, error,
                                                       message, rng):
    """An argument refused by one rank alone, before the ranks compared their calls, left the
    other ranks waiting in the comparison's all-gather: under NCCL until the communicator's
    timeout (a LocalRing hid it, failing them at once). The refusal now rides the comparison:
    every rank raises at once, the others an error of the same kind naming the rank."""
    forward = attention in ("ring", "ring vjp", "ulysses")
    if (argument == "return_lse" and attention not in ("ring", "ulysses")) or (
            argument == "deterministic" and attention in ("ring", "ulysses")):
        pytest.skip("not an argument of this call")
    q = random_array(rng, (1, 2, 8, 8), F32)
    lse = np.zeros((1, 2, 8), F32)

    def rank(comm):
        arrays = dict(q=q, k=q, v=q, dout=q, out=q, lse=lse)
        options = {}
        if comm.rank == 1:
            (arrays if argument == "k" else options)[argument] = (
                [list(row) for row in q] if argument == "k" else value)
        if attention == "ring vjp":
            _, vjp = ring_attention_vjp(arrays["q"], arrays["k"], arrays["v"], comm=comm,
                                        **options)
            return vjp(q)
        if forward:
            call = ring_attention if attention == "ring" else ulysses_attention
            return call(arrays["q"], arrays["k"], arrays["v"], comm=comm, **options)
        call = ring_attention_backward if attention == "ring backward" else \
            ulysses_attention_backward
        return call(arrays["dout"], arrays["q"], arrays["k"], arrays["v"], arrays["out"],
                    arrays["lse"], comm=comm, **options)

    raised, seconds = _errors_on_a_waiting_ring(rank)
    _assert_every_rank_refuses(raised, seconds, 1, error, message)


@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_an_unsupported_option_or_misplaced_slopes_on_one_rank_stop_every_rank(attention, rng):
    """Ring attention's NotImplementedError for alibi_slopes, and Ulysses' refusal of slopes
    that are no array, raised on the rank that passed them alone."""
    q = random_array(rng, (1, 2, 8, 8), F32)
    slopes = np.ones(2, F32)
    call = ring_attention if attention == "ring" else ulysses_attention

    def rank(comm):
        given = None if comm.rank == 0 else (slopes if attention == "ring" else [1.0, 1.0])
        return call(q, q, q, comm=comm, alibi_slopes=given)

    raised, seconds = _errors_on_a_waiting_ring(rank)
    error = NotImplementedError if attention == "ring" else TypeError
    _assert_every_rank_refuses(raised, seconds, 1, error, "alibi_slopes")


# Calls with several bad arguments, and the one refused first: cuflash.attention's order
# (causal, scale, window, softcap, deterministic, alibi_slopes, return_lse), with layout before
# them and validate after them (cuflash.attention takes neither).
_SEVERAL_REFUSALS = [
    (dict(causal="yes", scale="big"), "causal"),
    (dict(window=(1.5, 0), scale="big"), "scale"),
    (dict(softcap=-1.0, window=(-3, 0)), "window"),
    (dict(causal="yes", alibi_slopes=[1.0, 1.0]), "causal"),
    (dict(return_lse="no", alibi_slopes=[1.0, 1.0]), "alibi_slopes"),
    (dict(deterministic="yes", alibi_slopes=[1.0, 1.0]), "deterministic"),
    (dict(layout="spiral", causal="yes"), "layout"),
    (dict(validate=None, softcap=-1.0), "softcap")]


@pytest.mark.parametrize("options, first", _SEVERAL_REFUSALS)
@pytest.mark.parametrize("backward", [False, True])
def test_ring_and_ulysses_refuse_the_same_argument_first(options, first, backward, rng):
    """Ring and Ulysses attention check their arguments in one order, cuflash.attention's: with
    several bad arguments they name the same one, the one cuflash.attention names. Ring
    attention refused alibi_slopes before anything and read window before scale; Ulysses read
    alibi_slopes before the other options and scale before causal."""
    if ("return_lse" in options and backward) or ("deterministic" in options and not backward):
        pytest.skip("not an argument of this call")
    q = random_array(rng, (1, 2, 8, 8), F32)
    lse = np.zeros((1, 2, 8), F32)
    arrays = (q, q, q, q, q, lse) if backward else (q, q, q)
    calls = ((ring_attention_backward, ulysses_attention_backward) if backward
             else (ring_attention, ulysses_attention))
    named = []
    for call in calls:
        with pytest.raises((TypeError, ValueError, NotImplementedError)) as raised:
            LocalRing(2, timeout=10).run(lambda comm: call(*arrays, comm=comm, **options))
        named.append(str(raised.value).split()[0])
    core = {name: value for name, value in options.items() if name not in ("layout", "validate")}
    if len(core) == len(options):
        with pytest.raises((TypeError, ValueError)) as raised:
            (cuflash.attention_backward if backward else cuflash.attention)(*arrays, **core)
        named.append(str(raised.value).split()[0])
    assert named == [first] * len(named)


@pytest.mark.parametrize("differ, first", [
    (("layout", "causal", "scale", "window"), "layout"), (("causal", "scale"), "causal"),
    (("scale", "window", "softcap"), "scale"), (("window", "softcap"), "window")])
@pytest.mark.parametrize("backward", [False, True])
def test_ring_and_ulysses_name_the_same_difference_between_ranks_first(differ, first, backward,
                                                                        rng):
    """Ranks whose calls differ in several options are told the first of them in one order,
    the order the options are checked in (ring attention compared causal before layout,
    and both window before scale)."""
    q = random_array(rng, (1, 2, 8, 8), F32)
    lse = np.zeros((1, 2, 8), F32)
    arrays = (q, q, q, q, q, lse) if backward else (q, q, q)
    values = {"layout": ("contiguous", "zigzag"), "causal": (False, True),
              "scale": (0.25, 0.5), "window": ((-1, -1), (2, 0)), "softcap": (0.0, 4.0)}
    calls = ((ring_attention_backward, ulysses_attention_backward) if backward
             else (ring_attention, ulysses_attention))
    for call in calls:
        raised = _every_rank_error(lambda comm: call(
            *arrays, comm=comm, **{name: values[name][comm.rank] for name in differ}))
        message = str(raised[0])
        assert isinstance(raised[0], ValueError) and message == str(raised[1]), raised
        assert f": {first} is " in message, (call.__name__, message)


@pytest.mark.parametrize("call", ["ring_backward", "ring_vjp", "ulysses_backward"])
def test_ranks_whose_deterministic_differs_are_refused_on_every_rank(call, rng):
    """One rank without deterministic=True would make the summed gradients' bits vary from run
    to run: ring and Ulysses attention both compare it, and every rank is told so."""
    q = random_array(rng, (1, 2, 8, 8), F32)
    out, lse = cuflash.attention(q, q, q, return_lse=True)

    def rank(comm):
        deterministic = bool(comm.rank)
        if call == "ring_vjp":
            return ring_attention_vjp(q, q, q, comm=comm, deterministic=deterministic)
        backward = ring_attention_backward if call == "ring_backward" else ulysses_attention_backward
        return backward(q, q, q, q, out, lse, comm=comm, deterministic=deterministic)

    raised = _every_rank_error(rank)
    message = str(raised[0])
    assert isinstance(raised[0], ValueError) and message == str(raised[1]), raised
    assert ": deterministic is " in message, message


@pytest.mark.parametrize("validate", [True, False])
def test_every_entry_point_gathers_once_per_call_to_compare(validate, rng):
    """The checks of ring and Ulysses attention cost one all-gather per call and rank with
    validate=True (the comparison, which carries any refusal), none without."""
    q = random_array(rng, (1, 2, 8, 8), F32)
    sent = []

    def rank(comm):
        _record_messages(comm, sent)
        out, lse = ring_attention(q, q, q, comm=comm, return_lse=True, validate=validate)
        ring_attention_backward(q, q, q, q, out, lse, comm=comm, validate=validate)
        _, vjp = ring_attention_vjp(q, q, q, comm=comm, validate=validate)
        vjp(q)
        out, lse = ulysses_attention(q, q, q, comm=comm, return_lse=True, validate=validate)
        ulysses_attention_backward(q, q, q, q, out, lse, comm=comm, validate=validate)

    LocalRing(2, timeout=10).run(rank)
    gathers = [r for r, operation in sent if operation == "all_gather"]
    assert sorted(gathers) == ([0] * 6 + [1] * 6 if validate else [])


def test_ulysses_slopes_of_another_dtype_are_a_difference_between_ranks(rng):
    """The slopes are compared by their values and dtype: int32 slopes of the bytes of rank
    0's float32 ones passed the comparison (of the bytes alone), and were then refused by
    the check of their dtype on that rank alone, while rank 0 waited in the all-to-all; they
    are a difference between the ranks' calls now, named on every rank."""
    q = random_array(rng, (1, 2, 8, 8), F32)

    def rank(comm):
        slopes = np.ones(2, F32)
        slopes = slopes.view(np.int32) if comm.rank else slopes
        return ulysses_attention(q, q, q, comm=comm, alibi_slopes=slopes)

    raised, seconds = _errors_on_a_waiting_ring(rank)
    assert seconds < 4
    assert all(isinstance(e, ValueError) and "alibi_slopes is" in str(e)
               for e in raised.values()), raised


def test_validate_false_leaves_the_agreement_to_the_caller(rng):
    """validate=False sends nothing before the first transfer: a refusal is this rank's alone,
    and a rank waiting for it fails only at its timeout (under NCCL), as documented."""
    q = random_array(rng, (1, 2, 8, 8), F32)

    def rank(comm):
        return ring_attention(q, q, q, comm=comm, validate=False,
                              causal="yes" if comm.rank else False)

    raised, seconds = _errors_on_a_waiting_ring(rank, timeout=0.5)
    assert isinstance(raised[1], TypeError) and isinstance(raised[0], CommTimeout), raised


def test_a_rank_whose_refusal_is_long_is_quoted_in_part(rng):
    """A refusal too long for the comparison is cut, not dropped."""
    from cuflash.parallel import _signature
    error = ValueError("x" * 5000)
    values = _signature.refusal_values(error, 128)
    assert _signature.is_refusal(values)
    quoted = _signature.refusal_error(values, 3, "ring attention")
    assert isinstance(quoted, ValueError)
    assert str(quoted).startswith("ring attention: rank 3 refused its arguments (ValueError: xxx")
    assert "..." in str(quoted) and len(str(quoted)) < 1100
    both = _signature.refusal_error(
        _signature.refusal_values(cuflash._checks.IndexDtypeError("i"), 128), 0, "w")
    assert isinstance(both, TypeError) and isinstance(both, ValueError)
    other = _signature.refusal_error(_signature.refusal_values(KeyError("k"), 128), 0, "w")
    assert isinstance(other, CommError) and "KeyError" in str(other)


def test_torch_refusals_on_one_rank_are_raised_on_every_rank(rng):
    """torch ring attention refused a tensor that requires grad, tensors on other devices or of
    other types, and torch_ring_attention a deterministic that is no bool, on the rank that
    passed them alone, before the comparison the other ranks waited in."""
    torch = pytest.importorskip("torch")
    from cuflash.parallel import torch_ring_attention
    q = torch.from_numpy(random_array(rng, (1, 2, 8, 8), F32))
    leaf = q.clone().requires_grad_(True)

    def grad(comm):
        return ring_attention(leaf if comm.rank else q, q, q, comm=comm)

    raised, seconds = _errors_on_a_waiting_ring(grad)
    _assert_every_rank_refuses(raised, seconds, 1, ValueError, "requires grad")

    def mixed(comm):
        return ring_attention(q, q.numpy() if comm.rank else q, q, comm=comm)

    raised, seconds = _errors_on_a_waiting_ring(mixed)
    _assert_every_rank_refuses(raised, seconds, 1, TypeError, "k must be a torch.Tensor")

    def deterministic(comm):
        return torch_ring_attention(q, q, q, comm=comm, deterministic="yes" if comm.rank else True)

    raised, seconds = _errors_on_a_waiting_ring(deterministic)
    _assert_every_rank_refuses(raised, seconds, 1, TypeError, "deterministic must be True")


class _SizedComm(CommBase):
    """A transport that, like NCCL, receives into buffers of the sizes it gives them: its
    all_to_all is NcclComm's and TorchComm's (the shared check of the arrays and all-gather of
    their shapes, then one transfer per pair into a buffer of the announced shape), over a
    ``_NcclLikeRing``, whose waits last until the timeout."""

    def __init__(self, local, xp=None):
        self.local, self.rank, self.size, self.timeout = local, local.rank, local.size, 5.0
        self.xp = xp  # the module the transport takes (NcclComm: CuPy), None: any

    def exchange(self, send, dst, src, recv_like=None):
        return self.local.exchange(send, dst, src, recv_like)

    def _all_gather_host(self, x):
        return self.local.all_gather(x)

    def all_to_all(self, arrays):
        arrays = self._all_to_all_arrays(arrays, self.xp)
        shapes = self._received_shapes(arrays)
        received = self.local.all_to_all(arrays)
        for src, x in enumerate(received):
            if x.shape != shapes[src] or x.dtype != arrays[src].dtype:
                raise AssertionError(f"rank {self.rank}: a buffer of {shapes[src]} "
                                     f"{arrays[src].dtype} got {x.shape} {x.dtype}")
        return received


def test_device_all_to_all_receives_arrays_of_other_shapes_whole():
    """NcclComm.all_to_all received into buffers shaped like the arrays it sent: a rank
    sending arrays of another shape left NCCL waiting for bytes that never came (for ever with
    timeout=None). The shapes now travel first, as TorchComm's did."""
    def rank(comm):
        comm = _SizedComm(comm)
        return comm.all_to_all([np.full((comm.rank + 1, 2), 10 * comm.rank + dst, F32)
                                for dst in range(comm.size)])

    results = _NcclLikeRing(3, timeout=5).run(rank)
    for r, received in enumerate(results):
        for src, x in enumerate(received):
            assert x.shape == (src + 1, 2) and np.all(x == 10 * src + r)


@pytest.mark.parametrize("bad, error, message", [
    ("count", ValueError, r"all_to_all needs one array per rank \(2\), got 1"),
    ("no array", TypeError, r"arrays\[1\] must be an array \(NumPy or CuPy\), got int"),
    ("modules", TypeError, r"arrays\[0\] must be a cupy.ndarray, got numpy.ndarray"),
    ("dtypes", ValueError, "all_to_all needs arrays of one dtype in each direction")])
def test_device_all_to_all_refusals_reach_every_rank(bad, error, message):
    """A rank whose all_to_all arrays are refused used to raise alone, while the others waited
    in the transfers (under NCCL, until the timeout); now every rank raises at once."""
    device_only = type(sys)("cupy")  # a transport of device arrays, given host ones

    def rank(comm):
        comm = _SizedComm(comm, device_only if bad == "modules" and comm.rank == 1 else None)
        arrays = [np.zeros(3, F32), np.zeros(3, F32)]
        if comm.rank == 1:
            arrays = {"count": arrays[:1], "no array": [arrays[0], 3], "modules": arrays,
                      "dtypes": [np.zeros(3, np.int32)] * 2}[bad]
        return comm.all_to_all(arrays)

    raised, seconds = _errors_on_a_waiting_ring(rank)
    if bad == "dtypes":  # a difference between ranks, named alike on every rank
        assert all(isinstance(e, error) and message in str(e) for e in raised.values())
        assert str(raised[0]) == str(raised[1]) and seconds < 4
    else:
        _assert_every_rank_refuses(raised, seconds, 1, error, message)


@pytest.mark.parametrize("operation", ["all_to_all", "all_gather", "all_reduce"])
def test_local_collectives_refuse_what_is_no_array_by_name(operation):
    """A LocalRing's all_to_all sent a list as if it were an array (list.copy()), and its
    all_gather and all_reduce of an int failed with "'int' object has no attribute 'copy'":
    each names its argument now, as the device communicators do."""
    def rank(comm):
        if operation == "all_to_all":
            return comm.all_to_all([np.zeros(1), [1.0]])
        return getattr(comm, operation)(3)

    name = r"arrays\[1\]" if operation == "all_to_all" else "x"
    with pytest.raises(TypeError, match=name + r" must be an array \(NumPy or CuPy\), got "):
        LocalRing(2, timeout=10).run(rank)


class _DeviceArray:
    """Stands for a CuPy array of device ``device`` (read by NcclComm's checks alone)."""
    __module__ = "cupy._core.core"

    def __init__(self, device):
        self.shape, self.dtype, self.ndim = (2,), np.dtype(F32), 1
        self.device = type("Device", (), {"id": device})()


@pytest.mark.parametrize("given, error, message", [
    (np.zeros(2, F32), TypeError, r"send\[0\] must be a CuPy array .*got numpy.ndarray"),
    (_DeviceArray(1), ValueError, r"send\[0\] must be on device 0, this NcclComm's, got "
                                  r"device 1")])
def test_nccl_exchange_refuses_arrays_off_its_device_by_name(given, error, message):
    """NcclComm.exchange handed a NumPy array to CuPy, which refused it without naming send,
    and an array of another GPU to NCCL."""
    from cuflash import parallel
    comm = parallel.NcclComm.__new__(parallel.NcclComm)
    comm.rank, comm.size, comm.cupy = 0, 2, _NoDevice()
    comm.device = type("Device", (), {"id": 0})()
    with pytest.raises(error, match=message):
        comm.exchange([given], 1, 1)


def test_local_ring_run_raises_the_refusing_ranks_own_error(rng):
    """Every rank raises when one refuses its arguments; run() raises the refusing rank's own
    error, the cause, rather than rank 0's, which quotes it."""
    q = random_array(rng, (1, 2, 8, 8), F32)

    def rank(comm):
        return ring_attention(q, q, q, comm=comm, causal="yes" if comm.rank == 1 else False)

    with pytest.raises(TypeError) as raised:
        LocalRing(3, timeout=10).run(rank)
    assert str(raised.value) == "causal must be True or False, got 'yes'"


@pytest.mark.slow
def test_torch_comm_all_to_all_refusal_on_one_rank_reaches_every_rank():
    """A rank that passed all_to_all one array too few raised alone, while the other waited in
    the all-gather of the shapes until the process group's timeout; both raise now, at once."""
    start = time.monotonic()
    results = _gloo_all_to_all("count")
    assert time.monotonic() - start < 50
    own = "all_to_all needs one array per rank (2), got 1"
    assert results[1] == f"ValueError: {own}"
    assert results[0] == (f"ValueError: all_to_all: rank 1 refused its arguments (ValueError: "
                          f"{own}), so every rank stops here")


def test_a_communicator_of_ones_own_is_told_what_it_lacks(rng):
    """An object with some of a communicator's attributes was refused as "got MyComm" alone;
    the message now names what it lacks."""
    class MyComm:
        rank, size = 0, 1

        def exchange(self, send, dst, src, recv_like=None):
            raise AssertionError("not reached")

    q = random_array(rng, (1, 2, 8, 8), F32)
    with pytest.raises(TypeError, match=r"got MyComm \(it lacks all_gather, all_reduce, "
                                        r"all_to_all, barrier, shift, timeout\)"):
        ring_attention(q, q, q, comm=MyComm())


def test_ulysses_without_validation_fails_alike_where_the_shapes_differ():
    """docs/parallel.md: with validate=False, Ulysses ranks whose arrays differ in shape fail
    alike, since the all-to-all delivers each piece whole and the pieces do not join."""
    def rank(comm):
        q = np.zeros((1, 2, 8 if comm.rank == 0 else 12, 8), F32)
        return ulysses_attention(q, q, q, comm=comm, validate=False)

    raised, seconds = _errors_on_a_waiting_ring(rank)
    assert seconds < 4 and sorted(raised) == [0, 1], raised
    assert all(isinstance(e, ValueError) and "every part must have one shape" in str(e)
               for e in raised.values()), raised


@pytest.mark.parametrize("device, error", [(1.5, TypeError), (True, TypeError),
                                           (-1, ValueError)])
def test_nccl_from_torch_refuses_a_bad_device_before_anything_is_sent(device, error,
                                                                      monkeypatch):
    """from_torch checked its device only in the constructor, once rank 0 had made the unique
    id and broadcast it: the other ranks then waited for this one in NCCL's set-up."""
    pytest.importorskip("torch")
    import torch.distributed as dist

    from cuflash.parallel import NcclComm, nccl
    _stub_group(monkeypatch)
    monkeypatch.setattr(nccl, "_nccl", lambda: pytest.fail("NCCL loaded before the checks"))
    monkeypatch.setattr(dist, "broadcast_object_list",
                        lambda *a, **k: pytest.fail("the unique id sent before the checks"))
    with pytest.raises(error, match="device must be"):
        NcclComm.from_torch(device=device)


@pytest.mark.parametrize("attention", ["ring", "ring backward", "ulysses", "ulysses backward"])
def test_arrays_the_communicator_cannot_move_are_refused_on_every_rank(attention, rng):
    """An NcclComm moves arrays of its own GPU: a rank whose arrays were elsewhere was refused
    (or left NCCL to fail) at its first transfer, alone, once the others had started theirs.
    The communicator's check_movable is asked before the ranks compare their calls."""
    q = random_array(rng, (1, 2, 8, 8), F32)
    lse = np.zeros((1, 2, 8), F32)

    def rank(comm):
        if comm.rank == 1:
            def check_movable(x, name):
                if name == "k":
                    raise ValueError("k must be on device 0, this NcclComm's, got device 1")
            comm.check_movable = check_movable
        if attention.endswith("backward"):
            call = ring_attention_backward if attention == "ring backward" else \
                ulysses_attention_backward
            return call(q, q, q, q, q, lse, comm=comm)
        call = ring_attention if attention == "ring" else ulysses_attention
        return call(q, q, q, comm=comm)

    raised, seconds = _errors_on_a_waiting_ring(rank)
    _assert_every_rank_refuses(raised, seconds, 1, ValueError, "k must be on device 0")


def test_nccl_from_env_names_a_local_rank_past_the_gpus(monkeypatch):
    """A LOCAL_RANK past the GPUs the process sees failed in CuPy with "invalid device
    ordinal", naming no variable."""
    import types

    from cuflash.parallel import nccl
    cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 2),
        Device=lambda i: pytest.fail("a GPU chosen before LOCAL_RANK was checked"))
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(nccl, "_nccl", lambda: pytest.fail("NCCL loaded before the checks"))
    for name, value in dict(RANK="0", WORLD_SIZE="4", LOCAL_RANK="2",
                            CUFLASH_NCCL_ID_FILE="/nonexistent/id").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="LOCAL_RANK = 2 names no GPU: this process sees 2"):
        nccl.NcclComm.from_env()


def test_a_shift_to_the_rank_itself_sends_nothing():
    """A shift by a multiple of the size went to the rank itself through the transport (which
    torch.distributed's send and recv refuse); it hands back copies, as a ring of one rank
    did."""
    class NoSelf(CommBase):
        rank, size, timeout = 1, 3, None

        def exchange(self, send, dst, src, recv_like=None):
            raise AssertionError(f"exchange with {dst}, {src}")

        def all_to_all(self, arrays):
            raise AssertionError("all_to_all")

    x = np.arange(3.0)
    for offset in (3, -3, 0, 6):
        got = NoSelf().shift([x], offset=offset).wait()[0]
        assert got is not x and np.array_equal(got, x)
