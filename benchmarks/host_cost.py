"""Per-call cost of small attention calls, host included, against SDPA and CUDA-graph replay.

    python benchmarks/host_cost.py [--calls N] [--profile]

For bf16 causal (B, H, N, D) = (1, 16, 128, 64) and (8, 16, 512, 64), one process, prints:

- per call, host included: N back-to-back calls then one synchronisation, divided by N, for
  cuflash forward, SDPA forward (torch.nn.functional.scaled_dot_product_attention, when torch is
  importable), cuflash forward+backward and SDPA forward+backward (autograd); the median of
  ROUNDS rounds, cuflash's and SDPA's alternated, so that neither alone meets a GPU whose clocks
  are still rising from idle;
- host cost per forward and per backward call: the time to issue a burst of calls that the GPU's
  launch queue absorbs without blocking (the device is idle and synchronised before each burst);
  also for the same tokens as B packed sequences of N (``attention_varlen``, device offsets,
  ``check_offsets=False``);
- pure GPU time per forward and per forward+backward: CUDA events around one replay of a graph
  holding 20 captured calls (no host work between the kernels);
- graph replay per call: back-to-back replays of a graph holding one call, host included.

Each figure is printed beside its target: host ≤ 15 µs per forward and ≤ 30 µs per
backward call, cuflash ≤ SDPA at both shapes, graph replay within 5% of the pure GPU time.

Then one KV-cache decode step (``attention_with_kvcache``, bf16, B = 1, a 4K cache, Hq = 32,
Hkv = 8, D = 128, one query, lengths in a device array; the smallest point of the decode grid,
where the host weighs most): its host cost, its time per call with the host against SDPA's on a
cache of the same size (``enable_gqa=True``), alternated as above, and its pure GPU time (one
replay of a graph of 20 captured steps).
``--profile`` adds where the host time of the cached calls goes (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import cupy
import ml_dtypes
import numpy

import cuflash

SHAPES = ((1, 16, 128, 64), (8, 16, 512, 64))
HOST_FORWARD_US, HOST_BACKWARD_US, REPLAY_SLACK = 15.0, 30.0, 0.05
GRAPH_CALLS = 20
BURST = 100  # calls issued per host-cost burst: 300 launches, well inside the launch queue
ROUNDS = 5  # alternated rounds of the per-call timings


def _inputs(shape):
    rng = cupy.random.default_rng(0)
    return tuple(rng.standard_normal(shape, dtype=numpy.float32).astype(ml_dtypes.bfloat16)
                 for _ in range(4))


class Cuflash:
    def __init__(self, shape):
        self.q, self.k, self.v, self.dout = _inputs(shape)
        self.out, self.lse = cuflash.attention(self.q, self.k, self.v, causal=True,
                                               return_lse=True)

    def forward(self):
        return cuflash.attention(self.q, self.k, self.v, causal=True)

    def backward(self):
        return cuflash.attention_backward(self.dout, self.q, self.k, self.v, self.out, self.lse,
                                          causal=True)

    def forward_backward(self):
        out, lse = cuflash.attention(self.q, self.k, self.v, causal=True, return_lse=True)
        return cuflash.attention_backward(self.dout, self.q, self.k, self.v, out, lse, causal=True)


class CuflashPacked:
    """The same tokens as B packed sequences of N (``attention_varlen``, device offsets,
    ``check_offsets=False``: nothing read back)."""

    def __init__(self, shape):
        b, h, n, d = shape
        self.q, self.k, self.v, self.dout = (x.reshape(b * n, h, d) for x in _inputs((b, n, h, d)))
        cu = cupy.arange(0, (b + 1) * n, n, dtype=cupy.int32)
        self.layout = (cu, cu, n, n)
        self.out, self.lse = cuflash.attention_varlen(self.q, self.k, self.v, *self.layout,
                                                      causal=True, return_lse=True,
                                                      check_offsets=False)

    def forward(self):
        return cuflash.attention_varlen(self.q, self.k, self.v, *self.layout, causal=True,
                                        check_offsets=False)

    def backward(self):
        return cuflash.attention_varlen_backward(self.dout, self.q, self.k, self.v, self.out,
                                                 self.lse, *self.layout, causal=True,
                                                 check_offsets=False)


class Sdpa:
    def __init__(self, torch, shape):
        self.torch = torch
        self.q, self.k, self.v, self.dout = (
            torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for x in (self.q, self.k, self.v):
            x.requires_grad_(True)
        self.sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward(self):
        with self.torch.no_grad():
            return self.sdpa(self.q, self.k, self.v, is_causal=True)

    def forward_backward(self):
        out = self.sdpa(self.q, self.k, self.v, is_causal=True)
        return self.torch.autograd.grad(out, (self.q, self.k, self.v), self.dout)


def per_call_us(fn, sync, calls):
    """Wall time per call of `calls` back-to-back calls, host and GPU included."""
    for _ in range(10):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def alternated_per_call_us(timed, calls):
    """Per-call times of each (fn, sync) in `timed` over ROUNDS rounds that take them in turn,
    the order reversed every other round: a list of ROUNDS times for each."""
    times = [[] for _ in timed]
    for round_ in range(ROUNDS):
        order = range(len(timed)) if round_ % 2 == 0 else reversed(range(len(timed)))
        for i in order:
            times[i].append(per_call_us(*timed[i], calls))
    return times


def rounds_line(names, rounds) -> str:
    """Each named timing's rounds (``alternated_per_call_us``), on one line."""
    return "  (each round, µs: " + "; ".join(
        f"{name} " + ", ".join(f"{t:.1f}" for t in r) for name, r in zip(names, rounds)) + ")"


