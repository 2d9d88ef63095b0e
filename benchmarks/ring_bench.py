"""Ring attention on 2 GPUs against 1 GPU: time, scaling efficiency, hidden communication.

    python -m cuflash.parallel.launch --gpus 2 benchmarks/ring_bench.py
    python -m cuflash.parallel.launch --gpus 2 benchmarks/ring_bench.py --seq-lens 128K 256K
    python benchmarks/ring_bench.py --project          the paper projection (no GPU needed)

For each sequence length N (default 128K, 256K, 512K, 1M), bf16, H = 16, D = 128, batch 1,
causal (zigzag layout) and non-causal (contiguous), forward and forward+backward:

- ``1 GPU``: ``cuflash.attention`` (+ ``attention_backward``) on the whole sequence. Both ranks
  run it at once, each on its own GPU; the slower is reported.
- ``2 GPUs``: ``ring_attention`` (+ backward) over NCCL, the slower rank's time.
- ``compute``: the same per-rank cuflash calls and merges, with the communicator replaced by one
  that hands back the local chunk (same shapes, no transfer): what the ring would take if
  communication were free. ``2 GPUs / compute ≤ 1.1`` is the target (communication hidden).
- ``efficiency = t1 / (2·t2)``.

Each time is the median of ``--repeats`` calls (default 1; CUDA events), after one small run
that compiles the kernels. At about 400 TFLOP/s the 1M-token rows alone take about 2 minutes
(causal) and 4 minutes (non-causal) on two H200s, 512K a quarter of that: to stay inside a
10-minute job, run ``--seq-lens 128K 256K 512K`` and ``--seq-lens 1M --masks causal`` (and
``--masks non-causal``) as separate commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cuflash  # noqa: E402
from cuflash.parallel import layout as _layout  # noqa: E402
from cuflash.parallel.comm import CommBase, Done  # noqa: E402
from cuflash.parallel.ring import ring_attention, ring_attention_backward  # noqa: E402

# ----------------------------------------------------------------------------- projection

H200_ATTENTION_FLOPS = 500e12  # bf16 attention, forward (assumed for the backward too)
NVLINK_BYTES_PER_S = 450e9  # per direction per GPU, NVLink 4 (8 GPUs in a node)
IB_BYTES_PER_S = 50e9  # InfiniBand NDR 400 Gb/s, one NIC per GPU
GPUS_PER_NODE = 8
HBM_BYTES_PER_S = 4.3e12  # H200 device memory, as measured by a device-to-device copy


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 ** 2}.get(text[-1:], 1)
    return int(text[:-1] if text[-1:] in "KM" else text) * scale


def project(n: int, gpus: int, *, heads: int = 16, kv_heads: int = 16, head_dim: int = 128,
            causal: bool = True, flops: float = H200_ATTENTION_FLOPS) -> dict:
    """Ring and Ulysses efficiency on paper for ``gpus`` GPUs (8 per node).

    Ring, per step: compute ``4·n²·D·H`` (½ causal, balanced by zigzag; the backward 2.5×)
    with ``n = N/P``, plus the memory traffic of the float32 merge (forward, about 32 bytes per
    output element) or of the float32 dq/dk/dv sums (backward, about 10 per dq element and 14
    per dk and dv element) at ``HBM_BYTES_PER_S``; against sending one K/V chunk
    (``2·n·Hkv·D`` bf16, forward) or one K/V chunk plus its float32 dK/dV (backward, 3× the
    bytes) over the slowest link of the ring (NVLink inside a node, InfiniBand once the ring
    leaves it). Transfers overlap compute, so a step takes ``max(compute, transfer)``; the
    backward's last dK/dV hop is exposed. 1 GPU takes ``P²`` steps' FLOPs at the same rate.

    Ulysses: an all-to-all of q, k, v in and out back (forward), of dout in and dq, dk, dv
    back (backward): ``(P−1)/P`` of those bytes leave each GPU, ``(P−8)/P`` over InfiniBand
    when ``P > 8``; not overlapped with compute. Needs ``P`` to divide ``H`` and ``Hkv``.

    Not modelled: cuflash's lower rate on small chunks (a few thousand tokens), launch and
    NCCL latencies (tens of microseconds per step).
    """
    p = gpus
    local = n / p
    link = NVLINK_BYTES_PER_S if p <= GPUS_PER_NODE else IB_BYTES_PER_S
    step_flops = 4.0 * local * local * head_dim * heads * (0.5 if causal else 1.0)
    kv_bytes = 2 * local * kv_heads * head_dim * 2
    sums = {"fwd": 32 * local * heads * head_dim,
            "bwd": 10 * local * heads * head_dim + 2 * 14 * local * kv_heads * head_dim}
    result = {"n": n, "gpus": p, "link_GBps": link / 1e9, "local_tokens": local}
    for phase, factor, sent in (("fwd", 1.0, kv_bytes), ("bwd", 2.5, 3 * kv_bytes)):
        attention = factor * step_flops / flops
        compute = attention + sums[phase] / HBM_BYTES_PER_S
        transfer = sent / link
        exposed = 2 * kv_bytes / link if phase == "bwd" else 0.0
        ring = p * max(compute, transfer) + exposed
        result[f"ring_{phase}_compute_ms"] = compute * 1e3
        result[f"ring_{phase}_transfer_ms"] = transfer * 1e3
        result[f"ring_{phase}_efficiency"] = p * attention / ring
    total_flops = 4.0 * n * n * head_dim * heads * (0.5 if causal else 1.0)
    if kv_heads % p == 0 and heads % p == 0:
        tensor = local * head_dim * 2  # bytes of one head of one local chunk, bf16
        moved = (2 * heads + 2 * kv_heads) * tensor  # q, k, v in, out back; dout in, dq, dk, dv back
        for phase, factor in (("fwd", 1.0), ("bwd", 2.5)):
            compute = factor * total_flops / p / flops
            leaving = moved * (p - 1) / p
            if p <= GPUS_PER_NODE:
                a2a = leaving / NVLINK_BYTES_PER_S
            else:
                off_node = moved * (p - GPUS_PER_NODE) / p
                a2a = max((leaving - off_node) / NVLINK_BYTES_PER_S, off_node / IB_BYTES_PER_S)
            result[f"ulysses_{phase}_efficiency"] = compute / (compute + a2a)
    else:
        result["ulysses_fwd_efficiency"] = result["ulysses_bwd_efficiency"] = None
    return result


def print_projection(heads=16, kv_heads=16, head_dim=128):
    print(f"Projection on paper: bf16, D = {head_dim}, "
          f"{H200_ATTENTION_FLOPS / 1e12:.0f} TFLOP/s per GPU (forward and backward), "
          f"NVLink {NVLINK_BYTES_PER_S / 1e9:.0f} GB/s inside a node of {GPUS_PER_NODE}, "
          f"InfiniBand {IB_BYTES_PER_S / 1e9:.0f} GB/s between nodes, merges at "
          f"{HBM_BYTES_PER_S / 1e12:.1f} TB/s")
    print("efficiency = time on 1 GPU / (P · time on P GPUs); step = compute of one ring step "
          "(attention + merge), send = its transfer")

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.0f}%"

    blocks = [(heads, kv_heads, (2, 4, 8, 64)), (64, 64, (16, 64))]
    for h, hkv, counts in blocks:
        print()
        print(f"H = {h}, Hkv = {hkv}")
        header = (f"{'N':>6} {'mask':>10} {'P':>3} {'tokens/GPU':>10} {'link':>8} "
                  f"{'fwd step':>9} {'fwd send':>9} {'bwd step':>9} {'bwd send':>9} "
                  f"{'ring fwd':>9} {'ring bwd':>9} {'Ulysses fwd':>12} {'Ulysses bwd':>12}")
        print(header)
        print("-" * len(header))
        for n in (128 * 1024, 1024 * 1024):
            for causal in (True, False):
                for p in counts:
                    r = project(n, p, heads=h, kv_heads=hkv, head_dim=head_dim,
                                causal=causal)
                    print(f"{_label(n):>6} {'causal' if causal else 'non-causal':>10} {p:>3} "
                          f"{int(r['local_tokens']):>10,} {r['link_GBps']:>5.0f}GB/s "
                          f"{_time(r['ring_fwd_compute_ms']):>9} "
                          f"{_time(r['ring_fwd_transfer_ms']):>9} "
                          f"{_time(r['ring_bwd_compute_ms']):>9} "
                          f"{_time(r['ring_bwd_transfer_ms']):>9} "
                          f"{pct(r['ring_fwd_efficiency']):>9} "
                          f"{pct(r['ring_bwd_efficiency']):>9} "
                          f"{pct(r['ulysses_fwd_efficiency']):>12} "
                          f"{pct(r['ulysses_bwd_efficiency']):>12}")


def _time(ms):
    return f"{ms / 1e3:.2f}s" if ms >= 1000 else f"{ms:.2f}ms"


def _label(n):
    return f"{n // (1024 * 1024)}M" if n % (1024 * 1024) == 0 else f"{n // 1024}K"


# ----------------------------------------------------------------------------- measurement

class _LocalOnly(CommBase):
    """A stand-in communicator: ``exchange`` hands back the arrays sent (no transfer), so
    the ring runs exactly the calls it would run, on local chunks of the same shapes."""

    timeout = None

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def exchange(self, send, dst, src, recv_like=None):
        return Done(send)

    def all_to_all(self, arrays):
        return list(arrays)


def _timer(cupy, comm, repeats):
    """Median seconds of ``repeats`` calls (the kernels are compiled by the warm-up run of
    ``main``), the slowest rank's."""
    def measure(fn):
        stream = cupy.cuda.get_current_stream()
        times = []
        for _ in range(repeats):
            comm.barrier()
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
        mine = float(numpy.median(times))
        return max(float(x[0]) for x in comm.all_gather(numpy.array([mine])))  # slowest rank
    return measure


