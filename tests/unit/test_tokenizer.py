"""WordPiece tokenizer: deterministic training, shipped vocabulary, loading, fingerprints, transformers export."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pydoc_data.topics import topics

import pytest
from tokenizers import Tokenizer, models

from peer.data.corpus import corpus_fingerprint, split_heldout
from peer.data.embedded import clean_prose, default_corpus
from peer.data.tokenizer import (
    DEFAULT_VOCAB_PATH,
    SPECIAL_TOKENS,
    TokenizerInfo,
    build_tokenizer,
    default_tokenizer,
    load_tokenizer,
    save_pretrained,
    save_vocab,
    tokenizer_fingerprint,
)
from peer.errors import UserError

SAMPLE = "The quick brown fox jumps over the lazy dog. Tensors are multi-dimensional arrays!"


@pytest.fixture(scope="module")
def prose() -> list[str]:
    """~230 kB of real English: the Python language reference topics, cleaned."""
    return [paragraph for key in sorted(topics) for paragraph in clean_prose(topics[key])]


@pytest.fixture(scope="module")
def small_tokenizer(prose) -> Tokenizer:
    return build_tokenizer(prose, vocab_size=1000)


def _user_error(path) -> str:
    with pytest.raises(UserError) as info:
        load_tokenizer(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_build_is_deterministic_within_a_process(prose, small_tokenizer):
    again = build_tokenizer(prose, vocab_size=1000)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(small_tokenizer)
    assert again.get_vocab() == small_tokenizer.get_vocab()


def test_build_is_deterministic_across_processes(small_tokenizer):
    # The raw `tokenizers` trainer numbers ##x tokens in hash-map order, which differs per process; a fresh
    # interpreter is the only way to catch a regression.
    script = textwrap.dedent(
        """
        from pydoc_data.topics import topics
        from peer.data.embedded import clean_prose
        from peer.data.tokenizer import build_tokenizer, tokenizer_fingerprint
        prose = [p for key in sorted(topics) for p in clean_prose(topics[key])]
        print(tokenizer_fingerprint(build_tokenizer(prose, vocab_size=1000)))
        """
    )
    fingerprints = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
        for _ in range(2)
    }
    assert fingerprints == {tokenizer_fingerprint(small_tokenizer)}


def test_built_tokenizer_layout(small_tokenizer):
    vocab = small_tokenizer.get_vocab()
    assert [vocab[token] for token in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert small_tokenizer.get_vocab_size() == 1000
    assert TokenizerInfo.of(small_tokenizer) == TokenizerInfo(0, 1, 2, 3, 4, vocab_size=1000)
    assert "##s" in vocab and "the" in vocab
    single = small_tokenizer.encode("Hello, World")
    assert single.tokens[0] == "[CLS]" and single.tokens[-1] == "[SEP]"
    assert all(token == token.lower() for token in single.tokens[1:-1])
    pair = small_tokenizer.encode("first part", "second part")
    assert pair.tokens.count("[SEP]") == 2
    first_sep = pair.tokens.index("[SEP]")
    assert pair.type_ids == [0] * (first_sep + 1) + [1] * (len(pair.tokens) - first_sep - 1)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["some text"], vocab_size=5)


def test_default_tokenizer_is_the_shipped_vocabulary():
    tokenizer = default_tokenizer()
    info = TokenizerInfo.of(tokenizer)
    assert info == TokenizerInfo(pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4, vocab_size=8192)
    assert info.first_regular_id == 5
    meta = json.loads(DEFAULT_VOCAB_PATH.with_name("vocab.meta.json").read_text(encoding="utf-8"))
    assert tokenizer_fingerprint(tokenizer) == meta["tokenizer_fingerprint"]
    encoding = tokenizer.encode(SAMPLE, add_special_tokens=False)
    assert "[UNK]" not in encoding.tokens
    assert (
        tokenizer.decode(encoding.ids)
        == "the quick brown fox jumps over the lazy dog. tensors are multi - dimensional arrays!"
    )
    assert sum(DEFAULT_VOCAB_PATH.parent.joinpath(p).stat().st_size for p in ("vocab.txt", "vocab.meta.json")) < 1e6


def test_shipped_vocabulary_is_reproducible(tmp_path, tmp_path_factory, monkeypatch):
    """tools/build_vocab.py output equals a fresh build, whenever this machine has the recorded default corpus."""
    cache_home = tmp_path_factory.getbasetemp() / "xdg-cache"  # shared with test_corpus.py: one build per session
    cache_home.mkdir(exist_ok=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    documents = default_corpus()
    meta = json.loads(DEFAULT_VOCAB_PATH.with_name("vocab.meta.json").read_text(encoding="utf-8"))
    assert tokenizer_fingerprint(default_tokenizer()) == meta["tokenizer_fingerprint"]  # the shipped file is intact
    if corpus_fingerprint(documents) != meta["corpus_fingerprint"]:
        # The default corpus comes from the docstrings of the installed Python and packages; on other versions it
        # differs and the shipped vocabulary (which every peer uses as is) cannot be rebuilt byte for byte. CI runs
        # on the recorded versions, where the full check below runs.
        return
    train, _ = split_heldout(documents)
    rebuilt = build_tokenizer(train, vocab_size=meta["vocab_size"])
    save_vocab(rebuilt, tmp_path / "vocab.txt")
    assert (tmp_path / "vocab.txt").read_bytes() == DEFAULT_VOCAB_PATH.read_bytes()


def test_fingerprint_is_equal_for_vocab_txt_and_tokenizer_json(small_tokenizer, tmp_path):
    save_pretrained(small_tokenizer, tmp_path)
    from_vocab = load_tokenizer(tmp_path / "vocab.txt")
    from_json = load_tokenizer(tmp_path / "tokenizer.json")
    from_dir = load_tokenizer(tmp_path)
    expected = tokenizer_fingerprint(small_tokenizer)
    assert tokenizer_fingerprint(from_vocab) == tokenizer_fingerprint(from_json) == tokenizer_fingerprint(from_dir)
    assert tokenizer_fingerprint(from_vocab) == expected
    assert from_vocab.encode(SAMPLE, "and a pair").ids == from_json.encode(SAMPLE, "and a pair").ids
    assert tokenizer_fingerprint(default_tokenizer()) != expected


def test_fingerprint_depends_on_lowercasing(small_tokenizer):
    cased = Tokenizer.from_str(small_tokenizer.to_str())
    from tokenizers import normalizers

    cased.normalizer = normalizers.BertNormalizer(lowercase=False)
    assert tokenizer_fingerprint(cased) != tokenizer_fingerprint(small_tokenizer)


def test_save_pretrained_loads_offline_in_transformers(small_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    save_pretrained(small_tokenizer, tmp_path, model_max_length=128)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] in ("BertTokenizerFast", "BertTokenizer") and config["do_lower_case"] is True
    assert config["mask_token"] == "[MASK]" and config["model_max_length"] == 128
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert hf.is_fast and type(hf).__name__ in ("BertTokenizerFast", "BertTokenizer")
    assert hf.model_max_length == 128
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    encoded = hf(SAMPLE, "A second segment.")
    ours = small_tokenizer.encode(SAMPLE, "A second segment.")
    assert encoded["input_ids"] == ours.ids
    assert encoded["token_type_ids"] == ours.type_ids


def test_load_errors(tmp_path):
    assert "no such file or directory" in _user_error(tmp_path / "missing.txt")
    assert "no tokenizer.json or vocab.txt" in _user_error(tmp_path)

    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    assert "not a valid tokenizer.json" in _user_error(broken)

    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    bpe.save(str(broken))
    assert "model is BPE, not WordPiece" in _user_error(broken)

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    assert "missing special tokens [CLS] [SEP] [MASK]" in _user_error(vocab)
    vocab.write_text("\n".join([*SPECIAL_TOKENS, "hello", "hello"]) + "\n", encoding="utf-8")
    assert "vocab.txt:7: duplicate token 'hello'" in _user_error(vocab)
    vocab.write_text("\n".join([*SPECIAL_TOKENS, "", "x"]) + "\n", encoding="utf-8")
    assert "vocab.txt:6: empty token" in _user_error(vocab)
    vocab.write_bytes(b"\xff\xfe\x00binary")
    assert "not UTF-8" in _user_error(vocab)
