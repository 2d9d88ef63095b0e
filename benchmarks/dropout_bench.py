"""Attention dropout on the GPU: cuflash with dropout_p = 0.1 against cuflash without dropout and
against torch SDPA's flash back end with the same dropout_p, in one process on one GPU (bfloat16,
D = 64 and 128, N = 2K … 16K, B·N = 16K tokens, hidden 2048, not causal).

    python benchmarks/dropout_bench.py [--quick] [--causal] [--p P] [--no-torch]

Targets (forward and forward+backward):
  target 1  forward+backward ≥ 1.0× torch SDPA flash (sdpa_kernel(SDPBackend.FLASH_ATTENTION))
            with the same dropout_p
  target 2  overhead of dropout over cuflash without it ≤ 15%
Times are medians of CUDA-event timings after warm-up; "vs sdpa" > 1 means cuflash is faster.
"p=0" and "p" run the default kernels (on Hopper the TMA forward and the wgmma backward, which
draw the mask too), and the overhead (target 2) compares those two; the "sm80" columns force the
mma.sync kernels (CUFLASH_DISABLE_SM90), the path of Ampere and of what the Hopper kernels do not
take.
"""

from __future__ import annotations

import argparse
import os

import cupy

from _harness import DTYPES, cuflash_step, median_ms, randn, short_error  # benchmarks/_harness.py

HIDDEN = 2048
TOKENS = 16384
SEQ_LENS = (2048, 4096, 8192, 16384)
MAX_OVERHEAD = 0.15


def _sm80_only(run):
    """``run`` with the Hopper families passed over (CUFLASH_DISABLE_SM90), for the p = 0 time
    of the kernels the dropout calls use."""
    from cuflash.kernels import DISABLE_HOPPER_ENV

    def step():
        saved = os.environ.get(DISABLE_HOPPER_ENV)
        os.environ[DISABLE_HOPPER_ENV] = "1"
        try:
            run()
        finally:
            if saved is None:
                del os.environ[DISABLE_HOPPER_ENV]
            else:
                os.environ[DISABLE_HOPPER_ENV] = saved
    return step


def sdpa_dropout_ms(torch, q, k, v, dout, mode, *, causal, p):
    """torch SDPA on its flash back end with ``dropout_p = p`` (training mode: a fresh mask per
    call), forward or forward + backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cuflash.bench.baselines import to_torch

    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv = (to_torch(torch, x).detach().requires_grad_(mode == "fwd+bwd") for x in (q, k, v))
    tdo = to_torch(torch, dout)

    def step():
        out = sdpa(tq, tk, tv, dropout_p=p, is_causal=causal)
        if mode == "fwd+bwd":
            torch.autograd.grad(out, (tq, tk, tv), tdo)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        if mode == "fwd":
            with torch.no_grad():
                return median_ms(step, batch=5)
        return median_ms(step, batch=5)


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 4K and 16K only")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--p", type=float, default=0.1, help="dropout_p (default 0.1)")
    parser.add_argument("--no-torch", action="store_true", help="skip torch SDPA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch = None
    if not args.no_torch:
        try:
            import torch
            import torch.nn.attention

            if not hasattr(torch.nn.attention, "sdpa_kernel"):
                raise ImportError(f"torch {torch.__version__} has no sdpa_kernel (torch >= 2.3)")
            versions = f"torch {torch.__version__}"
        except Exception as error:
            torch, versions = None, f"no torch ({short_error(error, 120)}): SDPA skipped"
    else:
        versions = "torch skipped"
    device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    device = device.decode() if isinstance(device, bytes) else device
    print(f"# dropout_p={args.p:g}, bfloat16, causal={args.causal}, {device}, {versions}\n")
    print("| D | N | B×H | pass | p=0 ms | p ms | overhead | seed array ms | array / int | "
          "sm80 p=0 ms | sm80 p ms | sm80 overhead | sdpa flash p ms | vs sdpa |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
          "---: | ---: |")

    rng = cupy.random.default_rng(args.seed)
    lens = (4096, 16384) if args.quick else SEQ_LENS
    misses = []
    for d in (64, 128):
        heads = HIDDEN // d
        for n in lens:
            b = max(1, TOKENS // n)
            q, k, v, dout = (randn(rng, (b, heads, n, d), DTYPES["bfloat16"]) for _ in range(4))
            drop = dict(dropout_p=args.p, dropout_seed=args.seed + 1, causal=args.causal)
            for mode in ("fwd", "fwd+bwd"):
                plain_step = cuflash_step(q, k, v, dout, mode, causal=args.causal)
                drop_step = cuflash_step(q, k, v, dout, mode, **drop)
                # the same seed read by the kernels from device memory (a CuPy seed array)
                array_step = cuflash_step(q, k, v, dout, mode, **dict(
                    drop, dropout_seed=cupy.array([args.seed + 1, 0], cupy.uint64)))
                plain, ours, array = (median_ms(step, batch=5)
                                      for step in (plain_step, drop_step, array_step))
                sm80_plain, sm80_ours = (median_ms(_sm80_only(step), batch=5)
                                         for step in (plain_step, drop_step))
                theirs = None
                if torch is not None:
                    try:
                        theirs = sdpa_dropout_ms(torch, q, k, v, dout, mode, causal=args.causal,
                                                 p=args.p)
                    except Exception as error:
                        print(f"    sdpa: {short_error(error, 160)}")
                overhead, sm80_overhead = ours / plain - 1, sm80_ours / sm80_plain - 1
                ratio = None if theirs is None else theirs / ours
                print(f"| {d} | {n} | {b}×{heads} | {mode} | {plain:.3f} | {ours:.3f} "
                      f"| {overhead:+.1%} | {array:.3f} | {array / ours:.3f} | {sm80_plain:.3f} "
                      f"| {sm80_ours:.3f} | {sm80_overhead:+.1%} "
                      f"| {_fmt(theirs)} | {_fmt(ratio, '.2f')} |", flush=True)
                if overhead > MAX_OVERHEAD:
                    misses.append(f"D={d} N={n} {mode}: overhead {overhead:+.1%} > {MAX_OVERHEAD:.0%}")
                if mode == "fwd+bwd" and ratio is not None and ratio < 1.0:
                    misses.append(f"D={d} N={n} fwd+bwd: {ratio:.2f}× SDPA flash (< 1.0×)")
            del q, k, v, dout
            cupy.get_default_memory_pool().free_all_blocks()
    print("\ntargets: fwd+bwd ≥ 1.0× SDPA flash with the same dropout_p; overhead over p=0 ≤ "
          f"{MAX_OVERHEAD:.0%}")
    print("all met" if not misses else "missed:\n  " + "\n  ".join(misses))


if __name__ == "__main__":
    main()
