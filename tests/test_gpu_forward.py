"""The GPU forward pass against the float64 oracle (correctness rule (cuflash/check/rule.py)), on CuPy arrays."""

import ml_dtypes
import numpy as np
import pytest

import cuflash
from oracle import (assert_forward_close, assert_varlen_forward_close, poisoned,
                    poisoned_allocations, random_array, spec_for)

pytestmark = pytest.mark.gpu

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32]
HALF_DTYPES = [np.float16, ml_dtypes.bfloat16]


def run(xp, rng, seed, *, b=2, hq=4, hkv=None, nq=128, nk=None, d=64, dv=None, dtype=np.float16,
        causal=False, scale=None, block_mask=None):
    hkv, nk, dv = hkv or hq, nk or nq, dv or d
    q = random_array(rng, (b, hq, nq, d), dtype, xp=xp)
    k = random_array(rng, (b, hkv, nk, d), dtype, xp=xp)
    v = random_array(rng, (b, hkv, nk, dv), dtype, xp=xp)
    out = poisoned((b, hq, nq, dv), dtype, xp=xp)
    got, lse = cuflash.attention(q, k, v, causal=causal, scale=scale, block_mask=block_mask,
                                 return_lse=True, out=out)
    assert got is out
    assert_forward_close(out, lse, q, k, v, causal=causal, scale=scale, block_mask=block_mask,
                         context=f"seed={seed}")
    return q, k, v, out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [32, 64, 96, 128, 256])
def test_head_dims(xp_gpu, rng, seed, dtype, causal, d):
    run(xp_gpu, rng, seed, d=d, nq=200, dtype=dtype, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_32_on_long_rows(xp_gpu, rng, seed, causal):
    """D = 32 with more than 2K keys: on Hopper, the TMA forward padded to 64 columns (shorter
    rows take the mma.sync kernel, test_head_dims)."""
    run(xp_gpu, rng, seed, b=1, hq=2, d=32, nq=2100, dtype=ml_dtypes.bfloat16, causal=causal)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("d,window", [(64, None), (32, None), (64, (-1, 40))])
def test_long_causal_rows(xp_gpu, rng, seed, dtype, d, window):
    """Causal alone, or a window bounded on the right only, over rows of more than 2K keys: on
    Hopper three consumer warpgroups taking turns (192-row query tiles), here with a last tile
    the rows end inside, a GQA group and Nq < Nk."""
    xp = xp_gpu
    options = dict(causal=True) if window is None else dict(window=window)
    q = random_array(rng, (1, 4, 2333, d), dtype, xp=xp)
    k, v = (random_array(rng, (1, 2, 2400, d), dtype, xp=xp) for _ in range(2))
    plan = cuflash.kernel_plan(q, k, v, **options).forward
    if xp.cuda.Device().compute_capability == "90":
        assert plan.family.name == "sm90-tma"
        assert "3 consumer warpgroups taking turns" in plan.detail, plan.detail
    out = poisoned(q.shape, dtype, xp=xp)
    got, lse = cuflash.attention(q, k, v, return_lse=True, out=out, **options)
    assert got is out
    assert_forward_close(out, lse, q, k, v, context=f"seed={seed}", **options)


@pytest.mark.parametrize("d", [1, 8, 17, 40, 72, 100, 160, 200, 255])
def test_odd_head_dims_are_padded_inside(xp_gpu, rng, seed, d):
    run(xp_gpu, rng, seed, d=d, nq=130, dtype=ml_dtypes.bfloat16, causal=True)


# Head dims between the compile grid's (multiples of 8 from 32 to 256): on Hopper the TMA forward,
# padded to its 64-column boxes (TMA's zeros past D, Q·Kᵀ's k16 steps stopping at D's last), with
# rows the query tiles end inside and, in the second shape, key tiles past the persistent grid's.
@pytest.mark.parametrize("d,dv", [(40, 40), (48, 48), (80, 80), (112, 112), (136, 136), (200, 200),
                                  (248, 248), (80, 64), (56, 120)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(333, 333), (150, 4500)])
def test_head_dims_between_the_grid_s(xp_gpu, rng, seed, d, dv, causal, nq, nk):
    q, k = xp_gpu.empty((1, 2, nq, d), ml_dtypes.bfloat16), xp_gpu.empty((1, 2, nk, d), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(q, k, xp_gpu.empty((1, 2, nk, dv), ml_dtypes.bfloat16), causal=causal)
    if xp_gpu.cuda.Device().compute_capability == "90":
        assert plan.forward.family.name == "sm90-tma", str(plan)
    run(xp_gpu, rng, seed, b=1, hq=2, nq=nq, nk=nk, d=d, dv=dv, dtype=ml_dtypes.bfloat16, causal=causal)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n", [1, 17, 127, 1000, 4097])
def test_odd_lengths(xp_gpu, rng, seed, dtype, n):
    run(xp_gpu, rng, seed, b=1, hq=2, nq=n, d=64, dtype=dtype, causal=n % 2 == 1)


@pytest.mark.parametrize("nq,nk", [(1, 300), (300, 1), (100, 333), (333, 100), (64, 4096)])
@pytest.mark.parametrize("causal", [False, True])
def test_nq_differs_from_nk(xp_gpu, rng, seed, nq, nk, causal):
    # causal with nq > nk leaves the first nq - nk rows with nothing to attend: 0 and lse -inf.
    run(xp_gpu, rng, seed, nq=nq, nk=nk, d=64, causal=causal)


@pytest.mark.parametrize("d,dv", [(64, 128), (128, 64), (40, 200), (256, 32)])
def test_value_dim_differs(xp_gpu, rng, seed, d, dv):
    run(xp_gpu, rng, seed, d=d, dv=dv, nq=150, causal=True, dtype=ml_dtypes.bfloat16)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 1), (6, 3)])
