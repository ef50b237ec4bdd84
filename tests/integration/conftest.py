"""Harness for real multi-process swarms on 127.0.0.1: launch peers, read their metrics, always reap them."""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peer.localswarm import LocalPeer

# Small, fast swarm settings: a step every few seconds on 2 cores, warm-up off so the loss moves at once.
FAST = [
    "--preset", "tiny", "--threads", "1", "--batch-size", "8", "--target-batch-size", "192", "--seq-len", "64",
    "--warmup-steps", "0", "--lr", "2e-3", "--matchmaking-time", "3", "--averaging-timeout", "15",
    "--log-every", "1", "--save-every", "0", "--startup-timeout", "60",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_small_corpus(path: Path) -> Path:
    """~300 kB of the embedded corpus as a .txt file: quick to tokenise in every peer process."""
    from peer.data.embedded import default_corpus

    docs, size = [], 0
    for doc in default_corpus():
        docs.append(doc)
        size += len(doc)
        if size > 300_000:
            break
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return write_small_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


class Swarm:
    """Peers launched by one test; ``close`` stops and reaps every one of them."""

    def __init__(self, workdir: Path, corpus: Path):
        self.workdir, self.corpus = workdir, corpus
        self.peers: list[LocalPeer] = []
        self.ports: dict[str, int] = {}

    def start(
        self, name: str, *args: str, join: LocalPeer | None = None, fast: bool = True, env: dict | None = None
    ) -> LocalPeer:
        port = free_port()
        argv = [*(FAST if fast else []), "--data", str(self.corpus), "--metrics-port", str(port), *args]
        if join is not None:
            argv += ["--join", join.join_address]
        peer = LocalPeer(name, self.workdir, argv, env=env)
        self.peers.append(peer)
        self.ports[name] = port
        return peer

    def start_coordinator(self, name: str, *args: str, join: LocalPeer) -> LocalPeer:
        port = free_port()
        argv = ["--join", join.join_address, "--http-port", str(port), "--data", str(self.corpus), *args]
        coordinator = LocalPeer(name, self.workdir, argv, module="coordinator")
        self.peers.append(coordinator)
        self.ports[name] = port
        return coordinator

    def metric(self, peer: LocalPeer, name: str, labels: str = "") -> float:
        """Current value of one metric sample of ``peer`` (``labels`` like ``outcome="success"``)."""
        text = peer.metrics(self.ports[peer.name])
        pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+|NaN)"
        match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
        if match is None:
            raise KeyError(f"{name}{{{labels}}} not in metrics of {peer.name}")
        return float(match.group(1))

    def wait_until(self, what: str, predicate, timeout: float, interval: float = 0.5):
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            for peer in self.peers:
                if peer.proc.poll() not in (None, 0) and peer.proc.poll() != -9:
                    raise AssertionError(f"{peer.name} died with {peer.proc.poll()}:\n{peer.log_tail()}")
            try:
                value = predicate()
                if value:
                    return value
            except (OSError, KeyError) as e:  # metrics endpoint not up yet
                last_error = e
            time.sleep(interval)
        logs = "\n".join(f"--- {p.name}\n{p.log_tail(15)}" for p in self.peers)
        raise AssertionError(f"timed out waiting for {what} (last error: {last_error})\n{logs}")

    def epoch(self, peer: LocalPeer) -> int:
        return int(self.metric(peer, "bertswarm_peer_epoch"))

    def wait_clear_of_state_averaging(self, peer: LocalPeer, timeout: float = 120) -> None:
        """Wait until neither of ``peer``'s next two steps is a state-averaging one (every ``STATE_AVERAGING_EVERY``).
        A stop signal during such a step took 15-23 s to end: hivemind began the state round after the signal had
        cancelled the gradient round, and waited for a group. A stopping peer now begins none
        (``SwarmOptimizer.state_round_wanted``, ``test_hivemind_compat::test_a_stopping_peer_begins_no_state_averaging_
        round``); the stop tests that time the general path still send their signal away from it, as measured."""
        from peer.swarm.optim import STATE_AVERAGING_EVERY

        deadline = time.monotonic() + timeout
        while any((self.epoch(peer) + ahead) % STATE_AVERAGING_EVERY == 0 for ahead in (1, 2)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{peer.name} stayed at step {self.epoch(peer)} for {timeout:.0f}s")
            time.sleep(0.05)

    def close(self) -> None:
        for peer in self.peers:  # all at once: each takes seconds to save and leave
            if not peer.signalled:
                peer.send_signal(signal.SIGTERM)
        for peer in self.peers:
            peer.stop(timeout=15)


@pytest.fixture
def swarm(tmp_path, small_corpus):
    s = Swarm(tmp_path, small_corpus)
    try:
        yield s
    finally:
        s.close()


def saved_state(peer: LocalPeer) -> tuple[dict[str, torch.Tensor], int]:
    """(model tensors, epoch) from a peer's state dir after it left."""
    from safetensors import safe_open

    path = peer.state_dir / "state.safetensors"
    with safe_open(path, framework="pt") as f:
        epoch = int(f.metadata()["epoch"])
    tensors = load_file(path)
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}, epoch


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
