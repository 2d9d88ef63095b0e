"""Ring attention: exact attention over a sequence sharded across ranks (context parallelism).

Every rank holds the query, key and value rows of its part of the sequence (see
:mod:`cuflash.parallel.layout`). Key/value chunks travel around the ring, one hop per step, while
each rank attends its queries to the chunk it holds; after ``P`` steps every query has seen every
key. Each step's partial result is merged into a float32 accumulator by log-sum-exp::

    lse = logaddexp(lse_acc, lse_step)
    out = exp(lse_acc − lse)·out_acc + exp(lse_step − lse)·out_step

(a row that has seen nothing keeps out 0 and lse −inf, never NaN). Causal and sliding-window
masks refer to GLOBAL positions: each (query chunk, key chunk) pair becomes a cuflash call with
the options that express the global mask on it (:mod:`cuflash.parallel._plan`), or no call.

The backward pass sends the key/value chunks around again. FlashAttention's backward of one pair,
given the *final* output and log-sum-exp of the rows, yields exactly that pair's share of the
gradients (``P_pair = exp(scale·S − lse)``, ``Δ = rowsum(dO ∘ O)``), so ``dq`` is summed
locally over the steps and the float32 ``dk``/``dv`` of each chunk ride around the ring behind
it, collecting every rank's share, and arrive at their owner after the last step. Each pair's
gradients come from the kernels in float32 (``grad_dtype``), so every gradient is rounded to the
input dtype once, at the end, as a single call's is.

With a communicator on a GPU, the transfer of the next chunk runs on a side stream while the
current one is computed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy

import cuflash
from cuflash import _checks, _mask

from . import _plan
from . import layout as _layout
from ._signature import (ArrayField, ChoiceField, Field, FlagField, FloatField, agree, compares,
                         share_refusal)
from .comm import array_module, check_comm

__all__ = ["merge", "ring_attention", "ring_attention_backward", "ring_attention_vjp"]

_F32 = numpy.float32


# ----------------------------------------------------------------------------- the merge

def merge(out_a, lse_a, out_b, lse_b):
    """Combine two partial attention results over disjoint key sets into one, in float32.

    ``out_*`` ``(..., N, Dv)`` (any float dtype), ``lse_*`` ``(..., N)``, of one shape on both
    sides (``ValueError`` otherwise), all NumPy or all CuPy arrays (``TypeError`` otherwise).
    Returns float32 ``(out, lse)``. A side whose ``lse`` is −inf in a row saw no key there and
    has no weight, whatever its out holds (NaN, from other implementations); rows whose ``lse``
    is −inf in both give out 0 and lse −inf.
    """
    xp = _checks.common_module({"out_a": out_a, "lse_a": lse_a, "out_b": out_b, "lse_b": lse_b})
    shapes = [tuple(x.shape) for x in (out_a, lse_a, out_b, lse_b)]
    # out needs its Dv axis: each row's weight is broadcast along it.
    if not (shapes[0] and shapes[0] == shapes[2] and shapes[1] == shapes[3] == shapes[0][:-1]):
        raise ValueError(
            "merge needs two results of the same rows: out_a and out_b of one shape (..., N, "
            "Dv), lse_a and lse_b of that shape without its last axis; got "
            + ", ".join(f"{name} {shape}" for name, shape in
                        zip(("out_a", "lse_a", "out_b", "lse_b"), shapes)))
    out = _seen_rows(xp, out_a, lse_a)
    lse = xp.array(lse_a, dtype=_F32, copy=True)
    _merge_into(xp, out, lse, _seen_rows(xp, out_b, lse_b), lse_b)
    return out, lse


def _seen_rows(xp, out, lse):
    """A float32 copy of ``out`` with 0 in the rows whose ``lse`` is −inf: their weight in a
    merge is 0, which would make NaN of a NaN or an infinity there. (The ring's own partial
    results hold 0 in those rows already.)"""
    out = xp.array(out, dtype=_F32, copy=True)
    out[xp.asarray(lse) == -numpy.inf] = 0
    return out


def _merge_into(xp, out, lse, out_b, lse_b):
    """``(out, lse) ← merge(out, lse, out_b, lse_b)`` in place (``out``, ``lse`` float32 views)."""
    lse_b = lse_b.astype(_F32, copy=False)
    new = xp.logaddexp(lse, lse_b)
    safe = xp.where(new == -numpy.inf, _F32(0), new)  # both sides saw nothing
    if xp is numpy:
        out *= numpy.exp(lse - safe)[..., None]
        term = out_b.astype(_F32)  # a new array: scaled in place, then added
        term *= numpy.exp(lse_b - safe)[..., None]
        out += term
    else:  # one pass over the rows, where the steps above take five
        _merge_kernel()(out_b, lse[..., None], lse_b[..., None], safe[..., None], out)
    lse[...] = new


@functools.lru_cache(maxsize=None)
def _merge_kernel():
    import cupy

    return cupy.ElementwiseKernel(
        "T out_b, float32 lse_a, float32 lse_b, float32 lse", "float32 out_a",
        "out_a = out_a * expf(lse_a - lse) + (float)out_b * expf(lse_b - lse)",
        "cuflash_ring_merge")


# ----------------------------------------------------------------------------- options

def checked_scale(scale, q) -> float:
    """``scale`` checked (``None``: q's default). It is compared between the ranks before
    ``check_inputs`` runs: a q without axes or with an empty head dim takes the default of a
    head dim of 1 here (not an IndexError or a division by zero), and is refused by name, with
    its shape, after the comparison, on every rank alike."""
    return _checks.check_scale(scale, (q.shape[-1] if q.ndim else 0) or 1)


def agree_on_options(comm, arrays: dict, what: str, *, layout, causal, window, softcap, scale,
                     validate, flags: dict, alibi_slopes=None, block_mask=None,
                     unsupported: dict | None = None) -> dict:
    """This rank's checks of its call of ``what`` (ring or Ulysses attention), then
    (``validate``) the comparison of every rank's call, where every rank learns of one rank's
    refusal (:func:`~cuflash.parallel._signature.agree`): the one rule of both, so that every
    argument is refused in one order whichever of them is called.

    The order is ``cuflash.attention``'s where it has the argument: the arrays' modules and
    devices (``arrays``: name → array, q first) and whether the communicator moves them,
    ``layout`` (how the arrays are cut), then ``causal``, ``scale``, ``window``, ``softcap``,
    ``block_mask``, ``deterministic``, ``alibi_slopes``, ``return_lse``, and ``validate``
    last. ``flags``: the call's bool options, by name (``deterministic``, or ``return_lse``
    and any other after ``alibi_slopes``); ``unsupported``: the options the call does not take
    (name → why), of ``block_mask`` (which no call takes) and ``alibi_slopes``, refused with
    ``NotImplementedError`` in their place when given (not ``None``).

    Every rank must pass arrays of one shape and dtype and the same options, in that order
    (the first that differs is named): ``layout``, ``causal``, ``scale``, ``window``,
    ``softcap``, ``deterministic`` where the call takes it (ranks whose sums differ in
    determinism would make the result's bits vary without an error), and ``alibi_slopes`` (by
    values and dtype) where the call takes them. Returns the options checked, by name: ``layout``,
    ``causal``, ``scale``, ``window``, ``softcap`` and the flags."""
    check_comm(comm)  # no rank can be told of a refusal without one
    unsupported = unsupported or {}
    takes_alibi = "alibi_slopes" not in unsupported
    flags_compared, rule = _compared(tuple(flags), takes_alibi)

    def checks():
        xp = _checks.common_module(arrays)  # modules and devices: this rank's alone
        check_movable(comm, arrays)
        q = arrays["q"]
        checked = {"layout": _layout.check_layout(layout),
                   "causal": _checks.check_bool(causal, "causal"),
                   "scale": checked_scale(scale, q)}
        checked["window"] = _checks.check_window(window)
        checked["softcap"] = _checks.check_softcap(softcap, checked["scale"])
        if block_mask is not None:
            _refuse_unsupported("block_mask", unsupported)
        # The flags around alibi_slopes as cuflash.attention_backward and cuflash.attention
        # check them: deterministic before it, return_lse after it.
        if "deterministic" in flags:
            checked["deterministic"] = _checks.check_bool(flags["deterministic"], "deterministic")
        if alibi_slopes is not None:
            _refuse_unsupported("alibi_slopes", unsupported)
            _checks._check_beside_inputs(
                alibi_slopes, "alibi_slopes",
                f"a float32 {xp.__name__}.ndarray of shape (Hq,) or (..., Hq)", xp, q)
        for name, value in flags.items():
            if name != "deterministic":
                checked[name] = _checks.check_bool(value, name)
        _checks.check_bool(validate, "validate")
        fields: list[Field] = [ArrayField(name, x) for name, x in arrays.items()]
        fields += [ChoiceField("layout", checked["layout"], _layout.LAYOUTS),
                   FlagField("causal", checked["causal"]), FloatField("scale", checked["scale"]),
                   Field("window", list(checked["window"])),
                   FloatField("softcap", checked["softcap"])]
        fields += [FlagField(name, checked[name]) for name in flags_compared]
        if takes_alibi:
            slopes = (None if alibi_slopes is None
                      else numpy.ascontiguousarray(_host(alibi_slopes)))
            fields.append(ArrayField("alibi_slopes", slopes, by_values=True))
        return fields, checked

    return agree(comm, checks, what, rule, compare=compares(validate))


@functools.lru_cache(maxsize=None)
def _compared(flags: tuple, takes_alibi: bool) -> tuple[tuple, str]:
    """The flags of a call (``flags``: their names) that every rank must pass alike
    (``deterministic``), and the rule that says what every rank must pass alike, in words: the
    same on every rank, whatever its flags (a rank in the backward pass, beside one in the
    forward, is told so in the same words); once per kind of call, not per call."""
    *options, last = ("layout", "causal", "scale", "window", "softcap",
                      *(("alibi_slopes",) if takes_alibi else ()))
    return (("deterministic",) if "deterministic" in flags else (),
            f"every rank must pass chunks of one shape and the same {', '.join(options)} and "
            f"{last}")


def _refuse_unsupported(name: str, unsupported: dict) -> None:
    """``NotImplementedError`` for the option ``name``, given, where the call does not take
    it (``unsupported``: name → why)."""
    if name in unsupported:
        raise NotImplementedError(unsupported[name])


# What ring attention does not take, and why (``agree_on_options``' ``unsupported``).
_UNSUPPORTED = {
    "block_mask": "block_mask is not supported by ring attention",
    "alibi_slopes": "alibi_slopes is not supported by ring attention: the ALiBi bias depends on "
                    "|i − j| over global positions, which a per-chunk call cannot express; use "
                    "ulysses_attention, which sees whole sequences"}


class _Options:
    """The validated options of one ring call, shared by the forward and backward passes.

    Every argument that can be refused by reading this rank's call alone (the options, the
    arrays' types, modules and devices, ``flags``: other bool options of the call, by name) is
    checked by :func:`agree_on_options`, so that with ``validate`` every rank learns of one
    rank's refusal; what is refused after it (dimensions, shapes, dtypes) follows from what the
    ranks compared, and is refused by every rank alike.
    ``backward``: the backward pass's ``(dout, out, lse)``."""

    def __init__(self, q, k, v, *, comm, causal, layout, window, softcap, scale, alibi_slopes,
                 block_mask, validate, backward=None, flags=None):
        arrays = dict(zip(("q", "k", "v", "dout", "out", "lse"), (q, k, v, *(backward or ()))))
        checked = agree_on_options(
            comm, arrays, "ring attention", layout=layout, causal=causal, window=window,
            softcap=softcap, scale=scale, validate=validate, flags=flags or {},
            alibi_slopes=alibi_slopes, block_mask=block_mask, unsupported=_UNSUPPORTED)
        self.comm = comm
        self.layout, self.causal, self.window = (checked["layout"], checked["causal"],
                                                 checked["window"])
        self.scale, self.softcap = checked["scale"], checked["softcap"]
        self.flags = checked  # the flags checked, read by name, beside the options above
        _check_dimensions(q, k, v)
        check_inputs(q, k, v)
        self.nq_local, self.nk_local = q.shape[-2], k.shape[-2]
        size = comm.size
        for what, n_local in (("query", self.nq_local), ("key", self.nk_local)):
            if self.layout == "zigzag" and n_local % 2:
                raise ValueError(
                    f"{what} chunk of {n_local} rows on rank {comm.rank}: layout 'zigzag' "
                    f"needs an even local length (two equal chunks), i.e. a sequence length "
                    f"that is a multiple of 2·P = {2 * size}; {n_local} rows on each of "
                    f"P = {size} ranks make N = {n_local * size}, which is not")
        if backward is not None:
            dout, out, lse = backward
            check_backward_arrays(dout, q, k, v, out, lse)
        self.band = _mask.band(self.window, self.causal)  # over the whole problem

    def calls(self, source: int):
        left, right = self.band
        return _plan.plan_step(self.layout, self.comm.size, self.comm.rank, source,
                               self.nq_local, self.nk_local, left, right)

    def attention_options(self, call) -> dict:
        return dict(causal=call.causal, window=call.window, softcap=self.softcap,
                    scale=self.scale)


