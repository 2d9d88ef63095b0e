"""Backward time of the portable (mma.sync) kernels with and without ``deterministic=True``.

    CUFLASH_DISABLE_SM90=1 python benchmarks/deterministic_cost.py

Hopper's own kernels are always deterministic; set CUFLASH_DISABLE_SM90=1 there to measure the
portable path. bf16, B = 16384 / N, H = 2048 / D.
"""

import ml_dtypes
import numpy

import cuflash
from cuflash.bench import GpuDevice


def main():
    device = GpuDevice()
    print(f"{'D':>4} {'N':>6} {'causal':>6} {'atomic dq ms':>13} {'deterministic ms':>17} {'ratio':>6}")
    for d in (64, 128):
        for n in (2048, 8192):
            for causal in (False, True):
                b, h = 16384 // n, 2048 // d
                q, k, v, dout = (device.random((b, h, n, d), ml_dtypes.bfloat16, seed) for seed in range(4))
                out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
                times = []
                for deterministic in (False, True):
                    run = lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                                             deterministic=deterministic)
                    times.append(1e3 * float(numpy.median(device.times(run, warmup=2, repeats=10))))
                print(f"{d:>4} {n:>6} {str(causal):>6} {times[0]:>13.3f} {times[1]:>17.3f} "
                      f"{times[1] / times[0]:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
