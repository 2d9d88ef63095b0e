"""``check_sharded``: ring attention across ranks against one device and against float64.

The check builds one problem (random q, k, v of a fixed seed), shards it, runs
:func:`~cuflash.parallel.ring_attention` and its backward on ``ranks`` ranks, gathers the
shards, and compares:

- with the float64 oracle, under the project's rule ``max|result − ref64| ≤
  2·max|naive − ref64| + 1e-5``: ``out`` and ``lse`` on sampled query rows, ``dq``, ``dk``, ``dv``
  everywhere (``dout`` is random on the sampled rows and zero elsewhere, so the float64 gradients
  of the whole problem need only those rows; see ``cuflash.check.verify``);
- with ``cuflash.attention`` on one device (the largest difference, for information), and the
  times of both.

Ranks are processes, one per GPU, started by ``python -m cuflash.parallel.launch`` and joined
by NCCL (``mode="processes"``), or a :class:`~cuflash.parallel.LocalRing` in this process
on one device, CPU or GPU (``mode="simulated"``). ``python -m cuflash.parallel.check --ranks 2``
runs it from a shell.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy

import cuflash
from cuflash import _checks
from cuflash._files import write_atomically
from cuflash.check import rule, verify

from . import layout as _layout
from .comm import LocalRing
from .ring import ring_attention, ring_attention_backward

__all__ = ["ShardedCheck", "check_sharded", "gpu_count"]

_DTYPES = ("float16", "bfloat16", "float32")


def _dtype_name(dtype) -> str:
    """The name of ``dtype``: one of ``_DTYPES``, or a NumPy dtype or scalar type of one. The
    check's configuration holds the name, which its record (JSON) and report can write."""
    allowed = f"dtype must be one of {', '.join(_DTYPES)} (a name or a NumPy dtype)"
    if not isinstance(dtype, str):
        try:
            dtype = numpy.dtype(dtype).name
        except TypeError:
            raise TypeError(f"{allowed}, got {dtype!r}") from None
    if dtype not in _DTYPES:
        raise ValueError(f"{allowed}, got {dtype!r}")
    return dtype


def _dtype(name: str) -> numpy.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return numpy.dtype(ml_dtypes.bfloat16)
    return numpy.dtype(_dtype_name(name))


