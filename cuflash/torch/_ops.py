"""The custom operators ``cuflash::attention_forward`` / ``cuflash::attention_backward``, and
``cuflash::attention_varlen_forward`` / ``cuflash::attention_varlen_backward`` for packed
sequences.

All are ``torch.library.custom_op``s with fake (meta) implementations, so ``torch.compile``
traces through them without graph breaks; each forward carries ``register_autograd``, whose
backward calls its backward operator and saves only q, k, v, out and the log-sum-exp (and the
offsets, or the dropout seed).

A mask (a block-sparse ``BlockMask`` or an element-exact ``ExactMask``) is not a tensor: the
operators take an int handle into a registry of masks (``block_mask_handle``); -1 means no
mask.
"""

import inspect
import threading
from typing import Optional

import torch

import cuflash

from . import _bridge

NO_MASK = -1


# ----------------------------------------------------------------------------- block masks

_mask_lock = threading.Lock()
_mask_ids: dict = {}   # mask -> handle; BlockMask compares by value, so equal masks share one
_masks: list = []      # handle -> mask


def block_mask_handle(block_mask) -> int:
    """The int handle of ``block_mask`` (registering it on first use); -1 for ``None``.

    The registry keeps every mask registered alive for the life of the process; equal
    ``cuflash.sparse.BlockMask`` objects share one handle.
    """
    if block_mask is None:
        return NO_MASK
    if isinstance(block_mask, int) and not isinstance(block_mask, bool):
        lookup_block_mask(block_mask)  # validates
        return block_mask
    with _mask_lock:
        handle = _mask_ids.get(block_mask)
        if handle is None:
            handle = len(_masks)
            _masks.append(block_mask)
            _mask_ids[block_mask] = handle
    return handle


def lookup_block_mask(handle: int):
    if handle == NO_MASK:
        return None
    if not 0 <= handle < len(_masks):
        raise ValueError(f"{handle} is not a block mask handle from cuflash.torch.block_mask_handle")
    return _masks[handle]


def mask_options(handle: int) -> dict:
    """The core's keyword for the mask behind ``handle``: ``block_mask=`` for a block-sparse
    pattern, ``mask=`` for an exact one, nothing without a mask."""
    from cuflash.sparse import ExactMask

    registered = lookup_block_mask(handle)
    if registered is None:
        return {}
    return {"mask" if isinstance(registered, ExactMask) else "block_mask": registered}


# ----------------------------------------------------------------------------- core options

def _parameters(function) -> frozenset:
    return frozenset(inspect.signature(function).parameters)


# Read once: the functions below are traced by torch.compile, which need not follow inspect.
_CORE_OPTIONS = _parameters(cuflash.attention) & _parameters(cuflash.attention_backward)
_GRADS_HAVE_OUT = {"dq", "dk", "dv"} <= _parameters(cuflash.attention_backward)


def core_supports(*names: str) -> bool:
    """Whether ``cuflash.attention`` and ``cuflash.attention_backward`` take these keywords."""
    return set(names) <= _CORE_OPTIONS


def _grads_have_out() -> bool:
    """Whether ``cuflash.attention_backward`` writes into given ``dq``, ``dk``, ``dv``."""
    return _GRADS_HAVE_OUT


def check_options(window, softcap, alibi_slopes, dropout_p=0.0) -> None:
    """NotImplementedError naming each non-default option the installed core lacks."""
    requested = ["dropout_p"] if dropout_p != 0.0 else []
    if tuple(window) != (-1, -1):
        requested.append("window")
    if softcap != 0.0:
        requested.append("softcap")
    if alibi_slopes is not None:
        requested.append("alibi_slopes")
    for name in requested:
        if not core_supports(name):
            raise NotImplementedError(
                f"{name} is not supported by the installed cuflash core "
                f"(cuflash.attention has no {name!r} argument); leave it at its default")


