"""cuflash against cuDNN in two regimes: short bursts from idle and a sustained load at the power cap.

    PYTHONPATH=$PWD python3 benchmarks/sustained_bench.py [--seconds 2.5] [--rounds 1] [--quick]
        [--passes fwd|fwd+bwd|both] [--lengths 2048,8192] [--dims 256] [--masks causal,window]
        [--other-grid]

The H200 runs at its 700 W cap under attention kernels. How fast a kernel runs then depends on
how much power it draws per unit of work, and the clock the GPU picks moves on a scale of
milliseconds. So the same kernel reads differently in two regimes:

- **burst**: the protocol of the other scripts (``_harness.median_ms``): after half a second
  idle, the median of 7 samples of 20 back-to-back calls (tens of milliseconds of work);
- **sustained**: back-to-back calls for ``--seconds`` (checked every 20 calls), TFLOP/s over the
  whole loop from CUDA events, with the SM clock and board power ``nvidia-smi`` reports every
  50 ms (medians of the samples after the first quarter of the loop), which is what a training
  loop sees. Loops of 2 s or more settle at the cap (687-691 W on an H200); loops of 1.2 s ended
  at 520-620 W, between the two regimes.

bf16, 16K tokens per call, hidden 2048 (B = 16384 / N, H = 2048 / D). Engines alternate within a
round and the rounds repeat (``--rounds``). A window's FLOPs are counted as the dense problem's:
its rows compare cuflash's tile shapes with each other, not with SDPA, which takes the window as
a boolean mask over the whole problem. Forward points run cuflash's prepared launch of the
shipped tiles (and, at D = 64 under a band over at most 2K keys, the one-consumer tile beside
them); forward+backward points run ``cuflash.attention`` and ``attention_backward`` against SDPA
(cuDNN back end) with autograd.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy  # noqa: E402
from _harness import cuflash_step, median_ms, randn, spec_for, to_torch, torch_module  # noqa: E402

from cuflash.bench import forward_flops  # noqa: E402
from cuflash.kernels import sm90_tma_forward  # noqa: E402

TOKENS, HIDDEN = 16384, 2048
BURST = {"reps": 7, "batch": 20}
# The issues' grid: D = 64, 128, 256 at 1K-16K keys, causal and not, and D = 96 and 192 / 128 at
# 4K and 16K; then a window band at D = 64 over short rows. A point is (D, Dv, N, options).
GRID = ([(d, d, n, options) for d in (64, 128, 256) for n in (1024, 2048, 4096, 8192, 16384)
         for options in ({}, {"causal": True})]
        + [(d, dv, n, options) for d, dv in ((96, 96), (192, 128)) for n in (4096, 16384)
           for options in ({}, {"causal": True})])
FORWARD_EXTRA = [(64, 64, 2048, {"window": (256, 0)})]
QUICK_FORWARD = [(128, 128, 2048, {}), (64, 64, 2048, {"causal": True})]
QUICK_BOTH = [(128, 128, 2048, {})]


class PowerSampler:
    """``nvidia-smi`` sampling the SM clock (MHz) and board power (W) every 50 ms while open."""

    def __enter__(self):
        self._process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "50"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        self._process.terminate()
        text = self._process.communicate()[0]
        rows = []
        for line in text.splitlines():
            try:
                rows.append(tuple(float(x) for x in line.split(",")))
            except ValueError:
                continue
        settled = rows[len(rows) // 4:] or rows
        self.clock = statistics.median(r[0] for r in settled) if settled else float("nan")
        self.power = statistics.median(r[1] for r in settled) if settled else float("nan")
        return False


def sustained_ms(fn, seconds: float):
    """(ms per call over a loop of back-to-back calls lasting ``seconds``, the loop's SM clock in
    MHz, its board power in W)."""
    for _ in range(5):
        fn()
    cupy.cuda.runtime.deviceSynchronize()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    with PowerSampler() as power:
        time.sleep(0.2)  # the sampler's first line
        calls, began = 0, time.perf_counter()
        start.record()
        while time.perf_counter() - began < seconds:
            for _ in range(20):
                fn()
            calls += 20
            stop.record()
            stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / calls, power.clock, power.power


def prepared_under(switch, fn):
    """``(setup, fn)`` for an A/B engine: ``setup`` applies ``switch()`` (a module setting read
    when a call is prepared), clears the call cache and runs ``fn`` once, so that the loop after
    it times calls prepared under that setting."""
    from cuflash import _calls

    def setup():
        switch()
        _calls.clear()
        fn()
    return setup, fn


def cudnn_ab_engines(torch, q, k, v, dout, options, passes):
    """[(pass, "cuDNN", setup, call)] of SDPA's cuDNN back end for the A/B scripts: "fwd" under
    no_grad, "bwd" the autograd backward of one kept SDPA call; [] without torch."""
    if torch is None:
        return []
    tq, tk, tv = (to_torch(torch, x).detach().requires_grad_(True) for x in (q, k, v))
    tdo = to_torch(torch, dout)
    sdpa = _sdpa(torch, tq, tk, tv, options)
    engines = []
    if "fwd" in passes:
        def forward():
            with torch.no_grad():
                sdpa()
        engines.append(("fwd", "cuDNN", forward, forward))
    if "bwd" in passes:
        kept = sdpa()

        def backward():
            torch.autograd.grad(kept, (tq, tk, tv), tdo, retain_graph=True)
        engines.append(("bwd", "cuDNN", backward, backward))
    return engines


def same_bits(x, y) -> bool:
    return bool((x.view(cupy.uint8) == y.view(cupy.uint8)).all())


def relative_max_diff(x, reference) -> float:
    """max |x − reference| over max |reference| (1 where that is 0), in float32: how far two
    gradients whose float adds landed in another order are apart."""
    x, reference = (y.get().astype("float32") for y in (x, reference))
    scale = float(abs(reference).max()) or 1.0
    return float(abs(x - reference).max()) / scale


def alternated_loop_ms(engines, rounds: int, seconds: float) -> dict:
    """``{key: [ms per call of each round]}`` of ``engines``, ``(key, setup, call)`` triples:
    per round each engine's ``setup()`` then a ``sustained_ms`` loop of ``call``, the engines'
    order reversed every other round (the A/B scripts' rounds)."""
    times = {}
    for round_ in range(rounds):
        for key, setup, call in (engines if round_ % 2 == 0 else engines[::-1]):
            setup()
            times.setdefault(key, []).append(sustained_ms(call, seconds)[0])
    return times


def burst_ms(fn):
    time.sleep(0.5)
    return median_ms(fn, **BURST)


def _inputs(d, dv, n, seed):
    """q, k, v and dout of one point: (B, H, N, D) with V and dout Dv wide."""
    b, h = TOKENS // n, HIDDEN // d
    rng = cupy.random.default_rng([n, d, dv, seed])
    return [randn(rng, (b, h, n, width), "bfloat16") for width in (d, d, dv, dv)]


def _sdpa(torch, tq, tk, tv, options):
    """SDPA's cuDNN back end on one point's tensors, as a call whose arguments are built once (a
    window as a boolean mask over the whole problem), so that the timed calls hold SDPA alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if "window" in options:
        n = tq.shape[-2]
        left, right = options["window"]
        i = torch.arange(n, device=tq.device)
        seen = (i[None, :] >= i[:, None] - left) & (i[None, :] <= i[:, None] + right)
        kwargs = {"attn_mask": seen}
    else:
        kwargs = {"is_causal": bool(options.get("causal"))}

    def call():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kwargs)

    return call


def _append_if_it_runs(engines, name, fn):
    try:
        fn()
    except Exception as error:  # SDPA's cuDNN back end refuses some masks
        print(f"    {name}: {type(error).__name__}: {str(error)[:160]}")
        return
    engines.append((name, fn))


def forward_engines(torch, d, dv, n, options, other_grid=False):
    """[(name, call)] for one forward point: cuflash's shipped tiles (and at D = 64 under a band
    over short rows the one-consumer tile too; with `other_grid` the shipped tiles on the grid
    not shipped: one block per tile against persistent), then cuDNN."""
    q, k, v, _ = _inputs(d, dv, n, 7)
    spec = spec_for(q, k, v, **options)
    lse = cupy.empty(q.shape[:-1], cupy.float32)
    shipped = sm90_tma_forward.tiles_for(spec)
    shapes = [("cuflash", shipped)]
    if max(d, dv) <= 64 and sm90_tma_forward.short_band(spec):
        shapes.append(("cuflash 1c", dataclasses.replace(shipped, consumers=1, pingpong=False)))
    if other_grid:
        shapes.append(("cuflash other grid", dataclasses.replace(shipped, persistent=not shipped.persistent)))
    engines = []
    for name, tiles in shapes:
        out = cupy.empty(q.shape[:-1] + (dv,), q.dtype)
        try:
            launch = sm90_tma_forward.prepare_forward(spec, (q, k, v, out), tiles=tiles)
            launch(q, k, v, out, lse, spec)
        except Exception as error:  # a shape that does not compile for this point
            print(f"    {name} {tiles}: {type(error).__name__}: {str(error)[:120]}")
            continue
        engines.append((f"{name} ({tiles.consumers}c/{tiles.block_n}{'/p' if tiles.persistent else ''})",
                        lambda launch=launch, out=out: launch(q, k, v, out, lse, spec)))
    if torch is not None:
        sdpa = _sdpa(torch, *(to_torch(torch, x) for x in (q, k, v)), options)

        def cudnn():
            with torch.no_grad():
                sdpa()

        _append_if_it_runs(engines, "cuDNN", cudnn)
    return engines


def both_engines(torch, d, dv, n, options):
    q, k, v, dout = _inputs(d, dv, n, 9)
    engines = [("cuflash", cuflash_step(q, k, v, dout, "fwd+bwd", **options))]
    if torch is not None:
        tq, tk, tv = (to_torch(torch, x).detach().requires_grad_(True) for x in (q, k, v))
        tdo = to_torch(torch, dout)
        sdpa = _sdpa(torch, tq, tk, tv, options)

        def cudnn():
            out = sdpa()
            torch.autograd.grad(out, (tq, tk, tv), tdo)

        _append_if_it_runs(engines, "cuDNN", cudnn)
    return engines


def mask_name(options) -> str:
    return "causal" if options.get("causal") else "window" if "window" in options else "none"


def run_points(title, points, make_engines, flop_factor, torch, args):
    print(f"\n{title}\n")
    print("| D | N | mask | engine | burst TFLOP/s | sustained TFLOP/s | clock MHz | power W | burst / cuDNN | sustained / cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for d, dv, n, options in points:
        b, h = TOKENS // n, HIDDEN // d
        flop = flop_factor * forward_flops(b, h, n, n, (d + dv) / 2, causal=bool(options.get("causal")))
        engines = make_engines(torch, d, dv, n, options)
        results = {name: [] for name, _ in engines}
        for round_ in range(args.rounds):
            order = engines if round_ % 2 == 0 else engines[::-1]
            for name, fn in order:
                burst = burst_ms(fn)
                sus, clock, power = sustained_ms(fn, args.seconds)
                results[name].append((flop / burst / 1e9, flop / sus / 1e9, clock, power))
        cudnn = results.get("cuDNN")
        ref = (statistics.mean(r[0] for r in cudnn), statistics.mean(r[1] for r in cudnn)) if cudnn else None
        for name, rows in results.items():
            burst = statistics.mean(r[0] for r in rows)
            sus = statistics.mean(r[1] for r in rows)
            clock = statistics.mean(r[2] for r in rows)
            power = statistics.mean(r[3] for r in rows)
            ratios = (f"{burst / ref[0]:.2f} | {sus / ref[1]:.2f}" if ref and name != "cuDNN" else " | ")
            spread = " / ".join(f"{r[1]:.0f}" for r in rows)
            mask = f"window {options['window']}" if "window" in options else mask_name(options)
            head = f"{d}" if dv == d else f"{d} / {dv}"
            print(f"| {head} | {n} | {mask} | {name} | {burst:.1f} | {sus:.1f} ({spread}) | "
                  f"{clock:.0f} | {power:.0f} | {ratios} |", flush=True)
        cupy.get_default_memory_pool().free_all_blocks()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5,
                        help="length of each sustained loop (loops of 1.2 s ended below the cap, 520-620 W)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="two forward points and one forward+backward")
    parser.add_argument("--passes", choices=("fwd", "fwd+bwd", "both"), default="both")
    parser.add_argument("--lengths", help="only these N (comma-separated), e.g. 2048,8192")
    parser.add_argument("--dims", help="only these head dims D (comma-separated), e.g. 64,256")
    parser.add_argument("--masks", help="only these masks (comma-separated): none, causal, window")
    parser.add_argument("--other-grid", action="store_true",
                        help="forward: also the shipped tiles on the other grid (persistent or one block per tile)")
    args = parser.parse_args()
    lengths = None if args.lengths is None else {int(n) for n in args.lengths.split(",")}
    dims = None if args.dims is None else {int(d) for d in args.dims.split(",")}
    masks = None if args.masks is None else set(args.masks.split(","))

    def chosen(points):
        return [p for p in points if (lengths is None or p[2] in lengths) and (dims is None or p[0] in dims)
                and (masks is None or mask_name(p[3]) in masks)]

    torch = torch_module(True)
    if args.passes in ("fwd", "both"):
        points = QUICK_FORWARD if args.quick else GRID + FORWARD_EXTRA
        engines = functools.partial(forward_engines, other_grid=args.other_grid)
        run_points("Forward", chosen(points), engines, 1, torch, args)
    if args.passes in ("fwd+bwd", "both"):
        run_points("Forward + backward", chosen(QUICK_BOTH if args.quick else GRID), both_engines, 3.5, torch, args)


if __name__ == "__main__":
    main()