def gpu_count() -> int:
    """CUDA devices CuPy sees (0 without CuPy or a driver)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device
        return 0


@dataclass
class Comparison:
    name: str
    error: float
    naive_error: float
    rows: str
    single_difference: float  # max|ring − single-device cuflash|

    @property
    def allowed(self) -> float:
        return rule.allowed(self.naive_error)

    @property
    def passed(self) -> bool:
        return rule.passes(self.error, self.naive_error)


@dataclass
class ShardedCheck:
    """The outcome of :func:`check_sharded`: ``passed``, ``report()``, ``record()``."""

    config: dict
    comparisons: list[Comparison] = field(default_factory=list)
    times: dict = field(default_factory=dict)  # seconds: ring_forward, ring_backward, ...

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def record(self) -> dict:
        def finite(x):
            return x if numpy.isfinite(x) else None
        # JSON has no infinity: a timeout of inf (no deadline) is written as null.
        config = {name: finite(value) if isinstance(value, float) else value
                  for name, value in self.config.items()}
        return {"config": config, "times_s": self.times, "passed": self.passed,
                "comparisons": {c.name: {"error": finite(c.error), "allowed": finite(c.allowed),
                                         "naive_error": finite(c.naive_error), "rows": c.rows,
                                         "max_diff_vs_single": finite(c.single_difference),
                                         "passed": c.passed} for c in self.comparisons}}

    def report(self) -> str:
        c = self.config
        options = ", ".join(filter(None, [
            "causal" if c["causal"] else "non-causal",
            f"window={tuple(c['window'])}" if tuple(c["window"]) != (-1, -1) else "",
            f"softcap={c['softcap']:g}" if c["softcap"] else ""]))
        reference = f"reference: float64 on {c['rows_checked']} of {c['seq_len']:,} query rows"
        # dout is zero only off the sample: with no backward, or every row, there is no
        # "elsewhere" to speak of.
        if c["backward"] and c["rows_checked"] != c["seq_len"]:
            reference += "; backward: dout random on those rows, zero elsewhere"
        lines = [
            f"cuflash ring attention — {c['ranks']} ranks ({c['mode']}, {c['device']}), layout "
            f"{c['layout']}; {c['seq_len']:,} tokens, {c['heads']} heads ({c['kv_heads']} "
            f"kv) × {c['head_dim']}, {c['dtype']}, {options}",
            reference, ""]
        t = self.times
        simulated = [name for name in t if name.endswith("_simulated")]
        if simulated:
            lines += [f"simulated ring, every rank a thread of this process: "
                      f"{_ms(t[simulated[0]])} (not a speed)", ""]
        elif t:
            lines.append(f"{'':10}{'ring':>12}{'one device':>14}   per rank: time (transfers "
                         f"on the side stream, overlapped)")
            for phase in ("forward", "backward"):
                if f"ring_{phase}" in t:
                    ranks = zip(t.get(f"ring_{phase}_per_rank", []),
                                t.get(f"ring_{phase}_transfers_per_rank", []))
                    per_rank = ", ".join(f"{r}: {_ms(s)} ({_ms(c)})"
                                         for r, (s, c) in enumerate(ranks))
                    lines.append(f"{phase:10}{_ms(t.get(f'ring_{phase}')):>12}"
                                 f"{_ms(t.get(f'single_{phase}')):>14}   {per_rank}")
            lines.append("")
        lines.append(f"{'':6}{'rows':>12}{'max |error|':>14}{'allowed':>12}"
                     f"{'naive ' + c['dtype']:>18}{'vs one device':>16}")
        for cmp in self.comparisons:
            lines.append(f"{cmp.name:6}{cmp.rows:>12}{cmp.error:>14.3e}{cmp.allowed:>12.3e}"
                         f"{cmp.naive_error:>18.3e}{cmp.single_difference:>16.3e}  "
                         f"{'ok' if cmp.passed else 'FAIL'}")
        lines += ["", "PASS" if self.passed else "FAIL"]
        return "\n".join(lines)


def _ms(seconds):
    return "—" if seconds is None else f"{seconds * 1e3:.3f} ms"


# ----------------------------------------------------------------------------- the problem

def _problem(config: dict):
    """Host arrays q, k, v, dout (dout zero outside the sampled rows) and the sampled rows."""
    from cuflash.check.verify import sample_rows
    dtype = _dtype(config["dtype"])
    n, h, hkv, d = config["seq_len"], config["heads"], config["kv_heads"], config["head_dim"]
    rng = numpy.random.default_rng(config["seed"])
    q = rng.standard_normal((1, h, n, d), dtype=numpy.float32).astype(dtype)
    k = rng.standard_normal((1, hkv, n, d), dtype=numpy.float32).astype(dtype)
    v = rng.standard_normal((1, hkv, n, d), dtype=numpy.float32).astype(dtype)
    rows = sample_rows(n, config["rows"], config["seed"])
    dout = numpy.zeros(q.shape, dtype)
    dout[:, :, rows] = rng.standard_normal((1, h, len(rows), d),
                                           dtype=numpy.float32).astype(dtype)
    return q, k, v, dout, rows


def _options(config):
    return dict(causal=config["causal"], window=tuple(config["window"]),
                softcap=config["softcap"])


def _rank_work(comm, q, k, v, dout, config, *, timer=None):
    """One rank: ring forward and backward on its shards; optionally timed."""
    options = dict(_options(config), layout=config["layout"])
    out, lse = ring_attention(q, k, v, comm=comm, return_lse=True, **options)
    grads = (ring_attention_backward(dout, q, k, v, out, lse, comm=comm, **options)
             if config["backward"] else None)
    times = {}
    if timer is not None:
        phases = [("forward", lambda: ring_attention(q, k, v, comm=comm, **options))]
        if config["backward"]:
            phases.append(("backward", lambda: ring_attention_backward(
                dout, q, k, v, out, lse, comm=comm, **options)))
        for phase, fn in phases:
            times[f"ring_{phase}"], times[f"ring_{phase}_transfers"] = timer(fn)
    return out, lse, grads, times


def _gpu_timer(comm, repeats):
    """``timer(fn)``: seconds per call of ``fn`` on this rank, and the seconds its transfers
    took on the communicator's side stream (overlapped with the computation or not)."""
    import cupy

    def timer(fn):
        fn()  # warm-up
        comm.barrier()
        comm.start_timing()
        stream = cupy.cuda.get_current_stream()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        for _ in range(repeats):
            fn()
        end.record(stream)
        end.synchronize()
        seconds = cupy.cuda.get_elapsed_time(start, end) / 1e3 / repeats
        return seconds, comm.transfer_seconds() / repeats
    return timer


