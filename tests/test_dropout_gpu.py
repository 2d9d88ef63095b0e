"""Dropout in the GPU kernels (csrc/dropout.cuh: the sm80 family and, on Hopper, the TMA forward
and the wgmma backward): the mask bit for bit against ``cuflash._dropout``, and forward and
gradients against the float64 oracle drawing the same mask.

The exact-mask tests choose inputs whose results expose ``P ∘ Z``: with ``q = 0`` every key a row
sees has the same probability, and a one-hot value row per chosen key makes each output column
that key's ``P ∘ Z`` times the rescale (the forward kernel); a one-hot ``dout`` row per chosen query
makes each ``dv`` column that query's (the dK/dV kernel, which draws the mask with keys along
the rows of its tiles). Dropped elements are exactly 0, kept ones are not.
"""

from __future__ import annotations

import gc
import weakref

import ml_dtypes
import numpy as np
import pytest
from oracle import check_forward_and_backward, poisoned, random_array, to_host
from test_varlen import offsets

import cuflash
from cuflash import _dropout, reference

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, params=["default", "sm80"])
def family(request, monkeypatch):
    """Every test runs with the default kernels (on Hopper the TMA forward and the wgmma
    backward, where they take the call) and with the sm80 kernels forced."""
    from cuflash.kernels import DISABLE_HOPPER_ENV

    if request.param == "sm80":
        monkeypatch.setenv(DISABLE_HOPPER_ENV, "1")
    else:
        monkeypatch.delenv(DISABLE_HOPPER_ENV, raising=False)
    return request.param


def test_hopper_draws_the_mask_in_its_own_kernels(xp_gpu, family):
    """On Hopper the default runs of this file exercise the Hopper kernels' dropout."""
    from cuflash.kernels import _launch

    q = xp_gpu.zeros((1, 2, 256, 64), ml_dtypes.bfloat16)
    if family == "sm80" or not _launch.on_hopper(q):
        pytest.skip("the Hopper kernels run only on compute capability 9.0, by default")
    plan = cuflash.kernel_plan(q, q, q, dropout_p=0.2, dropout_seed=1)
    assert (plan.forward.family.name, plan.backward.family.name) == ("sm90-tma", "sm90-wgmma")


DTYPES = [np.float16, ml_dtypes.bfloat16]
DTYPE_IDS = ["float16", "bfloat16"]


def _seed_and_offset(rng):
    return int(rng.integers(2**64, dtype=np.uint64)), int(rng.integers(2**32))


def _expected_zeros(b, hq, rows, cols, nq, nk, *, causal, seed, offset, p):
    """True where element (b, h, rows, cols) of P ∘ Z is 0: dropped, or hidden by causal."""
    keep = _dropout.dense_keep(seed, offset, p, (b,), hq, rows, nk)[..., cols]
    if causal:
        visible = reference.keep_mask(nq, nk, causal=True, rows=rows, xp=np)[..., cols]
        keep = keep & visible
    return ~keep


# ----------------------------------------------------------------------------- the exact mask