def check_movable(comm, arrays: dict) -> None:
    """``arrays`` (name → array) are arrays ``comm`` can move (an ``NcclComm``: CuPy arrays of
    its GPU), where it says (``check_movable``; a communicator of one's own need not)."""
    check = getattr(comm, "check_movable", None)
    if check is not None:
        for name, x in arrays.items():
            check(x, name)


def _host(x):
    return x.get() if type(x).__module__.partition(".")[0] == "cupy" else numpy.asarray(x)


def _rows(x, call_slice, axis=-2):
    index = [slice(None)] * x.ndim
    index[axis % x.ndim] = call_slice
    return x[tuple(index)]


# ----------------------------------------------------------------------------- forward

def _out_shape(q, k, v) -> tuple:
    """The shape of ``cuflash.attention(q, k, v)`` (2-D inputs are one head)."""
    if q.ndim == k.ndim == v.ndim == 2:
        return (q.shape[0], v.shape[1])
    lead = [x.shape[:-3] if x.ndim >= 3 else () for x in (q, k, v)]
    hq = q.shape[-3] if q.ndim >= 3 else 1
    return tuple(numpy.broadcast_shapes(*lead)) + (hq, q.shape[-2], v.shape[-1])


def _check_dimensions(q, k, v) -> None:
    """q, k, v have a sequence axis: refused after the comparison of the ranks' calls, so that
    a rank without one, beside ranks with one, does not fail alone while the others wait for it
    there."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., N, D), got "
                             f"shape {tuple(x.shape)}")


def check_inputs(q, k, v) -> None:
    """What ``cuflash.attention`` refuses in q, k, v (empty axes, heads, dtypes), refused with
    the shapes this rank passed: called after the comparison of the ranks' calls, so that every
    rank fails alike, and before any step or all-to-all, past which the errors would name arrays
    the caller never saw."""
    _checks.attention_shapes(q, k, v)
    _checks.check_dtypes({"q": q, "k": k, "v": v})


def check_backward_arrays(dout, q, k, v, out, lse) -> None:
    """``dout`` and ``out`` must be this rank's rows of the output of ``q``, ``k``, ``v``, and
    ``lse`` its rows of the log-sum-exp (float32): checked whole, before any step (a step's
    calls read sub-blocks of them, which would ignore extra rows and name a sub-block's shape
    in their errors)."""
    xp = array_module(q)
    shape = _out_shape(q, k, v)
    for name, x in (("dout", dout), ("out", out)):
        _checks.check_like(x, name, shape, q.dtype, xp, device_of=q)
    _checks.check_like(lse, "lse", shape[:-1], numpy.dtype(_F32), xp, device_of=q)


def _forward(q, k, v, opts: _Options):
    # On the arrays' device, whichever is current: the accumulators are made here.
    with _checks.device_context(q):
        return _forward_here(q, k, v, opts)


def _forward_here(q, k, v, opts: _Options):
    xp = array_module(q)
    comm = opts.comm
    size, rank = comm.size, comm.rank
    shape = _out_shape(q, k, v)
    acc = xp.zeros(shape, _F32)
    lse = xp.full(shape[:-1], -numpy.inf, _F32)
    k_cur, v_cur = k, v
    fresh = True  # nothing merged yet
    for step in range(size):
        source = (rank - step) % size
        pending = comm.shift([k_cur, v_cur]) if step + 1 < size else None
        for call in opts.calls(source):
            o, l = cuflash.attention(_rows(q, call.row_slice), _rows(k_cur, call.col_slice),
                                     _rows(v_cur, call.col_slice), return_lse=True,
                                     **opts.attention_options(call))
            if fresh and call.rows == (0, opts.nq_local):  # every row: a copy, not a merge
                acc[...] = o
                lse[...] = l
            else:
                _merge_into(xp, _rows(acc, call.row_slice), _rows(lse, call.row_slice, -1),
                            o, l)
            fresh = False
        if pending is not None:
            k_cur, v_cur = pending.wait()
    return acc.astype(q.dtype), lse


# ----------------------------------------------------------------------------- backward

def _backward(dout, q, k, v, out, lse, opts: _Options, deterministic: bool):
    with _checks.device_context(q):  # as _forward
        return _backward_here(dout, q, k, v, out, lse, opts, deterministic)


def _backward_here(dout, q, k, v, out, lse, opts: _Options, deterministic: bool):
    xp = array_module(q)
    comm = opts.comm
    size, rank = comm.size, comm.rank
    dq = xp.zeros(q.shape, _F32)
    k_cur, v_cur = k, v
    d_pending = None
    for step in range(size):
        source = (rank - step) % size
        kv_pending = comm.shift([k_cur, v_cur]) if step + 1 < size else None
        calls = opts.calls(source)
        dk = dv = None
        if calls:
            dk = xp.zeros(k.shape, _F32)
            dv = xp.zeros(v.shape, _F32)
        for call in calls:
            rows, cols = call.row_slice, call.col_slice
            gq, gk, gv = cuflash.attention_backward(
                _rows(dout, rows), _rows(q, rows), _rows(k_cur, cols), _rows(v_cur, cols),
                _rows(out, rows), _rows(lse, rows, -1), deterministic=deterministic,
                grad_dtype=_F32, **opts.attention_options(call))
            _rows(dq, rows)[...] += gq
            _rows(dk, cols)[...] += gk
            _rows(dv, cols)[...] += gv
        if d_pending is not None:  # the shares of the ranks before this one
            dk_in, dv_in = d_pending.wait()
            if dk is None:
                dk, dv = dk_in, dv_in
            else:
                dk += dk_in
                dv += dv_in
        elif dk is None:
            dk = xp.zeros(k.shape, _F32)
            dv = xp.zeros(v.shape, _F32)
        # The gradients of the chunk of `source` follow it to the next rank; after the last
        # step they reach their owner.
        d_pending = comm.shift([dk, dv])
        if kv_pending is not None:
            k_cur, v_cur = kv_pending.wait()
    dk, dv = d_pending.wait()
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ----------------------------------------------------------------------------- public API

def ring_attention(q, k, v, *, comm, causal: bool = False, layout: str = "zigzag",
                   window=(-1, -1), softcap: float = 0.0, scale: float | None = None,
                   alibi_slopes=None, block_mask=None, return_lse: bool = False,
                   validate: bool = True):
    """Exact attention over a sequence sharded across the ranks of ``comm``.

    Parameters
    ----------
    q : array ``(..., Hq, Nq/P, D)``
    k, v : arrays ``(..., Hkv, Nk/P, D)`` and ``(..., Hkv, Nk/P, Dv)``
        This rank's rows of the whole ``q``, ``k``, ``v``, cut by ``layout`` (use
        ``cuflash.parallel.shard``). NumPy or CuPy arrays (or torch tensors, see below);
        everything ``cuflash.attention`` accepts (dtypes, GQA with ``Hq % Hkv == 0``, ``Dv != D``,
        ``Nq != Nk``, broadcasting leading axes). Every rank passes arrays of one shape.
    comm : communicator
        ``LocalRing(P).comms[r]``, ``NcclComm`` or ``TorchComm`` (see
        :mod:`cuflash.parallel.comm`).
    causal, window, softcap, scale
        As for ``cuflash.attention``, over the WHOLE sequence: positions are global, causal and
        the window aligned to the bottom right of the whole ``Nq × Nk`` problem.
    layout : ``"zigzag"`` (default) or ``"contiguous"``
        How the sequence was sharded; it must match ``shard``.
    return_lse : bool
        Also return this rank's rows of the log-sum-exp (float32), as ``cuflash.attention``.
    validate : bool
        Check with one small all-gather that every rank calls with the same shapes and options
        (a mismatch raises ``ValueError`` on every rank instead of hanging); an argument one
        rank refuses travels in it too, so that every rank raises. ``False`` skips it: the
        ranks' agreement is then the caller's duty, and a rank whose call differs, or that
        refuses its arguments, leaves the others waiting in their first exchange (under NCCL
        until the communicator's timeout, ``CommTimeout``). Every rank passes the same
        ``validate``.

    Returns
    -------
    out : this rank's rows of the output, ``(..., Hq, Nq/P, Dv)``, dtype of q
    lse : ``(..., Hq, Nq/P)`` float32, with ``return_lse=True``

    ``alibi_slopes`` and ``block_mask`` are not supported (``NotImplementedError``). With torch
    tensors, the arrays are taken without copies (CUDA: on torch's current stream) and the
    results are tensors without autograd history: gradients flow through
    :func:`cuflash.parallel.torch_ring_attention`, and a tensor that requires grad is refused
    (``ValueError``) unless autograd is off (``torch.no_grad()``).
    """
    tensors = _torch_call(lambda *a: ring_attention(
        *a, comm=comm, causal=causal, layout=layout, window=window, softcap=softcap,
        scale=scale, alibi_slopes=alibi_slopes, block_mask=block_mask, return_lse=return_lse,
        validate=validate), "ring_attention", ("q", "k", "v"), q, k, v, comm=comm,
        validate=validate)
    if tensors is not None:
        return tensors
    opts = _Options(q, k, v, comm=comm, causal=causal, layout=layout, window=window,
                    softcap=softcap, scale=scale, alibi_slopes=alibi_slopes,
                    block_mask=block_mask, validate=validate, flags={"return_lse": return_lse})
    out, lse = _forward(q, k, v, opts)
    return (out, lse) if opts.flags["return_lse"] else out


def ring_attention_backward(dout, q, k, v, out, lse, *, comm, causal: bool = False,
                            layout: str = "zigzag", window=(-1, -1), softcap: float = 0.0,
                            scale: float | None = None, alibi_slopes=None, block_mask=None,
                            deterministic: bool = False, validate: bool = True):
    """Gradients ``(dq, dk, dv)`` of :func:`ring_attention`, each this rank's rows.

    ``out`` and ``lse`` are what ``ring_attention(..., return_lse=True)`` returned on this rank;
    ``dout`` is this rank's rows of the output gradient. The options must be those of the
    forward call. ``deterministic`` is passed to every ``cuflash.attention_backward`` call (the
    ring's own sums are always in one order).
    """
    tensors = _torch_call(lambda *a: ring_attention_backward(
        *a, comm=comm, causal=causal, layout=layout, window=window, softcap=softcap,
        scale=scale, alibi_slopes=alibi_slopes, block_mask=block_mask,
        deterministic=deterministic, validate=validate), "ring_attention_backward",
        ("dout", "q", "k", "v", "out", "lse"), dout, q, k, v, out, lse, comm=comm,
        validate=validate)
    if tensors is not None:
        return tensors
    opts = _Options(q, k, v, comm=comm, causal=causal, layout=layout, window=window,
                    softcap=softcap, scale=scale, alibi_slopes=alibi_slopes,
                    block_mask=block_mask, validate=validate, backward=(dout, out, lse),
                    flags={"deterministic": deterministic})
    return _backward(dout, q, k, v, out, lse, opts, opts.flags["deterministic"])


def ring_attention_vjp(q, k, v, *, comm, causal: bool = False, layout: str = "zigzag",
                       window=(-1, -1), softcap: float = 0.0, scale: float | None = None,
                       deterministic: bool = False, validate: bool = True
                       ) -> tuple[Any, Callable]:
    """``(out, vjp)``: :func:`ring_attention` now, ``vjp(dout) -> (dq, dk, dv)`` later.

    The options are checked here; ``vjp`` is :func:`ring_attention_backward` with them (so
    ``dout`` is checked, and compared between ranks, as there) and keeps q, k, v, out and lse
    alive.
    """
    opts = _Options(q, k, v, comm=comm, causal=causal, layout=layout, window=window,
                    softcap=softcap, scale=scale, alibi_slopes=None, block_mask=None,
                    validate=validate, flags={"deterministic": deterministic})
    deterministic = opts.flags["deterministic"]
    out, lse = _forward(q, k, v, opts)

    def vjp(dout):
        return ring_attention_backward(dout, q, k, v, out, lse, comm=comm, causal=causal,
                                       layout=layout, window=window, softcap=softcap,
                                       scale=scale, deterministic=deterministic,
                                       validate=validate)

    return out, vjp


def _torch_call(fn, function: str, names, *args, comm, validate):
    """``fn`` on the arrays of torch tensors (``names``: the arguments' names), results back
    as tensors; ``None`` when the first argument is not a tensor. The results carry no
    gradient: a tensor that requires one, while autograd records, is refused (``function``: the
    public name), rather than silently cut from the graph. A refusal before ``fn`` runs (of
    that, or of the tensors' types and devices) is shared with the ranks that compare their
    calls (``validate``), as ``fn``'s own refusals are."""
    if type(args[0]).__module__.partition(".")[0] != "torch":
        return None
    import torch
    check_comm(comm)
    entered = []

    def on_arrays(*arrays):
        entered.append(True)
        return fn(*arrays)

    try:
        if torch.is_grad_enabled():
            for name, x in zip(names, args):
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    raise ValueError(
                        f"{name} requires grad, but {function} returns tensors without "
                        f"autograd history (its gradient would be silently lost): use "
                        f"cuflash.parallel.torch_ring_attention, which is differentiable, or "
                        f"call it under torch.no_grad()")
        from ._torch import call_on_arrays
        return call_on_arrays(on_arrays, *args, names=names)
    except Exception as error:
        if not entered and compares(validate):
            share_refusal(comm, error)
        raise
