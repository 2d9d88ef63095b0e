"""The public functions of ``cuflash.torch`` (see the package docstring and docs/torch.md)."""

import contextlib
import re
from typing import Optional

import torch

from cuflash import _checks, _varlen_pages

from . import _bridge, _ops
from ._ops import block_mask_handle

# Under torch.compile the handle of a mask object is computed once, while tracing, and the graph
# holds the resulting int. It is handed the mask's id, not the mask: Dynamo passes such a function
# only constants, and some versions (torch 2.11) take no other object for one, failing the trace;
# id() is a constant on every version, Dynamo guarding on the object's identity, so another mask
# recompiles.
_traced_mask_handle = torch.compiler.assume_constant_result(_ops.trace_mask_handle)


# The flash-attn and SDPA names of the core's options, which their errors use.
_FLASH_ATTN_NAMES = {"scale": "softmax_scale", "window": "window_size"}
_SDPA_NAMES = {"causal": "is_causal"}
_KVCACHE_NAMES = dict(_FLASH_ATTN_NAMES, return_lse="return_softmax_lse")


def _head_dim(q) -> int:
    """q's head dim, which the default scale depends on; 1 for a q without one, which the
    core's shape check refuses after these options are checked."""
    return q.shape[-1] if q.dim() and q.shape[-1] else 1


def _renamed(error: Exception, names: dict, *, every_word: bool = False) -> Exception:
    """``error`` of a core check, its message starting with the caller's name for the argument
    (flash-attn's ``window_size`` for the core's ``window``); with ``every_word``, each whole
    word of it that is a key of ``names`` (``q``, ``cu_seqlens_q``) becomes its value
    (``qkv[:, 0]``, ``cu_seqlens``), but for one between quotes: a value shown as the caller
    gave it (``got 'q'``)."""
    message = str(error)
    if every_word:
        word = r"\b(?:" + "|".join(map(re.escape, names)) + r")\b"
        pattern = rf"(?<!['\"]){word}|{word}(?!['\"])"
        message = re.sub(pattern, lambda match: names[match.group()], message)
    else:
        for core, own in names.items():
            if message.startswith(core + " "):
                message = own + message[len(core):]
    return type(error)(message)


@contextlib.contextmanager
def _caller_names(names: dict, *, every_word: bool = False):
    """Runs a call whose ``TypeError`` and ``ValueError`` then name the arguments as the caller
    passed them (``_renamed``); an error that names none of them is raised as it is."""
    try:
        yield
    except (TypeError, ValueError) as error:
        renamed = _renamed(error, names, every_word=every_word)
        if str(renamed) == str(error):
            raise
        raise renamed from None


def _checked_options(q, causal, scale, window, softcap, deterministic, names: dict) -> tuple:
    """``(causal, scale, window_left, window_right, softcap, deterministic)`` checked by the
    core's own rules before the operators' schemas make bools, floats and ints of them (where
    ``bool("False")`` is True and ``int(1.9)`` is 1); ``scale`` stays None for the default.
    Errors name each argument as ``names`` says (core name -> the caller's)."""
    causal, scale, left, right, softcap = _checked_score_options(q, causal, scale, window,
                                                                 softcap, names)
    return causal, scale, left, right, softcap, _checked_deterministic(deterministic, names)


def _checked_deterministic(deterministic, names: dict) -> bool:
    try:
        return _checks.check_bool(deterministic, "deterministic")
    except TypeError as error:
        raise _renamed(error, names) from None


def _checked_score_options(q, causal, scale, window, softcap, names: dict) -> tuple:
    """``_checked_options`` but ``deterministic``, which the core checks after the masks."""
    try:
        causal = _checks.check_bool(causal, "causal")
        # The default scale depends on q's head dim, a traced or symbolic size under
        # torch.jit.trace and torch.compile: it is read only where the softcap's range check
        # uses that scale (a softcap of 0 is off and needs none).
        softcap_off = isinstance(softcap, (int, float)) and softcap == 0
        checked_scale = _checks.check_scale(scale, 1 if softcap_off else _head_dim(q))
        left, right = _checks.check_window(window)
        softcap = _checks.check_softcap(softcap, checked_scale)
    except (TypeError, ValueError) as error:
        raise _renamed(error, names) from None
    return causal, None if scale is None else checked_scale, left, right, softcap


def _check_tensors(**tensors) -> None:
    """Tensors, all on one device."""
    first = None
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if first is None:
            first = name
        elif x.device != tensors[first].device:
            raise ValueError(f"{first} and {name} must be on one device, got {first} on "
                             f"{tensors[first].device} and {name} on {x.device}")


def attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None,
              window=(-1, -1), softcap: float = 0.0, alibi_slopes=None, block_mask=None,
              mask=None, dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
              dropout_offset: int = 0, deterministic: bool = False, return_lse: bool = False):
    """``cuflash.attention`` on torch tensors, differentiable with respect to q, k and v.

    Parameters
    ----------
    q, k, v : Tensor
        ``(..., Hq, Nq, D)``, ``(..., Hkv, Nk, D)``, ``(..., Hkv, Nk, Dv)``: one dtype (float16,
        bfloat16 or float32), one device (CUDA or CPU). Leading axes broadcast; ``Hq`` is a
        multiple of ``Hkv`` (grouped-query attention); any strides.
    causal, scale
        As in ``cuflash.attention`` (a causal mask is aligned to the bottom-right corner when
        ``Nq != Nk``).
    window : (int, int)
        Sliding window ``(left, right)``, -1 for unbounded, flash-attn's semantics.
    softcap : float
        Scores become ``softcap · tanh(scores / softcap)``; 0 turns it off.
    alibi_slopes : Tensor, optional
        float32 ``(Hq,)`` or ``(B, Hq)``: flash-attn's ALiBi bias.
    block_mask : cuflash.sparse.BlockMask or int, optional
        A block-sparse pattern, or its handle from ``block_mask_handle`` (see docs/torch.md for
        its use under ``torch.compile``).
    mask : cuflash.sparse.ExactMask or int, optional
        An element-exact pattern (``cuflash.attention``'s ``mask=``), or its handle from
        ``block_mask_handle``; not together with ``block_mask``.
    dropout_p, dropout_seed, dropout_offset
        Attention dropout, as in ``cuflash.attention`` (docs/api.md, "Dropout"): ``dropout_p``
        in [0, 1) is applied whenever it is above 0 (pass 0.0 in evaluation). ``dropout_seed``,
        an int in [0, 2**64), is used as given; when it is None a seed is drawn from torch's
        CPU default generator (``torch.manual_seed`` makes runs repeatable), or, while a CUDA
        graph captures a call on CUDA tensors, on the device from torch's CUDA generator, so that
        each replay draws a new mask (docs/torch.md, "Attention dropout"). The backward pass
        uses the forward's seed and offset. The rate is rounded to a multiple of 1/256. On CUDA,
        float16 and bfloat16 only (``ValueError`` for float32).
    deterministic : bool
        Bit-identical gradients from run to run (``cuflash.attention_backward``).
    return_lse : bool
        Also return the log-sum-exp of each row, float32 ``(..., Hq, Nq)``, not differentiable.

    ``window``, ``softcap`` and ``alibi_slopes`` raise ``NotImplementedError`` when the installed
    cuflash core does not have them; at their defaults they are never passed on.
    """
    out, lse, _ = _attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                             alibi_slopes=alibi_slopes, block_mask=block_mask, mask=mask,
                             deterministic=deterministic, seq_major=False, dropout_p=dropout_p,
                             dropout_seed=dropout_seed, dropout_offset=dropout_offset,
                             return_lse=return_lse)
    return (out, lse) if return_lse else out  # return_lse: checked to be a bool


