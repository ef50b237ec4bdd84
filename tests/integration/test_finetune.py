"""``bertswarm-finetune`` and ``bertswarm-eval`` end to end on the offline topics set and a tiny checkpoint written by
the product's own checkpoint writer: the classifier beats the majority class and loads in transformers, early
stopping stops, an interrupted ``--overwrite`` leaves the old output, and ``bertswarm-eval`` reproduces the
coordinator's held-out figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, pipeline

from peer.config import PeerConfig
from peer.data.corpus import load_documents
from peer.data.tokenizer import default_tokenizer, tokenizer_fingerprint
from peer.finetune import cli, labelled
from peer.finetune import eval as evaluate
from peer.run.manifest import from_config
from peer.run.model import build_model
from peer.store.checkpoint import write_checkpoint

pytestmark = pytest.mark.timeout(120)

FAST = ["--max-length", "32", "--batch-size", "16", "--threads", "1", "--seed", "0"]  # 1 thread: robust on shared CPUs


@pytest.fixture(autouse=True)
def restore_threads():
    """``--threads`` sets torch's process-wide thread count: give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    directory = tmp_path_factory.mktemp("topics")
    labelled.write_topics(directory, per_class=120)
    return directory


@pytest.fixture(scope="module")
def run(tmp_path_factory, topics):
    """A tiny run's checkpoint, stamped (as the coordinator does) with the coordinator's held-out figures."""
    from coordinator.cli import evaluation_batches
    from coordinator.snapshot import evaluate as coordinator_evaluate

    tok = default_tokenizer()
    cfg = PeerConfig(seq_len=64).validate()
    manifest = from_config(cfg, "finetune-test", tokenizer_fingerprint(tok), tok.get_vocab_size())
    model = build_model(manifest.model, nsp=False, seed=0)
    corpus = topics / "train.jsonl"  # .jsonl with a "text" field: also an MLM corpus
    batches = evaluation_batches(manifest, tok, load_documents([corpus]), None, 2)
    figures = coordinator_evaluate(model, batches)
    root = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(root, model, tok, manifest, epoch=7, samples_seen=0, eval_metrics=figures)
    return root, corpus, figures


def test_finetuned_checkpoint_beats_the_majority_class_and_loads_in_transformers(tmp_path, topics, run, capsys):
    root, _, _ = run
    out = tmp_path / "classifier"
    data = ["--data", str(topics / "train.jsonl"), "--validation", str(topics / "validation.jsonl")]
    argv = ["--init-from", str(root), *data, "--output", str(out), "--epochs", "5", "--lr", "1e-3", *FAST]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "epoch 1: train loss" in printed and "validation accuracy" in printed

    metrics = json.loads((out / cli.METRICS_FILE).read_text())
    assert metrics["init"]["epoch"] == 7 and metrics["labels"] == ["hivemind", "python", "torch", "transformers"]
    assert metrics["validation"]["accuracy"] >= metrics["majority_baseline"]["accuracy"] + 0.1, metrics["history"]
    assert 0 < metrics["validation"]["macro_f1"] <= 1

    model, loading = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(loading.values()), loading
    assert model.config.id2label[0] == "hivemind"
    classify = pipeline("text-classification", model=str(out), tokenizer=str(out), device="cpu")
    predicted = classify(["Gradients are averaged with the other peers over the DHT."])
    assert predicted[0]["label"] in metrics["labels"]

    # bertswarm-eval gives the fine-tuning run's own validation figures back
    figures = evaluate.run(evaluate.EvalConfig(checkpoint=str(out), data=[str(topics / "validation.jsonl")]))
    assert figures["accuracy"] == pytest.approx(metrics["validation"]["accuracy"])
    assert figures["macro_f1"] == pytest.approx(metrics["validation"]["macro_f1"])


def test_early_stopping_stops(tmp_path, topics, run):
    root, _, _ = run
    out = tmp_path / "stopped"
    argv = ["--init-from", str(root), "--data", str(topics / "validation.jsonl"), "--output", str(out)]
    # a learning rate this small cannot change a prediction: no epoch improves on the first
    assert cli.main([*argv, "--epochs", "8", "--patience", "2", "--lr", "1e-12", *FAST]) == 0
    metrics = json.loads((out / cli.METRICS_FILE).read_text())
    assert metrics["stopped_early"] and metrics["epochs_run"] == 3 and metrics["best_epoch"] == 1


def test_interrupted_overwrite_keeps_the_old_output(tmp_path, topics, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("previous classifier")
    argv = ["--init-from", "random", "--data", str(topics / "validation.jsonl"), "--output", str(out)]
    argv += ["--overwrite", "--epochs", "1", *FAST]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("peer.data.tokenizer.save_pretrained", interrupted)  # after the weights, before the rename
        assert cli.main(argv) == 130
    assert [p.name for p in out.iterdir()] == ["old"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    assert cli.main(argv) == 0  # random weights, same architecture: the baseline of pre-training
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", cli.METRICS_FILE} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "old").exists()
    assert json.loads((out / cli.METRICS_FILE).read_text())["init"] == {"init_from": "random", "preset": "tiny"}


def test_eval_agrees_with_the_coordinator(run):
    root, corpus, coordinator_figures = run
    ours = evaluate.run(evaluate.EvalConfig(checkpoint=str(root), data=[str(corpus)], eval_batches=2, json=True))
    assert ours["masked_tokens"] == coordinator_figures["masked_tokens"] > 0
    assert ours["mlm_loss"] == pytest.approx(coordinator_figures["mlm_loss"], rel=1e-6)
    assert ours["mlm_accuracy"] == pytest.approx(coordinator_figures["mlm_accuracy"])
    assert ours["perplexity"] == pytest.approx(math.exp(coordinator_figures["mlm_loss"]), rel=1e-6)
    recorded = json.loads(next(root.glob("epoch-*/bertswarm.json")).read_text())["eval_metrics"]
    assert ours["mlm_loss"] == pytest.approx(recorded["mlm_loss"], rel=1e-6)


def test_the_module_entry_point_answers_bad_input_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "peer.finetune", "--init-from", str(tmp_path / "nope"), "--data", "x.jsonl",
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "bertswarm-finetune: error: --data x.jsonl: no such file; pass .jsonl or .csv files with a text and a label "
        "per record"
    ]
    assert not (tmp_path / "out").exists()
