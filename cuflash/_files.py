"""Files cuflash writes for its user: whole or not at all.

One home for the atomic write, which the command line (``cuflash.cli``: ``--png``, ``--plot``)
and the multi-GPU package (``cuflash.parallel``: ``check --json``, the NCCL unique id) share;
it imports nothing beyond the standard library, so either can use it without the other.
"""

from __future__ import annotations

import contextlib
import os
import secrets


def write_atomically(path: str, data: bytes, *, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` whole or not at all: into a new file beside it, renamed over
    ``path`` once written, so that a write that fails (a full disk, an interruption) leaves what
    was there, and a reader sees the old file or the new one, never part of it. The new file is
    created with ``mode`` less the umask (by default what ``open()`` gives a new file; the umask
    is applied by the system, never read or changed here, which would race with other threads).
    Raises ``OSError``, having removed the file beside it."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
