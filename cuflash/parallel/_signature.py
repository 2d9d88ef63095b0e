"""The comparison of the ranks' calls: every rank all-gathers the shapes and options of its
call as integers, and every rank raises one and the same ``ValueError`` when they differ.

A call's signature is a list of named fields, each a few int64 values that can be read back on
any rank, so that the error names the argument that differs and what every rank passed (or,
where the ranks' calls take other arguments, which ranks make which call):

- an array: ``[ndim, *shape, dtype]`` (``[-1]`` for ``None``);
- a flag, a tuple of ints, a float (its bits), a name from a known list.

A rank that refuses its own arguments (:func:`agree`) joins the comparison all the same, with a
signature that says so and holds its error's text: every rank raises, the refusing one its own
error and the others one that names it and quotes it, where the refusal alone would leave them
waiting in the all-gather (under NCCL, until the communicator's timeout).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

import numpy

from cuflash._checks import IndexDtypeError

_SIGNATURE = 128  # int64 values all-gathered by the check of the ranks' shapes and options
_REFUSED = -1  # the first value of the signature of a rank that refused its own arguments
# The kinds of error a refusal is raised as on the other ranks, as bits of its signature.
_KINDS = ((1, TypeError), (2, ValueError), (4, NotImplementedError))

# The dtypes an array field reads back by name (others are compared all the same).
_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
                "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
                "float8_e4m3fn", "float8_e5m2")


def code(text: str) -> int:
    """An integer standing for ``text`` in a call's signature."""
    return zlib.crc32(text.encode())


def dtype_code(dtype) -> int:
    """An integer standing for ``dtype``, which :func:`dtype_text` reads back."""
    return code(str(dtype))


def dtype_text(value: int) -> str:
    """The name of the dtype ``value`` stands for (one of the usual ones), else a phrase."""
    names = {code(name): name for name in _DTYPE_NAMES}
    return names.get(int(value), "of another dtype")


class Field:
    """One named part of a call's signature: ``values()`` its integers on this rank,
    ``length(values, i)`` how many of them a signature holds from index ``i``, ``render``
    the text of any rank's values."""

    def __init__(self, name: str, values: list[int]):
        self.name, self.own = name, [int(v) for v in values]

    def length(self, signature, start: int) -> int:
        return len(self.own)

    def render(self, values) -> str:
        return str(tuple(values)) if len(values) > 1 else str(values[0])


class ArrayField(Field):
    """An array's dimensions, shape and dtype (or ``None``); ``by_values``: a digest of the
    array's values (a host array) in place of its dtype."""

    def __init__(self, name: str, x, *, by_values: bool = False):
        self.by_values = by_values
        if x is None:
            super().__init__(name, [-1])
        else:
            # The digest of the values covers their dtype: the same bytes in another dtype are
            # other values.
            last = (code(f"{x.dtype}:{x.tobytes().hex()}") if by_values
                    else dtype_code(x.dtype))
            super().__init__(name, [x.ndim, *x.shape, last])

    def length(self, signature, start: int) -> int:
        ndim = int(signature[start])
        return 1 if ndim < 0 else ndim + 2

    def render(self, values) -> str:
        if values[0] < 0:
            return "None"
        shape = tuple(int(s) for s in values[1:-1])
        if self.by_values:
            return f"{shape} (values #{int(values[-1]) & 0xFFFFFFFF:08x})"
        return f"{shape} {dtype_text(values[-1])}"


class FlagField(Field):
    def __init__(self, name: str, value: bool):
        super().__init__(name, [int(bool(value))])

    def render(self, values) -> str:
        return str(bool(values[0]))


class FloatField(Field):
    """A float, exactly: its bits."""

    def __init__(self, name: str, value: float):
        super().__init__(name, [int(numpy.float64(value).view(numpy.int64))])

    def render(self, values) -> str:
        return repr(float(numpy.int64(values[0]).view(numpy.float64)))


