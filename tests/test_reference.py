"""The oracle itself: cuflash.reference against independent formulas and finite differences."""

import ml_dtypes
import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from test_cpu_forward import dense_block_mask

import cuflash
from cuflash import reference


def random64(rng, *shapes):
    return tuple(rng.standard_normal(shape) for shape in shapes)


def loop_attention(q, k, v, scale, keep, softcap=0.0, slopes=None):
    """Attention one (batch, head) at a time with SciPy's softmax; q, k, v are 4-D, slopes
    ``(B, Hq)``. The score modifier is written out element by element."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    group = hq // k.shape[1]
    out = np.zeros((b, hq, nq, v.shape[-1]))
    lse = np.full((b, hq, nq), -np.inf)
    for i in range(b):
        for h in range(hq):
            s = scale * q[i, h] @ k[i, h // group].T
            if softcap:
                s = softcap * np.tanh(s / softcap)
            if slopes is not None:
                for row in range(nq):
                    for col in range(nk):
                        s[row, col] -= float(slopes[i, h]) * abs(row + nk - nq - col)
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


def window_keep(nq, nk, left, right):
    """The window's definition, one pair at a time."""
    keep = np.ones((nq, nk), bool)
    for i in range(nq):
        for j in range(nk):
            if left >= 0 and j < i + nk - nq - left:
                keep[i, j] = False
            if right >= 0 and j > i + nk - nq + right:
                keep[i, j] = False
    return keep


@pytest.mark.parametrize("nq, nk", [(7, 7), (3, 9), (9, 3)])
@pytest.mark.parametrize("window, causal", [((2, 1), False), ((-1, 0), False), ((1, -1), True),
                                            ((0, 0), False), ((3, 4), True)])
@pytest.mark.parametrize("softcap, alibi", [(0.0, False), (1.5, False), (0.0, True),
                                            (2.0, True)], ids=["plain", "softcap", "alibi",
                                                               "softcap-alibi"])
def test_features_match_loops(rng, nq, nk, window, causal, softcap, alibi):
    q, k, v = random64(rng, (2, 4, nq, 5), (2, 2, nk, 5), (2, 2, nk, 3))
    keep = window_keep(nq, nk, window[0], min(window[1], 0) if causal and window[1] >= 0
                       else (0 if causal else window[1]))
    slopes = rng.uniform(0, 1, (2, 4)).astype(np.float32) if alibi else None
    out, lse = reference.attention(q, k, v, causal=causal, window=window, softcap=softcap,
                                   alibi_slopes=slopes, scale=0.7)
    want_out, want_lse = loop_attention(q, k, v, 0.7, keep, softcap, slopes)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)],
                               rtol=1e-12, atol=1e-12)
    # The naive same-precision attention applies the same options.
    naive, naive_lse = reference.naive_attention(q.astype(np.float32), k.astype(np.float32),
                                                 v.astype(np.float32), causal=causal,
                                                 window=window, softcap=softcap,
                                                 alibi_slopes=slopes, scale=0.7)
    np.testing.assert_allclose(naive, want_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.isneginf(naive_lse), np.isneginf(want_lse))


def test_two_dimensional_inputs(rng):
    q, k, v = random64(rng, (6, 4), (8, 4), (8, 3))
    options = dict(window=(2, 1), softcap=3.0, alibi_slopes=np.array([0.5], np.float32))
    out, lse = reference.attention(q, k, v, **options)
    assert out.shape == (6, 3) and lse.shape == (6,)
    head, head_lse = reference.attention(q[None], k[None], v[None], **options)
    np.testing.assert_array_equal(out, head[0])
    np.testing.assert_array_equal(lse, head_lse[0])
    dout = rng.standard_normal((6, 3))
    grads = reference.attention_backward(dout, q, k, v, **options)
    assert [g.shape for g in grads] == [(6, 4), (8, 4), (8, 3)]
    naive, naive_lse = reference.naive_attention(*(x.astype(np.float32) for x in (q, k, v)),
                                                 **options)
    assert naive.shape == (6, 3) and naive_lse.shape == (6,)


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


