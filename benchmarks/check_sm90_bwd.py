"""The Hopper backward kernels (cuflash/kernels/flash_bwd_sm90.cu) on one sm_90 GPU: are they
right, and how fast is forward + backward next to the mma.sync backward and torch SDPA (flash and
cuDNN back ends).

    PYTHONPATH=$PWD python3 benchmarks/check_sm90_bwd.py [--no-timing] [--no-sweep] [--no-torch]
                                                        [--dtypes bfloat16,float16] [--seed N]

1. compile: every main variant (and the sweep's tile shapes), registers and local memory;
2. correctness: ``sm90_backward.backward`` called directly, gradients poisoned with NaN first,
   against the float64 oracle with the DESIGN.md rule (tests/oracle.py); the forward results it
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

from cuflash.kernels import _build, mma_backward, sm90_backward, sm90_forward  # noqa: E402
from cuflash.kernels.sm90_backward import Sm90BwdTiles  # noqa: E402

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


def randn(rng, shape, dtype):
    return rng.standard_normal(shape, dtype=cupy.float32).astype(dtype)


def make_inputs(rng, *, dtype, b, hq, hkv, nq, nk, d, layout):
    """q, k, v, dout in (B, H, N, D) form; "bnhd" gives strided views of (B, N, H, D) buffers,
    "qkv" views of one interleaved (B, N, 3, H, D) buffer (dout then a (B, N, H, D) view)."""
    if layout == "bhnd":
        return (randn(rng, (b, hq, nq, d), dtype), randn(rng, (b, hkv, nk, d), dtype),
                randn(rng, (b, hkv, nk, d), dtype), randn(rng, (b, hq, nq, d), dtype))
    if layout == "bnhd":
        return tuple(randn(rng, (b, n, h, d), dtype).transpose(0, 2, 1, 3)
                     for n, h in ((nq, hq), (nk, hkv), (nk, hkv), (nq, hq)))
    if layout == "qkv":
        assert nq == nk and hq == hkv
        qkv = randn(rng, (b, nq, 3, hq, d), dtype)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        return q, k, v, randn(rng, (b, nq, hq, d), dtype).transpose(0, 2, 1, 3)
    raise ValueError(layout)


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
    if not sm90_backward.supports(q, k, v, dout, block_mask, out=out, grads=(dq, dk, dv), tiles=tiles):
        raise AssertionError("supports() returned False for a case it should take")
    sm90_backward.backward(dout, q, k, v, out, lse, dq, dk, dv, scale=scale, causal=causal,
                           block_mask=block_mask, tiles=tiles)
    cupy.cuda.Device().synchronize()
    return dq, dk, dv


def check_case(rng, *, dtype, d, nq, nk=None, b=1, hq=2, hkv=None, causal=False, scale=None,
               layout="bhnd", block_mask=None, tiles=None, zero_keys=None, zero_rows=None,
               twice=False, seed=0):
    from oracle import assert_backward_close

    nk = nq if nk is None else nk
    hkv = hq if hkv is None else hkv
    q, k, v, dout = make_inputs(rng, dtype=dtype, b=b, hq=hq, hkv=hkv, nq=nq, nk=nk, d=d, layout=layout)
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
                kw = {}
                if causal and nq > nk:
                    kw["zero_rows"] = (0, nq - nk)
                add(f"bf16 D={d:<3d} Nq={nq} Nk={nk} causal={int(causal)}", dtype="bfloat16", d=d,
                    nq=nq, nk=nk, b=2, hq=2, causal=causal, **kw)
    for hq, hkv in ((8, 2), (8, 1)):
        for d in (64, 128):
            add(f"fp16 D={d:<3d} GQA Hq={hq} Hkv={hkv} Nq=190 Nk=260 causal=1", dtype="float16", d=d,
                nq=190, nk=260, hq=hq, hkv=hkv, causal=True)
            add(f"bf16 D={d:<3d} GQA Hq={hq} Hkv={hkv} Nq=700 Nk=1100", dtype="bfloat16", d=d,
                nq=700, nk=1100, hq=hq, hkv=hkv)
    add("bf16 D=64  scale=0.37 N=256", dtype="bfloat16", d=64, nq=256, b=2, hq=4, scale=0.37)
    add("bf16 D=128 scale=0.05 N=300 causal=1", dtype="bfloat16", d=128, nq=300, b=2, hq=4,
        scale=0.05, causal=True)
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
    cases = []
    for d in (64, 128):
        for tiles in sweep_tiles(d):
            for causal in (False, True):
                cases.append((f"bf16 D={d:<3d} tiles {tile_name(tiles)} Hq=4 Hkv=2 Nq=1000 Nk=777 "
                              f"causal={int(causal)}",
                              dict(dtype="bfloat16", d=d, nq=1000, nk=777, hq=4, hkv=2,
                                   causal=causal, tiles=tiles)))
    return cases


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
            if not context_alive():
                raise BrokenContext(f"CUDA context broken after case {name!r}") from error
        else:
            passed += 1
            print(f"ok    {name}  [{time.perf_counter() - start:.2f}s]", flush=True)
        finally:
            cupy.get_default_memory_pool().free_all_blocks()
    return passed, failed


# ----------------------------------------------------------------------------- timing

def median_ms(fn, *, warmup=2, reps=8):
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


def sdpa_fwd_bwd_ms(torch, q, k, v, dout, causal, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv = (to_torch(torch, x).detach().requires_grad_(True) for x in (q, k, v))
    tdo = to_torch(torch, dout)

    def step():
        out = sdpa(tq, tk, tv, is_causal=causal)
        torch.autograd.grad(out, (tq, tk, tv), tdo)

    with sdpa_kernel(getattr(SDPBackend, backend)):
        return median_ms(step)


def fmt(x, width=6):
    return f"{x:{width}.1f}" if x is not None and math.isfinite(x) else " " * (width - 3) + "n/a"


def time_problem(torch, dtype, n, d, causal, *, tiles=None, baselines=True):
    b, h = 16384 // n, 2048 // d
    rng = cupy.random.default_rng([n, d])
    q, k, v, dout = (randn(rng, (b, h, n, d), dtype) for _ in range(4))
    fwd_flop = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    scale = 1.0 / math.sqrt(d)
    out = cupy.empty_like(q)
    lse = cupy.empty((b, h, n), cupy.float32)
    grads = tuple(cupy.empty_like(x) for x in (q, k, v))
    grads_mma = tuple(cupy.empty_like(x) for x in (q, k, v))
    fwd = lambda: sm90_forward.forward(q, k, v, out, lse, scale=scale, causal=causal)  # noqa: E731
    bwd = lambda: sm90_backward.backward(dout, q, k, v, out, lse, *grads, scale=scale,  # noqa: E731
                                         causal=causal, tiles=tiles)
    bwd_mma = lambda: mma_backward.backward(dout, q, k, v, out, lse, *grads_mma, scale=scale,  # noqa: E731
                                            causal=causal)
    r = {}
    fwd()
    r["bwd"] = 2.5 * fwd_flop / median_ms(bwd) / 1e9
    if not baselines:
        return r
    r["fb"] = 3.5 * fwd_flop / median_ms(lambda: (fwd(), bwd())) / 1e9
    r["fb_mma"] = 3.5 * fwd_flop / median_ms(lambda: (fwd(), bwd_mma())) / 1e9
    r["bwd_mma"] = 2.5 * fwd_flop / median_ms(bwd_mma) / 1e9
    fwd()
    bwd()
    bwd_mma()
    rel = 0.0
    for x, y in zip(grads, grads_mma):
        x32, y32 = x.astype(cupy.float32), y.astype(cupy.float32)
        rel = max(rel, float((cupy.abs(x32 - y32).max() / cupy.abs(y32).max()).get()))
    r["reldiff"] = rel
    for name, backend in (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION")):
        r[name] = None
        if torch is not None:
            try:
                r[name] = 3.5 * fwd_flop / sdpa_fwd_bwd_ms(torch, q, k, v, dout, causal, backend) / 1e9
            except Exception as error:
                print(f"    sdpa {name}: {short_error(error, 160)}")
    return r


def run_timing(torch, dtypes):
    print("TFLOP/s, median of 8 after 2 warm-up runs. f+b = forward + backward (sm90 forward in both "
          "cuflash columns); bwd = backward alone; reldiff = max|g_sm90 - g_mma| / max|g_mma| over dq, dk, dv")
    for dtype_name in dtypes:
        for causal in (False, True):
            for d in (64, 128):
                for n in (1024, 2048, 4096, 8192, 16384):
                    name = f"{SHORT[dtype_name]} D={d:<3d} N={n:<5d} causal={int(causal)}"
                    try:
                        r = time_problem(torch, DTYPES[dtype_name], n, d, causal)
                    except Exception as error:
                        print(f"{name}  FAIL {short_error(error, 300)}", flush=True)
                        if not context_alive():
                            raise BrokenContext(f"CUDA context broken while timing {name}") from error
                        continue
                    finally:
                        cupy.get_default_memory_pool().free_all_blocks()
                    ratio = lambda x: f"{r['fb'] / x:5.2f}" if x else "  n/a"  # noqa: E731
                    print(f"{name}  f+b: sm90 {fmt(r['fb'])} mma {fmt(r['fb_mma'])} flash {fmt(r['flash'])}"
                          f" cudnn {fmt(r['cudnn'])} | /flash {ratio(r['flash'])} /mma {ratio(r['fb_mma'])}"
                          f" /cudnn {ratio(r['cudnn'])} | bwd: sm90 {fmt(r['bwd'])} mma {fmt(r['bwd_mma'])}"
                          f" | reldiff {r['reldiff']:.1e}", flush=True)


def run_sweep(dtype_name):
    print(f"tile sweep, {SHORT[dtype_name]}, backward TFLOP/s")
    for d in (64, 128):
        for n, causal in ((2048, False), (8192, False), (8192, True)):
            cells = []
            for tiles in [sm90_backward.default_tiles(d)] + sweep_tiles(d):
                try:
                    r = time_problem(None, DTYPES[dtype_name], n, d, causal, tiles=tiles, baselines=False)
                    cells.append(f"{tile_name(tiles)}: {r['bwd']:.1f}")
                except Exception as error:
                    cells.append(f"{tile_name(tiles)}: FAIL {short_error(error, 120)}")
                    if not context_alive():
                        raise BrokenContext("CUDA context broken during the sweep") from error
                finally:
                    cupy.get_default_memory_pool().free_all_blocks()
            print(f"D={d:<3d} N={n:<5d} causal={int(causal)}  " + " | ".join(cells), flush=True)


# ----------------------------------------------------------------------------- compile report

def run_compile_report(sweep):
    expressions = [e for _, e in sm90_backward.main_variants()]
    if sweep:
        for d in (64, 128):
            for tiles in sweep_tiles(d):
                for causal in (False, True):
                    expressions.append(sm90_backward.variant_dkdv("bfloat16", d, tiles, causal=causal, sparse=False))
                    expressions.append(sm90_backward.variant_dq("bfloat16", d, tiles, causal=causal, sparse=False))
    bad = 0
    for expression in dict.fromkeys(expressions):
        start = time.perf_counter()
        try:
            kernel = _build.get_function(sm90_backward.SOURCE, expression, options=sm90_backward.OPTIONS)
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
        print("these kernels need compute capability 9.0 (H100/H200); nothing to check here")
        return 1

    status = 0
    try:
        print("\n== compile (sm_90a)")
        if run_compile_report(not args.no_sweep):
            status = 1
        print(f"[{time.perf_counter() - t0:.0f}s so far]")

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