def _save(path, **arrays):
    """npz of host arrays, 16-bit floats as uint16 bits (bfloat16 has no npy type)."""
    numpy.savez(path, **{name: (a.view(numpy.uint16) if a.dtype.itemsize == 2 else a)
                         for name, a in arrays.items()})


def _load(path, dtype):
    with numpy.load(path) as data:
        return {name: (data[name].view(dtype) if data[name].dtype == numpy.uint16
                       else data[name]) for name in data.files}


# ----------------------------------------------------------------------------- the worker

def _worker(directory: str) -> int:
    """One process of ``mode="processes"``: run this rank's part, save its results."""
    from .nccl import NcclComm
    import cupy
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    comm = NcclComm.from_env()
    dtype = _dtype(config["dtype"])
    host = _load(os.path.join(directory, "inputs.npz"), dtype)
    layout = config["layout"]
    q, k, v, dout = (cupy.asarray(_layout.shard(host[name], comm.rank, comm.size, layout))
                     for name in ("q", "k", "v", "dout"))
    out, lse, grads, times = _rank_work(comm, q, k, v, dout, config,
                                        timer=_gpu_timer(comm, config["repeats"]))
    results = {"out": out.get(), "lse": lse.get()}
    if grads is not None:
        results.update(dq=grads[0].get(), dk=grads[1].get(), dv=grads[2].get())
    _save(os.path.join(directory, f"rank{comm.rank}.npz"), **results)
    with open(os.path.join(directory, f"rank{comm.rank}.json"), "w") as f:
        json.dump(times, f)
    comm.barrier()
    comm.close()
    return 0


# ----------------------------------------------------------------------------- the check

