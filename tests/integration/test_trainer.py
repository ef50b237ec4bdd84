"""One real peer in-process (its own DHT and p2pd on loopback): batch hygiene, telemetry, the DHT metrics record."""

from __future__ import annotations

import math
import urllib.request

import pytest
import torch

from peer import join
from peer.data.tokenizer import tokenizer_fingerprint
from peer.swarm import dht as swarm
from peer.swarm import records
from peer.swarm.records import read_swarm_metrics
from peer.trainer import Trainer, prepare

from .conftest import FAST


@pytest.fixture
def solo_trainer(tmp_path, small_corpus):
    from peer.cli import parse_config

    cfg, explicit = parse_config([*FAST, "--data", str(small_corpus), "--state-dir", str(tmp_path / "s"),
                                  "--metrics-port", "0"], environ={})  # fmt: skip
    prepared = prepare(cfg)
    dht = swarm.start_dht(cfg, records.registry_validators())
    trainer = None
    try:
        tok = prepared.tokenizer
        joined = join.resolve(dht, cfg, explicit, tokenizer_fingerprint(tok), tok.get_vocab_size())
        trainer = Trainer(cfg, prepared, dht, joined.manifest, signed_manifest=joined.signed)
        yield trainer, prepared
    finally:
        if trainer is not None:
            trainer.close()
        swarm.stop_dht(dht)
        prepared.telemetry.close()
        prepared.state_dir.close()


@pytest.mark.timeout(120)
def test_non_finite_batch_is_dropped_before_it_reaches_the_swarm(solo_trainer):
    trainer, _ = solo_trainer
    before = [p.detach().clone() for p in trainer.model.parameters()]
    poison = trainer.model.bert.embeddings.register_forward_hook(lambda module, args, out: out * math.nan)
    trainer.step()
    poison.remove()

    assert trainer.telemetry.skipped.labels("nonfinite")._value.get() == 1
    assert trainer.opt.grad_averager.local_samples_accumulated == 0  # nothing was accumulated for averaging
    assert trainer.opt.tracker.local_progress.samples_accumulated == 0  # nor reported to the swarm
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))

    trainer.step()  # the next, healthy batch is accumulated as usual
    assert trainer.opt.grad_averager.local_samples_accumulated == trainer.batch_size
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.timeout(120)
def test_metrics_endpoint_and_signed_dht_record(solo_trainer):
    trainer, prepared = solo_trainer
    for _ in range(3):
        trainer.step()
    trainer.report(force=True)
    trainer.publisher.close()

    with urllib.request.urlopen(f"http://127.0.0.1:{prepared.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for name in ("bertswarm_peer_epoch", "bertswarm_peer_loss", "bertswarm_peer_samples_per_second",
                 "bertswarm_peer_samples_total", 'bertswarm_peer_averaging_rounds_total{outcome="success"}',
                 "bertswarm_peer_swarm_size"):  # fmt: skip
        assert name in text
    assert "bertswarm_peer_samples_total 24.0" in text

    records = read_swarm_metrics(trainer.dht, trainer.run.run_id)
    assert len(records) == 1
    (record,) = records.values()
    assert record.samples_total == 24 and record.mini_steps == 3 and 5.0 < record.loss < 12.0
