"""Scenario: does pre-training help? Test accuracy on the offline topics set (``peer.finetune.labelled``: paragraphs of
installed packages' documentation, labelled by package, 4 classes) for the majority class, TF-IDF + logistic
regression, the tiny model fine-tuned from random weights, and the same model fine-tuned from a checkpoint
pre-trained in this run, at several label budgets (16, 64, 256 labelled paragraphs per class, and all of them).

Pre-training is the product's own: a one-peer swarm of ``peer.trainer.Trainer`` (the peer's training loop, its
``SwarmOptimizer``, DHT and all; ``Trainer.step``/``Trainer.report`` as ``Trainer.train`` calls them) for
``pretrain_steps`` global steps of ``pretrain_batch`` sequences, with the run's learning-rate schedule decaying to zero
at the last step, over the embedded corpus minus the topics set's validation and test paragraphs (so no evaluated text
is seen even without its label). The checkpoint is evaluated and written as the coordinator does it
(``coordinator.cli.evaluation_batches``, ``coordinator.snapshot.evaluate``, ``peer.store.checkpoint.write_checkpoint``);
the table gives its held-out MLM loss next to a unigram model's on the same masked tokens. It runs in a worker process
(1 torch thread) while this process fine-tunes the random-weights arm (1 torch thread): the two share nothing but the
machine, and the results do not depend on the timing (CPU training is deterministic for a seed).

Fine-tuning and evaluation are ``bertswarm-finetune``'s and ``bertswarm-eval``'s own code (``peer.finetune.cli.run``,
``peer.finetune.eval.run``). Tuning is the same for both arms and sees the validation split only: each arm picks its
learning rate from ``lr_grid`` by validation accuracy at each label budget (seed 0), and the other seeds are
fine-tuned with that rate. Label budgets are nested subsets of the training split (the
paragraphs of each class with the lowest stable hash); the validation and test splits are always the full ones. Small
budgets get more epochs (at least ``min_updates`` optimizer steps) and a proportionally longer patience.

TF-IDF needs scikit-learn, which bertswarm does not depend on: ``pip install scikit-learn`` (imported lazily; the
rows are left empty without it). Standalone: ``python -m bench.scenarios.finetune [--quick] [--reps N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

NAME = "finetune"
TITLE = "11. Fine-tuning: topic accuracy from random weights vs from a pre-trained checkpoint, by label budget"
ALL = 0
"""the label budget "every training paragraph" """


def config(quick: bool) -> dict:
    return dict(per_class=200 if quick else 600, seq_len=64, pretrain_steps=40 if quick else 3600,
                pretrain_batch=32, pretrain_lr=3e-3, pretrain_warmup=10 if quick else 450,
                pretrain_evals=2 if quick else 6, budgets=[16, ALL] if quick else [16, 64, 256, ALL],
                lr_grid=[1e-3] if quick else [1e-3, 3e-3],
                max_length=64, epochs=3 if quick else 10, min_updates=20 if quick else 120, patience=3, batch=16,
                threads=1, pretrain_timeout=900 if quick else 3600)  # fmt: skip


# --- data -------------------------------------------------------------------------------------------------------


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records), "utf-8")


def _budget_name(budget: int) -> str:
    return "all" if budget == ALL else f"{budget}/class"


def _subset(records: list[dict], per_class: int) -> list[dict]:
    """The ``per_class`` training records of each label with the lowest stable hash (all of a smaller class); nested:
    a smaller budget's subset is part of every larger one's."""
    if per_class == ALL:
        return list(records)

    def rank(record: dict) -> bytes:
        return hashlib.blake2b(f"budget\0{record['text']}".encode(), digest_size=8).digest()

    kept = []
    for label in sorted({r["label"] for r in records}):
        kept += sorted((r for r in records if r["label"] == label), key=rank)[:per_class]
    return sorted(kept, key=lambda r: (r["text"], r["label"]))


def _schedule(cfg: dict, examples: int) -> tuple[int, int]:
    """(epochs, patience) for a training set of ``examples``: at least ``min_updates`` optimizer steps, and a patience
    of the same share of the epochs as ``patience`` is of ``epochs``."""
    steps_per_epoch = -(-examples // cfg["batch"])
    epochs = max(cfg["epochs"], -(-cfg["min_updates"] // steps_per_epoch))
    return epochs, max(cfg["patience"], round(cfg["patience"] * epochs / cfg["epochs"]))


# --- baselines --------------------------------------------------------------------------------------------------


def _tfidf(train: list[dict], test: list[dict]) -> float | None:
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return None
    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1)
    x_train = vectorizer.fit_transform([r["text"] for r in train])
    classifier = LogisticRegression(max_iter=2000, C=10.0).fit(x_train, [r["label"] for r in train])
    predicted = classifier.predict(vectorizer.transform([r["text"] for r in test]))
    return sum(p == r["label"] for p, r in zip(predicted, test, strict=True)) / len(test)


# --- pre-training (a worker process) ----------------------------------------------------------------------------


def _unigram_loss(documents: list[str], tokenizer, batches: list[dict]) -> float:
    """Cross-entropy of the training documents' token frequencies (add-one smoothed) on the masked tokens of
    ``batches``: what an MLM that ignores the context reaches."""
    import torch

    counts = torch.ones(tokenizer.get_vocab_size(), dtype=torch.float64)
    for encoding in tokenizer.encode_batch(documents, add_special_tokens=False):
        counts += torch.bincount(torch.tensor(encoding.ids, dtype=torch.long), minlength=len(counts))
    log_p = (counts / counts.sum()).log()
    labels = torch.cat([b["labels"][b["labels"] != -100] for b in batches])
    return float(-log_p[labels].mean())


def pretrain(workdir: Path) -> None:
    """The worker: pre-train with the peer's trainer in a one-peer swarm, write the checkpoint, and write
    ``<workdir>/pretraining.json``. Reads ``<workdir>/pretrain-config.json`` and the topics set's files."""
    import torch

    from bench import workload
    from coordinator.cli import evaluation_batches
    from coordinator.snapshot import evaluate
    from peer import trainer as product_trainer
    from peer.config import PeerConfig
    from peer.data import corpus, embedded
    from peer.data.batches import BatchStream
    from peer.store.checkpoint import write_checkpoint
    from peer.store.state import StateDir
    from peer.swarm import records
    from peer.swarm.dht import keep_request_futures, start_dht, stop_dht
    from peer.telemetry import PeerTelemetry

    cfg = json.loads((workdir / "pretrain-config.json").read_text())
    torch.set_num_threads(cfg["threads"])
    started = time.perf_counter()
    exclude = {r["text"] for split in ("validation", "test") for r in _read(workdir / "topics" / f"{split}.jsonl")}
    documents, removed = [], 0
    for document in embedded.default_corpus():
        kept = [p for p in document.split("\n") if p not in exclude]
        removed += document.count("\n") + 1 - len(kept)
        if kept:
            documents.append("\n".join(kept))
    train, heldout = corpus.split_heldout(documents)
    tokenizer = workload.tokenizer()
    steps = cfg["pretrain_steps"]
    run = workload.make_manifest("finetune-bench", "tiny", cfg["seq_len"], target=cfg["pretrain_batch"],
                                 warmup=cfg["pretrain_warmup"], lr=cfg["pretrain_lr"], total_steps=steps)  # fmt: skip
    peer_cfg = PeerConfig(listen=["/ip4/127.0.0.1/tcp/0"], state_dir=str(workdir / "peer-state"),
                          batch_size=cfg["pretrain_batch"], device="cpu", threads=cfg["threads"], seed=1,
                          max_steps=steps, save_every=0, log_every=30.0).validate()  # fmt: skip
    eval_batches = evaluation_batches(run, tokenizer, documents, None, 8)  # the coordinator's held-out batches
    marks = {round(steps * (i + 1) / cfg["pretrain_evals"]) for i in range(cfg["pretrain_evals"])}
    curve = [{"step": 0, "seconds": 0.0, **evaluate(workload.model_for(run), eval_batches)}]
    dht = start_dht(peer_cfg, records.registry_validators())  # as the product's peer (``peer.trainer.run``)
    dht.add_validators(records.run_validators(run.run_id)[0])
    prepared = product_trainer.Prepared(StateDir(peer_cfg.state_path), tokenizer, PeerTelemetry(), None)
    trainer = None
    try:
        batches = BatchStream(train, tokenizer, seq_len=run.seq_len, batch_size=cfg["pretrain_batch"],
                              mlm_probability=run.mlm_probability, nsp=run.nsp, seed=1)  # fmt: skip
        trainer = product_trainer.Trainer(peer_cfg, prepared, dht, run, batches=batches)
        setup = time.perf_counter() - started
        began, training = time.perf_counter(), 0.0
        while not trainer.finished:  # Trainer.train's loop (it also saves local state: off here, save_every 0)
            trainer.step()
            trainer.report()
            epoch = trainer.opt.local_epoch
            if epoch in marks and all(point["step"] != epoch for point in curve):
                training += time.perf_counter() - began
                curve.append({"step": epoch, "seconds": training, **evaluate(trainer.model, eval_batches)})
                began = time.perf_counter()
        model, epoch, samples = trainer.model, trainer.opt.local_epoch, trainer.samples_total
        final = next(point for point in curve if point["step"] == epoch)
        figures = {k: final[k] for k in ("mlm_loss", "mlm_accuracy", "masked_tokens")}
        with torch.no_grad():
            path = write_checkpoint(workdir / "checkpoints", model, tokenizer, run, epoch=epoch, samples_seen=samples,
                                    eval_metrics=figures)  # fmt: skip
        result = {**figures, "checkpoint": str(path), "steps": epoch, "samples": samples,
                  "micro_batches": trainer.mini_steps, "rounds": dict(trainer.rounds), "curve": curve,
                  "unigram_loss": _unigram_loss(train, tokenizer, eval_batches), "training_seconds": training,
                  "setup_seconds": setup, "documents": len(train), "heldout_documents": len(heldout),
                  "removed_paragraphs": removed, "manifest": run.fingerprint}  # fmt: skip
    finally:
        with keep_request_futures(dht):
            if trainer is not None:
                trainer.close()
            stop_dht(dht)
        prepared.state_dir.close()
    result["seconds"] = time.perf_counter() - started
    (workdir / "pretraining.json").write_text(json.dumps(result, indent=1))
    print("DONE", flush=True)


