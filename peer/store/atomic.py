"""The one way bertswarm replaces a file: a temp file next to the target, fsync, ``os.replace``, fsync of the directory.

A reader sees the old content or the new, never a torn file, and after a crash (power loss included) the target is
one of the two. On any failure before the rename the temp file is removed and the target is untouched.

Temp files are named ``.tmp-<target name>-<random>`` in the target's directory (the same filesystem, so the rename
is atomic); a writer killed before its rename leaves one behind, which whoever owns the directory may remove
(the checkpoint writer removes every ``.tmp-*`` of its root). Files get the mode any new file gets (``0o666`` less
the umask), not ``mkstemp``'s ``0600``: published checkpoints and caches must stay readable by others.

Standard library only: the corpus cache, the address file and the test probes import it without torch.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"
_NEW_FILE = 0o666  # less the umask, which os.open applies


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None, durable: bool = True):
    """Replace ``path`` with ``data`` atomically. ``mode``: exact permission bits (default: ``0o666`` less the umask).
    ``durable=False`` skips both fsyncs: still atomic for readers, but a power loss may lose the write (for files
    that are rewritten often and matter only while the process runs)."""
    target = Path(path)
    fd, tmp = _create_temp(target, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None, durable: bool = True):
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode, durable=durable)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """For writers that want a file name (``safetensors.torch.save_file``): yields a temp path in the target's
    directory to write; when the block ends without an exception the file is fsynced, renamed over ``path`` and the
    directory fsynced. On an exception, the temp file is removed and ``path`` is untouched.

    The file keeps the mode it was created with (``mode``, or ``0o666`` less the umask) even if the writer
    recreates it with another (safetensors writes ``0600``)."""
    target = Path(path)
    fd, tmp = _create_temp(target, mode)
    try:
        wanted = os.fstat(fd).st_mode & 0o7777
        os.close(fd)
        yield tmp
        if os.stat(tmp).st_mode & 0o7777 != wanted:
            os.chmod(tmp, wanted)
        fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file, or a directory (which makes the names in it, i.e. creations and renames, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(target: Path, mode: int | None) -> tuple[int, Path]:
    """A new, empty temp file next to ``target``: ``(fd open for writing, path)``."""
    while True:
        tmp = target.with_name(f"{TMP_PREFIX}{target.name}-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _NEW_FILE if mode is None else 0o600)
        except FileExistsError:
            continue
        break
    if mode is not None:
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
    return fd, tmp
