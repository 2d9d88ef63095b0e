"""Packed variable-length sequences (``cuflash.attention_varlen``) against the float64 oracle of
each sequence alone, on the NumPy path (default suite) and the GPU kernels (``-m gpu``).

Each sequence of a varlen call is attention over that sequence alone: causal, windows and ALiBi
are aligned to the bottom right of each sequence (flash-attn's ``flash_attn_varlen_func``).
``oracle.assert_varlen_forward_close`` / ``assert_varlen_backward_close`` compute the oracle
sequence by sequence and apply the rule to the packed results as a whole. Lengths are odd, mixed
and include empty sequences on either side; outputs are poisoned with NaN before each call.
"""

from __future__ import annotations

from functools import partial

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import (assert_varlen_backward_close, assert_varlen_forward_close, poisoned,
                    random_array, varlen_sequences)
from test_cpu_backward import GRAD_LAYOUTS, assert_given_grads_written, grad_buffer

import cuflash

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32]
DTYPE_IDS = ["float16", "bfloat16", "float32"]


def offsets(lengths, xp=np):
    """int32 offsets ``(B + 1,)`` of sequences of these lengths."""
    return xp.asarray(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def make_case(rng, xp, dtype, lens_q, lens_k=None, *, hq=4, hkv=2, d=32, dv=None, alibi=None):
    """Packed q, k, v, their offsets, max lengths and ALiBi slopes (None, ``"heads"`` (Hq,) or
    ``"sequences"`` (B, Hq))."""
    lens_k = lens_q if lens_k is None else lens_k
    dv = dv or d
    q = random_array(rng, (sum(lens_q), hq, d), dtype, xp=xp)
    k = random_array(rng, (sum(lens_k), hkv, d), dtype, xp=xp)
    v = random_array(rng, (sum(lens_k), hkv, dv), dtype, xp=xp)
    slopes = None
    if alibi is not None:
        base = 2.0 ** (-8.0 * np.arange(1, hq + 1) / hq)
        shape = (hq,) if alibi == "heads" else (len(lens_q), hq)
        slopes = xp.asarray((base * rng.uniform(0.5, 1.5, shape)).astype(np.float32))
    return (q, k, v, offsets(lens_q, xp), offsets(lens_k, xp), max(lens_q), max(lens_k)), slopes


def run_case(xp, rng, seed, *, dtype, lens_q, lens_k=None, hq=4, hkv=2, d=32, dv=None,
             alibi=None, deterministic=False, backward=True, **options):
    """Forward into a poisoned ``out`` and backward (through the vjp and the explicit backward,
    which must agree bit for bit) of one case, each checked by the rule."""
    args, slopes = make_case(rng, xp, dtype, lens_q, lens_k, hq=hq, hkv=hkv, d=d, dv=dv,
                             alibi=alibi)
    q, k, v, cu_q, cu_k, max_q, max_k = args
    options = dict(options, alibi_slopes=slopes)
    context = f"seed={seed}, lens_q={lens_q}, lens_k={lens_k}, {options | dict(alibi_slopes=alibi)}"

    out = poisoned((q.shape[0], hq, v.shape[2]), dtype, xp=xp)
    got, lse = cuflash.attention_varlen(*args, **options, return_lse=True, out=out)
    assert got is out
    assert lse.shape == (hq, q.shape[0])
    assert_varlen_forward_close(out, lse, q, k, v, cu_q, cu_k, **options, context=context)
    if not backward:
        return out, lse
    dout = random_array(rng, out.shape, dtype, xp=xp)
    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                              **options, deterministic=deterministic)
    assert_varlen_backward_close(grads, dout, q, k, v, cu_q, cu_k, **options, context=context)
    out2, vjp = cuflash.attention_varlen_vjp(*args, **options, deterministic=deterministic)
    np.testing.assert_array_equal(to_np(out2), to_np(out))
    if deterministic or xp is np:
        for g, g2 in zip(grads, vjp(dout)):
            np.testing.assert_array_equal(to_np(g), to_np(g2))
    return out, lse, grads


