"""Verified loading of a checkpoint (the peer's ``--init-from``): from a checkpoint directory, a checkpoint root (its
``latest``) or a coordinator's URL. Nothing is trusted: the metadata is parsed strictly, the sha256 of the weights
is checked against it, every weight must be finite, and the run must be the expected one. Every failure is a
:class:`~peer.store.errors.CheckpointError` naming the checkpoint, the problem and a fix.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from peer.store import remote
from peer.store.checkpoint import MODEL_FILE, file_sha256, latest_path
from peer.store.errors import CheckpointError
from peer.store.metadata import METADATA_FILE, CheckpointMetadata
from peer.store.remote import SOURCE_FIX


def load_checkpoint(source: str | Path, expected_fingerprint: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights and the ``bertswarm.json`` metadata (as a dict) of a checkpoint, verified.

    ``source``: a checkpoint directory; a checkpoint root (its :func:`~peer.store.checkpoint.latest_path`); or the
    ``http(s)://`` URL of a checkpoint served by a coordinator (``<url>/bertswarm.json`` and
    ``<url>/model.safetensors``; a URL whose ``bertswarm.json`` is missing is tried as a root through ``<url>/latest``).
    Checks: the manifest fingerprint equals ``expected_fingerprint`` (unless None), the sha256 of
    ``model.safetensors``, and that every weight is finite. The state dict lacks the tied decoder weights (as in
    ``model.safetensors``): load it with ``model.load_state_dict(state, strict=False)``.
    """
    text = str(source)
    if text.startswith(("http://", "https://")):
        with tempfile.TemporaryDirectory(prefix="bertswarm-init-") as tmp:
            base, meta = remote.fetch_metadata(text)
            _check_run(meta.fingerprint, meta.run_id, expected_fingerprint, text)
            remote.download(f"{base}/{MODEL_FILE}", Path(tmp) / MODEL_FILE, text, limit=meta.model_bytes)
            return _read_weights(Path(tmp), meta, text), meta.to_dict()
    path = _local_checkpoint(Path(source).expanduser())
    try:
        data = (path / METADATA_FILE).read_bytes()
    except OSError as e:
        raise CheckpointError(path, f"cannot read {METADATA_FILE} ({e.strerror}); make it readable") from None
    meta = CheckpointMetadata.parse(data, path)
    _check_run(meta.fingerprint, meta.run_id, expected_fingerprint, path)
    return _read_weights(path, meta, path), meta.to_dict()


def verify_run(meta: dict, expected_fingerprint: str, source: str | Path) -> None:
    """The run check of :func:`load_checkpoint`, for a checkpoint loaded (and verified) before the run was known."""
    _check_run(meta["fingerprint"], meta.get("run_id"), expected_fingerprint, source)


def _local_checkpoint(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(path, f"no such file or directory; {SOURCE_FIX}")
    if (path / METADATA_FILE).is_file():
        return path
    latest = latest_path(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(
            path, f"not a bertswarm checkpoint (no {METADATA_FILE}, no complete epoch-* inside); {SOURCE_FIX}"
        )
    return latest


def _check_run(fingerprint: str, run_id: str | None, expected: str | None, where: str | Path) -> None:
    if expected is not None and fingerprint != expected:
        raise CheckpointError(
            where,
            f"checkpoint of another run (run {run_id!r}, manifest {fingerprint[:12]}; this run's manifest is "
            f"{expected[:12]}); pass a checkpoint of this run, or start a run with the checkpoint's settings",
        )


def _read_weights(directory: Path, meta: CheckpointMetadata, where: str | Path) -> dict[str, torch.Tensor]:
    corrupt = f"{MODEL_FILE} is corrupt"
    try:
        sha256, _ = file_sha256(directory / MODEL_FILE)
    except OSError as e:
        raise CheckpointError(
            where, f"{corrupt} or missing ({e.strerror}); copy or download the checkpoint again"
        ) from None
    if sha256 != meta.sha256:
        raise CheckpointError(
            where,
            f"{corrupt}: its sha256 {sha256[:12]} differs from {meta.sha256[:12]} recorded in {METADATA_FILE}; "
            "copy or download the checkpoint again, or pass another one",
        )
    try:
        tensors = load_file(directory / MODEL_FILE)
    except (SafetensorError, OSError) as e:
        message = " ".join(str(e).split())[:200]
        raise CheckpointError(where, f"{corrupt} ({message}); copy or download the checkpoint again") from None
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(
            where,
            f"weights are not finite (NaN/inf in {bad[0]}{more}); the run had diverged by this checkpoint, pass an "
            "earlier one",
        )
    return tensors
