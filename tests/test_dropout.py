"""Attention dropout: the random contract of ``cuflash._dropout`` (Philox4x32-7), the NumPy path
against the float64 oracle given the same mask, its statistics, the seed rule, the checks, and
which GPU families take it (the sm80 ones; tests/test_dropout_gpu.py runs them)."""

from __future__ import annotations

import functools
import math
import types

import ml_dtypes
import numpy as np
import pytest

import cuflash
from cuflash import _api, _dropout, cpu, kernels, reference
from oracle import assert_backward_close, assert_forward_close, random_array

# ----------------------------------------------------------------------------- the generator

# Random123's known-answer vectors for Philox4x32-7 (the mask's generator) and Philox4x32-10 (the
# same round function, cuRAND's count): (counter, key, output) by rounds.
_INPUTS = [((0, 0, 0, 0), (0, 0)), ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0))]
_OUTPUTS = {
    7: [(0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48), (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662),
        (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)],
    10: [(0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)],
}
KAT = [(rounds, counter, key, expected)
       for rounds, outputs in _OUTPUTS.items() for (counter, key), expected in zip(_INPUTS, outputs)]


def test_the_mask_draws_from_philox4x32_7():
    assert _dropout.ROUNDS == 7


@pytest.mark.parametrize("rounds, counter, key, expected", KAT)
def test_philox_known_answers(rounds, counter, key, expected):
    assert tuple(int(w) for w in _dropout.philox4x32(counter, key, rounds)) == expected


def test_philox_is_elementwise_over_arrays():
    counters = [np.array([c[i] for c, _ in _INPUTS], np.uint32) for i in range(4)]
    keys = [np.array([k[i] for _, k in _INPUTS], np.uint32) for i in range(2)]
    words = _dropout.philox4x32(counters, keys)
    assert [tuple(int(w[n]) for w in words) for n in range(3)] == _OUTPUTS[_dropout.ROUNDS]


