"""Communicators: what ring (and Ulysses) attention needs from the transport, and the in-process
simulated ring.

A communicator is any object with:

- ``rank``, ``size``: this rank and the number of ranks;
- ``timeout``: seconds a wait may take before it fails (``None``: wait forever);
- ``exchange(send, dst, src, recv_like=None) -> Pending``: send the arrays ``send`` to rank
  ``dst`` and receive as many arrays from rank ``src`` (shaped and typed like ``recv_like``,
  default like ``send``), started at once; ``Pending.wait()`` returns the received arrays. On a
  GPU the transfer runs on a side stream, overlapping whatever the current stream computes,
  and ``wait()`` makes the current stream wait for it. ``shift(send, offset=1)`` is the ring
  step: send to ``rank + offset``, receive from ``rank − offset``;
- ``all_to_all(arrays) -> list``: ``arrays[j]`` goes to rank ``j``; element ``i`` of the result
  came from rank ``i``;
- ``all_gather(x) -> list`` and ``all_reduce(x, op="sum")`` for small arrays, and ``barrier()``.

Every rank must make the same calls in the same order, and what travels must agree:

- ``all_to_all`` takes arrays of any shapes (every rank learns what it receives from one small
  all-gather of their shapes first); what two ranks send each other must have one dtype
  (``ValueError`` on every rank otherwise), and a rank that refuses its ``arrays`` makes every
  rank raise;
- ``exchange`` receives into arrays shaped like ``recv_like``: what ``src`` sends must have
  those shapes and dtypes; ``all_gather`` and ``all_reduce`` need one shape and dtype on every
  rank. These are the caller's to keep, and nothing checks them first (a check would cost a
  round trip per call): where they differ, a ``LocalRing`` raises, and NCCL waits until the
  communicator's ``timeout`` (then raises ``CommTimeout``), or, with ``timeout=None``, for
  ever. cuflash's own calls always agree: ring and Ulysses attention compare the ranks'
  shapes first (``validate=True``, the default), and all-gather arrays of one fixed size.

Implementations:

- :class:`LocalRing` (here): ``P`` ranks simulated in one process, one thread per rank, messages
  through mailboxes: the same algorithm on NumPy arrays (or CuPy arrays on one GPU) without NCCL.
- :class:`cuflash.parallel.NcclComm`: CuPy's NCCL bindings, one process per GPU.
- :class:`cuflash.parallel.TorchComm`: ``torch.distributed`` point-to-point operations.

Failures never hang silently: a wait that passes ``timeout`` raises :class:`CommTimeout`; in a
``LocalRing`` a rank that waits for a rank that has already failed or returned raises
:class:`CommError` at once.
"""

from __future__ import annotations

import collections
import collections.abc
import threading
import time
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy

from cuflash import _checks

from ._signature import dtype_code, dtype_text, is_refusal, refusal_error, share_refusal

__all__ = ["CommError", "CommTimeout", "Communicator", "LocalComm", "LocalRing", "Pending",
           "array_module", "check_all_to_all", "check_array", "check_arrays", "check_comm",
           "check_per_rank", "check_rank"]

DEFAULT_TIMEOUT = 600.0  # seconds
_MAX_DIMS = 64  # the most axes a NumPy (2.x) or CuPy array has


class CommError(RuntimeError):
    """A collective or point-to-point operation failed (a peer failed, or the calls of the
    ranks do not match)."""


class CommTimeout(CommError, TimeoutError):
    """A wait passed the communicator's timeout: a peer has probably failed or hangs."""


@runtime_checkable
class Pending(Protocol):
    def wait(self) -> list: ...


@runtime_checkable
class Communicator(Protocol):
    rank: int
    size: int
    timeout: float | None

    def exchange(self, send: Sequence, dst: int, src: int, recv_like: Sequence | None = None
                 ) -> Pending: ...

    def shift(self, send: Sequence, offset: int = 1) -> Pending: ...

    def all_to_all(self, arrays: Sequence) -> list: ...

    def all_gather(self, x) -> list: ...

    def all_reduce(self, x, op: str = "sum"): ...

    def barrier(self) -> None: ...


