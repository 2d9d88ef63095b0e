"""The Hopper backward kernels (cuflash/kernels/csrc/flash_bwd_sm90.cu) on one sm_90 GPU: are they
right, and how fast is forward + backward next to the mma.sync backward and torch SDPA (flash and
cuDNN back ends).

    PYTHONPATH=$PWD python3 benchmarks/check_sm90_bwd.py [--no-timing] [--no-sweep] [--no-torch]
                                                        [--dtypes bfloat16,float16] [--seed N]

1. compile: every main variant (and the sweep's tile shapes), registers and local memory;
2. correctness: ``sm90_backward.backward`` called directly, gradients poisoned with NaN first,
   against the float64 oracle with the correctness rule (cuflash/check/rule.py, through tests/oracle.py); the forward results it
   differentiates are the oracle's own (rounded to the input dtype), so a failure points at the
   backward. One line per case; a failure never stops the others (a broken CUDA context does);
3. determinism: two runs bit-identical;
4. timing: the dense grid B = 16384 / N, H = 2048 / D; forward + backward TFLOP/s (backward
   counted 2.5× the forward) for the sm90 forward with this backward, the sm90 forward with the
   mma backward, and torch SDPA; backward-only TFLOP/s of both backward kernels; max relative
   difference of the gradients between the two backward paths;
5. sweep: other tile shapes, backward only, on a few grid problems.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy  # noqa: E402
import numpy  # noqa: E402
from _harness import (  # noqa: E402
    SHORT, check_main, compile_report, dense_cases, fmt, make_inputs, median_ms, randn,
    ratio, scale_cases, sdpa_tflops, spec_for, sweep_grid, sweep_shapes, timing_grid,
)

from cuflash.bench import BACKWARD_FLOP_FACTOR, forward_flops  # noqa: E402
from cuflash.kernels import mma_backward, sm90_backward, sm90_forward  # noqa: E402
from cuflash.kernels._variants import spec_of  # noqa: E402
from cuflash.kernels.sm90_backward import Sm90BwdTiles  # noqa: E402


# ----------------------------------------------------------------------------- correctness

def oracle_forward(q, k, v, *, causal, scale, block_mask):
    from cuflash import reference

    mask = None
    if block_mask is not None:
        mask = reference.keep_mask(q.shape[-2], k.shape[-2], block_mask=block_mask, xp=cupy)
    out, lse = reference.attention(q, k, v, causal=causal, scale=scale, mask=mask)
    return out.astype(q.dtype), lse.astype(numpy.float32)


def run_backward(dout, q, k, v, out, lse, *, scale, causal, block_mask, tiles):
    dq, dk, dv = (cupy.full(x.shape, numpy.nan, dtype=x.dtype) for x in (q, k, v))
    spec = spec_for(q, k, v, scale=scale, causal=causal, block_mask=block_mask)
    reason = sm90_backward.supports(spec, (q, k, v, dout, out, dq, dk, dv))
    if reason is not None:
        raise AssertionError(f"supports() refused a case it should take: {reason}")
    sm90_backward.backward(dout, q, k, v, out, lse, dq, dk, dv, spec, tiles=tiles)
    cupy.cuda.Device().synchronize()
    return dq, dk, dv


def check_case(rng, *, dtype, d, nq, nk=None, b=1, hq=2, hkv=None, causal=False, scale=None,
               layout="bhnd", block_mask=None, tiles=None, zero_keys=None, zero_rows=None,
               twice=False, seed=0):
    from oracle import assert_backward_close

    nk = nq if nk is None else nk
    hkv = hq if hkv is None else hkv
    q, k, v, dout = make_inputs(rng, dtype=dtype, b=b, hq=hq, hkv=hkv, nq=nq, nk=nk, d=d, layout=layout,
                                dout=True)
    s = 1.0 / math.sqrt(d) if scale is None else scale
    out, lse = oracle_forward(q, k, v, causal=causal, scale=s, block_mask=block_mask)
    grads = run_backward(dout, q, k, v, out, lse, scale=s, causal=causal, block_mask=block_mask,
                         tiles=tiles)
    assert_backward_close(grads, dout, q, k, v, causal=causal, scale=s, block_mask=block_mask,
                          context=f"seed={seed}")
    dq, dk, dv = grads
    if zero_keys is not None:  # keys no query sees: exactly zero
        lo, hi = zero_keys
        for name, g in (("dk", dk), ("dv", dv)):
            if bool(cupy.any(g[:, :, lo:hi].astype(cupy.float32) != 0)):
                raise AssertionError(f"{name}[{lo}:{hi}] must be 0 (no query sees those keys)")
    if zero_rows is not None:  # queries that see no key: exactly zero
        lo, hi = zero_rows
        if bool(cupy.any(dq[:, :, lo:hi].astype(cupy.float32) != 0)):
            raise AssertionError(f"dq[{lo}:{hi}] must be 0 (those queries see no key)")
    if twice:
        again = run_backward(dout, q, k, v, out, lse, scale=s, causal=causal, block_mask=block_mask,
                             tiles=tiles)
        for name, x, y in zip(("dq", "dk", "dv"), grads, again):
            if not bool(cupy.all(x.view(cupy.uint16) == y.view(cupy.uint16))):
                raise AssertionError(f"{name} differs between two runs")


def correctness_cases(dtypes):
    """(name, kwargs) pairs, simplest first so that the first failure is the telling one."""
    from cuflash.sparse import BlockMask

    cases = []
    add = lambda name, **kw: cases.append((name, kw))  # noqa: E731
    dense_cases(add, dtypes, zero_rows=True)
    for hq, hkv in ((8, 2), (8, 1)):
        for d in (64, 128):
            add(f"fp16 D={d:<3d} GQA Hq={hq} Hkv={hkv} Nq=190 Nk=260 causal=1", dtype="float16", d=d,
                nq=190, nk=260, hq=hq, hkv=hkv, causal=True)
            add(f"bf16 D={d:<3d} GQA Hq={hq} Hkv={hkv} Nq=700 Nk=1100", dtype="bfloat16", d=d,
                nq=700, nk=1100, hq=hq, hkv=hkv)
    scale_cases(add)
    for d in (64, 128):
        add(f"bf16 D={d:<3d} (B,N,H,D) views N=333 causal=1", dtype="bfloat16", d=d, nq=333, b=2,
            hq=4, layout="bnhd", causal=True)
        add(f"fp16 D={d:<3d} interleaved qkv buffer N=520", dtype="float16", d=d, nq=520, b=2,
            hq=4, layout="qkv")

    # Block-sparse, block 128: shared and per-head patterns, with GQA; one pattern with an empty
    # key block column (dk = dv = 0 there) and an empty query block row (dq = 0 there).
    layout_rng = numpy.random.default_rng(7)
    for (nq, nk, heads, hq, hkv, causal) in ((1000, 1000, None, 2, 2, False), (1000, 1000, 2, 2, 2, True),
                                            (700, 900, None, 4, 2, True), (512, 640, 4, 4, 2, False)):
        nqb, nkb = -(-nq // 128), -(-nk // 128)
        shape = (nqb, nkb) if heads is None else (heads, nqb, nkb)
        dense = layout_rng.random(shape) < 0.4
        diag = numpy.arange(min(nqb, nkb))
        dense[..., diag, diag] = True
        mask = BlockMask.from_dense(dense, block_size=128, shape=(nq, nk))
        for d in (64, 128):
            add(f"bf16 D={d:<3d} block-sparse 128 heads={heads} Hq={hq} Hkv={hkv} Nq={nq} Nk={nk} "
                f"causal={int(causal)}", dtype="bfloat16", d=d, nq=nq, nk=nk, hq=hq, hkv=hkv,
                causal=causal, block_mask=mask)
    dense = numpy.ones((4, 4), bool)
    dense[:, 2] = False  # keys 256..383: no query sees them
    dense[3, :] = False  # queries 384..499: see no key
    mask = BlockMask.from_dense(dense, block_size=128, shape=(500, 480))
    for d in (64, 128):
        for causal in (False, True):
            add(f"fp16 D={d:<3d} block-sparse empty column/row Nq=500 Nk=480 causal={int(causal)}",
                dtype="float16", d=d, nq=500, nk=480, hq=4, hkv=2, causal=causal, block_mask=mask,
                zero_keys=(256, 384), zero_rows=(384, 500))

    # Determinism: two runs bit-identical.
    for d in (64, 128):
        add(f"bf16 D={d:<3d} twice bit-identical B=2 Hq=4 Hkv=2 N=1000 causal=1", dtype="bfloat16",
            d=d, nq=1000, b=2, hq=4, hkv=2, causal=True, twice=True)
    return cases


def sweep_tiles(d):
    if d == 64:
        return [Sm90BwdTiles(dkdv_block_m=128), Sm90BwdTiles(dq_block_n=128),
                Sm90BwdTiles(dkdv_warpgroups=1, dq_warpgroups=1)]
    return [Sm90BwdTiles(dq_block_n=128), Sm90BwdTiles(dkdv_warpgroups=1, dq_warpgroups=1)]


def tile_name(t: Sm90BwdTiles) -> str:
    return f"dkdv {t.dkdv_block_n}x{t.dkdv_block_m} dq {t.dq_block_m}x{t.dq_block_n}"


def other_tile_cases():
    return [(f"bf16 D={d:<3d} tiles {tile_name(tiles)} Hq=4 Hkv=2 Nq=1000 Nk=777 causal={int(causal)}",
             dict(dtype="bfloat16", d=d, nq=1000, nk=777, hq=4, hkv=2, causal=causal, tiles=tiles))
            for d, tiles, causal in sweep_shapes(sweep_tiles)]


# ----------------------------------------------------------------------------- timing

REPS = 8  # timed runs per median, after 2 warm-up runs


def time_problem(torch, dtype, n, d, causal, *, tiles=None, baselines=True):
    b, h = 16384 // n, 2048 // d
    rng = cupy.random.default_rng([n, d])
    q, k, v, dout = (randn(rng, (b, h, n, d), dtype) for _ in range(4))
    fwd_flop = forward_flops(b, h, n, n, d, causal=causal)
    bwd_flop, fb_flop = BACKWARD_FLOP_FACTOR * fwd_flop, (1 + BACKWARD_FLOP_FACTOR) * fwd_flop
    spec = spec_for(q, k, v, scale=1.0 / math.sqrt(d), causal=causal)
    out = cupy.empty_like(q)
    lse = cupy.empty((b, h, n), cupy.float32)
    grads = tuple(cupy.empty_like(x) for x in (q, k, v))
    grads_mma = tuple(cupy.empty_like(x) for x in (q, k, v))
    fwd = lambda: sm90_forward.forward(q, k, v, out, lse, spec)  # noqa: E731
    bwd = lambda: sm90_backward.backward(dout, q, k, v, out, lse, *grads, spec, tiles=tiles)  # noqa: E731
    bwd_mma = lambda: mma_backward.backward(dout, q, k, v, out, lse, *grads_mma, spec)  # noqa: E731
    r = {}
    fwd()
    r["bwd"] = bwd_flop / median_ms(bwd, reps=REPS) / 1e9
    if not baselines:
        return r
    r["fb"] = fb_flop / median_ms(lambda: (fwd(), bwd()), reps=REPS) / 1e9
    r["fb_mma"] = fb_flop / median_ms(lambda: (fwd(), bwd_mma()), reps=REPS) / 1e9
    r["bwd_mma"] = bwd_flop / median_ms(bwd_mma, reps=REPS) / 1e9
    fwd()
    bwd()
    bwd_mma()
    rel = 0.0
    for x, y in zip(grads, grads_mma):
        x32, y32 = x.astype(cupy.float32), y.astype(cupy.float32)
        rel = max(rel, float((cupy.abs(x32 - y32).max() / cupy.abs(y32).max()).get()))
    r["reldiff"] = rel
    r.update(sdpa_tflops(torch, fb_flop, q, k, v, causal, dout=dout, reps=REPS))
    return r


def timing_row(r):
    fb = r["fb"]
    fwd_bwd = (f"f+b: sm90 {fmt(fb)} mma {fmt(r['fb_mma'])} flash {fmt(r['flash'])} cudnn {fmt(r['cudnn'])}"
               f" | /flash {ratio(fb, r['flash'])} /mma {ratio(fb, r['fb_mma'])} /cudnn {ratio(fb, r['cudnn'])}")
    return f"{fwd_bwd} | bwd: sm90 {fmt(r['bwd'])} mma {fmt(r['bwd_mma'])} | reldiff {r['reldiff']:.1e}"


def run_timing(torch, dtypes):
    print("TFLOP/s, median of 8 after 2 warm-up runs. f+b = forward + backward (sm90 forward in both "
          "cuflash columns); bwd = backward alone; reldiff = max|g_sm90 - g_mma| / max|g_mma| over dq, dk, dv")
    timing_grid(torch, dtypes, time_problem, timing_row)


def run_sweep(dtype_name):
    print(f"tile sweep, {SHORT[dtype_name]}, backward TFLOP/s")
    sweep_grid(dtype_name, ((2048, False), (8192, False), (8192, True)),
               lambda d: [sm90_backward.default_tiles(d)] + sweep_tiles(d), tile_name, time_problem,
               "bwd")


# ----------------------------------------------------------------------------- compile report

def run_compile_report(sweep):
    expressions = [e for _, e in sm90_backward.main_variants()]
    if sweep:
        for d, tiles, causal in sweep_shapes(sweep_tiles):
            spec = spec_of("bfloat16", d, causal=causal)
            expressions.append(sm90_backward.variant_dkdv(spec, tiles))
            expressions.append(sm90_backward.variant_dq(spec, tiles))
    return compile_report(sm90_backward, dict.fromkeys(expressions))


def main():
    return check_main(__doc__, needs="these kernels need", compile_stage=run_compile_report,
                      cases=lambda: correctness_cases(["bfloat16", "float16"]),
                      tile_cases=other_tile_cases, check_case=check_case, run_timing=run_timing,
                      run_sweep=run_sweep)


if __name__ == "__main__":
    sys.exit(main())
