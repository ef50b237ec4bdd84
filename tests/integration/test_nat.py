"""Two peers behind two different NATs average with each other through a relay (issue 16).

Three ``bertswarm-peer`` processes in network namespaces (``bench/netns.py``): a public peer that starts the run and
two peers, each behind its own masquerading router, that cannot dial each other nor be dialled. Every peer runs with
the default ``--relay auto``: the public peer finds its public address and serves as a relay; the private peers find
that they reach a public swarm from private addresses, reserve a slot on it and are dialled through it.

The public peer takes no steps (``BERTSWARM_TEST_PAUSE_FILE``): it starts the run, serves the first state and relays,
so every averaging round is between the two private peers alone. They pass when both report successful rounds in a
group of 2 and hold the same weights after the same step (a round's averaged gradient is the same on both), and the
routers' counters show the relay carried the rounds' bytes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import netns
from peer.localswarm import LocalPeer

from .conftest import FAST

pytestmark = pytest.mark.swarm

METRICS_PORT = 9464  # each peer has a namespace of its own: no collisions
SUCCESS = 'outcome="success"'
FINGERPRINT_TOLERANCE = 1e-6  # relative; equal weights up to the rounding of compressed parts (measured: ~1e-10)


class NsPeer(LocalPeer):
    """A ``LocalPeer`` whose process runs inside a network namespace; its metrics are read from inside it.

    ``LocalPeer`` runs ``sys.executable -m peer ...``; here that executable is a two-line script that execs the
    interpreter through ``ip netns exec`` (which execs in turn: the peer keeps the pid and process group that
    ``LocalPeer`` signals and reaps)."""

    def __init__(self, name: str, topo: netns.NatTopology, workdir: Path, args: list[str], env: dict):
        self.ns_prefix = topo.prefix(name)
        launcher = workdir / f"{name}-python"
        launcher.write_text(f'#!/bin/sh\nexec {" ".join(self.ns_prefix)} {sys.executable} "$@"\n')
        launcher.chmod(0o755)
        real_executable, sys.executable = sys.executable, str(launcher)
        try:
            super().__init__(name, workdir, args, env=env)
        finally:
            sys.executable = real_executable

    def metric(self, name: str, labels: str = "") -> float:
        fetch = f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=3)" \
                ".read().decode())"  # fmt: skip
        done = subprocess.run([*self.ns_prefix, sys.executable, "-c", fetch], capture_output=True, text=True,
                              timeout=10)  # fmt: skip
        if done.returncode:
            raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no metrics yet")
        pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+|NaN)"
        match = re.search(r"^" + pattern + r"$", done.stdout, re.MULTILINE)
        if match is None:
            raise KeyError(f"{name}{{{labels}}} not in metrics of {self.name}")
        return float(match.group(1))


def _fingerprints(path: Path) -> dict[int, list[float]]:
    if not path.exists():
        return {}
    return {line["epoch"]: line["fp"] for line in map(json.loads, path.read_text().splitlines())}


@pytest.mark.timeout(180)
def test_private_peers_behind_two_nats_average_through_a_relay(tmp_path, small_corpus):
    reason = netns.unavailable()
    if reason:
        if os.environ.get("CI") == "true":  # CI runs as root with nftables installed (.ci/run): this must run there
            pytest.fail(f"the NAT test cannot run in CI: {reason}")
        pytest.skip(reason)
    common = [*FAST, "--data", str(small_corpus), "--metrics-port", str(METRICS_PORT)]
    pause = tmp_path / "pause"
    pause.touch()
    peers: list[NsPeer] = []
    with netns.NatTopology() as topo:
        try:
            # the premise: each private peer reaches the public one, nobody reaches a private one
            for src, dst, can in (("a", "pub", True), ("b", "pub", True), ("a", "b", False), ("b", "a", False),
                                  ("pub", "a", False), ("pub", "b", False)):  # fmt: skip
                assert topo.can_connect(src, topo.host_ip(dst), 7000) == can, f"{src} -> {dst}: expected {can}"

            started = time.monotonic()
            pub = NsPeer("pub", topo, tmp_path, [*common, "--listen", f"/ip4/{topo.PUBLIC_IP}/tcp/31337"],
                         env={"BERTSWARM_TEST_PAUSE_FILE": str(pause)})  # fmt: skip
            peers.append(pub)
            join = pub.wait_for_join_address(60)
            for name in ("a", "b"):
                watch = {"BERTSWARM_TEST_WATCH_DIR": str(tmp_path / f"{name}.watch")}
                peers.append(NsPeer(name, topo, tmp_path, [*common, "--listen", "/ip4/0.0.0.0/tcp/0", "--join", join],
                                    env=watch))  # fmt: skip
            a, b = peers[1:]

            deadline = time.monotonic() + 120
            rounds = {}
            while time.monotonic() < deadline:
                for p in peers:
                    assert p.alive(), f"{p.name} exited with {p.proc.poll()}:\n{p.log_tail()}"
                try:
                    rounds = {p.name: p.metric("bertswarm_peer_averaging_rounds_total", SUCCESS) for p in (a, b)}
                except (OSError, KeyError):
                    rounds = {}
                if rounds and min(rounds.values()) >= 2:
                    break
                time.sleep(1.0)
            logs = "\n".join(f"--- {p.name}\n{p.log_tail(20)}" for p in peers)
            assert rounds and min(rounds.values()) >= 2, f"the private peers did not average twice: {rounds}\n{logs}"
            elapsed = time.monotonic() - started
            sizes = {p.name: p.metric("bertswarm_peer_averaging_group_size") for p in (a, b)}
            assert sizes == {"a": 2.0, "b": 2.0}, f"the private peers' last groups: {sizes}\n{logs}"

            # a round hands both the same averaged gradient: the same weights after the same step (up to the
            # rounding of the compressed parts each receives; one step moves these sums by ~100)
            prints = [_fingerprints(tmp_path / f"{p.name}.watch" / "fingerprints.jsonl") for p in (a, b)]
            both = sorted(set(prints[0]) & set(prints[1]))
            assert both, f"no step that both private peers took: {prints}"
            step = both[-1]
            same = prints[0][step] == pytest.approx(prints[1][step], rel=FINGERPRINT_TOLERANCE)
            assert same, f"the private peers' weights differ after step {step}: {prints}"

            # the rounds went through the relay: each home network sent at least its share of the gradients (6 MB
            # of fp32 for the tiny preset, half of it to the other peer, every round) to the public peer
            sent = {r: topo.sent_bytes(r) for r in ("r1", "r2")}
            assert all(s["to_public"] > 2 * 3_000_000 for s in sent.values()), sent
            roles = {p.name: _relay_role(p) for p in peers}
            assert roles == {"pub": "serve", "a": "use", "b": "use"}, roles
            print(f"private peers averaged {rounds} times in groups of 2 through the relay within {elapsed:.0f} s of "
                  f"the public peer's start; bytes sent out of each home network: {sent}")  # fmt: skip
        finally:
            for p in peers:
                p.stop(timeout=15)


def _relay_role(peer: NsPeer) -> str | None:
    match = re.search(r"relay: (\w+) \(", peer.log_path.read_text())
    return match.group(1) if match else None
