"""The public functions: validate into one ``AttentionSpec``, normalise to the 4-D form,
dispatch to a back end.

Both back ends (``cuflash.cpu`` for NumPy arrays, ``cuflash.kernels`` for CuPy arrays) expose the
same entry points, ``forward(q, k, v, out, lse, spec)`` and
``backward(dout, q, k, v, out, lse, dq, dk, dv, spec)``, and receive the same 4-D views (see
docs/internals.md), so the only thing that depends on the array module is which one is called.

The public functions go through ``_calls``, which runs CuPy calls whose signature it has seen
before without validating and planning them again; the first call of a signature, and every
NumPy call, takes the path below (``validated_forward`` / ``validated_backward``).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any, Callable

import numpy

from . import _calls, _checks, _mask, _varlen_pages, _warnings
from ._spec import AttentionSpec, VarlenLayout


def _backend(xp):
    if xp is numpy:
        from . import cpu
        return cpu
    from . import kernels  # imported on first use: it needs CuPy
    return kernels


def _module_and_dtype(q, k, v) -> tuple[Any, numpy.dtype]:
    """The array module and the dtype that q, k and v share (checked in that order)."""
    arrays = {"q": q, "k": k, "v": v}
    return _checks.common_module(arrays), _checks.check_dtypes(arrays)


def _band_and_score_options(shapes, causal, scale, window,
                            softcap) -> tuple[bool, float, tuple[int, int], float]:
    """``(causal, scale, window, softcap)`` checked, in that order (the scale's default and the
    softcap's check depend on the head dim and the scale)."""
    causal = _checks.check_bool(causal, "causal")
    scale = _checks.check_scale(scale, shapes.d)
    window = _checks.check_window(window)
    softcap = _checks.check_softcap(softcap, scale)
    return causal, scale, window, softcap


def _spec(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
          block_mask=None, deterministic=False, mask=None, dropout_p=0.0, dropout_seed=None,
          dropout_offset=0, grad_dtype=None) -> tuple[Any, AttentionSpec]:
    """Validate one call: the array module of the inputs and the spec every back end reads.
    The defaults are the public functions' (for callers of a back end's entry points)."""
    xp, dtype = _module_and_dtype(q, k, v)
    shapes = _checks.attention_shapes(q, k, v)
    causal, scale, window, softcap = _band_and_score_options(shapes, causal, scale, window, softcap)
    _checks.check_block_mask(block_mask, shapes.nq, shapes.nk, shapes.hq)
    _checks.check_exact_mask(mask, block_mask, shapes.nq, shapes.nk, shapes.hq)
    deterministic = _checks.check_bool(deterministic, "deterministic")
    dropout = _checks.check_dropout(dropout_p, dropout_seed, dropout_offset, shapes, xp=xp,
                                    device_of=q)
    float32_grads = _checks.check_grad_dtype(grad_dtype, dtype)
    with _checks.device_context(q):
        alibi = _checks.check_alibi(alibi_slopes, shapes, xp, device_of=q)
    return xp, AttentionSpec(shapes=shapes, dtype=dtype, scale=scale, causal=causal,
                             window=window, softcap=softcap, alibi=alibi, block_mask=block_mask,
                             deterministic=deterministic, exact_mask=mask, dropout_p=dropout[0],
                             dropout_seed=dropout[1], dropout_offset=dropout[2],
                             dropout_state=dropout[3], float32_grads=float32_grads)


def _inputs_4d(spec: AttentionSpec, xp, q, k, v):
    return tuple(_checks.as_4d(x, spec.shapes.batch, xp) for x in (q, k, v))


def _forward(spec: AttentionSpec, xp, q, k, v, out):
    """Run the forward pass of a validated call; returns ``(out, lse)`` in the caller's shapes."""
    s = spec.shapes
    with _checks.device_context(q), _calls.CapturedAllocations(q) as allocations:
        q4, k4, v4 = _inputs_4d(spec, xp, q, k, v)
        result = xp.empty(s.out_shape, spec.dtype) if out is None else out
        out4 = _checks.writable_4d(result, s.b)
        target = out4 if out4 is not None else xp.empty((s.b, s.hq, s.nq, s.dv), spec.dtype)
        lse = xp.empty(s.lse_shape, numpy.float32)
        _backend(xp).forward(q4, k4, v4, target, lse.reshape(s.b, s.hq, s.nq), spec)
        if out4 is None:  # `out` has strides the back ends cannot write through
            result[...] = target.reshape(s.out_shape)
    allocations.keep((result,), spec)
    if xp is numpy:  # on the GPU a check would make every call wait for the device
        _warnings.check_forward(result, lse, (q, k, v), seen=_rows_with_keys(spec))
    return result, lse


def _rows_with_keys(spec: AttentionSpec):
    """Bool over the query rows, broadcastable to the lse the caller gets (for packed sequences
    ``(Hq, total_q)``, each sequence by its own lengths): True where causal and the window leave
    the row some key, so that an lse of -inf there is an overflow rather than a row without keys;
    ``None`` under a block or exact mask, whose empty rows this does not work out."""
    if spec.sparse or spec.exact:
        return None
    s = spec.shapes
    lengths = ([(s.nq, s.nk)] if spec.varlen is None else
               [(rows_q.stop - rows_q.start, rows_k.stop - rows_k.start)
                for _, rows_q, rows_k in spec.varlen.sequences()])
    seen = []
    for nq, nk in lengths:
        begin, end = _mask.key_range(slice(0, nq), nq, nk, *spec.band())
        seen.append(end > begin)
    return numpy.concatenate(seen)


_NO_GRADS = (None, None, None)


def _check_given_grads(spec: AttentionSpec, xp, grads, dout, q, k, v, out, lse) -> None:
    """The given ones of ``grads`` (dq, dk, dv; ``None`` where not given), by ``out=``'s rule
    (``_checks.check_out``): each exactly its input's shape in the gradients' dtype, apart from
    every other array of the call, given gradients and a CuPy seed array included."""
    apart = _checks.with_seed_array(dict(zip(_checks.GRAD_APART_FROM, (q, k, v, dout, out, lse))),
                                    spec.dropout_state)
    for name, grad, x in zip(_checks.GRAD_NAMES, grads, (q, k, v)):
        if grad is not None:
            _checks.check_out(grad, x.shape, spec.grad_dtype, xp, apart, name=name)
            apart[name] = grad


def _broadcast_along_batch(shapes, x) -> bool:
    """Whether input ``x`` is broadcast along the batch (its gradient is a sum over it)."""
    return math.prod(_checks.with_head_axis(x).shape[:-3]) != shapes.b


def _written_in_place(shapes, x, grad):
    """The 4-D view through which a back end writes the gradient of input ``x`` straight into
    the given ``grad``, or ``None``: when none is given, when ``x`` is broadcast along the batch
    or when ``grad``'s strides cannot be written."""
    if grad is None or _broadcast_along_batch(shapes, x):
        return None
    return _checks.writable_4d(grad, shapes.b)


def _check_backward_arrays(spec: AttentionSpec, xp, dout, q, out, lse, result_shapes) -> None:
    """``dout`` and ``out`` of the forward's output shape in the inputs' dtype, ``lse`` of its
    lse shape in float32 (``result_shapes``: those two shapes), all on q's device."""
    out_shape, lse_shape = result_shapes
    for name, x in (("dout", dout), ("out", out)):
        _checks.check_like(x, name, out_shape, spec.dtype, xp, device_of=q)
    _checks.check_like(lse, "lse", lse_shape, numpy.dtype(numpy.float32), xp, device_of=q)


def _result_shapes(spec: AttentionSpec, q) -> tuple:
    """The shapes of a forward's out and lse (``_packed_result_shapes`` for a varlen one)."""
    return spec.shapes.out_shape, spec.shapes.lse_shape


def _backward(spec: AttentionSpec, xp, dout, q, k, v, out, lse, grads=_NO_GRADS):
    """Run the backward pass of a validated call; returns ``(dq, dk, dv)``: the given arrays of
    ``grads`` (``None`` where not given), written, and new arrays for the others."""
    s = spec.shapes
    _check_backward_arrays(spec, xp, dout, q, out, lse, _result_shapes(spec, q))
    _check_given_grads(spec, xp, grads, dout, q, k, v, out, lse)
    inputs = (q, k, v)
    # quiet: NumPy's warnings off here too, for the casts of the broadcast sums below
    with (_checks.device_context(q), _warnings.quiet_if_numpy(xp),
          _calls.CapturedAllocations(q) as allocations):
        q4, k4, v4 = _inputs_4d(spec, xp, q, k, v)
        dout4 = _checks.as_4d(dout, s.batch, xp)
        out4 = _checks.as_4d(out, s.batch, xp)
        lse3 = xp.ascontiguousarray(lse).reshape(s.b, s.hq, s.nq)
        run_spec = _spec_rounding_sums_once(spec, inputs)
        in_place = [None if run_spec is not spec else _written_in_place(s, x, grad)
                    for x, grad in zip(inputs, grads)]
        # Elsewhere, gradients for the full broadcast batch; broadcast axes are summed below.
        full = ((s.b, s.hq, s.nq, s.d), (s.b, s.hkv, s.nk, s.d), (s.b, s.hkv, s.nk, s.dv))
        targets = [xp.empty(shape, run_spec.grad_dtype) if view is None else view
                   for view, shape in zip(in_place, full)]
        _backend(xp).backward(dout4, q4, k4, v4, out4, lse3, *targets, run_spec)
        results = tuple(grad if view is not None else _summed(spec, xp, target, x, grad)
                        for grad, view, target, x in zip(grads, in_place, targets, inputs))
    allocations.keep(results, spec)
    if xp is numpy:  # on the GPU a check would make every call wait for the device
        _warnings.check_backward(results, (dout, q, k, v, out), lse, spec.dtype)
    return results


def _spec_rounding_sums_once(spec: AttentionSpec, inputs):
    """The spec the back end runs: ``spec``, or where an input is broadcast along the batch and
    the gradients are rounded to the inputs' dtype, ``spec`` with float32 gradients, so that the
    sum over the batch adds unrounded gradients and rounds once, as a gradient that is not summed
    is rounded once. The kernels write all three gradients in one dtype: the others are then
    rounded from float32 too, which gives the values they would have been written with."""
    if spec.grad_dtype == numpy.float32:
        return spec
    if not any(_broadcast_along_batch(spec.shapes, x) for x in inputs):
        return spec
    return dataclasses.replace(spec, float32_grads=True)


def _summed(spec: AttentionSpec, xp, target, x, grad):
    """The gradient of input ``x`` from the back end's full-batch ``target``, summed over the
    axes along which ``x`` is broadcast, in ``spec.grad_dtype``; written into ``grad`` when one
    is given."""
    summed = _checks.reduce_to_shape(target.reshape(spec.shapes.batch + target.shape[1:]), x.shape,
                                     xp).astype(spec.grad_dtype, copy=False)
    if grad is None:
        return summed
    grad[...] = summed
    return grad


def validated_forward(q, k, v, out, options: dict, return_lse, copy_seed=False):
    """Validate and run one forward call: ``(xp, spec, result, lse)``. ``copy_seed``: run with a
    copy of a CuPy seed array, made once the call is validated (``_seed_copied``, a vjp's)."""
    xp, spec = _spec(q, k, v, **options)
    _checks.check_bool(return_lse, "return_lse")
    if out is not None:
        _checks.check_out(out, spec.shapes.out_shape, spec.dtype, xp,
                          _checks.with_seed_array({"q": q, "k": k, "v": v}, spec.dropout_state))
    if copy_seed:
        spec = _seed_copied(spec)
    result, lse = _forward(spec, xp, q, k, v, out)
    return xp, spec, result, lse


def validated_backward(dout, q, k, v, out, lse, options: dict, alibi=None, grads=_NO_GRADS):
    """Validate and run one backward call: ``(xp, spec, (dq, dk, dv))``. ``alibi``: the slopes
    copy of the spec to use instead of a new one (a vjp's forward copy); ``grads``: the arrays
    given for dq, dk, dv (``None`` where not given)."""
    xp, spec = _spec(q, k, v, **options)
    if alibi is not None:
        spec = dataclasses.replace(spec, alibi=alibi)
    return xp, spec, _backward(spec, xp, dout, q, k, v, out, lse, grads)


def validated_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, out, options: dict, return_lse,
                             hosts=(None, None)):
    """Validate and run one ``attention_varlen`` call (``options``: its keywords but ``out`` and
    ``return_lse``; ``hosts``: the offsets read already, as ``_varlen_spec`` takes them):
    ``(xp, spec, result, lse)``."""
    xp, spec = _varlen_spec(q, k, v, cu_q, cu_k, max_q, max_k, hosts=hosts, **options)
    _check_varlen_results(xp, spec, q, k, v, out, return_lse)
    result, lse = _varlen_forward(spec, xp, q, k, v, out)
    return xp, spec, result, lse


