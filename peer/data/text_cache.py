"""Plain training text prepared once into a cache, so that a peer has one training-data path.

A peer trains from a prepared dataset (:class:`peer.data.stream.ShardStream`) whatever ``--data`` names. When it names
text (files, directories, globs, ``hf:`` datasets) or nothing (the embedded corpus), :func:`training_text` runs the
same preparation as ``bertswarm-prepare`` (:func:`peer.data.prepare.prepare_dataset`) into
``$XDG_CACHE_HOME/bertswarm/prepared/<key>`` the first time, and later starts with the same text and settings reuse
it. The key covers the text's identity (local files: resolved path, size and modification time; ``hf:`` entries: the
entry; the embedded corpus: its source files, as :func:`peer.data.embedded.default_corpus_key`), the tokenizer's
fingerprint, the sequence length, NSP and the shard format. Peers on one machine that start together share one
preparation: a file lock makes the others wait, then they open what the first wrote (an interrupted preparation is
resumed, finished shards kept). Only the :data:`KEEP` most recently used entries are kept.

Unlike a ``bertswarm-prepare`` directory, a cached dataset is not pinned in the run's manifest: volunteers' text
(and their embedded corpus, built from their own installed packages) may differ, as it always could.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from peer.data import embedded, shards
from peer.data.corpus import HF_PREFIX, expand_entry
from peer.data.prepare import prepare_dataset
from peer.data.shards import PreparedDataset
from peer.data.tokenizer import tokenizer_fingerprint
from peer.errors import InputError

logger = logging.getLogger(__name__)

KEEP = 8  # cached datasets kept (most recently used first); each is about twice the text's size in bytes
MIN_AGE_S = 86_400  # never removed within a day of its last use: a running peer may still be reading it
_LOCK_SUFFIX = ".lock"


def cache_root() -> Path:
    return embedded.cache_dir() / "prepared"


def text_identity(data: Sequence[str]) -> list:
    """What identifies the text ``data`` names, without reading it; raises :class:`~peer.errors.InputError` for a
    missing path (the caller adds the flag)."""
    if not data:
        return ["embedded", embedded.default_corpus_key()]
    identity: list = []
    for entry in map(os.fspath, data):
        if entry.startswith(HF_PREFIX):
            identity.append(entry)
            continue
        for path in expand_entry(entry):
            try:
                stat = path.stat()
            except OSError as e:
                raise InputError(path, f"cannot read ({e.strerror or e}); pass a readable file") from None
            identity.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return identity


def cache_key(data: Sequence[str], tokenizer, *, seq_len: int, nsp: bool) -> str:
    settings = [shards.FORMAT_VERSION, tokenizer_fingerprint(tokenizer), seq_len, nsp, text_identity(data)]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def training_text(
    data: Sequence[str], tokenizer, *, seq_len: int, nsp: bool, root: Path | None = None
) -> PreparedDataset:
    """The prepared dataset of the text ``data`` names (the embedded corpus when empty), from the cache or prepared
    into it now. Raises :class:`~peer.errors.InputError` (unreadable, empty or binary input; the caller adds
    ``--data``)."""
    key = cache_key(data, tokenizer, seq_len=seq_len, nsp=nsp)
    root = cache_root() if root is None else root
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / (key + _LOCK_SUFFIX), "a+")  # noqa: SIM115 - closed in _locked
    except OSError as e:  # a read-only home: prepare for this process alone
        logger.warning("cannot use the data cache %s (%s); preparing into a temporary directory", root, e)
        temporary = Path(tempfile.mkdtemp(prefix="bertswarm-data-"))
        atexit.register(shutil.rmtree, temporary, ignore_errors=True)
        return _prepare(data, tokenizer, temporary, seq_len, nsp)
    out = root / key
    with _locked(lock, out):
        dataset = _cached(out, tokenizer, seq_len, nsp)
        if dataset is None:
            dataset = _prepare(data, tokenizer, out, seq_len, nsp)
    _prune(root, keep=KEEP)
    return dataset


@contextlib.contextmanager
def _locked(lock, out: Path) -> Iterator[None]:
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process preparing the same text into %s", out)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached(out: Path, tokenizer, seq_len: int, nsp: bool) -> PreparedDataset | None:
    if not (out / shards.INDEX_NAME).exists():
        return None
    try:
        dataset = PreparedDataset.open(out)
        dataset.check(tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), seq_len=seq_len, nsp=nsp)
    except InputError as e:  # damaged: prepare again (finished shards that still verify are reused)
        logger.warning("cached training data is unusable (%s); preparing it again", e)
        return None
    os.utime(out / shards.INDEX_NAME)  # most recently used: _prune keeps it
    logger.info("training data: %s (prepared earlier, %d tokens)", out, dataset.index.num_tokens)
    return dataset


def _prepare(data: Sequence[str], tokenizer, out: Path, seq_len: int, nsp: bool) -> PreparedDataset:
    what = ", ".join(map(str, data)) if data else "the embedded corpus"
    logger.info("preparing %s into %s (once: later starts with the same text reuse it)", what, out)
    result = prepare_dataset(
        list(data) or ["the embedded corpus"],
        out,
        tokenizer,
        seq_len=seq_len,
        nsp=nsp,
        documents=None if data else embedded.default_corpus,
    )
    logger.info("prepared in %.1f s: %s", result.seconds, result.stats.summary())
    return PreparedDataset(out, result.index)


def _prune(root: Path, keep: int, min_age: float = MIN_AGE_S) -> None:
    """Remove the cached datasets past the ``keep`` most recently used that were last used over ``min_age`` seconds
    ago and that no process is preparing (lock files stay: removing one races with a process opening it)."""
    entries = []
    for path in root.iterdir():
        with contextlib.suppress(OSError):
            if path.is_dir():
                index = path / shards.INDEX_NAME
                entries.append(((index if index.exists() else path).stat().st_mtime, path))
    for used, path in sorted(entries, reverse=True)[keep:]:
        if time.time() - used < min_age:
            continue
        try:
            with open(root / (path.name + _LOCK_SUFFIX), "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # being prepared (BlockingIOError), or not ours to remove: next time
            continue
