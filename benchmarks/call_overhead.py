"""Host-side cost of one call on a tiny problem, and where it goes (cProfile).

    python benchmarks/call_overhead.py [--profile]

The GPU work of a (B=2, H=4, N=512, D=64) bf16 forward is a few microseconds; what a call costs
beyond that is validation, argument packing and launch overhead.
"""

import argparse
import cProfile
import pstats
import time

import cupy
import ml_dtypes
import numpy

import cuflash


def per_call_us(fn, calls=2000):
    for _ in range(20):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    rng = cupy.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((2, 4, 512, 64), dtype=numpy.float32).astype(ml_dtypes.bfloat16)
                     for _ in range(4))
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    forward = lambda: cuflash.attention(q, k, v)
    backward = lambda: cuflash.attention_backward(dout, q, k, v, out, lse)
    print(f"forward  {per_call_us(forward):8.1f} µs per call")
    print(f"backward {per_call_us(backward):8.1f} µs per call")
    if args.profile:
        for name, fn in (("forward", forward), ("backward", backward)):
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(500):
                fn()
            profile.disable()
            print(f"\n== {name}: 500 calls")
            pstats.Stats(profile).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
