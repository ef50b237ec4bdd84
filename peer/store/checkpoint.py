"""Hugging Face-compatible checkpoints of a run, written so that a crash at any instant leaves only complete ones.

Layout of a checkpoint root (``--checkpoint-dir``)::

    <root>/epoch-000123/        the weights after the swarm's global step (epoch) 123
        config.json             the model's transformers ``BertConfig`` (with ``architectures``)
        model.safetensors       the weights, tied duplicates dropped as ``save_pretrained`` does; never pickle
        tokenizer.json vocab.txt tokenizer_config.json special_tokens_map.json
        bertswarm.json          run id, manifest and its fingerprint, epoch, samples, eval metrics, sha256 of weights
    <root>/latest               text: the name of the checkpoint written last, e.g. ``epoch-000123``
    <root>/.lock                flock held by the one process writing checkpoints here
    <root>/.tmp-*               work in progress or a crashed writer's leftovers: never read, removed by the next write

Every ``epoch-*`` directory is a ``from_pretrained`` target: ``AutoModelForMaskedLM.from_pretrained(path)``,
``pipeline("fill-mask", model=path, tokenizer=path)``; :func:`latest_path` gives the newest.

Crash safety: a checkpoint is assembled in ``<root>/.tmp-*``; every file and then the directory are fsynced, the
directory is renamed to ``epoch-NNNNNN`` (atomic) and the root fsynced, so an ``epoch-*`` directory is only ever
visible complete. ``latest`` is replaced the same way (temp file, fsync, ``os.replace``, fsync of the root). Pruning
renames a checkpoint to ``.tmp-*`` before deleting it. ``tests/unit/test_checkpoint.py`` SIGKILLs a writer at each
of these steps.

Why ``latest`` is a small text file and not a symlink: checkpoints get copied and synced (``rsync``, ``aws s3 sync``,
Hub uploads, SMB/FUSE mounts), and those tools skip a symlink or dereference it, which silently duplicates a
multi-GB checkpoint; a text file survives every copy, is written with the same temp + fsync + rename recipe as every
other file here, and its content is validated (it must name a complete ``epoch-*`` checkpoint of the root, never a
path elsewhere, which matters when the root is served over HTTP). The price: ``from_pretrained(<root>/latest)``
does not work; use :func:`latest_path` or read the name from the file.

A checkpoint is identified by its epoch (the swarm's weights after that global step). Writing an epoch that already
exists for the same run keeps the existing checkpoint; an ``epoch-*`` of another run, or a damaged one, is replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from peer.data.tokenizer import save_pretrained as save_tokenizer
from peer.errors import UserError
from peer.store.state import unique_state

if TYPE_CHECKING:  # peer.manifest imports hivemind and transformers; the crash-test worker must start fast
    from peer.run.manifest import RunManifest

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = "bertswarm.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LATEST_FILE = "latest"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
DOWNLOAD_TIMEOUT = 30.0  # seconds without progress before a download from a coordinator is given up
_NAME = re.compile(r"epoch-(\d{6,})")
_CHUNK = 1 << 20
_MAX_METADATA_BYTES = 1 << 20
_INIT_FIX = "pass a checkpoint directory, a checkpoint root (uses its latest) or a coordinator's http(s) URL"


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


def run_stamp(manifest: RunManifest) -> dict:
    """What identifies the run in ``bertswarm.json``: run id, manifest fingerprint and the manifest itself."""
    return {"run_id": manifest.run_id, "fingerprint": manifest.fingerprint, "manifest": json.loads(manifest.to_json())}


# --- writing ------------------------------------------------------------------------------------------------------


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

    Crash-safe (see the module docstring); one writer per root at a time (a second process gets a ``UserError``).
    An unwritable root or a full disk raises ``UserError`` naming ``--checkpoint-dir``, and leaves no partial
    checkpoint behind. The tiny preset takes ~0.1 s; the time goes into hashing and fsyncing the weights.
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
            existing = _read_info(target)
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
    sha256, model_bytes = _sha256(tmp / MODEL_FILE)
    save_tokenizer(tokenizer, tmp, model_max_length=int(config.get("max_position_embeddings", 512)))
    for path in sorted(tmp.iterdir()):
        _fsync(path)
    metadata = {
        "format_version": FORMAT_VERSION,
        "run_id": run["run_id"],
        "fingerprint": run["fingerprint"],
        "manifest": run["manifest"],
        "epoch": epoch,
        "samples_seen": samples_seen,
        "eval_metrics": {str(k): _finite_or_none(v) for k, v in eval_metrics.items()},
        "sha256": sha256,
        "model_bytes": model_bytes,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    # Written last: the rename below is what publishes the checkpoint, but a copy made with tools that do not
    # preserve atomicity still shows a complete checkpoint only when this file is there.
    _write_new(tmp / METADATA_FILE, (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())
    _fsync(tmp / METADATA_FILE)
    _fsync(tmp)


def _publish(root: Path, tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``. A ``target`` of another run (or a damaged one) is first moved to a
    ``.tmp-`` name: a crash between the two renames loses that directory, never leaves a partial one visible."""
    aside = None
    if target.exists():
        aside = root / f"{TMP_PREFIX}replaced-{target.name}"
        logger.warning("%s is not a checkpoint of this run (or is damaged); replacing it", target)
        os.rename(target, aside)
    os.rename(tmp, target)
    _fsync(root)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f"{TMP_PREFIX}{LATEST_FILE}-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as any file (umask), not mkstemp's 0600
    try:
        try:
            os.write(fd, f"{name}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, root / LATEST_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(root)


def _prune(root: Path, keep: int, latest_name: str) -> None:
    doomed = [info for info in list_checkpoints(root)[keep:] if info.name != latest_name]
    if not doomed:
        return
    try:
        trash = []
        for info in doomed:  # renamed first: a crash mid-delete then leaves only a .tmp- directory
            trash.append(root / f"{TMP_PREFIX}pruned-{info.name}")
            os.rename(info.path, trash[-1])
        _fsync(root)
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
            raise UserError(
                f"--checkpoint-dir {root} is being written by another process; give each coordinator its own "
                "--checkpoint-dir"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the flock


def _write_error(root: Path, code: int | None, reason: str) -> UserError:
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space there, or point --checkpoint-dir at a disk with room"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make it writable, or point --checkpoint-dir at a writable directory"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        fix = "it (or a parent) is a file, not a directory; point --checkpoint-dir at a directory"
    else:
        fix = "check the disk, or point --checkpoint-dir at another directory"
    reason = " ".join(reason.split())  # one line, whatever the OS or the Rust writer said
    return UserError(f"--checkpoint-dir {root}: cannot write a checkpoint ({reason}); {fix}")


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names in it, i.e. renames, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN


# --- listing ------------------------------------------------------------------------------------------------------


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root``, newest (highest epoch) first; ``[]`` if ``root`` does not exist."""
    root = Path(root).expanduser()
    try:
        candidates = [path for path in root.iterdir() if _NAME.fullmatch(path.name)]
    except OSError:
        return []
    infos = [info for info in map(_read_info, candidates) if info is not None]
    return sorted(infos, key=lambda info: info.epoch, reverse=True)


def latest_path(root: str | Path) -> Path | None:
    """The checkpoint ``<root>/latest`` names; if that is missing or damaged, the newest complete one; else None."""
    root = Path(root).expanduser()
    try:
        name = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _NAME.fullmatch(name) and _read_info(root / name) is not None:
        return root / name
    listed = list_checkpoints(root)
    if not listed:
        return None
    if name:
        logger.warning("%s names %r, not a complete checkpoint; using %s", root / LATEST_FILE, name, listed[0].name)
    return listed[0].path


def _read_info(path: Path) -> CheckpointInfo | None:
    """The checkpoint at ``path`` if it looks complete (metadata readable, weights of the recorded size), else None."""
    try:
        meta = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
        if (path / MODEL_FILE).stat().st_size != meta["model_bytes"] or not (path / CONFIG_FILE).is_file():
            return None
        return CheckpointInfo(
            name=path.name,
            path=path,
            run_id=str(meta["run_id"]),
            fingerprint=str(meta["fingerprint"]),
            epoch=int(meta["epoch"]),
            samples_seen=int(meta["samples_seen"]),
            eval_metrics=dict(meta["eval_metrics"]),
            sha256=str(meta["sha256"]),
            created_at=str(meta["created_at"]),
            size_bytes=_dir_size(path),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _dir_size(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())


# --- loading ------------------------------------------------------------------------------------------------------


def load_checkpoint(source: str | Path, expected_fingerprint: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights and the ``bertswarm.json`` metadata of a checkpoint, verified.

    ``source`` (the peer's ``--init-from``): a checkpoint directory; a checkpoint root (its :func:`latest_path`);
    or the ``http(s)://`` URL of a checkpoint served by a coordinator (``<url>/bertswarm.json`` and
    ``<url>/model.safetensors``; a URL whose ``bertswarm.json`` is missing is tried as a root through ``<url>/latest``).
    Checks: the manifest fingerprint equals ``expected_fingerprint`` (unless None), the sha256 of
    ``model.safetensors``, and that every weight is finite. The state dict lacks the tied decoder weights (as in
    ``model.safetensors``): load it with ``model.load_state_dict(state, strict=False)``. Every failure is a
    ``UserError`` naming ``--init-from``.
    """
    text = str(source)
    if text.startswith(("http://", "https://")):
        with tempfile.TemporaryDirectory(prefix="bertswarm-init-") as tmp:
            base, meta = _fetch_metadata(text)
            _check_fingerprint(meta, expected_fingerprint, text)
            _download(f"{base}/{MODEL_FILE}", Path(tmp) / MODEL_FILE, text, limit=int(meta["model_bytes"]))
            return _read_weights(Path(tmp), meta, text), meta
    path = _local_checkpoint(Path(source).expanduser())
    try:
        data = (path / METADATA_FILE).read_bytes()
    except OSError as e:
        raise UserError(f"--init-from {path}: cannot read {METADATA_FILE} ({e.strerror}); make it readable") from None
    meta = _parse_metadata(data, str(path))
    _check_fingerprint(meta, expected_fingerprint, str(path))
    return _read_weights(path, meta, str(path)), meta


def _local_checkpoint(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"--init-from {path}: no such file or directory; {_INIT_FIX}")
    if (path / METADATA_FILE).is_file():
        return path
    latest = latest_path(path) if path.is_dir() else None
    if latest is None:
        raise UserError(
            f"--init-from {path}: not a bertswarm checkpoint (no {METADATA_FILE}, no complete epoch-* inside); "
            f"{_INIT_FIX}"
        )
    return latest


def _parse_metadata(data: bytes, where: str) -> dict:
    try:
        meta = json.loads(data)
        if not (isinstance(meta["fingerprint"], str) and isinstance(meta["sha256"], str)):
            raise TypeError("fingerprint and sha256 must be strings")
        int(meta["epoch"]), int(meta["model_bytes"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"--init-from {where}: {METADATA_FILE} is unreadable ({type(e).__name__}: {e}); the checkpoint is "
            "corrupt, pass another one (e.g. an older epoch-* directory)"
        ) from None
    return meta


def verify_run(meta: dict, expected_fingerprint: str, source: str | Path) -> None:
    """The run check of :func:`load_checkpoint`, for a checkpoint loaded (and verified) before the run was known."""
    _check_fingerprint(meta, expected_fingerprint, str(source))


def _check_fingerprint(meta: dict, expected: str | None, where: str) -> None:
    if expected is not None and meta["fingerprint"] != expected:
        raise UserError(
            f"--init-from {where}: checkpoint of another run (run {meta.get('run_id')!r}, manifest "
            f"{meta['fingerprint'][:12]}; this run's manifest is {expected[:12]}); pass a checkpoint of this run, "
            "or start a run with the checkpoint's settings"
        )


def _read_weights(directory: Path, meta: dict, where: str) -> dict[str, torch.Tensor]:
    corrupt = f"--init-from {where}: {MODEL_FILE} is corrupt"
    try:
        sha256, _ = _sha256(directory / MODEL_FILE)
    except OSError as e:
        raise UserError(f"{corrupt} or missing ({e.strerror}); copy or download the checkpoint again") from None
    if sha256 != meta["sha256"]:
        raise UserError(
            f"{corrupt}: its sha256 {sha256[:12]} differs from {meta['sha256'][:12]} recorded in {METADATA_FILE}; "
            "copy or download the checkpoint again, or pass another one"
        )
    try:
        tensors = load_file(directory / MODEL_FILE)
    except (SafetensorError, OSError) as e:
        message = " ".join(str(e).split())[:200]
        raise UserError(f"{corrupt} ({message}); copy or download the checkpoint again") from None
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(
            f"--init-from {where}: weights are not finite (NaN/inf in {bad[0]}{more}); the run had diverged by this "
            "checkpoint, pass an earlier one"
        )
    return tensors


def _sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fetch_metadata(given: str) -> tuple[str, dict]:
    """``(checkpoint base URL, metadata)``; the URL may name a checkpoint or a root serving ``latest``."""
    url = given.rstrip("/")
    try:
        return url, _parse_metadata(_get(f"{url}/{METADATA_FILE}", given), given)
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise _http_error(url, e) from None
    try:
        name = _get(f"{url}/{LATEST_FILE}", given).decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as e:
        raise UserError(
            f"--init-from {url}: no {METADATA_FILE} or {LATEST_FILE} there (HTTP {e.code}); pass the URL of a "
            "checkpoint the coordinator serves"
        ) from None
    if not _NAME.fullmatch(name):
        raise UserError(f"--init-from {url}: {LATEST_FILE} names {name[:40]!r}, not a checkpoint; {_INIT_FIX}")
    base = f"{url}/{name}"
    try:
        return base, _parse_metadata(_get(f"{base}/{METADATA_FILE}", given), base)
    except urllib.error.HTTPError as e:
        raise _http_error(base, e) from None


def _get(url: str, where: str) -> bytes:
    """A small file; HTTPError is left to the caller (a 404 can mean "try as a root")."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            data = response.read(_MAX_METADATA_BYTES + 1)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _unreachable(where, e) from None
    if len(data) > _MAX_METADATA_BYTES:
        raise UserError(f"--init-from {where}: {url} is larger than 1 MB, not checkpoint metadata; {_INIT_FIX}")
    return data


def _download(url: str, target: Path, where: str, limit: int) -> None:
    """Stream ``url`` into ``target``, refusing more than ``limit`` bytes (a broken server must not fill the disk)."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(target, "wb") as f:
            size = 0
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise UserError(
                        f"--init-from {where}: {url} is larger than the {limit} bytes its {METADATA_FILE} records; "
                        "the server sends another file, pass the URL of a checkpoint the coordinator serves"
                    )
                f.write(chunk)
    except urllib.error.HTTPError as e:
        raise _http_error(url, e) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _unreachable(where, e) from None


def _http_error(url: str, e: urllib.error.HTTPError) -> UserError:
    return UserError(f"--init-from {url}: the server answered HTTP {e.code} {e.reason}; {_INIT_FIX}")


def _unreachable(where: str, e: Exception) -> UserError:
    reason = " ".join(str(getattr(e, "reason", None) or e).split())
    return UserError(
        f"--init-from {where}: cannot download ({reason}); check the coordinator's address and that it is running"
    )
