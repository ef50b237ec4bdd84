"""Real swarms of ``bertswarm-peer`` processes on 127.0.0.1: training, agreement, client mode. Crashes, joiners,
stalls and lying peers are in the fault suite (``tests/faults``)."""

from __future__ import annotations

import signal

import pytest
import torch

from peer.data.batches import heldout_batches
from peer.data.corpus import load_documents, split_heldout
from peer.data.tokenizer import default_tokenizer
from peer.run.model import build_model
from peer.swarm.optim import STATE_AVERAGING_EVERY

from .conftest import max_abs_diff, saved_state

# Peers that took the same averaged steps hold bitwise-equal weights (butterfly all-reduce hands every peer the same
# averaged gradient); 1e-6 leaves room for a parameter-averaging round that finished on one peer before it left.
PARAM_TOLERANCE = 1e-6

pytestmark = pytest.mark.swarm


def heldout_loss(corpus, tensors: dict[str, torch.Tensor] | None) -> float:
    """MLM loss on held-out text that no peer trained on, for the given weights (None: initial weights)."""
    from peer.config import PeerConfig
    from peer.data.tokenizer import tokenizer_fingerprint
    from peer.run.manifest import from_config

    tok = default_tokenizer()
    manifest = from_config(PeerConfig(seq_len=64).validate(), "bertswarm", tokenizer_fingerprint(tok),
                           tok.get_vocab_size())  # fmt: skip
    model = build_model(manifest.model, nsp=False, seed=manifest.init_seed)
    if tensors is not None:
        model.load_state_dict(tensors, strict=False)
    model.eval()
    _, heldout = split_heldout(load_documents([str(corpus)]))
    batches = heldout_batches(heldout, tok, seq_len=64, batch_size=16, max_batches=4)
    with torch.no_grad():
        return sum(model(**b).loss.item() for b in batches) / len(batches)


# Peers that start together take bit-identical averaged steps (see test_equivalence). A joiner copies a live peer's
# weights and Adam moments while that peer trains and can start marginally off (a race inside hivemind's state
# sharing); the synchronous parameter averaging every STATE_AVERAGING_EVERY steps brings every peer back to the same
# weights, so agreement is checked at such a step: the second, not the first. The joiners arrive around step 6 and, on
# busy cores, can still be settling at step 10 (one loaded the state twice, reached step 9 three seconds after the
# others and missed their last round; they had left, so it stepped alone and ended apart)
FINAL_STEP = 2 * STATE_AVERAGING_EVERY


@pytest.mark.timeout(300)
def test_three_peers_train_agree_and_leave_cleanly(swarm):
    """3 peers train to the same global step, hold identical weights, held-out loss falls, all exit 0."""
    first = swarm.start("a", "--max-steps", str(FINAL_STEP))
    first.wait_for_join_address(60)
    others = [swarm.start(name, "--max-steps", str(FINAL_STEP), join=first) for name in ("b", "c")]
    for peer in [first, *others]:
        assert peer.wait(timeout=240) == 0, peer.log_tail()

    states = [saved_state(peer) for peer in swarm.peers]
    assert [epoch for _, epoch in states] == [FINAL_STEP] * 3
    diffs = [max_abs_diff(states[0][0], tensors) for tensors, _ in states[1:]]
    print(f"max |w_a - w_b|, |w_a - w_c| = {diffs}")
    assert max(diffs) <= PARAM_TOLERANCE

    before, after = heldout_loss(swarm.corpus, None), heldout_loss(swarm.corpus, states[0][0])
    print(f"held-out MLM loss: {before:.3f} -> {after:.3f}")
    assert after < before - 0.2

    for peer in swarm.peers:
        log = peer.log_path.read_text()
        assert "Traceback" not in log, log[-3000:]
        assert "bertswarm-peer --join /ip4/127.0.0.1/tcp/" in "\n".join(peer.stdout_lines)


@pytest.mark.timeout(300)
def test_client_mode_peer_behind_nat_trains_through_others(swarm):
    """A peer that accepts no inbound connections still downloads state and averages through the others."""
    a = swarm.start("a")
    a.wait_for_join_address(60)
    b = swarm.start("b", join=a)
    client = swarm.start("client", "--client-mode", join=a)
    success = 'outcome="success"'
    swarm.wait_until(
        "the client-mode peer to average with the others",
        lambda: swarm.metric(client, "bertswarm_peer_averaging_rounds_total", success) >= 2,
        timeout=200,
    )
    assert swarm.epoch(client) >= swarm.epoch(a) - 1
    for peer in (a, b, client):
        peer.send_signal(signal.SIGTERM)
    for peer in (a, b, client):
        assert peer.wait(timeout=30) == 0, peer.log_tail()
