"""Proof that a kernel-layer change altered nothing for existing calls: bit-identical results and
no slowdown, against another copy of cuflash imported under a different name.

    python benchmarks/refactor_check.py --baseline cuflash_base [--bits] [--timing]

``--baseline`` names an importable copy of the package from before the change (for example a
``git archive <commit> cuflash`` unpacked as ``cuflash_base`` on PYTHONPATH).

--bits    out, lse, dq, dk, dv on a fixed-seed grid (dtypes × head dims × causal × GQA × block
          masks × Nq ≠ Nk), compared bit for bit; ``deterministic=True`` for the gradients, and
          with the default (atomic dq) mode dk/dv compared bit for bit and dq reported.
--timing  the dense benchmark grid (bf16, 16K tokens, hidden 2048, N = 1K..16K, D = 64/128,
          causal or not) and the block-sparse grid (N = 16K, 32 heads, D = 64, 128×128 blocks at
          densities 0.5/0.25/0.1), forward and forward+backward, then the portable (mma.sync)
          kernels at N = 4096 for D = 64, 96, 128; the two versions alternate
          call by call and each point is the median of the alternating rounds.
"""

from __future__ import annotations

import argparse
import importlib
import statistics

import cupy
import ml_dtypes
import numpy

import cuflash

DTYPES = {"float16": numpy.float16, "bfloat16": ml_dtypes.bfloat16, "float32": numpy.float32}


def _bits(x):
    x = cupy.ascontiguousarray(x)
    return x.view({2: cupy.uint16, 4: cupy.uint32}[x.dtype.itemsize])


def _same(a, b) -> bool:
    return a.shape == b.shape and bool(cupy.array_equal(_bits(a), _bits(b)))


def _inputs(rng, dtype, b, hq, hkv, nq, nk, d, dv):
    def make(*shape):
        return cupy.asarray(rng.standard_normal(shape, dtype=numpy.float32).astype(dtype))
    return make(b, hq, nq, d), make(b, hkv, nk, d), make(b, hkv, nk, dv), make(b, hq, nq, dv)


