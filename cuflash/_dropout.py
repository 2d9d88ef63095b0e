"""The random contract of attention dropout: which elements of P are dropped.

Dropout (FlashAttention, Algorithm 2) zeroes each element of the softmax matrix ``P`` with
probability ``p`` and scales the kept ones by ``1 / (1 − p)``. The decision for one element is a
pure function of ``(seed, offset, b, h, i, j)`` — nothing depends on tile sizes, on the order in
which tiles are visited, or on the back end — so the forward and the backward pass (and the
NumPy path, the oracle and the CUDA kernels) draw the same mask:

- ``b``: the batch index (the flattened broadcast leading axes, ``0 ≤ b < B``), ``h`` the query
  head (``0 ≤ h < Hq``), ``i`` the query row, ``j`` the key (``0 ≤ i < Nq``, ``0 ≤ j < Nk``);
- key ``(k0, k1) = (seed mod 2³², seed div 2³²)`` (``0 ≤ seed < 2⁶⁴``);
- counter ``(c0, c1, c2, c3) = (j div 16, i, b · Hq + h, offset)`` (``0 ≤ offset < 2³²``, and
  ``B · Hq < 2³²``);
- the element's 8-bit draw is byte ``j mod 16`` of ``Philox4x32-7(counter, key)`` (byte ``4w + c``
  is bits ``8c … 8c + 7`` of word ``w``), so one Philox call serves 16 consecutive keys of one
  row;
- the element is kept when ``draw ≥ threshold``, ``threshold = min(255, round(p · 256))`` (halves up).

So the rate is quantised to a multiple of 1/256: the effective rate is ``threshold / 256``, and
the kept elements are scaled by ``1 / (1 − threshold / 256)`` (``rescale``), which keeps the output
unbiased (flash-attn quantises the same way, to 1/256, but scales by ``1 / (1 − p)``). A rate
that would round to 0 (``0 < p < 1/512``) is refused rather than silently ignored. Eight bits per
element, not 32, make the Philox work per element a quarter of what it would be: in the kernels
it costs as much as the matrix products would otherwise.

Philox4x32 is the counter-based generator of Salmon et al. (SC 2011), as in Random123 and
cuRAND: rounds of two 32×32→64-bit multiplies (``M0 = 0xD2511F53``, ``M1 = 0xCD9E8D57``) with
the key bumped by the Weyl constants (``W0 = 0x9E3779B9``, ``W1 = 0xBB67AE85``) between rounds.
Seven rounds (``ROUNDS``), as flash-attn draws its dropout mask: Salmon et al. found Philox4x32
Crush-resistant from seven rounds, and ten (cuRAND's count) adds a safety margin. In the kernels
the rounds are the bulk of dropout's added instructions (three fewer made a dropout forward 6-10%
faster on an H200). ``philox4x32`` reproduces Random123's known-answer vectors for 7 and 10
rounds (tests/test_dropout.py). The kernels draw the same mask from their tile coordinates
(csrc/dropout.cuh, docs/internals.md, "Dropout").
"""

from __future__ import annotations

import math

import numpy as np

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 7  # the kernels' PHILOX_ROUNDS (csrc/dropout.cuh)

_U32 = np.uint32
_U64 = np.uint64
_MASK32 = _U64(0xFFFFFFFF)
_SHIFT = _U64(32)


def _mulhilo(a, m):
    """``(hi, lo)`` 32-bit halves of the 64-bit product of uint32 ``a`` and the constant ``m``."""
    product = a.astype(_U64) * _U64(m)
    return (product >> _SHIFT).astype(_U32), (product & _MASK32).astype(_U32)


def philox4x32(counter, key, rounds: int = ROUNDS):
    """Philox4x32 with ``rounds`` rounds of ``counter`` (4 uint32 arrays, broadcast together) under
    ``key`` (2 uint32 values or arrays): the four uint32 output words, as a tuple of arrays."""
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, dtype=_U32) for c in counter))
    k0, k1 = (np.asarray(k, dtype=_U32) for k in key)
    with np.errstate(over="ignore"):
        for round_ in range(rounds):
            if round_:
                k0 = k0 + _U32(W0)
                k1 = k1 + _U32(W1)
            hi0, lo0 = _mulhilo(c0, M0)
            hi1, lo1 = _mulhilo(c2, M1)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


KEYS_PER_CALL = 16  # one Philox call: 128 bits, one byte per key


def threshold(p: float) -> int:
    """The draw below which an element is dropped: ``min(255, round(p · 256))``, halves
    rounded up (``p · 256`` is exact in float64)."""
    scaled = float(p) * 256.0
    whole = math.floor(scaled)
    return min(255, whole + (scaled - whole >= 0.5))  # not floor(scaled + 0.5): that sum rounds


def effective_p(p: float) -> float:
    """The rate the mask really drops at: ``threshold(p) / 256``."""
    return threshold(p) / 256.0


def rescale(p: float) -> float:
    """The factor of the kept elements, ``1 / (1 − effective_p(p))`` (1 for p = 0)."""
    return 256.0 / (256.0 - threshold(p))


def draws(seed: int, offset: int, hq: int, b, h, rows, cols):
    """The 8-bit draw of each element ``(b, h, rows, cols)`` (integer arrays, broadcast
    together) of a problem with ``hq`` query heads, as uint32."""
    b, h, rows, cols = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64)
                                             for x in (b, h, rows, cols)))
    key = (seed & 0xFFFFFFFF, seed >> 32)
    counter = (cols // KEYS_PER_CALL, rows, b * hq + h, np.full(cols.shape, offset, np.int64))
    words = philox4x32(counter, key)
    byte = cols % KEYS_PER_CALL
    word = np.select([byte // 4 == w for w in range(3)], words[:3], words[3]).astype(_U32)
    return (word >> (8 * (byte % 4)).astype(_U32)) & _U32(0xFF)


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
