"""The random contract of attention dropout: which elements of P are dropped.

Dropout (FlashAttention, Algorithm 2) zeroes each element of the softmax matrix ``P`` with
probability ``p`` and scales the kept ones by ``1 / (1 − p)``. The decision for one element is a
pure function of ``(seed, offset, b, h, i, j)`` — nothing depends on tile sizes, on the order in
which tiles are visited, or on the back end — so the forward and the backward pass (and the
NumPy path, the oracle and the CUDA kernels) draw the same mask:

- ``b``: the batch index (the flattened broadcast leading axes, ``0 ≤ b < B``), ``h`` the query
  head (``0 ≤ h < Hq``), ``i`` the query row, ``j`` the key (``0 ≤ i < Nq``, ``0 ≤ j < Nk``);
- key ``(k0, k1) = (seed mod 2³², seed div 2³²)`` (``0 ≤ seed < 2⁶⁴``);
- counter ``(c0, c1, c2, c3) = (j div 4, i, b · Hq + h, offset)`` (``0 ≤ offset < 2³²``, and
  ``B · Hq < 2³²``);
- the element's 32-bit draw is word ``j mod 4`` of ``Philox4x32-10(counter, key)``, so one Philox
  call serves four consecutive keys of one row;
- the element is kept when ``draw ≥ threshold``, ``threshold = min(2³² − 1, floor(p · 2³²))``
  (``p · 2³²`` computed exactly in float64: ``p`` is a float64 and 2³² a power of two), which
  keeps it with probability ``1 − threshold / 2³²`` (``1 − p`` up to 2⁻³²).

Philox4x32-10 is the counter-based generator of Salmon et al. (SC 2011), as in Random123 and
cuRAND: ten rounds of two 32×32→64-bit multiplies (``M0 = 0xD2511F53``, ``M1 = 0xCD9E8D57``) with
the key bumped by the Weyl constants (``W0 = 0x9E3779B9``, ``W1 = 0xBB67AE85``) between rounds.
``philox4x32_10`` reproduces Random123's known-answer vectors (tests/test_dropout.py). The sm80
kernels draw the same mask from their tile coordinates (csrc/dropout.cuh; off by default until
checked on a GPU, docs/internals.md, "Dropout").
"""

from __future__ import annotations

import math

import numpy as np

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10

_U32 = np.uint32
_U64 = np.uint64
_MASK32 = _U64(0xFFFFFFFF)
_SHIFT = _U64(32)


def _mulhilo(a, m):
    """``(hi, lo)`` 32-bit halves of the 64-bit product of uint32 ``a`` and the constant ``m``."""
    product = a.astype(_U64) * _U64(m)
    return (product >> _SHIFT).astype(_U32), (product & _MASK32).astype(_U32)


def philox4x32_10(counter, key):
    """Philox4x32-10 of ``counter`` (4 uint32 arrays, broadcast together) under ``key`` (2 uint32
    values or arrays): the four uint32 output words, as a tuple of arrays."""
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, dtype=_U32) for c in counter))
    k0, k1 = (np.asarray(k, dtype=_U32) for k in key)
    with np.errstate(over="ignore"):
        for round_ in range(ROUNDS):
            if round_:
                k0 = k0 + _U32(W0)
                k1 = k1 + _U32(W1)
            hi0, lo0 = _mulhilo(c0, M0)
            hi1, lo1 = _mulhilo(c2, M1)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def threshold(p: float) -> int:
    """The draw below which an element is dropped: ``min(2³² − 1, floor(p · 2³²))``."""
    return min(2**32 - 1, math.floor(float(p) * 2.0**32))


def draws(seed: int, offset: int, hq: int, b, h, rows, cols):
    """The uint32 draw of each element ``(b, h, rows, cols)`` (integer arrays, broadcast
    together) of a problem with ``hq`` query heads."""
    b, h, rows, cols = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64)
                                             for x in (b, h, rows, cols)))
    key = (seed & 0xFFFFFFFF, seed >> 32)
    counter = (cols >> 2, rows, b * hq + h, np.full(cols.shape, offset, np.int64))
    words = philox4x32_10(counter, key)
    lane = cols & 3
    out = words[3].copy()
    for word in range(3):
        np.copyto(out, words[word], where=lane == word)
    return out


def keep_mask(seed: int, offset: int, p: float, b, h, rows, cols, *, hq: int):
    """Bool array, True where element ``(b, h, rows, cols)`` is kept (index arrays broadcast
    together; ``hq`` the number of query heads, which the counter needs)."""
    return draws(seed, offset, hq, b, h, rows, cols) >= _U32(threshold(p))


def dense_keep(seed: int, offset: int, p: float, batch: tuple, hq: int, rows, nk: int):
    """The keep mask of a whole problem for query ``rows``: bool ``batch + (Hq, len(rows), Nk)``
    (``b`` the C-order flattening of ``batch``)."""
    b = np.arange(math.prod(batch)).reshape(batch + (1, 1, 1))
    h = np.arange(hq).reshape(hq, 1, 1)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1, 1)
    return keep_mask(seed, offset, p, b, h, rows, np.arange(nk), hq=hq)
