"""Hugging Face-compatible checkpoints of a run, written so that a crash at any instant leaves only complete ones.

Layout of a checkpoint root (``--checkpoint-dir``)::

    <root>/epoch-000123/        the weights after the swarm's global step (epoch) 123
        config.json             the model's transformers ``BertConfig`` (with ``architectures``)
        model.safetensors       the weights, tied duplicates dropped as ``save_pretrained`` does; never pickle
        tokenizer.json vocab.txt tokenizer_config.json   (written by transformers' save_pretrained, plus vocab.txt)
        bertswarm.json          run id, manifest and its fingerprint, epoch, samples, eval metrics, sha256 of weights
    <root>/latest               relative symlink to the checkpoint written last, e.g. ``latest -> epoch-000123``
    <root>/.lock                flock held by the one process writing checkpoints here
    <root>/.tmp-*               work in progress or a crashed writer's leftovers: never read, removed by the next write

Every ``epoch-*`` directory, and ``<root>/latest``, is a ``from_pretrained`` target:
``AutoModelForMaskedLM.from_pretrained(f"{root}/latest")``, ``pipeline("fill-mask", model=f"{root}/latest")``;
:func:`latest_path` gives the checkpoint ``latest`` names (validated, with a fallback to the newest).
``bertswarm.json`` is :class:`peer.store.metadata.CheckpointMetadata`; verified loading (``--init-from``) is
:mod:`peer.store.load`, over HTTP through :mod:`peer.store.remote`.

Crash safety: a checkpoint is assembled in ``<root>/.tmp-*``; every file and then the directory are fsynced, the
directory is renamed to ``epoch-NNNNNN`` (atomic) and the root fsynced, so an ``epoch-*`` directory is only ever
visible complete. Only then is ``latest`` replaced: a new relative symlink ``.tmp-latest-<pid> -> epoch-NNNNNN`` is
created and renamed over ``latest`` with ``os.replace`` (atomic), and the root fsynced, so ``latest`` always exists
once a first checkpoint does and never dangles or names a partial checkpoint. Pruning renames a checkpoint to ``.tmp-*``
before deleting it, and never prunes the one ``latest`` names. ``tests/unit/test_checkpoint.py`` SIGKILLs a writer at
each of these steps.

Why ``latest`` is a symlink: so that ``from_pretrained(<root>/latest)`` and ``pipeline(model=<root>/latest)`` work.
It is relative and names a sibling, so a copy of the whole root that keeps symlinks (``rsync -a``, ``cp -a``, tar)
stays valid; tools that dereference symlinks (S3 sync, Hub uploads, some FUSE mounts) turn it into a full copy of
that checkpoint, which still loads. Its target is validated on read (it must name a complete ``epoch-*`` checkpoint of
the root, never a path elsewhere, which matters when the root is served over HTTP). Roots written by older versions
have a text file ``latest`` holding the name instead; :func:`latest_path` still reads those (backwards compatible),
and the next write replaces the file with a symlink.

A checkpoint is identified by its epoch (the swarm's weights after that global step). Writing an epoch that already
exists for the same run keeps the existing checkpoint; an ``epoch-*`` of another run, or a damaged one, is replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tokenizers import Tokenizer

from peer.data import shards
from peer.data.tokenizer import save_pretrained as save_tokenizer
from peer.run.manifest import RunManifest
from peer.store.atomic import TMP_PREFIX, fsync_path
from peer.store.errors import CheckpointError
from peer.store.metadata import METADATA_FILE, CheckpointMetadata, run_stamp
from peer.store.state import unique_state

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LATEST_FILE = "latest"
LOCK_FILE = ".lock"
NAME = re.compile(r"epoch-(\d{6,})")
"""what an ``epoch-*`` checkpoint directory is called"""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint as listed: its ``bertswarm.json`` (the sha256 of the weights is verified on load)."""

    name: str
    path: Path
    run_id: str
    fingerprint: str
    """sha256 of the run manifest (``RunManifest.fingerprint``)."""
    epoch: int
    samples_seen: int
    eval_metrics: dict[str, float | None]
    """e.g. ``{"mlm_loss": 2.31, "mlm_accuracy": 0.41}``; a non-finite value is stored as ``None``."""
    sha256: str
    """of ``model.safetensors``"""
    created_at: str
    """ISO-8601 UTC, seconds"""
    size_bytes: int
    """all files of the checkpoint together"""

    def to_dict(self) -> dict:
        """JSON-ready, for the coordinator's HTTP listing; the local path is left out (clients fetch by name)."""
        data = dataclasses.asdict(self)
        del data["path"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:06d}"


# --- writing ------------------------------------------------------------------------------------------------------


def check_writable(root: str | Path) -> None:
    """Fail fast, before any work, when checkpoints could not be written under ``root`` (created if missing)."""
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CheckpointError(root, f"not writable ({e.strerror}); pick a writable directory") from None