def check_sharded(*, ranks: int = 2, device: str = "gpu", mode: str | None = None,
                  seq_len: int | None = None, heads: int = 8, kv_heads: int | None = None,
                  head_dim: int = 64, dtype: str | None = None, causal: bool = True,
                  layout: str = "zigzag", window=(-1, -1), softcap: float = 0.0,
                  backward: bool = True, rows: int = 256, seed: int = 0,
                  repeats: int = 5, timeout: float = 300.0) -> ShardedCheck:
    """Check ring attention on ``ranks`` ranks against float64 and against one device.

    Parameters
    ----------
    ranks : int
        Ranks of the ring (GPUs with ``mode="processes"``).
    device : ``"gpu"`` or ``"cpu"``
        Where the arrays live. ``"cpu"`` is always simulated (NumPy).
    mode : ``"processes"``, ``"simulated"`` or None
        ``processes``: one process per GPU through ``python -m cuflash.parallel.launch`` and
        NCCL (needs ``ranks`` GPUs). ``simulated``: a ``LocalRing`` of ``ranks`` ranks in this
        process, on one device. Default: processes when ``device="gpu"`` and at least
        ``ranks ≥ 2`` GPUs are visible, else simulated.
    seq_len, heads, kv_heads, head_dim, dtype
        The problem, ``(1, heads, seq_len, head_dim)`` queries; defaults 16384 tokens and
        bfloat16 on the GPU, 1024 and float32 on the CPU; ``dtype`` is ``"float16"``,
        ``"bfloat16"`` or ``"float32"``, or a NumPy dtype of one (held by its name). ``seq_len``
        must divide evenly and ``kv_heads`` (default ``heads``) divide ``heads``
        (``ValueError`` otherwise).
    causal, layout, window, softcap
        Options of ``ring_attention``.
    rows : int
        Query rows checked against float64 (the float64 work grows with ``rows × seq_len``).
    repeats : int
        Timed calls (processes mode; each after a warm-up).
    timeout : float
        Communication timeout in seconds; the whole check is stopped after ``10 × timeout``.

    Returns
    -------
    ShardedCheck
        ``passed``, ``report()`` (a printable table), ``record()`` (a JSON-able dict).
    """
    # The arguments first, then the devices: an argument refused by its name, not by what the
    # machine lacks.
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    ranks = _checks.check_int(ranks, "ranks", 1)
    if mode is not None and mode not in ("processes", "simulated"):
        raise ValueError(f"mode must be 'processes' or 'simulated', got {mode!r}")
    if mode == "processes" and device != "gpu":  # not a lack of GPUs: none is looked for
        raise ValueError("mode='processes' needs device='gpu' (one process per GPU); "
                         "device='cpu' is always simulated")
    if seq_len is None:
        seq_len = 16384 if device == "gpu" else 1024
    if dtype is None:
        dtype = "bfloat16" if device == "gpu" else "float32"
    dtype = _dtype_name(dtype)
    seq_len = _checks.check_int(seq_len, "seq_len", 1)
    _layout.check_length(seq_len, ranks, _layout.check_layout(layout), "seq_len")
    heads = _checks.check_int(heads, "heads", 1)
    head_dim = _checks.check_int(head_dim, "head_dim", 1)
    timeout = _checks._real(timeout, "timeout", "a positive number of seconds",
                            "a positive number of seconds")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    kv_heads = _check_kv_heads(kv_heads, heads)
    config = dict(ranks=ranks, device=device, mode=mode, seq_len=seq_len, heads=heads,
                  kv_heads=kv_heads,
                  head_dim=head_dim, dtype=dtype, causal=_checks.check_bool(causal, "causal"),
                  layout=layout, window=list(_checks.check_window(window)),
                  softcap=_checks.check_softcap(softcap, _checks.check_scale(None, head_dim)),
                  backward=_checks.check_bool(backward, "backward"),
                  rows=_checks.check_int(rows, "rows", 1), seed=_checks.check_int(seed, "seed", 0),
                  repeats=_checks.check_int(repeats, "repeats", 1), timeout=timeout)
    visible = gpu_count() if device == "gpu" else 0
    if device == "gpu" and visible == 0:
        raise RuntimeError("device='gpu' but CuPy sees no CUDA device")
    if mode is None:
        mode = "processes" if device == "gpu" and ranks >= 2 and visible >= ranks else \
            "simulated"
    if mode == "processes" and visible < ranks:
        raise RuntimeError(f"mode='processes' needs {ranks} GPUs, {visible} visible")
    config["mode"] = mode
    q, k, v, dout, sampled = _problem(config)
    config["rows_checked"] = len(sampled)
    if mode == "processes":
        shards, times = _run_processes(config, q, k, v, dout)
    else:
        shards, times = _run_simulated(config, q, k, v, dout)
    return _compare(config, q, k, v, dout, sampled, shards, times)


def _check_kv_heads(kv_heads, heads: int) -> int:
    """The key/value heads (``heads`` when None): a positive int dividing ``heads``, as grouped-
    query attention needs, refused here by name rather than by the ranks, with their shards'
    shapes (and, with processes, only once they run)."""
    if kv_heads is None:
        return heads
    kv_heads = _checks.check_int(kv_heads, "kv_heads", 1)
    if heads % kv_heads:
        raise ValueError(f"kv_heads = {kv_heads} must divide heads = {heads} (each key/value "
                         f"head serves heads / kv_heads query heads)")
    return kv_heads


def _run_simulated(config, q, k, v, dout):
    ranks, layout = config["ranks"], config["layout"]
    if config["device"] == "gpu":
        import cupy
        to_device = cupy.asarray
    else:
        def to_device(a):
            return a
    parts = [[to_device(_layout.shard(x, r, ranks, layout)) for r in range(ranks)]
             for x in (q, k, v, dout)]
    ring = LocalRing(ranks, timeout=config["timeout"])
    start = time.perf_counter()
    results = ring.run(lambda comm, *a: _rank_work(comm, *a, config), *parts)
    elapsed = time.perf_counter() - start
    shards = [_host_results(out, lse, grads) for out, lse, grads, _ in results]
    # A simulated ring runs its ranks one process: the time is the sum of all ranks' work.
    return shards, {_simulated_time_key(config["backward"]): elapsed}


