"""Preparation of a training corpus into a prepared dataset directory (``bertswarm-prepare``).

The pipeline, in order: read the ``--data`` entries lazily (:func:`peer.data.corpus.iter_documents`: local files one
at a time, ``hf:`` datasets streamed), clean each document (Unicode NFC, line endings, surrounding whitespace; drop
empty and binary-looking documents and exact duplicates), send each to the held-out split or to training by a stable
hash of its text (as :func:`peer.data.corpus.split_heldout`), cut the training documents into chunks of about
``shard_chars`` characters, and tokenise and pack each chunk into one shard in a worker process.

Shard format: one NumPy ``.npy`` file per shard, a ``[rows, seq_len]`` array of ``uint16`` token ids (``uint32`` for
vocabularies above 65 536 ids), rows already packed as the in-memory pipeline packs them (``[CLS] text [SEP]``, a
document's end followed by ``[SEP]``, only the shard's last row padded). With NSP each row is a sentence pair
``[CLS] A [SEP] B [SEP]`` and one extra last column holds the next-sentence label. ``.npy`` because it is what NumPy
maps without a copy (``np.load(mmap_mode="r")``): a peer reads any row at any offset with bounded memory, and the
format needs no new dependency and is readable with one line of Python; Arrow/Parquet would add a dependency for
features (columns, compression) a fixed-width token matrix does not use.

Determinism: chunk boundaries depend on the cleaned text alone and each shard on its chunk alone (NSP pairs draw
from a generator seeded by the chunk's digest), so the same input gives byte-identical shards with any number of
workers. Resumability: every shard is written atomically with a small ``.json`` record (its sha256, sizes and the
digest of its input chunk); a re-run re-reads the input and reuses every shard whose record matches, so a crash
loses at most the shards being written. ``index.json`` (:class:`peer.data.shards.DatasetIndex`) is written last:
its presence marks a complete dataset.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from peer.data import shards
from peer.data.corpus import _stable_unit_hash, iter_documents
from peer.data.tokenizer import TokenizerInfo, tokenizer_fingerprint
from peer.errors import InputError, UserError
from peer.store.atomic import TMP_PREFIX, atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

DEFAULT_SHARD_CHARS = 16_000_000  # ~4M tokens, ~8 MB of uint16 per shard: many shards for a large corpus
DEFAULT_HELDOUT_FRACTION = 0.02
MAX_HELDOUT_CHARS = 4_000_000  # evaluation reads a few hundred rows; documents past this cap train instead
_BINARY_SHARE = 0.05  # a document with more control / replacement characters than this is dropped as binary
# control characters (Unicode category Cc) that are not whitespace, and U+FFFD; a regex, as a per-character Python loop
# took longer than tokenising (measured in make bench's data scenario)
_ODD_CHARS = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ufffd]")
_ENCODE_BATCH = 256  # documents per tokenizers call


@dataclass
class Stats:
    """What the cleaning did, reported at the end and stored in the index."""

    documents_read: int = 0
    empty: int = 0
    binary: int = 0
    duplicates: int = 0
    train_documents: int = 0
    heldout_documents: int = 0
    tokens: int = 0
    shards_written: int = 0
    shards_reused: int = 0

    def summary(self) -> str:
        return (
            f"{self.documents_read} documents read: {self.train_documents} train, {self.heldout_documents} held out; "
            f"dropped {self.duplicates} duplicates, {self.empty} empty, {self.binary} binary; {self.tokens} tokens; "
            f"shards: {self.shards_written} written, {self.shards_reused} reused"
        )


def clean(document: str) -> str:
    """NFC-normalised text with ``\\r\\n`` line endings made ``\\n`` and surrounding whitespace stripped."""
    return unicodedata.normalize("NFC", document.replace("\r\n", "\n")).strip()


def looks_binary(document: str) -> bool:
    """NUL bytes, or more than 5 % control (other than whitespace) or U+FFFD replacement characters."""
    if "\0" in document:
        return True
    if document.isascii() and document.isprintable():  # the common case, at C speed
        return False
    return len(_ODD_CHARS.findall(document)) > _BINARY_SHARE * len(document)


def _digest(documents: Iterable[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for document in documents:
        data = document.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


@dataclass
class _Splitter:
    """Cleaning, de-duplication and the held-out split, as the documents stream past."""

    heldout_fraction: float
    stats: Stats = field(default_factory=Stats)
    heldout: list[str] = field(default_factory=list)
    _seen: set[bytes] = field(default_factory=set)
    _heldout_chars: int = 0

    def count_empty(self) -> None:
        self.stats.documents_read += 1
        self.stats.empty += 1

    def train_documents(self, documents: Iterable[tuple[str, str]]) -> Iterator[str]:
        for _source, raw in documents:
            self.stats.documents_read += 1
            document = clean(raw)
            if not document:
                self.stats.empty += 1
                continue
            if looks_binary(document):
                self.stats.binary += 1
                continue
            key = hashlib.blake2b(document.encode("utf-8"), digest_size=16).digest()
            if key in self._seen:  # 16 bytes per document: de-duplication memory grows with the corpus, not its size
                self.stats.duplicates += 1
                continue
            self._seen.add(key)
            held = _stable_unit_hash(document) < self.heldout_fraction and self._heldout_chars < MAX_HELDOUT_CHARS
            if held:
                self.heldout.append(document)
                self._heldout_chars += len(document)
                self.stats.heldout_documents += 1
            else:
                self.stats.train_documents += 1
                yield document


def _chunks(documents: Iterable[str], shard_chars: int) -> Iterator[list[str]]:
    chunk, size = [], 0
    for document in documents:
        chunk.append(document)
        size += len(document)
        if size >= shard_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# --- tokenising and packing (in workers) -----------------------------------------------------------------------


def _encode(tokenizer: Tokenizer, documents: Sequence[str], info: TokenizerInfo) -> list[np.ndarray]:
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast skips offsets
    forged = np.zeros(info.vocab_size, dtype=bool)
    forged[[info.pad_id, info.cls_id, info.sep_id, info.mask_id]] = True
    out: list[np.ndarray] = []
    for start in range(0, len(documents), _ENCODE_BATCH):
        ids = [encoding.ids for encoding in encode(list(documents[start : start + _ENCODE_BATCH]),
                                                   add_special_tokens=False)]  # fmt: skip
        lengths = [len(one) for one in ids]
        # one array per call, not per document: per-document NumPy calls cost a third of the tokeniser's time
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(lengths))
        flat[forged[flat]] = info.unk_id  # literal "[SEP]" in the text cannot forge the row structure
        out.extend(np.split(flat, np.cumsum(lengths)[:-1]))
    return out


def pack_rows(ids_per_document: Sequence[np.ndarray], seq_len: int, info: TokenizerInfo) -> np.ndarray:
    """MLM rows ``[CLS] chunk [SEP]`` over the documents each followed by [SEP]; only the last row is padded."""
    sep = np.array([info.sep_id], dtype=np.int64)
    parts = [part for ids in ids_per_document if len(ids) for part in (ids, sep)]
    if not parts:
        return np.zeros((0, seq_len), dtype=np.int64)
    stream = np.concatenate(parts)
    content = seq_len - 2
    num_rows = -(-len(stream) // content)
    rows = np.full((num_rows, seq_len), info.pad_id, dtype=np.int64)
    rows[:, 0] = info.cls_id
    full = (num_rows - 1) * content
    rows[: num_rows - 1, 1:-1] = stream[:full].reshape(num_rows - 1, content)
    rows[: num_rows - 1, -1] = info.sep_id
    tail = stream[full:]
    rows[-1, 1 : 1 + len(tail)] = tail
    rows[-1, 1 + len(tail)] = info.sep_id
    return rows


def _nsp_rows(documents: Sequence[str], tokenizer: Tokenizer, seq_len: int, seed: int) -> np.ndarray:
    """Sentence pairs as :mod:`peer.data.batches` builds them, plus the label as the last column."""
    from peer.data import batches  # imports torch: only NSP preparation pays for it

    info = TokenizerInfo.of(tokenizer)
    try:
        corpus = batches._Corpus(documents, tokenizer, info)
        rows = batches._sentence_pairs(corpus, range(len(corpus)), seq_len, info, np.random.default_rng(seed))
    except UserError:  # a chunk without words or without a pair: an empty shard, dropped from the index
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    return np.concatenate([rows.input_ids.astype(np.int64), rows.next_sentence_label[:, None]], axis=1)


def build_rows(documents: Sequence[str], tokenizer: Tokenizer, seq_len: int, nsp: bool) -> np.ndarray:
    """The rows of one shard (int64; the caller narrows the dtype). Depends on ``documents`` alone."""
    if nsp:
        return _nsp_rows(documents, tokenizer, seq_len, int(_digest(documents)[:15], 16))
    info = TokenizerInfo.of(tokenizer)
    return pack_rows(_encode(tokenizer, documents, info), seq_len, info)


def content_tokens(rows: np.ndarray, info: TokenizerInfo, nsp: bool) -> int:
    ids = rows[:, :-1] if nsp else rows
    return int(np.count_nonzero(~np.isin(ids, [info.pad_id, info.cls_id, info.sep_id])))


@dataclass(frozen=True)
class _Job:
    name: str
    documents: list[str]
    input_digest: str


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer  # one per worker process, set once by the pool's initializer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; no Rayon threads per worker
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _write_shard(
    job: _Job, out: Path, seq_len: int, nsp: bool, settings: str, dtype: str, tokenizer: Tokenizer | None = None
) -> dict:
    """Tokenise, pack and write one shard and its record, each atomically; returns the record. In a worker process
    the tokenizer is the one :func:`_init_worker` loaded."""
    tokenizer = tokenizer or _worker_tokenizer
    rows = build_rows(job.documents, tokenizer, seq_len, nsp)
    data = _npy_bytes(rows.astype(dtype))
    atomic_write_bytes(out / job.name, data)  # durable before the index names it
    record = {
        "name": job.name,
        "rows": int(len(rows)),
        "tokens": content_tokens(rows, TokenizerInfo.of(tokenizer), nsp),
        "sha256": hashlib.sha256(data).hexdigest(),
        "input": job.input_digest,
        "settings": settings,
    }
    atomic_write_text(out / _record_name(job.name), json.dumps(record, sort_keys=True), durable=False)
    return record


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _record_name(shard_name: str) -> str:
    return shard_name.removesuffix(".npy") + ".json"


def _reusable(out: Path, job: _Job, settings: str) -> dict | None:
    """The record of a shard a previous run finished for exactly this input and these settings, else None."""
    try:
        record = json.loads((out / _record_name(job.name)).read_text(encoding="utf-8"))
        if record.get("input") != job.input_digest or record.get("settings") != settings:
            return None
        if shards.file_sha256(out / job.name) != record.get("sha256"):
            return None
        return record
    except (OSError, ValueError):
        return None


# --- the pipeline ----------------------------------------------------------------------------------------------


@dataclass
class PrepareResult:
    index: shards.DatasetIndex
    stats: Stats
    seconds: float


def prepare_dataset(
    data: Sequence[str],
    output: str | os.PathLike[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    nsp: bool = False,
    workers: int = 1,
    shard_chars: int = DEFAULT_SHARD_CHARS,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    progress: Callable[[Stats, float], None] | None = None,
    documents: Callable[[], Iterable[str]] | None = None,
) -> PrepareResult:
    """Turn the ``data`` entries into a prepared dataset in ``output``; see the module docstring.

    Raises :class:`~peer.errors.InputError` (the caller adds the flag) for unreadable, empty or binary input files
    (naming the file) and for input with no usable document. ``progress(stats, elapsed_seconds)`` is called as
    documents are read and shards finish. ``workers`` processes tokenise in parallel (1: in this process).
    ``documents``: where the text comes from when it is not read from the ``data`` entries (the embedded corpus);
    ``data`` then only names it in messages.
    """
    started = time.perf_counter()
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _remove_temp_files(out)  # what a killed run left half-written; never visible under a real name
    (out / shards.INDEX_NAME).unlink(missing_ok=True)  # until the new one is written, the dataset is incomplete
    info = TokenizerInfo.of(tokenizer)
    dtype = "uint16" if info.vocab_size <= 2**16 else "uint32"
    fingerprint = tokenizer_fingerprint(tokenizer)
    settings = hashlib.sha256(
        json.dumps([shards.FORMAT_VERSION, fingerprint, seq_len, nsp, dtype]).encode()
    ).hexdigest()
    splitter = _Splitter(heldout_fraction)
    stats = splitter.stats
    report = progress or (lambda _stats, _seconds: None)

    def jobs() -> Iterator[_Job]:
        if documents is None:
            source = iter_documents(data, on_empty=splitter.count_empty)
        else:
            source = (("", document) for document in documents())
        for number, chunk in enumerate(_chunks(splitter.train_documents(source), shard_chars)):
            report(stats, time.perf_counter() - started)
            yield _Job(shards.train_shard_name(number), chunk, _digest(chunk))

    def finished(record: dict, reused: bool) -> dict:
        stats.tokens += record["tokens"]
        stats.shards_reused += reused
        stats.shards_written += not reused
        report(stats, time.perf_counter() - started)
        return record

    try:
        records = list(_run_jobs(jobs(), out, seq_len, nsp, settings, dtype, tokenizer, workers, finished))
    except BaseException:  # bad input or Ctrl-C: finished shards stay (resumable), torn temp files of workers go
        _remove_temp_files(out)
        raise
    if not records or not any(record["rows"] for record in records):
        raise InputError(", ".join(map(str, data)), "no usable text after cleaning (" + stats.summary() +
                         "); pass files with text in them")  # fmt: skip
    heldout = None
    if splitter.heldout:
        heldout_job = _Job(shards.HELDOUT_NAME, splitter.heldout, _digest(splitter.heldout))
        heldout = _write_shard(heldout_job, out, seq_len, nsp, settings, dtype, tokenizer)
        stats.tokens += heldout["tokens"]
    index = shards.DatasetIndex(
        tokenizer_fingerprint=fingerprint,
        vocab_size=info.vocab_size,
        seq_len=seq_len,
        nsp=nsp,
        dtype=dtype,
        shards=[_entry(record) for record in records if record["rows"]],
        heldout=_entry(heldout) if heldout and heldout["rows"] else None,
        stats={name: int(value) for name, value in vars(stats).items()},
    )
    keep = {entry.name for entry in index.shards} | ({index.heldout.name} if index.heldout else set())
    for path in out.iterdir():  # shards of an earlier, longer input: not part of this dataset
        if shards.is_shard_file(path.name) and path.with_suffix(".npy").name not in keep:
            path.unlink(missing_ok=True)
    atomic_write_text(out / shards.INDEX_NAME, index.to_json())
    return PrepareResult(index, stats, time.perf_counter() - started)


def _remove_temp_files(out: Path) -> None:
    for stale in out.glob(f"{TMP_PREFIX}*"):
        stale.unlink(missing_ok=True)


def _entry(record: dict) -> shards.ShardEntry:
    return shards.ShardEntry(name=record["name"], rows=record["rows"], tokens=record["tokens"],
                             sha256=record["sha256"])  # fmt: skip


def _run_jobs(jobs, out, seq_len, nsp, settings, dtype, tokenizer, workers, finished) -> Iterator[dict]:
    """Records of every job, in job order; reused shards are not recomputed. At most ``2 * workers`` chunks are in
    flight, so memory stays bounded whatever the corpus size."""
    if workers <= 1:
        for job in jobs:
            record = _reusable(out, job, settings)
            if record is None:
                yield finished(_write_shard(job, out, seq_len, nsp, settings, dtype, tokenizer), False)
            else:
                yield finished(record, True)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold tokenizers' threads
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer.to_str(),)) as pool:
        pending: list[tuple[dict | None, object]] = []
        for job in jobs:
            record = _reusable(out, job, settings)
            future = None if record else pool.apply_async(_write_shard, (job, out, seq_len, nsp, settings, dtype))
            pending.append((record, future))
            while len(pending) > 2 * workers or (pending and pending[0][0] is not None):
                yield _collect(pending.pop(0), finished)
        while pending:
            yield _collect(pending.pop(0), finished)


def _collect(item: tuple[dict | None, object], finished) -> dict:
    record, future = item
    return finished(record, True) if record is not None else finished(future.get(), False)
