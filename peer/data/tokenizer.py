"""BERT uncased WordPiece tokenizers: build, ship, load, fingerprint and export for ``transformers``.

Every tokenizer here is a ``tokenizers.Tokenizer`` with a WordPiece model (``##`` continuation prefix), the BERT
normalizer (lower-case, accents stripped, control characters removed, CJK characters split), the BERT pre-tokenizer
(split on whitespace and punctuation), a WordPiece decoder and a post-processor adding ``[CLS] A [SEP]`` /
``[CLS] A [SEP] B [SEP]`` (type ids 0 for A, 1 for B). The five special tokens are ``[PAD] [UNK] [CLS] [SEP]
[MASK]``; a vocabulary built here gives them ids 0-4.

The shipped default vocabulary (``peer/assets/vocab.txt``, 8192 tokens) was built by ``tools/build_vocab.py`` from
the training split of :func:`peer.data.embedded.default_corpus`; peers must agree on the tokenizer, so compare
:func:`tokenizer_fingerprint` rather than file paths.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from peer.errors import InputError, UserError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # in id order for vocabularies built here: [PAD] = 0
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VOCAB_PATH = Path(__file__).parent.parent / "assets" / "vocab.txt"
_MAX_CHARS_PER_WORD = 100  # longer "words" (hashes, base64) become [UNK], as in BERT
_LIMIT_ALPHABET = 1000  # most distinct characters kept as single-character tokens (HF BertWordPieceTokenizer default)


@dataclass(frozen=True)
class TokenizerInfo:
    """The ids a data pipeline or model needs from a tokenizer."""

    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int
    """Number of ids (including special and added tokens); the model's embedding table needs this many rows."""

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> TokenizerInfo:
        ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
        missing = [token for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True) if token_id is None]
        if missing:
            raise UserError(f"tokenizer lacks special tokens {' '.join(missing)}; use a BERT WordPiece vocabulary")
        return cls(*ids, vocab_size=tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

    @property
    def first_regular_id(self) -> int:
        """Ids from here to ``vocab_size`` are ordinary word pieces (random MLM replacements are drawn from them)."""
        return max(self.special_ids) + 1


def _assemble(model: models.WordPiece, *, lowercase: bool = True) -> Tokenizer:
    """Wrap a WordPiece model in the BERT pipeline (normalizer, pre-tokenizer, post-processor, decoder)."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    _set_post_processor(tokenizer)
    return tokenizer


def _set_post_processor(tokenizer: Tokenizer) -> None:
    cls_id, sep_id = tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )


def build_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train an uncased WordPiece vocabulary of ``vocab_size`` tokens on ``texts`` (fewer if the text runs out of
    pieces seen twice; more only if the special tokens and characters alone exceed it).

    Deterministic: the same texts give a byte-identical vocabulary, in any process. (The ``tokenizers`` trainer
    alone is not: it numbers the ``##x`` continuation characters in hash-map order and breaks ties between equally
    frequent merges by those numbers. We fix the alphabet and the ``##x`` ids up front, so every tie is broken the
    same way.) Special tokens get ids 0-4, then the ``##x`` characters, the characters, and the learned pieces in
    merge order; pieces seen fewer than twice are not learned. Training on ~3.5 MB takes a few seconds.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size}")
    texts = list(texts)
    tokenizer = _assemble(models.WordPiece(unk_token=UNK, max_input_chars_per_word=_MAX_CHARS_PER_WORD))
    alphabet, continuation = _alphabet(tokenizer, texts)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[*SPECIAL_TOKENS, *(f"##{char}" for char in continuation)],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Rebuild from the learned vocabulary so that only the five BERT tokens are "special" (the ##x seeds are not).
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return _assemble(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=_MAX_CHARS_PER_WORD))


def _alphabet(tokenizer: Tokenizer, texts: list[str]) -> tuple[list[str], list[str]]:
    """The ``_LIMIT_ALPHABET`` most frequent characters (ties by code point), and those of them that occur inside a
    word (after normalisation and pre-tokenisation), i.e. that need a ``##x`` token. Both sorted by code point."""
    char_counts: Counter[str] = Counter()
    inner_chars: set[str] = set()
    for text in texts:
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text)):
            char_counts.update(word)
            inner_chars.update(word[1:])
    ranked = sorted(char_counts, key=lambda char: (-char_counts[char], char))[:_LIMIT_ALPHABET]
    return sorted(ranked), sorted(inner_chars.intersection(ranked))