# How the refusal of an out= over k or v names them: a paged call's are its caches.
_PACKED_NAMES, _PAGED_NAMES = ("k", "v"), ("the paged cache k", "the paged cache v")


def _check_varlen_results(xp, spec: AttentionSpec, q, k, v, out, return_lse,
                          kv_names=_PACKED_NAMES) -> None:
    """``return_lse`` and ``out`` of a varlen forward: ``out`` ``(total_q, Hq, Dv)`` in the
    inputs' dtype, apart from q, k, v (the pages of a paged call, named by ``kv_names``: out
    over them would change the caller's cache, not the gathered keys the call attends to) and
    the seed array."""
    _checks.check_bool(return_lse, "return_lse")
    if out is not None:
        apart = {"q": q, kv_names[0]: k, kv_names[1]: v}
        _checks.check_out(out, _packed_result_shapes(spec, q)[0], spec.dtype, xp,
                          _checks.with_seed_array(apart, spec.dropout_state))


def _packed_result_shapes(spec: AttentionSpec, q) -> tuple:
    """The shapes of a varlen forward's out and lse: ``(total_q, Hq, Dv)``, ``(Hq, total_q)``."""
    return (q.shape[0], spec.shapes.hq, spec.shapes.dv), (spec.shapes.hq, q.shape[0])


