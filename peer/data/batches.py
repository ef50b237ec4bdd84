"""Masked-language-model batches: tokenise once, pack into fixed-length rows, mask dynamically.

Packing (MLM only, the default). Documents are tokenised once, each followed by one ``[SEP]``, concatenated in the
epoch's document order and cut into rows of ``seq_len - 2`` tokens; each row is ``[CLS] tokens... [SEP]``. So a row
may hold the end of one document and the start of the next, separated by ``[SEP]`` (RoBERTa's "full sentences"):
no padding is wasted except in the last row of an epoch, which is padded with ``[PAD]`` (attention mask 0).

Sentence pairs (``nsp=True``). Each row is ``[CLS] A [SEP] B [SEP]`` with token type 0 up to the first ``[SEP]`` and
1 after it, padded to ``seq_len``. A is one or more consecutive sentences of a document; with probability 1/2 B is
the text that follows A (``next_sentence_label`` 0), otherwise text from another random document (label 1). Pairs
too long for the row lose tokens at the start of A and at the end of B, so a true pair stays contiguous.

Determinism. Given the same documents, tokenizer and ``seed``, a :class:`BatchStream` yields identical batches on
every run. Each pass over the data (epoch) reorders the documents with :func:`peer.data.corpus.shard_order` under a seed
mixed from ``seed`` and the epoch, and masking draws from one ``torch.Generator`` seeded with ``seed``, so every
epoch is masked afresh (dynamic masking). Peers should pass different seeds so that they do not train in lock-step.

Literal special-token strings in the text (``"[SEP]"``, ``"[MASK]"``...) are read as ``[UNK]`` so they cannot forge
the row structure or an unlabelled mask.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from peer.data.corpus import shard_order
from peer.data.tokenizer import TokenizerInfo
from peer.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of positions that do not count in the MLM loss (``torch.nn.CrossEntropyLoss`` default ``ignore_index``)."""

