"""Both Hopper dK/dV kernels against the float64 oracle, in both backward modes, over the options
they take: the warp-specialised one (the default: a TMA producer warpgroup feeding two consumer
warpgroups through mbarriers) and the cp.async one (``CUFLASH_SM90_BWD_WS=0``, which the rest of
the suite no longer reaches on dense calls); each test asserts that kernel_plan names the kernel.
Runs on Hopper only (elsewhere neither kernel exists)."""

import ml_dtypes
import numpy as np
import pytest

import cuflash
from cuflash.sparse import BlockMask, ExactMask
from oracle import (assert_backward_close, poisoned, poisoned_allocations, random_array, spec_for,
                    to_host)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, params=["warp-specialised", "cp.async"])
def dkdv_kernel(request, monkeypatch, xp_gpu):
    from cuflash import kernels
    from cuflash.kernels import _launch

    if _launch._compute_capability(xp_gpu.cuda.Device().id) != "90":
        pytest.skip("the Hopper dK/dV kernels")
    monkeypatch.setenv(kernels.WARP_SPECIALISED_BACKWARD_ENV, "1" if request.param == "warp-specialised" else "0")
    return request.param


def run(xp, rng, seed, kernel, *, b=1, hq=2, hkv=None, nq=300, nk=None, d=64, dv=None,
        dtype=ml_dtypes.bfloat16, deterministic=False, **options):
    hkv, nk, dv = hkv or hq, nk or nq, dv or d
    q = random_array(rng, (b, hq, nq, d), dtype, xp=xp)
    k = random_array(rng, (b, hkv, nk, d), dtype, xp=xp)
    v = random_array(rng, (b, hkv, nk, dv), dtype, xp=xp)
    plan = cuflash.kernel_plan(q, k, v, deterministic=deterministic, **options)
    assert plan.backward.family.name == "sm90-wgmma", str(plan)
    assert ("warp-specialised" in plan.backward.detail) == (kernel == "warp-specialised"), str(plan)
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    dout = random_array(rng, out.shape, dtype, xp=xp)
    with poisoned_allocations(xp):
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic,
                                           **options)
    assert_backward_close(grads, dout, q, k, v, context=f"seed={seed} deterministic={deterministic}",
                          **options)
    return grads


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_head_dims(xp_gpu, rng, seed, dkdv_kernel, dtype, d, causal, deterministic):
    run(xp_gpu, rng, seed, dkdv_kernel, d=d, dtype=dtype, causal=causal, deterministic=deterministic)


# Head dims below the tile's 64 or 128 columns: the loads fill the rest with zeros, the stores
# skip it, and the fused dQ's accumulator rows are the tile's width.
PADDED_HEAD_DIMS = [(32, 32), (40, 40), (96, 96), (80, 80), (128, 96), (96, 64), (48, 64)]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d, dv", PADDED_HEAD_DIMS, ids=[f"{d}-{dv}" for d, dv in PADDED_HEAD_DIMS])
def test_padded_head_dims(xp_gpu, rng, seed, dkdv_kernel, d, dv, causal, deterministic):
    run(xp_gpu, rng, seed, dkdv_kernel, nq=333, nk=290, d=d, dv=dv, causal=causal,
        deterministic=deterministic)


def test_padded_head_dims_grouped_with_modifier(xp_gpu, rng, seed, dkdv_kernel):
    run(xp_gpu, rng, seed, dkdv_kernel, b=2, hq=6, hkv=2, nq=200, d=96, window=(60, 10), softcap=15.0)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("d, dv", [(96, 96), (40, 56), (200, 136)], ids=["96-96", "40-56", "200-136"])