def validated_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, options: dict,
                              grads=_NO_GRADS, alibi=None):
    """Validate and run one ``attention_varlen_backward`` call: ``(xp, spec, (dq, dk, dv))``
    (``grads`` and ``alibi`` as for ``validated_backward``)."""
    xp, spec = _varlen_spec(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    if alibi is not None:
        spec = dataclasses.replace(spec, alibi=alibi)
    return xp, spec, _varlen_backward(spec, xp, dout, q, k, v, out, lse, grads)


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
              alibi_slopes=None, block_mask=None, mask=None, dropout_p=0.0, dropout_seed=None,
              dropout_offset=0, return_lse=False, out=None):
    """Exact softmax attention, ``softmax(scale · q kᵀ) v``, without forming the score matrix.

    Parameters
    ----------
    q : array, shape ``(..., Hq, Nq, D)`` or ``(Nq, D)``
    k : array, shape ``(..., Hkv, Nk, D)`` or ``(Nk, D)``
    v : array, shape ``(..., Hkv, Nk, Dv)`` or ``(Nk, Dv)``
        NumPy arrays run the tiled algorithm of ``cuflash.cpu``; CuPy arrays run the CUDA kernels
        on their device and CuPy's current stream. All three must be of one module (and device),
        with one dtype: float16, bfloat16 (``ml_dtypes.bfloat16``) or float32. As in
        ``numpy.matmul`` the last two axes are the matrix and leading axes broadcast; a 2-D
        input is a single head ``(1, N, D)``, and when q, k and v are all 2-D the outputs are
        too. ``Hq`` must be a multiple of ``Hkv``: query head ``h`` uses key/value head
        ``h // (Hq // Hkv)`` (grouped-query attention; ``Hkv = 1`` is multi-query attention).
        ``Nq`` may differ from ``Nk`` and ``Dv`` from ``D``. Any strides work; arrays whose last
        axis is contiguous are read in place, others are copied first.
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
        Factor applied to ``q kᵀ`` before the softmax; finite and positive (and within float32
        range: ``scale·log2(e)`` is computed in float32). Default ``1 / sqrt(D)``.
    window : (int, int), optional
        Sliding-window (local) attention, flash-attn's ``window_size``: query ``i`` attends to
        keys ``j`` with ``i + Nk - Nq - left <= j <= i + Nk - Nq + right``; ``-1`` leaves that
        side unbounded. The default ``(-1, -1)`` is no window. With ``causal=True`` the right
        side becomes ``min(right, 0)`` (0 if unbounded). For ``Nq = Nk = 6``,
        ``window=(2, 1)`` (left) and ``window=(2, 1), causal=True`` (right)::

            1 1 0 0 0 0        1 0 0 0 0 0
            1 1 1 0 0 0        1 1 0 0 0 0
            1 1 1 1 0 0        1 1 1 0 0 0
            0 1 1 1 1 0        0 1 1 1 0 0
            0 0 1 1 1 1        0 0 1 1 1 0
            0 0 0 1 1 1        0 0 0 1 1 1

        and, aligned to the bottom right like ``causal``, ``Nq = 3``, ``Nk = 6``,
        ``window=(1, 0)``::

            0 0 1 1 0 0
            0 0 0 1 1 0
            0 0 0 0 1 1

    softcap : float, optional
        Soft-capping of the scores (Gemma 2): the scaled score ``x = scale · q·k`` becomes
        ``softcap · tanh(x / softcap)`` before the softmax. ``0.0`` (the default) is off;
        otherwise finite and positive.
    alibi_slopes : float32 array, shape ``(Hq,)`` or ``(..., Hq)``, optional
        ALiBi: adds ``-slope[h] · |i + Nk - Nq - j|`` to the (soft-capped) scaled score of
        query ``i``, key ``j`` in query head ``h``. Leading axes broadcast to the batch axes of
        the inputs, never adding any (``(B, Hq)`` gives each batch element its own slopes). An
        array of the inputs' module and device; finite values.
    block_mask : cuflash.sparse.BlockMask, optional
        Block-sparse pattern (approximate, fastest): only the blocks it keeps are computed, each
        in full (combined with ``causal`` and ``window`` by intersection).
    mask : cuflash.sparse.ExactMask, optional
        Exact element pattern: query ``i`` attends key ``j`` only where the pattern allows it
        (combined with ``causal`` and ``window`` by intersection). Tiles with no allowed pair are
        skipped and fully allowed tiles run unmasked, so sparse patterns cost about what
        block-sparse attention on the same tiles does. Not together with ``block_mask``.
    dropout_p : float, optional
        Attention dropout (flash-attn's ``dropout_p``): each element of the softmax matrix is
        zeroed with probability ``dropout_p`` rounded to a multiple of 1/256 (8 random bits per
        element keep the mask cheap to draw), and the kept ones are scaled by
        ``1 / (1 - rounded rate)``, so the output is unbiased. A real number in ``[0, 1)``;
        rates ``0 < p < 1/512``, which would round to no dropout, raise ``ValueError``
        (docs/api.md, "Dropout"). 0.0 (the default) is off and runs exactly the computation
        without dropout. On the GPU the sm80 kernels and the Hopper TMA forward and wgmma
        backward implement it, for float16/bfloat16; float32 CuPy arrays take no dropout.
    dropout_seed : int or array, optional
        The seed of the dropout mask, an int in ``[0, 2**64)``; required when
        ``dropout_p > 0``. Give ``attention_backward`` the same seed and offset: the mask is a
        pure function of ``(seed, offset, batch index, head, row, key)`` (docs/api.md,
        "Dropout"), and ``attention_vjp`` draws and remembers one for you. Or a seed array: a
        uint64 array ``(seed, offset)`` of the inputs' module and device, which the kernels
        read when they run (a captured CUDA graph draws a new mask when its values change).
    dropout_offset : int, optional
        A second input of the mask, an int in ``[0, 2**32)`` (default 0): calls with one seed
        and different offsets (e.g. the layers of a model, or training steps) draw independent
        masks.
    return_lse : bool, optional
        Also return the log-sum-exp of each row's logits (natural log; the logits are the scaled
        scores after ``softcap`` and ALiBi).
    out : array, optional
        Where to write the result: exactly the output's shape, dtype and array module (and
        device), any strides, not overlapping ``q``, ``k``, ``v`` or a seed array.

    Returns
    -------
    out : array, shape ``(..., Hq, Nq, Dv)`` (``(Nq, Dv)`` for 2-D inputs), dtype of q
    lse : array, shape ``(..., Hq, Nq)`` (``(Nq,)`` for 2-D inputs), float32
        Only with ``return_lse=True``.

    A row with nothing to attend to (fully masked by ``causal``, ``window``, ``block_mask`` or
    ``mask``)
    gives output 0 and lse ``-inf``.

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 8, 100, 64), dtype=np.float32)
    >>> cuflash.attention(q, k, v, causal=True).shape
    (2, 8, 100, 64)
    >>> slopes = 2.0 ** -np.arange(1, 9, dtype=np.float32)
    >>> cuflash.attention(q, k, v, window=(32, 0), softcap=30.0, alibi_slopes=slopes).shape
    (2, 8, 100, 64)
    """
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                   alibi_slopes=alibi_slopes, block_mask=block_mask, mask=mask,
                   dropout_p=dropout_p)
    result, lse, _ = _calls.forward(q, k, v, out, options, (dropout_seed, dropout_offset),
                                    return_lse)
    return (result, lse) if return_lse else result  # return_lse: checked to be a bool


