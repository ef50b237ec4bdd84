"""Text corpora for MLM pre-training: the embedded default corpus, user files, held-out split and per-peer order.

Documents are plain ``str``. A document may hold several paragraphs separated by single newlines; sentence-pair
(NSP) sampling in :mod:`peer.batches` splits documents into sentences itself.

The default corpus needs no download: it is English prose that installed packages already ship (the Python
language reference topics bundled with ``pydoc``, and docstrings of the standard library, hivemind, torch and
transformers), extracted with :mod:`ast` (nothing is imported) and cleaned of code, doctests and reST markup.
Building it takes a few seconds once; the result is cached under ``$XDG_CACHE_HOME/bertswarm`` (default
``~/.cache/bertswarm``), keyed by the source files' paths, sizes and mtimes. Peers with different Python, torch
or transformers versions get slightly different default corpora; compare :func:`corpus_fingerprint` if that
matters (the shipped vocabulary does not change with them).
"""

from __future__ import annotations

import ast
import glob
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from peer.errors import UserError

logger = logging.getLogger(__name__)

# Bump when the extraction or cleaning rules change: it is part of the cache key.
_CORPUS_FORMAT_VERSION = 3
_TEXT_SUFFIXES = (".txt", ".jsonl")
_HF_PREFIX = "hf:"

# Directories never worth reading: test suites (code-heavy, duplicated fixtures), demos, codec tables, vendored
# copies, deprecated code-heavy tools. pydoc_data is read separately (its topics are a dict literal, not docstrings).
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "testing",
        "idle_test",
        "site-packages",
        "__pycache__",
        "turtledemo",
        "encodings",
        "_vendor",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "ensurepip",
    }
)
# Parts of installed packages read for the default corpus ("" = the whole package, "." = its top-level modules only).
# Chosen for prose density: with the standard library they give > 3 MB of clean text in a cold build of a few seconds.
_PACKAGE_SOURCES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hivemind", ("",)),
    ("torch", (".", "nn", "optim", "autograd", "cuda", "distributed", "distributions")),
    ("transformers", (".", "generation")),
)

# --- cleaning -------------------------------------------------------------------------------------------------

