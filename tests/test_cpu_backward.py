"""cuflash.attention_backward / attention_vjp on NumPy arrays against the float64 oracle."""

from functools import partial

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import assert_backward_close, poisoned, random_array, to_host
from test_cpu_forward import DTYPE_IDS, DTYPES, batch_and_heads, dense_block_mask

import cuflash
from cuflash import _dropout

BF16 = ml_dtypes.bfloat16


def problem(rng, q_shape, k_shape, v_shape, dtype, *, causal=False, block_mask=None,
            scale=None):
    """Inputs, the forward results and an output gradient of the broadcast output shape."""
    q, k, v = (random_array(rng, shape, dtype) for shape in (q_shape, k_shape, v_shape))
    out, lse = cuflash.attention(q, k, v, causal=causal, block_mask=block_mask, scale=scale,
                                 return_lse=True)
    dout = random_array(rng, out.shape, dtype)
    return dout, q, k, v, out, lse


LENGTHS = [(1, 1), (17, 17), (127, 127), (1000, 1000), (17, 300), (300, 17), (127, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("nq, nk", LENGTHS)
def test_matches_oracle(rng, seed, dtype, causal, nq, nk):
    b, hq, hkv = batch_and_heads(nq, nk)
    dout, q, k, v, out, lse = problem(rng, (b, hq, nq, 64), (b, hkv, nk, 64), (b, hkv, nk, 64),
                                      dtype, causal=causal)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)
    assert_backward_close(grads, dout, q, k, v, causal=causal, context=f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hkv", [1, 2, 8], ids=["mqa", "gqa", "mha"])
def test_grouped_query_heads_sum_into_dk_dv(rng, seed, dtype, hkv):
    dout, q, k, v, out, lse = problem(rng, (2, 8, 65, 32), (2, hkv, 90, 32), (2, hkv, 90, 32),
                                      dtype, causal=True)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert_backward_close(grads, dout, q, k, v, causal=True, context=f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_broadcast_inputs_get_summed_gradients(rng, seed, dtype):
    dout, q, k, v, out, lse = problem(rng, (2, 3, 4, 40, 32), (3, 2, 50, 32), (1, 1, 2, 50, 16),
                                      dtype)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse)
    assert [g.shape for g in grads] == [(2, 3, 4, 40, 32), (3, 2, 50, 32), (1, 1, 2, 50, 16)]
    assert all(g.dtype == q.dtype for g in grads)
    assert_backward_close(grads, dout, q, k, v, context=f"seed={seed}")


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_broadcast_gradients_are_rounded_once(rng, seed, dtype):
    """The gradient of an input broadcast along the batch is the float32 sum of the batch's
    float32 gradients, rounded once: what the same call with the batch materialised and
    float32 gradients gives, summed. (Summing rounded per-batch gradients rounds twice, and once
    broke the accuracy rule for dv of a value shared by a batch of 2.)"""
    dout, q, k, v, out, lse = problem(rng, (2, 3, 169, 32), (2, 3, 83, 32), (3, 83, 16), dtype,
                                      causal=True)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    full = cuflash.attention_backward(dout, q, k, np.broadcast_to(v, (2,) + v.shape), out, lse,
                                      causal=True, grad_dtype=np.float32)
    assert grads[2].dtype == dtype
    np.testing.assert_array_equal(grads[2], full[2].sum(axis=0, dtype=np.float32).astype(dtype))
    np.testing.assert_array_equal(grads[0], full[0].astype(dtype))
    assert_backward_close(grads, dout, q, k, v, causal=True, context=f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_value_dim_and_scale(rng, seed, dtype):
    dout, q, k, v, out, lse = problem(rng, (2, 4, 70, 48), (2, 4, 60, 48), (2, 4, 60, 80), dtype,
                                      scale=0.2)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, scale=0.2)
    assert_backward_close(grads, dout, q, k, v, scale=0.2, context=f"seed={seed}")


@pytest.mark.parametrize("d", [1, 3, 300])
def test_any_head_dim(rng, seed, d):
    # scale 0.25 keeps the scores of D = 1 small; see test_cpu_properties.BACKWARD_HEAD_DIMS.
    dout, q, k, v, out, lse = problem(rng, (2, 4, 33, d), (2, 4, 45, d), (2, 4, 45, d),
                                      np.float32, causal=True, scale=0.25)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, scale=0.25)
    assert_backward_close(grads, dout, q, k, v, causal=True, scale=0.25, context=f"seed={seed}")


def test_strided_inputs(rng, seed):
    dtype = np.float16
    qb, kb, vb = (random_array(rng, shape, dtype)
                  for shape in ((2, 70, 4, 64), (2, 90, 2, 64), (2, 90, 2, 128)))
    q, k, v = qb.transpose(0, 2, 1, 3), kb.transpose(0, 2, 1, 3), vb.transpose(0, 2, 1, 3)[..., ::2]
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    dout = random_array(rng, (2, 70, 4, 64), dtype).transpose(0, 2, 1, 3)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    assert_backward_close(grads, dout, q, k, v, causal=True, context=f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fully_masked_rows_have_zero_gradient(rng, seed, dtype):
    dout, q, k, v, out, lse = problem(rng, (2, 4, 200, 64), (2, 4, 80, 64), (2, 4, 80, 64),
                                      dtype, causal=True)
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    assert np.all(dq[:, :, :120].astype(np.float32) == 0)
    assert_backward_close((dq, dk, dv), dout, q, k, v, causal=True, context=f"seed={seed}")


def test_block_mask(rng, seed):
    nq, nk, hq = 100, 150, 4
    blocks = rng.random((hq, 4, 4)) < 0.5
    blocks[:, :, 0] = True
    blocks[:, :, 3] = False  # key block 3 is never attended: its dk, dv are 0
    mask = dense_block_mask(blocks, (nq, nk), (32, 48))
    dout, q, k, v, out, lse = problem(rng, (2, hq, nq, 32), (2, 2, nk, 32), (2, 2, nk, 32),
                                      ml_dtypes.bfloat16, causal=True, block_mask=mask)
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, block_mask=mask)
    assert np.all(dk[:, :, 144:].astype(np.float32) == 0)
    assert np.all(dv[:, :, 144:].astype(np.float32) == 0)
    assert_backward_close((dq, dk, dv), dout, q, k, v, causal=True, block_mask=mask,
                          context=f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_vjp_equals_attention_then_backward(rng, dtype):
    q, k, v = (random_array(rng, (2, 4, 77, 32), dtype) for _ in range(3))
    out, vjp = cuflash.attention_vjp(q, k, v, causal=True, scale=0.5)
    dout = random_array(rng, out.shape, dtype)
    expected_out, lse = cuflash.attention(q, k, v, causal=True, scale=0.5, return_lse=True)
    expected = cuflash.attention_backward(dout, q, k, v, expected_out, lse, causal=True,
                                          scale=0.5)
    np.testing.assert_array_equal(out, expected_out)
    for got, want in zip(vjp(dout), expected):
        np.testing.assert_array_equal(got, want)


def test_deterministic_flag_gives_the_same_bits(rng):
    dout, q, k, v, out, lse = problem(rng, (2, 4, 300, 32), (2, 2, 300, 32), (2, 2, 300, 32),
                                      np.float16)
    first = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True)
    second = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=False)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float16, BF16])