def to_np(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


# Lengths with an empty query side, an empty key side, one token, and tile-boundary sizes.
MIXED_Q = [37, 0, 1, 130, 5, 64]
MIXED_K = [50, 9, 0, 129, 5, 64]


# ----------------------------------------------------------------------------- NumPy path

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_numpy_every_dtype(rng, seed, dtype):
    run_case(np, rng, seed, dtype=dtype, lens_q=MIXED_Q, lens_k=MIXED_K, causal=True)


@pytest.mark.parametrize("options", [
    dict(),
    dict(causal=True),  # nq != nk per sequence: bottom-right aligned in each
    dict(window=(7, 3)),
    dict(window=(20, 0), causal=True),
    dict(softcap=5.0),
    dict(alibi="heads", causal=True),
    dict(alibi="sequences"),
    dict(causal=True, window=(30, 0), softcap=10.0, alibi="sequences"),
], ids=["dense", "causal", "window", "window-causal", "softcap", "alibi-heads",
        "alibi-sequences", "all"])
def test_numpy_options(rng, seed, options):
    run_case(np, rng, seed, dtype=ml_dtypes.bfloat16, lens_q=MIXED_Q, lens_k=MIXED_K, **options)


def test_the_per_sequence_oracle_refuses_dropout(rng):
    """The oracle runs each sequence as batch element 0, where sequence b draws batch element
    b's mask: with dropout it would check against the wrong mask, so it refuses."""
    q, k, v = (random_array(rng, (12, 2, 8), np.float32) for _ in range(3))
    cu = offsets([5, 7])
    with pytest.raises(TypeError, match="dropout"):
        assert_varlen_forward_close(q, None, q, k, v, cu, cu, dropout_p=0.1, dropout_seed=1)
    with pytest.raises(TypeError, match="dropout"):
        assert_varlen_backward_close((q, k, v), q, q, k, v, cu, cu, dropout_p=0.1,
                                     dropout_seed=1)


def test_numpy_gqa_mqa_and_dv(rng, seed):
    run_case(np, rng, seed, dtype=np.float16, lens_q=[40, 3, 90], lens_k=[17, 60, 90], hq=6,
             hkv=1, d=24, dv=40, causal=True)
    run_case(np, rng, seed, dtype=np.float32, lens_q=[40, 3, 90], hq=4, hkv=4, d=48, dv=16)


def test_numpy_equals_dense_per_sequence(rng):
    """The NumPy path runs the tiled algorithm on each sequence: bit for bit ``attention`` (and
    its backward) of the sequence alone."""
    (q, k, v, cu_q, cu_k, max_q, max_k), slopes = make_case(
        rng, np, ml_dtypes.bfloat16, [33, 140, 2], [70, 140, 9], alibi="sequences")
    options = dict(causal=True, window=(50, 0), softcap=8.0)
    out, vjp = cuflash.attention_varlen_vjp(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes=slopes,
                                            **options)
    dout = random_array(rng, out.shape, q.dtype)
    dq, dk, dv = vjp(dout)
    for b, rq, rk in varlen_sequences(cu_q, cu_k):
        heads = [x[r].transpose(1, 0, 2) for x, r in ((q, rq), (k, rk), (v, rk))]
        o, dense_vjp = cuflash.attention_vjp(*heads, alibi_slopes=slopes[b], **options)
        np.testing.assert_array_equal(o.transpose(1, 0, 2), out[rq])
        for g, got, rows in zip(dense_vjp(dout[rq].transpose(1, 0, 2)), (dq, dk, dv), (rq, rk, rk)):
            np.testing.assert_array_equal(g.transpose(1, 0, 2), got[rows])


def _as_batch_element(x, rows, b):
    """Rows of a packed array as element ``b`` of a dense ``(b + 1, H, n, D)`` batch (every
    element a copy): the dropout mask of a dense batch element ``b`` is that of sequence ``b``."""
    heads = x[rows].transpose(1, 0, 2)
    return np.broadcast_to(heads[None], (b + 1,) + heads.shape).copy()


@pytest.mark.parametrize("lens_q, lens_k", [([64, 64, 64], None), ([33, 0, 140, 2], [70, 9, 140, 17])])
def test_numpy_dropout_is_each_sequence_s_dense_mask(rng, seed, lens_q, lens_k):
    """Dropout over packed sequences: sequence ``b`` keeps the elements that a dense call's batch
    element ``b`` of its lengths keeps (rows and keys counted within the sequence), so its
    output and gradients are bit for bit the dense call's; the vjp draws one seed for both
    passes, which the explicit backward given that seed reproduces."""
    (q, k, v, cu_q, cu_k, max_q, max_k), slopes = make_case(rng, np, ml_dtypes.bfloat16, lens_q,
                                                            lens_k, alibi="sequences")
    options = dict(causal=True, softcap=8.0, dropout_p=0.25, dropout_offset=3)
    out, vjp = cuflash.attention_varlen_vjp(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes=slopes,
                                            **options)
    seed_drawn = vjp.dropout_seed
    assert isinstance(seed_drawn, int) and 0 <= seed_drawn < 2**64
    options["dropout_seed"] = seed_drawn
    again, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes=slopes,
                                          return_lse=True, **options)
    np.testing.assert_array_equal(again, out)
    dout = random_array(rng, out.shape, q.dtype)
    grads = vjp(dout)
    explicit = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                                 alibi_slopes=slopes, **options)
    for g, e in zip(grads, explicit):
        np.testing.assert_array_equal(g, e)
    without = cuflash.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes=slopes,
                                       causal=True, softcap=8.0)
    assert not np.array_equal(without, out)  # the mask dropped something
    for b, rq, rk in varlen_sequences(cu_q, cu_k):
        if rq.start == rq.stop:
            continue
        dense = [_as_batch_element(x, r, b) for x, r in ((q, rq), (k, rk), (v, rk), (dout, rq))]
        o, dense_vjp = cuflash.attention_vjp(*dense[:3], alibi_slopes=slopes[b], **options)
        np.testing.assert_array_equal(o[b].transpose(1, 0, 2), out[rq])
        for g, got, rows in zip(dense_vjp(dense[3]), grads, (rq, rk, rk)):
            np.testing.assert_array_equal(g[b].transpose(1, 0, 2), got[rows])


@pytest.mark.parametrize("capability, families", [("90", ("sm90-tma", "sm90-wgmma")),
                                                   ("80", ("sm80-mma", "sm80-mma"))])
def test_dropout_over_packed_sequences_runs_the_kernels_that_draw_the_mask(monkeypatch, capability, families):
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash import _api, kernels

    device = FakeDevice(monkeypatch, compute_capability=capability)
    q = device.empty((10, 2, 64), ml_dtypes.bfloat16)
    cu = device.empty((2,), np.int32)
    _, spec = _api._varlen_spec(q, q, q, cu, cu, 10, 10, dropout_p=0.1, dropout_seed=5,
                                check_offsets=False)
    forward = kernels.plan("forward", spec, (q, q, q, q))
    backward = kernels.plan("backward", spec, (q, q, q, q, q, q, q, q))
    assert (forward.family.name, backward.family.name) == families
    kernels.forward(q, q, q, q, q, spec)
    (launch,) = device.take_launches()
    assert launch[0].endswith("true, true>")  # the VARLEN and DROPOUT variant


def test_numpy_empty_sequences(rng):
    """Rows without keys: output 0, lse -inf, gradient 0; keys without queries: gradient 0."""
    (q, k, v, cu_q, cu_k, max_q, max_k), _ = make_case(rng, np, np.float32, [4, 0, 3], [0, 5, 2])
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True)
    assert (out[:4] == 0).all() and np.isneginf(lse[:, :4]).all()
    dq, dk, dv = cuflash.attention_varlen_backward(np.ones_like(out), q, k, v, out, lse, cu_q,
                                                   cu_k, max_q, max_k)
    assert (dq[:4] == 0).all() and (dk[:5] == 0).all() and (dv[:5] == 0).all()
    assert np.abs(dk[5:]).max() > 0



@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.tuples(st.sampled_from([0, 1, 2, 17, 130]),
                                  st.sampled_from([0, 1, 2, 17, 130])), min_size=1, max_size=4),
       hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), dv=st.sampled_from([16, 24]),
       dtype=st.sampled_from(DTYPES), causal=st.booleans(),
       window=st.tuples(st.sampled_from([-1, 0, 5, 200]), st.sampled_from([-1, 0, 5, 200])),
       softcap=st.sampled_from([0.0, 5.0]), alibi=st.sampled_from([None, "heads", "sequences"]),
       dropout_p=st.sampled_from([0.0, 0.25]), seed=st.integers(0, 2**32 - 1))
