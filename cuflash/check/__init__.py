"""Checking cuflash against float64: the correctness rule, the Path-X inputs, the check itself.

- :mod:`cuflash.check.rule`: ``max|result − ref64| ≤ 2·max|naive − ref64| + 1e-5``, in one place
  for the tests, ``cuflash check`` and the benchmarks.
- :mod:`cuflash.check.pathfinder`: synthetic Pathfinder images (Path-X, Path-256) and their
  projection to q, k, v.
- :mod:`cuflash.check.verify`: run cuflash on long inputs, time it, measure its memory and
  compare sampled rows (and every gradient) with float64 — ``cuflash check`` without the
  command line.
"""

from cuflash.check.rule import allowed, passes

__all__ = ["allowed", "passes"]