_DELETE_CODE_CHARS = str.maketrans("", "", "=(){}[]<>;\\|#@$%^&~*/+")
_NON_LETTER_RE = re.compile(r"[\W\d_]+")
_ROLE_RE = re.compile(r":[\w.+-]+:`(~?)([^`<]*?)\s*(?:<[^`>]*>)?`")
_ROLE_PREFIX_RE = re.compile(r":[\w.+-]+:(?=`)")
_LITERAL_RE = re.compile(r"``([^`]*)``")
_LINK_RE = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`_{1,2}")
_BACKTICK_RE = re.compile(r"`([^`]*)`")
_EMPHASIS_RE = re.compile(r"(?<![\w*])\*{1,2}([^*\s][^*]*?)\*{1,2}(?![\w*])")
_URL_RE = re.compile(r"<?https?://[^\s<>`]*[^\s<>`.,;:)]>?")
_FIELD_RE = re.compile(
    r"^:(?:param|parameter|arg|argument|key|keyword|type|raises?|returns?|rtype|ivar|cvar|var)\b[^:]*:"
)
_BULLET_RE = re.compile(r"^(?:[-*+\u2022]|\d{1,2}[.)]|\(\w\)|#\.)\s+")
_DIRECTIVE_RE = re.compile(r"^\.\.\s+[\w:-]+::")
_RULE_RE = re.compile(r"^[=\-~^*+#`:.'\"|_ ]+$")  # section underlines, table borders, separators
_HEADER_RE = re.compile(
    r"^(?:args|arguments|parameters|params|returns?|yields?|raises|examples?|notes?|attributes|keyword arguments|"
    r"kwargs|shape|see also|warnings?|todo|references?|inputs?|outputs?|methods?|example usage)\s*:{0,2}$",
    re.IGNORECASE,
)
_WORD_RE = re.compile(r"[A-Za-z]+")
_MIN_WORDS = 6


def _is_structure_line(line: str) -> bool:
    """Lines that are never prose: tables, rules, grammar productions, reST directives and section headers."""
    return (
        line.startswith(("|", "+-", "+=", "::"))
        or "::=" in line
        or _RULE_RE.match(line) is not None
        or _DIRECTIVE_RE.match(line) is not None
        or _HEADER_RE.match(line) is not None
    )


def _is_prose(paragraph: str) -> bool:
    """Prose has enough words, few code symbols and mostly letters (rejects code, math, signatures, tables)."""
    chars = paragraph.replace(" ", "")
    if not chars or len(_WORD_RE.findall(paragraph)) < _MIN_WORDS:
        return False
    symbols = len(chars) - len(chars.translate(_DELETE_CODE_CHARS))
    letters = len(_NON_LETTER_RE.sub("", chars))
    return symbols <= 0.05 * len(chars) and letters >= 0.7 * len(chars)


def _strip_line_markup(line: str) -> str:
    line = _FIELD_RE.sub("", line)
    line = _BULLET_RE.sub("", line)
    return line[:-1] if line.endswith("::") else line  # reST "text::" renders as "text:"


def _strip_inline_markup(text: str) -> str:
    if "http" in text:
        text = _URL_RE.sub("", text)
    if "`" in text:
        text = _ROLE_RE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
        text = _LITERAL_RE.sub(r"\1", text)
        text = _LINK_RE.sub(r"\1", text)
        text = _BACKTICK_RE.sub(r"\1", text)
        text = _ROLE_PREFIX_RE.sub("", text).replace("`", "")  # unbalanced markup in the source
    if "*" in text:
        text = _EMPHASIS_RE.sub(r"\1", text)
    return text


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _raw_paragraphs(text: str) -> Iterator[list[str]]:
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield block
            block = []
    if block:
        yield block


def clean_prose(text: str) -> list[str]:
    """Split documentation text into paragraphs of prose, each a single whitespace-collapsed line.

    Drops doctest sessions, literal blocks (a more-indented paragraph after one ending in ``:``), reST directives,
    section headers, tables, grammar productions, and paragraphs that are short or symbol-heavy (code, math).
    """
    paragraphs = []
    intro_indent = None  # indent of the previous paragraph when it ends with ":" and so may introduce a code block
    for block in _raw_paragraphs(inspect.cleandoc(text)):
        indent = min(_indent(line) for line in block)
        if intro_indent is not None and indent > intro_indent:
            continue  # literal block; keep intro_indent so its following indented paragraphs are skipped too
        kept = []
        for line in block:
            stripped = line.strip()
            if stripped.startswith((">>>", "...", "$ ", "In [")):
                break  # an interactive session runs to the end of the paragraph
            if not _is_structure_line(stripped):
                kept.append(_strip_line_markup(stripped))
        ends_with_colon = block[-1].endswith(":")
        intro_indent = indent if ends_with_colon and not _HEADER_RE.match(block[-1].strip()) else None
        paragraph = " ".join(_strip_inline_markup(" ".join(kept)).split())
        if _is_prose(paragraph):
            paragraphs.append(paragraph)
    return paragraphs


# --- default corpus sources -----------------------------------------------------------------------------------


def _python_files(root: Path, recursive: bool = True) -> list[Path]:
    if not recursive:
        return [path for path in root.glob("*.py") if path.is_file()]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        files.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return files


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)  # locates a top-level package without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _default_sources() -> list[Path]:
    """The source files of the default corpus in a stable order: pydoc topics first, then sorted .py paths."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = set(_python_files(stdlib))
    for package, subdirs in _PACKAGE_SOURCES:
        root = _package_dir(package)
        if root is None:
            logger.debug("default corpus: package %s not installed, skipped", package)
            continue
        for subdir in subdirs:
            path = root if subdir in ("", ".") else root / subdir
            if path.is_dir():
                files.update(_python_files(path, recursive=subdir != "."))
    topics = stdlib / "pydoc_data" / "topics.py"
    return [topics, *sorted(files)] if topics.is_file() else sorted(files)


_TRIPLE_QUOTED_RE = re.compile(rb'""".*?"""|\'\'\'.*?\'\'\'', re.DOTALL)
_MIN_STRING_SHARE = 0.15
_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_DOC_CONTAINERS = (*_DOC_OWNERS, ast.If, ast.Try, ast.ExceptHandler, ast.With)


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Docstrings of the module, its classes and functions (also those nested in if/try/with), in source order.

    Walks statement bodies only instead of ``ast.walk``: the full walk visits every expression node and is ~3x slower.
    """
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOC_OWNERS):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                yield docstring
        children = []
        for field in ("body", "handlers", "orelse", "finalbody"):
            children.extend(child for child in getattr(node, field, ()) if isinstance(child, _DOC_CONTAINERS))
        stack.extend(reversed(children))


