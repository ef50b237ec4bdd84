"""Masked batches from a prepared dataset: a peer's endless stream over its shards, and the held-out batches.

:class:`ShardStream` reads the slots :func:`peer.data.shards.assign_slots` gives this peer, one memory-mapped shard
at a time (memory stays bounded whatever the dataset's size), each shard's rows in an order shuffled per pass
(the same for every peer, so peers sharing a shard at different offsets read different rows). The assignment is
recomputed at every shard boundary from the current list of peers, so it follows peers joining and leaving. Masking
is dynamic, per batch, exactly as :class:`peer.data.batches.BatchStream` does it.

A shard whose sha256 differs from the index, or that is missing or truncated, is skipped with one warning and
reported to ``on_skip`` (the peer counts it in ``bertswarm_peer_skipped_shards_total``); only a dataset whose every
shard is bad ends the stream, with a one-line error.

:attr:`ShardStream.position` is a small JSON-able dict (dataset fingerprint, pass, shard, row, shards done this
pass) saved with the peer's state; passing it back resumes at the same row.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from peer.data.batches import _check_args, _collate, _Rows
from peer.data.corpus import shard_order
from peer.data.shards import PreparedDataset, Slot, assign_slots
from peer.data.tokenizer import TokenizerInfo
from peer.errors import InputError

logger = logging.getLogger(__name__)


def _pass_seed(shard_sha: str, epoch: int) -> int:
    digest = hashlib.blake2b(f"bertswarm-shard:{shard_sha}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _token_types(ids: np.ndarray, sep_id: int) -> np.ndarray:
    """Sentence-pair type ids: 1 after the first [SEP] up to and including the second, 0 elsewhere."""
    is_sep = ids == sep_id
    seps_before = np.cumsum(is_sep, axis=1) - is_sep
    return (seps_before == 1).astype(np.int8)


def rows_of(array: np.ndarray, nsp: bool, sep_id: int) -> _Rows:
    """Shard rows (any integer dtype) as the batch pipeline's rows."""
    if not nsp:
        return _Rows(np.asarray(array, dtype=np.int32), None, None)
    ids = np.asarray(array[:, :-1], dtype=np.int32)
    return _Rows(ids, _token_types(ids, sep_id), np.asarray(array[:, -1], dtype=np.int64))