def _core_options(window_left, window_right, softcap, alibi_slopes, convert):
    """Keyword arguments for the core: only the options that differ from their defaults."""
    options = {}
    if (window_left, window_right) != (-1, -1):
        options["window"] = (int(window_left), int(window_right))
    if softcap != 0.0:
        options["softcap"] = float(softcap)
    if alibi_slopes is not None:
        options["alibi_slopes"] = convert(alibi_slopes)
    return options


# ----------------------------------------------------------------------------- dropout
#
# The dropout seed travels as a CPU int64 scalar tensor holding the seed's 64 bits: a tensor can
# be drawn inside a compiled graph (an int read out of a tensor would break the graph), and a CPU
# one is read by the launch without waiting for the GPU. The offset is a plain int.

def seed_tensor(seed: int) -> torch.Tensor:
    """The int64 scalar that carries ``seed``, an int in [0, 2**64) (its bits, two's
    complement)."""
    return torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)


def seed_value(seed: torch.Tensor) -> int:
    """The seed, an int in [0, 2**64), that a ``seed_tensor`` carries: what the operators pass on
    to the core."""
    return int(seed) % 2**64


def draw_seed() -> torch.Tensor:
    """A fresh seed, in [0, 2**63 - 1), from torch's CPU default generator
    (``torch.default_generator``, which ``torch.manual_seed`` seeds) whatever the device of the
    attention's tensors: a seed drawn on a GPU would have to be read back for the launch, a
    synchronisation per call that a CUDA graph cannot capture."""
    return torch.randint(2**63 - 1, (), dtype=torch.int64)


def _dropout_options(dropout_p, dropout_seed, dropout_offset) -> dict:
    """The core's dropout keywords, none without dropout (so that ``dropout_p = 0`` runs exactly
    the call without it)."""
    if dropout_p == 0.0:
        return {}
    seed = None if dropout_seed is None else seed_value(dropout_seed)
    return dict(dropout_p=dropout_p, dropout_seed=seed, dropout_offset=dropout_offset)


# ----------------------------------------------------------------------------- shapes

def _out_shapes(q, k, v):
    """Shapes of (out, lse) as ``cuflash.attention`` gives them, and whether out has a head axis.

    A 2-D input is one head ``(1, N, D)``; when q, k and v are all 2-D, so are the outputs.
    """
    if q.dim() == k.dim() == v.dim() == 2:
        return (q.shape[0], v.shape[1]), (q.shape[0],), False
    batch = tuple(torch.broadcast_shapes(*(x.shape[:-3] for x in (q, k, v))))
    hq = q.shape[-3] if q.dim() >= 3 else 1
    nq, dv = q.shape[-2], v.shape[-1]
    return batch + (hq, nq, dv), batch + (hq, nq), True


def _empty_out(q, k, v, seq_major: bool):
    """The output ``(..., Hq, Nq, Dv)``; with ``seq_major`` its memory is ``(..., Nq, Hq, Dv)``."""
    shape, _, heads = _out_shapes(q, k, v)
    if seq_major and heads:
        return q.new_empty(shape[:-3] + (shape[-2], shape[-3], shape[-1])).transpose(-3, -2)
    return q.new_empty(shape)


def _empty_lse(q, k, v):
    return q.new_empty(_out_shapes(q, k, v)[1], dtype=torch.float32)


def _empty_grads(q, k, v):
    """Gradient buffers: like the inputs (strides included) when the core writes into given
    buffers, contiguous otherwise (the core's own allocation)."""
    if _grads_have_out():
        return tuple(torch.empty_like(x) for x in (q, k, v))
    return tuple(x.new_empty(x.shape) for x in (q, k, v))


# ----------------------------------------------------------------------------- forward

