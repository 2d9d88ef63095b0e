"""Which cuflash calls one ring step makes: the global mask of a (query chunk, key chunk) pair
expressed through cuflash's own options.

A global band (causal and/or a sliding window, aligned bottom-right on the whole ``Nq × Nk``
problem) restricted to a block of local query rows and local keys is again a band, shifted.
With query rows at global positions ``Q + a`` and keys at ``K + b``, query ``i`` sees key ``j``
when ``i + g_lo ≤ j ≤ i + g_hi`` (``g_lo = shift − left``, ``g_hi = shift + right``,
``shift = Nk − Nq``), that is::

    a + (Q − K + g_lo)  ≤  b  ≤  a + (Q − K + g_hi)

After trimming the block to the rows that see at least one key and to the keys seen by at least
one row, this band always has ``left ≥ 0`` and ``right ≥ 0`` in cuflash's bottom-right convention
(the last row sees a key, so the lower edge passes at or left of the corner; the last key is seen,
so the upper edge passes at or right of it), and each side that admits every key of the block is
dropped (``-1``). So a fully visible pair becomes a plain dense call, a diagonal pair a causal
call, a pair the band does not touch no call at all, and a window pair a call with the window
(left, right) that the global band induces on it.

A rank's chunk can consist of several *segments* (zigzag: two). Blocks of several segments are
joined into one call when that is exact: the segments are a translation of one global run; or
every piece of the block is fully visible; or queries and keys are the same positions in the same
increasing order under a pure causal mask (the zigzag diagonal step). Otherwise each
(query segment, key segment) piece is its own call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from . import layout as _layout

UNBOUNDED = -1


@dataclass(frozen=True)
class Call:
    """One cuflash call of a ring step: local query rows ``[rows[0], rows[1])`` against local
    keys ``[cols[0], cols[1])`` with ``causal`` and ``window`` (cuflash's conventions)."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    causal: bool
    window: tuple[int, int]

    @property
    def row_slice(self) -> slice:
        return slice(*self.rows)

    @property
    def col_slice(self) -> slice:
        return slice(*self.cols)

    def visible(self) -> int:
        """How many (query, key) pairs this call attends (for FLOP counts)."""
        import numpy
        from cuflash import _mask
        nq, nk = self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]
        left, right = _mask.band(self.window, self.causal)
        begin, end = _mask.key_range(slice(0, nq), nq, nk, left, right)
        return int(numpy.sum(end - begin))


def global_edges(nq: int, nk: int, left: int, right: int
                 ) -> tuple[Optional[int], Optional[int]]:
    """``(g_lo, g_hi)``: query ``i`` sees key ``j`` when ``i + g_lo ≤ j ≤ i + g_hi``
    (``None`` for an unbounded side) for the band ``(left, right)`` of an ``nq × nk`` problem."""
    shift = nk - nq
    return (None if left == UNBOUNDED else shift - left,
            None if right == UNBOUNDED else shift + right)


def _trimmed(q0: int, m: int, k0: int, n: int, g_lo, g_hi):
    """The band on ``m`` rows at global ``q0`` × ``n`` keys at global ``k0``, trimmed.

    Returns ``None`` when no row sees a key, else ``(a0, a1, b0, b1, left, right)``: the rows
    ``[a0, a1)`` and keys ``[b0, b1)`` (block coordinates) holding every visible pair, and
    cuflash's window ``(left, right)`` on that sub-block (``-1`` = the side admits every key).
    """
    if m <= 0 or n <= 0:
        return None
    lo = None if g_lo is None else q0 - k0 + g_lo  # row a sees keys b >= a + lo
    hi = None if g_hi is None else q0 - k0 + g_hi  # ... and b <= a + hi
    a0 = 0 if hi is None else max(0, -hi)
    a1 = m if lo is None else min(m, n - lo)
    if a0 >= a1:
        return None
    b0 = 0 if lo is None else max(0, a0 + lo)
    b1 = n if hi is None else min(n, a1 + hi)
    if b0 >= b1:
        return None
    rows, keys = a1 - a0, b1 - b0
    shift = keys - rows
    left = right = UNBOUNDED
    if lo is not None:
        lo_t = lo + a0 - b0
        if rows - 1 + lo_t > 0:  # some row of the block has keys left of its band
            left = shift - lo_t
    if hi is not None:
        hi_t = hi + a0 - b0
        if hi_t < keys - 1:  # some row of the block has keys right of its band
            right = hi_t - shift
    assert left == UNBOUNDED or left >= 0, (q0, m, k0, n, g_lo, g_hi)
    assert right == UNBOUNDED or right >= 0, (q0, m, k0, n, g_lo, g_hi)
    return a0, a1, b0, b1, left, right


