"""Which keys a query sees, and what happens to a score before the softmax: the Python twin of
``kernels/csrc/mask.cuh`` and ``kernels/csrc/score_mod.cuh``.

The NumPy back end (``cuflash.cpu``), the float64 oracle (``cuflash.reference``) and the tests
read these rules from here and nowhere else. Every function works on NumPy or CuPy arrays (the
module of the arrays it is given, NumPy by default) and is vectorised over rows and keys.

The band
--------
With ``shift = Nk − Nq`` (bottom-right alignment), query row ``i`` sees key ``j`` when
``0 ≤ j < Nk`` and::

    i + shift − left  ≤  j  ≤  i + shift + right

``left`` / ``right`` equal to ``UNBOUNDED`` (-1) drop that side of the test: a sliding window is
flash-attn's ``window_size=(left, right)``, causal is ``(-1, 0)``, and causal with a window
``(left, right)`` is ``(left, min(right, 0))`` (``band``).

The score modifier
------------------
With ``s = q·k`` the raw score of query row ``i`` and key ``j``, the softmax reads the logit::

    identity   scale·s
    softcap    c·tanh(scale·s / c)                                (Gemma 2; c > 0)
    ALiBi      (the above) − slope_h · |i + shift − j|            (softcap first, as flash-attn)

and the backward pass multiplies ``dP``-derived gradients by ``dlogit / d(scale·s)``:
``1 − tanh²(scale·s / c)`` under softcap, 1 otherwise.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy

UNBOUNDED = -1  # a band side that is not limited (flash-attn's -1)
LOG2E = math.log2(math.e)  # the one definition; the softmax runs in base 2
LN2 = math.log(2.0)


def _module(x: Any):
    """``numpy`` or ``cupy`` for an array (``numpy`` for anything else)."""
    if type(x).__module__.partition(".")[0] == "cupy":
        import cupy
        return cupy
    return numpy


# ----------------------------------------------------------------------------- the band

def band(window: tuple[int, int], causal: bool) -> tuple[int, int]:
    """``(left, right)`` of the keys a query sees, ``UNBOUNDED`` where unlimited."""
    left, right = (int(n) for n in window)
    if causal:
        right = 0 if right == UNBOUNDED else min(right, 0)
    return left, right


def clamped_band(nq: int, nk: int, left: int, right: int) -> tuple[int, int]:
    """The band with sides that admit every key cut down to ``left ≤ Nk``, ``right ≤ Nq`` (as
    ``AttentionSpec.kernel_band`` sends them to the kernels), so arithmetic stays small."""
    left = left if left == UNBOUNDED else min(int(left), nk)
    right = right if right == UNBOUNDED else min(int(right), nq)
    return left, right


def _indices(index, xp=numpy):
    """A slice (with explicit bounds) or a sequence of indices as a 1-D int64 array of ``xp``."""
    if isinstance(index, slice):
        return xp.arange(index.start or 0, index.stop, dtype=xp.int64)
    return xp.asarray(index, dtype=xp.int64)


def key_range(rows, nq: int, nk: int, left: int, right: int, *, xp=numpy):
    """The keys each of ``rows`` sees, as half-open ``(begin, end)`` int64 arrays.

    Mirrors ``Mask::key_begin`` / ``key_end``, clipped so that ``0 ≤ begin ≤ end ≤ Nk``:
    ``end − begin`` is the number of keys a row sees (0 for a row that sees none).
    """
    rows = _indices(rows, xp)
    left, right = clamped_band(nq, nk, left, right)
    shift = nk - nq
    begin = xp.zeros_like(rows) if left == UNBOUNDED else xp.clip(rows + shift - left, 0, nk)
    end = xp.full_like(rows, nk) if right == UNBOUNDED else xp.clip(rows + shift + right + 1, 0, nk)
    return begin, xp.maximum(begin, end)


def every_row_sees_a_key(nq: int, nk: int, left: int, right: int) -> bool:
    """Whether each of the ``nq`` query rows sees at least one key. A row's keys are one run
    of constant width before clipping, so only the first row (its run may end before key 0) and
    the last (its run may start past the last key) can see none."""
    if nq == 0:
        return True
    begin, end = key_range([0, nq - 1], nq, nk, left, right)
    return bool((end > begin).all())


def row_range(keys, nq: int, nk: int, left: int, right: int, *, xp=numpy):
    """The query rows that see each of ``keys``, as half-open ``(begin, end)`` int64 arrays
    (``Mask::row_begin`` / ``row_end``), clipped so that ``0 ≤ begin ≤ end ≤ Nq``."""
    keys = _indices(keys, xp)
    left, right = clamped_band(nq, nk, left, right)
    shift = nk - nq
    begin = xp.zeros_like(keys) if right == UNBOUNDED else xp.clip(keys - shift - right, 0, nq)
    end = xp.full_like(keys, nq) if left == UNBOUNDED else xp.clip(keys - shift + left + 1, 0, nq)
    return begin, xp.maximum(begin, end)


def visible(nq: int, nk: int, left: int, right: int, *, rows=None, cols=None, xp=numpy):
    """Bool ``(len(rows), len(cols))``: True where the row sees the key (default: all rows and
    keys). For small problems and single tiles."""
    rows = _indices(slice(0, nq) if rows is None else rows, xp)
    cols = _indices(slice(0, nk) if cols is None else cols, xp)
    begin, end = key_range(rows, nq, nk, left, right, xp=xp)
    return (cols[None, :] >= begin[:, None]) & (cols[None, :] < end[:, None])


def blocks_visible(row_start, row_stop, col_start, col_stop, nq: int, nk: int, left: int,
                   right: int):
    """Whether rows ``[row_start, row_stop)`` × keys ``[col_start, col_stop)`` hold a pair that
    is seen (arrays broadcast against each other; ranges lie within the problem).

    Over such a block the key−row difference ``j − i`` takes every value from
    ``col_start − (row_stop − 1)`` to ``(col_stop − 1) − row_start``; the band admits
    ``shift − left … shift + right``. The block holds work when the two ranges meet.
    """
    left, right = clamped_band(nq, nk, left, right)
    shift = nk - nq
    low = numpy.asarray(col_start) - (numpy.asarray(row_stop) - 1)
    high = (numpy.asarray(col_stop) - 1) - numpy.asarray(row_start)
    seen = (high >= low) & (numpy.asarray(row_stop) > numpy.asarray(row_start))
    if left != UNBOUNDED:
        seen = seen & (high >= shift - left)
    if right != UNBOUNDED:
        seen = seen & (low <= shift + right)
    return seen


def partial(row_start: int, row_stop: int, col_start: int, col_stop: int, nq: int, nk: int,
            left: int, right: int) -> bool:
    """Whether rows ``[row_start, row_stop)`` × keys ``[col_start, col_stop)`` (within the
    problem) hold a pair that is not seen: a key right of the top row's band or left of the
    bottom row's band (``Mask::partial``). Only such blocks need the per-element test."""
    left, right = clamped_band(nq, nk, left, right)
    shift = nk - nq
    if right != UNBOUNDED and col_stop - 1 > row_start + shift + right:
        return True
    return left != UNBOUNDED and col_start < row_stop - 1 + shift - left


