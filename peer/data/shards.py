"""A prepared dataset directory: its index, verified shard reads, and which shards a peer reads.

Layout of a directory written by ``bertswarm-prepare`` (:mod:`peer.data.prepare`): ``index.json``
(:class:`DatasetIndex`), ``train-00000.npy``, ``train-00001.npy``… (token rows, see :mod:`peer.data.prepare` for the
format), optionally ``heldout.npy``, and one ``.json`` record per shard (used only to resume preparation). Torch-free:
the preparation workers import this module.

Assignment (:func:`assign_slots`). Shards are handed to peers by rendezvous (highest-random-weight) hashing: each
(peer, slot) pair gets a pseudo-random score from their names alone, and a slot belongs to the peer with the highest
score. Every peer computes the same answer without talking to anyone, shards spread evenly, and when a peer joins or
leaves only the slots it wins or loses change hands. A slot is a shard, or, when there are more peers than shards, a
segment of one (each shard is cut into ``ceil(peers / shards)`` segments), so peers that share a shard start reading
it at different offsets. A peer that wins no slot reads the slot where it scores highest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pydantic
from pydantic import ConfigDict, Field

from peer.errors import InputError

FORMAT = "bertswarm-prepared"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
HELDOUT_NAME = "heldout.npy"
_SHARD_RE = re.compile(r"^(train-\d{5,}|heldout)\.(npy|json)$")
_MAX_INDEX_BYTES = 64 * 2**20


def train_shard_name(number: int) -> str:
    return f"train-{number:05d}.npy"


def is_shard_file(name: str) -> bool:
    """A shard or shard record this module's writer names (the only files preparation ever deletes)."""
    return _SHARD_RE.match(name) is not None


def file_sha256(path: Path) -> str:
    """sha256 hex of a file, read in 1 MiB blocks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


class _Strict(pydantic.BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


class ShardEntry(_Strict):
    name: Annotated[str, Field(pattern=r"^(train-\d{5,}|heldout)\.npy$")]
    rows: Annotated[int, Field(ge=1)]
    tokens: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class DatasetIndex(_Strict):
    """``index.json``: what the dataset was prepared with and what it holds. :attr:`fingerprint` (over everything but
    the cleaning statistics) is what a run manifest pins."""

    format: Literal[FORMAT] = FORMAT  # type: ignore[valid-type]
    version: Literal[FORMAT_VERSION] = FORMAT_VERSION  # type: ignore[valid-type]
    tokenizer_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    vocab_size: Annotated[int, Field(ge=8)]
    seq_len: Annotated[int, Field(ge=3, le=8192)]
    nsp: bool
    dtype: Literal["uint16", "uint32"]
    shards: Annotated[list[ShardEntry], Field(min_length=1)]
    heldout: ShardEntry | None
    stats: dict[str, int]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1)

    @property
    def fingerprint(self) -> str:
        pinned = self.model_dump(mode="json", exclude={"stats"})
        return hashlib.sha256(json.dumps(pinned, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def width(self) -> int:
        """Columns of a shard's array: ``seq_len``, plus the NSP label column."""
        return self.seq_len + 1 if self.nsp else self.seq_len

    @property
    def num_tokens(self) -> int:
        return sum(entry.tokens for entry in self.shards)


def is_prepared(path: str) -> bool:
    """Whether a ``--data`` entry names a prepared dataset directory (complete or not)."""
    candidate = Path(path).expanduser()
    if not candidate.is_dir():
        return False
    return (candidate / INDEX_NAME).exists() or any(candidate.glob("train-*.npy"))