def reference_calls(*, dout_shape):
    """Every reference entry point that takes an element mask, as ``call(q, k, v, **options)``
    (the backward with a dout of ones)."""
    return (reference.attention, reference.naive_attention, reference.attention_probs,
            lambda *args, **options: reference.attention_backward(np.ones(dout_shape), *args,
                                                                  **options))


@pytest.mark.parametrize("stray", [2, -1])
def test_element_mask_of_integers_other_than_0_and_1_is_refused(rng, stray):
    """An integer mask holds 0 and 1, as ExactMask.from_dense's: a 2 or -1 was read as True."""
    q, k, v = random64(rng, (3, 6, 4), (3, 8, 4), (3, 8, 4))
    mask = (rng.random((6, 8)) < 0.5).astype(np.int64)
    mask[2, 3] = stray
    for call in reference_calls(dout_shape=(3, 6, 4)):
        with pytest.raises(ValueError, match=rf"mask must hold only 0 and 1, got values such "
                                             rf"as \[{stray}\]"):
            call(q, k, v, mask=mask)


@pytest.mark.parametrize("shape", [(6, 9), (7, 8), (2, 6, 8), (5, 3, 6, 8), (4, 1, 1, 1, 8)])
def test_element_mask_that_does_not_broadcast_to_the_scores_is_refused(rng, shape):
    """Neither a numpy broadcasting error from inside the computation nor, for extra leading
    axes, results of another shape than the inputs give."""
    q, k, v = random64(rng, (3, 6, 4), (3, 8, 4), (3, 8, 5))
    mask = rng.random(shape) < 0.5
    for call in reference_calls(dout_shape=(3, 6, 5)):
        with pytest.raises(ValueError, match=r"mask must broadcast to the scores' shape "
                                             r"\(3, 6, 8\) \(\.\.\., Hq, Nq, Nk\)"):
            call(q, k, v, mask=mask)


@pytest.mark.parametrize("call, error, words", [
    (lambda bm: reference.keep_mask(6, 9, causal=1), TypeError, "causal must be True or False"),
    (lambda bm: reference.keep_mask(6, 9, window=(2,)), TypeError, "window must be a pair"),
    (lambda bm: reference.keep_mask(6, 9, causal=True, rows=[6]), ValueError,
     r"rows must be a 1-D sequence of query rows in \[0, 6\)"),
    (lambda bm: reference.keep_mask(6, 9, causal=True, rows=[-1]), ValueError,
     r"rows must be a 1-D sequence of query rows in \[0, 6\)"),
    (lambda bm: reference.keep_mask(6.5, 9, causal=True), TypeError, "nq must be an int"),
    (lambda bm: reference.keep_mask(6, -9, causal=True), ValueError, "nk must be at least 1"),
    (lambda bm: reference.keep_mask(6, 9, block_mask=np.ones((2, 3), bool)), TypeError,
     "block_mask must be a cuflash.sparse.BlockMask"),
    (lambda bm: reference.keep_mask(8, 9, block_mask=bm), ValueError,
     "block_mask was built for Nq=6, Nk=9, but the inputs have Nq=8, Nk=9"),
    (lambda bm: reference.block_mask_to_element_mask(bm, 6, 12), ValueError,
     "block_mask was built for Nq=6, Nk=9, but the inputs have Nq=6, Nk=12")])
def test_keep_mask_names_a_bad_argument(call, error, words):
    """Rather than a mask for rows or sizes that are not the problem's, silently."""
    from cuflash.sparse import BlockMask

    block_mask = BlockMask.from_dense(np.array([[1, 0, 1], [0, 1, 1]], bool), block_size=(3, 3),
                                      shape=(6, 9))
    with pytest.raises(error, match=words):
        call(block_mask)
    np.testing.assert_array_equal(reference.block_mask_to_element_mask(block_mask, 6, 9)[0],
                                  np.kron([[1, 0, 1], [0, 1, 1]], np.ones((3, 3))).astype(bool))


@pytest.mark.parametrize("call", [
    lambda exact: reference.keep_mask(6, 9, causal=True, block_mask=exact),
    lambda exact: reference.block_mask_to_element_mask(exact, 6, 9)])