def test_keep_mask_follows_the_documented_counter_layout():
    """Element (b, h, i, j): key (seed lo, seed hi), counter (j // 16, i, b·Hq + h, offset),
    byte j % 16 (byte c of word w is byte 4w + c, little-endian), kept when the byte is at least
    round(p · 256)."""
    seed, offset, p, hq = 0x0123456789ABCDEF, 77, 0.3, 5
    dense = _dropout.dense_keep(seed, offset, p, (2, 3), hq, np.arange(9), 37)
    assert dense.shape == (2, 3, hq, 9, 37)
    threshold = 77  # round(0.3 · 256) = round(76.8)
    # Every element, its byte taken from the four words laid out little-endian, 16 bytes a call
    # (not by the library's shifts): every byte position of a call is compared, its value too.
    b, h, i, j = np.meshgrid(np.arange(6), np.arange(hq), np.arange(9), np.arange(37),
                             indexing="ij")  # b: the flattened batch index
    words = _dropout.philox4x32((j // 16, i, b * hq + h, np.full(j.shape, offset)),
                                (seed & 0xFFFFFFFF, seed >> 32))
    call_bytes = np.stack(words, axis=-1).astype("<u4").view(np.uint8)  # (..., 16)
    byte = np.take_along_axis(call_bytes, (j % 16)[..., None], axis=-1)[..., 0]
    np.testing.assert_array_equal(_dropout.draws(seed, offset, hq, b, h, i, j), byte)
    np.testing.assert_array_equal(dense.reshape(6, hq, 9, 37), byte >= threshold)


@pytest.mark.parametrize("p,threshold", [
    (0.0, 0), (0.1, 26), (0.5, 128), (0.25, 64), (1 / 512, 1), (3 / 512, 2),
    (np.nextafter(1 / 512, 0.0), 0), (0.998, 255), (np.nextafter(1.0, 0.0), 255)])
def test_threshold_rounds_p_to_a_multiple_of_1_256(p, threshold):
    assert _dropout.threshold(p) == threshold
    assert _dropout.effective_p(p) == threshold / 256
    assert _dropout.rescale(p) == 1.0 / (1.0 - threshold / 256)


def test_rates_that_round_to_no_dropout_are_refused(rng):
    q, k, v = _inputs(rng, (1, 1, 8, 16), (1, 1, 8, 16), np.float32)
    with pytest.raises(ValueError, match="below 1/512"):
        cuflash.attention(q, k, v, dropout_p=0.001, dropout_seed=1)
    out = cuflash.attention(q, k, v, dropout_p=1 / 512, dropout_seed=1)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_within_binomial_bounds(p):
    keep = _dropout.dense_keep(12345, 0, p, (2,), 4, np.arange(128), 257)
    n, rate = keep.size, _dropout.effective_p(p)
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(keep.sum() - n * (1 - rate)) <= 5 * sigma
    # Each of the 16 bytes of a Philox call, and each row, keeps at the same rate.
    for byte in range(16):
        column = keep[..., byte::16]
        bound = 5 * math.sqrt(column.size * rate * (1 - rate))
        assert abs(column.sum() - column.size * (1 - rate)) <= bound


def test_masks_of_different_seeds_offsets_heads_are_unrelated():
    base = _dropout.dense_keep(1, 0, 0.5, (1,), 2, np.arange(64), 64)
    for other in (_dropout.dense_keep(2, 0, 0.5, (1,), 2, np.arange(64), 64),
                  _dropout.dense_keep(1, 1, 0.5, (1,), 2, np.arange(64), 64),
                  _dropout.dense_keep(2**32 + 1, 0, 0.5, (1,), 2, np.arange(64), 64)):
        agreement = (base == other).mean()
        assert 0.45 < agreement < 0.55
    assert 0.45 < (base[0, 0] == base[0, 1]).mean() < 0.55


# ----------------------------------------------------------------------------- the NumPy path

def _inputs(rng, shape_q, shape_kv, dtype, dv=None):
    q = random_array(rng, shape_q, dtype)
    k = random_array(rng, shape_kv, dtype)
    v = random_array(rng, shape_kv[:-1] + (dv or shape_kv[-1],), dtype)
    return q, k, v


CASES = [
    dict(),
    dict(causal=True),
    dict(window=(20, 5), softcap=15.0),
    dict(causal=True, alibi=True),
]


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32],
                         ids=["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", CASES, ids=["plain", "causal", "window-softcap", "causal-alibi"])
def test_forward_and_gradients_match_the_oracle(rng, seed, dtype, case):
    """GQA (4 query heads over 2 key/value heads), Nq != Nk, Dv != D, p = 0.2."""
    q, k, v = _inputs(rng, (2, 4, 70, 32), (2, 2, 90, 32), dtype, dv=48)
    options = {name: value for name, value in case.items() if name != "alibi"}
    if case.get("alibi"):
        options["alibi_slopes"] = (2.0 ** -np.arange(1, 5)).astype(np.float32)
    dropout = dict(dropout_p=0.2, dropout_seed=seed, dropout_offset=3)
    out, lse = cuflash.attention(q, k, v, **options, **dropout, return_lse=True)
    assert_forward_close(out, lse, q, k, v, **options, **dropout, context=f"seed={seed}")
    dout = random_array(rng, out.shape, dtype)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **options, **dropout)
    assert_backward_close(grads, dout, q, k, v, **options, **dropout, context=f"seed={seed}")


def test_broadcast_batch_uses_the_flattened_batch_index(rng, seed):
    """q (2, 1, ...) against k, v (1, 3, ...): six batch elements, six different masks."""
    q = random_array(rng, (2, 1, 2, 40, 32), np.float16)
    k = random_array(rng, (1, 3, 2, 50, 32), np.float16)
    v = random_array(rng, (1, 3, 2, 50, 32), np.float16)
    dropout = dict(dropout_p=0.3, dropout_seed=seed)
    out, lse = cuflash.attention(q, k, v, **dropout, return_lse=True)
    assert out.shape == (2, 3, 2, 40, 32)
    assert_forward_close(out, lse, q, k, v, **dropout, context=f"seed={seed}")
    dout = random_array(rng, out.shape, np.float16)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **dropout)
    assert_backward_close(grads, dout, q, k, v, **dropout, context=f"seed={seed}")