def test_grouped_heads(xp_gpu, rng, seed, hq, hkv):
    run(xp_gpu, rng, seed, hq=hq, hkv=hkv, nq=190, d=128, causal=True)


def test_custom_scale(xp_gpu, rng, seed):
    run(xp_gpu, rng, seed, nq=256, d=64, scale=0.37)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_bnhd_layout_and_broadcast_batch(xp_gpu, rng, seed, dtype):
    xp = xp_gpu
    b, n, h, d = 3, 333, 4, 64
    qkv = random_array(rng, (b, n, 3, h, d), dtype, xp=xp)  # interleaved buffer
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    with poisoned_allocations(xp):
        out = cuflash.attention(q, k, v, causal=True)
    assert_forward_close(out, None, q, k, v, causal=True, context=f"seed={seed}")
    # one K/V shared by a (2, 3) batch of queries: leading axes broadcast like numpy.matmul
    q2 = random_array(rng, (2, 3, h, 77, d), dtype, xp=xp)
    with poisoned_allocations(xp):
        out2, lse2 = cuflash.attention(q2, k[0], v[0], return_lse=True)
    assert out2.shape == (2, 3, h, 77, d)
    assert_forward_close(out2, lse2, q2, k[0], v[0], context=f"seed={seed}")


def test_unaligned_views_take_the_scalar_path(xp_gpu, rng, seed):
    xp = xp_gpu
    base = random_array(rng, (2, 4, 300, 72), np.float16, xp=xp)
    q, k, v = base[..., 1:65], base[..., 3:67], base[..., 5:69]  # odd element offsets
    with poisoned_allocations(xp):
        out = cuflash.attention(q, k, v, causal=True)
    assert_forward_close(out, None, q, k, v, causal=True, context=f"seed={seed}")


def test_runs_on_current_stream_and_array_device(xp_gpu, rng, seed):
    xp = xp_gpu
    stream = xp.cuda.Stream(non_blocking=True)
    with stream:
        q, k, v = (random_array(rng, (1, 2, 2048, 64), ml_dtypes.bfloat16, xp=xp) for _ in range(3))
        with poisoned_allocations(xp):
            out = cuflash.attention(q, k, v)
    stream.synchronize()
    assert_forward_close(out, None, q, k, v, context=f"seed={seed}")