class ChoiceField(Field):
    """One of the names ``choices``."""

    def __init__(self, name: str, value: str, choices):
        super().__init__(name, [code(value)])
        self.names = {code(choice): choice for choice in choices}

    def render(self, values) -> str:
        return repr(self.names.get(int(values[0]), "another"))


def compares(validate) -> bool:
    """Whether a call's ``validate`` makes it join the comparison of the ranks' calls: every
    value but ``False`` itself does. A ``validate`` that is no bool is refused, inside
    :func:`agree`, like any argument, and the ranks beside it, which compare, learn of it."""
    return not (isinstance(validate, (bool, numpy.bool_)) and not validate)


def agree(comm, checks: Callable[[], tuple[list[Field], Any]], what: str, rule: str, *,
          compare: bool) -> Any:
    """This rank's checks of its call of ``what``, then (``compare``) the comparison of every
    rank's call: the one place where a rank refuses its arguments.

    ``checks()`` reads this rank's arguments alone (their types, modules and devices, the
    options) and returns ``(fields, value)``: the fields of the call's signature and what the
    caller keeps (``agree`` returns it). With ``compare``, every rank learns of any rank's
    refusal: a rank whose ``checks()`` raise joins the all-gather with its error and raises it
    there, and every other rank raises an error of the same kind naming that rank and quoting
    it; where no rank refuses, :func:`check_same_call` compares the fields. Without
    ``compare`` (``validate=False``), a refusal raises on this rank alone, before any message:
    the other ranks go on to their first transfer, which fails or waits (until the
    communicator's timeout), as they do when the ranks' calls differ there.

    Whatever the caller refuses after ``agree`` must follow from the fields alone (the shapes,
    dtypes and options every rank then holds), so that every rank refuses it alike."""
    try:
        fields, value = checks()
    except Exception as error:
        if compare:
            share_refusal(comm, error)
        raise
    if compare:
        check_same_call(comm, fields, what, rule)
    return value


def share_refusal(comm, error: BaseException, *, gather=None,
                  shape: tuple[int, ...] = (_SIGNATURE,)) -> None:
    """Join the comparison of the ranks' calls with ``error``, this rank's refusal of its
    arguments, so that the ranks waiting there raise too (:func:`check_same_call`); the
    caller raises ``error`` itself next. ``gather`` and ``shape``: the all-gather the others
    wait in (default ``comm.all_gather``) and the shape of what each rank gives it (an
    all-to-all's headers, say). A failure of the all-gather is dropped: ``error`` is the
    cause."""
    try:
        (gather or comm.all_gather)(
            refusal_values(error, int(numpy.prod(shape))).reshape(shape))
    except Exception:  # noqa: BLE001 - the refusal is raised by the caller
        pass


def refusal_values(error: BaseException, size: int) -> numpy.ndarray:
    """``size`` int64 values that stand for the refusal ``error``: ``_REFUSED``, the bits of its
    kind, the length of its text and the text (UTF-8, cut to fit)."""
    kind = sum(bit for bit, cls in _KINDS if isinstance(error, cls))
    room = (size - 3) * 8
    text = f"{type(error).__name__}: {error}".encode()
    if len(text) > room:
        text = text[:room - 3].decode(errors="ignore").encode() + "...".encode()
    values = numpy.zeros(size, numpy.int64)
    values[:3] = _REFUSED, kind, len(text)
    raw = numpy.zeros((size - 3) * 8, numpy.uint8)
    raw[:len(text)] = numpy.frombuffer(text, numpy.uint8)
    values[3:] = raw.view(numpy.int64)
    return values


def is_refusal(values) -> bool:
    return int(values[0]) == _REFUSED


