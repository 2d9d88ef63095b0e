"""Every invalid call raises TypeError/ValueError naming what was given and what is allowed."""

import math
import re

import ml_dtypes
import numpy as np
import pytest
import scipy.sparse

import cuflash
from cuflash.sparse import BlockMask


def arrays(*shapes, dtype=np.float32):
    rng = np.random.default_rng()
    return tuple(rng.standard_normal(shape).astype(dtype) for shape in shapes)


Q, K, V = arrays((2, 4, 16, 8), (2, 2, 24, 8), (2, 2, 24, 8))


def forward_and_backward(**kwargs):
    """Run the forward and the backward with these options, each on its own, so that both
    validate them: the backward on the forward's results, or on those of a forward without the
    options where the forward refused them. Where one pass refuses them the other must refuse
    them alike (the same type and message), and that error is raised for the caller to check."""
    refusals = []
    try:
        out, lse = cuflash.attention(Q, K, V, return_lse=True, **kwargs)
    except (TypeError, ValueError) as error:
        refusals.append(error)
        out, lse = cuflash.attention(Q, K, V, return_lse=True)
    try:
        grads = cuflash.attention_backward(out, Q, K, V, out, lse, **kwargs)
    except (TypeError, ValueError) as error:
        refusals.append(error)
    if refusals:
        forward, backward = refusals if len(refusals) == 2 else (refusals[0], None)
        assert (type(backward), str(backward)) == (type(forward), str(forward)), (
            f"one pass refused {kwargs} and the other did not, or not alike: {refusals}")
        raise forward
    return out, lse, grads


def assert_same_as(spelled, plain):
    """Options accepted in another spelling (a NumPy scalar, a list) give exactly the results of
    their plain Python form: ``forward_and_backward``'s results under each."""
    for got, want in zip(forward_and_backward(**spelled), forward_and_backward(**plain)):
        for a, b in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- array types

@pytest.mark.parametrize("bad", [[[[1.0]]], 3.0, "q", None])
def test_not_an_array(bad):
    with pytest.raises(TypeError, match=rf"q must be a numpy.ndarray or cupy.ndarray, got "
                                        rf"{type(bad).__name__}"):
        cuflash.attention(bad, K, V)
    with pytest.raises(TypeError, match=rf"v must be a numpy.ndarray or cupy.ndarray, got "
                                        rf"{type(bad).__name__}"):
        cuflash.attention(Q, K, bad)


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.complex64, np.bool_,
                                   ml_dtypes.float8_e4m3fn])
def test_unsupported_dtype(dtype):
    q, k, v = (x.astype(dtype) for x in (Q, K, V))
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=rf"q has dtype {name}; supported dtypes are float16, "
                                        r"bfloat16 \(ml_dtypes.bfloat16\) or float32"):
        cuflash.attention(q, k, v)


def test_mixed_dtypes():
    with pytest.raises(TypeError, match="q and v must have the same dtype, got q: float32 and "
                                        "v: float16"):
        cuflash.attention(Q, K, V.astype(np.float16))
    with pytest.raises(TypeError, match="q and k must have the same dtype, got q: float32 and "
                                        "k: bfloat16"):
        cuflash.attention(Q, K.astype(ml_dtypes.bfloat16), V)


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("bad", [np.ones((), np.float32), np.ones(8, np.float32)])
def test_rank_below_two(bad):
    with pytest.raises(ValueError, match=rf"k must have at least 2 dimensions \(\.\.\., seq_len, "
                                         rf"head_dim\), got shape {re.escape(str(bad.shape))}"):
        cuflash.attention(Q[0, 0], bad, V[0, 0])


def test_two_dimensional_query_is_one_head():
    # q (Nq, D) is (1, Nq, D): one query head, which cannot share two key/value heads.
    with pytest.raises(ValueError, match=r"got 1 query heads \(q \(16, 8\)\) and 2 key/value"):
        cuflash.attention(Q[0, 0], K[0], V[0])


