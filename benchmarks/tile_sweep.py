"""Forward and backward tile-shape sweep on the GPU: each candidate tile configuration against
torch SDPA (flash and cuDNN back ends) on the benchmark grid of benchmarks/NOTES.md.

    python benchmarks/tile_sweep.py [--seq-lens 1024,4096,16384] [--head-dims 64,128] [--bwd]

Prints one row per (shape, configuration) in TFLOP/s; used to pick the default tiles.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy  # noqa: E402
import numpy  # noqa: E402
from _harness import DTYPES, SDPA_BACKENDS, median_ms, randn, sdpa_ms, short_error, spec_for  # noqa: E402

import cuflash  # noqa: E402
from cuflash.bench import BACKWARD_FLOP_FACTOR, forward_flops  # noqa: E402
from cuflash.kernels import mma_forward  # noqa: E402

TIMING = dict(warmup=3, reps=20)  # per median


def candidate_tiles(d):
    T = mma_forward.FwdTiles
    if d <= 64:
        return [T(4, 2, 64, True), T(8, 1, 64, True), T(4, 1, 64, True), T(4, 2, 32, True)]
    return [T(8, 1, 64, True), T(4, 2, 64, False), T(4, 1, 64, True), T(8, 1, 32, True), T(4, 2, 32, False)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-lens", default="1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--bwd", action="store_true", help="time forward+backward instead")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    rng = cupy.random.default_rng()
    rows = []
    for n, d, causal in itertools.product(
        map(int, args.seq_lens.split(",")), map(int, args.head_dims.split(",")), (False, True)
    ):
        b, h = 16384 // n, 2048 // d
        q, k, v = (randn(rng, (b, h, n, d), DTYPES["bfloat16"]) for _ in range(3))
        fl = forward_flops(b, h, n, n, d, causal=causal) * (1 + BACKWARD_FLOP_FACTOR if args.bwd else 1)
        tf = lambda ms: fl / ms / 1e9
        ref = {}
        if not args.no_torch:
            dout = randn(rng, q.shape, q.dtype) if args.bwd else None
            for be, backend in SDPA_BACKENDS:
                try:
                    ref[be] = tf(sdpa_ms(q, k, v, causal, backend, dout=dout, **TIMING))
                except Exception as error:  # a back end may not support a shape
                    ref[be] = float("nan")
                    print(f"  {be}: {short_error(error, 160)}")
        if args.bwd:
            def step():
                o, vjp = cuflash.attention_vjp(q, k, v, causal=causal)
                vjp(o)
            rows.append((n, d, causal, "default", tf(median_ms(step, **TIMING)), ref))
        else:
            out = cupy.empty_like(q)
            lse = cupy.empty((b, h, n), numpy.float32)
            spec = spec_for(q, k, v, scale=d ** -0.5, causal=causal)
            for tiles in candidate_tiles(d):
                ms = median_ms(lambda: mma_forward.forward(q, k, v, out, lse, spec, tiles=tiles), **TIMING)
                rows.append((n, d, causal, f"{tiles.warps}w{tiles.mt}x{tiles.block_n}{'q' if tiles.q_in_regs else ''}", tf(ms), ref))
        for row in rows[-(1 if args.bwd else len(candidate_tiles(d))):]:
            n_, d_, c_, name, t, r = row
            fl_ = r.get("flash", float("nan"))
            print(f"N={n_:6d} D={d_:4d} causal={int(c_)} {name:>12s} {t:7.1f} TFLOP/s | "
                  f"sdpa-flash {fl_:7.1f} cudnn {r.get('cudnn', float('nan')):7.1f} | ratio {t / fl_:5.2f}", flush=True)


if __name__ == "__main__":
    main()
