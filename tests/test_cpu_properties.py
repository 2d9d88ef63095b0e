"""Random shapes and options (hypothesis) for the NumPy path, checked against the oracle."""

import math

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import assert_backward_close, assert_forward_close, random_array
from random_problems import grouped_shapes, stable_for_16_bits

import cuflash

DTYPES = st.sampled_from([np.float16, ml_dtypes.bfloat16, np.float32])
HEAD_DIMS = st.sampled_from([1, 3, 8, 16, 24, 32, 64, 80, 128])
# With D < 8 and the default scale 1/sqrt(D), scores reach ~10 and float32 gradients grow to
# ~10–40, where the float32 rounding of the base-2 exponent S·scale·log2(e) − lse·log2(e) can pass
# the rule's bound; test_cpu_backward covers such D with a smaller scale.
BACKWARD_HEAD_DIMS = st.sampled_from([8, 16, 24, 32, 64, 80, 128])
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, head_dims=HEAD_DIMS):
    """Shapes of q, k, v with broadcast leading axes and grouped heads, plus options."""
    shapes = draw(grouped_shapes(head_dims, max_length=260))
    d = shapes["q_shape"][-1]
    causal = draw(st.booleans())
    dtype = draw(DTYPES)
    if not stable_for_16_bits(**shapes, causal=causal):
        dtype = np.float32
    return dict(
        **shapes,
        dtype=dtype,
        causal=causal,
        # Around the default 1/sqrt(D): much larger scales make |scores| and lse so large that
        # the float32 rounding of the base-2 exponent, S·scale·log2(e) − lse·log2(e), outgrows
        # the rule's bound for float32 gradients.
        scale=draw(st.none() | st.floats(0.25, 2.0).map(lambda f: f / math.sqrt(d))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_inputs(problem):
    rng = np.random.default_rng(problem["seed"])
    return tuple(random_array(rng, problem[name], problem["dtype"])
                 for name in ("q_shape", "k_shape", "v_shape"))


@SETTINGS
@given(problems())
def test_forward(problem):
    q, k, v = make_inputs(problem)
    causal, scale = problem["causal"], problem["scale"]
    out, lse = cuflash.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    assert_forward_close(out, lse, q, k, v, causal=causal, scale=scale, context=str(problem))


@SETTINGS
@given(problems(head_dims=BACKWARD_HEAD_DIMS))
def test_backward(problem):
    q, k, v = make_inputs(problem)
    causal, scale = problem["causal"], problem["scale"]
    out, vjp = cuflash.attention_vjp(q, k, v, causal=causal, scale=scale)
    dout = random_array(np.random.default_rng(problem["seed"] + 1), out.shape, problem["dtype"])
    assert_backward_close(vjp(dout), dout, q, k, v, causal=causal, scale=scale,
                          context=str(problem))


@SETTINGS
@given(problems())
def test_rows_are_convex_combinations_of_values(problem):
    # Each output row is a weighted mean of value rows: it lies within their range (up to the
    # rounding of the output), and lse is at least the largest attended scaled score.
    q, k, v = make_inputs(problem)
    q, k, v = q[..., :1, :, :], k[..., :1, :, :], v[..., :1, :, :]  # one (group of) head(s)
    out, lse = cuflash.attention(q, k, v, scale=problem["scale"], return_lse=True)
    values = np.broadcast_to(v.astype(np.float32), np.broadcast_shapes(v.shape, out.shape[:-2]
                                                                       + v.shape[-2:]))
    low = values.min(axis=-2, keepdims=True)
    high = values.max(axis=-2, keepdims=True)
    tol = 4 * float(ml_dtypes.finfo(problem["dtype"]).eps) * np.maximum(np.abs(low), np.abs(high))
    o = out.astype(np.float32)
    assert np.all(o >= low - tol) and np.all(o <= high + tol), problem
    scale = problem["scale"] or 1 / np.sqrt(q.shape[-1])
    scores = scale * (q.astype(np.float64) @ np.swapaxes(k.astype(np.float64), -1, -2))
    assert np.all(lse >= scores.max(axis=-1) - 1e-4 * (1 + np.abs(scores).max())), problem


# ----------------------------------------------------------------------------- options together

ODD_LENGTHS = st.sampled_from([1, 2, 17, 129, 130])  # one token, tile edges (128) and past them
WINDOW_SIDES = st.sampled_from([-1, 0, 3, 200, 2**31 - 1])  # none, tight, wider than any length


def laid_out(x, layout):
    """``x`` as a view of another layout (same values): ``"contiguous"``, ``"heads-last"``
    (heads and rows swapped in memory, as a ``(B, N, H, D)`` buffer) or ``"reversed"`` (rows in
    reverse order in memory, a negative stride)."""
    if layout == "contiguous":
        return x
    if layout == "heads-last":
        view = np.empty(x.shape[:-3] + (x.shape[-2], x.shape[-3], x.shape[-1]),
                        x.dtype).swapaxes(-2, -3)
    else:
        view = np.empty(x.shape, x.dtype)[..., ::-1, :]
    view[...] = x
    return view


@st.composite
def option_problems(draw):
    """One call with several options at once: grouped heads (ratios 1 to 8), Dv != D, odd
    lengths, causal with Nq > Nk (rows without keys), windows (also wider than the sequences),
    softcap, ALiBi, and inputs and out= in strided layouts."""
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2, 4, 8]))
    nq, nk = draw(ODD_LENGTHS), draw(ODD_LENGTHS)
    d, dv = draw(st.sampled_from([8, 16, 32])), draw(st.sampled_from([8, 16, 24]))
    shapes = dict(q_shape=(2, hq, nq, d), k_shape=(2, hkv, nk, d), v_shape=(2, hkv, nk, dv))
    causal = draw(st.booleans())
    window = (draw(WINDOW_SIDES), draw(WINDOW_SIDES))
    dtype = draw(DTYPES)
    if not stable_for_16_bits(**shapes, causal=causal, window=window):
        dtype = np.float32
    return dict(
        **shapes, dtype=dtype, causal=causal, window=window,
        softcap=draw(st.sampled_from([0.0, 5.0])), alibi=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "heads-last", "reversed"])),
        seed=draw(st.integers(0, 2**32 - 1)))