def _checked_dropout_p(dropout_p, dropout_seed=None, dropout_offset=0) -> float:
    """``dropout_p`` as a float, the three checked by the core's rule (a missing seed is
    allowed: the caller draws one)."""
    return _checks.check_dropout(dropout_p, dropout_seed, dropout_offset, None,
                                 seed_required=False)[0]


def _dropout(p: float, dropout_seed, dropout_offset, device: torch.device):
    """``(dropout_p, seed tensor or None, dropout_offset)`` for the operators, from a rate that
    ``_checked_dropout_p`` returned: the given seed, or with ``p > 0`` and none given a drawn one
    (``_ops.draw_seed``; while a CUDA graph captures a call on ``device``,
    ``_ops.draw_device_seed``, whose pair carries the offset; on the meta device none is drawn);
    no seed without dropout. Call it
    after the call's last check, so that a refused call leaves torch's generators where they
    were (``_run_with_dropout``, for the checks that come after it)."""
    if p == 0.0:
        return 0.0, None, 0
    if dropout_seed is not None:
        return p, _ops.seed_tensor(int(dropout_seed)), int(dropout_offset)
    if device.type == "meta":
        # Shapes only (the fake implementations read no seed): a draw would move torch's CPU
        # generator, which torch's own operators on meta tensors leave where it is.
        return p, torch.empty((), dtype=torch.int64, device=device), int(dropout_offset)
    if _ops.graph_capturing(device):
        # An int drawn now would be captured by value, one mask for every replay.
        return p, _ops.draw_device_seed(device, int(dropout_offset)), 0
    return p, _ops.draw_seed(), int(dropout_offset)


def _run_with_dropout(run, p: float, dropout_seed, dropout_offset, device: torch.device):
    """``(run(*dropout), dropout)``, with ``dropout`` the triple of ``_dropout``. The core checks
    shapes, slopes and offsets inside the operator, after the draw: where ``run`` raises, a seed
    drawn from torch's CPU generator in eager code is given back (the generator's state restored),
    so that a refused call leaves it where it was, as flash-attn's does (its checks come before
    its draw). A trace holds the draw in its graph, and a capture holds the device draw among
    its work: those are not undone."""
    drawn = (p != 0.0 and dropout_seed is None and not torch.compiler.is_compiling()
             and not _ops.graph_capturing(device))
    state = torch.default_generator.get_state() if drawn else None
    dropout = _dropout(p, dropout_seed, dropout_offset, device)
    try:
        return run(*dropout), dropout
    except Exception:
        if state is not None:
            torch.default_generator.set_state(state)
        raise


def _is_handle(mask) -> bool:
    return isinstance(mask, int) and not isinstance(mask, bool)


def _one_mask(block_mask, mask):
    """The one mask the operators carry: a BlockMask for ``block_mask``, an ExactMask for
    ``mask`` (either may be a handle), refused in the other slot or together, as the core does.
    The handle of no mask (-1, ``block_mask_handle(None)``) stands for None in either slot."""
    from cuflash.sparse import BlockMask, ExactMask

    block_mask, mask = (None if _is_handle(x) and x == _ops.NO_MASK else x
                        for x in (block_mask, mask))
    if block_mask is not None and mask is not None:
        raise ValueError("give block_mask (block-sparse) or mask (exact), not both")
    chosen, name, kind = ((mask, "mask", ExactMask) if mask is not None
                          else (block_mask, "block_mask", BlockMask))
    if chosen is None:
        return None
    registered = _ops.lookup_block_mask(chosen, name) if _is_handle(chosen) else chosen
    if not isinstance(registered, kind):
        raise TypeError(f"{name} takes a cuflash.sparse.{kind.__name__} (or its handle), got "
                        f"{type(registered).__name__}")
    return chosen


def _core_checks(q, k, v, mask, alibi_slopes, refused, causal, scale, window_left,
                 window_right, softcap, deterministic, dropout_p, dropout_seed,
                 dropout_offset) -> None:
    """The core's checks of an ``attention`` call on stand-ins of q, k and v
    (``_ops.check_call_on_stand_ins``; 70 µs), with the slopes as a ``_RefusedTorchArgument``
    where ``refused`` holds them, their refusal in torch terms; a seed yet to be drawn stands in
    as 0."""
    slopes = _RefusedTorchArgument() if refused else alibi_slopes
    with _torch_refusals(q, refused):
        _ops.check_call_on_stand_ins(q, k, v, mask, slopes, dict(
            causal=causal, scale=scale, window=(window_left, window_right), softcap=softcap,
            deterministic=deterministic, dropout_p=dropout_p,
            dropout_seed=0 if dropout_seed is None else dropout_seed,
            dropout_offset=dropout_offset))


