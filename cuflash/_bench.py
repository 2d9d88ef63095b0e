"""Measuring attention: devices, timers, peak memory, and the benchmark sweeps.

``cuflash bench`` and ``benchmarks/bench_attention.py`` are thin over this module; ``cuflash
check`` and ``cuflash memory`` use its devices. The protocol is the one in DESIGN.md:

- FLOPs as in the FlashAttention papers: forward ``4·B·H·Nq·Nk·D``, halved when causal and
  multiplied by the kept fraction of a block mask; backward 2.5 times the forward, so a
  forward+backward step counts 3.5 times the forward.
- GPU times come from CUDA events around each run, after warm-up runs; the median is reported.
- torch's ``scaled_dot_product_attention`` (flash and cuDNN back ends) and compiled FlexAttention
  run side by side in the same process, on the same data handed over through DLPack. torch is
  imported only when asked for; where it is missing its columns read "n/a (torch not
  importable)".
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Callable

import ml_dtypes
import numpy

import cuflash

__all__ = [
    "CpuDevice", "GpuDevice", "Problem", "Unavailable", "dense_problems", "format_dense_table",
    "format_sparse_table", "random_block_layout", "run_dense", "run_sparse", "select_device",
    "sparse_masks",
]

DTYPES = {"float16": numpy.dtype(numpy.float16), "bfloat16": numpy.dtype(ml_dtypes.bfloat16),
          "float32": numpy.dtype(numpy.float32)}

# The dense grid of DESIGN.md: 16K tokens in total (batch = 16384 / N), hidden size 2048
# (heads = 2048 / D), bfloat16.
DENSE_SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
DENSE_HEAD_DIMS = (64, 128)
TOTAL_TOKENS = 16384
HIDDEN = 2048

# The block-sparse sweep: one long sequence, 128×128 blocks.
SPARSE_SEQ_LEN, SPARSE_HEADS, SPARSE_HEAD_DIM, SPARSE_BLOCK = 16384, 32, 64, 128
SPARSE_DENSITIES = (1.0, 0.5, 0.25, 0.1)

IMPLEMENTATIONS = ("cuflash", "sdpa-flash", "sdpa-cudnn", "flex")
BASELINES = IMPLEMENTATIONS[1:]
SPARSE_IMPLEMENTATIONS = ("cuflash", "flex")  # SDPA has no block-sparse masks
MODES = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}
BACKWARD_FLOP_FACTOR = 2.5


class Unavailable(Exception):
    """An implementation cannot run here; the message says why (shown as "n/a (...)")."""


# ----------------------------------------------------------------------------- devices

def format_bytes(n: float) -> str:
    """Bytes in binary units: ``512 B``, ``3.5 KiB``, ``12.0 MiB``, ``1.50 GiB``."""
    if n < 1024:
        return f"{int(n)} B"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


class CpuDevice:
    """NumPy arrays: the tiled CPU path. Peak memory is tracemalloc's (NumPy reports its data
    buffers to it), which slows Python-level allocation a little while it is on."""

    name = "cpu"
    xp = numpy
    out_of_memory = (MemoryError,)

    @property
    def description(self) -> str:
        return f"CPU, NumPy {numpy.__version__}, {os.cpu_count()} cores"

    def asarray(self, a):
        return numpy.asarray(a)

    def to_numpy(self, a):
        return numpy.asarray(a)

    def synchronize(self):
        pass

    def times(self, fn: Callable, *, warmup: int = 0, repeats: int = 1) -> list[float]:
        """Seconds taken by each of ``repeats`` calls of ``fn``, after ``warmup`` calls."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times

    def peak_bytes(self, fn: Callable):
        """``(fn(), bytes)``: the most memory ``fn`` held at once beyond what was held before."""
        started_here = not tracemalloc.is_tracing()
        if started_here:
            tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        try:
            result = fn()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            if started_here:
                tracemalloc.stop()
        return result, max(0, peak - before)

    def free_bytes(self) -> int:
        """Memory available to a new allocation (MemAvailable), or the physical size."""
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def random(self, shape, dtype, seed):
        rng = numpy.random.default_rng(seed)
        return rng.standard_normal(shape, dtype=numpy.float32).astype(dtype)


