"""This peer's state directory: an exclusive lock, and local training state saved as safetensors, atomically.

Layout of ``<state-dir>/``: ``identity.key`` (p2p private key), ``lock`` (held while a peer runs),
``state.safetensors`` (model parameters ``model.*``, optimizer moments ``optim.<param>.<name>``; metadata: manifest
fingerprint, local epoch, samples, and, for a prepared dataset, the JSON position of the peer's data stream). A save
writes a temp file, fsyncs, renames, and fsyncs the directory
(:mod:`peer.store.atomic`), so a crash at any point leaves either the previous state or the new one, never a torn file.
Problems are :class:`~peer.store.errors.StateError`\\ s naming the path; the caller adds the flag (``--state-dir``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from peer.store.atomic import atomic_path
from peer.store.errors import StateError

logger = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"


@dataclass
class SavedState:
    model: dict[str, torch.Tensor]
    optimizer: dict[int, dict[str, torch.Tensor]]
    epoch: int
    samples: int
    fingerprint: str
    data_position: dict | None = None


class StateDir:
    def __init__(self, path: Path):
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._lock = open(path / "lock", "a+")  # noqa: SIM115 - held for the process lifetime
        except OSError as e:
            raise StateError(path, f"cannot create or write it ({e.strerror}); pick a writable directory") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(path, "in use by another running peer; give each peer its own state directory") from None
        if not os.access(path, os.W_OK):
            raise StateError(path, "not writable; fix its permissions or pick another directory")

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
            raise StateError(
                self.state_file,
                f"local state is corrupt ({type(e).__name__}); move it away to start this peer fresh (it will sync "
                "from the swarm)",
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
        return SavedState(model, optimizer, epoch, samples, saved_fp, _data_position(meta.get("data_position")))

    def save(
        self,
        model: torch.nn.Module,
        optimizer_state: dict,
        *,
        epoch: int,
        samples: int,
        fingerprint: str,
        parameters: dict[str, torch.Tensor] | None = None,
        data_position: dict | None = None,
    ):
        """Save the model (``parameters``, by name, replace the model's own: DiLoCo saves its outer parameters), the
        optimizer's per-parameter tensors, the step and sample counts and the data stream's position (JSON-able),
        stamped with the run's fingerprint."""
        state = dict(unique_state(model), **(parameters or {}))
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
        for index, entries in optimizer_state.items():
            if not isinstance(entries, dict):
                continue  # hivemind adds scalars such as local_epoch next to the per-parameter entries
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
        metadata = {"fingerprint": fingerprint, "epoch": str(epoch), "samples": str(samples)}
        if data_position is not None:
            metadata["data_position"] = json.dumps(data_position, sort_keys=True)
        with atomic_path(self.state_file, mode=0o600) as tmp:  # private, as it always was (next to identity.key)
            save_file(tensors, str(tmp), metadata=metadata)

    def close(self) -> None:
        self._lock.close()


def _data_position(text: str | None) -> dict | None:
    """The saved stream position; an unreadable one only costs the position (the stream starts over), not the state."""
    if text is None:
        return None
    try:
        position = json.loads(text)
    except ValueError:
        position = None
    if not isinstance(position, dict):
        logger.warning("ignoring an unreadable saved data position; the data stream starts at this peer's first shard")
        return None
    return position


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers without tied duplicates (BERT's decoder shares the word embeddings)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out
