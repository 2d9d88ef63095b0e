"""The Hopper forward kernel (cuflash/kernels/csrc/flash_fwd_sm90.cu) on one sm_90 GPU: is it right,
and how fast is it next to the mma.sync kernel and torch SDPA (flash and cuDNN back ends).

    PYTHONPATH=$PWD python3 benchmarks/check_sm90.py [--no-timing] [--no-sweep] [--no-torch]
                                                    [--dtypes bfloat16,float16] [--seed N]

1. compile: every main variant, with registers and local memory as the driver reports them;
2. correctness: each case against the float64 oracle with the correctness rule
   (max|out − ref64| ≤ 2·max|naive − ref64| + 1e-5), outputs and lse poisoned with NaN first;
   one line per case, a failure never stops the others (a broken CUDA context does: then the
   remaining GPU work would only repeat the first error);
3. timing: the dense grid of benchmarks/NOTES.md (B = 16384 / N, H = 2048 / D), TFLOP/s with
   the papers' FLOP count, median of CUDA-event timings, and max|sm90 − mma| on each problem;
4. sweep: other tile shapes of the kernel on a few grid problems, to pick the defaults.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy  # noqa: E402
import numpy  # noqa: E402
from _harness import (  # noqa: E402
    DTYPES, SHORT, check_main, compile_report, dense_cases, fmt, make_inputs, median_ms, randn,
    ratio, scale_cases, sdpa_tflops, short_error, spec_for, stop_if_broken, sweep_grid,
    sweep_shapes, timing_grid,
)

from cuflash.bench import forward_flops  # noqa: E402
from cuflash.kernels import mma_forward, sm90_forward  # noqa: E402
from cuflash.kernels._variants import spec_of  # noqa: E402
from cuflash.kernels.sm90_forward import Sm90Tiles  # noqa: E402


# ----------------------------------------------------------------------------- correctness

def check_case(rng, *, dtype, d, nq, nk=None, b=1, hq=2, hkv=None, causal=False, scale=None,
               layout="bhnd", out_layout="bhnd", block_mask=None, rows=None, tiles=None, seed=0,
               dv=None, kernel=sm90_forward):
    """One case through `kernel` (a Hopper forward launcher module) against the oracle."""
    from oracle import assert_forward_close

    nk = nq if nk is None else nk
    dv = d if dv is None else dv
    hkv = hq if hkv is None else hkv
    q, k, v = make_inputs(rng, dtype=dtype, b=b, hq=hq, hkv=hkv, nq=nq, nk=nk, d=d, layout=layout)
    if dv != d:
        v = randn(rng, v.shape[:3] + (dv,), dtype)
    if out_layout == "bnhd":
        out = cupy.full((b, nq, hq, dv), numpy.nan, dtype=dtype).transpose(0, 2, 1, 3)
    else:
        out = cupy.full((b, hq, nq, dv), numpy.nan, dtype=dtype)
    lse = cupy.full((b, hq, nq), numpy.nan, dtype=cupy.float32)
    s = 1.0 / math.sqrt(d) if scale is None else scale
    spec = spec_for(q, k, v, causal=causal, scale=s, block_mask=block_mask)
    reason = kernel.supports(spec, (q, k, v, out))
    if reason is not None:
        raise AssertionError(f"supports() refused a case it should take: {reason}")
    kernel.forward(q, k, v, out, lse, spec, tiles=tiles)
    cupy.cuda.Device().synchronize()
    try:
        assert_forward_close(out, lse, q, k, v, causal=causal, scale=s, block_mask=block_mask,
                             rows=rows, context=f"seed={seed}")
    except AssertionError as error:
        if rows is None and nq * nk <= 2**22:
            import oracle
            from cuflash import reference

            keep = oracle._combined_mask(cupy, nq, nk, causal=causal, mask=None, block_mask=block_mask)
            ref, _ = reference.attention(q, k, v, scale=s, mask=keep)
            error.detail = error_map(cupy.asnumpy(out.astype(cupy.float64)), cupy.asnumpy(ref))
        raise


def correctness_cases(dtypes):
    """(name, kwargs) pairs, simplest first so that the first failure is the telling one."""
    from cuflash.sparse import BlockMask

    cases = []
    add = lambda name, **kw: cases.append((name, kw))  # noqa: E731
    dense_cases(add, dtypes)
    for hq, hkv in ((8, 2), (8, 1), (6, 3)):
        for d in (64, 128):
            add(f"fp16 D={d:<3d} GQA Hq={hq} Hkv={hkv} N=190 causal=1", dtype="float16", d=d,
                nq=190, hq=hq, hkv=hkv, causal=True)
            add(f"bf16 D={d:<3d} GQA Hq={hq} Hkv={hkv} Nq=700 Nk=1100", dtype="bfloat16", d=d,
                nq=700, nk=1100, hq=hq, hkv=hkv)
    scale_cases(add)
    for d in (64, 128):
        add(f"bf16 D={d:<3d} (B,N,H,D) views in and out N=333 causal=1", dtype="bfloat16", d=d,
            nq=333, b=3, hq=4, layout="bnhd", out_layout="bnhd", causal=True)
        add(f"fp16 D={d:<3d} interleaved qkv buffer N=520", dtype="float16", d=d, nq=520, b=2,
            hq=4, layout="qkv")

    # Block-sparse: 128 × 128 and 256 × 128 blocks, shared and per-head patterns.
    layout_rng = numpy.random.default_rng(7)
    for (n, bq, bk, heads, causal) in ((1000, 128, 128, None, False), (1000, 128, 128, 2, True),
                                       (1500, 256, 128, None, True), (777, 128, 256, 2, False)):
        nqb, nkb = -(-n // bq), -(-n // bk)
        shape = (nqb, nkb) if heads is None else (heads, nqb, nkb)
        dense = layout_rng.random(shape) < 0.5
        mask = BlockMask.from_dense(dense, block_size=(bq, bk), shape=(n, n))
        for d in (64, 128):
            add(f"bf16 D={d:<3d} block-sparse {bq}x{bk} heads={heads} N={n} causal={int(causal)}",
                dtype="bfloat16", d=d, nq=n, hq=2, causal=causal, block_mask=mask)

    # Long sequences: sampled rows against the float64 oracle.
    for d in (64, 128):
        for causal in (False, True):
            rows = numpy.sort(layout_rng.choice(16384, size=64, replace=False))
            rows[-1] = 16383
            add(f"bf16 D={d:<3d} N=16384 causal={int(causal)} (64 sampled rows)", dtype="bfloat16",
                d=d, nq=16384, hq=2, causal=causal, rows=rows)
    return cases


def other_tile_cases():
    """The sweep's tile shapes, checked before they are timed."""
    return [(f"bf16 D={d:<3d} tiles {tile_name(tiles)} N=1000 causal={int(causal)}",
             dict(dtype="bfloat16", d=d, nq=1000, b=1, hq=2, causal=causal, tiles=tiles))
            for d, tiles, causal in sweep_shapes(sweep_tiles)]


