"""``cuflash.attention_with_kvcache`` on NumPy arrays against an independent float64 oracle
(tests/kvcache_cases.py), every error it raises, and the decode route's arguments through a fake
decode module. The GPU cases are in tests/test_kvcache.py.
"""

import dataclasses
import math
import types
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvcache_cases import (assert_cache_appended, assert_kvcache_close, call_and_check,
                           call_and_check_rotated, make_case, oracle_row, poisoned_out,
                           rotary_case, rotary_tables)

import cuflash
from cuflash import _kvcache, _kvcache_spec

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32]
DTYPE_IDS = ["float16", "bfloat16", "float32"]


def run(case, seed, **extra):
    """Call into a NaN-poisoned ``out``; check the result, the lse and the caches."""
    return call_and_check(case, f"seed={seed}", **extra)


# ----------------------------------------------------------------------------- against the oracle

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_step(rng, seed, dtype, paged):
    case = make_case(rng, np, dtype=dtype, b=4, sq=1, hq=8, hkv=2, d=32,
                     lengths=[0, 1, 17, 95], capacity=96, page_size=16 if paged else None)
    run(case, seed)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_append_then_attend(rng, seed, paged, causal):
    case = make_case(rng, np, dtype=np.float16, b=3, sq=5, hq=4, hkv=4, d=24,
                     lengths=[0, 30, 59], capacity=64, page_size=16 if paged else None, s_new=5,
                     causal=causal, spare_rows=3)
    run(case, seed)


def test_cache_batch_idx(rng, seed):
    case = make_case(rng, np, dtype=ml_dtypes.bfloat16, b=3, sq=2, hq=6, hkv=3, d=16,
                     lengths=[7, 0, 40], capacity=48, batch_idx=True, spare_rows=4, s_new=2,
                     causal=True)
    run(case, seed)


@pytest.mark.parametrize("sq, lengths", [(7, [0, 3, 40]), (1, [5, 5, 5])])
def test_causal_bottom_right_per_row(rng, seed, sq, lengths):
    """Each row's causal mask is aligned to its own key count: with fewer keys than queries the
    first rows see nothing (output 0, lse -inf)."""
    case = make_case(rng, np, dtype=np.float32, b=3, sq=sq, hq=4, hkv=2, d=16,
                     lengths=lengths, capacity=48, causal=True)
    out, lse = run(case, seed)
    if sq == 7:  # row 1 has 3 keys: queries 0..3 see none
        assert np.isneginf(lse[1, :, :4]).all() and np.isfinite(lse[1, :, 4:]).all()
        assert (out[1, :4] == 0).all()


@pytest.mark.parametrize("window", [(4, 0), (0, 2), (10, -1), (3, 3)])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_window(rng, seed, window, paged):
    case = make_case(rng, np, dtype=np.float16, b=3, sq=4, hq=4, hkv=1, d=32,
                     lengths=[2, 31, 60], capacity=64, page_size=32 if paged else None, s_new=1,
                     window=window, causal=window[1] == 2)
    run(case, seed)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("alibi", ["heads", "batch"])
def test_softcap_and_alibi(rng, seed, alibi, dtype):
    case = make_case(rng, np, dtype=dtype, b=3, sq=3, hq=8, hkv=2, d=32, dv=48,
                     lengths=[1, 17, 70], capacity=80, page_size=16, s_new=2, softcap=5.0,
                     alibi=alibi, causal=True, scale=0.3)
    run(case, seed)


@pytest.mark.parametrize("d, dv", [(16, 40), (40, 16), (8, 8)])
def test_head_dims(rng, seed, d, dv):
    case = make_case(rng, np, dtype=np.float32, b=2, sq=2, hq=3, hkv=1, d=d, dv=dv,
                     lengths=[9, 33], capacity=48, page_size=16, s_new=1)
    run(case, seed)


def test_int_seqlens(rng, seed):
    case = make_case(rng, np, dtype=np.float16, b=3, sq=1, hq=4, hkv=2, d=32, lengths=[20] * 3,
                     capacity=32, seqlens_as="int", s_new=1)
    run(case, seed)


def test_seqlens_zero_gives_zero_and_neg_inf(rng, seed):
    case = make_case(rng, np, dtype=np.float32, b=2, sq=3, hq=2, hkv=2, d=8, lengths=[0, 0],
                     capacity=16)
    out, lse = run(case, seed)
    assert (out == 0).all() and np.isneginf(lse).all()


def test_lse_layout_and_default_out(rng):
    case = make_case(rng, np, dtype=np.float32, b=2, sq=3, hq=4, hkv=2, d=8, lengths=[5, 6],
                     capacity=16)
    out = cuflash.attention_with_kvcache(*case.args, **case.kwargs)
    assert out.shape == (2, 3, 4, 8)
    out2, lse = cuflash.attention_with_kvcache(*case.args, **case.kwargs, return_lse=True)
    assert lse.shape == (2, 4, 3) and lse.dtype == np.float32
    np.testing.assert_array_equal(out, out2)


def test_matches_attention_on_the_gathered_keys(rng):
    """A contiguous cache at full length is ordinary attention in (B, N, H, D) layout."""
    case = make_case(rng, np, dtype=np.float32, b=2, sq=5, hq=4, hkv=2, d=16, lengths=[16, 16],
                     capacity=16, causal=True)
    out = cuflash.attention_with_kvcache(*case.args, **case.kwargs)
    t = (0, 2, 1, 3)
    want = cuflash.attention(case.q.transpose(t), case.k_cache.transpose(t),
                             case.v_cache.transpose(t), causal=True)
    np.testing.assert_array_equal(out, want.transpose(t))


def test_paged_equals_contiguous(rng):
    """The same keys through a shuffled block table or in rows give the same numbers."""
    paged = make_case(rng, np, dtype=np.float16, b=3, sq=2, hq=4, hkv=2, d=16,
                      lengths=[3, 40, 63], capacity=64, page_size=16, s_new=1)
    rows = np.stack([np.concatenate([paged.row_keys(b)[0],
                                     np.zeros((63 - int(paged.lengths[b]),) + paged.k.shape[2:],
                                              paged.k.dtype)]) for b in range(3)])
    rows_v = np.stack([np.concatenate([paged.row_keys(b)[1],
                                       np.zeros((63 - int(paged.lengths[b]),) + paged.v.shape[2:],
                                                paged.v.dtype)]) for b in range(3)])
    lengths = paged.lengths.astype(np.int32) + 1
    got = cuflash.attention_with_kvcache(*paged.args, **paged.kwargs)
    want = cuflash.attention_with_kvcache(paged.q, rows, rows_v, cache_seqlens=lengths)
    np.testing.assert_array_equal(got, want)


def test_numpy_route_reported(rng):
    case = make_case(rng, np, dtype=np.float32, b=1, sq=1, hq=2, hkv=2, d=8, lengths=[3],
                     capacity=16)
    plan = cuflash.kvcache_plan(*case.args, **case.kwargs)
    assert plan.route == "numpy"
    assert "numpy" in str(plan)



@st.composite
def kvcache_problems(draw):
    """One call with several options at once: grouped heads (ratios 1 to 8), Dv != D, a
    contiguous, row-picked or paged cache, rows empty to nearly full, queries outnumbering keys,
    causal, windows, softcap, ALiBi per head or per row, and a rotary embedding of either
    pairing."""
    b = draw(st.integers(1, 3))
    layout = draw(st.sampled_from(["contiguous", "batch_idx", "paged"]))
    rotary = draw(st.sampled_from([None, "interleaved", "neox"]))
    s_new = draw(st.sampled_from([0, 1, 3])) if rotary is None else draw(st.sampled_from([1, 3]))
    capacity = 48
    hkv = draw(st.integers(1, 2))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), b=b, sq=draw(st.sampled_from([1, 2, 5, 17])),
        hq=hkv * draw(st.sampled_from([1, 2, 4, 8])), hkv=hkv,
        d=draw(st.sampled_from([8, 16, 32])), dv=draw(st.sampled_from([None, 8, 24])),
        lengths=draw(st.lists(st.integers(0, capacity - s_new), min_size=b, max_size=b)),
        capacity=capacity, page_size=16 if layout == "paged" else None, s_new=s_new,
        batch_idx=layout == "batch_idx", spare_rows=draw(st.sampled_from([0, 2])),
        causal=draw(st.booleans()),
        window=(draw(st.sampled_from([-1, 0, 3, 100])), draw(st.sampled_from([-1, 0, 3, 100]))),
        softcap=draw(st.sampled_from([0.0, 5.0])),
        alibi=draw(st.sampled_from([None, "heads", "batch"])),
        rotary=rotary, rotary_dim=draw(st.sampled_from([2, 8])),
        seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kvcache_problems())
def test_options_together(problem):
    # The result into a poisoned out= against the oracle, the caches appended exactly (rotated
    # keys under a rotary embedding), q and k not rotated in place, and the cache lengths, block
    # table, row indices and slopes as they were.
    problem = dict(problem)
    rng = np.random.default_rng(problem.pop("seed"))
    rotary, rotary_dim = problem.pop("rotary"), problem.pop("rotary_dim")
    case = make_case(rng, np, **problem)
    given = (case.seqlens, case.block_table, case.cache_batch_idx,
             case.options["alibi_slopes"])
    before = [None if x is None else x.copy() for x in given]
    if rotary is None:
        call_and_check(case, str(problem))
    else:
        # A row for every position a query turns to: up to the cache length plus Sq.
        tables = rotary_tables(problem["capacity"] + problem["sq"],
                               min(rotary_dim, problem["d"]), problem["dtype"])
        rotated, keywords = rotary_case(case, *tables, rotary == "interleaved")
        call_and_check_rotated(case, rotated, keywords, str(problem))
    for x, copy in zip(given, before):
        assert (x is None and copy is None) or np.array_equal(x, copy), problem


