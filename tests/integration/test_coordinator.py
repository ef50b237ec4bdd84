"""The coordinator against a live swarm: its metrics agree with the peers, its checkpoints hold the swarm's weights
and load in transformers. Killing it mid-checkpoint is a scenario of the fault suite (``tests/faults``)."""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

from peer.store.atomic import atomic_write_text
from tests.binaries import require_binary

from .conftest import saved_state

pytestmark = pytest.mark.swarm


def get_json(swarm, coordinator, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{swarm.ports[coordinator.name]}{path}", timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.timeout(420)
def test_coordinator_metrics_checkpoints_and_restart(swarm, tmp_path, monkeypatch):
    pause = tmp_path / "pause"
    env = {"BERTSWARM_TEST_PAUSE_FILE": str(pause)}
    a = swarm.start("a", env=env)
    a.wait_for_join_address(60)
    b = swarm.start("b", join=a, env=env)
    ckpt = tmp_path / "ckpt"
    args = [
        "--checkpoint-dir",
        str(ckpt),
        "--checkpoint-every",
        "1",
        "--tick",
        "1",
        "--eval-batches",
        "2",
        "--keep",
        "3",
    ]
    coord = swarm.start_coordinator("coord", *args, join=a)

    # 1. swarm metrics agree with what the peers say about themselves
    sees_both = lambda: get_json(swarm, coord, "/status")["swarm"]["peers"] == 2  # noqa: E731
    swarm.wait_until("the coordinator to see both peers", sees_both, timeout=120)
    status = get_json(swarm, coord, "/status")["swarm"]
    epochs = [swarm.epoch(a), swarm.epoch(b)]
    assert min(epochs) - 1 <= status["epoch"] <= max(epochs) + 1
    peer_samples = swarm.metric(a, "bertswarm_peer_samples_total") + swarm.metric(b, "bertswarm_peer_samples_total")
    assert 0 < status["samples"] <= peer_samples
    assert status["samples_per_second"] > 0 and 1.0 < status["loss"] < 12.0
    assert swarm.metric(coord, "bertswarm_swarm_peers") == 2
    promtool_check_metrics(a.metrics(swarm.ports["a"]))
    promtool_check_metrics(coord.metrics(swarm.ports["coord"]))

    # 2. a checkpoint is published (killing the coordinator mid-checkpoint is in tests/faults)
    swarm.wait_until("a first checkpoint", lambda: len(get_json(swarm, coord, "/checkpoints")) >= 1, timeout=150)

    # 3. hold the swarm still at one step: the checkpoint of that step holds exactly the peers' weights. The pause
    # names the step: an empty pause file that appears mid-round can hold one peer before its step and the other after
    held = max(swarm.epoch(a), swarm.epoch(b)) + 1
    atomic_write_text(pause, f"{held}\n")
    # (a step that is merely slow, such as a state-averaging one on busy cores, is not a hold: wait for the step itself)
    swarm.wait_until(f"the peers to hold at step {held}", lambda: swarm.epoch(a) == swarm.epoch(b) == held, timeout=90)
    assert _stable_epoch(swarm, a, b)
    swarm.wait_until("a checkpoint of the held step", lambda: _checkpoint_epoch(swarm, coord) == held, timeout=120)
    listing = get_json(swarm, coord, "/checkpoints")
    assert len(listing) <= 3 and listing[0]["epoch"] == held
    for peer in (a, b):
        peer.send_signal(signal.SIGTERM)
        assert peer.wait(timeout=30) == 0, peer.log_tail()
    path = ckpt / listing[0]["name"]
    weights = load_file(str(path / "model.safetensors"))
    diffs = []
    for peer in (a, b):
        tensors, epoch = saved_state(peer)
        assert epoch == held
        diffs.append(max((weights[k].float() - tensors[k].float()).abs().max().item() for k in tensors if k in weights))
    print(f"checkpoint at step {held}: max |checkpoint - peer| = {diffs}")
    assert min(diffs) <= 1e-6

    # 4. it is a Hugging Face checkpoint: loads, fills masks, and its eval numbers are reproducible from the files
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    from coordinator.snapshot import evaluate
    from peer.data.batches import heldout_batches
    from peer.data.corpus import load_documents, split_heldout
    from peer.data.tokenizer import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForMaskedLM.from_pretrained(path)
    fill = pipeline("fill-mask", model=model, tokenizer=AutoTokenizer.from_pretrained(path))
    assert len(fill("the function returns a [MASK] of the input.")) == 5
    meta = json.loads((path / "bertswarm.json").read_text())
    manifest = meta["manifest"]
    _, heldout = split_heldout(load_documents([str(swarm.corpus)]))
    batches = heldout_batches(heldout, load_tokenizer(path), seq_len=manifest["seq_len"], batch_size=16, seed=0,
                              max_batches=2)  # fmt: skip
    again = evaluate(model, batches)
    assert again["mlm_loss"] == pytest.approx(meta["eval_metrics"]["mlm_loss"], abs=1e-4)
    assert again["mlm_accuracy"] == pytest.approx(meta["eval_metrics"]["mlm_accuracy"], abs=1e-6)
    assert torch.isfinite(torch.tensor(again["mlm_loss"]))

    # 5. a swarm restarted from zero starts from the checkpoint; a checkpoint of another run is refused
    restarted = swarm.start("restarted", "--init-from", str(path), "--max-steps", str(held + 1))
    assert restarted.wait(timeout=120) == 0, restarted.log_tail()
    assert f"starting from checkpoint {path} (step {held})" in restarted.log_path.read_text()
    assert saved_state(restarted)[1] == held + 1
    other = swarm.start("other-run", "--init-from", str(path), "--lr", "1e-4")
    assert other.wait(timeout=120) == 2
    assert "--init-from" in other.log_path.read_text() and "checkpoint of another run" in other.log_path.read_text()


def promtool_check_metrics(text: str) -> None:
    """``promtool check metrics`` (Debian's prometheus package; .ci/run installs it) must accept the exposition."""
    import subprocess

    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def _checkpoint_epoch(swarm, coord) -> int:
    last = get_json(swarm, coord, "/status")["last_checkpoint"]
    return -1 if last is None else last["epoch"]


def _stable_epoch(swarm, a, b) -> bool:
    import time

    first = (swarm.epoch(a), swarm.epoch(b))
    time.sleep(3)
    return first == (swarm.epoch(a), swarm.epoch(b)) and first[0] == first[1]
