"""``cuflash.attention_with_kvcache`` on the GPU against the float64 oracle of
tests/kvcache_cases.py: the decode kernel (``cuflash.kernels.decode``) for 16-bit inputs, the
generic route for the rest. Outputs are poisoned with NaN; every test asserts which route ran.

Cache lengths are mixed per batch row (1, 17, 1000, 4097, 33000 keys), caches contiguous or paged
through shuffled pages; the NumPy cases are in tests/test_kvcache_cpu.py.
"""

import dataclasses

import ml_dtypes
import numpy as np
import pytest
from kvcache_cases import (assert_cache_appended, assert_kvcache_close, call_and_check,
                           call_and_check_rotated, expected, make_case, poisoned_out, rotary_case,
                           rotary_tables, to_host)

import cuflash
from cuflash.check.rule import allowed

pytestmark = pytest.mark.gpu

DTYPES = [ml_dtypes.bfloat16, np.float16]
DTYPE_IDS = ["bfloat16", "float16"]
LENGTHS = [1, 17, 1000, 4097, 33000]
CAPACITY = 33024  # 33000 rounded up to whole pages of 256 keys
# The options' cases need no 33K-key rows (test_decode_kernel has them): shorter rows keep the
# float64 oracle fast; 4097 keys still split over several thread blocks.
FEATURE_LENGTHS = [1, 17, 1000, 4097]
FEATURE_CAPACITY = 4352  # 4097 + 1 appended, rounded up to whole pages of 256 keys
HEADS = [(32, 8), (8, 8), (16, 1)]
HEAD_DIMS = [(64, 64), (128, 128), (256, 256), (128, 64)]


