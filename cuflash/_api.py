"""The public functions: validate, normalise to the 4-D form, dispatch to a back end.

Both back ends (``cuflash.cpu`` for NumPy arrays, ``cuflash.kernels`` for CuPy arrays) expose the
same ``forward`` and ``backward`` entry points and receive the same 4-D views (see
docs/internals.md), so the only thing that depends on the array module is which one is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy

from . import _checks


@dataclass(frozen=True)
class _Problem:
    """One validated call: sizes, options, and the back end that will run it."""
    xp: Any
    backend: Any
    shapes: _checks.Shapes
    dtype: numpy.dtype
    scale: float
    causal: bool
    block_mask: Any


def _backend(xp):
    if xp is numpy:
        from . import cpu
        return cpu
    from . import kernels  # imported on first use: it needs CuPy
    return kernels


def _problem(q, k, v, *, causal, scale, block_mask) -> _Problem:
    xp = _checks.common_module({"q": q, "k": k, "v": v})
    dtype = _checks.check_dtypes({"q": q, "k": k, "v": v})
    shapes = _checks.attention_shapes(q, k, v)
    causal = _checks.check_bool(causal, "causal")
    scale = _checks.check_scale(scale, shapes.d)
    _checks.check_block_mask(block_mask, shapes.nq, shapes.nk, shapes.hq)
    return _Problem(xp, _backend(xp), shapes, dtype, scale, causal, block_mask)


def _inputs_4d(p: _Problem, q, k, v):
    return tuple(_checks.as_4d(x, p.shapes.batch, p.xp) for x in (q, k, v))


def attention(q, k, v, *, causal=False, scale=None, block_mask=None, return_lse=False, out=None):
    """Exact softmax attention, ``softmax(scale · q kᵀ) v``, without forming the score matrix.

    Parameters
    ----------
    q : array, shape ``(..., Hq, Nq, D)``
    k : array, shape ``(..., Hkv, Nk, D)``
    v : array, shape ``(..., Hkv, Nk, Dv)``
        NumPy arrays run the tiled algorithm of ``cuflash.cpu``; CuPy arrays run the CUDA kernels
        on their device and CuPy's current stream. All three must be of one module (and device),
        with one dtype: float16, bfloat16 (``ml_dtypes.bfloat16``) or float32. Leading axes
        broadcast as in ``numpy.matmul``. ``Hq`` must be a multiple of ``Hkv``: query head ``h``
        uses key/value head ``h // (Hq // Hkv)`` (grouped-query attention; ``Hkv = 1`` is
        multi-query attention). ``Nq`` may differ from ``Nk`` and ``Dv`` from ``D``. Any strides
        work; arrays whose last axis is contiguous are read in place, others are copied first.
    causal : bool, optional
        Mask out keys "after" each query. With ``Nq != Nk`` the mask is aligned to the bottom
        right corner of the score matrix: query ``i`` attends to keys ``j <= i + Nk - Nq``.
        For example, with ``Nq = 2`` and ``Nk = 5`` (1 = attended, 0 = masked)::

            1 1 1 1 0
            1 1 1 1 1

        and with ``Nq = 5`` and ``Nk = 2``::

            0 0
            0 0
            0 0
            1 0
            1 1

    scale : float, optional
        Factor applied to ``q kᵀ`` before the softmax; finite and positive. Default
        ``1 / sqrt(D)``.
    block_mask : cuflash.sparse.BlockMask, optional
        Block-sparse pattern: only the blocks it keeps are computed (combined with ``causal`` by
        intersection).
    return_lse : bool, optional
        Also return the log-sum-exp of the scaled scores of each row (natural log).
    out : array, optional
        Where to write the result: exactly the output's shape, dtype and array module (and
        device), any strides, not overlapping ``q``, ``k`` or ``v``.

    Returns
    -------
    out : array, shape ``(..., Hq, Nq, Dv)``, dtype of q
    lse : array, shape ``(..., Hq, Nq)``, float32
        Only with ``return_lse=True``.

    A row with nothing to attend to (fully masked) gives output 0 and lse ``-inf``.

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 8, 100, 64), dtype=np.float32)
    >>> cuflash.attention(q, k, v, causal=True).shape
    (2, 8, 100, 64)
    """
    p = _problem(q, k, v, causal=causal, scale=scale, block_mask=block_mask)
    return_lse = _checks.check_bool(return_lse, "return_lse")
    if out is not None:
        _checks.check_out(out, p.shapes, p.dtype, p.xp, {"q": q, "k": k, "v": v})
    s, xp = p.shapes, p.xp
    with _checks.device_context(q):
        q4, k4, v4 = _inputs_4d(p, q, k, v)
        result = xp.empty(s.out_shape, p.dtype) if out is None else out
        out4 = _checks.writable_4d(result, s.b)
        target = out4 if out4 is not None else xp.empty((s.b, s.hq, s.nq, s.dv), p.dtype)
        lse = xp.empty(s.lse_shape, numpy.float32)
        p.backend.forward(q4, k4, v4, target, lse.reshape(s.b, s.hq, s.nq),
                          scale=p.scale, causal=p.causal, block_mask=p.block_mask)
        if out4 is None:  # `out` has strides the back ends cannot write through
            result[...] = target.reshape(s.out_shape)
    return (result, lse) if return_lse else result


def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, block_mask=None,
                       deterministic=False):
    """Gradients of ``attention`` with respect to q, k and v.

    Parameters
    ----------
    dout : array, shape and dtype of ``out``
        Gradient of the loss with respect to the attention output.
    q, k, v, causal, scale, block_mask
        As given to ``attention``.
    out, lse : arrays
        What ``attention(q, k, v, ..., return_lse=True)`` returned: the scores are recomputed
        from q and k, normalised by ``lse``.
    deterministic : bool, optional
        Ask for bit-identical gradients from run to run. Only the portable GPU kernels (sm_80
        and newer, used for float16/bfloat16 except on Hopper with D = Dv in {64, 128}) need it:
        by default they add each key tile's share of ``dq`` with float32 atomics, whose order
        varies; with ``deterministic=True`` a separate kernel computes ``dq`` per query tile
        instead, recomputing the scores once more (a backward 8–20% slower on an H200). The
        Hopper kernels, the float32 kernels and the NumPy path never use atomics and are always
        deterministic; for them the flag changes nothing.

    Returns
    -------
    dq, dk, dv : arrays with the shapes and dtype of q, k and v
        Gradients of inputs broadcast along leading axes are summed over those axes; ``dk``
        and ``dv`` are summed over the query heads that share a key/value head.
    """
    p = _problem(q, k, v, causal=causal, scale=scale, block_mask=block_mask)
    deterministic = _checks.check_bool(deterministic, "deterministic")
    s, xp = p.shapes, p.xp
    for name, x in (("dout", dout), ("out", out)):
        _checks.check_like(x, name, s.out_shape, p.dtype, xp, device_of=q)
    _checks.check_like(lse, "lse", s.lse_shape, numpy.dtype(numpy.float32), xp, device_of=q)
    with _checks.device_context(q):
        q4, k4, v4 = _inputs_4d(p, q, k, v)
        dout4 = _checks.as_4d(dout, s.batch, xp)
        out4 = _checks.as_4d(out, s.batch, xp)
        lse3 = xp.ascontiguousarray(lse).reshape(s.b, s.hq, s.nq)
        # Gradients for the full broadcast batch; broadcast axes are summed below.
        dq = xp.empty((s.b, s.hq, s.nq, s.d), p.dtype)
        dk = xp.empty((s.b, s.hkv, s.nk, s.d), p.dtype)
        dv = xp.empty((s.b, s.hkv, s.nk, s.dv), p.dtype)
        p.backend.backward(dout4, q4, k4, v4, out4, lse3, dq, dk, dv,
                           scale=p.scale, causal=p.causal, block_mask=p.block_mask,
                           deterministic=deterministic)
        return tuple(
            _checks.reduce_to_shape(g.reshape(s.batch + g.shape[1:]), x.shape, xp)
            for g, x in ((dq, q), (dk, k), (dv, v)))


def attention_vjp(q, k, v, *, causal=False, scale=None, block_mask=None, deterministic=False
                  ) -> tuple[Any, Callable]:
    """Run ``attention`` and return ``(out, vjp)``; ``vjp(dout)`` returns ``(dq, dk, dv)``.

    ``vjp`` keeps q, k, v, out and lse alive and calls ``attention_backward`` with them and with
    the options given here.
    """
    deterministic = _checks.check_bool(deterministic, "deterministic")
    out, lse = attention(q, k, v, causal=causal, scale=scale, block_mask=block_mask,
                         return_lse=True)

    def vjp(dout):
        return attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale,
                                  block_mask=block_mask, deterministic=deterministic)

    return out, vjp
