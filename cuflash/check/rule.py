"""The correctness rule, defined once for the tests, ``cuflash check`` and the benchmarks.

A result passes when ``max|result − ref64| ≤ 2·max|naive − ref64| + 1e-5``: ``ref64`` is the
float64 oracle and ``naive`` attention computed plainly in the input's own precision
(``cuflash.reference.naive_attention``), so the error allowed is what a plain implementation in
that precision makes (FlashAttention's own rule). A NaN error never passes.

>>> allowed(0.01)
0.02001
>>> passes(0.015, 0.01), passes(0.03, 0.01), passes(float("nan"), 0.01)
(True, False, False)

Gradients that arrive as a sum of ``steps`` partials, each rounded to the input dtype before the
float32 sum (ring attention's dK/dV: each ring step's local backward returns 16-bit gradients),
carry one rounding per partial that a single call does not: ``sharded_allowance`` adds
``steps · u · max|ref64|`` for the dtype's unit roundoff ``u`` (2⁻⁸ bfloat16, 2⁻¹¹ float16,
2⁻²⁴ float32) to the bound.

>>> sharded_allowance(steps=4, dtype_name="bfloat16", magnitude=4.0)
0.0625
"""

from __future__ import annotations

__all__ = ["FACTOR", "SLACK", "UNIT_ROUNDOFF", "allowed", "passes", "sharded_allowance"]

FACTOR = 2.0
SLACK = 1e-5
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}


def allowed(naive_error: float) -> float:
    """The largest error that passes, given the naive same-precision error ``max|naive − ref64|``."""
    return FACTOR * float(naive_error) + SLACK


def passes(error: float, naive_error: float) -> bool:
    """Whether ``error = max|result − ref64|`` passes against ``naive_error``; NaN fails."""
    return float(error) <= allowed(naive_error)  # False for NaN


def sharded_allowance(*, steps: int, dtype_name: str, magnitude: float) -> float:
    """What ``steps`` roundings of partial sums to ``dtype_name`` may add to the error of a
    result of size ``magnitude`` (``max|ref64|``); added to ``allowed`` for such results."""
    return steps * UNIT_ROUNDOFF[dtype_name] * float(magnitude)
