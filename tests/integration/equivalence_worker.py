"""One peer of the equivalence test: trains a small BERT on deterministic batches through the product's optimizer
(``peer.optim.make_optimizer``) and records which of its micro-batches went into which global step.

Usage: python equivalence_worker.py INDEX STEPS OUT_DIR [JOIN_ADDRESS]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from hivemind.utils import ValueWithExpiration, get_dht_time
from safetensors.torch import save_file

from peer.config import PeerConfig
from peer.run.manifest import RunManifest
from peer.run.model import build_model
from peer.swarm.dht import join_addresses, start_dht
from peer.swarm.optim import make_optimizer

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
    vocab = MANIFEST.model["vocab_size"]
    input_ids = torch.randint(5, vocab, (BATCH_SIZE, SEQ_LEN), generator=g)
    selected = torch.rand(BATCH_SIZE, SEQ_LEN, generator=g) < 0.3
    selected[:, 0] = True
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    masked = torch.where(selected, torch.full_like(input_ids, 4), input_ids)
    return dict(input_ids=masked, attention_mask=torch.ones_like(input_ids), labels=labels)


def main() -> None:
    index, steps, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    join = sys.argv[4:5]
    cfg = PeerConfig(join=join, state_dir=str(out / f"state-{index}"), matchmaking_time=1.0, averaging_timeout=20.0)
    dht = start_dht(cfg)
    print("ADDRESS", join_addresses(dht)[0], flush=True)
    torch.set_num_threads(1)
    model = build_model(MANIFEST.model, nsp=False, seed=MANIFEST.init_seed)
    events = {"rounds": [], "state_loads": 0}
    opt = make_optimizer(
        model, MANIFEST, dht, batch_size=BATCH_SIZE, matchmaking_time=1.0, averaging_timeout=20.0,
        on_round=lambda outcome, size, seconds: events["rounds"].append([outcome, size]),
        on_state_loaded=lambda seconds: events.__setitem__("state_loads", events["state_loads"] + 1),
    )  # fmt: skip
    try:
        train(index, steps, out, model, opt, events)
    finally:
        opt.shutdown()
        dht.shutdown()


def train(index, steps, out, model, opt, events) -> None:
    # start together: a lone peer would step solo (hivemind's tracker only sees peers that have samples)
    opt.dht.store("equivalence_ready", True, get_dht_time() + 300, subkey=index)
    deadline = time.monotonic() + 60
    while len((opt.dht.get("equivalence_ready", latest=True) or ValueWithExpiration({}, 0)).value) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the other worker never showed up")
        time.sleep(0.1)
    contributions: dict[int, list[int]] = {}
    pending: list[int] = []
    k = 0
    while opt.local_epoch < steps:
        time.sleep(COMPUTE_SECONDS)
        loss = model(**make_batch(index, k)).loss
        loss.backward()
        epoch, loads = opt.local_epoch, events["state_loads"]
        opt.step()
        opt.zero_grad()
        if events["state_loads"] != loads:
            pending = []  # local progress was discarded while catching up
        else:
            pending.append(k)
            if opt.local_epoch > epoch:
                contributions[epoch] = pending
                pending = []
        k += 1
    params = {name: p.detach().clone().contiguous() for name, p in model.named_parameters()}
    save_file(params, str(out / f"params-{index}.safetensors"))
    (out / f"record-{index}.json").write_text(json.dumps({"contributions": contributions, **events}))


if __name__ == "__main__":
    main()
