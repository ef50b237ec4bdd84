"""``peer.run.model.pretraining_loss``: the loss and gradients transformers computes, with the vocabulary head applied
at the masked positions only."""

from __future__ import annotations

import pytest
import torch

from peer.run.model import IGNORE_INDEX, PretrainingLoss, build_model, pretraining_loss

MODEL = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)  # fmt: skip


def _batch(nsp: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, MODEL["vocab_size"], (4, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 18:] = 0  # a padded row
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    chosen = torch.rand(input_ids.shape, generator=generator) < 0.15
    chosen[:, 0] = True  # at least one masked position per row
    chosen &= attention_mask.bool()
    labels[chosen] = input_ids[chosen]
    batch = {
        "input_ids": input_ids.masked_fill(chosen, 4),
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": labels,
    }
    if nsp:
        batch["next_sentence_label"] = torch.tensor([0, 1, 1, 0])
    return batch


def _gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("nsp", [False, True])
def test_the_loss_and_gradients_are_transformers_own(nsp):
    model = build_model(MODEL, nsp=nsp, seed=3)
    model.eval()  # no dropout: both passes see the same network
    batch = _batch(nsp)

    reference = model(**batch).loss
    reference.backward()
    expected = _gradients(model)
    model.zero_grad(set_to_none=True)

    loss = pretraining_loss(model, batch)
    loss.backward()
    got = _gradients(model)

    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert len(got) == len(expected) and len(got) > 0
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(60)
def test_the_module_form_gives_the_same_loss():
    model = build_model(MODEL, nsp=False, seed=3).eval()
    batch = _batch(False, seed=1)
    assert PretrainingLoss(model)(**batch).item() == pytest.approx(pretraining_loss(model, batch).item(), rel=1e-6)
