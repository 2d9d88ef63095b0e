"""``cuflash check`` without the command line: run, time, measure, compare with float64.

At 16K–64K tokens the float64 reference of every query row is costly, so it is computed for a
sample of query rows (``rows``), on the same device as the arrays:

- forward: ``out`` on the sampled rows against ``cuflash.reference.chunked_attention`` on those
  rows; the same-precision baseline is ``reference.naive_attention`` on the same rows.
- backward: ``dout`` is random on the sampled rows and zero on every other row. The rows outside
  the sample then contribute nothing to dk and dv and have dq = 0 exactly, so the float64
  gradients of the whole problem need only the sampled rows of the score matrix: the reference
  for dq (every row), dk and dv is exact and costs as much as the forward reference.

A result passes the rule of :mod:`cuflash.check.rule`, ``max|result − ref64| ≤
2·max|naive − ref64| + 1e-5``, where ``naive`` is the plain same-precision computation on the same
rows. Results are poisoned (filled with NaN) before the call, and any NaN left anywhere fails.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy

import cuflash
from cuflash import _checks, reference
from cuflash.bench.estimate import (CALIBRATION_HEAD_DIM, CPU_ASSUMED_FLOPS, CPU_SMALL_FLOPS,
                                    attention_seconds, compile_seconds, kernel_variants)
from cuflash.bench.problems import BACKWARD_FLOP_FACTOR, DTYPES, forward_flops
from cuflash.check import rule
from cuflash.check.pathfinder import FOURIER_FEATURES
from cuflash.sparse import BlockMask

# Scores held at once by a reference step: 2**25 float64 values (256 MiB) per temporary.
REFERENCE_SCORES = 2**25


def sample_rows(n: int, count: int | None, seed: int) -> numpy.ndarray:
    """Sorted query rows to check: the first, the last (from ``count`` 2 on), and random others;
    all when ``count`` is None or at least ``n``."""
    allowed = "count must be a positive number of rows or None"
    if count is not None and not _checks.is_integer(count):  # True would read as one row
        raise TypeError(f"{allowed}, got {count!r} of type {type(count).__name__}")
    if count is not None and count < 1:  # no rows would compare nothing, and pass
        raise ValueError(f"{allowed}, got {count}")
    if count is None or count >= n:
        return numpy.arange(n)
    rng = numpy.random.default_rng([seed, 4])
    middle = rng.choice(numpy.arange(1, n - 1), size=max(0, count - 2), replace=False)
    return numpy.unique(numpy.concatenate([[0, n - 1], middle])).astype(numpy.int64)[:count]


def estimate_bytes(n: int, heads: int, head_dim: int, itemsize: int, rows: int, backward: bool
                   ) -> int:
    """Device memory a check needs, roughly: the most :func:`run_check` holds at once, and a
    tenth more.

    Its arrays (q, k, v, out, lse; with the backward, dout, dq, dk, dv) are held throughout. The
    peak comes with one of the reference's steps, with the comparison of out (which also scans
    the whole of out for NaN) or, with the backward, with the float64 and baseline gradients of
    the whole problem: while a step runs, as the baseline's float32 sums are cast, or as they
    are compared. cuflash's own workspace (a float32 dq accumulator, the row sums) is smaller
    than those gradients and released before the reference starts: it never sets the peak.
    """
    elements = heads * n * head_dim  # of q, and of every array as large
    sampled = heads * min(rows, n) * head_dim  # of out on the sampled rows
    held = (8 if backward else 4) * elements * itemsize + heads * n * 4
    chunk = min(rows, max(1, REFERENCE_SCORES // n))
    step = 6 * chunk * n * 8 + 6 * n * head_dim * 8  # the temporaries of one head's step
    out_refs = sampled * (8 + itemsize)  # float64 and baseline out on the sampled rows
    compared = 2 * 8  # per element compared: the float64 difference and its absolute value
    scanned = 4 + 1  # per element of out scanned for NaN: a float32 copy and its flags
    peaks = [out_refs + step,
             out_refs + sampled * itemsize + max(sampled * compared, elements * scanned)]
    if backward:
        grads64, sums32, casts = (3 * elements * size for size in (8, 4, itemsize))
        peaks += [out_refs + sampled * itemsize + grads64 + sums32 + max(step, casts),
                  grads64 + casts + elements * compared]
    return int(1.1 * (held + max(peaks)))


# The float64 rate assumed for the reference on a GPU (consumer parts reach about this much).
GPU_FLOAT64_FLOPS = 1e12
REFERENCE_FLOPS_PER_ELEMENT = 8  # per score and head dimension: float64 and naive, two products
CALIBRATION_TOKENS = 256


def estimate_seconds(device, n: int, heads: int, head_dim: int, dtype, rows: int, *,
                     backward: bool, causal: bool = False, fraction: float = 1.0,
                     repeats: int = 10) -> float:
    """Roughly how long :func:`run_check` takes: cuflash's calls (:func:`measured_calls`) and
    the first compile of their kernels, plus the float64 reference on ``rows`` rows."""
    calls = measured_calls(device, repeats)
    seconds = attention_seconds(device, batch=1, heads=heads, seq_len=n, head_dim=head_dim,
                                dtype=dtype, causal=causal, fraction=fraction, backward=backward,
                                calls=calls)
    seconds += compile_seconds(device, kernel_variants(1, ("fwdbwd" if backward else "fwd",)))
    scores = heads * min(rows, n) * n
    passes = 1 + (2.5 if backward else 0)
    flops = passes * scores * head_dim * REFERENCE_FLOPS_PER_ELEMENT
    if device.name == "gpu":
        return seconds + flops / GPU_FLOAT64_FLOPS
    if flops < CPU_SMALL_FLOPS:
        return seconds + flops / CPU_ASSUMED_FLOPS
    # The reference's time per score grows with the head dimension: it is timed on a bounded
    # one (CALIBRATION_HEAD_DIM) and scaled, so that timing it stays small.
    timed = min(head_dim, CALIBRATION_HEAD_DIM)
    per_score = _cpu_reference_seconds(timed, numpy.dtype(dtype).name, backward)
    return seconds + scores * per_score * (head_dim / timed)


@functools.cache
def _cpu_reference_seconds(head_dim: int, dtype_name: str, backward: bool) -> float:
    """Seconds per score (row × key × head) of the reference steps on the CPU, timed once on a
    small problem."""
    n = CALIBRATION_TOKENS
    rng = numpy.random.default_rng(0)
    dtype = DTYPES[dtype_name]
    q, k, v, dout = (rng.standard_normal((1, 1, n, head_dim), dtype=numpy.float32).astype(dtype)
                     for _ in range(4))
    rows = numpy.arange(n)
    start = time.perf_counter()
    forward_reference(numpy, q, k, v, rows, causal=False, block_mask=None, on_step=None)
    if backward:
        backward_reference(numpy, dout, q, k, v, rows, causal=False, block_mask=None,
                            on_step=None)
    return (time.perf_counter() - start) / (n * n)


# The float64 work of making one head of Pathfinder inputs, per token: Fourier angles, their
# cosines and sines, the features (PATHFINDER_FEATURES values each), and q, k and v before
# their cast (3 × head_dim values).
PATHFINDER_FEATURES = 5 * FOURIER_FEATURES + 1


def estimate_host_bytes(n: int, heads: int, head_dim: int, itemsize: int, rows: int,
                        backward: bool, block_size: int | None = None) -> int:
    """Host memory a check of arrays on a GPU needs, roughly (``estimate_bytes`` is the GPU's;
    on the CPU the host is the device): q, k, v made on the host and kept there, the float32
    draws or float64 features they are made from, the output gradient made there, and with a
    block mask of ``block_size`` blocks the reference's element mask of a chunk of rows, cut
    from the mask's dense layout. The block mask itself is not counted."""
    elements = heads * n * head_dim
    tensor = elements * itemsize
    making = max(elements * 4, n * (PATHFINDER_FEATURES + 3 * head_dim) * 8)
    total = 3 * tensor + making
    if backward:  # dout, and its float32 values on the sampled rows
        total += tensor + heads * min(rows, n) * head_dim * 4
    if block_size is not None:
        blocks = -(-n // block_size)
        chunk = min(rows, max(1, REFERENCE_SCORES // n))
        total += blocks * blocks + chunk * n + 8 * n  # layout, a chunk's mask, key indices
    return int(1.1 * total)


ATTENDED_CHUNK = 2**20  # blocks counted at once by attended_fraction


def attended_fraction(block_mask, causal: bool) -> float:
    """The fraction ``forward_flops`` multiplies its count by: 1 without a block mask, else the
    mask's element density, or, when causal, the fraction of the N(N+1)/2 pairs with key <=
    query that lie in kept blocks (``forward_flops`` halves for causal already: a mask that is
    causal itself, causal or prefix-lm, keeps nearly all of them, not half)."""
    if block_mask is None:
        return 1.0
    if not causal:
        return block_mask.element_density
    (nq, nk), (bq, bk) = block_mask.shape, block_mask.block_size
    heads = block_mask.to_scipy()
    heads = heads if isinstance(heads, list) else [heads]
    dtype = _pair_count_dtype(nq, nk, bq, bk)
    pairs = 0
    for blocks in heads:
        coo = blocks.tocoo()
        # a long mask keeps tens of millions of blocks: a bounded number of them at a time
        for start in range(0, coo.nnz, ATTENDED_CHUNK):
            row0 = coo.row[start:start + ATTENDED_CHUNK].astype(dtype) * bq
            col0 = coo.col[start:start + ATTENDED_CHUNK].astype(dtype) * bk
            pairs += _pairs_on_or_below_diagonal(row0, numpy.minimum(row0 + bq, nq), col0,
                                                 numpy.minimum(bk, nk - col0))
    return 2 * pairs / (len(heads) * nq * (nq + 1))  # Python ints: one rounding


def _pair_count_dtype(nq: int, nk: int, bq: int, bk: int):
    """int64 where every count ``_pairs_on_or_below_diagonal`` forms for blocks of this mask
    (and their sum over ATTENDED_CHUNK blocks) fits it, else object (Python ints): int64 would
    wrap silently past 2**63 - 1, which problems of billions of tokens reach."""
    width = min(bk, nk)
    largest = max((nq + width + 1) * width, ATTENDED_CHUNK * min(bq, nq) * width)
    return numpy.int64 if largest < 2**63 else object


def _pairs_on_or_below_diagonal(row0, row1, col0, width) -> int:
    """Pairs (row, key) with key <= row in the blocks of rows [row0, row1) and keys
    [col0, col0 + width), summed."""
    def below(stop):  # over the rows < stop: a triangle over the first keys, then whole rows
        d = numpy.maximum(stop - col0, 0)
        triangle = numpy.minimum(d, width)
        return triangle * (triangle + 1) // 2 + (d - triangle) * width

    return int((below(row1) - below(row0)).sum())


@dataclass
class Comparison:
    """One result against float64: its error, the naive same-precision error, the bound."""

    name: str
    error: float
    naive_error: float
    where: str

    @property
    def allowed(self) -> float:
        return rule.allowed(self.naive_error)

    @property
    def passed(self) -> bool:
        return rule.passes(self.error, self.naive_error)

    def record(self) -> dict:
        finite = (lambda x: x if math.isfinite(x) else None)
        return {"error": finite(self.error), "allowed": finite(self.allowed),
                "naive_error": finite(self.naive_error), "rows": self.where,
                "passed": self.passed}


@dataclass
class Phase:
    """Time, work and peak memory of the forward or the backward pass."""

    seconds: float
    flops: float
    peak_bytes: int

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12 if self.seconds > 0 else float("nan")

    def record(self) -> dict:
        return {"time_s": self.seconds, "tflops": self.tflops, "flops": self.flops,
                "peak_bytes": self.peak_bytes}


@dataclass
class CheckResult:
    forward: Phase
    backward: Phase | None
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)


def _max_error(xp, got, ref) -> float:
    """``max|got − ref|`` in float64; NaN anywhere in ``got`` gives NaN."""
    if got.size == 0:
        return 0.0
    return float(xp.max(xp.abs(got.astype(xp.float64) - ref)))


def _nan_free(xp, *arrays) -> bool:
    return not any(bool(xp.isnan(a.astype(xp.float32)).any()) for a in arrays)


def measured_calls(device, repeats: int) -> int:
    """How many calls of cuflash :func:`_measured` makes for one phase (see there)."""
    return 2 if device.name == "cpu" else repeats + 2


def _measured(device, fn: Callable, *, repeats: int, inputs, flops: float):
    """``(fn(), Phase)``. On the GPU a first call (which also compiles), then ``repeats`` timed
    calls give the median time, then one more call the peak memory. On the CPU one call gives
    the peak memory (and loads the NumPy path), then one more is timed: tracemalloc, which
    measures the CPU's peak, slows NumPy's allocations, so the timed call is not traced.
    :func:`measured_calls` counts these calls. ``fn`` writes into the same arrays each time (the
    results given to cuflash), so the result holds the last call's values. The bytes of
    ``inputs`` are added to the peak."""
    held = sum(x.nbytes for x in inputs)
    if device.name == "cpu":
        result, peak = device.peak_bytes(fn)
        (elapsed,) = device.times(fn, warmup=0, repeats=1)
        return result, Phase(elapsed, flops, held + peak)
    result = fn()
    device.synchronize()
    elapsed = float(numpy.median(device.times(fn, warmup=0, repeats=repeats)))
    _, peak = device.peak_bytes(fn)
    return result, Phase(elapsed, flops, held + peak)


def run_check(device, q, k, v, *, rows, causal: bool, block_mask=None, backward: bool = True,
              repeats: int = 10, seed: int = 0, on_step: Callable | None = None) -> CheckResult:
    """Run cuflash on ``q, k, v`` (``(1, H, N, D)`` arrays of ``device``), time it, and compare
    the sampled ``rows`` (and, for the backward, every gradient) with float64.

    ``on_step()`` is called after each reference step (see :func:`reference_steps`).
    """
    xp = device.xp
    _, heads, n, head_dim = q.shape
    options = {"causal": causal, "block_mask": block_mask}
    flops = forward_flops(1, heads, n, n, head_dim, causal=causal,
                          fraction=attended_fraction(block_mask, causal))
    poisoned = xp.full(q.shape[:-1] + v.shape[-1:], xp.nan, dtype=q.dtype)
    (out, lse), fwd = _measured(
        device, lambda: cuflash.attention(q, k, v, return_lse=True, out=poisoned, **options),
        repeats=repeats, inputs=(q, k, v, poisoned), flops=flops)

    bwd, grads, dout = None, None, None
    if backward:
        dout = _sparse_dout(device, out, rows, seed)
        # poisoned too: with dout zero outside the sample, most of dq is exactly zero, as fresh
        # memory often is
        dq, dk, dv = (xp.full(x.shape, xp.nan, dtype=x.dtype) for x in (q, k, v))
        grads, bwd = _measured(
            device, lambda: cuflash.attention_backward(dout, q, k, v, out, lse, dq=dq, dk=dk,
                                                       dv=dv, **options),
            repeats=repeats, inputs=(q, k, v, out, lse, dout, dq, dk, dv),
            flops=BACKWARD_FLOP_FACTOR * flops)

    result = CheckResult(fwd, bwd)
    where = "all" if len(rows) == n else f"{len(rows)} sampled"
    ref, naive, _, _ = forward_reference(xp, q, k, v, rows, causal=causal,
                                          block_mask=block_mask, on_step=on_step)
    got = out[:, :, xp.asarray(rows)]
    result.comparisons.append(
        Comparison("out", _max_error(xp, got, ref), _max_error(xp, naive, ref), where))
    if not _nan_free(xp, out, lse):  # unwritten output rows outside the sample fail too
        result.comparisons[-1].error = float("nan")
    if backward:
        refs = backward_reference(xp, dout, q, k, v, rows, causal=causal, block_mask=block_mask,
                                   on_step=on_step)
        for name, got, (ref, naive) in zip(("dq", "dk", "dv"), grads, refs):
            result.comparisons.append(
                Comparison(name, _max_error(xp, got, ref), _max_error(xp, naive, ref), "all"))
    return result


def _sparse_dout(device, out, rows, seed):
    """Random output gradient on ``rows``, zero elsewhere (see the module docstring)."""
    rng = numpy.random.default_rng([seed, 5])
    values = rng.standard_normal(out.shape[:2] + (len(rows), out.shape[-1]), dtype=numpy.float32)
    dout = numpy.zeros(out.shape, dtype=out.dtype)
    dout[:, :, rows] = values.astype(out.dtype)
    return device.asarray(dout)


def reference_chunks(n: int, rows: numpy.ndarray) -> list[numpy.ndarray]:
    """The sampled rows cut into pieces whose scores fit REFERENCE_SCORES."""
    size = max(1, REFERENCE_SCORES // n)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def reference_steps(heads: int, n: int, rows: numpy.ndarray, backward: bool) -> int:
    """How many times ``run_check`` calls ``on_step``: once per head and chunk, per pass."""
    return heads * len(reference_chunks(n, rows)) * (2 if backward else 1)


def _head_keep(xp, n, part, causal, window, block_mask):
    return reference.keep_mask(n, n, causal=causal, window=window, block_mask=block_mask,
                               rows=part, xp=xp)


def _head_masks(block_mask, heads: int) -> list:
    """The block mask of each head's reference steps, which see one head at a time: the mask
    itself where the heads share it, else each head's own pattern."""
    if block_mask is None or block_mask.num_heads is None:
        return [block_mask] * heads
    layout = block_mask.to_dense()
    return [BlockMask.from_dense(layout[h], block_size=block_mask.block_size,
                                 shape=block_mask.shape) for h in range(heads)]


def _of_head(keep, h: int):
    """Head ``h``'s part of a ``_head_keep`` mask: its own plane of a mask per head, else the
    whole mask, which every head shares."""
    return keep if keep is None or keep.ndim == 2 or keep.shape[0] == 1 else keep[h:h + 1]


def _kv_head(h: int, q, k) -> int:
    """The key/value head that query head ``h`` reads (grouped-query attention: each key/value
    head serves ``Hq / Hkv`` consecutive query heads)."""
    return h // (q.shape[1] // k.shape[1])


def forward_reference(xp, q, k, v, rows, *, causal, block_mask, on_step, window=(-1, -1),
                       softcap=0.0):
    """Float64 and naive same-precision ``out`` and ``lse`` on ``rows``, head by head: ``(ref,
    naive, ref_lse, naive_lse)``."""
    heads, n = q.shape[1], q.shape[2]
    options = {"causal": causal, "window": window, "softcap": softcap}
    ref = xp.empty(q.shape[:2] + (len(rows), v.shape[-1]), dtype=xp.float64)
    naive = xp.empty(ref.shape, dtype=q.dtype)
    ref_lse = xp.empty(ref.shape[:-1], dtype=xp.float64)
    naive_lse = xp.empty(ref.shape[:-1], dtype=xp.float32)
    masks = _head_masks(block_mask, heads)
    start = 0
    for part in reference_chunks(n, rows):
        index, stop = xp.asarray(part), start + len(part)
        keep = _head_keep(xp, n, part, causal, window, block_mask)
        for h in range(heads):
            g = _kv_head(h, q, k)
            qh, kh, vh = q[:, h:h + 1], k[:, g:g + 1], v[:, g:g + 1]
            ref[:, h:h + 1, start:stop], ref_lse[:, h:h + 1, start:stop] = \
                reference.chunked_attention(qh, kh, vh, block_mask=masks[h], rows=part,
                                            **options)
            naive[:, h:h + 1, start:stop], naive_lse[:, h:h + 1, start:stop] = \
                reference.naive_attention(qh[:, :, index], kh, vh, mask=_of_head(keep, h),
                                          softcap=softcap)
            if on_step:
                on_step()
        start = stop
    return ref, naive, ref_lse, naive_lse


def backward_reference(xp, dout, q, k, v, rows, *, causal, block_mask, on_step,
                        window=(-1, -1), softcap=0.0):
    """Float64 and naive same-precision ``(dq, dk, dv)`` of the whole problem, from ``rows``
    (``dout`` is zero elsewhere), head by head.

    The naive dk and dv of several row chunks (and, with grouped-query attention, of the query
    heads a key/value head serves) are summed in float32, each part rounded once: one more
    rounding than a single pass makes.
    """
    heads, n = q.shape[1], q.shape[2]
    refs = [xp.zeros(x.shape, dtype=xp.float64) for x in (q, k, v)]
    naives = [xp.zeros(x.shape, dtype=xp.float32) for x in (q, k, v)]
    for part in reference_chunks(n, rows):
        index = xp.asarray(part)
        keep = _head_keep(xp, n, part, causal, window, block_mask)
        for h in range(heads):
            g = _kv_head(h, q, k)
            args = (dout[:, h:h + 1, index], q[:, h:h + 1, index], k[:, g:g + 1], v[:, g:g + 1])
            mask = _of_head(keep, h)
            for grads, computed in (
                    (refs, reference.attention_backward(*args, mask=mask, softcap=softcap)),
                    (naives, reference.naive_attention_backward(*args, mask=mask,
                                                                softcap=softcap))):
                dq, dk, dv = computed
                grads[0][:, h:h + 1, index] = dq
                grads[1][:, g:g + 1] += dk
                grads[2][:, g:g + 1] += dv
            if on_step:
                on_step()
    return [(ref, naive.astype(q.dtype)) for ref, naive in zip(refs, naives)]