def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, window=(-1, -1),
                       softcap=0.0, alibi_slopes=None, block_mask=None, mask=None,
                       dropout_p=0.0, dropout_seed=None, dropout_offset=0, deterministic=False,
                       grad_dtype=None, dq=None, dk=None, dv=None):
    """Gradients of ``attention`` with respect to q, k and v.

    Parameters
    ----------
    dout : array, shape and dtype of ``out``
        Gradient of the loss with respect to the attention output.
    q, k, v, causal, scale, window, softcap, alibi_slopes, block_mask, mask
        As given to ``attention``. The slopes are constants: they get no gradient.
    dropout_p, dropout_seed, dropout_offset
        As given to ``attention``: the same seed and offset regenerate the forward's mask (an
        explicit seed is required when ``dropout_p > 0``).
    out, lse : arrays
        What ``attention(q, k, v, ..., return_lse=True)`` returned: the scores are recomputed
        from q and k, normalised by ``lse``.
    deterministic : bool, optional
        Ask for bit-identical gradients from run to run. The float16/bfloat16 GPU kernels (the
        portable sm_80 ones, and Hopper's with D and Dv up to 128) add each key tile's share of
        ``dq`` into a float32 accumulator by default, in an order that varies. With
        ``deterministic=True`` Hopper's warp-specialised kernel (no block-sparse or exact mask)
        makes those adds in key-tile order; elsewhere a separate kernel computes ``dq`` per
        query tile, recomputing the scores once more (docs/api.md, "The backward's two modes",
        has the cost on an H200: 0.84-1.04x the default's speed). The float32 kernels and the
        NumPy path never accumulate that way and are always deterministic; for them the flag
        changes nothing.
    grad_dtype : None or float32, optional
        ``None`` (or the inputs' dtype) returns the gradients in the inputs' dtype. ``float32``
        returns them unrounded from the kernels' float32 accumulators: for callers that add the
        gradients of several calls (ring attention adds one per ring step), so that the sum is
        rounded once rather than once per call. Every back end accepts it.
    dq, dk, dv : arrays, optional
        Where to write each gradient, as ``out=`` is for ``attention``: exactly the shape of q,
        k or v, the gradients' dtype (the inputs', or float32 with ``grad_dtype=float32``), the
        inputs' array module (and device), any strides, not overlapping dout, q, k, v, out, lse,
        a seed array or one another. Any of them may be given; the others are new arrays. The
        gradient of a broadcast input is written as its sum. Strides the kernels can write
        (last axis contiguous, e.g. ``torch.empty_like`` of a transposed input) are written in
        place, and repeated CuPy calls with them take the cached path; other strides go through
        a temporary copy.

    Returns
    -------
    dq, dk, dv : arrays with the shapes of q, k and v, in their dtype (or ``grad_dtype``)
        The given arrays themselves where given. Gradients of inputs broadcast along leading
        axes are summed over those axes; ``dk`` and ``dv`` are summed over the query heads that
        share a key/value head. Under ``softcap`` the gradient flows through ``tanh`` (a factor
        ``1 - tanh²``).
    """
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                   alibi_slopes=alibi_slopes, block_mask=block_mask, mask=mask,
                   dropout_p=dropout_p, deterministic=deterministic, grad_dtype=grad_dtype)
    return _calls.backward(dout, q, k, v, out, lse, options, (dropout_seed, dropout_offset),
                           grads=(dq, dk, dv))