def _call(row0: int, col0: int, trimmed) -> Call:
    a0, a1, b0, b1, left, right = trimmed
    if right == 0:  # a causal diagonal, possibly with a window on the left
        return Call((row0 + a0, row0 + a1), (col0 + b0, col0 + b1), True, (left, UNBOUNDED))
    return Call((row0 + a0, row0 + a1), (col0 + b0, col0 + b1), False, (left, right))


def _full(trimmed, m: int, n: int) -> bool:
    return trimmed == (0, m, 0, n, UNBOUNDED, UNBOUNDED)


def plan_segments(qsegs, ksegs, g_lo, g_hi) -> tuple[Call, ...]:
    """The calls for query segments ``qsegs`` against key segments ``ksegs`` (each a tuple of
    ``(local_start, global_start, length)``, in local order and adjacent) under the global
    band ``(g_lo, g_hi)`` (see :func:`global_edges`)."""
    pieces = {(x, y): _trimmed(qs[1], qs[2], ks[1], ks[2], g_lo, g_hi)
              for x, qs in enumerate(qsegs) for y, ks in enumerate(ksegs)}
    xs = sorted({x for (x, _), t in pieces.items() if t is not None})
    ys = sorted({y for (_, y), t in pieces.items() if t is not None})
    if not xs:
        return ()
    qblock = [qsegs[x] for x in range(xs[0], xs[-1] + 1)]
    kblock = [ksegs[y] for y in range(ys[0], ys[-1] + 1)]
    row0, col0 = qblock[0][0], kblock[0][0]
    m = sum(s[2] for s in qblock)
    n = sum(s[2] for s in kblock)

    def translation(block):  # one global run laid out in order
        return len({g - local for local, g, _ in block}) == 1

    if translation(qblock) and translation(kblock):
        t = _trimmed(qblock[0][1], m, kblock[0][1], n, g_lo, g_hi)
        return () if t is None else (_call(row0, col0, t),)
    if all(_full(pieces[x, y], qsegs[x][2], ksegs[y][2])
           for x in range(xs[0], xs[-1] + 1) for y in range(ys[0], ys[-1] + 1)):
        return (Call((row0, row0 + m), (col0, col0 + n), False, (UNBOUNDED, UNBOUNDED)),)
    increasing = all(a[1] < b[1] for a, b in zip(qblock, qblock[1:]))
    if (g_lo is None and g_hi == 0 and increasing
            and [(s[1], s[2]) for s in qblock] == [(s[1], s[2]) for s in kblock]):
        return (Call((row0, row0 + m), (col0, col0 + n), True, (UNBOUNDED, UNBOUNDED)),)
    return tuple(_call(qsegs[x][0], ksegs[y][0], pieces[x, y])
                 for x in range(len(qsegs)) for y in range(len(ksegs))
                 if pieces[x, y] is not None)


@functools.lru_cache(maxsize=4096)
def plan_step(layout: str, size: int, rank: int, source: int, nq_local: int, nk_local: int,
              left: int, right: int) -> tuple[Call, ...]:
    """The calls rank ``rank`` makes with the key/value chunk of rank ``source``.

    ``left``/``right`` is the global band (``cuflash._mask.band(window, causal)``).
    """
    nq, nk = nq_local * size, nk_local * size
    g_lo, g_hi = global_edges(nq, nk, left, right)
    qsegs = _layout.segments(nq_local, rank, size, layout)
    ksegs = _layout.segments(nk_local, source, size, layout)
    return plan_segments(qsegs, ksegs, g_lo, g_hi)
