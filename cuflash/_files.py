"""Files cuflash writes for its user: whole or not at all.

One home for the atomic write, which the command line (``cuflash.cli``: ``--png``, ``--plot``)
and the multi-GPU package (``cuflash.parallel``: ``check --json``, the NCCL unique id) share;
it imports nothing beyond the standard library, so either can use it without the other.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomically(path: str, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all: into a new file beside it, renamed over
    ``path`` once written, so that a write that fails (a full disk, an interruption) leaves what
    was there, and a reader sees the old file or the new one, never part of it. The new file
    has ``mode``, by default the one ``open()`` gives a new file (0o666 less the umask). Raises
    ``OSError``, having removed the file beside it."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        temporary = None
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.remove(temporary)