def _single(cupy, measure, full, n, causal, modes):
    """1 GPU: the whole problem (each rank on its own GPU at once); times and sampled rows."""
    q, k, v, dout = full
    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    single = {"fwd": measure(lambda: cuflash.attention(q, k, v, causal=causal))}
    if "fwdbwd" in modes:
        def step():
            o, l_ = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            cuflash.attention_backward(dout, q, k, v, o, l_, causal=causal)
        single["fwdbwd"] = measure(step)
    return single, out[:, :, :: max(1, n // 4096)].copy()  # sampled output, for a check


def _run(cupy, comm, n, heads, head_dim, causal, layout, modes, repeats):
    import ml_dtypes
    bf16 = numpy.dtype(ml_dtypes.bfloat16)
    rank, size = comm.rank, comm.size
    measure = _timer(cupy, comm, repeats)
    shape = (1, heads, n, head_dim)
    gen = cupy.random.default_rng(1234)
    full = [gen.standard_normal(shape, dtype=cupy.float32).astype(bf16) for _ in range(4)]
    rows = {}
    single, ref_rows = _single(cupy, measure, full, n, causal, modes)
    parts = [_layout.shard(x, rank, size, layout) for x in full]
    del full
    ql, kl, vl, dl = parts
    options = dict(causal=causal, layout=layout, validate=False)
    local_only = _LocalOnly(rank, size)

    def fwd(c):
        return lambda: ring_attention(ql, kl, vl, comm=c, **options)

    def fwdbwd(c):
        def step():
            o, l_ = ring_attention(ql, kl, vl, comm=c, return_lse=True, **options)
            ring_attention_backward(dl, ql, kl, vl, o, l_, comm=c, **options)
        return step

    # Correctness of the ring against the 1-GPU output on the sampled rows.
    out = ring_attention(ql, kl, vl, comm=comm, **options)
    gathered = [cupy.asarray(x) for x in comm.all_gather(out)]
    whole = _layout.unshard(gathered, layout)[:, :, :: max(1, n // 4096)]
    difference = float(cupy.abs(whole.astype(cupy.float32) - ref_rows.astype(cupy.float32)).max())
    del out, gathered, whole
    for mode in modes:
        build = fwd if mode == "fwd" else fwdbwd
        ring = measure(build(comm))
        compute = measure(build(local_only))
        flops = 4.0 * n * n * head_dim * heads * (0.5 if causal else 1.0) * \
            (1.0 if mode == "fwd" else 3.5)
        rows[mode] = dict(n=n, mask="causal" if causal else "non-causal", layout=layout,
                          mode=mode, t1=single[mode], t2=ring, compute=compute,
                          efficiency=single[mode] / (size * ring), hidden=ring / compute,
                          tflops_per_gpu=flops / ring / size / 1e12,
                          max_diff_vs_1gpu=difference)
    return list(rows.values())


def _table(rows, gpus):
    header = (f"{'N':>6} {'mask':>10} {'layout':>10} {'mode':>7} {'1 GPU':>10} "
              f"{f'{gpus} GPUs':>10} {'compute':>10} {'efficiency':>10} "
              f"{'ring/compute':>12} {'TFLOP/s/GPU':>11} {'max|diff|':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{_label(r['n']):>6} {r['mask']:>10} {r['layout']:>10} "
            f"{'fwd' if r['mode'] == 'fwd' else 'fwd+bwd':>7} {r['t1'] * 1e3:>8.1f}ms "
            f"{r['t2'] * 1e3:>8.1f}ms {r['compute'] * 1e3:>8.1f}ms {100 * r['efficiency']:>9.1f}% "
            f"{r['hidden']:>11.3f}{'' if r['hidden'] <= 1.1 else '!'} "
            f"{r['tflops_per_gpu']:>11.0f} {r['max_diff_vs_1gpu']:>10.2e}")
    lines.append("efficiency = t1 / (P·t2); ring/compute ≤ 1.1 means communication is hidden "
                 "('!' marks a miss); max|diff| = ring vs 1 GPU on sampled output rows")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", action="store_true",
                        help="print the paper projection for 2, 4, 8, 64 GPUs and exit")
    parser.add_argument("--seq-lens", nargs="+", default=["128K", "256K", "512K", "1M"])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--masks", nargs="+", choices=("causal", "non-causal"),
                        default=["causal", "non-causal"])
    parser.add_argument("--modes", nargs="+", choices=("fwd", "fwdbwd"),
                        default=["fwd", "fwdbwd"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", help="write the rows to this file (rank 0)")
    options = parser.parse_args(argv)
    if options.project:
        print_projection(heads=options.heads, head_dim=options.head_dim)
        return 0

    import cupy

    from cuflash.parallel import NcclComm
    comm = NcclComm.from_env()
    if comm.rank == 0:
        print(f"ring attention benchmark: {comm.size} GPUs ({cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}), "
              f"bf16, H = {options.heads}, D = {options.head_dim}, batch 1, median of "
              f"{options.repeats}", flush=True)
    # Compile the kernels before anything is timed.
    _run(cupy, comm, 8192 * comm.size, options.heads, options.head_dim, True, "zigzag",
         options.modes, 1)
    rows = []
    for text in options.seq_lens:
        n = _size(text)
        for mask in options.masks:
            causal = mask == "causal"
            layout = "zigzag" if causal else "contiguous"
            _layout.check_length(n, comm.size, layout)
            result = _run(cupy, comm, n, options.heads, options.head_dim, causal, layout,
                          options.modes, options.repeats)
            rows += result
            cupy.get_default_memory_pool().free_all_blocks()
            if comm.rank == 0:
                for r in result:
                    print(f"  {_label(n)} {mask} {r['mode']}: 1 GPU {r['t1']:.3f} s, "
                          f"{comm.size} GPUs {r['t2']:.3f} s, compute {r['compute']:.3f} s",
                          flush=True)
    if comm.rank == 0:
        print()
        print(_table(rows, comm.size))
        if options.json:
            with open(options.json, "w") as f:
                json.dump(rows, f, indent=2)
    comm.barrier()
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
