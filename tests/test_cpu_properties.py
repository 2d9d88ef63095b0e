"""Random shapes and options (hypothesis) for the NumPy path, checked against the oracle."""

import math

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from oracle import assert_backward_close, assert_forward_close, random_array

import cuflash

DTYPES = st.sampled_from([np.float16, ml_dtypes.bfloat16, np.float32])
HEAD_DIMS = st.sampled_from([8, 16, 24, 32, 64, 80, 128])
MIN_ELEMENTS = 512
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@st.composite
def problems(draw, min_keys=1):
    """Shapes of q, k, v with broadcast leading axes and grouped heads, plus options."""
    batch = draw(st.lists(st.integers(1, 3), max_size=2))

    def leading():  # each input drops or broadcasts some of the batch axes
        kept = batch[draw(st.integers(0, len(batch))):]
        return [n if draw(st.booleans()) else 1 for n in kept]

    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    nq, nk = draw(st.integers(1, 260)), draw(st.integers(min_keys, 260))
    d, dv = draw(HEAD_DIMS), draw(HEAD_DIMS)
    # The rule compares maxima over a result; keep every result large enough for that.
    b = math.prod(batch)
    assume(b * hq * nq * min(d, dv) >= MIN_ELEMENTS and b * hkv * nk * min(d, dv) >= MIN_ELEMENTS)
    return dict(
        q_shape=tuple(leading()) + (hq, nq, d),
        k_shape=tuple(leading()) + (hkv, nk, d),
        v_shape=tuple(leading()) + (hkv, nk, dv),
        dtype=draw(DTYPES),
        causal=draw(st.booleans()),
        scale=draw(st.none() | st.floats(0.05, 2.0)),
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


# At least two keys: with a single key every probability is exactly 1, so the naive result's
# dS = P∘(dP − rowsum(dP∘P)) is exactly 0 and leaves the rule no room for the float32 rounding
# of Δ = rowsum(dO∘O) that the tiled algorithm (like the kernels) sums over all query rows.
@SETTINGS
@given(problems(min_keys=2))
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
    tol = 2 * float(ml_dtypes.finfo(problem["dtype"]).eps) * np.maximum(np.abs(low), np.abs(high))
    o = out.astype(np.float32)
    assert np.all(o >= low - tol) and np.all(o <= high + tol), problem
    scale = problem["scale"] or 1 / np.sqrt(q.shape[-1])
    scores = scale * (q.astype(np.float64) @ np.swapaxes(k.astype(np.float64), -1, -2))
    assert np.all(lse >= scores.max(axis=-1) - 1e-4 * (1 + np.abs(scores).max())), problem
