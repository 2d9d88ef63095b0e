"""How a sequence is cut between ranks: the ``contiguous`` and ``zigzag`` layouts.

With ``P`` ranks and a sequence of ``N`` positions (the ``-2`` axis of ``(..., H, N, D)``):

- ``contiguous``: rank ``r`` holds positions ``[r·N/P, (r+1)·N/P)``. Simple, but under a causal
  mask rank 0 has almost nothing to compute and rank ``P−1`` almost everything.
- ``zigzag``: the sequence is cut into ``2P`` chunks of ``N/(2P)``; rank ``r`` holds chunks ``r``
  and ``2P−1−r``, in that order. Every rank then has the same causal work.

Lengths that do not divide evenly are refused (``ValueError`` naming ``N``, ``P`` and the layout):
a ring exchanges chunks of one shape, and padding would change what a causal or windowed row
sees. Pad the sequence yourself, with keys that the mask excludes, if you need other lengths.

A layout is described by *segments*: ``(local_start, global_start, length)`` triples, one per
run of positions that are consecutive both in the local chunk and in the whole sequence. Ring
attention reads the global position of every local row from them.
"""

from __future__ import annotations

from typing import Sequence

import numpy

from cuflash import _checks

from .comm import check_per_rank, check_rank

LAYOUTS = ("contiguous", "zigzag")

__all__ = ["LAYOUTS", "check_layout", "chunks_per_rank", "positions", "segments", "shard",
           "unshard"]


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, "
                         f"got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 2 if check_layout(layout) == "zigzag" else 1


def _check_rank(rank, size) -> tuple[int, int]:
    size = _checks.check_int(size, "size", 1)
    return check_rank(rank, "rank", size), size


def check_length(n: int, size: int, layout: str, what: str = "sequence length") -> int:
    """The local length ``N / P``; a ``ValueError`` when ``N`` does not divide evenly."""
    parts = size * chunks_per_rank(layout)
    if n % parts:
        needed = f"2·P = {parts}" if layout == "zigzag" else f"P = {parts}"
        raise ValueError(
            f"{what} N = {n} cannot be split evenly over P = {size} ranks with layout "
            f"{layout!r}: N must be a multiple of {needed} (cuflash.parallel does not pad; "
            f"pad the sequence to a multiple of {parts}, masking the padding, or choose "
            f"another N)")
    return n // size


def segments(n_local: int, rank: int, size: int, layout: str = "zigzag"
             ) -> tuple[tuple[int, int, int], ...]:
    """``(local_start, global_start, length)`` of each run of the rank's local rows.

    ``n_local`` is the rank's local length (``N / P``); for ``zigzag`` it must be even.
    """
    rank, size = _check_rank(rank, size)
    check_layout(layout)
    n_local = _checks.check_int(n_local, "n_local", 0)
    if layout == "contiguous":
        return ((0, rank * n_local, n_local),)
    if n_local % 2:
        raise ValueError(
            f"layout 'zigzag' holds two equal chunks per rank, so the local length must be "
            f"even; got {n_local} (sequence length N = {n_local * size} over P = {size} "
            f"ranks, which is not a multiple of 2·P = {2 * size})")
    c = n_local // 2
    return ((0, rank * c, c), (c, (2 * size - 1 - rank) * c, c))


def positions(n: int, rank: int, size: int, layout: str = "zigzag", *, xp=numpy):
    """The global positions (int64) of the local rows of ``rank``, for a sequence of ``n``."""
    rank, size = _check_rank(rank, size)
    n_local = check_length(_checks.check_int(n, "n", 0), size, layout)
    parts = [xp.arange(g, g + length, dtype=xp.int64)
             for _, g, length in segments(n_local, rank, size, layout)]
    return parts[0] if len(parts) == 1 else xp.concatenate(parts)


def _check_array(x, name: str):
    """``x`` when it has what cutting and joining read (``shape``, ``ndim``); ``TypeError``
    naming it otherwise."""
    if not (hasattr(x, "shape") and hasattr(x, "ndim")):
        raise TypeError(f"{name} must be a NumPy or CuPy array or a torch tensor, got "
                        f"{type(x).__name__}")
    return x


def _axis(x, axis: int) -> int:
    ndim = x.ndim
    return _checks.check_int(axis, "axis", -ndim, ndim - 1) % ndim


def shard(x, rank: int, size: int, layout: str = "zigzag", *, axis: int = -2):
    """The part of ``x`` that ``rank`` of ``size`` holds: along ``axis`` (the sequence axis,
    ``-2`` for ``(..., H, N, D)``), per ``layout``.

    ``contiguous`` returns a view; ``zigzag`` a new array (two chunks joined). Works on NumPy
    and CuPy arrays and on torch tensors (anything with ``shape`` and slicing, joined with its
    own ``concatenate``/``cat``). ``ValueError`` when the length does not split evenly.
    """
    rank, size = _check_rank(rank, size)
    axis = _axis(_check_array(x, "x"), axis)
    n = x.shape[axis]
    n_local = check_length(n, size, layout)
    pieces = []
    for _, g, length in segments(n_local, rank, size, layout):
        index = [slice(None)] * x.ndim
        index[axis] = slice(g, g + length)
        pieces.append(x[tuple(index)])
    return pieces[0] if len(pieces) == 1 else _concatenate(pieces, axis)


def unshard(parts: Sequence, layout: str = "zigzag", *, axis: int = -2):
    """The whole sequence from the local parts of every rank (``parts[r]`` from rank ``r``):
    the inverse of :func:`shard`."""
    size = len(check_per_rank(parts, "parts", "part"))
    if size == 0:
        raise ValueError("unshard needs the parts of at least one rank")
    for r, part in enumerate(parts):
        _check_array(part, f"parts[{r}]")
    axis = _axis(parts[0], axis)
    n_local = parts[0].shape[axis]
    for r, part in enumerate(parts):
        if part.shape != parts[0].shape:
            raise ValueError(f"every part must have one shape; part 0 has "
                             f"{tuple(parts[0].shape)}, part {r} has {tuple(part.shape)}")
    pieces = {}
    for r, part in enumerate(parts):
        for local, g, length in segments(n_local, r, size, layout):
            index = [slice(None)] * part.ndim
            index[axis] = slice(local, local + length)
            pieces[g] = part[tuple(index)]
    return _concatenate([pieces[g] for g in sorted(pieces)], axis)


def _concatenate(pieces, axis):
    first = pieces[0]
    module = type(first).__module__.partition(".")[0]
    if module == "torch":
        import torch
        return torch.cat(pieces, dim=axis)
    if module == "cupy":
        import cupy
        return cupy.concatenate(pieces, axis=axis)
    return numpy.concatenate(pieces, axis=axis)