class GpuDevice:
    """CuPy arrays on the current CUDA device.

    Peak memory counts the bytes of CuPy's memory pool handed out to arrays (a CuPy memory hook
    follows every allocation and release), the analogue of ``torch.cuda.max_memory_allocated``.
    It does not count the pool's cached free blocks, the CUDA context or library workspaces.
    """

    name = "gpu"

    def __init__(self):
        import cupy
        self.xp = cupy
        self.out_of_memory = (cupy.cuda.memory.OutOfMemoryError,)
        self.properties = device_properties()

    @property
    def description(self) -> str:
        p = self.properties
        return (f"{p['name']} (GPU {p['id']}, sm_{p['major']}{p['minor']}, "
                f"{p['multiprocessors']} SMs, {format_bytes(p['total_memory'])})")

    def asarray(self, a):
        return self.xp.asarray(a)

    def to_numpy(self, a):
        return self.xp.asnumpy(a)

    def synchronize(self):
        self.xp.cuda.get_current_stream().synchronize()

    def times(self, fn: Callable, *, warmup: int = 1, repeats: int = 10) -> list[float]:
        """Seconds of GPU time of each of ``repeats`` calls (CUDA events on the current stream),
        after ``warmup`` calls."""
        cupy = self.xp
        stream = cupy.cuda.get_current_stream()
        for _ in range(warmup):
            fn()
        events = []
        for _ in range(repeats):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            fn()
            end.record(stream)
            events.append((start, end))
        events[-1][1].synchronize()
        return [cupy.cuda.get_elapsed_time(start, end) / 1e3 for start, end in events]

    def peak_bytes(self, fn: Callable):
        """``(fn(), bytes)``: the most pool memory ``fn`` held at once beyond what was held
        before (after the work finished on the device)."""
        hook = _peak_hook_class()()
        with hook:
            result = fn()
            self.synchronize()
        return result, hook.peak

    def free_bytes(self) -> int:
        """Free device memory plus what CuPy's pool holds cached and could hand out again."""
        free, _ = self.xp.cuda.runtime.memGetInfo()
        return int(free) + int(self.xp.get_default_memory_pool().free_bytes())

    def random(self, shape, dtype, seed):
        values = self.xp.random.default_rng(seed).standard_normal(shape, dtype=self.xp.float32)
        try:
            return values.astype(dtype)
        except Exception:  # a CuPy that cannot cast to this dtype on the device: cast on the host
            return self.xp.asarray(self.xp.asnumpy(values).astype(dtype))


@functools.cache
def _peak_hook_class():
    """A CuPy ``MemoryHook`` keeping the pool bytes in use and their maximum (built on first use,
    so that this module imports without CuPy)."""
    from cupy.cuda.memory_hook import MemoryHook

    class PeakMemoryHook(MemoryHook):
        name = "cuflash-peak-memory"

        def __init__(self):
            self.in_use = 0
            self.peak = 0

        def malloc_postprocess(self, **kwargs):
            if kwargs.get("mem_ptr"):
                self.in_use += kwargs["mem_size"]
                self.peak = max(self.peak, self.in_use)

        def free_postprocess(self, **kwargs):
            self.in_use -= kwargs["mem_size"]

    return PeakMemoryHook


def device_properties(device_id: int | None = None) -> dict:
    """Name, compute capability, SM count, memory and shared memory of a CUDA device."""
    import cupy
    device_id = cupy.cuda.Device().id if device_id is None else device_id
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    return {
        "id": device_id,
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "major": int(props["major"]),
        "minor": int(props["minor"]),
        "multiprocessors": int(props["multiProcessorCount"]),
        "shared_memory_per_block": int(props["sharedMemPerBlock"]),
        "shared_memory_per_block_optin": int(props.get("sharedMemPerBlockOptin", 0)),
        "total_memory": int(props["totalGlobalMem"]),
    }


def select_device(requested: str = "auto"):
    """``(device, note)`` for ``"gpu"``, ``"cpu"`` or ``"auto"`` (the GPU when the kernels can run).

    ``note`` says why the CPU was chosen under ``"auto"`` (empty otherwise). Asking for ``"gpu"``
    where the kernels cannot run raises ``Unavailable`` with the reason.
    """
    if requested not in ("auto", "gpu", "cpu"):
        raise ValueError(f"device must be 'auto', 'gpu' or 'cpu', got {requested!r}")
    if requested == "cpu":
        return CpuDevice(), ""
    from cuflash import kernels
    usable, reason = kernels.availability()
    if usable:
        return GpuDevice(), ""
    if requested == "gpu":
        raise Unavailable(f"the GPU kernels cannot run here: {reason}")
    return CpuDevice(), f"GPU kernels not usable: {reason}"


