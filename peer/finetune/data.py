"""Labelled data for fine-tuning: ``.jsonl`` and ``.csv`` files and ``hf:`` datasets of ``text`` (and an optional
``text_pair``) with a ``label``; the validation split; tokenised, padded batches.

Formats:

* ``.jsonl``: one JSON object per line, ``{"text": str, "label": str | int}``, optionally ``"text_pair": str``;
* ``.csv``: a header row naming ``text`` and ``label`` (and optionally ``text_pair``), UTF-8, any other columns
  ignored;
* ``hf:NAME[:CONFIG][:SPLIT]`` (e.g. ``hf:glue:sst2:validation``): loaded through the same path as the MLM corpus
  (:mod:`peer.data.corpus`, needs ``pip install 'bertswarm[datasets]'`` and network); the text column is the first
  of ``text``, ``sentence``, ``sentence1``, ``question``, the pair column ``text_pair``, ``sentence2`` or
  ``question2`` if present, and a ``ClassLabel`` label is given its names.

Labels are strings (an integer label ``1`` becomes ``"1"``); the classifier's label ids are the sorted label names.
Every problem is an :class:`~peer.errors.InputError` naming the file and line, the problem and the fix; the command
adds the flag.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from peer.data.corpus import HF_PREFIX, open_hf_dataset, split_heldout
from peer.errors import InputError

_FIX = "pass .jsonl or .csv files with a text and a label per record"
_TEXT_COLUMNS = ("text", "sentence", "sentence1", "question")
_PAIR_COLUMNS = ("text_pair", "sentence2", "question2")


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    text_pair: str | None = None

    @property
    def key(self) -> str:
        """What the validation split hashes: identical inputs always land on the same side."""
        return self.text if self.text_pair is None else f"{self.text}\n{self.text_pair}"


def load_examples(entries: Sequence[str | os.PathLike[str]]) -> list[Example]:
    """All examples of the entries, in order. Raises :class:`~peer.errors.InputError` for a missing, unreadable,
    binary, non-UTF-8 or empty file, a malformed line or row (``file:line``), and a missing text or label."""
    examples = []
    for entry in map(os.fspath, entries):
        if entry.startswith(HF_PREFIX):
            examples.extend(_load_hf(entry))
            continue
        path = Path(entry).expanduser()
        text = _read_text(path)
        if path.suffix == ".csv":
            found = list(_parse_csv(path, text))
        elif path.suffix == ".jsonl":
            found = list(_parse_jsonl(path, text))
        else:
            raise InputError(path, f"unknown file type {path.suffix or '(none)'!r}; {_FIX}")
        if not found:
            raise InputError(path, f"no records; {_FIX}")
        examples.extend(found)
    return examples


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, f"no such file; {_FIX}") from None
    except IsADirectoryError:
        raise InputError(path, f"is a directory; {_FIX}") from None
    except PermissionError:
        raise InputError(path, "permission denied; make the file readable or pass another file") from None
    except OSError as e:
        raise InputError(path, f"cannot read ({e.strerror or e}); {_FIX}") from None
    if b"\0" in data:
        raise InputError(path, f"binary file (contains NUL bytes); {_FIX}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None


def _example(where: str, text: object, label: object, pair: object) -> Example:
    if not isinstance(text, str) or not text.strip():
        raise InputError(where, 'missing or empty "text"; give every record a non-empty text')
    if label is None or label == "" or isinstance(label, bool) or not isinstance(label, str | int):
        raise InputError(where, 'missing "label" (a string or an integer); give every record a label')
    if pair is not None and not isinstance(pair, str):
        raise InputError(where, '"text_pair" must be a string; fix that record')
    return Example(text.strip(), str(label).strip(), pair.strip() if pair else None)


def _parse_jsonl(path: Path, text: str) -> Iterator[Example]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise InputError(where, f"invalid JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(record, dict):
            raise InputError(where, 'expected a JSON object like {"text": "...", "label": "..."}; fix that line')
        yield _example(where, record.get("text"), record.get("label"), record.get("text_pair"))


def _parse_csv(path: Path, text: str) -> Iterator[Example]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        missing = [column for column in ("text", "label") if column not in header]
        if missing:
            raise InputError(f"{path}:1", f"header lacks column {' and '.join(missing)}; name the columns in row 1")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or any(value is None for value in row.values()):
                raise InputError(where, f"expected {len(header)} fields like the header; fix that row")
            yield _example(where, row["text"], row["label"], row.get("text_pair") or None)
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}", f"malformed CSV ({e}); fix that row") from None


def _load_hf(entry: str) -> list[Example]:
    dataset = open_hf_dataset(entry)  # the MLM corpus's loader: same errors, same optional extra
    columns = list(dataset.column_names)
    text_column = next((c for c in _TEXT_COLUMNS if c in columns), None)
    if text_column is None or "label" not in columns:
        raise InputError(entry, f"needs a text and a label column (columns: {', '.join(columns)}); pick another set")
    pair_column = next((c for c in _PAIR_COLUMNS if c in columns), None)
    names = getattr(dataset.features.get("label"), "names", None) if hasattr(dataset, "features") else None
    examples = []
    for number, record in enumerate(dataset):
        label = record["label"]
        if isinstance(label, int) and label < 0:
            raise InputError(entry, "the split is unlabelled (label -1, as in GLUE test splits); pick a labelled split")
        if names is not None and isinstance(label, int):
            label = names[label]
        examples.append(_example(f"{entry} row {number}", record[text_column], label,
                                 record[pair_column] if pair_column else None))  # fmt: skip
    if not examples:
        raise InputError(entry, "the split is empty; pick another split")
    return examples


def carve_validation(examples: Sequence[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """``(train, validation)`` by a stable hash of each example's text (:func:`peer.data.corpus.split_heldout`):
    the same data gives the same split everywhere, in any order, and duplicates never straddle it."""
    _, held_keys = split_heldout(sorted({e.key for e in examples}), fraction)
    held = set(held_keys)
    return [e for e in examples if e.key not in held], [e for e in examples if e.key in held]


def check_labels(train: Sequence[Example], validation: Sequence[Example], where: str) -> list[str]:
    """The sorted label names; at least two classes in training, and no validation label unseen in training."""
    counts = Counter(e.label for e in train)
    if len(counts) < 2:
        only = next(iter(counts), "none")
        raise InputError(where, f"only one class ({only!r}) in the training data; a classifier needs at least two")
    unseen = sorted({e.label for e in validation} - set(counts))
    if unseen:
        raise InputError(where, f"validation labels {', '.join(map(repr, unseen[:5]))} never occur in training; "
                         "train on every class you validate on")  # fmt: skip
    return sorted(counts)


class Encoder:
    """Text (pairs) → padded id tensors: ``[CLS] A [SEP] (B [SEP])``, truncated to ``max_length`` tokens."""

    def __init__(self, tokenizer: Tokenizer, max_length: int):
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: truncation/padding are set on it
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.no_padding()
        self.pad_id = self.tokenizer.token_to_id("[PAD]")

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if any(e.text_pair is not None for e in examples):
            inputs = [(e.text, e.text_pair or "") for e in examples]
        else:
            inputs = [e.text for e in examples]
        encodings = self.tokenizer.encode_batch(inputs)
        width = max(len(enc.ids) for enc in encodings)
        ids = torch.full((len(encodings), width), self.pad_id, dtype=torch.long)
        types = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = torch.tensor(enc.ids)
            types[row, : len(enc.ids)] = torch.tensor(enc.type_ids)
            mask[row, : len(enc.ids)] = 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def batches(
    examples: Sequence[Example], encoder: Encoder, label_ids: dict[str, int], batch_size: int, order=None
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches (with ``labels``) in ``order`` (a sequence of indices; default: as given)."""
    order = range(len(examples)) if order is None else order
    order = list(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        batch = encoder(chunk)
        batch["labels"] = torch.tensor([label_ids[e.label] for e in chunk], dtype=torch.long)
        yield batch