@SETTINGS
@given(option_problems())
def test_options_together_against_the_oracle(problem):
    # Forward into a poisoned out= and backward, each by the rule; outputs and lse in their
    # dtypes; the inputs (and the slopes) as they were.
    layout = problem["layout"]
    q, k, v = (laid_out(x, layout) for x in make_inputs(problem))
    hq = q.shape[1]
    rng = np.random.default_rng(problem["seed"] + 1)
    # Small slopes: ALiBi biases of ~|slope · Nq| ≳ 10 are, like a large scale, logits so large
    # that the float32 rounding of the backward's exponent S·log2(e) − lse·log2(e) outgrows the
    # rule's bound for float32 dV when a row sees very few keys.
    slopes = (rng.uniform(0.01, 0.05, (hq,)).astype(np.float32) if problem["alibi"] else None)
    options = dict(causal=problem["causal"], window=problem["window"],
                   softcap=problem["softcap"], alibi_slopes=slopes)
    before = [x.copy() for x in (q, k, v)] + ([] if slopes is None else [slopes.copy()])

    out = laid_out(np.full(q.shape[:-1] + v.shape[-1:], np.nan, q.dtype), layout)
    got, lse = cuflash.attention(q, k, v, **options, return_lse=True, out=out)
    assert got is out, problem
    assert lse.dtype == np.float32 and lse.shape == q.shape[:-1], problem
    assert_forward_close(out, lse, q, k, v, **options, context=str(problem))

    dout = laid_out(random_array(rng, out.shape, q.dtype), layout)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **options)
    assert_backward_close(grads, dout, q, k, v, **options, out=out, context=str(problem))
    after = [q, k, v] + ([] if slopes is None else [slopes])
    for x, copy in zip(after, before):
        np.testing.assert_array_equal(x, copy, err_msg=str(problem))