def host_us(fn, sync, bursts=20):
    """Time to issue one call while the device keeps up (median over bursts of BURST calls)."""
    times = []
    for _ in range(bursts):
        sync()
        start = time.perf_counter()
        for _ in range(BURST):
            fn()
        times.append((time.perf_counter() - start) / BURST * 1e6)
    sync()
    return float(numpy.median(times))


def capture(fn, calls):
    """A CUDA graph of `calls` calls of `fn` on a fresh non-blocking stream (warmed up first);
    returns (graph, stream, results kept alive for the replays)."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        fn()
        stream.synchronize()
        stream.begin_capture()
        results = [fn() for _ in range(calls)]
        graph = stream.end_capture()
    return graph, stream, results


def gpu_us(fn):
    """Pure GPU time per call: CUDA events around one replay of GRAPH_CALLS captured calls."""
    graph, stream, _results = capture(fn, GRAPH_CALLS)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    with stream:
        for _ in range(20):
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) * 1e3 / GRAPH_CALLS)
    return float(numpy.median(times[2:]))


def replay_us(fn, calls):
    """Per call, host included, of back-to-back replays of a graph holding one call."""
    graph, stream, _results = capture(fn, 1)
    return per_call_us(lambda: graph.launch(stream), stream.synchronize, calls)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def report(shape, calls, torch):
    ours = Cuflash(shape)
    sync = cupy.cuda.get_current_stream().synchronize
    print(f"\n== (B, H, N, D) = {shape}, bf16, causal")
    timed = [(ours.forward, sync), (ours.forward_backward, sync)]
    if torch is not None:
        theirs = Sdpa(torch, shape)
        timed += [(theirs.forward, torch.cuda.synchronize),
                  (theirs.forward_backward, torch.cuda.synchronize)]
    rounds = alternated_per_call_us(timed, calls)
    fwd, fwd_bwd, *sdpa = (float(numpy.median(r)) for r in rounds)
    sdpa_fwd, sdpa_fwd_bwd = sdpa or (None, None)

    def against(ours_us, sdpa_us):
        if sdpa_us is None:
            return "SDPA: torch not importable"
        return (f"SDPA {sdpa_us:7.1f} µs   ratio {ours_us / sdpa_us:5.2f}   target ≤ 1.00: "
                f"{verdict(ours_us <= sdpa_us)}")

    print(f"per call, host included  forward          {fwd:7.1f} µs   {against(fwd, sdpa_fwd)}")
    print(f"                         forward+backward {fwd_bwd:7.1f} µs   "
          f"{against(fwd_bwd, sdpa_fwd_bwd)}")
    print(rounds_line(("fwd", "fwd+bwd", "SDPA fwd", "SDPA fwd+bwd"), rounds))
    host_fwd, host_bwd = host_us(ours.forward, sync), host_us(ours.backward, sync)
    print(f"host cost                forward          {host_fwd:7.1f} µs   target ≤ "
          f"{HOST_FORWARD_US:.0f}: {verdict(host_fwd <= HOST_FORWARD_US)}")
    print(f"                         backward         {host_bwd:7.1f} µs   target ≤ "
          f"{HOST_BACKWARD_US:.0f}: {verdict(host_bwd <= HOST_BACKWARD_US)}")
    packed = CuflashPacked(shape)
    print(f"host cost, packed        forward          {host_us(packed.forward, sync):7.1f} µs")
    print(f"                         backward         {host_us(packed.backward, sync):7.1f} µs")
    for name, fn in (("forward", ours.forward), ("forward+backward", ours.forward_backward)):
        gpu, replay = gpu_us(fn), replay_us(fn, calls)
        print(f"graph, {name:17s} pure GPU {gpu:7.1f} µs   replay {replay:7.1f} µs   "
              f"ratio {replay / gpu:5.3f}   target ≤ {1 + REPLAY_SLACK:.2f}: "
              f"{verdict(replay <= (1 + REPLAY_SLACK) * gpu)}")
    return ours


DECODE = (1, 4096, 32, 8, 128)  # (B, cache length, Hq, Hkv, D)


class CuflashDecode:
    """One decode step against a full cache (lengths = the cache length, in a device array)."""

    def __init__(self):
        b, cache, hq, hkv, d = DECODE
        rng = cupy.random.default_rng(0)
        self.q, self.k_cache, self.v_cache = (
            rng.standard_normal(shape, dtype=numpy.float32).astype(ml_dtypes.bfloat16)
            for shape in ((b, 1, hq, d), (b, cache, hkv, d), (b, cache, hkv, d)))
        self.lengths = cupy.full((b,), cache, numpy.int32)

    def step(self):
        return cuflash.attention_with_kvcache(self.q, self.k_cache, self.v_cache,
                                              cache_seqlens=self.lengths)


class SdpaDecode:
    """SDPA's step on a cache of the same size, (B, H, L, D) with the query heads grouped."""

    def __init__(self, torch):
        b, cache, hq, hkv, d = DECODE
        self.torch = torch
        self.q = torch.randn((b, hq, 1, d), device="cuda", dtype=torch.bfloat16)
        self.k, self.v = (torch.randn((b, hkv, cache, d), device="cuda", dtype=torch.bfloat16)
                          for _ in range(2))

    def step(self):
        with self.torch.no_grad():
            return self.torch.nn.functional.scaled_dot_product_attention(
                self.q, self.k, self.v, enable_gqa=True)


