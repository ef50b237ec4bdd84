"""``bertswarm-finetune``: a published pre-training checkpoint (or random weights) → a Hugging Face sequence
classifier fine-tuned on labelled ``.jsonl``/``.csv`` files or an ``hf:`` dataset.

The output directory loads with ``AutoModelForSequenceClassification.from_pretrained(DIR)`` and
``pipeline("text-classification", model=DIR)``: ``config.json`` (with the label names), ``model.safetensors``, the
tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.txt``) and ``metrics.json`` (validation
accuracy and macro-F1 of the kept epoch, the majority-class baseline, the per-epoch history, where the weights came
from). It appears complete or not at all (:func:`peer.finetune.train.write_output`).

The flags are generated from :class:`FinetuneConfig` (the peer's generator). User errors print one line on stderr
and exit 2, with nothing written.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import asdict, dataclass

from peer.cli import build_parser, parse_config, run_command, setup_logging
from peer.config import setting
from peer.errors import InputError, UserError
from peer.run.presets import PRESET_NAMES

GROUPS = {"input": "what to fine-tune, on what", "training": "training", "output": "the fine-tuned classifier"}
DESCRIPTION = (
    "Fine-tune a bertswarm checkpoint (a checkpoint directory, a checkpoint root's latest, or a coordinator URL) "
    "into a Hugging Face sequence classifier on labelled .jsonl/.csv files (text, label, optional text_pair); "
    "early stopping on validation accuracy. --init-from random trains the same architecture from scratch."
)
METRICS_FILE = "metrics.json"


@dataclass
class FinetuneConfig:
    init_from: str = setting("checkpoint directory, checkpoint root (its latest), coordinator URL, or 'random' "
                             "(required)", default="", metavar="CKPT", group="input")  # fmt: skip
    data: list[str] = setting("labelled training data: .jsonl/.csv files with text, label (optional text_pair), or "
                              "hf:NAME[:CONFIG][:SPLIT] (repeatable, required)", default_factory=list, metavar="FILE",
                              group="input")  # fmt: skip
    validation: list[str] = setting(
        "labelled validation data (default: carve --validation-fraction of --data by a hash of the text)",
        default_factory=list,
        metavar="FILE",
        group="input",
    )
    validation_fraction: float = setting("share of --data held out for validation when --validation is not given",
                                         default=0.1, group="input")  # fmt: skip
    tokenizer: str | None = setting("the run's vocab.txt or tokenizer.json (default: the checkpoint's own files, or "
                                    "the shipped vocab)", default=None, metavar="PATH", group="input")  # fmt: skip
    preset: str = setting("architecture for --init-from random", default="tiny", group="input")
    max_length: int | None = setting("tokens per example, longer ones truncated (default: the run's --seq-len)",
                                     default=None, group="training")  # fmt: skip
    epochs: int = setting("most passes over the training data", default=10, group="training")
    patience: int = setting("stop after this many epochs without a better validation accuracy", default=2,
                            group="training")  # fmt: skip
    batch_size: int = setting("examples per optimizer step", default=16, group="training")
    lr: float = setting("peak learning rate (linear warm-up over 10%% of the steps, then linear decay)", default=1e-4,
                        group="training")  # fmt: skip
    weight_decay: float = setting("AdamW weight decay", default=0.01, group="training")
    seed: int = setting("seed of the head's initialisation, dropout and the shuffle", default=0, group="training")
    threads: int = setting("CPU threads for torch (0 = torch's default)", default=0, group="training")
    output: str = setting("directory to write (required; must not exist unless --overwrite)", default="",
                          metavar="DIR", group="output")  # fmt: skip
    overwrite: bool = setting("replace an existing --output", default=False, group="output")

    def validate(self) -> FinetuneConfig:
        if not self.init_from:
            raise UserError("--init-from is required: pass a checkpoint directory, a checkpoint root, a coordinator "
                            "URL, or 'random'")  # fmt: skip
        if not self.data:
            raise UserError("--data is required: pass labelled .jsonl or .csv files (text, label)")
        if not self.output:
            raise UserError("--output is required: pass the directory to write the classifier to")
        if self.preset not in PRESET_NAMES:
            raise UserError(f"--preset {self.preset}: not one of {', '.join(PRESET_NAMES)}")
        for flag, value, low in (("--epochs", self.epochs, 1), ("--patience", self.patience, 1),
                                 ("--batch-size", self.batch_size, 1), ("--threads", self.threads, 0),
                                 ("--seed", self.seed, 0)):  # fmt: skip
            if value < low:
                raise UserError(f"{flag} {value}: must be an integer >= {low}")
        if self.max_length is not None and not 8 <= self.max_length <= 512:
            raise UserError(f"--max-length {self.max_length}: must be between 8 and 512")
        if not 0.0 < self.validation_fraction < 0.5:
            raise UserError(f"--validation-fraction {self.validation_fraction}: must be in (0, 0.5), e.g. 0.1")
        if not self.lr > 0:
            raise UserError(f"--lr {self.lr}: must be > 0, e.g. 1e-4")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay {self.weight_decay}: must be >= 0")
        return self


def _load(flag: str, entries: list[str]):
    from peer.finetune.data import load_examples

    try:
        return load_examples(entries)
    except InputError as e:
        raise e.with_flag(flag) from None


def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune and write the output; returns the content of ``metrics.json``."""
    import torch
    from transformers.utils import logging as hf_logging

    from peer.data.tokenizer import save_pretrained as save_tokenizer
    from peer.finetune.data import Encoder, carve_validation, check_labels
    from peer.finetune.model import build_classifier, load_init
    from peer.finetune.train import Settings, check_output, fine_tune, write_output

    target = check_output(cfg.output, cfg.overwrite)
    train = _load("--data", cfg.data)
    if cfg.validation:
        validation = _load("--validation", cfg.validation)
    else:
        train, validation = carve_validation(train, cfg.validation_fraction)
        if not validation:
            raise UserError(f"--data {' '.join(cfg.data)}: too few distinct examples to hold out a validation split; "
                            "pass more data or --validation")  # fmt: skip
    try:
        labels = check_labels(train, validation, " ".join(cfg.data))
    except InputError as e:
        raise e.with_flag("--data") from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars on stderr
    init = load_init(cfg.init_from, cfg.tokenizer, cfg.preset)
    max_length = cfg.max_length or init.seq_len
    if max_length > init.config.max_position_embeddings:
        raise UserError(f"--max-length {max_length}: the model has {init.config.max_position_embeddings} positions; "
                        "pass a smaller --max-length")  # fmt: skip
    model = build_classifier(init, labels, cfg.seed)
    settings = Settings(epochs=cfg.epochs, patience=cfg.patience, batch_size=cfg.batch_size, lr=cfg.lr,
                        weight_decay=cfg.weight_decay, seed=cfg.seed)  # fmt: skip
    print(f"bertswarm-finetune: {len(train)} training and {len(validation)} validation examples, {len(labels)} "
          f"classes, from {init.provenance['init_from']}", flush=True)  # fmt: skip

    def report(entry: dict) -> None:
        print(f"epoch {entry['epoch']}: train loss {entry['train_loss']:.4f}, validation accuracy "
              f"{entry['accuracy']:.4f}, macro-F1 {entry['macro_f1']:.4f}", flush=True)  # fmt: skip

    result = fine_tune(model, train, validation, Encoder(init.tokenizer, max_length), labels, settings, report)
    metrics = {
        "validation": result.validation,
        "majority_baseline": result.baseline,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "history": result.history,
        "labels": labels,
        "train_examples": len(train),
        "max_length": max_length,
        "init": init.provenance,
        "settings": asdict(settings),
    }
    try:
        with write_output(target, cfg.overwrite) as tmp:
            model.save_pretrained(tmp)  # config.json (with id2label) and model.safetensors
            mode = stat.S_IMODE(os.stat(tmp / "config.json").st_mode)
            os.chmod(tmp / "model.safetensors", mode)  # safetensors creates it 0600
            save_tokenizer(init.tokenizer, tmp, model_max_length=max_length)
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as e:  # the disk or the directory; nothing was published
        problem = f"cannot write ({e.strerror or e}); free disk space or pick another directory"
        raise UserError(f"--output {cfg.output}: {problem}") from None
    val, base = result.validation, result.baseline
    print(f"bertswarm-finetune: {cfg.output}: validation accuracy {val['accuracy']:.4f}, macro-F1 "
          f"{val['macro_f1']:.4f} (epoch {result.best_epoch} of {result.epochs_run}"
          f"{', stopped early' if result.stopped_early else ''}; majority class {base['accuracy']:.4f})",
          flush=True)  # fmt: skip
    return metrics


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = build_parser(FinetuneConfig, "bertswarm-finetune", DESCRIPTION, GROUPS)
        cfg, _ = parse_config(argv, parser=parser, config_cls=FinetuneConfig)
        setup_logging()
        run(cfg)

    return run_command("bertswarm-finetune", body, "interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
