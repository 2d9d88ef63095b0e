"""The sweeps behind ``cuflash bench``: cuflash and the torch baselines timed on the same inputs.

Times come from the device's timer (CUDA events on the current stream after warm-up runs on the
GPU); the median is reported. An implementation that cannot run (torch missing, a back end
refusing the shape, out of memory) gets None and a note instead of a time.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

import numpy

import cuflash
from cuflash.bench.baselines import flex_runner, sdpa_runner, torch_times
from cuflash.bench.devices import Unavailable
from cuflash.bench.problems import (MODES, SPARSE_BLOCK, SPARSE_DENSITIES, SPARSE_HEAD_DIM,
                                    SPARSE_HEADS, SPARSE_SEQ_LEN, Inputs, Problem, check_modes)

__all__ = ["BASELINES", "IMPLEMENTATIONS", "SPARSE_IMPLEMENTATIONS", "cuflash_over",
           "cuflash_runner", "dense_row", "random_block_layout", "run_dense", "run_sparse",
           "sparse_masks", "sparse_row"]

IMPLEMENTATIONS = ("cuflash", "sdpa-flash", "sdpa-cudnn", "flex")
BASELINES = IMPLEMENTATIONS[1:]
SPARSE_IMPLEMENTATIONS = ("cuflash", "flex")  # SDPA has no block-sparse masks


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


def _check_runs(warmup: int, repeats: int, modes) -> None:
    """Refuse, before any input is made, counts of runs that would time nothing, and modes
    that are not timed."""
    check_modes(modes)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 (the median of the timed runs), got "
                         f"{repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be at least 0, got {warmup}")


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
    _check_runs(warmup, repeats, modes)
    records = []
    for problem in problems:
        inputs = Inputs.random(device, problem.shape, problem.dtype, seed)
        for mode in modes:
            record = dense_row(problem, mode)
            record.update(_time_all(device, _factories(inputs, mode, causal=problem.causal),
                                    IMPLEMENTATIONS, baselines, problem.flops(mode),
                                    warmup=warmup, repeats=repeats, on_step=on_step))
            record["ratio"] = cuflash_over(record, "sdpa-flash")
            records.append(record)
        del inputs
    return records


def dense_row(problem: Problem, mode: str) -> dict:
    """What names a row of the dense sweep: the sizes of ``problem`` and the mode."""
    return {"seq_len": problem.seq_len, "head_dim": problem.head_dim, "batch": problem.batch,
            "heads": problem.heads, "causal": problem.causal, "dtype": problem.dtype,
            "mode": MODES[mode]}


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


def cuflash_over(record, baseline: str):
    """cuflash's TFLOP/s over ``baseline``'s in a sweep's ``record`` (on the same FLOPs, the
    baseline's time over cuflash's: above 1, cuflash is faster), or None where either did not
    run."""
    ours, theirs = record["tflops"].get("cuflash"), record["tflops"].get(baseline)
    return None if ours is None or not theirs else ours / theirs


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


def random_document_lengths(rng, n: int, count: int = 16) -> numpy.ndarray:
    """``count`` random positive lengths summing to ``n`` (documents packed into one sequence):
    the cuts between them drawn uniformly without replacement from rng, a NumPy Generator."""
    if not 1 <= count <= n:
        raise ValueError(f"cannot cut {n} tokens into {count} documents (1 to {n})")
    cuts = numpy.sort(rng.choice(n - 1, size=count - 1, replace=False) + 1)  # from 1..n-1
    return numpy.diff(numpy.concatenate(([0], cuts, [n])))


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
    _check_runs(warmup, repeats, modes)
    records = []
    for label, mask in masks:
        seq_len = mask.shape[0]
        problem = Problem(batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim,
                          causal=False, dtype=dtype)
        inputs = Inputs.random(device, problem.shape, dtype, seed)
        for mode in modes:
            factories = _factories(inputs, mode, causal=False, block_mask=mask,
                                   layout=mask.to_dense(), block_size=mask.block_size[0])
            record = sparse_row(label, mask, heads=heads, head_dim=head_dim, batch=batch,
                                dtype=dtype, mode=mode)
            record.update(_time_all(device, factories, SPARSE_IMPLEMENTATIONS, baselines,
                                    problem.flops(mode, density=mask.element_density),
                                    warmup=warmup, repeats=repeats, on_step=on_step))
            record["ratio"] = cuflash_over(record, "flex")
            records.append(record)
        del inputs
    return records


def sparse_row(label: str, mask, *, heads: int, head_dim: int, batch: int, dtype: str,
               mode: str) -> dict:
    """What names a row of the block-sparse sweep: the mask, the sizes and the mode."""
    return {"mask": label, "density": mask.density, "seq_len": mask.shape[0], "heads": heads,
            "head_dim": head_dim, "batch": batch, "dtype": dtype, "mode": MODES[mode]}