class ShardStream:
    """An endless, deterministic stream of masked batches (the keys of :class:`~peer.data.batches.BatchStream`) over
    this peer's slots of a prepared dataset.

    ``me`` and ``peers()`` are the keys the assignment hashes (any stable per-peer bytes: the peer uses its
    signed-record key); ``peers`` is called at each shard boundary, and a failing call keeps the last list.
    """

    def __init__(
        self,
        dataset: PreparedDataset,
        info: TokenizerInfo,
        *,
        batch_size: int,
        mlm_probability: float = 0.15,
        seed: int,
        me: bytes,
        peers: Callable[[], Sequence[bytes]] = tuple,
        on_skip: Callable[[str], None] | None = None,
        position: dict | None = None,
    ):
        _check_args(dataset.index.seq_len, batch_size, mlm_probability, dataset.index.nsp, seed)
        self.dataset, self.info = dataset, info
        self.batch_size, self.mlm_probability = batch_size, mlm_probability
        self.me, self._peers, self._on_skip = me, peers, on_skip
        self._known_peers: Sequence[bytes] = ()
        self._generator = torch.Generator().manual_seed(seed % 2**63)
        self._bad: set[int] = set()
        self._keys = [entry.sha256 for entry in dataset.index.shards]
        self.epoch, self._done = 0, set()
        self._shard, self._start, self._cursor = -1, 0.0, 0
        self._rows: np.ndarray | None = None
        self._order: np.ndarray | None = None
        if position and position.get("dataset") == dataset.fingerprint:
            self._resume(position)
        if self._rows is None:
            self._next_shard()

    @property
    def num_tokens(self) -> int:
        return self.dataset.index.num_tokens

    @property
    def position(self) -> dict:
        """Where the stream is (JSON-able): pass it as ``position`` to continue from the next unread row."""
        name = self.dataset.index.shards[self._shard].name
        return {"dataset": self.dataset.fingerprint, "epoch": self.epoch, "shard": name, "start": self._start,
                "cursor": self._cursor,
                "done": sorted(self.dataset.index.shards[shard].name for shard in self._done)}  # fmt: skip

    def _resume(self, position: dict) -> None:
        names = {entry.name: number for number, entry in enumerate(self.dataset.index.shards)}
        try:
            shard, start, cursor = names[position["shard"]], float(position["start"]), int(position["cursor"])
            self.epoch = int(position["epoch"])
            self._done = {names[name] for name in position["done"] if name in names}
        except (KeyError, TypeError, ValueError):
            logger.warning("saved data position does not fit this dataset; starting at this peer's first shard")
            return
        if self._open(shard, start):
            self._cursor = min(max(cursor, 0), len(self._order))

    def _slots(self) -> list[Slot]:
        try:
            self._known_peers = list(self._peers())
        except Exception as e:  # the DHT may be slow or gone for a moment: keep the last list
            logger.debug("peer list unavailable (%r); keeping the last one", e)
        slots = [slot for slot in assign_slots(self._keys, self.me, self._known_peers) if slot.shard not in self._bad]
        if not slots:  # every shard of ours is bad: read whatever good shards are left
            slots = [Slot(shard, 0.0) for shard in range(len(self._keys)) if shard not in self._bad]
        if not slots:
            raise InputError(
                self.dataset.path,
                "every shard failed verification (corrupt or missing); re-run bertswarm-prepare on it",
            )
        return slots

    def _next_shard(self) -> None:
        while True:
            slots = self._slots()
            todo = [slot for slot in slots if slot.shard not in self._done]
            if not todo:
                self.epoch += 1
                self._done = set()
                continue
            if self._open(todo[0].shard, todo[0].start):
                return

    def _open(self, shard: int, start: float) -> bool:
        entry = self.dataset.index.shards[shard]
        try:
            rows = self.dataset.load(entry)
        except ValueError as e:
            self._bad.add(shard)
            logger.warning("skipping shard %s of %s: %s", entry.name, self.dataset.path, e)
            if self._on_skip is not None:
                self._on_skip(entry.name)
            return False
        permutation = shard_order(len(rows), _pass_seed(entry.sha256, self.epoch))
        offset = int(start * len(rows))
        self._order = np.roll(permutation, -offset)
        self._rows, self._shard, self._start, self._cursor = rows, shard, start, 0
        return True

    def __iter__(self) -> ShardStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        parts, needed = [], self.batch_size
        while needed:
            if self._cursor == len(self._order):
                self._done.add(self._shard)
                self._next_shard()
            take = min(needed, len(self._order) - self._cursor)
            parts.append(self._rows[self._order[self._cursor : self._cursor + take]])  # copies only these rows
            self._cursor += take
            needed -= take
        index = self.dataset.index
        rows = rows_of(np.concatenate(parts) if len(parts) > 1 else parts[0], index.nsp, self.info.sep_id)
        return _collate(rows, self.info, self.mlm_probability, self._generator)


def prepared_heldout_batches(
    dataset: PreparedDataset,
    info: TokenizerInfo,
    *,
    batch_size: int,
    seed: int = 0,
    max_batches: int | None = None,
    mlm_probability: float = 0.15,
) -> list[dict[str, torch.Tensor]]:
    """Evaluation batches from the dataset's held-out shard, in order, masked from a generator seeded with ``seed``
    (as :func:`peer.data.batches.heldout_batches`). Raises :class:`~peer.errors.InputError` if the dataset has no
    valid held-out split."""
    index = dataset.index
    if index.heldout is None:
        raise InputError(
            dataset.path,
            "the prepared dataset has no held-out split (its corpus was too small); "
            "prepare it from more text, or pass text files for evaluation",
        )
    try:
        array = dataset.load(index.heldout)
    except ValueError as e:
        raise InputError(dataset.path / index.heldout.name, f"{e}; re-run bertswarm-prepare on the dataset") from None
    count = len(array) if max_batches is None else min(len(array), max_batches * batch_size)
    rows = rows_of(np.asarray(array[:count]), index.nsp, info.sep_id)
    generator = torch.Generator().manual_seed(seed % 2**63)
    return [_collate(rows.slice(start, start + batch_size), info, mlm_probability, generator)
            for start in range(0, count, batch_size)]  # fmt: skip
