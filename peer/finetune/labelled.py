"""``topics``: a labelled text-classification set built offline from what the project already has installed.

Task: given one paragraph of English documentation prose, say which package documents it. Four classes:

======================  ============================================================  ===================
label                   source (docstrings, extracted with :mod:`ast`, nothing run)  licence of the text
======================  ============================================================  ===================
``hivemind``            the whole ``hivemind`` package                                MIT
``torch``               ``torch`` (top level, ``nn``, ``optim``, ``autograd``, ...)   BSD-3-Clause
``transformers``        ``transformers`` (top level, ``generation``)                  Apache-2.0
``python``              top-level modules of the Python standard library              PSF-2.0
======================  ============================================================  ===================

The paragraphs are the embedded MLM corpus's (:mod:`peer.data.embedded`: same files, same extraction and cleaning),
labelled by the package they come from. A paragraph found in more than one package is dropped (its label would be
ambiguous). Each class keeps at most ``per_class`` paragraphs, those with the lowest stable hash of their text, so
the classes are balanced and the choice does not depend on file order. The split is by a stable hash of the text as
well (about 70 % train, 15 % validation, 15 % test): identical text never lands on two sides.

Provenance and licence. Nothing is shipped: the set is generated at run time from the installed packages (like the
embedded corpus), so bertswarm redistributes none of their text. What is written (``write_topics``) is short excerpts
of those packages' documentation under their own licences (table above); keep ``info.json``, which records them,
with any copy. Deterministic: the same installed files give byte-identical files; ``info.json`` records the Python
and package versions and a sha256 ``fingerprint`` of every record, so two machines can compare their sets.

Usage: ``python -m peer.finetune.labelled --output topics/`` writes ``train.jsonl``, ``validation.jsonl``,
``test.jsonl`` (``{"text": ..., "label": ...}`` per line) and ``info.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import platform
import sys
import sysconfig
import warnings
from collections.abc import Iterable
from pathlib import Path

from peer.data.embedded import PACKAGE_SOURCES, cache_dir, extract_paragraphs, package_dir, python_files, sources_key
from peer.errors import UserError
from peer.store.atomic import atomic_write_text

logger = logging.getLogger(__name__)

NAME = "bertswarm-topics"
FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
LICENCES = {"hivemind": "MIT", "torch": "BSD-3-Clause", "transformers": "Apache-2.0", "python": "PSF-2.0"}
DEFAULT_PER_CLASS = 600
_MIN_WORDS, _MAX_WORDS = 8, 120  # a paragraph, not a fragment nor a page
_VALIDATION, _TEST = 0.15, 0.15


def _unit_hash(text: str, salt: str) -> float:
    digest = hashlib.blake2b(f"{salt}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _class_sources() -> dict[str, list[Path]]:
    """Label → sorted source files; a package that is not installed gives no class."""
    sources = {}
    for package, subdirs in PACKAGE_SOURCES:
        root = package_dir(package)
        if root is None:
            continue
        files: set[Path] = set()
        for subdir in subdirs:
            path = root if subdir in ("", ".") else root / subdir
            if path.is_dir():
                files.update(python_files(path, recursive=subdir != "."))
        sources[package] = sorted(files)
    sources["python"] = sorted(python_files(Path(sysconfig.get_paths()["stdlib"]), recursive=False))
    return sources


def _paragraphs(files: Iterable[Path]) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources warn at parse time
        return {
            paragraph
            for path in files
            for paragraphs in extract_paragraphs(path)
            for paragraph in paragraphs
            if _MIN_WORDS <= len(paragraph.split()) <= _MAX_WORDS
        }


def _paragraphs_by_label() -> dict[str, list[str]]:
    """Label → its sorted paragraphs, cached like the embedded corpus (same directory, keyed by the source files'
    paths, sizes and mtimes, so an upgraded package rebuilds it)."""
    sources = _class_sources()
    key = sources_key([Path(f"labelled-v{FORMAT_VERSION}"), *(path for files in sources.values() for path in files)])
    cache = cache_dir() / f"topics-{key}.json"
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if isinstance(cached, dict) and set(cached) == set(sources):
            return cached
    except (OSError, ValueError):
        pass
    by_label = {label: sorted(_paragraphs(files)) for label, files in sources.items()}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(by_label, ensure_ascii=False, separators=(",", ":")))
    except OSError as e:  # a read-only home only costs a rebuild next time
        logger.warning("could not cache the topics set at %s: %s", cache, e)
    return by_label


def split_of(text: str) -> str:
    """``train``, ``validation`` or ``test``, from a stable hash of the text alone."""
    score = _unit_hash(text, "split")
    return "test" if score < _TEST else "validation" if score < _TEST + _VALIDATION else "train"


def build_topics(per_class: int = DEFAULT_PER_CLASS) -> dict[str, list[dict]]:
    """The set as ``{split: [{"text", "label"}, ...]}``, records sorted by text within a split.

    The first build takes a few seconds (parsing the sources); later ones read a cache. Raises
    :class:`~peer.errors.UserError` if fewer than two classes are installed (hivemind and torch are dependencies of
    bertswarm, so that means a broken install).
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    by_label = _paragraphs_by_label()
    owners: dict[str, int] = {}
    for paragraphs in by_label.values():
        for paragraph in paragraphs:
            owners[paragraph] = owners.get(paragraph, 0) + 1
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for label in sorted(by_label):
        unique = [p for p in by_label[label] if owners[p] == 1]
        for text in sorted(unique, key=lambda p: _unit_hash(p, "pick"))[:per_class]:
            records[split_of(text)].append({"text": text, "label": label})
    if len({r["label"] for split in records.values() for r in split}) < 2:
        raise UserError("fewer than two of hivemind, torch, transformers are installed; reinstall bertswarm")
    for split in records.values():
        split.sort(key=lambda r: (r["text"], r["label"]))
    return records