# ----------------------------------------------------------------------------- the oracle itself

def test_oracle_row_matches_reference(rng):
    """The independent oracle agrees with cuflash.reference on a full-length row."""
    q = rng.standard_normal((3, 4, 8))
    keys, values = rng.standard_normal((2, 11, 2, 8))
    slopes = np.array([0.5, 0.25, 0.1, 0.05], np.float32)
    for options in (dict(causal=True, window=(-1, -1)), dict(causal=False, window=(2, 1))):
        out, lse = oracle_row(q, keys, values, scale=0.4, softcap=3.0, slopes=slopes, **options)
        ref, ref_lse = cuflash.reference.attention(
            q.transpose(1, 0, 2), keys.transpose(1, 0, 2), values.transpose(1, 0, 2), scale=0.4,
            softcap=3.0, alibi_slopes=slopes, **options)
        np.testing.assert_allclose(out, ref.transpose(1, 0, 2), atol=1e-12)
        np.testing.assert_allclose(lse, ref_lse, atol=1e-12)


# ----------------------------------------------------------------------------- rotary embedding

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(window=(6, -1)),
                                     dict(window=(32, 10**6))],
                         ids=["full", "causal", "window", "window-of-everything"])
def test_rotary(rng, seed, dtype, interleaved, options):
    """q and the appended k rotated at flash-attn's positions (queries all at the cache length
    unless causal or windowed), against the oracle of the case rotated by rotate64."""
    case = make_case(rng, np, dtype=dtype, b=3, sq=3, hq=4, hkv=2, d=40, lengths=[0, 9, 29],
                     capacity=32, s_new=3, **options)
    rotated, rotary = rotary_case(case, *rotary_tables(40, 24, dtype), interleaved)
    call_and_check_rotated(case, rotated, rotary, f"seed={seed}")


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_rotary_of_int_lengths_and_pages(rng, seed, paged):
    case = make_case(rng, np, dtype=np.float16, b=2, sq=1, hq=2, hkv=2, d=32, lengths=[21, 21],
                     capacity=32, s_new=1, seqlens_as="int", page_size=16 if paged else None)
    rotated, rotary = rotary_case(case, *rotary_tables(32, 32, np.float16), True)
    call_and_check_rotated(case, rotated, rotary, f"seed={seed}")


def test_rotary_window_of_every_key_is_no_window(rng):
    """A window whose sides reach the whole cache masks nothing, and rotates the queries as no
    window does (flash-attn drops such sides): the two calls agree bit for bit."""
    case = make_case(rng, np, dtype=np.float32, b=2, sq=3, hq=2, hkv=2, d=16, lengths=[4, 20],
                     capacity=32, s_new=1)
    cos, sin = rotary_tables(32, 16, np.float32)
    results = []
    for window in [(-1, -1), (32, 32), (10**9, -1)]:
        fresh = dataclasses.replace(case, k_cache=case.k_cache_before.copy(),
                                    v_cache=case.v_cache_before.copy())
        results.append(call(fresh, window=window, rotary_cos=cos, rotary_sin=sin))
    assert all(np.array_equal(results[0], other) for other in results[1:])


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_rotary_tables_cover_the_queries_positions(rng, seed, paged):
    """More causal queries than new keys turn to positions past the appended keys: the tables
    need those rows too, refused before anything is written when short, exact when long enough."""
    case = make_case(rng, np, dtype=np.float32, b=3, sq=4, hq=2, hkv=2, d=16, lengths=[0, 9, 31],
                     capacity=32, s_new=1, causal=True, page_size=16 if paged else None)
    short = rotary_tables(32, 16, np.float32)
    with pytest.raises(ValueError, match=r"positions cache_seqlens \+ 0 … 3, up to 34 for the "
                                         r"largest cache_seqlens, so at least 35 rows, got 32"):
        call(case, rotary_cos=short[0], rotary_sin=short[1])
    assert_cache_appended(dataclasses.replace(case, k=None, v=None))  # nothing written
    rotated, rotary = rotary_case(case, *rotary_tables(35, 16, np.float32), True)
    call_and_check_rotated(case, rotated, rotary, f"seed={seed}")


def test_rotary_overflow_warns_by_name_whatever_numpy_seterr():
    """A rotation whose float16 result overflows (finite q and k near the float16 maximum, turned
    by 45°) gives one CuflashNumericalWarning under the call's name, as other overflows do, and
    none of NumPy's own warnings: a caller's numpy.seterr(all="raise") does not make the call
    raise inside cuflash (docs/api.md, "Warnings")."""
    q = np.full((1, 1, 1, 8), 60000, np.float16)
    new = np.full((1, 1, 1, 8), 60000, np.float16)
    caches = [np.zeros((1, 16, 1, 8), np.float16) for _ in range(2)]
    cos = np.full((16, 4), np.sqrt(0.5), np.float16)
    with np.errstate(all="raise"), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cuflash.attention_with_kvcache(q, *caches, new, new, cache_seqlens=0, rotary_cos=cos,
                                       rotary_sin=cos)
    assert [w.category for w in record] == [cuflash.CuflashNumericalWarning]
    assert str(record[0].message).startswith(
        "cuflash.attention_with_kvcache: the rotary embedding of q or k holds inf or NaN "
        "although q, k and the tables are finite")
    assert np.isinf(caches[0][0, 0]).any()  # appended as rotated


def test_rotary_overflow_as_an_error_stops_before_the_append():
    """Under warnings.simplefilter("error", CuflashNumericalWarning) the rotation's overflow
    stops the call before anything is written, and its message does not say otherwise."""
    q = np.full((1, 1, 1, 8), 60000, np.float16)
    caches = [np.zeros((1, 16, 1, 8), np.float16) for _ in range(2)]
    cos = np.full((16, 4), np.sqrt(0.5), np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cuflash.CuflashNumericalWarning)
        with pytest.raises(cuflash.CuflashNumericalWarning) as raised:
            cuflash.attention_with_kvcache(q, *caches, q, q, cache_seqlens=0, rotary_cos=cos,
                                           rotary_sin=cos)
    assert not any(cache.any() for cache in caches)
    assert "appended" not in str(raised.value)


def test_rotary_turns_each_pair_by_its_angle():
    """One vector, by hand: at position 1 pair i turns by the table's angle, the rest is kept."""
    cos = np.array([[1.0, 1.0], [0.0, 0.6]], np.float32)
    sin = np.array([[0.0, 0.0], [1.0, 0.8]], np.float32)
    x = np.array([[[[1.0, 2.0, 3.0, 4.0, 5.0]]]], np.float32)
    from cuflash._rotary import rotate
    interleaved = rotate(x, cos, sin, np.array([[1]]), interleaved=True)
    neox = rotate(x, cos, sin, np.array([[1]]), interleaved=False)
    # interleaved pairs (1, 2) by 90° and (3, 4) by (0.6, 0.8); neox pairs (1, 3) and (2, 4)
    np.testing.assert_allclose(interleaved.ravel(), [-2.0, 1.0, 0.6 * 3 - 0.8 * 4,
                                                     0.8 * 3 + 0.6 * 4, 5.0], rtol=1e-6)
    np.testing.assert_allclose(neox.ravel(), [-3.0, 0.6 * 2 - 0.8 * 4, 1.0,
                                              0.8 * 2 + 0.6 * 4, 5.0], rtol=1e-6)


# ----------------------------------------------------------------------------- errors

def small(rng, **overrides):
    options = dict(dtype=np.float32, b=2, sq=1, hq=4, hkv=2, d=8, lengths=[3, 5], capacity=32)
    options.update(overrides)
    return make_case(rng, np, **options)


def call(case, **changes):
    args = dict(zip(("q", "k_cache", "v_cache", "k", "v"), case.args))
    kwargs = case.kwargs
    for key, value in changes.items():
        (args if key in args else kwargs)[key] = value
    return cuflash.attention_with_kvcache(*args.values(), **kwargs)


