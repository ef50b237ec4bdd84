"""This peer's state directory: an exclusive lock, and local training state saved as safetensors, atomically.

Layout of ``<state-dir>/``: ``identity.key`` (p2p private key), ``lock`` (held while a peer runs),
``state.safetensors`` (model parameters ``model.*``, optimizer moments ``optim.<param>.<name>``; metadata: manifest
fingerprint, local epoch, samples). A save writes a temp file, fsyncs, renames, and fsyncs the directory, so a crash
at any point leaves either the previous state or the new one, never a torn file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from peer.errors import UserError

logger = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"


@dataclass
class SavedState:
    model: dict[str, torch.Tensor]
    optimizer: dict[int, dict[str, torch.Tensor]]
    epoch: int
    samples: int
    fingerprint: str


class StateDir:
    def __init__(self, path: Path):
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._lock = open(path / "lock", "a+")  # noqa: SIM115 - held for the process lifetime
        except OSError as e:
            raise UserError(
                f"--state-dir {path}: cannot create or write it ({e.strerror}); pick a writable directory"
            ) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"--state-dir {path} is in use by another running peer; give each peer its own --state-dir"
            ) from None
        if not os.access(path, os.W_OK):
            raise UserError(f"--state-dir {path} is not writable; fix its permissions or pick another directory")

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    def load(self, fingerprint: str) -> SavedState | None:
        """The saved state of this run, if any. A file of another run is left alone (and not loaded)."""
        if not self.state_file.exists():
            return None
        try:
            with safe_open(self.state_file, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no iterator
            saved_fp, epoch, samples = meta["fingerprint"], int(meta["epoch"]), int(meta["samples"])
        except (OSError, ValueError, KeyError, SafetensorError, UnicodeDecodeError) as e:
            raise UserError(
                f"local state {self.state_file} is corrupt ({type(e).__name__}); move it away to start this peer "
                "fresh (it will sync from the swarm)"
            ) from None
        if saved_fp != fingerprint:
            logger.warning("%s belongs to another run (manifest %s); starting fresh", self.state_file, saved_fp[:12])
            return None
        model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        optimizer: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optimizer.setdefault(int(index), {})[name] = value
        return SavedState(model, optimizer, epoch, samples, saved_fp)

    def save(self, model: torch.nn.Module, optimizer_state: dict, *, epoch: int, samples: int, fingerprint: str):
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in unique_state(model).items()}
        for index, entries in optimizer_state.items():
            if not isinstance(entries, dict):
                continue  # hivemind adds scalars such as local_epoch next to the per-parameter entries
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
        metadata = {"fingerprint": fingerprint, "epoch": str(epoch), "samples": str(samples)}
        atomic_save_file(tensors, self.state_file, metadata)

    def close(self) -> None:
        self._lock.close()


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers without tied duplicates (BERT's decoder shares the word embeddings)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


def atomic_save_file(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    """safetensors file written to a temp file, fsynced, renamed over ``target``; the directory is fsynced too."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