@pytest.fixture
def decode_calls(xp_gpu, monkeypatch):
    """Counts the decode kernel's launches (``{"append": n, "forward": n}``)."""
    from cuflash.kernels import decode

    calls = {"append": 0, "forward": 0}
    for name in calls:
        original = getattr(decode, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(decode, name, counted)
    return calls


def run(case, seed, *, route="decode", **extra):
    """Plan, call into a NaN-poisoned ``out``, check against the oracle and the caches."""
    plan = cuflash.kvcache_plan(*case.args, **case.kwargs, **extra)
    assert plan.route == route, str(plan)
    return call_and_check(case, f"seed={seed}, {case.k_cache.shape} {plan.spec.describe()}", **extra)


# ----------------------------------------------------------------------------- the decode kernel

@pytest.mark.parametrize("hq, hkv", HEADS, ids=[f"{a}-{b}" for a, b in HEADS])
@pytest.mark.parametrize("sq", [1, 4, 16])
@pytest.mark.parametrize("d, dv", HEAD_DIMS, ids=[f"D{d}-Dv{dv}" for d, dv in HEAD_DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_kernel(xp_gpu, rng, seed, decode_calls, dtype, d, dv, sq, hq, hkv):
    case = make_case(rng, xp_gpu, dtype=dtype, b=len(LENGTHS), sq=sq, hq=hq, hkv=hkv, d=d, dv=dv,
                     lengths=LENGTHS, capacity=CAPACITY)
    run(case, seed)
    assert decode_calls == {"append": 0, "forward": 1}


@pytest.mark.parametrize("d, dv", [(32, 32), (96, 96), (160, 96), (40, 72)],
                         ids=["D32", "D96", "D160-Dv96", "D40-Dv72"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_kernel_head_dims_short_of_whole_lines(xp_gpu, rng, seed, decode_calls, d, dv,
                                                      num_splits):
    """Head dims whose ring rows are padded to whole 128-byte lines (flash_decode.cu, RingTile),
    split and not."""
    case = make_case(rng, xp_gpu, dtype=ml_dtypes.bfloat16, b=len(LENGTHS), sq=4, hq=32, hkv=8,
                     d=d, dv=dv, lengths=LENGTHS, capacity=CAPACITY, causal=True)
    run(case, seed, num_splits=num_splits)
    assert decode_calls == {"append": 0, "forward": 1}


@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_paged_equals_contiguous(xp_gpu, rng, seed, decode_calls, dtype, page_size):
    """A paged cache (shuffled pages) and a contiguous one holding the same keys: both pass the
    rule, and they differ from each other by no more than the rule allows either to differ
    from the oracle."""
    cupy = xp_gpu
    paged = make_case(rng, cupy, dtype=dtype, b=len(LENGTHS), sq=4, hq=32, hkv=8, d=128,
                      lengths=LENGTHS, capacity=CAPACITY, page_size=page_size, causal=True)
    out_paged, _ = run(paged, seed)
    rows_k = cupy.zeros((len(LENGTHS), CAPACITY, 8, 128), paged.k_cache.dtype)
    rows_v = cupy.zeros_like(rows_k)
    for row, n in enumerate(LENGTHS):
        keys, values = paged.row_keys(row)
        rows_k[row, :n], rows_v[row, :n] = keys, values
    out_rows = cuflash.attention_with_kvcache(paged.q, rows_k, rows_v,
                                              cache_seqlens=paged.seqlens, causal=True)
    assert decode_calls["forward"] == 2
    _, _, naive_errors = expected(paged)
    bound = allowed(max(e[0] for e in naive_errors if e is not None))
    difference = float(cupy.abs(out_paged.astype(cupy.float32) - out_rows.astype(cupy.float32)).max())
    assert difference <= bound, f"paged vs contiguous: {difference:.3g} > {bound:.3g}; seed={seed}"


@pytest.mark.parametrize("page_size, capacity", [(16, 4096), (48, 4080), (16, 4112)],
                         ids=["256-pages-held", "odd-page-size-held", "257-pages-read-as-they-come"])
def test_paged_tables_held_in_shared_memory(xp_gpu, rng, seed, decode_calls, page_size, capacity):
    """Tables of at most 256 pages are read into shared memory at a block's start, longer ones
    from the table tile by tile (flash_decode.cu, HeldPages); a thread's rows step from page to
    page, also across boundaries that are not multiples of the tile (48-key pages). Rows end in
    the middle of a page and at the capacity, with an append that crosses a page boundary."""
    lengths = [1, 47, 1000, capacity - 3, 2049]
    case = make_case(rng, xp_gpu, dtype=ml_dtypes.bfloat16, b=len(lengths), sq=2, hq=32, hkv=8,
                     d=128, lengths=lengths, capacity=capacity, page_size=page_size, s_new=2,
                     causal=True)
    run(case, seed, num_splits=3)
    assert decode_calls == {"append": 1, "forward": 1}


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("s_new, sq", [(1, 1), (4, 4), (16, 16)])
def test_append_then_attend(xp_gpu, rng, seed, decode_calls, paged, s_new, sq):
    lengths = [0, 16, 999, 4096, 32000]
    case = make_case(rng, xp_gpu, dtype=ml_dtypes.bfloat16, b=len(lengths), sq=sq, hq=32,
                     hkv=8, d=128, lengths=lengths, capacity=CAPACITY, s_new=s_new,
                     page_size=64 if paged else None, causal=True)
    run(case, seed)
    assert decode_calls == {"append": 1, "forward": 1}


def test_cache_batch_idx(xp_gpu, rng, seed, decode_calls):
    case = make_case(rng, xp_gpu, dtype=np.float16, b=4, sq=2, hq=16, hkv=4, d=64,
                     lengths=[5, 300, 0, 2047], capacity=2048, batch_idx=True, spare_rows=3,
                     s_new=1, causal=True)
    run(case, seed)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_cache_leftpad(xp_gpu, rng, seed, decode_calls, num_splits):
    """flash-attn's cache_leftpad in the decode kernel: each row attends from its first unpadded
    position, and gives what the row alone gives on its cache from that position (bit for bit:
    the same keys in the same tiles); the appends go to cache_seqlens as without padding. Device
    padding past a row's cached keys, or negative, gives that row NaN, as out-of-range lengths
    do."""
    cupy = xp_gpu
    case = make_case(rng, cupy, dtype=ml_dtypes.bfloat16, b=4, sq=2, hq=16, hkv=4, d=128,
                     lengths=[700, 4097, 64, 9], capacity=4352, s_new=1, causal=True,
                     alibi="heads")
    leftpad = cupy.asarray([0, 1000, 63, 9], np.int32)  # the last: only the appended key
    assert cuflash.kvcache_plan(*case.args, **case.kwargs, cache_leftpad=leftpad).route == "decode"
    out = poisoned_out(case)
    _, lse = cuflash.attention_with_kvcache(*case.args, **case.kwargs, cache_leftpad=leftpad,
                                            out=out, return_lse=True, num_splits=num_splits)
    context = f"seed={seed}, num_splits={num_splits}"
    assert_cache_appended(case, context)
    slopes = case.kwargs["alibi_slopes"]
    for row, first in enumerate(leftpad.get().tolist()):
        alone, alone_lse = cuflash.attention_with_kvcache(
            case.q[row:row + 1], case.k_cache[row:row + 1, first:],
            case.v_cache[row:row + 1, first:], cache_seqlens=int(case.lengths[row]) + 1 - first,
            causal=True, alibi_slopes=slopes, return_lse=True, num_splits=num_splits)
        assert (to_host(out[row:row + 1]).view(np.uint16) == to_host(alone).view(np.uint16)).all(), context
        assert (to_host(lse[row:row + 1]) == to_host(alone_lse)).all(), context
    bad = cupy.asarray([0, 4099, -1, 9], np.int32)
    again, again_lse = cuflash.attention_with_kvcache(
        case.q, case.k_cache, case.v_cache, cache_seqlens=case.seqlens + 1, causal=True,
        alibi_slopes=slopes, cache_leftpad=bad, return_lse=True, num_splits=num_splits)
    again, again_lse = to_host(again), to_host(again_lse)
    assert np.isnan(again[1:3].astype(np.float32)).all() and np.isnan(again_lse[1:3]).all(), context
    for row in (0, 3):
        assert (again[row].view(np.uint16) == to_host(out[row]).view(np.uint16)).all(), context


def test_larger_cache_without_batch_idx(xp_gpu, rng, seed, decode_calls):
    """flash-attn's rule: batch row b uses row b of a cache with more rows than the batch; the
    rows past the batch are left as they were (checked by ``call_and_check``)."""
    case = make_case(rng, xp_gpu, dtype=ml_dtypes.bfloat16, b=3, sq=2, hq=16, hkv=4, d=128,
                     lengths=[7, 0, 1500], capacity=2048, s_new=1, causal=True)
    extra = [make_case(rng, xp_gpu, dtype=ml_dtypes.bfloat16, b=2, sq=1, hq=16, hkv=4, d=128,
                       lengths=[0, 0], capacity=2048).k_cache for _ in range(2)]
    k_cache, v_cache = (xp_gpu.concatenate([cache, spare])
                        for cache, spare in zip((case.k_cache, case.v_cache), extra))
    larger = dataclasses.replace(case, k_cache=k_cache, v_cache=v_cache,
                                 k_cache_before=k_cache.copy(), v_cache_before=v_cache.copy())
    run(larger, seed)
    assert decode_calls == {"append": 1, "forward": 1}


def test_inputs_that_view_the_caches_are_copied_first(xp_gpu, rng, seed, decode_calls):
    """k and v given as views of the cache rows they are appended to are read as passed (the
    append kernel would otherwise race with its own writes)."""
    case = make_case(rng, xp_gpu, dtype=np.float16, b=2, sq=1, hq=8, hkv=2, d=64,
                     lengths=[100, 300], capacity=512, batch_idx=True, spare_rows=1, s_new=1)
    rows = xp_gpu.asarray(np.array([1, 2], np.int32))
    views = dict(k=case.k_cache[0:2, 100:101], v=case.v_cache[0:2, 100:101])
    copies = {name: x.copy() for name, x in views.items()}
    fresh = dataclasses.replace(case, k_cache=case.k_cache_before.copy(),
                                v_cache=case.v_cache_before.copy())
    want = cuflash.attention_with_kvcache(fresh.q, fresh.k_cache, fresh.v_cache, **copies,
                                          cache_seqlens=case.seqlens, cache_batch_idx=rows)
    got = cuflash.attention_with_kvcache(case.q, case.k_cache, case.v_cache, **views,
                                         cache_seqlens=case.seqlens, cache_batch_idx=rows)
    for a, b in ((got, want), (case.k_cache, fresh.k_cache), (case.v_cache, fresh.v_cache)):
        np.testing.assert_array_equal(to_host(a).view(np.uint16), to_host(b).view(np.uint16))



def test_one_array_as_both_caches(xp_gpu, rng, seed, decode_calls):
    """One array passed as both caches: an append is refused before anything runs or is written
    (its keys' rows would take the values), a read attends to it as keys and values. The two
    halves of one packed (B, S, 2, Hkv, D) buffer are two caches: they append and read."""
    case = make_case(rng, xp_gpu, dtype=ml_dtypes.bfloat16, b=2, sq=1, hq=8, hkv=2, d=64,
                     lengths=[100, 300], capacity=512, s_new=1)
    cache = case.k_cache
    with pytest.raises(ValueError, match="k_cache and v_cache must not share memory to append"):
        cuflash.attention_with_kvcache(case.q, cache, cache, case.k, case.v, cache_seqlens=case.seqlens)
    assert decode_calls == {"append": 0, "forward": 0}
    np.testing.assert_array_equal(to_host(cache).view(np.uint16),
                                  to_host(case.k_cache_before).view(np.uint16))
    one = dataclasses.replace(case, v_cache=cache, v_cache_before=case.k_cache_before, k=None, v=None)
    run(one, seed)
    assert decode_calls == {"append": 0, "forward": 1}

    packed = xp_gpu.stack([case.k_cache_before, case.v_cache_before], axis=2)
    halves = dataclasses.replace(case, k_cache=packed[:, :, 0], v_cache=packed[:, :, 1])
    run(halves, seed)
    assert decode_calls == {"append": 1, "forward": 2}


FEATURES = [
    dict(causal=True),
    dict(window=(256, 0)),
    dict(window=(100, 3), causal=True),
    dict(window=(-1, 2)),
    dict(softcap=30.0),
    dict(alibi="heads"),
    dict(alibi="batch", causal=True),
    dict(softcap=5.0, alibi="heads", window=(1000, 0), scale=0.05),
]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("sq", [1, 16])
@pytest.mark.parametrize("features", FEATURES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_features(xp_gpu, rng, seed, decode_calls, features, sq, paged):
    case = make_case(rng, xp_gpu, dtype=ml_dtypes.bfloat16, b=len(FEATURE_LENGTHS), sq=sq, hq=32,
                     hkv=8, d=128, lengths=FEATURE_LENGTHS, capacity=FEATURE_CAPACITY, s_new=1,
                     page_size=256 if paged else None, **features)
    run(case, seed)


def test_rows_that_see_no_key(xp_gpu, rng, seed, decode_calls):
    """Empty caches and queries the causal mask leaves without keys: 0 and lse -inf."""
    case = make_case(rng, xp_gpu, dtype=np.float16, b=3, sq=16, hq=8, hkv=8, d=64,
                     lengths=[0, 5, 600], capacity=1024, causal=True)
    out, lse = run(case, seed)
    assert (to_host(out[0]) == 0).all() and np.isneginf(to_host(lse[0])).all()
    assert np.isneginf(to_host(lse[1, :, :11])).all()


def test_num_splits(xp_gpu, rng, seed, decode_calls):
    """No split, the automatic split count and others (45: the combine kernel takes splits 32 at
    a time, 8 by 8) all pass the rule and agree within it."""
    case = make_case(rng, xp_gpu, dtype=ml_dtypes.bfloat16, b=len(LENGTHS), sq=1, hq=32, hkv=8,
                     d=128, lengths=LENGTHS, capacity=CAPACITY)
    out_one, lse_one = run(case, seed, num_splits=1)
    out_auto, lse_auto = run(case, seed, num_splits=0)
    out_many, _ = run(case, seed, num_splits=7)
    out_over_32, _ = run(case, seed, num_splits=45)
    _, _, naive_errors = expected(case)
    bound = allowed(max(e[0] for e in naive_errors if e is not None))
    for other in (out_auto, out_many, out_over_32):
        difference = float(abs(to_host(out_one).astype(np.float64)
                               - to_host(other).astype(np.float64)).max())
        assert difference <= bound, f"num_splits: {difference:.3g} > {bound:.3g}; seed={seed}"


def test_int_seqlens_and_strided_out(xp_gpu, rng, seed, decode_calls):
    cupy = xp_gpu
    case = make_case(rng, cupy, dtype=np.float16, b=3, sq=4, hq=8, hkv=2, d=64,
                     lengths=[700] * 3, capacity=1024, seqlens_as="int", s_new=4, causal=True)
    buffer = cupy.full((3, 8, 4, 64), np.nan, np.float16)  # out as a (B, Hq, Sq, Dv) transpose
    out = buffer.transpose(0, 2, 1, 3)
    got, lse = cuflash.attention_with_kvcache(*case.args, **case.kwargs, out=out, return_lse=True)
    assert got is out
    assert_kvcache_close(case, out, lse, f"seed={seed}")
    assert_cache_appended(case, f"seed={seed}")


def test_device_lengths_out_of_range_give_nan_rows(xp_gpu, rng, seed, decode_calls):
    """CuPy lengths are not read on the host: a row whose length lies outside
    [0, capacity − S_new] appends nothing (its cache is unchanged, bit for bit) and gets NaN
    output and lse; the other rows are right, split over the keys or not."""
    cupy = xp_gpu
    for num_splits in (1, 3):
        case = make_case(rng, cupy, dtype=np.float16, b=3, sq=1, hq=8, hkv=2, d=64,
                         lengths=[10, 20, 30], capacity=64, s_new=1)
        case.seqlens[...] = cupy.asarray([10, 64, -3], np.int32)
        out = poisoned_out(case)
        _, lse = cuflash.attention_with_kvcache(*case.args, **case.kwargs, out=out, return_lse=True,
                                                num_splits=num_splits)
        out, lse = to_host(out), to_host(lse)
        assert np.isnan(out[1:]).all() and np.isnan(lse[1:]).all()
        good = type(case)(**{**case.__dict__, "q": case.q[:1], "k_cache": case.k_cache[:1],
                             "v_cache": case.v_cache[:1], "k": case.k[:1], "v": case.v[:1],
                             "lengths": case.lengths[:1], "seqlens": case.seqlens[:1],
                             "k_cache_before": case.k_cache_before[:1],
                             "v_cache_before": case.v_cache_before[:1]})
        context = f"seed={seed}, num_splits={num_splits}"
        assert_kvcache_close(good, cupy.asarray(out[:1]), cupy.asarray(lse[:1]), context)
        assert_cache_appended(good, context)
        for row in (1, 2):
            for cache, before in ((case.k_cache, case.k_cache_before), (case.v_cache, case.v_cache_before)):
                got = to_host(cache[row]).view(np.uint16)
                assert (got == to_host(before[row]).view(np.uint16)).all(), context


@pytest.mark.parametrize("dtype, route", [(ml_dtypes.bfloat16, "decode"), (np.float16, "decode"),
                                          (np.float32, "generic")],
                         ids=["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_rotary(xp_gpu, rng, seed, dtype, route, interleaved, paged):
    """q and the appended k rotated on the device (cuflash._rotary, before the kernels), against
    the oracle of the case rotated in float64; lengths in a device array are not read back."""
    case = make_case(rng, xp_gpu, dtype=dtype, b=len(FEATURE_LENGTHS), sq=4, hq=32, hkv=8,
                     d=128, lengths=FEATURE_LENGTHS, capacity=FEATURE_CAPACITY, s_new=4,
                     page_size=256 if paged else None, causal=True)
    tables = rotary_tables(FEATURE_CAPACITY, 64, dtype, xp_gpu)
    rotated, rotary = rotary_case(case, *tables, interleaved)
    plan = cuflash.kvcache_plan(*case.args, **case.kwargs, **rotary)
    assert plan.route == route, str(plan)
    call_and_check_rotated(case, rotated, rotary, f"seed={seed}")


# ----------------------------------------------------------------------------- the generic route

@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_float32_takes_the_generic_route(xp_gpu, rng, seed, paged):
    case = make_case(rng, xp_gpu, dtype=np.float32, b=len(LENGTHS), sq=4, hq=8, hkv=2, d=64,
                     lengths=LENGTHS, capacity=CAPACITY, s_new=2, page_size=16 if paged else None,
                     causal=True, alibi="batch")
    plan = cuflash.kvcache_plan(*case.args, **case.kwargs)
    assert "decode kernel does not take this call" in plan.reason
    run(case, seed, route="generic")


def test_odd_head_dim_takes_the_generic_route(xp_gpu, rng, seed):
    case = make_case(rng, xp_gpu, dtype=ml_dtypes.bfloat16, b=3, sq=2, hq=4, hkv=2, d=36, dv=20,
                     lengths=[1, 17, 1000], capacity=1024, s_new=1, window=(50, 0))
    run(case, seed, route="generic")


def test_generic_route_checks_device_lengths(xp_gpu, rng):
    """The generic route reads lengths back, so it refuses bad ones before writing anything."""
    case = make_case(rng, xp_gpu, dtype=np.float32, b=2, sq=1, hq=4, hkv=2, d=64,
                     lengths=[3, 5], capacity=64, s_new=1)
    case.seqlens[...] = xp_gpu.asarray([3, 64], np.int32)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 64 is outside \[0, 63\]"):
        cuflash.attention_with_kvcache(*case.args, **case.kwargs)
    assert_cache_appended(type(case)(**{**case.__dict__, "k": None, "v": None}))


# ----------------------------------------------------------------------------- CUDA graphs

@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_cuda_graph_capture_and_replay(xp_gpu, rng, seed, decode_calls, paged):
    """A decode step (append + attend, lengths in a device array) captured once and replayed
    with new queries, keys and lengths written into the same buffers gives the bits an eager
    call gives on copies of the same state."""
    cupy = xp_gpu
    lengths = [1, 17, 1000, 4097]
    case = make_case(rng, cupy, dtype=ml_dtypes.bfloat16, b=4, sq=1, hq=32, hkv=8, d=128,
                     lengths=lengths, capacity=8192, s_new=1, page_size=256 if paged else None,
                     causal=True, alibi="heads")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        cuflash.attention_with_kvcache(*case.args, **case.kwargs)  # compiles outside the capture
        stream.begin_capture()
        out, lse = cuflash.attention_with_kvcache(*case.args, **case.kwargs, return_lse=True)
        graph = stream.end_capture()
        for step in range(3):
            case.q[...] = cupy.asarray(rng.standard_normal(case.q.shape, np.float32)).astype(case.q.dtype)
            case.k[...] = cupy.asarray(rng.standard_normal(case.k.shape, np.float32)).astype(case.k.dtype)
            case.seqlens += 1 + step
            k_cache, v_cache = case.k_cache.copy(), case.v_cache.copy()
            graph.launch()
            want, want_lse = cuflash.attention_with_kvcache(
                case.q, k_cache, v_cache, case.k, case.v, **case.kwargs, return_lse=True)
            stream.synchronize()
            assert (to_host(out).view(np.uint16) == to_host(want).view(np.uint16)).all(), step
            assert (to_host(lse) == to_host(want_lse)).all(), step
            assert (to_host(case.k_cache).view(np.uint16) == to_host(k_cache).view(np.uint16)).all()


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_ring_of_a_device_with_99_kib_per_block(xp_gpu, rng, seed, decode_calls, monkeypatch,
                                                       paged):
    """The decode kernel's two-stage ring at D = 128 for compute capability 8.6 and 8.9 (99 KiB of
    shared memory per thread block), run here with the limit set to theirs."""
    from cuflash.kernels import _launch, decode

    monkeypatch.setattr(_launch, "shared_limit", lambda device_id: 99 * 1024)
    variants = []
    original = decode.variant
    monkeypatch.setattr(decode, "variant", lambda *args, **kwargs: variants.append(
        original(*args, **kwargs)) or variants[-1])
    decode._prepared.cache_clear()  # prepared launches are kept per device: this one's is other
    try:
        case = make_case(rng, xp_gpu, dtype=ml_dtypes.bfloat16, b=len(FEATURE_LENGTHS), sq=4, hq=32,
                         hkv=8, d=128, lengths=FEATURE_LENGTHS, capacity=FEATURE_CAPACITY, s_new=1,
                         page_size=256 if paged else None, causal=True)
        run(case, seed)
    finally:
        decode._prepared.cache_clear()
    assert variants and all(", 128, 128, 2, Mask<" in v for v in variants), variants