def test_padded_head_dims_write_only_their_columns(xp_gpu, rng, seed, dkdv_kernel, d, dv, deterministic):
    """Gradients into column slices of wider buffers poisoned with NaN: the stores fill the
    slices' every element and leave the 8 guard columns past them alone."""
    from cuflash.kernels import sm90_backward

    if max(d, dv) > 128 and dkdv_kernel != "warp-specialised":
        pytest.skip("split gradients: the warp-specialised kernel only")
    xp, b, hq, nq, nk = xp_gpu, 1, 2, 200, 170
    q = random_array(rng, (b, hq, nq, d), ml_dtypes.bfloat16, xp=xp)
    k = random_array(rng, (b, hq, nk, d), ml_dtypes.bfloat16, xp=xp)
    v = random_array(rng, (b, hq, nk, dv), ml_dtypes.bfloat16, xp=xp)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    dout = random_array(rng, out.shape, ml_dtypes.bfloat16, xp=xp)
    buffers = [poisoned(x.shape[:-1] + (x.shape[-1] + 8,), x.dtype, xp=xp) for x in (q, k, v)]
    dq, dk, dv_ = (buf[..., :x.shape[-1]] for buf, x in zip(buffers, (q, k, v)))
    spec = spec_for(q, k, v, causal=True, deterministic=deterministic)
    assert sm90_backward.supports(spec, (q, k, v, dout, out, dq, dk, dv_)) is None
    sm90_backward.backward(dout, q, k, v, out, lse, dq, dk, dv_, spec)
    assert_backward_close((dq, dk, dv_), dout, q, k, v, causal=True, context=f"seed={seed}")
    for buf, x in zip(buffers, (q, k, v)):
        assert np.isnan(to_host(buf[..., x.shape[-1]:]).astype(np.float32)).all()


@pytest.mark.parametrize("nq,nk", [(1, 300), (300, 1), (129, 333), (640, 257)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(xp_gpu, rng, seed, dkdv_kernel, nq, nk, causal):
    run(xp_gpu, rng, seed, dkdv_kernel, nq=nq, nk=nk, d=128, causal=causal)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 3)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_grouped_heads(xp_gpu, rng, seed, dkdv_kernel, hq, hkv, deterministic):
    run(xp_gpu, rng, seed, dkdv_kernel, b=2, hq=hq, hkv=hkv, nq=256, deterministic=deterministic)


@pytest.mark.parametrize("options", [dict(window=(100, 20)), dict(softcap=20.0), dict(causal=True, softcap=5.0)],
                         ids=str)
def test_band_and_score_modifier(xp_gpu, rng, seed, dkdv_kernel, options):
    run(xp_gpu, rng, seed, dkdv_kernel, d=128, **options)


def test_block_sparse(xp_gpu, rng, seed, dkdv_kernel):
    pattern = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]], bool)
    mask = BlockMask.from_dense(pattern, block_size=128, shape=(384, 384))
    run(xp_gpu, rng, seed, dkdv_kernel, nq=384, d=128, block_mask=mask)


def _exact_pattern(seed, nq, nk):
    return ExactMask.from_dense((np.random.default_rng(seed).random((nq, nk)) < 0.2) | np.eye(nq, nk, dtype=bool))


@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(softcap=20.0), dict(causal=True, softcap=20.0)],
                         ids=str)
@pytest.mark.parametrize("d", [32, 64, 128])
def test_exact_mask(xp_gpu, rng, seed, dkdv_kernel, d, options):
    """At D ≤ 64 (the 64-column tile, 128-row query tiles) these are the options an exact mask
    takes to the warp-specialised kernel (sm90_backward.exact_fits_narrow_tile)."""
    nq, nk = 300, 333
    run(xp_gpu, rng, seed, dkdv_kernel, nq=nq, nk=nk, d=d, mask=_exact_pattern(seed, nq, nk), **options)


@pytest.mark.parametrize("options", [dict(window=(90, 20)), dict(causal=True, alibi_slopes="heads"),
                                     dict(deterministic=True)], ids=str)
def test_exact_mask_options_the_narrow_tile_leaves_to_the_cp_async_kernel(xp_gpu, rng, seed, dkdv_kernel,
                                                                           options):
    """Exact masks at D = 64 with a left-hand band, ALiBi or deterministic, whose warp-specialised
    variants would spill, run the cp.async dK/dV kernel even when the default asks for the other."""
    if dkdv_kernel != "warp-specialised":
        pytest.skip("what the default chooses")
    options = dict(options)
    if options.get("alibi_slopes") == "heads":
        options["alibi_slopes"] = xp_gpu.asarray([0.25, 0.0625], np.float32)
    run(xp_gpu, rng, seed, "cp.async", nq=300, d=64, mask=_exact_pattern(seed, 300, 300), **options)


