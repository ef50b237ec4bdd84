"""MLM masking statistics, packing, sentence pairs, stream determinism and evaluation batches."""

from __future__ import annotations

from pydoc_data.topics import topics

import numpy as np
import pytest
import torch

from peer.data.batches import IGNORE_INDEX, BatchStream, heldout_batches, mask_tokens
from peer.data.embedded import clean_prose
from peer.data.tokenizer import TokenizerInfo, build_tokenizer, default_tokenizer
from peer.errors import UserError

KEYS = {"input_ids", "attention_mask", "token_type_ids", "labels"}


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """~230 kB of real English (Python language reference topics), one document per topic."""
    texts = ["\n".join(clean_prose(topics[key])) for key in sorted(topics)]
    return [text for text in texts if text]


def _restore(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unmasked input ids: labels hold the original id wherever a token was selected."""
    return torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])


# --- mask_tokens ----------------------------------------------------------------------------------------------


def _synthetic_rows(rows: int, length: int, vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] random ids [SEP] [PAD]..., with random lengths; returns input ids and the special-tokens mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (rows, length), generator=generator)
    lengths = torch.randint(3, length + 1, (rows,), generator=generator)
    positions = torch.arange(length).expand(rows, length)
    ids[positions >= lengths[:, None]] = 0  # [PAD]
    ids[:, 0] = 2  # [CLS]
    ids[torch.arange(rows), lengths - 1] = 3  # [SEP]
    return ids, (ids == 0) | (ids == 2) | (ids == 3)


def test_mask_tokens_statistics():
    ids, special = _synthetic_rows(1024, 128, vocab_size=8192, seed=0)
    original = ids.clone()
    generator = torch.Generator().manual_seed(1)
    masked, labels = mask_tokens(
        ids, special, vocab_size=8192, mask_id=4, mlm_probability=0.15, generator=generator, random_low=5
    )
    assert torch.equal(ids, original), "input must not be modified"
    assert masked.dtype == labels.dtype == torch.long and masked.shape == labels.shape == ids.shape
    selected = labels != IGNORE_INDEX
    assert not (selected & special).any(), "special and padding positions are never selected"
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected]), "unselected positions are untouched"
    assert abs(selected.sum().item() / (~special).sum().item() - 0.15) < 0.01

    n = selected.sum().item()
    to_mask = (masked == 4) & selected
    unchanged = (masked == ids) & selected
    replaced = selected & ~to_mask & ~unchanged
    assert abs(to_mask.sum().item() / n - 0.8) < 0.02
    assert abs(replaced.sum().item() / n - 0.1) < 0.02
    assert abs(unchanged.sum().item() / n - 0.1) < 0.02
    assert masked[replaced].min() >= 5 and masked[replaced].max() < 8192, "random ids come from the regular range"


def test_mask_tokens_selects_at_least_one_per_row():
    ids, special = _synthetic_rows(512, 16, vocab_size=100, seed=2)
    ids[0, 1:] = 0  # a row with nothing maskable: [CLS] [PAD]...
    special[0] = True
    ids[0, 0] = 2
    generator = torch.Generator().manual_seed(3)
    _, labels = mask_tokens(ids, special, vocab_size=100, mask_id=4, mlm_probability=0.01, generator=generator)
    selected_per_row = (labels != IGNORE_INDEX).sum(dim=1)
    assert selected_per_row[0] == 0
    assert (selected_per_row[1:] >= 1).all()


def test_mask_tokens_is_reproducible_for_a_generator_seed():
    ids, special = _synthetic_rows(8, 32, vocab_size=100, seed=4)

    def run(seed: int):
        generator = torch.Generator().manual_seed(seed)
        return mask_tokens(ids, special, vocab_size=100, mask_id=4, generator=generator)

    assert all(torch.equal(a, b) for a, b in zip(run(5), run(5), strict=True))
    assert not torch.equal(run(5)[1], run(6)[1])


# --- BatchStream ----------------------------------------------------------------------------------------------


def test_stream_shapes_dtypes_and_structure(documents, tokenizer):
    stream = BatchStream(documents, tokenizer, seq_len=64, batch_size=8, seed=0)
    batch = next(stream)
    assert set(batch) == KEYS
    for value in batch.values():
        assert value.dtype == torch.long and value.shape == (8, 64)
    restored = _restore(batch)
    assert (restored[:, 0] == 2).all(), "every row starts with [CLS]"
    assert torch.equal(batch["attention_mask"], (restored != 0).long())
    assert (batch["token_type_ids"] == 0).all()
    assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) >= 1).all()
    assert stream.num_sequences >= 8 and stream.num_tokens > 40_000


def test_stream_packs_every_token_once_per_epoch(documents, tokenizer):
    stream = BatchStream(documents, tokenizer, seq_len=64, batch_size=1, seed=0)
    epoch = BatchStream(documents, tokenizer, seq_len=64, batch_size=stream.num_sequences, seed=0)
    rows = _restore(next(epoch))
    padding = rows == 0
    assert not padding[:-1].any(), "only the last row of an epoch is padded"
    assert padding[-1].any() or (stream.num_tokens + len(documents)) % 62 == 0
    content = rows[:, 1:][rows[:, 1:] != 0]  # drop [CLS] and padding
    expected = []
    for document in documents:
        expected += tokenizer.encode(document.replace("\n", " "), add_special_tokens=False).ids + [3]
    # Each row adds one closing [SEP]; the documents' separators are in the stream itself.
    assert len(content) == len(expected) + len(rows)
    without_sep = content[content != 3].tolist()
    assert sorted(without_sep) == sorted(token for token in expected if token != 3)
    assert without_sep != [token for token in expected if token != 3], "documents are shuffled"


def test_stream_is_deterministic_per_seed_and_differs_across_seeds(documents, tokenizer):
    def first_batches(seed: int, count: int = 3):
        stream = BatchStream(documents, tokenizer, seq_len=32, batch_size=4, seed=seed)
        return [next(stream) for _ in range(count)]

    one, again, other = first_batches(7), first_batches(7), first_batches(8)
    for a, b in zip(one, again, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in KEYS)
    assert not torch.equal(one[0]["input_ids"], other[0]["input_ids"])


def test_stream_reshuffles_and_remasks_each_epoch(documents, tokenizer):
    probe = BatchStream(documents, tokenizer, seq_len=64, batch_size=1, seed=3)
    stream = BatchStream(documents, tokenizer, seq_len=64, batch_size=probe.num_sequences, seed=3)
    first, second = next(stream), next(stream)
    assert stream.epoch == 1
    assert not torch.equal(_restore(first), _restore(second)), "a new epoch has a new document order"
    assert sorted(_restore(first).flatten().tolist()) == sorted(_restore(second).flatten().tolist())


def test_stream_spans_epochs_on_a_tiny_corpus(tokenizer):
    stream = BatchStream(["Just one short sentence here."], tokenizer, seq_len=16, batch_size=5, seed=0)
    assert stream.num_sequences == 1
    batch = next(stream)
    assert batch["input_ids"].shape == (5, 16) and stream.epoch == 4
    assert all(torch.equal(_restore(batch)[0], row) for row in _restore(batch))


def test_stream_ignores_tokenizer_truncation_and_forged_special_tokens(tokenizer):
    truncating = default_tokenizer()
    truncating.enable_truncation(max_length=4)
    text = "Some words [SEP] then [PAD] and [MASK] appear literally in this text, followed by more words."
    stream = BatchStream([text], truncating, seq_len=64, batch_size=1, seed=0)
    assert truncating.truncation is not None, "the caller's tokenizer is not modified"
    restored = _restore(next(stream))[0]
    content = restored[1 : restored.tolist().index(0) - 1]  # between [CLS] and the row's closing [SEP]
    assert len(content) > 10
    assert content[-1] == 3 and not np.isin(content[:-1].numpy(), [0, 2, 3, 4]).any()
    assert (content == 1).sum() == 3, "literal [SEP], [PAD] and [MASK] are read as [UNK]"


def test_stream_rejects_an_empty_corpus(tokenizer):
    with pytest.raises(UserError, match="no text"):
        BatchStream(["   ", "\n"], tokenizer, seq_len=16, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        BatchStream(["text"], tokenizer, seq_len=2, batch_size=2, seed=0)


# --- sentence pairs -------------------------------------------------------------------------------------------

MARKERS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "forest", "candle", "silver"]


@pytest.fixture(scope="module")
def marked_documents():
    """Ten documents; every sentence of document k names only MARKERS[k], so a pair's origin is visible."""
    return [
        "\n".join(f"Sentence {n} of this text is about the {marker}. The {marker} is here again." for n in range(12))
        for marker in MARKERS
    ]


def test_nsp_pairs(marked_documents):
    tokenizer = build_tokenizer(marked_documents, vocab_size=200)
    info = TokenizerInfo.of(tokenizer)
    marker_ids = {tokenizer.token_to_id(marker): marker for marker in MARKERS}
    assert None not in marker_ids
    stream = BatchStream(marked_documents, tokenizer, seq_len=48, batch_size=64, nsp=True, seed=1)
    labels, rows = [], 0
    for _ in range(6):
        batch = next(stream)
        assert set(batch) == KEYS | {"next_sentence_label"}
        assert batch["next_sentence_label"].shape == (64,) and batch["next_sentence_label"].dtype == torch.long
        for ids, types, mask, label in zip(
            _restore(batch), batch["token_type_ids"], batch["attention_mask"], batch["next_sentence_label"], strict=True
        ):
            ids, types = ids.tolist(), types.tolist()
            length = int(mask.sum())
            assert ids[0] == info.cls_id and ids[length - 1] == info.sep_id and set(ids[length:]) <= {info.pad_id}
            assert [i for i, token in enumerate(ids) if token == info.sep_id][-1] == length - 1
            assert ids[:length].count(info.sep_id) == 2
            first_sep = ids.index(info.sep_id)
            assert types == [0] * (first_sep + 1) + [1] * (length - first_sep - 1) + [0] * (len(ids) - length)
            a = {marker_ids[t] for t in ids[1:first_sep] if t in marker_ids}
            b = {marker_ids[t] for t in ids[first_sep + 1 : length - 1] if t in marker_ids}
            if a and b:
                assert (a == b) == (label == 0), "label 0: B continues A's document; label 1: B is from another"
            labels.append(int(label))
            rows += 1
    assert abs(sum(labels) / rows - 0.5) < 0.08


def test_nsp_is_deterministic(marked_documents):
    tokenizer = build_tokenizer(marked_documents, vocab_size=200)

    def first(seed: int):
        return next(BatchStream(marked_documents, tokenizer, seq_len=48, batch_size=16, nsp=True, seed=seed))

    a, b = first(2), first(2)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["input_ids"], first(3)["input_ids"])


# --- evaluation batches ---------------------------------------------------------------------------------------


def test_heldout_batches_are_reproducible_and_bounded(documents, tokenizer):
    heldout = documents[:12]
    batches = heldout_batches(heldout, tokenizer, seq_len=64, batch_size=16)
    again = heldout_batches(heldout, tokenizer, seq_len=64, batch_size=16)
    assert len(batches) == len(again) >= 2
    for a, b in zip(batches, again, strict=True):
        assert set(a) == KEYS and all(torch.equal(a[key], b[key]) for key in KEYS)
    assert all(batch["input_ids"].shape == (16, 64) for batch in batches[:-1])
    assert 1 <= batches[-1]["input_ids"].shape[0] <= 16
    assert (_restore(batches[-1])[-1] == 0).any(), "the last row is padded"
    other_seed = heldout_batches(heldout, tokenizer, seq_len=64, batch_size=16, seed=1)
    assert torch.equal(_restore(other_seed[0]), _restore(batches[0])), "packing ignores the seed; masking does not"
    assert not torch.equal(other_seed[0]["labels"], batches[0]["labels"])
    assert len(heldout_batches(heldout, tokenizer, seq_len=64, batch_size=16, max_batches=1)) == 1