def _vjp_seed(dropout_p, dropout_seed):
    """The dropout seed a vjp hands its forward: the one given, or with ``dropout_p`` a rate
    above 0 and none given 64 fresh bits of the operating system's entropy (``secrets``: a tenth
    of the cost of a new NumPy generator, per training step), which the backward pass then
    reuses. Nothing is refused here: a ``dropout_p`` the forward refuses draws nothing, and the
    forward's checks name it (and any other argument) in ``attention``'s order, q, k and v
    first."""
    if dropout_seed is not None:
        return dropout_seed
    try:
        p = _checks.check_dropout(dropout_p, None, 0, None, seed_required=False)[0]
    except (TypeError, ValueError):  # refused by the forward, after what comes before it
        return None
    return secrets.randbits(64) if p else None


def _seed_copied(spec: AttentionSpec) -> AttentionSpec:
    """``spec`` with a copy of its CuPy seed array (itself without one: no dropout, or a NumPy
    array, read already), made once every check of the call has passed (a refused call copies
    nothing) and before the forward reads it, on the array's device, so that the backward draws
    the forward's mask whatever the caller's array holds by then; the calls keep the copy alive
    with their results (a captured graph writes it at every replay)."""
    state = spec.dropout_state
    if state is None:
        return spec
    with _checks.device_context(state):
        return dataclasses.replace(spec, dropout_state=state.copy())


def _vjp_seed_of(spec):
    """What ``vjp.dropout_seed`` holds: the seed, or the copy of a CuPy seed array."""
    return spec.dropout_seed if spec.dropout_state is None else spec.dropout_state


def attention_vjp(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                  alibi_slopes=None, block_mask=None, mask=None, dropout_p=0.0,
                  dropout_seed=None, dropout_offset=0, deterministic=False
                  ) -> tuple[Any, Callable]:
    """Run ``attention`` and return ``(out, vjp)``; ``vjp(dout)`` returns ``(dq, dk, dv)``.

    The options are those of ``attention`` (but ``return_lse`` and ``out``) and
    ``attention_backward``'s ``deterministic``, validated here; ``grad_dtype`` and the
    ``dq=``, ``dk=``, ``dv=`` buffers are not taken (call ``attention_backward`` for them).
    ``vjp`` keeps q, k, v, out and lse alive and runs the backward pass with them: references,
    not copies, so they must not change in place before ``vjp`` runs (nothing detects it, as
    torch's autograd would: the gradients would be those of the changed arrays). With
    ``dropout_p > 0`` and no ``dropout_seed``, a seed is drawn from the operating system's
    entropy (``secrets.randbits(64)``); the backward pass always uses the forward's seed and
    offset, and ``vjp.dropout_seed`` holds the seed (0 without dropout). A seed array is copied
    before the forward reads it, and both passes read the copy (``vjp.dropout_seed`` for a CuPy
    one): the caller may write the next step's values into its own at once. ``vjp`` may run on
    another CuPy stream than the forward, once that stream waits for the forward: what the
    forward allocated (out, lse, the copies) is then held until the backward's stream has run
    past it (docs/api.md).
    """
    # deterministic, which only the backward reads, is checked with the forward's arguments,
    # where the backward checks it: before anything runs, and in attention_backward's order.
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                   alibi_slopes=alibi_slopes, block_mask=block_mask, mask=mask,
                   dropout_p=dropout_p, deterministic=deterministic)
    out, lse, spec = _calls.forward(q, k, v, None, options,
                                    (_vjp_seed(dropout_p, dropout_seed), dropout_offset), True,
                                    copy_seed=True)
    dropout = (_vjp_seed_of(spec), spec.dropout_offset)  # as the forward read them
    stream = _calls.current_stream(q)

    def vjp(dout):  # with the forward's copy of the ALiBi slopes, as the docstring promises
        grads = _calls.backward(dout, q, k, v, out, lse, options, dropout, alibi=spec.alibi)
        _calls.hold_after_vjp(stream, q, (out, lse, spec), grads)
        return grads

    vjp.dropout_seed = _vjp_seed_of(spec)
    return out, vjp


