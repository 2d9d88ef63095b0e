"""Validation and shape normalisation shared by the CPU and GPU paths.

Everything here raises ``TypeError`` / ``ValueError`` whose message says what was given and what
is required. Nothing here imports CuPy unless it is handed a CuPy array (which means CuPy is
already imported).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy

from . import _dropout
from ._mask import LOG2E as _LOG2E

SUPPORTED_DTYPES = (numpy.dtype(numpy.float16), numpy.dtype(ml_dtypes.bfloat16),
                    numpy.dtype(numpy.float32))
_SUPPORTED_NAMES = "float16, bfloat16 (ml_dtypes.bfloat16) or float32"

# The kernels use scale, scale·log2 e, scale / softcap, softcap·log2 e and slope·log2 e as float32
# numbers: each must be a normal float32 number (slopes: finite).
_F32_MAX = float(numpy.finfo(numpy.float32).max)
_F32_TINY = float(numpy.finfo(numpy.float32).tiny)


# ----------------------------------------------------------------------------- array modules

def array_module(x: Any, name: str = "array"):
    """Return ``numpy`` or ``cupy`` for an array of that module; ``TypeError`` for anything else.

    A CuPy array's class lives in the ``cupy`` package, which is then already imported: CuPy is
    never imported here, so this works where CuPy is not installed.
    """
    if isinstance(x, numpy.ndarray):
        _refuse_subclass(x, name)
        return numpy
    if type(x).__module__.partition(".")[0] == "cupy" and "cupy" in sys.modules:
        cupy = sys.modules["cupy"]
        if isinstance(x, cupy.ndarray):
            return cupy
    raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, got {_type_name(x)}")


def refuse_masked_array(x: Any, name: str, instead: str = "") -> None:
    """A ``numpy.ma.MaskedArray`` is refused (``TypeError``): reading it as an array drops its
    mask. ``instead`` ends the message with what to do about the masked entries. numpy.ma is
    not imported for this: a masked array means it already is."""
    ma = sys.modules.get("numpy.ma")
    if ma is not None and isinstance(x, ma.MaskedArray):
        raise TypeError(f"{name} is a numpy.ma.MaskedArray: its mask would be ignored; pass a "
                        f"plain array ({name}.filled(...) or numpy.asarray({name})){instead}")


# The arrays whose masked entries an attention mask can express (masked keys, values or queries);
# for others (offsets, slopes, outputs) a masked array is refused without that hint.
_ATTENDED = frozenset(("q", "k", "v", "k_cache", "v_cache"))


def _refuse_subclass(x: numpy.ndarray, name: str) -> None:
    """NumPy subclasses whose meaning the computation would drop are refused."""
    refuse_masked_array(x, name, " and express masking with causal, window or an exact mask "
                                 "(mask=cuflash.sparse.ExactMask)" if name in _ATTENDED else "")
    if isinstance(x, numpy.matrix):
        raise TypeError(f"{name} is a numpy.matrix, which is always 2-D and multiplies with *; "
                        f"pass numpy.asarray({name})")


def _type_name(x: Any) -> str:
    cls = type(x)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _device_id(x: Any) -> int | None:
    """CUDA device of a CuPy array, ``None`` for NumPy."""
    return None if isinstance(x, numpy.ndarray) else x.device.id


def common_module(arrays: dict[str, Any]):
    """The array module shared by all ``arrays`` (name → array), checking devices for CuPy."""
    modules = {name: array_module(x, name) for name, x in arrays.items()}
    names = list(arrays)
    first = names[0]
    for name in names[1:]:
        if modules[name] is not modules[first]:
            raise TypeError(
                f"{first} and {name} must both be NumPy arrays or both be CuPy arrays, got "
                f"{first}: {_type_name(arrays[first])} and {name}: {_type_name(arrays[name])}")
    xp = modules[first]
    if xp is not numpy:
        devices = {name: _device_id(x) for name, x in arrays.items()}
        for name in names[1:]:
            if devices[name] != devices[first]:
                raise ValueError(
                    f"all arrays must be on one CUDA device, got {first} on device "
                    f"{devices[first]} and {name} on device {devices[name]}")
    return xp


_NO_SWITCH = contextlib.nullcontext()  # reusable: holds no state


def device_context(x: Any):
    """Context manager that makes ``x``'s device current (a no-op for NumPy arrays and for
    arrays on the current device: entering CuPy's ``Device`` costs about 1 µs even then, a
    fifth of a small call's launch)."""
    xp = array_module(x)
    if xp is numpy or x.data.device_id == xp.cuda.runtime.getDevice():
        return _NO_SWITCH
    return x.device


# ----------------------------------------------------------------------------- scalar options

