"""A real peer on a prepared dataset: it skips corrupt shards (counted), saves its data position, the run pins the
dataset (a joiner with other data is refused in one line), the coordinator evaluates on its held-out split; plain text
goes through the same preparation, into the cache."""

from __future__ import annotations

import json
import signal

import pytest
from safetensors import safe_open
from transformers import AutoModelForMaskedLM

from peer.data.prepare import prepare_dataset
from peer.data.shards import PreparedDataset
from peer.data.stream import prepared_heldout_batches
from peer.data.tokenizer import TokenizerInfo, default_tokenizer
from peer.finetune.metrics import evaluate_mlm

from .conftest import FAST, Swarm


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_corpus) -> PreparedDataset:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_dataset([str(small_corpus)], out, default_tokenizer(), seq_len=64, shard_chars=20_000)
    dataset = PreparedDataset.open(out)
    for entry in dataset.index.shards[:2]:  # two corrupt shards: a flipped byte, a truncated file
        path = out / entry.name
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data) if entry is dataset.index.shards[0] else bytes(data[: len(data) // 2]))
    return dataset


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_peer_trains_on_prepared_shards_and_the_run_pins_them(tmp_path, prepared, small_corpus):
    swarm = Swarm(tmp_path, prepared.path)
    text_swarm = Swarm(tmp_path, small_corpus)
    try:
        first = swarm.start("first")
        first.wait_for_join_address(timeout=60)

        # small shards: a few global steps read every shard, so both corrupt ones are met and skipped once
        def skipped_both_and_stepped() -> bool:
            return swarm.metric(first, "bertswarm_peer_skipped_shards_total") == 2 and swarm.epoch(first) >= 1

        swarm.wait_until("both corrupt shards skipped", skipped_both_and_stepped, timeout=90)

        joiner = text_swarm.start("joiner", join=first)
        assert joiner.wait(timeout=60) == 2
        refusal = joiner.log_tail(5)
        assert f"data_fingerprint (from --data): run has '{prepared.fingerprint}', you asked for None" in refusal
        assert "Traceback" not in refusal

        # the coordinator evaluates on the prepared held-out split: its figures are reproducible from that split
        ckpt = tmp_path / "ckpt"
        coordinator = swarm.start_coordinator("coord", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1",
                                              "--tick", "1", "--eval-batches", "2", join=first)  # fmt: skip
        swarm.wait_until("a checkpoint", lambda: (ckpt / "latest" / "bertswarm.json").exists(), timeout=90)
        published = (ckpt / "latest").resolve()  # one checkpoint: latest moves on every second
        meta = json.loads((published / "bertswarm.json").read_text())
        model = AutoModelForMaskedLM.from_pretrained(published)
        batches = prepared_heldout_batches(prepared, TokenizerInfo.of(default_tokenizer()), batch_size=16, seed=0,
                                           max_batches=2)  # fmt: skip
        again = evaluate_mlm(model, batches)
        assert again["mlm_loss"] == pytest.approx(meta["eval_metrics"]["mlm_loss"], abs=1e-4)
        assert again["mlm_accuracy"] == pytest.approx(meta["eval_metrics"]["mlm_accuracy"], abs=1e-6)
        coordinator.stop(timeout=20)

        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        with safe_open(first.state_dir / "state.safetensors", framework="pt") as f:
            position = json.loads(f.metadata()["data_position"])
        assert position["dataset"] == prepared.fingerprint
        assert position["shard"] not in {entry.name for entry in prepared.index.shards[:2]}
    finally:
        swarm.close()
        text_swarm.close()


@pytest.mark.swarm
@pytest.mark.timeout(150)
def test_text_trains_through_the_cache_and_a_joiner_prepares_for_the_runs_settings(tmp_path, small_corpus):
    """--data with plain text: prepared once into the cache (not pinned in the manifest); a joiner whose own
    default --seq-len (128) differs from the run's (64) prepares again for the run's and trains on it."""
    swarm = Swarm(tmp_path, small_corpus)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    try:
        first = swarm.start("first", env=env)
        first.wait_for_join_address(timeout=60)
        at = FAST.index("--seq-len")
        joiner = swarm.start("joiner", *FAST[:at], *FAST[at + 2 :], join=first, fast=False, env=env)
        swarm.wait_until("the joiner steps", lambda: swarm.epoch(joiner) >= 1, timeout=90)
        first_log, joiner_log = first.log_tail(200), joiner.log_tail(200)
        assert "preparing" in first_log
        # the joiner prepared for its own 128 before it knew the run, then used the first peer's 64 from the cache
        assert joiner_log.count("preparing") == 1 and "prepared earlier" in joiner_log
        datasets = sorted(p.name for p in (tmp_path / "cache" / "bertswarm" / "prepared").iterdir() if p.is_dir())
        assert len(datasets) == 2
        assert swarm.metric(joiner, "bertswarm_peer_skipped_shards_total") == 0
    finally:
        swarm.close()
