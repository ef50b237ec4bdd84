"""Plain text goes through the same preparation as bertswarm-prepare, once: the cache (peer.data.text_cache)."""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

import pytest

from peer.data import shards, text_cache
from peer.data.tokenizer import default_tokenizer
from peer.errors import InputError

TEXT = "\n\n".join(f"Document {i} talks about peers that train a model together, round {i}." for i in range(60))


def _write(path: Path, text: str = TEXT) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_text_is_prepared_once_and_reused(tmp_path, caplog):
    corpus = _write(tmp_path / "corpus.txt")
    caplog.set_level(logging.INFO, logger="peer.data.text_cache")
    first = text_cache.training_text([str(corpus)], default_tokenizer(), seq_len=32, nsp=False, root=tmp_path / "c")
    shard = first.path / first.index.shards[0].name
    written = shard.stat().st_mtime_ns
    again = text_cache.training_text([str(corpus)], default_tokenizer(), seq_len=32, nsp=False, root=tmp_path / "c")
    assert again.path == first.path and again.fingerprint == first.fingerprint
    assert shard.stat().st_mtime_ns == written
    messages = [r.getMessage() for r in caplog.records]
    assert sum("preparing" in m for m in messages) == 1 and sum("prepared earlier" in m for m in messages) == 1
    assert first.index.seq_len == 32 and not first.index.nsp and first.index.num_tokens > 0


def test_other_settings_or_changed_text_get_their_own_dataset(tmp_path):
    corpus = _write(tmp_path / "corpus.txt")
    root, tok = tmp_path / "c", default_tokenizer()
    base = text_cache.training_text([str(corpus)], tok, seq_len=32, nsp=False, root=root)
    longer = text_cache.training_text([str(corpus)], tok, seq_len=48, nsp=False, root=root)
    _write(corpus, TEXT + "\n\nOne more document about averaging in small groups of peers.")
    changed = text_cache.training_text([str(corpus)], tok, seq_len=32, nsp=False, root=root)
    assert len({base.path, longer.path, changed.path}) == 3
    assert longer.index.seq_len == 48
    assert changed.index.stats["documents_read"] == base.index.stats["documents_read"] + 1


def _prepare_in_child(args) -> tuple[str, int]:
    corpus, root = args
    dataset = text_cache.training_text([corpus], default_tokenizer(), seq_len=32, nsp=False, root=Path(root))
    return str(dataset.path), (dataset.path / shards.INDEX_NAME).stat().st_ino


@pytest.mark.timeout(60)
def test_peers_starting_together_share_one_preparation(tmp_path):
    corpus = _write(tmp_path / "corpus.txt", TEXT * 20)
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_prepare_in_child, [(str(corpus), str(tmp_path / "c"))] * 3)
    assert len(set(results)) == 1  # one directory, one index file (written once: same inode)
    assert [p.name for p in (tmp_path / "c").iterdir() if p.is_dir()] == [Path(results[0][0]).name]


def test_bad_text_is_one_line_and_leaves_no_dataset(tmp_path):
    empty = _write(tmp_path / "empty.txt", "   \n\n")
    with pytest.raises(InputError, match="empty.txt: file is empty"):
        text_cache.training_text([str(empty)], default_tokenizer(), seq_len=32, nsp=False, root=tmp_path / "c")
    with pytest.raises(InputError, match="no such file"):
        text_cache.training_text([str(tmp_path / "missing.txt")], default_tokenizer(), seq_len=32, nsp=False,
                                 root=tmp_path / "c")  # fmt: skip
    assert not list((tmp_path / "c").glob(f"*/{shards.INDEX_NAME}"))


def test_an_unusable_cache_prepares_into_a_temporary_directory(tmp_path, caplog):
    corpus = _write(tmp_path / "corpus.txt")
    blocker = _write(tmp_path / "not-a-dir")  # where the cache would go is a file (read-only homes fail alike)
    dataset = text_cache.training_text([str(corpus)], default_tokenizer(), seq_len=32, nsp=False, root=blocker / "c")
    assert dataset.index.num_tokens > 0 and "cannot use the data cache" in caplog.text
    assert blocker.is_file()


def test_only_recent_datasets_are_kept(tmp_path):
    root, tok = tmp_path / "c", default_tokenizer()
    corpus = _write(tmp_path / "corpus.txt")
    paths = [text_cache.training_text([str(corpus)], tok, seq_len=seq_len, nsp=False, root=root).path
             for seq_len in (24, 32, 40)]  # fmt: skip
    os.utime(paths[0] / shards.INDEX_NAME, (1, 1))  # used long ago
    text_cache._prune(root, keep=1)
    assert not paths[0].exists() and paths[1].exists() and paths[2].exists()  # the others were used within a day
    text_cache._prune(root, keep=1, min_age=0)
    assert [p.exists() for p in paths] == [False, False, True]


def test_the_embedded_corpus_is_keyed_without_loading_it(monkeypatch):
    monkeypatch.setattr("peer.data.embedded.default_corpus", lambda: pytest.fail("loaded the corpus to key it"))
    key = text_cache.cache_key([], default_tokenizer(), seq_len=128, nsp=False)
    assert key == text_cache.cache_key([], default_tokenizer(), seq_len=128, nsp=False)
    assert key != text_cache.cache_key([], default_tokenizer(), seq_len=128, nsp=True)