MASK_CASES = {
    # (b, hq, nq, nk, d, dv, causal)
    "short-keys": (2, 3, 1000, 97, 64, 128, False),
    "long-keys": (1, 2, 1000, 4097, 128, 256, False),
    "causal": (2, 2, 17, 1000, 96, 256, True),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_mask_is_the_numpy_mask(xp_gpu, rng, seed, dtype, case):
    cp = xp_gpu
    b, hq, nq, nk, d, dv, causal = MASK_CASES[case]
    p = 0.3
    drop_seed, offset = _seed_and_offset(rng)
    # Value column c is one-hot at key cols[c] (the last key included).
    cols = np.unique(np.linspace(0, nk - 1, min(nk, dv)).round().astype(np.int64))
    v = np.zeros((b, hq, nk, dv), dtype)
    v[:, :, cols, np.arange(len(cols))] = 1
    q = cp.zeros((b, hq, nq, d), dtype)
    k = cp.asarray(random_array(rng, (b, hq, nk, d), dtype))
    out = poisoned((b, hq, nq, dv), dtype, xp=cp)
    cuflash.attention(q, k, cp.asarray(v), causal=causal, dropout_p=p, dropout_seed=drop_seed,
                      dropout_offset=offset, out=out)
    got = to_host(out).astype(np.float32)[..., :len(cols)]
    assert not np.isnan(got).any()
    expected = _expected_zeros(b, hq, np.arange(nq), cols, nq, nk, causal=causal, seed=drop_seed,
                               offset=offset, p=p)
    np.testing.assert_array_equal(got == 0, expected, err_msg=f"seed={seed}")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_mask_is_the_numpy_mask(xp_gpu, rng, seed, dtype, deterministic):
    """dv = (P ∘ Z)ᵀ dout · rescale: with one-hot dout rows, dv's columns are P ∘ Z of chosen
    queries, drawn by the dK/dV kernel."""
    cp = xp_gpu
    b, hq, nq, nk, d, dv = 2, 2, 1000, 4097, 128, 128  # D = Dv: the Hopper backward takes it
    p = 0.25
    drop_seed, offset = _seed_and_offset(rng)
    options = dict(dropout_p=p, dropout_seed=drop_seed, dropout_offset=offset)
    rows = np.unique(np.linspace(0, nq - 1, dv).round().astype(np.int64))
    q = cp.zeros((b, hq, nq, d), dtype)
    k = cp.asarray(random_array(rng, (b, hq, nk, d), dtype))
    v = cp.asarray(random_array(rng, (b, hq, nk, dv), dtype))
    out, lse = cuflash.attention(q, k, v, **options, return_lse=True)
    dout = np.zeros((b, hq, nq, dv), dtype)
    dout[:, :, rows, np.arange(len(rows))] = 1
    _, _, grad_v = cuflash.attention_backward(cp.asarray(dout), q, k, v, out, lse, **options,
                                              deterministic=deterministic)
    got = to_host(grad_v).astype(np.float32)[..., :len(rows)]  # (b, h, nk, rows)
    expected = _expected_zeros(b, hq, rows, np.arange(nk), nq, nk, causal=False, seed=drop_seed,
                               offset=offset, p=p)
    np.testing.assert_array_equal(got == 0, expected.swapaxes(-1, -2), err_msg=f"seed={seed}")


@pytest.mark.parametrize("causal", [False, True])
def test_packed_sequences_draw_each_sequence_s_mask(xp_gpu, rng, seed, causal):
    """Over packed sequences the kernels keep, in sequence b, the elements a dense call keeps in
    its batch element b (rows and keys counted within the sequence), as the NumPy path does: the
    forward seen through one-hot value rows, the dK/dV kernel through one-hot dout rows."""
    cp = xp_gpu
    lens_q, lens_k = [300, 17, 0, 1000], [97, 1000, 50, 1000]
    hq, d, dv, p = 2, 64, 128, 0.3
    drop_seed, offset = _seed_and_offset(rng)
    options = dict(causal=causal, dropout_p=p, dropout_seed=drop_seed, dropout_offset=offset)
    dtype = ml_dtypes.bfloat16
    starts_q, starts_k = np.cumsum([0] + lens_q), np.cumsum([0] + lens_k)
    cols = [np.unique(np.linspace(0, n - 1, min(n, dv)).round().astype(np.int64)) for n in lens_k]
    rows = [np.unique(np.linspace(0, n - 1, min(n, dv)).round().astype(np.int64)) for n in lens_q]
    v = np.zeros((starts_k[-1], hq, dv), dtype)
    dout = np.zeros((starts_q[-1], hq, dv), dtype)
    for b in range(len(lens_q)):
        v[starts_k[b] + cols[b], :, np.arange(len(cols[b]))] = 1
        if lens_q[b]:
            dout[starts_q[b] + rows[b], :, np.arange(len(rows[b]))] = 1
    q = cp.zeros((starts_q[-1], hq, d), dtype)
    k = cp.asarray(random_array(rng, (starts_k[-1], hq, d), dtype))
    v, dout = cp.asarray(v), cp.asarray(dout)
    layout = (offsets(lens_q, cp), offsets(lens_k, cp), max(lens_q), max(lens_k))
    out = poisoned((starts_q[-1], hq, dv), dtype, xp=cp)
    _, lse = cuflash.attention_varlen(q, k, v, *layout, **options, return_lse=True, out=out)
    _, _, grad_v = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *layout, **options)
    got_out, got_dv = (to_host(x).astype(np.float32) for x in (out, grad_v))
    assert not np.isnan(got_out).any() and not np.isnan(got_dv).any()
    for b, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        if nq == 0:
            continue
        seq_rows, seq_keys = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        expected = _expected_zeros(b + 1, hq, np.arange(nq), cols[b], nq, nk, causal=causal, seed=drop_seed,
                                   offset=offset, p=p)[b]  # (hq, nq, cols)
        seen = got_out[seq_rows][..., :len(cols[b])].transpose(1, 0, 2)
        np.testing.assert_array_equal(seen == 0, expected, err_msg=f"forward, sequence {b}, seed={seed}")
        expected = _expected_zeros(b + 1, hq, rows[b], np.arange(nk), nq, nk, causal=causal, seed=drop_seed,
                                   offset=offset, p=p)[b]  # (hq, rows, nk)
        seen = got_dv[seq_keys][..., :len(rows[b])].transpose(1, 0, 2)  # (hq, nk, rows)
        np.testing.assert_array_equal(seen == 0, expected.swapaxes(-1, -2),
                                      err_msg=f"dK/dV kernel, sequence {b}, seed={seed}")


