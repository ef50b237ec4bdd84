"""The manifest's ``model`` section → ``transformers.BertConfig`` → a freshly initialised BERT."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining


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