# ----------------------------------------------------------------------------- problems

@dataclass(frozen=True)
class Problem:
    """One attention call: ``(batch, heads, seq_len, head_dim)`` inputs, causal or not."""

    batch: int
    heads: int
    seq_len: int
    head_dim: int
    causal: bool
    dtype: str = "bfloat16"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.seq_len, self.head_dim)

    def flops(self, mode: str = "fwd", density: float = 1.0) -> float:
        """FLOPs counted as in the papers (see the module docstring); ``mode`` "fwd" or
        "fwdbwd"."""
        forward = 4 * self.batch * self.heads * self.seq_len**2 * self.head_dim * density
        forward *= 0.5 if self.causal else 1.0
        return forward * (1 + BACKWARD_FLOP_FACTOR if mode == "fwdbwd" else 1)


def dense_problems(seq_lens=DENSE_SEQ_LENS, head_dims=DENSE_HEAD_DIMS, causal=(False, True), *,
                   total_tokens=TOTAL_TOKENS, hidden=HIDDEN, dtype="bfloat16") -> list[Problem]:
    """The dense grid: ``batch = total_tokens // N`` (at least 1), ``heads = hidden // D``."""
    problems = []
    for is_causal in causal:
        for d in head_dims:
            for n in seq_lens:
                problems.append(Problem(batch=max(1, total_tokens // n), heads=max(1, hidden // d),
                                        seq_len=n, head_dim=d, causal=is_causal, dtype=dtype))
    return problems


@dataclass
class Inputs:
    """q, k, v and an output gradient on one device, and their torch views when asked for."""

    q: object
    k: object
    v: object
    dout: object
    torch_views: dict = field(default_factory=dict)

    @classmethod
    def random(cls, device, shape, dtype, seed=0):
        dtype = DTYPES[dtype] if isinstance(dtype, str) else numpy.dtype(dtype)
        return cls(*(device.random(shape, dtype, (seed, i)) for i in range(4)))


# ----------------------------------------------------------------------------- runners

def cuflash_runner(inputs: Inputs, mode: str, *, causal: bool, block_mask=None) -> Callable:
    """A call of cuflash for one timing run: the forward, or forward then backward."""
    q, k, v, dout = inputs.q, inputs.k, inputs.v, inputs.dout

    def forward():
        return cuflash.attention(q, k, v, causal=causal, block_mask=block_mask)

    def forward_backward():
        out, lse = cuflash.attention(q, k, v, causal=causal, block_mask=block_mask,
                                     return_lse=True)
        return cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                          block_mask=block_mask)

    return forward if mode == "fwd" else forward_backward


def import_torch():
    """torch, or ``Unavailable("torch not importable")``."""
    try:
        import torch
    except Exception as error:  # ImportError, or a broken install raising something else
        raise Unavailable("torch not importable") from error
    return torch


def to_torch(torch, x):
    """A torch tensor sharing ``x``'s memory, through DLPack.

    bfloat16 goes through a uint16 view where the DLPack exporter does not know the type.
    """
    try:
        return torch.from_dlpack(x)
    except Exception:
        if numpy.dtype(x.dtype) != numpy.dtype(ml_dtypes.bfloat16):
            raise
        return torch.from_dlpack(x.view(numpy.uint16)).view(torch.bfloat16)


def _torch_inputs(torch, inputs: Inputs, with_grad: bool):
    key = "grad" if with_grad else "plain"
    if key not in inputs.torch_views:
        q, k, v, dout = (to_torch(torch, x) for x in (inputs.q, inputs.k, inputs.v, inputs.dout))
        if with_grad:
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        inputs.torch_views[key] = (q, k, v, dout)
    return inputs.torch_views[key]


