"""``bertswarm-eval``: the figures of a checkpoint on any data, one job per kind of checkpoint.

* A **pre-training checkpoint** (a checkpoint directory, a checkpoint root's ``latest``, or a coordinator URL,
  verified by :mod:`peer.store.load`): held-out MLM loss, masked-token accuracy and perplexity. The batches are the
  coordinator's (:func:`mlm_batches`: the held-out split of ``--data`` by the same hash, the run's sequence length
  and NSP setting, batches of 16 masked with seed 0, the first ``--eval-batches``; a prepared dataset's held-out
  shard), and the figures are computed as the coordinator computes them, so with the coordinator's ``--data`` and
  ``--eval-batches`` this command reproduces the ``eval_metrics`` recorded in the checkpoint's ``bertswarm.json``.
  ``--split all`` evaluates on every document of ``--data`` instead.
* A **fine-tuned classifier** (a ``bertswarm-finetune`` output, or any ``BertForSequenceClassification`` directory
  with tokenizer files): accuracy and macro-F1 on labelled ``--data`` (``.jsonl``/``.csv``/``hf:``, as for
  fine-tuning).

Prints one line (``--json``: one JSON object) on stdout. User errors: one line on stderr, exit 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from peer.cli import build_parser, parse_config, run_command, setup_logging
from peer.config import setting
from peer.errors import InputError, UserError

GROUPS = {"input": "what to evaluate, on what", "output": "output"}
DESCRIPTION = (
    "Evaluate a bertswarm pre-training checkpoint (held-out MLM loss, masked-token accuracy, perplexity; the "
    "coordinator's figures) or a fine-tuned classifier (accuracy, macro-F1 on labelled data)."
)
COORDINATOR_BATCH_SIZE = 16  # coordinator/cli.py evaluation_batches: batches of 16, masked with seed 0
COORDINATOR_SEED = 0


@dataclass
class EvalConfig:
    checkpoint: str = setting("pre-training checkpoint (directory, root, coordinator URL) or fine-tuned classifier "
                              "directory (required)", default="", metavar="CKPT", group="input")  # fmt: skip
    data: list[str] = setting("pre-training checkpoint: text files/dirs/globs, hf:, or a prepared dataset (default: "
                              "the embedded corpus); classifier: labelled .jsonl/.csv or hf: (required)",
                              default_factory=list, metavar="PATH", group="input")  # fmt: skip
    split: str = setting("pre-training checkpoint: evaluate on the 'heldout' split of --data (as the coordinator) "
                         "or on 'all' of it", default="heldout", group="input")  # fmt: skip
    eval_batches: int = setting("pre-training checkpoint: batches of 16 sequences (the coordinator's "
                                "--eval-batches; 0 = all)", default=8, group="input")  # fmt: skip
    tokenizer: str | None = setting("the run's vocab.txt or tokenizer.json (default: the checkpoint's own files, or "
                                    "the shipped vocab)", default=None, metavar="PATH", group="input")  # fmt: skip
    batch_size: int = setting("classifier: examples per forward pass", default=64, group="input")
    threads: int = setting("CPU threads for torch (0 = torch's default)", default=0, group="input")
    json: bool = setting("print the figures as one JSON object", default=False, group="output")

    def validate(self) -> EvalConfig:
        if not self.checkpoint:
            raise UserError("--checkpoint is required: pass a checkpoint directory, root or URL, or a classifier")
        if self.split not in ("heldout", "all"):
            raise UserError(f"--split {self.split}: must be heldout or all")
        for flag, value, low in (("--eval-batches", self.eval_batches, 0), ("--batch-size", self.batch_size, 1),
                                 ("--threads", self.threads, 0)):  # fmt: skip
            if value < low:
                raise UserError(f"{flag} {value}: must be an integer >= {low}")
        return self


def is_classifier(path: str) -> bool:
    """Whether ``path`` is a local directory holding a sequence classifier (``config.json``'s architectures)."""
    config = Path(path).expanduser() / "config.json"
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


def mlm_batches(manifest, tokenizer, data: list[str], max_batches: int | None, split: str = "heldout") -> list[dict]:
    """The coordinator's evaluation batches (``coordinator.cli.evaluation_batches``) for ``--data``; with
    ``split="all"`` every document of plain-text data instead of its held-out split."""
    from peer.data import corpus, embedded
    from peer.data.batches import heldout_batches
    from peer.data.shards import PreparedDataset, is_prepared
    from peer.data.stream import prepared_heldout_batches
    from peer.data.tokenizer import TokenizerInfo, tokenizer_fingerprint

    try:
        if any(is_prepared(entry) for entry in data):
            if len(data) > 1:
                raise UserError("--data: a prepared dataset directory must be the only --data entry; drop the others")
            dataset = PreparedDataset.open(data[0])
            dataset.check(tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), seq_len=manifest.seq_len,
                          nsp=manifest.nsp)  # fmt: skip
            return prepared_heldout_batches(dataset, TokenizerInfo.of(tokenizer), batch_size=COORDINATOR_BATCH_SIZE,
                                            seed=COORDINATOR_SEED, max_batches=max_batches)  # fmt: skip
        documents = corpus.load_documents(data) if data else embedded.default_corpus()
    except InputError as e:
        raise e.with_flag("--data") from None
    if split == "heldout":
        _, documents = corpus.split_heldout(documents)
    return heldout_batches(documents, tokenizer, seq_len=manifest.seq_len, batch_size=COORDINATOR_BATCH_SIZE,
                           seed=COORDINATOR_SEED, max_batches=max_batches, nsp=manifest.nsp)  # fmt: skip


