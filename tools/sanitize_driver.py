"""Every kernel family once, forward and backward, on problems small enough for
compute-sanitizer's slow tools (racecheck): run under `tools/sanitize.sh`. The environment
variable SANITIZE_PARTS (comma-separated: dense, ordered, split, exact, varlen, decode, dropout,
persistent; all by default) picks parts. SANITIZE_DQ_ZEROS=1 has flash_bwd_pre zero the Hopper
fused dQ's float32 accumulator on every route (``sm90_backward.SKIP_DQ_ZEROS = False``):
initcheck's run sets it (see ``write_dq_zeros``)."""

from __future__ import annotations

import os

import cupy
import ml_dtypes
import numpy

import cuflash
from cuflash import kernels
from cuflash.sparse import BlockMask, ExactMask


def _arrays(rng, dtype, b, hq, hkv, n, d, dv=None):
    def make(*shape):
        return cupy.asarray(rng.standard_normal(shape, dtype=numpy.float32).astype(dtype))
    dv = dv or d
    return make(b, hq, n, d), make(b, hkv, n, d), make(b, hkv, n, dv), make(b, hq, n, dv)


def write_dq_zeros() -> None:
    """Where the dK/dV kernel stores each dQ tile's first part (ordered adds, claimed tiles), no
    kernel zeroes the accumulator: its bytes arrive by bulk copies and bulk reduce-adds, which the
    TMA unit performs, not a thread. Over this driver's calls initcheck flagged nearly every read
    the cast makes of such an accumulator (benchmarks/NOTES.md, "initcheck's reports in the dQ
    cast, counted"): it does not see those writes, and its known reports buried any other.
    With the zeros written the kernels are the same (the first parts are still stored, not
    added); the route without them is checked by the GPU tests, whose workspaces hold NaN
    bytes before each call."""
    from cuflash.kernels import sm90_backward

    sm90_backward.SKIP_DQ_ZEROS = False


def main():
    rng = numpy.random.default_rng(0)
    if os.environ.get("SANITIZE_DQ_ZEROS") == "1":
        write_dq_zeros()
    parts = {"dense": _dense, "ordered": _ordered, "split": _split, "exact": _exact,
             "varlen": _varlen, "decode": _decode, "dropout": _dropout, "persistent": _persistent}
    wanted = os.environ.get("SANITIZE_PARTS", ",".join(parts)).split(",")
    unknown = [name for name in wanted if name not in parts]
    if unknown:  # a misspelt part would otherwise check nothing and pass
        raise SystemExit(f"SANITIZE_PARTS: unknown part(s) {', '.join(unknown)}; "
                         f"the parts are {', '.join(parts)}")
    for name, run in parts.items():  # in this order, however they are listed
        if name in wanted:
            run(rng)


def _dense(rng):
    # D = 96 and 40 run the Hopper backward's 128- and 64-column tiles with zero columns.
    _dense_cases(rng, (("bfloat16", 64, False), ("bfloat16", 128, False), ("bfloat16", 128, True),
                       ("float16", 96, False), ("bfloat16", 40, False), ("float32", 64, False),
                       ("float32", 128, False)))

    # A causal band alone over short rows: the Hopper forward's one-consumer tile (two thread
    # blocks per SM), and the backward's dQ writer in both modes.
    q, k, v, dout = _arrays(rng, ml_dtypes.bfloat16, 1, 2, 1, 150, 64)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    for deterministic in (False, True):
        cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=deterministic)
    cupy.cuda.Device().synchronize()
    print("ran bfloat16 D=64 sm90=on causal (one-consumer forward)", flush=True)

    # The same band over rows of more than 2K keys: the forward's three consumers taking turns.
    q, k, v, _ = _arrays(rng, ml_dtypes.bfloat16, 1, 1, 1, 2100, 64)
    cuflash.attention(q, k, v, causal=True)
    cupy.cuda.Device().synchronize()
    print("ran bfloat16 D=64 sm90=on causal, 2100 keys (three-consumer forward)", flush=True)

    # More query tiles than SMs, unmasked and short: the Hopper forward's persistent walk, where
    # a thread block refills its Q buffer and runs its K/V ring on from one tile to the next.
    os.environ[kernels.DISABLE_HOPPER_ENV] = "0"
    q, k, v, _ = _arrays(rng, ml_dtypes.bfloat16, 4, 8, 4, 900, 256)
    cuflash.attention(q, k, v)
    cupy.cuda.Device().synchronize()
    print("ran bfloat16 D=256 sm90=on persistent walk", flush=True)