def fingerprint(records: dict[str, list[dict]]) -> str:
    """sha256 hex of every record of every split, in order."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for record in records[split]:
            digest.update(f"{split}\t{record['label']}\t{record['text']}\n".encode())
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(records: dict[str, list[dict]], per_class: int) -> dict:
    """``info.json``: what the set is, where its text comes from, under which licences, and its fingerprint."""
    labels = sorted({r["label"] for split in records.values() for r in split})
    return {
        "name": NAME,
        "format_version": FORMAT_VERSION,
        "task": "which package documents this paragraph (single-label topic classification)",
        "labels": labels,
        "per_class": per_class,
        "counts": {
            split: {label: sum(r["label"] == label for r in records[split]) for label in labels} for split in SPLITS
        },  # fmt: skip
        "sources": {
            label: {
                "version": platform.python_version() if label == "python" else _version(label),
                "licence": LICENCES[label],
            }
            for label in labels
        },  # fmt: skip
        "provenance": "docstrings of the installed packages, extracted by peer.data.embedded and labelled by "
        "package; generated locally, never downloaded; the text stays under its package's licence",
        "fingerprint": fingerprint(records),
    }


def write_topics(directory: str | Path, per_class: int = DEFAULT_PER_CLASS) -> dict:
    """Write ``<directory>/{train,validation,test}.jsonl`` and ``info.json`` (each file atomically); returns the
    info. Existing files of these names are replaced."""
    records = build_topics(per_class)
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        lines = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for record in records[split])
        atomic_write_text(directory / f"{split}.jsonl", "".join(lines))
    info = describe(records, per_class)
    atomic_write_text(directory / "info.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m peer.finetune.labelled",
        description="Write the offline topic-classification set (paragraphs of installed packages' documentation, "
        "labelled by package) as train/validation/test .jsonl files.",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write (created)")
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, metavar="N",
                        help=f"paragraphs per class at most (default {DEFAULT_PER_CLASS})")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.per_class < 1:
            raise UserError(f"--per-class {args.per_class}: must be a positive integer")
        try:
            info = write_topics(args.output, args.per_class)
        except OSError as e:
            problem = f"cannot write ({e.strerror or e}); pick another directory"
            raise UserError(f"--output {args.output}: {problem}") from None
    except UserError as e:
        print(f"peer.finetune.labelled: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    counts = {split: sum(c.values()) for split, c in info["counts"].items()}
    print(f"{args.output}: {', '.join(f'{n} {s}' for s, n in counts.items())} records, labels "
          f"{' '.join(info['labels'])}, fingerprint {info['fingerprint'][:12]}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