def check_comm(comm):
    """``comm``, when it is a communicator (the attributes and methods above); ``TypeError``
    naming the communicators otherwise, and what an object that has some of them lacks (a
    communicator of one's own, say)."""
    if not isinstance(comm, Communicator):
        names = ("rank", "size", "timeout", *(name for name in dir(Communicator)
                                              if not name.startswith("_")))
        missing = sorted({name for name in names if not hasattr(comm, name)})
        lacks = f" (it lacks {', '.join(missing)})" if len(missing) < len(set(names)) else ""
        raise TypeError(f"comm must be a communicator (LocalRing(P).comms[r], NcclComm or "
                        f"TorchComm), got {type(comm).__name__}{lacks}")
    return comm


def check_rank(value, name: str, size: int) -> int:
    """``value``, a rank of a communicator of ``size`` ranks, as an int: an int in ``[0,
    size)``; a bool or a float is refused (``_checks.check_int``) rather than taken as the rank
    ``int()`` makes of it."""
    if _checks.is_integer(value) and not 0 <= value < size:
        raise ValueError(f"{name} must be in [0, {size}), got {value}")
    return _checks.check_int(value, name, 0)


def check_per_rank(value, name: str, item: str):
    """``value``, a sequence of one ``item`` per rank (a list, a tuple, or anything with a
    length that is indexed by position); ``TypeError`` naming ``name`` otherwise: a generator
    has no length, and a mapping is indexed by its keys, which would be read as its items."""
    if (not (hasattr(value, "__len__") and hasattr(value, "__getitem__"))
            or isinstance(value, collections.abc.Mapping)):
        raise TypeError(f"{name} must be a list or tuple of one {item} per rank, got "
                        f"{type(value).__name__}")
    return value


def check_arrays(value, name: str) -> list:
    """``value``, the arrays of one send or receive, as a list; ``TypeError`` naming ``name``
    unless it is a list or tuple of arrays: a generator would be used up by the sending and
    leave nothing to shape the receiving by, and a lone array would go as its rows."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of arrays, got {type(value).__name__}")
    for i, x in enumerate(value):
        check_array(x, f"{name}[{i}]")
    return list(value)


def check_array(x, name: str):
    """``x``, when it is an array (it has a shape and a dtype); ``TypeError`` naming ``name``
    otherwise."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{name} must be an array (NumPy or CuPy), got {type(x).__name__}")
    return x


def check_all_to_all(arrays, size: int, xp=None) -> list:
    """The ``arrays`` of an ``all_to_all`` of ``size`` ranks, as C-contiguous arrays: one
    array per rank, all of the module ``xp`` (the transport's, ``None``: that of the
    first)."""
    check_per_rank(arrays, "arrays", "array")
    if len(arrays) != size:
        raise ValueError(f"all_to_all needs one array per rank ({size}), got {len(arrays)}")
    for dst, x in enumerate(arrays):
        check_array(x, f"arrays[{dst}]")
    module = xp or array_module(arrays[0])
    for dst, x in enumerate(arrays):
        if array_module(x) is not module:
            raise TypeError(f"arrays[{dst}] must be a {module.__name__}.ndarray, got "
                            f"{type(x).__module__}.{type(x).__name__}")
    return [module.ascontiguousarray(x) for x in arrays]


def _send_and_like(send, recv_like) -> tuple[list, list]:
    """An exchange's ``send`` and the arrays its receiving is shaped like (``recv_like``,
    default ``send``), checked as lists of arrays."""
    send = check_arrays(send, "send")
    return send, send if recv_like is None else check_arrays(recv_like, "recv_like")


def check_pairs_of_dtypes(everyone) -> None:
    """``everyone[src][dst]``: the header (ndim, dtype, shape) of what ``src`` sends ``dst``.
    Raise one ``ValueError``, on every rank alike, where two ranks send each other arrays of
    other dtypes: each receives into arrays of the dtype it sends, which would read the other's
    bytes as its own dtype."""
    size = len(everyone)
    for src in range(size):
        for dst in range(src + 1, size):
            there, back = everyone[src][dst][1], everyone[dst][src][1]
            if there != back:
                raise ValueError(f"all_to_all needs arrays of one dtype in each direction: "
                                 f"rank {src} sends rank {dst} {dtype_text(there)}, rank {dst} "
                                 f"sends rank {src} {dtype_text(back)}")