def sdpa_runner(backend: str, inputs: Inputs, mode: str, *, causal: bool) -> Callable:
    """torch SDPA restricted to one back end (``"FLASH_ATTENTION"``, ``"CUDNN_ATTENTION"``)."""
    torch = import_torch()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as error:
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel") \
            from error
    if not hasattr(SDPBackend, backend):
        raise Unavailable(f"torch {torch.__version__} has no SDPBackend.{backend}")
    chosen = getattr(SDPBackend, backend)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v, dout = _torch_inputs(torch, inputs, with_grad=mode != "fwd")

    def forward():
        with sdpa_kernel(chosen):
            return sdpa(q, k, v, is_causal=causal)

    def forward_backward():
        with sdpa_kernel(chosen):
            out = sdpa(q, k, v, is_causal=causal)
            return torch.autograd.grad(out, (q, k, v), dout)

    return forward if mode == "fwd" else forward_backward


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, compiled once per process and reused.

    Shapes are static (one compiled graph per shape, as FlexAttention is meant to run); the
    recompile limit is raised so that a sweep over many shapes does not fall back to eager mode.
    """
    torch = import_torch()
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as error:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention") from error
    dynamo_config = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, limit):
            setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 256))
    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(torch, *, seq_len: int, causal: bool, device, layout=None,
                    block_size: int = SPARSE_BLOCK):
    """FlexAttention's BlockMask for ``causal`` and/or a block ``layout`` ``(H', Nb, Nb)``.

    The layout is looked up in the mask function, so create_block_mask finds the same kept
    blocks (all of them full, no element masking) as cuflash's BlockMask with these blocks.
    Returns None for dense non-causal attention.
    """
    if layout is None and not causal:
        return None
    from torch.nn.attention.flex_attention import create_block_mask
    table = None if layout is None else torch.as_tensor(layout, device=device)
    per_head = table is not None and table.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx if causal else q_idx >= 0
        if table is not None:
            keep = keep & table[h if per_head else 0, q_idx // block_size, kv_idx // block_size]
        return keep

    heads = table.shape[0] if per_head else None
    return create_block_mask(mask_mod, None, heads, seq_len, seq_len, device=device,
                             BLOCK_SIZE=block_size)


def flex_runner(inputs: Inputs, mode: str, *, causal: bool, layout=None,
                block_size: int = SPARSE_BLOCK) -> Callable:
    torch = import_torch()
    flex = compiled_flex_attention()
    q, k, v, dout = _torch_inputs(torch, inputs, with_grad=mode != "fwd")
    mask = flex_block_mask(torch, seq_len=q.shape[-2], causal=causal, device=q.device,
                           layout=layout, block_size=block_size)

    def forward():
        return flex(q, k, v, block_mask=mask)

    def forward_backward():
        out = flex(q, k, v, block_mask=mask)
        return torch.autograd.grad(out, (q, k, v), dout)

    return forward if mode == "fwd" else forward_backward


def torch_times(device, fn: Callable, *, warmup: int, repeats: int) -> list[float]:
    """Like ``device.times`` for torch work: CUDA events of torch's current stream."""
    torch = import_torch()
    if device.name == "cpu":
        return device.times(fn, warmup=warmup, repeats=repeats)
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(repeats):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def _time_implementation(device, name, make_runner, *, warmup, repeats):
    """Median seconds of one implementation, or the reason it cannot run."""
    try:
        run = make_runner()
        if name == "cuflash":
            times = device.times(run, warmup=warmup, repeats=repeats)
        else:
            times = torch_times(device, run, warmup=warmup, repeats=repeats)
    except Unavailable as error:
        return None, f"n/a ({error})"
    except device.out_of_memory:
        return None, "n/a (out of memory)"
    except Exception as error:  # a torch back end refusing this shape, a compile failure, ...
        if name == "cuflash":
            raise
        first_sentence = (str(error).strip().splitlines() or [type(error).__name__])[0]
        first_sentence = first_sentence.split(". ")[0].rstrip(".")
        if len(first_sentence) > 160:
            first_sentence = first_sentence[:159] + "…"
        return None, f"n/a ({first_sentence})"
    return statistics.median(times), ""


# ----------------------------------------------------------------------------- dense sweep