# ----------------------------------------------------------------------------- packed sequences

def _varlen_checks(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, shapes_of, *,
                   causal=False, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                   dropout_p=0.0, dropout_seed=None, dropout_offset=0, deterministic=False,
                   check_offsets=True) -> tuple[Any, bool, AttentionSpec]:
    """Every check of one varlen call but those of the offsets' values, in the call's order of
    failure: ``(xp, check_offsets, spec)``, the spec without its ``VarlenLayout``. ``shapes_of``
    checks q, k and v and gives the shapes: ``_checks.varlen_shapes``, or a paged call's
    ``_varlen_pages.page_shapes`` (run before its gather, which a refused call must not
    reach)."""
    xp, dtype = _module_and_dtype(q, k, v)
    check_offsets = _checks.check_bool(check_offsets, "check_offsets")
    _checks.check_offset_arrays(cu_seqlens_q, cu_seqlens_k, xp, device_of=q)
    max_q = _checks.check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    max_k = _checks.check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    shapes = shapes_of(q, k, v, cu_seqlens_q.shape[0] - 1, max_q, max_k)
    causal, scale, window, softcap = _band_and_score_options(shapes, causal, scale, window, softcap)
    deterministic = _checks.check_bool(deterministic, "deterministic")
    dropout = _checks.check_dropout(dropout_p, dropout_seed, dropout_offset, shapes, xp=xp,
                                    device_of=q)
    with _checks.device_context(q):
        alibi = _checks.check_alibi(alibi_slopes, shapes, xp, device_of=q)
    return xp, check_offsets, AttentionSpec(
        shapes=shapes, dtype=dtype, scale=scale, causal=causal, window=window, softcap=softcap,
        alibi=alibi, deterministic=deterministic, dropout_p=dropout[0], dropout_seed=dropout[1],
        dropout_offset=dropout[2], dropout_state=dropout[3])


def _varlen_spec(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                 hosts=(None, None), **options) -> tuple[Any, AttentionSpec]:
    """Validate one varlen call (``options``: ``_varlen_checks``'s keywords): the inputs' array
    module and the spec (with its ``VarlenLayout``). Offsets are read back to the host and
    checked unless ``check_offsets`` is False for CuPy offsets (NumPy offsets are always
    checked: it costs no synchronisation); ``hosts``: host copies already read, checked instead
    (``_checks.checked_offsets``)."""
    xp, check_offsets, spec = _varlen_checks(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, _checks.varlen_shapes, **options)
    total_q, total_k = q.shape[0], k.shape[0]
    max_q, max_k = spec.shapes.nq, spec.shapes.nk
    with _checks.device_context(q):
        hosts = _checks.checked_offsets(cu_seqlens_q, cu_seqlens_k, (total_q, total_k),
                                        (max_q, max_k), check_offsets, hosts)
        # The kernels read B + 1 contiguous int32 offsets on the inputs' device.
        cu_q, cu_k = (_device_offsets(cu, xp) for cu in (cu_seqlens_q, cu_seqlens_k))
    layout = VarlenLayout(cu_q=cu_q, cu_k=cu_k, total_q=total_q, total_k=total_k, max_q=max_q,
                          max_k=max_k, host_q=hosts[0], host_k=hosts[1])
    return xp, dataclasses.replace(spec, varlen=layout)


def _device_offsets(cu, xp):
    """Offsets as the kernels read them (B + 1 contiguous int32 on the inputs' device): ``cu``
    itself, or a copy (of NumPy offsets, or of strided CuPy ones)."""
    if _checks.array_module(cu) is not xp:
        return _calls.device_copy(cu, xp)
    return cu if cu.flags.c_contiguous else xp.ascontiguousarray(cu)


def _kernel_target(result, xp):
    """Where the back ends write ``result`` of a varlen call: itself, or a temporary to copy
    from when its strides are not ones they can write."""
    return result if _checks.kernel_ready(result) else xp.empty(result.shape, result.dtype)


def _varlen_forward(spec: AttentionSpec, xp, q, k, v, out):
    """Run the forward pass of a validated varlen call: ``(out, lse)``, out ``(total_q, Hq, Dv)``
    and lse ``(Hq, total_q)``."""
    s, layout = spec.shapes, spec.varlen
    with _checks.device_context(q), _calls.CapturedAllocations(q) as allocations:
        result = xp.empty((layout.total_q, s.hq, s.dv), spec.dtype) if out is None else out
        target = _kernel_target(result, xp)
        lse = xp.empty((s.hq, layout.total_q), numpy.float32)
        if layout.total_q:  # no rows, nothing to compute (and no kernel launches 0 blocks)
            q, k, v = (_checks.kernel_readable(x) for x in (q, k, v))
            _backend(xp).forward(q, k, v, target, lse, spec)
        if target is not result:
            result[...] = target
    allocations.keep((result,), spec)
    if xp is numpy:
        _warnings.check_forward(result, lse, (q, k, v), "cuflash.attention_varlen",
                                _rows_with_keys(spec))
    return result, lse