def error_map(got, expected, rows=16, cols=16) -> str:
    """max|got − expected| over blocks of `rows` query rows × `cols` columns (max over batch and
    heads), as a grid of powers of ten ("." = exact): a layout bug shows up as whole bad blocks (a warpgroup's
    rows, a 64-column box, a key tile)."""
    err = numpy.abs(got - expected).reshape(-1, *got.shape[-2:]).max(axis=0)
    n, d = err.shape
    rows = max(rows, 16 * -(-n // (16 * 32)))  # at most 32 lines
    lines = []
    for r in range(0, n, rows):
        cells = []
        for c in range(0, d, cols):
            e = err[r:r + rows, c:c + cols].max()
            cells.append("nan" if numpy.isnan(e) else "  ." if e == 0 else f"{int(numpy.floor(numpy.log10(e))):3d}")
        lines.append(f"      rows {r:4d}+ " + " ".join(cells))
    return "\n".join(lines)


def run_probes(seed):
    """Structured inputs that isolate one half of the kernel: q = 0 makes P uniform, so out is the
    mean of V's rows (P·V and V's layout alone); V = I (N = D) makes out = P itself (Q·Kᵀ, K's
    layout and the softmax alone). Tolerance: 2^-7 of the largest expected value (a few 16-bit
    roundings); layout bugs give errors of order one."""
    print("\n== probes (structured inputs; diagnose which half of the kernel is wrong)")
    failed = 0
    for dtype_name in ("bfloat16", "float16"):
        dtype = DTYPES[dtype_name]
        for d in (64, 128):
            for kind in ("q=0 (out = mean of V)", "V=I (out = softmax(QK^T))"):
                name = f"probe {SHORT[dtype_name]} D={d:<3d} {kind}"
                rng = cupy.random.default_rng([seed, d, len(kind)])
                b, h = 2, 3
                n = 320 if kind.startswith("q=0") else d
                q = randn(rng, (b, h, n, d), dtype)
                k = randn(rng, (b, h, n, d), dtype)
                v = randn(rng, (b, h, n, d), dtype)
                scale = 1.0 / math.sqrt(d)
                if kind.startswith("q=0"):
                    q = cupy.zeros_like(q)
                    expected = cupy.broadcast_to(v.astype(cupy.float64).mean(axis=2, keepdims=True), (b, h, n, d))
                else:
                    v = cupy.broadcast_to(cupy.eye(d, dtype=cupy.float32).astype(dtype), (b, h, n, d)).copy()
                    s = (q.astype(cupy.float64) @ k.astype(cupy.float64).swapaxes(-1, -2)) * scale
                    p = cupy.exp(s - s.max(axis=-1, keepdims=True))
                    expected = p / p.sum(axis=-1, keepdims=True)
                out = cupy.full((b, h, n, d), numpy.nan, dtype=dtype)
                lse = cupy.full((b, h, n), numpy.nan, dtype=cupy.float32)
                try:
                    spec = spec_for(q, k, v, scale=scale, causal=False)
                    sm90_forward.forward(q, k, v, out, lse, spec)
                    cupy.cuda.Device().synchronize()
                    got, want = cupy.asnumpy(out.astype(cupy.float64)), cupy.asnumpy(expected)
                    err = float(numpy.abs(got - want).max()) if not numpy.isnan(got).any() else math.nan
                    bound = float(numpy.abs(want).max()) * 2.0**-7
                    if err <= bound:
                        print(f"ok    {name}: max err {err:.2e} <= {bound:.2e}")
                    else:
                        failed += 1
                        print(f"FAIL  {name}: max err {err:.3g} > {bound:.3g} (NaN: {int(numpy.isnan(got).sum())});"
                              f" log10 of the max error per 16 rows x 16 columns:")
                        print(error_map(got, want))
                except Exception as error:
                    failed += 1
                    print(f"FAIL  {name}: {short_error(error)}", flush=True)
                    stop_if_broken(error, f"after {name!r}")
    return failed


# ----------------------------------------------------------------------------- timing

def time_problem(torch, dtype, n, d, causal, *, tiles=None, baselines=True):
    b, h = 16384 // n, 2048 // d
    rng = cupy.random.default_rng([n, d])
    q, k, v = (randn(rng, (b, h, n, d), dtype) for _ in range(3))
    flop = forward_flops(b, h, n, n, d, causal=causal)
    tf = lambda ms: flop / ms / 1e9  # noqa: E731
    spec = spec_for(q, k, v, scale=1.0 / math.sqrt(d), causal=causal)
    out_sm90, out_mma = cupy.empty_like(q), cupy.empty_like(q)
    lse = cupy.empty((b, h, n), cupy.float32)
    result = {"sm90": tf(median_ms(lambda: sm90_forward.forward(
        q, k, v, out_sm90, lse, spec, tiles=tiles)))}
    if baselines:
        result["mma"] = tf(median_ms(lambda: mma_forward.forward(q, k, v, out_mma, lse, spec)))
        diff = cupy.abs(out_sm90.astype(cupy.float32) - out_mma.astype(cupy.float32)).max()
        result["maxdiff"] = float(diff.get())
        result.update(sdpa_tflops(torch, flop, q, k, v, causal))
    return result


def timing_row(r):
    sm90 = r["sm90"]
    return (f"sm90 {fmt(sm90)}  mma {fmt(r['mma'])}  flash {fmt(r['flash'])}  cudnn {fmt(r['cudnn'])}"
            f"  | sm90/flash {ratio(sm90, r['flash'])}  sm90/mma {ratio(sm90, r['mma'])}"
            f"  sm90/cudnn {ratio(sm90, r['cudnn'])}  maxdiff {r['maxdiff']:.2e}")


def run_timing(torch, dtypes):
    print("TFLOP/s (median of 10 after 2 warm-up runs); maxdiff = max|sm90 - mma| on the output")
    timing_grid(torch, dtypes, time_problem, timing_row)


def tile_name(t: Sm90Tiles) -> str:
    return f"{t.warpgroups}wg x{t.block_n} s{t.stages}"


def sweep_tiles(d):
    if d == 64:
        return [Sm90Tiles(2, 128, 3), Sm90Tiles(3, 64, 2), Sm90Tiles(3, 64, 3), Sm90Tiles(2, 64, 3)]
    return [Sm90Tiles(2, 128, 3), Sm90Tiles(3, 64, 2), Sm90Tiles(2, 64, 3)]


def run_sweep(dtype_name):
    print(f"tile sweep, {SHORT[dtype_name]}, TFLOP/s (default = {tile_name(sm90_forward.default_tiles(128))})")
    sweep_grid(dtype_name, ((2048, False), (8192, False), (8192, True), (16384, True)),
               lambda d: [sm90_forward.default_tiles(d)] + sweep_tiles(d), tile_name, time_problem,
               "sm90")


# ----------------------------------------------------------------------------- compile report

def run_compile_report(sweep):
    expressions = [e for _, e in sm90_forward.main_variants()]
    if sweep:
        expressions += [sm90_forward.variant(spec_of("bfloat16", d, causal=causal), tiles)
                        for d, tiles, causal in sweep_shapes(sweep_tiles)]
    return compile_report(sm90_forward, expressions)


def main():
    return check_main(__doc__, needs="this kernel needs", compile_stage=run_compile_report,
                      cases=lambda: correctness_cases(["bfloat16", "float16"]),
                      tile_cases=other_tile_cases, check_case=check_case, run_timing=run_timing,
                      run_sweep=run_sweep, probes=run_probes)


if __name__ == "__main__":
    sys.exit(main())