@pytest.mark.parametrize("changes, error, match", [
    (dict(q="not an array"), TypeError, "q must be a numpy.ndarray"),
    (dict(q=np.zeros((2, 1, 4, 8), np.float64)), TypeError, "float64"),
    (dict(q=np.zeros((2, 1, 4, 8), np.float16)), TypeError, "same dtype"),
    (dict(q=np.zeros((2, 4, 8), np.float32)), ValueError, r"q must have 4 dimensions \(B, Sq"),
    (dict(q=np.zeros((2, 0, 4, 8), np.float32)), ValueError, "empty axis"),
    (dict(q=np.zeros((2, 1, 4, 16), np.float32)), ValueError, "head dimension D = 16"),
    (dict(q=np.zeros((2, 1, 3, 8), np.float32)), ValueError, "multiple of the number of key/value"),
    (dict(q=np.zeros((3, 1, 4, 8), np.float32)), ValueError, "must have at least 3 rows"),
    (dict(v_cache=np.zeros((2, 31, 2, 8), np.float32)), ValueError, "v_cache must match k_cache"),
    (dict(k=np.zeros((2, 1, 2, 8), np.float32)), ValueError, "give k and v together"),
    (dict(k=np.zeros((2, 1, 2, 8), np.float32), v=np.zeros((2, 2, 2, 8), np.float32)),
     ValueError, r"v must have shape \(B, S_new, Hkv, Dv\) = \(2, 1, 2, 8\)"),
    (dict(k=np.zeros((2, 1, 1, 8), np.float32), v=np.zeros((2, 1, 1, 8), np.float32)),
     ValueError, r"k must have shape"),
    (dict(cache_seqlens=None), TypeError, "cache_seqlens must be an int or an int32 array"),
    (dict(cache_seqlens=3.0), TypeError, "cache_seqlens must be an int"),
    (dict(cache_seqlens=True), TypeError, "cache_seqlens must be an int"),
    (dict(cache_seqlens=np.array([3, 5], np.int64)), TypeError, "cache_seqlens must have dtype int32"),
    (dict(cache_seqlens=np.array([3, 5], np.uint32)), ValueError, "cache_seqlens must have dtype int32"),
    (dict(cache_seqlens=np.array([3, 5, 1], np.int32)), ValueError, r"cache_seqlens must have shape \(2,\)"),
    (dict(cache_seqlens=[3, 5]), TypeError, "cache_seqlens must be an int32 numpy.ndarray"),
    (dict(cache_seqlens=-1), ValueError, r"cache_seqlens = -1 is outside \[0, 32\]"),
    (dict(cache_seqlens=33), ValueError, r"cache_seqlens = 33 is outside \[0, 32\]"),
    (dict(cache_seqlens=2**64), ValueError, r"cache_seqlens = 18446744073709551616 is not a length"),
    (dict(cache_seqlens=np.array([3, 40], np.int32)), ValueError, r"cache_seqlens\[1\] = 40"),
    (dict(cache_batch_idx=np.array([0, 2], np.int32)), ValueError, r"cache_batch_idx must index the 2 rows"),
    (dict(cache_batch_idx=np.array([0, 1], np.int64)), TypeError, "cache_batch_idx must have dtype int32"),
    (dict(cache_batch_idx=np.array([[0, 1]], np.int32)), ValueError, r"cache_batch_idx must have shape \(2,\)"),
    (dict(causal=1), TypeError, "causal must be True or False"),
    (dict(scale=-1.0), ValueError, "scale must be finite and positive"),
    (dict(window=(-2, 0)), ValueError, "window must be"),
    (dict(softcap=-1.0), ValueError, "softcap must be"),
    (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, r"alibi_slopes must have shape \(Hq,\)"),
    (dict(alibi_slopes=np.ones(4, np.float64)), TypeError, "alibi_slopes must have dtype float32"),
    (dict(num_splits=-1), ValueError, "num_splits must be 0"),
    (dict(num_splits=1.5), TypeError, "num_splits must be an int"),
    (dict(num_splits=True), TypeError, "num_splits must be an int"),
    (dict(return_lse=1), TypeError, "return_lse must be True or False"),
    (dict(out=np.zeros((2, 1, 4, 4), np.float32)), ValueError, r"out must have shape \(2, 1, 4, 8\)"),
    (dict(out=np.zeros((2, 1, 4, 8), np.float16)), TypeError, "out must have dtype float32"),
    (dict(rotary_cos=np.zeros((32, 4), np.float32)), ValueError, "give rotary_cos and rotary_sin together"),
    (dict(rotary_cos=np.zeros((32, 4), np.float32), rotary_sin=np.zeros((32, 4), np.float32)),
     ValueError, "give k and v too"),
    (dict(rotary_interleaved=1), TypeError, "rotary_interleaved must be True or False"),
    (dict(cache_leftpad=np.array([0, 6], np.int32)), ValueError,
     r"cache_leftpad\[1\] = 6 must lie in \[0, cache_seqlens\[1\] = 5\]"),
    (dict(cache_leftpad=np.array([-1, 0], np.int32)), ValueError, r"cache_leftpad\[0\] = -1 must lie in"),
    (dict(cache_leftpad=np.array([0, 1], np.int64)), TypeError, "cache_leftpad must have dtype int32"),
    (dict(cache_leftpad=np.array([0, 1, 2], np.int32)), ValueError, r"cache_leftpad must have shape \(2,\)"),
    (dict(cache_leftpad=[0, 1]), TypeError, "cache_leftpad must be an int32 numpy.ndarray"),
])
def test_errors(rng, changes, error, match):
    with pytest.raises(error, match=match):
        call(small(rng), **changes)


@pytest.mark.parametrize("cos, sin, error, match", [
    ((32, 4), (32, 3), ValueError, r"must both have shape \(seqlen_ro, rotary_dim / 2\)"),
    ((32, 4, 1), (32, 4, 1), ValueError, "must both have shape"),
    ((32, 0), (32, 0), ValueError, "must both have shape"),
    ((32, 5), (32, 5), ValueError, r"rotary_dim = 2 · 5 .* at most the head dimension D = 8"),
    ((31, 4), (31, 4), ValueError, "at least 32 rows"),
    ("float16", (32, 4), TypeError, "same dtype"),
    ("list", (32, 4), TypeError, "rotary_cos must be a numpy.ndarray or cupy.ndarray"),
])
def test_rotary_errors(rng, cos, sin, error, match):
    case = small(rng, s_new=1)
    tables = []
    for spec in (cos, sin):
        if spec == "float16":
            tables.append(np.zeros((32, 4), np.float16))
        elif spec == "list":
            tables.append(np.zeros((32, 4), np.float32).tolist())
        else:
            tables.append(np.zeros(spec, np.float32))
    before = case.k_cache.copy()
    with pytest.raises(error, match=match):
        call(case, rotary_cos=tables[0], rotary_sin=tables[1])
    assert np.array_equal(case.k_cache, before)  # refused before anything is written


def test_errors_of_a_paged_cache(rng):
    contiguous = small(rng, capacity=40)
    with pytest.raises(ValueError, match=r"page_size must be a multiple of 16, got k_cache "
                                         r"\(2, 40, 2, 8\).*a contiguous cache"):
        call(contiguous, block_table=np.zeros((2, 2), np.int32))
    case = small(rng, capacity=32, page_size=16, spare_rows=1)  # 5 pages, tables of 2
    with pytest.raises(ValueError, match="cache_batch_idx applies to a contiguous cache only"):
        call(case, cache_batch_idx=np.array([0, 1], np.int32))
    with pytest.raises(ValueError, match=r"block_table must have shape \(2, max_pages\)"):
        call(case, block_table=np.zeros((3, 2), np.int32))
    with pytest.raises(TypeError, match="block_table must have dtype int32"):
        call(case, block_table=np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match=r"block_table\[1, :1\] must index the 5 pages"):
        call(case, block_table=np.array([[0, 1], [7, 2]], np.int32))
    # Entries past a row's length are never read: any value is accepted there.
    call(case, block_table=np.array([[0, 99], [3, -5]], np.int32))
    with pytest.raises(ValueError, match=r"outside \[0, 32\]"):
        call(case, cache_seqlens=np.array([3, 33], np.int32))


def test_capacity_overflow_refused_before_anything_is_written(rng):
    case = small(rng, s_new=2, lengths=[3, 31])
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 31 is outside \[0, 30\].*2 keys "
                                         r"appended.*pass the end of the cache"):
        call(case)
    assert_cache_appended(dataclasses.replace(case, k=None, v=None))  # nothing written
    with pytest.raises(ValueError, match="more than a batch row's cache holds"):
        s_new = 33
        call(case, k=np.zeros((2, s_new, 2, 8), np.float32), v=np.zeros((2, s_new, 2, 8), np.float32))


def test_conflicting_appends_refused(rng):
    case = small(rng, s_new=1, batch_idx=True, spare_rows=2)
    with pytest.raises(ValueError, match="batch rows 0 and 1 would append keys into the same "
                                         "slot"):
        call(case, cache_batch_idx=np.array([1, 1], np.int32), cache_seqlens=4)
    # Sharing a cache row without appending is fine (both rows read it).
    call(case, cache_batch_idx=np.array([1, 1], np.int32), k=None, v=None)
    paged = small(rng, s_new=1, capacity=32, page_size=16)
    with pytest.raises(ValueError, match="same slot"):
        call(paged, block_table=np.array([[0, 1], [0, 2]], np.int32), cache_seqlens=2)


def test_appends_over_held_keys_refused(rng):
    """An append into a slot another row reads as cached (a shared cache row, a shared prefix
    page) would change that row's keys under it: refused before anything is written."""
    case = small(rng, s_new=1, batch_idx=True, spare_rows=2)
    with pytest.raises(ValueError, match="batch row 0 would append its key 3 over key 3 that "
                                         "batch row 1 holds"):
        call(case, cache_batch_idx=np.array([1, 1], np.int32), cache_seqlens=np.array([3, 5], np.int32))
    assert_cache_appended(dataclasses.replace(case, k=None, v=None))
    paged = small(rng, s_new=1, capacity=32, page_size=16, spare_rows=2)
    # Row 0 holds 20 keys: page 0 whole; row 1 shares page 0 as its first and would write its key 3.
    with pytest.raises(ValueError, match="batch row 1 would append its key 3 over key 3 that "
                                         "batch row 0 holds"):
        call(paged, block_table=np.array([[0, 1], [0, 2]], np.int32),
             cache_seqlens=np.array([20, 3], np.int32))
    # Both rows read the shared page and append past it: fine.
    call(paged, block_table=np.array([[0, 1], [0, 2]], np.int32),
         cache_seqlens=np.array([16, 16], np.int32))


