"""``bertswarm-finetune --swarm`` / ``--join``: two real processes fine-tune one base checkpoint together, each on its
own half of the offline topics set, and a third whose base checkpoint differs is refused in one line.

The data: two of the topics set's classes (``hivemind`` and ``python`` paragraphs, ``peer.finetune.labelled``), so
that the tiny model, from a checkpoint of random weights, beats the majority class within the 36 global steps a
one-minute test affords (all four classes need about three times as many steps; ``test_finetune.py`` shows them on
one machine). Both peers validate on the same split, so with averaged weights they score the same at every epoch;
``--patience`` above ``--epochs`` keeps both to the end of the run.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from peer.config import PeerConfig
from peer.data.tokenizer import default_tokenizer, tokenizer_fingerprint
from peer.finetune import cli, labelled
from peer.finetune.swarm import JOIN_PREFIX
from peer.localswarm import LocalPeer
from peer.run.manifest import from_config
from peer.run.model import build_model
from peer.store.checkpoint import write_checkpoint

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(240)]

CLASSES = ("hivemind", "python")
# a step every ~1 s on loopback: small global batches, matchmaking well under a second
SETTINGS = ["--max-length", "32", "--batch-size", "8", "--threads", "1", "--patience", "20", "--matchmaking-time",
            "0.5", "--averaging-timeout", "10", "--startup-timeout", "60"]  # fmt: skip
RUN = ["--min-peers", "2", "--epochs", "6", "--target-batch-size", "16", "--lr", "3e-3", "--task", "topics-2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Each peer's half of the training split, the shared validation split, and two base checkpoints (random tiny
    weights of two seeds, written by the product's checkpoint writer)."""
    root = tmp_path_factory.mktemp("finetune-swarm")
    labelled.write_topics(root / "topics", per_class=120)
    records = {split: [json.loads(line) for line in (root / "topics" / f"{split}.jsonl").open()]
               for split in ("train", "validation")}  # fmt: skip
    train = [r for r in records["train"] if r["label"] in CLASSES]
    for half in (0, 1):
        lines = (json.dumps(r) + "\n" for i, r in enumerate(train) if i % 2 == half)
        (root / f"train-{half}.jsonl").write_text("".join(lines))
    validation = (json.dumps(r) + "\n" for r in records["validation"] if r["label"] in CLASSES)
    (root / "validation.jsonl").write_text("".join(validation))
    tok = default_tokenizer()
    run = from_config(PeerConfig(seq_len=64).validate(), "ft-base", tokenizer_fingerprint(tok), tok.get_vocab_size())
    for seed in (0, 1):
        model = build_model(run.model, nsp=False, seed=seed)
        write_checkpoint(root / f"base-{seed}", model, tok, run, epoch=3, samples_seen=0, eval_metrics={})
    return root


def start(name: str, workdir, inputs, base: int, half: int, *args: str) -> LocalPeer:
    argv = ["--init-from", str(inputs / f"base-{base}"), "--data", str(inputs / f"train-{half}.jsonl"),
            "--validation", str(inputs / "validation.jsonl"), "--output", str(workdir / f"out-{name}"), *SETTINGS,
            *args]  # fmt: skip
    return LocalPeer(name, workdir, argv, module="peer.finetune")


def join_address(peer: LocalPeer, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(peer.stdout_lines):
            if line.startswith(JOIN_PREFIX):
                return line[len(JOIN_PREFIX) :].strip()
        if not peer.alive():
            break
        time.sleep(0.2)
    raise AssertionError(f"{peer.name} printed no join line (exit {peer.proc.poll()}):\n{peer.log_tail()}")


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.float() ** 2).sum() for t in tensors.values())))


def test_two_peers_fine_tune_together_and_another_base_is_refused(tmp_path, inputs):
    peers = []
    try:
        creator = start("creator", tmp_path, inputs, 0, 0, "--swarm", *RUN)
        peers.append(creator)
        address = join_address(creator, timeout=90)
        volunteer = start("volunteer", tmp_path, inputs, 0, 1, "--join", address)
        outsider = start("outsider", tmp_path, inputs, 1, 1, "--join", address)
        peers += [volunteer, outsider]

        assert outsider.wait(timeout=90) == 2, outsider.log_tail()
        refusal = [line for line in outsider.log_path.read_text().splitlines() if "error" in line.lower()]
        assert len(refusal) == 1 and "Traceback" not in outsider.log_path.read_text(), outsider.log_tail()
        assert refusal[0].startswith("bertswarm-finetune: error: --init-from: run bertswarm-finetune fine-tunes "
                                     "the checkpoint with weights sha256 "), refusal[0]  # fmt: skip
        assert not (tmp_path / "out-outsider").exists()

        for peer in (creator, volunteer):
            assert peer.wait(timeout=150) == 0, peer.log_tail()
    finally:
        for peer in peers:
            peer.stop(timeout=15)

    outputs = [tmp_path / "out-creator", tmp_path / "out-volunteer"]
    for output, peer in zip(outputs, (creator, volunteer), strict=True):
        metrics = json.loads((output / cli.METRICS_FILE).read_text())
        assert metrics["labels"] == list(CLASSES) and metrics["swarm"]["manifest"]["task"] == "topics-2"
        assert metrics["swarm"]["global_step"] == 36 and metrics["swarm"]["rounds"].get("success", 0) >= 5, metrics
        assert metrics["validation"]["accuracy"] > metrics["majority_baseline"]["accuracy"], metrics["history"]
        assert any(line.startswith("epoch 6 (global step 36)") for line in peer.stdout_lines), peer.stdout_lines
        model, loading = AutoModelForSequenceClassification.from_pretrained(output, output_loading_info=True)
        assert not any(loading.values()), loading
        assert model.config.id2label == dict(enumerate(CLASSES))

    # they averaged: the two peers' weights are far closer to each other than to where they started
    first, second = weights(outputs[0]), weights(outputs[1])
    base = {k: v for k, v in weights(inputs / "base-0" / "epoch-000003").items() if k in first}
    apart = norm({k: first[k] - second[k] for k in first})
    moved = norm({k: first[k] - base[k] for k in base})
    assert moved > 1.0 and apart < 0.05 * moved, (apart, moved)
