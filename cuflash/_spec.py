"""One attention call, validated: the frozen ``AttentionSpec`` every back end receives.

``_api`` builds a spec once per call from the user's arguments; the NumPy back end, the kernel
registry and every launcher read their options from it (never from loose keywords), and the
launchers derive their template keys and tile choices from it. Adding an option means adding a
field here, a check in ``_checks`` and its rule in ``_mask`` (Python) and ``csrc/mask.cuh`` or
``csrc/score_mod.cuh`` (CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy

from . import _mask
from ._checks import Shapes

UNBOUNDED = _mask.UNBOUNDED  # a window side that is not limited (flash-attn's -1)


@dataclass(frozen=True)
class VarlenLayout:
    """Packed variable-length sequences (``cuflash.attention_varlen``): B sequences laid one after
    another along the row axis of q ``(total_q, Hq, D)``, k ``(total_k, Hkv, D)`` and v
    ``(total_k, Hkv, Dv)``; sequence ``b`` owns query rows ``cu_q[b]:cu_q[b + 1]`` and key rows
    ``cu_k[b]:cu_k[b + 1]``.

    ``cu_q`` / ``cu_k`` are int32 arrays of B + 1 offsets in the inputs' array module and on their
    device (what the kernels read); ``host_q`` / ``host_k`` are the same offsets as NumPy int64
    arrays when they were checked (always for NumPy inputs), ``None`` when the caller turned the
    check off. ``max_q`` / ``max_k`` are the caller's ``max_seqlen_q`` / ``max_seqlen_k``: at least
    every sequence's length (checked with the offsets); the spec's ``shapes`` holds them as
    ``nq`` / ``nk``, and ``shapes.b`` is B.
    """

    cu_q: Any = field(compare=False, repr=False)
    cu_k: Any = field(compare=False, repr=False)
    total_q: int
    total_k: int
    max_q: int
    max_k: int
    host_q: Any = field(default=None, compare=False, repr=False)
    host_k: Any = field(default=None, compare=False, repr=False)

    @property
    def count(self) -> int:
        """B, the number of sequences."""
        return int(self.cu_q.shape[0]) - 1

    def sequences(self):
        """``(b, q_rows, k_rows)`` per sequence, rows as slices of the packed axis (host offsets
        needed: the NumPy path, which always has them)."""
        for b in range(self.count):
            yield (b, slice(int(self.host_q[b]), int(self.host_q[b + 1])),
                   slice(int(self.host_k[b]), int(self.host_k[b + 1])))


@dataclass(frozen=True)
class AttentionSpec:
    """Shapes, dtype and every option of one call.

    ``window`` is the user's ``(left, right)`` (Python ints, each -1 or ≥ 0); ``causal`` is
    kept apart for the schedule (its heaviest query tiles go first) but the key band that both
    define is ``band()``. ``scale`` is a positive float whose ``scale·log2 e`` is a normal
    float32; ``softcap`` is 0.0 (off) or a positive float with ``scale / softcap`` and
    ``softcap·log2 e`` normal float32 numbers. ``alibi`` is ``None`` or a C-contiguous float32
    array of shape ``(B, Hq)`` (``B = shapes.b``, the flattened broadcast batch; row ``b`` holds
    the slopes of the query heads of batch element ``b``), in the inputs' array module and on
    their device, owned by the spec (a copy of the caller's slopes) and finite with
    ``|slope·log2 e|`` a finite float32. ``block_mask`` is ``None`` or a
    ``cuflash.sparse.BlockMask`` compatible with the shapes; ``exact_mask`` is ``None`` or a
    ``cuflash.sparse.ExactMask`` compatible with them (never both). ``deterministic`` is only
    read by backward passes. ``varlen`` is ``None`` (dense) or the ``VarlenLayout`` of packed
    variable-length sequences; then ``shapes`` is ``(B,)`` sequences of at most
    ``(nq, nk) = (max_seqlen_q, max_seqlen_k)``, every rule applies to each sequence with its own
    lengths, and the back ends receive packed ``(total, H, D)`` arrays (docs/internals.md).
    ``dropout_p`` is 0.0 (off; then ``dropout_seed`` and ``dropout_offset`` are 0) or in (0, 1)
    with a seed in [0, 2**64) and an offset in [0, 2**32): the mask is ``_dropout.keep_mask``
    of those (a varlen call's sequence ``b`` draws a dense call's batch element ``b``).
    ``dropout_state`` is ``None``, or a CuPy seed array (uint64 ``(seed, offset)``) that the
    kernels read when they run instead of ``dropout_seed`` and ``dropout_offset`` (both 0 then):
    the caller's own array (a vjp's copy of it), so that a captured graph replays with what it
    holds.
    ``float32_grads`` (read by backward passes) stores the gradients as float32 instead of
    rounding them to ``dtype``. The rules themselves (band and score modifier) are in ``_mask``.
    """

    shapes: Shapes
    dtype: numpy.dtype
    scale: float
    causal: bool = False
    window: tuple[int, int] = (UNBOUNDED, UNBOUNDED)
    softcap: float = 0.0
    alibi: Any = field(default=None, compare=False, repr=False)
    block_mask: Any = field(default=None, compare=False)
    deterministic: bool = False
    exact_mask: Any = field(default=None, compare=False)
    varlen: VarlenLayout | None = None
    dropout_p: float = 0.0
    dropout_seed: int = 0
    dropout_offset: int = 0
    dropout_state: Any = field(default=None, compare=False, repr=False)
    float32_grads: bool = False

    @property
    def grad_dtype(self) -> numpy.dtype:
        """The dtype a backward pass stores dq, dk and dv in."""
        return numpy.dtype(numpy.float32) if self.float32_grads else self.dtype

    # ---- the mask: which keys a query sees

    def band(self) -> tuple[int, int]:
        """``(left, right)`` of the key band, ``-1`` where unbounded; causal is ``right = 0``.

        Query ``i`` sees key ``j`` when ``i + Nk − Nq − left ≤ j ≤ i + Nk − Nq + right``
        (flash-attn's ``window_size``); causal intersects that with ``j ≤ i + Nk − Nq``.
        """
        return _mask.band(self.window, self.causal)

    @property
    def banded(self) -> bool:
        """Whether some query sees fewer than all keys because of causal or a window."""
        return self.band() != (UNBOUNDED, UNBOUNDED)

    @property
    def right_bounded_alone(self) -> bool:
        """Whether the band is bounded on the right alone (causal, or a window (-1, w)): each
        query sees every key up to its band's right edge."""
        left, right = self.band()
        return left == UNBOUNDED and right != UNBOUNDED

    @property
    def has_window(self) -> bool:
        return self.window != (UNBOUNDED, UNBOUNDED)

    def band_extent(self) -> tuple[int, int]:
        """``(Nq, Nk)`` as the kernels' band arithmetic sees them: for packed sequences the
        longest sequence's bounds cut to the rows in all (``total_q``, ``total_k``), which every
        sequence's length is within (a ``max_seqlen`` may be far above the longest, up to
        2**31 − 1)."""
        s = self.shapes
        if self.varlen is None:
            return s.nq, s.nk
        return min(s.nq, self.varlen.total_q), min(s.nk, self.varlen.total_k)

    def kernel_band(self) -> tuple[int, int]:
        """The band with unbounded sides replaced by a value that admits every key and kept
        small enough for int32 arithmetic in the kernels: ``left ≤ Nk`` and ``right ≤ Nq`` of
        ``band_extent`` already admit everything (see ``csrc/mask.cuh``); a side up to
        2**31 − 1 would let ``row + shift + right + 1`` wrap around (rows that see no key)."""
        nq, nk = self.band_extent()
        left, right = _mask.clamped_band(nq, nk, *self.band())
        return (nk if left == UNBOUNDED else left), (nq if right == UNBOUNDED else right)

    # ---- the score modifier: what happens to a score before the softmax

    @property
    def has_softcap(self) -> bool:
        return self.softcap > 0.0

    @property
    def has_alibi(self) -> bool:
        return self.alibi is not None

    @property
    def score_modified(self) -> bool:
        return self.has_softcap or self.has_alibi

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0.0

    @property
    def sparse(self) -> bool:
        """Whether a block mask (block-sparse attention) is given."""
        return self.block_mask is not None

    @property
    def exact(self) -> bool:
        """Whether an exact mask (an element pattern) is given."""
        return self.exact_mask is not None

    def describe(self) -> str:
        """The options in one line, for reports and error messages."""
        parts = [f"{self.dtype.name}", f"D={self.shapes.d}", f"Dv={self.shapes.dv}"]
        if self.causal:
            parts.append("causal")
        if self.has_window:
            parts.append(f"window={self.window}")
        if self.has_softcap:
            parts.append(f"softcap={self.softcap:g}")
        if self.has_alibi:
            parts.append("alibi")
        if self.sparse:
            parts.append(f"block_mask{tuple(self.block_mask.block_size)}")
        if self.exact:
            parts.append(f"mask(exact, {self.exact_mask.density:.3g} dense)")
        if self.varlen is not None:
            parts.append(f"varlen({self.shapes.b} sequences)")
        if self.has_dropout:
            parts.append(f"dropout_p={self.dropout_p:g}")
        if self.deterministic:
            parts.append("deterministic")
        return ", ".join(parts)