def default_tokenizer() -> Tokenizer:
    """The shipped 8192-token uncased vocabulary; loads in milliseconds, never builds."""
    return load_tokenizer(DEFAULT_VOCAB_PATH)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a WordPiece ``vocab.txt`` (one token per line, id = line number), a ``tokenizer.json``, or a directory
    holding either (``tokenizer.json`` wins, as in ``transformers``).

    A ``vocab.txt`` is given the uncased BERT pipeline; a ``tokenizer.json`` keeps its own normalizer and
    pre-tokenizer but must use a WordPiece model with the five BERT special tokens. Truncation and padding stored in
    a ``tokenizer.json`` are switched off: the batch pipeline packs sequences itself. Raises
    :class:`~peer.errors.InputError` (the caller adds the flag).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise InputError(path, "directory has no tokenizer.json or vocab.txt; pass a tokenizer file")
    if not path.is_file():
        raise InputError(path, "no such file or directory; pass a vocab.txt, tokenizer.json or directory")
    tokenizer = _load_tokenizer_json(path) if path.suffix == ".json" else _load_vocab_txt(path)
    try:
        TokenizerInfo.of(tokenizer)  # validates the special tokens
    except UserError as e:
        raise InputError(path, str(e)) from None
    return tokenizer


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except PermissionError:
        raise InputError(path, "permission denied; make the file readable") from None
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text; pass a vocab.txt or tokenizer.json") from None
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc}); pass another file") from None


def _load_vocab_txt(path: Path) -> Tokenizer:
    tokens = _read_text(path).rstrip("\n").split("\n")
    tokens = [token.rstrip("\r") for token in tokens]
    vocab: dict[str, int] = {}
    for number, token in enumerate(tokens, start=1):
        if not token.strip() or token != token.strip():
            raise InputError(f"{path}:{number}", "empty token or surrounding whitespace; one token per line")
        if token in vocab:
            raise InputError(f"{path}:{number}", f"duplicate token {token!r}; each token must appear once")
        vocab[token] = number - 1
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise InputError(path, f"missing special tokens {' '.join(missing)}; use a BERT WordPiece vocab")
    model = models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=_MAX_CHARS_PER_WORD)
    return _assemble(model)


def _load_tokenizer_json(path: Path) -> Tokenizer:
    text = _read_text(path)
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # the Rust parser raises a bare Exception naming the JSON problem
        message = " ".join(str(exc).split())[:200]
        raise InputError(path, f"not a valid tokenizer.json ({message}); pass another file") from None
    if not isinstance(tokenizer.model, models.WordPiece):
        kind = type(tokenizer.model).__name__
        raise InputError(path, f"model is {kind}, not WordPiece; pass a BERT WordPiece tokenizer")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def is_lowercasing(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's normalizer lower-cases (BertNormalizer(lowercase=True) or a Lowercase step)."""
    return _lowercases(json.loads(tokenizer.to_str()).get("normalizer"))


def _lowercases(normalizer: dict | None) -> bool:
    if not normalizer:
        return False
    kind = normalizer.get("type")
    if kind == "BertNormalizer":
        return bool(normalizer.get("lowercase"))
    if kind == "Lowercase":
        return True
    if kind == "Sequence":
        return any(_lowercases(step) for step in normalizer.get("normalizers", ()))
    return False


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 hex of the vocabulary ("token<TAB>id" lines in id order) and the lower-casing flag.

    Identical for the same vocabulary whether it was loaded from ``vocab.txt`` or ``tokenizer.json``; two peers with
    equal fingerprints map text to the same ids.
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    lines = [f"{token}\t{token_id}" for token, token_id in sorted(vocab.items(), key=lambda item: (item[1], item[0]))]
    lines.append(f"lowercase={is_lowercasing(tokenizer)}")
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def vocab_tokens(tokenizer: Tokenizer) -> list[str]:
    """The vocabulary in id order; requires ids 0..N-1 without gaps (true for every tokenizer from this module)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[token] for token in tokens] != list(range(len(tokens))):
        raise ValueError("tokenizer ids are not contiguous from 0; cannot write a vocab.txt")
    return tokens


def save_vocab(tokenizer: Tokenizer, path: str | Path) -> None:
    """Write ``vocab.txt``: one token per line, line number = id."""
    Path(path).write_text("".join(f"{token}\n" for token in vocab_tokens(tokenizer)), encoding="utf-8")


def save_pretrained(tokenizer: Tokenizer, directory: str | Path, *, model_max_length: int = 512) -> None:
    """Write a directory that ``transformers.AutoTokenizer.from_pretrained`` loads offline as a BERT tokenizer, through
    transformers' own ``PreTrainedTokenizerFast.save_pretrained`` (``tokenizer.json``, ``tokenizer_config.json``, and
    whatever else the installed transformers writes), plus ``vocab.txt`` (what ``--tokenizer`` and the original BERT
    tooling read). ``model_max_length`` should equal the model's ``max_position_embeddings``.
    """
    from transformers import BertTokenizerFast  # heavy; only checkpoint writers need it

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fast = BertTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.to_str()),  # a copy: transformers sets padding/truncation on it
        do_lower_case=is_lowercasing(tokenizer),
        tokenize_chinese_chars=True,
        strip_accents=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        unk_token=UNK,
        sep_token=SEP,
        pad_token=PAD,
        cls_token=CLS,
        mask_token=MASK,
    )
    fast.save_pretrained(str(directory))
    if not (directory / "vocab.txt").exists():  # transformers 5 writes only tokenizer.json for fast tokenizers
        save_vocab(tokenizer, directory / "vocab.txt")
