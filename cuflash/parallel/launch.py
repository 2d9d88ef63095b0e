"""Start one process per GPU for CuPy programs: ``python -m cuflash.parallel.launch``.

::

    python -m cuflash.parallel.launch --gpus 2 script.py [args ...]
    python -m cuflash.parallel.launch --gpus 2 -m package.module [args ...]

Each process gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT`` (so ``torch.distributed`` can initialise from the environment
too) and ``CUFLASH_NCCL_ID_FILE``: a path in a fresh directory where rank 0 writes NCCL's
unique id and the others read it (``NcclComm.from_env()`` does both). ``LOCAL_RANK`` is the GPU
the process should use (``from_env`` selects it).

When a process exits with an error, the launcher stops the others (SIGTERM, then SIGKILL after
``--grace`` seconds) and exits with that process's code (128 + N for one killed by signal N), so
one failing rank never leaves the others waiting. ``--timeout`` sets ``CUFLASH_COMM_TIMEOUT``,
the communicators' wait limit.
A launcher stopped by SIGTERM or SIGHUP stops its processes the same way, removes its rendezvous
directory, and exits with 128 + the signal.

Several nodes: run the launcher on every node with ``--nnodes``, ``--node-rank`` and
``--rdzv-dir`` (a fresh directory on a file system every node sees; node 0's launcher removes
the unique id from it when the run ends).
"""

from __future__ import annotations

import argparse
import collections.abc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from cuflash import _checks

from .comm import check_rank

__all__ = ["launch", "main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: Sequence[str], gpus: int, *, nnodes: int = 1, node_rank: int = 0,
           rdzv_dir: str | None = None, timeout: float | None = None, grace: float = 5.0,
           env: dict | None = None, master_addr: str | None = None,
           master_port: int | None = None, deadline: float | None = None) -> int:
    """Run ``command`` (an argv list, e.g. ``[sys.executable, "script.py"]``) in ``gpus``
    processes on this node; returns the exit code (0 when every process succeeded).

    ``deadline``: seconds after which the processes still running are stopped and
    ``TimeoutError`` is raised (``None``: wait as long as they run).

    ``master_addr`` and ``master_port``, when given, are the processes' ``MASTER_ADDR`` and
    ``MASTER_PORT``; otherwise those of the environment, else ``127.0.0.1`` and a free port on
    one node, and unset on several (``_master``)."""
    command = _check_command(command)
    gpus = _checks.check_int(gpus, "--gpus", 1)
    nnodes = _checks.check_int(nnodes, "--nnodes", 1)
    node_rank = check_rank(node_rank, "--node-rank", nnodes)
    timeout = _seconds(timeout, "--timeout", "a number of seconds (0: no timeout)")
    grace = _seconds(grace, "--grace", "a number of seconds")
    deadline = _seconds(deadline, "deadline", "a positive number of seconds or None")
    if deadline == 0:
        raise ValueError("deadline must be a positive number of seconds or None, got 0")
    if master_port is not None:  # 0 would read as not given, and pass on the environment's
        master_port = _checks.check_int(master_port, "--master-port", 1, 65535)
    if master_addr is not None and not isinstance(master_addr, str):
        raise TypeError(f"--master-addr must be a host name or address (a str), got "
                        f"{master_addr!r} of type {type(master_addr).__name__}")
    if env is not None and not isinstance(env, collections.abc.Mapping):
        raise TypeError(f"env must be a dict of environment variables or None, got "
                        f"{type(env).__name__}")
    if rdzv_dir is not None:
        rdzv_dir = _check_directory(rdzv_dir, "--rdzv-dir")
    if nnodes > 1 and rdzv_dir is None:
        raise ValueError("with several nodes, --rdzv-dir must name a directory that every "
                         "node sees")
    temporary = None
    if rdzv_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="cuflash-launch-")
        rdzv_dir = temporary.name
    try:
        os.makedirs(rdzv_dir, exist_ok=True)
    except OSError as error:  # a file in the way, no permission: the user's argument
        raise ValueError(f"--rdzv-dir {rdzv_dir}: cannot make the directory "
                         f"({error.strerror or error})") from None
    id_file = os.path.join(rdzv_dir, "nccl_unique_id")
    if node_rank == 0:
        _remove(id_file)  # a stale id from an earlier run would mislead the other ranks
    base = dict(os.environ if env is None else env)
    base.update({
        "WORLD_SIZE": str(gpus * nnodes),
        "LOCAL_WORLD_SIZE": str(gpus),
        "CUFLASH_NCCL_ID_FILE": id_file,
    })
    base.update(_master(base, master_addr, master_port, nnodes))
    if timeout is not None:
        base["CUFLASH_COMM_TIMEOUT"] = str(timeout)
    processes = []
    try:
        for local in range(gpus):
            child = dict(base, RANK=str(node_rank * gpus + local), LOCAL_RANK=str(local))
            processes.append(subprocess.Popen(command, env=child))
        return _watch(processes, grace, deadline)
    except KeyboardInterrupt:
        _stop(processes, grace, signal.SIGINT)
        return 130
    finally:
        _stop(processes, grace)
        if temporary is not None:
            temporary.cleanup()
        elif node_rank == 0:  # the run is over: no rank of it reads the id any more, and the
            _remove(id_file)  # ranks of a later run in this directory must not read it


def _check_command(command) -> list:
    """``command`` as the argv list the processes run: a list or tuple of strings (or paths),
    not empty. A string would be taken apart into its characters."""
    if not isinstance(command, (list, tuple)):
        raise TypeError(f"command must be a list of arguments, such as [sys.executable, "
                        f"'script.py'], got {type(command).__name__} {command!r}")
    if not command:
        raise ValueError("command must be a list of arguments, such as [sys.executable, "
                         "'script.py'], got an empty one")
    for argument in command:
        if not isinstance(argument, (str, os.PathLike)):
            raise TypeError(f"command must be a list of arguments, each a string or a path, "
                            f"got {argument!r} of type {type(argument).__name__}")
    return list(command)