def write_checkpoint(
    root: str | Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    manifest: RunManifest,
    *,
    epoch: int,
    samples_seen: int,
    eval_metrics: Mapping[str, float],
    keep: int = 5,
) -> Path:
    """Write ``<root>/epoch-NNNNNN`` from a ``BertForMaskedLM``/``BertForPreTraining``, point ``latest`` at it and
    prune to the newest ``keep`` checkpoints (by epoch; the one ``latest`` names is always kept). Returns its path.

    Crash-safe (see the module docstring); one writer per root at a time (a second process gets a
    ``CheckpointError``). An unwritable root or a full disk raises ``CheckpointError`` naming the root, and leaves no
    partial checkpoint behind. The tiny preset takes ~0.1 s; the time goes into hashing and fsyncing the weights.
    """
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in unique_state(model).items()}
    config = json.loads(model.config.to_json_string())
    config["architectures"] = [type(model).__name__]  # as save_pretrained records it
    return write_state_checkpoint(
        root,
        tensors,
        config,
        tokenizer,
        run_stamp(manifest),
        epoch=epoch,
        samples_seen=samples_seen,
        eval_metrics=eval_metrics,
        keep=keep,
    )


def write_state_checkpoint(
    root: str | Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping,
    tokenizer: Tokenizer,
    run: Mapping,
    *,
    epoch: int,
    samples_seen: int,
    eval_metrics: Mapping[str, float],
    keep: int = 5,
) -> Path:
    """:func:`write_checkpoint` from parts: CPU ``tensors`` without tied duplicates, the ``config.json`` content, and
    ``run`` as made by :func:`run_stamp` (or read from another checkpoint's ``bertswarm.json``)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if epoch < 0 or samples_seen < 0:
        raise ValueError(f"epoch and samples_seen must be >= 0, got {epoch} and {samples_seen}")
    root = Path(root).expanduser()
    name = checkpoint_name(epoch)
    target = root / name
    started = time.perf_counter()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _writer_lock(root):
            _remove_leftovers(root)
            existing = read_info(target)
            if existing is not None and existing.fingerprint == run["fingerprint"]:
                logger.info("checkpoint %s of this run exists already; keeping it", target)
            else:
                tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}"  # unique: we hold the lock, leftovers are gone
                os.mkdir(tmp)  # not mkdtemp: its mode 0700 would make the published checkpoint private
                try:
                    _fill(tmp, tensors, config, tokenizer, run, epoch, samples_seen, eval_metrics)
                    _publish(root, tmp, target)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            _point_latest(root, name)
            _prune(root, keep, name)
    except OSError as e:
        raise _write_error(root, e.errno, e.strerror or str(e)) from None
    except SafetensorError as e:  # the Rust writer reports I/O errors as "... (os error N)"; anything else is a bug
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        raise _write_error(root, int(found.group(1)), str(e)) from None
    elapsed = time.perf_counter() - started
    size = _dir_size(target)
    logger.info("checkpoint %s written in %.2f s (%.1f MB)", target, elapsed, size / 1e6)
    return target


def _fill(tmp: Path, tensors, config, tokenizer, run, epoch: int, samples_seen: int, eval_metrics) -> None:
    _write_new(tmp / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    save_file(dict(tensors), str(tmp / MODEL_FILE), metadata={"format": "pt"})  # "format" is required by transformers
    os.chmod(tmp / MODEL_FILE, stat.S_IMODE(os.stat(tmp / CONFIG_FILE).st_mode))  # safetensors creates it 0600
    sha256, model_bytes = file_sha256(tmp / MODEL_FILE)
    save_tokenizer(tokenizer, tmp, model_max_length=int(config.get("max_position_embeddings", 512)))
    for path in sorted(tmp.iterdir()):
        fsync_path(path)
    metadata = CheckpointMetadata.create(
        run, epoch=epoch, samples_seen=samples_seen, eval_metrics=eval_metrics, sha256=sha256, model_bytes=model_bytes
    )
    # Written last: the rename below is what publishes the checkpoint, but a copy made with tools that do not
    # preserve atomicity still shows a complete checkpoint only when this file is there.
    _write_new(tmp / METADATA_FILE, metadata.to_json().encode())
    fsync_path(tmp / METADATA_FILE)
    fsync_path(tmp)


def _publish(root: Path, tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``. A ``target`` of another run (or a damaged one) is first moved to a
    ``.tmp-`` name: a crash between the two renames loses that directory, never leaves a partial one visible."""
    aside = None
    if target.exists():
        aside = root / f"{TMP_PREFIX}replaced-{target.name}"
        logger.warning("%s is not a checkpoint of this run (or is damaged); replacing it", target)
        os.rename(target, aside)
    os.rename(tmp, target)
    fsync_path(root)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _point_latest(root: Path, name: str) -> None:
    """Make ``<root>/latest`` a relative symlink to ``name``, atomically: a temp symlink renamed over it (also over an
    old-format text file), then the root fsynced. Readers see the old target or the new one, never no ``latest``."""
    tmp = root / f"{TMP_PREFIX}{LATEST_FILE}-{os.getpid()}"  # unique: we hold the lock, leftovers are gone
    os.symlink(name, tmp)
    try:
        os.replace(tmp, root / LATEST_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(root)


def _prune(root: Path, keep: int, latest_name: str) -> None:
    doomed = [info for info in list_checkpoints(root)[keep:] if info.name != latest_name]
    if not doomed:
        return
    try:
        trash = []
        for info in doomed:  # renamed first: a crash mid-delete then leaves only a .tmp- directory
            trash.append(root / f"{TMP_PREFIX}pruned-{info.name}")
            os.rename(info.path, trash[-1])
        fsync_path(root)
        for path in trash:
            shutil.rmtree(path)
    except OSError as e:
        logger.warning("could not prune old checkpoints in %s (%s); they stay", root, e.strerror or e)
        return
    logger.info("pruned %s", ", ".join(info.name for info in doomed))


def _remove_leftovers(root: Path) -> None:
    """Remove ``.tmp-*`` entries; safe because they can only belong to a crashed writer (we hold the lock)."""
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX):
            logger.info("removing %s, left over by an interrupted checkpoint write", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


@contextlib.contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(
                root, "being written by another process; give each coordinator its own checkpoint directory"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the flock


def _write_error(root: Path, code: int | None, reason: str) -> CheckpointError:
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space there, or write checkpoints to a disk with room"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make it writable, or write checkpoints to a writable directory"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        fix = "it (or a parent) is a file, not a directory; write checkpoints to a directory"
    else:
        fix = "check the disk, or write checkpoints to another directory"
    reason = " ".join(reason.split())  # one line, whatever the OS or the Rust writer said
    return CheckpointError(root, f"cannot write a checkpoint ({reason}); {fix}")


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


# --- listing ------------------------------------------------------------------------------------------------------


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root``, newest (highest epoch) first; ``[]`` if ``root`` does not exist."""
    root = Path(root).expanduser()
    try:
        candidates = [path for path in root.iterdir() if NAME.fullmatch(path.name)]
    except OSError:
        return []
    infos = [info for info in map(read_info, candidates) if info is not None]
    return sorted(infos, key=lambda info: info.epoch, reverse=True)


def latest_path(root: str | Path) -> Path | None:
    """The checkpoint ``<root>/latest`` names, as ``<root>/epoch-NNNNNN``; if that is missing or damaged, the newest
    complete one; else None."""
    root = Path(root).expanduser()
    name = latest_name(root)
    if NAME.fullmatch(name) and read_info(root / name) is not None:
        return root / name
    listed = list_checkpoints(root)
    if not listed:
        return None
    if name:
        logger.warning("%s names %r, not a complete checkpoint; using %s", root / LATEST_FILE, name, listed[0].name)
    return listed[0].path


def latest_name(root: Path) -> str:
    """What ``<root>/latest`` names, unvalidated ("" if nothing): the target of the symlink, or the content of the
    text file that roots written before ``latest`` became a symlink have (still read: backwards compatible)."""
    path = root / LATEST_FILE
    try:
        return os.readlink(path).strip()
    except OSError:  # missing, or not a symlink (EINVAL): an old-format text file, or a copy that followed the link
        pass
    try:
        return path.read_text(encoding="utf-8").strip()[:100]
    except (OSError, UnicodeDecodeError):
        return ""


def read_info(path: Path) -> CheckpointInfo | None:
    """The checkpoint at ``path`` if it looks complete (valid metadata, weights of the recorded size), else None."""
    try:
        meta = CheckpointMetadata.parse((path / METADATA_FILE).read_bytes(), path)
        if (path / MODEL_FILE).stat().st_size != meta.model_bytes or not (path / CONFIG_FILE).is_file():
            return None
        size = _dir_size(path)
    except (OSError, CheckpointError):
        return None
    return CheckpointInfo(
        name=path.name,
        path=path,
        run_id=meta.run_id,
        fingerprint=meta.fingerprint,
        epoch=meta.epoch,
        samples_seen=meta.samples_seen,
        eval_metrics=dict(meta.eval_metrics),
        sha256=meta.sha256,
        created_at=meta.created_at,
        size_bytes=size,
    )


def _dir_size(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())


def file_sha256(path: Path) -> tuple[str, int]:
    """``(sha256 hex, size in bytes)`` of a file (the hashing is the prepared dataset's: one implementation)."""
    return shards.file_sha256(path), path.stat().st_size