def test_attention_probs_carry_the_mask_in_their_signs(rng):
    """reference.attention_probs: the softmax matrix, negated where the call drops; its kept part
    times the rescale, applied to v, is the output, and its signs are the documented mask."""
    q, k, v = _inputs(rng, (2, 4, 33, 16), (2, 2, 50, 16), np.float32)
    options = dict(causal=True, softcap=8.0, dropout_p=0.2, dropout_seed=11, dropout_offset=4)
    probs = reference.attention_probs(q, k, v, **options)
    assert probs.shape == (2, 4, 33, 50)
    np.testing.assert_allclose(np.abs(probs).sum(-1), 1.0, rtol=1e-12)
    keep = _dropout.dense_keep(11, 4, 0.2, (2,), 4, np.arange(33), 50)
    assert ((probs < 0) == (~keep & (probs != 0))).all()
    out, _ = reference.attention(q, k, v, **options)
    v64 = np.repeat(v.astype(np.float64), 2, axis=1)
    np.testing.assert_allclose(np.maximum(probs, 0) * _dropout.rescale(0.2) @ v64, out,
                               rtol=1e-12, atol=1e-12)
    plain = reference.attention_probs(q, k, v, causal=True, softcap=8.0)
    np.testing.assert_array_equal(np.abs(probs), plain)


def test_lse_is_that_of_the_undropped_softmax(rng):
    q, k, v = _inputs(rng, (1, 2, 50, 32), (1, 2, 60, 32), np.float32)
    _, lse = cuflash.attention(q, k, v, return_lse=True)
    _, lse_dropped = cuflash.attention(q, k, v, dropout_p=0.5, dropout_seed=1, return_lse=True)
    np.testing.assert_array_equal(lse, lse_dropped)


def test_oracle_differs_without_the_mask(rng):
    """The oracle comparison can fail: a result computed with another seed's mask is rejected."""
    q, k, v = _inputs(rng, (2, 4, 70, 32), (2, 4, 70, 32), np.float16)
    out, lse = cuflash.attention(q, k, v, dropout_p=0.2, dropout_seed=1, return_lse=True)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_forward_close(out, lse, q, k, v, dropout_p=0.2, dropout_seed=2)