def _factories(inputs, mode, *, causal, block_mask=None, layout=None, block_size=SPARSE_BLOCK):
    """For each implementation, a function that prepares its timed call (or raises
    Unavailable)."""
    return {
        "cuflash": lambda: cuflash_runner(inputs, mode, causal=causal, block_mask=block_mask),
        "sdpa-flash": lambda: sdpa_runner("FLASH_ATTENTION", inputs, mode, causal=causal),
        "sdpa-cudnn": lambda: sdpa_runner("CUDNN_ATTENTION", inputs, mode, causal=causal),
        "flex": lambda: flex_runner(inputs, mode, causal=causal, layout=layout,
                                    block_size=block_size),
    }


def run_dense(device, problems, modes=("fwd", "fwdbwd"), *, baselines=BASELINES, warmup=3,
              repeats=20, seed=0, on_step: Callable | None = None) -> list[dict]:
    """Time every problem × mode for cuflash and the torch ``baselines``.

    Returns one record per (problem, mode): sizes, and for each implementation its median time
    in ms and TFLOP/s (None with a note when it did not run), plus ``ratio`` =
    cuflash / SDPA-flash TFLOP/s. ``on_step()`` is called after each implementation.
    """
    records = []
    for problem in problems:
        inputs = Inputs.random(device, problem.shape, problem.dtype, seed)
        for mode in modes:
            record = {"seq_len": problem.seq_len, "head_dim": problem.head_dim,
                      "batch": problem.batch, "heads": problem.heads, "causal": problem.causal,
                      "dtype": problem.dtype, "mode": MODES[mode]}
            record.update(_time_all(device, _factories(inputs, mode, causal=problem.causal),
                                    IMPLEMENTATIONS, baselines, problem.flops(mode),
                                    warmup=warmup, repeats=repeats, on_step=on_step))
            record["ratio"] = _ratio(record["tflops"]["cuflash"], record["tflops"]["sdpa-flash"])
            records.append(record)
        del inputs
    return records


def _time_all(device, factories, columns, baselines, flops, *, warmup, repeats, on_step):
    times, tflops, notes = {}, {}, {}
    for name in columns:
        if name == "cuflash" or name in baselines:
            seconds, note = _time_implementation(device, name, factories[name], warmup=warmup,
                                                 repeats=repeats)
        else:
            seconds, note = None, "n/a (not run)"
        times[name] = None if seconds is None else seconds * 1e3
        tflops[name] = None if seconds is None else flops / seconds / 1e12
        if note:
            notes[name] = note
        if on_step is not None:
            on_step()
    return {"time_ms": times, "tflops": tflops, "notes": notes}


def _ratio(numerator, denominator):
    return None if numerator is None or not denominator else numerator / denominator


# ----------------------------------------------------------------------------- sparse sweep