@pytest.mark.parametrize("name, shapes", [
    ("q", ((2, 4, 0, 8), (2, 2, 24, 8), (2, 2, 24, 8))),
    ("k", ((2, 4, 16, 8), (2, 2, 0, 8), (2, 2, 0, 8))),
    ("q", ((2, 4, 16, 0), (2, 2, 24, 0), (2, 2, 24, 8))),
    ("v", ((2, 4, 16, 8), (2, 2, 24, 8), (2, 2, 24, 0))),
    ("q", ((2, 0, 16, 8), (2, 2, 24, 8), (2, 2, 24, 8))),
    ("k", ((2, 4, 16, 8), (2, 0, 24, 8), (2, 0, 24, 8))),
    ("q", ((0, 4, 16, 8), (2, 4, 24, 8), (2, 4, 24, 8))),
])
def test_empty_axes(name, shapes):
    with pytest.raises(ValueError, match=rf"{name} must not have an empty axis, got shape"):
        cuflash.attention(*arrays(*shapes))


def test_head_dim_mismatch():
    q, k, v = arrays((2, 4, 16, 8), (2, 2, 24, 16), (2, 2, 24, 16))
    with pytest.raises(ValueError, match=r"q and k must have the same head dimension .* got q "
                                         r"\(2, 4, 16, 8\) and k \(2, 2, 24, 16\)"):
        cuflash.attention(q, k, v)


@pytest.mark.parametrize("v_shape", [(2, 2, 23, 8), (2, 1, 24, 8)])
def test_key_value_mismatch(v_shape):
    q, k, v = arrays((2, 4, 16, 8), (2, 2, 24, 8), v_shape)
    with pytest.raises(ValueError, match=r"k and v must have the same number of heads and keys"):
        cuflash.attention(q, k, v)


def test_query_heads_not_a_multiple():
    q, k, v = arrays((2, 3, 16, 8), (2, 2, 24, 8), (2, 2, 24, 8))
    with pytest.raises(ValueError, match=r"multiple of the number of key/value heads, got 3 "
                                         r"query heads .* and 2 key/value heads"):
        cuflash.attention(q, k, v)


def test_leading_axes_do_not_broadcast():
    q, k, v = arrays((3, 4, 16, 8), (2, 2, 24, 8), (2, 2, 24, 8))
    with pytest.raises(ValueError, match=r"leading axes of q, k and v must broadcast together, "
                                         r"got q \(3, 4, 16, 8\)"):
        cuflash.attention(q, k, v)


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("scale", [True, np.bool_(False), "0.1", 1j, [0.1], np.array([0.1])])
def test_scale_not_a_real_number(scale):
    with pytest.raises(TypeError, match=r"scale must be a real number or None, got"):
        forward_and_backward(scale=scale)


@pytest.mark.parametrize("scale", [0, 0.0, -0.5, math.inf, -math.inf, math.nan, np.float32("nan")])
def test_scale_not_finite_positive(scale):
    with pytest.raises(ValueError,
                       match=re.escape(f"scale must be finite and positive, got {scale!r}")):
        forward_and_backward(scale=scale)


@pytest.mark.parametrize("scale", [1e39, 3e38, 1e-39, 1e-300, 10**400, np.float64(1e39)],
                         ids=["1e39", "3e38", "1e-39", "1e-300", "10**400", "float64-1e39"])
def test_scale_outside_float32(scale):
    # Finite as a Python float (or not even that), but scale·log2(e) is no normal float32.
    with pytest.raises(ValueError, match=r"scale must be finite and positive, got "):
        forward_and_backward(scale=scale)


@pytest.mark.parametrize("scale", [1, 0.25, np.float16(0.5), np.int64(2), np.float64(0.1),
                                   1e3, 2e-38])
def test_scale_accepts_real_numbers(scale):
    assert_same_as(dict(scale=scale), dict(scale=float(scale)))


@pytest.mark.parametrize("option", ["causal", "return_lse"])
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_forward_flags_must_be_bool(option, value):
    with pytest.raises(TypeError, match=rf"{option} must be True or False, got {value!r}"):
        cuflash.attention(Q, K, V, **{option: value})


@pytest.mark.parametrize("value", [1, "yes", None])
def test_deterministic_must_be_bool(value):
    out, lse = cuflash.attention(Q, K, V, return_lse=True)
    with pytest.raises(TypeError, match=rf"deterministic must be True or False, got {value!r}"):
        cuflash.attention_backward(out, Q, K, V, out, lse, deterministic=value)
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        cuflash.attention_vjp(Q, K, V, deterministic=value)