def is_integer(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool: what every integer option takes."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, numpy.bool_))


def check_bool(value: Any, name: str) -> bool:
    if isinstance(value, (bool, numpy.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    """An integer option (Python or NumPy, not a bool) of at least ``minimum`` (and at most
    ``maximum``), as an int."""
    if not is_integer(value):
        raise TypeError(f"{name} must be an int, got {_show(value)} of type {_type_name(value)}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}, got {value}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_grad_dtype(grad_dtype: Any, dtype: numpy.dtype) -> bool:
    """Whether a backward call stores float32 gradients: ``grad_dtype`` is None or the inputs'
    dtype (gradients in that dtype), or float32."""
    if grad_dtype is None:
        return False
    no_dtype = TypeError(f"grad_dtype must be None, a dtype or a dtype's name, got "
                         f"{_show(grad_dtype)}")
    if isinstance(grad_dtype, numpy.generic):  # a number, which numpy.dtype() reads as its dtype
        raise no_dtype
    try:
        wanted = numpy.dtype(grad_dtype)
    except TypeError:
        if not isinstance(grad_dtype, str):  # not a dtype at all; an unknown name is a bad value
            raise no_dtype from None
        wanted = None
    if wanted == dtype:
        return False
    if wanted == numpy.float32:
        return True
    raise ValueError(f"grad_dtype must be None, the inputs' dtype ({dtype}) or float32, got "
                     f"{_show(grad_dtype)}")


def _show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, shortened when huge (a 400-digit integer)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 4:]}"


def _real(value: Any, name: str, kind: str, allowed: str) -> float:
    """A real number (not a bool) as a Python float: ``TypeError`` (saying ``kind``) for anything
    else, ``ValueError`` (saying ``allowed``) for a number that overflows float."""
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {kind}, got {_show(value)} of type {_type_name(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {allowed}, got {_show(value)}, which does not fit in a "
                         f"float") from None


def _normal_f32(value: float) -> bool:
    return _F32_TINY <= abs(value) <= _F32_MAX


def holds_bool(value: Any) -> bool:
    """Whether a list or tuple holds a bool, which ``numpy.asarray`` would read as 0 or 1 beside
    integers: sequences of integers refuse it, as integer arguments do."""
    return isinstance(value, (list, tuple)) and any(
        isinstance(item, (bool, numpy.bool_)) for item in value)


def integer_sequence(name: str, value: Any, description: str) -> numpy.ndarray:
    """``value`` as a 1-D NumPy array of integers, holding them exactly: an integer dtype, or
    Python ints (dtype object) where NumPy would read them as float64 or as objects (integers
    past int64 beside others, or past uint64). TypeError ``{name} must be {description}``
    otherwise, for bools too (NumPy reads them as 0 and 1).

    Range checks belong on this array, before any cast to int64, which would wrap integers
    past it round into range."""
    array = numpy.asarray(value)
    items = value if isinstance(value, (list, tuple)) else array
    exact = array.ndim == 1 and array.dtype.kind in "fO" and all(
        isinstance(item, numbers.Integral) and not isinstance(item, (bool, numpy.bool_))
        for item in items)
    if exact and array.size:
        array = numpy.array([int(item) for item in items], dtype=object)
    integers = array.size == 0 or exact or numpy.issubdtype(array.dtype, numpy.integer)
    if array.ndim != 1 or not integers or holds_bool(value):
        raise TypeError(f"{name} must be {description}, got {value!r}")
    return array


def query_rows(rows: Any, nq: int) -> numpy.ndarray:
    """Query rows as a 1-D NumPy int64 array (all ``nq`` by default), each in ``[0, nq)``: the
    rows a reference or an exact mask's dense rows are asked for (no negative indices, which
    would pick other rows without a word), and integers only (a float row would be truncated,
    booleans read as rows 0 and 1 rather than as a selection); an empty sequence is no rows."""
    if rows is None:
        return numpy.arange(nq)
    allowed = f"a 1-D sequence of query rows in [0, {nq})"
    if numpy.ndim(rows) != 1:
        raise ValueError(f"rows must be {allowed}, got {_show(rows)}")
    given = integer_sequence("rows", rows, f"a 1-D sequence of integer query rows in [0, {nq})")
    outside = given[(given < 0) | (given >= nq)]
    if outside.size:
        raise ValueError(f"rows must be {allowed}, got {outside[:5].tolist()}")
    return given.astype(numpy.int64)


def check_scale(scale: Any, head_dim: int) -> float:
    """``scale`` as a float: ``None`` gives ``1 / sqrt(head_dim)``.

    Finiteness is tested by comparisons, not ``math.isfinite``, here and in ``check_softcap``:
    under ``torch.compile(dynamic=True)`` cuflash.torch passes symbolic floats, which compare
    (a guard) but which ``math.isfinite`` cannot take."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    value = _real(scale, "scale", "a real number or None", "finite and positive")
    if not (-math.inf < value < math.inf and value > 0):
        raise ValueError(f"scale must be finite and positive, got {_show(scale)}")
    if not (_normal_f32(value) and _normal_f32(value * _LOG2E)):
        raise ValueError(
            f"scale must be finite and positive, got {_show(scale)}, outside the range the "
            f"computation supports: scale and scale·log2(e) are float32, so {_F32_TINY:.3g} <= "
            f"scale <= {_F32_MAX / _LOG2E:.3g}")
    return value


def check_window(window: Any) -> tuple[int, int]:
    """``(left, right)`` as two Python ints, each -1 (unbounded) or ≥ 0."""
    allowed = "a pair (left, right) of integers, each -1 (unbounded) or >= 0"
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be {allowed}, got {_show(window)}")
    for side, value in zip(("left", "right"), window):
        if not is_integer(value):
            raise TypeError(f"window must be {allowed}, got {_show(window)} ({side} is of type "
                            f"{_type_name(value)})")
        if value < -1:
            raise ValueError(f"window must be {allowed}, got {_show(window)} ({side} = {value})")
    return int(window[0]), int(window[1])


def check_softcap(softcap: Any, scale: float) -> float:
    """``softcap`` as a float: 0.0 (off) or positive, with ``scale / softcap`` and
    ``softcap·log2 e`` representable in float32 (the kernels use both)."""
    allowed = "0.0 (off) or a finite positive real number"
    value = _real(softcap, "softcap", allowed, allowed)
    if not -math.inf < value < math.inf or value < 0:
        raise ValueError(f"softcap must be {allowed}, got {_show(softcap)}")
    if value == 0:
        return 0.0
    if not (_normal_f32(scale / value) and _normal_f32(value * _LOG2E)):
        raise ValueError(
            f"softcap must be {allowed}, got {_show(softcap)}, outside the range the computation "
            f"supports with scale={scale:g}: scale / softcap and softcap·log2(e) are float32, so "
            f"softcap must lie in [{max(scale / _F32_MAX, _F32_TINY / _LOG2E):.3g}, "
            f"{min(scale / _F32_TINY, _F32_MAX / _LOG2E):.3g}]")
    return value


# What to do with an ExactMask given as block_mask=, where the call also takes mask=.
EXACT_MASK_AS_MASK = "an ExactMask is not coarsened to blocks: pass it as mask="


def check_block_mask(block_mask: Any, nq: int, nk: int, hq: int, *,
                     exact_mask_hint: str = EXACT_MASK_AS_MASK) -> None:
    """``block_mask`` is ``None`` or a ``cuflash.sparse.BlockMask`` for this problem.
    ``exact_mask_hint`` says what to do instead with an ExactMask: a call that has no ``mask=``
    argument gives a hint of its own."""
    if block_mask is None:
        return
    from .sparse import BlockMask  # scipy is imported only when a mask is given
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a cuflash.sparse.BlockMask or None, got "
                        f"{_type_name(block_mask)}"
                        f"{_block_mask_hint(block_mask, exact_mask_hint)}")
    block_mask.check_compatible(nq, nk, hq)


def _from_scipy(x: Any) -> bool:
    """Whether ``x`` is one of scipy's objects (a sparse pattern), without importing scipy."""
    return type(x).__module__.partition(".")[0] == "scipy"


def _block_mask_hint(block_mask: Any, exact_mask_hint: str) -> str:
    """What to do instead with a ``block_mask=`` that is no BlockMask ("" when nothing fits)."""
    from .sparse import ExactMask
    if isinstance(block_mask, ExactMask):
        return f" ({exact_mask_hint})"
    if _from_scipy(block_mask) or (isinstance(block_mask, (list, tuple)) and block_mask
                                   and _from_scipy(block_mask[0])):
        return (" (build one with cuflash.sparse.BlockMask.from_scipy(pattern, level=...), "
                "level 'block' for a pattern of blocks, 'element' for one of query-key pairs)")
    if hasattr(block_mask, "shape"):
        return (" (build one with cuflash.sparse.BlockMask.from_dense(array, block_size=...) "
                "of a block layout)")
    return ""


def check_exact_mask(mask: Any, block_mask: Any, nq: int, nk: int, hq: int) -> None:
    """``mask`` is ``None`` or a ``cuflash.sparse.ExactMask`` for this problem, and not given
    together with ``block_mask``."""
    if mask is None:
        return
    from .sparse import ExactMask
    if not isinstance(mask, ExactMask):
        raise TypeError(f"mask must be a cuflash.sparse.ExactMask or None, got "
                        f"{_type_name(mask)}{mask_hint(mask)}")
    if block_mask is not None:
        raise ValueError("give mask= (exact) or block_mask= (block-sparse), not both; for "
                         "block-sparse attention restricted to a pattern, build one ExactMask "
                         "of the pairs both allow")
    mask.check_compatible(nq, nk, hq)


def mask_hint(mask: Any) -> str:
    """What to do instead with a ``mask=`` that is no ExactMask ("" when nothing fits)."""
    from .sparse import BlockMask
    if isinstance(mask, BlockMask):
        return " (a BlockMask is block-sparse: pass it as block_mask=)"
    if _from_scipy(mask):
        return " (build one with cuflash.sparse.ExactMask.from_scipy(pattern))"
    if isinstance(mask, (list, tuple)) and mask:  # one pattern per head
        first = mask[0]
        if _from_scipy(first):
            return " (build one from per-head patterns with cuflash.sparse.ExactMask.from_scipy(patterns))"
        if hasattr(first, "shape"):
            return " (build one with cuflash.sparse.ExactMask.from_dense of the (H, Nq, Nk) array)"
    if hasattr(mask, "shape"):
        return " (build one with cuflash.sparse.ExactMask.from_dense(array))"
    return ""


def _check_beside_inputs(x: Any, name: str, what: str, xp, device_of: Any) -> None:
    """``x`` must be an array of the inputs' module ``xp`` on the device of ``device_of``:
    ``TypeError`` saying ``name`` must be ``what`` otherwise, ``ValueError`` for another
    device."""
    try:
        module = array_module(x, name)
    except TypeError as error:
        if isinstance(x, numpy.ndarray):  # a refused NumPy subclass: keep its reason
            raise
        raise TypeError(f"{name} must be {what}, got {_show(x)} of type {_type_name(x)}"
                        ) from error
    if module is not xp:
        where = "in host memory" if xp is numpy else f"on device {_device_id(device_of)}"
        got = "in host memory" if module is numpy else f"on device {_device_id(x)}"
        raise TypeError(f"{name} must be {what} {where} like q, got {_type_name(x)} {got}")
    if _device_id(x) != _device_id(device_of):
        raise ValueError(f"{name} must be on device {_device_id(device_of)} like q, got device "
                         f"{_device_id(x)}")


def check_alibi(slopes: Any, shapes: "Shapes", xp, device_of: Any):
    """ALiBi slopes as the back ends read them: ``None``, or a new C-contiguous float32 array
    ``(B, Hq)`` of ``xp`` on the device of ``device_of`` (call it with that device current),
    once ``check_alibi_slopes`` accepts them."""
    if slopes is None:
        return None
    check_alibi_slopes(slopes, shapes, xp, device_of)
    return alibi_copy(slopes, shapes, xp)


def check_alibi_slopes(slopes: Any, shapes: "Shapes", xp, device_of: Any) -> None:
    """The rule for ALiBi slopes, without the back ends' copy (callers that pass them on).

    ``slopes`` must be a float32 array of ``xp`` on that device, of shape ``(Hq,)`` or
    ``(..., Hq)`` whose leading axes broadcast to the batch axes, with finite values
    (``|slope| ≤ float32 max / log2 e``: the kernels use ``slope·log2 e``; checked for NumPy
    slopes, never for CuPy ones, whose values stay on the device).
    """
    _check_beside_inputs(slopes, "alibi_slopes",
                         f"a float32 {xp.__name__}.ndarray of shape (Hq,) or (..., Hq)", xp,
                         device_of)
    if slopes.dtype != numpy.float32:
        raise TypeError(f"alibi_slopes must have dtype float32, got {slopes.dtype}")
    batch, hq = shapes.batch, shapes.hq
    lead = tuple(slopes.shape[:-1])
    if (slopes.ndim == 0 or slopes.shape[-1] != hq or len(lead) > len(batch)
            or any(n not in (1, m) for n, m in zip(lead[::-1], batch[::-1]))):
        raise ValueError(
            f"alibi_slopes must have shape (Hq,) = ({hq},) or (..., {hq}) with leading axes that "
            f"broadcast to the batch axes {batch}, got shape {tuple(slopes.shape)}")
    bound = _F32_MAX / _LOG2E
    # Values are checked on the host only: reading device values back would make every call
    # wait for the GPU and could not be captured in a CUDA graph. Non-finite slopes on the GPU
    # give non-finite outputs (visible, not silent); docs/api.md says so.
    finite = xp.abs(slopes) <= bound if xp is numpy else None  # False for NaN and ±inf
    if finite is not None and not bool(finite.all()):
        bad = slopes[~finite].ravel()[:3]
        raise ValueError(f"alibi_slopes must be finite, with |slope| <= {bound:.3g}, got "
                         f"{', '.join(repr(float(x)) for x in bad)}")


def alibi_copy(slopes: Any, shapes: "Shapes", xp):
    """Checked ``slopes`` as the back ends read them: a new C-contiguous float32 ``(B, Hq)``
    array (call it with the slopes' device current)."""
    full = xp.broadcast_to(slopes, shapes.batch + (shapes.hq,)).reshape(shapes.b, shapes.hq)
    return xp.array(full, dtype=numpy.float32, order="C", copy=True)


# ----------------------------------------------------------------------------- shapes and dtypes

@dataclass(frozen=True)
class Shapes:
    """The sizes of one attention problem (``batch`` is the broadcast of the leading axes).

    ``heads_axis`` is False when q, k and v are all 2-D ``(N, D)`` matrices: one head, and the
    outputs have no head axis either (``out`` ``(Nq, Dv)``, ``lse`` ``(Nq,)``).
    """
    batch: tuple[int, ...]
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    dv: int
    heads_axis: bool = True

    @property
    def b(self) -> int:
        return math.prod(self.batch)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The shape of ``out`` as the caller sees it."""
        heads = (self.hq,) if self.heads_axis else ()
        return self.batch + heads + (self.nq, self.dv)

    @property
    def lse_shape(self) -> tuple[int, ...]:
        """The shape of ``lse`` as the caller sees it."""
        heads = (self.hq,) if self.heads_axis else ()
        return self.batch + heads + (self.nq,)



def _check_qk_pairing(q, k, d: int, dk: int, hq: int, hkv: int) -> None:
    """q and k share the head dimension, and the query heads split evenly into the key/value
    heads' groups (dense and packed calls alike)."""
    if dk != d:
        raise ValueError(f"q and k must have the same head dimension (last axis), got "
                         f"q {tuple(q.shape)} and k {tuple(k.shape)}")
    if hq % hkv:
        raise ValueError(f"the number of query heads must be a multiple of the number of key/value "
                         f"heads, got {hq} query heads (q {tuple(q.shape)}) and {hkv} key/value "
                         f"heads (k {tuple(k.shape)})")

def attention_shapes(q: Any, k: Any, v: Any) -> Shapes:
    """Check q ``(..., Hq, Nq, D)``, k ``(..., Hkv, Nk, D)``, v ``(..., Hkv, Nk, Dv)``.

    As in ``numpy.matmul`` the last two axes are the matrix: a 2-D input ``(N, D)`` is one head,
    ``(1, N, D)``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., seq_len, head_dim), got shape "
                f"{tuple(x.shape)}")
        if 0 in x.shape:
            raise ValueError(f"{name} must not have an empty axis, got shape {tuple(x.shape)}")
    qs, ks, vs = (_with_head_axis_shape(x.shape) for x in (q, k, v))
    hq, nq, d = qs[-3:]
    hkv, nk, dk = ks[-3:]
    hv, nv, dv = vs[-3:]
    _check_qk_pairing(q, k, d, dk, hq, hkv)
    if (hv, nv) != (hkv, nk):
        raise ValueError(f"k and v must have the same number of heads and keys (axes -3, -2), "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    try:
        batch = numpy.broadcast_shapes(qs[:-3], ks[:-3], vs[:-3])
    except ValueError:
        raise ValueError(f"the leading axes of q, k and v must broadcast together, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}") from None
    heads_axis = max(q.ndim, k.ndim, v.ndim) > 2
    return Shapes(tuple(batch), hq, hkv, nq, nk, d, dv, heads_axis)


def _with_head_axis_shape(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    return shape if len(shape) >= 3 else (1,) + shape


def with_head_axis(x: Any) -> Any:
    """``x`` itself, or a ``(1, N, D)`` view of a 2-D ``x``."""
    return x if x.ndim >= 3 else x[None]


def check_dtypes(arrays: dict[str, Any]) -> numpy.dtype:
    """All ``arrays`` must share one supported dtype; return it."""
    names = list(arrays)
    dtype = arrays[names[0]].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{names[0]} has dtype {dtype}; supported dtypes are {_SUPPORTED_NAMES}")
    for name in names[1:]:
        if arrays[name].dtype != dtype:
            raise TypeError(f"{names[0]} and {name} must have the same dtype, got "
                            f"{names[0]}: {dtype} and {name}: {arrays[name].dtype}")
    return dtype


def check_like(x: Any, name: str, shape: tuple[int, ...], dtype: numpy.dtype | None, xp,
               device_of: Any) -> None:
    """``x`` must be an array of ``xp`` on the device of ``device_of`` with this shape and dtype
    (``None``: any dtype)."""
    try:
        got = array_module(x, name)
    except TypeError:
        if isinstance(x, numpy.ndarray):  # a refused NumPy subclass: keep its reason
            raise
        got = None
    if got is not xp:
        raise TypeError(f"{name} must be a {xp.__name__}.ndarray like q, got {_type_name(x)}")
    if _device_id(x) != _device_id(device_of):
        raise ValueError(f"{name} must be on device {_device_id(device_of)} like q, got device "
                         f"{_device_id(x)}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")


# The arguments of the gradients of q, k and v, and the arrays of a backward call that a given
# gradient must not overlap (besides the gradients given before it), in the order checked.
GRAD_NAMES = ("dq", "dk", "dv")
GRAD_APART_FROM = ("q", "k", "v", "dout", "out", "lse")


def check_out(out: Any, shape: tuple[int, ...], dtype: numpy.dtype, xp, inputs: dict[str, Any],
              name: str = "out") -> None:
    """``out`` (the argument ``name``: an output written in place, ``out=`` or a gradient): a
    writable array of exactly this shape and dtype, on the device of the first of ``inputs``
    (name → array), apart from every one of them."""
    check_like(out, name, shape, dtype, xp, device_of=next(iter(inputs.values())))
    if xp is numpy and not out.flags.writeable:
        raise ValueError(f"{name} must be writable, got a read-only array")
    if out.size and has_overlapping_elements(tuple(out.shape), tuple(out.strides), out.itemsize):
        raise ValueError(f"{name} must not have overlapping elements, got strides {out.strides} "
                         f"for shape {tuple(out.shape)}")
    for other, x in inputs.items():
        if overlaps(out, x, xp):
            raise ValueError(f"{name} must not share memory with {other}")


def with_seed_array(arrays: dict[str, Any], seed_array: Any) -> dict[str, Any]:
    """``arrays`` (name → array, those an output must keep apart from, as ``check_out`` takes
    them) with a call's CuPy seed array (its spec's ``dropout_state``), which the kernels read
    while they write out= and given gradients; ``arrays`` itself without one."""
    return arrays if seed_array is None else dict(arrays, dropout_seed=seed_array)


# Elements whose offsets ``has_overlapping_elements`` lists at most (64 MiB of int64): beyond it,
# an interleaved layout's elements are taken not to overlap (listing a KV cache's billions of
# offsets would exhaust the host's memory).
MAX_LISTED_ELEMENTS = 1 << 23


def has_overlapping_elements(shape: tuple[int, ...], strides: tuple[int, ...],
                             itemsize: int) -> bool:
    """Whether two elements of a layout share a byte (a stride of 0 along an axis of more than
    one element, or rows whose stride is shorter than a row). Nested layouts, each axis stepping
    past the whole extent of the axes with smaller strides, are told apart from their strides;
    others (interleaved axes) by listing every element's offset, up to MAX_LISTED_ELEMENTS
    elements (a stride of 0 is told at any size)."""
    if any(s == 0 and n > 1 for n, s in zip(shape, strides)):
        return True
    extent = itemsize  # bytes spanned by the axes taken so far
    for stride, n in sorted((abs(s), n) for n, s in zip(shape, strides) if n > 1):
        if stride < extent:
            break
        extent += stride * (n - 1)
    else:
        return False
    if math.prod(shape) > MAX_LISTED_ELEMENTS:
        return False
    offsets = numpy.zeros(1, numpy.int64)
    for n, stride in zip(shape, strides):
        offsets = (offsets[:, None] + stride * numpy.arange(n, dtype=numpy.int64)).ravel()
    return bool((numpy.diff(numpy.sort(offsets)) < itemsize).any())


def overlaps(a: Any, b: Any, xp) -> bool:
    """Whether two arrays of module ``xp`` may share memory (NumPy: exactly where that is cheap
    to tell; CuPy: their byte ranges meet)."""
    if xp is numpy:
        try:
            return bool(numpy.shares_memory(a, b, max_work=10_000))
        except numpy.exceptions.TooHardError:
            return bool(numpy.may_share_memory(a, b))
    # An exact test would materialise every element's address; the memory-range test is cheap.
    return ranges_overlap(a.data.ptr, byte_range(a), b.data.ptr, byte_range(b))


def byte_range(x: Any) -> tuple[int, int]:
    """``(low, high)``: the bytes an array can touch are ``[ptr + low, ptr + high)``."""
    low = sum(s * (n - 1) for n, s in zip(x.shape, x.strides) if s < 0)
    high = sum(s * (n - 1) for n, s in zip(x.shape, x.strides) if s > 0) + x.itemsize
    return low, high


def ranges_overlap(a_ptr: int, a_range: tuple[int, int], b_ptr: int,
                   b_range: tuple[int, int]) -> bool:
    """Whether two arrays' byte ranges (``byte_range``, from their data pointers) meet."""
    return a_ptr + a_range[0] < b_ptr + b_range[1] and b_ptr + b_range[0] < a_ptr + a_range[1]


# ----------------------------------------------------------------------------- 4-D views

def _leading_stride(shape: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """Stride of the leading axes merged into one, or ``None`` when they cannot be merged."""
    axes = [(n, s) for n, s in zip(shape, strides) if n != 1]
    for (_, outer), (n_inner, inner) in zip(axes, axes[1:]):
        if outer != n_inner * inner:
            return None
    return axes[-1][1] if axes else 0


def kernel_ready(x: Any) -> bool:
    """Last axis contiguous, other strides non-negative whole elements, and (on the GPU) the
    first element at an address its loads can take (a whole number of elements)."""
    item = x.itemsize
    return (x.strides[-1] == item
            and all(s >= 0 and s % item == 0 for s in x.strides[:-1])
            and (isinstance(x, numpy.ndarray) or x.data.ptr % item == 0))


def kernel_readable(x: Any) -> Any:
    """``x`` itself when the kernels can read it in place (``kernel_ready``), else a
    C-contiguous copy."""
    return x if kernel_ready(x) else array_module(x).ascontiguousarray(x)


def _batch_view(x: Any, b: int, stride: int, xp) -> Any:
    """View of ``x`` with its leading axes replaced by one axis of ``b`` elements and ``stride``."""
    shape = (b,) + tuple(x.shape[-3:])
    strides = (stride,) + tuple(x.strides[-3:])
    if xp is numpy:
        return numpy.lib.stride_tricks.as_strided(x, shape, strides,
                                                  writeable=x.flags.writeable)
    return xp.lib.stride_tricks.as_strided(x, shape, strides)


def as_4d(x: Any, batch: tuple[int, ...], xp, *, copy: bool = True) -> Any:
    """``x`` broadcast to ``batch`` and viewed as ``(B, H, N, D)``; copied only when it must be.

    Leading axes are merged without a copy when their strides allow it (a batch broadcast gives
    stride 0). Anything whose last axis is not contiguous, or whose strides are negative, is
    copied to a C-contiguous array. ``copy=False``: where it would be copied, a new uninitialised
    array of the copy's layout instead (for a plan, which runs nothing).
    """
    view = view_4d(x, batch, xp)
    if view is not None:
        return view
    x = with_head_axis(x)
    shape = batch + tuple(x.shape[-3:])
    full = xp.ascontiguousarray(xp.broadcast_to(x, shape)) if copy else xp.empty(shape, x.dtype)
    stride = _leading_stride(full.shape[:-3], full.strides[:-3])
    return _batch_view(full, math.prod(batch), stride, xp)


def view_4d(x: Any, batch: tuple[int, ...], xp) -> Any:
    """``as_4d(x, batch, xp)`` when it is a view of ``x`` (same data pointer), else ``None``."""
    x = with_head_axis(x)
    full = xp.broadcast_to(x, batch + tuple(x.shape[-3:]))
    stride = _leading_stride(full.shape[:-3], full.strides[:-3])
    if stride is None or not kernel_ready(full):
        return None
    return _batch_view(full, math.prod(batch), stride, xp)


def writable_4d(out: Any, b: int):
    """A 4-D view through which a back end can write into ``out``, or ``None`` if it has none."""
    out = with_head_axis(out)
    stride = _leading_stride(out.shape[:-3], out.strides[:-3])
    if stride is None or not kernel_ready(out):
        return None
    return _batch_view(out, b, stride, array_module(out))


def reduce_to_shape(g: Any, shape: tuple[int, ...], xp) -> Any:
    """Sum a gradient computed for the broadcast shape back to an input's ``shape``.

    Sums accumulate in float32 (or wider) and the result keeps ``g``'s dtype.
    """
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    acc = numpy.promote_types(g.dtype, numpy.float32)
    return g.sum(axis=axes, dtype=acc).reshape(shape).astype(g.dtype, copy=False)


# ----------------------------------------------------------------------------- packed sequences

def varlen_shapes(q: Any, k: Any, v: Any, batch: int, max_q: int, max_k: int) -> Shapes:
    """Check packed q ``(total_q, Hq, D)``, k ``(total_k, Hkv, D)``, v ``(total_k, Hkv, Dv)``;
    the shapes of ``batch`` sequences of at most ``(max_q, max_k)`` rows (``cuflash._spec``'s
    ``VarlenLayout``). The row axes may be empty (every sequence empty), the others not."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name} must have 3 dimensions (total_rows, heads, head_dim) for "
                             f"packed sequences, got shape {tuple(x.shape)}")
        if 0 in x.shape[1:]:
            raise ValueError(f"{name} must have at least one head and a head_dim of at least 1, "
                             f"got shape {tuple(x.shape)}")
    (total_q, hq, d), (total_k, hkv, dk), (nv, hv, dv) = q.shape, k.shape, v.shape
    _check_qk_pairing(q, k, d, dk, hq, hkv)
    if (nv, hv) != (total_k, hkv):
        raise ValueError(f"k and v must have the same number of rows and heads (axes 0, 1), got "
                         f"k {tuple(k.shape)} and v {tuple(v.shape)}")
    for name, total in (("q", total_q), ("k", total_k)):
        if total >= 2**31:
            raise ValueError(f"{name} has {total} rows; packed sequences hold at most 2**31 - 1")
    return Shapes((batch,), hq, hkv, max_q, max_k, d, dv)


def check_max_seqlen(value: Any, name: str) -> int:
    """``max_seqlen_q`` / ``max_seqlen_k``: a non-negative integer below 2**31."""
    return check_int(value, name, 0, 2**31 - 1)


class IndexDtypeError(TypeError, ValueError):
    """An index array (sequence offsets, cache lengths, a page table) whose dtype is not int32:
    a TypeError like every dtype error of the API, and a ValueError like the other errors of
    those arrays' values, so that either ``except`` clause catches it."""


def check_index_dtype(name: str, x: Any) -> None:
    """Index arrays are int32, flash-attn's dtype for offsets, lengths, tables and indices."""
    if x.dtype != numpy.int32:
        raise IndexDtypeError(f"{name} must have dtype int32 (flash-attn's index dtype), got "
                              f"{x.dtype}")


def check_offset_arrays(cu_q: Any, cu_k: Any, xp, device_of: Any) -> None:
    """``cu_seqlens_q`` / ``cu_seqlens_k``: 1-D int32 arrays of one length B + 1 ≥ 2, of the
    inputs' module (CuPy inputs also take NumPy offsets) and, on the GPU, on their device."""
    what = "a 1-D int32 array of B + 1 offsets"
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        try:
            module = array_module(cu, name)
        except TypeError as error:
            if isinstance(cu, numpy.ndarray):
                raise
            raise TypeError(f"{name} must be {what}, got {_type_name(cu)}") from error
        if xp is numpy and module is not numpy:
            raise TypeError(f"{name} must be a numpy.ndarray like q, got {_type_name(cu)} on "
                            f"device {_device_id(cu)}")
        if module is not numpy and _device_id(cu) != _device_id(device_of):
            raise ValueError(f"{name} must be on device {_device_id(device_of)} like q, got "
                             f"device {_device_id(cu)}")
        check_index_dtype(name, cu)
        if cu.ndim != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must be {what} (at least one sequence), got shape "
                             f"{tuple(cu.shape)}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length B + 1 (one "
                         f"offset more than sequences), got {cu_q.shape[0]} and {cu_k.shape[0]}")


def checked_offsets(cu_q: Any, cu_k: Any, totals: tuple[int, int], max_lengths: tuple[int, int],
                    check_offsets: bool, read=(None, None)) -> tuple[Any, Any]:
    """The host values of ``cu_seqlens_q`` and ``cu_seqlens_k``, checked by
    ``check_offset_values`` against the rows ``totals`` and ``max_lengths``: NumPy offsets always
    (it costs nothing), CuPy ones only with ``check_offsets`` (reading them back waits for the
    device); ``None`` for those not read. ``read`` holds host copies (``host_offsets``) that the
    caller has read already (a paged call, to size its gather), checked instead of read again."""
    hosts = []
    for name, cu, host, total, max_name, max_len in (
            ("cu_seqlens_q", cu_q, read[0], totals[0], "max_seqlen_q", max_lengths[0]),
            ("cu_seqlens_k", cu_k, read[1], totals[1], "max_seqlen_k", max_lengths[1])):
        if host is None and (isinstance(cu, numpy.ndarray) or check_offsets):
            host = host_offsets(cu)
        if host is not None:
            check_offset_values(host, name, total, max_name, max_len)
        hosts.append(host)
    return hosts[0], hosts[1]


def host_offsets(cu: Any) -> numpy.ndarray:
    """Offsets on the host, int64: NumPy ones as they are, CuPy ones read back (a
    synchronisation)."""
    return numpy.asarray(_host_values(cu), dtype=numpy.int64)


def check_offset_values(host: Any, name: str, total: int, max_name: str, max_len: int) -> None:
    """The values of one offset array (on the host): 0 first, non-decreasing, ``total`` last,
    no sequence longer than ``max_len``."""
    host = numpy.asarray(host, dtype=numpy.int64)
    if host[0] != 0:
        raise ValueError(f"{name} must start at 0, got {host[0]} first")
    lengths = numpy.diff(host)
    if (lengths < 0).any():
        b = int(numpy.flatnonzero(lengths < 0)[0])
        raise ValueError(f"{name} must be non-decreasing (offsets of consecutive sequences), got "
                         f"{name}[{b}] = {host[b]} > {name}[{b + 1}] = {host[b + 1]}")
    if host[-1] != total:
        rows = "q" if name.endswith("_q") else "k and v"
        raise ValueError(f"the last entry of {name} must equal the rows of {rows} ({total}), got "
                         f"{host[-1]}")
    if lengths.size and lengths.max() > max_len:
        b = int(numpy.argmax(lengths))
        raise ValueError(f"{max_name} must be at least the longest sequence's length: sequence "
                         f"{b} has {lengths[b]} rows in {name}, {max_name} is {max_len}")


SEED_ARRAY = "a uint64 array of shape (2,) holding (seed, offset)"


def check_dropout(p: Any, seed: Any, offset: Any, shapes: Shapes | None, *,
                  seed_required: bool = True, xp=None, device_of: Any = None,
                  read_seed_array: bool = False) -> tuple[float, int, int, Any]:
    """``(dropout_p, dropout_seed, dropout_offset, seed_array)`` checked: p a real number in
    [0, 1), seed an int in [0, 2**64) (required when p > 0), offset an int in [0, 2**32). With
    p = 0 the seed and offset are checked when given and returned as 0: they change nothing. The
    counter layout of ``cuflash._dropout`` also needs ``B · Hq < 2**32`` (checked unless
    ``shapes`` is None). ``seed_required=False`` returns seed 0 for a missing seed (for a caller
    that draws one).

    Where the inputs' module ``xp`` is given, the seed may also be a seed array
    (``check_seed_array``): a NumPy one is read now and returned as its seed and offset, as is a
    CuPy one with ``read_seed_array``; otherwise a CuPy one is returned as ``seed_array`` (seed
    and offset 0), for the kernels to read when they run. ``seed_array`` is None otherwise."""
    allowed = "a real number in [0, 1)"
    value = _real(p, "dropout_p", allowed, allowed)
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise ValueError(f"dropout_p must be {allowed}, got {_show(p)}")
    seed_array = None
    if xp is not None and is_seed_array(seed):
        seed_array = check_seed_array(seed, offset, xp, device_of)
        if xp is numpy or read_seed_array:
            seed, offset = (int(x) for x in _host_values(seed_array))
            seed_array = None
            if offset >= 2**32:
                raise ValueError(f"dropout_seed's offset (its second element) must be below "
                                 f"2**32, got {offset}")
        else:
            seed = 0
    for name, x, limit, bound in (("dropout_seed", seed, "2**64", 2**64),
                                  ("dropout_offset", offset, "2**32", 2**32)):
        if x is None and name == "dropout_seed":
            continue
        if not is_integer(x):
            raise TypeError(f"{name} must be an int in [0, {limit}), got {_show(x)} of type "
                            f"{_type_name(x)}")
        if not 0 <= int(x) < bound:
            raise ValueError(f"{name} must be an int in [0, {limit}), got {_show(x)}")
    if value == 0.0:
        return 0.0, 0, 0, None
    if _dropout.threshold(value) == 0:
        raise ValueError(f"dropout_p={value:g} is below 1/512: dropout draws 8 bits per element, "
                         f"so its rates are multiples of 1/256 and this one would round to no "
                         f"dropout; pass 0.0 or a rate of at least 1/512")
    if seed is None and not seed_required:
        seed = 0
    if seed is None:
        raise ValueError(f"dropout_p={value:g} needs an explicit dropout_seed (an int in "
                         f"[0, 2**64)), the same one for the forward and the backward pass; "
                         f"attention_vjp and attention_varlen_vjp draw one when none is "
                         f"given")
    if shapes is not None and shapes.b * shapes.hq >= 2**32:
        raise ValueError(f"dropout needs batch · Hq < 2**32 (its random counter holds "
                         f"b · Hq + h in 32 bits), got {shapes.b} · {shapes.hq}")
    return value, int(seed), int(offset), seed_array


def is_seed_array(seed: Any) -> bool:
    """Whether a ``dropout_seed`` is to be taken as a seed array (checked by
    ``check_seed_array``): anything but None and an int."""
    return seed is not None and seed.__class__ is not int and not is_integer(seed)


def check_seed_array(seed: Any, offset: Any, xp, device_of: Any):
    """A seed array as ``dropout_seed``: a C-contiguous uint64 array of shape (2,) of ``xp`` on
    the device of ``device_of`` (a CuPy one aligned to 8 bytes, as the kernels load it), with
    ``dropout_offset`` left at 0 (the offset is its second element). Its values are not read
    here: the kernels read a CuPy one when they run."""
    _check_beside_inputs(seed, "dropout_seed", f"an int in [0, 2**64), or {SEED_ARRAY}", xp,
                         device_of)
    if seed.dtype != numpy.uint64:
        raise TypeError(f"dropout_seed as an array must be {SEED_ARRAY}; got dtype {seed.dtype}")
    if seed.shape != (2,) or not seed.flags.c_contiguous:
        layout = "" if seed.flags.c_contiguous else ", not contiguous"
        raise ValueError(f"dropout_seed as an array must be {SEED_ARRAY}, C-contiguous; got shape "
                         f"{tuple(seed.shape)}{layout}")
    if xp is not numpy and seed.data.ptr % 8:  # the kernels load its two words as 64-bit words
        raise ValueError(f"dropout_seed as an array must be aligned to 8 bytes, got address "
                         f"{seed.data.ptr:#x}")
    if not is_integer(offset):
        raise TypeError(f"dropout_offset must be an int in [0, 2**32), got {_show(offset)} of "
                        f"type {_type_name(offset)}")
    if int(offset) != 0:
        raise ValueError(f"dropout_offset must be 0 (its default) when dropout_seed is an array: "
                         f"the offset is the array's second element, got {_show(offset)}")
    return seed


def _host_values(x) -> numpy.ndarray:
    return x if isinstance(x, numpy.ndarray) else x.get()