def test_float32_gradients_are_the_unrounded_default(rng, dtype):
    dout, q, k, v, out, lse = problem(rng, (1, 4, 77, 32), (1, 2, 93, 32), (1, 2, 93, 24), dtype)
    narrow = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    wide = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True,
                                      grad_dtype=np.float32)
    for w, n in zip(wide, narrow):
        assert w.dtype == np.float32
        assert not np.array_equal(w, w.astype(dtype).astype(np.float32))  # really unrounded
        np.testing.assert_array_equal(w.astype(dtype), n)
    same = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, grad_dtype=dtype)
    for s, n in zip(same, narrow):
        np.testing.assert_array_equal(s, n)


@pytest.mark.parametrize("bad", [np.float64, "int32", np.float16, "no such dtype"])
def test_grad_dtype_other_than_float32_is_refused(rng, bad):
    dout, q, k, v, out, lse = problem(rng, (1, 2, 16, 32), (1, 2, 16, 32), (1, 2, 16, 32),
                                      BF16)
    with pytest.raises(ValueError, match="grad_dtype"):
        cuflash.attention_backward(dout, q, k, v, out, lse, grad_dtype=bad)


@pytest.mark.parametrize("bad", [5, True, 1.5, [np.float32]])
def test_grad_dtype_that_is_no_dtype_is_a_type_error(rng, bad):
    dout, q, k, v, out, lse = problem(rng, (1, 2, 16, 32), (1, 2, 16, 32), (1, 2, 16, 32),
                                      BF16)
    with pytest.raises(TypeError, match="grad_dtype must be None, a dtype or a dtype's name"):
        cuflash.attention_backward(dout, q, k, v, out, lse, grad_dtype=bad)


# ----------------------------------------------------------------------------- dq=, dk=, dv=