def _persistent(rng):
    """The Hopper forward's persistent grid (one thread block per SM, or two with one consumer,
    drawing tiles from a counter) over more tiles than blocks: O staged in the last V buffer
    (two consumers at D = 128, unmasked, where each tile's last P·V goes with the next tile's first
    Q·Kᵀ, with two Q buffers beside 128-key tiles and one beside 176-key tiles, and causal; two
    consumers under a window at D = 64), in the Q buffers (three consumers at D = 64) and in the
    last key tile's K and V buffers (the 80-key tiles of D = 256, unmasked and causal), and block
    and exact masks with rows that see no key (one consumer, two blocks per SM, the last P·V
    carried over as unmasked)."""
    import dataclasses

    from cuflash import _api
    from cuflash.kernels import _launch, sm90_tma_forward

    q, k, v, _ = _arrays(rng, ml_dtypes.bfloat16, 1, 1, 1, 8, 64)
    if not _launch.on_hopper(q):
        print("skipped the persistent grid: not a Hopper GPU", flush=True)
        return
    for d, heads, n, options in ((128, 9, 2000, {}), (128, 9, 2100, {}), (128, 9, 2000, {"causal": True}),
                                 (64, 9, 2000, {"window": (128, 0)}),
                                 (64, 14, 2000, {}), (256, 16, 1100, {}), (256, 16, 1100, {"causal": True})):
        q, k, v, out = _arrays(rng, ml_dtypes.bfloat16, 1, heads, heads, n, d)
        spec = _api._spec(q, k, v, **options)[1]
        tiles = dataclasses.replace(sm90_tma_forward.tiles_for(spec), persistent=True)
        launch = sm90_tma_forward.prepare_forward(spec, (q, k, v, out), tiles=tiles)
        assert launch.launch.tile_counter, (d, options)  # more tiles than the grid's blocks
        launch(q, k, v, out, cupy.empty((1, heads, n), numpy.float32), spec)
        cupy.cuda.Device().synchronize()
        print(f"ran the persistent forward grid, bfloat16 D={d} {tiles} {sorted(options)}", flush=True)
    # Block and exact masks, whose calls take the grid by default, with query rows that see no
    # key: 2 x 8 x 20 tiles of 64 rows, more than two blocks on every SM hold at once.
    n = 1280
    q, k, v, _ = _arrays(rng, ml_dtypes.bfloat16, 2, 8, 8, n, 64)
    layout = rng.random((8, n // 128, n // 128)) < 0.3
    layout[:, 3] = False
    pairs = rng.random((n, n)) < 0.05
    pairs[200:333] = False
    for name, options in (("block mask", {"block_mask": BlockMask.from_dense(layout, block_size=128)}),
                          ("exact mask", {"mask": ExactMask.from_dense(pairs)})):
        spec = _api._spec(q, k, v, **options)[1]
        assert sm90_tma_forward.tiles_for(spec).persistent, name
        cuflash.attention(q, k, v, **options)
        cupy.cuda.Device().synchronize()
        print(f"ran the persistent forward grid, bfloat16 D=64 {name} with empty rows", flush=True)


def _ordered(rng):
    """Deterministic calls without a band on the Hopper backward: the fused dQ's ordered adds with
    rotated walks (each key tile starts at its own query tile and wraps around), at D = 64 with a
    GQA group and D = 128 with softcap, more query tiles than key tiles."""
    from cuflash.kernels import sm90_backward
    from cuflash.kernels._variants import spec_of

    os.environ[kernels.DISABLE_HOPPER_ENV] = "0"
    for d, nq, nk, opts in ((64, 520, 300, {}), (128, 450, 200, {"softcap": 10.0})):
        spec = spec_of("bfloat16", d, deterministic=True, nq=nq, nk=nk, **opts)
        assert sm90_backward.rotated_dq(spec, sm90_backward.default_tiles(d)), (d, nq, nk)
        q, _, _, dout = _arrays(rng, ml_dtypes.bfloat16, 1, 4, 2, nq, d)
        _, k, v, _ = _arrays(rng, ml_dtypes.bfloat16, 1, 4, 2, nk, d)
        out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
        cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **opts)
        cupy.cuda.Device().synchronize()
        print(f"ran ordered dQ, rotated walks, bfloat16 D={d} {nq}x{nk} {sorted(opts)}", flush=True)


def _split(rng):
    """The Hopper backward's 256-column tile (its two dK/dV consumers keep dV and dK one each and
    hand P over through shared memory; the warp-specialised dQ kernel in both cases, the block
    mask's blocks being 128 rows), at D = 256 (where the dQ kernel's V ring has one buffer) and, with
    zero columns, 160; and D = 192 with Dv = 128, where dV's consumer keeps two 64-column boxes
    and the boxes of V and dO past Dv are not loaded."""
    _dense_cases(rng, (("bfloat16", 256, False), ("float16", 160, False), ("bfloat16", 192, False, 128)))


def _dense_cases(rng, cases):
    """Forward and both backward modes of each (dtype, D, Hopper off[, Dv]) case under a window with
    softcap and ALiBi, and under causal with a block mask."""
    n = 150
    slopes = cupy.asarray(numpy.linspace(0.1, 0.5, 2, dtype=numpy.float32))
    pattern = numpy.array([[1, 0], [1, 1]], bool)
    options = (
        {"window": (60, 20), "softcap": 10.0, "alibi_slopes": slopes},
        {"causal": True, "block_mask": BlockMask.from_dense(pattern, block_size=128, shape=(n, n))},
    )
    for dtype_name, d, hopper_off, *dv in cases:
        os.environ[kernels.DISABLE_HOPPER_ENV] = "1" if hopper_off else "0"
        dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": numpy.float16, "float32": numpy.float32}[dtype_name]
        q, k, v, dout = _arrays(rng, dtype, 1, 2, 1, n, d, *dv)
        for opts in options:
            out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
            for deterministic in (False, True):
                cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **opts)
            cupy.cuda.Device().synchronize()
            print(f"ran {dtype_name} D={d}{'/' + str(dv[0]) if dv else ''} sm90={'off' if hopper_off else 'on'} "
                  f"{sorted(k for k in opts)}", flush=True)