@pytest.mark.parametrize("changes, match", [
    (dict(cache_batch_idx=np.array([1, 1], np.int32), cache_seqlens=4),
     r"cache_batch_idx\[0\] and cache_batch_idx\[1\] both name cache row 1: batch rows 0 and 1 "
     r"would append keys into the same slot \(their keys 4 and 4\)"),
    (dict(cache_batch_idx=np.array([2, 2], np.int32), cache_seqlens=np.array([3, 5], np.int32)),
     r"cache_batch_idx\[0\] and cache_batch_idx\[1\] both name cache row 2: batch row 0 would "
     r"append its key 3 over key 3 that batch row 1 holds"),
    (dict(block_table=np.array([[0, 1], [2, 1]], np.int32),
          cache_seqlens=np.array([17, 17], np.int32)),
     r"block_table\[0, 1\] and block_table\[1, 1\] both name page 1: batch rows 0 and 1 would "
     r"append keys into the same slot \(their keys 17 and 17\)"),
    (dict(block_table=np.array([[1, 1], [0, 2]], np.int32),
          cache_seqlens=np.array([20, 3], np.int32)),
     r"block_table\[0, 1\] and block_table\[0, 0\] both name page 1: batch row 0 would append "
     r"its key 20 over key 4 that it holds"),
])
def test_conflicting_appends_name_the_index_that_shares_the_slot(rng, changes, match):
    """A refused append names the entries of cache_batch_idx or block_table that send two keys
    to one slot, so that the caller can find them; the caches are left as they were."""
    paged = "block_table" in changes
    case = (small(rng, s_new=1, capacity=32, page_size=16, spare_rows=2) if paged
            else small(rng, s_new=1, batch_idx=True, spare_rows=2))
    with pytest.raises(ValueError, match=match):
        call(case, **changes)
    np.testing.assert_array_equal(case.k_cache, case.k_cache_before)
    np.testing.assert_array_equal(case.v_cache, case.v_cache_before)


def test_inputs_that_view_the_caches_are_read_as_passed(rng, seed):
    """k, v and q given as views of the caches are copied before the append writes there: the
    result and the caches are those of the same call with copies."""
    case = make_case(rng, np, dtype=np.float32, b=2, sq=1, hq=2, hkv=2, d=8, lengths=[4, 4],
                     capacity=16, batch_idx=True, spare_rows=1, s_new=1)
    rows = np.array([1, 2], np.int32)
    views = dict(q=case.k_cache[0:2, 4:5], k=case.k_cache[0:2, 4:5], v=case.v_cache[0:2, 4:5])
    copies = {name: x.copy() for name, x in views.items()}
    fresh = dataclasses.replace(case, k_cache=case.k_cache_before.copy(),
                                v_cache=case.v_cache_before.copy())
    want = call(fresh, cache_batch_idx=rows, **copies)
    got = call(case, cache_batch_idx=rows, **views)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(case.k_cache, fresh.k_cache)
    np.testing.assert_array_equal(case.v_cache, fresh.v_cache)


def test_larger_cache_without_batch_idx_uses_its_first_rows(rng, seed):
    """flash-attn's rule: a contiguous cache of more rows than the batch, without
    cache_batch_idx, serves batch row b from its row b; the rows past the batch stay as they
    were."""
    case = make_case(rng, np, dtype=np.float16, b=2, sq=2, hq=4, hkv=2, d=16, lengths=[3, 11],
                     capacity=16, s_new=2, causal=True)
    spare = [np.asarray(rng.standard_normal((3,) + x.shape[1:]), x.dtype)
             for x in (case.k_cache, case.v_cache)]
    k_cache, v_cache = (np.concatenate([x, extra]) for x, extra in zip((case.k_cache, case.v_cache), spare))
    larger = dataclasses.replace(case, k_cache=k_cache, v_cache=v_cache,
                                 k_cache_before=k_cache.copy(), v_cache_before=v_cache.copy())
    run(larger, seed)  # the oracle reads rows 0 and 1; every other cache row is checked unchanged


def test_read_only_cache_refused_for_appends(rng):
    case = small(rng, s_new=1)
    case.k_cache.flags.writeable = False
    with pytest.raises(ValueError, match="k_cache must be writable to append"):
        call(case)


def test_caches_whose_slots_overlap_refused_for_appends(rng):
    """Positions 4 elements apart, where a head's key is 8 wide: an append would be written over
    part of the keys beside it."""
    case = small(rng, s_new=1)
    shape = case.k_cache.shape
    half = np.lib.stride_tricks.as_strided(
        np.zeros(math.prod(shape), case.k_cache.dtype), shape,
        (shape[1] * shape[2] * shape[3] * 2, shape[3] * 2, shape[3] * 4, 4))
    with pytest.raises(ValueError, match=r"k_cache must not have overlapping elements to append "
                                         r"k and v, got strides"):
        call(case, k_cache=half)
    call(case, k_cache=half, k=None, v=None)  # reading such a cache is fine


def test_caches_sharing_memory_refused_for_appends(rng):
    """One buffer passed as both caches would take the new values over the new keys: refused
    before anything is written. Reading such caches, and appending to the two halves of one
    packed buffer, are fine."""
    case = small(rng, s_new=1)
    with pytest.raises(ValueError, match="k_cache and v_cache must not share memory to append"):
        call(case, v_cache=case.k_cache)
    assert_cache_appended(dataclasses.replace(case, k=None, v=None))  # nothing written
    call(case, v_cache=case.k_cache, k=None, v=None)
    packed = np.stack([case.k_cache_before, case.v_cache_before], axis=2)  # (B, S, 2, Hkv, D)
    fresh = dataclasses.replace(case, k_cache=case.k_cache_before.copy(),
                                v_cache=case.v_cache_before.copy())
    want = call(fresh)
    np.testing.assert_array_equal(call(case, k_cache=packed[:, :, 0], v_cache=packed[:, :, 1]),
                                  want)
    np.testing.assert_array_equal(packed[:, :, 0], fresh.k_cache)
    np.testing.assert_array_equal(packed[:, :, 1], fresh.v_cache)


def test_out_must_not_overlap_the_cache(rng):
    case = small(rng)
    with pytest.raises(ValueError, match="out must not share memory with k_cache"):
        view = np.lib.stride_tricks.as_strided(case.k_cache, (2, 1, 4, 8),
                                               case.k_cache.strides[:2] + (32, 4))
        call(case, out=view)


def test_mixed_modules_refused(rng):
    case = small(rng)
    with pytest.raises(TypeError, match="k_cache must be a numpy.ndarray"):
        call(case, k_cache=case.k_cache.tolist())


# ----------------------------------------------------------------------------- routes

def _gpu_like(spec):
    """The spec with a stand-in array module, so that route choice passes the NumPy check."""
    return dataclasses.replace(spec, xp=types.SimpleNamespace(__name__="cupy"))


def _spec(case):
    from cuflash._kvcache_spec import validate

    return validate(*case.args, **case.kwargs, num_splits=0)


def test_generic_route_when_the_kernel_refuses(rng, monkeypatch):
    spec = _gpu_like(_spec(small(rng)))
    fake = types.SimpleNamespace(why_not=lambda q, k, v, table: "float32 is not 16-bit")
    monkeypatch.setattr(_kvcache, "decode_module", lambda: fake)
    route, reason, _ = _kvcache._choose(spec, None, None, None)
    assert route == "generic" and "float32 is not 16-bit" in reason
    monkeypatch.setattr(_kvcache, "decode_module", lambda: ImportError("no module named decode"))
    route, reason, _ = _kvcache._choose(spec, None, None, None)
    assert route == "generic" and "no module named decode" in reason
    fake.why_not = lambda q, k, v, table: None
    monkeypatch.setattr(_kvcache, "decode_module", lambda: fake)
    assert _kvcache._choose(spec, None, None, None)[0] == "decode"