def test_mean_over_seeds_approaches_the_undropped_output(rng):
    """Each output element is an unbiased estimate: over S seeds its mean lies within a few
    standard errors of the p = 0 output, the standard error coming from the variance
    ``p/(1−p) · Σ_j P_ij² V_j²`` of one draw. The same statistic for the output without the
    1/(1−p) rescaling is far off, so the bound can fail."""
    p, seeds = 0.5, 40
    q, k, v = _inputs(rng, (1, 2, 24, 16), (1, 2, 48, 16), np.float32)
    v = v + np.float32(2)  # outputs away from 0, so that a wrong scale stands out
    plain = cuflash.attention(q, k, v).astype(np.float64)
    mean = np.mean([cuflash.attention(q, k, v, dropout_p=p, dropout_seed=s)
                    for s in range(seeds)], axis=0, dtype=np.float64)
    s = (q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2)) / math.sqrt(16)
    probs = np.exp(s - s.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    variance = p / (1 - p) * (probs**2 @ v.astype(np.float64)**2)
    standard_error = np.sqrt(variance / seeds)
    z = np.abs(mean - plain) / standard_error
    assert z.max() < 6.0, z.max()  # 768 elements: the largest of 768 |normals| is about 3.5
    biased = np.abs(mean * (1 - p) - plain) / standard_error
    assert np.median(biased) > 6.0


def test_same_seed_same_bits_other_seed_or_offset_other_result(rng):
    q, k, v = _inputs(rng, (1, 2, 40, 32), (1, 2, 40, 32), np.float16)
    first = cuflash.attention(q, k, v, dropout_p=0.25, dropout_seed=9)
    np.testing.assert_array_equal(first, cuflash.attention(q, k, v, dropout_p=0.25,
                                                           dropout_seed=9))
    for other in (dict(dropout_seed=10), dict(dropout_seed=9, dropout_offset=1)):
        assert not np.array_equal(first, cuflash.attention(q, k, v, dropout_p=0.25, **other))


def test_results_do_not_depend_on_the_tiles(rng, monkeypatch):
    """Tiles of 128 × 128 and 32 × 48: the masks are the same bits (next test), so the results
    differ only by the order of float32 sums (and BLAS's own blocking of the tile products): by
    units of float16 rounding, where a different mask changes them by a large fraction of their
    size; both pass the oracle with the one mask."""
    q, k, v = _inputs(rng, (1, 4, 100, 32), (1, 2, 130, 32), np.float16)
    options = dict(causal=True, softcap=20.0, dropout_p=0.3, dropout_seed=123)
    out, lse = cuflash.attention(q, k, v, **options, return_lse=True)
    dout = random_array(rng, out.shape, np.float16)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **options)
    monkeypatch.setattr(cpu, "BLOCK_M", 32)
    monkeypatch.setattr(cpu, "BLOCK_N", 48)
    out_small, lse_small = cuflash.attention(q, k, v, **options, return_lse=True)
    grads_small = cuflash.attention_backward(dout, q, k, v, out, lse, **options)
    assert_forward_close(out_small, lse_small, q, k, v, **options)
    assert_backward_close(grads_small, dout, q, k, v, **options)
    other_mask = cuflash.attention(q, k, v, **dict(options, dropout_seed=124))
    assert np.abs(other_mask.astype(np.float32) - out).max() > 0.1 * np.abs(out).max()
    for small, large in zip((out_small, *grads_small), (out, *grads)):
        small, large = small.astype(np.float32), large.astype(np.float32)
        assert np.abs(small - large).max() <= 2**-8 * np.abs(large).max()


def test_mask_of_a_tile_equals_the_dense_mask():
    """The NumPy path's tile masks are slices of the whole problem's mask, whatever the tiles."""
    q = np.zeros((3, 4, 70, 8), np.float16)
    spec = _api._spec(q, q[:, :2], q[:, :2], dropout_p=0.4, dropout_seed=77,
                      dropout_offset=5)[1]
    tiles = cpu._Dropout(spec, 3, 4, 2)
    dense = _dropout.dense_keep(77, 5, 0.4, (3,), 4, np.arange(70), 70).reshape(3, 2, 2, 70, 70)
    for rows, cols in ((slice(0, 32), slice(0, 48)), (slice(32, 70), slice(48, 70)),
                       (slice(5, 6), slice(3, 70))):
        np.testing.assert_array_equal(tiles.keep(rows, cols), dense[..., rows, cols])


def test_zero_dropout_is_bit_identical_to_no_dropout(rng):
    q, k, v = _inputs(rng, (2, 4, 60, 32), (2, 2, 60, 32), np.float16)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    out0, lse0 = cuflash.attention(q, k, v, causal=True, dropout_p=0.0, dropout_seed=5,
                                   dropout_offset=7, return_lse=True)
    np.testing.assert_array_equal(out, out0)
    np.testing.assert_array_equal(lse, lse0)
    dout = random_array(rng, out.shape, np.float16)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    grads0 = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, dropout_p=0.0)
    for g, g0 in zip(grads, grads0):
        np.testing.assert_array_equal(g, g0)
    # The spec is today's: seed and offset are dropped with p = 0.
    assert _api._spec(q, k, v, dropout_p=0.0, dropout_seed=5)[1] == _api._spec(q, k, v)[1]


# ----------------------------------------------------------------------------- the seed rule