def _attention(q, k, v, *, causal, scale, window, softcap, alibi_slopes, block_mask,
               deterministic, seq_major, dropout_p, dropout_seed=None, dropout_offset=0,
               names=None, return_lse=False, mask=None):
    """``(out, lse, dropout)`` of the forward operator, with ``dropout`` the
    ``(dropout_p, seed tensor or None, dropout_offset)`` it ran with (``_dropout``); ``names``
    as for ``_checked_options``. ``block_mask`` and ``mask`` (``attention``'s) are taken as
    ``_one_mask`` takes them, after the score options, where the core checks its masks.
    ``return_lse`` (``attention``'s) is checked by the core's rule where the core checks it,
    after the options and dropout ("False" is refused, not read as True)."""
    _check_tensors(q=q, k=k, v=v)
    # The slopes' type and device are checked where the core checks the slopes, after q, k, v
    # and every option: slopes the torch side refuses reach the core's checks (below, and the
    # mask's) as a _RefusedTorchArgument, and _torch_refusals says why.
    refused = {}
    _beside_q(q, "alibi_slopes", alibi_slopes, refused)
    causal, scale, left, right, softcap = _checked_score_options(q, causal, scale, window,
                                                                 softcap, names or {})
    block_mask = _one_mask(block_mask, mask)
    if (block_mask is not None and not torch.compiler.is_compiling()
            and not _ops.is_registered(block_mask)):
        # before deterministic, as attention_backward checks its masks first, and before the
        # mask is registered (a mask held already is checked by the operator: checking it here
        # too cost 70 µs a call)
        _core_checks(q, k, v, block_mask, alibi_slopes, refused, causal, scale, left, right,
                     softcap, deterministic, dropout_p, dropout_seed, dropout_offset)
    # deterministic (read by the backward) after the masks, where attention_backward checks it
    deterministic = _checked_deterministic(deterministic, names or {})
    p = _checked_dropout_p(dropout_p, dropout_seed, dropout_offset)
    _checks.check_bool(return_lse, "return_lse")
    _ops.check_options((left, right), softcap, alibi_slopes, p)
    if refused:  # refused where the core checks the slopes, last: after q, k, v and the masks
        if not torch.compiler.is_compiling():  # (no stand-ins while Dynamo traces)
            _core_checks(q, k, v, block_mask, alibi_slopes, refused, causal, scale, left,
                         right, softcap, deterministic, dropout_p, dropout_seed, dropout_offset)
        raise _in_torch_terms(q, "alibi_slopes", alibi_slopes)
    # A mask new to the registry is registered for this call, which takes it out again if it
    # is refused after all (by the kernel choice on a GPU, say, which no check here foresees);
    # a traced call's is settled by the operator's fake implementation (_ops.claim_mask).
    if block_mask is None:
        handle, claimed = _ops.NO_MASK, False
    elif torch.compiler.is_compiling():
        handle = block_mask if _is_handle(block_mask) else _traced_mask_handle(id(block_mask))
        claimed = False
    else:
        handle, claimed = _ops.claim_mask(block_mask)
    try:
        (out, lse), dropout = _run_with_dropout(
            lambda *dropout: _ops.call_forward(q, k, v, causal, scale, left, right, softcap,
                                               alibi_slopes, handle, bool(seq_major),
                                               deterministic, *dropout),
            p, dropout_seed, dropout_offset, q.device)
    except BaseException:
        if claimed:
            _ops.release_mask(handle, ran=False)
        raise
    if claimed:
        _ops.release_mask(handle, ran=True)
    return out, lse, dropout


# ----------------------------------------------------------------------------- flash-attn

# S_dmask is computed from the inputs' values in NumPy, which torch.compile must not trace (its
# NumPy emulation fails inside the dropout generator): compiled code runs it eagerly, in a graph
# break, and fullgraph=True refuses it.
@torch.compiler.disable
def _attn_probs(q, k, v, *, causal, scale, window, softcap, alibi_slopes, dropout_p,
                dropout_seed):
    """flash-attn's ``S_dmask`` for ``return_attn_probs=True``, (B, Hq, Sq, Sk) in q's dtype on
    q's device, from (B, H, S, D) views: ``cuflash.reference.attention_probs`` (the softmax
    matrix, dropped entries negated) computed in float64 on the CPU; ``dropout_seed`` is the
    seed tensor the forward ran with (None without dropout). For tests: it forms the whole
    matrix and reads the inputs back from the device."""
    from cuflash import reference

    arrays = [_bridge.to_numpy(x.cpu()) for x in (q, k, v)]  # to_numpy detaches
    slopes = None if alibi_slopes is None else _bridge.to_numpy(alibi_slopes.cpu())
    seed = None if dropout_seed is None else _ops.seed_value(dropout_seed)
    probs = reference.attention_probs(*arrays, causal=causal, scale=scale, window=window,
                                      softcap=softcap, alibi_slopes=slopes, dropout_p=dropout_p,
                                      dropout_seed=seed)
    return torch.from_numpy(probs).to(device=q.device, dtype=q.dtype)


@torch.compiler.disable  # as _attn_probs
def _varlen_attn_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                       causal, scale, window, softcap, alibi_slopes, dropout_p=0.0,
                       dropout_seed=None):
    """flash-attn's ``S_dmask`` of a packed call, ``(B, Hq, max_seqlen_q, max_seqlen_k)`` in q's
    dtype on q's device: sequence ``b``'s softmax matrix in the top left ``(nq_b, nk_b)`` corner
    of ``S_dmask[b]``, zeros elsewhere; ``_attn_probs`` of each sequence alone (its causal mask,
    window and ALiBi aligned to its own bottom right, ``(B, Hq)`` slopes by their row), with
    dropout as batch element ``b`` of a dense call of its lengths (the sequence repeated ``b + 1``
    times). For tests: it forms every sequence's whole matrix on the CPU."""
    starts_q, starts_k = (x.cpu().tolist() for x in (cu_seqlens_q, cu_seqlens_k))
    batch, hq = len(starts_q) - 1, q.shape[1]
    probs = torch.zeros(batch, hq, int(max_seqlen_q), int(max_seqlen_k), dtype=q.dtype,
                        device=q.device)
    for b in range(batch):
        rows, keys = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        if rows.stop == rows.start or keys.stop == keys.start:
            continue  # queries without keys (or none at all): no probabilities
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        copies = b + 1 if dropout_p else 1  # the mask's batch index is the sequence's
        views = (x[part].transpose(0, 1)[None].expand(copies, -1, -1, -1)
                 for x, part in ((q, rows), (k, keys), (v, keys)))
        one = _attn_probs(*views, causal=causal, scale=scale, window=window, softcap=softcap,
                          alibi_slopes=slopes, dropout_p=dropout_p, dropout_seed=dropout_seed)
        probs[b, :, :rows.stop - rows.start, :keys.stop - keys.start] = one[-1]
    return probs


def _holds_no_values(x: torch.Tensor) -> bool:
    """Whether ``x`` has no values to read on the host: a meta tensor, a fake one, or any tensor
    under ``FakeTensorMode`` (which hands out fake ones: torch.export traces with it). Never
    while Dynamo traces, where tensors stand for the real ones that a graph break then reads."""
    if torch.compiler.is_dynamo_compiling():
        return False
    return x.is_meta or _fake_mode_active() or _is_fake(x)


def _fake_mode_active() -> bool:
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _is_fake(x: torch.Tensor) -> bool:
    """torch's ``is_fake``, answered at once for a plain tensor outside any ``torch.func``
    transform (only a tensor subclass, or a tensor a transform wraps, can be fake): torch's
    check costs microseconds a tensor, on the path of every decode step."""
    if type(x) is torch.Tensor and torch._C._functorch.maybe_current_level() is None:
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(x)