@pytest.mark.parametrize("n,rows", [(16384, 96), (65536, 48)])
def test_long_single_head_against_chunked_reference(xp_gpu, rng, seed, n, rows):
    xp = xp_gpu
    q, k, v = (random_array(rng, (1, 1, n, 64), ml_dtypes.bfloat16, xp=xp) for _ in range(3))
    with poisoned_allocations(xp):
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    picked = np.sort(rng.choice(n, size=rows, replace=False))
    picked[-1] = n - 1
    assert_forward_close(out, lse, q, k, v, causal=True, rows=picked, context=f"seed={seed}")


# ---- the Hopper forward's persistent grid: one thread block per SM drawing tiles from a counter

PERSISTENT_CASES = {  # keys per row: 1,037 unless `nk` says otherwise
    "plain D=128": dict(d=128),
    "plain D=128, 176-key tiles and one Q buffer": dict(d=128, nk=2111),
    "plain D=64, O staged in the Q buffers": dict(d=64),
    "causal D=128": dict(d=128, causal=True),
    "window GQA D=64": dict(d=64, hkv=2, window=(300, 40)),
    "causal softcap D=96": dict(d=96, causal=True, softcap=20.0),
    "causal D=256": dict(d=256, causal=True),
    "plain D=256, O staged in the last K and V buffers": dict(d=256, nk=1111),
    "window softcap D=256": dict(d=256, window=(200, 70), softcap=15.0),
    "plain D=192, two Q buffers beside 80-key tiles": dict(d=192),
    "causal D=160": dict(d=160, causal=True),
}


@pytest.fixture
def hopper_tma(xp_gpu):
    from cuflash.kernels import _launch

    if not _launch.on_hopper(xp_gpu.empty(1)):
        pytest.skip("the persistent grid belongs to the Hopper forward")
    from cuflash.kernels import sm90_tma_forward

    return sm90_tma_forward


def _grid_forced(monkeypatch, sm90_tma_forward, persistent):
    """Every call after this takes the persistent grid (or one block per tile), whatever the
    policy says; the call caches are emptied so that no earlier launch is reused."""
    import dataclasses

    from cuflash import _calls

    chosen = sm90_tma_forward.tiles_for
    monkeypatch.setattr(sm90_tma_forward, "tiles_for", lambda spec, **kw: (
        None if chosen(spec, **kw) is None else dataclasses.replace(chosen(spec, **kw), persistent=persistent)))
    _calls.clear()


@pytest.mark.parametrize("case", list(PERSISTENT_CASES))
def test_persistent_grid_gives_the_bits_of_one_block_per_tile(xp_gpu, rng, seed, monkeypatch, hopper_tma, case):
    """More query tiles than SMs, odd lengths: the persistent grid computes each tile as a block
    of its own would, so the outputs are identical; launch after launch on one stream (the counter
    is left at zero for the next) and on a second stream."""
    from cuflash.kernels import _launch

    xp = xp_gpu
    options = dict(PERSISTENT_CASES[case])
    d, hkv, nk = options.pop("d"), options.pop("hkv", 8), options.pop("nk", 1037)
    q = random_array(rng, (3, 8, 1100, d), ml_dtypes.bfloat16, xp=xp)
    k, v = (random_array(rng, (3, hkv, nk, d), ml_dtypes.bfloat16, xp=xp) for _ in range(2))
    _grid_forced(monkeypatch, hopper_tma, False)
    expected, expected_lse = cuflash.attention(q, k, v, return_lse=True, **options)

    _grid_forced(monkeypatch, hopper_tma, True)
    counters = []
    real_pointer = _launch.tile_counters.pointer
    monkeypatch.setattr(_launch.tile_counters, "pointer", lambda stream: counters.append(stream) or real_pointer(stream))
    side = xp.cuda.Stream(non_blocking=True)
    for stream in (xp.cuda.get_current_stream(), xp.cuda.get_current_stream(), side, side):
        with stream:
            out = poisoned(expected.shape, ml_dtypes.bfloat16, xp=xp)
            got, lse = cuflash.attention(q, k, v, return_lse=True, out=out, **options)
        stream.synchronize()
        assert bool((got.view(np.uint16) == expected.view(np.uint16)).all()), case
        assert bool((lse == expected_lse).all()), case
    assert len(counters) == 4  # every call drew its tiles from a counter
    assert_forward_close(got, lse, q, k, v, context=f"seed={seed}", **options)


