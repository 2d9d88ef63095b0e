"""Naive attention for checking the fast paths: a float64 oracle and a same-precision baseline.

Every function works on NumPy or CuPy arrays and computes with the arrays' own module:

- ``attention`` / ``attention_backward``: the float64 oracle (``ref64``), forming the full score
  matrix;
- ``chunked_attention``: the same oracle over blocks of query rows (optionally only some rows),
  so that 16K–64K-token problems fit in memory;
- ``naive_attention`` / ``naive_attention_backward``: attention as a framework computes it in the
  input dtype (each product and the softmax rounded to that dtype, accumulation in float32). Its
  error against the oracle sets the tolerance of the tests: a result passes when
  ``max|out − ref64| ≤ 2·max|naive − ref64| + 1e-5``.

Masks: ``causal`` uses the bottom-right alignment of ``cuflash.attention`` (query ``i`` sees keys
``j <= i + Nk - Nq``); ``mask`` is an element-level boolean array broadcastable to
``(..., Hq, Nq, Nk)``, True where a query attends to a key. Both may be given (intersection).
"""

from __future__ import annotations

import math

import numpy

from . import _checks


def attention(q, k, v, *, causal=False, scale=None, mask=None):
    """Float64 attention. Returns ``(out, lse)``, both float64; masked rows give 0 and -inf."""
    xp, shapes, scale = _setup(q, k, v, scale)
    q64, k64, v64 = (x.astype(xp.float64) for x in (q, k, v))
    s = (q64 @ _repeat_heads(k64, shapes).swapaxes(-1, -2)) * scale
    s = _apply_mask(s, _keep(xp, shapes, causal, mask))
    lse = _logsumexp(s, xp)
    out = _softmax(s, lse, xp) @ _repeat_heads(v64, shapes)
    return out, _broadcast_rows(lse, out, xp)


def attention_backward(dout, q, k, v, *, causal=False, scale=None, mask=None):
    """Float64 gradients ``(dq, dk, dv)`` of ``sum(dout · attention(q, k, v))``.

    Gradients have the shapes of q, k and v (summed over broadcast axes and over the query heads
    of a group).
    """
    xp, shapes, scale = _setup(q, k, v, scale)
    q64, k64, v64, do = (x.astype(xp.float64) for x in (q, k, v, dout))
    kr, vr = _repeat_heads(k64, shapes), _repeat_heads(v64, shapes)
    s = _apply_mask((q64 @ kr.swapaxes(-1, -2)) * scale, _keep(xp, shapes, causal, mask))
    p = _softmax(s, _logsumexp(s, xp), xp)
    dv = p.swapaxes(-1, -2) @ do
    dp = do @ vr.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = (ds @ kr) * scale
    dk = (ds.swapaxes(-1, -2) @ q64) * scale
    return _reduce_grads(xp, shapes, (dq, q), (_sum_groups(dk, shapes), k),
                         (_sum_groups(dv, shapes), v))