def random_block_layout(num_blocks: int, density: float, *, seed: int = 0) -> numpy.ndarray:
    """A random ``(num_blocks, num_blocks)`` bool block layout with the diagonal kept.

    About ``density`` of the blocks are kept: the diagonal, plus off-diagonal blocks drawn
    uniformly without replacement to make up the rest (1.0 keeps every block).
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    layout = numpy.eye(num_blocks, dtype=bool)
    off_diagonal = numpy.flatnonzero(~layout)
    wanted = max(0, round(density * num_blocks * num_blocks) - num_blocks)
    rng = numpy.random.default_rng([seed, 3])
    chosen = rng.choice(off_diagonal, size=min(wanted, off_diagonal.size), replace=False)
    layout.reshape(-1)[chosen] = True
    return layout


def sparse_masks(seq_len=SPARSE_SEQ_LEN, block_size=SPARSE_BLOCK, densities=SPARSE_DENSITIES,
                 *, seed=0) -> list[tuple[str, object]]:
    """``(label, BlockMask)`` for the block-sparse sweep: random layouts at ``densities``, the
    butterfly pattern, and 2-D local attention over the image of ``seq_len`` pixels."""
    from cuflash import sparse
    num_blocks = math.ceil(seq_len / block_size)
    shape = (seq_len, seq_len)
    masks = [(f"random {density:g}",
              sparse.BlockMask.from_dense(random_block_layout(num_blocks, density, seed=seed),
                                          block_size=block_size, shape=shape))
             for density in densities]
    masks.append(("butterfly", sparse.BlockMask.from_scipy(
        sparse.butterfly(seq_len, block_size=block_size), level="block",
        block_size=block_size, shape=shape)))
    side = math.isqrt(seq_len)
    if side * side == seq_len:
        radius = max(1, side // 16)
        masks.append((f"image-local r={radius}", sparse.BlockMask.from_scipy(
            sparse.image_local(side, side, radius=radius, block_size=block_size),
            level="block", block_size=block_size, shape=shape)))
    return masks


def run_sparse(device, masks, *, heads=SPARSE_HEADS, head_dim=SPARSE_HEAD_DIM, batch=1,
               modes=("fwd",), baselines=("flex",), warmup=3, repeats=20, seed=0,
               dtype="bfloat16", on_step: Callable | None = None) -> list[dict]:
    """Time cuflash and FlexAttention on the same block masks (non-causal).

    TFLOP/s are effective: the dense FLOPs times the mask's kept fraction, over the time.
    ``ratio`` is cuflash / FlexAttention.
    """
    records = []
    for label, mask in masks:
        seq_len = mask.shape[0]
        problem = Problem(batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim,
                          causal=False, dtype=dtype)
        inputs = Inputs.random(device, problem.shape, dtype, seed)
        for mode in modes:
            factories = _factories(inputs, mode, causal=False, block_mask=mask,
                                   layout=mask.to_dense(), block_size=mask.block_size[0])
            record = {"mask": label, "density": mask.density, "seq_len": seq_len,
                      "heads": heads, "head_dim": head_dim, "batch": batch, "dtype": dtype,
                      "mode": MODES[mode]}
            record.update(_time_all(device, factories, SPARSE_IMPLEMENTATIONS, baselines,
                                    problem.flops(mode, density=mask.element_density),
                                    warmup=warmup, repeats=repeats, on_step=on_step))
            record["ratio"] = _ratio(record["tflops"]["cuflash"], record["tflops"]["flex"])
            records.append(record)
        del inputs
    return records


# ----------------------------------------------------------------------------- tables

class _Footnotes:
    """Numbers the reasons an implementation could not run, so table cells stay narrow."""

    def __init__(self):
        self.reasons: dict[str, int] = {}

    def cell(self, record, name, table="tflops", digits=1):
        value = record[table].get(name)
        if value is not None:  # small values (the CPU path) keep three significant digits
            return f"{value:.{digits}f}" if value >= 10**(2 - digits) else f"{value:.3g}"
        note = record["notes"].get(name, "n/a")
        reason = note[len("n/a ("):-1] if note.startswith("n/a (") else note
        return f"n/a [{self.reasons.setdefault(reason, len(self.reasons) + 1)}]"

    def lines(self):
        return [f"[{i}] {reason}" for reason, i in self.reasons.items()]


def _format(header, rows, footnotes):
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths))
             for row in [header, *rows]]
    return "\n".join(lines + footnotes.lines())


def _ratio_cell(record):
    return "-" if record["ratio"] is None else f"{record['ratio']:.2f}"


def format_dense_table(records) -> str:
    """The dense sweep as an aligned text table of TFLOP/s, with the cuflash / SDPA-flash ratio."""
    notes = _Footnotes()
    header = ["mode", "causal", "D", "N", "B", "H", *IMPLEMENTATIONS, "cuflash/flash"]
    rows = [[r["mode"], "yes" if r["causal"] else "no", r["head_dim"], r["seq_len"], r["batch"],
             r["heads"], *(notes.cell(r, name) for name in IMPLEMENTATIONS), _ratio_cell(r)]
            for r in records]
    return "TFLOP/s (median of the timed runs)\n" + _format(header, rows, notes)


def format_sparse_table(records) -> str:
    """The block-sparse sweep: time and effective TFLOP/s of cuflash and FlexAttention."""
    notes = _Footnotes()
    header = ["mode", "mask", "density", "cuflash ms", "TFLOP/s", "flex ms", "TFLOP/s",
              "cuflash/flex"]
    rows = [[r["mode"], r["mask"], f"{r['density']:.3f}",
             notes.cell(r, "cuflash", "time_ms", 3), notes.cell(r, "cuflash"),
             notes.cell(r, "flex", "time_ms", 3), notes.cell(r, "flex"), _ratio_cell(r)]
            for r in records]
    return ("effective TFLOP/s = dense FLOPs × kept fraction / time (median of the timed runs)\n"
            + _format(header, rows, notes))