# ----------------------------------------------------------------------------- against the oracle

CASES = {
    "d64": dict(d=64),
    # D = 64 (64-row tiles, the fused dQ by turns): key tiles that walk odd numbers of query tiles
    "d64-causal-odd": dict(d=64, nq=1111, nk=1000, causal=True),
    "d64-window": dict(d=64, nq=777, nk=1000, window=(200, 30)),
    "d128-causal": dict(d=128, causal=True),
    "d96-nq17": dict(d=96, nq=17, nk=1000),
    "gqa-dv": dict(d=64, dv=128, hq=4, hkv=2, causal=True),
    "long-keys": dict(d=128, nq=17, nk=4097, b=1),
    "window-softcap-alibi": dict(d=128, window=(300, 40), softcap=30.0, alibi=True, hq=4, hkv=1),
    "dv-smaller": dict(d=128, dv=64, nq=1000, nk=4097, b=1, hq=2, hkv=2, causal=True),
}


def _case(xp, rng, dtype, *, b=2, hq=2, hkv=2, nq=1000, nk=1000, d=64, dv=None, causal=False,
          window=(-1, -1), softcap=0.0, alibi=False, p=0.17):
    dv = dv or d
    q = random_array(rng, (b, hq, nq, d), dtype, xp=xp)
    k = random_array(rng, (b, hkv, nk, d), dtype, xp=xp)
    v = random_array(rng, (b, hkv, nk, dv), dtype, xp=xp)
    slopes = None
    if alibi:
        slopes = xp.asarray((2.0 ** (-8.0 * np.arange(1, hq + 1) / hq)).astype(np.float32))
    drop_seed, offset = _seed_and_offset(rng)
    options = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes,
                   dropout_p=p, dropout_seed=drop_seed, dropout_offset=offset)
    return q, k, v, options


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_and_gradients_match_the_oracle(xp_gpu, rng, seed, dtype, case):
    q, k, v, options = _case(xp_gpu, rng, dtype, **CASES[case])
    check_forward_and_backward(q, k, v, options, rng=rng, context=f"seed={seed}, {case}")


