"""Ulysses (all-to-all, head-parallel) attention: the other way to shard a sequence.

Every rank holds its rows of the sequence for ALL heads. One all-to-all per input turns that
into ALL rows for ``H/P`` heads; each rank then runs ``cuflash.attention`` on whole sequences
(so every option works, ALiBi included, with global positions for free), and one all-to-all
turns the output back into sequence shards. The backward pass does the same with ``dout``,
``out`` and ``lse`` and sends the gradients back.

Needs ``Hq`` and ``Hkv`` divisible by ``P``. With ``validate=True`` (the default) the ranks
compare their shapes and options with one small all-gather first: a rank with other options
would otherwise compute its heads differently without an error, and a rank that refuses its
arguments makes every rank raise. Communication per rank is about four times its share of
q/k/v/out (``(P−1)/P`` of each), independent of how the sequence is masked, and is not
overlapped with compute; compare ring attention in docs/parallel.md.
"""

from __future__ import annotations

import cuflash
from cuflash import _checks

from . import layout as _layout
from .comm import array_module
from .ring import agree_on_options, check_backward_arrays, check_inputs

__all__ = ["ulysses_attention", "ulysses_attention_backward"]


def _check_heads(comm, q, k, v):
    """The head axes split over the ranks: checked after the comparison of the ranks' calls,
    where a rank whose heads do not split, beside ranks whose heads do, fails with every rank
    rather than alone while the others wait for it there."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 3:
            raise ValueError(f"ulysses attention needs a head axis: {name} must be "
                             f"(..., H, N, D), got shape {tuple(x.shape)}")
    size = comm.size
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq % size or hkv % size:
        raise ValueError(f"ulysses attention splits the heads over the P = {size} ranks: Hq = "
                         f"{hq} and Hkv = {hkv} must both be multiples of {size}; use "
                         f"ring_attention otherwise")


def _to_heads(x, comm, layout, seq_axis=-2):
    """This rank's rows of every head → every row of this rank's heads (global order)."""
    xp = array_module(x)
    seq_axis %= x.ndim
    head_axis = seq_axis - 1
    group = x.shape[head_axis] // comm.size
    pieces = []
    for j in range(comm.size):
        index = [slice(None)] * x.ndim
        index[head_axis] = slice(j * group, (j + 1) * group)
        pieces.append(xp.ascontiguousarray(x[tuple(index)]))
    received = comm.all_to_all(pieces)
    return _layout.unshard(received, layout, axis=seq_axis)


def _to_sequence(y, comm, layout, seq_axis=-2):
    """Every row of this rank's heads → this rank's rows of every head."""
    xp = array_module(y)
    seq_axis %= y.ndim
    pieces = [xp.ascontiguousarray(_layout.shard(y, j, comm.size, layout, axis=seq_axis))
              for j in range(comm.size)]
    received = comm.all_to_all(pieces)
    return xp.concatenate(received, axis=seq_axis - 1)


def _slopes(alibi_slopes, comm, q, k, v):
    """This rank's heads of the slopes of all ``Hq`` heads (checked against all of them).
    Called after ``check_inputs``: the check reads the shapes of q, k, v, which a rank must not
    refuse before the comparison of the ranks' calls, alone while the others wait in it."""
    if alibi_slopes is None:
        return None
    xp = _checks.common_module({"q": q, "k": k, "v": v})
    with _checks.device_context(q):
        _checks.check_alibi_slopes(alibi_slopes, _checks.attention_shapes(q, k, v), xp, q)
    group = q.shape[-3] // comm.size
    return alibi_slopes[..., comm.rank * group:(comm.rank + 1) * group]


def ulysses_attention(q, k, v, *, comm, causal: bool = False, layout: str = "contiguous",
                      window=(-1, -1), softcap: float = 0.0, scale: float | None = None,
                      alibi_slopes=None, return_lse: bool = False, validate: bool = True):
    """Exact attention over a sequence sharded across ranks, by all-to-all over heads.

    Inputs and results are this rank's rows (``shard(x, rank, P, layout)``), as for
    :func:`cuflash.parallel.ring_attention`; options are ``cuflash.attention``'s over the whole
    sequence. ``alibi_slopes`` (shape ``(Hq,)`` or ``(..., Hq)``) are the slopes of all heads.
    ``validate``: compare every rank's shapes and options first (``ValueError`` on every rank
    on a mismatch, which would otherwise give wrong rows without an error; a rank's refusal of
    its arguments reaches every rank through it); ``False`` skips it, leaving the ranks'
    agreement to the caller, as for ring attention.
    """
    options = agree_on_options(comm, {"q": q, "k": k, "v": v}, "ulysses attention", layout=layout,
                               causal=causal, window=window, softcap=softcap, scale=scale,
                               alibi_slopes=alibi_slopes, validate=validate,
                               flags={"return_lse": return_lse})
    return_lse = options["return_lse"]
    _check_heads(comm, q, k, v)
    check_inputs(q, k, v)
    slopes = _slopes(alibi_slopes, comm, q, k, v)
    with _checks.device_context(q):  # the pieces are made on the arrays' device
        qh, kh, vh = (_to_heads(x, comm, layout) for x in (q, k, v))
        out, lse = cuflash.attention(qh, kh, vh, causal=causal, window=window, softcap=softcap,
                                     scale=scale, alibi_slopes=slopes, return_lse=True)
        out = _to_sequence(out, comm, layout)
        if not return_lse:
            return out
        return out, _to_sequence(lse, comm, layout, seq_axis=-1)


def ulysses_attention_backward(dout, q, k, v, out, lse, *, comm, causal: bool = False,
                               layout: str = "contiguous", window=(-1, -1),
                               softcap: float = 0.0, scale: float | None = None,
                               alibi_slopes=None, deterministic: bool = False,
                               validate: bool = True):
    """Gradients ``(dq, dk, dv)`` of :func:`ulysses_attention`, each this rank's rows."""
    arrays = {"q": q, "k": k, "v": v, "dout": dout, "out": out, "lse": lse}
    options = agree_on_options(comm, arrays, "ulysses attention", layout=layout, causal=causal,
                               window=window, softcap=softcap, scale=scale,
                               alibi_slopes=alibi_slopes, validate=validate,
                               flags={"deterministic": deterministic})
    deterministic = options["deterministic"]
    _check_heads(comm, q, k, v)
    check_inputs(q, k, v)
    slopes = _slopes(alibi_slopes, comm, q, k, v)
    check_backward_arrays(dout, q, k, v, out, lse)
    with _checks.device_context(q):  # as the forward pass
        qh, kh, vh, douth, outh = (_to_heads(x, comm, layout) for x in (q, k, v, dout, out))
        lseh = _to_heads(lse, comm, layout, seq_axis=-1)
        grads = cuflash.attention_backward(douth, qh, kh, vh, outh, lseh, causal=causal,
                                           window=window, softcap=softcap, scale=scale,
                                           alibi_slopes=slopes, deterministic=deterministic)
        return tuple(_to_sequence(g, comm, layout) for g in grads)