def _simulated_time_key(backward: bool) -> str:
    """The ``times`` key of a simulated ring, named for the phases its one time covers."""
    return "ring_forward_and_backward_simulated" if backward else "ring_forward_simulated"


def _host_results(out, lse, grads):
    def host(a):
        return a.get() if type(a).__module__.partition(".")[0] == "cupy" else numpy.asarray(a)
    result = {"out": host(out), "lse": host(lse)}
    if grads is not None:
        result.update(dq=host(grads[0]), dk=host(grads[1]), dv=host(grads[2]))
    return result


def _run_processes(config, q, k, v, dout):
    from .launch import launch
    dtype = _dtype(config["dtype"])
    with tempfile.TemporaryDirectory(prefix="cuflash-check-sharded-") as directory:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)
        _save(os.path.join(directory, "inputs.npz"), q=q, k=k, v=v, dout=dout)
        command = [sys.executable, "-m", "cuflash.parallel.check", "--worker", directory]
        code = _launch_with_deadline(launch, command, config)
        if code != 0:
            raise RuntimeError(f"the ring attention processes failed (exit code {code}); "
                               f"their output is above")
        shards, times = [], {}
        for r in range(config["ranks"]):
            shards.append(_load(os.path.join(directory, f"rank{r}.npz"), dtype))
            with open(os.path.join(directory, f"rank{r}.json")) as f:
                for name, seconds in json.load(f).items():
                    times.setdefault(f"{name}_per_rank", []).append(seconds)
        for name in [n for n in times if n.endswith("_per_rank")]:
            times[name.removesuffix("_per_rank")] = max(times[name])  # the slowest rank
    return shards, times


def _launch_with_deadline(launch, command, config):
    # The processes import cuflash from where this process did, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(cuflash.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))
    deadline = 10 * config["timeout"]
    try:
        # The launcher itself stops the processes at the deadline, so that none outlives
        # the error.
        return launch(command, config["ranks"], timeout=config["timeout"], env=env,
                      deadline=deadline)
    except TimeoutError:
        raise TimeoutError(f"the ring attention processes did not finish within "
                           f"{deadline:g} s; they were stopped") from None