@pytest.mark.parametrize("length, causal", [(1000, True), (200, False), (1000, False)],
                         ids=["causal-1000", "full-200", "full-1000"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deterministic_backward(xp_gpu, rng, seed, dtype, d, length, causal):
    """deterministic=True passes the oracle and repeats bit for bit. On Hopper at D = 64 the
    warpgroups take turns at the fused dQ, whose writer adds in key-tile order: without a mask,
    with few query tiles per block, a block's end marker reaches the writer while it may still
    wait on other blocks for a tile (flash_bwd_sm90.cu, FusedDq::CHANNELS)."""
    q, k, v, options = _case(xp_gpu, rng, dtype, d=d, nq=length, nk=length, causal=causal, hq=4,
                             hkv=2, p=0.3)
    out, lse, grads = check_forward_and_backward(q, k, v, options, rng=rng, deterministic=True,
                                                 context=f"seed={seed}")
    dout = random_array(rng, out.shape, dtype, xp=xp_gpu)
    first = cuflash.attention_backward(dout, q, k, v, out, lse, **options, deterministic=True)
    again = cuflash.attention_backward(dout, q, k, v, out, lse, **options, deterministic=True)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(to_host(a).view(np.uint16), to_host(b).view(np.uint16))


# ----------------------------------------------------------------------------- seeds and p = 0

def test_other_seed_or_offset_other_mask(xp_gpu, rng):
    q, k, v, options = _case(xp_gpu, rng, ml_dtypes.bfloat16, d=64, nq=257, nk=300, p=0.5)
    first = to_host(cuflash.attention(q, k, v, **options)).astype(np.float32)
    again = to_host(cuflash.attention(q, k, v, **options)).astype(np.float32)
    np.testing.assert_array_equal(first, again)
    for other in (dict(dropout_seed=options["dropout_seed"] ^ 1),
                  dict(dropout_offset=options["dropout_offset"] ^ 1)):
        changed = to_host(cuflash.attention(q, k, v, **{**options, **other})).astype(np.float32)
        assert np.abs(changed - first).max() > 0.1 * np.abs(first).max(), other


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cached_calls_draw_their_own_seed_s_mask(xp_gpu, rng, dtype):
    """Calls that differ only in seed and offset share one prepared launch, which writes them per
    call: each call's forward and gradients equal, bit for bit, those of the validated path
    (every cache entry forgotten) with its seed and offset."""
    from cuflash import _calls

    q, k, v, options = _case(xp_gpu, rng, dtype, d=64, nq=257, nk=300, causal=True, p=0.3)
    dout = random_array(rng, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]), dtype, xp=xp_gpu)
    draws = [_seed_and_offset(rng), _seed_and_offset(rng)]
    draws.append(draws[0])

    def run(seed, offset):
        drawn = {**options, "dropout_seed": seed, "dropout_offset": offset}
        out, lse = cuflash.attention(q, k, v, **drawn, return_lse=True)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, **drawn, deterministic=True)
        return [to_host(x) for x in (out, lse, *grads)]

    run(*draws[-1])  # the entries every call below but the validated ones take
    hits = _calls.stats()["hits"]
    cached = [run(*draw) for draw in draws]
    assert _calls.stats()["hits"] == hits + 2 * len(draws)  # each forward and backward
    for draw, results in zip(draws, cached):
        _calls.clear()
        for got, want in zip(results, run(*draw)):
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    assert not np.array_equal(cached[0][0], cached[1][0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_a_seed_array_is_read_when_the_kernels_run(xp_gpu, rng, dtype):
    """A CuPy seed array (seed, offset) gives the results of that int seed and offset bit for bit,
    validated and cached; a forward and backward captured in a CUDA graph replay with the values
    it holds at each replay; a vjp keeps the values its forward read."""
    xp = xp_gpu
    q, k, v, options = _case(xp, rng, dtype, d=64, nq=257, nk=300, causal=True, p=0.3)
    del options["dropout_seed"], options["dropout_offset"]
    dout = random_array(rng, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]), dtype, xp=xp)
    draws = [_seed_and_offset(rng) for _ in range(3)]

    def run(**seed):
        out, lse = cuflash.attention(q, k, v, **options, **seed, return_lse=True)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, **options, **seed,
                                           deterministic=True)
        return [out, lse, *grads]

    def assert_results(got, draw):
        want = run(dropout_seed=draw[0], dropout_offset=draw[1])
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            np.testing.assert_array_equal(to_host(a).view(np.uint8), to_host(b).view(np.uint8),
                                          err_msg=f"{name}, seed and offset {draw}")

    def seed_array(draw):
        return xp.asarray(np.array(draw, np.uint64))

    state = seed_array(draws[0])
    for _ in range(2):  # validated, then cached
        assert_results(run(dropout_seed=state), draws[0])
    stream = xp.cuda.Stream(non_blocking=True)
    with stream:
        run(dropout_seed=state)
        stream.synchronize()
        stream.begin_capture()
        captured = run(dropout_seed=state)
        graph = stream.end_capture()
        for draw in draws[1:]:
            state[...] = seed_array(draw)
            for x in captured:
                x.fill(np.nan)
            graph.launch()
            stream.synchronize()
            assert_results(captured, draw)
    state[...] = seed_array(draws[0])
    out, vjp = cuflash.attention_vjp(q, k, v, **options, dropout_seed=state, deterministic=True)
    state[...] = seed_array(draws[1])  # the caller's next step, before this step's backward
    assert_results([out, run(dropout_seed=draws[0][0], dropout_offset=draws[0][1])[1],
                    *vjp(dout)], draws[0])


