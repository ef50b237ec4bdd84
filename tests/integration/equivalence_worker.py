"""One peer of the equivalence test: the product's own ``peer.trainer.Trainer`` (its ``step``: forward, backward,
finite check, ``SwarmOptimizer.step``) on deterministic micro-batches, recording which of them went into which global
step.

Usage: python equivalence_worker.py INDEX STEPS OUT_DIR [JOIN_ADDRESS]
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import torch
from hivemind.utils import ValueWithExpiration, get_dht_time
from safetensors.torch import save_file

from peer import logs
from peer.config import PeerConfig
from peer.data.tokenizer import default_tokenizer
from peer.run.manifest import RunManifest
from peer.store.state import StateDir
from peer.swarm import records
from peer.swarm.dht import join_addresses, start_dht, stop_dht
from peer.telemetry import PeerTelemetry
from peer.trainer import Prepared, Trainer

BATCH_SIZE, SEQ_LEN = 4, 16
COMPUTE_SECONDS = 0.3  # a real model's batch takes this long; lets hivemind's progress tracker see both peers
MANIFEST = RunManifest(
    run_id="equivalence",
    preset="tiny",
    model=dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
    tokenizer_fingerprint="0" * 64,
    seq_len=SEQ_LEN,
    mlm_probability=0.15,
    nsp=False,
    target_batch_size=32,
    optimizer="adamw",
    lr=3e-3,
    weight_decay=0.01,
    max_grad_norm=1.0,
    warmup_steps=2,
    total_steps=50,
)


def make_batch(peer: int, index: int) -> dict[str, torch.Tensor]:
    """Micro-batch ``index`` of peer ``peer``: the same tensors in the worker and in the test's reference."""
    g = torch.Generator().manual_seed(1_000_003 * (peer + 1) + index)
    vocab = MANIFEST.model.vocab_size
    input_ids = torch.randint(5, vocab, (BATCH_SIZE, SEQ_LEN), generator=g)
    selected = torch.rand(BATCH_SIZE, SEQ_LEN, generator=g) < 0.3
    selected[:, 0] = True
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    masked = torch.where(selected, torch.full_like(input_ids, 4), input_ids)
    return dict(input_ids=masked, attention_mask=torch.ones_like(input_ids), labels=labels)


class RecordingTrainer(Trainer):
    """The product's trainer; only its optimizer callbacks also record each round's outcome and each state load."""

    events = {"rounds": [], "state_loads": 0}

    def _on_round(self, outcome: str, group_size: int, seconds: float) -> None:
        super()._on_round(outcome, group_size, seconds)
        self.events["rounds"].append([outcome, group_size])

    def _on_state_loaded(self, seconds: float) -> None:
        super()._on_state_loaded(seconds)
        self.events["state_loads"] += 1


def main() -> None:
    index, steps, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    # warnings to stderr (the worker's log file), and the debug lines of the loggers the test names in
    # BERTSWARM_DEBUG_LOGGERS (hivemind's all-reduce: why it dropped a reducer or sender)
    logs.setup(quiet=True)
    cfg = PeerConfig(
        join=sys.argv[4:5], state_dir=str(out / f"state-{index}"), matchmaking_time=1.0, averaging_timeout=20.0,
        batch_size=BATCH_SIZE, device="cpu", threads=1, save_every=0, seed=index,
    ).validate()  # fmt: skip
    dht = start_dht(cfg, records.registry_validators())
    dht.add_validators(records.run_validators(MANIFEST.run_id)[0])
    print("ADDRESS", join_addresses(dht)[0], flush=True)
    prepared = Prepared(StateDir(cfg.state_path), default_tokenizer(), PeerTelemetry(), None)
    batches = (make_batch(index, k) for k in itertools.count())
    trainer = RecordingTrainer(cfg, prepared, dht, MANIFEST, batches=batches)
    try:
        train(index, steps, out, trainer)
    finally:
        trainer.close()
        stop_dht(dht)
        prepared.state_dir.close()


def train(index: int, steps: int, out: Path, trainer: RecordingTrainer) -> None:
    # start together: a lone peer would step solo (hivemind's tracker only sees peers that have samples)
    dht = trainer.dht
    dht.store("equivalence_ready", True, get_dht_time() + 300, subkey=index)
    deadline = time.monotonic() + 60
    while len((dht.get("equivalence_ready", latest=True) or ValueWithExpiration({}, 0)).value) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the other worker never showed up")
        time.sleep(0.1)
    contributions: dict[int, list[int]] = {}
    pending: list[int] = []
    k = 0
    while trainer.opt.local_epoch < steps:
        time.sleep(COMPUTE_SECONDS)
        epoch, loads = trainer.opt.local_epoch, trainer.events["state_loads"]
        trainer.step()  # micro-batch k
        if trainer.events["state_loads"] != loads:
            pending = []  # local progress was discarded while catching up
        else:
            pending.append(k)
            if trainer.opt.local_epoch > epoch:
                contributions[epoch] = pending
                pending = []
        k += 1
    params = {name: p.detach().clone().contiguous() for name, p in trainer.model.named_parameters()}
    save_file(params, str(out / f"params-{index}.safetensors"))
    (out / f"record-{index}.json").write_text(json.dumps({"contributions": contributions, **trainer.events}))


if __name__ == "__main__":
    main()
