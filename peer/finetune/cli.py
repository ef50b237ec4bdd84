"""``bertswarm-finetune``: a published pre-training checkpoint (or random weights) → a Hugging Face sequence
classifier fine-tuned on labelled ``.jsonl``/``.csv`` files or an ``hf:`` dataset.

The output directory loads with ``AutoModelForSequenceClassification.from_pretrained(DIR)`` and
``pipeline("text-classification", model=DIR)``: ``config.json`` (with the label names), ``model.safetensors``, the
tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.txt``) and ``metrics.json`` (validation
accuracy and macro-F1 of the kept epoch, the majority-class baseline, the per-epoch history, where the weights came
from). It appears complete or not at all (:func:`peer.finetune.train.write_output`).

With ``--swarm`` the command starts a fine-tuning run that others join with ``--join MADDR`` (the line it prints):
the peers average their gradients as pre-training's do, each on its own labelled data, and each writes its own
``--output`` (:mod:`peer.finetune.swarm`; the run's manifest, :mod:`peer.finetune.manifest`, pins the task, the labels,
the base checkpoint's weights and the training settings).

The flags are generated from :class:`FinetuneConfig` (the peer's generator; the swarm settings are the peer's own,
help text included). User errors print one line on stderr and exit 2, with nothing written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
from dataclasses import asdict, dataclass

from peer.cli import build_parser, parse_config, run_command, setup_logging
from peer.config import PeerConfig, setting
from peer.errors import InputError, UserError
from peer.run.manifest import AGGREGATIONS
from peer.run.presets import PRESET_NAMES

GROUPS = {"input": "what to fine-tune, on what", "training": "training", "output": "the fine-tuned classifier",
          "swarm": "fine-tuning together (--swarm starts a run, --join takes part in one)"}  # fmt: skip
DESCRIPTION = (
    "Fine-tune a bertswarm checkpoint (a checkpoint directory, a checkpoint root's latest, or a coordinator URL) "
    "into a Hugging Face sequence classifier on labelled .jsonl/.csv files (text, label, optional text_pair); "
    "early stopping on validation accuracy. --init-from random trains the same architecture from scratch. "
    "--swarm / --join MADDR: fine-tune together with other peers, each on its own data."
)
METRICS_FILE = "metrics.json"
DEFAULT_TARGET_BATCH = 64


def _peer_setting(name: str, **overrides):
    """A swarm setting as the peer declares it (``peer.config.PeerConfig``: help text, default, metavar), in this
    command's swarm group; ``overrides`` replace any of these."""
    declared = {f.name: f for f in dataclasses.fields(PeerConfig)}[name]
    if declared.default_factory is not dataclasses.MISSING:
        default = {"default_factory": declared.default_factory}
    else:
        default = {"default": declared.default}
    kwargs = {"help": declared.metadata["help"], "metavar": declared.metadata.get("metavar"), **default, **overrides}
    return setting(kwargs.pop("help"), group="swarm", **kwargs)


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
    seed: int = setting("seed of the head's initialisation, dropout and the shuffle (a swarm run's head starts from "
                        "its creator's seed on every peer)", default=0, group="training")  # fmt: skip
    threads: int = setting("CPU threads for torch (0 = torch's default)", default=0, group="training")
    output: str = setting("directory to write (required; must not exist unless --overwrite)", default="",
                          metavar="DIR", group="output")  # fmt: skip
    overwrite: bool = setting("replace an existing --output", default=False, group="output")
    swarm: bool = setting("start a new fine-tuning run that other peers join: prints 'bertswarm-finetune --join "
                          "MADDR'; its manifest pins --task, the labels of --data, the --init-from weights and the "
                          "training settings", default=False, group="swarm")  # fmt: skip
    join: list[str] = _peer_setting("join", help="multiaddr of a live peer of a fine-tuning run to take part in "
                                    "(repeatable): the run's settings are adopted; other labels, another base "
                                    "checkpoint or a contradicting flag are refused")  # fmt: skip
    run_id: str | None = setting("name of the fine-tuning run (default with --swarm: bertswarm-finetune); a joiner "
                                 "adopts the run it finds", default=None, group="swarm")  # fmt: skip
    task: str | None = setting("name of the task, pinned in the run's manifest (default: the run id)", default=None,
                               group="swarm")  # fmt: skip
    target_batch_size: int = setting("examples per global optimizer step, all peers together (with --swarm; "
                                     "--batch-size is each peer's share per forward pass)",
                                     default=DEFAULT_TARGET_BATCH, group="swarm")  # fmt: skip
    min_peers: int = setting("with --swarm: the run's peers wait until this many have joined, then train",
                             default=1, group="swarm")  # fmt: skip
    aggregation: str = _peer_setting("aggregation")
    listen: list[str] = _peer_setting("listen")
    announce: list[str] = _peer_setting("announce")
    client_mode: bool = _peer_setting("client_mode")
    identity: str | None = _peer_setting("identity")
    state_dir: str = _peer_setting("state_dir", help="directory for this peer's identity and the run creators it "
                                   "trusts (one per peer process)", default="bertswarm-finetune-state")  # fmt: skip
    address_file: str | None = _peer_setting("address_file")
    startup_timeout: float = _peer_setting("startup_timeout")
    matchmaking_time: float = _peer_setting("matchmaking_time")
    averaging_timeout: float = _peer_setting("averaging_timeout")

    @property
    def in_swarm(self) -> bool:
        return self.swarm or bool(self.join)

    def dht_settings(self) -> PeerConfig:
        """This peer's swarm settings as the peer's own config, checked by ``PeerConfig.validate`` (the one place
        addresses and their combinations are checked): what ``peer.swarm.dht.start_dht`` takes."""
        names = ("join", "listen", "announce", "client_mode", "identity", "state_dir", "startup_timeout", "run_id",
                 "address_file", "matchmaking_time", "averaging_timeout", "aggregation")  # fmt: skip
        return PeerConfig(**{name: getattr(self, name) for name in names}).validate()

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
        self._validate_swarm()
        return self

    def _validate_swarm(self) -> None:
        if self.swarm and self.join:
            raise UserError("--swarm starts a new fine-tuning run and --join takes part in one; pass one of them")
        if not self.in_swarm:
            defaults = FinetuneConfig()
            stray = [f.name for f in dataclasses.fields(self) if f.metadata.get("group") == "swarm"
                     and f.name != "swarm" and getattr(self, f.name) != getattr(defaults, f.name)]  # fmt: skip
            if stray:
                flag = "--" + stray[0].replace("_", "-")
                raise UserError(f"{flag} applies to fine-tuning together only; add --swarm (start a run) or --join "
                                f"MADDR (take part in one), or drop {flag}")  # fmt: skip
            return
        if self.aggregation not in AGGREGATIONS:
            raise UserError(f"--aggregation {self.aggregation!r}: unknown; choose one of {', '.join(AGGREGATIONS)}")
        if not 1 <= self.min_peers <= 1000:
            raise UserError(f"--min-peers {self.min_peers}: must be an integer from 1 to 1000")
        if self.target_batch_size < 1:
            raise UserError(f"--target-batch-size {self.target_batch_size}: must be an integer >= 1")
        if self.task is not None and not 1 <= len(self.task) <= 64:
            raise UserError(f"--task {self.task!r}: give a name of 1-64 characters")
        self.dht_settings()  # addresses, timeouts, --run-id: the peer's own checks and one-line errors