def refusal_error(values, rank: int, what: str) -> Exception:
    """The error the other ranks raise for the refusal ``values`` of ``rank``: of its kind (a
    ``TypeError``, ``ValueError`` or ``NotImplementedError``, else a ``CommError``), naming
    the rank and quoting its error."""
    kind, length = int(values[1]), int(values[2])
    raw = numpy.ascontiguousarray(values[3:], dtype=numpy.int64).view(numpy.uint8)
    text = bytes(raw[:max(0, min(length, raw.size))]).decode(errors="replace")
    message = f"{what}: rank {rank} refused its arguments ({text}), so every rank stops here"
    if kind & 1 and kind & 2:
        error = IndexDtypeError(message)
    else:
        from .comm import CommError
        error = next((cls(message) for bit, cls in reversed(_KINDS) if kind & bit),
                     CommError(message))
    error.refused_on_rank = rank  # a consequence, not the cause (LocalRing.run raises the cause)
    return error


def check_same_call(comm, fields: list[Field], what: str, rule: str) -> None:
    """Raise one ``ValueError`` on every rank unless every rank of ``comm`` passes the same
    ``fields`` (the shapes and options of its call of ``what``): one small all-gather, so that
    ranks whose calls differ fail instead of hanging or computing with each other's data.
    ``rule`` says what must match. A call too long to compare fails on every rank as well,
    after the all-gather, which every rank must join; so does a rank that refused its own
    arguments (:func:`agree`): every rank then raises its error."""
    # First the names of the fields: ranks making other calls (a forward pass beside a
    # backward one) are told apart from ranks passing other values to one call.
    names = code(",".join(field.name for field in fields))
    signature = numpy.asarray([names, *(v for field in fields for v in field.own)],
                              dtype=numpy.int64)
    mine = numpy.zeros(_SIGNATURE, numpy.int64)
    mine[0] = signature.size
    if signature.size < _SIGNATURE:
        mine[1:1 + signature.size] = signature
    everyone = [_host(x) for x in comm.all_gather(mine)]
    for r, theirs in enumerate(everyone):
        if is_refusal(theirs):
            raise refusal_error(theirs, r, what)
    for r, theirs in enumerate(everyone):
        if theirs[0] >= _SIGNATURE:
            raise ValueError(f"{what}: the shapes and options of the call on rank {r} take "
                             f"{int(theirs[0])} values, more than the {_SIGNATURE - 1} that "
                             f"{what} compares between ranks; pass validate=False")
    if all(numpy.array_equal(theirs, mine) for theirs in everyone):
        return
    raise ValueError(f"{what} is called with other shapes, dtype or options on different "
                     f"ranks ({rule}): {_difference(fields, everyone)}")


def _difference(fields, everyone) -> str:
    """The first field whose values differ between the ranks, with every rank's value: one
    text, the same on every rank."""
    calls: dict[int, list[int]] = {}
    for r, theirs in enumerate(everyone):
        calls.setdefault(int(theirs[1]), []).append(r)
    if len(calls) > 1:
        return "the calls on " + " and on ".join(
            _ranks(group) for group in sorted(calls.values())) + " take other arguments"
    parsed = [_parse(fields, theirs[2:1 + int(theirs[0])]) for theirs in everyone]
    for i, field in enumerate(fields):
        values = [p[i] if p is not None and i < len(p) else None for p in parsed]
        if len(set(values)) > 1:
            return f"{field.name} is " + _by_rank(
                [("?" if v is None else field.render(v)) for v in values])
    return "their calls cannot be read field by field"


def _parse(fields, signature):
    """``signature`` cut into the values of ``fields`` (tuples), or ``None`` when it does not
    hold them."""
    values, start = [], 0
    try:
        for field in fields:
            length = field.length(signature, start)
            if length < 1 or start + length > len(signature):
                return None
            values.append(tuple(int(v) for v in signature[start:start + length]))
            start += length
    except (IndexError, ValueError):
        return None
    return values if start == len(signature) else None


def _by_rank(texts) -> str:
    """``"A on ranks 0, 2 and B on rank 1"``: each text with the ranks that passed it."""
    groups: dict[str, list[int]] = {}
    for r, text in enumerate(texts):
        groups.setdefault(text, []).append(r)
    parts = [f"{text} on {_ranks(ranks)}" for text, ranks in groups.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _ranks(ranks) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _host(x):
    return x.get() if type(x).__module__.partition(".")[0] == "cupy" else numpy.asarray(x)
