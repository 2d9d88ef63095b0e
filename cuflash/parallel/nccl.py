"""``NcclComm``: the communicator over NCCL through CuPy's bindings (``cupy.cuda.nccl``).

One process per GPU. Transfers run on a side stream of the communicator (``comm.stream``):
``exchange`` records an event on the current (compute) stream once its buffers are ready, makes
the side stream wait for it and issues the sends and receives there inside one NCCL group;
``Pending.wait()`` makes the current stream wait for the transfer's completion event. The compute
stream therefore never waits for a transfer it does not need yet, and the next chunk moves while
the current one is computed.

Timeouts. NCCL's kernels wait on the GPU for their peer; a peer that died would leave them
waiting forever. So every host-side wait here polls its completion event with a deadline
(``timeout`` seconds, default ``CUFLASH_COMM_TIMEOUT`` or 600) and checks NCCL's asynchronous
error state; past the deadline the communicator is aborted (``ncclCommAbort``) and
:class:`~cuflash.parallel.comm.CommTimeout` says which operation, which peer and how long. The
creation of the communicator itself has the same deadline. The launcher
(``python -m cuflash.parallel.launch``) stops every rank as soon as one exits with an error.

Setting up, in each process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set by the launcher or by
``torchrun``)::

    comm = NcclComm.from_env()      # NCCL unique id from CUFLASH_NCCL_ID_FILE (the launcher)
    comm = NcclComm.from_torch()    # ... or through torch.distributed, when it is initialised
"""

from __future__ import annotations

import os
import threading
import time

import numpy

from cuflash import _checks
from cuflash._files import write_atomically

from .comm import (DEFAULT_TIMEOUT, CommBase, CommError, CommTimeout, _send_and_like,
                   array_module, check_rank, check_timeout)

__all__ = ["NcclComm", "read_unique_id", "unique_id_bytes"]

ID_BYTES = 128
_POLL_MIN, _POLL_MAX = 50e-6, 1e-3  # seconds between polls of a completion event


def _nccl():
    try:
        from cupy.cuda import nccl
    except ImportError as error:  # pragma: no cover - needs a CuPy without NCCL support
        raise RuntimeError(f"NcclComm needs CuPy with NCCL: {error}") from error
    if not getattr(nccl, "available", True) or not hasattr(nccl, "NcclCommunicator"):
        raise RuntimeError(
            "NcclComm needs the NCCL library, which CuPy could not load: install it with "
            "`pip install nvidia-nccl-cu13` (or -cu12 for CUDA 12)")
    return nccl


def env_timeout(default: float = DEFAULT_TIMEOUT) -> float | None:
    """``CUFLASH_COMM_TIMEOUT`` in seconds (``0``, however written, ``inf`` or ``none``: no
    timeout), else ``default``; ``ValueError`` naming it for anything else."""
    value = os.environ.get("CUFLASH_COMM_TIMEOUT")
    if value is None or value == "":
        return default
    if value.strip().lower() == "none":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0:
        raise ValueError(f"CUFLASH_COMM_TIMEOUT must be a number of seconds (0 or none: no "
                         f"timeout), got {value!r}")
    return None if seconds in (0.0, float("inf")) else seconds


def _timeout(timeout) -> float | None:
    """A communicator's ``timeout``: ``"env"`` for ``CUFLASH_COMM_TIMEOUT`` (else the default),
    or seconds by ``check_timeout``'s rule."""
    if isinstance(timeout, str) and timeout == "env":
        return env_timeout()
    return check_timeout(timeout)