def _refuse_transformed(what: str, why: str, **tensors) -> None:
    """ValueError naming the ``tensors`` that a ``torch.func`` transform (vmap, grad, jvp) wraps:
    ``what`` works on the tensors' memory (``why``), which a wrapped tensor does not lend
    (torch's own error, "Cannot access data pointer", names neither the call nor the tensor).
    Never while Dynamo traces, where tensors stand for the real ones (as ``_holds_no_values``)."""
    if torch.compiler.is_dynamo_compiling() or torch._C._functorch.maybe_current_level() is None:
        return  # (outside every transform no tensor is wrapped)
    wraps = torch._C._functorch.is_functorch_wrapped_tensor
    wrapped = [name for name, x in tensors.items() if isinstance(x, torch.Tensor) and wraps(x)]
    if wrapped:
        raise ValueError(f"{what} cannot run on the tensors of a torch.func transform (vmap, "
                         f"grad, jvp), which lend no memory ({', '.join(wrapped)}): {why}; "
                         f"call it outside the transform")


def _checked_return_attn_probs(return_attn_probs, q, **read) -> bool:
    """``return_attn_probs`` as a bool, checked by the core's rule (``"False"`` is refused, not
    read as True). ``return_attn_probs=True`` reads the inputs (q and the tensors ``read``, and
    the dropout seed) back to the host: a RuntimeError while a CUDA graph captures, before the
    forward, rather than a capture broken by the copy; a ValueError for tensors that hold no
    values to read (meta and fake ones) or lend none (those a torch.func transform wraps)."""
    return_attn_probs = _checks.check_bool(return_attn_probs, "return_attn_probs")
    if return_attn_probs and _holds_no_values(q):
        raise ValueError("return_attn_probs=True: S_dmask is formed on the CPU from the "
                         "inputs' values, which meta tensors and fake tensors (FakeTensorMode) "
                         "do not hold")
    if return_attn_probs:
        _refuse_transformed("return_attn_probs=True", "S_dmask is formed on the CPU from the "
                            "inputs' values", q=q, **read)
    if return_attn_probs and _ops.graph_capturing(q.device):
        raise RuntimeError("return_attn_probs=True cannot be captured in a CUDA graph: S_dmask "
                           "is formed on the CPU from the inputs read back from the device")
    return return_attn_probs


def _check_layout(layout: tuple, **tensors) -> None:
    """Tensors with one axis per name in ``layout`` (flash-attn's names)."""
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != len(layout):
            raise ValueError(f"{name} must have shape ({', '.join(layout)}), got "
                             f"{tuple(x.shape)}")


def _check_same_batch(**tensors) -> None:
    """One batch size (axis 0): flash-attn does not broadcast it (``attention`` broadcasts
    leading axes)."""
    names = list(tensors)
    batch = tensors[names[0]].shape[0]
    if any(x.shape[0] != batch for x in tensors.values()):
        listed = ", ".join(names[:-1]) + " and " + names[-1]
        shapes = ", ".join(f"{name} {tuple(x.shape)}" for name, x in tensors.items())
        raise ValueError(f"{listed} must have the same batch size (axis 0), got {shapes}")


def _check_bshd(**tensors) -> None:
    """flash-attn's ``(batch, seqlen, nheads, headdim)`` tensors, of one batch size."""
    _check_layout(("batch", "seqlen", "nheads", "headdim"), **tensors)
    _check_same_batch(**tensors)


