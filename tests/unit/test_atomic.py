"""The one atomic write: content replaced whole, permissions as any new file, and on any failure the old file intact
and no temp file left."""

import errno
import os
import stat

import pytest

from peer.store import atomic
from peer.store.atomic import atomic_path, atomic_write_bytes, atomic_write_text, fsync_path


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(atomic.TMP_PREFIX))


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_write_replace_and_permissions(tmp_path, umask_022):
    target = tmp_path / "file.json"
    atomic_write_bytes(target, b"one")
    assert target.read_bytes() == b"one" and mode(target) == 0o644  # not mkstemp's 0600
    atomic_write_text(target, "twö\n")
    assert target.read_text(encoding="utf-8") == "twö\n"
    atomic_write_text(str(target), "", mode=0o600)
    assert target.read_bytes() == b"" and mode(target) == 0o600
    atomic_write_text(target, "no fsync", durable=False)
    assert target.read_text() == "no fsync"
    assert leftovers(tmp_path) == []


def test_every_step_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_bytes(tmp_path / "a", b"x")
    assert synced == [False, True]  # the file, then its directory (the rename)
    synced.clear()
    with atomic_path(tmp_path / "b") as tmp:
        tmp.write_bytes(b"y")
    assert synced == [False, True]
    synced.clear()
    atomic_write_bytes(tmp_path / "c", b"z", durable=False)
    assert synced == []


@pytest.mark.parametrize("step", ["write", "fsync", "replace"])
def test_failure_mid_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch, step):
    target = tmp_path / "state"
    atomic_write_bytes(target, b"old")

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, step, fail)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new" * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_partial_writes_are_completed(tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:3])))  # a short write each call
    atomic_write_bytes(tmp_path / "f", b"0123456789")
    assert (tmp_path / "f").read_bytes() == b"0123456789"


def test_atomic_path_for_writers_that_want_a_name(tmp_path, umask_022):
    target = tmp_path / "weights.safetensors"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(atomic.TMP_PREFIX) and not target.exists()
        tmp.unlink()  # like safetensors: the writer recreates the file, 0600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"new")
        os.close(fd)
    assert target.read_bytes() == b"new" and mode(target) == 0o644
    assert leftovers(tmp_path) == []


def test_atomic_path_failure_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "state"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_atomic_path_fsync_failure_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "state"
    target.write_bytes(b"old")

    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output"), atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_unwritable_directory_is_an_os_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    with pytest.raises(NotADirectoryError):
        atomic_write_text(blocker / "x", "data")
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "x", "data")
    assert blocker.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_fsync_path_takes_files_and_directories(tmp_path):
    (tmp_path / "f").write_text("x")
    fsync_path(tmp_path / "f")
    fsync_path(tmp_path)
