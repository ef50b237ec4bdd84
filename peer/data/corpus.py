"""Text corpora for MLM pre-training: user files, directories, globs and ``hf:`` datasets, the held-out split and each
peer's order of documents. The embedded default corpus is built in :mod:`peer.data.embedded`.

Documents are plain ``str``. A document may hold several paragraphs separated by single newlines; sentence-pair
(NSP) sampling in :mod:`peer.data.batches` splits documents into sentences itself.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from peer.errors import InputError, UserError

logger = logging.getLogger(__name__)

_TEXT_SUFFIXES = (".txt", ".jsonl")
HF_PREFIX = "hf:"


def corpus_fingerprint(documents: Iterable[str]) -> str:
    """sha256 hex of the documents in order; equal fingerprints mean peers train on the same text."""
    digest = hashlib.sha256()
    for document in documents:
        data = document.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


# --- user corpora ---------------------------------------------------------------------------------------------

_DATA_HINT = "pass an existing .txt/.jsonl file, directory or glob"
_GLOB_CHARS = frozenset("*?[")


def load_documents(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Load documents from files, directories, globs and Hugging Face datasets, in a deterministic order.

    Each entry of ``paths`` is one of:

    * a file: ``.jsonl`` holds one JSON object per line with a string field ``"text"`` (one document per line);
      any other file is UTF-8 text whose documents are separated by blank lines;
    * a directory: all ``*.txt`` and ``*.jsonl`` files below it, recursively, in sorted order;
    * a glob (``data/**/*.txt``), expanded in sorted order (a matched directory is expanded as above);
    * ``hf:NAME[:CONFIG][:SPLIT]``: the ``"text"`` column of a Hugging Face dataset (split defaults to ``train``;
      needs ``pip install 'bertswarm[datasets]'``).

    Entries are read in the order given; a file reached twice is read once. Raises :class:`~peer.errors.InputError`
    (one line: the entry, the problem and the fix; the caller adds the flag) for a missing path, a glob or directory
    without text files, an empty, binary, non-UTF-8 or unreadable file, and a malformed JSONL line.
    """
    return [document for _source, document in iter_documents(paths, stream_hf=False)]


def iter_documents(
    paths: Sequence[str | os.PathLike[str]], *, stream_hf: bool = True, on_empty: Callable[[], None] | None = None
) -> Iterator[tuple[str, str]]:
    """``(source, document)`` pairs of the entries :func:`load_documents` accepts, in the same order, lazily: local
    files are streamed line by line (memory is bounded by the longest line or paragraph), and with ``stream_hf`` an
    ``hf:`` dataset is streamed (``datasets``' ``streaming=True``), never materialised. ``source`` names the file or
    the entry. ``on_empty`` is called for each empty record skipped (a JSONL line or dataset row whose text is
    blank)."""
    if not paths:
        raise UserError(f"no corpus given; {_DATA_HINT}")
    seen_files: set[Path] = set()
    for entry in map(os.fspath, paths):
        if entry.startswith(HF_PREFIX):
            documents = _stream_hf_dataset(entry, on_empty) if stream_hf else _load_hf_dataset(entry)
            yield from ((entry, document) for document in documents)
            continue
        for path in expand_entry(entry):
            if path.resolve() not in seen_files:
                seen_files.add(path.resolve())
                yield from ((str(path), document) for document in _read_file(path, on_empty))


def expand_entry(entry: str) -> list[Path]:
    """The files a local ``--data`` entry names (file, directory, glob), in reading order; raises
    :class:`~peer.errors.InputError` for a missing path or an entry without text files. Reads no file."""
    path = Path(os.path.expanduser(entry))
    if path.is_dir():
        try:
            files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file())
        except OSError as exc:
            raise InputError(entry, f"cannot list directory ({exc.strerror or exc}); {_DATA_HINT}") from None
        if not files:
            raise InputError(entry, f"directory has no .txt or .jsonl files; {_DATA_HINT}")
        return files
    if path.exists():
        return [path]
    if _GLOB_CHARS & set(entry):
        files = []
        for match in sorted(glob.glob(os.path.expanduser(entry), recursive=True)):
            match_path = Path(match)
            files.extend(expand_entry(match) if match_path.is_dir() else [match_path])
        if not files:
            raise InputError(entry, f"glob matches no files; {_DATA_HINT}")
        return files
    raise InputError(entry, f"no such file or directory; {_DATA_HINT}")