def test_a_captured_training_step_draws_a_new_mask_per_replay(xp_gpu, rng):
    """docs/api.md's pattern: a graph that advances the seed array's offset, then runs a vjp's
    forward and backward; replay r gives the results of the int seed with offset + r. The vjp's
    copy of the array, which each replay writes, outlives the vjp: small arrays allocated after
    the capture keep their values."""
    xp = xp_gpu
    q, k, v, options = _case(xp, rng, ml_dtypes.bfloat16, d=128, nq=300, nk=300, causal=True,
                             p=0.2)
    seed, offset = options.pop("dropout_seed"), options.pop("dropout_offset") % 2**31
    dout = random_array(rng, q.shape, ml_dtypes.bfloat16, xp=xp)
    state = xp.asarray(np.array([seed, offset], np.uint64))

    copies = []

    def step():
        state[1] += 1
        out, vjp = cuflash.attention_vjp(q, k, v, **options, dropout_seed=state,
                                         deterministic=True)
        copies.append(weakref.ref(vjp.dropout_seed))
        return [out, *vjp(dout)]

    stream = xp.cuda.Stream(non_blocking=True)
    with stream:
        step()  # compiles and caches outside the capture
        stream.synchronize()
        start = int(state[1].get())
        stream.begin_capture()
        captured = step()
        graph = stream.end_capture()
        gc.collect()  # the vjp is gone: its seed copy lives only as long as the results
        assert copies[-1]() is not None
        decoys = [xp.full(2, 7, np.uint64) for _ in range(16)]
        for replay in (1, 2):
            for x in captured:
                x.fill(np.nan)
            graph.launch()
            stream.synchronize()
            drawn = dict(options, dropout_seed=seed, dropout_offset=start + replay)
            out, lse = cuflash.attention(q, k, v, **drawn, return_lse=True)
            want = [out, *cuflash.attention_backward(dout, q, k, v, out, lse, **drawn,
                                                     deterministic=True)]
            for name, got, expected in zip(("out", "dq", "dk", "dv"), captured, want):
                np.testing.assert_array_equal(to_host(got).view(np.uint8),
                                              to_host(expected).view(np.uint8),
                                              err_msg=f"{name}, replay {replay}")
    assert int(state[1].get()) == start + 2
    assert all(bool((decoy == 7).all()) for decoy in decoys)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
def test_zero_dropout_is_bit_identical_to_no_dropout(xp_gpu, rng, deterministic):
    """p = 0 is the call without dropout (dq too when deterministic; the atomic dq's order of
    additions varies between any two calls)."""
    q, k, v, _ = _case(xp_gpu, rng, np.float16, d=128, nq=1000, nk=1000, hq=4, hkv=2)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    out0, lse0 = cuflash.attention(q, k, v, causal=True, dropout_p=0.0, dropout_seed=5,
                                   dropout_offset=7, return_lse=True)
    np.testing.assert_array_equal(to_host(out).view(np.uint16), to_host(out0).view(np.uint16))
    np.testing.assert_array_equal(to_host(lse), to_host(lse0))
    dout = random_array(rng, out.shape, np.float16, xp=xp_gpu)
    grads, grads0 = (cuflash.attention_backward(dout, q, k, v, out, lse, causal=True,
                                                deterministic=deterministic, **extra)
                     for extra in ({}, dict(dropout_p=0.0, dropout_seed=5)))
    compared = zip(grads, grads0) if deterministic else zip(grads[1:], grads0[1:])
    for g, g0 in compared:
        np.testing.assert_array_equal(to_host(g).view(np.uint16), to_host(g0).view(np.uint16))


def test_lse_is_that_of_the_undropped_softmax(xp_gpu, rng):
    """(On Hopper the call without dropout runs another family: equal up to float32 rounding.)"""
    q, k, v, options = _case(xp_gpu, rng, ml_dtypes.bfloat16, d=64, nq=300, nk=513, p=0.4)
    _, lse = cuflash.attention(q, k, v, **options, return_lse=True)
    plain = {key: value for key, value in options.items() if not key.startswith("dropout")}
    _, lse_plain = cuflash.attention(q, k, v, **plain, return_lse=True)
    np.testing.assert_allclose(to_host(lse), to_host(lse_plain), rtol=1e-5, atol=1e-5)
