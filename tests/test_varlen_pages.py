"""Packed sequences whose keys and values live in a paged cache (``attention_varlen(...,
block_table=...)``, flash-attn's ``flash_attn_varlen_func`` form).

The pages are written here key by key from packed keys, by flash-attn's rule (sequence ``b``'s
key ``j`` in page ``block_table[b, j // page_size]`` at row ``j % page_size``), into a cache with
pages no sequence uses and table entries past each sequence's pages that are no page at all. A
paged call must then give exactly the packed call's results, and the packed call is held to the
float64 oracle by ``tests/test_varlen.py``. ``paged_oracle`` also states the rule directly in
float64, reading each key from its page, for every option (dropout included).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from oracle import assert_varlen_forward_close, poisoned, random_array
from test_varlen import offsets

import cuflash


def paged_case(rng, xp, dtype, lens_q, lens_k, page_size, *, hq=4, hkv=2, d=32, dv=None,
               share_first_page=False):
    """``(q, k_packed, v_packed, k_pages, v_pages, table, cu_q, cu_k)``: random packed keys and
    values, and the same keys written into shuffled pages. ``share_first_page``: every sequence's
    first page is one page (their first ``page_size`` keys are then the same keys)."""
    dv = dv or d
    needed = [-(-n // page_size) for n in lens_k]
    max_pages = max(needed) + 1
    num_pages = sum(needed) + 3
    order = rng.permutation(num_pages)
    table = np.full((len(lens_k), max_pages), -7, np.int32)  # no page: must not be read
    taken = 0
    for b, n in enumerate(needed):
        table[b, :n] = order[taken:taken + n]
        taken += n
    if share_first_page:
        table[np.array(needed) > 0, 0] = order[0]
    k_pages = random_array(rng, (num_pages, page_size, hkv, d), dtype)
    v_pages = random_array(rng, (num_pages, page_size, hkv, dv), dtype)
    rows = [(table[b, j // page_size], j % page_size) for b, n in enumerate(lens_k)
            for j in range(n)]
    k = np.stack([k_pages[p, o] for p, o in rows]) if rows else k_pages[:0, 0]
    v = np.stack([v_pages[p, o] for p, o in rows]) if rows else v_pages[:0, 0]
    q = random_array(rng, (sum(lens_q), hq, d), dtype)
    arrays = (q, k, v, k_pages, v_pages, table, offsets(lens_q), offsets(lens_k))
    return tuple(xp.asarray(x) for x in arrays)


def assert_paged_equals_packed(xp, rng, dtype, lens_q, lens_k, page_size, case=None, **options):
    q, k, v, k_pages, v_pages, table, cu_q, cu_k = case or paged_case(
        rng, xp, dtype, lens_q, lens_k, page_size)
    lengths = (max(lens_q), max(lens_k))
    out = poisoned((q.shape[0], q.shape[1], v.shape[2]), q.dtype, xp=xp)
    got, lse = cuflash.attention_varlen(q, k_pages, v_pages, cu_q, cu_k, *lengths, out=out,
                                        return_lse=True, block_table=table, **options)
    want, want_lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, *lengths, return_lse=True,
                                              **options)
    assert got is out
    assert xp.array_equal(got, want) and xp.array_equal(lse, want_lse), options
    return q, k, v, cu_q, cu_k, got, lse


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("options", [
    dict(), dict(causal=True), dict(window=(5, 0)), dict(window=(3, 2), softcap=4.0),
    dict(causal=True, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32)),
], ids=["plain", "causal", "window", "window-softcap", "causal-alibi"])
def test_numpy_paged_equals_packed(rng, page_size, options):
    assert_paged_equals_packed(np, rng, np.float32, [5, 0, 9, 2], [7, 3, 12, 0], page_size,
                               **options)


def test_numpy_paged_against_the_oracle(rng):
    """One case checked against the float64 oracle of each sequence alone as well (bfloat16,
    grouped heads, Dv != D)."""
    case = paged_case(rng, np, ml_dtypes.bfloat16, [4, 11, 6], [9, 11, 30], 4, hq=6, hkv=2, d=16,
                      dv=24)
    q, k, v, cu_q, cu_k, got, lse = assert_paged_equals_packed(
        np, rng, None, [4, 11, 6], [9, 11, 30], 4, case=case, causal=True)
    assert_varlen_forward_close(got, lse, q, k, v, cu_q, cu_k, causal=True)


def test_numpy_no_keys_at_all(rng):
    """Sequences without keys on every side: nothing gathered, every output row 0."""
    *_, got, lse = assert_paged_equals_packed(np, rng, np.float32, [2, 3], [0, 0], 4)
    assert not got.any() and np.all(lse == -np.inf)


def test_numpy_shared_pages(rng):
    """Sequences may list the same page (a shared prefix): each reads its keys from it."""
    case = paged_case(rng, np, np.float32, [3, 4, 2], [6, 5, 2], 4, share_first_page=True)
    table = case[5]
    assert len(set(table[:, 0])) == 1
    assert_paged_equals_packed(np, rng, None, [3, 4, 2], [6, 5, 2], 4, case=case, causal=True)


def _paged_args(rng):
    q, _, _, k_pages, v_pages, table, cu_q, cu_k = paged_case(rng, np, np.float32, [3, 5],
                                                              [6, 9], 4)
    return dict(q=q, k=k_pages, v=v_pages, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5,
                max_seqlen_k=9, block_table=table)


def _call(args):
    a = dict(args)
    return cuflash.attention_varlen(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("cu_seqlens_q"),
                                    a.pop("cu_seqlens_k"), a.pop("max_seqlen_q"),
                                    a.pop("max_seqlen_k"), **a)


def _table_with(args, row, column, value):
    table = args["block_table"].copy()
    table[row, column] = value
    return dict(block_table=table)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: _table_with(a, 1, 2, a["k"].shape[0]), ValueError,
     r"block_table\[1, 2\] = \d+ is not a page of k"),
    (lambda a: _table_with(a, 0, 1, -1), ValueError, r"block_table\[0, 1\] = -1 is not a page"),
    (lambda a: dict(block_table=a["block_table"][:, :2]), ValueError,
     "block_table has 2 pages per sequence, but sequence 1 has 9 keys: 3 pages of 4"),
    (lambda a: dict(block_table=a["block_table"].astype(np.int64)), TypeError,
     "block_table must have dtype int32"),
    (lambda a: dict(block_table=a["block_table"][:1]), ValueError,
     r"block_table must have shape \(2, max_pages\)"),
    (lambda a: dict(k=a["k"][:, 0]), ValueError,
     r"with a block_table, k is a paged cache \(num_pages, page_size, Hkv, D\)"),
    (lambda a: dict(v=a["v"][:-1]), ValueError, "v must match k in its first three axes"),
    (lambda a: dict(cu_seqlens_k=np.array([0, 9, 6], np.int32)), ValueError,
     "cu_seqlens_k must be non-decreasing"),
    (lambda a: dict(max_seqlen_k=8), ValueError, "max_seqlen_k must be at least"),
    # the pages as given, not the packed rows gathered from them
    (lambda a: dict(k=a["k"][..., :16]), ValueError,
     r"same head dimension \(last axis\), got q \(8, 4, 32\) and k \(\d+, 4, 2, 16\)"),
    (lambda a: dict(k=a["k"][:, :, :1].repeat(3, 2), v=a["v"][:, :, :1].repeat(3, 2)),
     ValueError,
     r"got 4 query heads \(q \(8, 4, 32\)\) and 3 key/value heads \(k \(\d+, 4, 3, 32\)\)"),
    (lambda a: dict(k=a["k"][:, :, :0], v=a["v"][:, :, :0]), ValueError,
     r"k must not have an empty axis .* got shape \(\d+, 4, 0, 32\)"),
    (lambda a: dict(v=a["v"][..., :0]), ValueError,
     r"v must not have an empty axis .* got shape \(\d+, 4, 2, 0\)"),
    (lambda a: dict(k=a["k"][:, :0], v=a["v"][:, :0]), ValueError,
     r"k must not have an empty axis .* got shape \(\d+, 0, 2, 32\)"),
])
def test_errors_name_the_problem(rng, change, error, message):
    args = _paged_args(rng)
    with pytest.raises(error, match=message):
        _call(args | change(args))


@pytest.mark.parametrize("option", [
    dict(dropout_p=1.5), dict(dropout_p=0.25), dict(window=(-2, 0)), dict(softcap=-1.0),
    dict(scale="0.5"), dict(causal="False"), dict(dropout_p=0.25, dropout_seed=-1),
    dict(alibi_slopes=np.ones(3, np.float32)), dict(max_seqlen_q=-1), dict(check_offsets="yes"),
], ids=lambda option: next(iter(option)))
def test_options_are_refused_before_the_pages_are_read(rng, monkeypatch, option):
    """A paged call refused for an option raises what the call on the packed keys raises, though
    its table lists a page k does not hold, and reads and gathers nothing."""
    from cuflash import _varlen_pages

    q, k, v, k_pages, v_pages, table, cu_q, cu_k = paged_case(rng, np, np.float32, [3, 5],
                                                              [6, 9], 4)
    table[1, 2] = k_pages.shape[0]  # no page of k
    options = dict(dict(max_seqlen_q=5), **option)
    max_q = options.pop("max_seqlen_q")
    with pytest.raises((TypeError, ValueError)) as packed:
        cuflash.attention_varlen(q, k, v, cu_q, cu_k, max_q, 9, **options)
    monkeypatch.setattr(_varlen_pages, "key_rows", lambda *args: pytest.fail("pages read"))
    with pytest.raises(type(packed.value)) as paged:
        cuflash.attention_varlen(q, k_pages, v_pages, cu_q, cu_k, max_q, 9, block_table=table,
                                 **options)
    assert str(paged.value) == str(packed.value)


@pytest.mark.parametrize("result_option", [
    lambda q: dict(return_lse="yes"),
    lambda q: dict(out=np.zeros(q.shape[:2] + (q.shape[2] + 1,), q.dtype)),
    lambda q: dict(out=np.zeros(q.shape, np.float64)),
    lambda q: dict(out=q),
    lambda q: dict(out=q.tolist()),
], ids=["return_lse", "out-shape", "out-dtype", "out-over-q", "out-not-an-array"])
def test_result_options_are_refused_before_the_pages_are_read(rng, monkeypatch, result_option):
    """``return_lse`` and ``out`` are arguments like the others: a paged call refused for one
    raises what the call on the packed keys raises, though its table lists a page k does not
    hold, and reads and gathers nothing."""
    from cuflash import _varlen_pages

    q, k, v, k_pages, v_pages, table, cu_q, cu_k = paged_case(rng, np, np.float32, [3, 5],
                                                              [6, 9], 4)
    table[1, 2] = k_pages.shape[0]  # no page of k
    options = result_option(q)
    with pytest.raises((TypeError, ValueError)) as packed:
        cuflash.attention_varlen(q, k, v, cu_q, cu_k, 5, 9, **options)
    monkeypatch.setattr(_varlen_pages, "key_rows", lambda *args: pytest.fail("pages read"))
    with pytest.raises(type(packed.value)) as paged:
        cuflash.attention_varlen(q, k_pages, v_pages, cu_q, cu_k, 5, 9, block_table=table,
                                 **options)
    assert str(paged.value) == str(packed.value)


@pytest.mark.parametrize("offsets", [
    dict(cu_seqlens_q=np.array([0, 3, 7], np.int32)),
    dict(cu_seqlens_q=np.array([1, 3, 8], np.int32)),
    dict(cu_seqlens_q=np.array([0, 9, 8], np.int32)), dict(max_seqlen_q=4),
], ids=["last", "first", "decreasing", "max_seqlen_q"])
def test_query_offsets_are_refused_before_the_pages_are_read(rng, monkeypatch, offsets):
    """The query offsets are checked first, as the call on the packed keys checks them: a paged
    call whose cu_seqlens_q (or max_seqlen_q) is wrong raises what the packed call raises, though
    its table lists a page k does not hold, and gathers nothing."""
    from cuflash import _varlen_pages

    q, k, v, k_pages, v_pages, table, cu_q, cu_k = paged_case(rng, np, np.float32, [3, 5],
                                                              [6, 9], 4)
    table[1, 2] = k_pages.shape[0]  # no page of k
    arguments = dict(dict(cu_seqlens_q=cu_q, max_seqlen_q=5), **offsets)
    cu_q, max_q = arguments["cu_seqlens_q"], arguments["max_seqlen_q"]
    with pytest.raises(ValueError) as packed:
        cuflash.attention_varlen(q, k, v, cu_q, cu_k, max_q, 9)
    monkeypatch.setattr(_varlen_pages, "key_rows", lambda *args: pytest.fail("pages read"))
    with pytest.raises(ValueError) as paged:
        cuflash.attention_varlen(q, k_pages, v_pages, cu_q, cu_k, max_q, 9, block_table=table)
    assert str(paged.value) == str(packed.value)


def test_out_over_the_pages_is_refused(rng):
    args = _paged_args(rng)
    pages = np.zeros((8, 4, 4, 32), np.float32)  # 8 pages of 4 keys, 4 heads: room for out
    args["k"], args["v"] = pages[:, :, :2], pages[:, :, 2:]
    out = pages.reshape(32, 4, 32)[:8]
    args["block_table"] = np.array([[0, 1, 2], [3, 4, 5]], np.int32)
    with pytest.raises(ValueError, match="out must not share memory with the paged cache k"):
        _call(args | dict(out=out))


@pytest.mark.parametrize("option", [dict(scale="0.5"), dict(return_lse="yes"),
                                    dict(q_dtype=np.float64)], ids=["scale", "return_lse", "q"])
def test_out_over_the_pages_is_named_after_the_calls_other_refusals(rng, option):
    """out over the pages is one more reason to refuse an out: a call refused for another
    argument as well raises what the call on the packed keys (which out does not overlap)
    raises for it, as the checks of the packed call come first."""
    q, k, v, _, _, table, cu_q, cu_k = paged_case(rng, np, np.float32, [3, 5], [6, 9], 4)
    pages = np.zeros((8, 4, 4, 32), np.float32)  # 8 pages of 4 keys, 4 heads: room for out
    k_pages, v_pages = pages[:, :, :2], pages[:, :, 2:]
    out = pages.reshape(32, 4, 32)[:8]
    table = np.array([[0, 1, 2], [3, 4, 5]], np.int32)
    options = dict(option)
    q = q.astype(options.pop("q_dtype", q.dtype))
    with pytest.raises((TypeError, ValueError)) as packed:
        cuflash.attention_varlen(q, k, v, cu_q, cu_k, 5, 9, out=out, **options)
    with pytest.raises(type(packed.value)) as paged:
        cuflash.attention_varlen(q, k_pages, v_pages, cu_q, cu_k, 5, 9, out=out,
                                 block_table=table, **options)
    assert str(paged.value) == str(packed.value)


def test_unchecked_device_offsets_are_refused(rng):
    """The gather is sized by cu_seqlens_k and block_table on the host: with CuPy inputs and
    check_offsets=False (no read-back) a paged call cannot run, whichever module the offsets
    are of."""
    cupy = pytest.importorskip("cupy")
    from fake_device import FakeDevice

    with pytest.MonkeyPatch.context() as monkeypatch:
        device = FakeDevice(monkeypatch, compute_capability="90")
        q = device.empty((8, 4, 32), ml_dtypes.bfloat16)
        pages = device.empty((5, 4, 2, 32), ml_dtypes.bfloat16)
        cu = device.empty((3,), np.int32)
        table = device.empty((2, 3), np.int32)
        assert isinstance(cu, cupy.ndarray)
        with pytest.raises(ValueError, match="check_offsets=False .* cannot be kept"):
            cuflash.attention_varlen(q, pages, pages, cu, cu, 5, 9, block_table=table,
                                     check_offsets=False)
        # NumPy offsets need no read-back, but the table does: a synchronisation all the same
        host = np.array([0, 3, 8], np.int32)
        with pytest.raises(ValueError, match="check_offsets=False .* cannot be kept"):
            cuflash.attention_varlen(q, pages, pages, host, host, 5, 5, block_table=table,
                                     check_offsets=False)


def test_device_offsets_are_read_back_once_before_the_gather(rng, monkeypatch):
    """With CuPy inputs, cu_seqlens_q, cu_seqlens_k and block_table are each read back once,
    before the gather: the packed call checks those host copies rather than reading the offsets
    again (a second synchronisation, which would wait for the gather's copy)."""
    cupy = pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash import _checks, _varlen_pages

    _, _, _, k_pages, _, table, cu_q, cu_k = paged_case(rng, np, np.float32, [3, 5], [6, 9], 4)
    events = []
    with pytest.MonkeyPatch.context() as patch:
        device = FakeDevice(patch, compute_capability="90")

        def on_device(x, name):
            fake = device.empty(x.shape, x.dtype)
            values[id(fake)] = name, x
            return fake

        values = {}
        q = device.empty((8, 4, 32), ml_dtypes.bfloat16)
        pages = device.empty(k_pages.shape, ml_dtypes.bfloat16)
        arrays = {name: on_device(x, name)
                  for name, x in (("cu_q", cu_q), ("cu_k", cu_k), ("table", table))}

        def read(x):  # fake memory cannot be read back: the values it stands for
            if isinstance(x, np.ndarray):
                return x
            name, host = values[id(x)]
            events.append(name)
            return host

        def gathered(pages, rows, xp):
            events.append("gather")
            return device.empty(rows.shape + pages.shape[2:], pages.dtype)

        patch.setattr(_checks, "_host_values", read)
        patch.setattr(cupy, "asarray", lambda x: device.empty(x.shape, x.dtype))  # rows to gather
        patch.setattr(_varlen_pages, "_rows_of", gathered)
        out = cuflash.attention_varlen(q, pages, pages, arrays["cu_q"], arrays["cu_k"], 5, 9,
                                       block_table=arrays["table"])
        assert out.shape == (8, 4, 32)
    assert sorted(events[:3]) == ["cu_k", "cu_q", "table"]
    assert events[3:] == ["gather", "gather"]


def test_float32_pages_on_the_gpu_are_refused_before_the_gather(rng):
    """No GPU kernel runs float32 packed sequences: a float32 paged call with CuPy inputs is
    refused before its keys are gathered (a copy of every key), with the reason the kernel
    choice gives for the packed call."""
    cupy = pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash import _checks, _varlen_pages

    _, _, _, k_pages, _, table, cu_q, cu_k = paged_case(rng, np, np.float32, [3, 5], [6, 9], 4)
    gathers = []
    with pytest.MonkeyPatch.context() as patch:
        device = FakeDevice(patch, compute_capability="90")
        values = {}

        def on_device(x):
            fake = device.empty(x.shape, x.dtype)
            values[id(fake)] = x
            return fake

        patch.setattr(_checks, "_host_values",
                      lambda x: x if isinstance(x, np.ndarray) else values[id(x)])
        patch.setattr(cupy, "asarray", lambda x: device.empty(x.shape, x.dtype))
        patch.setattr(_varlen_pages, "_rows_of", lambda pages, rows, xp: gathers.append(rows)
                      or device.empty(rows.shape + pages.shape[2:], pages.dtype))
        q = device.empty((8, 4, 32), np.float32)
        pages = device.empty(k_pages.shape, np.float32)
        offsets = on_device(cu_q), on_device(cu_k)
        with pytest.raises(ValueError, match="packed variable-length sequences .* float32"):
            cuflash.attention_varlen(q, pages, pages, *offsets, 5, 9,
                                     block_table=on_device(table))
    assert not gathers


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("page_size", [7, 16, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_gpu_paged_equals_packed(xp_gpu, rng, dtype, page_size, causal):
    case = paged_case(rng, xp_gpu, dtype, [130, 1, 300, 77], [260, 9, 300, 501], page_size,
                      hq=8, hkv=2, d=128)
    if causal:  # k's pages every other page of a larger cache: indexed page and row apart
        spread = xp_gpu.zeros((2 * case[3].shape[0],) + case[3].shape[1:], case[3].dtype)
        spread[::2] = case[3]
        case = case[:3] + (spread[::2],) + case[4:]
    assert_paged_equals_packed(xp_gpu, rng, None, [130, 1, 300, 77], [260, 9, 300, 501],
                               page_size, case=case, causal=causal)


def test_numpy_pages_strided_between_pages(rng):
    """Pages that are a view with a gap between them (every other page of a larger cache) are
    read where they are."""
    q, k, v, k_pages, v_pages, table, cu_q, cu_k = paged_case(rng, np, np.float32, [3, 5], [6, 9],
                                                              4)
    spread = np.zeros((2 * k_pages.shape[0],) + k_pages.shape[1:], np.float32)
    spread[::2] = k_pages
    assert spread[::2].strides[0] != k_pages.shape[1] * k_pages.strides[1]
    case = (q, k, v, spread[::2], v_pages, table, cu_q, cu_k)
    assert_paged_equals_packed(np, rng, None, [3, 5], [6, 9], 4, case=case, causal=True)


def test_a_large_shared_page_costs_host_memory_of_the_keys_used(rng):
    """The rows to gather are formed for the keys the sequences use, not for every row of the
    pages they use: 16 sequences of 5 keys, all in one shared page of 2**20 rows, cost the host
    kilobytes, not 16 pages' worth of row numbers (128 MiB)."""
    import tracemalloc

    lengths = [5] * 16
    page = (np.arange(2**23, dtype=np.float32) / 2**23).reshape(1, 2**20, 1, 8)
    q = random_array(rng, (80, 2, 8), np.float32)
    cu = offsets(lengths)
    table = np.zeros((16, 3), np.int32)
    tracemalloc.start()
    try:
        got = cuflash.attention_varlen(q, page, page, cu, cu, 5, 5, block_table=table)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**22, f"{peak / 2**20:.1f} MiB"
    keys = np.tile(page[0, :5], (16, 1, 1))
    assert np.array_equal(got, cuflash.attention_varlen(q, keys, keys, cu, cu, 5, 5))


def paged_oracle(q, k_pages, v_pages, cu_q, cu_k, table, *, causal=False, window=(-1, -1),
                 softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=0,
                 dropout_offset=0):
    """``(out, lse)`` in float64, written from flash-attn's rule: sequence ``b``'s key ``j`` read
    from page ``table[b, j // page_size]`` row ``j % page_size``, query ``i`` of ``nq`` seeing key
    ``j`` of ``nk`` where ``i + nk - nq - left <= j <= i + nk - nq + right`` (causal: right 0),
    the logit ``scale·s``, capped, less ``slope·|i + nk - nq - j|``; dropout keeps what the
    documented mask of sequence ``b`` keeps."""
    from cuflash import _dropout

    page_size, (total_q, hq, d), hkv = k_pages.shape[1], q.shape, k_pages.shape[2]
    out = np.zeros((total_q, hq, v_pages.shape[-1]))
    lse = np.full((hq, total_q), -np.inf)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    for b in range(len(cu_q) - 1):
        rows, nk = slice(cu_q[b], cu_q[b + 1]), int(cu_k[b + 1] - cu_k[b])
        nq = rows.stop - rows.start
        keys = [(table[b, j // page_size], j % page_size) for j in range(nk)]
        for h in range(hq):
            g = h // (hq // hkv)
            k = np.array([k_pages[p, r, g] for p, r in keys], np.float64).reshape(nk, d)
            v = np.array([v_pages[p, r, g] for p, r in keys], np.float64).reshape(
                nk, v_pages.shape[-1])
            x = q[rows, h].astype(np.float64) @ k.T / np.sqrt(d)
            if softcap:
                x = softcap * np.tanh(x / softcap)
            shift = np.arange(nq)[:, None] + nk - nq - np.arange(nk)  # i + nk - nq - j
            if alibi_slopes is not None:
                x -= np.abs(shift) * (alibi_slopes[h] if alibi_slopes.ndim == 1
                                      else alibi_slopes[b, h])
            seen = ((left < 0) | (shift <= left)) & ((right < 0) | (-shift <= right))
            for i in np.flatnonzero(seen.any(1)):
                p = np.exp(x[i, seen[i]] - x[i, seen[i]].max())
                lse[h, rows.start + i] = np.log(p.sum()) + x[i, seen[i]].max()
                p /= p.sum()
                if dropout_p:
                    kept = _dropout.keep_mask(dropout_seed, dropout_offset, dropout_p, b, h, i,
                                              np.flatnonzero(seen[i]), hq=hq)
                    p = p * kept * _dropout.rescale(dropout_p)
                out[rows.start + i, h] = p @ v[seen[i]]
    return out, lse


@pytest.mark.parametrize("page_size", [1, 3, 64])
@pytest.mark.parametrize("options", [
    dict(), dict(causal=True, softcap=2.0), dict(window=(2, 1)), dict(window=(0, -1)),
    dict(alibi_slopes="heads", causal=True), dict(alibi_slopes="sequences", window=(3, 0)),
    dict(dropout_p=0.3, dropout_seed=2**40 + 7, dropout_offset=5),
    dict(causal=True, alibi_slopes="sequences", softcap=1.5, dropout_p=0.2, dropout_seed=9),
], ids=["plain", "causal-softcap", "window", "window-right", "alibi", "alibi-per-sequence",
        "dropout", "everything"])
def test_numpy_paged_against_a_float64_oracle_of_the_page_rule(rng, page_size, options):
    """Grouped heads, Dv != D, sequences empty on either side, a first page shared by every
    sequence, pages in shuffled order and junk past each row's pages, against the rule written
    out in float64 (the dropout mask of each sequence's own index)."""
    lens_q, lens_k = [5, 0, 9, 4, 3], [7, 3, 12, 0, 2]
    q, _, _, k_pages, v_pages, table, cu_q, cu_k = paged_case(
        rng, np, np.float32, lens_q, lens_k, page_size, hq=4, hkv=2, d=16, dv=8,
        share_first_page=True)
    slopes = {"heads": rng.random(4, np.float32),
              "sequences": rng.random((5, 4), np.float32)}.get(options.get("alibi_slopes"))
    options = dict(options, alibi_slopes=slopes)
    got, lse = cuflash.attention_varlen(q, k_pages, v_pages, cu_q, cu_k, 9, 12, return_lse=True,
                                        block_table=table, **options)
    want, want_lse = paged_oracle(q, k_pages, v_pages, cu_q, cu_k, table, **options)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    assert np.array_equal(np.isinf(lse), np.isinf(want_lse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)], rtol=0,
                               atol=2e-6)
