"""``bertswarm-prepare``: cleaning, determinism across worker counts, resuming, the shard format, bad input."""

import json
import sys
import types

import numpy as np
import pytest

from peer.data import prepare as prep
from peer.data.shards import INDEX_NAME, PreparedDataset
from peer.data.tokenizer import TokenizerInfo, default_tokenizer, tokenizer_fingerprint
from peer.errors import InputError
from peer.prepare_cli import main

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "river",
    "mountain",
    "stone",
    "window",
    "garden",
    "letter",
    "music",
    "paper",
]


def write_corpus(path, documents: int = 300, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 60)))).capitalize() + "." for _ in range(documents)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return docs


def run_prepare(tmp_path, data, out="out", **kw):
    kw.setdefault("seq_len", 32)
    kw.setdefault("shard_chars", 2000)
    return prep.prepare_dataset([str(d) for d in data], tmp_path / out, default_tokenizer(), **kw)


def test_cleaning_counts_and_index(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    lines = [
        {"text": "Caf\u0065\u0301 one two three."},
        {"text": "Caf\u00e9 one two three."},  # NFC duplicates
        {"text": "   "},
        {"text": "bin\x01\x02\x03\x04ary"},
        *({"text": f"Document {i} of words."} for i in range(60)),
    ]
    corpus.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    result = run_prepare(tmp_path, [corpus], heldout_fraction=0.1)
    stats = result.stats
    assert (stats.documents_read, stats.duplicates, stats.empty, stats.binary) == (64, 1, 1, 1)
    assert stats.train_documents + stats.heldout_documents == 61 and stats.heldout_documents > 0
    index = PreparedDataset.open(tmp_path / "out").index
    assert index.tokenizer_fingerprint == tokenizer_fingerprint(default_tokenizer())
    assert (index.seq_len, index.nsp, index.dtype) == (32, False, "uint16")
    info = TokenizerInfo.of(default_tokenizer())
    for entry in [*index.shards, index.heldout]:
        rows = np.load(tmp_path / "out" / entry.name)
        assert rows.shape == (entry.rows, 32) and rows.dtype == np.uint16
        assert (rows[:, 0] == info.cls_id).all()
        assert entry.tokens == int(np.count_nonzero(~np.isin(rows, [info.pad_id, info.cls_id, info.sep_id])))
    assert sum(entry.tokens for entry in index.shards) + index.heldout.tokens == stats.tokens


def test_packing_matches_the_text_and_hides_literal_special_tokens():
    tok = default_tokenizer()
    info = TokenizerInfo.of(tok)
    rows = prep.build_rows(["river stone [SEP] garden", "music paper"], tok, seq_len=64, nsp=False)
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    sep = [info.sep_id]
    expected = [info.cls_id, *encode("river stone [UNK] garden"), *sep, *encode("music paper"), *sep, *sep]
    assert rows.shape == (1, 64)
    assert rows[0, : len(expected)].tolist() == expected  # the literal [SEP] became [UNK]
    assert (rows[0, len(expected) :] == info.pad_id).all()
    long = prep.build_rows(["river stone garden " * 10], tok, seq_len=8, nsp=False)
    assert (long[:, 0] == info.cls_id).all() and (long[:-1, -1] == info.sep_id).all()


def test_same_shards_with_any_number_of_workers_and_resume_reuses_them(tmp_path):
    corpus = tmp_path / "a.txt"
    write_corpus(corpus)
    one = run_prepare(tmp_path, [corpus], "one", workers=1)
    two = run_prepare(tmp_path, [corpus], "two", workers=2)
    assert len(one.index.shards) > 3
    assert one.index.fingerprint == two.index.fingerprint
    for entry in one.index.shards:
        assert (tmp_path / "one" / entry.name).read_bytes() == (tmp_path / "two" / entry.name).read_bytes()

    # a crash after some shards: they are kept and reused; a torn temp file is cleaned away
    (tmp_path / "one" / INDEX_NAME).unlink()
    (tmp_path / "one" / one.index.shards[-1].name).unlink()
    (tmp_path / "one" / ".tmp-train-00009.npy-dead").write_bytes(b"torn")
    again = run_prepare(tmp_path, [corpus], "one")
    assert (again.stats.shards_reused, again.stats.shards_written) == (len(one.index.shards) - 1, 1)
    assert again.index.fingerprint == one.index.fingerprint
    assert not list((tmp_path / "one").glob(".tmp-*"))


def test_changed_input_rewrites_only_what_changed_and_drops_stale_shards(tmp_path):
    corpus = tmp_path / "a.txt"
    docs = write_corpus(corpus)
    first = run_prepare(tmp_path, [corpus])
    corpus.write_text("\n\n".join(docs[:100]), encoding="utf-8")
    second = run_prepare(tmp_path, [corpus])
    assert second.stats.shards_reused >= 1 and len(second.index.shards) < len(first.index.shards)
    on_disk = sorted(p.name for p in (tmp_path / "out").glob("train-*.npy"))
    assert on_disk == sorted(entry.name for entry in second.index.shards)


def test_nsp_shards_carry_the_label_column(tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text("\n\n".join(f"Sentence {i} is here. Another one follows. And a third one." for i in range(40)))
    result = run_prepare(tmp_path, [corpus], nsp=True, shard_chars=10**6, heldout_fraction=0.0)
    index = result.index
    rows = np.load(tmp_path / "out" / index.shards[0].name)
    assert index.nsp and rows.shape[1] == 33 and set(np.unique(rows[:, -1])) <= {0, 1}
    assert index.heldout is None


def test_hf_entries_are_streamed(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming=False):
        calls.append((name, config, split, streaming))
        return ({"text": f"Streamed record {i} with words."} for i in range(50))

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    result = run_prepare(tmp_path, ["hf:user/corpus:cfg:train"])
    assert calls == [("user/corpus", "cfg", "train", True)]
    assert result.stats.documents_read == 50


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("empty.txt", b"  \n", "file is empty"),
        ("blob.txt", b"abc\x00\x01", "binary file"),
        ("latin.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_visible_shard(tmp_path, capsys, name, content, problem):
    good, bad = tmp_path / "good.txt", tmp_path / name
    write_corpus(good, documents=30)
    bad.write_bytes(content)
    out = tmp_path / "out"
    code = main(["--data", str(good), "--data", str(bad), "--output", str(out), "--workers", "1", "--seq-len", "32"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith(f"bertswarm-prepare: error: --data {bad}: ") and problem in err and "Traceback" not in err
    assert not (out / INDEX_NAME).exists()
    assert not list(out.glob(".tmp-*"))
    for shard in out.glob("train-*.npy"):  # whatever finished before the bad file is complete (resumable)
        np.load(shard)


def test_unreadable_input_and_no_text(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    only_dups = tmp_path / "dups.jsonl"
    only_dups.write_text('{"text": "\\u0000\\u0001"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="no usable text after cleaning"):
        run_prepare(tmp_path, [only_dups])


def test_cli_end_to_end_prints_a_summary(tmp_path, capsys):
    corpus = tmp_path / "a.txt"
    write_corpus(corpus)
    assert main(["--data", str(corpus), "--output", str(tmp_path / "o"), "--workers", "1", "--shard-mb", "0.002"]) == 0
    printed = capsys.readouterr().out
    assert "shards" in printed and "300 documents read" in printed
    assert PreparedDataset.open(tmp_path / "o").index.seq_len == 128