@torch.library.custom_op("cuflash::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: Optional[float], window_left: int, window_right: int,
                      softcap: float, alibi_slopes: Optional[torch.Tensor], block_mask: int,
                      seq_major: bool, deterministic: bool, dropout_p: float = 0.0,
                      dropout_seed: Optional[torch.Tensor] = None, dropout_offset: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ``cuflash.attention`` on tensors in the (..., H, N, D) layout.

    ``seq_major`` lays the output's memory out as (..., N, H, Dv) (the layout flash-attn returns)
    instead of (..., H, N, Dv). ``deterministic`` does nothing here: it is kept for the backward.
    ``dropout_seed`` is a CPU int64 scalar (``seed_tensor``), required when ``dropout_p > 0``.
    """
    masking = mask_options(block_mask)
    out = _empty_out(q, k, v, seq_major)
    with _bridge.core_scope(q.device) as (to_core, to_torch):
        options = _core_options(window_left, window_right, softcap, alibi_slopes, to_core)
        options.update(_dropout_options(dropout_p, dropout_seed, dropout_offset))
        _, lse = cuflash.attention(*map(to_core, (q, k, v)), causal=causal, scale=scale,
                                   return_lse=True, out=to_core(out), **masking, **options)
        return out, to_torch(lse)


@attention_forward.register_fake
def _(q, k, v, causal, scale, window_left, window_right, softcap, alibi_slopes, block_mask,
      seq_major, deterministic, dropout_p=0.0, dropout_seed=None, dropout_offset=0):
    return _empty_out(q, k, v, seq_major), _empty_lse(q, k, v)


# ----------------------------------------------------------------------------- backward

@torch.library.custom_op("cuflash::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool,
                       scale: Optional[float], window_left: int, window_right: int,
                       softcap: float, alibi_slopes: Optional[torch.Tensor], block_mask: int,
                       deterministic: bool, dropout_p: float = 0.0,
                       dropout_seed: Optional[torch.Tensor] = None, dropout_offset: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``cuflash.attention_backward``; the dropout arguments must be the
    forward's, which regenerate its mask."""
    masking = mask_options(block_mask)
    grads = _empty_grads(q, k, v) if _grads_have_out() else None
    with _bridge.core_scope(q.device) as (to_core, to_torch):
        options = _core_options(window_left, window_right, softcap, alibi_slopes, to_core)
        options.update(_dropout_options(dropout_p, dropout_seed, dropout_offset))
        if grads is not None:
            options.update(zip(("dq", "dk", "dv"), map(to_core, grads)))
        result = cuflash.attention_backward(
            *map(to_core, (dout, q, k, v, out, lse)), causal=causal, scale=scale,
            deterministic=deterministic, **masking, **options)
        if grads is not None:
            return grads
        return tuple(to_torch(g) for g in result)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, causal, scale, window_left, window_right, softcap, alibi_slopes,
      block_mask, deterministic, dropout_p=0.0, dropout_seed=None, dropout_offset=0):
    return _empty_grads(q, k, v)


# ----------------------------------------------------------------------------- autograd

def _no_grads_after_qkv(ctx) -> tuple:
    """No gradient for each input of an operator after q, k and v (options, offsets, ...)."""
    return (None,) * (len(ctx.needs_input_grad) - 3)


def _setup_context(ctx, inputs, output):
    (q, k, v, causal, scale, window_left, window_right, softcap, alibi_slopes, block_mask,
     _seq_major, deterministic, dropout_p, dropout_seed, dropout_offset) = inputs
    out, lse = output
    # The backward gets the forward's very seed and offset: the same dropout mask.
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, dropout_seed)
    ctx.options = (causal, scale, window_left, window_right, softcap, block_mask, deterministic,
                   dropout_p, dropout_offset)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse


def _backward(ctx, dout, _dlse):
    no_grads = _no_grads_after_qkv(ctx)
    if dout is None:  # only lse was used: nothing flows back
        return (None,) * 3 + no_grads
    q, k, v, out, lse, alibi_slopes, dropout_seed = ctx.saved_tensors
    (causal, scale, window_left, window_right, softcap, block_mask, deterministic, dropout_p,
     dropout_offset) = ctx.options
    dq, dk, dv = attention_backward(
        dout, q, k, v, out, lse, causal, scale, window_left, window_right, softcap,
        alibi_slopes, block_mask, deterministic, dropout_p, dropout_seed, dropout_offset)
    return (dq, dk, dv) + no_grads