def array_module(x):
    """``numpy`` or ``cupy`` for an array."""
    if type(x).__module__.partition(".")[0] == "cupy":
        import cupy
        return cupy
    return numpy


def check_timeout(timeout) -> float | None:
    """A communicator's ``timeout``: a positive number of seconds, or ``None`` (or infinity)
    for waits without a deadline."""
    if timeout is None:
        return None
    seconds = _checks._real(timeout, "timeout", "a positive number of seconds or None",
                            "a positive number of seconds or None")
    if not seconds > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout}")
    return None if seconds == float("inf") else seconds


class Done:
    """A ``Pending`` whose result is already there."""

    def __init__(self, result):
        self.result = list(result)

    def wait(self) -> list:
        return self.result


class CommBase:
    """``shift`` and the small collectives written with ``exchange``; subclasses may do better."""

    rank: int
    size: int
    timeout: float | None

    def shift(self, send: Sequence, offset: int = 1) -> Pending:
        if not _checks.is_integer(offset):
            raise TypeError(f"offset must be an int, got {offset!r} of type "
                            f"{type(offset).__name__}")
        send = check_arrays(send, "send")
        if offset % self.size == 0:
            # To this rank itself, which not every transport allows (torch.distributed's send
            # and recv refuse it), and which moves nothing. Copies, as any exchange receives:
            # the sender may reuse its arrays at once.
            return Done([x.copy() for x in send])
        return self.exchange(send, (self.rank + offset) % self.size,
                             (self.rank - offset) % self.size)

    def all_gather(self, x) -> list:
        return self.all_to_all([check_array(x, "x")] * self.size)

    def all_reduce(self, x, op: str = "sum"):
        xp = array_module(check_array(x, "x"))
        operations = {"sum": lambda a, b: a + b, "max": xp.maximum, "min": xp.minimum}
        if op not in operations:
            raise ValueError(f"op must be one of {', '.join(map(repr, operations))}, got {op!r}")
        reduce = operations[op]
        parts = self.all_gather(x)
        result = parts[0]
        for part in parts[1:]:
            result = reduce(result, part)
        return result

    def barrier(self) -> None:
        self.all_gather(numpy.zeros(1, numpy.int32))

    # -- all_to_all over a transport that receives into buffers of a known size

    def _all_gather_host(self, x: numpy.ndarray) -> list:
        """All-gather a small NumPy array of one shape on every rank (for the headers)."""
        raise NotImplementedError

    def _check_transported(self, arrays: list, name: str) -> None:
        """What the transport needs of the arrays ``name`` it moves (see :meth:`check_movable`),
        element by element."""
        for i, x in enumerate(arrays):
            self.check_movable(x, f"{name}[{i}]")

    def check_movable(self, x, name: str) -> None:
        """What the transport needs of an array it moves (``name``: the argument), beyond being
        an array: nothing here. Ring and Ulysses attention ask it of their inputs before the
        ranks compare their calls, so that a refusal reaches every rank."""

    def _all_to_all_arrays(self, arrays, xp) -> list:
        """``arrays`` of an ``all_to_all``, checked, as C-contiguous arrays of ``xp`` (the
        transport's module, ``None``: the arrays' own); a refusal is shared with every rank
        through the all-gather of the shapes (:meth:`_received_shapes`), where the others wait,
        and raised."""
        try:
            arrays = check_all_to_all(arrays, self.size, xp)
            self._check_transported(arrays, "arrays")
            return arrays
        except Exception as error:
            share_refusal(self, error, gather=self._all_gather_host,
                          shape=(self.size, _MAX_DIMS + 2))
            raise

    def _received_shapes(self, arrays) -> list[tuple[int, ...]]:
        """The shape of the array each rank sends to this one in an ``all_to_all``, once every
        rank has found that no rank refused its arrays and that each pair of ranks exchanges
        arrays of one dtype (each receives into arrays of the dtype it sends): one all-gather
        of a header per destination, ``(ndim, dtype, *shape)``, every rank's rows of one width,
        the most axes an array can have, whatever its own arrays have (rows of each rank's own
        width would not match). The transfers that follow then never differ in size between
        sender and receiver, which NCCL would wait on for ever."""
        mine = numpy.full((self.size, _MAX_DIMS + 2), -1, numpy.int64)
        for dst, x in enumerate(arrays):
            mine[dst, :2] = x.ndim, dtype_code(x.dtype)
            mine[dst, 2:2 + x.ndim] = x.shape
        everyone = [numpy.asarray(h) for h in self._all_gather_host(mine)]
        for src, header in enumerate(everyone):
            if is_refusal(header.reshape(-1)):
                raise refusal_error(header.reshape(-1), src, "all_to_all")
        check_pairs_of_dtypes(everyone)
        shapes = []
        for src in range(self.size):
            row = everyone[src][self.rank]
            shapes.append(tuple(int(s) for s in row[2:2 + int(row[0])]))
        return shapes

    def describe(self) -> str:
        return f"{type(self).__name__}(rank {self.rank} of {self.size})"


