"""The warp-specialised Hopper forward (cuflash/kernels/csrc/flash_fwd_sm90_tma.cu) on one sm_90
GPU: is it right, and how fast is it next to the previous Hopper kernel, the mma.sync kernel and
torch SDPA (FlashAttention-2 and cuDNN back ends), in one process.

    PYTHONPATH=$PWD python3 benchmarks/check_sm90_tma.py [--no-timing] [--no-torch] [--quick]

1. compile: every main variant (registers, local memory);
2. correctness: the cases of check_sm90.py (dense, Nq ≠ Nk, GQA, strided views, scales,
   block-sparse, 16K sampled rows) plus other head dims, each against the float64 oracle with the
   correctness rule, outputs and lse poisoned with NaN;
3. timing (bf16): 16K tokens per call, hidden 2048 (B = 16384 / N, H = 2048 / D); N from 1K to
   16K at D = 64, 128 and 256, N = 4K and 16K at D = 96 and D = 192 / Dv = 128; causal and not.
   TFLOP/s with the papers' FLOP count (4·N²·D per head, halved for causal, D → (D + Dv) / 2),
   medians of CUDA-event timings of 20 back-to-back calls each (cuflash through its prepared
   launch, as the cached call path runs it), and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy  # noqa: E402
from _harness import (  # noqa: E402
    DTYPES, compile_report, fmt, median_ms, randn, ratio, run_correctness, sdpa_tflops,
    short_error, spec_for, stop_if_broken, sweep_grid, torch_module, free_pool, BrokenContext,
)
from check_sm90 import check_case, correctness_cases  # noqa: E402

from cuflash.bench import forward_flops  # noqa: E402
from cuflash.kernels import mma_forward, sm90_forward, sm90_tma_forward  # noqa: E402
from cuflash.kernels._variants import spec_of  # noqa: E402
from cuflash.kernels.sm90_tma_forward import TmaTiles  # noqa: E402

TOKENS, HIDDEN = 16384, 2048
TIMING = {"reps": 7, "batch": 20}  # back-to-back calls per sample: GPU time, not host time


def _timed(module, spec, arrays, lse):
    """The GPU time of one forward of a family, launched through its prepared launch (as the
    cached call path does) where it has one."""
    q, k, v, out = arrays
    prepare = getattr(module, "prepare_forward", None)
    launch = prepare(spec, arrays) if prepare else (lambda *args: module.forward(*args))
    return median_ms(lambda: launch(q, k, v, out, lse, spec), **TIMING)


def cases(quick: bool):
    base = [(name, dict(kw, kernel=sm90_tma_forward)) for name, kw in correctness_cases(["bfloat16", "float16"])]
    if quick:
        base = base[::4]
    extra = []
    for d, dv in ((96, 96), (192, 128), (256, 256), (128, 64), (64, 128), (160, 160)):
        for causal in (False, True):
            for n in (1, 130, 1000):
                extra.append((f"bf16 D={d} Dv={dv} N={n} causal={int(causal)}",
                              dict(dtype="bfloat16", d=d, dv=dv, nq=n, b=2, hq=2, causal=causal,
                                   kernel=sm90_tma_forward)))
        extra.append((f"fp16 D={d} Dv={dv} Nq=300 Nk=777 GQA 4/2",
                      dict(dtype="float16", d=d, dv=dv, nq=300, nk=777, b=1, hq=4, hkv=2,
                           kernel=sm90_tma_forward)))
    return extra + base


def grid():
    for d, dv, seq_lens in ((64, 64, (1024, 2048, 4096, 8192, 16384)),
                            (128, 128, (1024, 2048, 4096, 8192, 16384)),
                            (256, 256, (1024, 2048, 4096, 8192, 16384)),
                            (96, 96, (4096, 16384)), (192, 128, (4096, 16384))):
        for causal in (False, True):
            for n in seq_lens:
                yield d, dv, n, causal


def sweep_tiles(d):
    """Tile shapes timed side by side: consumers (2 or 3), ping-pong, key-tile width,
    persistence."""
    if d <= 64:
        return [TmaTiles(128, 2, 3, True), TmaTiles(128, 2, 3, True, True)]
    if d <= 128:
        return [TmaTiles(128, 2), TmaTiles(176, 2), TmaTiles(176, 2, persistent=True),
                TmaTiles(128, 2, persistent=True)]
    return [TmaTiles(64, 2), TmaTiles(80, 2), TmaTiles(80, 2, persistent=True), TmaTiles(64, 2, persistent=True)]


def tile_name(t: TmaTiles) -> str:
    return f"{t.consumers}c x{t.block_n} s{t.stages}{' pp' if t.pingpong else ''}{' P' if t.persistent else ''}"


def sweep_cases():
    """Each swept tile shape checked before it is timed."""
    return [(f"bf16 D={d} tiles {tile_name(t)} N={n} causal={int(causal)}",
             dict(dtype="bfloat16", d=d, nq=n, b=2, hq=2, hkv=1, causal=causal, tiles=t,
                  kernel=sm90_tma_forward))
            for d in (64, 96, 128, 256) for t in sweep_tiles(d) for n, causal in ((1000, False), (777, True))] + [
        (f"bf16 D={d} tiles {tile_name(t)} Nq=1000 Nk=200 causal=1 (800 rows see no key)",
         dict(dtype="bfloat16", d=d, nq=1000, nk=200, b=3, hq=2, causal=True, tiles=t, kernel=sm90_tma_forward))
        for d in (64, 128) for t in sweep_tiles(d)]


def time_tiles(dtype, n, d, causal, tiles):
    b, h = TOKENS // n, HIDDEN // d
    rng = cupy.random.default_rng([n, d])
    q, k, v = (randn(rng, (b, h, n, d), dtype) for _ in range(3))
    flop = forward_flops(b, h, n, n, d, causal=causal)
    spec = spec_for(q, k, v, causal=causal)
    out, lse = cupy.empty_like(q), cupy.empty((b, h, n), cupy.float32)
    launch = sm90_tma_forward.prepare_forward(spec, (q, k, v, out), tiles=tiles)
    return flop / median_ms(lambda: launch(q, k, v, out, lse, spec), **TIMING) / 1e9


def run_sweep():
    print("\n== tile sweep, bf16, TFLOP/s")

    def timed(torch, dtype, n, d, causal, *, tiles, baselines):
        return {"tma": time_tiles(dtype, n, d, causal, tiles)}

    problems = ((1024, False), (1024, True), (2048, False), (4096, True), (8192, False), (16384, True))
    sweep_grid("bfloat16", problems, sweep_tiles, tile_name, timed, "tma", head_dims=(64, 96, 128, 256))


def time_problem(torch, dtype, n, d, dv, causal):
    b, h = TOKENS // n, HIDDEN // d
    rng = cupy.random.default_rng([n, d, dv])
    q, k = (randn(rng, (b, h, n, d), dtype) for _ in range(2))
    v = randn(rng, (b, h, n, dv), dtype)
    flop = forward_flops(b, h, n, n, (d + dv) / 2, causal=causal)
    tf = lambda ms: flop / ms / 1e9  # noqa: E731
    spec = spec_for(q, k, v, causal=causal)
    out = cupy.empty((b, h, n, dv), dtype)
    lse = cupy.empty((b, h, n), cupy.float32)
    result = {"tma": tf(_timed(sm90_tma_forward, spec, (q, k, v, out), lse))}
    for name, module in (("wgmma", sm90_forward), ("mma", mma_forward)):
        other = cupy.empty_like(out)
        if module.supports(spec, (q, k, v, other)) is None:
            result[name] = tf(_timed(module, spec, (q, k, v, other), lse))
            result[f"diff_{name}"] = float(cupy.abs(out.astype(cupy.float32) - other.astype(cupy.float32)).max().get())
        else:
            result[name] = None
    result.update(sdpa_tflops(torch, flop, q, k, v, causal, **TIMING) if d == dv
                  else {"flash": None, "cudnn": None})
    return result


def row(r):
    diff = r.get("diff_mma", r.get("diff_wgmma"))
    return (f"tma {fmt(r['tma'])}  wgmma {fmt(r['wgmma'])}  mma {fmt(r['mma'])}  flash {fmt(r['flash'])}"
            f"  cudnn {fmt(r['cudnn'])} | tma/cudnn {ratio(r['tma'], r['cudnn'])}"
            f"  tma/flash {ratio(r['tma'], r['flash'])}  tma/wgmma {ratio(r['tma'], r['wgmma'])}"
            f"  maxdiff {diff if diff is not None else float('nan'):.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-correctness", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--quick", action="store_true", help="every fourth check_sm90 case only")
    parser.add_argument("--sweep", action="store_true", help="check and time other tile shapes")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    t0 = time.perf_counter()
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, CuPy {cupy.__version__}, seed {seed}")
    status = 0
    try:
        print("\n== compile (sm_90a)")
        expressions = [e for _, e in sm90_tma_forward.main_variants()]
        if args.sweep:
            expressions += [sm90_tma_forward.variant(spec_of("bfloat16", d), t)
                            for d in (64, 96, 128, 256) for t in sweep_tiles(d)]
        status |= compile_report(sm90_tma_forward, expressions) > 0
        if not args.no_correctness:
            print("\n== correctness (the rule of cuflash.check.rule against the float64 oracle)")
            passed, failed = run_correctness(cases(args.quick) + (sweep_cases() if args.sweep else []),
                                             seed, check_case)
            print(f"correctness: {passed} passed, {failed} failed  [{time.perf_counter() - t0:.0f}s so far]")
            status |= failed > 0
        if not args.no_timing:
            torch = torch_module(not args.no_torch)
            print(f"\n== timing, bf16, B = {TOKENS} / N, H = {HIDDEN} / D; TFLOP/s")
            for d, dv, n, causal in grid():
                name = f"D={d:<3d} Dv={dv:<3d} N={n:<5d} causal={int(causal)}"
                try:
                    print(f"{name}  {row(time_problem(torch, DTYPES['bfloat16'], n, d, dv, causal))}", flush=True)
                except Exception as error:
                    print(f"{name}  FAIL {short_error(error, 300)}", flush=True)
                    stop_if_broken(error, f"while timing {name}")
                finally:
                    free_pool()
        if args.sweep:
            run_sweep()
    except BrokenContext as error:
        print(f"\nSTOPPED: {error}")
        status = 1
    print(f"\ntotal {time.perf_counter() - t0:.0f}s, exit status {int(status)}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
