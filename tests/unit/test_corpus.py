"""Corpus loading, the embedded default corpus, held-out split and per-peer order."""

from __future__ import annotations

import json
import random
import sys
import time
import types
from collections import Counter
from pathlib import Path

import pytest

from peer.data import corpus, embedded
from peer.data.corpus import load_documents, shard_order, split_heldout
from peer.data.embedded import clean_prose, default_corpus
from peer.errors import UserError

# The 20 most frequent words of written English (Oxford English Corpus).
COMMON_ENGLISH = {
    "the", "be", "to", "of", "and", "a", "in", "that", "have", "i",
    "it", "for", "not", "on", "with", "he", "as", "you", "do", "at",
}  # fmt: skip


@pytest.fixture(scope="module")
def built_default_corpus(tmp_path_factory):
    """One cold build into this session's cache directory: (documents, cold build seconds, cache directory).

    The directory is shared with test_tokenizer.py (same path), so the session builds the corpus once."""
    cache_home = tmp_path_factory.getbasetemp() / "xdg-cache"
    cache_home.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache_home))
        started = time.perf_counter()
        documents = default_corpus()
        yield documents, time.perf_counter() - started, cache_home / "bertswarm"


def _user_error(paths) -> str:
    with pytest.raises(UserError) as info:
        load_documents(paths)
    message = str(info.value)
    assert "\n" not in message, "user errors are one line"
    return message


# --- default corpus -------------------------------------------------------------------------------------------


def test_default_corpus_is_megabytes_of_english_prose(built_default_corpus):
    documents, _, _ = built_default_corpus
    assert sum(len(doc.encode("utf-8")) for doc in documents) >= 3_000_000
    assert len(documents) > 5_000
    assert all(isinstance(doc, str) and doc.strip() == doc and doc for doc in documents)
    words = [word.lower() for doc in documents for word in doc.split()]
    share = sum(count for word, count in Counter(words).items() if word in COMMON_ENGLISH) / len(words)
    assert share > 0.15, f"only {share:.1%} common English words"
    text = "\n".join(documents)
    assert ">>>" not in text, "doctest sessions must be cleaned out"
    assert ":class:`" not in text and ".. note::" not in text, "reST markup must be cleaned out"
    assert len(set(documents)) == len(documents)


def test_default_corpus_second_call_is_cached_and_identical(built_default_corpus, monkeypatch):
    documents, cold_seconds, cache_dir = built_default_corpus
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir.parent))
    started = time.perf_counter()
    again = default_corpus()
    warm_seconds = time.perf_counter() - started
    assert again == documents
    assert warm_seconds < 1.0, f"cached load took {warm_seconds:.2f} s"
    assert cold_seconds < 30, f"cold build took {cold_seconds:.1f} s"
    cached = sorted(path.name for path in cache_dir.iterdir())
    assert len(cached) == 1 and cached[0].startswith("default-corpus-") and cached[0].endswith(".json")


def test_default_corpus_cache_ignores_corrupt_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('["truncated', encoding="utf-8")
    assert embedded._read_cache(broken) is None
    assert embedded._read_cache(tmp_path / "missing.json") is None
    embedded._write_cache(tmp_path / "ok.json", ["one document", "another"])
    assert embedded._read_cache(tmp_path / "ok.json") == ["one document", "another"]
    assert [path.name for path in tmp_path.iterdir() if path.suffix == ".tmp"] == []


def test_clean_prose_keeps_prose_and_drops_code_doctests_and_markup():
    docstring = """Return the :class:`~torch.Tensor` of ``indices`` sorted by value, see `the docs <https://x.y>`_.

    Use this when the input fits in memory and you need a *stable* order.

    Example::

        x = sort(values, key=lambda v: (v[0], -v[1]))
        return x

    >>> sort([3, 1, 2])
    [1, 2, 3]

    Args:
        values (list): the items to sort, in any order that the caller likes.

    +-------+-------+
    | a     | b     |
    +-------+-------+
    """
    paragraphs = clean_prose(docstring)
    assert paragraphs == [
        "Return the Tensor of indices sorted by value, see the docs.",
        "Use this when the input fits in memory and you need a stable order.",
        "values (list): the items to sort, in any order that the caller likes.",
    ]


