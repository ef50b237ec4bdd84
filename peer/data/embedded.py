"""The embedded default corpus: English prose that installed packages already ship, so a swarm trains offline with
no download (the Python language reference topics bundled with ``pydoc``, and docstrings of the standard library,
hivemind, torch and transformers), extracted with :mod:`ast` (nothing is imported) and cleaned of code, doctests and
reST markup.

Building it takes a few seconds once; the result is cached under ``$XDG_CACHE_HOME/bertswarm`` (default
``~/.cache/bertswarm``), keyed by the source files' paths, sizes and mtimes. Peers with different Python, torch or
transformers versions get slightly different default corpora; compare :func:`peer.data.corpus.corpus_fingerprint` if
that matters (the shipped vocabulary does not change with them).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import sysconfig
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from peer.store.atomic import atomic_write_text

logger = logging.getLogger(__name__)

# Bump when the extraction or cleaning rules change: it is part of the cache key.
_CORPUS_FORMAT_VERSION = 3

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
PACKAGE_SOURCES: tuple[tuple[str, tuple[str, ...]], ...] = (
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


def python_files(root: Path, recursive: bool = True) -> list[Path]:
    if not recursive:
        return [path for path in root.glob("*.py") if path.is_file()]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        files.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return files


def package_dir(name: str) -> Path | None:
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
    files = set(python_files(stdlib))
    for package, subdirs in PACKAGE_SOURCES:
        root = package_dir(package)
        if root is None:
            logger.debug("default corpus: package %s not installed, skipped", package)
            continue
        for subdir in subdirs:
            path = root if subdir in ("", ".") else root / subdir
            if path.is_dir():
                files.update(python_files(path, recursive=subdir != "."))
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


def extract_paragraphs(path: Path) -> list[list[str]]:
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
        extracted = [extract_paragraphs(path) for path in sources]
    for per_file in extracted:
        for paragraphs in per_file:
            fresh = [p for p in paragraphs if p not in seen]
            seen.update(fresh)
            if fresh:
                documents.append("\n".join(fresh))
    return documents


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "bertswarm")


def sources_key(sources: Sequence[Path]) -> str:
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
        atomic_write_text(path, json.dumps(documents, ensure_ascii=False, separators=(",", ":")))
    except OSError as exc:  # a read-only home only costs a rebuild next time
        logger.warning("could not cache the default corpus at %s: %s", path, exc)


def default_corpus_key() -> str:
    """Identifies the embedded corpus this machine builds (its source files' paths, sizes and times), without
    building or loading it."""
    return sources_key(_default_sources())


def default_corpus() -> list[str]:
    """The embedded default corpus: ~3.5 MB of English documentation prose from installed packages, no download.

    Deterministic for a given set of installed files. The first call builds it (a few seconds) and caches it on disk;
    later calls load the cache (well under a second). Returns a new list each call.
    """
    sources = _default_sources()
    cache = cache_dir() / f"default-corpus-{sources_key(sources)}.json"
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