def test_vjp_draws_and_remembers_the_seed(rng):
    q, k, v = _inputs(rng, (1, 2, 40, 32), (1, 2, 40, 32), np.float16)
    out, vjp = cuflash.attention_vjp(q, k, v, causal=True, dropout_p=0.3)
    seed = vjp.dropout_seed
    assert isinstance(seed, int) and 0 <= seed < 2**64
    again, lse = cuflash.attention(q, k, v, causal=True, dropout_p=0.3, dropout_seed=seed,
                                   return_lse=True)
    np.testing.assert_array_equal(out, again)
    dout = random_array(rng, out.shape, np.float16)
    for g, expected in zip(vjp(dout), cuflash.attention_backward(
            dout, q, k, v, out, lse, causal=True, dropout_p=0.3, dropout_seed=seed)):
        np.testing.assert_array_equal(g, expected)
    _, other = cuflash.attention_vjp(q, k, v, causal=True, dropout_p=0.3)
    assert other.dropout_seed != seed
    _, given = cuflash.attention_vjp(q, k, v, dropout_p=0.3, dropout_seed=11)
    assert given.dropout_seed == 11
    _, off = cuflash.attention_vjp(q, k, v)
    assert off.dropout_seed == 0


@pytest.mark.parametrize("call", ["attention", "attention_backward", "attention_varlen",
                                  "attention_varlen_backward"])
def test_explicit_seed_required(rng, call):
    """The refusal names the vjp forms, which draw a seed, packed calls' among them."""
    q, k, v = _inputs(rng, (1, 1, 8, 16), (1, 1, 8, 16), np.float32)
    lse = np.zeros((1, 1, 8), np.float32)
    cu = np.array([0, 8], np.int32)
    packed = [x[0].transpose(1, 0, 2) for x in (q, k, v)]
    calls = {
        "attention": lambda: cuflash.attention(q, k, v, dropout_p=0.1),
        "attention_backward": lambda: cuflash.attention_backward(q, q, k, v, q, lse,
                                                                 dropout_p=0.1),
        "attention_varlen": lambda: cuflash.attention_varlen(*packed, cu, cu, 8, 8,
                                                             dropout_p=0.1),
        "attention_varlen_backward": lambda: cuflash.attention_varlen_backward(
            packed[0], *packed, packed[0], lse[0], cu, cu, 8, 8, dropout_p=0.1),
    }
    with pytest.raises(ValueError, match="dropout_p=0.1 needs an explicit dropout_seed") as error:
        calls[call]()
    assert "attention_vjp" in str(error.value) and "attention_varlen_vjp" in str(error.value)


@pytest.mark.parametrize("options, error, message", [
    (dict(dropout_p=float("nan")), ValueError,
     r"dropout_p must be a real number in \[0, 1\), got nan"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be .*got 1.0"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be .*got -0.1"),
    (dict(dropout_p=True), TypeError, r"dropout_p must be .*got True of type bool"),
    (dict(dropout_p="0.1"), TypeError, r"dropout_p must be .*of type str"),
    (dict(dropout_p=0.1, dropout_seed=-1), ValueError,
     r"dropout_seed must be an int in \[0, 2\*\*64\), got -1"),
    (dict(dropout_p=0.1, dropout_seed=2**64), ValueError,
     r"dropout_seed must be .*got 18446744073709551616"),
    (dict(dropout_p=0.1, dropout_seed=1.0), TypeError, r"dropout_seed must be .*of type float"),
    (dict(dropout_p=0.1, dropout_seed=True), TypeError, r"dropout_seed must be .*of type bool"),
    (dict(dropout_p=0.0, dropout_seed="1"), TypeError, r"dropout_seed must be .*of type str"),
    (dict(dropout_p=0.1, dropout_seed=1, dropout_offset=2**32), ValueError,
     r"dropout_offset must be an int in \[0, 2\*\*32\), got 4294967296"),
    (dict(dropout_p=0.1, dropout_seed=1, dropout_offset=None), TypeError,
     r"dropout_offset must be .*of type NoneType"),
])
def test_invalid_dropout_options(rng, options, error, message):
    _assert_every_call_refuses(rng, options, error, message)