def _check_directory(path, name: str) -> str:
    """``path``, a directory's name (a str or a path; bytes would not join the file names
    below it), as a str; ``TypeError`` or ``ValueError`` naming ``name`` otherwise."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a directory's name (a str or a path), got {path!r} of "
                        f"type {type(path).__name__}")
    if not path:
        raise ValueError(f"{name} must name a directory, got an empty name")
    return path


def _seconds(value, name: str, allowed: str) -> float | None:
    """``value`` (None stays None) as a number of seconds, at least 0: checked before any
    process starts, since ``_watch`` and ``_stop`` would only fail on it once they run."""
    if value is None:
        return None
    seconds = _checks._real(value, name, allowed, allowed)
    if not seconds >= 0:  # NaN fails too
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return seconds


def _remove(path: str) -> None:
    """Remove ``path`` where it is there."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _master(env: dict, master_addr: str | None, master_port: int | None, nnodes: int) -> dict:
    """``MASTER_ADDR`` and ``MASTER_PORT`` for the processes: those given, else the
    environment's, else, on one node, 127.0.0.1 and a free port. On several nodes each launcher
    would make up a different port and name itself: the ranks of ``torch.distributed`` would
    never meet, so what is not given is left unset (its initialisation then says what is
    missing)."""
    addr = master_addr or env.get("MASTER_ADDR") or (None if nnodes > 1 else "127.0.0.1")
    port = master_port or env.get("MASTER_PORT") or (None if nnodes > 1 else _free_port())
    return {name: str(value) for name, value in (("MASTER_ADDR", addr), ("MASTER_PORT", port))
            if value is not None}


def _watch(processes, grace: float, deadline: float | None = None) -> int:
    """Wait for every process; on the first failure stop the others and return its code.
    Past ``deadline`` seconds, ``TimeoutError`` (the caller stops the processes)."""
    end = None if deadline is None else time.monotonic() + deadline
    while True:
        running = False
        for rank, p in enumerate(processes):
            code = p.poll()
            if code is None:
                running = True
            elif code != 0:
                others = [r for r, q in enumerate(processes) if q.poll() is None]
                if others:
                    print(f"cuflash.parallel.launch: rank {rank} exited with code {code}; "
                          f"stopping rank{'s' if len(others) > 1 else ''} "
                          f"{', '.join(map(str, others))}", file=sys.stderr, flush=True)
                _stop(processes, grace)
                return code
        if not running:
            return 0
        if end is not None and time.monotonic() > end:
            raise TimeoutError(f"the processes did not finish within {deadline:g} s")
        time.sleep(0.05)


def _stop(processes, grace: float, first=signal.SIGTERM) -> None:
    alive = [p for p in processes if p.poll() is None]
    for p in alive:
        try:
            p.send_signal(first)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


_STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Stopped(BaseException):
    """The launcher received ``signum`` (SIGTERM, SIGHUP), raised in its main thread so that
    ``launch`` stops the processes and removes its files on the way out: the signal's default
    action would end the launcher at once and leave the ranks running, holding their GPUs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame):
    for other in _STOPPING_SIGNALS:  # a second signal must not cut the stopping short
        signal.signal(other, signal.SIG_IGN)
    raise _Stopped(signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cuflash.parallel.launch",
        description="Start one process per GPU (RANK, LOCAL_RANK, WORLD_SIZE and an NCCL "
                    "rendezvous file in the environment); stop them all if one fails.")
    parser.add_argument("--gpus", type=int, required=True, help="processes (GPUs) on this node")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's index")
    parser.add_argument("--rdzv-dir", default=None,
                        help="directory for the NCCL unique id (shared by all nodes; default: "
                             "a fresh temporary directory)")
    parser.add_argument("--master-addr", default=None,
                        help="MASTER_ADDR for torch.distributed (default: MASTER_ADDR of the "
                             "environment, else 127.0.0.1 on one node, unset on several)")
    parser.add_argument("--master-port", type=int, default=None,
                        help="MASTER_PORT for torch.distributed (default: MASTER_PORT of the "
                             "environment, else a free port on one node, unset on several)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="communication timeout in seconds, 0 for none "
                             "(CUFLASH_COMM_TIMEOUT)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds between SIGTERM and SIGKILL when stopping ranks")
    parser.add_argument("-m", dest="module", action="store_true",
                        help="run the target as a module (python -m target)")
    parser.add_argument("target", help="script (or module with -m)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the target")
    options = parser.parse_args(argv)
    command = [sys.executable] + (["-m", options.target] if options.module
                                  else [options.target]) + list(options.args)
    previous = {signum: signal.signal(signum, _raise_stopped) for signum in _STOPPING_SIGNALS}
    try:
        code = launch(command, options.gpus, nnodes=options.nnodes,
                      node_rank=options.node_rank, rdzv_dir=options.rdzv_dir,
                      timeout=options.timeout, grace=options.grace,
                      master_addr=options.master_addr, master_port=options.master_port)
    except ValueError as error:
        parser.error(str(error))
        return 2
    except _Stopped as stopped:
        print(f"cuflash.parallel.launch: stopped by signal {stopped.signum}; the ranks were "
              f"stopped", file=sys.stderr, flush=True)
        return 128 + stopped.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # A process killed by signal N has the code -N; sys.exit(-N) would exit with 256 - N, where
    # shells report such a process as 128 + N.
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