# --- user corpora ---------------------------------------------------------------------------------------------


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First document,\nstill the first.\n\n  \t\nSecond document.\r\n\r\nThird.\n", encoding="utf-8")
    assert load_documents([str(path)]) == ["First document,\nstill the first.", "Second document.", "Third."]


def test_jsonl_documents_and_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": "One doc.", "id": 1}), "", json.dumps({"text": "Two\u2028doc."}), '{"text": "  "}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_documents([str(path)]) == ["One doc.", "Two\u2028doc."]


def test_directories_and_globs_are_sorted_and_deduplicated(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("from b", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "from a"}\n', encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("from c", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored in directories", encoding="utf-8")
    assert load_documents([str(tmp_path)]) == ["from a", "from b", "from c"]
    assert load_documents([str(tmp_path / "*.txt")]) == ["from b"]
    assert load_documents([str(tmp_path / "**" / "*.txt")]) == ["from b", "from c"]
    assert load_documents([str(tmp_path / "b.txt"), str(tmp_path)]) == ["from b", "from a", "from c"]


def test_missing_path(tmp_path):
    message = _user_error([str(tmp_path / "nope.txt")])
    assert "nope.txt: no such file or directory" in message and "pass an existing" in message


def test_glob_matching_nothing(tmp_path):
    assert "glob matches no files" in _user_error([str(tmp_path / "*.txt")])


def test_directory_without_text_files(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert "directory has no .txt or .jsonl files" in _user_error([str(tmp_path)])


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_or_whitespace_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    assert "file is empty" in _user_error([str(path)])


def test_binary_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(b"text\x00\x01\x02binary")
    assert "binary file" in _user_error([str(path)])


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert "not UTF-8" in _user_error([str(path)])


@pytest.mark.parametrize(
    ("line", "problem"),
    [("{not json", "invalid JSON"), ('["a list"]', 'string field "text"'), ('{"txt": "x"}', 'string field "text"')],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    message = _user_error([str(path)])
    assert f"{path}:3:" in message and problem in message


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("private", encoding="utf-8")
    real_open = Path.open

    def path_open(self, *args, **kwargs):
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", path_open)  # chmod 000 does not stop root
    assert "permission denied" in _user_error([str(path)])


def test_no_paths():
    assert "no corpus given" in _user_error([])


# --- Hugging Face datasets (stubbed: no network) --------------------------------------------------------------


class _FakeDataset:
    def __init__(self, columns: dict[str, list]):
        self._columns = columns
        self.column_names = list(columns)

    def __getitem__(self, name: str) -> list:
        return self._columns[name]


def _install_fake_datasets(monkeypatch, load_dataset) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hf_dataset_text_column(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return _FakeDataset({"text": ["A line of text.", "", "  ", "Another line."], "label": [0, 1, 2, 3]})

    _install_fake_datasets(monkeypatch, load_dataset)
    assert load_documents(["hf:wikitext:wikitext-2-raw-v1:validation"]) == ["A line of text.", "Another line."]
    assert load_documents(["hf:user/corpus"]) == ["A line of text.", "Another line."]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation"), ("user/corpus", None, "train")]


def test_hf_dataset_errors(monkeypatch):
    _install_fake_datasets(monkeypatch, lambda name, config, split: _FakeDataset({"sentence": ["x"]}))
    assert 'no "text" column (columns: sentence)' in _user_error(["hf:glue:sst2"])
    assert "expected hf:NAME[:CONFIG][:SPLIT]" in _user_error(["hf:a:b:c:d"])

    def unreachable(name, config, split):
        raise ConnectionError("Couldn't reach 'nope' on the Hub\n(offline)")

    _install_fake_datasets(monkeypatch, unreachable)
    message = _user_error(["hf:nope"])
    assert "could not load the dataset (ConnectionError: Couldn't reach 'nope' on the Hub (offline))" in message


def test_hf_dataset_without_datasets_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    assert "pip install 'bertswarm[datasets]'" in _user_error(["hf:wikitext"])


# --- held-out split and shard order ---------------------------------------------------------------------------


def _synthetic_documents(count: int) -> list[str]:
    return [f"Document number {index} says something." for index in range(count)]


def test_heldout_split_is_stable_disjoint_and_order_independent():
    documents = _synthetic_documents(10_000)
    train, heldout = split_heldout(documents, fraction=0.02)
    assert (train, heldout) == split_heldout(documents, fraction=0.02)
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(documents)
    assert 150 <= len(heldout) <= 250
    shuffled = documents[:]
    random.Random(0).shuffle(shuffled)
    _, heldout_shuffled = split_heldout(shuffled, fraction=0.02)
    assert set(heldout_shuffled) == set(heldout)
    assert heldout == [doc for doc in documents if doc in set(heldout)], "input order is kept"


def test_heldout_split_small_and_degenerate_corpora():
    for count in (2, 3, 10):
        train, heldout = split_heldout(_synthetic_documents(count), fraction=0.02)
        assert len(heldout) >= 1 and len(train) >= 1
    assert split_heldout(["only one"]) == (["only one"], [])
    assert split_heldout(_synthetic_documents(5), fraction=0.0) == (_synthetic_documents(5), [])
    train, heldout = split_heldout(["same text"] * 4 + ["other text"])
    assert train.count("same text") in (0, 4), "duplicates land on the same side"
    with pytest.raises(ValueError, match="fraction"):
        split_heldout(_synthetic_documents(5), fraction=1.0)


def test_shard_order_is_a_seeded_permutation():
    first = shard_order(1000, seed=1)
    assert sorted(first.tolist()) == list(range(1000))
    assert first.tolist() == shard_order(1000, seed=1).tolist()
    assert first.tolist() != shard_order(1000, seed=2).tolist()
    assert first.tolist() != list(range(1000))
    assert shard_order(0, seed=3).tolist() == []
    with pytest.raises(ValueError):
        shard_order(10, seed=-1)


def test_files_are_streamed_not_read_whole(tmp_path, monkeypatch):
    """A 20 GB dump must not be read into memory: documents come out before the file has been read to its end, and
    the in-memory reading helpers are not used."""
    path = tmp_path / "dump.jsonl"
    path.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(10_000)), encoding="utf-8")
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read the whole file"))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: pytest.fail("read the whole file"))
    documents = corpus.iter_documents([str(path)])
    assert next(documents) == (str(path), "document 0")
    assert sum(1 for _ in documents) == 9_999


def test_text_paragraphs_and_bad_bytes_are_found_while_streaming(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbffirst line\r\nstill first\r\n \t\r\nsecond\n\n\n  third  \n")
    assert [doc for _, doc in corpus.iter_documents([str(path)])] == ["first line\nstill first", "second", "third"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\nalso fine\n\xff\xfe broken\n")
    message = _user_error([str(bad)])
    assert "not UTF-8 text (bad byte at offset 16)" in message and str(bad) in message


def test_the_quick_look_opens_the_first_files_of_an_entry_and_the_read_finds_the_rest(tmp_path):
    """A start checks a large --data directory in bounded time; a bad file past the quick look still gets its answer
    when the text is read."""
    count = corpus.QUICK_LOOK_FILES
    for index in range(count):
        (tmp_path / f"{index:03d}.txt").write_text(f"document {index}\n", encoding="utf-8")
    (tmp_path / f"{count:03d}.txt").write_bytes(b"late\x00binary")
    corpus.check_start([tmp_path])  # the binary file is past the quick look
    (tmp_path / f"{count - 1:03d}.txt").write_bytes(b"\x00")
    with pytest.raises(UserError, match="binary file"):
        corpus.check_start([tmp_path])  # within it
    (tmp_path / f"{count - 1:03d}.txt").write_text("fixed\n", encoding="utf-8")
    assert "binary file" in _user_error([str(tmp_path)])  # the full read