@pytest.mark.parametrize("wrong", [dict(q=Q.astype(np.float64)), dict(k=K[..., :4]),
                                   dict(scale=-1.0), dict(window=(-2, 0))],
                         ids=["q_dtype", "k_shape", "scale", "window"])
def test_vjp_checks_deterministic_where_the_backward_does(wrong):
    """A vjp call wrong in deterministic and in an argument the backward checks before it names
    that argument, as attention_backward does with the same arguments."""
    out, lse = cuflash.attention(Q, K, V, return_lse=True)
    arrays = dict(q=Q, k=K, v=V)
    options = dict(wrong, deterministic=1)
    for name in arrays:
        arrays[name] = options.pop(name, arrays[name])
    with pytest.raises((TypeError, ValueError)) as backward:
        cuflash.attention_backward(out, *arrays.values(), out, lse, **options)
    assert not str(backward.value).startswith("deterministic")
    with pytest.raises(type(backward.value)) as vjp:
        cuflash.attention_vjp(*arrays.values(), **options)
    assert str(vjp.value) == str(backward.value)


def test_causal_accepts_numpy_bool():
    assert_same_as(dict(causal=np.bool_(True)), dict(causal=True))


class DuckMask:
    """Everything a BlockMask has, but not a BlockMask."""
    shape, block_size, num_heads, nblocks = (16, 24), (16, 16), None, (1, 2)

    def check_compatible(self, Nq, Nk, Hq):
        pass

    def to_dense(self):
        return np.ones((1, 1, 2), bool)


@pytest.mark.parametrize("mask", [np.ones((1, 1, 1), bool), "causal", object(), DuckMask()])
def test_block_mask_type(mask):
    with pytest.raises(TypeError, match=r"block_mask must be a cuflash.sparse.BlockMask or None, "
                                        r"got"):
        forward_and_backward(block_mask=mask)


@pytest.mark.parametrize("mask, hint", [
    (scipy.sparse.eye(2, format="csr", dtype=bool), "BlockMask.from_scipy(pattern, level="),
    ([scipy.sparse.eye(2, format="csr", dtype=bool)], "BlockMask.from_scipy(pattern, level="),
    (np.ones((1, 2), bool), "BlockMask.from_dense(array, block_size="),
], ids=["scipy", "scipy-per-head", "dense"])
def test_block_mask_given_as_a_pattern_says_how_to_build_one(mask, hint):
    with pytest.raises(TypeError, match=r"block_mask must be a cuflash.sparse.BlockMask") as error:
        forward_and_backward(block_mask=mask)
    assert hint in str(error.value)


def test_block_mask_checks_its_own_sizes():
    mask = BlockMask.from_dense(np.ones((2, 2), bool), block_size=16, shape=(20, 24))
    with pytest.raises(ValueError, match=r"block_mask was built for Nq=20, Nk=24, but the inputs "
                                         r"have Nq=16, Nk=24"):
        forward_and_backward(block_mask=mask)


# ----------------------------------------------------------------------------- window

@pytest.mark.parametrize("window", [3, None, "ab", (1,), (1, 2, 3), np.array([1, 2]), (1.0, 2),
                                    (True, 0), (0, np.bool_(False)), (1, "2"), {1: 2, 3: 4}])
def test_window_not_a_pair_of_ints(window):
    with pytest.raises(TypeError, match=r"window must be a pair \(left, right\) of integers, each "
                                        r"-1 \(unbounded\) or >= 0, got "):
        forward_and_backward(window=window)


@pytest.mark.parametrize("window, side", [((-2, 0), "left = -2"), ((0, -5), "right = -5"),
                                          ((np.int64(-3), 1), "left = -3")])
def test_window_below_minus_one(window, side):
    with pytest.raises(ValueError, match=rf"window must be a pair .* got .*\({side}\)"):
        forward_and_backward(window=window)


@pytest.mark.parametrize("window", [(-1, -1), [3, 4], (np.int64(2), -1), (0, 0), (10**30, 5)])
def test_window_accepts(window):
    plain = tuple(int(side) for side in window)
    assert_same_as(dict(window=window), dict(window=plain))
    assert_same_as(dict(window=window, causal=True), dict(window=plain, causal=True))


