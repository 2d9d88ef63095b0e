"""Naive attention for checking the fast paths: a float64 oracle and a same-precision baseline.

Every function works on NumPy or CuPy arrays and computes with the arrays' own module:

- ``attention`` / ``attention_backward``: the float64 oracle (``ref64``), forming the full score
  matrix;
- ``chunked_attention``: the same oracle over blocks of query rows (optionally only some rows),
  so that 16K–64K-token problems fit in memory;
- ``attention_probs``: the float64 softmax matrix itself, with the dropout mask in its signs (for
  tests of what a call dropped; flash-attn's ``return_attn_probs``);
- ``naive_attention`` / ``naive_attention_backward``: attention as a framework computes it in the
  input dtype (each product, each elementwise step and the softmax rounded to that dtype,
  accumulation in float32). Its error against the oracle sets the tolerance of the tests: a
  result passes when ``max|out − ref64| ≤ 2·max|naive − ref64| + 1e-5``.

Options are those of ``cuflash.attention`` (``causal``, ``scale``, ``window``, ``softcap``,
``alibi_slopes``, ``block_mask``, ``mask`` as a ``cuflash.sparse.ExactMask``, and ``dropout_p``,
``dropout_seed``, ``dropout_offset``), with the rules of ``cuflash._mask`` and the dropout mask of
``cuflash._dropout`` (dense, built for the whole problem: ``P ∘ Z`` times ``_dropout.rescale(p)``
multiplies V);
``mask`` may also be an element-level boolean array broadcastable to ``(..., Hq, Nq, Nk)``,
True where a query attends to a key. All masks combine by intersection. ``chunked_attention``
takes neither ``mask`` nor the dropout options (``attention`` with ``rows=`` computes chosen
rows with them). Inputs may be 2-D ``(N, D)`` (one head), as for ``cuflash.attention``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy

from . import _checks, _dropout, _mask


def _underflow_ignored(function):
    """Run ``function`` with NumPy's underflow reporting off: ``exp`` of scores far below their
    row's peak underflows to 0 by design, which a caller's ``numpy.seterr(all="raise")`` would
    otherwise turn into a ``FloatingPointError`` on ordinary inputs. Overflow and invalid
    values are reported as the caller asks."""

    @functools.wraps(function)
    def with_underflow_ignored(*args, **kwargs):
        with numpy.errstate(under="ignore"):
            return function(*args, **kwargs)

    return with_underflow_ignored


@_underflow_ignored
def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
              alibi_slopes=None, mask=None, block_mask=None, rows=None, dropout_p=0.0,
              dropout_seed=None, dropout_offset=0):
    """Float64 attention. Returns ``(out, lse)``, both float64; masked rows give 0 and -inf.

    ``rows`` (a 1-D sequence of query rows) computes only those rows, in that order: the
    results have ``len(rows)`` rows. ``mask`` refers to the whole problem.
    """
    c = _call(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap,
              alibi_slopes=alibi_slopes, mask=mask, block_mask=block_mask, rows=rows,
              dropout=(dropout_p, dropout_seed, dropout_offset))
    xp = c.xp
    probs, lse = _probs64(c)
    out = c.dropped(probs) @ _repeat_heads(c.v.astype(xp.float64), c.shapes)
    return c.squeeze(out), c.squeeze(_broadcast_rows(lse, out, xp))


@_underflow_ignored
def attention_probs(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                    alibi_slopes=None, mask=None, block_mask=None, rows=None, dropout_p=0.0,
                    dropout_seed=None, dropout_offset=0):
    """The float64 softmax matrix ``P`` ``(..., Hq, Nq, Nk)`` of the call (``v`` only sets the
    problem's shape), masked entries 0. With dropout, the entries the call drops are negated
    (``-P``), as flash-attn encodes its mask in ``return_attn_probs``: ``P >= 0`` where kept, and
    ``P ∘ Z · _dropout.rescale(p)`` is what multiplies V. Forms the whole matrix: for tests."""
    c = _call(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap,
              alibi_slopes=alibi_slopes, mask=mask, block_mask=block_mask, rows=rows,
              dropout=(dropout_p, dropout_seed, dropout_offset))
    probs, _ = _probs64(c)
    if c.dropout_keep is not None:
        probs = c.xp.where(c.dropout_keep, probs, -probs)
    return c.squeeze(probs)


def _probs64(c):
    """``(P, lse)`` of a call in float64: the masked, modified scores' softmax (before dropout)
    and its log-sum-exp."""
    xp = c.xp
    q64, k64 = (x.astype(xp.float64) for x in (c.q, c.k))
    s, _ = c.logits(q64 @ _repeat_heads(k64, c.shapes).swapaxes(-1, -2), c.scale)
    s = _apply_mask(s, c.keep)
    lse = _logsumexp(s, xp)
    return _softmax(s, lse, xp), lse


@_underflow_ignored
def attention_backward(dout, q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                       alibi_slopes=None, mask=None, block_mask=None, dropout_p=0.0,
                       dropout_seed=None, dropout_offset=0):
    """Float64 gradients ``(dq, dk, dv)`` of ``sum(dout · attention(q, k, v))``.

    Gradients have the shapes of q, k and v (summed over broadcast axes and over the query heads
    of a group).
    """
    c = _call(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap,
              alibi_slopes=alibi_slopes, mask=mask, block_mask=block_mask,
              dropout=(dropout_p, dropout_seed, dropout_offset))
    xp = c.xp
    _check_like_out(c, dout=dout, q=q)
    q64, k64, v64 = (x.astype(xp.float64) for x in (c.q, c.k, c.v))
    do = c.unsqueeze(dout).astype(xp.float64)
    kr, vr = _repeat_heads(k64, c.shapes), _repeat_heads(v64, c.shapes)
    s, grad = c.logits(q64 @ kr.swapaxes(-1, -2), c.scale)
    s = _apply_mask(s, c.keep)
    p = _softmax(s, _logsumexp(s, xp), xp)
    dv = c.dropped(p).swapaxes(-1, -2) @ do
    dp = c.dropped(do @ vr.swapaxes(-1, -2))  # d loss / d P: through the dropout mask
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # d loss / d logit
    if grad is not None:
        ds = ds * grad  # d logit / d (scale·s)
    dq = (ds @ kr) * c.scale
    dk = (ds.swapaxes(-1, -2) @ q64) * c.scale
    return _reduce_grads(xp, c.shapes, (dq, q), (_sum_groups(dk, c.shapes), k),
                         (_sum_groups(dv, c.shapes), v))


# chunked_attention has no mask= argument: attention takes an ExactMask, for chosen rows too.
_EXACT_MASK_IN_ATTENTION = ("chunked_attention takes no ExactMask; "
                            "reference.attention(q, k, v, mask=..., rows=...) takes one")


@_underflow_ignored
def chunked_attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                      alibi_slopes=None, block_mask=None, rows=None, chunk=None):
    """Float64 attention computed ``chunk`` query rows at a time.

    Parameters
    ----------
    q, k, v, causal, scale, window, softcap, alibi_slopes
        As for ``attention``.
    block_mask : cuflash.sparse.BlockMask, optional
        Expanded to elements one chunk at a time.
    rows : sequence of int, optional
        Query rows to compute (default: all). The result holds these rows, in this order.
    chunk : int, optional
        Rows per chunk, a positive int; by default enough for about 2**25 scores at a time.

    Returns
    -------
    out : float64, shape ``(..., Hq, len(rows), Dv)``
    lse : float64, shape ``(..., Hq, len(rows))``
    """
    xp = _checks.common_module({"q": q, "k": k, "v": v})
    shapes = _checks.attention_shapes(q, k, v)
    _checks.check_block_mask(block_mask, shapes.nq, shapes.nk, shapes.hq,
                             exact_mask_hint=_EXACT_MASK_IN_ATTENTION)
    rows = _checks.query_rows(rows, shapes.nq)
    if chunk is None:
        chunk = max(1, 2**25 // (shapes.nk * shapes.hq * max(1, shapes.b)))
    chunk = _checks.check_int(chunk, "chunk", 1)
    outs, lses = [], []
    # No rows: one call with none gives the empty results their shapes.
    for start in range(0, len(rows), chunk) if len(rows) else (0,):
        out, lse = attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                             alibi_slopes=alibi_slopes, block_mask=block_mask,
                             rows=rows[start:start + chunk])
        outs.append(out)
        lses.append(lse)
    return xp.concatenate(outs, axis=-2), xp.concatenate(lses, axis=-1)


@_underflow_ignored
def naive_attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                    alibi_slopes=None, mask=None, block_mask=None, rows=None, dtype=None,
                    dropout_p=0.0, dropout_seed=None, dropout_offset=0):
    """Attention in one precision, as a framework computes it: the baseline of the error rule.

    ``q·scale``, ``q kᵀ``, each step of the score modifier (softcap's division, ``tanh`` and
    product; the ALiBi bias and its sum), the softmax and ``P v`` are each rounded to ``dtype``
    (default: q's dtype); products accumulate in float32. Returns ``(out, lse)``: out in
    ``dtype``, lse (of the rounded logits) in float32. ``rows`` as for ``attention``. Dropout
    multiplies the rounded softmax by the mask and ``_dropout.rescale(p)``, rounded again.
    """
    c = _call(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap,
              alibi_slopes=alibi_slopes, mask=mask, block_mask=block_mask, rows=rows,
              dropout=(dropout_p, dropout_seed, dropout_offset))
    xp = c.xp
    dtype = _naive_dtype(dtype, q)
    r = _rounder(dtype)
    kr, vr = (_repeat_heads(x.astype(xp.float32), c.shapes) for x in (c.k, c.v))
    s = r(r(c.q.astype(xp.float32) * xp.float32(c.scale)) @ kr.swapaxes(-1, -2))
    s, _ = c.logits(s, 1.0, rounding=r)
    s = _apply_mask(s, c.keep)
    lse = _logsumexp(s, xp)
    out = r(c.dropped(r(_softmax(s, lse, xp)), rounding=r) @ vr).astype(dtype)
    return c.squeeze(out), c.squeeze(_broadcast_rows(lse.astype(xp.float32), out, xp))


@_underflow_ignored
def naive_attention_backward(dout, q, k, v, *, causal=False, scale=None, window=(-1, -1),
                             softcap=0.0, alibi_slopes=None, mask=None, block_mask=None,
                             dtype=None, dropout_p=0.0, dropout_seed=None, dropout_offset=0,
                             out=None):
    """Gradients of ``naive_attention`` in the same precision (each product rounded to
    ``dtype``, accumulation float32).

    The softmax-gradient row term is ``rowsum(dout ∘ out)`` of the rounded output, as in the
    FlashAttention backward: ``attention_backward`` receives ``out`` in the input dtype, so no
    implementation behind that contract knows the row term more precisely than this. (Autograd
    through a stored P uses ``rowsum(dP ∘ P)`` instead; on sharply peaked attention the two differ
    by a few units of ``dtype`` in dq.) ``out``, when given, is the output that backward pass
    receives, and the row term is formed from it: the two then share the rounding of ``out``
    rather than each carrying a draw of its own, which over few elements (tiny head dims) made
    the comparison of maxima a matter of luck. Without it, the row term comes from this function's
    own rounded output. Under softcap, ``dS`` is multiplied by the rounded ``1 − tanh²`` of the
    forward. Dropout: ``dV`` from the dropped ``P``, ``dP`` through the mask (each rounded)."""
    c = _call(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap,
              alibi_slopes=alibi_slopes, mask=mask, block_mask=block_mask,
              dropout=(dropout_p, dropout_seed, dropout_offset))
    xp = c.xp
    _check_like_out(c, dout=dout, out=out, q=q)
    dtype = _naive_dtype(dtype, q)
    r = _rounder(dtype)
    kr, vr = (_repeat_heads(x.astype(xp.float32), c.shapes) for x in (c.k, c.v))
    qs = r(c.q.astype(xp.float32) * xp.float32(c.scale))
    s, grad = c.logits(r(qs @ kr.swapaxes(-1, -2)), 1.0, rounding=r)
    s = _apply_mask(s, c.keep)
    p = r(_softmax(s, _logsumexp(s, xp), xp))
    do = c.unsqueeze(dout).astype(xp.float32)
    pd = c.dropped(p, rounding=r)
    dv = r(_sum_groups(r(pd.swapaxes(-1, -2) @ do), c.shapes))
    dp = c.dropped(r(do @ vr.swapaxes(-1, -2)), rounding=r)
    out = r(pd @ vr) if out is None else c.unsqueeze(out).astype(xp.float32)
    ds = r(p * (dp - (do * out).sum(axis=-1, keepdims=True)))
    if grad is not None:
        ds = r(ds * grad)
    dq = r(r(ds @ kr) * xp.float32(c.scale))
    dk = r(_sum_groups(r(ds.swapaxes(-1, -2) @ qs), c.shapes))
    grads = _reduce_grads(xp, c.shapes, (dq, q), (dk, k), (dv, v))
    return tuple(g.astype(dtype) for g in grads)


# keep_mask has no mask= argument: an ExactMask gives its elements itself.
_EXACT_MASK_ELEMENTS = ("an ExactMask holds its elements already: its element_rows(rows) gives "
                        "them")


def keep_mask(nq, nk, *, causal=False, window=(-1, -1), block_mask=None, rows=None, xp=numpy):
    """Element mask (True = attended) of ``causal``, ``window`` and ``block_mask`` for query
    ``rows``.

    Returns ``None`` when nothing is masked, else a bool array of shape ``(len(rows), Nk)``
    (causal or window only) or ``(H', len(rows), Nk)`` (with a block mask of ``H'`` patterns),
    broadcastable to ``(..., Hq, len(rows), Nk)``.
    """
    nq, nk = _checks.check_int(nq, "nq", 1), _checks.check_int(nk, "nk", 1)
    rows = _checks.query_rows(rows, nq)
    causal = _checks.check_bool(causal, "causal")
    # A per-head mask is checked against its own head count (the heads are not known here).
    _checks.check_block_mask(block_mask, nq, nk, getattr(block_mask, "num_heads", None),
                             exact_mask_hint=_EXACT_MASK_ELEMENTS)
    left, right = _mask.band(_checks.check_window(window), causal)
    keep = None
    if (left, right) != (_mask.UNBOUNDED, _mask.UNBOUNDED):
        keep = _mask.visible(nq, nk, left, right, rows=xp.asarray(rows), xp=xp)
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

@dataclass(frozen=True)
class _Call:
    """One validated reference call: inputs with a head axis (q reduced to ``rows``), options."""
    xp: Any
    shapes: _checks.Shapes
    scale: float
    q: Any
    k: Any
    v: Any
    rows: Any  # NumPy int64 query rows of q
    keep: Any  # element mask for those rows, or None
    softcap: float
    slopes: Any  # float32 (batch..., Hq), or None
    dropout_keep: Any = None  # bool (batch..., Hq, len(rows), Nk), or None
    dropout_scale: float = 1.0  # _dropout.rescale(p)

    def dropped(self, x, rounding=None):
        """``x ∘ Z`` times the rescale (``x`` itself without dropout), rounded by ``rounding``."""
        if self.dropout_keep is None:
            return x
        y = self.xp.where(self.dropout_keep, x * x.dtype.type(self.dropout_scale), 0)
        return y if rounding is None else rounding(y)

    def logits(self, s, scale, rounding=None):
        """The score modifier on raw scores ``s`` (``scale=1`` for scaled ones)."""
        s_ = self.shapes
        return _mask.logits(s, self.rows, slice(0, s_.nk), nq=s_.nq, nk=s_.nk, scale=scale,
                            softcap=self.softcap, slopes=self.slopes, rounding=rounding)

    def squeeze(self, x):
        """Drop the head axis of a result when every input was 2-D."""
        return x if self.shapes.heads_axis else x.reshape(x.shape[1:])

    def unsqueeze(self, x):
        return x if self.shapes.heads_axis else x.reshape((1,) + tuple(x.shape))


def _call(q, k, v, *, scale, causal, window, softcap, alibi_slopes, mask, block_mask,
          rows=None, dropout=(0.0, None, 0)) -> _Call:
    xp = _checks.common_module({"q": q, "k": k, "v": v})
    _check_real_dtypes({"q": q, "k": k, "v": v})
    shapes = _checks.attention_shapes(q, k, v)
    scale = _checks.check_scale(scale, shapes.d)
    window = _checks.check_window(window)
    softcap = _checks.check_softcap(softcap, scale)
    causal = _checks.check_bool(causal, "causal")
    _checks.check_block_mask(block_mask, shapes.nq, shapes.nk, shapes.hq)
    slopes = _checks.check_alibi(alibi_slopes, shapes, xp, device_of=q)
    if slopes is not None:
        slopes = slopes.reshape(shapes.batch + (shapes.hq,))
    some_rows = rows is not None
    rows = _checks.query_rows(rows, shapes.nq)
    keep = keep_mask(shapes.nq, shapes.nk, causal=causal, window=window, block_mask=block_mask,
                     rows=rows, xp=xp)
    if _is_exact_mask(mask):
        _checks.check_exact_mask(mask, block_mask, shapes.nq, shapes.nk, shapes.hq)
        mask = xp.asarray(mask.element_rows(rows))  # (H', len(rows), Nk)
    elif mask is not None:
        _check_element_mask(mask, xp, shapes)
        from .sparse._convert import zero_one  # scipy is imported only when a mask is given

        mask = xp.asarray(zero_one(mask, "mask"))
        if some_rows and mask.ndim >= 2 and mask.shape[-2] != 1:
            mask = mask[..., xp.asarray(rows), :]
    if mask is not None:
        keep = mask if keep is None else keep & mask
    p, seed, offset, _ = _checks.check_dropout(*dropout, shapes, xp=xp, device_of=q,
                                               read_seed_array=True)
    dropout_keep = None
    if p > 0:
        dropout_keep = xp.asarray(_dropout.dense_keep(seed, offset, p, shapes.batch, shapes.hq,
                                                      rows, shapes.nk))
    q, k, v = (_checks.with_head_axis(x) for x in (q, k, v))
    if some_rows:
        q = q[..., xp.asarray(rows), :]
    return _Call(xp, shapes, scale, q, k, v, rows, keep, softcap, slopes, dropout_keep,
                 _dropout.rescale(p))


_REAL_DTYPES = (*_checks.SUPPORTED_DTYPES, numpy.dtype(numpy.float64))


def _check_real_dtypes(arrays: dict) -> None:
    """The oracle computes in float64 from any of cuflash's dtypes or float64 itself; integers
    would make the naive baseline's rounding an integer cast, and complex values lose their
    imaginary part."""
    for name, x in arrays.items():
        if x.dtype not in _REAL_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; the reference takes float16, bfloat16, "
                            f"float32 or float64")


def _check_like_out(c: _Call, *, q, **arrays) -> None:
    """``dout`` (and ``out``, where given) have the output's shape, in q's module and on its
    device, in a dtype the reference takes."""
    given = {name: x for name, x in arrays.items() if x is not None}
    for name, x in given.items():
        _checks.check_like(x, name, c.shapes.out_shape, None, c.xp, device_of=q)
    _check_real_dtypes(given)


def _naive_dtype(dtype, q) -> numpy.dtype:
    """The precision the naive baseline rounds to: q's dtype by default, else ``dtype``, one the
    reference takes (each step rounded to an integer or complex type is no baseline)."""
    if dtype is None:
        return q.dtype
    try:
        chosen = numpy.dtype(dtype)
    except TypeError:
        chosen = None
    if chosen is None or chosen not in _REAL_DTYPES:  # (a dtype equals None: float64)
        raise TypeError("dtype must be float16, bfloat16, float32 or float64 (the precision to "
                        f"round to) or None (q's), got {_checks._show(dtype)}")
    return chosen


def _check_element_mask(mask, xp, shapes) -> None:
    """An element-level ``mask`` must be an array of bools (or 0/1 integers): anything else (a
    BlockMask, a scipy matrix, a scalar) would become a 0-d True, every pair attended. Its shape
    must broadcast to the scores' without growing them (extra leading axes would give results
    of another shape than the inputs')."""
    is_array = isinstance(mask, (numpy.ndarray, xp.ndarray)) and mask.ndim >= 1
    if not (is_array and (mask.dtype == bool or numpy.issubdtype(mask.dtype, numpy.integer))):
        raise TypeError(f"mask must be an ExactMask or an array of bools broadcastable to "
                        f"(..., Hq, Nq, Nk), got {_checks._type_name(mask)}"
                        f"{_checks.mask_hint(mask)}")
    scores = shapes.batch + (shapes.hq, shapes.nq, shapes.nk)  # one head for 2-D inputs
    try:
        fits = numpy.broadcast_shapes(tuple(mask.shape), scores) == scores
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"mask must broadcast to the scores' shape {scores} (..., Hq, Nq, Nk), "
                         f"got shape {tuple(mask.shape)}")


def _is_exact_mask(mask):
    if mask is None or not hasattr(mask, "element_rows"):
        return False
    from .sparse import ExactMask
    return isinstance(mask, ExactMask)


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


def _apply_mask(s, keep):
    if keep is None:
        return s
    xp = _checks.array_module(s)
    return xp.where(keep, s, xp.asarray(-math.inf, dtype=s.dtype))


def _logsumexp(s, xp):
    """Row log-sum-exp; ``-inf`` for rows whose scores are all ``-inf``, NaN for rows holding
    NaN or ``+inf`` (``-inf`` marks a row without keys, which such a row is not)."""
    peak = s.max(axis=-1)
    peak = xp.where(xp.isneginf(peak), xp.asarray(0, dtype=s.dtype), peak)
    total = xp.exp(s - peak[..., None]).sum(axis=-1)
    empty = total == 0  # False for a NaN total, whose row must not read as masked
    return xp.where(empty, xp.asarray(-math.inf, dtype=s.dtype),
                    xp.log(xp.where(empty, 1, total)) + peak)


def _softmax(s, lse, xp):
    """``exp(s - lse)`` with fully masked rows (lse = -inf) giving 0, not NaN."""
    finite = xp.where(xp.isneginf(lse), xp.asarray(0, dtype=lse.dtype), lse)
    return xp.exp(s - finite[..., None])


def _rounder(dtype):
    """Function that rounds float32 values to ``dtype`` and returns them as float32."""
    if numpy.dtype(dtype) == numpy.float32:
        return lambda x: x
    return lambda x: x.astype(dtype).astype(numpy.float32)