def _env_int(name: str, minimum: int, default: int | None = None) -> int:
    """The environment variable ``name`` (``default`` when unset) as an int of at least
    ``minimum``; ``ValueError`` naming it otherwise."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {number}")
    return number


def _env_unique_id() -> bytes | None:
    """``CUFLASH_NCCL_ID``, NCCL's unique id in hex, as bytes (None when unset or empty);
    ``ValueError`` naming it when it is not the hex of ``ID_BYTES`` bytes."""
    value = os.environ.get("CUFLASH_NCCL_ID")
    if not value:
        return None
    allowed = f"CUFLASH_NCCL_ID must be NCCL's unique id, {ID_BYTES} bytes in hex"
    try:
        data = bytes.fromhex(value)
    except ValueError:
        shown = value if len(value) <= 20 else value[:20] + "..."
        raise ValueError(f"{allowed}, got {shown!r}") from None
    if len(data) != ID_BYTES:
        raise ValueError(f"{allowed}, got {len(data)} bytes")
    return data


# ----------------------------------------------------------------------------- the unique id

def unique_id_bytes(uid) -> bytes:
    """CuPy's unique id (a tuple of 128 signed chars) as 128 bytes."""
    return bytes(int(c) & 0xFF for c in uid)


def _unique_id_tuple(data: bytes) -> tuple:
    if len(data) != ID_BYTES:
        raise CommError(f"an NCCL unique id has {ID_BYTES} bytes, got {len(data)}")
    return tuple(b - 256 if b > 127 else b for b in data)


def _check_unique_id(unique_id) -> tuple:
    """``unique_id`` (bytes, or CuPy's tuple of signed chars) as CuPy's tuple; ``TypeError``
    or ``ValueError`` naming it otherwise, before NCCL would take a str for a tuple of its
    characters."""
    allowed = f"unique_id must be NCCL's unique id, {ID_BYTES} bytes or {ID_BYTES} ints"
    if isinstance(unique_id, (bytes, bytearray)):
        data = bytes(unique_id)
    elif isinstance(unique_id, (tuple, list)):
        if not all(_checks.is_integer(c) and -128 <= c <= 255 for c in unique_id):
            raise ValueError(f"{allowed} in [-128, 255] (signed or unsigned chars)")
        data = unique_id_bytes(unique_id)
    else:
        raise TypeError(f"{allowed} (as cupy.cuda.nccl.get_unique_id() gives it), got "
                        f"{type(unique_id).__name__}")
    if len(data) != ID_BYTES:
        raise ValueError(f"{allowed}, got {len(data)}")
    return _unique_id_tuple(data)


def write_unique_id(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees all of it or no file), readable by
    its owner alone."""
    write_atomically(path, data, mode=0o600)


def read_unique_id(path: str, timeout: float | None, *, rank: int = -1) -> bytes:
    """Wait for ``path`` (written by rank 0) and return its bytes."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            with open(path, "rb") as f:
                data = f.read()
            if len(data) == ID_BYTES:
                return data
        except FileNotFoundError:
            pass
        if deadline is not None and time.monotonic() > deadline:
            raise CommTimeout(f"rank {rank}: rank 0 did not write the NCCL unique id to {path} "
                              f"within {timeout:g} s (did rank 0 start?)")
        time.sleep(0.01)


def rendezvous_file(path: str, rank: int, timeout: float | None, make) -> bytes:
    """Rank 0 writes ``make()`` to ``path``; every rank returns the bytes in it."""
    if rank == 0:
        data = make()
        write_unique_id(path, data)
        return data
    return read_unique_id(path, timeout, rank=rank)


# ----------------------------------------------------------------------------- pending

class _NcclPending:
    def __init__(self, comm: "NcclComm", received, keep, done, what: str):
        self.comm, self.received, self.keep, self.done, self.what = (comm, received, keep,
                                                                     done, what)
        self._waited = False

    def wait(self):
        if not self._waited:
            self.comm._poll(self.done, self.what)
            self.comm.cupy.cuda.get_current_stream().wait_event(self.done)
            self.keep = None  # the current stream now runs after the transfer
            self._waited = True
        return self.received


# ----------------------------------------------------------------------------- NcclComm

