"""Turning "query unit I attends key positions lo..hi" into a sparse pattern, at any resolution.

A builder describes its pattern as intervals of key positions (in tokens) per query *unit*: one
query token at element level, one query block at block level. Mapping every interval to the key
units it touches gives exactly the coarsened pattern (a block is kept when any of its elements
is), without ever listing the elements of a long sequence.
"""

import numpy
import scipy.sparse

from . import _csr
from ._validate import ceil_div, positive_int, positive_pair

_BITMAP_LIMIT = 1 << 26


class Grid:
    """The problem ``(nq, nk)`` seen at a resolution of ``(bq, bk)`` tokens per unit.

    ``offset = nk - nq`` aligns the two sequences at their ends (as ``causal=True`` does): query
    ``i`` and key ``i + offset`` are the same position.
    """

    def __init__(self, nq, nk, block_size, *, nq_name="nq", nk_name="nk"):
        self.nq = positive_int(nq_name, nq)
        self.nk = self.nq if nk is None else positive_int(nk_name, nk)
        self.bq, self.bk = (1, 1) if block_size is None else positive_pair("block_size", block_size)
        self.nqb, self.nkb = ceil_div(self.nq, self.bq), ceil_div(self.nk, self.bk)
        self.offset = self.nk - self.nq
        # Every key lies within nq + nk tokens of every aligned query position (i' = i + offset):
        # windows, strides and segments longer than that are cut to it (int64 stays exact).
        self.reach = self.nq + self.nk

    def query_ranges(self):
        """``(units, first, last)``: every query unit and its first and last query position."""
        units = numpy.arange(self.nqb, dtype=numpy.int64)
        first = units * self.bq
        return units, first, numpy.minimum(first + self.bq, self.nq) - 1

    def key_units(self, positions):
        """Sorted distinct key units holding the given key positions (all inside 0..nk-1)."""
        return _csr.sorted_unique(numpy.asarray(positions, dtype=numpy.int64) // self.bk)

    def query_units(self, positions):
        """Sorted distinct query units holding the given query positions (all inside 0..nq-1)."""
        return _csr.sorted_unique(numpy.asarray(positions, dtype=numpy.int64) // self.bq)

    def keys(self, units, lo, hi):
        """Sorted unique keys ``unit * nkb + key_unit`` covering the key intervals ``[lo, hi]``.

        Intervals are clipped to the key sequence; empty ones are dropped.
        """
        units, lo, hi = (numpy.asarray(a, dtype=numpy.int64) for a in (units, lo, hi))
        lo = numpy.maximum(lo, 0)
        hi = numpy.minimum(hi, self.nk - 1)
        keep = lo <= hi
        units, lo, hi = units[keep], lo[keep] // self.bk, hi[keep] // self.bk
        counts = hi - lo + 1
        keys = numpy.repeat(units * self.nkb + lo, counts) + _csr.ramp(counts)
        # One interval per unit, units ascending: already sorted and unique.
        one_per_unit = units.size < 2 or bool((numpy.diff(units) > 0).all())
        if one_per_unit:
            return keys
        # Keys of a modest range are deduplicated fastest by marking them in a bitmap.
        base = int(units.min()) * self.nkb
        span = (int(units.max()) + 1) * self.nkb - base
        if span > _BITMAP_LIMIT:
            return _csr.sorted_unique(keys)
        bitmap = numpy.zeros(span, dtype=bool)
        bitmap[keys - base] = True
        return numpy.flatnonzero(bitmap) + base

    def to_sparse(self, keys):
        """A bool ``csr_array`` of shape ``(nqb, nkb)`` from sorted unique keys."""
        row_ptr, col_idx = _csr.csr_from_keys(keys, 1, self.nqb, self.nkb)
        data = numpy.ones(col_idx.size, dtype=bool)
        return scipy.sparse.csr_array((data, col_idx, row_ptr[0]), shape=(self.nqb, self.nkb))


def every_unit_attends(grid, key_units):
    """Intervals giving every query unit the given key units (one interval per run of them)."""
    key_units = numpy.asarray(key_units, dtype=numpy.int64)
    if key_units.size == 0:
        empty = numpy.zeros(0, dtype=numpy.int64)
        return empty, empty, empty
    # Runs of consecutive key units become one interval each, to keep the interval count low.
    breaks = numpy.flatnonzero(numpy.diff(key_units) > 1) + 1
    run_first = key_units[numpy.concatenate(([0], breaks))]
    run_last = key_units[numpy.concatenate((breaks - 1, [key_units.size - 1]))]
    units = numpy.repeat(numpy.arange(grid.nqb, dtype=numpy.int64), run_first.size)
    lo = numpy.tile(run_first * grid.bk, grid.nqb)
    hi = numpy.tile(run_last * grid.bk, grid.nqb)
    return units, lo, hi


def union(*interval_sets):
    """Concatenate ``(units, lo, hi)`` triples."""
    return tuple(numpy.concatenate(parts) for parts in zip(*interval_sets))