def _compare(config, q, k, v, dout, sampled, shards, times) -> ShardedCheck:
    layout = config["layout"]
    gathered = {name: _layout.unshard([s[name] for s in shards], layout,
                                      axis=-1 if name == "lse" else -2)
                for name in shards[0]}
    if config["device"] == "gpu":
        import cupy
        xp = cupy
    else:
        xp = numpy
    qd, kd, vd, dd = (xp.asarray(x) for x in (q, k, v, dout))
    options = _options(config)
    # One device, timed.
    single_out, single_lse = cuflash.attention(qd, kd, vd, return_lse=True, **options)
    single_grads = (cuflash.attention_backward(dd, qd, kd, vd, single_out, single_lse,
                                               **options) if config["backward"] else None)
    if config["device"] == "gpu":
        from cuflash.bench.devices import GpuDevice
        gpu = GpuDevice()
        times["single_forward"] = float(numpy.median(gpu.times(
            lambda: cuflash.attention(qd, kd, vd, **options), repeats=config["repeats"])))
        if config["backward"]:
            times["single_backward"] = float(numpy.median(gpu.times(
                lambda: cuflash.attention_backward(dd, qd, kd, vd, single_out, single_lse,
                                                   **options), repeats=config["repeats"])))

    def host(a):
        return a.get() if xp is not numpy else numpy.asarray(a)

    n = config["seq_len"]
    where = "all" if len(sampled) == n else f"{len(sampled)} sampled"
    # The references of the plain check, head by head and a chunk of rows at a time: the
    # memory its estimate counts, which the command line refuses a sharded check by.
    ref_out, naive_out, ref_lse, naive_lse = map(host, verify.forward_reference(
        xp, qd, kd, vd, sampled, block_mask=None, on_step=None, **options))
    result = ShardedCheck(config, times=times)

    def compare(name, got, ref, naive, single, rows_label, finite_only=False):
        got = numpy.asarray(got, dtype=numpy.float64)
        ref = numpy.asarray(ref, dtype=numpy.float64)
        naive = numpy.asarray(naive, dtype=numpy.float64)
        single = numpy.asarray(single, dtype=numpy.float64)
        if finite_only:  # lse: rows that see nothing must be -inf in both
            seen = numpy.isfinite(ref)
            bad = not numpy.array_equal(numpy.isneginf(got), ~seen)
            got, ref, naive, single = got[seen], ref[seen], naive[seen], single[seen]
        else:
            bad = False
        error = float(numpy.abs(got - ref).max()) if got.size else 0.0
        if bad or numpy.isnan(got).any():
            error = float("nan")
        naive_error = float(numpy.abs(naive - ref).max()) if got.size else 0.0
        single_diff = float(numpy.abs(got - single).max()) if got.size else 0.0
        result.comparisons.append(Comparison(name, error, naive_error, rows_label, single_diff))

    out_rows = gathered["out"][:, :, sampled]
    compare("out", out_rows, ref_out, naive_out, host(single_out)[:, :, sampled], where)
    compare("lse", gathered["lse"][:, :, sampled], ref_lse, naive_lse,
            host(single_lse)[:, :, sampled], where, finite_only=True)
    for comparison in result.comparisons:  # a NaN in a row outside the sample fails too
        if numpy.isnan(gathered[comparison.name].astype(numpy.float32)).any():
            comparison.error = float("nan")
    if config["backward"]:
        # dq is exactly 0 on the rows outside the sample (dout is zero there), in both.
        refs = verify.backward_reference(xp, dd, qd, kd, vd, sampled, block_mask=None,
                                          on_step=None, **options)
        for i, (name, (ref, naive)) in enumerate(zip(("dq", "dk", "dv"), refs)):
            compare(name, gathered[name], host(ref), host(naive), host(single_grads[i]), "all")
    return result


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuflash.parallel.check",
                                     description="Check ring attention across ranks.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--device", choices=("gpu", "cpu"), default=None)
    parser.add_argument("--mode", choices=("processes", "simulated"), default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=_DTYPES, default=None)
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--layout", choices=_layout.LAYOUTS, default="zigzag")
    parser.add_argument("--window", type=int, nargs=2, default=(-1, -1))
    parser.add_argument("--softcap", type=float, default=0.0)
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", help="write the record to this file")
    options = parser.parse_args(argv)
    if options.worker:
        return _worker(options.worker)
    if options.json:  # refused now rather than after the whole check
        directory = os.path.dirname(options.json) or "."
        if not os.path.isdir(directory):
            parser.error(f"--json {options.json}: directory {directory!r} does not exist")
        if os.path.isdir(options.json):
            parser.error(f"--json {options.json}: is a directory; give a file name")
        if not os.access(directory, os.W_OK):
            parser.error(f"--json {options.json}: directory {directory!r} is not writable")
    device = options.device or ("gpu" if gpu_count() else "cpu")
    try:
        result = check_sharded(
            ranks=options.ranks, device=device, mode=options.mode, seq_len=options.seq_len,
            heads=options.heads, kv_heads=options.kv_heads, head_dim=options.head_dim,
            dtype=options.dtype, causal=not options.non_causal, layout=options.layout,
            window=tuple(options.window), softcap=options.softcap,
            backward=not options.forward_only, rows=options.rows, seed=options.seed,
            timeout=options.timeout)
    except (ValueError, TypeError) as error:  # an argument, named in the message
        parser.error(str(error))
    except (RuntimeError, TimeoutError) as error:  # no GPUs for the mode, failed processes
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(result.report())
    if options.json:
        try:
            write_atomically(options.json, json.dumps(result.record(), indent=2).encode())
        except OSError as error:
            print(f"{parser.prog}: error: --json {options.json}: cannot write it "
                  f"({error.strerror or error})", file=sys.stderr)
            return 1
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
