"""Numerical warnings of the NumPy path.

NumPy's own floating-point warnings ("overflow encountered in cast", "invalid value encountered
in matmul", ...) are switched off inside the NumPy path (``quiet``): they name a NumPy operation
deep inside cuflash, once per operation, and say nothing about the cause. Instead, after a call
on NumPy arrays, ``check_forward`` and ``check_backward`` look at the results: when they hold inf
or NaN although every input was finite, something overflowed, and one
``CuflashNumericalWarning`` says what and what to do about it. Inputs that already hold inf or
NaN give no warning: what they do is described in docs/api.md, "Numerical limits".

The GPU path is not checked: reading a flag back from the device would make every call wait for
the GPU (and break CUDA-graph capture), so results are never inspected there.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
import warnings

import numpy

__all__ = ["CuflashNumericalWarning", "check_backward", "check_forward", "check_rotated",
           "once_for", "quiet", "quiet_if_numpy"]

FLOAT16_MAX = 65504.0
FLOAT32_MAX = float(numpy.finfo(numpy.float32).max)  # about 3.4e38, also bfloat16's range

SEE = "see 'Numerical limits' in docs/api.md"


class CuflashNumericalWarning(RuntimeWarning):
    """A result of the NumPy path holds inf or NaN although its inputs were finite: an
    intermediate overflowed the range of its dtype. The message says which and what to do."""


def _errstate():
    # Underflow too: exp2 of very negative logits and casts of tiny values underflow by design.
    return numpy.errstate(all="ignore")


def quiet(function):
    """Run ``function`` with every NumPy floating-point warning off (results unchanged: only
    the reporting is), whatever the caller's ``numpy.seterr``."""

    @functools.wraps(function)
    def quietly(*args, **kwargs):
        with _errstate():
            return function(*args, **kwargs)

    return quietly


def quiet_if_numpy(xp):
    """``quiet`` as a context, for NumPy arrays only: a ``with`` block for code shared by both
    paths."""
    return _errstate() if xp is numpy else contextlib.nullcontext()


def _finite(x) -> bool:
    return bool(numpy.isfinite(x).all())


def _valid_lse(lse, seen=None) -> bool:
    """lse of an empty row is -inf; NaN or +inf come from non-finite inputs or an overflow, and
    so does -inf in a row that sees keys (``seen``: bool, broadcastable to ``lse``, True for
    those rows; ``None`` where that is not known): every logit of the row overflowed to -inf."""
    bad = numpy.isnan(lse) | numpy.isposinf(lse)
    if seen is not None:
        bad |= numpy.isneginf(lse) & seen
    return not bool(bad.any())


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _machinery() -> tuple[str, ...]:
    """The folders of the code between a user's call and the check: cuflash's, and torch's
    when loaded (cuflash.torch's operators run inside torch's autograd and dispatch frames)."""
    torch = sys.modules.get("torch")
    torch_file = getattr(torch, "__file__", None) if torch is not None else None
    if torch_file is None:
        return (_PACKAGE,)
    return _PACKAGE, os.path.dirname(os.path.abspath(torch_file)) + os.sep


def _outside_cuflash() -> int:
    """The ``stacklevel`` of the first frame outside cuflash (and the torch machinery its
    operators run in), counted from the function that calls ``warnings.warn`` (which is
    ``_warn``): the user's call, however deep inside cuflash the check runs."""
    inside = _machinery()
    level, frame = 1, sys._getframe(1)  # _warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame = frame.f_back
        level += 1
    return level


# While ``once_for`` runs: the messages held back so far (their text after the caller's name).
_held: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "cuflash_held_warnings", default=None)


def _warn(caller: str, text: str) -> None:
    held = _held.get()
    if held is not None:
        held.append(text)
        return
    warnings.warn(f"{caller}: {text}", CuflashNumericalWarning, stacklevel=_outside_cuflash())


class once_for:  # lower case: used as a context manager, like contextlib's
    """Hold back the checks' warnings inside the block and give each distinct one once at its
    end, named after ``caller``: for a public function that runs ``cuflash.attention`` many times
    (the KV cache's rows), so that one overflow cause warns once, under the name the user
    called. A class, not a generator: contextlib's frame would stand between the warning and
    the user's line."""

    def __init__(self, caller: str):
        self.caller = caller

    def __enter__(self):
        self.token = _held.set([])

    def __exit__(self, *exc_info):
        texts = _held.get()
        _held.reset(self.token)
        for text in dict.fromkeys(texts):
            _warn(self.caller, text)
        return False


