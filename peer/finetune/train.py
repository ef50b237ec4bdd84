"""The fine-tuning loop: AdamW with linear warm-up and decay, one validation per epoch, early stopping on
validation accuracy, the best epoch's weights kept; and the crash-safe output directory.

Deterministic on CPU for a given seed: the head's initialisation, dropout and the shuffle all draw from ``seed``.

Output (``write_output``): assembled in ``<parent>/.tmp-<name>-*``, every file and the directory fsynced, then
renamed to ``--output`` (an existing one, with ``--overwrite``, is first renamed aside to ``.tmp-*`` and removed
after), so an interrupted run leaves no half-written output visible: at most a hidden ``.tmp-*`` directory when the
process was killed outright (an exception or Ctrl-C removes it), which is safe to delete.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

from peer.errors import UserError
from peer.finetune.data import Encoder, Example, batches
from peer.finetune.metrics import classification_metrics, majority_baseline, predict
from peer.store.atomic import TMP_PREFIX, fsync_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    epochs: int = 10
    patience: int = 2
    """stop after this many epochs without a better validation accuracy"""
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    seed: int = 0


@dataclass
class Result:
    validation: dict
    """accuracy, macro-F1 and examples of the best epoch"""
    baseline: dict
    """the majority class's figures on the validation split"""
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)


class BestWeights:
    """Validation and early stopping, for both loops (this module's and the swarm's, ``peer.finetune.swarm``): after
    each epoch, ``evaluate`` scores the model on the validation split, appends the epoch's entry to the history, keeps
    a copy of the weights when the accuracy is the best so far (the earliest on ties), and says whether ``patience``
    epochs in a row went by without a better one."""

    def __init__(self, model: torch.nn.Module, validation: Sequence[Example], encoder: Encoder,
                 label_ids: dict[str, int], batch_size: int, patience: int,
                 report: Callable[[dict], None] = lambda entry: None):  # fmt: skip
        self.model, self.validation, self.encoder, self.label_ids = model, validation, encoder, label_ids
        self.batch_size, self.patience, self.report = batch_size, patience, report
        self.gold = [label_ids[e.label] for e in validation]
        self.best: dict | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch, self.stale = 0, 0
        self.history: list[dict] = []

    def evaluate(self, epoch: int, train_loss: float, **extra) -> bool:
        """Score this epoch (``extra``: more fields for its history entry); True when it is time to stop."""
        batches_ = batches(self.validation, self.encoder, self.label_ids, self.batch_size)
        predicted, _ = predict(self.model, batches_)
        metrics = classification_metrics(predicted, self.gold, len(self.label_ids))
        entry = {"epoch": epoch, **extra, "train_loss": train_loss, **metrics}
        self.history.append(entry)
        self.report(entry)
        if self.best is None or metrics["accuracy"] > self.best["accuracy"]:
            self.best, self.best_epoch, self.stale = metrics, epoch, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore(self) -> None:
        """Load the best epoch's weights back into the model."""
        self.model.load_state_dict(self.best_state)


def fine_tune(
    model: torch.nn.Module,
    train: Sequence[Example],
    validation: Sequence[Example],
    encoder: Encoder,
    labels: list[str],
    settings: Settings,
    report: Callable[[dict], None] = lambda entry: None,
) -> Result:
    """Train ``model`` in place; on return it holds the weights of the epoch with the best validation accuracy
    (the earliest on ties). ``report`` is called with each epoch's entry of the history."""
    label_ids = {label: i for i, label in enumerate(labels)}
    steps_per_epoch = -(-len(train) // settings.batch_size)
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias") and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    total = steps_per_epoch * settings.epochs
    schedule = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_fraction * total), total)
    generator = torch.Generator().manual_seed(settings.seed)
    baseline = majority_baseline([label_ids[e.label] for e in train], [label_ids[e.label] for e in validation],
                                 len(labels))  # fmt: skip
    keeper = BestWeights(model, validation, encoder, label_ids, settings.batch_size, settings.patience, report)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)  # dropout
        for epoch in range(1, settings.epochs + 1):
            model.train()
            loss_sum = 0.0
            order = torch.randperm(len(train), generator=generator).tolist()
            for batch in batches(train, encoder, label_ids, settings.batch_size, order):
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.item()
            if keeper.evaluate(epoch, loss_sum / steps_per_epoch):
                break
    keeper.restore()
    stopped = len(keeper.history) < settings.epochs
    return Result(keeper.best, baseline, keeper.best_epoch, len(keeper.history), stopped, keeper.history)


def check_output(output: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse, before any work, an existing output without ``overwrite`` and a parent that cannot be written."""
    target = Path(output).expanduser()
    if target.exists() and not overwrite:
        raise UserError(f"--output {output}: already exists; pass --overwrite to replace it, or another directory")
    if target.exists() and not target.is_dir():
        raise UserError(f"--output {output}: is a file, not a directory; pass a directory path")
    existing = next(p for p in (target.parent, *target.parent.parents) if p.exists())  # created at write time
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {output}: {existing} is not a writable directory; pick another output")
    return target


@contextlib.contextmanager
def write_output(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a temp directory next to ``target`` to fill; publishes it as ``target`` when the block succeeds, and
    removes it when it fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    aside = None
    try:
        yield tmp
        for path in sorted(tmp.iterdir()):
            fsync_path(path)
        fsync_path(tmp)
        if target.exists():
            if not overwrite:  # created by someone else meanwhile
                raise UserError(f"--output {target}: appeared while training; pass --overwrite or another directory")
            aside = target.with_name(f"{TMP_PREFIX}replaced-{target.name}-{secrets.token_hex(4)}")
            os.rename(target, aside)
        os.rename(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