def _exact(rng):
    """An exact mask with full, partial and empty tiles (random pairs, plus a diagonal so every
    row sees a key), alone and under causal, GQA, both backward modes, on both kernel families."""
    n = 300
    pattern = (rng.random((n, n)) < 0.3) | numpy.eye(n, dtype=bool)
    pattern[:128, :128] = True  # one full tile
    pattern[128:256, 256:] = False
    mask = ExactMask.from_dense(pattern)
    for hopper_off in (False, True):
        os.environ[kernels.DISABLE_HOPPER_ENV] = "1" if hopper_off else "0"
        for d in (64, 128):
            q, k, v, dout = _arrays(rng, ml_dtypes.bfloat16, 1, 4, 2, n, d)
            for causal in (False, True):
                out, lse = cuflash.attention(q, k, v, mask=mask, causal=causal, return_lse=True)
                for deterministic in (False, True):
                    cuflash.attention_backward(dout, q, k, v, out, lse, mask=mask, causal=causal,
                                               deterministic=deterministic)
                cupy.cuda.Device().synchronize()
            print(f"ran exact mask bfloat16 D={d} sm90={'off' if hopper_off else 'on'}", flush=True)
    os.environ[kernels.DISABLE_HOPPER_ENV] = "0"


def _dropout(rng):
    """Dropout at D = 64, 96 and 128 on the default kernels (on Hopper: the TMA forward; the
    warp-specialised dK/dV kernel under causal, whose consumers take turns at the fused dQ at
    D = 64, the cp.async one beside softcap), causal, with a window and without a mask (at
    D = 64 the deterministic mode's ordered adds meet the consumers' turns with a mask and
    without), both backward modes, and float32 gradients (sm80 and Hopper backward)."""
    n = 150
    for d in (64, 96, 128):
        q, k, v, dout = _arrays(rng, ml_dtypes.bfloat16, 1, 2, 1, n, d)
        for opts in ({"causal": True}, {"window": (60, 20), "softcap": 10.0}, {}):
            drop = dict(dropout_p=0.2, dropout_seed=7, **opts)
            out, lse = cuflash.attention(q, k, v, return_lse=True, **drop)
            for deterministic in (False, True):
                cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **drop)
            cupy.cuda.Device().synchronize()
            print(f"ran dropout bfloat16 D={d} {sorted(opts)}", flush=True)
        for hopper_off in ("1", "0"):
            os.environ[kernels.DISABLE_HOPPER_ENV] = hopper_off
            out, lse = cuflash.attention(q, k, v, return_lse=True, causal=True)
            cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, grad_dtype=numpy.float32)
            cupy.cuda.Device().synchronize()
            print(f"ran float32 gradients bfloat16 D={d} sm90={'off' if hopper_off == '1' else 'on'}",
                  flush=True)