def _block_masks(pkg_new, pkg_old, rng, nq, nk, block=128):
    pattern = rng.random((-(-nq // block), -(-nk // block))) < 0.6
    pattern[:, 0] = True
    masks = []
    for pkg in (pkg_new, pkg_old):
        sparse = importlib.import_module(pkg.__name__ + ".sparse")
        masks.append(sparse.BlockMask.from_dense(pattern, block_size=block, shape=(nq, nk)))
    return masks


def _variant_groups():
    """(dtype, D, Dv, causal, block mask, Hopper disabled) groups: each compiles its own kernels."""
    dims = ((32, 32), (64, 64), (96, 96), (128, 128), (256, 256), (64, 128))
    groups = []
    for dtype_name in DTYPES:
        for d, dv in dims:
            for causal in (False, True):
                for sparse in ((False, True) if d in (64, 128) else (False,)):
                    hopper_off = (False, True) if (dtype_name == "bfloat16" and d == dv) else (False,)
                    groups += [(dtype_name, d, dv, causal, sparse, off) for off in hopper_off]
    return groups


def bit_grid(old, worker=0, workers=1) -> tuple[int, int]:
    import os

    same = total = 0
    for index, (dtype_name, d, dv, causal, sparse, hopper_off) in enumerate(_variant_groups()):
        if index % workers != worker:
            continue
        os.environ["CUFLASH_DISABLE_SM90"] = "1" if hopper_off else "0"
        rng = numpy.random.default_rng(index)
        dtype = DTYPES[dtype_name]
        for hq, hkv in ((4, 4), (4, 1)):
            for nq, nk in ((577, 577), (300, 701)):
                q, k, v, dout = _inputs(rng, dtype, 2, hq, hkv, nq, nk, d, dv)
                bm_new = bm_old = None
                if sparse:
                    bm_new, bm_old = _block_masks(cuflash, old, rng, nq, nk)
                results = []
                for pkg, bm in ((cuflash, bm_new), (old, bm_old)):
                    out, lse = pkg.attention(q, k, v, causal=causal, block_mask=bm,
                                             return_lse=True)
                    det = pkg.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                                 block_mask=bm, deterministic=True)
                    fast = pkg.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                                  block_mask=bm, deterministic=False)
                    results.append((out, lse, *det, fast[1], fast[2], fast[0]))
                names = ("out", "lse", "dq", "dk", "dv", "dk(atomic)", "dv(atomic)")
                diffs = [n for n, a, b in zip(names, results[0], results[1]) if not _same(a, b)]
                dq_atomic = float(cupy.abs(results[0][-1].astype(cupy.float32)
                                           - results[1][-1].astype(cupy.float32)).max())
                total += 1
                same += not diffs
                case = (f"{dtype_name:8} D={d:3} Dv={dv:3} causal={causal!s:5} "
                        f"H={hq}/{hkv} sparse={sparse!s:5} N={nq}/{nk} "
                        f"sm90={'off' if hopper_off else 'on '}")
                status = "identical" if not diffs else "DIFFERS: " + ", ".join(diffs)
                print(f"{case}  {status}  (atomic dq max diff {dq_atomic:.3g})", flush=True)
    return same, total


def _bit_worker(args):
    baseline, worker, workers = args
    return bit_grid(importlib.import_module(baseline), worker, workers)


def parallel_bit_grid(baseline: str, workers: int) -> None:
    """The grid split over processes by variant group (kernel compilation dominates)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        counts = pool.map(_bit_worker, [(baseline, w, workers) for w in range(workers)])
    same, total = (sum(c[i] for c in counts) for i in (0, 1))
    print(f"\nbit-identical: {same} of {total} cases")


def _median_ms(fn, reps):
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    fn()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / reps


def _time_pair(calls, rounds=6, reps=10):
    """Median per call of each of the two, timed in alternating order round by round (the one
    timed second in a round runs on a GPU the first has just warmed)."""
    times = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[i].append(_median_ms(calls[i], reps))
    return [statistics.median(t) for t in times]


def _step(pkg, q, k, v, dout, mode, **options):
    def run():
        out, lse = pkg.attention(q, k, v, return_lse=True, **options)
        if mode == "fwd+bwd":
            pkg.attention_backward(dout, q, k, v, out, lse, **options)
    return run


def timing(old) -> None:
    rng = numpy.random.default_rng(7)
    rows = []
    print("\n== dense grid, bfloat16, 16K tokens, hidden 2048 (ms; ratio = new / old)")
    for causal in (False, True):
        for d in (64, 128):
            for n in (1024, 2048, 4096, 8192, 16384):
                b, h = 16384 // n, 2048 // d
                q, k, v, dout = _inputs(rng, ml_dtypes.bfloat16, b, h, h, n, n, d, d)
                for mode in ("fwd", "fwd+bwd"):
                    t_new, t_old = _time_pair([_step(cuflash, q, k, v, dout, mode, causal=causal),
                                               _step(old, q, k, v, dout, mode, causal=causal)])
                    rows.append((f"dense causal={causal!s:5} D={d:3} N={n:5} {mode:7}", t_old, t_new))
                    print(f"{rows[-1][0]}  old {t_old:8.3f}  new {t_new:8.3f}  ratio {t_new / t_old:.3f}",
                          flush=True)
                del q, k, v, dout
                cupy.get_default_memory_pool().free_all_blocks()
    print("\n== block-sparse grid, bfloat16, N = 16K, 32 heads, D = 64, 128x128 blocks")
    n, h, d, block = 16384, 32, 64, 128
    q, k, v, dout = _inputs(rng, ml_dtypes.bfloat16, 1, h, h, n, n, d, d)
    for density in (0.5, 0.25, 0.1):
        pattern = rng.random((n // block, n // block)) < density
        masks = []
        for pkg in (cuflash, old):
            sparse = importlib.import_module(pkg.__name__ + ".sparse")
            masks.append(sparse.BlockMask.from_dense(pattern, block_size=block))
        for mode in ("fwd", "fwd+bwd"):
            t_new, t_old = _time_pair([_step(cuflash, q, k, v, dout, mode, block_mask=masks[0]),
                                       _step(old, q, k, v, dout, mode, block_mask=masks[1])])
            rows.append((f"sparse density={density:4} {mode:7}", t_old, t_new))
            print(f"{rows[-1][0]}  old {t_old:8.3f}  new {t_new:8.3f}  ratio {t_new / t_old:.3f}",
                  flush=True)
    print("\n== portable kernels (mma.sync; CUFLASH_DISABLE_SM90=1 for D = 64, 128), bfloat16, "
          "N = 4096, B = 4, H = 16")
    import os
    for d in (64, 96, 128):
        os.environ["CUFLASH_DISABLE_SM90"] = "1"
        q, k, v, dout = _inputs(rng, ml_dtypes.bfloat16, 4, 16, 16, 4096, 4096, d, d)
        for causal in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                t_new, t_old = _time_pair([_step(cuflash, q, k, v, dout, mode, causal=causal),
                                           _step(old, q, k, v, dout, mode, causal=causal)])
                rows.append((f"portable causal={causal!s:5} D={d:3} {mode:7}", t_old, t_new))
                print(f"{rows[-1][0]}  old {t_old:8.3f}  new {t_new:8.3f}  ratio {t_new / t_old:.3f}",
                      flush=True)
        os.environ["CUFLASH_DISABLE_SM90"] = "0"
    worst = max(rows, key=lambda r: r[2] / r[1])
    slower = [r for r in rows if r[2] > 1.02 * r[1]]
    print(f"\npoints: {len(rows)}; slower than old by more than 2%: {len(slower)}; "
          f"worst ratio {worst[2] / worst[1]:.3f} ({worst[0].strip()})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--bits", action="store_true")
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    old = importlib.import_module(args.baseline)
    print(f"new: {cuflash.__file__}\nold: {old.__file__}\n"
          f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    if args.bits:
        parallel_bit_grid(args.baseline, args.workers)
    if args.timing:
        timing(old)


if __name__ == "__main__":
    main()
