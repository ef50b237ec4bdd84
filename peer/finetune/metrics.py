"""Evaluation figures: held-out MLM loss, masked-token accuracy and perplexity of a pre-training checkpoint, and
accuracy and macro-F1 of a classifier.

:func:`evaluate_mlm` computes exactly what the coordinator records in ``bertswarm.json`` (``mlm_loss``: mean
cross-entropy over masked tokens; ``mlm_accuracy``: argmax equals the original token at masked positions), on the
same batches when given the same data (:func:`peer.finetune.eval.mlm_batches`);
``tests/integration/test_finetune.py`` checks that the two agree, and the coordinator calls this function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from peer.data.batches import IGNORE_INDEX


@torch.no_grad()
def evaluate_mlm(model: torch.nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """``mlm_loss``, ``mlm_accuracy``, ``perplexity`` (``exp(mlm_loss)``) and ``masked_tokens``."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "next_sentence_label")}
        output = model(**inputs)
        logits = output.logits if hasattr(output, "logits") else output.prediction_logits  # MLM or MLM+NSP head
        mask = labels != IGNORE_INDEX
        loss_sum += torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask], reduction="sum").item()
        correct += int((logits[mask].argmax(-1) == labels[mask]).sum())
        count += int(mask.sum())
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    loss = loss if math.isfinite(loss) else float("nan")
    perplexity = math.exp(loss) if loss < 700 else float("inf")  # exp overflows past ~709
    return {"mlm_loss": loss, "mlm_accuracy": correct / max(count, 1), "perplexity": perplexity,
            "masked_tokens": count}  # fmt: skip


def classification_metrics(predicted: Sequence[int], gold: Sequence[int], num_labels: int) -> dict[str, float]:
    """``accuracy`` and ``macro_f1`` (unweighted mean of per-class F1 over the ``num_labels`` classes; a class with
    neither predictions nor examples counts as F1 0, as scikit-learn's ``zero_division=0``), and ``examples``."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} labels")
    f1s = []
    for label in range(num_labels):
        tp = sum(p == label and g == label for p, g in zip(predicted, gold, strict=True))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold, strict=True))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    correct = sum(p == g for p, g in zip(predicted, gold, strict=True))
    return {"accuracy": correct / max(len(gold), 1), "macro_f1": sum(f1s) / max(num_labels, 1), "examples": len(gold)}


def majority_baseline(train_labels: Sequence[int], gold: Sequence[int], num_labels: int) -> dict[str, float]:
    """The figures of always predicting the most frequent training label (ties: the lowest id)."""
    counts = [train_labels.count(label) for label in range(num_labels)]
    majority = counts.index(max(counts))
    return classification_metrics([majority] * len(gold), gold, num_labels)


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[dict]) -> tuple[list[int], list[int]]:
    """``(predicted ids, gold ids)`` of a sequence classifier over labelled batches."""
    was_training = model.training
    model.eval()
    predicted, gold = [], []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        predicted.extend(model(**inputs).logits.argmax(-1).tolist())
        gold.extend(batch["labels"].tolist())
    model.train(was_training)
    return predicted, gold