def _load(flag: str, entries: list[str]):
    from peer.finetune.data import load_examples

    try:
        return load_examples(entries)
    except InputError as e:
        raise e.with_flag(flag) from None


def run(cfg: FinetuneConfig, explicit: set[str] = frozenset(), out=None) -> dict:
    """Fine-tune (alone, or with a swarm: ``--swarm``/``--join``) and write the output; returns the content of
    ``metrics.json``. ``explicit``: the settings the user set (a joiner's that contradict the run are refused);
    ``out``: where the progress lines go (default: stdout)."""
    out = out if out is not None else sys.stdout
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
    print(f"bertswarm-finetune: {len(train)} training and {len(validation)} validation examples, {len(labels)} "
          f"classes, from {init.provenance['init_from']}", file=out, flush=True)  # fmt: skip

    def report(entry: dict) -> None:
        step = f" (global step {entry['step']})" if "step" in entry else ""
        print(f"epoch {entry['epoch']}{step}: train loss {entry['train_loss']:.4f}, validation accuracy "
              f"{entry['accuracy']:.4f}, macro-F1 {entry['macro_f1']:.4f}", file=out, flush=True)  # fmt: skip

    swarm_run = None
    if cfg.in_swarm:
        from peer.finetune import swarm

        swarm_run = swarm.fine_tune(cfg, set(explicit), init, train, validation, labels, max_length, report, out)
        model, result, run_manifest = swarm_run.model, swarm_run.result, swarm_run.manifest
        max_length = run_manifest.max_length
        settings = Settings(epochs=run_manifest.epochs, patience=cfg.patience, batch_size=cfg.batch_size,
                            lr=run_manifest.lr, weight_decay=run_manifest.weight_decay, seed=cfg.seed)  # fmt: skip
    else:
        model = build_classifier(init, labels, cfg.seed)
        settings = Settings(epochs=cfg.epochs, patience=cfg.patience, batch_size=cfg.batch_size, lr=cfg.lr,
                            weight_decay=cfg.weight_decay, seed=cfg.seed)  # fmt: skip
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
    if swarm_run is not None:
        metrics["swarm"] = swarm_run.summary()
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
          file=out, flush=True)  # fmt: skip
    return metrics


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = build_parser(FinetuneConfig, "bertswarm-finetune", DESCRIPTION, GROUPS)
        cfg, explicit = parse_config(argv, parser=parser, config_cls=FinetuneConfig)
        setup_logging()
        run(cfg, explicit)

    return run_command("bertswarm-finetune", body, "interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
