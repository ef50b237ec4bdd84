"""Two peers behind two different NATs average with each other: through a public peer in client mode (``--nat auto``),
or directly once a hole punch connects them (``--nat holepunch``) (issue 16).

Three ``bertswarm-peer`` processes in network namespaces (``bench/netns.py``): a public peer that starts the run and
two peers, each behind its own masquerading router, that cannot dial each other nor be dialled. Every peer runs with
the default ``--nat auto`` and ``--listen /ip4/0.0.0.0/tcp/...``: the public peer finds its public address; the
private peers find that they reach a public swarm from private addresses and join in client mode by themselves
(``peer/swarm/nat.py``). They pass when all three complete rounds in the same groups of 3 (through a libp2p relay
every round was ``partial``: the other peer's parts never arrived) and hold the same weights after an averaged step,
while the routers' counters show each home network sent its share to the public peer and nothing to the other home.

With ``--nat holepunch`` the private peers are dialled through the public peer as a relay until p2pd's hole punch
connects them directly; three more public DHT nodes make the four public peers libp2p needs to learn a peer's outside
address. They pass when the homes exchange round data directly, and when, after the public peer has left, the two
keep averaging with each other in groups of 2: no reachable peer is left in their group.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import netns
from peer.localswarm import LocalPeer
from peer.swarm.optim import STATE_AVERAGING_EVERY
from tests.faults.harness import DEBUG_LOGGERS, round_summary

from .conftest import FAST

pytestmark = pytest.mark.swarm

METRICS_PORT = 9464  # each peer has a namespace of its own: no collisions
SUCCESS, PARTIAL, FAILED, SOLO = 'outcome="success"', 'outcome="partial"', 'outcome="failed"', 'outcome="solo"'
FINGERPRINT_TOLERANCE = 1e-6  # relative; equal weights up to the rounding of compressed parts


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


def _peer_args(small_corpus: Path) -> list[str]:
    """Every NAT test's peer flags, once the namespaces are known to work here."""
    reason = netns.unavailable()
    # never skipped: it needs root, ip and nft (.ci/run installs iproute2 and nftables; CI and make test run as root)
    assert reason is None, f"the NAT test cannot run here: {reason}; run make test as root with iproute2 and nftables"
    # in client mode the public peer reduces every part of every round: on 2 busy cores its groupmates' next parts came
    # later than FAST's 7.5 s (half the averaging timeout) and it dropped both of them
    return [*FAST, "--averaging-timeout", "40", "--data", str(small_corpus), "--metrics-port", str(METRICS_PORT)]


def _metric_or_none(peer: NsPeer, name: str, labels: str = "") -> float | None:
    try:
        return peer.metric(name, labels)
    except (OSError, KeyError):
        return None


def _fingerprints(path: Path) -> dict[int, list[float]]:
    if not path.exists():
        return {}
    return {line["epoch"]: line["fp"] for line in map(json.loads, path.read_text().splitlines())}