QUICK_LOOK_FILES = 64  # check_start opens this many files of an entry: a start stays quick for 100,000 files


def check_start(paths: Sequence[str | os.PathLike[str]]) -> None:
    """A quick look at the local entries of ``paths`` before anything slow starts: each names files
    (:func:`expand_entry`), and its first ``QUICK_LOOK_FILES`` files open and start with UTF-8 text (read up to the
    first non-blank line). Raises the :class:`~peer.errors.InputError` the full read would; a problem further into a
    file, or in a later file, is found when the text is read. ``hf:`` entries are left to their own loading."""
    for entry in map(os.fspath, paths):
        if entry.startswith(HF_PREFIX):
            continue
        for path in expand_entry(entry)[:QUICK_LOOK_FILES]:
            for _number, line in _lines(path):
                if line.strip():
                    break


def _read_file(path: Path, on_empty: Callable[[], None] | None = None) -> Iterator[str]:
    """The documents of one file, streamed: memory is bounded by the longest line (JSONL) or paragraph (text), not the
    file, so a single 20 GB dump can be prepared. Problems are raised when reached (naming the file and the offset)."""
    documents = _parse_jsonl(path, on_empty) if path.suffix == ".jsonl" else _split_paragraphs(path)
    empty = True
    for document in documents:
        empty = False
        yield document
    if empty:
        raise InputError(path, "no non-empty documents; pass a file with text in it")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file (a BOM at the start is dropped), read through a buffer. Raises
    :class:`~peer.errors.InputError` for an unreadable, binary (NUL bytes), non-UTF-8 or blank file."""
    try:
        f = path.open("rb")  # noqa: SIM115 - closed below (the with), after its own errors are told apart
    except PermissionError:
        raise InputError(path, "permission denied; make the file readable or pass another file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc}); {_DATA_HINT}") from None
    offset, text_seen = 0, False
    with f:
        try:
            for number, raw in enumerate(f, start=1):
                if b"\0" in raw:
                    raise InputError(path, "binary file (contains NUL bytes); pass UTF-8 text (.txt) or .jsonl")
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise InputError(path, f"not UTF-8 text (bad byte at offset {offset + exc.start}); convert it "
                                     "to UTF-8 or pass another file") from None  # fmt: skip
                offset += len(raw)
                text_seen = text_seen or bool(line.strip())
                yield number, line
        except OSError as exc:
            raise InputError(path, f"cannot read ({exc.strerror or exc}); {_DATA_HINT}") from None
    if not text_seen:
        raise InputError(path, "file is empty; pass a file with text in it")


def _split_paragraphs(path: Path) -> Iterator[str]:
    """Documents of a .txt file: blocks separated by blank (or whitespace-only) lines, inner newlines kept."""
    block: list[str] = []
    for _number, line in _lines(path):
        line = line.replace("\r\n", "\n")
        if line.strip(" \t\r\f\v\n"):
            block.append(line)
            continue
        if "".join(block).strip():
            yield "".join(block).strip()
        block = []
    if "".join(block).strip():
        yield "".join(block).strip()


def _parse_jsonl(path: Path, on_empty: Callable[[], None] | None = None) -> Iterator[str]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{number}", f"invalid JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}:{number}", 'expected a JSON object with a string field "text"; fix that line')
        if record["text"].strip():
            yield record["text"].strip()
        elif on_empty is not None:
            on_empty()


def _parse_hf_entry(entry: str) -> tuple[str, str | None, str]:
    parts = entry[len(HF_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise InputError(entry, "expected hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1:train")
    return parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"


def open_hf_dataset(entry: str, **kwargs):
    name, config, split = _parse_hf_entry(entry)
    try:
        import datasets
    except ImportError:
        raise InputError(entry, "the datasets library is not installed; pip install 'bertswarm[datasets]'") from None
    try:
        return datasets.load_dataset(name, config, split=split, **kwargs)
    except Exception as exc:  # network, auth, unknown name/config/split: all user-fixable, none worth a traceback
        raise _hf_error(entry, exc) from None


def _hf_error(entry: str, exc: Exception) -> InputError:
    message = " ".join(str(exc).split())[:300]
    return InputError(
        entry,
        f"could not load the dataset ({type(exc).__name__}: {message}); check the name, config, split and network",
    )


def _load_hf_dataset(entry: str) -> list[str]:
    """``hf:NAME[:CONFIG][:SPLIT]`` -> the non-empty strings of the dataset's "text" column."""
    dataset = open_hf_dataset(entry)
    if "text" not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise InputError(entry, f'the dataset has no "text" column (columns: {columns}); pick a text dataset')
    documents = [text.strip() for text in dataset["text"] if isinstance(text, str) and text.strip()]
    if not documents:
        raise InputError(entry, 'the "text" column is empty; pick another dataset or split')
    return documents