class NcclComm(CommBase):
    """An NCCL communicator of ``size`` ranks, this process being ``rank``, on one GPU.

    ``unique_id``: NCCL's unique id (bytes or CuPy's tuple), the same on every rank (made by
    one rank with ``cupy.cuda.nccl.get_unique_id()``). ``device``: the CUDA device (default: the
    current one). ``timeout``: seconds for every wait, ``None`` for none; by default
    ``CUFLASH_COMM_TIMEOUT``, else 600.
    """

    def __init__(self, rank: int, size: int, unique_id, *, device: int | None = None,
                 timeout: float | None | str = "env"):
        # Every argument is checked before CuPy or NCCL is touched.
        self.timeout = _timeout(timeout)
        self.size = _checks.check_int(size, "size", 1)
        self.rank = check_rank(rank, "rank", self.size)
        uid = _check_unique_id(unique_id)
        if device is not None:
            device = _checks.check_int(device, "device", 0)
        import cupy
        self.cupy = cupy
        self.nccl = _nccl()
        self.device = cupy.cuda.Device(cupy.cuda.Device().id if device is None else device)
        self._comm = self._create(uid)
        with self.device:
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self._byte = getattr(self.nccl, "NCCL_UINT8", getattr(self.nccl, "NCCL_INT8", 0))
        self._transfers = None  # (start, end) timing events of each group, while timing

    # -- timing

    def start_timing(self) -> None:
        """Record the side-stream time of every transfer from now on (see transfer_seconds)."""
        self._transfers = []

    def transfer_seconds(self) -> float:
        """Seconds the side stream spent in transfers since ``start_timing`` (waits for them),
        whether or not they overlapped computation; timing stops."""
        transfers, self._transfers = self._transfers or [], None
        total = 0.0
        for start, end in transfers:
            end.synchronize()
            total += self.cupy.cuda.get_elapsed_time(start, end) / 1e3
        return total

    def _create(self, uid):
        """``NcclCommunicator(size, uid, rank)`` with the deadline: the call blocks until every
        rank has joined, so it runs in a helper thread that is waited for."""
        result = {}
        device_id = self.device.id

        def create():
            try:
                self.cupy.cuda.Device(device_id).use()
                try:
                    result["comm"] = self.nccl.NcclCommunicator(self.size, uid, self.rank)
                except TypeError:  # CuPy 14 takes the id as bytes, older versions as a tuple
                    result["comm"] = self.nccl.NcclCommunicator(self.size, unique_id_bytes(uid),
                                                                self.rank)
            except BaseException as error:  # noqa: BLE001 - re-raised below
                result["error"] = error

        thread = threading.Thread(target=create, daemon=True, name="cuflash-nccl-init")
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            raise CommTimeout(f"rank {self.rank}: NCCL communicator of {self.size} ranks not "
                              f"created within {self.timeout:g} s: not every rank joined")
        if "error" in result:
            raise CommError(f"rank {self.rank}: creating the NCCL communicator failed: "
                            f"{result['error']}") from result["error"]
        return result["comm"]

    # -- set-up helpers

    @classmethod
    def from_env(cls, *, timeout: float | None | str = "env") -> "NcclComm":
        """The communicator of a process started by ``python -m cuflash.parallel.launch`` (or
        ``torchrun``): ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (the GPU) from the
        environment, the unique id from ``CUFLASH_NCCL_ID`` (hex), ``CUFLASH_NCCL_ID_FILE``
        (written by rank 0, read by the others), or torch.distributed when initialised."""
        env = os.environ
        missing = [name for name in ("RANK", "WORLD_SIZE") if name not in env]
        if missing:
            raise RuntimeError(
                f"NcclComm.from_env needs {missing[0]} in the environment: start the "
                f"processes with `python -m cuflash.parallel.launch --gpus N script.py` or "
                f"torchrun")
        # Checked before a GPU is chosen or the unique id waited for.
        size = _env_int("WORLD_SIZE", 1)
        rank = check_rank(_env_int("RANK", 0), "RANK", size)
        local = _env_int("LOCAL_RANK", 0, default=rank)
        timeout = _timeout(timeout)
        given = _env_unique_id()
        import cupy
        visible = cupy.cuda.runtime.getDeviceCount()
        if local >= visible:  # CuPy's own error names no variable
            raise ValueError(f"LOCAL_RANK = {local} names no GPU: this process sees {visible} "
                             f"(start at most {visible} processes per node, or check "
                             f"CUDA_VISIBLE_DEVICES)")
        cupy.cuda.Device(local).use()
        nccl = _nccl()

        def make():
            return unique_id_bytes(nccl.get_unique_id())

        if given is not None:
            data = given
        elif env.get("CUFLASH_NCCL_ID_FILE"):
            data = rendezvous_file(env["CUFLASH_NCCL_ID_FILE"], rank, timeout, make)
        else:
            try:
                import torch.distributed as dist
                initialised = dist.is_available() and dist.is_initialized()
            except ImportError:
                initialised = False
            if not initialised:
                raise RuntimeError(
                    "NcclComm.from_env needs CUFLASH_NCCL_ID_FILE (set by "
                    "`python -m cuflash.parallel.launch`), CUFLASH_NCCL_ID, or an initialised "
                    "torch.distributed (then use NcclComm.from_torch())")
            return cls.from_torch(timeout=timeout, device=local)
        return cls(rank, size, data, device=local, timeout=timeout)

    @classmethod
    def from_torch(cls, group=None, *, timeout: float | None | str = "env",
                   device: int | None = None) -> "NcclComm":
        """A CuPy NCCL communicator over the ranks of a ``torch.distributed`` group, the
        unique id broadcast through torch (for torchrun users who compute with CuPy);
        ``timeout`` as for the constructor."""
        import torch
        import torch.distributed as dist

        from ._torch import group_rank_and_size
        timeout = _timeout(timeout)  # before the unique id is sent
        if device is not None:
            device = _checks.check_int(device, "device", 0)
        rank, size = group_rank_and_size(group, "an NcclComm")
        if device is None:
            device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        box = [unique_id_bytes(_nccl().get_unique_id()) if rank == 0 else None]
        source = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(box, src=source, group=group)
        return cls(rank, size, box[0], device=device, timeout=timeout)

    def close(self) -> None:
        """Destroy the NCCL communicator (after the pending work)."""
        if self._comm is not None:
            self.stream.synchronize()
            self._comm.destroy()
            self._comm = None

    def abort(self) -> None:
        if self._comm is not None:
            self._comm.abort()
            self._comm = None

    def __repr__(self):
        return f"NcclComm(rank={self.rank}, size={self.size}, device={self.device.id})"

    # -- waiting

    def _poll(self, event, what: str) -> None:
        """Wait on the host for ``event`` with the deadline, watching NCCL's error state."""
        if self.timeout is None:  # the stream waits on the GPU; nothing to watch here
            return
        deadline = time.monotonic() + self.timeout
        pause = _POLL_MIN
        while not event.done:
            if self._comm is None:
                raise CommError(f"rank {self.rank}: the NCCL communicator was aborted")
            try:
                self._comm.check_async_error()
            except Exception as error:
                self.abort()
                raise CommError(f"rank {self.rank}: NCCL reported an error during {what}: "
                                f"{error}") from error
            if time.monotonic() > deadline:
                self.abort()
                raise CommTimeout(
                    f"rank {self.rank}: {what} did not complete within {self.timeout:g} s; "
                    f"a peer has probably failed or stopped calling. The NCCL communicator "
                    f"was aborted")
            time.sleep(pause)
            pause = min(2 * pause, _POLL_MAX)

    def _issue(self, sends, recvs, what, *, ready_stream=None):
        """Issue ``sends``/``recvs`` ((array, peer) lists) in one group on the side stream
        after ``ready_stream`` (default: the current stream); returns the completion event."""
        cupy = self.cupy
        if self._comm is None:
            raise CommError(f"rank {self.rank}: the NCCL communicator is closed or aborted")
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(ready_stream or cupy.cuda.get_current_stream())
        self.stream.wait_event(ready)
        timed = self._transfers is not None
        if timed:
            start = cupy.cuda.Event()
            start.record(self.stream)
        self.nccl.groupStart()
        try:
            for x, peer in sends:
                if x.nbytes:
                    self._comm.send(x.data.ptr, x.nbytes, self._byte, peer, self.stream.ptr)
            for x, peer in recvs:
                if x.nbytes:
                    self._comm.recv(x.data.ptr, x.nbytes, self._byte, peer, self.stream.ptr)
        finally:
            self.nccl.groupEnd()
        done = cupy.cuda.Event(disable_timing=not timed)
        done.record(self.stream)
        if timed:
            self._transfers.append((start, done))
        return done

    # -- the protocol

    def check_movable(self, x, name):
        """NCCL reads the memory of this communicator's GPU: ``x`` must be a CuPy array there
        (a NumPy one was refused by CuPy without naming the argument, and one of another GPU
        handed to NCCL)."""
        if array_module(x) is numpy:
            raise TypeError(f"{name} must be a CuPy array (NcclComm moves GPU memory), got "
                            f"{type(x).__module__}.{type(x).__name__}")
        if x.device.id != self.device.id:
            raise ValueError(f"{name} must be on device {self.device.id}, this NcclComm's, got "
                             f"device {x.device.id}")

    def exchange(self, send, dst, src, recv_like=None):
        # NCCL would fail, or wait, on the GPU for a peer that is no rank of the ring.
        dst, src = check_rank(dst, "dst", self.size), check_rank(src, "src", self.size)
        send, like = _send_and_like(send, recv_like)
        self._check_transported(send, "send")
        cupy = self.cupy
        with self.device:
            send = [cupy.ascontiguousarray(x) for x in send]
            received = [cupy.empty(x.shape, x.dtype) for x in like]
            done = self._issue([(x, dst) for x in send], [(x, src) for x in received],
                               f"the exchange with ranks {dst} (send) and {src} (receive)")
        return _NcclPending(self, received, send, done,
                            f"the exchange with ranks {dst} (send) and {src} (receive)")

    def all_to_all(self, arrays):
        """``arrays[j]`` to rank ``j``, CuPy arrays of any shape; what two ranks send each
        other must have one dtype (``ValueError`` on every rank otherwise). One small
        all-gather of the arrays' shapes comes first (:meth:`CommBase._received_shapes`), so
        that every receive buffer has the size its sender sends: ranks whose arrays differ
        never leave NCCL waiting for bytes that do not come, and a rank that refuses its
        arrays makes every rank raise."""
        cupy = self.cupy
        with self.device:
            arrays = self._all_to_all_arrays(arrays, cupy)
            shapes = self._received_shapes(arrays)
            received = [arrays[r].copy() if r == self.rank
                        else cupy.empty(shapes[r], arrays[r].dtype) for r in range(self.size)]
            others = [r for r in range(self.size) if r != self.rank]
            done = self._issue([(arrays[r], r) for r in others],
                               [(received[r], r) for r in others], "an all-to-all")
            return _NcclPending(self, received, arrays, done, "an all-to-all").wait()

    def all_gather(self, x):
        """All-gather a small array (NumPy or CuPy) of one shape and dtype on every rank (NCCL
        waits, until the timeout, where the sizes differ); NumPy inputs never touch the
        current stream (the copies run on the side stream), so they do not wait for queued
        work."""
        cupy = self.cupy
        if array_module(x) is numpy:
            return self._all_gather_host(x)
        with self.device:
            x_d = cupy.ascontiguousarray(x)
            out = cupy.empty((self.size,) + x_d.shape, x_d.dtype)
            done = self._gather(x_d, out)
            _NcclPending(self, None, x_d, done, "an all-gather").wait()
            return [out[r] for r in range(self.size)]

    def _all_gather_host(self, x):
        cupy = self.cupy
        with self.device, self.stream:
            x_d = cupy.asarray(numpy.ascontiguousarray(x))
            out = cupy.empty((self.size,) + x_d.shape, x_d.dtype)
            done = self._gather(x_d, out, ready_stream=self.stream)
            self._poll(done, "an all-gather")
            parts = out.get(stream=self.stream)
            self.stream.synchronize()
        return [parts[r] for r in range(self.size)]

    def _gather(self, x_d, out, ready_stream=None):
        if self._comm is None:
            raise CommError(f"rank {self.rank}: the NCCL communicator is closed or aborted")
        cupy = self.cupy
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(ready_stream or cupy.cuda.get_current_stream())
        self.stream.wait_event(ready)
        self._comm.allGather(x_d.data.ptr, out.data.ptr, x_d.nbytes, self._byte,
                             self.stream.ptr)
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return done