# --- fine-tuning ------------------------------------------------------------------------------------------------


def _finetune(workdir: Path, topics: Path, init_from: str, budget: int, cfg: dict, lr: float, seed: int) -> dict:
    from peer.finetune import eval as evaluate
    from peer.finetune.cli import FinetuneConfig
    from peer.finetune.cli import run as finetune

    train = topics / f"train-{budget}.jsonl"
    epochs, patience = _schedule(cfg, sum(1 for _ in train.open()))
    out = workdir / f"clf-{Path(init_from).name}-{budget}-{lr:g}-{seed}"
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the commands' progress lines; stdout is the scenario's result
        metrics = finetune(FinetuneConfig(init_from=init_from, data=[str(train)],
                                          validation=[str(topics / "validation.jsonl")], output=str(out),
                                          overwrite=True, max_length=cfg["max_length"], epochs=epochs,
                                          patience=patience, lr=lr, batch_size=cfg["batch"], seed=seed,
                                          threads=cfg["threads"]).validate())  # fmt: skip
        seconds = time.perf_counter() - started
        test = evaluate.run(evaluate.EvalConfig(checkpoint=str(out), data=[str(topics / "test.jsonl")], json=True))
    return {"budget": budget, "lr": lr, "seed": seed, "test": test, "validation": metrics["validation"],
            "epochs": epochs, "patience": patience, "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"], "seconds": seconds}  # fmt: skip


