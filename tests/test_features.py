"""Sliding windows, softcap, ALiBi and 2-D inputs on the NumPy path, against the float64 oracle.

Hypothesis draws combinations of every option (window × softcap × ALiBi × causal × grouped heads
× Nq ≠ Nk × Dv ≠ D × block mask × broadcasting × strided inputs and outputs); focused tests pin
the rules of ``cuflash._mask`` against brute force, the edge cases (rows a window leaves empty,
windows equivalent to causal or to nothing) and the gradients through ``tanh`` against central
differences.
"""

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import assert_backward_close, assert_forward_close, poisoned, random_array
from random_problems import grouped_shapes, stable_for_16_bits

import cuflash
from cuflash import _checks, _mask, cpu, reference
from cuflash._spec import AttentionSpec
from cuflash.sparse import BlockMask

DTYPES = st.sampled_from([np.float16, ml_dtypes.bfloat16, np.float32])
HEAD_DIMS = st.sampled_from([3, 8, 16, 24, 32, 48, 64, 80])
# See test_cpu_properties.BACKWARD_HEAD_DIMS: small D with the default scale gives scores so large
# that float32 gradients outgrow the rule through the rounding of the base-2 exponent.
BACKWARD_HEAD_DIMS = st.sampled_from([8, 16, 24, 32, 48, 64, 80])
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OPTIONS = ("causal", "scale", "window", "softcap", "alibi_slopes", "block_mask")


# ----------------------------------------------------------------------------- the rules

def brute_visible(nq, nk, left, right):
    """Query i sees key j: the definition, one pair at a time."""
    shift = nk - nq
    keep = np.zeros((nq, nk), bool)
    for i in range(nq):
        for j in range(nk):
            keep[i, j] = ((left == -1 or j >= i + shift - left)
                          and (right == -1 or j <= i + shift + right))
    return keep


BANDS = [(-1, -1), (-1, 0), (0, 0), (3, 2), (0, -1), (5, 0), (2, 7), (40, 40), (0, 3),
         (10**9, 10**9)]


@pytest.mark.parametrize("nq, nk", [(1, 1), (7, 7), (5, 13), (13, 5), (20, 3)])
@pytest.mark.parametrize("left, right", BANDS)
def test_mask_rules_match_brute_force(nq, nk, left, right):
    keep = brute_visible(nq, nk, left, right)
    np.testing.assert_array_equal(_mask.visible(nq, nk, left, right), keep)
    begin, end = _mask.key_range(np.arange(nq), nq, nk, left, right)
    for i in range(nq):
        seen = np.flatnonzero(keep[i])
        assert end[i] - begin[i] == len(seen)
        if len(seen):
            assert (begin[i], end[i]) == (seen[0], seen[-1] + 1)
    assert _mask.every_row_sees_a_key(nq, nk, left, right) == bool(keep.any(axis=1).all())
    begin, end = _mask.row_range(np.arange(nk), nq, nk, left, right)
    for j in range(nk):
        seen = np.flatnonzero(keep[:, j])
        assert end[j] - begin[j] == len(seen)
        if len(seen):
            assert (begin[j], end[j]) == (seen[0], seen[-1] + 1)
    # Every block of every shape: holds a seen pair / holds an unseen pair.
    for r0 in range(nq):
        for r1 in range(r0 + 1, min(nq, r0 + 4) + 1):
            for c0 in range(nk):
                for c1 in range(c0 + 1, min(nk, c0 + 5) + 1):
                    block = keep[r0:r1, c0:c1]
                    assert bool(_mask.blocks_visible(r0, r1, c0, c1, nq, nk, left, right)) \
                        == block.any()
                    assert _mask.partial(r0, r1, c0, c1, nq, nk, left, right) == (not block.all())


def test_band_of_causal_and_window():
    assert _mask.band((-1, -1), True) == (-1, 0)
    assert _mask.band((4, 3), True) == (4, 0)
    assert _mask.band((4, -1), True) == (4, 0)
    assert _mask.band((-1, 0), False) == (-1, 0)
    assert _mask.band((2, 5), False) == (2, 5)