# ----------------------------------------------------------------------------- LocalRing

class LocalRing:
    """``size`` ranks in one process: ``run(fn, ...)`` calls ``fn(comm, ...)`` for every rank in
    its own thread, each with its :class:`LocalComm`, and returns the results in rank order.

    Messages are copies put in per-(sender, receiver) mailboxes, so a rank can never see a later
    change to an array it received. A rank that raises makes every rank waiting for it raise
    :class:`CommError` (naming it) instead of waiting; ``run`` then raises the first failure
    that is no consequence of another's (a rank's refusal of its arguments, rather than the
    other ranks' errors that quote it).
    Works with NumPy arrays and with CuPy arrays on one GPU. ``timeout``: the seconds each
    wait may take (a positive number; ``None`` or infinity: no deadline).

    >>> ring = LocalRing(3)
    >>> ring.run(lambda comm: comm.rank * 10)
    [0, 10, 20]
    """

    def __init__(self, size: int, *, timeout: float | None = 60.0):
        self.size = _checks.check_int(size, "size", 1)  # a LocalRing needs one rank or more
        self.timeout = check_timeout(timeout)
        self._lock = threading.Condition()
        self._boxes: dict[tuple[int, int], collections.deque] = collections.defaultdict(
            collections.deque)
        self._state: list[str] = ["idle"] * self.size  # idle, running, done, failed
        self._errors: list[BaseException | None] = [None] * self.size
        self.comms = [LocalComm(self, r) for r in range(self.size)]

    def run(self, fn: Callable, *per_rank: Sequence, **kwargs) -> list:
        """``[fn(comm_r, a_r, b_r, ..., **kwargs) for r in ranks]``, run concurrently.

        Each positional argument after ``fn`` is a sequence with one item per rank.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        for i, seq in enumerate(per_rank):
            check_per_rank(seq, f"argument {i} of run()", "item")
            if len(seq) != self.size:
                raise ValueError(f"argument {i} of run() must hold one item per rank "
                                 f"({self.size}), got {len(seq)}")
        with self._lock:
            self._boxes.clear()
            self._state = ["running"] * self.size
            self._errors = [None] * self.size
        results: list[Any] = [None] * self.size

        def body(r):
            try:
                results[r] = fn(self.comms[r], *(seq[r] for seq in per_rank), **kwargs)
                state = "done"
            except BaseException as error:  # noqa: BLE001 - reported by run()
                self._errors[r] = error
                state = "failed"
            with self._lock:
                self._state[r] = state
                self._lock.notify_all()

        if self.size == 1:
            body(0)
        else:
            threads = [threading.Thread(target=body, args=(r,), daemon=True,
                                        name=f"cuflash-local-rank-{r}")
                       for r in range(self.size)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        failed = [r for r in range(self.size) if self._errors[r] is not None]
        if failed:
            # The root cause first: a failure that is not a consequence of another rank's (a
            # wait for a failed rank, or another rank's refusal raised here).
            roots = [r for r in failed if not isinstance(self._errors[r], _PeerFailed)
                     and getattr(self._errors[r], "refused_on_rank", None) is None]
            first = (roots or failed)[0]
            raise self._errors[first]
        return results

    # -- mailboxes (called by LocalComm with the lock held)

    def _post(self, src: int, dst: int, tag: str, payload) -> None:
        with self._lock:
            self._boxes[src, dst].append((tag, payload))
            self._lock.notify_all()

    def _take(self, src: int, dst: int, tag: str):
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with self._lock:
            while True:
                box = self._boxes[src, dst]
                if box:
                    got, payload = box.popleft()
                    if got != tag:
                        raise CommError(
                            f"rank {dst}: expected a {tag!r} message from rank {src}, got "
                            f"{got!r}: the ranks do not make the same calls in the same order")
                    return payload
                state = self._state[src]
                if state == "failed":
                    error = self._errors[src]
                    raise _PeerFailed(
                        f"rank {dst}: rank {src} failed before sending the {tag!r} message "
                        f"this rank waits for ({type(error).__name__}: {error})")
                if state == "done":
                    raise _PeerFailed(
                        f"rank {dst}: rank {src} returned without sending the {tag!r} message "
                        f"this rank waits for: the ranks do not make the same calls")
                if deadline is None:
                    self._lock.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommTimeout(
                        f"rank {dst}: no {tag!r} message from rank {src} within "
                        f"{self.timeout:g} s (LocalRing timeout): rank {src} may hang")
                self._lock.wait(left)


class _PeerFailed(CommError):
    """Raised in a rank that waited for a rank that had failed or returned."""


class _LocalPending:
    def __init__(self, ring: LocalRing, src: int, dst: int, tag: str):
        self.ring, self.src, self.dst, self.tag = ring, src, dst, tag
        self._result = None

    def wait(self) -> list:
        if self._result is None:
            self._result = self.ring._take(self.src, self.dst, self.tag)
        return self._result


class LocalComm(CommBase):
    """Rank ``rank`` of a :class:`LocalRing`."""

    def __init__(self, ring: LocalRing, rank: int):
        self.ring = ring
        self.rank = rank
        self.size = ring.size

    @property
    def timeout(self):
        return self.ring.timeout

    def exchange(self, send, dst, src, recv_like=None) -> Pending:
        dst, src = check_rank(dst, "dst", self.size), check_rank(src, "src", self.size)
        send, like = _send_and_like(send, recv_like)
        self.ring._post(self.rank, dst, "exchange", [x.copy() for x in send])
        return _Checked(_LocalPending(self.ring, src, self.rank, "exchange"), like, src,
                        self.rank)

    def all_to_all(self, arrays):
        # As NcclComm's and TorchComm's: the shapes first, so that a refusal, or dtypes that
        # differ between two ranks, raise on every rank here as they do there.
        arrays = self._all_to_all_arrays(arrays, None)
        self._received_shapes(arrays)
        return self._post_all(arrays, "all_to_all")

    def _all_gather_host(self, x):
        return self._post_all([x] * self.size, "all_gather")

    def _post_all(self, arrays, what: str) -> list:
        """``arrays[j]`` to rank ``j`` through the mailboxes, what every rank sent this one back."""
        for dst, x in enumerate(arrays):
            if dst != self.rank:
                self.ring._post(self.rank, dst, what, x.copy())
        return [arrays[src].copy() if src == self.rank
                else self.ring._take(src, self.rank, what) for src in range(self.size)]


class _Checked:
    """Checks that what arrives has the shapes and dtypes the receiver expects (as NCCL
    would need: it receives into buffers of the expected size)."""

    def __init__(self, pending, like, src, rank):
        self.pending = pending
        self.like = [(tuple(x.shape), numpy.dtype(x.dtype)) for x in like]
        self.src, self.rank = src, rank

    def wait(self):
        got = self.pending.wait()
        shapes = [(tuple(x.shape), numpy.dtype(x.dtype)) for x in got]
        if shapes != self.like:
            raise CommError(f"rank {self.rank}: received {shapes} from rank {self.src}, "
                            f"expected {self.like}: the ranks' arrays differ in shape or dtype")
        return got