def _arm(workdir: Path, topics: Path, init_from: str, cfg: dict, reps: int) -> dict:
    """Per label budget: tune the learning rate on validation (seed 0, every rate of ``lr_grid``), then fine-tune the
    other seeds with the best one (seed 0's figures are its tuning run's)."""
    lrs, tuning, runs = {}, [], []
    for budget in cfg["budgets"]:
        tried = [_finetune(workdir, topics, init_from, budget, cfg, lr, 0) for lr in cfg["lr_grid"]]
        best = max(tried, key=lambda r: r["validation"]["accuracy"])  # the first (lowest rate) on ties
        lrs[_budget_name(budget)], tuning = best["lr"], tuning + tried
        runs += [best] + [_finetune(workdir, topics, init_from, budget, cfg, best["lr"], s) for s in range(1, reps)]
    return {"lr": lrs, "tuning": tuning, "runs": runs}


def run(workdir, reps: int, quick: bool) -> dict:
    from bench.common import Worker
    from peer.finetune import labelled
    from peer.finetune.metrics import majority_baseline

    workdir = Path(workdir)
    cfg = config(quick)
    topics = workdir / "topics"
    info = labelled.write_topics(topics, cfg["per_class"])
    records = {split: _read(topics / f"{split}.jsonl") for split in labelled.SPLITS}
    sizes = {}
    for budget in cfg["budgets"]:
        subset = _subset(records["train"], budget)
        _write(topics / f"train-{budget}.jsonl", subset)
        sizes[budget] = len(subset)
    label_ids = {label: i for i, label in enumerate(info["labels"])}
    majority = majority_baseline([label_ids[r["label"]] for r in records["train"]],
                                 [label_ids[r["label"]] for r in records["test"]], len(label_ids))  # fmt: skip
    tfidf = {b: _tfidf(_read(topics / f"train-{b}.jsonl"), records["test"]) for b in cfg["budgets"]}

    (workdir / "pretrain-config.json").write_text(json.dumps(cfg))
    worker = Worker(["-m", "bench.scenarios.finetune", "--pretrain-worker", str(workdir)], workdir / "pretrain.log",
                    threads=cfg["threads"])  # fmt: skip
    started = time.perf_counter()
    try:
        random_arm = _arm(workdir, topics, "random", cfg, reps)  # meanwhile, on the other core
        random_seconds = time.perf_counter() - started
        worker.wait_line("DONE", timeout=max(60.0, cfg["pretrain_timeout"] - random_seconds))
        waited = time.perf_counter() - started - random_seconds
    finally:
        worker.stop()
    pretraining = json.loads((workdir / "pretraining.json").read_text())
    pretrained_arm = _arm(workdir, topics, pretraining["checkpoint"], cfg, reps)
    arms = {"random": random_arm, "pretrained": pretrained_arm}

    def runs(arm: str, budget: int) -> list[dict]:
        return [r for r in arms[arm]["runs"] if r["budget"] == budget]

    rows = [{"metric": "majority class: test accuracy", "values": [majority["accuracy"]]}]
    for budget in cfg["budgets"]:
        name = f"{_budget_name(budget)} ({sizes[budget]} labelled)"
        rows.append({"metric": f"{name}: TF-IDF + logistic regression: test accuracy",
                     "values": [] if tfidf[budget] is None else [tfidf[budget]]})  # fmt: skip
        for arm, label in (("random", "from random weights"), ("pretrained", "from the pre-trained checkpoint")):
            rows.append({"metric": f"{name}: tiny BERT {label}: test accuracy",
                         "values": [r["test"]["accuracy"] for r in runs(arm, budget)]})  # fmt: skip
        rows.append({"metric": f"{name}: pre-trained ÷ random test accuracy (same seed)",
                     "values": [p["test"]["accuracy"] / r["test"]["accuracy"]
                                for p, r in zip(runs("pretrained", budget), runs("random", budget), strict=True)],
                     "headline": budget in (min(b for b in cfg["budgets"] if b != ALL), ALL)})  # fmt: skip
    for budget in cfg["budgets"]:
        for arm, label in (("random", "from random weights"), ("pretrained", "from the pre-trained checkpoint")):
            rows.append({"metric": f"{_budget_name(budget)}: tiny BERT {label}: test macro-F1",
                         "values": [r["test"]["macro_f1"] for r in runs(arm, budget)]})  # fmt: skip
    counts = {split: sum(c.values()) for split, c in info["counts"].items()}
    curve = ", ".join(f"{p['step']}: {p['mlm_loss']:.2f}" for p in pretraining["curve"])
    tuning = "; ".join(
        f"{_budget_name(budget)}: "
        + ", ".join(
            f"{arm} → {arms[arm]['lr'][_budget_name(budget)]:g} ("
            + ", ".join(
                f"{r['lr']:g}: {r['validation']['accuracy']:.3f}" for r in arms[arm]["tuning"] if r["budget"] == budget
            )  # fmt: skip
            + ")"
            for arm in arms
        )
        for budget in cfg["budgets"]
    )
    schedules = ", ".join(f"{_budget_name(b)} {'/'.join(map(str, _schedule(cfg, sizes[b])))}" for b in sizes)
    notes = [
        f"topics set {info['fingerprint'][:12]} ({', '.join(f'{n} {s}' for s, n in counts.items())}; "
        f"{' / '.join(info['labels'])}); label budgets are nested per-class subsets of the training split; the test "
        "split only for the figures, the validation split for early stopping and the learning rate.",
        f"pre-training: the peer's trainer in a one-peer swarm, tiny preset, {pretraining['steps']} steps of "
        f"{cfg['pretrain_batch']} × {cfg['seq_len']} tokens (lr {cfg['pretrain_lr']:g}, warm-up "
        f"{cfg['pretrain_warmup']}, linear decay to 0 at the last step) on the embedded corpus without the "
        f"{pretraining['removed_paragraphs']} evaluated paragraphs, {pretraining['training_seconds']:.0f} s of "
        f"training ({pretraining['seconds']:.0f} s in all); held-out MLM loss {pretraining['mlm_loss']:.3f} "
        f"(unigram model {pretraining['unigram_loss']:.3f}), masked-token accuracy {pretraining['mlm_accuracy']:.3f}; "
        f"by step: {curve}.",
        f"learning rate per label budget by validation accuracy (seed 0; the same grid for both arms): {tuning}.",
        f"fine-tuning: batch {cfg['batch']}, {cfg['max_length']} tokens, at least {cfg['min_updates']} optimizer steps;"
        f" max epochs/patience: {schedules}; seeds 0..{reps - 1}. The random arm was fine-tuned while pre-training "
        f"ran ({random_seconds:.0f} s; then {waited:.0f} s waiting for the checkpoint).",
    ]
    if any(v is None for v in tfidf.values()):
        notes.append("TF-IDF rows empty: scikit-learn is not installed (pip install scikit-learn).")
    return {"config": cfg, "rows": rows,
            "raw": {**arms, "pretraining": pretraining, "tfidf": {_budget_name(b): v for b, v in tfidf.items()},
                    "majority": majority, "budget_sizes": {_budget_name(b): n for b, n in sizes.items()},
                    "random_arm_seconds": random_seconds, "waited_for_pretraining_seconds": waited},
            "notes": notes}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scenarios.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--pretrain-worker", type=Path, metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pretrain_worker is not None:
        pretrain(args.pretrain_worker)
        return
    with tempfile.TemporaryDirectory(prefix="bertswarm-finetune-bench-") as workdir:
        print(json.dumps(run(workdir, args.reps, args.quick), indent=2, default=str))


if __name__ == "__main__":
    main()