def _varlen_backward(spec: AttentionSpec, xp, dout, q, k, v, out, lse, grads=_NO_GRADS):
    """Run the backward pass of a validated varlen call: ``(dq, dk, dv)``, the given arrays of
    ``grads`` (``None`` where not given) written, as for ``_backward``."""
    layout = spec.varlen
    _check_backward_arrays(spec, xp, dout, q, out, lse, _packed_result_shapes(spec, q))
    _check_given_grads(spec, xp, grads, dout, q, k, v, out, lse)
    with _checks.device_context(q), _calls.CapturedAllocations(q) as allocations:
        results = tuple(xp.empty(x.shape, spec.grad_dtype) if grad is None else grad
                        for grad, x in zip(grads, (q, k, v)))
        if layout.total_q == 0:  # no query sees any key: the gradients of k and v are 0
            for grad in results[1:]:
                grad[...] = 0
        else:
            _run_varlen_backward(spec, xp, results, dout, q, k, v, out, lse)
    # Kept with a graph that captured the call, zero queries included: the zero fills write
    # into the results, and the spec holds the offsets' device copy.
    allocations.keep(results, spec)
    if xp is numpy and layout.total_q:
        _warnings.check_backward(results, (dout, q, k, v, out), lse, spec.dtype,
                                 "cuflash.attention_varlen_backward")
    return results


def _run_varlen_backward(spec: AttentionSpec, xp, results, dout, q, k, v, out, lse) -> None:
    """The kernels (or the NumPy path) of a packed backward with query rows, writing ``results``
    (through kernel-ready targets where they are not)."""
    targets = tuple(_kernel_target(grad, xp) for grad in results)
    dq, dk, dv = targets
    q, k, v, dout, out = (_checks.kernel_readable(x) for x in (q, k, v, dout, out))
    lse = xp.ascontiguousarray(lse)
    if xp is numpy:
        _backend(xp).backward(dout, q, k, v, out, lse, dq, dk, dv, spec)
    else:
        from . import kernels

        arrays = (q, k, v, dout, out, dq, dk, dv)
        launch = kernels.prepare("backward", spec, arrays)
        args = (dout, q, k, v, out, lse, dq, dk, dv)
        (launch or kernels.backward)(*args, spec)
    for grad, target in zip(results, targets):
        if target is not grad:
            grad[...] = target


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     causal=False, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                     dropout_p=0.0, dropout_seed=None, dropout_offset=0, return_lse=False,
                     out=None, check_offsets=True, block_table=None):
    """Attention over packed sequences of different lengths (flash-attn's
    ``flash_attn_varlen_func``): each sequence attends to its own keys only.

    Parameters
    ----------
    q : array, shape ``(total_q, Hq, D)``
    k : array, shape ``(total_k, Hkv, D)``
    v : array, shape ``(total_k, Hkv, Dv)``
        B sequences laid one after another along the first axis: sequence ``b`` owns query rows
        ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and key/value rows
        ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``. NumPy or CuPy arrays of one dtype (float16,
        bfloat16, float32), as for ``attention``; grouped heads (``Hq % Hkv == 0``) and
        ``Dv != D`` work the same way. Any strides whose last axis is contiguous are read in
        place; nothing is padded or copied per sequence.
    cu_seqlens_q, cu_seqlens_k : int32 arrays, shape ``(B + 1,)``
        The sequences' row offsets: 0 first, non-decreasing, ``total_q`` (``total_k``) last.
        A sequence may be empty on either side: its queries see no key (output 0, lse
        ``-inf``), its keys get gradient 0. For CuPy inputs: CuPy arrays on their device, or
        NumPy arrays (copied to the device).
    max_seqlen_q, max_seqlen_k : int
        At least the longest query (key) sequence; the GPU grid is sized for them.
    causal, scale, window, softcap, alibi_slopes
        As for ``attention``, applied to each sequence with its own lengths ``(nq, nk)``:
        causal and windows are aligned to the bottom right of each sequence (query ``i`` of a
        sequence sees keys ``j <= i + nk - nq``), ALiBi distances are ``|i + nk - nq - j|``
        within the sequence. Slopes: ``(Hq,)`` or ``(B, Hq)``, one row per sequence.
    dropout_p, dropout_seed, dropout_offset
        As for ``attention``: element ``(b, h, i, j)`` of the mask is that of sequence ``b``,
        query row ``i`` and key ``j`` counted within the sequence, so a sequence keeps the
        elements a dense call's batch element ``b`` of its lengths would, on the NumPy path and
        the GPU alike.
    return_lse : bool, optional
        Also return the log-sum-exp of each row's logits, shape ``(Hq, total_q)`` float32
        (flash-attn's varlen layout).
    out : array, optional
        Where to write the result, shape ``(total_q, Hq, Dv)``, as for ``attention``.
    check_offsets : bool, optional
        Check the offsets' values (the default): for CuPy offsets this reads them back to the
        host, a synchronisation with the device. ``False`` skips it (no synchronisation, so the
        call can be captured in a CUDA graph); the offsets and ``max_seqlen_*`` must then be
        right: wrong ones give undefined results (wrong values or out-of-bounds memory access).
        NumPy offsets are always checked (it costs nothing).
    block_table : int32 array, shape ``(B, max_pages)``, optional
        Keys and values in a paged cache, as flash-attn takes them: k ``(num_pages, page_size,
        Hkv, D)``, v ``(num_pages, page_size, Hkv, Dv)``, and sequence ``b``'s key ``j`` (of
        ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]``) in page ``block_table[b, j // page_size]`` at
        offset ``j % page_size``. Any page size; pages may be shared between sequences. The keys
        and values the sequences use are gathered into packed rows first (one copy of
        ``total_k`` rows), sized by ``cu_seqlens_k`` and ``block_table`` read on the host (for
        CuPy inputs a synchronisation), so ``check_offsets=False`` with CuPy inputs is refused;
        the table's entries in use are checked to be pages of k.
        Forward only: ``attention_varlen_backward`` and ``attention_varlen_vjp`` take packed
        keys (``cuflash.torch.flash_attn_varlen_func`` differentiates through the gather).

    Returns
    -------
    out : array, shape ``(total_q, Hq, Dv)``, dtype of q
    lse : array, shape ``(Hq, total_q)``, float32; only with ``return_lse=True``

    Raises ``ValueError`` for offsets that do not start at 0, decrease, end elsewhere than at
    the rows of q (k), sequences longer than ``max_seqlen_*``, or offset arrays of different
    lengths; ``TypeError`` for offsets that are not int32 arrays.

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> rng = np.random.default_rng(0)
    >>> cu = np.array([0, 5, 12, 30], np.int32)          # three sequences: 5, 7 and 18 tokens
    >>> q, k, v = rng.standard_normal((3, 30, 4, 64), dtype=np.float32)
    >>> cuflash.attention_varlen(q, k, v, cu, cu, 18, 18, causal=True).shape
    (30, 4, 64)
    """
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                   alibi_slopes=alibi_slopes, dropout_p=dropout_p, check_offsets=check_offsets)
    hosts = (None, None)  # the offsets on the host, where a paged call read them to gather
    if block_table is not None:
        # Checked as the packed call checks them before the table and offsets are read and the
        # keys gathered: a refused call reads and copies nothing, and one refused for an option
        # (return_lse and out among them) or for its query offsets names it, as the call
        # without pages does, whatever its table holds.
        xp, _, spec = _varlen_checks(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, _varlen_pages.page_shapes,
                                     dropout_seed=dropout_seed, dropout_offset=dropout_offset,
                                     **options)
        _check_varlen_results(xp, spec, q, k, v, out, return_lse, _PAGED_NAMES)
        if xp is not numpy:
            refuse_packed_on_gpu(spec.dtype)
        k, v, hosts = _varlen_pages.gather_pages(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                 (spec.shapes.nq, spec.shapes.nk), block_table,
                                                 check_offsets)
    result, lse, _ = _calls.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, out, options,
                                           (dropout_seed, dropout_offset), return_lse, hosts)
    return (result, lse) if return_lse else result  # return_lse: checked to be a bool