def test_numpy_each_sequence_is_its_dense_call(lengths, hkv, group, dv, dtype, causal, window,
                                               softcap, alibi, dropout_p, seed):
    """Every option at once over sequences empty on either side: each sequence's output, lse
    and gradients are bit for bit those of the dense call of batch element ``b`` of its own
    lengths (the dense path is checked against the oracle elsewhere); a sequence without keys
    gives output 0, lse -inf and dq 0, one without queries dk = dv = 0."""
    rng = np.random.default_rng(seed)
    lens_q, lens_k = ([n for n, _ in lengths], [n for _, n in lengths])
    (q, k, v, cu_q, cu_k, max_q, max_k), slopes = make_case(
        rng, np, dtype, lens_q, lens_k, hq=hkv * group, hkv=hkv, d=16, dv=dv, alibi=alibi)
    options = dict(causal=causal, window=window, softcap=softcap, dropout_p=dropout_p,
                   dropout_seed=seed if dropout_p else None)
    args = (q, k, v, cu_q, cu_k, max_q, max_k)
    out = poisoned((q.shape[0], q.shape[1], dv), dtype)
    got, lse = cuflash.attention_varlen(*args, alibi_slopes=slopes, **options, out=out,
                                        return_lse=True)
    assert got is out and lse.dtype == np.float32 and lse.shape == (q.shape[1], q.shape[0])
    dout = random_array(rng, out.shape, dtype)
    grads = cuflash.attention_varlen_backward(dout, *args[:3], out, lse, *args[3:],
                                              alibi_slopes=slopes, **options)
    assert all(g.dtype == x.dtype and g.shape == x.shape for g, x in zip(grads, (q, k, v)))
    dq, dk, dv_ = grads
    for b, rq, rk in varlen_sequences(cu_q, cu_k):
        if rq.start == rq.stop:
            assert (dk[rk] == 0).all() and (dv_[rk] == 0).all()
            continue
        if rk.start == rk.stop:
            assert (out[rq] == 0).all() and np.isneginf(lse[:, rq]).all() and (dq[rq] == 0).all()
            continue
        dense = [_as_batch_element(x, r, b) for x, r in ((q, rq), (k, rk), (v, rk), (dout, rq))]
        sequence_slopes = None if slopes is None or slopes.ndim == 1 else slopes[b]
        dense_options = dict(options, alibi_slopes=slopes if sequence_slopes is None
                             else sequence_slopes)
        o, l = cuflash.attention(*dense[:3], **dense_options, return_lse=True)
        np.testing.assert_array_equal(o[b].transpose(1, 0, 2), out[rq])
        np.testing.assert_array_equal(l[b], lse[:, rq])
        dense_grads = cuflash.attention_backward(dense[3], *dense[:3], o, l, **dense_options)
        for g, packed, rows in zip(dense_grads, grads, (rq, rk, rk)):
            np.testing.assert_array_equal(g[b].transpose(1, 0, 2), packed[rows])


def test_numpy_no_rows_at_all(rng):
    (q, k, v, cu_q, cu_k, _, _), _ = make_case(rng, np, np.float32, [0, 0], [3, 0])
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 0, 3, return_lse=True)
    assert out.shape == (0, 4, 32) and lse.shape == (4, 0)
    dq, dk, dv = cuflash.attention_varlen_backward(out, q, k, v, out, lse, cu_q, cu_k, 0, 3)
    assert dq.shape == (0, 4, 32) and (dk == 0).all() and (dv == 0).all()


def test_numpy_strided_inputs_and_out(rng, seed):
    """Inputs read in place from a (total, 3, H, D) buffer, out written into a wider buffer."""
    lens = [20, 1, 57]
    qkv = random_array(rng, (sum(lens), 3, 4, 32), np.float16)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cu = offsets(lens)
    wide = poisoned((sum(lens), 4, 40), np.float16)
    out = wide[..., :32]
    got, lse = cuflash.attention_varlen(q, k, v, cu, cu, 57, 57, causal=True, out=out,
                                        return_lse=True)
    assert got is out and np.isnan(wide[..., 32:]).all()
    assert_varlen_forward_close(out, lse, q, k, v, cu, cu, causal=True, context=f"seed={seed}")


def check_given_gradients(xp, rng, dtype, layout, **options):
    """dq=, dk=, dv= (all three, or dk alone) in ``layout`` are written and returned, holding bit
    for bit the gradients of the call without them."""
    (q, k, v, cu_q, cu_k, max_q, max_k), _ = make_case(rng, xp, dtype, MIXED_Q, MIXED_K, d=64)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                        return_lse=True)
    dout = random_array(rng, out.shape, q.dtype, xp=xp)
    backward = partial(cuflash.attention_varlen_backward, dout, q, k, v, out, lse, cu_q, cu_k,
                       max_q, max_k, causal=True, **options)
    assert_given_grads_written(backward, [grad_buffer(x.shape, dtype, layout, xp=xp)
                                          for x in (q, k, v)])
    assert_given_grads_written(backward, [None, grad_buffer(k.shape, dtype, layout, xp=xp), None])


@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
def test_numpy_given_gradients(rng, layout):
    check_given_gradients(np, rng, np.float16, layout)


def test_numpy_given_gradients_without_query_rows(rng):
    (q, k, v, cu_q, cu_k, _, _), _ = make_case(rng, np, np.float32, [0, 0], [3, 0])
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 0, 3, return_lse=True)
    given = [grad_buffer(x.shape, x.dtype, "strided") for x in (q, k, v)]
    grads = cuflash.attention_varlen_backward(out, q, k, v, out, lse, cu_q, cu_k, 0, 3,
                                              dq=given[0], dk=given[1], dv=given[2])
    assert all(g is x for g, x in zip(grads, given))
    assert (grads[1] == 0).all() and (grads[2] == 0).all()


def test_max_seqlen_larger_than_needed(rng):
    (q, k, v, cu_q, cu_k, max_q, max_k), _ = make_case(rng, np, np.float32, [9, 30])
    exact = cuflash.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    roomy = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 1000, 4000, causal=True)
    np.testing.assert_array_equal(exact, roomy)


# ----------------------------------------------------------------------------- errors

def _valid(rng):
    (q, k, v, cu_q, cu_k, max_q, max_k), _ = make_case(rng, np, np.float32, [3, 5], [4, 6])
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                max_seqlen_k=max_k)


def _call(args):
    a = dict(args)
    return cuflash.attention_varlen(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("cu_seqlens_q"),
                                    a.pop("cu_seqlens_k"), a.pop("max_seqlen_q"),
                                    a.pop("max_seqlen_k"), **a)


