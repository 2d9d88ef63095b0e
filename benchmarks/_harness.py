"""What the developer scripts of benchmarks/ share: the command line and stages of the sm_90
checks, their per-case loop (one "ok"/"FAIL" line a case, stopped only by a broken CUDA
context), the compile report, the timing grid and tile sweep loops, and torch SDPA timings.

Timing and the torch hand-over are those of ``cuflash.bench`` (CUDA events on the current
stream, median reported; DLPack with a uint16 detour for bfloat16). Importing this module puts
the repository root and ``tests/`` (for ``oracle``) on ``sys.path``.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import cupy  # noqa: E402

import cuflash  # noqa: E402
from cuflash import _api  # noqa: E402
from cuflash.bench import DTYPES as _DTYPES  # noqa: E402
from cuflash.bench.problems import DENSE_HEAD_DIMS, DENSE_SEQ_LENS  # noqa: E402
from cuflash.bench import GpuDevice, device_properties  # noqa: E402
from cuflash.bench.baselines import to_torch  # noqa: E402

DTYPES = {name: _DTYPES[name] for name in ("bfloat16", "float16")}
SHORT = {"bfloat16": "bf16", "float16": "fp16"}
# torch SDPA back ends timed side by side: (column name, SDPBackend member).
SDPA_BACKENDS = (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"))


# ----------------------------------------------------------------------------- errors

class BrokenContext(Exception):
    """The CUDA context is unusable (illegal address, launch failure): stop all GPU work."""


def context_alive() -> bool:
    try:
        cupy.cuda.Device().synchronize()
        return float(cupy.asnumpy(cupy.ones(4, dtype=cupy.float32).sum())) == 4.0
    except Exception:
        return False


def stop_if_broken(error: BaseException, what: str) -> None:
    """After a failure: raise BrokenContext ("CUDA context broken <what>") when the context is
    gone, so that the remaining GPU work is not run only to repeat the error."""
    if not context_alive():
        raise BrokenContext(f"CUDA context broken {what}") from error


def short_error(error: BaseException, limit: int = 600) -> str:
    text = f"{type(error).__name__}: {error}".strip().replace("\n", " | ")
    return text if len(text) <= limit else text[:limit] + " ..."


def free_pool() -> None:
    cupy.get_default_memory_pool().free_all_blocks()


# ----------------------------------------------------------------------------- inputs

def randn(rng, shape, dtype):
    return rng.standard_normal(shape, dtype=cupy.float32).astype(dtype)


def spec_for(q, k, v, **options):
    """The AttentionSpec ``cuflash.attention`` / ``attention_backward`` would build for these
    arguments (the launchers' entry points take it); options left out take the API's defaults."""
    return _api._spec(q, k, v, **options)[1]


def make_inputs(rng, *, dtype, b, hq, hkv, nq, nk, d, layout, dout=False):
    """q, k, v (and dout when asked for) in (B, H, N, D) form; layout "bnhd" gives strided views
    of (B, N, H, D) buffers (as x.transpose(0, 2, 1, 3)), "qkv" views of one interleaved
    (B, N, 3, H, D) buffer (dout then a (B, N, H, D) view)."""
    sizes = [(nq, hq), (nk, hkv), (nk, hkv)] + ([(nq, hq)] if dout else [])
    if layout == "bhnd":
        return tuple(randn(rng, (b, h, n, d), dtype) for n, h in sizes)
    if layout == "bnhd":
        return tuple(randn(rng, (b, n, h, d), dtype).transpose(0, 2, 1, 3) for n, h in sizes)
    if layout == "qkv":
        assert nq == nk and hq == hkv
        qkv = randn(rng, (b, nq, 3, hq, d), dtype)
        views = tuple(qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        if dout:
            views += (randn(rng, (b, nq, hq, d), dtype).transpose(0, 2, 1, 3),)
        return views
    raise ValueError(layout)


# ----------------------------------------------------------------------------- correctness

def dense_cases(add, dtypes, *, zero_rows=False):
    """The dense cases both checks begin with, simplest first: square ones ((B, H) = (2, 4), or
    (1, 2) from N = 1000 on), then Nq ≠ Nk. ``add(name, **kwargs)`` collects them; with
    ``zero_rows``, a causal case with Nq > Nk also names the first Nq − Nk query rows, which see
    no key."""
    add("bf16 D=128 N=128 dense (B=2,H=4)", dtype="bfloat16", d=128, nq=128, b=2, hq=4)
    add("bf16 D=64  N=128 dense (B=2,H=4)", dtype="bfloat16", d=64, nq=128, b=2, hq=4)
    for dtype in dtypes:
        for d in DENSE_HEAD_DIMS:
            for causal in (False, True):
                for n in (1, 17, 127, 128, 1000, 4097):
                    b, h = (1, 2) if n >= 1000 else (2, 4)
                    add(f"{SHORT[dtype]} D={d:<3d} N={n:<5d} causal={int(causal)} (B={b},H={h})",
                        dtype=dtype, d=d, nq=n, b=b, hq=h, causal=causal)
    for nq, nk in ((1, 300), (300, 1), (100, 333), (333, 100), (64, 4096), (4096, 64), (1000, 1500)):
        for causal in (False, True):
            for d in DENSE_HEAD_DIMS:
                kw = {"zero_rows": (0, nq - nk)} if zero_rows and causal and nq > nk else {}
                add(f"bf16 D={d:<3d} Nq={nq} Nk={nk} causal={int(causal)}", dtype="bfloat16", d=d,
                    nq=nq, nk=nk, b=2, hq=2, causal=causal, **kw)


def scale_cases(add):
    """Scales other than 1/sqrt(D)."""
    add("bf16 D=64  scale=0.37 N=256", dtype="bfloat16", d=64, nq=256, b=2, hq=4, scale=0.37)
    add("bf16 D=128 scale=0.05 N=300 causal=1", dtype="bfloat16", d=128, nq=300, b=2, hq=4,
        scale=0.05, causal=True)


def run_correctness(cases, seed, check_case):
    """``check_case(rng, seed=seed, **kwargs)`` for each (name, kwargs) case, one line each; an
    exception's ``detail`` (an error map) is printed for the first four failures."""
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
            stop_if_broken(error, f"after case {name!r}")
        else:
            passed += 1
            print(f"ok    {name}  [{time.perf_counter() - start:.2f}s]", flush=True)
        finally:
            free_pool()
    return passed, failed


def compile_report(module, expressions):
    """Compile each kernel of ``module`` (its SOURCE, and its OPTIONS where it has any) and print
    registers and local memory; returns the number that failed to compile."""
    from cuflash.kernels import _build

    bad = 0
    for expression in expressions:
        start = time.perf_counter()
        try:
            kernel = _build.get_function(module.SOURCE, expression, options=getattr(module, "OPTIONS", ()))
            regs, local = kernel.num_regs, kernel.local_size_bytes
            flag = "" if local == 0 else "  <-- local memory (spills)"
            print(f"  {expression:60s} regs {regs:3d}  local {local:4d} B  "
                  f"[{time.perf_counter() - start:.1f}s]{flag}", flush=True)
        except Exception as error:
            bad += 1
            print(f"  {expression:60s} FAIL {short_error(error, 2000)}", flush=True)
    return bad


# ----------------------------------------------------------------------------- timing

@functools.cache
def _gpu():
    return GpuDevice()


def median_ms(fn, *, warmup=2, reps=10, batch=1):
    """Median GPU time of ``reps`` calls of ``fn`` after ``warmup`` calls, in milliseconds. With
    ``batch`` > 1 each sample times that many back-to-back calls (one pair of events around them,
    divided by ``batch``): the host prepares the next call while the GPU runs the last, so a call
    shorter than its own host work is not timed as its host work."""
    if batch == 1:
        return statistics.median(_gpu().times(fn, warmup=warmup, repeats=reps)) * 1e3

    def calls():
        for _ in range(batch):
            fn()

    return statistics.median(_gpu().times(calls, warmup=1, repeats=reps)) * 1e3 / batch


def cuflash_step(q, k, v, dout, mode, **options):
    """One timed step: the forward (mode "fwd") or the forward and its backward ("fwd+bwd")."""
    def run():
        out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
        if mode == "fwd+bwd":
            cuflash.attention_backward(dout, q, k, v, out, lse, **options)
    return run


def torch_events_ms(torch, fn, reps=10, rounds=3):
    """Median over `rounds` of the torch-event time of `reps` back-to-back calls of `fn`, per
    call, in milliseconds (torch's current stream, after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / reps)
    return statistics.median(times)


def torch_module(use_torch):
    """torch with ``torch.nn.attention`` (SDPBackend, sdpa_kernel: torch >= 2.3), or None (with
    a line saying why) when it is not usable or not asked for."""
    if not use_torch:
        return None
    try:
        import torch
        import torch.nn.attention
        torch.nn.attention.sdpa_kernel, torch.nn.attention.SDPBackend
        return torch
    except Exception as error:
        print(f"torch not usable ({short_error(error, 200)}): SDPA columns read n/a")
        return None


def sdpa_ms(q, k, v, causal, backend, *, dout=None, **timing):
    """Median ms of torch SDPA on one back end (an SDPBackend member name) on the CuPy arrays
    q, k, v: the forward alone, or forward + backward (gradients of q, k, v for ``dout``)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    with sdpa_kernel(getattr(SDPBackend, backend)):
        if dout is None:
            tq, tk, tv = (to_torch(torch, x) for x in (q, k, v))
            with torch.no_grad():
                return median_ms(lambda: sdpa(tq, tk, tv, is_causal=causal), **timing)
        tq, tk, tv = (to_torch(torch, x).detach().requires_grad_(True) for x in (q, k, v))
        tdo = to_torch(torch, dout)

        def step():
            out = sdpa(tq, tk, tv, is_causal=causal)
            torch.autograd.grad(out, (tq, tk, tv), tdo)

        return median_ms(step, **timing)


def sdpa_tflops(torch, flop, q, k, v, causal, *, dout=None, **timing):
    """{"flash": TFLOP/s, "cudnn": TFLOP/s} of torch SDPA for ``flop`` FLOPs; all None when
    ``torch`` is None (not usable or not asked for); a back end that fails prints a line and
    reads None."""
    result = {}
    for name, backend in SDPA_BACKENDS:
        result[name] = None
        if torch is None:
            continue
        try:
            result[name] = flop / sdpa_ms(q, k, v, causal, backend, dout=dout, **timing) / 1e9
        except Exception as error:
            print(f"    sdpa {name}: {short_error(error, 160)}")
    return result


def fmt(x, width=6):
    return f"{x:{width}.1f}" if x is not None and math.isfinite(x) else " " * (width - 3) + "n/a"


def ratio(x, y):
    """x / y as a table cell; "n/a" where y is missing (or 0)."""
    return f"{x / y:5.2f}" if y else "  n/a"


def timing_grid(torch, dtypes, time_problem, row):
    """The dense grid: ``time_problem(torch, dtype, n, d, causal)`` gives a result, ``row(result)``
    its line (after the problem's name); a failure prints a FAIL line and the grid goes on."""
    for dtype_name in dtypes:
        for causal in (False, True):
            for d in DENSE_HEAD_DIMS:
                for n in DENSE_SEQ_LENS:
                    name = f"{SHORT[dtype_name]} D={d:<3d} N={n:<5d} causal={int(causal)}"
                    try:
                        result = time_problem(torch, DTYPES[dtype_name], n, d, causal)
                    except Exception as error:
                        print(f"{name}  FAIL {short_error(error, 300)}", flush=True)
                        stop_if_broken(error, f"while timing {name}")
                        continue
                    finally:
                        free_pool()
                    print(f"{name}  {row(result)}", flush=True)


def sweep_shapes(tiles_for):
    """(d, tiles, causal) for each tile shape ``tiles_for(d)`` of a sweep, D = 64 and 128,
    causal and not."""
    for d in DENSE_HEAD_DIMS:
        for tiles in tiles_for(d):
            for causal in (False, True):
                yield d, tiles, causal


def sweep_grid(dtype_name, problems, tiles_for, tile_name, time_problem, key, head_dims=DENSE_HEAD_DIMS):
    """One line per (D, N, causal) of ``problems``: for each of ``tiles_for(d)``, the TFLOP/s
    ``time_problem(None, dtype, n, d, causal, tiles=tiles, baselines=False)[key]``."""
    dtype = DTYPES[dtype_name]
    for d in head_dims:
        for n, causal in problems:
            cells = []
            for tiles in tiles_for(d):
                try:
                    tflops = time_problem(None, dtype, n, d, causal, tiles=tiles, baselines=False)[key]
                    cells.append(f"{tile_name(tiles)}: {tflops:.1f}")
                except Exception as error:
                    cells.append(f"{tile_name(tiles)}: FAIL {short_error(error, 120)}")
                    stop_if_broken(error, "during the sweep")
                finally:
                    free_pool()
            print(f"D={d:<3d} N={n:<5d} causal={int(causal)}  " + " | ".join(cells), flush=True)


# ----------------------------------------------------------------------------- the sm_90 checks

def check_main(doc, *, needs, compile_stage, cases, tile_cases, check_case, run_timing,
               run_sweep, probes=None):
    """Command line, stages and exit status of an sm_90 check script (its docstring ``doc``).

    The stages: ``compile_stage(sweep)`` (the number that failed); ``probes(seed)`` (the number
    that failed; it prints its own heading) where given, else the elapsed time; the correctness
    ``cases()``, and ``tile_cases()`` unless --no-sweep, through ``check_case``; then
    ``run_timing(torch, dtypes)`` and ``run_sweep(dtype_name)`` as the command line asks. A
    BrokenContext stops them. ``needs`` begins the line printed on a GPU other than sm_90.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
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
    name = device_properties(device.id)["name"]
    print(f"device: {name}, sm_{device.compute_capability}, CuPy {cupy.__version__}, "
          f"NVRTC {'.'.join(map(str, cupy.cuda.nvrtc.getVersion()))}, seed {seed}")
    if device.compute_capability != "90":
        print(f"{needs} compute capability 9.0 (H100/H200); nothing to check here")
        return 1

    status = 0
    try:
        print("\n== compile (sm_90a)")
        if compile_stage(not args.no_sweep):
            status = 1
        if probes is None:
            print(f"[{time.perf_counter() - t0:.0f}s so far]")
        else:
            status |= probes(seed) > 0

        print("\n== correctness (the rule of cuflash.check.rule against the float64 oracle)")
        all_cases = cases() + ([] if args.no_sweep else tile_cases())
        passed, failed = run_correctness(all_cases, seed, check_case)
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