def test_keep_mask_given_an_exact_mask_points_at_its_own_elements(call):
    """Neither function has a mask= argument to pass an ExactMask to: its elements come from
    the mask itself."""
    from cuflash.sparse import ExactMask, causal

    exact = ExactMask.from_scipy(causal(6, 9))
    with pytest.raises(TypeError, match="block_mask must be a cuflash.sparse.BlockMask") as error:
        call(exact)
    assert "mask=" not in str(error.value)
    assert "element_rows(rows)" in str(error.value)


def test_chunked_attention_given_an_exact_mask_points_at_a_call_that_takes_one(rng):
    """chunked_attention has no mask= argument: reference.attention takes an ExactMask, for
    chosen rows too."""
    from cuflash.sparse import ExactMask, causal

    q, k, v = random64(rng, (6, 4), (9, 4), (9, 4))
    exact = ExactMask.from_scipy(causal(6, 9))
    with pytest.raises(TypeError, match="block_mask must be a cuflash.sparse.BlockMask") as error:
        reference.chunked_attention(q, k, v, block_mask=exact)
    assert "pass it as mask=" not in str(error.value)
    assert "reference.attention(q, k, v, mask=..., rows=...)" in str(error.value)


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


def test_chosen_rows_with_dropout_and_an_exact_mask_are_those_of_the_whole_call(rng):
    """The module's docstring: chunked_attention takes neither mask nor dropout, and attention
    with rows= gives the chosen rows of the whole call with them (in the order given, a row
    repeated as often as named)."""
    from cuflash.sparse import ExactMask

    q, k, v = random64(rng, (2, 2, 37, 8), (2, 1, 29, 8), (2, 1, 29, 6))
    options = dict(mask=ExactMask.from_dense(rng.random((37, 29)) < 0.5), dropout_p=0.25,
                   dropout_seed=12345, dropout_offset=7)
    out, lse = reference.attention(q, k, v, **options)
    rows = [36, 0, 11, 11]
    part_out, part_lse = reference.attention(q, k, v, rows=rows, **options)
    np.testing.assert_allclose(part_out, out[..., rows, :], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(part_lse, lse[..., rows], rtol=1e-13, atol=1e-13)
    for name in ("mask", "dropout_p", "dropout_seed", "dropout_offset"):
        with pytest.raises(TypeError, match=name):
            reference.chunked_attention(q, k, v, **{name: options[name]})


@pytest.mark.parametrize("options", [dict(window=(4, 2)), dict(softcap=2.0, causal=True),
                                     dict(alibi_slopes=np.array([[0.3, 0.9]], np.float32),
                                          window=(-1, 3))],
                         ids=["window", "softcap", "alibi"])
def test_chunked_with_features_equals_dense(rng, options):
    # ALiBi depends on each row's position: chunks and chosen rows must keep it.
    q, k, v = random64(rng, (2, 2, 37, 8), (2, 1, 29, 8), (2, 1, 29, 6))
    out, lse = reference.attention(q, k, v, **options)
    chunked_out, chunked_lse = reference.chunked_attention(q, k, v, chunk=5, **options)
    np.testing.assert_allclose(chunked_out, out, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(chunked_lse, lse, rtol=1e-13, atol=1e-13)
    rows = [36, 0, 11, 12]
    part_out, part_lse = reference.chunked_attention(q, k, v, rows=rows, chunk=3, **options)
    np.testing.assert_allclose(part_out, out[..., rows, :], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(part_lse, lse[..., rows], rtol=1e-13, atol=1e-13)
    naive_rows, _ = reference.naive_attention(q, k, v, rows=rows, dtype=np.float32, **options)
    naive_all, _ = reference.naive_attention(q, k, v, dtype=np.float32, **options)
    # Not bit for bit: a float32 matmul may sum a row's products in another order when it has
    # another number of rows to tile (NumPy 2.4's BLAS does, by an ulp or so).
    np.testing.assert_allclose(naive_rows, naive_all[..., rows, :], rtol=1e-5, atol=1e-6)


def test_chunked_with_block_mask(rng):
    blocks = rng.random((3, 3, 2)) < 0.6
    mask = dense_block_mask(blocks, (20, 13), (8, 7))
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


@pytest.mark.parametrize("rows, shown", [
    (np.array([2**64 - 1], np.uint64), "18446744073709551615"),
    (np.array([3, 2**63], np.uint64), "9223372036854775808"),
    ([3, 2**63], "9223372036854775808"),  # NumPy reads these as float64
    ([2**70, 1], "1180591620717411303424")])  # past uint64: NumPy holds Python ints
def test_rows_past_int64_are_refused_as_given(rng, rows, shown):
    """Not wrapped round to a negative row by a cast to int64, nor refused as no integers."""
    from cuflash.sparse import ExactMask

    q, k, v = random64(rng, (1, 4, 2), (1, 4, 2), (1, 4, 2))
    calls = (lambda: reference.attention(q, k, v, rows=rows),
             lambda: reference.chunked_attention(q, k, v, rows=rows),
             lambda: ExactMask.from_dense(np.ones((4, 4), bool)).element_rows(rows))
    for call in calls:
        with pytest.raises(ValueError, match=rf"rows must be a 1-D sequence of query rows in "
                                             rf"\[0, 4\), got \[{shown}\]"):
            call()


@pytest.mark.parametrize("name", ["dout", "out"])
@pytest.mark.parametrize("bad, error, words", [
    ("shape", ValueError, r"must have shape \(2, 3, 5, 7\), got \(2, 3, 5, 6\)"),
    ("list", TypeError, "must be a numpy.ndarray like q, got list"),
    ("int", TypeError, "has dtype int32; the reference takes")])
def test_backward_names_a_bad_dout_or_out(rng, name, bad, error, words):
    """Not numpy's matmul or broadcasting error from inside the computation, nor an
    AttributeError for a list."""
    q, k, v = random64(rng, (2, 3, 5, 6), (2, 1, 9, 6), (1, 1, 9, 7))
    good = rng.standard_normal((2, 3, 5, 7))
    given = {"shape": rng.standard_normal((2, 3, 5, 6)), "list": good.tolist(),
             "int": good.astype(np.int32)}[bad]
    calls = [lambda x: reference.naive_attention_backward(good, q, k, v, out=x)]
    if name == "dout":
        calls = [lambda x: reference.attention_backward(x, q, k, v, causal=True),
                 lambda x: reference.naive_attention_backward(x, q, k, v)]
    for call in calls:
        with pytest.raises(error, match=f"{name} " + words):
            call(given)
    assert all(g.shape == x.shape for g, x in zip(reference.attention_backward(good, q, k, v),
                                                   (q, k, v)))


@pytest.mark.parametrize("chunk, error, words", [
    (0, ValueError, "chunk must be at least 1, got 0"),
    (-2, ValueError, "chunk must be at least 1, got -2"),
    (2.5, TypeError, "chunk must be an int"),
    (True, TypeError, "chunk must be an int")])
def test_chunked_refuses_a_bad_chunk(rng, chunk, error, words):
    q, k, v = random64(rng, (3, 5, 4), (3, 9, 4), (3, 9, 4))
    with pytest.raises(error, match=words):
        reference.chunked_attention(q, k, v, chunk=chunk)


def test_chunked_of_no_rows_is_empty(rng):
    q, k, v = random64(rng, (2, 5, 4), (2, 9, 4), (2, 9, 6))
    out, lse = reference.chunked_attention(q, k, v, rows=[], chunk=2)
    dense_out, dense_lse = reference.attention(q, k, v, rows=[])
    assert out.shape == dense_out.shape == (2, 0, 6) and lse.shape == dense_lse.shape == (2, 0)


@pytest.mark.parametrize("rows", [[1.5], [2.0], [True, False], np.array([0.9, 1.2]),
                                  [True, 2], (3, np.False_)])  # NumPy reads these as 1, 2 and 3, 0
def test_rows_that_are_not_integers_are_refused(rng, rows):
    """A float row would be truncated and a boolean one read as 0 and 1 (not as a selection):
    either way other rows than the ones meant, without a word."""
    from cuflash.sparse import ExactMask

    q, k, v = random64(rng, (2, 5, 3), (2, 7, 3), (2, 7, 3))
    for call in (reference.attention, reference.naive_attention, reference.chunked_attention,
                 reference.attention_probs):
        with pytest.raises(TypeError, match="rows must be a 1-D sequence of integer query rows"):
            call(q, k, v, rows=rows)
    with pytest.raises(TypeError, match="rows must be a 1-D sequence of integer query rows"):
        ExactMask.from_dense(rng.random((5, 7)) < 0.5).element_rows(rows)
    out, _ = reference.attention(q, k, v, rows=np.array([3, 1], np.uint8))
    np.testing.assert_array_equal(out, reference.attention(q, k, v)[0][:, [3, 1]])
    assert reference.attention(q, k, v, rows=[])[0].shape == (2, 0, 3)


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
def test_naive_with_features_is_close_but_not_exact(rng, dtype):
    q, k, v = (x.astype(dtype) for x in random64(rng, (2, 2, 50, 16), (2, 2, 60, 16),
                                                 (2, 2, 60, 16)))
    options = dict(window=(20, 3), softcap=5.0, alibi_slopes=np.array([0.1, 0.4], np.float32))
    out, _ = reference.naive_attention(q, k, v, **options)
    ref_out, _ = reference.attention(q, k, v, **options)
    eps = float(ml_dtypes.finfo(dtype).eps)
    error = np.abs(out.astype(np.float64) - ref_out).max()
    assert 0 < error < 50 * eps
    dout = rng.standard_normal((2, 2, 50, 16)).astype(dtype)
    grads = reference.naive_attention_backward(dout, q, k, v, **options)
    for got, ref in zip(grads, reference.attention_backward(dout, q, k, v, **options)):
        assert np.abs(got.astype(np.float64) - ref).max() < 100 * eps * np.abs(ref).max()


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64, "float8", "no such type"])
def test_naive_refuses_a_dtype_that_is_no_real_float(rng, dtype):
    """The rounding of every step to an integer (or a complex) type is no baseline; the input
    dtypes are refused for that reason, so is the dtype asked for."""
    q, k, v = (x.astype(np.float16) for x in random64(rng, (2, 5, 8), (2, 7, 8), (2, 7, 8)))
    dout = rng.standard_normal((2, 5, 8)).astype(np.float16)
    for call in (lambda **o: reference.naive_attention(q, k, v, **o),
                 lambda **o: reference.naive_attention_backward(dout, q, k, v, **o)):
        with pytest.raises(TypeError, match="dtype must be float16, bfloat16, float32 or "
                                            "float64 .the precision to round to."):
            call(dtype=dtype)
    out, _ = reference.naive_attention(q, k, v, dtype="float32")
    assert out.dtype == np.float32


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


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_naive_backward_row_term_from_the_given_out(rng, dtype):
    q, k, v = (x.astype(dtype) for x in random64(rng, (2, 3, 40, 16), (2, 3, 50, 16),
                                                 (2, 3, 50, 24)))
    dout = rng.standard_normal((2, 3, 40, 24)).astype(dtype)
    options = dict(causal=True, softcap=4.0)
    own = reference.naive_attention_backward(dout, q, k, v, **options)
    # naive_attention's output is the one the backward forms for itself: the same gradients.
    out, _ = reference.naive_attention(q, k, v, **options)
    same = reference.naive_attention_backward(dout, q, k, v, **options, out=out)
    for a, b in zip(own, same):
        assert np.array_equal(a.view(np.uint16), b.view(np.uint16))
    # Another output moves dq and dk (through the row term) and leaves dv alone.
    shifted = reference.naive_attention_backward(dout, q, k, v, **options,
                                                 out=(out.astype(np.float32) * 1.01).astype(dtype))
    assert not np.array_equal(shifted[0], own[0]) and not np.array_equal(shifted[1], own[1])
    assert np.array_equal(shifted[2].view(np.uint16), own[2].view(np.uint16))


@pytest.mark.parametrize("bad", ["block mask", "scipy", "scalar", "list"])
def test_mask_that_is_no_array_of_bools_is_refused(rng, bad):
    """Anything else would become a 0-d True: the dense oracle, with no error."""
    import scipy.sparse

    from cuflash.sparse import BlockMask

    q, k, v = random64(rng, (2, 256, 8), (2, 256, 8), (2, 256, 8))
    masks = {"block mask": BlockMask.from_dense(np.eye(2, dtype=bool), block_size=128),
             "scipy": scipy.sparse.eye(256, format="csr"), "scalar": True,
             "list": [[True] * 256] * 256}
    match = "pass it as block_mask=" if bad == "block mask" else "mask must be an ExactMask"
    for call in (reference.attention, reference.naive_attention):
        with pytest.raises(TypeError, match=match):
            call(q, k, v, mask=masks[bad])
    keep = np.tril(np.ones((256, 256), bool))
    np.testing.assert_array_equal(reference.attention(q, k, v, mask=keep)[0],
                                  reference.attention(q, k, v, causal=True)[0])


def test_rule_never_passes_an_error_that_is_not_finite():
    from cuflash.check import rule

    assert rule.passes(1e30, float("inf"))  # an overflowed baseline bounds nothing finite out
    assert not rule.passes(float("inf"), float("inf"))
    assert not rule.passes(float("nan"), 0.01)
    assert rule.passes(0.015, 0.01) and not rule.passes(0.03, 0.01)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_dtypes_that_are_not_real_floats_are_refused(rng, dtype):
    q, k, v = random64(rng, (2, 8, 4), (2, 8, 4), (2, 8, 4))
    for call in (reference.attention, reference.naive_attention):
        with pytest.raises(TypeError, match="the reference takes float16, bfloat16, float32 or "
                                            "float64"):
            call(q.astype(dtype), k, v)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_row_of_non_finite_scores_is_not_a_row_without_keys(rng, value):
    # lse -inf says a row sees no key (oracle.py then wants its output 0); a NaN or +inf score
    # is no such row, and the tiled path gives it NaN.
    q, k, v = (x.astype(np.float32) for x in random64(rng, (1, 4, 8), (1, 6, 8), (1, 6, 8)))
    q[0, 1, 0] = value
    k[0, :, 0] = 1.0  # +inf · 1: a +inf score
    with np.errstate(invalid="ignore"):
        for f in (reference.attention, reference.naive_attention):
            _, lse = f(q, k, v)
            assert np.isnan(lse[0, 1]) and np.isfinite(np.delete(lse[0], 1)).all(), (f, lse)
            _, lse = f(q, k, v, causal=True)  # row 1 sees keys 0 … 3 of 6, the rest masked
            assert np.isnan(lse[0, 1]), (f, lse)
        probs = reference.attention_probs(q, k, v)
    _, tiled = cuflash.attention(q, k, v, return_lse=True)
    assert np.isnan(tiled[0, 1])
    assert np.isnan(probs[0, 1]).all() and np.isfinite(np.delete(probs[0], 1, axis=0)).all()
    empty = reference.attention(q[:, :1], k, v, mask=np.zeros((1, 6), bool))[1]
    assert np.isneginf(empty).all()


@pytest.mark.parametrize("function", ["attention", "chunked_attention", "naive_attention",
                                      "attention_probs"])
def test_scores_far_below_their_peak_do_not_raise_under_seterr(rng, function):
    """exp of such scores underflows to 0 by design: a caller's seterr(all="raise") must not
    turn that into an error, and the result is the one computed without it."""
    q, k, v = (rng.standard_normal((2, 37, 16)) for _ in range(3))
    q *= 400  # scores spread over thousands: most exp(s - peak) underflow, float64 too
    call = getattr(reference, function)
    expected = call(q, k, v)
    with np.errstate(all="raise"):
        got = call(q, k, v)
    for g, e in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, expected))):
        np.testing.assert_array_equal(g, e)


def test_backward_scores_far_below_their_peak_do_not_raise_under_seterr(rng):
    q, k, v, dout = (rng.standard_normal((2, 37, 16)) for _ in range(4))
    q *= 400
    expected = reference.attention_backward(dout, q, k, v)
    with np.errstate(all="raise"):
        got = reference.attention_backward(dout, q, k, v)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