# ----------------------------------------------------- the 256-column tile: dK and dV split apart

# D or Dv above 128: the two consumers share one 64-key tile, one forming P and dV, the other dSᵀ
# (from the first's P) and dK; dQ from the dQ kernel in both modes.
SPLIT_CASES = [dict(d=256), dict(d=256, causal=True), dict(d=256, causal=True, dtype=np.float16),
               dict(d=192, dv=128, causal=True), dict(d=160, nq=333, nk=290), dict(d=64, dv=256),
               dict(d=256, nq=129, nk=333, causal=True), dict(d=256, nq=1, nk=300), dict(d=256, nq=300, nk=1),
               dict(d=256, b=2, hq=6, hkv=2, causal=True), dict(d=256, window=(100, 20), softcap=20.0),
               dict(d=256, causal=True, softcap=5.0, alibi_slopes="heads")]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("options", SPLIT_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_split_gradients_past_128(xp_gpu, rng, seed, dkdv_kernel, options, deterministic):
    """Head dims past 128 (and Dv ≠ D) under every mask policy and score modifier the 256-column
    tile takes, odd lengths and GQA, against the float64 oracle."""
    if dkdv_kernel != "warp-specialised":
        pytest.skip("split gradients: the warp-specialised kernel only")
    options = dict(options)
    if options.get("alibi_slopes") == "heads":
        options["alibi_slopes"] = xp_gpu.asarray(np.random.default_rng(seed).uniform(0.01, 0.5, options.get("hq", 2)),
                                                 np.float32)
    run(xp_gpu, rng, seed, dkdv_kernel, deterministic=deterministic, **options)


def test_split_gradients_block_sparse_and_bit_identical(xp_gpu, rng, seed, dkdv_kernel):
    """A block mask at D = 256 (64-row tiles inside 128-blocks), and the same bits on reruns in
    the default mode too: no gradient is added by two blocks on this tile."""
    if dkdv_kernel != "warp-specialised":
        pytest.skip("split gradients: the warp-specialised kernel only")
    pattern = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]], bool)
    mask = BlockMask.from_dense(pattern, block_size=128, shape=(384, 384))
    xp = xp_gpu
    q, k, v = (random_array(rng, (1, 2, 384, 256), ml_dtypes.bfloat16, xp=xp) for _ in range(3))
    assert "warp-specialised" in cuflash.kernel_plan(q, k, v, block_mask=mask).backward.detail
    out, lse = cuflash.attention(q, k, v, return_lse=True, block_mask=mask)
    dout = random_array(rng, out.shape, ml_dtypes.bfloat16, xp=xp)
    first = cuflash.attention_backward(dout, q, k, v, out, lse, block_mask=mask)
    assert_backward_close(first, dout, q, k, v, block_mask=mask, context=f"seed={seed}")
    for rerun in range(5):
        again = cuflash.attention_backward(dout, q, k, v, out, lse, block_mask=mask)
        for name, x, y in zip(("dq", "dk", "dv"), first, again):
            assert (to_host(x).view(np.uint16) == to_host(y).view(np.uint16)).all(), f"{name}, rerun {rerun}"