def report_decode(calls, torch):
    b, cache, hq, hkv, d = DECODE
    print(f"\n== decode step: B = {b}, cache {cache}, Hq = {hq}, Hkv = {hkv}, D = {d}, bf16, "
          f"one query")
    ours = CuflashDecode()
    sync = cupy.cuda.get_current_stream().synchronize
    timed = [(ours.step, sync)]
    if torch is not None:
        timed.append((SdpaDecode(torch).step, torch.cuda.synchronize))
    rounds = alternated_per_call_us(timed, calls)
    step, *sdpa = (float(numpy.median(r)) for r in rounds)
    against = (f"SDPA {sdpa[0]:7.1f} µs   ratio {step / sdpa[0]:5.2f}" if sdpa
               else "SDPA: torch not importable")
    print(f"per call, host included  {step:7.1f} µs   {against}")
    print(rounds_line(("cuflash", "SDPA"), rounds))
    print(f"host cost                {host_us(ours.step, sync):7.1f} µs")
    print(f"graph, pure GPU          {gpu_us(ours.step):7.1f} µs")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="back-to-back calls per timing")
    parser.add_argument("--profile", action="store_true", help="cProfile the cached calls")
    args = parser.parse_args()
    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None
    print(f"cuflash {cuflash.__version__}; device {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}; "
          f"torch {'not importable' if torch is None else torch.__version__}")
    for shape in SHAPES:
        ours = report(shape, args.calls, torch)
    report_decode(args.calls, torch)
    if args.profile:
        for name, fn in (("forward", ours.forward), ("backward", ours.backward)):
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(500):
                fn()
            profile.disable()
            cupy.cuda.get_current_stream().synchronize()
            print(f"\n== {name}: 500 cached calls")
            pstats.Stats(profile).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
