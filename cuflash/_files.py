"""Files cuflash writes for its user: whole or not at all.

One home for the atomic write, which the command line (``cuflash.cli``: ``--png``, ``--plot``)
and the multi-GPU package (``cuflash.parallel``: ``check --json``, the NCCL unique id) share;
it imports nothing beyond the standard library, so either can use it without the other.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat


def write_atomically(path: str, data: bytes, *, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` whole or not at all: into a new file beside it, renamed over
    ``path`` once written, so that a write that fails (a full disk, an interruption) leaves what
    was there, and a reader sees the old file or the new one, never part of it. The new file is
    created with ``mode`` less the umask (by default what ``open()`` gives a new file; the umask
    is applied by the system, never read or changed here, which would race with other threads).
    A file already at ``path`` is replaced only where ``open()`` could write it, and its
    permissions stay (never wider than ``mode``): the rename needs only the directory's, and would
    otherwise replace a read-only file, or make a private one readable by others.
    Raises ``OSError``, having removed the file beside it."""
    kept = _permissions_to_keep(path)
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            if kept is not None:
                os.fchmod(file.fileno(), kept & mode)
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def why_not_writable(path: str) -> str | None:
    """What stops :func:`write_atomically` from writing ``path``, as the end of a sentence that
    starts with the path (None where nothing does): a folder at ``path``, a missing or read-only
    folder for it (through a symbolic link, the folder of the file it names), or a file there
    that may not be written, which the atomic write replaces only where ``open()`` could."""
    target = os.path.realpath(path)
    if os.path.isdir(path):
        return " is a folder; give a file name"
    if not os.path.isdir(os.path.dirname(target)):
        return f": folder {os.path.dirname(path) or '.'} does not exist"
    if not os.access(os.path.dirname(target), os.W_OK | os.X_OK):
        return f": folder {os.path.dirname(target)} is not writable"
    if os.path.exists(target) and not os.access(target, os.W_OK):
        return " is read-only"
    return None


def _permissions_to_keep(path: str) -> int | None:
    """The permission bits of the file at ``path``, None where there is none; ``PermissionError``
    where it is there but not writable, as ``open(path, "wb")`` would raise."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    if not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return stat.S_IMODE(status.st_mode)