# The warp-specialised dQ kernel of the 256-column tile starts its grid's last lanes query tile by
# query tile too (_launch.tail_lanes): 64 lanes of 8 query tiles, 33 of them by tile; with GQA and
# a last query tile of a few rows.
@pytest.mark.parametrize("b,hq,hkv,n,d,dv", [(8, 8, 8, 1000, 192, 128), (4, 16, 4, 900, 256, 256)])
def test_tail_order_gives_every_query_tile_its_dq(xp_gpu, rng, seed, dkdv_kernel, monkeypatch, b, hq, hkv, n,
                                                  d, dv):
    """Every query tile gets its dQ and every key tile its dK and dV (into NaN-poisoned buffers),
    bit-identical to the grids in lane order: on this tile no gradient is added by two blocks. The
    first case also against the float64 oracle."""
    if dkdv_kernel != "warp-specialised":
        pytest.skip("split gradients: the warp-specialised kernel only")
    from cuflash import _calls
    from cuflash.kernels import _launch

    dtype = ml_dtypes.bfloat16
    q, k = random_array(rng, (b, hq, n, d), dtype, xp=xp_gpu), random_array(rng, (b, hkv, n, d), dtype, xp=xp_gpu)
    v = random_array(rng, (b, hkv, n, dv), dtype, xp=xp_gpu)
    assert "then a warp-specialised dQ kernel" in cuflash.kernel_plan(q, k, v, causal=True).backward.detail
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    dout = random_array(rng, out.shape, dtype, xp=xp_gpu)
    spec = spec_for(q, k, v, causal=True)
    assert 0 < _launch.tail_lanes(spec, b * hq, -(-n // 128), _launch.sm_count(q.data.device_id)) < b * hq

    def gradients():
        grads = [poisoned(x.shape, dtype, xp=xp_gpu) for x in (q, k, v)]
        return cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, dq=grads[0], dk=grads[1],
                                          dv=grads[2])

    tail_order = gradients()
    if d == 192:
        assert_backward_close(tail_order, dout, q, k, v, causal=True, context=f"seed={seed}")
    monkeypatch.setattr(_launch, "TAIL_WAVES", 0)
    _calls.clear()
    lane_order = gradients()
    for name, got, want in zip(("dq", "dk", "dv"), tail_order, lane_order):
        assert bool((got.view(xp_gpu.uint16) == want.view(xp_gpu.uint16)).all()), f"{name} seed={seed}"


# ----------------------------------------------------------------------------- ordered fused dQ

ORDERED_CASES = [dict(d=64), dict(d=128, causal=True), dict(d=64, causal=True, b=2, hq=8, hkv=2),
                 dict(d=128, window=(200, 30)), dict(d=96, causal=True),
                 dict(d=128, softcap=20.0, causal=True), dict(d=64, nq=700, nk=1000, causal=True),
                 # without a band the walks rotate (sm90_backward.rotated_dq) where they can
                 dict(d=128, nq=1500, nk=700), dict(d=64, b=2, hq=8, hkv=2), dict(d=128, softcap=20.0),
                 dict(d=64, nq=300, nk=2100),
                 # queries that see no key: dQ tiles no key tile adds to, so the accumulator is zeroed
                 dict(d=128, nq=1000, nk=300, causal=True)]


@pytest.mark.parametrize("options", ORDERED_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_ordered_dq_is_exact_and_bit_identical(xp_gpu, rng, seed, dkdv_kernel, monkeypatch, options):
    """Deterministic calls form dQ in the warp-specialised kernel with the adds of each dQ tile
    in key-tile order (their dQ writer waiting on the tile's semaphore): within the rule of the
    float64 oracle (the workspace NaN-poisoned: rank 0 stores its part, and only where a dQ tile
    may get none is the accumulator zeroed first), and the same bits on 50 reruns."""
    from cuflash import kernels

    if dkdv_kernel != "warp-specialised":
        pytest.skip("ordered adds: the warp-specialised kernel only")
    monkeypatch.delenv(kernels.ORDERED_DQ_ENV, raising=False)
    options = dict(dict(nq=1000), **options)
    xp = xp_gpu
    b, hq, nq, d = options.pop("b", 1), options.pop("hq", 4), options.pop("nq"), options.pop("d")
    hkv, nk = options.pop("hkv", hq), options.pop("nk", nq)
    q = random_array(rng, (b, hq, nq, d), ml_dtypes.bfloat16, xp=xp)
    k = random_array(rng, (b, hkv, nk, d), ml_dtypes.bfloat16, xp=xp)
    v = random_array(rng, (b, hkv, nk, d), ml_dtypes.bfloat16, xp=xp)
    plan = cuflash.kernel_plan(q, k, v, deterministic=True, **options)
    assert "in key-tile order" in plan.backward.detail, str(plan)
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    dout = random_array(rng, out.shape, ml_dtypes.bfloat16, xp=xp)
    with poisoned_allocations(xp):
        first = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **options)
    assert_backward_close(first, dout, q, k, v, context=f"seed={seed} ordered dQ", **options)
    for run in range(50):
        again = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **options)
        for name, x, y in zip(("dq", "dk", "dv"), first, again):
            assert (to_host(x).view(np.uint16) == to_host(y).view(np.uint16)).all(), (
                f"{name} differs on rerun {run}; seed={seed}")