def refuse_packed_on_gpu(dtype) -> None:
    """ValueError for packed sequences in a dtype no GPU kernel runs them in
    (``kernels.why_not_packed``): a paged call asks before it gathers its keys, which the
    kernel choice would otherwise refuse after that copy."""
    from . import kernels

    reason = kernels.why_not_packed(dtype)
    if reason:
        raise ValueError(f"no GPU kernel runs packed sequences in {numpy.dtype(dtype).name}: "
                         f"{reason}")


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, *, causal=False, scale=None, window=(-1, -1),
                              softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None,
                              dropout_offset=0, deterministic=False, check_offsets=True, dq=None,
                              dk=None, dv=None):
    """Gradients of ``attention_varlen`` with respect to q, k and v.

    ``dout`` and ``out`` are ``(total_q, Hq, Dv)``, ``lse`` ``(Hq, total_q)`` float32 (what
    ``attention_varlen(..., return_lse=True)`` returned); every other argument is as given to
    ``attention_varlen`` (the forward's dropout seed and offset; k and v packed, as a paged
    forward gathered them: ``block_table`` is the forward's only), and ``deterministic`` as for
    ``attention_backward``. Returns ``(dq, dk, dv)`` with the shapes and dtype of q, k and v
    (``dk``, ``dv`` summed over the query heads of a group; keys of a sequence without queries
    get 0). ``dq``, ``dk``, ``dv``: arrays to write the gradients into, as for
    ``attention_backward`` (then returned themselves).
    """
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                   alibi_slopes=alibi_slopes, dropout_p=dropout_p, deterministic=deterministic,
                   check_offsets=check_offsets)
    return _calls.varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, options, (dropout_seed, dropout_offset),
                                  (dq, dk, dv))


def attention_varlen_vjp(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                         causal=False, scale=None, window=(-1, -1), softcap=0.0,
                         alibi_slopes=None, dropout_p=0.0, dropout_seed=None, dropout_offset=0,
                         deterministic=False, check_offsets=True) -> tuple[Any, Callable]:
    """Run ``attention_varlen`` and return ``(out, vjp)``; ``vjp(dout)`` returns
    ``(dq, dk, dv)``. The options are ``attention_varlen``'s but ``return_lse``, ``out`` and
    ``block_table`` (paged keys are the forward's only), and ``deterministic``. Validated once
    (the offsets are checked, and read back, once: ``vjp`` does not read them again); ``vjp``
    keeps the inputs, out, lse and the validated call alive (references, not copies: as for
    ``attention_vjp``, they must not change in place before ``vjp`` runs), and runs the
    backward with the forward's copy of the ALiBi slopes (a cached call, as
    ``attention_varlen_backward`` is). Dropout as for ``attention_vjp``: a seed is drawn when
    none is given, and ``vjp.dropout_seed`` holds it."""
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                   alibi_slopes=alibi_slopes, dropout_p=dropout_p, deterministic=deterministic,
                   check_offsets=check_offsets)
    xp, spec = _varlen_spec(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            **options, dropout_seed=_vjp_seed(dropout_p, dropout_seed),
                            dropout_offset=dropout_offset)
    spec = _seed_copied(spec)
    dropout = (_vjp_seed_of(spec), spec.dropout_offset)  # as the forward reads them
    out, lse = _varlen_forward(spec, xp, q, k, v, None)
    backward_options = dict(options, check_offsets=False)  # checked above
    # The offsets as the forward read them: the backward reads NumPy offsets again on the host,
    # where a change to the caller's arrays in place between the two passes must not reach it.
    # (The kernels read the device offsets the forward read: the caller's CuPy arrays, or a copy
    # of NumPy ones.)
    cu_q, cu_k = spec.varlen.cu_q, spec.varlen.cu_k
    if xp is numpy:
        cu_q, cu_k = cu_q.copy(), cu_k.copy()
    stream = _calls.current_stream(q)

    def vjp(dout):
        grads = _calls.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_seqlen_q,
                                       max_seqlen_k, backward_options, dropout, alibi=spec.alibi)
        _calls.hold_after_vjp(stream, q, (out, lse, spec), grads)
        return grads

    vjp.dropout_seed = _vjp_seed_of(spec)
    return out, vjp