@dataclass(frozen=True)
class PreparedDataset:
    path: Path
    index: DatasetIndex

    @classmethod
    def open(cls, path: str | Path) -> PreparedDataset:
        """Read and validate ``index.json``; raises :class:`~peer.errors.InputError` naming the directory."""
        path = Path(path).expanduser()
        index_path = path / INDEX_NAME
        if not index_path.exists():
            raise InputError(path, "prepared dataset is incomplete (no index.json); re-run bertswarm-prepare on it")
        try:
            if index_path.stat().st_size > _MAX_INDEX_BYTES:
                raise ValueError("index.json is too large")
            index = DatasetIndex.model_validate_json(index_path.read_bytes())
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "index"
            raise InputError(index_path, f"not a bertswarm prepared dataset index ({where}: {first['msg']}); "
                             "re-run bertswarm-prepare") from None  # fmt: skip
        except (OSError, ValueError) as e:
            raise InputError(index_path, f"cannot read it ({e}); re-run bertswarm-prepare") from None
        return cls(path, index)

    @property
    def fingerprint(self) -> str:
        return self.index.fingerprint

    def check(self, *, tokenizer_fingerprint: str, seq_len: int, nsp: bool) -> None:
        """Refuse, in one line, a dataset prepared with another tokenizer, sequence length or NSP setting."""
        index = self.index
        if index.tokenizer_fingerprint != tokenizer_fingerprint:
            raise InputError(self.path, f"prepared with another tokenizer (sha256 {index.tokenizer_fingerprint[:12]}, "
                             f"yours {tokenizer_fingerprint[:12]}); pass the --tokenizer it was prepared with or "
                             "re-run bertswarm-prepare with yours")  # fmt: skip
        if index.seq_len != seq_len:
            raise InputError(self.path, f"prepared for sequence length {index.seq_len}, the run uses {seq_len}; "
                             f"re-run bertswarm-prepare --seq-len {seq_len}")  # fmt: skip
        if index.nsp != nsp:
            raise InputError(self.path, f"prepared {'with' if index.nsp else 'without'} NSP sentence pairs, the run "
                             f"{'uses' if nsp else 'does not use'} NSP; re-run bertswarm-prepare "
                             f"{'--nsp' if nsp else '--no-nsp'}")  # fmt: skip

    def load(self, entry: ShardEntry, *, verify: bool = True) -> np.ndarray:
        """The shard's rows, memory-mapped (read-only). ``ValueError`` if the file is missing, truncated, of the wrong
        shape or (with ``verify``) its sha256 differs from the index's."""
        file = self.path / entry.name
        try:
            if verify and file_sha256(file) != entry.sha256:
                raise ValueError("sha256 differs from the index")
            rows = np.load(file, mmap_mode="r", allow_pickle=False)
        except OSError as e:
            raise ValueError(f"cannot read it ({e.strerror or e})") from None
        if rows.shape != (entry.rows, self.index.width) or rows.dtype != np.dtype(self.index.dtype):
            raise ValueError(f"shape {rows.shape} {rows.dtype}, index says ({entry.rows}, {self.index.width}) "
                             f"{self.index.dtype}")  # fmt: skip
        return rows


# --- assignment -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Read ``shard`` (an index into the dataset's shard list) starting at ``start`` (a fraction of its rows)."""

    shard: int
    start: float


def _score(peer: bytes, slot_key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(peer + b"\0" + slot_key, digest_size=8).digest(), "big")


def assign_slots(shard_keys: Sequence[str], me: bytes, peers: Sequence[bytes]) -> list[Slot]:
    """The slots ``me`` reads, best first, among ``peers`` (``me`` is added if missing). Deterministic, see the module
    docstring. ``shard_keys`` identify the shards (their sha256: the same content scores the same everywhere)."""
    everyone = sorted(set(peers) | {me})
    segments = max(1, math.ceil(len(everyone) / max(1, len(shard_keys))))
    slots = [(Slot(shard, segment / segments), f"{key}/{segment}".encode())
             for shard, key in enumerate(shard_keys) for segment in range(segments)]  # fmt: skip
    mine = []
    for slot, key in slots:
        scores = {peer: _score(peer, key) for peer in everyone}
        if max(everyone, key=lambda peer: (scores[peer], peer)) == me:
            mine.append((scores[me], slot))
    if not mine:
        mine = [max(((_score(me, key), slot) for slot, key in slots), key=lambda item: item[0])]
    return [slot for _score_value, slot in sorted(mine, key=lambda item: (-item[0], item[1].shard, item[1].start))]