def _assert_every_call_refuses(rng, options, error, message):
    q, k, v = _inputs(rng, (1, 1, 8, 16), (1, 1, 8, 16), np.float32)
    for call in (lambda: cuflash.attention(q, k, v, **options),
                 lambda: cuflash.attention_vjp(q, k, v, **options),
                 lambda: cuflash.attention_backward(q, q, k, v, q, np.zeros((1, 1, 8), np.float32),
                                                    **options),
                 lambda: reference.attention(q, k, v, **options)):
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("dropout", [
    dict(dropout_p=0.3, dropout_offset=-1), dict(dropout_p=1.5), dict(dropout_p="0.3"),
    dict(dropout_p=0.3, dropout_seed=np.array([1, 2], np.uint32)),
    dict(dropout_p=0.3, dropout_seed=np.array([1, 2], np.uint64), dropout_offset=3),
], ids=["offset", "rate", "rate_type", "seed_array", "offset_beside_array"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_a_vjp_checks_q_before_its_dropout_as_the_forward_does(rng, dropout, varlen):
    """A vjp call wrong in q and in its dropout arguments names q, as attention (and
    attention_varlen) does with the same arguments: the seed is drawn, or copied, where the
    forward's checks leave it, not checked ahead of them."""
    q, k, v = _inputs(rng, (1, 1, 8, 16), (1, 1, 8, 16), np.float32)
    q = q.astype(np.float64)
    if varlen:
        cu = np.array([0, 8], np.int32)
        packed = [x[0].transpose(1, 0, 2) for x in (q, k, v)]
        forward = functools.partial(cuflash.attention_varlen, *packed, cu, cu, 8, 8)
        vjp = functools.partial(cuflash.attention_varlen_vjp, *packed, cu, cu, 8, 8)
    else:
        forward = functools.partial(cuflash.attention, q, k, v)
        vjp = functools.partial(cuflash.attention_vjp, q, k, v)
    with pytest.raises((TypeError, ValueError)) as expected:
        forward(**dropout)
    assert "q" in str(expected.value).split()[0]
    with pytest.raises(type(expected.value)) as got:
        vjp(**dropout)
    assert str(got.value) == str(expected.value)


def test_numpy_integers_are_seeds(rng):
    q, k, v = _inputs(rng, (1, 1, 8, 16), (1, 1, 8, 16), np.float32)
    np.testing.assert_array_equal(
        cuflash.attention(q, k, v, dropout_p=0.5, dropout_seed=np.uint64(2**63 + 5)),
        cuflash.attention(q, k, v, dropout_p=0.5, dropout_seed=2**63 + 5))


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_a_seed_array_is_its_seed_and_offset(rng, varlen):
    """A NumPy seed array (seed, offset) is read when the call is made: the results equal the
    int seed and offset's, bit for bit, in every function that takes a seed."""
    seed, offset = 2**64 - 3, 2**32 - 1
    q, k, v = _inputs(rng, (2, 3, 40, 16), (2, 3, 40, 16), ml_dtypes.bfloat16)
    dout = random_array(rng, q.shape, ml_dtypes.bfloat16)
    state = np.array([seed, offset], np.uint64)
    if varlen:
        cu = np.array([0, 40, 80], np.int32)
        q, k, v, dout = (x.transpose(0, 2, 1, 3).reshape(80, 3, 16) for x in (q, k, v, dout))
        forward = functools.partial(cuflash.attention_varlen, q, k, v, cu, cu, 40, 40)
        backward = functools.partial(cuflash.attention_varlen_backward, dout, q, k, v)
        positions = (cu, cu, 40, 40)
    else:
        forward = functools.partial(cuflash.attention, q, k, v)
        backward = functools.partial(cuflash.attention_backward, dout, q, k, v)
        positions = ()
    options = dict(causal=True, dropout_p=0.25)
    out, lse = forward(**options, dropout_seed=seed, dropout_offset=offset, return_lse=True)
    got, got_lse = forward(**options, dropout_seed=state, return_lse=True)
    np.testing.assert_array_equal(got, out)
    np.testing.assert_array_equal(got_lse, lse)
    for g, expected in zip(
            backward(out, lse, *positions, **options, dropout_seed=state),
            backward(out, lse, *positions, **options, dropout_seed=seed, dropout_offset=offset)):
        np.testing.assert_array_equal(g, expected)
    if not varlen:
        for got, expected in zip(
                reference.attention(q, k, v, **options, dropout_seed=state),
                reference.attention(q, k, v, **options, dropout_seed=seed, dropout_offset=offset)):
            np.testing.assert_array_equal(got, expected)
    assert (state == [seed, offset]).all()  # read, not written


def test_vjp_keeps_the_seed_array_the_forward_read(rng):
    q, k, v = _inputs(rng, (1, 2, 40, 32), (1, 2, 40, 32), np.float16)
    dout = random_array(rng, q.shape, np.float16)
    state = np.array([123, 4], np.uint64)
    out, vjp = cuflash.attention_vjp(q, k, v, causal=True, dropout_p=0.3, dropout_seed=state)
    state[:] = (7, 8)  # the caller's next step, before this step's backward
    assert vjp.dropout_seed == 123
    _, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    for g, expected in zip(vjp(dout), cuflash.attention_backward(
            dout, q, k, v, out, lse, causal=True, dropout_p=0.3, dropout_seed=123,
            dropout_offset=4)):
        np.testing.assert_array_equal(g, expected)


@pytest.mark.parametrize("state, offset, error, message", [
    (np.array([1, 2**32], np.uint64), 0, ValueError,
     r"dropout_seed's offset \(its second element\) must be below 2\*\*32, got 4294967296"),
    (np.array([1, 2], np.uint32), 0, TypeError,
     r"must be a uint64 array of shape \(2,\) .*got dtype uint32"),
    (np.array([[1, 2]], np.uint64), 0, ValueError, r"C-contiguous; got shape \(1, 2\)"),
    (np.arange(4, dtype=np.uint64)[::2], 0, ValueError, r"got shape \(2,\), not contiguous"),
    (np.array([1, 2], np.uint64), None, TypeError, "dropout_offset must be an int"),
    (np.array([1, 2], np.uint64), 3, ValueError,
     "dropout_offset must be 0 .* when dropout_seed is an array"),
    ((1, 2), 0, TypeError,
     r"dropout_seed must be an int in \[0, 2\*\*64\), or a uint64 array .*of type tuple"),
])
def test_invalid_seed_arrays(rng, state, offset, error, message):
    _assert_every_call_refuses(rng, dict(dropout_p=0.1, dropout_seed=state, dropout_offset=offset),
                               error, message)


# ----------------------------------------------------------------------------- GPU families

def test_only_the_families_that_draw_the_mask_take_dropout(monkeypatch):
    """Without CuPy: the sm80 launchers, the Hopper TMA forward and the Hopper wgmma backward get
    past dropout (the Hopper ones then ask for a Hopper device), every other family gives the
    reason before looking at the arrays; the four take dropout with packed sequences too."""
    import dataclasses

    from cuflash._spec import VarlenLayout
    from cuflash.kernels import _launch


    q = np.zeros((2, 4, 64, 64), np.float16)
    spec = _api._spec(q, q, q, dropout_p=0.1, dropout_seed=1)[1]
    assert "dropout_p=0.1" in spec.describe()
    families = {f.module: f for registry in kernels.REGISTRY.values() for f in registry}
    arity = {f.module: 4 if name == "forward" else 8
             for name, registry in kernels.REGISTRY.items() for f in registry}
    assert len(families) >= 6
    drawing = {"mma_forward", "mma_backward", "sm90_tma_forward", "sm90_backward"}
    monkeypatch.setattr(_launch, "on_hopper", lambda x: False)
    # Arrays on device 0 of an A100 (the families that fit tiles to its shared memory ask it).
    monkeypatch.setattr(_launch, "shared_limit", lambda device_id: 163 * 1024)
    monkeypatch.setattr(_launch, "_compute_capability", lambda device_id: "80")
    arrays = (types.SimpleNamespace(device=types.SimpleNamespace(id=0)),) * 8
    for module, family in families.items():
        reason = family.launcher().supports(spec, arrays[:arity[module]])
        if module in {"mma_forward", "mma_backward"}:
            assert reason is None, module
        elif module in drawing:
            assert reason == "needs compute capability 9.0 (Hopper)", module
        else:
            assert reason == ("dropout (dropout_p=0.1) runs in the sm80-mma, sm90-tma forward "
                              "and sm90-wgmma backward kernels only"), module
    plain = _api._spec(q, q, q)[1]
    assert _launch.why_not_dropout(plain) is None
    packed = dataclasses.replace(spec, varlen=VarlenLayout(cu_q=None, cu_k=None, total_q=64,
                                                           total_k=64, max_q=64, max_k=64))
    for module in drawing:  # packed sequences too
        assert families[module].launcher().supports(packed, arrays[:arity[module]]) == (
            None if module in {"mma_forward", "mma_backward"} else "needs compute capability 9.0 (Hopper)")


# Per compute capability, the forward kernel and the backward kernels that draw the mask in a
# dropout call at D = 64, float16 (the sm80 default backward: dK/dV with atomic dQ).
DROPOUT_KERNELS = {
    "80": ("flash_fwd<", ("flash_bwd_dkdv<",)),
    # D = 64 on Hopper: the dK/dV kernel's consumers take turns forming dQ (no dQ kernel)
    "90": ("flash_fwd_sm90_tma<", ("flash_bwd_sm90_dkdv_ws<",)),
}


@pytest.mark.parametrize("capability", list(DROPOUT_KERNELS))
def test_gpu_dropout_calls_run_the_dropout_variants(monkeypatch, capability):
    """On a fake device: a dropout call compiles the DROPOUT variants (sm80 kernels on 8.0, the
    Hopper TMA forward and wgmma backward on 9.0) and sends them the mask's parameters; the
    cached call path keeps it apart from the p = 0 call of the same arrays, and p = 0 with a seed
    is the call without dropout."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash import _calls
    from cuflash.kernels import _launch

    forward_kernel, backward_kernels = DROPOUT_KERNELS[capability]
    device = FakeDevice(monkeypatch, compute_capability=capability)
    q, k, v = (device.empty((2, 4, 128, 64), np.float16) for _ in range(3))
    cuflash.attention(q, k, v)
    cuflash.attention(q, k, v)
    assert _calls.stats()["hits"] == 1
    plain = device.take_launches()
    assert plain[0][0].startswith(forward_kernel)
    assert not plain[0][0].endswith(", false, true>")

    seed = 2**40 + 7
    options = dict(dropout_p=0.1, dropout_seed=seed, dropout_offset=3)
    out, lse = cuflash.attention(q, k, v, **options, return_lse=True)
    assert _calls.stats()["hits"] == 1
    cuflash.attention_backward(out, q, k, v, out, lse, **options)
    launches = device.take_launches()
    (forward,) = [x for x in launches if x[0].startswith(forward_kernel)]
    assert forward[0].endswith(", false, true>")  # VARLEN = false, DROPOUT = true
    args = np.frombuffer(forward[4], _launch.FWD_ARGS)[0]
    assert (args["drop_threshold"], args["drop_seed_lo"], args["drop_seed_hi"],
            args["drop_offset"]) == (_dropout.threshold(0.1), 7, 2**8, 3)
    assert (args["drop_threshold"], args["drop_rescale"]) == (26, np.float32(256 / 230))
    backward = [x for x in launches if x[0].startswith(backward_kernels)]
    # sm80: VARLEN = false, DROPOUT = true; Hopper: DROPOUT = true, F32_GRADS = false, ATOMIC_DQ = true.
    flags = ", false, true>" if capability == "80" else ", true, false, true>"
    assert sorted(x[0].split("<")[0] + "<" for x in backward) == sorted(backward_kernels)
    assert all(x[0].endswith(flags) for x in backward)
    for launch in backward:
        bwd = np.frombuffer(launch[4], _launch.BWD_ARGS)[0]
        assert (bwd["drop_threshold"], bwd["drop_seed_lo"], bwd["drop_offset"]) == (26, 7, 3)

    cuflash.attention(q, k, v, dropout_p=0.0, dropout_seed=1)
    assert device.take_launches()[0][0] == plain[0][0]