def chunked_attention(q, k, v, *, causal=False, scale=None, block_mask=None, rows=None,
                      chunk=None):
    """Float64 attention computed ``chunk`` query rows at a time.

    Parameters
    ----------
    q, k, v, causal, scale
        As for ``attention``.
    block_mask : cuflash.sparse.BlockMask, optional
        Expanded to elements one chunk at a time.
    rows : sequence of int, optional
        Query rows to compute (default: all). The result holds these rows, in this order.
    chunk : int, optional
        Rows per chunk; by default enough for about 2**25 scores at a time.

    Returns
    -------
    out : float64, shape ``(..., Hq, len(rows), Dv)``
    lse : float64, shape ``(..., Hq, len(rows))``
    """
    xp, shapes, scale = _setup(q, k, v, scale)
    rows = numpy.arange(shapes.nq) if rows is None else numpy.asarray(rows, dtype=numpy.int64)
    if rows.ndim != 1 or ((rows < 0) | (rows >= shapes.nq)).any():
        raise ValueError(f"rows must be a 1-D sequence of query rows in [0, {shapes.nq}), "
                         f"got {rows!r}")
    if chunk is None:
        chunk = max(1, 2**25 // (shapes.nk * shapes.hq * max(1, shapes.b)))
    outs, lses = [], []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        keep = keep_mask(shapes.nq, shapes.nk, causal=causal, block_mask=block_mask, rows=part,
                         xp=xp)
        out, lse = attention(q[..., xp.asarray(part), :], k, v, scale=scale, mask=keep)
        outs.append(out)
        lses.append(lse)
    return xp.concatenate(outs, axis=-2), xp.concatenate(lses, axis=-1)


def naive_attention(q, k, v, *, causal=False, scale=None, mask=None, dtype=None):
    """Attention in one precision, as a framework computes it: the baseline of the error rule.

    ``q·scale``, ``q kᵀ``, the softmax and ``P v`` are each rounded to ``dtype`` (default: q's
    dtype); products accumulate in float32. Returns ``(out, lse)``: out in ``dtype``, lse (of the
    rounded scores) in float32.
    """
    xp, shapes, scale = _setup(q, k, v, scale)
    dtype = q.dtype if dtype is None else numpy.dtype(dtype)
    r = _rounder(dtype)
    kr, vr = (_repeat_heads(x.astype(xp.float32), shapes) for x in (k, v))
    s = r(r(q.astype(xp.float32) * xp.float32(scale)) @ kr.swapaxes(-1, -2))
    s = _apply_mask(s, _keep(xp, shapes, causal, mask))
    lse = _logsumexp(s, xp)
    out = r(r(_softmax(s, lse, xp)) @ vr).astype(dtype)
    return out, _broadcast_rows(lse.astype(xp.float32), out, xp)


def naive_attention_backward(dout, q, k, v, *, causal=False, scale=None, mask=None, dtype=None):
    """Gradients of ``naive_attention`` in the same precision (each product rounded to
    ``dtype``, accumulation float32).

    The softmax-gradient row term is ``rowsum(dout ∘ out)`` of the rounded output, as in the
    FlashAttention backward: ``attention_backward`` receives ``out`` in the input dtype, so no
    implementation behind that contract knows the row term more precisely than this. (Autograd
    through a stored P uses ``rowsum(dP ∘ P)`` instead; on sharply peaked attention the two differ
    by a few units of ``dtype`` in dq.)"""
    xp, shapes, scale = _setup(q, k, v, scale)
    dtype = q.dtype if dtype is None else numpy.dtype(dtype)
    r = _rounder(dtype)
    kr, vr = (_repeat_heads(x.astype(xp.float32), shapes) for x in (k, v))
    qs = r(q.astype(xp.float32) * xp.float32(scale))
    s = _apply_mask(r(qs @ kr.swapaxes(-1, -2)), _keep(xp, shapes, causal, mask))
    p = r(_softmax(s, _logsumexp(s, xp), xp))
    do = dout.astype(xp.float32)
    dv = r(_sum_groups(r(p.swapaxes(-1, -2) @ do), shapes))
    dp = r(do @ vr.swapaxes(-1, -2))
    out = r(p @ vr)
    ds = r(p * (dp - (do * out).sum(axis=-1, keepdims=True)))
    dq = r(r(ds @ kr) * xp.float32(scale))
    dk = r(_sum_groups(r(ds.swapaxes(-1, -2) @ qs), shapes))
    grads = _reduce_grads(xp, shapes, (dq, q), (dk, k), (dv, v))
    return tuple(g.astype(dtype) for g in grads)


def keep_mask(nq, nk, *, causal=False, block_mask=None, rows=None, xp=numpy):
    """Element mask (True = attended) of ``causal`` and ``block_mask`` for query ``rows``.

    Returns ``None`` when nothing is masked, else a bool array of shape ``(len(rows), Nk)`` (causal
    only) or ``(H', len(rows), Nk)`` (with a block mask of ``H'`` patterns), broadcastable to
    ``(..., Hq, len(rows), Nk)``.
    """
    rows = numpy.arange(nq) if rows is None else numpy.asarray(rows)
    keep = None
    if causal:
        keep = xp.asarray(numpy.arange(nk)[None, :] <= rows[:, None] + (nk - nq))
    if block_mask is not None:
        bq, bk = (int(n) for n in block_mask.block_size)
        dense = numpy.asarray(block_mask.to_dense(), dtype=bool)  # (H', Nqb, Nkb)
        blocks = xp.asarray(dense[:, rows // bq][:, :, numpy.arange(nk) // bk])
        keep = blocks if keep is None else keep & blocks
    return keep


def block_mask_to_element_mask(block_mask, nq, nk):
    """The elements a ``BlockMask`` keeps: NumPy bool ``(H', Nq, Nk)``."""
    return keep_mask(nq, nk, block_mask=block_mask)


# ----------------------------------------------------------------------------- helpers

def _setup(q, k, v, scale):
    xp = _checks.common_module({"q": q, "k": k, "v": v})
    shapes = _checks.attention_shapes(q, k, v)
    return xp, shapes, _checks.check_scale(scale, shapes.d)


def _repeat_heads(x, shapes):
    """Key/value heads repeated for the query heads that share them."""
    group = shapes.hq // shapes.hkv
    return x if group == 1 else x.repeat(group, axis=-3)


def _sum_groups(g, shapes):
    """Sum a per-query-head gradient over each group of query heads."""
    group = shapes.hq // shapes.hkv
    return g.reshape(g.shape[:-3] + (shapes.hkv, group) + g.shape[-2:]).sum(axis=-3)


def _broadcast_rows(lse, out, xp):
    """``lse`` over the batch of ``out`` (v may add leading axes that the scores lack)."""
    return xp.ascontiguousarray(xp.broadcast_to(lse, out.shape[:-1]))


def _reduce_grads(xp, shapes, *pairs):
    return tuple(_checks.reduce_to_shape(g, x.shape, xp) for g, x in pairs)


def _keep(xp, shapes, causal, mask):
    keep = keep_mask(shapes.nq, shapes.nk, causal=causal, xp=xp)
    if mask is not None:
        mask = xp.asarray(mask, dtype=bool)
        keep = mask if keep is None else keep & mask
    return keep


def _apply_mask(s, keep):
    if keep is None:
        return s
    xp = _checks.array_module(s)
    return xp.where(keep, s, xp.asarray(-math.inf, dtype=s.dtype))


def _logsumexp(s, xp):
    """Row log-sum-exp; ``-inf`` for rows whose scores are all ``-inf``."""
    peak = s.max(axis=-1)
    peak = xp.where(xp.isneginf(peak), xp.asarray(0, dtype=s.dtype), peak)
    total = xp.exp(s - peak[..., None]).sum(axis=-1)
    nonzero = total > 0
    return xp.where(nonzero, xp.log(xp.where(nonzero, total, 1)) + peak,
                    xp.asarray(-math.inf, dtype=s.dtype))


def _softmax(s, lse, xp):
    """``exp(s - lse)`` with fully masked rows (lse = -inf) giving 0, not NaN."""
    finite = xp.where(xp.isneginf(lse), xp.asarray(0, dtype=lse.dtype), lse)
    return xp.exp(s - finite[..., None])


def _rounder(dtype):
    """Function that rounds float32 values to ``dtype`` and returns them as float32."""
    if numpy.dtype(dtype) == numpy.float32:
        return lambda x: x
    return lambda x: x.astype(dtype).astype(numpy.float32)