# ----------------------------------------------------------------------------- softcap

@pytest.mark.parametrize("softcap", [True, "1", 1j, None, [1.0], np.array(30.0)])
def test_softcap_not_a_real_number(softcap):
    with pytest.raises(TypeError, match=r"softcap must be 0.0 \(off\) or a finite positive real "
                                        r"number, got "):
        forward_and_backward(softcap=softcap)


@pytest.mark.parametrize("softcap", [-1.0, -1e-30, math.nan, math.inf, -math.inf, 10**400,
                                     np.float32("nan")],
                         ids=["-1", "-1e-30", "nan", "inf", "-inf", "10**400", "float32-nan"])
def test_softcap_not_finite_positive(softcap):
    with pytest.raises(ValueError, match=r"softcap must be 0.0 \(off\) or a finite positive real "
                                         r"number, got "):
        forward_and_backward(softcap=softcap)


@pytest.mark.parametrize("softcap", [1e-45, 1e-39, 3e38])
def test_softcap_outside_float32(softcap):
    # scale / softcap or softcap·log2(e) would not be a normal float32.
    with pytest.raises(ValueError, match=r"softcap must be .* outside the range the computation "
                                         r"supports with scale=0.353553"):
        forward_and_backward(softcap=softcap)


@pytest.mark.parametrize("softcap", [0, 0.0, -0.0, 30, np.float32(5.0), np.int64(1), 1e30])
def test_softcap_accepts(softcap):
    assert_same_as(dict(softcap=softcap), dict(softcap=float(softcap)))


# ----------------------------------------------------------------------------- alibi_slopes

SLOPES = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)


@pytest.mark.parametrize("slopes", [SLOPES.tolist(), 0.5, "slopes", (0.5,) * 4])
def test_alibi_not_an_array(slopes):
    with pytest.raises(TypeError, match=r"alibi_slopes must be a float32 numpy.ndarray of shape "
                                        r"\(Hq,\) or \(\.\.\., Hq\), got "):
        forward_and_backward(alibi_slopes=slopes)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, ml_dtypes.bfloat16, np.int32])
def test_alibi_wrong_dtype(dtype):
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=rf"alibi_slopes must have dtype float32, got {name}"):
        forward_and_backward(alibi_slopes=SLOPES.astype(dtype))


@pytest.mark.parametrize("shape", [(), (3,), (5,), (4, 1), (3, 4), (1, 2, 4), (2, 2, 4), (2, 8)])
def test_alibi_wrong_shape(shape):
    # Q is (2, 4, 16, 8): Hq = 4, batch (2,).
    slopes = np.full(shape, 0.5, np.float32)
    with pytest.raises(ValueError, match=rf"alibi_slopes must have shape \(Hq,\) = \(4,\) or "
                                         rf"\(\.\.\., 4\) with leading axes that broadcast to the "
                                         rf"batch axes \(2,\), got shape "
                                         rf"{re.escape(str(shape))}"):
        forward_and_backward(alibi_slopes=slopes)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 3e38])
def test_alibi_not_finite(bad):
    slopes = SLOPES.copy()
    slopes[2] = bad
    with pytest.raises(ValueError, match=r"alibi_slopes must be finite, with \|slope\| <= "
                                         rf"2.36e\+38, got {re.escape(repr(float(slopes[2])))}"):
        forward_and_backward(alibi_slopes=slopes)


@pytest.mark.parametrize("shape", [(4,), (1, 4), (2, 4)])
def test_alibi_accepts_and_is_not_rewritten(shape):
    slopes = np.broadcast_to(SLOPES, shape).copy()
    slopes.flags.writeable = False  # read, never written
    before = slopes.copy()
    forward_and_backward(alibi_slopes=slopes)
    forward_and_backward(alibi_slopes=slopes[..., ::-1])  # any strides
    np.testing.assert_array_equal(slopes, before)


