"""The Hopper backward's dQ cast lane by lane, against the cast after the whole dK/dV grid, in one
process with cuDNN.

    PYTHONPATH=$PWD python3 benchmarks/cast_by_lane_ab.py [--seconds 1.0] [--rounds 2]
        [--points 64:2048,128:2048:causal,...]

Where the warp-specialised dK/dV kernel adds dQ in any order (``sm90_backward.lanes_counted``)
it counts each lane's ((batch, key/value head)) finished key tiles, and ``flash_bwd_dq_convert``
casts a lane's float32 dQ as soon as its count is in, beside the grid's last wave
(``sm90_backward.CAST_DQ_BY_LANE``; docs/internals.md). This times ``attention_backward`` alone
(on the forward's out and lse) with ``CAST_DQ_BY_LANE`` at True and at False (the cast after the
grid; the dK/dV kernel counts either way), the call cache cleared at each switch, in loops of
``--seconds`` of back-to-back calls after a warm-up (``sustained_bench.sustained_ms``: CUDA events
over the loop), the two alternated within a round and reversed in the next; cuDNN (SDPA) runs the
autograd backward of one SDPA call, its graph kept, in the same rounds. bf16, 16K tokens per
call, hidden 2048. A point is ``D:N[:causal]``.

It also checks, on the first outputs, what the cast's order must not change: dK and dV
bit-identical, dQ within float32 rounding (its float adds land in another order from call to
call either way).
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
from cuflash.kernels import sm90_backward  # noqa: E402

POINTS = ",".join(f"{d}:{n}{mask}" for d in (64, 128) for n in (2048, 8192, 16384) for mask in ("", ":causal"))
CASTS = (("by lane", True), ("after grid", False))


def parse_point(text: str) -> tuple[int, int, dict]:
    d, n, *mask = text.split(":")
    return int(d), int(n), {"causal": True} if mask == ["causal"] else {}


def cast_switched(by_lane: bool, fn):
    """``fn`` with the call cache prepared under ``CAST_DQ_BY_LANE = by_lane`` (the entries hold
    their cast)."""
    return prepared_under(lambda: setattr(sm90_backward, "CAST_DQ_BY_LANE", by_lane), fn)


def cuflash_engines(q, k, v, dout, options):
    """[(name, setup, call)] of each cast, and the first gradients of each."""
    engines, grads = [], {}
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    plan = cuflash.kernel_plan(q, k, v, **options).backward
    assert "lane counters of the dQ cast" in plan.workspace, plan.describe()

    def backward():
        return cuflash.attention_backward(dout, q, k, v, out, lse, **options)

    for name, by_lane in CASTS:
        setup, call = cast_switched(by_lane, backward)
        setup()
        grads[name] = backward()
        engines.append((name, setup, call))
    sm90_backward.CAST_DQ_BY_LANE = True
    _calls.clear()
    return engines, grads


def cast_notes(grads) -> str:
    """What the cast's order changed, if anything, of the first gradients."""
    (dq, dk, dv), (dq_after, dk_after, dv_after) = grads["by lane"], grads["after grid"]
    differ = [name for name, x, y in (("dk", dk, dk_after), ("dv", dv, dv_after)) if not same_bits(x, y)]
    text = "bits differ: " + ", ".join(differ) if differ else "dK, dV same bits"
    return f"{text} (dQ: max diff {relative_max_diff(dq, dq_after):.1e} of its largest)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default=POINTS)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch = torch_module(True)
    print(f"backward alone, the dQ cast lane by lane against after the grid; loops of {args.seconds} s, "
          f"{args.rounds} rounds, the order of the engines reversed every other round; ms per call")
    print("| D | N | mask | after grid | by lane | ratio | cuDNN | vs cuDNN, after → by lane | checks |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for point in args.points.split(","):
        d, n, options = parse_point(point)
        q, k, v, dout = _inputs(d, d, n, 5)
        engines, grads = cuflash_engines(q, k, v, dout, options)
        engines += [engine[1:] for engine in cudnn_ab_engines(torch, q, k, v, dout, options, {"bwd"})]
        notes = cast_notes(grads)
        times = alternated_loop_ms(engines, args.rounds, args.seconds)
        sm90_backward.CAST_DQ_BY_LANE = True
        _calls.clear()
        after, by_lane = (statistics.median(times[name]) for name in ("after grid", "by lane"))
        cudnn = statistics.median(times["cuDNN"]) if "cuDNN" in times else None
        versus = "n/a" if cudnn is None else f"{cudnn / after:.3f} → {cudnn / by_lane:.3f}"
        print(f"| {d} | {n} | {'causal' if options else 'none'} | {after:.3f} | {by_lane:.3f} | "
              f"{by_lane / after:.3f} | {'n/a' if cudnn is None else f'{cudnn:.3f}'} | {versus} | {notes} |",
              flush=True)
        del q, k, v, dout, engines, grads
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