@pytest.mark.timeout(180)
def test_private_peers_behind_two_nats_average_with_each_other(tmp_path, small_corpus):
    common = _peer_args(small_corpus)
    peers: list[NsPeer] = []
    with netns.NatTopology() as topo:
        try:
            # the premise: each private peer reaches the public one, nobody reaches a private one
            for src, dst, can in (("a", "pub", True), ("b", "pub", True), ("a", "b", False), ("b", "a", False),
                                  ("pub", "a", False), ("pub", "b", False)):  # fmt: skip
                assert topo.can_connect(src, topo.host_ip(dst), 7000) == can, f"{src} -> {dst}: expected {can}"

            started = time.monotonic()
            # hivemind's matchmaking and all-reduce debug lines: a failure shows what the rounds met (round_summary)
            watch = {name: {"BERTSWARM_TEST_WATCH_DIR": str(tmp_path / f"{name}.watch"),
                            "BERTSWARM_DEBUG_LOGGERS": DEBUG_LOGGERS} for name in ("pub", "a", "b")}  # fmt: skip
            pub = NsPeer("pub", topo, tmp_path, [*common, "--listen", f"/ip4/{topo.PUBLIC_IP}/tcp/31337"],
                         env=watch["pub"])  # fmt: skip
            peers.append(pub)
            join = pub.wait_for_join_address(60)
            for name in ("a", "b"):
                peers.append(NsPeer(name, topo, tmp_path, [*common, "--listen", "/ip4/0.0.0.0/tcp/0", "--join", join],
                                    env=watch[name]))  # fmt: skip

            deadline = time.monotonic() + 120
            rounds = {}
            while time.monotonic() < deadline:
                for p in peers:
                    assert p.alive(), f"{p.name} exited with {p.proc.poll()}:\n{p.log_tail()}"
                try:
                    rounds = {p.name: p.metric("bertswarm_peer_averaging_rounds_total", SUCCESS) for p in peers}
                except (OSError, KeyError):
                    rounds = {}
                if rounds and min(rounds.values()) >= 3:
                    break
                time.sleep(1.0)
            tails = "\n".join(f"--- {p.name}\n{p.log_tail(20)}" for p in peers)
            logs = f"{round_summary(peers, 120)}\n{tails}"
            assert rounds and min(rounds.values()) >= 3, f"the peers did not average 3 times: {rounds}\n{logs}"
            elapsed = time.monotonic() - started
            # rounds that lost a groupmate's parts (through a relay: all of them) are not successes; on busy cores a
            # groupmate can still be too slow for one now and then, which the product reports as partial
            partial = {p.name: p.metric("bertswarm_peer_averaging_rounds_total", PARTIAL) for p in peers}
            sizes = {p.name: p.metric("bertswarm_peer_averaging_group_size") for p in peers}
            assert sizes == {"pub": 3.0, "a": 3.0, "b": 3.0}, f"the last groups: {sizes}\n{logs}"
            for p in peers[1:]:
                assert "joining in client mode" in p.log_path.read_text(), f"{p.name} did not say it is behind NAT"
            assert "client mode" not in pub.log_path.read_text()

            # a round hands every peer the same averaged gradient: the same weights after the same step. The first
            # common step is the joiners' state download; a failed round (hivemind: the peer steps with its local
            # gradients) leaves a peer apart until the next state averaging, so with one the weights must have been
            # equal after at least one averaged step, and without one after the last
            def common() -> tuple[list[dict], list[int]]:
                prints = [_fingerprints(tmp_path / f"{p.name}.watch" / "fingerprints.jsonl") for p in peers]
                return prints, sorted(set(prints[0]) & set(prints[1]) & set(prints[2]))[1:]

            prints, common_steps = common()
            assert common_steps, f"no averaged step that all three peers took: {prints}"

            def apart() -> bool:
                # a round in part or failed, or a joiner's step alone (the public peer steps alone until the others
                # are in), leaves a peer apart until the next state averaging round; so does a round with peers a
                # step ahead, until the peer that was behind has loaded the state again (SwarmOptimizer)
                metric = "bertswarm_peer_averaging_rounds_total"
                return (
                    any(p.metric(metric, o) for p in peers for o in (PARTIAL, FAILED))
                    or any(p.metric(metric, SOLO) for p in peers[1:])
                    or any("loading the state again" in p.log_path.read_text() for p in peers)
                )

            was_apart = apart()
            if was_apart:
                # that round brings the group back together: judge once the three have taken the step after it (seen:
                # a joiner's first round in part, and each joiner's first step alone, then apart for both remaining
                # steps)
                after = (common_steps[0] // STATE_AVERAGING_EVERY + 1) * STATE_AVERAGING_EVERY
                deadline = time.monotonic() + 60
                while not common_steps or common_steps[-1] <= after:
                    assert time.monotonic() < deadline, (
                        f"no common step after step {after}: {common_steps}\n{round_summary(peers, 120)}"
                    )
                    time.sleep(1.0)
                    prints, common_steps = common()

            def equal(step: int) -> bool:
                return all(o[step] == pytest.approx(prints[0][step], rel=FINGERPRINT_TOLERANCE) for o in prints[1:])

            outcomes = {p.name: {o: p.metric("bertswarm_peer_averaging_rounds_total", f'outcome="{o}"')
                                 for o in ("success", "partial", "failed", "solo")} for p in peers}  # fmt: skip
            agree = {step: [round(o[step][0], 4) for o in prints] for step in common_steps}
            assert any(equal(step) for step in common_steps), f"never equal: {outcomes} {agree}\n{logs}"
            if not (was_apart or apart()):
                assert equal(common_steps[-1]), f"apart at the end: {outcomes} {agree}\n{logs}"

            # each home network sent its share of every round (half of its 6 MB of fp32 gradients, and more: the
            # public peer reduces every part) to the public peer, and not one packet to the other home network
            sent = {r: topo.sent_bytes(r) for r in ("r1", "r2")}
            assert all(
                s["to_public"] > 3 * 3_000_000 and s["to_homes"] == s["to_others"] == 0 for s in sent.values()
            ), sent
            print(f"peers behind NAT averaged {rounds} times in groups of 3 ({partial} partial) within {elapsed:.0f} s "
                  f"of the public peer's start; bytes sent out of each home network: {sent}")  # fmt: skip
        finally:
            for p in peers:
                p.stop(timeout=15)


def _rounds_in_groups(peers: list[NsPeer], size: int) -> dict[str, float | None]:
    """Successful rounds so far of each peer whose last group had ``size`` peers (None otherwise)."""
    counts = {}
    for p in peers:
        group = _metric_or_none(p, "bertswarm_peer_averaging_group_size")
        counts[p.name] = _metric_or_none(p, "bertswarm_peer_averaging_rounds_total", SUCCESS) if group == size else None
    return counts


@pytest.mark.timeout(240)
def test_private_peers_punch_through_two_nats_and_average_without_a_public_peer(tmp_path, small_corpus):
    common = _peer_args(small_corpus)
    peers: list[NsPeer] = []
    observers: list = []  # bench.common.Worker
    with netns.NatTopology() as topo:
        try:
            pub = NsPeer("pub", topo, tmp_path, [*common, "--listen", f"/ip4/{topo.PUBLIC_IP}/tcp/31337"], env={})
            peers.append(pub)
            joins = [pub.wait_for_join_address(60)]
            observers, more = topo.start_public_nodes(joins[0], tmp_path)
            joins += more
            private = [*common, "--nat", "holepunch", "--listen", "/ip4/0.0.0.0/tcp/0"]
            for name in ("a", "b"):
                peers.append(NsPeer(name, topo, tmp_path, [*private, *(f for j in joins for f in ("--join", j))],
                                    env={}))  # fmt: skip

            # 1. three peers: once the punch is through, the homes send round data to each other directly
            deadline, sent, rounds = time.monotonic() + 120, {}, {}
            while time.monotonic() < deadline:
                for p in peers:
                    assert p.alive(), f"{p.name} exited with {p.proc.poll()}:\n{p.log_tail()}"
                sent = {r: topo.sent_bytes(r) for r in ("r1", "r2")}
                rounds = _rounds_in_groups(peers, 3)
                if all(s["to_homes"] > 2_000_000 for s in sent.values()) and all(v and v >= 2 for v in rounds.values()):
                    break
                time.sleep(1.0)
            logs = "\n".join(f"--- {p.name}\n{p.log_tail(20)}" for p in peers)
            assert all(s["to_homes"] > 2_000_000 for s in sent.values()), f"no direct traffic: {sent}\n{logs}"
            assert all(v and v >= 2 for v in rounds.values()), f"rounds in groups of 3: {rounds}\n{logs}"
            for p in peers[1:]:
                assert "reached through the first public --join peer as a relay" in p.log_path.read_text(), p.name
                assert "client mode" not in p.log_path.read_text()

            # 2. the public peer leaves: the two private peers average with each other alone, over the punched link
            assert pub.stop(timeout=30) == 0, pub.log_tail()
            before = {p.name: _metric_or_none(p, "bertswarm_peer_averaging_rounds_total", SUCCESS) for p in peers[1:]}
            deadline, pair = time.monotonic() + 90, {}
            while time.monotonic() < deadline:
                for p in peers[1:]:
                    assert p.alive(), f"{p.name} exited with {p.proc.poll()}:\n{p.log_tail()}"
                pair = _rounds_in_groups(peers[1:], 2)
                if all(pair[n] is not None and pair[n] >= before[n] + 2 for n in pair):
                    break
                time.sleep(1.0)
            logs = "\n".join(f"--- {p.name}\n{p.log_tail(20)}" for p in peers[1:])
            assert all(pair[n] is not None and pair[n] >= before[n] + 2 for n in pair), f"{before} {pair}\n{logs}"
            sent = {r: topo.sent_bytes(r) for r in ("r1", "r2")}
            print(f"punched through: {rounds} rounds in groups of 3, then {pair} in groups of 2 without the public "
                  f"peer; bytes each home sent: {sent}")  # fmt: skip
        finally:
            for p in peers:
                p.stop(timeout=15)
            for observer in observers:
                observer.stop(timeout=5)