def evaluate_pretraining(cfg: EvalConfig) -> dict:
    from peer.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from peer.finetune.metrics import evaluate_mlm
    from peer.finetune.model import checkpoint_tokenizer
    from peer.run.manifest import RunManifest
    from peer.run.model import build_model
    from peer.store.errors import CheckpointError
    from peer.store.load import load_checkpoint

    try:
        state, meta = load_checkpoint(cfg.checkpoint, expected_fingerprint=None)
    except CheckpointError as e:
        raise e.with_flag("--checkpoint") from None
    manifest = RunManifest.from_dict(meta["manifest"])
    try:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else checkpoint_tokenizer(cfg.checkpoint)
    except InputError as e:
        raise e.with_flag("--tokenizer") from None
    if tokenizer_fingerprint(tokenizer) != manifest.tokenizer_fingerprint:
        raise UserError(f"--checkpoint {cfg.checkpoint}: the run was trained with another tokenizer; pass "
                        "--tokenizer with the run's vocab.txt or tokenizer.json")  # fmt: skip
    model = build_model(manifest.model, nsp=manifest.nsp, seed=manifest.init_seed)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if unexpected or set(missing) - tied:
        raise UserError(f"--checkpoint {cfg.checkpoint}: weights do not fit the run's model; pass another checkpoint")
    batches = mlm_batches(manifest, tokenizer, cfg.data, cfg.eval_batches or None, cfg.split)
    figures = evaluate_mlm(model, batches)
    return {"kind": "pretraining", "checkpoint": cfg.checkpoint, "run_id": meta["run_id"], "epoch": meta["epoch"],
            "split": cfg.split, **figures}  # fmt: skip


def evaluate_classifier(cfg: EvalConfig) -> dict:
    from transformers import AutoModelForSequenceClassification

    from peer.data.tokenizer import load_tokenizer
    from peer.finetune.data import Encoder, batches, load_examples
    from peer.finetune.metrics import classification_metrics, predict

    if not cfg.data:
        raise UserError("--data is required for a classifier: pass labelled .jsonl or .csv files (text, label)")
    try:
        examples = load_examples(cfg.data)
    except InputError as e:
        raise e.with_flag("--data") from None
    path = Path(cfg.checkpoint).expanduser()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path)
        tokenizer = load_tokenizer(cfg.tokenizer or path)
    except InputError as e:
        raise e.with_flag("--tokenizer" if cfg.tokenizer else "--checkpoint") from None
    except (OSError, ValueError) as e:
        message = " ".join(str(e).split())[:200]
        raise UserError(f"--checkpoint {cfg.checkpoint}: cannot load the classifier ({message}); pass a "
                        "bertswarm-finetune output directory") from None  # fmt: skip
    label_ids = {str(label): int(i) for label, i in model.config.label2id.items()}
    unknown = sorted({e.label for e in examples} - set(label_ids))
    if unknown:
        raise UserError(f"--data: labels {', '.join(map(repr, unknown[:5]))} are not among the classifier's "
                        f"({', '.join(label_ids)}); pass data labelled with its classes")  # fmt: skip
    max_length = min(int(getattr(model.config, "max_position_embeddings", 512)), 512)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # else not ours: the model's own limit
        max_length = int(json.loads((path / "metrics.json").read_text())["max_length"])
    predicted, gold = predict(model, batches(examples, Encoder(tokenizer, max_length), label_ids, cfg.batch_size))
    figures = classification_metrics(predicted, gold, len(label_ids))
    return {"kind": "classifier", "checkpoint": cfg.checkpoint, **figures}


def run(cfg: EvalConfig) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr
    figures = evaluate_classifier(cfg) if is_classifier(cfg.checkpoint) else evaluate_pretraining(cfg)
    if cfg.json:
        print(json.dumps(figures, sort_keys=True), flush=True)
    elif figures["kind"] == "classifier":
        print(f"bertswarm-eval: {cfg.checkpoint}: accuracy {figures['accuracy']:.4f}, macro-F1 "
              f"{figures['macro_f1']:.4f} on {figures['examples']} examples", flush=True)  # fmt: skip
    else:
        print(f"bertswarm-eval: {cfg.checkpoint} (step {figures['epoch']}): MLM loss {figures['mlm_loss']:.4f}, "
              f"masked-token accuracy {figures['mlm_accuracy']:.4f}, perplexity {figures['perplexity']:.2f} on "
              f"{figures['masked_tokens']} masked tokens ({cfg.split})", flush=True)  # fmt: skip
    return figures


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = build_parser(EvalConfig, "bertswarm-eval", DESCRIPTION, GROUPS)
        cfg, _ = parse_config(argv, parser=parser, config_cls=EvalConfig)
        setup_logging()
        run(cfg)

    return run_command("bertswarm-eval", body)


if __name__ == "__main__":
    sys.exit(main())