def _check_bshd_pairing(q, k, v) -> None:
    """The core's shape rules for q, k and v checked on the ``(B, S, H, D)`` tensors as the
    caller gave them: the core sees ``(B, H, S, D)`` views and would describe those."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if 0 in x.shape:
            raise ValueError(f"{name} must not have an empty axis, got shape {tuple(x.shape)}")
    _checks._check_qk_pairing(q, k, q.shape[3], k.shape[3], q.shape[2], k.shape[2])
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"k and v must have the same number of keys and heads (axes 1, 2), got "
                         f"k {tuple(k.shape)} and v {tuple(v.shape)}")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """flash-attn's ``flash_attn_func``: q ``(B, Sq, Hq, D)``, k and v ``(B, Sk, Hkv, D)``.

    Returns ``out`` ``(B, Sq, Hq, Dv)``, contiguous. As in flash-attn, ``dropout_p > 0`` is
    applied whenever it is given (pass ``dropout_p if self.training else 0.0``), with a seed
    drawn from torch's CPU default generator, or from its CUDA generator under CUDA-graph capture
    (``cuflash.torch.attention``).
    ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)`` as flash-attn does, for
    tests: ``softmax_lse`` float32 ``(B, Hq, Sq)``, and ``S_dmask`` ``(B, Hq, Sq, Sk)`` the exact
    softmax matrix with the entries this call dropped negated
    (``cuflash.reference.attention_probs``, formed in float64 on the CPU; not differentiable;
    ``RuntimeError`` under CUDA-graph capture).
    """
    _check_bshd(q=q, k=k, v=v)
    return_attn_probs = _checked_return_attn_probs(return_attn_probs, q, k=k, v=v,
                                                   alibi_slopes=alibi_slopes)
    q_, k_, v_ = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    options = dict(causal=causal, scale=softmax_scale, window=window_size, softcap=softcap,
                   alibi_slopes=alibi_slopes)
    try:
        out, lse, (p, seed, _) = _attention(q_, k_, v_, **options, block_mask=None,
                                            deterministic=deterministic, seq_major=True,
                                            dropout_p=dropout_p, names=_FLASH_ATTN_NAMES)
    except ValueError:
        # The core describes the (B, H, S, D) views it was given: where its refusal is of the
        # shapes, describe the tensors as the caller gave them instead (off the calls that run).
        _check_bshd_pairing(q, k, v)
        raise
    out = out.transpose(1, 2)
    if not return_attn_probs:
        return out
    # The rate and the very seed the operator ran with (drawn by _dropout when p > 0): a CPU
    # scalar, since no capture gets here.
    probs = _attn_probs(q_, k_, v_, **options, dropout_p=p, dropout_seed=seed)
    return out, lse.detach(), probs


def _unpack(x, name: str, layout: tuple) -> tuple:
    """The tensors flash-attn packs along the axis that ``layout`` (its names) gives as a count
    ("3" or "2"), as views."""
    axis = next(i for i, size in enumerate(layout) if size.isdigit())
    if x.dim() != len(layout) or x.shape[axis] != int(layout[axis]):
        raise ValueError(f"{name} must have shape ({', '.join(layout)}), got {tuple(x.shape)}")
    return x.unbind(axis)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_qkvpacked_func``: qkv ``(B, S, 3, H, D)``; returns
    ``(B, S, H, D)``."""
    _check_tensors(qkv=qkv)
    q, k, v = _unpack(qkv, "qkv", ("batch", "seqlen", "3", "nheads", "headdim"))
    with _caller_names({"q": "qkv[:, :, 0]", "k": "qkv[:, :, 1]", "v": "qkv[:, :, 2]"},
                       every_word=True):
        return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                               alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_kvpacked_func``: q ``(B, Sq, Hq, D)``, kv
    ``(B, Sk, 2, Hkv, D)``; returns ``(B, Sq, Hq, D)``."""
    _check_tensors(q=q, kv=kv)
    _check_bshd(q=q)  # before kv, as flash_attn_func checks q before k and v
    k, v = _unpack(kv, "kv", ("batch", "seqlen", "2", "nheads_k", "headdim"))
    _check_same_batch(q=q, kv=kv)  # named here: flash_attn_func would name kv's halves k and v
    with _caller_names({"k": "kv[:, :, 0]", "v": "kv[:, :, 1]"}, every_word=True):
        return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                               alibi_slopes, deterministic, return_attn_probs)


# ----------------------------------------------------------------------------- packed sequences

def _max_seqlen(value, name: str):
    """``max_seqlen_q`` / ``max_seqlen_k`` as the operators take it: checked by the core's rule,
    or passed on as it is when ``torch.compile`` made it symbolic."""
    if isinstance(value, torch.SymInt):
        return value
    return _checks.check_max_seqlen(value, name)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn's ``flash_attn_varlen_func``: ``cuflash.attention_varlen`` on tensors,
    differentiable with respect to q, k and v.

    q ``(total_q, Hq, D)``, k ``(total_k, Hkv, D)``, v ``(total_k, Hkv, Dv)``: sequences packed
    one after another; ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 ``(B + 1,)`` on q's device,
    their row offsets; ``max_seqlen_q`` / ``max_seqlen_k`` Python ints, at least the longest
    sequence. Returns ``out`` ``(total_q, Hq, Dv)``. Causal masks, windows and ALiBi are aligned
    to the bottom right of each sequence; ``alibi_slopes`` is float32 ``(Hq,)`` or ``(B, Hq)``.
    ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)`` as flash-attn does, for
    tests: ``softmax_lse`` float32 ``(Hq, total_q)``, and ``S_dmask``
    ``(B, Hq, max_seqlen_q, max_seqlen_k)`` with each sequence's exact softmax matrix in the top
    left corner of its row, zeros elsewhere, the entries this call dropped negated (formed in
    float64 on the CPU; not differentiable; not under CUDA-graph capture). ``dropout_p`` as for
    ``flash_attn_func`` (a seed from torch's CPU generator, its CUDA one under capture); sequence
    ``b`` keeps what a dense call's batch element ``b`` keeps (``cuflash.attention_varlen``).
    ``block_table`` (int32 ``(B, max_num_blocks_per_seq)``) takes k and v as flash-attn's
    paged caches ``(num_blocks, page_block_size, nheads_k, headdim)``: the keys and values the
    sequences use are gathered into packed rows with torch's indexing (gradients reach the
    pages), after ``cu_seqlens_k`` and the table are read on the host (a synchronisation; not
    under CUDA-graph capture). As in flash-attn, the offsets of CUDA tensors are otherwise not
    checked (no host synchronisation); CPU offsets are (docs/torch.md, "Packed sequences").
    """
    if block_table is None:
        _check_layout(_PACKED, q=q, k=k, v=v)
    else:  # k and v are paged caches, checked where the packed call checks its k and v
        _check_layout(_PACKED, q=q)
        _check_layout(_PAGES, k=k, v=v)
    _check_tensors(q=q, k=k, v=v)
    # The offsets' and the slopes' types and devices are checked where the core checks them
    # (after the function's own checks, as the operator's call would): refused ones reach the
    # core's checks as _RefusedTorchArgument, and _torch_refusals says why.
    refused = {}
    marked = {name: _beside_q(q, name, x, refused) for name, x in (
        ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
        ("alibi_slopes", alibi_slopes))}
    return_attn_probs = _checked_return_attn_probs(
        return_attn_probs, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        alibi_slopes=alibi_slopes)
    causal, scale, left, right, softcap, deterministic = _checked_options(
        q, causal, softmax_scale, window_size, softcap, deterministic, _FLASH_ATTN_NAMES)
    p = _checked_dropout_p(dropout_p)  # after the options, as flash_attn_func checks it
    lengths = _max_seqlen(max_seqlen_q, "max_seqlen_q"), _max_seqlen(max_seqlen_k, "max_seqlen_k")
    if refused:
        if not torch.compiler.is_compiling():  # (no stand-ins while Dynamo traces)
            with _torch_refusals(q, refused):  # raises the core's first refusal
                _varlen_core_checks(
                    q, k, v, marked["cu_seqlens_q"], marked["cu_seqlens_k"], lengths,
                    marked["alibi_slopes"], p,
                    dict(causal=causal, scale=scale, deterministic=deterministic),
                    (left, right, softcap),
                    _checks.varlen_shapes if block_table is None else _varlen_pages.page_shapes)
        name, given = next(iter(refused.items()))
        raise _in_torch_terms(q, name, given)
    if block_table is not None:  # after the call's own checks: a refused call gathers nothing
        _check_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, lengths, alibi_slopes, p,
                     dict(causal=causal, scale=scale, deterministic=deterministic),
                     (left, right, softcap))
        k, v = _gathered_pages(k, v, cu_seqlens_k, max_seqlen_k, block_table)
    (out, lse), dropout = _run_with_dropout(
        lambda *dropout: _ops.call_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *lengths,
                                                  causal, scale, left, right, softcap,
                                                  alibi_slopes, deterministic, *dropout),
        p, None, 0, q.device)
    if not return_attn_probs:
        return out
    probs = _varlen_attn_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               causal=causal, scale=scale, window=(left, right), softcap=softcap,
                               alibi_slopes=alibi_slopes, dropout_p=p, dropout_seed=dropout[1])
    return out, lse.detach(), probs


# flash-attn's layouts of packed q, k, v and of paged caches.
_PACKED = ("total", "nheads", "headdim")
_PAGES = ("num_blocks", "page_block_size", "nheads_k", "headdim")


def _check_paged(q, k_pages, v_pages, cu_seqlens_q, cu_seqlens_k, block_table, lengths,
                 alibi_slopes, dropout_p, options: dict, band: tuple) -> None:
    """A paged call, once the function's own checks have passed, in ``cuflash.attention_varlen``'s
    order, so that a call wrong in several arguments is refused for the one the call on packed
    keys names, and a refused call reads no table and gathers nothing: first what makes the
    gather impossible (a CUDA-graph capture, tensors without values to read), then the core's
    checks of the packed call (``_check_before_gather``), then the block table, and last the
    query offsets' values (read on the host where the packed call reads them)."""
    _check_tensors(q=q, block_table=block_table)
    _refuse_unreadable_table(cu_seqlens_k, block_table)
    _check_before_gather(q, k_pages, v_pages, cu_seqlens_q, cu_seqlens_k, lengths, alibi_slopes,
                         dropout_p, options, band)
    _check_block_table(cu_seqlens_k, block_table)
    _check_query_offsets(q, cu_seqlens_q, lengths[0])