attention_forward.register_autograd(_backward, setup_context=_setup_context)



# ----------------------------------------------------------------------------- packed sequences
#
# ``cuflash::attention_varlen_forward`` / ``cuflash::attention_varlen_backward``: the core's
# ``attention_varlen`` / ``attention_varlen_backward`` on packed ``(total, H, D)`` tensors. As in
# flash-attn, the offsets of CUDA tensors are not read back to be checked (no host
# synchronisation, so the calls can be captured in a CUDA graph); CPU offsets are always checked
# by the core (docs/torch.md, "Packed sequences").

def _varlen_core_arguments(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                           scale, window_left, window_right, softcap, alibi_slopes, to_core):
    """The core's positional offsets and lengths, and its keywords, for one varlen call."""
    options = _core_options(window_left, window_right, softcap, alibi_slopes, to_core)
    options.update(causal=causal, scale=scale, check_offsets=False)
    return (to_core(cu_seqlens_q), to_core(cu_seqlens_k), max_seqlen_q, max_seqlen_k), options


def _empty_varlen_out(q, v):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))


def _empty_varlen_lse(q):
    return q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("cuflash::attention_varlen_forward", mutates_args=())
def attention_varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                             max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                             scale: Optional[float], window_left: int, window_right: int,
                             softcap: float, alibi_slopes: Optional[torch.Tensor],
                             deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ``cuflash.attention_varlen``: out ``(total_q, Hq, Dv)``, lse
    ``(Hq, total_q)`` float32. ``deterministic`` does nothing here: it is kept for the
    backward."""
    out = _empty_varlen_out(q, v)
    with _bridge.core_scope(q.device) as (to_core, to_torch):
        offsets, options = _varlen_core_arguments(
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
            window_right, softcap, alibi_slopes, to_core)
        _, lse = cuflash.attention_varlen(*map(to_core, (q, k, v)), *offsets, return_lse=True,
                                          out=to_core(out), **options)
        return out, to_torch(lse)


@attention_varlen_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
      window_left, window_right, softcap, alibi_slopes, deterministic):
    return _empty_varlen_out(q, v), _empty_varlen_lse(q)


@torch.library.custom_op("cuflash::attention_varlen_backward", mutates_args=())
def attention_varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                              max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                              scale: Optional[float], window_left: int, window_right: int,
                              softcap: float, alibi_slopes: Optional[torch.Tensor],
                              deterministic: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``cuflash.attention_varlen_backward``, contiguous."""
    with _bridge.core_scope(q.device) as (to_core, to_torch):
        offsets, options = _varlen_core_arguments(
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
            window_right, softcap, alibi_slopes, to_core)
        grads = cuflash.attention_varlen_backward(
            *map(to_core, (dout, q, k, v, out, lse)), *offsets, deterministic=deterministic,
            **options)
        return tuple(to_torch(g) for g in grads)


@attention_varlen_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      scale, window_left, window_right, softcap, alibi_slopes, deterministic):
    return tuple(x.new_empty(x.shape) for x in (q, k, v))


def _setup_varlen_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
     window_right, softcap, alibi_slopes, deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    ctx.options = (max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, softcap,
                   deterministic)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse


def _varlen_backward(ctx, dout, _dlse):
    no_grads = _no_grads_after_qkv(ctx)
    if dout is None:  # only lse was used: nothing flows back
        return (None,) * 3 + no_grads
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes = ctx.saved_tensors
    (max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, softcap,
     deterministic) = ctx.options
    dq, dk, dv = attention_varlen_backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
        scale, window_left, window_right, softcap, alibi_slopes, deterministic)
    return (dq, dk, dv) + no_grads


attention_varlen_forward.register_autograd(_varlen_backward,
                                           setup_context=_setup_varlen_context)
