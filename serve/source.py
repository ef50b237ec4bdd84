"""Where checkpoints come from: a checkpoint root on disk (its ``latest``) or a coordinator's URL (resolved by
:func:`peer.store.remote.fetch_metadata`, pinned to one ``epoch-*`` checkpoint). Blocking I/O: called on a worker
thread.

:meth:`CheckpointSource.newer` answers "is there a checkpoint with a step above N, and which" cheaply (a ``readlink``
and one ``bertswarm.json``, or one or two small HTTP requests); :meth:`CheckpointSource.load` verifies and loads it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from peer.store import remote
from peer.store.checkpoint import CONFIG_FILE, MODEL_FILE, latest_path, read_info
from peer.store.errors import CheckpointError
from peer.store.metadata import METADATA_FILE
from serve import model as served_model

# what a checkpoint directory must hold for transformers (written by peer.store.checkpoint and its tokenizer writer)
FILES = (METADATA_FILE, CONFIG_FILE, "tokenizer.json", "tokenizer_config.json", "vocab.txt")
_SMALL_FILE_LIMIT = 64 << 20


@dataclass(frozen=True)
class Candidate:
    step: int
    sha256: str
    where: str
    """a local checkpoint directory, or the base URL of a checkpoint"""


class CheckpointSource:
    def __init__(self, checkpoints: str):
        self.given = checkpoints
        self.is_url = checkpoints.startswith(("http://", "https://"))

    def newest(self) -> Candidate | None:
        """The checkpoint ``latest`` names now (None if there is none yet). ``CheckpointError`` if unreachable."""
        if self.is_url:
            base, meta = remote.fetch_metadata(self.given)
            return Candidate(meta.epoch, meta.sha256, base)
        path = latest_path(self.given)
        info = read_info(path) if path is not None else None
        return None if info is None else Candidate(info.epoch, info.sha256, str(path))

    def still_published(self, candidate: Candidate) -> bool:
        """Whether ``candidate`` is still there (a failed load of a pruned checkpoint is no reason to refuse it)."""
        if self.is_url:
            try:
                base, meta = remote.fetch_metadata(candidate.where)
            except CheckpointError:
                return False
            return meta.sha256 == candidate.sha256
        info = read_info(Path(candidate.where))
        return info is not None and info.sha256 == candidate.sha256

    def load(self, candidate: Candidate, expected_fingerprint: str | None) -> served_model.ServedModel:
        if not self.is_url:
            return served_model.load(Path(candidate.where), expected_fingerprint)
        with tempfile.TemporaryDirectory(prefix="bertswarm-serve-") as tmp:
            for name in FILES:
                remote.download(f"{candidate.where}/{name}", Path(tmp) / name, candidate.where, _SMALL_FILE_LIMIT)
            meta_limit = served_model_bytes(Path(tmp))
            remote.download(f"{candidate.where}/{MODEL_FILE}", Path(tmp) / MODEL_FILE, candidate.where, meta_limit)
            return served_model.load(Path(tmp), expected_fingerprint)


def served_model_bytes(directory: Path) -> int:
    """The size of the weights recorded in a downloaded ``bertswarm.json`` (the download limit)."""
    from peer.store.metadata import CheckpointMetadata

    return CheckpointMetadata.parse((directory / METADATA_FILE).read_bytes(), directory).model_bytes
