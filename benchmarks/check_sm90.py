"""The Hopper forward kernel (cuflash/kernels/flash_fwd_sm90.cu) on one sm_90 GPU: is it right,
and how fast is it next to the mma.sync kernel and torch SDPA (flash and cuDNN back ends).

    PYTHONPATH=$PWD python3 benchmarks/check_sm90.py [--no-timing] [--no-sweep] [--no-torch]
                                                    [--dtypes bfloat16,float16] [--seed N]

1. compile: every main variant, with registers and local memory as the driver reports them;
2. correctness: each case against the float64 oracle with the DESIGN.md rule
   (max|out − ref64| ≤ 2·max|naive − ref64| + 1e-5), outputs and lse poisoned with NaN first;
   one line per case, a failure never stops the others (a broken CUDA context does: then the
   remaining GPU work would only repeat the first error);
3. timing: the dense grid of benchmarks/NOTES.md (B = 16384 / N, H = 2048 / D), TFLOP/s with
   the papers' FLOP count, median of CUDA-event timings, and max|sm90 − mma| on each problem;
4. sweep: other tile shapes of the kernel on a few grid problems, to pick the defaults.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import cupy  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy  # noqa: E402

from cuflash.kernels import _build, mma_forward, sm90_forward  # noqa: E402
from cuflash.kernels.sm90_forward import Sm90Tiles  # noqa: E402

DTYPES = {"bfloat16": numpy.dtype(ml_dtypes.bfloat16), "float16": numpy.dtype(numpy.float16)}
SHORT = {"bfloat16": "bf16", "float16": "fp16"}


class BrokenContext(Exception):
    """The CUDA context is unusable (illegal address, launch failure): stop all GPU work."""


def context_alive() -> bool:
    try:
        cupy.cuda.Device().synchronize()
        return float(cupy.asnumpy(cupy.ones(4, dtype=cupy.float32).sum())) == 4.0
    except Exception:
        return False


def short_error(error: BaseException, limit: int = 600) -> str:
    text = f"{type(error).__name__}: {error}".strip().replace("\n", " | ")
    return text if len(text) <= limit else text[:limit] + " ..."


# ----------------------------------------------------------------------------- inputs

def randn(rng, shape, dtype):
    return rng.standard_normal(shape, dtype=cupy.float32).astype(dtype)


def make_inputs(rng, *, dtype, b, hq, hkv, nq, nk, d, layout):
    """q, k, v in (B, H, N, D) form; layout "bnhd" gives strided views of (B, N, H, D) buffers
    (as x.transpose(0, 2, 1, 3)), "qkv" views of one interleaved (B, N, 3, H, D) buffer."""
    if layout == "bhnd":
        return (randn(rng, (b, hq, nq, d), dtype), randn(rng, (b, hkv, nk, d), dtype),
                randn(rng, (b, hkv, nk, d), dtype))
    if layout == "bnhd":
        return (randn(rng, (b, nq, hq, d), dtype).transpose(0, 2, 1, 3),
                randn(rng, (b, nk, hkv, d), dtype).transpose(0, 2, 1, 3),
                randn(rng, (b, nk, hkv, d), dtype).transpose(0, 2, 1, 3))
    if layout == "qkv":
        assert nq == nk and hq == hkv
        qkv = randn(rng, (b, nq, 3, hq, d), dtype)
        return tuple(qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    raise ValueError(layout)


# ----------------------------------------------------------------------------- correctness

def check_case(rng, *, dtype, d, nq, nk=None, b=1, hq=2, hkv=None, causal=False, scale=None,
               layout="bhnd", out_layout="bhnd", block_mask=None, rows=None, tiles=None, seed=0):
    from oracle import assert_forward_close

    nk = nq if nk is None else nk
    hkv = hq if hkv is None else hkv
    q, k, v = make_inputs(rng, dtype=dtype, b=b, hq=hq, hkv=hkv, nq=nq, nk=nk, d=d, layout=layout)
    if out_layout == "bnhd":
        out = cupy.full((b, nq, hq, d), numpy.nan, dtype=dtype).transpose(0, 2, 1, 3)
    else:
        out = cupy.full((b, hq, nq, d), numpy.nan, dtype=dtype)
    lse = cupy.full((b, hq, nq), numpy.nan, dtype=cupy.float32)
    s = 1.0 / math.sqrt(d) if scale is None else scale
    if not sm90_forward.supports(q, k, v, out, block_mask, tiles):
        raise AssertionError("supports() returned False for a case it should take")
    sm90_forward.forward(q, k, v, out, lse, scale=s, causal=causal, block_mask=block_mask,
                         tiles=tiles)
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
    add("bf16 D=128 N=128 dense (B=2,H=4)", dtype="bfloat16", d=128, nq=128, b=2, hq=4)
    add("bf16 D=64  N=128 dense (B=2,H=4)", dtype="bfloat16", d=64, nq=128, b=2, hq=4)
    for dtype in dtypes:
        for d in (64, 128):
            for causal in (False, True):
                for n in (1, 17, 127, 128, 1000, 4097):
                    b, h = (1, 2) if n >= 1000 else (2, 4)
                    add(f"{SHORT[dtype]} D={d:<3d} N={n:<5d} causal={int(causal)} (B={b},H={h})",
                        dtype=dtype, d=d, nq=n, b=b, hq=h, causal=causal)
    for nq, nk in ((1, 300), (300, 1), (100, 333), (333, 100), (64, 4096), (4096, 64), (1000, 1500)):
        for causal in (False, True):
            for d in (64, 128):
                add(f"bf16 D={d:<3d} Nq={nq} Nk={nk} causal={int(causal)}", dtype="bfloat16", d=d,
                    nq=nq, nk=nk, b=2, hq=2, causal=causal)
    for hq, hkv in ((8, 2), (8, 1), (6, 3)):
        for d in (64, 128):
            add(f"fp16 D={d:<3d} GQA Hq={hq} Hkv={hkv} N=190 causal=1", dtype="float16", d=d,
                nq=190, hq=hq, hkv=hkv, causal=True)
            add(f"bf16 D={d:<3d} GQA Hq={hq} Hkv={hkv} Nq=700 Nk=1100", dtype="bfloat16", d=d,
                nq=700, nk=1100, hq=hq, hkv=hkv)
    add("bf16 D=64  scale=0.37 N=256", dtype="bfloat16", d=64, nq=256, b=2, hq=4, scale=0.37)
    add("bf16 D=128 scale=0.05 N=300 causal=1", dtype="bfloat16", d=128, nq=300, b=2, hq=4,
        scale=0.05, causal=True)
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
    cases = []
    for d in (64, 128):
        for tiles in sweep_tiles(d):
            for causal in (False, True):
                cases.append((f"bf16 D={d:<3d} tiles {tile_name(tiles)} N=1000 causal={int(causal)}",
                              dict(dtype="bfloat16", d=d, nq=1000, b=1, hq=2, causal=causal,
                                   tiles=tiles)))
    return cases


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
                    sm90_forward.forward(q, k, v, out, lse, scale=scale, causal=False)
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
                    if not context_alive():
                        raise BrokenContext(f"CUDA context broken after {name!r}") from error
    return failed


def run_correctness(cases, seed):
    passed = failed = 0
    for i, (name, kw) in enumerate(cases):
        rng = cupy.random.default_rng([seed, i])
        kw = dict(kw)
        kw["dtype"] = DTYPES[kw["dtype"]]
        start = time.perf_counter()
        try:
            check_case(rng, seed=seed, **kw)
        except Exception as error:
            failed += 1
            print(f"FAIL  {name}: {short_error(error)}", flush=True)
            if getattr(error, "detail", None) and failed <= 4:
                print("      log10 of max|out - ref64| per 16 rows x 16 columns:")
                print(error.detail, flush=True)
            if not context_alive():
                raise BrokenContext(f"CUDA context broken after case {name!r}") from error
        else:
            passed += 1
            print(f"ok    {name}  [{time.perf_counter() - start:.2f}s]", flush=True)
        finally:
            cupy.get_default_memory_pool().free_all_blocks()
    return passed, failed


# ----------------------------------------------------------------------------- timing

def median_ms(fn, *, warmup=2, reps=10):
    for _ in range(warmup):
        fn()
    stream = cupy.cuda.get_current_stream()
    events = []
    for _ in range(reps):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        fn()
        stop.record(stream)
        events.append((start, stop))
    events[-1][1].synchronize()
    return float(numpy.median([cupy.cuda.get_elapsed_time(a, b) for a, b in events]))


def torch_module(use_torch):
    if not use_torch:
        return None
    try:
        import torch
        import torch.nn.attention  # SDPBackend / sdpa_kernel live here (torch >= 2.3)
        torch.nn.attention.sdpa_kernel, torch.nn.attention.SDPBackend
        return torch
    except Exception as error:
        print(f"torch not usable ({short_error(error, 200)}): SDPA columns read n/a")
        return None


def to_torch(torch, x):
    try:
        return torch.from_dlpack(x)
    except Exception:
        return torch.from_dlpack(x.view(numpy.uint16)).view(torch.bfloat16)


def sdpa_ms(torch, q, k, v, causal, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv = (to_torch(torch, x) for x in (q, k, v))
    with sdpa_kernel(getattr(SDPBackend, backend)), torch.no_grad():
        return median_ms(lambda: sdpa(tq, tk, tv, is_causal=causal))


def fmt(x, width=6):
    return f"{x:{width}.1f}" if x is not None and math.isfinite(x) else " " * (width - 3) + "n/a"


def time_problem(torch, dtype, n, d, causal, *, tiles=None, baselines=True):
    b, h = 16384 // n, 2048 // d
    rng = cupy.random.default_rng([n, d])
    q, k, v = (randn(rng, (b, h, n, d), dtype) for _ in range(3))
    flop = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    tf = lambda ms: flop / ms / 1e9  # noqa: E731
    scale = 1.0 / math.sqrt(d)
    out_sm90, out_mma = cupy.empty_like(q), cupy.empty_like(q)
    lse = cupy.empty((b, h, n), cupy.float32)
    result = {"sm90": tf(median_ms(lambda: sm90_forward.forward(
        q, k, v, out_sm90, lse, scale=scale, causal=causal, tiles=tiles)))}
    if baselines:
        result["mma"] = tf(median_ms(lambda: mma_forward.forward(
            q, k, v, out_mma, lse, scale=scale, causal=causal)))
        diff = cupy.abs(out_sm90.astype(cupy.float32) - out_mma.astype(cupy.float32)).max()
        result["maxdiff"] = float(diff.get())
        for name, backend in (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION")):
            result[name] = None
            if torch is not None:
                try:
                    result[name] = tf(sdpa_ms(torch, q, k, v, causal, backend))
                except Exception as error:
                    print(f"    sdpa {name}: {short_error(error, 160)}")
    return result


def run_timing(torch, dtypes):
    print("TFLOP/s (median of 10 after 2 warm-up runs); maxdiff = max|sm90 - mma| on the output")
    for dtype_name in dtypes:
        for causal in (False, True):
            for d in (64, 128):
                for n in (1024, 2048, 4096, 8192, 16384):
                    name = f"{SHORT[dtype_name]} D={d:<3d} N={n:<5d} causal={int(causal)}"
                    try:
                        r = time_problem(torch, DTYPES[dtype_name], n, d, causal)
                        cupy.get_default_memory_pool().free_all_blocks()
                    except Exception as error:
                        print(f"{name}  FAIL {short_error(error, 300)}", flush=True)
                        if not context_alive():
                            raise BrokenContext(f"CUDA context broken while timing {name}") from error
                        continue
                    ratio = lambda x: f"{r['sm90'] / x:5.2f}" if x else "  n/a"  # noqa: E731
                    print(f"{name}  sm90 {fmt(r['sm90'])}  mma {fmt(r['mma'])}  flash {fmt(r['flash'])}"
                          f"  cudnn {fmt(r['cudnn'])}  | sm90/flash {ratio(r['flash'])}"
                          f"  sm90/mma {ratio(r['mma'])}  sm90/cudnn {ratio(r['cudnn'])}"
                          f"  maxdiff {r['maxdiff']:.2e}", flush=True)


def tile_name(t: Sm90Tiles) -> str:
    return f"{t.warpgroups}wg x{t.block_n} s{t.stages}"


def sweep_tiles(d):
    if d == 64:
        return [Sm90Tiles(2, 128, 3), Sm90Tiles(3, 64, 2), Sm90Tiles(3, 64, 3), Sm90Tiles(2, 64, 3)]
    return [Sm90Tiles(2, 128, 3), Sm90Tiles(3, 64, 2), Sm90Tiles(2, 64, 3)]


def run_sweep(dtype_name):
    print(f"tile sweep, {SHORT[dtype_name]}, TFLOP/s (default = {tile_name(sm90_forward.default_tiles(128))})")
    for d in (64, 128):
        for n, causal in ((2048, False), (8192, False), (8192, True), (16384, True)):
            cells = []
            for tiles in [sm90_forward.default_tiles(d)] + sweep_tiles(d):
                try:
                    r = time_problem(None, DTYPES[dtype_name], n, d, causal, tiles=tiles, baselines=False)
                    cupy.get_default_memory_pool().free_all_blocks()
                    cells.append(f"{tile_name(tiles)}: {r['sm90']:.1f}")
                except Exception as error:
                    cells.append(f"{tile_name(tiles)}: FAIL {short_error(error, 120)}")
                    if not context_alive():
                        raise BrokenContext("CUDA context broken during the sweep") from error
            print(f"D={d:<3d} N={n:<5d} causal={int(causal)}  " + " | ".join(cells), flush=True)


# ----------------------------------------------------------------------------- compile report

def run_compile_report(sweep):
    expressions = [e for _, e in sm90_forward.main_variants()]
    if sweep:
        for d in (64, 128):
            for tiles in sweep_tiles(d):
                for causal in (False, True):
                    expressions.append(sm90_forward.variant("bfloat16", d, tiles, causal=causal, sparse=False))
    bad = 0
    for expression in expressions:
        start = time.perf_counter()
        try:
            kernel = _build.get_function(sm90_forward.SOURCE, expression, options=sm90_forward.OPTIONS)
            regs, local = kernel.num_regs, kernel.local_size_bytes
            flag = "" if local == 0 else "  <-- local memory (spills)"
            print(f"  {expression:60s} regs {regs:3d}  local {local:4d} B  "
                  f"[{time.perf_counter() - start:.1f}s]{flag}", flush=True)
        except Exception as error:
            bad += 1
            print(f"  {expression:60s} FAIL {short_error(error, 2000)}", flush=True)
    return bad


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-timing", action="store_true", help="skip the timing grid")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile sweep")
    parser.add_argument("--no-torch", action="store_true", help="no torch SDPA columns")
    parser.add_argument("--dtypes", default="bfloat16", help="timing dtypes (bfloat16,float16)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    timing_dtypes = [x for x in args.dtypes.split(",") if x]

    t0 = time.perf_counter()
    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"device: {name}, sm_{device.compute_capability}, CuPy {cupy.__version__}, "
          f"NVRTC {'.'.join(map(str, cupy.cuda.nvrtc.getVersion()))}, seed {seed}")
    if device.compute_capability != "90":
        print("this kernel needs compute capability 9.0 (H100/H200); nothing to check here")
        return 1

    status = 0
    try:
        print("\n== compile (sm_90a)")
        if run_compile_report(not args.no_sweep):
            status = 1

        print("\n== probes (structured inputs; diagnose which half of the kernel is wrong)")
        status |= run_probes(seed) > 0

        print("\n== correctness (DESIGN.md rule against the float64 oracle)")
        cases = correctness_cases(["bfloat16", "float16"])
        if not args.no_sweep:
            cases += other_tile_cases()
        passed, failed = run_correctness(cases, seed)
        print(f"correctness: {passed} passed, {failed} failed  [{time.perf_counter() - t0:.0f}s so far]")
        status |= failed > 0

        if not args.no_timing:
            print("\n== timing: B = 16384 / N, H = 2048 / D")
            run_timing(torch_module(not args.no_torch), timing_dtypes)
            print(f"[{time.perf_counter() - t0:.0f}s so far]")
        if not args.no_sweep and not args.no_timing:
            print()
            run_sweep(timing_dtypes[0] if timing_dtypes else "bfloat16")
    except BrokenContext as error:
        print(f"\nSTOPPED: {error}; the remaining GPU work would only repeat it")
        status = 1
    print(f"\ntotal {time.perf_counter() - t0:.0f}s, exit status {int(status)}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