# ----------------------------------------------------------------------------- the score modifier

def distance(rows, cols, nq: int, nk: int, *, xp=numpy):
    """``|i + Nk − Nq − j|`` for each row ``i`` and key ``j``: int64 ``(len(rows), len(cols))``."""
    rows, cols = _indices(rows, xp), _indices(cols, xp)
    return xp.abs(rows[:, None] + (nk - nq) - cols[None, :])


def logits(s, rows, cols, *, nq: int, nk: int, scale: float, softcap: float = 0.0, slopes=None,
           log2: bool = False, rounding: Callable | None = None):
    """The logits the softmax reads, from raw scores ``s = q·kᵀ`` of ``rows`` × ``cols``.

    Parameters
    ----------
    s : array ``(..., len(rows), len(cols))``, floating
        Raw scores (pass ``scale=1`` for scores already scaled). Everything is computed in
        ``s``'s dtype; the constants are folded as ``csrc/score_mod.cuh`` folds them
        (``scale / c``, ``c`` and the slopes times ``log2 e`` when ``log2``), then cast to it.
    rows, cols : slice or 1-D int sequence
        The query rows and keys of ``s`` in the whole problem (``nq`` × ``nk``).
    softcap : float
        ``c``; 0 is off.
    slopes : array, optional
        ALiBi slopes broadcastable to ``s.shape[:-2]`` (one per leading index of ``s``).
    log2 : bool
        Return ``log2(e)·logit`` (the kernels' base-2 softmax) instead of the logit.
    rounding : callable, optional
        Applied after every elementwise step (to model a computation in a narrower dtype).

    Returns
    -------
    logits : array like ``s`` (broadcast against the slopes)
    grad : array like ``s``, or ``None`` without softcap
        ``dlogit / d(scale·s) = 1 − tanh²(scale·s / c)``.
    """
    xp = _module(s)
    r = rounding or (lambda x: x)
    kind = s.dtype.type
    unit = LOG2E if log2 else 1.0
    grad = None
    if softcap > 0:
        t = r(xp.tanh(r(s * kind(scale / softcap))))
        x = r(t * kind(softcap * unit))
        grad = r(kind(1) - r(t * t))
    else:
        x = r(s * kind(scale * unit))
    if slopes is not None:
        slope = xp.asarray(slopes).astype(s.dtype, copy=False)
        if log2:
            slope = slope * kind(LOG2E)
        dist = distance(rows, cols, nq, nk, xp=xp).astype(s.dtype)
        x = r(x - r(slope[..., None, None] * dist))
    return x, grad
