"""The backward pass on the GPU: cuflash's default (dQ formed in the dK/dV kernel, float32 adds
in any order) and ``deterministic=True`` (bit-identical run to run) beside torch SDPA's flash and
cuDNN back ends, in one process on the same arrays (bfloat16, B = 16384 / N, H = 2048 / D).

    python benchmarks/backward_bench.py [--quick] [--head-dims 64,128] [--no-torch]
    python benchmarks/backward_bench.py --tiles 2x128,2x64,1x64 [--quick] [--head-dims 64,128]

Columns are TFLOP/s with the backward counted as 2.5× the forward's 4·B·H·N²·D (half when
causal). "bwd" is the backward alone: cuflash's ``attention_backward`` timed by itself, and for
SDPA its forward+backward time less its forward time (torch runs the backward only inside
autograd). "fwd+bwd" times one forward and one backward of each engine. Medians of CUDA-event
timings after warm-up. On Hopper the default and deterministic columns are the two launch
sequences of the wgmma backward (cuflash.kernels.sm90_backward); elsewhere the mma.sync backward
with and without its atomic dQ.

``--tiles WGxM,...`` times the Hopper backward alone instead, under each tile shape listed
(``sm90_backward.Sm90BwdTiles``: WG warpgroups of 64 keys per dK/dV block, M-row query tiles;
the dQ kernel gets WG warpgroups and 64-key tiles), in both modes: a sweep for picking the
defaults. One warpgroup per block leaves room for several blocks per SM.
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy

import cuflash
from cuflash.bench import GpuDevice
from cuflash.bench.baselines import Unavailable, sdpa_runner
from cuflash.bench.problems import Inputs, forward_flops

TOKENS, HIDDEN = 16384, 2048
SDPA = (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"))


def seconds(device, fn, repeats):
    return float(numpy.median(device.times(fn, warmup=3, repeats=repeats)))


def cuflash_seconds(device, inputs, causal, repeats):
    """(backward alone, forward + backward) seconds for the default and the deterministic mode."""
    q, k, v, dout = inputs.q, inputs.k, inputs.v, inputs.dout
    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    times = {}
    for name, deterministic in (("default", False), ("deterministic", True)):
        def backward():
            return cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                              deterministic=deterministic)

        def both():
            o, l = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            return cuflash.attention_backward(dout, q, k, v, o, l, causal=causal,
                                              deterministic=deterministic)

        times[name] = (seconds(device, backward, repeats), seconds(device, both, repeats))
    return times


def tile_sweep(device, options, seq_lens):
    """Backward TFLOP/s of the Hopper kernels under each tile shape of ``options.tiles``."""
    import cupy

    from cuflash import _api
    from cuflash.kernels import sm90_backward

    shapes = [tuple(int(x) for x in item.split("x")) for item in options.tiles.split(",")]
    print("| D | N | causal | tiles (WG x M) | default | deterministic |")
    print("|---|---|---|---|---|---|")
    for d in (int(x) for x in options.head_dims.split(",")):
        for n in seq_lens:
            for causal in (False, True):
                b, h = TOKENS // n, HIDDEN // d
                inputs = Inputs.random(device, (b, h, n, d), ml_dtypes.bfloat16, seed=n + d)
                q, k, v, dout = inputs.q, inputs.k, inputs.v, inputs.dout
                out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
                grads = [cupy.empty_like(x) for x in (q, k, v)]
                flops = 2.5 * forward_flops(b, h, n, n, d, causal=causal)
                for wg, block_m in shapes:
                    tiles = sm90_backward.Sm90BwdTiles(dkdv_warpgroups=wg, dkdv_block_m=block_m,
                                                       dq_warpgroups=wg, dq_block_n=64)
                    rates = []
                    for deterministic in (False, True):
                        spec = _api._spec(q, k, v, causal=causal, deterministic=deterministic)[1]

                        def run():
                            sm90_backward.backward(dout, q, k, v, out, lse, *grads, spec, tiles=tiles)

                        try:
                            rates.append(f"{flops / seconds(device, run, options.repeats) / 1e12:.1f}")
                        except Exception as error:  # a shape that does not fit: say why, go on
                            rates.append(f"{type(error).__name__}: {str(error)[:80]}")
                    print(f"| {d} | {n} | {'yes' if causal else 'no'} | {wg}x{block_m} | "
                          + " | ".join(rates) + " |", flush=True)
                del inputs


def sdpa_seconds(device, inputs, causal, repeats, backend):
    fwd = seconds(device, sdpa_runner(backend, inputs, "fwd", causal=causal), repeats)
    both = seconds(device, sdpa_runner(backend, inputs, "fwdbwd", causal=causal), repeats)
    return both - fwd, both


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 2K, 8K and 16K only")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiles", default="", help="WGxM,... : sweep the Hopper backward's tiles")
    options = parser.parse_args()
    device = GpuDevice()
    seq_lens = (2048, 8192, 16384) if options.quick else (1024, 2048, 4096, 8192, 16384)
    if options.tiles:
        print(f"# {device.description}, bfloat16, {TOKENS} tokens a call, hidden {HIDDEN}; "
              "backward TFLOP/s of the Hopper kernels")
        tile_sweep(device, options, seq_lens)
        return
    names = ["default", "deterministic"] + ([] if options.no_torch else [n for n, _ in SDPA])
    print(f"# {device.description}, bfloat16, {TOKENS} tokens a call, hidden {HIDDEN}; TFLOP/s")
    header = ["D", "N", "causal"] + [f"bwd {n}" for n in names] + [f"fwd+bwd {n}" for n in names]
    header += ["det/default bwd"] + ([] if options.no_torch else
                                     ["bwd /cuDNN", "fwd+bwd /cuDNN", "fwd+bwd /flash"])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for d in (int(x) for x in options.head_dims.split(",")):
        for n in seq_lens:
            for causal in (False, True):
                b, h = TOKENS // n, HIDDEN // d
                inputs = Inputs.random(device, (b, h, n, d), ml_dtypes.bfloat16, seed=n + d)
                flops = forward_flops(b, h, n, n, d, causal=causal)
                times = cuflash_seconds(device, inputs, causal, options.repeats)
                for name, backend in SDPA if not options.no_torch else ():
                    try:
                        times[name] = sdpa_seconds(device, inputs, causal, options.repeats, backend)
                    except (Unavailable, RuntimeError) as error:
                        print(f"# {name}: {error}")
                        times[name] = (float("nan"), float("nan"))
                bwd = {x: 2.5 * flops / times[x][0] / 1e12 for x in names}
                both = {x: 3.5 * flops / times[x][1] / 1e12 for x in names}
                row = [d, n, "yes" if causal else "no"]
                row += [f"{bwd[x]:.1f}" for x in names] + [f"{both[x]:.1f}" for x in names]
                row.append(f"{bwd['deterministic'] / bwd['default']:.2f}")
                if not options.no_torch:
                    row += [f"{bwd['default'] / bwd['cudnn']:.2f}",
                            f"{both['default'] / both['cudnn']:.2f}",
                            f"{both['default'] / both['flash']:.2f}"]
                print("| " + " | ".join(str(x) for x in row) + " |", flush=True)
                del inputs


if __name__ == "__main__":
    main()