@pytest.mark.parametrize("change, error, message", [
    (dict(cu_seqlens_q=np.array([1, 3, 8], np.int32)), ValueError, "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_q=np.array([0, 9, 8], np.int32)), ValueError,
     r"cu_seqlens_q must be non-decreasing.*cu_seqlens_q\[1\] = 9 > cu_seqlens_q\[2\] = 8"),
    (dict(cu_seqlens_q=np.array([0, 3, 7], np.int32)), ValueError,
     r"last entry of cu_seqlens_q must equal the rows of q \(8\), got 7"),
    (dict(cu_seqlens_k=np.array([0, 4, 11], np.int32), max_seqlen_k=7), ValueError,
     r"last entry of cu_seqlens_k must equal the rows of k and v \(10\), got 11"),
    (dict(max_seqlen_q=4), ValueError,
     "max_seqlen_q must be at least the longest sequence's length: sequence 1 has 5 rows"),
    (dict(max_seqlen_k=5), ValueError, "max_seqlen_k must be at least"),
    (dict(cu_seqlens_k=np.array([0, 10], np.int32)), ValueError,
     "cu_seqlens_q and cu_seqlens_k must have the same length B \\+ 1"),
    (dict(cu_seqlens_q=np.array([0, 3, 8], np.int64)), TypeError,
     "cu_seqlens_q must have dtype int32"),
    # a ValueError too, with the other offset errors (either except clause catches it)
    (dict(cu_seqlens_k=np.array([0, 4, 10], np.float32)), ValueError,
     "cu_seqlens_k must have dtype int32 .*got float32"),
    (dict(cu_seqlens_q=[0, 3, 8]), TypeError, "cu_seqlens_q must be a 1-D int32 array"),
    (dict(cu_seqlens_q=np.array([0], np.int32), cu_seqlens_k=np.array([0], np.int32)),
     ValueError, "at least one sequence"),
    (dict(cu_seqlens_q=np.array([[0, 3, 8]], np.int32)), ValueError, "1-D int32 array"),
    (dict(max_seqlen_q=5.0), TypeError, "max_seqlen_q must be an int"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be between 0"),
    (dict(q=np.zeros((8, 1, 4, 32), np.float32)), ValueError, "q must have 3 dimensions"),
    (dict(v=np.zeros((9, 2, 32), np.float32)), ValueError, "k and v must have the same number"),
    (dict(alibi_slopes=np.zeros((3, 4), np.float32)), ValueError, "alibi_slopes must have shape"),
    (dict(out=np.zeros((8, 4, 31), np.float32)), ValueError, r"out must have shape \(8, 4, 32\)"),
    (dict(check_offsets=1), TypeError, "check_offsets must be True or False"),
    (dict(dropout_p=1.0, dropout_seed=1), ValueError, r"dropout_p must be a real number in \[0, 1\)"),
    (dict(dropout_p=0.1), ValueError, "dropout_p=0.1 needs an explicit dropout_seed"),
    (dict(dropout_p=0.1, dropout_seed=1.5), TypeError, "dropout_seed must be an int"),
])
def test_errors_name_the_problem(rng, change, error, message):
    with pytest.raises(error, match=message):
        _call(_valid(rng) | change)


def test_backward_checks_its_arrays(rng):
    args = _valid(rng)
    out, lse = _call(args | dict(return_lse=True))
    rest = [args[n] for n in ("q", "k", "v")]
    offsets_and_max = [args[n] for n in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                         "max_seqlen_k")]
    with pytest.raises(ValueError, match=r"lse must have shape \(4, 8\)"):
        cuflash.attention_varlen_backward(out, *rest, out, lse.T.copy(), *offsets_and_max)
    with pytest.raises(ValueError, match=r"dout must have shape \(8, 4, 32\)"):
        cuflash.attention_varlen_backward(out[:7], *rest, out, lse, *offsets_and_max)
    with pytest.raises(ValueError, match=r"dk must have shape \(10, 2, 32\), got \(8, 4, 32\)"):
        cuflash.attention_varlen_backward(out, *rest, out, lse, *offsets_and_max,
                                          dk=np.empty_like(out))
    with pytest.raises(ValueError, match="dq must not share memory with out"):
        cuflash.attention_varlen_backward(out.copy(), *rest, out, lse, *offsets_and_max, dq=out)


def test_gpu_offsets_with_numpy_inputs_are_refused(rng):
    cupy = pytest.importorskip("cupy")
    args = _valid(rng)
    fake = cupy.ndarray((3,), np.int32, memptr=cupy.cuda.MemoryPointer(
        cupy.cuda.UnownedMemory(1 << 32, 12, None, device_id=0), 0))
    with pytest.raises(TypeError, match="cu_seqlens_q must be a numpy.ndarray like q"):
        _call(args | dict(cu_seqlens_q=fake))


# ----------------------------------------------------------------------------- GPU host side