# Under causal the grid's last lanes take their query tiles tile by tile (_launch.tail_lanes): grids
# where those lanes are part of the grid (64 lanes of 8 tiles; 128 lanes under GQA; three consumers
# over 4K keys, one block per tile) and, forced to lane order, the same calls again.
@pytest.mark.parametrize("b,hq,hkv,n,d", [(4, 16, 16, 1000, 64), (4, 32, 8, 1100, 128), (2, 8, 8, 4200, 64)])
def test_tail_order_gives_the_bits_of_lane_order(xp_gpu, rng, seed, monkeypatch, hopper_tma, b, hq, hkv, n, d):
    """Every query tile is computed (outputs poisoned with NaN first), bit for bit as in lane
    order, on the persistent grid and with one block per tile."""
    from cuflash import _calls
    from cuflash.kernels import _launch

    xp = xp_gpu
    q = random_array(rng, (b, hq, n, d), ml_dtypes.bfloat16, xp=xp)
    k, v = (random_array(rng, (b, hkv, n, d), ml_dtypes.bfloat16, xp=xp) for _ in range(2))
    spec = spec_for(q, k, v, causal=True)
    tiles = hopper_tma.tiles_for(spec)
    resident = _launch.sm_count(q.data.device_id) * tiles.blocks_per_sm
    assert 0 < _launch.tail_lanes(spec, b * hq, -(-n // tiles.block_m), resident) < b * hq
    waves = _launch.TAIL_WAVES
    for persistent in (True, False):
        _grid_forced(monkeypatch, hopper_tma, persistent)
        results = []
        for tail_waves in (waves, 0):
            monkeypatch.setattr(_launch, "TAIL_WAVES", tail_waves)
            _calls.clear()
            out = poisoned((b, hq, n, d), ml_dtypes.bfloat16, xp=xp)
            results.append(cuflash.attention(q, k, v, causal=True, return_lse=True, out=out))
        (tail, tail_lse), (lanes, lanes_lse) = results
        assert bool((tail.view(np.uint16) == lanes.view(np.uint16)).all()), f"persistent={persistent}"
        assert bool((tail_lse == lanes_lse).all()), f"persistent={persistent}"
    if n <= 1000:
        assert_forward_close(tail, tail_lse, q, k, v, causal=True, context=f"seed={seed}")


def test_persistent_grid_under_graph_capture(xp_gpu, rng, seed, monkeypatch, hopper_tma):
    """A captured persistent launch has a counter of its own: its replays, before and after
    eager launches on the stream it was captured from, give the eager result."""
    xp = xp_gpu
    q, k, v = (random_array(rng, (2, 8, 1500, 128), ml_dtypes.bfloat16, xp=xp) for _ in range(3))
    _grid_forced(monkeypatch, hopper_tma, True)
    stream = xp.cuda.Stream(non_blocking=True)
    with stream:
        eager = cuflash.attention(q, k, v, causal=True)  # compiles and caches outside the capture
        stream.synchronize()
        stream.begin_capture()
        captured = cuflash.attention(q, k, v, causal=True)
        graph = stream.end_capture()
        for _ in range(2):
            captured.fill(np.nan)
            graph.launch()
            again = cuflash.attention(q, k, v, causal=True)
            stream.synchronize()
            assert bool((captured.view(np.uint16) == eager.view(np.uint16)).all())
            assert bool((again.view(np.uint16) == eager.view(np.uint16)).all())
    assert_forward_close(eager, None, q, k, v, causal=True, context=f"seed={seed}")


def test_persistent_grid_with_packed_sequences_and_masks(xp_gpu, rng, seed, monkeypatch, hopper_tma):
    """Tiles of unequal work (block and exact masks, with query rows that see no key) and tiles
    past their sequence's end (packed sequences, ranked longest first or, with more sequences
    than a block ranks, in the packed grid's order) on the persistent grid: the bits of one block
    per tile, drawn from the tile counter; rows that see no key give 0 and lse -inf."""
    from cuflash.kernels import _launch
    from cuflash.sparse import BlockMask, ExactMask, document

    xp = xp_gpu
    n = 1280
    q, k, v = (random_array(rng, (2, 8, n, 64), ml_dtypes.bfloat16, xp=xp) for _ in range(3))
    blocks = BlockMask.from_dense(rng.random((8, n // 128, n // 128)) < 0.4, block_size=128)
    layout = rng.random((8, n // 128, n // 128)) < 0.3
    layout[:, 3] = False  # query rows 384..511 of every head see no key
    layout[5, 7:] = False  # and rows 896.. of head 5
    blocks_with_empty_rows = BlockMask.from_dense(layout, block_size=128)
    documents = document([300, 17, 700, 263], causal=True)
    exact = ExactMask.from_scipy(documents)
    pairs = rng.random((n, n)) < 0.05
    pairs[200:333] = False  # rows that see no key, across a tile boundary
    pairs[:, 1000:] = False
    exact_with_empty_rows = ExactMask.from_dense(pairs)
    lengths = [1100, 5, 900, 333, 1024]
    cu = xp.asarray(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    packed = [random_array(rng, (sum(lengths), 8, 64), ml_dtypes.bfloat16, xp=xp) for _ in range(3)]
    masked = {"block mask": dict(block_mask=blocks),
              "block mask, empty rows": dict(block_mask=blocks_with_empty_rows),
              "exact mask, causal": dict(mask=exact, causal=True),
              "exact mask, empty rows": dict(mask=exact_with_empty_rows)}
    # the same options for the oracle, which takes an exact mask's pairs as a dense array
    oracle = dict(masked, **{"exact mask, causal": dict(mask=documents.toarray().astype(bool), causal=True),
                             "exact mask, empty rows": dict(mask=pairs)})
    calls = {name: (lambda options=options: cuflash.attention(q, k, v, return_lse=True, **options))
             for name, options in masked.items()}
    calls["packed sequences, causal"] = lambda: cuflash.attention_varlen(*packed, cu, cu, max(lengths), max(lengths),
                                                                        causal=True, return_lse=True)
    # More sequences than a persistent block ranks longest first (LONGEST_FIRST_MAX): the packed
    # grid's own order; the five above are ranked.
    many = [int(n) for n in rng.permutation(np.concatenate([rng.integers(0, 40, 140), [1000, 700, 0]]))]
    cu_many = xp.asarray(np.concatenate([[0], np.cumsum(many)]).astype(np.int32))
    packed_many = [random_array(rng, (sum(many), 8, 64), ml_dtypes.bfloat16, xp=xp) for _ in range(3)]
    calls["packed sequences, more than are ranked"] = lambda: cuflash.attention_varlen(
        *packed_many, cu_many, cu_many, max(many), max(many), return_lse=True)
    varlen = {"packed sequences, causal": (packed, cu, True),
              "packed sequences, more than are ranked": (packed_many, cu_many, False)}
    counters = []
    real_pointer = _launch.tile_counters.pointer
    monkeypatch.setattr(_launch.tile_counters, "pointer", lambda stream: counters.append(stream) or real_pointer(stream))
    results = {}
    for name, call in calls.items():
        _grid_forced(monkeypatch, hopper_tma, False)
        expected, expected_lse = call()
        _grid_forced(monkeypatch, hopper_tma, True)
        drawn = len(counters)
        with poisoned_allocations(xp):  # out and lse, tiles past a sequence's end included
            got, lse = results[name] = call()
        assert len(counters) == drawn + 1, name  # the persistent grid ran
        assert bool((got.view(np.uint16) == expected.view(np.uint16)).all()), name
        assert bool((lse == expected_lse).all()), name
        if name in oracle:
            assert_forward_close(got, lse, q, k, v, context=f"seed={seed}, {name}", **oracle[name])
        else:
            arrays, offsets, causal = varlen[name]
            assert_varlen_forward_close(got, lse, *arrays, offsets, offsets, causal=causal,
                                        context=f"seed={seed}, {name}")
    for name, rows in (("block mask, empty rows", slice(384, 512)), ("exact mask, empty rows", slice(200, 333))):
        got, lse = results[name]
        assert bool((got[:, :, rows] == 0).all()) and bool(xp.isneginf(lse[:, :, rows]).all()), name
