"""Causal grids with their last lanes tile by tile, against lane order, in one process with cuDNN.

    PYTHONPATH=$PWD python3 benchmarks/tail_order_ab.py [--passes fwd,bwd] [--seconds 1.0]
        [--rounds 2] [--points 128:2048,192/128:4096,64:2048:none]

The Hopper forward and the warp-specialised dK/dV kernel take a causal grid's last lanes ((batch,
head) pairs) tile by tile (``_launch.tail_lanes``; docs/internals.md). This times each pass with ``_launch.TAIL_WAVES`` at
its shipped value and at 0 (lane order), the call cache cleared at each switch, in loops of
``--seconds`` of back-to-back calls after a warm-up (``sustained_bench.sustained_ms``: CUDA
events over the loop), the orders alternated within a round and reversed in the next; cuDNN
(SDPA) runs the same pass in the same rounds. bf16, 16K tokens per call, hidden 2048. The
backward is ``attention_backward`` alone, on the forward's out and lse (cuDNN: the autograd
backward of one SDPA call, its graph kept).

It also checks what the order must not change, on the first round's outputs: the forward's out
and lse, and dK and dV, bit-identical between the orders; dQ too on the 256-column tile (a query
tile's dQ is one block's), elsewhere within float32 rounding (its float adds land in another
order). A point is ``D[/Dv]:N[:none]`` (``none``: no mask, a control whose code does not change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy  # noqa: E402
from _harness import torch_module  # noqa: E402
from sustained_bench import (_inputs, alternated_loop_ms, cudnn_ab_engines, prepared_under,  # noqa: E402
                             relative_max_diff, same_bits)

import cuflash  # noqa: E402
from cuflash import _calls  # noqa: E402
from cuflash.kernels import _launch  # noqa: E402

POINTS = "128:2048,128:4096,128:8192,128:16384,64:2048,256:4096,192/128:4096,128:2048:none"
SHIPPED = _launch.TAIL_WAVES


def parse_point(text: str) -> tuple[int, int, int, dict]:
    dims, n, *mask = text.split(":")
    d, _, dv = dims.partition("/")
    options = {} if mask == ["none"] else {"causal": True}
    return int(d), int(dv or d), int(n), options


def ordered(waves: int, fn):
    """``fn`` with the call cache prepared under ``TAIL_WAVES = waves`` (the entries hold their
    packed tail counts)."""
    return prepared_under(lambda: setattr(_launch, "TAIL_WAVES", waves), fn)


def cuflash_engines(q, k, v, dout, options, passes):
    """[(pass, order name, setup, call)] of cuflash, and the first outputs of each order."""
    engines, outputs = [], {}
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    for name, waves in (("tail by tile", SHIPPED), ("lane order", 0)):
        _launch.TAIL_WAVES = waves
        _calls.clear()
        got_out, got_lse = cuflash.attention(q, k, v, return_lse=True, **options)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, **options)
        outputs[name] = (got_out, got_lse, *grads)
        if "fwd" in passes:
            engines.append(("fwd", name, *ordered(waves, lambda: cuflash.attention(q, k, v, **options))))
        if "bwd" in passes:
            engines.append(("bwd", name, *ordered(
                waves, lambda: cuflash.attention_backward(dout, q, k, v, out, lse, **options))))
    _launch.TAIL_WAVES = SHIPPED
    _calls.clear()
    return engines, outputs


def order_notes(outputs, dq_whole: bool) -> str:
    """What the order changed, if anything, of the first outputs."""
    tail, lanes = outputs["tail by tile"], outputs["lane order"]
    notes = [name for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), tail, lanes)
             if (name != "dq" or dq_whole) and not same_bits(x, y)]
    dq_diff = relative_max_diff(tail[2], lanes[2])
    text = "bits differ: " + ", ".join(notes) if notes else "same bits"
    return text if dq_whole else f"{text} (dQ: max diff {dq_diff:.1e} of its largest)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="fwd,bwd")
    parser.add_argument("--points", default=POINTS)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    passes = set(args.passes.split(","))
    torch = torch_module(True)
    print(f"TAIL_WAVES {SHIPPED} (tail by tile) against 0 (lane order); loops of {args.seconds} s, "
          f"{args.rounds} rounds, the order of the engines reversed every other round; ms per call")
    print("| D / Dv | N | mask | pass | lane order | tail by tile | ratio | cuDNN | vs cuDNN, lane → tail | checks |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for point in args.points.split(","):
        d, dv, n, options = parse_point(point)
        q, k, v, dout = _inputs(d, dv, n, 5)
        engines, outputs = cuflash_engines(q, k, v, dout, options, passes)
        engines += cudnn_ab_engines(torch, q, k, v, dout, options, passes)
        notes = order_notes(outputs, dq_whole=max(d, dv) > 128)
        times = alternated_loop_ms([((pass_, name), setup, call) for pass_, name, setup, call in engines],
                                   args.rounds, args.seconds)
        _launch.TAIL_WAVES = SHIPPED
        _calls.clear()
        for pass_ in ("fwd", "bwd"):
            if pass_ not in passes:
                continue
            lane, tail = (statistics.median(times[pass_, name]) for name in ("lane order", "tail by tile"))
            cudnn = statistics.median(times[pass_, "cuDNN"]) if (pass_, "cuDNN") in times else None
            versus = "n/a" if cudnn is None else f"{cudnn / lane:.3f} → {cudnn / tail:.3f}"
            print(f"| {d}{'' if dv == d else f' / {dv}'} | {n} | {'causal' if options else 'none'} | {pass_} | "
                  f"{lane:.3f} | {tail:.3f} | {tail / lane:.3f} | "
                  f"{'n/a' if cudnn is None else f'{cudnn:.3f}'} | {versus} | {notes} |", flush=True)
        del q, k, v, dout, engines, outputs
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