GRAD_LAYOUTS = ["contiguous", "transposed", "strided", "reversed"]


def grad_buffer(shape, dtype, layout, *, xp=np):
    """A NaN-filled array of ``shape`` to give as a gradient, laid out as ``layout``:
    C-contiguous; "transposed", heads and rows swapped in memory (``torch.empty_like`` of a
    (B, N, H, D) tensor seen as (B, H, N, D), at least 3-D); or, written through a temporary,
    "strided" (every other element of a wider last axis) or "reversed" (rows backwards)."""
    if layout == "transposed":
        return poisoned(shape[:-3] + (shape[-2], shape[-3], shape[-1]), dtype,
                        xp=xp).swapaxes(-2, -3)
    if layout == "strided":
        return poisoned(shape[:-1] + (2 * shape[-1],), dtype, xp=xp)[..., ::2]
    full = poisoned(shape, dtype, xp=xp)
    return full[..., ::-1, :] if layout == "reversed" else full


def assert_given_grads_written(backward, given):
    """``backward()`` (a backward call of the API) given ``given`` (dq, dk, dv; None where not
    given) returns the given arrays themselves, holding bit for bit the gradients of the call
    without them, and writes nothing beside them (the rest of a "strided" buffer stays NaN)."""
    expected = backward()
    got = backward(**dict(zip(("dq", "dk", "dv"), given)))
    for name, grad, want, buffer in zip(("dq", "dk", "dv"), got, expected, given):
        if buffer is not None:
            assert grad is buffer, name
            if buffer.base is not None and buffer.base.shape[-1] == 2 * buffer.shape[-1]:
                assert np.isnan(to_host(buffer.base[..., 1::2])).all(), name
        assert grad.shape == want.shape and grad.dtype == want.dtype, name
        np.testing.assert_array_equal(np.ascontiguousarray(to_host(grad)).view(np.uint8),
                                      np.ascontiguousarray(to_host(want)).view(np.uint8),
                                      err_msg=name)
    return got


@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_given_gradients_are_written_and_returned(rng, seed, dtype, layout):
    dout, q, k, v, out, lse = problem(rng, (2, 4, 70, 32), (2, 2, 90, 32), (2, 2, 90, 48), dtype,
                                      causal=True)  # grouped heads, Dv != D
    given = tuple(grad_buffer(x.shape, dtype, layout) for x in (q, k, v))
    grads = assert_given_grads_written(
        partial(cuflash.attention_backward, dout, q, k, v, out, lse, causal=True), given)
    assert_backward_close(grads, dout, q, k, v, causal=True, context=f"seed={seed}")


@pytest.mark.parametrize("names", [("dq",), ("dk",), ("dv",), ("dq", "dv"), ("dk", "dv")])
def test_any_of_the_gradients_may_be_given(rng, names):
    dout, q, k, v, out, lse = problem(rng, (2, 4, 40, 32), (2, 4, 50, 32), (2, 4, 50, 32), BF16)
    given = tuple(grad_buffer(x.shape, BF16, "transposed") if name in names else None
                  for name, x in zip(("dq", "dk", "dv"), (q, k, v)))
    assert_given_grads_written(
        partial(cuflash.attention_backward, dout, q, k, v, out, lse, window=(8, 8)), given)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "reversed"])
def test_given_gradients_of_broadcast_inputs_hold_the_sums(rng, layout):
    dout, q, k, v, out, lse = problem(rng, (2, 3, 4, 40, 32), (3, 2, 50, 32), (1, 1, 2, 50, 16),
                                      np.float16)
    given = tuple(grad_buffer(x.shape, np.float16, layout) for x in (q, k, v))
    assert_given_grads_written(partial(cuflash.attention_backward, dout, q, k, v, out, lse),
                               given)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_given_gradients_of_2d_inputs(rng, layout):
    dout, q, k, v, out, lse = problem(rng, (40, 16), (50, 16), (50, 24), np.float32)
    given = tuple(grad_buffer(x.shape, np.float32, layout) for x in (q, k, v))
    assert_given_grads_written(
        partial(cuflash.attention_backward, dout, q, k, v, out, lse, causal=True), given)


def test_given_float32_gradients(rng):
    dout, q, k, v, out, lse = problem(rng, (1, 4, 77, 32), (1, 2, 93, 32), (1, 2, 93, 24), BF16)
    given = tuple(grad_buffer(x.shape, np.float32, "transposed") for x in (q, k, v))
    assert_given_grads_written(
        partial(cuflash.attention_backward, dout, q, k, v, out, lse, grad_dtype=np.float32), given)


