"""Writes that fail: files cut short by a full disk or Ctrl-C part way through, and paths a user
may not write, for the tests of what cuflash and its examples write (``cuflash._files``)."""

from __future__ import annotations

import errno
import os

FULL_DISK = OSError(errno.ENOSPC, "No space left on device")


class CutShortFile:
    """``file``, whose first write keeps ``keep`` bytes and then raises ``failure``."""

    def __init__(self, file, keep: int, failure: BaseException):
        self.file, self.keep, self.failure = file, keep, failure

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.file.close()

    def fileno(self):
        return self.file.fileno()

    def write(self, data):
        self.file.write(data[:self.keep])
        self.file.flush()
        raise self.failure


def cut_short_fdopen(keep: int, failure: BaseException = FULL_DISK):
    """An ``os.fdopen`` whose files are cut short (``CutShortFile``): the real one's files,
    taken now, so that it may replace ``os.fdopen`` itself."""
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        return CutShortFile(real(fd, *args, **kwargs), keep, failure)
    return fdopen


def deny_writes(monkeypatch, *paths) -> None:
    """``os.access`` says no write to ``paths`` (files or folders), as for a user other than
    root, whom no permission bit stops."""
    denied = {os.fspath(p) for p in paths}
    access = os.access

    def patched(path, mode):
        return not (os.fspath(path) in denied and mode & os.W_OK) and access(path, mode)
    monkeypatch.setattr(os, "access", patched)
