"""The manifest's ``model`` section → ``transformers.BertConfig`` → a freshly initialised BERT."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

IGNORE_INDEX = -100  # the label of a position that is not predicted (transformers' convention)


def bert_config(model) -> BertConfig:
    """Build the ``BertConfig`` from the manifest's ``model`` section (a ``ModelSection`` or its dict)."""
    return BertConfig(**(model.model_dump() if hasattr(model, "model_dump") else model))


def build_model(model, *, nsp: bool, seed: int) -> torch.nn.Module:
    """Build a freshly initialised model; ``seed`` makes the initial weights identical on every peer."""
    config = bert_config(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForPreTraining(config) if nsp else BertForMaskedLM(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pretraining_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The pre-training loss ``model(**batch).loss`` computes (masked LM, plus next-sentence prediction for a
    ``BertForPreTraining`` given ``next_sentence_label``), with the vocabulary head applied at the masked positions
    only. transformers scores every position and then ignores the unmasked 85 %; the head (a dense layer, then the
    projection onto the vocabulary) is most of the small presets' compute (tiny: ~1.05M of ~1.5M multiply-adds per
    token), so this is the same loss and the same gradients (``tests/unit/test_model.py``) for far less work.
    """
    labels = batch["labels"]
    encoded = model.bert(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        token_type_ids=batch.get("token_type_ids"),
    )
    masked = labels != IGNORE_INDEX
    with_nsp = isinstance(model, BertForPreTraining)
    head = model.cls.predictions if with_nsp else model.cls
    loss = F.cross_entropy(head(encoded.last_hidden_state[masked]).float(), labels[masked])
    if with_nsp and "next_sentence_label" in batch:
        relationship = model.cls.seq_relationship(encoded.pooler_output)
        loss = loss + F.cross_entropy(relationship.float().view(-1, 2), batch["next_sentence_label"].view(-1))
    return loss


class PretrainingLoss(torch.nn.Module):
    """``pretraining_loss`` as a module, for wrappers that must see the forward pass (DDP in the benchmarks)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return pretraining_loss(self.model, batch)
