"""A real peer on a prepared dataset: it skips corrupt shards (counted), saves its data position, the run pins the
dataset (a joiner with other data is refused in one line)."""

from __future__ import annotations

import json
import signal

import pytest
from safetensors import safe_open

from peer.data.prepare import prepare_dataset
from peer.data.shards import PreparedDataset
from peer.data.tokenizer import default_tokenizer

from .conftest import Swarm


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
@pytest.mark.timeout(150)
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

        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        with safe_open(first.state_dir / "state.safetensors", framework="pt") as f:
            position = json.loads(f.metadata()["data_position"])
        assert position["dataset"] == prepared.fingerprint
        assert position["shard"] not in {entry.name for entry in prepared.index.shards[:2]}
    finally:
        swarm.close()
        text_swarm.close()
