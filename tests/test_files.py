"""cuflash._files.write_atomically: whole or not at all, and an existing file's permissions kept."""

from __future__ import annotations

import os
import stat

import pytest
from cut_writes import FULL_DISK, cut_short_fdopen, deny_writes

from cuflash import _files


def _permissions(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "private.png"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    _files.write_atomically(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert _permissions(path) == 0o600


def test_kept_permissions_are_never_wider_than_asked(tmp_path):
    path = tmp_path / "id"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    _files.write_atomically(str(path), b"secret", mode=0o600)
    assert _permissions(path) == 0o600


def test_a_new_file_gets_the_mode_less_the_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        _files.write_atomically(str(tmp_path / "new.json"), b"{}")
    finally:
        os.umask(umask)
    assert _permissions(tmp_path / "new.json") == 0o644


def test_a_file_that_cannot_be_written_is_left_as_it_was(tmp_path, monkeypatch):
    """As open() refuses it (os.access decides, so the test holds for any user)."""
    path = tmp_path / "read-only.png"
    path.write_bytes(b"old")
    monkeypatch.setattr(os, "access", lambda where, how: not (where == str(path)
                                                               and how == os.W_OK))
    with pytest.raises(PermissionError):
        _files.write_atomically(str(path), b"new")
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["read-only.png"]


@pytest.mark.parametrize("failure", [FULL_DISK, KeyboardInterrupt()],
                         ids=["full disk", "Ctrl-C"])
def test_a_write_cut_short_leaves_the_old_file_and_nothing_beside_it(tmp_path, monkeypatch,
                                                                     failure):
    """A write that fails part way (a full disk) or is interrupted (Ctrl-C, a BaseException)
    leaves the file that was there, whole, and removes the new file beside it."""
    path = tmp_path / "report.md"
    path.write_bytes(b"the earlier report")
    monkeypatch.setattr(os, "fdopen", cut_short_fdopen(4, failure))
    with pytest.raises(type(failure)):
        _files.write_atomically(str(path), b"a new report, longer than four bytes")
    assert path.read_bytes() == b"the earlier report"
    assert os.listdir(tmp_path) == ["report.md"]


def test_why_not_writable_names_what_stops_the_write(tmp_path, monkeypatch):
    """The reasons the examples refuse an output before any work; None where it can be written."""
    locked, read_only = tmp_path / "locked", tmp_path / "read-only.md"
    locked.mkdir()
    read_only.write_text("old")
    deny_writes(monkeypatch, locked, read_only)
    assert _files.why_not_writable(str(tmp_path / "new.md")) is None
    assert _files.why_not_writable(str(tmp_path)) == " is a folder; give a file name"
    missing = tmp_path / "missing"
    assert _files.why_not_writable(str(missing / "a.md")) == f": folder {missing} does not exist"
    assert _files.why_not_writable(str(locked / "a.md")) == f": folder {locked} is not writable"
    assert _files.why_not_writable(str(read_only)) == " is read-only"