def _refuse_unreadable_table(cu_seqlens_k, block_table) -> None:
    """The gather reads cu_seqlens_k and block_table on the host: refused under CUDA-graph
    capture, for tensors that hold no values (meta, fake) and for those a torch.func transform
    wraps, before anything is read."""
    if _ops.graph_capturing(block_table.device):  # rather than a capture broken by the copy
        raise RuntimeError("block_table cannot be captured in a CUDA graph: the gather reads "
                           "cu_seqlens_k and block_table back to the host")
    if _holds_no_values(block_table):  # _check_tensors: cu_seqlens_k is on its device
        raise ValueError("block_table: the gather reads the values of cu_seqlens_k and "
                         "block_table on the host, which meta tensors and fake tensors "
                         "(FakeTensorMode) do not hold")
    _refuse_transformed("flash_attn_varlen_func with a block_table", "the gather reads the "
                        "values of cu_seqlens_k and block_table on the host",
                        cu_seqlens_k=cu_seqlens_k, block_table=block_table)


def _check_block_table(cu_seqlens_k, block_table) -> None:
    """flash-attn's int32 ``(batch_size, max_num_blocks_per_seq)`` table, a row per sequence of
    the checked ``cu_seqlens_k`` (its entries are checked when it is read)."""
    _check_layout(("batch_size", "max_num_blocks_per_seq"), block_table=block_table)
    if block_table.dtype != torch.int32:
        raise _checks.IndexDtypeError(f"block_table must have dtype torch.int32 (flash-attn's "
                                      f"index dtype), got {block_table.dtype}")
    if cu_seqlens_k.shape[0] != block_table.shape[0] + 1:
        raise ValueError(f"cu_seqlens_k must have one offset more than block_table has rows "
                         f"(sequences), got cu_seqlens_k {tuple(cu_seqlens_k.shape)} and "
                         f"block_table {tuple(block_table.shape)}")


# The core's checks read the tensors' NumPy views (CPU), and the query offsets' values are read
# on the host: torch.compile must not trace them (as _page_rows, a graph break).
@torch.compiler.disable
def _check_before_gather(q, k_pages, v_pages, cu_seqlens_q, cu_seqlens_k, lengths, alibi_slopes,
                         dropout_p, options: dict, band: tuple) -> None:
    """The core's checks of the packed call that a paged one becomes, run as
    ``cuflash.attention_varlen`` runs them before its gather (``_varlen_checks`` with
    ``_varlen_pages.page_shapes``), so that a call they refuse raises what the call on packed
    keys raises (cu_seqlens_k's dtype among them). CPU tensors are checked as NumPy views; CUDA
    ones on stand-ins of their shapes and dtypes, their values unread, as the packed call leaves
    them (``band``: the checked ``(window_left, window_right, softcap)``; the seed, drawn later,
    stands in as 0)."""
    from cuflash import _api as core_api

    spec = _varlen_core_checks(q, k_pages, v_pages, cu_seqlens_q, cu_seqlens_k, lengths,
                               alibi_slopes, dropout_p, options, band, _varlen_pages.page_shapes)
    if q.device.type == "cuda":  # what the kernel choice refuses, before the gather's copy
        core_api.refuse_packed_on_gpu(spec.dtype)


@torch.compiler.disable  # as _check_before_gather
def _varlen_core_checks(q, k, v, cu_seqlens_q, cu_seqlens_k, lengths, alibi_slopes, dropout_p,
                        options: dict, band: tuple, shapes_of):
    """The spec of ``cuflash._api._varlen_checks`` (``shapes_of`` checking q, k and v) for a
    packed call, as ``_check_before_gather`` runs it: CPU tensors as NumPy views, CUDA ones as
    stand-ins, anything else (a ``_RefusedTorchArgument``) as it is."""
    from cuflash import _api as core_api

    convert = _bridge.to_numpy if q.device.type == "cpu" else _ops._stand_in

    def to_core(x):
        return convert(x) if isinstance(x, torch.Tensor) else x

    options = dict(options, **_ops._core_options(*band, alibi_slopes, to_core))
    if dropout_p:
        options.update(dropout_p=dropout_p, dropout_seed=0)
    arrays = map(to_core, (q, k, v, cu_seqlens_q, cu_seqlens_k))
    return core_api._varlen_checks(*arrays, *lengths, shapes_of, **options)[2]


@torch.compiler.disable  # as _check_before_gather: values read on the host
def _check_query_offsets(q, cu_seqlens_q, max_seqlen_q) -> None:
    """The values of CPU query offsets, by the rule of the core's paged call
    (``_varlen_pages.check_query_offsets``); CUDA ones are not read, as the packed call does not
    read them."""
    if q.device.type == "cpu":
        _varlen_pages.check_query_offsets(_bridge.to_numpy(cu_seqlens_q), q, max_seqlen_q)


def _gathered_pages(k, v, cu_seqlens_k, max_seqlen_k, block_table) -> tuple:
    """The paged k and v (``_check_paged``) as packed rows ``(total_k, nheads_k, headdim)``,
    gathered by torch's indexing so that autograd carries gradients back to the pages; the
    offsets and the table are read on the host to size and check the gather."""
    index = _page_rows(cu_seqlens_k, block_table, max_seqlen_k, k.shape[1], k.shape[0])
    return k[index], v[index]


# The rows are computed from the offsets' and the table's values on the host, which
# torch.compile must not trace: under it this is a graph break (fullgraph=True refuses it).
@torch.compiler.disable
def _page_rows(cu_seqlens_k, block_table, max_seqlen_k, page_size: int, num_pages: int) -> tuple:
    """``(pages, rows within the pages)`` of every packed key, as index tensors on the caches'
    device."""
    max_k = _checks.check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    rows = torch.as_tensor(_varlen_pages.key_rows(cu_seqlens_k.cpu().numpy(),
                                                  block_table.cpu().numpy(), max_k, page_size,
                                                  num_pages), device=block_table.device)
    return rows // page_size, rows % page_size


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: qkv ``(total, 3, H, D)``, one set of
    offsets and max length for queries and keys; returns ``(total, H, D)``
    (``flash_attn_varlen_func``, whose refusals apply)."""
    _check_tensors(qkv=qkv)
    q, k, v = _unpack(qkv, "qkv", ("total", "3", "nheads", "headdim"))
    with _caller_names({"q": "qkv[:, 0]", "k": "qkv[:, 1]", "v": "qkv[:, 2]",
                        "cu_seqlens_q": "cu_seqlens", "cu_seqlens_k": "cu_seqlens",
                        "max_seqlen_q": "max_seqlen", "max_seqlen_k": "max_seqlen"},
                       every_word=True):
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      dropout_p, softmax_scale, causal, window_size, softcap,
                                      alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                                    causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q ``(total_q, Hq, D)``, kv
    ``(total_k, 2, Hkv, D)``; returns ``(total_q, Hq, D)`` (``flash_attn_varlen_func``, whose
    refusals apply)."""
    _check_tensors(q=q, kv=kv)
    _check_layout(_PACKED, q=q)  # before kv, as flash_attn_varlen_func checks q before k and v
    k, v = _unpack(kv, "kv", ("total_k", "2", "nheads_k", "headdim"))
    with _caller_names({"k": "kv[:, 0]", "v": "kv[:, 1]"}, every_word=True):
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, dropout_p, softmax_scale, causal,
                                      window_size, softcap, alibi_slopes, deterministic,
                                      return_attn_probs)