# A sentence ends at . ! ? followed by whitespace and a capital, digit or opening quote/bracket; a newline
# (paragraph break in our documents) always ends one. Splits only at whitespace, so tokens are unchanged.
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|\s*\n\s*")


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    *,
    vocab_size: int,
    mask_id: int,
    mlm_probability: float = 0.15,
    generator: torch.Generator,
    random_low: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: returns ``(masked_input_ids, labels)``, both long tensors shaped like ``input_ids``.

    Each position where ``special_tokens_mask`` is false (so never [CLS], [SEP], [PAD]) is selected with probability
    ``mlm_probability``; every row with at least one maskable position gets at least one selected position, so the
    loss is always defined. A selected token becomes ``mask_id`` with probability 0.8, a uniform random id from
    ``[random_low, vocab_size)`` with probability 0.1 (pass the first non-special id), and stays unchanged otherwise.
    ``labels`` holds the original id at selected positions and ``IGNORE_INDEX`` (-100) elsewhere. The input is not
    modified; all randomness comes from ``generator``.
    """
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    input_ids = input_ids.long()
    maskable = ~special_tokens_mask.bool()
    probabilities = torch.full(input_ids.shape, mlm_probability)
    selected = torch.bernoulli(probabilities, generator=generator).bool() & maskable

    unselected_rows = maskable.any(dim=-1) & ~selected.any(dim=-1)
    if unselected_rows.any():
        scores = torch.rand(input_ids.shape, generator=generator).masked_fill(~maskable, -1.0)
        rows = unselected_rows.nonzero().squeeze(-1)
        selected[rows, scores[rows].argmax(dim=-1)] = True

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(random_low, vocab_size, input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[selected & (action < 0.8)] = mask_id
    replace = selected & (action >= 0.8) & (action < 0.9)
    masked[replace] = random_ids[replace]
    return masked, labels


@dataclass(frozen=True)
class _Rows:
    """Unmasked rows of one epoch (numpy, compact dtypes)."""

    input_ids: np.ndarray  # int32 [N, L]
    token_type_ids: np.ndarray | None  # int8 [N, L]; None means all zeros
    next_sentence_label: np.ndarray | None  # int64 [N]; only with nsp

    def __len__(self) -> int:
        return len(self.input_ids)

    def slice(self, start: int, stop: int) -> _Rows:
        return _Rows(
            self.input_ids[start:stop],
            None if self.token_type_ids is None else self.token_type_ids[start:stop],
            None if self.next_sentence_label is None else self.next_sentence_label[start:stop],
        )

    @staticmethod
    def concat(parts: Sequence[_Rows]) -> _Rows:
        if len(parts) == 1:
            return parts[0]
        return _Rows(
            np.concatenate([p.input_ids for p in parts]),
            None if parts[0].token_type_ids is None else np.concatenate([p.token_type_ids for p in parts]),
            None if parts[0].next_sentence_label is None else np.concatenate([p.next_sentence_label for p in parts]),
        )


class _Corpus:
    """Documents tokenised once: per document, the token ids of each sentence (int32)."""

    def __init__(self, documents: Sequence[str], tokenizer: Tokenizer, info: TokenizerInfo):
        if tokenizer.truncation or tokenizer.padding:  # we pack ourselves; never mutate the caller's tokenizer
            tokenizer = Tokenizer.from_str(tokenizer.to_str())
            tokenizer.no_truncation()
            tokenizer.no_padding()
        sentences_per_doc = [[s for s in _SENTENCE_END_RE.split(doc) if s and not s.isspace()] for doc in documents]
        flat = [sentence for sentences in sentences_per_doc for sentence in sentences]
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast skips offsets
        ids_per_sentence = [encoding.ids for encoding in encode(flat, add_special_tokens=False)]
        all_ids = np.fromiter((i for ids in ids_per_sentence for i in ids), dtype=np.int32)
        forged = [info.pad_id, info.cls_id, info.sep_id, info.mask_id]
        all_ids[np.isin(all_ids, forged)] = info.unk_id
        pieces = np.split(all_ids, np.cumsum([len(ids) for ids in ids_per_sentence])[:-1]) if flat else []
        self.sentences: list[list[np.ndarray]] = []
        position = 0
        for sentences in sentences_per_doc:
            doc = [ids for ids in pieces[position : position + len(sentences)] if len(ids)]
            position += len(sentences)
            if doc:
                self.sentences.append(doc)
        self.num_tokens = len(all_ids)
        if self.num_tokens == 0:
            raise UserError("the corpus has no text that tokenises to anything; pass documents with words in them")

    def __len__(self) -> int:
        return len(self.sentences)


def _pack(corpus: _Corpus, order: Sequence[int], seq_len: int, info: TokenizerInfo) -> _Rows:
    """MLM rows: documents in ``order`` each followed by [SEP], cut into ``[CLS] chunk [SEP]``; last row padded."""
    sep = np.array([info.sep_id], dtype=np.int32)
    stream = np.concatenate([part for index in order for part in (*corpus.sentences[index], sep)])
    content = seq_len - 2
    num_rows = -(-len(stream) // content)
    rows = np.full((num_rows, seq_len), info.pad_id, dtype=np.int32)
    rows[:, 0] = info.cls_id
    full = (num_rows - 1) * content
    rows[: num_rows - 1, 1:-1] = stream[:full].reshape(num_rows - 1, content)
    rows[: num_rows - 1, -1] = info.sep_id
    tail = stream[full:]
    rows[-1, 1 : 1 + len(tail)] = tail
    rows[-1, 1 + len(tail)] = info.sep_id
    return _Rows(rows, None, None)


def _take(sentences: Sequence[np.ndarray], start: int, budget: int) -> tuple[np.ndarray, int]:
    """Whole sentences from ``start`` until ``budget`` tokens are reached (at least one); returns ids and the end."""
    end, total = start, 0
    while end < len(sentences) and (end == start or total < budget):
        total += len(sentences[end])
        end += 1
    return np.concatenate(sentences[start:end]), end


def _truncate_pair(a: np.ndarray, b: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """BERT's rule (drop a token from the longer side until the pair fits; B on ties), in closed form. A loses
    tokens at its start and B at its end, so a true A|B junction stays contiguous."""
    excess = len(a) + len(b) - budget
    if excess <= 0:
        return a, b
    gap = abs(len(a) - len(b))
    from_longer = min(excess, gap)
    rest = excess - from_longer
    cut_a = (from_longer if len(a) > len(b) else 0) + rest // 2
    cut_b = excess - cut_a
    return a[cut_a:], b[: len(b) - cut_b]


def _sentence_pairs(
    corpus: _Corpus, order: Sequence[int], seq_len: int, info: TokenizerInfo, rng: np.random.Generator
) -> _Rows:
    """NSP rows ``[CLS] A [SEP] B [SEP]`` walking each document in ``order``; see the module docstring."""
    budget = seq_len - 3
    rows, type_rows, labels = [], [], []
    for index in order:
        sentences = corpus.sentences[index]
        start = 0
        while start < len(sentences):
            chunk_ids, end = _take(sentences, start, budget)
            if end - start >= 2:  # split between sentences
                a_end = int(rng.integers(start + 1, end))
                a = np.concatenate(sentences[start:a_end])
                following = np.concatenate(sentences[a_end:end])
            elif len(chunk_ids) >= 2:  # one long sentence: split inside it
                cut = int(rng.integers(1, len(chunk_ids)))
                a, following, a_end = chunk_ids[:cut], chunk_ids[cut:], end
            else:
                start = end
                continue
            if rng.random() < 0.5 or len(corpus) == 1:
                b, label, start = following, 0, end
            else:
                other = int(rng.integers(0, len(corpus) - 1))
                other += other >= index  # any document but this one
                other_sentences = corpus.sentences[other]
                b, _ = _take(other_sentences, int(rng.integers(0, len(other_sentences))), budget - len(a))
                label, start = 1, a_end  # the unused rest of the chunk is not wasted: it starts the next pair
            a, b = _truncate_pair(a, b, budget)
            row = np.full(seq_len, info.pad_id, dtype=np.int32)
            types = np.zeros(seq_len, dtype=np.int8)
            row[0], row[1 : 1 + len(a)], row[1 + len(a)] = info.cls_id, a, info.sep_id
            b_start = 2 + len(a)
            row[b_start : b_start + len(b)], row[b_start + len(b)] = b, info.sep_id
            types[b_start : b_start + len(b) + 1] = 1
            rows.append(row)
            type_rows.append(types)
            labels.append(label)
    if not rows:
        raise UserError("the corpus is too short for sentence pairs; pass more text or disable NSP")
    return _Rows(np.stack(rows), np.stack(type_rows), np.asarray(labels, dtype=np.int64))


def _epoch_seed(seed: int, epoch: int) -> int:
    """Mix seed and epoch so that peer A's epoch 1 is not peer B's (seed A + 1) epoch 0."""
    digest = hashlib.blake2b(f"bertswarm-epoch:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _make_rows(
    corpus: _Corpus, order: Sequence[int], seq_len: int, info: TokenizerInfo, nsp: bool, pair_seed: int
) -> _Rows:
    if nsp:
        return _sentence_pairs(corpus, order, seq_len, info, np.random.Generator(np.random.PCG64(pair_seed)))
    return _pack(corpus, order, seq_len, info)


def _collate(
    rows: _Rows, info: TokenizerInfo, mlm_probability: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    input_ids = torch.from_numpy(rows.input_ids.astype(np.int64))
    special = (input_ids == info.pad_id) | (input_ids == info.cls_id) | (input_ids == info.sep_id)
    masked, labels = mask_tokens(
        input_ids,
        special,
        vocab_size=info.vocab_size,
        mask_id=info.mask_id,
        mlm_probability=mlm_probability,
        generator=generator,
        random_low=info.first_regular_id,
    )
    if rows.token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    else:
        token_type_ids = torch.from_numpy(rows.token_type_ids.astype(np.int64))
    batch = {
        "input_ids": masked,
        "attention_mask": (input_ids != info.pad_id).long(),
        "token_type_ids": token_type_ids,
        "labels": labels,
    }
    if rows.next_sentence_label is not None:
        batch["next_sentence_label"] = torch.from_numpy(rows.next_sentence_label)
    return batch


def _check_args(seq_len: int, batch_size: int, mlm_probability: float, nsp: bool, seed: int) -> None:
    min_len = 5 if nsp else 3
    if seq_len < min_len:
        raise ValueError(f"seq_len must be >= {min_len} ({'[CLS] A [SEP] B [SEP]' if nsp else '[CLS] x [SEP]'})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


class BatchStream:
    """An endless, deterministic stream of masked MLM (optionally NSP) batches over a list of documents.

    Each batch is a dict of long tensors: ``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``
    (``[batch_size, seq_len]``) and, with ``nsp=True``, ``next_sentence_label`` (``[batch_size]``). Batches may span
    the end of one epoch and the start of the next. Tokenisation happens once, in the constructor (~1 s for the
    3.7 MB default corpus); each epoch then only reorders, repacks (milliseconds) and re-masks.

    Tuning: ``seq_len`` 128 suits small CPU models; the number of rows per epoch, :attr:`num_sequences`, is roughly
    ``num_tokens / (seq_len - 2)``. ``mlm_probability`` 0.15 is BERT's. Use a distinct ``seed`` per peer.
    """

    def __init__(
        self,
        documents: Sequence[str],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        mlm_probability: float = 0.15,
        nsp: bool = False,
        seed: int,
    ):
        _check_args(seq_len, batch_size, mlm_probability, nsp, seed)
        self.info = TokenizerInfo.of(tokenizer)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.mlm_probability = mlm_probability
        self.nsp = nsp
        self.seed = seed
        self._corpus = _Corpus(documents, tokenizer, self.info)
        self._generator = torch.Generator().manual_seed(seed % 2**63)  # torch takes 64-bit seeds; peer ids are larger
        self.epoch = -1
        self._start_epoch()
        self.num_sequences = len(self._rows)
        """Rows in one pass over the data (for NSP: in the first pass; later passes differ slightly)."""
        logger.debug(
            "batch stream: %d documents, %d tokens, %d sequences of %d per epoch",
            len(self._corpus),
            self.num_tokens,
            self.num_sequences,
            seq_len,
        )

    @property
    def num_tokens(self) -> int:
        """Tokens of text in the corpus (without [CLS]/[SEP]/[PAD])."""
        return self._corpus.num_tokens

    def _start_epoch(self) -> None:
        self.epoch += 1
        epoch_seed = _epoch_seed(self.seed, self.epoch)
        order = shard_order(len(self._corpus), epoch_seed)
        self._rows = _make_rows(self._corpus, order, self.seq_len, self.info, self.nsp, epoch_seed)
        self._cursor = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        parts, needed = [], self.batch_size
        while needed:
            if self._cursor == len(self._rows):
                self._start_epoch()
            take = min(needed, len(self._rows) - self._cursor)
            parts.append(self._rows.slice(self._cursor, self._cursor + take))
            self._cursor += take
            needed -= take
        return _collate(_Rows.concat(parts), self.info, self.mlm_probability, self._generator)


def heldout_batches(
    documents: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    max_batches: int | None = None,
    mlm_probability: float = 0.15,
    nsp: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """A finite, reproducible list of masked batches for evaluation (same keys as :class:`BatchStream`).

    Documents are packed in the given order (no shuffle) and masked from a generator seeded with ``seed``, so the
    same held-out documents always give the same batches and losses are comparable across peers and over time. The
    last batch may be smaller than ``batch_size``; ``max_batches`` keeps only the first batches.
    """
    _check_args(seq_len, batch_size, mlm_probability, nsp, seed)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    info = TokenizerInfo.of(tokenizer)
    corpus = _Corpus(documents, tokenizer, info)
    rows = _make_rows(corpus, range(len(corpus)), seq_len, info, nsp, seed)
    generator = torch.Generator().manual_seed(seed % 2**63)
    starts = range(0, len(rows), batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    return [_collate(rows.slice(start, start + batch_size), info, mlm_probability, generator) for start in starts]