def test_cupy_slopes_are_not_read_back(monkeypatch):
    """The finiteness of CuPy slopes is not checked: reading their values would make every call
    wait for the GPU. Slopes over device memory that nothing may read go through unread."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch)
    q = device.empty((2, 4, 64, 64), ml_dtypes.bfloat16)
    slopes = device.empty((4,), np.float32)
    out, lse = cuflash.attention(q, q, q, alibi_slopes=slopes, return_lse=True)
    cuflash.attention_backward(out, q, q, q, out, lse, alibi_slopes=slopes)


# ----------------------------------------------------------------------------- array subclasses

def test_masked_arrays_are_refused():
    masked = np.ma.masked_array(Q, mask=Q > 1)
    with pytest.raises(TypeError, match=r"q is a numpy.ma.MaskedArray: its mask would be ignored"):
        cuflash.attention(masked, K, V)
    out, lse = cuflash.attention(Q, K, V, return_lse=True)
    with pytest.raises(TypeError, match=r"out is a numpy.ma.MaskedArray: its mask would be "
                                        r"ignored"):
        cuflash.attention(Q, K, V, out=np.ma.masked_array(np.empty_like(out)))
    with pytest.raises(TypeError, match=r"dout is a numpy.ma.MaskedArray"):
        cuflash.attention_backward(np.ma.masked_array(out), Q, K, V, out, lse)
    with pytest.raises(TypeError, match=r"alibi_slopes is a numpy.ma.MaskedArray"):
        cuflash.attention(Q, K, V, alibi_slopes=np.ma.masked_array(SLOPES))


def test_a_masked_input_is_pointed_to_exact_masking():
    # Masking pairs element by element is what mask= (an ExactMask) does; block_mask= computes
    # whole blocks, so the hint must not send a user there.
    with pytest.raises(TypeError, match=r"mask=cuflash\.sparse\.ExactMask") as error:
        cuflash.attention(np.ma.masked_array(Q, mask=Q > 1), K, V)
    assert "block_mask" not in str(error.value)
    # Masked slopes or outputs are no attention mask: no such hint for them.
    for call in (lambda: cuflash.attention(Q, K, V, alibi_slopes=np.ma.masked_array(SLOPES)),
                 lambda: cuflash.attention(Q, K, V, out=np.ma.masked_array(np.empty_like(Q)))):
        with pytest.raises(TypeError, match="MaskedArray") as error:
            call()
        assert "express masking" not in str(error.value)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_numpy_matrix_is_refused():
    with pytest.raises(TypeError, match=r"q is a numpy.matrix, .* pass numpy.asarray\(q\)"):
        cuflash.attention(np.asmatrix(Q[0, 0]), K[0, 0], V[0, 0])


# ----------------------------------------------------------------------------- out=

def test_out_wrong_shape():
    with pytest.raises(ValueError,
                       match=r"out must have shape \(2, 4, 16, 8\), got \(2, 4, 16, 9\)"):
        cuflash.attention(Q, K, V, out=np.empty((2, 4, 16, 9), np.float32))


def test_out_wrong_dtype():
    with pytest.raises(TypeError, match=r"out must have dtype float32, got float16"):
        cuflash.attention(Q, K, V, out=np.empty((2, 4, 16, 8), np.float16))


def test_out_not_an_array():
    with pytest.raises(TypeError, match=r"out must be a numpy.ndarray like q, got list"):
        cuflash.attention(Q, K, V, out=[0.0] * 8)


def test_out_read_only():
    out = np.empty((2, 4, 16, 8), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable, got a read-only array"):
        cuflash.attention(Q, K, V, out=out)


def test_out_with_overlapping_elements():
    out = np.lib.stride_tricks.as_strided(np.empty(8, np.float32), (2, 4, 16, 8), (0, 0, 0, 4))
    with pytest.raises(ValueError, match=r"out must not have overlapping elements, got strides "
                                         r"\(0, 0, 0, 4\)"):
        cuflash.attention(Q, K, V, out=out)


def _rows_overlapping(shape):
    """A view of ``shape`` whose rows (the last axis) start one element apart, so overlap."""
    return np.lib.stride_tricks.as_strided(np.empty(math.prod(shape), np.float32), shape,
                                           (shape[1] * shape[2] * 4, shape[2] * 4, 4, 4))


def test_out_with_overlapping_rows():
    with pytest.raises(ValueError, match=r"out must not have overlapping elements, got strides "
                                         r"\(256, 64, 4, 4\) for shape \(2, 4, 16, 8\)"):
        cuflash.attention(Q, K, V, out=_rows_overlapping((2, 4, 16, 8)))
    out, lse = cuflash.attention(Q, K, V, return_lse=True)
    with pytest.raises(ValueError, match=r"dk must not have overlapping elements"):
        cuflash.attention_backward(out, Q, K, V, out, lse, dk=_rows_overlapping(K.shape))


def test_out_with_interleaved_axes_that_do_not_overlap():
    # Row i, column j at element 3i + 2j: axes interleave, yet no two elements meet.
    q, k, v = arrays((2, 8), (5, 8), (5, 3))
    out = np.lib.stride_tricks.as_strided(np.full(8, np.nan, np.float32), (2, 3), (12, 8))
    assert cuflash.attention(q, k, v, out=out) is out
    np.testing.assert_array_equal(out, cuflash.attention(q, k, v))


def test_overlap_listing_stops_at_its_limit(monkeypatch):
    """Interleaved layouts are decided by listing their elements' offsets, up to
    MAX_LISTED_ELEMENTS; past it they are taken not to overlap (a KV cache's offsets would not
    fit in memory), while a stride of 0 is told at any size."""
    from cuflash import _checks

    interleaved_overlapping = ((4, 3), (8, 12), 4)  # (3, 0) and (0, 2) both at byte 24
    assert _checks.has_overlapping_elements(*interleaved_overlapping)
    monkeypatch.setattr(_checks, "MAX_LISTED_ELEMENTS", 11)
    assert not _checks.has_overlapping_elements(*interleaved_overlapping)
    assert _checks.has_overlapping_elements((1 << 40, 2), (0, 4), 4)
    assert not _checks.has_overlapping_elements((1 << 40, 8), (32, 4), 4)  # nested: no listing


def test_out_overlapping_an_input():
    q, k, v = arrays((2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8))
    with pytest.raises(ValueError, match="out must not share memory with q"):
        cuflash.attention(q, k, v, out=q)
    buffer = np.empty((2, 4, 16, 16), np.float32)
    buffer[..., 8:] = v
    with pytest.raises(ValueError, match="out must not share memory with v"):
        cuflash.attention(q, k, buffer[..., 8:], out=buffer[..., 7:15])


def test_out_next_to_an_input_is_fine():
    q, k, v = arrays((2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8))
    buffer = np.empty((2, 4, 16, 16), np.float32)
    buffer[..., :8] = q
    result = cuflash.attention(buffer[..., :8], k, v, out=buffer[..., 8:])
    assert result is not None and np.shares_memory(result, buffer)
    np.testing.assert_array_equal(buffer[..., :8], q)  # the input beside it untouched
    np.testing.assert_array_equal(buffer[..., 8:], cuflash.attention(q, k, v))


# ----------------------------------------------------------------------------- backward inputs

def test_backward_arguments():
    out, lse = cuflash.attention(Q, K, V, return_lse=True)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 4, 16, 8\), got \(2, 4, 8\)"):
        cuflash.attention_backward(out[:, :, :8, 0], Q, K, V, out, lse)
    with pytest.raises(TypeError, match=r"out must have dtype float32, got float16"):
        cuflash.attention_backward(out, Q, K, V, out.astype(np.float16), lse)
    with pytest.raises(TypeError, match=r"lse must have dtype float32, got float64"):
        cuflash.attention_backward(out, Q, K, V, out, lse.astype(np.float64))
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 4, 16\), got \(2, 4, 16, 1\)"):
        cuflash.attention_backward(out, Q, K, V, out, lse[..., None])
    with pytest.raises(TypeError, match=r"dout must be a numpy.ndarray like q, got list"):
        cuflash.attention_backward(out.tolist(), Q, K, V, out, lse)


# ----------------------------------------------------------------------------- dq=, dk=, dv=

def _backward_into(**grads):
    out, lse = cuflash.attention(Q, K, V, return_lse=True)
    return cuflash.attention_backward(out, Q, K, V, out, lse, **grads)


def _read_only(shape):
    x = np.empty(shape, np.float32)
    x.flags.writeable = False
    return x


@pytest.mark.parametrize("grads, error, message", [
    (dict(dq=np.empty((2, 4, 16, 9), np.float32)), ValueError,
     r"dq must have shape \(2, 4, 16, 8\), got \(2, 4, 16, 9\)"),
    (dict(dk=np.empty((2, 4, 16, 8), np.float32)), ValueError,  # q's shape, not k's
     r"dk must have shape \(2, 2, 24, 8\), got \(2, 4, 16, 8\)"),
    (dict(dv=np.empty((2, 2, 24, 8), np.float16)), TypeError,
     r"dv must have dtype float32, got float16"),
    (dict(dq=[0.0] * 8), TypeError, r"dq must be a numpy.ndarray like q, got list"),
    (dict(dk=np.ma.masked_array(np.empty((2, 2, 24, 8), np.float32))), TypeError,
     r"dk is a numpy.ma.MaskedArray"),
    (dict(dv=_read_only((2, 2, 24, 8))), ValueError, "dv must be writable, got a read-only array"),
    (dict(dq=np.lib.stride_tricks.as_strided(np.empty(8, np.float32), (2, 4, 16, 8),
                                             (0, 0, 0, 4))), ValueError,
     r"dq must not have overlapping elements, got strides \(0, 0, 0, 4\)"),
])
def test_given_gradient_wrong(grads, error, message):
    with pytest.raises(error, match=message):
        _backward_into(**grads)


def test_given_float32_gradients_need_grad_dtype_float32():
    q, k, v = (x.astype(ml_dtypes.bfloat16) for x in (Q, K, V))
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    wide = np.empty(q.shape, np.float32)
    with pytest.raises(TypeError, match=r"dq must have dtype bfloat16, got float32"):
        cuflash.attention_backward(out, q, k, v, out, lse, dq=wide)
    with pytest.raises(TypeError, match=r"dq must have dtype float32, got bfloat16"):
        cuflash.attention_backward(out, q, k, v, out, lse, dq=np.empty_like(q),
                                   grad_dtype=np.float32)
    cuflash.attention_backward(out, q, k, v, out, lse, dq=wide, grad_dtype=np.float32)


@pytest.mark.parametrize("value", [np.float32(0.5), np.float16(1.0)], ids=["float32", "float16"])
def test_grad_dtype_that_is_a_number_is_a_type_error(value):
    """A NumPy number is no dtype, though numpy.dtype() reads it as its own: grad_dtype=np.float32(0.5)
    is refused as grad_dtype=0.5 is, not taken for float32 gradients."""
    out, lse = cuflash.attention(Q, K, V, return_lse=True)
    with pytest.raises(TypeError, match="grad_dtype must be None, a dtype or a dtype's name"):
        cuflash.attention_backward(out, Q, K, V, out, lse, grad_dtype=value)


@pytest.mark.parametrize("name, shared", [
    ("q", "dq"), ("k", "dq"), ("v", "dk"), ("dout", "dk"), ("out", "dv"), ("lse", "dq")])
def test_given_gradient_overlapping_an_argument(name, shared):
    out, lse = cuflash.attention(Q, K, V, return_lse=True)
    arrays = dict(dout=out.copy(), q=Q, k=K, v=V, out=out, lse=lse)
    grad_shape = dict(dq=Q.shape, dk=K.shape, dv=V.shape)[shared]
    # The argument and the gradient in one buffer, sharing one element.
    size = arrays[name].size
    buffer = np.empty(size - 1 + math.prod(grad_shape), np.float32)
    arrays[name] = buffer[:size].reshape(arrays[name].shape)
    arrays[name][...] = dict(dout=out, q=Q, k=K, v=V, out=out, lse=lse)[name]
    grad = buffer[size - 1:].reshape(grad_shape)
    with pytest.raises(ValueError, match=f"{shared} must not share memory with {name}"):
        cuflash.attention_backward(*(arrays[n] for n in ("dout", "q", "k", "v", "out", "lse")),
                                   **{shared: grad})


def test_given_gradients_overlapping_one_another():
    dk = np.empty(K.shape, np.float32)
    with pytest.raises(ValueError, match="dv must not share memory with dk"):
        _backward_into(dk=dk, dv=dk)
    buffer = np.empty((2, 2, 24, 16), np.float32)
    with pytest.raises(ValueError, match="dv must not share memory with dk"):
        _backward_into(dk=buffer[..., :8], dv=buffer[..., 7:15])
    _backward_into(dk=buffer[..., :8], dv=buffer[..., 8:])  # side by side is fine


@pytest.mark.parametrize("name, value", [("grad_dtype", np.float32), ("dq", np.empty_like(Q)),
                                         ("return_lse", True), ("out", np.empty_like(Q))])
def test_attention_vjp_takes_no_backward_buffers_or_forward_outputs(name, value):
    with pytest.raises(TypeError, match=name):
        cuflash.attention_vjp(Q, K, V, **{name: value})
    out, vjp = cuflash.attention_vjp(Q, K, V, deterministic=True)
    assert [g.shape for g in vjp(out)] == [Q.shape, K.shape, V.shape]


# ----------------------------------------------------------------------------- CuPy specifics

@pytest.mark.gpu
def test_mixed_numpy_and_cupy(xp_gpu):
    with pytest.raises(TypeError, match=r"q and k must both be NumPy arrays or both be CuPy "
                                        r"arrays, got q: numpy.ndarray and k: cupy.ndarray"):
        cuflash.attention(Q, xp_gpu.asarray(K), V)
    q, k, v = (xp_gpu.asarray(x.astype(np.float16)) for x in (Q, K, V))
    with pytest.raises(TypeError, match=r"out must be a cupy.ndarray like q, got numpy.ndarray"):
        cuflash.attention(q, k, v, out=np.empty((2, 4, 16, 8), np.float16))


@pytest.mark.gpu
def test_alibi_slopes_on_the_host_with_cupy_inputs(xp_gpu):
    q, k, v = (xp_gpu.asarray(x.astype(np.float16)) for x in (Q, K, V))
    with pytest.raises(TypeError, match=r"alibi_slopes must be a float32 cupy.ndarray of shape "
                                        r"\(Hq,\) or \(\.\.\., Hq\) on device 0 like q, got "
                                        r"numpy.ndarray in host memory"):
        cuflash.attention(q, k, v, alibi_slopes=SLOPES)
    with pytest.raises(TypeError, match=r"alibi_slopes must be a float32 numpy.ndarray of shape "
                                        r"\(Hq,\) or \(\.\.\., Hq\) in host memory like q, got "
                                        r"cupy.ndarray on device 0"):
        cuflash.attention(Q, K, V, alibi_slopes=xp_gpu.asarray(SLOPES))


@pytest.mark.gpu
def test_alibi_slopes_on_another_device(xp_gpu):
    if xp_gpu.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    with xp_gpu.cuda.Device(0):
        q, k, v = (xp_gpu.asarray(x.astype(np.float16)) for x in (Q, K, V))
    with xp_gpu.cuda.Device(1):
        slopes = xp_gpu.asarray(SLOPES)
    with pytest.raises(ValueError, match=r"alibi_slopes must be on device 0 like q, got device 1"):
        cuflash.attention(q, k, v, alibi_slopes=slopes)


@pytest.mark.gpu
def test_arrays_on_different_devices(xp_gpu):
    if xp_gpu.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    with xp_gpu.cuda.Device(0):
        q, k = (xp_gpu.asarray(x.astype(np.float16)) for x in (Q, K))
    with xp_gpu.cuda.Device(1):
        v = xp_gpu.asarray(V.astype(np.float16))
    with pytest.raises(ValueError, match=r"all arrays must be on one CUDA device, got q on "
                                         r"device 0 and v on device 1"):
        cuflash.attention(q, k, v)


def test_arrays_at_addresses_between_elements_are_copied_for_the_kernels():
    """A CuPy view whose first element sits between two elements' addresses (a float16 array
    one byte into a buffer) is read by the kernels through a copy: their element loads need
    whole-element addresses, whatever its strides."""
    cupy = pytest.importorskip("cupy")
    from cuflash import _checks

    def at(address):
        memory = cupy.cuda.UnownedMemory(address, 64, None, device_id=0)
        return cupy.ndarray((4, 8), np.float16, memptr=cupy.cuda.MemoryPointer(memory, 0))

    assert _checks.kernel_ready(at(1 << 32))
    assert not _checks.kernel_ready(at((1 << 32) + 1))
    assert _checks.kernel_ready(np.zeros((4, 8), np.float16))