# ----------------------------------------------------------------------------- SDPA

def _autocast(device: torch.device, *tensors) -> tuple:
    """The tensors as torch's autocast hands them to its lower-precision operators (SDPA among
    them) while it is enabled for ``device``'s type: floating-point ones other than float64 in
    the autocast dtype; as they are otherwise (and on devices autocast does not know)."""
    if device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(x.to(dtype) if x.is_floating_point() and x.dtype != torch.float64 else x
                 for x in tensors)


def _heads(x) -> int:
    """The head count of an SDPA tensor ``(..., H, L, E)``; 1 for a 2-D ``(L, E)`` one, as in
    torch (and in the core)."""
    return x.shape[-3] if x.dim() > 2 else 1


def _broadcast_heads(x, heads: int):
    """``x``, of one head, as ``heads`` heads: a view, as torch's broadcasting reads it."""
    return x.expand(*x.shape[:-3], heads, *x.shape[-2:])


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention`` for the cases cuflash computes.

    ``(..., H, L, E)`` inputs as in torch (a 2-D ``(L, E)`` one is one head). As in torch,
    ``dropout_p`` is applied as given (pass 0.0 in evaluation), with a seed drawn from torch's
    CPU default generator, or its CUDA generator under CUDA-graph capture
    (``cuflash.torch.attention``). ``attn_mask`` and
    ``is_causal`` with ``L != S`` (torch aligns that mask to the top-left corner, cuflash to the
    bottom-right) raise ``NotImplementedError`` (element masks go through
    ``cuflash.torch.attention(mask=cuflash.sparse.ExactMask)``); different query and key/value
    head counts need ``enable_gqa=True``, as in torch, but a head axis of 1 (the query's, the
    key's or the value's) broadcasts against the others'. The output's memory follows the query's: a query that is a ``(B, L, H, E)``
    tensor transposed gives an output that is one too, as torch's flash kernel does. Under
    ``torch.autocast``, as torch's, query, key and value run in the autocast dtype.
    """
    _check_tensors(query=query, key=key, value=value)
    query, key, value = _autocast(query.device, query, key, value)
    if attn_mask is not None:
        raise NotImplementedError(
            "attn_mask is not supported here: pass is_causal, or give cuflash.torch.attention a "
            "block-sparse cuflash.sparse.BlockMask (block_mask=) or an element-exact "
            "cuflash.sparse.ExactMask (mask=)")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., L, E), got shape "
                             f"{tuple(x.shape)}")
    nq, nk = query.shape[-2], key.shape[-2]
    # Checked before their truth is read below: "False" would be true (torch refuses both).
    is_causal = _checks.check_bool(is_causal, "is_causal")
    enable_gqa = _checks.check_bool(enable_gqa, "enable_gqa")
    if is_causal and nq != nk:
        raise NotImplementedError(
            f"is_causal=True with L={nq} != S={nk}: torch aligns this mask to the top-left corner "
            f"and cuflash to the bottom-right; use cuflash.torch.attention(causal=True) for the "
            f"bottom-right alignment")
    hq, hk, hv = map(_heads, (query, key, value))
    seq_major = query.dim() > 2 and query.stride(-3) < query.stride(-2)
    # As in torch, a head axis of 1 broadcasts against the other tensors' heads: the key's or the
    # value's against the other's (the core takes one count for both), and without enable_gqa
    # the query's against the key's (one key/value head is multi-query attention to the core);
    # other unequal counts are grouped-query attention, which torch runs only with
    # enable_gqa=True (where it refuses a query head count that the key's does not divide, as
    # the core does).
    hkv = max(hk, hv)
    if hk != hv and min(hk, hv) == 1:
        key, value = (x if heads > 1 else _broadcast_heads(x, hkv)
                      for x, heads in ((key, hk), (value, hv)))
    if hq == 1 and hkv > 1 and not enable_gqa:
        query = _broadcast_heads(query, hkv)
    elif hq != hkv and hkv != 1 and not enable_gqa:
        raise ValueError(f"query has {hq} heads and key {hkv}: pass enable_gqa=True for "
                         f"grouped-query attention")
    with _caller_names({"q": "query", "k": "key", "v": "value"}, every_word=True):
        out, _, _ = _attention(query, key, value, causal=is_causal, scale=scale,
                               window=(-1, -1), softcap=0.0, alibi_slopes=None, block_mask=None,
                               deterministic=False, seq_major=seq_major, dropout_p=dropout_p,
                               names=_SDPA_NAMES)
    return out



# ----------------------------------------------------------------------------- KV cache

def _refuse_tensors_without_memory(**arguments) -> None:
    """ValueError, before anything is written, for a ``flash_attn_with_kvcache`` call on
    tensors that lend no memory: fake tensors, any under ``FakeTensorMode`` (where even real
    tensors cross to the core as fake ones), and the tensors a ``torch.func`` transform wraps
    (vmap, grad, jvp). It is no operator with a fake implementation or a batching rule but a
    call on the tensors' memory, which writes the caches in place through views of it."""
    if torch.compiler.is_dynamo_compiling():
        return
    tensors = [x for x in arguments.values() if isinstance(x, torch.Tensor)]
    # meta tensors: refused with the other devices the core does not run on
    if _fake_mode_active() or any(not x.is_meta and _is_fake(x) for x in tensors):
        raise ValueError("flash_attn_with_kvcache cannot run on fake tensors (FakeTensorMode, "
                         "torch.export): it is no operator with a fake implementation, but a "
                         "call on the tensors' memory, which writes k and v into the caches in "
                         "place and which fake tensors do not have; call it on CUDA or CPU "
                         "tensors")
    _refuse_transformed("flash_attn_with_kvcache", "it is no operator with a batching rule or "
                        "a derivative, but a call on the tensors' memory, which writes k and v "
                        "into the caches in place", **arguments)


