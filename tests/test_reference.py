"""The oracle itself: cuflash.reference against independent formulas and finite differences."""

import ml_dtypes
import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from test_cpu_forward import DenseBlockMask

from cuflash import reference


def random64(rng, *shapes):
    return tuple(rng.standard_normal(shape) for shape in shapes)


def loop_attention(q, k, v, scale, keep):
    """Attention one (batch, head) at a time with SciPy's softmax; q, k, v are 4-D."""
    b, hq, nq, _ = q.shape
    group = hq // k.shape[1]
    out = np.zeros((b, hq, nq, v.shape[-1]))
    lse = np.full((b, hq, nq), -np.inf)
    for i in range(b):
        for h in range(hq):
            s = scale * q[i, h] @ k[i, h // group].T
            s = np.where(keep, s, -np.inf)
            for row in range(nq):
                if keep[row].any():
                    out[i, h, row] = softmax(s[row]) @ v[i, h // group]
                    lse[i, h, row] = logsumexp(s[row])
    return out, lse


@pytest.mark.parametrize("nq, nk", [(7, 7), (3, 9), (9, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_loops(rng, nq, nk, causal):
    q, k, v = random64(rng, (2, 4, nq, 5), (2, 2, nk, 5), (2, 2, nk, 3))
    keep = np.ones((nq, nk), bool)
    if causal:
        keep = np.tril(keep, k=nk - nq)  # bottom-right aligned
    out, lse = reference.attention(q, k, v, causal=causal, scale=0.7)
    want_out, want_lse = loop_attention(q, k, v, 0.7, keep)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)],
                               rtol=1e-12, atol=1e-12)


def test_causal_masks_the_first_rows_when_queries_outnumber_keys(rng):
    q, k, v = random64(rng, (1, 5, 4), (1, 2, 4), (1, 2, 4))
    out, lse = reference.attention(q, k, v, causal=True)
    assert np.all(out[0, :3] == 0) and np.all(np.isneginf(lse[0, :3]))
    assert np.isfinite(lse[0, 3:]).all()
    np.testing.assert_allclose(out[0, 3], v[0, 0])  # row 3 sees key 0 only


def test_element_mask_broadcasts(rng):
    q, k, v = random64(rng, (2, 3, 6, 4), (2, 3, 8, 4), (2, 3, 8, 4))
    mask = rng.random((3, 1, 8)) < 0.5  # per head, the same for every query
    out, _ = reference.attention(q, k, v, mask=mask)
    full, _ = reference.attention(q, k, v, mask=np.broadcast_to(mask, (2, 3, 6, 8)))
    np.testing.assert_array_equal(out, full)


def finite_difference_grads(dout, q, k, v, *, causal, scale, step=1e-6):
    def loss(q_, k_, v_):
        return np.sum(dout * reference.attention(q_, k_, v_, causal=causal, scale=scale)[0])

    grads = []
    for which in range(3):
        inputs = [q.copy(), k.copy(), v.copy()]
        grad = np.zeros_like(inputs[which])
        for index in np.ndindex(grad.shape):
            plus = [x.copy() for x in inputs]
            minus = [x.copy() for x in inputs]
            plus[which][index] += step
            minus[which][index] -= step
            grad[index] = (loss(*plus) - loss(*minus)) / (2 * step)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("causal", [False, True])
def test_backward_matches_finite_differences(rng, causal):
    # Broadcast batch (k), grouped heads (4 query heads, 2 key/value heads), Nq < Nk, Dv != D.
    q, k, v = random64(rng, (2, 4, 3, 4), (1, 2, 5, 4), (2, 2, 5, 3))
    dout = rng.standard_normal((2, 4, 3, 3))
    grads = reference.attention_backward(dout, q, k, v, causal=causal, scale=0.8)
    expected = finite_difference_grads(dout, q, k, v, causal=causal, scale=0.8)
    for got, want, x in zip(grads, expected, (q, k, v)):
        assert got.shape == x.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_equals_dense(rng, causal):
    q, k, v = random64(rng, (2, 2, 37, 8), (2, 1, 29, 8), (2, 1, 29, 6))
    out, lse = reference.attention(q, k, v, causal=causal)
    chunked_out, chunked_lse = reference.chunked_attention(q, k, v, causal=causal, chunk=5)
    np.testing.assert_allclose(chunked_out, out, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(chunked_lse, lse, rtol=1e-13, atol=1e-13)

    rows = [36, 0, 11, 12]
    part_out, part_lse = reference.chunked_attention(q, k, v, causal=causal, rows=rows, chunk=3)
    np.testing.assert_allclose(part_out, out[..., rows, :], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(part_lse, lse[..., rows], rtol=1e-13, atol=1e-13)


def test_chunked_with_block_mask(rng):
    blocks = rng.random((3, 3, 2)) < 0.6
    mask = DenseBlockMask(blocks, (20, 13), (8, 7))
    q, k, v = random64(rng, (2, 3, 20, 4), (2, 3, 13, 4), (2, 3, 13, 4))
    element = reference.block_mask_to_element_mask(mask, 20, 13)
    assert element.shape == (3, 20, 13) and element.dtype == bool
    np.testing.assert_array_equal(element[:, 8:16, 7:13], np.repeat(blocks[:, 1:2, 1:2], 8, 1)
                                  .repeat(6, 2))
    out, lse = reference.attention(q, k, v, mask=element & np.tril(np.ones((20, 13), bool), -7))
    chunked_out, chunked_lse = reference.chunked_attention(q, k, v, causal=True, block_mask=mask,
                                                           chunk=6)
    np.testing.assert_allclose(chunked_out, out, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(chunked_lse, lse, rtol=1e-13, atol=1e-13)


def test_chunked_rejects_rows_out_of_range(rng):
    q, k, v = random64(rng, (1, 4, 2), (1, 4, 2), (1, 4, 2))
    with pytest.raises(ValueError, match=r"rows must be a 1-D sequence of query rows in \[0, 4\)"):
        reference.chunked_attention(q, k, v, rows=[4])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_naive_is_close_but_not_exact(rng, dtype):
    q, k, v = (x.astype(dtype) for x in random64(rng, (2, 2, 50, 16), (2, 2, 60, 16),
                                                 (2, 2, 60, 16)))
    out, lse = reference.naive_attention(q, k, v, causal=True)
    assert out.dtype == dtype and lse.dtype == np.float32
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    eps = float(ml_dtypes.finfo(dtype).eps)
    error = np.abs(out.astype(np.float64) - ref_out).max()
    assert 0 < error < 50 * eps
    assert 0 < np.abs(lse - ref_lse).max() < 50 * eps * np.abs(ref_lse).max()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_naive_backward_is_close(rng, dtype):
    q, k, v = (x.astype(dtype) for x in random64(rng, (2, 4, 30, 16), (1, 2, 40, 16),
                                                 (1, 2, 40, 8)))
    dout = rng.standard_normal((2, 4, 30, 8)).astype(dtype)
    grads = reference.naive_attention_backward(dout, q, k, v, causal=True)
    refs = reference.attention_backward(dout, q, k, v, causal=True)
    eps = float(ml_dtypes.finfo(dtype).eps)
    for got, ref, x in zip(grads, refs, (q, k, v)):
        assert got.shape == x.shape and got.dtype == dtype
        scale = np.abs(ref).max()
        assert np.abs(got.astype(np.float64) - ref).max() < 100 * eps * scale