# Under causal the dK/dV grid starts its last lanes key tile by key tile (_launch.tail_lanes):
# a grid where those lanes are part of it (64 lanes of 8 key tiles; 32 key/value lanes of GQA)
# and one where they are all of it.
@pytest.mark.parametrize("b,hq,hkv,n,d", [(4, 16, 16, 1000, 64), (4, 32, 8, 1100, 128), (2, 6, 3, 700, 128)])
def test_tail_order_gives_every_key_tile_its_gradients(xp_gpu, rng, seed, dkdv_kernel, monkeypatch, b, hq, hkv, n, d):
    """Every key tile gets its dK and dV (into NaN-poisoned buffers), bit-identical to the grid
    in lane order; dQ, whose float adds land in another order, within float32 rounding of it
    (and against the float64 oracle on the smallest case)."""
    if dkdv_kernel != "warp-specialised":
        pytest.skip("the warp-specialised kernel's launch order")
    from cuflash import _calls
    from cuflash.kernels import _launch

    dtype = ml_dtypes.bfloat16
    q = random_array(rng, (b, hq, n, d), dtype, xp=xp_gpu)
    k, v = (random_array(rng, (b, hkv, n, d), dtype, xp=xp_gpu) for _ in range(2))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    dout = random_array(rng, out.shape, dtype, xp=xp_gpu)
    spec = spec_for(q, k, v, causal=True)
    assert _launch.tail_lanes(spec, b * hkv, -(-n // 128), _launch.sm_count(q.data.device_id)) > 0

    def gradients():
        grads = [poisoned(x.shape, dtype, xp=xp_gpu) for x in (q, k, v)]
        return cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, dq=grads[0], dk=grads[1],
                                          dv=grads[2])

    tail_order = gradients()
    if n <= 700:
        assert_backward_close(tail_order, dout, q, k, v, causal=True, context=f"seed={seed}")
    monkeypatch.setattr(_launch, "TAIL_WAVES", 0)
    _calls.clear()
    lane_order = gradients()
    for name, got, want in zip(("dk", "dv"), tail_order[1:], lane_order[1:]):
        assert bool((got.view(xp_gpu.uint16) == want.view(xp_gpu.uint16)).all()), f"{name} seed={seed}"
    dq, dq_lanes = (to_host(x).astype(np.float32) for x in (tail_order[0], lane_order[0]))
    assert np.isfinite(dq).all()
    np.testing.assert_allclose(dq, dq_lanes, rtol=2e-2, atol=2e-2 * float(np.abs(dq_lanes).max()))


# ----------------------------------------------------------------------------- the dQ cast lane by lane

LANE_CASES = [dict(d=64, n=1000), dict(d=128, causal=True, b=2, hq=4),
              dict(d=128, causal=True, b=2, hq=8, hkv=2, n=700),  # GQA: 4 query heads a lane
              dict(d=64, causal=True, b=3, hq=3, n=333, nk=517)]  # odd lengths, Nq ≠ Nk


@pytest.mark.parametrize("options", LANE_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_dq_cast_lane_by_lane(xp_gpu, rng, seed, dkdv_kernel, monkeypatch, options):
    """Where the warp-specialised dK/dV kernel counts its lanes' finished key tiles
    (sm90_backward.lanes_counted), the dQ cast takes each lane as soon as its counter says its
    dQ is whole: every gradient written (into NaN-poisoned buffers, the workspace poisoned too)
    within the rule of the float64 oracle, dK and dV bit-identical to the cast after the whole grid
    (CAST_DQ_BY_LANE = False), and after the call each lane's counter at its key tiles and, under
    a band, each dQ tile's claim at 2 (stored first, then added to: its accumulator was never
    zeroed)."""
    import cupy

    from cuflash.kernels import _launch, mma_backward, sm90_backward

    if dkdv_kernel != "warp-specialised":
        pytest.skip("lane counters: the warp-specialised kernel only")
    options = dict(options)
    b, hq, n, d = options.pop("b", 1), options.pop("hq", 2), options.pop("n", 512), options.pop("d")
    hkv, nk = options.pop("hkv", hq), options.pop("nk", n)
    dtype, xp = ml_dtypes.bfloat16, xp_gpu
    q = random_array(rng, (b, hq, n, d), dtype, xp=xp)
    k, v = (random_array(rng, (b, hkv, nk, d), dtype, xp=xp) for _ in range(2))
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    dout = random_array(rng, out.shape, dtype, xp=xp)
    spec = spec_for(q, k, v, **options)
    assert sm90_backward.lanes_counted(spec, False, True, True)
    claims = sm90_backward.stores_first_parts(spec, False, True)
    assert claims == spec.banded and sm90_backward.dq_zeros_needed(spec, False, True, True) == (not claims)
    tiles = sm90_backward.default_tiles(sm90_backward.tile_head_dim(spec))
    key_tiles = -(-nk // tiles.dkdv_block_n)

    def gradients(by_lane: bool):
        """(dq, dk, dv) of one backward with the cast lane by lane or after the grid, and the lane
        counters it left in its workspace."""
        monkeypatch.setattr(sm90_backward, "CAST_DQ_BY_LANE", by_lane)
        grads = [poisoned(x.shape, dtype, xp=xp) for x in (q, k, v)]
        launch = sm90_backward.prepare_backward(spec, (q, k, v, dout, out, *grads))
        scratch = launch.scratch
        assert scratch.lane_counters == b * hkv + 1  # and the cast's ticket
        assert scratch.tile_claims == (scratch.rows // mma_backward.SEMAPHORE_ROWS if claims else 0)
        with poisoned_allocations(xp):  # counters that flash_bwd_pre did not zero would be -1
            workspace = launch(dout, q, k, v, out, lse, *grads, spec)
        ints = to_host(cupy.ndarray((scratch.lane_counters + scratch.tile_claims,), np.int32,
                                    workspace + scratch.counters_offset))
        # under a band each (batch, head)'s query tiles claimed and stored (2), every other claim
        # still 0; without one no claims
        per_tile = tiles.dkdv_block_m // mma_backward.SEMAPHORE_ROWS
        query_tiles = -(-n // tiles.dkdv_block_m)
        claimed = np.zeros((b * hq if claims else 0, scratch.rows_pad // mma_backward.SEMAPHORE_ROWS), np.int32)
        claimed[:, :query_tiles * per_tile:per_tile] = 2
        assert np.array_equal(ints[b * hkv + 1:], claimed.ravel()), f"claims {ints[b * hkv + 1:]}; seed={seed}"
        return grads, ints[:b * hkv + 1]

    by_lane, counters = gradients(True)
    # every step's ticket was taken once, and each block took one more to learn that none was left
    chunks = b * hq * n * -(-d // 8)
    steps = -(-chunks // mma_backward.CONVERT_STEP)
    blocks = min(steps, mma_backward.CONVERT_BLOCKS_PER_SM * _launch.sm_count(q.data.device_id))
    assert counters[-1] == steps + blocks, f"ticket {counters[-1]} against {steps} steps, {blocks} blocks"
    counters = counters[:-1]
    assert (counters == key_tiles).all(), f"{counters} against {key_tiles} key tiles; seed={seed}"
    assert_backward_close(by_lane, dout, q, k, v, context=f"seed={seed} lane by lane", **options)
    after_grid, counters = gradients(False)
    assert counters[-1] == 0  # the cast after the grid takes no ticket
    counters = counters[:-1]
    assert (counters == key_tiles).all(), f"{counters} after the grid; seed={seed}"
    for name, got, want in zip(("dk", "dv"), by_lane[1:], after_grid[1:]):
        assert bool((got.view(xp.uint16) == want.view(xp.uint16)).all()), f"{name} seed={seed}"