def _names(names) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def check_forward(out, lse, inputs, caller: str = "cuflash.attention", seen=None) -> None:
    """Warn once, under the name of the public function ``caller``, if ``out`` (or ``lse``) of a
    NumPy forward pass is not finite although q, k and v (``inputs``) are; ``seen`` as for
    ``_valid_lse``."""
    if _finite(out) and _valid_lse(lse, seen):
        return
    if not all(_finite(x) for x in inputs):
        return
    if not _valid_lse(lse, seen):
        what = ("the logits scale·q·kᵀ (after softcap and ALiBi), computed in float32, "
                f"overflowed float32 (|x| > {FLOAT32_MAX:.3g}). Scale q, k or `scale` down")
    elif numpy.dtype(out.dtype) == numpy.float16:
        # An average of v's rows fits float16 unless dropout's 1 / (1 − p) lifts it past.
        what = (f"the output, an average of the rows of v times dropout's 1 / (1 − p), exceeded "
                f"{FLOAT16_MAX:g}, the largest float16. Scale v down, or use bfloat16 or float32")
    else:
        what = ("the weighted sum of the rows of v, accumulated in float32, overflowed float32 "
                f"(|x| > {FLOAT32_MAX:.3g}). Scale v down")
    _warn(caller, f"{_spoiled_forward_result(out, lse)} although the inputs are finite: "
          f"{what} ({SEE})")


def check_rotated(rotated, inputs, caller: str) -> None:
    """Warn once, under the name of the public function ``caller``, if q or k rotated by a
    rotary embedding (``rotated``, NumPy) hold inf or NaN although q, k and the tables
    (``inputs``) are finite: the rotation, float32 arithmetic rounded to the inputs' dtype,
    overflowed. The attention that follows does not warn of it, its inputs being those arrays."""
    if all(_finite(x) for x in rotated) or not all(_finite(x) for x in inputs):
        return
    dtype = numpy.dtype(rotated[0].dtype).name
    _warn(caller, f"the rotary embedding of q or k holds inf or NaN although q, k and the tables "
          f"are finite: x·cos − y·sin or x·sin + y·cos, computed in float32 and rounded to "
          f"{dtype}, exceeded {dtype}'s range. Scale q and k down, or use bfloat16 or float32 "
          f"({SEE})")


def _spoiled_forward_result(out, lse) -> str:
    """Which result of a forward pass the overflow shows in: logits that all overflowed to
    -inf leave their row's output 0, which is finite, and only its lse says so."""
    if not _finite(out):
        return "the output holds inf or NaN"
    if numpy.isnan(lse).any() or numpy.isposinf(lse).any():
        return "lse holds inf or NaN"
    return "lse is -inf in rows that see keys (they read as rows without any: output 0)"


def check_backward(grads, inputs, lse, dtype, caller: str = "cuflash.attention_backward") -> None:
    """Warn once, under the name of the public function ``caller``, if a gradient of a NumPy
    backward pass is not finite although its inputs (``inputs``: dout, q, k, v, out; ``lse`` may
    be -inf for empty rows) are."""
    bad = [name for name, g in zip(("dq", "dk", "dv"), grads) if not _finite(g)]
    if not bad:
        return
    if not (all(_finite(x) for x in inputs) and _valid_lse(lse)):
        return
    if numpy.dtype(dtype) == numpy.float16:
        # Gradients in float16 can overflow themselves; float32 ones (grad_dtype) cannot here.
        half = any(g.dtype == numpy.float16 for name, g in zip(("dq", "dk", "dv"), grads)
                   if name in bad)
        if bad == ["dv"] and half:
            what = f"dv = Pᵀ·dO exceeded {FLOAT16_MAX:g}, the largest float16"
        else:
            what = ("in float16, dS = P∘(dP − Δ), rounded to float16 like the GPU kernels' "
                    "tensor-core operands"
                    + (f", or a gradient exceeded {FLOAT16_MAX:g}, the largest float16"
                       if half else "")
                    + " (dS_ij = P_ij·dO_i·(v_j − o_i) becomes inf once |dS_ij| ≥ 65520)")
        what += ". Use bfloat16 or float32 inputs (float32's range), or scale v or dout down"
    else:
        what = (f"an intermediate (the logits, dP = dO·vᵀ, dS or a sum of them) exceeded "
                f"float32's range (|x| > {FLOAT32_MAX:.3g}). Scale the inputs down")
    _warn(caller,
          f"{_names(bad)} hold{'s' if len(bad) == 1 else ''} inf or NaN although dout, q, k, "
          f"v, out and lse are finite: {what} ({SEE})")