def _pydoc_topics(tree: ast.Module) -> Iterator[str]:
    """The help topics of ``pydoc_data/topics.py``: a ``topics = {name: text}`` literal, read without importing."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            for key in sorted(topics):
                yield topics[key]


def _string_share(source: bytes) -> float:
    """Fraction of the file inside triple-quoted strings: a cheap (regex, no parse) docstring-density estimate."""
    return sum(match.end() - match.start() for match in _TRIPLE_QUOTED_RE.finditer(source)) / max(len(source), 1)


def _extract(path: Path) -> list[list[str]]:
    """Cleaned prose of one source file: one list of paragraphs per docstring (or pydoc topic).

    Parsing dominates the build, so code-heavy files (under ``_MIN_STRING_SHARE`` of triple-quoted text) are skipped
    unparsed: they cost ~30% of the parse time for ~10% of the prose.
    """
    try:
        source = path.read_bytes()
        is_topics = path.parent.name == "pydoc_data"
        if not is_topics and _string_share(source) < _MIN_STRING_SHARE:
            return []
        tree = ast.parse(source)
        texts = _pydoc_topics(tree) if is_topics else _docstrings(tree)
        return [clean_prose(text) for text in texts]
    except (OSError, SyntaxError, ValueError, RecursionError) as exc:  # a broken file only shrinks the corpus
        logger.debug("default corpus: skipping %s (%s)", path, exc)
        return []


def _build_default_corpus(sources: Sequence[Path]) -> list[str]:
    """Documents = docstrings/topics, minus paragraphs already seen earlier (licence blurbs, inherited docs)."""
    seen: set[str] = set()
    documents = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources warn at parse time; not our concern
        extracted = [_extract(path) for path in sources]
    for per_file in extracted:
        for paragraphs in per_file:
            fresh = [p for p in paragraphs if p not in seen]
            seen.update(fresh)
            if fresh:
                documents.append("\n".join(fresh))
    return documents


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "bertswarm")


def _sources_key(sources: Sequence[Path]) -> str:
    """Changes whenever a source file is added, removed or modified (e.g. after upgrading Python or torch)."""
    digest = hashlib.sha256(f"bertswarm-default-corpus-v{_CORPUS_FORMAT_VERSION}\n".encode())
    for path in sources:
        try:
            stat = path.stat()
            digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\tmissing\n".encode())
    return digest.hexdigest()[:24]


def _read_cache(path: Path) -> list[str] | None:
    try:
        with open(path, encoding="utf-8") as f:
            documents = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(documents, list) and documents and all(isinstance(d, str) for d in documents):
        return documents
    return None


def _write_cache(path: Path, documents: list[str]) -> None:
    """Atomic write (temp file + rename) so concurrent peers never read a half-written cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(documents, f, ensure_ascii=False, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:  # a read-only home only costs a rebuild next time
        logger.warning("could not cache the default corpus at %s: %s", path, exc)


def default_corpus() -> list[str]:
    """The embedded default corpus: ~3.5 MB of English documentation prose from installed packages, no download.

    Deterministic for a given set of installed files. The first call builds it (a few seconds) and caches it on disk;
    later calls load the cache (well under a second). Returns a new list each call.
    """
    sources = _default_sources()
    cache = _cache_dir() / f"default-corpus-{_sources_key(sources)}.json"
    documents = _read_cache(cache)
    if documents is not None:
        logger.debug("default corpus: loaded %d documents from %s", len(documents), cache)
        return documents
    started = time.perf_counter()
    documents = _build_default_corpus(sources)
    logger.info(
        "built the default corpus: %d documents, %.1f MB from %d files in %.1f s",
        len(documents),
        sum(map(len, documents)) / 1e6,
        len(sources),
        time.perf_counter() - started,
    )
    _write_cache(cache, documents)
    return documents


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

    Entries are read in the order given; a file reached twice is read once. Raises :class:`UserError` (one line: the
    problem and the fix) for a missing path, a glob or directory without text files, an empty, binary, non-UTF-8 or
    unreadable file, and a malformed JSONL line.
    """
    if not paths:
        raise UserError(f"no corpus given; {_DATA_HINT}")
    documents: list[str] = []
    seen_files: set[Path] = set()
    for entry in map(os.fspath, paths):
        if entry.startswith(_HF_PREFIX):
            documents.extend(_load_hf_dataset(entry))
            continue
        for path in _expand(entry):
            if path.resolve() not in seen_files:
                seen_files.add(path.resolve())
                documents.extend(_read_file(path))
    return documents


def _expand(entry: str) -> list[Path]:
    path = Path(os.path.expanduser(entry))
    if path.is_dir():
        try:
            files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file())
        except OSError as exc:
            raise UserError(f"--data {entry}: cannot list directory ({exc.strerror or exc}); {_DATA_HINT}") from None
        if not files:
            raise UserError(f"--data {entry}: directory has no .txt or .jsonl files; {_DATA_HINT}")
        return files
    if path.exists():
        return [path]
    if _GLOB_CHARS & set(entry):
        files = []
        for match in sorted(glob.glob(os.path.expanduser(entry), recursive=True)):
            match_path = Path(match)
            files.extend(_expand(match) if match_path.is_dir() else [match_path])
        if not files:
            raise UserError(f"--data {entry}: glob matches no files; {_DATA_HINT}")
        return files
    raise UserError(f"--data {entry}: no such file or directory; {_DATA_HINT}")


def _read_file(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except PermissionError:
        raise UserError(f"--data {path}: permission denied; make the file readable or pass another file") from None
    except OSError as exc:
        raise UserError(f"--data {path}: cannot read ({exc.strerror or exc}); {_DATA_HINT}") from None
    if b"\0" in data:
        raise UserError(f"--data {path}: binary file (contains NUL bytes); pass UTF-8 text (.txt) or .jsonl")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"--data {path}: not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8 or pass another file"
        ) from None
    if not text.strip():
        raise UserError(f"--data {path}: file is empty; pass a file with text in it")
    documents = _parse_jsonl(path, text) if path.suffix == ".jsonl" else _split_paragraphs(text)
    if not documents:
        raise UserError(f"--data {path}: no non-empty documents; pass a file with text in it")
    return documents


def _split_paragraphs(text: str) -> list[str]:
    """Documents of a .txt file: blocks separated by blank (or whitespace-only) lines, inner newlines kept."""
    blocks = re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n"))
    return [block.strip() for block in blocks if block.strip()]


def _parse_jsonl(path: Path, text: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UserError(
                f"--data {path}:{number}: invalid JSON ({exc.msg}); write one JSON object per line"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f'--data {path}:{number}: expected a JSON object with a string field "text"; fix that line')
        if record["text"].strip():
            documents.append(record["text"].strip())
    return documents


def _load_hf_dataset(entry: str) -> list[str]:
    """``hf:NAME[:CONFIG][:SPLIT]`` -> the non-empty strings of the dataset's "text" column."""
    parts = entry[len(_HF_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise UserError(f"--data {entry}: expected hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1:train")
    name, config, split = parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"--data {entry}: the datasets library is not installed; pip install 'bertswarm[datasets]'"
        ) from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, auth, unknown name/config/split: all user-fixable, none worth a traceback
        message = " ".join(str(exc).split())[:300]
        raise UserError(
            f"--data {entry}: could not load the dataset ({type(exc).__name__}: {message}); "
            "check the name, config, split and network"
        ) from None
    if "text" not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise UserError(f'--data {entry}: the dataset has no "text" column (columns: {columns}); pick a text dataset')
    documents = [text.strip() for text in dataset["text"] if isinstance(text, str) and text.strip()]
    if not documents:
        raise UserError(f'--data {entry}: the "text" column is empty; pick another dataset or split')
    return documents


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