class _RefusedTorchArgument:
    """What the core is handed for an argument of ``flash_attn_with_kvcache`` that the torch
    side refuses (a tensor on another device than q's, an object of another type): a type the
    core refuses where it checks that argument, after q, the caches and what it checks before,
    so that a call wrong in several arguments names the one the core names
    (``_torch_refusals`` puts the refusal in torch terms)."""

    __slots__ = ()


def _beside_q(q, name: str, x, refused: dict):
    """``x`` for the core: a tensor on q's device as it is (None as None), anything else noted
    in ``refused`` and handed on as a ``_RefusedTorchArgument``."""
    if x is None or isinstance(x, torch.Tensor) and x.device == q.device:
        return x
    refused[name] = x
    return _RefusedTorchArgument()


@contextlib.contextmanager
def _torch_refusals(q, refused: dict):
    """Runs the core's call, handed a ``_RefusedTorchArgument`` for each argument in ``refused``
    (name -> what the caller gave): the core's refusal of one becomes one in torch terms (the
    core would describe its own arrays, and takes NumPy ones)."""
    try:
        yield
    except (TypeError, ValueError) as error:
        name = str(error).partition(" ")[0]
        if name not in refused or _RefusedTorchArgument.__name__ not in str(error):
            raise
        raise _in_torch_terms(q, name, refused[name]) from None


def _in_torch_terms(q, name: str, given) -> Exception:
    """The refusal of ``flash_attn_with_kvcache``'s argument ``name``, given as ``given``: on
    another device than q, not a tensor, or (``cache_seqlens``) neither of flash-attn's forms."""
    if name == "cache_seqlens" and given is None:  # (None alone takes the whole cache)
        return ValueError("cache_seqlens is required when k and v are given: it says where in "
                          "each row's cache they are written")
    if isinstance(given, torch.Tensor):
        return ValueError(f"q and {name} must be on one device, got q on {q.device} and {name} "
                          f"on {given.device}")
    if name == "cache_seqlens":
        batch = f"({q.shape[0]},)" if q.dim() else "(B,)"
        return TypeError(f"cache_seqlens must be an int or an int32 torch.Tensor of shape {batch} "
                         f"on q's device (the number of keys in each batch row's cache before k "
                         f"and v are appended), got {_checks._show(given)} of type "
                         f"{_checks._type_name(given)}")
    return TypeError(f"{name} must be a torch.Tensor, got {type(given).__name__}")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                            rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """flash-attn's ``flash_attn_with_kvcache``: ``cuflash.attention_with_kvcache`` on tensors.

    The same arguments, in flash-attn's order, and the same results: ``out`` ``(B, Sq, Hq, Dv)``,
    and with ``return_softmax_lse=True`` also ``softmax_lse`` float32 ``(B, Hq, Sq)``. ``k_cache``
    and ``v_cache`` are written in place when ``k`` and ``v`` are given (their version counters
    bumped, as by torch's in-place operations); ``cache_seqlens`` is not
    updated; it is an int or an int32 tensor ``(B,)`` on q's device, as in flash-attn.
    ``cache_seqlens=None`` means every row's whole cache (``S_cache`` keys, or
    ``max_pages · page_size``), as in flash-attn; it is required with ``k`` and ``v``. Forward
    only (flash-attn's has no backward either): the result does not require grad.
    ``rotary_cos`` / ``rotary_sin`` rotate q and the appended k as flash-attn does
    (``cuflash.attention_with_kvcache``), and ``cache_leftpad`` (int32 ``(B,)`` on q's device,
    contiguous caches only) marks each row's first positions as padding, as flash-attn does.
    Tensors stay where they are: CUDA tensors run on torch's current stream without copies, CPU
    tensors through NumPy views. No operator: meta tensors, fake tensors, ``FakeTensorMode``
    (``torch.export``) and the tensors of a ``torch.func`` transform raise ``ValueError``.
    """
    import cuflash

    _check_tensors(**{name: x for name, x in (
        ("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)) if x is not None})
    # The other tensors are checked where the core checks them, after q, the caches, k and v
    # (and after what it checks before each): one the torch side refuses reaches the core as a
    # _RefusedTorchArgument, which the core refuses there, and _torch_refusals says why.
    refused = {}
    cache_batch_idx, cache_leftpad, block_table, alibi_slopes, rotary_cos, rotary_sin = (
        _beside_q(q, name, x, refused) for name, x in (
            ("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad),
            ("block_table", block_table), ("alibi_slopes", alibi_slopes),
            ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)))
    if cache_seqlens is None:
        if k is not None and v is not None:  # one of them alone: the core names the other
            refused["cache_seqlens"] = None
            cache_seqlens = _RefusedTorchArgument()
        elif k_cache.dim() == 4 and (block_table is None or isinstance(block_table, torch.Tensor)
                                     and block_table.dim() == 2):
            cache_seqlens = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
        else:  # no capacity to read: the core refuses these shapes before it reads the lengths
            cache_seqlens = 0
    elif not _checks.is_integer(cache_seqlens):
        # flash-attn's two forms only (a NumPy array the core would take)
        cache_seqlens = _beside_q(q, "cache_seqlens", cache_seqlens, refused)
    _refuse_tensors_without_memory(
        q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table,
        alibi_slopes=alibi_slopes, rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    with torch.no_grad(), _bridge.core_scope(q.device) as (to_core, to_torch):
        def core(x):
            return to_core(x) if isinstance(x, torch.Tensor) else x

        # return_softmax_lse is checked by the core, as its return_lse, where the core checks
        # it (after q, the caches and the options; "False" is refused, not read as True).
        with _caller_names(_KVCACHE_NAMES), _torch_refusals(q, refused):
            result = cuflash.attention_with_kvcache(
                core(q), core(k_cache), core(v_cache), core(k), core(v),
                cache_seqlens=core(cache_seqlens), block_table=core(block_table),
                cache_batch_idx=core(cache_batch_idx), causal=causal, scale=softmax_scale,
                window=window_size, softcap=softcap, alibi_slopes=core(alibi_slopes),
                num_splits=num_splits, return_lse=return_softmax_lse,
                rotary_cos=core(rotary_cos), rotary_sin=core(rotary_sin),
                rotary_interleaved=rotary_interleaved, cache_leftpad=core(cache_leftpad))
        out, lse = (to_torch(x) for x in result) if return_softmax_lse else (to_torch(result),
                                                                             None)
    if k is not None:  # the caches were written through views: tell autograd, as torch's own
        # in-place operations do, so that a cache saved for a backward pass is not read changed
        for cache in (k_cache, v_cache):
            if not cache.is_inference():  # inference tensors have no version counter
                torch.autograd.graph.increment_version(cache)
    return (out, lse) if return_softmax_lse else out