def test_score_modifier_formula(rng):
    s = rng.standard_normal((2, 3, 4, 5)) * 10
    slopes = rng.random((2, 3))
    rows, cols = np.array([0, 2, 5, 6]), np.array([1, 2, 3, 8, 9])
    x, grad = _mask.logits(s, rows, cols, nq=7, nk=10, scale=0.3, softcap=4.0, slopes=slopes)
    dist = np.abs(rows[:, None] + 3 - cols[None, :])
    want = 4.0 * np.tanh(0.3 * s / 4.0) - slopes[..., None, None] * dist
    np.testing.assert_allclose(x, want, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(grad, 1 - np.tanh(0.3 * s / 4.0) ** 2, rtol=1e-14, atol=1e-14)
    x2, grad2 = _mask.logits(s.astype(np.float32), rows, cols, nq=7, nk=10, scale=0.3,
                             softcap=4.0, slopes=slopes.astype(np.float32), log2=True)
    assert x2.dtype == np.float32 and grad2.dtype == np.float32
    np.testing.assert_allclose(x2, want * math.log2(math.e), rtol=1e-5, atol=1e-4)
    plain, none = _mask.logits(s, rows, cols, nq=7, nk=10, scale=0.3)
    assert none is None
    np.testing.assert_array_equal(plain, s * 0.3)


def test_tiles_outside_the_band_are_never_visited():
    # 4096 tokens, window (100, 0): each 128-row tile reaches at most 3 key tiles, not 32.
    n = 4096
    shapes = _checks.Shapes((1,), 1, 1, n, n, 8, 8)
    spec = AttentionSpec(shapes, np.dtype(np.float32), 1.0, window=(100, 0))
    grid = cpu._TileGrid(spec, n, n, 1, 1)
    per_row = grid.live.sum(axis=1)
    assert per_row.max() <= 3 and per_row.min() >= 1
    assert grid.live.sum() < 3 * grid.row_tiles
    both = AttentionSpec(shapes, np.dtype(np.float32), 1.0, window=(100, 100), causal=True)
    np.testing.assert_array_equal(cpu._TileGrid(both, n, n, 1, 1).live, grid.live)


# ----------------------------------------------------------------------------- random problems

@st.composite
def problems(draw, head_dims=HEAD_DIMS):
    shapes = draw(grouped_shapes(head_dims, max_length=200))
    nq, d = shapes["q_shape"][-2:]
    nk = shapes["k_shape"][-2]
    side = st.integers(-1, 2 * max(nq, nk)) | st.integers(-1, 12)
    window = draw(st.sampled_from([None, "drawn", "drawn"]).flatmap(
        lambda kind: st.just((-1, -1)) if kind is None else st.tuples(side, side)))
    alibi = draw(st.sampled_from([None, "heads", "batch"]))
    block = None
    if draw(st.integers(0, 3)) == 0:
        block = dict(size=(draw(st.sampled_from([16, 32, 48, 64])),
                           draw(st.sampled_from([16, 32, 48, 64]))),
                     per_head=draw(st.booleans()))
    problem = dict(
        **shapes,
        causal=draw(st.booleans()),
        window=window,
        softcap=draw(st.sampled_from([0.0, 0.0, 1.0, 5.0, 30.0]) | st.floats(0.5, 50.0)),
        alibi=alibi,
        alibi_axes=draw(st.integers(0, 2)),  # leading axes of "batch" slopes (at most the batch's)
        block_mask=block,
        layout=draw(st.sampled_from(["contiguous", "bnhd", "strided"])),
        out_layout=draw(st.sampled_from(["contiguous", "bnhd"])),
        scale=draw(st.none() | st.floats(0.25, 2.0).map(lambda f: f / math.sqrt(d))),
        seed=draw(st.integers(0, 2**32 - 1)),
        dtype=draw(DTYPES),
    )
    if not stable_for_16_bits(problem["q_shape"], problem["k_shape"], problem["v_shape"],
                              causal=problem["causal"], window=problem["window"], elements=2048):
        problem["dtype"] = np.float32
    return problem


def array(rng, shape, dtype, layout):
    """Random values in ``shape`` with the given memory layout (the values do not depend on it)."""
    values = random_array(rng, shape, dtype)
    if layout == "contiguous" or len(shape) < 3:
        return values
    if layout == "bnhd":  # (..., N, H, D) buffer seen as (..., H, N, D): read in place
        buffer = np.ascontiguousarray(np.swapaxes(values, -3, -2))
        return np.swapaxes(buffer, -3, -2)
    buffer = np.empty(shape[:-2] + (shape[-2], 2 * shape[-1]), dtype)  # last axis strided: copied
    buffer[..., ::2] = values
    return buffer[..., ::2]


def make_call(problem):
    """Inputs and options of one drawn problem."""
    rng = np.random.default_rng(problem["seed"])
    dtype, layout = problem["dtype"], problem["layout"]
    q, k, v = (array(rng, problem[f"{x}_shape"], dtype, layout) for x in "qkv")
    hq, nq = problem["q_shape"][-3:-1]
    nk = problem["k_shape"][-2]
    slopes = None
    # In float32 the backward's probabilities, recomputed from the stored lse, carry a relative
    # error of about |lse|·2⁻²⁴, which ALiBi logits of 50 and more push past the correctness
    # rule (docs/api.md, "Numerical limits"): float32 draws keep slope × distance within 16.
    top = 0.5 if dtype != np.float32 else min(0.5, 16.0 / max(nq, nk))
    if problem["alibi"] == "heads":
        slopes = rng.uniform(0.0, top, hq).astype(np.float32)
    elif problem["alibi"] == "batch":  # the last batch axes, some of them broadcast
        batch = np.broadcast_shapes(*(x.shape[:-3] for x in (q, k, v)))
        lead = batch[len(batch) - min(len(batch), problem["alibi_axes"]):]
        lead = tuple(n if rng.random() < 0.7 else 1 for n in lead)
        slopes = rng.uniform(0.0, top, lead + (hq,)).astype(np.float32)
    block_mask = None
    if problem["block_mask"] is not None:
        bq, bk = problem["block_mask"]["size"]
        heads = (hq,) if problem["block_mask"]["per_head"] else ()
        layout_ = rng.random(heads + (-(-nq // bq), -(-nk // bk))) < 0.6
        block_mask = BlockMask.from_dense(layout_, block_size=(bq, bk), shape=(nq, nk))
    options = dict(causal=problem["causal"], scale=problem["scale"], window=problem["window"],
                   softcap=problem["softcap"], alibi_slopes=slopes, block_mask=block_mask)
    return rng, (q, k, v), options


def poisoned_out(shape, dtype, layout):
    if layout == "bnhd" and len(shape) >= 3:
        return np.swapaxes(poisoned(shape[:-3] + (shape[-2], shape[-3], shape[-1]), dtype), -3, -2)
    return poisoned(shape, dtype)


@SETTINGS
@given(problems())
def test_forward(problem):
    _, (q, k, v), options = make_call(problem)
    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    out_shape = batch + q.shape[-3:-1] + v.shape[-1:]
    out = poisoned_out(out_shape, q.dtype, problem["out_layout"])
    result, lse = cuflash.attention(q, k, v, **options, return_lse=True, out=out)
    assert result is out
    assert_forward_close(out, lse, q, k, v, **options, context=str(problem))


@SETTINGS
@given(problems(head_dims=BACKWARD_HEAD_DIMS))
def test_backward(problem):
    rng, (q, k, v), options = make_call(problem)
    out, vjp = cuflash.attention_vjp(q, k, v, **options)
    dout = array(rng, out.shape, problem["dtype"], problem["layout"])
    grads = vjp(dout)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert_backward_close(grads, dout, q, k, v, **options, context=str(problem))


# ----------------------------------------------------------------------------- edge cases

def qkv(rng, q_shape, k_shape, v_shape, dtype=np.float32):
    return tuple(random_array(rng, s, dtype) for s in (q_shape, k_shape, v_shape))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("window, causal", [((0, 0), False), ((3, 10), False), ((-1, 2), True),
                                            ((4, 0), True)])
def test_rows_a_window_leaves_empty(rng, seed, dtype, window, causal):
    # Nq = 300 > Nk = 130: row i sees keys up to i - 170 + right; the first rows see none.
    q, k, v = qkv(rng, (2, 4, 300, 32), (2, 2, 130, 32), (2, 2, 130, 32), dtype)
    right = min(window[1], 0) if causal else window[1]
    empty = 170 - right
    out, lse = cuflash.attention(q, k, v, window=window, causal=causal, softcap=20.0,
                                 alibi_slopes=np.full(4, 0.1, np.float32), return_lse=True)
    assert np.all(out[:, :, :empty].astype(np.float32) == 0)
    assert np.all(np.isneginf(lse[:, :, :empty])) and np.isfinite(lse[:, :, empty:]).all()
    dout = random_array(rng, out.shape, dtype)
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, window=window, causal=causal,
                                            softcap=20.0, alibi_slopes=np.full(4, 0.1, np.float32))
    assert np.all(dq[:, :, :empty].astype(np.float32) == 0)
    assert not any(np.isnan(g.astype(np.float32)).any() for g in (dq, dk, dv))
    options = dict(window=window, causal=causal, softcap=20.0,
                   alibi_slopes=np.full(4, 0.1, np.float32))
    assert_forward_close(out, lse, q, k, v, **options, context=f"seed={seed}")
    assert_backward_close((dq, dk, dv), dout, q, k, v, **options, context=f"seed={seed}")


def test_keys_no_row_sees_get_zero_gradients(rng):
    # Nk > Nq with window (0, 0): key j is seen by row j - 70 only; keys 0..69 by nobody.
    q, k, v = qkv(rng, (1, 2, 60, 16), (1, 2, 130, 16), (1, 2, 130, 16))
    out, vjp = cuflash.attention_vjp(q, k, v, window=(0, 0))
    np.testing.assert_allclose(out, v[:, :, 70:], rtol=0, atol=0)  # one key each: P = 1
    dq, dk, dv = vjp(np.ones_like(out))
    assert np.all(dk[:, :, :70] == 0) and np.all(dv[:, :, :70] == 0)
    np.testing.assert_array_equal(dv[:, :, 70:], np.ones_like(dv[:, :, 70:]))


def test_window_sides_with_more_queries_than_keys(rng):
    # Nq = 10 > Nk = 3: a left side of Nk - 1 admits every key, a right side admits every key
    # only from Nq - 1 on; right = Nk still leaves row 0 the keys j <= 3 - 7, none.
    q, k, v = qkv(rng, (1, 2, 10, 16), (1, 2, 3, 16), (1, 2, 3, 16))
    full = cuflash.attention(q, k, v)
    np.testing.assert_array_equal(cuflash.attention(q, k, v, window=(2, -1)), full)
    np.testing.assert_array_equal(cuflash.attention(q, k, v, window=(-1, 9)), full)
    out, lse = cuflash.attention(q, k, v, window=(-1, 3), return_lse=True)
    assert np.all(np.isneginf(lse[..., :4])) and np.all(out[..., :4, :] == 0)
    np.testing.assert_array_equal(out[..., 6:, :], full[..., 6:, :])
    assert not np.array_equal(out[..., 4:6, :], full[..., 4:6, :])


@pytest.mark.parametrize("nq, nk", [(200, 200), (150, 290), (290, 150)])
def test_equivalent_windows_give_identical_bits(rng, nq, nk):
    q, k, v = qkv(rng, (2, 4, nq, 32), (2, 2, nk, 32), (2, 2, nk, 32), np.float16)
    dout = random_array(rng, (2, 4, nq, 32), np.float16)

    def run(**options):
        out, vjp = cuflash.attention_vjp(q, k, v, **options)
        return (out,) + vjp(dout)

    def same(a, b):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)

    same(run(window=(-1, 0)), run(causal=True))
    same(run(window=(-1, 5), causal=True), run(causal=True))
    same(run(window=(7, 3), causal=True), run(window=(7, 0)))
    same(run(window=(nk + nq, nk + nq)), run())  # admits every key: the unmasked result
    same(run(alibi_slopes=np.zeros(4, np.float32)), run())
    same(run(softcap=0.0, window=(-1, -1)), run())


def test_window_matches_an_element_mask(rng, seed):
    q, k, v = qkv(rng, (2, 4, 150, 32), (2, 2, 170, 32), (2, 2, 170, 32), ml_dtypes.bfloat16)
    keep = brute_visible(150, 170, 30, 5)
    out, lse = cuflash.attention(q, k, v, window=(30, 5), return_lse=True)
    assert_forward_close(out, lse, q, k, v, mask=keep, context=f"seed={seed}")


def test_large_softcap_approaches_no_softcap(rng):
    q, k, v = qkv(rng, (1, 2, 100, 32), (1, 2, 90, 32), (1, 2, 90, 32))
    capped = cuflash.attention(q, k, v, softcap=1e4)
    np.testing.assert_allclose(capped, cuflash.attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_softcap_bounds_the_logits(rng):
    q, k, v = qkv(rng, (1, 2, 64, 32), (1, 2, 64, 32), (1, 2, 64, 32))
    q *= 20  # scores far beyond the cap
    _, lse = cuflash.attention(q, k, v, softcap=2.0, return_lse=True)
    assert np.all(lse <= 2.0 + math.log(64) + 1e-5) and np.all(lse >= -2.0 + math.log(64) - 1e-5)


def test_alibi_per_batch_element_equals_separate_calls(rng):
    q, k, v = qkv(rng, (3, 4, 50, 16), (3, 2, 70, 16), (3, 2, 70, 16))
    slopes = rng.uniform(0, 1, (3, 4)).astype(np.float32)
    out, lse = cuflash.attention(q, k, v, alibi_slopes=slopes, window=(20, 3), return_lse=True)
    for b in range(3):
        one, one_lse = cuflash.attention(q[b], k[b], v[b], alibi_slopes=slopes[b],
                                         window=(20, 3), return_lse=True)
        np.testing.assert_array_equal(out[b], one)
        np.testing.assert_array_equal(lse[b], one_lse)
    shared = cuflash.attention(q, k, v, alibi_slopes=slopes[:1])
    np.testing.assert_array_equal(shared, cuflash.attention(q, k, v, alibi_slopes=slopes[0]))


def test_alibi_slopes_broadcast_over_batch_axes(rng, seed):
    # Batch (2, 3): slopes (3, Hq) broadcast over the first batch axis.
    q, k, v = qkv(rng, (2, 3, 4, 40, 16), (3, 2, 50, 16), (1, 1, 2, 50, 16))
    slopes = rng.uniform(0, 1, (3, 4)).astype(np.float32)
    out, lse = cuflash.attention(q, k, v, alibi_slopes=slopes, return_lse=True)
    assert_forward_close(out, lse, q, k, v, alibi_slopes=slopes, context=f"seed={seed}")
    full = np.broadcast_to(slopes, (2, 3, 4)).copy()
    np.testing.assert_array_equal(out, cuflash.attention(q, k, v, alibi_slopes=full))


# ----------------------------------------------------------------------------- 2-D inputs

def test_two_dimensional_inputs_are_one_head(rng, seed):
    q, k, v = qkv(rng, (70, 16), (90, 16), (90, 24))
    options = dict(causal=True, window=(30, -1), softcap=10.0,
                   alibi_slopes=np.array([0.2], np.float32))
    out, lse = cuflash.attention(q, k, v, **options, return_lse=True)
    assert out.shape == (70, 24) and lse.shape == (70,)
    head, head_lse = cuflash.attention(q[None], k[None], v[None], **options, return_lse=True)
    np.testing.assert_array_equal(out, head[0])
    np.testing.assert_array_equal(lse, head_lse[0])
    assert_forward_close(out, lse, q, k, v, **options, context=f"seed={seed}")

    dout = random_array(rng, out.shape, np.float32)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **options)
    assert [g.shape for g in grads] == [(70, 16), (90, 16), (90, 24)]
    for got, want in zip(grads, cuflash.attention_backward(dout[None], q[None], k[None], v[None],
                                                           head, head_lse, **options)):
        np.testing.assert_array_equal(got, want[0])
    assert_backward_close(grads, dout, q, k, v, **options, context=f"seed={seed}")

    out2 = poisoned((70, 24), np.float32)
    assert cuflash.attention(q, k, v, **options, out=out2) is out2
    np.testing.assert_array_equal(out2, out)


def test_mixed_dimensions_broadcast_like_matmul(rng, seed):
    # q 2-D is (1, Nq, D): one query head over one key/value head with a batch of 3.
    q, k, v = qkv(rng, (40, 16), (3, 1, 50, 16), (3, 1, 50, 16))
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert out.shape == (3, 1, 40, 16) and lse.shape == (3, 1, 40)
    assert_forward_close(out, lse, q, k, v, context=f"seed={seed}")
    # k and v 2-D are one key/value head shared by all query heads (multi-query).
    q, k, v = qkv(rng, (4, 40, 16), (50, 16), (50, 8))
    out, vjp = cuflash.attention_vjp(q, k, v, causal=True)
    assert out.shape == (4, 40, 8)
    dout = random_array(rng, out.shape, np.float32)
    grads = vjp(dout)
    assert [g.shape for g in grads] == [(4, 40, 16), (50, 16), (50, 8)]
    assert_backward_close(grads, dout, q, k, v, causal=True, context=f"seed={seed}")


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("options", [
    dict(softcap=1.5),
    dict(alibi_slopes=np.array([0.3, 0.7], np.float32), window=(4, 2)),
    dict(softcap=2.0, alibi_slopes=np.array([0.5, 0.1], np.float32), causal=True),
], ids=["softcap", "alibi-window", "softcap-alibi-causal"])
def test_float32_gradients_match_central_differences(rng, options):
    # Central differences of the float32 NumPy path's loss, at coordinates spread over q, k and
    # v, against its analytic gradient; scores well inside tanh's curved range.
    q, k, v = qkv(rng, (1, 2, 9, 6), (1, 2, 11, 6), (1, 2, 11, 5))
    q *= 2
    dout = random_array(rng, (1, 2, 9, 5), np.float32)
    grads = cuflash.attention_vjp(q, k, v, scale=1.0, **options)[1](dout)

    def loss(q_, k_, v_):
        out = cuflash.attention(q_, k_, v_, scale=1.0, **options)
        return float(np.sum(dout.astype(np.float64) * out))

    step = np.float32(2.0**-8)
    for which, (x, grad) in enumerate(zip((q, k, v), grads)):
        for index in zip(*(rng.integers(0, n, 6) for n in x.shape)):
            plus, minus = [a.copy() for a in (q, k, v)], [a.copy() for a in (q, k, v)]
            plus[which][index] += step
            minus[which][index] -= step
            numeric = (loss(*plus) - loss(*minus)) / (2 * float(step))
            assert abs(numeric - grad[index]) <= 2e-3 * (1 + abs(numeric)), (which, index)


@pytest.mark.parametrize("options", [
    dict(softcap=3.0),
    dict(softcap=0.7, window=(2, 1)),
    dict(alibi_slopes=np.array([0.4, 1.5, 0.05, 0.9], np.float32)),
    dict(softcap=2.0, alibi_slopes=np.array([[0.4, 1.5, 0.05, 0.9], [0.1, 0.2, 0.3, 0.4]],
                                            np.float32), window=(-1, 1), causal=True),
], ids=["softcap", "softcap-window", "alibi", "all"])
def test_oracle_gradient_matches_finite_differences(rng, options):
    # The float64 oracle's analytic gradient through tanh and ALiBi; everything else is then
    # checked against it.
    q = rng.standard_normal((2, 4, 4, 3)) * 2
    k = rng.standard_normal((1, 2, 5, 3))
    v = rng.standard_normal((2, 2, 5, 2))
    dout = rng.standard_normal((2, 4, 4, 2))
    grads = reference.attention_backward(dout, q, k, v, scale=0.9, **options)

    def loss(*inputs):
        return np.sum(dout * reference.attention(*inputs, scale=0.9, **options)[0])

    step = 1e-6
    for which, grad in enumerate(grads):
        inputs = [q, k, v]
        numeric = np.zeros_like(inputs[which])
        for index in np.ndindex(numeric.shape):
            plus, minus = [x.copy() for x in inputs], [x.copy() for x in inputs]
            plus[which][index] += step
            minus[which][index] -= step
            numeric[index] = (loss(*plus) - loss(*minus)) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_options_reach_the_back_end_in_the_spec(monkeypatch, rng):
    seen = []

    def forward(q, k, v, out, lse, spec):
        seen.append(spec)
        out[...] = 0
        lse[...] = 0

    monkeypatch.setattr(cpu, "forward", forward)
    q, k, v = qkv(rng, (2, 4, 10, 8), (2, 2, 12, 8), (2, 2, 12, 8))
    slopes = np.arange(4, dtype=np.float32)
    cuflash.attention(q, k, v, causal=True, window=[3, np.int64(5)], softcap=np.float32(7),
                      alibi_slopes=slopes, scale=0.5)
    (spec,) = seen
    assert spec.window == (3, 5) and type(spec.window[1]) is int
    assert spec.band() == (3, 0) and spec.banded and spec.has_window
    assert spec.softcap == 7.0 and spec.has_softcap and spec.score_modified
    assert spec.scale == 0.5 and spec.causal and not spec.deterministic
    assert spec.alibi.shape == (2, 4) and spec.alibi.dtype == np.float32
    assert spec.alibi.flags.c_contiguous and not np.shares_memory(spec.alibi, slopes)
    np.testing.assert_array_equal(spec.alibi, np.broadcast_to(slopes, (2, 4)))
    assert spec.kernel_band() == (3, 0)
    assert "window=(3, 5)" in spec.describe() and "softcap=7" in spec.describe()
