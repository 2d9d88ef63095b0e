"""What is measured: the FLOP count, one attention problem, the dense grid, random inputs.

FLOPs are counted as in the FlashAttention papers: the forward is ``4·B·H·Nq·Nk·D``
(``2·B·H·Nq·Nk·(D + Dv)`` when v's head dimension differs), halved when causal (the kept area
when ``Nq ≠ Nk``; a window counts the pairs of its band) and multiplied by the kept fraction of a
block mask; the backward is 2.5 times the forward, so a forward+backward
step counts 3.5 times the forward. ``cuflash check`` and ``cuflash bench`` both count with
:func:`forward_flops`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy

from cuflash import _mask

__all__ = ["BACKWARD_FLOP_FACTOR", "DTYPES", "Inputs", "Problem", "dense_problems",
           "forward_flops"]

DTYPES = {"float16": numpy.dtype(numpy.float16), "bfloat16": numpy.dtype(ml_dtypes.bfloat16),
          "float32": numpy.dtype(numpy.float32)}

# The dense grid of the benchmark protocol (docs/design.md): 16K tokens in total
# (batch = 16384 / N), hidden size 2048 (heads = 2048 / D), bfloat16.
DENSE_SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
DENSE_HEAD_DIMS = (64, 128)
TOTAL_TOKENS = 16384
HIDDEN = 2048

# The block-sparse sweep: one long sequence, 128×128 blocks.
SPARSE_SEQ_LEN, SPARSE_HEADS, SPARSE_HEAD_DIM, SPARSE_BLOCK = 16384, 32, 64, 128
SPARSE_DENSITIES = (1.0, 0.5, 0.25, 0.1)

MODES = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}
BACKWARD_FLOP_FACTOR = 2.5


def check_modes(modes, name: str = "modes") -> None:
    """Refuse a mode other than "fwd" and "fwdbwd" (anything else would time forward+backward
    but count, or label, something else)."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"{name} must be 'fwd' or 'fwdbwd', got {mode!r}")


def forward_flops(batch: int, heads: int, nq: int, nk: int, head_dim: int, *,
                  causal: bool = False, fraction: float = 1.0,
                  value_dim: int | None = None, window=(-1, -1)) -> float:
    """``2·B·H·Nq·Nk·(D + Dv)`` (``4·B·H·Nq·Nk·D`` when ``value_dim`` is None or D), times the
    part a causal mask keeps, times ``fraction`` (a block mask's kept part, 0 to 1).

    ``heads`` are the query heads (grouped-query attention computes a product per query head).
    The causal part is the area of the kept region of the ``Nq × Nk`` score matrix, the mask
    aligned to its bottom right as cuflash aligns it: one half when ``Nq == Nk`` (the papers'
    count), ``1 − Nq / (2·Nk)`` when there are fewer queries (a single decoding query keeps
    nearly every key), ``Nk / (2·Nq)`` when there are more. A ``window`` ``(left, right)`` (-1:
    unbounded), aligned and intersected with ``causal`` as cuflash does, counts the pairs its
    band keeps exactly (so ``window=(-1, 0)`` counts the diagonal that ``causal`` halves).
    """
    for name, size in (("batch", batch), ("heads", heads), ("nq", nq), ("nk", nk),
                       ("head_dim", head_dim), ("value_dim", value_dim)):
        if size is not None and not size >= 1:
            raise ValueError(f"{name} must be at least 1, got {size}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction (the kept part of a block mask) must be in [0, 1], got "
                         f"{fraction}")
    left, right = window
    if left < -1 or right < -1:
        raise ValueError(f"window must be (left, right) with each side -1 (unbounded) or at "
                         f"least 0, got {tuple(window)}")
    value_dim = head_dim if value_dim is None else value_dim
    if (left, right) != (-1, -1):  # the keys each row sees, causal bounding the right side
        begin, end = _mask.key_range(slice(0, nq), nq, nk, *_mask.band(window, causal))
        pairs = float((end - begin).sum())
    elif causal:
        pairs = nq * nk - nq * nq / 2 if nq <= nk else nk * nk / 2
    else:
        pairs = float(nq) * nk
    return 2.0 * batch * heads * pairs * (head_dim + value_dim) * fraction


@dataclass(frozen=True)
class Problem:
    """One attention call: ``(batch, heads, seq_len, head_dim)`` inputs, causal or not."""

    batch: int
    heads: int
    seq_len: int
    head_dim: int
    causal: bool
    dtype: str = "bfloat16"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.seq_len, self.head_dim)

    def flops(self, mode: str = "fwd", density: float = 1.0) -> float:
        """FLOPs of one call (see the module docstring); ``mode`` "fwd" or "fwdbwd"."""
        check_modes((mode,), "mode")
        forward = forward_flops(self.batch, self.heads, self.seq_len, self.seq_len,
                                self.head_dim, causal=self.causal, fraction=density)
        return forward * (1 + BACKWARD_FLOP_FACTOR if mode == "fwdbwd" else 1)


def dense_problems(seq_lens=DENSE_SEQ_LENS, head_dims=DENSE_HEAD_DIMS, causal=(False, True), *,
                   total_tokens=TOTAL_TOKENS, hidden=HIDDEN, dtype="bfloat16") -> list[Problem]:
    """The dense grid: ``batch = total_tokens / N``, ``heads = hidden / D``.

    Each N must divide ``total_tokens`` and each D must divide ``hidden``; otherwise the grid
    would not be the one asked for, and ``ValueError`` says which value does not fit. Every
    size must be at least 1.
    """
    seq_lens, head_dims = tuple(seq_lens), tuple(head_dims)
    # 0 would divide by zero, or give calls of no batch or no heads
    for name, values in (("seq_lens", seq_lens), ("head_dims", head_dims)):
        if any(value < 1 for value in values):
            raise ValueError(f"{name} must be positive, got {values}")
    for name, value in (("total_tokens", total_tokens), ("hidden", hidden)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    for n in seq_lens:
        if total_tokens % n:
            raise ValueError(f"total_tokens {total_tokens} is not a multiple of the sequence "
                             f"length {n}: batch = total_tokens / N must be a whole number")
    for d in head_dims:
        if hidden % d:
            raise ValueError(f"hidden {hidden} is not a multiple of the head dimension {d}: "
                             "heads = hidden / D must be a whole number")
    return [Problem(batch=total_tokens // n, heads=hidden // d, seq_len=n, head_dim=d,
                    causal=is_causal, dtype=dtype)
            for is_causal in causal for d in head_dims for n in seq_lens]


@dataclass
class Inputs:
    """q, k, v and an output gradient on one device, and their torch views when asked for."""

    q: object
    k: object
    v: object
    dout: object
    torch_views: dict = field(default_factory=dict)

    @classmethod
    def random(cls, device, shape, dtype, seed=0):
        dtype = DTYPES[dtype] if isinstance(dtype, str) else numpy.dtype(dtype)
        return cls(*(device.random(shape, dtype, (seed, i)) for i in range(4)))