# ----------------------------------------------------------------------------- against derivatives

def attention64(q, k, v, *, scale, causal, window, softcap, slopes, dropout):
    """float64 attention ``(B, Hq, Nq, Dv)`` written from flash-attn's documented semantics
    alone (not ``cuflash._mask`` or ``cuflash.reference``, which the oracle shares with the
    NumPy path): logit ``scale·q·k``, then ``softcap·tanh(x / softcap)``, then
    ``− slope·|i + Nk − Nq − j|``; query ``i`` sees key ``j`` when
    ``i + Nk − Nq − left ≤ j ≤ i + Nk − Nq + right`` (causal: ``right = min(right, 0)``);
    ``dropout``: ``None`` or ``(keep, factor)``, the kept elements of P and their factor."""
    hq, nq, hkv, nk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    k, v = (np.repeat(x, hq // hkv, axis=1) for x in (k, v))
    x = scale * (q @ k.swapaxes(-1, -2))
    if softcap:
        x = softcap * np.tanh(x / softcap)
    i, j = np.arange(nq)[:, None] + nk - nq, np.arange(nk)[None, :]
    if slopes is not None:
        x = x - slopes[:, None, None] * np.abs(i - j)
    left, right = window
    if causal:
        right = 0 if right == -1 else min(right, 0)
    seen = ((j >= i - left) | (left == -1)) & ((j <= i + right) | (right == -1))
    x = np.where(seen, x, -np.inf)
    peak = x.max(axis=-1, keepdims=True)
    p = np.exp(x - np.where(np.isfinite(peak), peak, 0))
    total = p.sum(axis=-1, keepdims=True)
    p = p / np.where(total == 0, 1, total)
    if dropout is not None:
        keep, factor = dropout
        p = np.where(keep, p * factor, 0)
    return p @ v


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       nq=st.sampled_from([1, 2, 17, 40]), nk=st.sampled_from([1, 2, 17, 40]),
       d=st.sampled_from([4, 16]), dv=st.sampled_from([4, 12]), causal=st.booleans(),
       window=st.tuples(st.sampled_from([-1, 0, 3, 100]), st.sampled_from([-1, 0, 3, 100])),
       softcap=st.sampled_from([0.0, 0.7, 5.0]), alibi=st.booleans(),
       dropout_p=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**32 - 1))
def test_gradients_are_the_derivatives_of_the_documented_attention(
        hkv, group, nq, nk, d, dv, causal, window, softcap, alibi, dropout_p, seed):
    # Directional derivatives of sum(dout · attention64) by central differences in float64
    # against the float32 gradients, for every option at once: a wrong factor or sign (the
    # softcap's 1 − tanh², a head group's sum, the dropout mask) is off by far more than float32
    # rounding, which stays below ~1e-6 of |direction|·(1 + max|gradient|).
    rng = np.random.default_rng(seed)
    hq = hkv * group
    q, k, v = (rng.standard_normal(shape).astype(np.float32)
               for shape in ((2, hq, nq, d), (2, hkv, nk, d), (2, hkv, nk, dv)))
    slopes = rng.uniform(0.05, 0.5, hq).astype(np.float32) if alibi else None
    options = dict(scale=0.5, causal=causal, window=window, softcap=softcap, alibi_slopes=slopes,
                   dropout_p=dropout_p, dropout_seed=seed if dropout_p else None)
    out, lse = cuflash.attention(q, k, v, **options, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **options)

    dropout = None
    if dropout_p:
        keep = _dropout.dense_keep(seed, 0, dropout_p, (2,), hq, np.arange(nq), nk)
        dropout = (keep, _dropout.rescale(dropout_p))

    def loss(q, k, v):
        return float((dout * attention64(q, k, v, scale=0.5, causal=causal, window=window,
                                         softcap=softcap, dropout=dropout,
                                         slopes=None if slopes is None else
                                         slopes.astype(np.float64))).sum())

    inputs = [x.astype(np.float64) for x in (q, k, v)]
    step = 1e-5
    for index, (name, grad) in enumerate(zip(("dq", "dk", "dv"), grads)):
        direction = rng.standard_normal(inputs[index].shape)
        ahead, behind = list(inputs), list(inputs)
        ahead[index] = inputs[index] + step * direction
        behind[index] = inputs[index] - step * direction
        expected = (loss(*ahead) - loss(*behind)) / (2 * step)
        got = float((grad.astype(np.float64) * direction).sum())
        size = np.linalg.norm(direction) * (1 + np.abs(grad).max())
        assert abs(got - expected) <= 1e-5 * size, (name, got, expected, seed)