def _varlen(rng):
    """Packed sequences of lengths 70, 0, 150 (an empty one between two that end mid-tile),
    causal, forward and both backward modes (the default's dK/dV kernel warp-specialised, the
    deterministic one's the cp.async kernel)."""
    seqlens = numpy.array([0, 70, 70, 220], numpy.int32)
    cu = cupy.asarray(seqlens)
    q, k, v, dout = (cupy.asarray(rng.standard_normal((220, h, 64), dtype=numpy.float32).astype(ml_dtypes.bfloat16))
                     for h in (4, 2, 2, 4))
    out, lse = cuflash.attention_varlen(q, k, v, cu, cu, 150, 150, causal=True, return_lse=True)
    for deterministic in (False, True):
        cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, 150, 150, causal=True,
                                          deterministic=deterministic)
    cupy.cuda.Device().synchronize()
    print("ran varlen bfloat16 D=64 causal", flush=True)
    # D = 96: the 128-column tile with zero columns, its TMA boxes reaching into the next
    # sequence's rows and past the last one's.
    q, k, v, dout = (cupy.asarray(rng.standard_normal((220, h, 96), dtype=numpy.float32).astype(ml_dtypes.bfloat16))
                     for h in (4, 2, 2, 4))
    out, lse = cuflash.attention_varlen(q, k, v, cu, cu, 150, 150, causal=True, return_lse=True)
    cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, 150, 150, causal=True)
    cupy.cuda.Device().synchronize()
    print("ran varlen bfloat16 D=96 causal", flush=True)


def _decode(rng):
    """The decode kernel through a paged cache with an append, split over the keys (with a
    combine) and not, and a contiguous cache with a sliding window."""
    def make(*shape):
        return cupy.asarray(rng.standard_normal(shape, dtype=numpy.float32).astype(ml_dtypes.bfloat16))
    q, k_new, v_new = make(2, 2, 8, 64), make(2, 2, 2, 64), make(2, 2, 2, 64)
    pages = make(12, 16, 2, 64), make(12, 16, 2, 64)
    table = cupy.asarray(rng.permutation(12)[:10].reshape(2, 5).astype(numpy.int32))
    lengths = cupy.asarray(numpy.array([30, 61], numpy.int32))
    for splits in (1, 3):
        cuflash.attention_with_kvcache(q, *pages, k_new, v_new, cache_seqlens=lengths, block_table=table,
                                       causal=True, num_splits=splits)
    cache = make(2, 300, 2, 64), make(2, 300, 2, 64)
    cuflash.attention_with_kvcache(q, *cache, cache_seqlens=lengths, window=(40, 0))
    # A head dim whose ring rows are padded to whole lines (96 -> 128 columns), split in three.
    cache = make(2, 300, 2, 96), make(2, 300, 2, 96)
    cuflash.attention_with_kvcache(make(2, 2, 8, 96), *cache, cache_seqlens=lengths, num_splits=3)
    cupy.cuda.Device().synchronize()
    print("ran decode bfloat16 D=64 paged and contiguous, D=96 split", flush=True)


if __name__ == "__main__":
    main()
