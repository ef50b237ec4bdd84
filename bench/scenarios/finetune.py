"""Scenario: does pre-training help? Test accuracy on the offline topics set (``peer.finetune.labelled``: paragraphs of
installed packages' documentation, labelled by package, 4 classes) for the majority class, TF-IDF + logistic
regression, the tiny model fine-tuned from random weights, and the same model fine-tuned from a briefly pre-trained
checkpoint.

Pre-training is one process with the product's data pipeline and optimizer (``BatchStream`` over the embedded
corpus, the run's ``optimizer_factory``/``scheduler_factory``, as the ``single`` arm of the other scenarios) and is
published with the product's checkpoint writer; the topics set's validation and test paragraphs are removed from
its corpus first, so no evaluated text is seen even without its label. Fine-tuning and evaluation are
``bertswarm-finetune``'s and ``bertswarm-eval``'s own code (``peer.finetune.cli.run``, ``peer.finetune.eval.run``).

TF-IDF needs scikit-learn, which bertswarm does not depend on: ``pip install scikit-learn`` (imported lazily; the
row is left empty without it). Standalone: ``python -m bench.scenarios.finetune [--quick] [--reps N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

NAME = "finetune"
TITLE = "11. Fine-tuning: topic accuracy from random weights vs from a pre-trained checkpoint"


def config(quick: bool) -> dict:
    return dict(per_class=200 if quick else 600, pretrain_steps=60 if quick else 400, pretrain_batch=32,
                seq_len=64, max_length=64, epochs=4 if quick else 10, patience=3, lr=1e-3, batch=16)  # fmt: skip


def _pretrain(workdir: Path, cfg: dict, exclude: set[str]) -> tuple[Path, dict]:
    """A checkpoint of the tiny preset after ``pretrain_steps`` MLM steps on the embedded corpus minus ``exclude``."""
    import torch

    from bench import workload
    from peer.data import corpus, embedded
    from peer.data.batches import BatchStream, heldout_batches
    from peer.finetune.metrics import evaluate_mlm
    from peer.store.checkpoint import write_checkpoint
    from peer.swarm.optim import optimizer_factory, param_groups, scheduler_factory

    run = workload.make_manifest("finetune-bench", "tiny", cfg["seq_len"], warmup=50)
    documents = []
    for document in embedded.default_corpus():
        kept = [p for p in document.split("\n") if p not in exclude]
        if kept:
            documents.append("\n".join(kept))
    train, heldout = corpus.split_heldout(documents)
    model = workload.model_for(run)
    opt = optimizer_factory(run)(param_groups(model, run.weight_decay))
    sched = scheduler_factory(run)(opt)
    stream = BatchStream(train, workload.tokenizer(), seq_len=run.seq_len, batch_size=cfg["pretrain_batch"], seed=1)
    started = time.perf_counter()
    for _ in range(cfg["pretrain_steps"]):
        model(**next(stream)).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    seconds = time.perf_counter() - started
    batches = heldout_batches(heldout, workload.tokenizer(), seq_len=run.seq_len, batch_size=16, max_batches=8)
    figures = evaluate_mlm(model, batches)
    with torch.no_grad():
        path = write_checkpoint(workdir / "checkpoints", model, workload.tokenizer(), run,
                                epoch=cfg["pretrain_steps"], samples_seen=cfg["pretrain_steps"] * cfg["pretrain_batch"],
                                eval_metrics={k: figures[k] for k in ("mlm_loss", "mlm_accuracy")})  # fmt: skip
    return path, {**figures, "seconds": seconds, "documents": len(train)}


def _tfidf(topics: Path) -> float | None:
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return None
    split = {name: [json.loads(line) for line in (topics / f"{name}.jsonl").open()] for name in ("train", "test")}
    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1)
    x_train = vectorizer.fit_transform([r["text"] for r in split["train"]])
    classifier = LogisticRegression(max_iter=2000, C=10.0).fit(x_train, [r["label"] for r in split["train"]])
    predicted = classifier.predict(vectorizer.transform([r["text"] for r in split["test"]]))
    return sum(p == r["label"] for p, r in zip(predicted, split["test"], strict=True)) / len(split["test"])


def _finetune(workdir: Path, topics: Path, init_from: str, cfg: dict, seed: int) -> dict:
    from peer.finetune import eval as evaluate
    from peer.finetune.cli import FinetuneConfig
    from peer.finetune.cli import run as finetune

    out = workdir / f"clf-{Path(init_from).name}-{seed}"
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the commands' progress lines; stdout is the scenario's result
        metrics = finetune(FinetuneConfig(init_from=init_from, data=[str(topics / "train.jsonl")],
                                          validation=[str(topics / "validation.jsonl")], output=str(out),
                                          overwrite=True, max_length=cfg["max_length"], epochs=cfg["epochs"],
                                          patience=cfg["patience"],
                                          lr=cfg["lr"], batch_size=cfg["batch"], seed=seed).validate())  # fmt: skip
        seconds = time.perf_counter() - started
        test = evaluate.run(evaluate.EvalConfig(checkpoint=str(out), data=[str(topics / "test.jsonl")], json=True))
    return {"test": test, "validation": metrics["validation"], "epochs_run": metrics["epochs_run"], "seconds": seconds}


def run(workdir, reps: int, quick: bool) -> dict:
    from peer.finetune import labelled
    from peer.finetune.metrics import majority_baseline

    workdir = Path(workdir)
    cfg = config(quick)
    topics = workdir / "topics"
    info = labelled.write_topics(topics, cfg["per_class"])
    records = {s: [json.loads(line) for line in (topics / f"{s}.jsonl").open()] for s in labelled.SPLITS}
    label_ids = {label: i for i, label in enumerate(info["labels"])}
    majority = majority_baseline([label_ids[r["label"]] for r in records["train"]],
                                 [label_ids[r["label"]] for r in records["test"]], len(label_ids))  # fmt: skip
    tfidf = _tfidf(topics)
    exclude = {r["text"] for s in ("validation", "test") for r in records[s]}
    checkpoint, pretraining = _pretrain(workdir, cfg, exclude)
    raw = {"random": [], "pretrained": []}
    for seed in range(reps):
        raw["random"].append(_finetune(workdir, topics, "random", cfg, seed))
        raw["pretrained"].append(_finetune(workdir, topics, str(checkpoint), cfg, seed))
    rows = [
        {"metric": "majority class: test accuracy", "values": [majority["accuracy"]]},
        {"metric": "TF-IDF + logistic regression: test accuracy", "values": [] if tfidf is None else [tfidf]},
    ]
    for arm, label in (("random", "from random weights"), ("pretrained", "from the pre-trained checkpoint")):
        rows.append({"metric": f"tiny BERT fine-tuned {label}: test accuracy",
                     "values": [r["test"]["accuracy"] for r in raw[arm]]})  # fmt: skip
        rows.append({"metric": f"tiny BERT fine-tuned {label}: test macro-F1",
                     "values": [r["test"]["macro_f1"] for r in raw[arm]]})  # fmt: skip
    rows.append({"metric": "pre-trained ÷ random test accuracy",
                 "values": [p["test"]["accuracy"] / r["test"]["accuracy"]
                            for p, r in zip(raw["pretrained"], raw["random"], strict=True)],
                 "headline": True})  # fmt: skip
    counts = {split: sum(c.values()) for split, c in info["counts"].items()}
    notes = [
        f"topics set {info['fingerprint'][:12]} ({', '.join(f'{n} {s}' for s, n in counts.items())}; "
        f"{' / '.join(info['labels'])}); test split only for the figures, validation for early stopping.",
        f"pre-training: tiny preset, {cfg['pretrain_steps']} steps of {cfg['pretrain_batch']} × {cfg['seq_len']} "
        f"tokens on the embedded corpus without the evaluated paragraphs, {pretraining['seconds']:.0f} s; held-out "
        f"MLM loss {pretraining['mlm_loss']:.3f}, masked-token accuracy {pretraining['mlm_accuracy']:.3f}.",
        f"fine-tuning: max {cfg['epochs']} epochs, patience {cfg['patience']}, lr {cfg['lr']}, batch {cfg['batch']}, "
        f"{cfg['max_length']} tokens; seeds 0..{reps - 1}.",
    ]
    if tfidf is None:
        notes.append("TF-IDF row empty: scikit-learn is not installed (pip install scikit-learn).")
    return {"config": cfg, "rows": rows, "raw": {**raw, "pretraining": pretraining, "tfidf": tfidf,
                                                  "majority": majority}, "notes": notes}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scenarios.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bertswarm-finetune-bench-") as workdir:
        print(json.dumps(run(workdir, args.reps, args.quick), indent=2, default=str))


if __name__ == "__main__":
    main()