def test_plan_and_launches_on_a_fake_hopper(monkeypatch, rng):
    """On a compute-capability 9.0 device the Hopper TMA forward and wgmma backward take varlen
    calls, with VARLEN variants: the TMA forward and the backward's warp-specialised dK/dV kernel
    (with the fused dQ at D = 128, causal or not) over grids of each sequence's own tiles
    (packed_tile_slots), the other kernels over grids sized for the longest sequence (with
    dropout, or deterministic, the cp.async dK/dV kernel); with the Hopper families switched
    off, sm80-mma runs both, reading the offsets' device pointers."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash import _api, kernels
    from cuflash.kernels import _launch, sm90_tma_forward

    device = FakeDevice(monkeypatch, compute_capability="90")
    lens = [100, 7, 300]
    total = sum(lens)
    q, k, v = (device.empty((total, 8, 128), ml_dtypes.bfloat16) for _ in range(3))
    cu = device.empty((4,), np.int32)
    options = dict(causal=True, check_offsets=False)  # fake offsets cannot be read back
    _, spec = _api._varlen_spec(q, k, v, cu, cu, 300, 300, **options)
    plan = kernels.plan("forward", spec, (q, k, v, q))
    assert plan.family.name == "sm90-tma" and not plan.passed_over
    backward_plan = kernels.plan("backward", spec, (q, k, v, q, q, q, k, v))
    assert backward_plan.family.name == "sm90-wgmma" and not backward_plan.passed_over
    block_m = sm90_tma_forward.tiles_for(spec).block_m
    cuflash.attention_varlen(q, k, v, cu, cu, 300, 300, **options)
    (expression, grid, *_), = device.take_launches()
    assert expression.startswith("flash_fwd_sm90_tma<") and expression.endswith(", true>")
    # each sequence's query tiles and at most one empty slot each, per head
    assert grid == ((total // block_m + 3) * 8,) and (total // block_m + 3) * 8 < -(-300 // block_m) * 8 * 3
    # More tiles than the SMs hold (132 here): the persistent grid, one block per SM, drawing the
    # packed grid's tiles (the kernel's tile count).
    long_lens = [2000, 70, 3000]
    big = sum(long_lens)
    bq, bk, bv = (device.empty((big, 8, 128), ml_dtypes.bfloat16) for _ in range(3))
    cuflash.attention_varlen(bq, bk, bv, cu, cu, 3000, 3000, **options)
    (expression, grid, *_), = device.take_launches()
    _, tile_count, counter = device.side_arguments[-1]
    assert grid == (132,) and int(tile_count) == (big // block_m + 3) * 8 and int(counter) != 0
    lse = device.empty((8, total), np.float32)
    fused = ["flash_bwd_pre", "flash_bwd_sm90_dkdv_ws", "flash_bwd_dq_convert"]
    cases = [(dict(causal=True), fused, 2 * 128 + 128), (dict(causal=False), fused, 2 * 128 + 128),
             # deterministic (no fused dQ: the dQ kernel after the dK/dV kernel) and dropout:
             # the cp.async dK/dV kernel
             (dict(causal=True, deterministic=True), ["flash_bwd_pre", "flash_bwd_sm90_dkdv", "flash_bwd_sm90_dq"],
              2 * 128),
             (dict(causal=True, dropout_p=0.1, dropout_seed=1),
              ["flash_bwd_pre", "flash_bwd_sm90_dkdv", "flash_bwd_dq_convert"], 2 * 128)]
    for options_, names, threads in cases:
        cuflash.attention_varlen_backward(q, q, k, v, q, lse, cu, cu, 300, 300, check_offsets=False, **options_)
        launches = device.take_launches()
        assert [launch[0].partition("<")[0] for launch in launches] == names
        # The Hopper kernels' last flag is VARLEN; the fused dQ adds to flash_bwd_dq_convert's
        # accumulator.
        assert all(launch[0].endswith(", true>") for launch in launches[1:] if "sm90" in launch[0])
        dkdv, dkdv_grid, dkdv_block, _, record = launches[1]
        if dkdv.startswith("flash_bwd_sm90_dkdv_ws<"):  # each sequence's key tiles (and one slot more)
            assert dkdv_grid == ((total // 128 + 3) * 8,)
        else:  # key tiles of the longest × heads × B
            assert dkdv_grid == (-(-300 // 128) * 8 * 3,)
        assert dkdv_block == (threads,)  # a producer warpgroup beside the two consumers, or none
        if dkdv.startswith("flash_bwd_sm90_dkdv_ws<"):
            # a right bound, also without causal (its test hides the keys that follow a
            # sequence): max_seqlen_q, which every key of every sequence passes; causal's is 0
            assert "Mask<false, true, false>" in dkdv
            window = np.frombuffer(record, _launch.BWD_ARGS)[["window_left", "window_right"]][0]
            assert tuple(int(x) for x in window) == (300, 0 if options_.get("causal") else 300)

    monkeypatch.setenv(kernels.DISABLE_HOPPER_ENV, "1")
    assert kernels.plan("forward", spec, (q, k, v, q)).family.name == "sm80-mma"

    out = cuflash.attention_varlen(q, k, v, cu, cu, 300, 300, **options)
    assert out.shape == (total, 8, 128)
    (expression, grid, *_), = device.take_launches()
    assert expression.startswith("flash_fwd<bf16_t, 128, 128") and expression.endswith(", true>")
    assert grid == (-(-300 // 128) * 8 * 3,)  # m_tiles of the longest sequence × heads × B

    cuflash.attention_varlen_backward(out, q, k, v, out, device.empty((8, total), np.float32),
                                      cu, cu, 300, 300, **options)
    names = [launch[0].partition("<")[0] for launch in device.take_launches()]
    assert names == ["flash_bwd_pre", "flash_bwd_dkdv", "flash_bwd_dq_convert"]


def test_packed_calls_without_a_right_bound_take_one_past_every_key():
    """The warp-specialised dK/dV kernel's loads bring the next sequence's keys past a sequence's
    end; a packed call without a right bound runs it under a right bound of the longest query
    length, which sees the same keys (every key of each sequence) and hides those."""
    from cuflash import _api
    from cuflash._mask import visible
    from cuflash.kernels import sm90_backward

    lens_q, lens_k = [37, 0, 130, 5], [50, 9, 129, 5]
    q = np.zeros((sum(lens_q), 2, 64), np.float16)
    k = np.zeros((sum(lens_k), 2, 64), np.float16)
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (lens_q, lens_k))
    cases = [(dict(), max(lens_q)), (dict(window=(20, -1)), max(lens_q)), (dict(causal=True), None),
             (dict(window=(3, 7)), None),
             # a max_seqlen_q far above the longest: the bound stops at total_q (int32 in the kernel)
             (dict(max_q=2**31 - 1), sum(lens_q))]
    for options, bound in cases:
        max_q = options.pop("max_q", max(lens_q))
        _, spec = _api._varlen_spec(q, k, k, cu_q, cu_k, max_q, max(lens_k), **options)
        banded = sm90_backward.keys_past_end_banded(spec)
        left, right = spec.band()
        if bound is None:
            assert banded is spec
            continue
        assert banded.band() == (left, bound)
        for nq, nk in zip(lens_q, lens_k):  # per sequence: the same keys seen
            np.testing.assert_array_equal(visible(nq, nk, *banded.band()), visible(nq, nk, *spec.band()))


@pytest.mark.parametrize("options", [dict(window=(16, 10**12)), dict(window=(10**12, 3)),
                                     dict(window=(2**31 - 1, 2**31 - 1)), dict(causal=True, window=(10**12, -1))],
                         ids=str)
@pytest.mark.parametrize("max_len", [130, 2**30, 2**31 - 1])
def test_packed_band_as_the_kernels_read_it(options, max_len):
    """The band the kernels get (``AttentionSpec.kernel_band``), read as csrc/mask.cuh reads it
    in int32 for each sequence (``key_begin`` / ``key_end`` of its first and last rows, ``row_begin``
    / ``row_end`` of its first and last keys): the keys ``_mask.key_range`` gives the sequence, and
    no sum past 2**31 - 1, whatever ``max_seqlen`` above the longest sequence the caller passes."""
    from cuflash import _api
    from cuflash._mask import UNBOUNDED, key_range

    lens_q, lens_k = [37, 5, 130, 1], [50, 9, 129, 1]
    q = np.zeros((sum(lens_q), 2, 16), np.float16)
    k = np.zeros((sum(lens_k), 2, 16), np.float16)
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (lens_q, lens_k))
    _, spec = _api._varlen_spec(q, k, k, cu_q, cu_k, max_len, max_len, **options)
    bounded_left, bounded_right = (side != UNBOUNDED for side in spec.band())
    left, right = spec.kernel_band()

    def int32(value):
        assert -2**31 <= value < 2**31
        return value

    for nq, nk in zip(lens_q, lens_k):
        shift = nk - nq
        rows = np.array([0, nq - 1])
        begin = [max(0, int32(int32(row + shift) - left)) if bounded_left else 0 for row in rows]
        end = [min(nk, int32(int32(int32(row + shift) + right) + 1)) if bounded_right else nk for row in rows]
        want_begin, want_end = key_range(rows, nq, nk, *spec.band())
        np.testing.assert_array_equal(begin, want_begin)
        np.testing.assert_array_equal(np.maximum(begin, end), want_end)
        for key in (0, nk - 1):  # the rows a key is seen by (the dK/dV kernels' walk)
            if bounded_right:
                int32(int32(key - shift) - right)
            if bounded_left:
                int32(int32(int32(key - shift) + left) + 1)


def tile_in_slots(index, lanes, first_slots, sequences):
    """schedule.cuh's tile_in_slots (HEAVY_LAST false): (sequence, lane, tile) of block `index`
    where the r-th sequence, sequences[r], takes the slots first_slots[r] .. first_slots[r + 1]."""
    r = max(r for r in range(len(sequences)) if first_slots[r] <= index // lanes)
    width = first_slots[r + 1] - first_slots[r]
    local = index - lanes * first_slots[r]
    return sequences[r], int(local // width), int(local % width)


def packed_tile_at(index, lanes, cu, tile):
    """schedule.cuh's packed_tile_at (HEAVY_LAST false): (sequence, lane, tile) of a packed
    grid's block `index`."""
    return tile_in_slots(index, lanes, [int(cu[b]) // tile + b for b in range(len(cu))], range(len(cu) - 1))


@pytest.mark.parametrize("tile", [64, 128, 192])
def test_packed_grids_hold_every_sequence_s_tiles_once(rng, tile):
    """A packed grid (packed_tile_slots blocks a lane) gives each sequence's tiles of each lane
    one block, and the rest (at most one a sequence and lane) tiles past a sequence's end."""
    from cuflash.kernels._launch import packed_tile_slots

    lanes = 3
    for lengths in ([0], [1], [tile - 1, tile, tile + 1, 0, 2 * tile], list(rng.integers(0, 5 * tile, 40))):
        cu = offsets(lengths)
        blocks = packed_tile_slots(int(cu[-1]), len(lengths), tile) * lanes
        seen = [packed_tile_at(index, lanes, cu, tile) for index in range(blocks)]
        real = [(b, h, t) for b, n in enumerate(lengths) for h in range(lanes) for t in range(-(-n // tile))]
        assert sorted(x for x in seen if x[2] * tile < lengths[x[0]]) == sorted(real)
        assert len(seen) - len(real) <= lanes * len(lengths)


def longest_first_tile_at(index, lanes, work, tiles_of, tile):
    """schedule.cuh's rank_longest_first and longest_first_tile_at (HEAVY_LAST false): the
    sequences ranked by their lengths in `work`, longest first, ties in index order; their tiles
    cut from `tiles_of`."""
    batch = len(work) - 1
    order = sorted(range(batch), key=lambda b: (-(work[b + 1] - work[b]), b))
    first = np.concatenate([[0], np.cumsum([-(-(tiles_of[b + 1] - tiles_of[b]) // tile) for b in order])])
    if index // lanes >= first[batch]:  # past the last tile: rank 0's tile just past its end
        return order[0], 0, int(first[1])
    return tile_in_slots(index, lanes, first, order)


@pytest.mark.parametrize("tile", [64, 128, 192])
def test_ranked_grids_hold_every_sequence_s_tiles_once(rng, tile):
    """Ranked longest first, a packed grid (packed_tile_slots blocks a lane) still gives each
    sequence's tiles of each lane one block, the longest sequence's first; the slots past the
    last tile are past a sequence's end."""
    from cuflash.kernels._launch import packed_tile_slots

    lanes = 3
    for lengths in ([0], [5, 0, 300], [tile - 1, tile, tile + 1, 0, 2 * tile], list(rng.integers(0, 5 * tile, 32))):
        work = offsets(list(rng.integers(0, 3 * tile, len(lengths))))  # the ranking's lengths
        cu = offsets(lengths)
        blocks = packed_tile_slots(int(cu[-1]), len(lengths), tile) * lanes
        seen = [longest_first_tile_at(index, lanes, work, cu, tile) for index in range(blocks)]
        real = [(b, h, t) for b, n in enumerate(lengths) for h in range(lanes) for t in range(-(-n // tile))]
        inside = [x for x in seen if x[2] * tile < lengths[x[0]]]
        assert sorted(inside) == sorted(real)
        keys = np.diff(work)
        ranks = [(-keys[b], b) for b, _, _ in inside]
        assert ranks == sorted(ranks)  # longest first, ties in index order


def test_the_ranking_s_size_is_the_kernel_s():
    """The host counts the persistent forward's ranking of packed sequences (its static shared
    memory) with the kernel's LONGEST_FIRST_MAX."""
    import re
    from pathlib import Path

    from cuflash.kernels import sm90_tma_forward

    source = (Path(sm90_tma_forward.__file__).parent / "csrc" / "schedule.cuh").read_text()
    # (the struct's size against LONGEST_FIRST_BYTES is a static_assert beside it)
    assert int(re.search(r"constexpr int LONGEST_FIRST_MAX = (\d+);", source).group(1)) == sm90_tma_forward.LONGEST_FIRST_MAX


def test_float32_gpu_calls_are_refused_with_the_reason(monkeypatch):
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash import _api, kernels

    device = FakeDevice(monkeypatch, compute_capability="80")
    q = device.empty((10, 2, 64), np.float32)
    cu = device.empty((2,), np.int32)
    _, spec = _api._varlen_spec(q, q, q, cu, cu, 10, 10, check_offsets=False)
    with pytest.raises(ValueError, match="not implemented in the float32 kernels"):
        kernels.forward(q, q, q, q, q, spec)


# ----------------------------------------------------------------------------- GPU kernels

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("d, dv", [(64, 64), (128, 128), (96, 96), (128, 64), (64, 128)])
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_gpu_against_oracle(xp_gpu, rng, seed, dtype, d, dv, causal):
    run_case(xp_gpu, rng, seed, dtype=dtype, lens_q=MIXED_Q, lens_k=MIXED_K, hq=4, hkv=2, d=d,
             dv=dv, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [
    dict(window=(7, 3)),
    dict(window=(100, 0), causal=True),
    dict(softcap=5.0),
    dict(alibi="heads", causal=True),
    dict(alibi="sequences"),
    dict(causal=True, window=(60, 0), softcap=10.0, alibi="sequences"),
    dict(causal=True, deterministic=True),
], ids=["window", "window-causal", "softcap", "alibi-heads", "alibi-sequences", "all",
        "deterministic"])
def test_gpu_options(xp_gpu, rng, seed, options):
    run_case(xp_gpu, rng, seed, dtype=ml_dtypes.bfloat16, lens_q=MIXED_Q, lens_k=MIXED_K, d=128,
             hq=6, hkv=2, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_gpu_long_mixed_lengths(xp_gpu, rng, seed, causal):
    """Lengths 1, 0, 127, 1000 and 3000 in one call (nq != nk for some sequences)."""
    run_case(xp_gpu, rng, seed, dtype=ml_dtypes.bfloat16, lens_q=[1, 0, 127, 1000, 3000],
             lens_k=[1, 5, 127, 1300, 3000], hq=4, hkv=1, d=128, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("hq", [3, 8])
def test_gpu_many_sequences_at_tile_edges(xp_gpu, rng, seed, d, causal, hq):
    """Many sequences whose lengths fall on and beside every query and key tile edge (64 to 192
    rows), empty ones among them, shuffled: the packed grids' blocks find their sequence and
    tile (schedule.cuh, packed_tile_at), the empty slots leave. With 3 heads the forward's tiles
    fit on an H100 or H200 at once (one block each), with 8 they do not (the persistent grid,
    sequences ranked longest first)."""
    edges = [n for e in (64, 128, 192, 256, 384) for n in (e - 1, e, e + 1)] + [0, 0, 1, 2]
    lens_q = [int(n) for n in rng.permutation(edges)]
    lens_k = [int(n) for n in rng.permutation(edges)]
    run_case(xp_gpu, rng, seed, dtype=ml_dtypes.bfloat16, lens_q=lens_q, lens_k=lens_k, hq=hq, hkv=1,
             d=d, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("d, dv", [(128, 128), (256, 256), (192, 128)])
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_gpu_more_sequences_than_a_dkdv_block_ranks(xp_gpu, rng, seed, d, dv, causal):
    """40 sequences (the dK/dV kernel ranks at most 32, LONGEST_FIRST_EACH_BLOCK_MAX: the
    packed grid's order), some with queries and no keys or keys and no queries, at D = 128 and
    at the 80-key tiles of Dv > 128, forward and backward."""
    lens_q = [int(n) for n in rng.integers(0, 300, 40)]
    lens_k = [int(n) for n in rng.integers(0, 300, 40)]
    lens_q[3], lens_k[3] = 50, 0
    lens_q[7], lens_k[7] = 0, 70
    run_case(xp_gpu, rng, seed, dtype=ml_dtypes.bfloat16, lens_q=lens_q, lens_k=lens_k, hq=8, hkv=2,
             d=d, dv=dv, causal=causal)


def check_sequences_kept_apart(xp, rng, d, dv, options):
    """A sequence's last tiles end past its rows, and the Hopper kernels' TMA boxes read the next
    sequence's first queries, keys and values there (P = 0 for them). An infinite or NaN value
    among those must not reach this sequence's results, as 0 · inf would: with the odd sequences'
    first rows of q, k, v and dout made infinite and NaN, the even sequences' outputs and
    gradients stay finite, the outputs, dK and dV equal bit for bit to the same calls' without
    them (dQ's adds may come in another order)."""
    lens_q = [100, 37, 300, 129, 5, 77, 250, 1]
    lens_k = [90, 50, 301, 127, 6, 81, 200, 3]
    (q, k, v, cu_q, cu_k, max_q, max_k), _ = make_case(rng, xp, ml_dtypes.bfloat16, lens_q, lens_k,
                                                        hq=4, hkv=2, d=d, dv=dv)
    dout = random_array(rng, (q.shape[0], 4, dv), ml_dtypes.bfloat16, xp=xp)
    layout = (cu_q, cu_k, max_q, max_k)

    def run():
        out, lse = cuflash.attention_varlen(q, k, v, *layout, **options, return_lse=True)
        grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *layout, **options)
        return [to_np(x) for x in (out, *grads)]

    clean = run()
    for x, cu in ((q, cu_q), (k, cu_k), (v, cu_k), (dout, cu_q)):
        starts = xp.asarray(to_np(cu)[1::2][:len(lens_q) // 2])
        x[starts, :, : x.shape[2] // 2] = np.inf
        x[starts, :, x.shape[2] // 2:] = np.nan
    got = run()
    for b, rq, rk in varlen_sequences(cu_q, cu_k):
        if b % 2:
            continue
        for name, rows, g, c in zip(("out", "dq", "dk", "dv"), (rq, rq, rk, rk), got, clean):
            assert np.isfinite(g[rows].astype(np.float32)).all(), f"{name} of sequence {b}"
            if name == "dq":
                np.testing.assert_allclose(g[rows].astype(np.float32), c[rows].astype(np.float32),
                                           rtol=2**-6, atol=1e-3, err_msg=f"dq of sequence {b}")
            else:
                np.testing.assert_array_equal(g[rows], c[rows], err_msg=f"{name} of sequence {b}")


SEQUENCES_APART_OPTIONS = [dict(), dict(causal=True), dict(dropout_p=0.2, dropout_seed=7)]


@pytest.mark.parametrize("options", SEQUENCES_APART_OPTIONS, ids=["dense", "causal", "dropout"])
def test_numpy_keeps_each_sequence_apart_from_the_next_ones_rows(rng, options):
    check_sequences_kept_apart(np, rng, 32, 16, options)


@pytest.mark.gpu
@pytest.mark.parametrize("d, dv", [(64, 64), (128, 128), (192, 128), (256, 256)])
@pytest.mark.parametrize("options", SEQUENCES_APART_OPTIONS, ids=["dense", "causal", "dropout"])
def test_gpu_keeps_each_sequence_apart_from_the_next_ones_rows(xp_gpu, rng, d, dv, options):
    check_sequences_kept_apart(xp_gpu, rng, d, dv, options)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_equals_dense_per_sequence(xp_gpu, rng, monkeypatch, d):
    """Each sequence through the dense API (sm80 family: CUFLASH_DISABLE_SM90) gives the same
    numbers bit for bit: same kernel, same tiles, same arithmetic; deterministic backward too.
    With the Hopper families the dense results differ in rounding only (both pass the rule,
    checked by the other tests)."""
    monkeypatch.setenv("CUFLASH_DISABLE_SM90", "1")
    (q, k, v, cu_q, cu_k, max_q, max_k), slopes = make_case(
        rng, xp_gpu, ml_dtypes.bfloat16, [130, 1, 257], [200, 64, 257], hq=4, hkv=2, d=d,
        alibi="sequences")
    options = dict(causal=True, window=(90, 0), softcap=20.0, deterministic=True)
    out, vjp = cuflash.attention_varlen_vjp(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes=slopes,
                                            **options)
    dout = random_array(rng, out.shape, q.dtype, xp=xp_gpu)
    grads = vjp(dout)
    for b, rq, rk in varlen_sequences(cu_q, cu_k):
        heads = [xp_gpu.ascontiguousarray(x[r].transpose(1, 0, 2))
                 for x, r in ((q, rq), (k, rk), (v, rk))]
        o, dense_vjp = cuflash.attention_vjp(*heads, alibi_slopes=slopes[b], **options)
        np.testing.assert_array_equal(to_np(o.transpose(1, 0, 2)), to_np(out[rq]))
        dense_grads = dense_vjp(xp_gpu.ascontiguousarray(dout[rq].transpose(1, 0, 2)))
        for g, got, rows in zip(dense_grads, grads, (rq, rk, rk)):
            np.testing.assert_array_equal(to_np(g.transpose(1, 0, 2)), to_np(got[rows]))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
def test_gpu_given_gradients(xp_gpu, rng, layout):
    check_given_gradients(xp_gpu, rng, ml_dtypes.bfloat16, layout, deterministic=True)


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bit_identical(xp_gpu, rng):
    (q, k, v, cu_q, cu_k, max_q, max_k), _ = make_case(
        rng, xp_gpu, ml_dtypes.bfloat16, [700, 3, 1500], hq=8, hkv=2, d=128)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                        return_lse=True)
    dout = random_array(rng, out.shape, q.dtype, xp=xp_gpu)
    runs = [cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                              causal=True, deterministic=True) for _ in range(2)]
    for first, second in zip(*runs):
        np.testing.assert_array_equal(to_np(first), to_np(second))


@pytest.mark.gpu
def test_gpu_offsets_on_the_host_and_unchecked(xp_gpu, rng, seed):
    """NumPy offsets with CuPy inputs (copied to the device, checked without a synchronisation)
    and device offsets with check_offsets=False give the checked call's numbers."""
    (q, k, v, cu_q, cu_k, max_q, max_k), _ = make_case(rng, xp_gpu, np.float16, MIXED_Q, MIXED_K)
    checked = cuflash.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    host = cuflash.attention_varlen(q, k, v, cu_q.get(), cu_k.get(), max_q, max_k, causal=True)
    unchecked = cuflash.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                         check_offsets=False)
    for other in (host, unchecked):
        np.testing.assert_array_equal(to_np(other), to_np(checked))


@pytest.mark.gpu
def test_gpu_device_offsets_are_checked(xp_gpu, rng):
    (q, k, v, _, cu_k, max_q, max_k), _ = make_case(rng, xp_gpu, np.float16, [3, 5], [4, 6])
    bad = xp_gpu.asarray(np.array([0, 6, 8], np.int32))
    with pytest.raises(ValueError, match="max_seqlen_q must be at least"):
        cuflash.attention_varlen(q, k, v, bad, cu_k, 5, max_k)


@pytest.mark.gpu
def test_gpu_plan_names_the_family(xp_gpu, rng):
    from cuflash import _api, kernels

    (q, k, v, cu_q, cu_k, max_q, max_k), _ = make_case(rng, xp_gpu, ml_dtypes.bfloat16, [5, 9],
                                                        d=128)
    _, spec = _api._varlen_spec(q, k, v, cu_q, cu_k, max_q, max_k)
    hopper = q.device.compute_capability == "90"
    assert kernels.plan("forward", spec, (q, k, v, q)).family.name == ("sm90-tma" if hopper else "sm80-mma")
    assert kernels.plan("backward", spec, (q, k, v, q, q, q, k, v)).family.name == (
        "sm90-wgmma" if hopper else "sm80-mma")


@pytest.mark.gpu
def test_gpu_float32_is_refused(xp_gpu, rng):
    (q, k, v, cu_q, cu_k, max_q, max_k), _ = make_case(rng, xp_gpu, np.float32, [5, 9])
    with pytest.raises(ValueError, match="not implemented in the float32 kernels"):
        cuflash.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)


@pytest.mark.parametrize("max_len, runs", [(4096, True), (2**30 - 8, True), (2**30, False), (2**31 - 1, False)])
def test_packed_calls_whose_band_sums_pass_int32_are_refused(monkeypatch, max_len, runs):
    """Packed sequences' band sides reach min(max_seqlen, rows in all) (``kernel_band``), and the
    kernels add a query side and a key count in int32: 2**30 + 8 query and key rows in all with
    max_seqlen bounds of 2**30 or more are refused with that reason by every family (a ValueError, on
    a made-up device: the arrays take no memory), and run where the bounds are tighter."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    total = 2**30 + 8
    q = device.empty((total, 1, 64), np.float16)
    cu = device.empty((2,), np.int32)
    call = partial(cuflash.attention_varlen, q, q, q, cu, cu, max_len, max_len, window=(16, 10**12),
                   check_offsets=False)  # fake offsets cannot be read back
    if runs:
        call()
        assert device.take_launches()
        return
    with pytest.raises(ValueError, match=r"min\(max_seqlen_q, total_q\) \+ min\(max_seqlen_k, total_k\) "
                                         r"must be below 2\*\*31"):
        call()
    assert not device.take_launches()


def test_a_backward_without_query_rows_keeps_its_buffers_like_any_other(monkeypatch):
    """A packed backward with no query rows only fills dk and dv with zeros; under a CUDA-graph
    capture those fills are the graph's work too, so its allocations and spec (the offsets'
    device copy) must be kept with its results as any backward's are."""
    from cuflash import _calls

    kept = []
    monkeypatch.setattr(_calls.CapturedAllocations, "keep",
                        lambda self, outputs, spec: kept.append(outputs))
    rng = np.random.default_rng(0)
    q, dout, out = (np.zeros((0, 2, 32), np.float32) for _ in range(3))
    k, v = (rng.standard_normal((5, 2, 32)).astype(np.float32) for _ in range(2))
    lse = np.zeros((2, 0), np.float32)
    cu_q, cu_k = offsets([0, 0]), offsets([2, 3])
    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 0, 3)
    assert len(kept) == 1 and all(a is b for a, b in zip(kept[0], grads))
    assert not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("side", ["queries", "keys"])
def test_packed_tiles_whose_rows_pass_int32_are_passed_over(monkeypatch, side):
    """The Hopper TMA forward (192-row query tiles against 128-key tiles here) and the
    warp-specialised dK/dV kernel (128-key tiles) cut each packed sequence into its own tiles and
    count their rows in the packed arrays in int32 (the sequence's first row plus the tile's, up
    to a tile past its end): the host knows the totals, not where each sequence starts, so total
    rows plus a tile's padding must stay below 2**31. At 2**31 - 1 they run; one row more and
    the Hopper families pass the call on to the mma.sync kernels, naming the bound. (Query rows
    that many are refused by the backward's workspace rows already, so only their forward runs
    here. A made-up device: the arrays take no memory; the offsets are never read.)"""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash import kernels

    device = FakeDevice(monkeypatch, compute_capability="90")
    plans = []
    planned = kernels.plan
    monkeypatch.setattr(kernels, "plan", lambda *args: plans.append(planned(*args)) or plans[-1])
    tile, total, short = (192, "total_q", 256) if side == "queries" else (128, "total_k", 256)
    cu = device.empty((2,), np.int32)
    for rows, runs in ((2**31 - tile, True), (2**31 - tile + 1, False)):
        q_rows, k_rows = (rows, short) if side == "queries" else (short, rows)
        q = device.empty((q_rows, 1, 64), ml_dtypes.bfloat16)
        k = device.empty((k_rows, 1, 64), ml_dtypes.bfloat16)
        out, lse = cuflash.attention_varlen(q, k, k, cu, cu, 128, 128, return_lse=True, check_offsets=False)
        passes = [plans[-1]]
        if side == "keys":
            cuflash.attention_varlen_backward(out, q, k, k, out, lse, cu, cu, 128, 128, check_offsets=False)
            passes.append(plans[-1])
        hopper = {"forward": "sm90-tma", "backward": "sm90-wgmma"}
        for plan in passes:
            if runs:
                assert plan.family.name == hopper[plan.pass_name], plan.describe()
                continue
            assert plan.family.name == "sm80-mma", plan.describe()
            unit = "query" if side == "queries" else "key"
            assert dict(plan.passed_over)[hopper[plan.pass_name]] == (
                f"counts packed rows in int32 up to a tile past a sequence's end: {total} plus a "
                f"{tile}-row {unit} tile's padding ({tile - 1}) must be below 2**31, got 2,147,483,648")
        if runs:  # the tiles counted on above
            assert passes[0].detail.startswith("192-row query tiles against 128-key tiles")
            assert side == "queries" or passes[1].detail.startswith("the warp-specialised dK/dV kernel")
