"""The correctness rule, defined once for the tests, ``cuflash check`` and the benchmarks.

A result passes when ``max|result − ref64| ≤ 2·max|naive − ref64| + 1e-5``: ``ref64`` is the
float64 oracle and ``naive`` attention computed plainly in the input's own precision
(``cuflash.reference.naive_attention``), so the error allowed is what a plain implementation in
that precision makes (FlashAttention's own rule). A NaN error never passes.

>>> allowed(0.01)
0.02001
>>> passes(0.015, 0.01), passes(0.03, 0.01), passes(float("nan"), 0.01)
(True, False, False)
"""

from __future__ import annotations

import math

__all__ = ["FACTOR", "SLACK", "allowed", "passes"]

FACTOR = 2.0
SLACK = 1e-5


def allowed(naive_error: float) -> float:
    """The largest error that passes, given the naive same-precision error ``max|naive − ref64|``."""
    return FACTOR * float(naive_error) + SLACK


def passes(error: float, naive_error: float) -> bool:
    """Whether ``error = max|result − ref64|`` passes against ``naive_error``. An error that is
    not finite never passes, even when the naive baseline's overflowed too (an infinite bound
    would pass anything)."""
    return math.isfinite(float(error)) and float(error) <= allowed(naive_error)