class FakeDecode:
    """The decode module's interface in NumPy: records the arguments, appends as the kernel
    would, and attends with the independent oracle."""

    def __init__(self):
        self.calls = []

    def prepare(self, q, k_cache, v_cache, out, **options):
        return self  # nothing to refuse

    def workspace(self):
        return None

    def why_not(self, q, k_cache, v_cache, block_table=None):
        return None

    def prepare_append(self, k_new, v_new, k_cache, v_cache, block_table=None):
        return None  # (append looks nothing up)

    def append(self, k_new, v_new, k_cache, v_cache, cache_seqlens, *, block_table=None,
               cache_batch_idx=None, launch=None):
        self.calls.append(("append", cache_seqlens.copy()))
        for b in range(k_new.shape[0]):
            for i in range(k_new.shape[1]):
                p = int(cache_seqlens[b]) + i
                if block_table is not None:
                    where = (block_table[b, p // k_cache.shape[1]], p % k_cache.shape[1])
                else:
                    where = (b if cache_batch_idx is None else cache_batch_idx[b], p)
                k_cache[where] = k_new[b, i]
                v_cache[where] = v_new[b, i]

    def forward(self, q, k_cache, v_cache, cache_seqlens, out, lse, *, appended, scale, causal, window,
                softcap, alibi, block_table=None, cache_batch_idx=None, cache_leftpad=None,
                num_splits=0, workspace=None, launch=None):
        self.calls.append(("forward", cache_seqlens.copy(), dict(appended=appended, scale=scale,
                                                                 causal=causal, window=window,
                                                                 softcap=softcap,
                                                                 num_splits=num_splits)))
        assert cache_leftpad is None or (cache_leftpad.dtype == np.int32
                                         and cache_leftpad.flags.c_contiguous)
        assert cache_seqlens.dtype == np.int32 and lse.flags.c_contiguous
        seqlens = cache_seqlens + appended
        assert alibi is None or (alibi.shape == (q.shape[0], q.shape[2])
                                 and alibi.dtype == np.float32 and alibi.flags.c_contiguous)
        for b in range(q.shape[0]):
            n = int(seqlens[b])
            pos = np.arange(0 if cache_leftpad is None else int(cache_leftpad[b]), n)
            n = len(pos)
            if block_table is not None:
                where = (block_table[b, pos // k_cache.shape[1]], pos % k_cache.shape[1])
            else:
                where = (np.full(n, b if cache_batch_idx is None else cache_batch_idx[b]), pos)
            o, l = oracle_row(q[b], k_cache[where], v_cache[where], causal=causal, scale=scale,
                              window=window, softcap=softcap,
                              slopes=None if alibi is None else alibi[b])
            out[b] = o.astype(out.dtype)
            lse[b] = l


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_route_arguments(rng, seed, paged):
    """What the decode route hands the kernel: the lengths before the append to ``append`` and
    to ``forward`` (with the count appended), the caller's window (the launcher cuts it to the
    problem: ``test_decode_launch_band``), slopes as (B, Hq), the options."""
    case = make_case(rng, np, dtype=np.float16, b=2, sq=3, hq=4, hkv=2, d=16, lengths=[9, 9],
                     capacity=32, page_size=16 if paged else None, s_new=2, seqlens_as="int",
                     causal=True, window=(10**12, -1), softcap=4.0, alibi="heads")
    spec = _spec(case)
    fake = FakeDecode()
    out, lse = poisoned_out(case), np.full((2, 4, 3), np.nan, np.float32)
    _kvcache._run_decode(spec, fake, *case.args, out, lse)
    (_, before), (_, before_forward, options) = fake.calls
    np.testing.assert_array_equal(before, [9, 9])
    np.testing.assert_array_equal(before_forward, [9, 9])
    assert options == dict(appended=2, scale=spec.scale, causal=True, window=(10**12, -1),
                           softcap=4.0, num_splits=0)
    assert_kvcache_close(case, out, lse, f"seed={seed}")
    assert_cache_appended(case, f"seed={seed}")


def test_decode_route_passes_the_padding(rng):
    """cache_leftpad reaches the kernel as a contiguous int32 array, and the result is the NumPy
    route's (the fake kernel attends from each row's first key, as the kernel does)."""
    case = make_case(rng, np, dtype=np.float16, b=3, sq=2, hq=4, hkv=2, d=16, lengths=[9, 9, 9],
                     capacity=32, s_new=1, seqlens_as="int", causal=True)
    leftpad = np.array([0, 3, 9, 1, 5, 7], np.int32)[::2]  # strided: the route copies it
    caches = [x.copy() for x in case.args[1:3]]
    want = cuflash.attention_with_kvcache(case.args[0], *caches, *case.args[3:], **case.kwargs,
                                          cache_leftpad=leftpad)
    spec = _kvcache_spec.validate(*case.args, **case.kwargs, num_splits=0, cache_leftpad=leftpad)
    fake = FakeDecode()
    out = poisoned_out(case)
    _kvcache._run_decode(spec, fake, *case.args, out, np.full((3, 4, 2), np.nan, np.float32))
    np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), atol=2e-3)
    assert not np.isnan(out).any()


UNBOUNDED_BAND = 1 << 30  # cuflash.kernels.decode.UNBOUNDED_BAND


@pytest.mark.parametrize("causal, window, sq, capacity, expected", [
    (False, (-1, -1), 3, 32, (UNBOUNDED_BAND, UNBOUNDED_BAND)),
    (True, (-1, -1), 3, 32, (UNBOUNDED_BAND, 0)),
    (True, (-1, 5), 3, 32, (UNBOUNDED_BAND, 0)),
    (False, (4, 2), 3, 32, (4, 2)),
    (False, (10**12, 10**12), 3, 32, (32, 3)),
    (True, (10**12, 10**12), 3, 32, (32, 0)),
    (False, (33, 4), 3, 32, (32, 3)),
    (False, (32, 3), 3, 32, (32, 3)),
    (False, (0, 0), 16, 7, (0, 0)),
    # past 2^30 keys a side keeps its value: 2^30 would hide a full row's first keys
    (False, (2**31 - 1, 2**31), 2, 256 * (2**22 + 8), (2**30 + 2048, 2)),
    (False, (2**30 + 5, -1), 2, 256 * (2**22 + 8), (2**30 + 5, UNBOUNDED_BAND)),
    (True, (2**30, -1), 1, 2**30 + 64, (2**30, 0)),
], ids=str)
def test_decode_launch_band(monkeypatch, causal, window, sq, capacity, expected):
    """The band the decode launcher packs for the kernel (through a fake device): sides that
    admit every key cut down to Sq and the capacity (``_mask.clamped_band``), an unbounded side
    as 2^30, the mask variant bounded on the sides the caller's band is; read as the kernel reads
    it (``Mask::key_begin`` / ``key_end`` in csrc/mask.cuh), a full row's first and last query
    see the keys ``_mask.key_range`` gives them."""
    cupy = pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash._mask import UNBOUNDED, band, key_range
    from cuflash.kernels import decode

    device = FakeDevice(monkeypatch)
    page = 256
    q = cupy.empty((1, sq, 2, 64), np.float16)
    if capacity % page:  # a contiguous cache
        table = None
        k_cache, v_cache = (cupy.empty((1, capacity, 1, 64), np.float16) for _ in range(2))
    else:  # one page, listed capacity / page times
        table = cupy.empty((1, capacity // page), np.int32)
        k_cache, v_cache = (cupy.empty((1, page, 1, 64), np.float16) for _ in range(2))
    decode._prepared.cache_clear()  # no launch prepared elsewhere, and none kept after
    try:
        cuflash.attention_with_kvcache(q, k_cache, v_cache, block_table=table,
                                       cache_seqlens=cupy.empty((1,), np.int32), causal=causal,
                                       window=window, num_splits=1)
    finally:
        decode._prepared.cache_clear()
    (launch,) = [x for x in device.take_launches() if x[0].startswith("flash_decode<")]
    record = np.frombuffer(launch[4], decode.DECODE_ARGS)[0]
    assert (int(record["window_left"]), int(record["window_right"])) == expected
    assert (int(record["sq"]), int(record["capacity"])) == (sq, capacity)
    bounded = [side != UNBOUNDED for side in band(window, causal)]
    assert "Mask<{}, {}, false>".format(*(str(side).lower() for side in bounded)) in launch[0]
    left, right = expected
    rows = np.array([0, sq - 1])
    shift = capacity - sq  # a row that holds `capacity` keys
    begin = np.maximum(0, rows + shift - left) if bounded[0] else np.zeros(2, np.int64)
    end = np.minimum(capacity, rows + shift + right + 1) if bounded[1] else np.full(2, capacity)
    want_begin, want_end = key_range(rows, sq, capacity, *band(window, causal))
    np.testing.assert_array_equal(np.maximum(begin, end), want_end)
    np.testing.assert_array_equal(begin, want_begin)


@pytest.mark.parametrize("sq, pages, paged, route", [
    (255, 2**23 - 1, True, "decode"),       # capacity + Sq = 2^31 - 1
    (256, 2**23 - 1, True, "generic"),      # capacity + Sq = 2^31
    (1, 2**23, True, "generic"),            # a table of 2^31 keys
    (1, 2**23, False, "generic"),           # a contiguous cache of 2^31 positions
])
def test_decode_route_counts_a_row_s_keys_in_int32(monkeypatch, sq, pages, paged, route):
    """The decode kernel holds a row's capacity in an int32 and forms key bounds up to capacity +
    Sq (``Mask::key_end``): past that the generic route takes the call (whose kernels see each
    row's own keys), where the launch could not even pack the capacity; up to it the decode
    route packs it as given (through a fake device)."""
    cupy = pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import decode

    device = FakeDevice(monkeypatch)
    page = 256
    q = cupy.empty((1, sq, 2, 64), np.float16)
    table = cupy.empty((1, pages), np.int32) if paged else None
    rows = page if paged else page * pages
    k_cache, v_cache = (cupy.empty((1, rows, 1, 64), np.float16) for _ in range(2))
    options = dict(block_table=table, cache_seqlens=cupy.empty((1,), np.int32), num_splits=1)
    plan = cuflash.kvcache_plan(q, k_cache, v_cache, **options)
    assert plan.route == route, plan
    if route == "generic":
        assert "int32" in plan.reason and f"{page * pages:,}" in plan.reason
        return
    decode._prepared.cache_clear()  # no launch prepared elsewhere, and none kept after
    try:
        cuflash.attention_with_kvcache(q, k_cache, v_cache, **options)
    finally:
        decode._prepared.cache_clear()
    (launch,) = [x for x in device.take_launches() if x[0].startswith("flash_decode<")]
    assert int(np.frombuffer(launch[4], decode.DECODE_ARGS)[0]["capacity"]) == page * pages


@pytest.mark.parametrize("num_splits", [2**31, 2**40])
def test_decode_split_counts_past_one_launch_are_refused_as_such(monkeypatch, num_splits):
    """num_splits takes any positive count, but a launch holds fewer than 2**31 thread blocks:
    a count past that is refused with the launch's own ValueError, before the count is packed
    into the kernel's int32 field (through a fake device)."""
    cupy = pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import decode

    device = FakeDevice(monkeypatch)
    q = cupy.empty((1, 1, 2, 64), np.float16)
    k_cache, v_cache = (cupy.empty((1, 256, 1, 64), np.float16) for _ in range(2))
    decode._prepared.cache_clear()
    try:
        with pytest.raises(ValueError, match="problem too large for one launch of the decode kernel"):
            cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=cupy.empty((1,), np.int32),
                                           num_splits=num_splits)
    finally:
        decode._prepared.cache_clear()
    assert not device.take_launches()


def test_kvcache_plan_refuses_the_split_counts_the_launch_refuses(monkeypatch):
    """kvcache_plan raises the ValueError the call raises for a split count past one launch
    (it named the decode route, which then refused the call), and still names the decode route
    for the largest count the launch takes: 4 batch rows launch 4 blocks per split, so
    (2**31 - 1) // 4 splits pass and one more does not (through a fake device)."""
    cupy = pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import decode

    device = FakeDevice(monkeypatch)
    q = cupy.empty((4, 1, 2, 64), np.float16)
    k_cache, v_cache = (cupy.empty((4, 256, 1, 64), np.float16) for _ in range(2))
    options = dict(cache_seqlens=cupy.empty((4,), np.int32))
    most = (2**31 - 1) // 4
    assert cuflash.kvcache_plan(q, k_cache, v_cache, **options, num_splits=most).route == "decode"
    for num_splits in (most + 1, 2**40):
        with pytest.raises(ValueError, match=f"num_splits takes at most {most:,} here") as planned:
            cuflash.kvcache_plan(q, k_cache, v_cache, **options, num_splits=num_splits)
        decode._prepared.cache_clear()
        try:
            with pytest.raises(ValueError) as called:
                cuflash.attention_with_kvcache(q, k_cache, v_cache, **options, num_splits=num_splits)
        finally:
            decode._prepared.cache_clear()
        assert str(planned.value) == str(called.value)
    assert device.compiled == [] and not device.take_launches()


def _appending_call_refused(monkeypatch, capacity: int, num_splits: int, error, match: str,
                            before=None):
    """A decode-route call appending one key to a cache of ``capacity`` keys with ``num_splits``
    splits, on a fake device (``before()`` run once it is in place), refused with ``error``
    matching ``match``; returns the device."""
    cupy = pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import decode

    device = FakeDevice(monkeypatch)
    if before is not None:
        before()
    q = cupy.empty((1, 1, 2, 64), np.float16)
    k_cache, v_cache = (cupy.empty((1, capacity, 1, 64), np.float16) for _ in range(2))
    k, v = (cupy.empty((1, 1, 1, 64), np.float16) for _ in range(2))
    decode._prepared.cache_clear()
    try:
        with pytest.raises(error, match=match):
            cuflash.attention_with_kvcache(q, k_cache, v_cache, k, v,
                                           cache_seqlens=cupy.empty((1,), np.int32),
                                           num_splits=num_splits)
    finally:
        decode._prepared.cache_clear()
    return device


def test_a_split_count_past_one_launch_is_refused_before_the_append(monkeypatch):
    """The append runs before the attention, whose launch refuses a split count past one
    launch: the refusal comes before the append is launched, so the caches keep what they held
    (through a fake device)."""
    device = _appending_call_refused(monkeypatch, 256, 2**31, ValueError,
                                     "problem too large for one launch of the decode kernel")
    assert not device.take_launches()


def test_no_memory_for_the_splits_is_found_before_the_append(monkeypatch):
    """With key splits the attention needs a workspace for their partial outputs: when its
    allocation fails, the call fails before the append is launched, so the caches keep what
    they held (through a fake device)."""
    from cuflash.kernels import _launch

    def no_memory(nbytes):
        raise MemoryError(f"out of memory allocating {nbytes} bytes")

    device = _appending_call_refused(
        monkeypatch, 4096, 4, MemoryError, "out of memory",
        before=lambda: monkeypatch.setattr(_launch, "device_memory", no_memory))
    assert not device.take_launches()


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_chosen_num_splits_reports_the_count_a_launch_takes(monkeypatch, paged):
    """``decode.chosen_num_splits`` reports the split count of the launch ``forward`` prepares
    for the same arrays, paged caches included (whose capacity is pages per row × page size,
    not one page; through a fake device)."""
    cupy = pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import decode

    FakeDevice(monkeypatch)
    # an H100's SMs and shared memory per SM (the split count's occupancy)
    monkeypatch.setattr(decode, "sm_count", lambda device_id: 132)
    monkeypatch.setattr(decode, "resident_blocks", lambda device_id, shared: 228 * 1024 // (shared + 1024))
    b, hq, hkv, d = 2, 8, 2, 64
    q = cupy.empty((b, 1, hq, d), np.float16)
    if paged:
        k_cache, v_cache = (cupy.empty((64, 256, hkv, d), np.float16) for _ in range(2))
        table = cupy.empty((b, 32), np.int32)
    else:
        k_cache, v_cache = (cupy.empty((b, 8192, hkv, d), np.float16) for _ in range(2))
        table = None
    out = cupy.empty((b, 1, hq, d), np.float16)
    decode._prepared.cache_clear()
    try:
        launch = decode.prepare(q, k_cache, v_cache, out, scale=0.125, causal=False,
                                window=(-1, -1), softcap=0.0, alibi=None, block_table=table)
        assert launch.splits > 1
        assert decode.chosen_num_splits(q, k_cache, v_cache, block_table=table) == launch.splits
    finally:
        decode._prepared.cache_clear()


def test_an_appending_split_call_hands_its_early_workspace_to_the_splits(monkeypatch):
    """With key splits and k, v appended, the splits' workspace is allocated before the append
    is launched, once, and it is the memory the decode kernel writes its partials to (through a
    fake device)."""
    cupy = pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import _launch, decode

    device = FakeDevice(monkeypatch)
    allocate, allocations = _launch.device_memory, []

    def recorded(nbytes):
        memory = allocate(nbytes)
        allocations.append((len(device.launches), nbytes, memory.ptr))
        return memory

    monkeypatch.setattr(_launch, "device_memory", recorded)
    b, hq, hkv, d, splits = 2, 4, 2, 64, 4
    q = cupy.empty((b, 1, hq, d), np.float16)
    k_cache, v_cache = (cupy.empty((b, 4096, hkv, d), np.float16) for _ in range(2))
    k, v = (cupy.empty((b, 1, hkv, d), np.float16) for _ in range(2))
    decode._prepared.cache_clear()
    try:
        cuflash.attention_with_kvcache(q, k_cache, v_cache, k, v,
                                       cache_seqlens=cupy.empty((b,), np.int32), num_splits=splits)
    finally:
        decode._prepared.cache_clear()
    names = [launch[0].partition("<")[0] for launch in device.take_launches()]
    assert names == ["kv_append", "flash_decode", "decode_combine"], names
    rows = b * hq  # batch rows × query heads × one query position
    ((launches_before, nbytes, ptr),) = allocations
    assert launches_before == 0 and nbytes == 4 * splits * rows * (d + 1)
    args = np.frombuffer(device.parameters[1][0], decode.DECODE_ARGS)[0]
    assert int(args["o_part"]) == ptr and int(args["splits"]) == splits


@pytest.mark.parametrize("given_out", [False, True], ids=["new out", "out="])
def test_a_captured_decode_call_frees_its_buffers_with_its_output(monkeypatch, given_out):
    """Under a CUDA graph capture the decode route keeps what its kernels write (the lse, the
    splits' partials) alive with its output, since the graph writes them at each replay, and
    frees all of it, the output and the lse included, once the caller lets the output go
    (through a fake device)."""
    import gc
    import weakref

    cupy = pytest.importorskip("cupy")
    import fake_device

    from cuflash import _calls
    from cuflash.kernels import decode

    device = fake_device.FakeDevice(monkeypatch)
    q = cupy.empty((2, 1, 8, 64), np.float16)
    k_cache, v_cache = (cupy.empty((2, 4096, 2, 64), np.float16) for _ in range(2))
    options = dict(cache_seqlens=cupy.empty((2,), np.int32), num_splits=4, return_lse=True)
    monkeypatch.setattr(fake_device.FakeStream, "is_capturing", lambda self: True)
    monkeypatch.setattr(_calls, "stream_capturing", lambda: True)
    decode._prepared.cache_clear()
    try:
        out, lse = cuflash.attention_with_kvcache(
            q, k_cache, v_cache, out=cupy.empty((2, 1, 8, 64), np.float16) if given_out else None,
            **options)
    finally:
        decode._prepared.cache_clear()
    assert any(x[0].startswith("decode_combine<") for x in device.take_launches())
    out_ref, lse_ref = weakref.ref(out), weakref.ref(lse)
    del lse
    gc.collect()
    assert lse_ref() is not None  # the graph writes it as long as out is kept
    del out
    gc.collect()
    assert out_ref() is None and lse_ref() is None


def test_a_captured_rotary_call_keeps_the_rotation_s_buffers_with_its_output(monkeypatch):
    """The rotation runs as array operations before the kernels; a graph that captured them
    writes their intermediates again at each replay, so under a capture the memory they take
    stays reserved as long as the call's output (through a fake device, whose allocator hands
    out made-up memory; the rotation is stood in for by one that allocates as array operations
    do)."""
    import gc
    import weakref

    cupy = pytest.importorskip("cupy")
    import fake_device

    from cuflash import _calls
    from cuflash.kernels import decode

    device = fake_device.FakeDevice(monkeypatch)
    owners = []

    class Owner:
        pass

    def allocator(size):
        owner = Owner()
        owners.append(weakref.ref(owner))
        memory = cupy.cuda.UnownedMemory(0x7700000000 + 512 * len(owners), size, owner, 0)
        return cupy.cuda.MemoryPointer(memory, 0)

    def rotated(spec, rotary, q, k):
        cupy.cuda.alloc(4 * q.size)  # an intermediate, let go at once
        return device.empty(q.shape, q.dtype), device.empty(k.shape, k.dtype)

    monkeypatch.setattr(cupy.cuda, "get_allocator", lambda: allocator)
    monkeypatch.setattr(_kvcache, "_rotated", rotated)
    monkeypatch.setattr(fake_device.FakeStream, "is_capturing", lambda self: True)
    monkeypatch.setattr(_calls, "stream_capturing", lambda: True)
    q = cupy.empty((2, 1, 4, 64), np.float16)
    k_cache, v_cache = (cupy.empty((2, 128, 2, 64), np.float16) for _ in range(2))
    new = cupy.empty((2, 1, 2, 64), np.float16)
    table = cupy.empty((128, 16), np.float16)
    decode._prepared.cache_clear()
    decode._prepared_append.cache_clear()
    try:
        out = cuflash.attention_with_kvcache(q, k_cache, v_cache, new, new,
                                             cache_seqlens=cupy.empty((2,), np.int32),
                                             rotary_cos=table, rotary_sin=table, num_splits=1)
    finally:
        decode._prepared.cache_clear()
        decode._prepared_append.cache_clear()
    assert any(x[0].startswith("flash_decode<") for x in device.take_launches())
    gc.collect()
    assert owners and all(owner() is not None for owner in owners)
    del out
    gc.collect()
    assert all(owner() is None for owner in owners)


@pytest.mark.parametrize("dv, sq", [(64, 1), (96, 3), (256, 16)])
def test_decode_combine_grid_covers_every_row_and_column(monkeypatch, dv, sq):
    """decode_combine takes one warp per (query row, 32 output columns), four warps a block: the
    launch (through a fake device) must cover B × Hq × Sq rows times ceil(Dv / 32) column groups,
    with the kernel's own column count."""
    import re

    cupy = pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import _build, decode

    (columns,) = re.findall(r"constexpr int DECODE_COMBINE_COLUMNS = (\d+);", _build.source(decode.SOURCE))
    assert int(columns) == decode.COMBINE_COLUMNS
    device = FakeDevice(monkeypatch)
    b, hq, hkv, capacity = 3, 8, 2, 4096
    q = cupy.empty((b, sq, hq, 64), np.float16)
    k_cache = cupy.empty((b, capacity, hkv, 64), np.float16)
    v_cache = cupy.empty((b, capacity, hkv, dv), np.float16)
    decode._prepared.cache_clear()
    try:
        cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=cupy.empty((b,), np.int32),
                                       num_splits=5)
    finally:
        decode._prepared.cache_clear()
    (combine,) = [x for x in device.take_launches() if x[0].startswith("decode_combine<")]
    (grid,), (threads,) = combine[1], combine[2]
    warps = b * hq * sq * -(-dv // decode.COMBINE_COLUMNS)
    assert threads == 128 and grid == -(-warps // 4)


@pytest.mark.parametrize("batch_kv_heads, key_tiles, expected", [
    (8, 64, 32),    # batch 1, 8 KV heads, 4K keys: 32 splits of two tiles fill 256 of 264 places
    (16, 64, 16),   # batch 2: 16 splits already fill them
    (64, 64, 4),    # batch 8
    (512, 512, 1),  # batch 64: the rows alone fill two waves
    (8, 4, 2),      # a short cache: never fewer than MIN_SPLIT_TILES tiles a split
])
def test_split_count_fills_the_resident_places(batch_kv_heads, key_tiles, expected):
    from cuflash.kernels import decode

    splits = decode.choose_splits(batch_kv_heads, key_tiles, 132 * 2)
    assert splits == expected
    assert splits == 1 or key_tiles // splits >= decode.MIN_SPLIT_TILES


def _refused_on_the_generic_route(monkeypatch, compute_capability: str, d: int, reason: str):
    """An appending call of head dim ``d`` on a fake device of ``compute_capability``, planned
    on the generic route and refused there for ``reason`` before any write; returns the device."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability=compute_capability)
    q = device.empty((1, 1, 2, d), ml_dtypes.bfloat16)
    k_cache, v_cache = (device.empty((1, 64, 2, d), ml_dtypes.bfloat16) for _ in range(2))
    new = device.empty((1, 1, 2, d), ml_dtypes.bfloat16)
    assert cuflash.kvcache_plan(q, k_cache, v_cache, new, new, cache_seqlens=3).route == "generic"
    with pytest.raises(ValueError, match=r"no GPU kernel attends this call's rows, so nothing was "
                                         r"written(.|\n)*" + reason):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=3)
    return device


def test_generic_route_refuses_before_writing_what_no_kernel_attends(monkeypatch):
    """Head dims above the GPU kernels' 256 take the generic route, which appends before it
    attends: it must refuse before any write (on the fake device a write would fail otherwise
    with the device's own error, not this one)."""
    _refused_on_the_generic_route(monkeypatch, "90", 264, r"D from 1 to 256")


def test_generic_route_refuses_rows_past_int32_before_writing(monkeypatch):
    """A cache of 2**31 positions takes the generic route, whose kernels count a row's keys in
    int32: a row that would attend 2**31 keys or more is refused before the new keys are written
    (on the fake device a write would fail otherwise with the device's own error, not this
    one)."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    q = device.empty((1, 1, 2, 64), ml_dtypes.bfloat16)
    new = device.empty((1, 1, 1, 64), ml_dtypes.bfloat16)  # below the caches' made-up addresses
    k_cache, v_cache = (device.empty((1, 2**31 + 8, 1, 64), ml_dtypes.bfloat16) for _ in range(2))
    assert cuflash.kvcache_plan(q, k_cache, v_cache, new, new,
                                cache_seqlens=2**31).route == "generic"
    with pytest.raises(ValueError, match=r"no GPU kernel attends this call's rows, so nothing was "
                                         r"written(.|\n)*must be below 2\*\*31"):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=2**31)


def test_generic_route_asks_for_the_keys_each_row_attends(monkeypatch):
    """The check before the writes counts each row's keys as the row attends them (its length,
    the new keys, less its left padding): the longest row decides; padding that keeps every row
    below 2**31 keys lets the call through."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash import _kvcache, _kvcache_spec

    device = FakeDevice(monkeypatch, compute_capability="90")
    q = device.empty((2, 1, 2, 64), ml_dtypes.bfloat16)
    k_cache, v_cache = (device.empty((2, 2**31 + 8, 1, 64), ml_dtypes.bfloat16) for _ in range(2))
    new = device.empty((2, 1, 1, 64), ml_dtypes.bfloat16)
    spec = _kvcache_spec.validate(q, k_cache, v_cache, new, new,
                                  cache_seqlens=device.empty((2,), np.int32), block_table=None,
                                  cache_batch_idx=None, causal=False, scale=None,
                                  window=(-1, -1), softcap=0.0, alibi_slopes=None, num_splits=0)
    lengths = np.array([5, 2**31 - 1], np.int64)
    for leftpads, refused in ((None, True), (np.array([0, 1024]), False),
                              (np.array([1024, 0]), True)):
        index = _kvcache._HostIndex(lengths, None, None, leftpads)
        if refused:
            with pytest.raises(ValueError, match=r"must be below 2\*\*31"):
                _kvcache._check_a_kernel_attends(spec, index)
        else:
            _kvcache._check_a_kernel_attends(spec, index)


def test_a_device_older_than_compute_capability_8_is_refused_before_any_write(monkeypatch):
    """No kernel runs on a device older than compute capability 8.0: the decode kernel passes
    such a call on, and the generic route, which appends before it attends, refuses it before
    writing the caches (it once planned the sm80 kernels there, wrote, then failed to compile)."""
    device = _refused_on_the_generic_route(monkeypatch, "75", 64,
                                           r"needs compute capability 8.0 or newer")
    assert device.compiled == [] and device.take_launches() == []


def test_device_caches_at_one_address_refused_for_appends(monkeypatch):
    """On the GPU path one array passed as both caches is refused before anything is launched;
    the two halves of one packed buffer (different addresses, interleaved bytes) are not."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    q = device.empty((2, 1, 4, 64), ml_dtypes.bfloat16)
    new = device.empty((2, 1, 2, 64), ml_dtypes.bfloat16)
    cache = device.empty((2, 128, 2, 64), ml_dtypes.bfloat16)
    seqlens = device.empty((2,), np.int32)
    with pytest.raises(ValueError, match="k_cache and v_cache must not share memory to append"):
        cuflash.attention_with_kvcache(q, cache, cache, new, new, cache_seqlens=seqlens)
    assert device.take_launches() == []
    cuflash.attention_with_kvcache(q, cache, cache, cache_seqlens=seqlens, num_splits=1)  # reading is fine
    packed = device.empty((2, 128, 2, 2, 64), ml_dtypes.bfloat16)  # (B, S, k/v, Hkv, D)
    cuflash.attention_with_kvcache(q, packed[:, :, 0], packed[:, :, 1], new, new, cache_seqlens=seqlens,
                                   num_splits=1)
    assert any(name.startswith("flash_decode<") for name, *_ in device.take_launches())


def test_lengths_past_the_room_name_the_appended_keys():
    q = np.zeros((1, 1, 2, 8), np.float32)
    cache = np.zeros((1, 16, 2, 8), np.float32)
    new = np.zeros((1, 1, 2, 8), np.float32)
    with pytest.raises(ValueError, match=r"cache_seqlens = 16 is outside \[0, 15\]: a batch row's "
                                         r"cache holds 16 keys with 1 key appended"):
        cuflash.attention_with_kvcache(q, cache, cache.copy(), new, new, cache_seqlens=16)


def test_an_overflow_warns_under_the_call_without_naming_other_arguments():
    """The warning names attention_with_kvcache, not the k and v it would append."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 2, 8)).astype(np.float32)
    caches = [rng.standard_normal((1, 16, 2, 8)).astype(np.float32) for _ in range(2)]
    with pytest.warns(cuflash.CuflashNumericalWarning) as record:
        cuflash.attention_with_kvcache(q, *caches, cache_seqlens=16, scale=1e38)
    (message,) = {str(w.message) for w in record}
    assert message.startswith("cuflash.attention_with_kvcache: the output holds inf or NaN "
                              "although the inputs are finite")


@pytest.mark.parametrize("what", ["rotary", "q in the cache"])
def test_kvcache_plan_rotates_and_copies_nothing(monkeypatch, what):
    """kvcache_plan validates the call and names its route without running anything on the
    device: where the call itself rotates q (rotary tables) or copies inputs that share memory
    with the caches it appends to, the plan asks the route of a new C-contiguous q, which is what
    those give (on the fake device any array operation would fail for want of a driver)."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    k_cache, v_cache = (device.empty((2, 128, 2, 64), ml_dtypes.bfloat16) for _ in range(2))
    new = device.empty((2, 1, 2, 64), ml_dtypes.bfloat16)
    seqlens = device.empty((2,), np.int32)
    extra = {}
    if what == "rotary":
        q = device.empty((2, 1, 4, 64), ml_dtypes.bfloat16)
        extra = dict(rotary_cos=device.empty((128, 16), ml_dtypes.bfloat16),
                     rotary_sin=device.empty((128, 16), ml_dtypes.bfloat16))
    else:
        q = k_cache[:, 100:101]  # (2, 1, 2, 64), rows of the cache itself
    plan = cuflash.kvcache_plan(q, k_cache, v_cache, new, new, cache_seqlens=seqlens, causal=True,
                                **extra)
    assert plan.route == "decode"
    assert device.take_launches() == []
    # An odd q (its rows not 16-byte aligned) takes the generic route unless the call replaces it.
    odd = device.empty((2 * 1 * 4 * 64 + 1,), ml_dtypes.bfloat16)[1:].reshape(2, 1, 4, 64)
    assert cuflash.kvcache_plan(odd, k_cache, v_cache, new, new, cache_seqlens=seqlens).route == "generic"
    if what == "rotary":
        assert cuflash.kvcache_plan(odd, k_cache, v_cache, new, new, cache_seqlens=seqlens,
                                    **extra).route == "decode"


def test_decode_on_a_device_with_99_kib_per_block(monkeypatch):
    """Compute capability 8.6 and 8.9 let a thread block take 99 KiB of shared memory: the
    decode kernel's ring takes fewer stages there (its Hopper ring at D = 128 needs 100 KiB),
    and where two stages do not fit (D = Dv from 160 up: 101-136 KiB) the call takes the generic
    route, saying why (docs/internals.md and docs/api.md)."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="86")
    for d, route in ((128, "decode"), (160, "generic"), (192, "generic"), (256, "generic")):
        q = device.empty((2, 1, 8, d), ml_dtypes.bfloat16)
        k_cache, v_cache = (device.empty((2, 512, 2, d), ml_dtypes.bfloat16) for _ in range(2))
        seqlens = device.empty((2,), np.int32)
        plan = cuflash.kvcache_plan(q, k_cache, v_cache, cache_seqlens=seqlens)
        assert plan.route == route, str(plan)
        if route == "generic":
            assert f"shared memory per thread block at D = {d}" in str(plan)
            continue
        device.take_launches()
        cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=1)
        (launch,) = [x for x in device.take_launches() if x[0].startswith("flash_decode<")]
        assert launch[3] <= 99 * 1024 and ", 2, Mask<" in launch[0]  # two stages


def test_caches_whose_strides_are_not_whole_elements_take_the_generic_route(monkeypatch):
    """The decode kernel takes strides in whole elements: a cache whose positions lie 257 bytes
    apart (bfloat16) is not one it can read (it would read them 256 bytes apart), even though
    the rounded strides are 16-byte multiples; the generic route copies such keys first."""
    pytest.importorskip("cupy")
    import cupy
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    q = device.empty((2, 1, 4, 64), ml_dtypes.bfloat16)
    memory = device.empty((2 * 64 * 257 + 64,), np.uint8).data
    odd = cupy.ndarray((2, 64, 2, 64), ml_dtypes.bfloat16, memptr=memory,
                       strides=(64 * 257, 257, 128, 2))
    whole = device.empty((2, 64, 2, 64), ml_dtypes.bfloat16)
    seqlens = device.empty((2,), np.int32)
    assert cuflash.kvcache_plan(q, whole, whole, cache_seqlens=seqlens).route == "decode"
    for k_cache, v_cache in ((odd, whole), (whole, odd)):
        plan = cuflash.kvcache_plan(q, k_cache, v_cache, cache_seqlens=seqlens)
        assert plan.route == "generic" and "16-byte aligned" in plan.reason


def test_decode_route_writes_an_out_of_strides_not_whole_elements_through_a_copy(rng, seed):
    """The decode kernel writes out through its strides in whole elements: an out whose rows lie
    a number of bytes apart that is not one gets a contiguous target, copied into it after."""
    case = make_case(rng, np, dtype=np.float16, b=2, sq=1, hq=4, hkv=2, d=16, lengths=[9, 9],
                     capacity=32, s_new=1, seqlens_as="int", causal=True)
    spec = _spec(case)
    targets = []

    class Recording(FakeDecode):
        def forward(self, q, k_cache, v_cache, cache_seqlens, out, lse, **options):
            targets.append(out.strides)
            super().forward(q, k_cache, v_cache, cache_seqlens, out, lse, **options)

    memory = np.full(2 * 4 * 33 + 8, 0xFF, np.uint8)  # NaN bits
    out = np.lib.stride_tricks.as_strided(memory.view(np.float16)[:1], (2, 1, 4, 16),
                                          (4 * 33, 4 * 33, 33, 2))
    lse = np.full((2, 4, 1), np.nan, np.float32)
    _kvcache._run_decode(spec, Recording(), *case.args, out, lse)
    assert len(targets) == 1 and all(s % 2 == 0 for s in targets[0])
    assert_kvcache_close(case, out, lse, f"seed={seed}")


def test_a_paged_call_is_refused_by_the_shared_memory_its_own_launch_needs(monkeypatch):
    """A paged launch holds its page numbers in shared memory beside the ring (1 KiB more than a
    contiguous one): where the per-block limit lies between the two, the paged call takes the
    generic route, naming the bytes its launch needs, and the contiguous one still takes the
    decode kernel, whose launch fits."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import _launch, decode

    d, dv = 96, 256
    dqk, dvp = (_launch.padded_head_dim(x, "head dim") for x in (d, dv))
    contiguous_need = decode.shared_bytes(dqk, dvp, 2, False)
    paged_need = decode.shared_bytes(dqk, dvp, 2, True)
    device = FakeDevice(monkeypatch, compute_capability="86")
    monkeypatch.setattr(_launch, "shared_limit", lambda device_id: contiguous_need)
    q = device.empty((2, 1, 4, d), ml_dtypes.bfloat16)
    seqlens = device.empty((2,), np.int32)
    k_cache, v_cache = device.empty((2, 64, 1, d), ml_dtypes.bfloat16), device.empty((2, 64, 1, dv), ml_dtypes.bfloat16)
    assert cuflash.kvcache_plan(q, k_cache, v_cache, cache_seqlens=seqlens).route == "decode"
    device.take_launches()
    cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=1)
    (launch,) = [x for x in device.take_launches() if x[0].startswith("flash_decode<")]
    assert launch[3] == contiguous_need

    table = device.empty((2, 2), np.int32)
    plan = cuflash.kvcache_plan(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table)
    assert plan.route == "generic", str(plan)
    assert f"needs {paged_need:,} bytes of shared memory" in str(plan)


@pytest.mark.parametrize("appends", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_the_decode_route_names_the_launches_the_call_makes(monkeypatch, appends, num_splits):
    """kvcache_plan's reason for the decode route names the launches the call then makes: the
    append only where the call appends keys, and the merge of the key splits only where it has
    several."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import decode

    device = FakeDevice(monkeypatch, compute_capability="90")
    q = device.empty((2, 1, 4, 64), ml_dtypes.bfloat16)
    k_cache, v_cache = (device.empty((2, 1024, 2, 64), ml_dtypes.bfloat16) for _ in range(2))
    new = dict(k=device.empty((2, 1, 2, 64), ml_dtypes.bfloat16),
               v=device.empty((2, 1, 2, 64), ml_dtypes.bfloat16)) if appends else {}
    seqlens = device.empty((2,), np.int32)
    plan = cuflash.kvcache_plan(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=num_splits, **new)
    assert plan.route == "decode", str(plan)
    prepared = (decode._prepared, decode._prepared_append)  # (launches of this fake device)
    for cache in prepared:
        cache.cache_clear()
    device.take_launches()
    try:
        cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=num_splits, **new)
    finally:
        for cache in prepared:
            cache.cache_clear()
    names = [launch[0].partition("<")[0] for launch in device.take_launches()]
    assert ("kv_append" in names) == appends == ("append" in plan.reason), (names, plan.reason)
    assert ("decode_combine" in names) == (num_splits > 1) == ("merg" in plan.reason), (names, plan.reason)