def _stream_hf_dataset(entry: str, on_empty: Callable[[], None] | None = None) -> Iterator[str]:
    """Like :func:`_load_hf_dataset`, record by record from ``load_dataset(..., streaming=True)``."""
    dataset = open_hf_dataset(entry, streaming=True)
    found = False
    try:
        for record in dataset:
            if not isinstance(record, dict) or "text" not in record:
                columns = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise InputError(entry, f'the dataset has no "text" column (columns: {columns}); pick a text dataset')
            text = record["text"]
            if isinstance(text, str) and text.strip():
                found = True
                yield text.strip()
            elif on_empty is not None:
                on_empty()
    except InputError:
        raise
    except Exception as exc:  # the stream reads over the network: a dropped connection is the user's to retry
        raise _hf_error(entry, exc) from None
    if not found:
        raise InputError(entry, 'the "text" column is empty; pick another dataset or split')


# --- splitting and ordering -----------------------------------------------------------------------------------


def _stable_unit_hash(text: str) -> float:
    """A number in [0, 1) determined by the text alone: equal on every machine, Python version and run."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_heldout(documents: Sequence[str], fraction: float = 0.02) -> tuple[list[str], list[str]]:
    """Split into ``(train, heldout)`` by a stable hash of each document's text; both keep the input order.

    Every peer on the same corpus computes the same split without talking to anyone, identical documents always land
    on the same side (so duplicates cannot leak into training), and the split is independent of document order.
    With at least two documents and ``fraction > 0`` both sides are non-empty: the lowest-hash document is held
    out if none was, and the highest-hash one is kept for training if all were (a corpus of identical documents
    cannot be split without leaking and is all training). ``fraction=0`` disables the held-out set.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or len(documents) < 2:
        return list(documents), []
    scores = [_stable_unit_hash(doc) for doc in documents]
    heldout_mask = [score < fraction for score in scores]
    if not any(heldout_mask):
        lowest = min(scores)
        heldout_mask = [score == lowest for score in scores]
    if all(heldout_mask):
        highest = max(scores)
        heldout_mask = [score != highest for score in scores]
    train = [doc for doc, held in zip(documents, heldout_mask, strict=True) if not held]
    heldout = [doc for doc, held in zip(documents, heldout_mask, strict=True) if held]
    return train, heldout


def shard_order(num_items: int, seed: int) -> np.ndarray:
    """A deterministic permutation of ``range(num_items)`` (int64): same seed, same order; other seed, other order.

    Peers pass different seeds (and ``seed + epoch`` per pass) so they do not train in lock-step on identical batches.
    """
    if num_items < 0 or seed < 0:
        raise ValueError(f"shard_order needs num_items >= 0 and seed >= 0, got {num_items} and {seed}")
    return np.random.Generator(np.random.PCG64(seed)).permutation(num_items)
