"""A live swarm that fault scenarios act on one after another (``Session``), built on the integration harness.

Every peer runs with the test-only probe (``BERTSWARM_TEST_WATCH_DIR``, see ``peer/faults.py``): it writes the stage
of its current gradient averaging round and a fingerprint of its parameters after every step, so a scenario can crash
a peer exactly while a round is under way and compare live peers' weights without stopping them.
"""

from __future__ import annotations

import collections
import json
import math
import random
import re
import signal
import time
from pathlib import Path

from peer.localswarm import LocalPeer
from tests.integration.conftest import Swarm

SIZE = 3  # peers a session keeps alive between scenarios
TARGET_BATCH = 192  # FAST's --target-batch-size
AVERAGING_TIMEOUT = 15.0  # FAST's --averaging-timeout
ROUND_UNDER_WAY = ("AWAITING_TRIGGER", "RUNNING_ALLREDUCE")  # a group is assembled: the all-reduce is on
# hivemind's debug lines that say why a round found no group or ended early (a few per round; a failed wait shows
# them, counted: ``Session.round_summary``)
DEBUG_LOGGERS = "hivemind.averaging.matchmaking,hivemind.averaging.allreduce"


class Session:
    """``SIZE`` peers (and, once started, a coordinator) on 127.0.0.1; ``close`` reaps every process."""

    def __init__(self, workdir: Path, corpus: Path, rng: random.Random | None = None):
        self.swarm = Swarm(workdir, corpus)
        self.workdir = workdir
        self.rng = rng or random.Random(0)
        self.live: list[LocalPeer] = []
        self.started_at: dict[str, float] = {}
        self.bootstrap: LocalPeer | None = None  # the peer the latest joiners came in through
        self.coordinator: LocalPeer | None = None
        self.initial_loss = math.nan
        self._count = 0

    # --- peers ------------------------------------------------------------------------------------------------------

    def start_peer(self, join: LocalPeer | None = None, env: dict | None = None, kind: str = "p") -> LocalPeer:
        name = f"{kind}{self._count}"
        self._count += 1
        env = {"BERTSWARM_TEST_WATCH_DIR": str(self.workdir / f"{name}.watch"),
               "BERTSWARM_DEBUG_LOGGERS": DEBUG_LOGGERS, **(env or {})}  # fmt: skip
        self.started_at[name] = time.time()
        return self.swarm.start(name, join=join, env=env)

    def start(self) -> None:
        first = self.start_peer()
        first.wait_for_join_address(90)
        self.bootstrap = first
        self.live = [first] + [self.start_peer(join=first) for _ in range(SIZE - 1)]
        self.wait_until("the first loss", lambda: self.metric(first, "bertswarm_peer_loss") > 0, 150)
        self.initial_loss = self.metric(first, "bertswarm_peer_loss")
        self.wait_until("all peers to train together", lambda: min(self.epochs()) >= 1, 180)

    def close(self) -> None:
        self.swarm.close()

    def stop_coordinator(self) -> None:
        if self.coordinator is not None:
            self.coordinator.stop(timeout=20)
            self.coordinator = None

    def others(self, peer: LocalPeer) -> list[LocalPeer]:
        return [p for p in self.live if p is not peer]

    def pick(self) -> LocalPeer:
        return self.rng.choice(self.live)

    def kill(self, peer: LocalPeer) -> None:
        peer.kill_group(signal.SIGKILL)
        peer.wait(timeout=15)
        self.live.remove(peer)

    def leave(self, peer: LocalPeer) -> None:
        """SIGTERM: a volunteer closing the program; it must exit 0."""
        peer.send_signal(signal.SIGTERM)
        code = peer.wait(timeout=40)
        self.live.remove(peer)
        assert code == 0, f"{peer.name} left with {code}:\n{peer.log_tail()}"

    # --- reading peers ----------------------------------------------------------------------------------------------

    def metric(self, peer: LocalPeer, name: str, labels: str = "") -> float:
        return self.swarm.metric(peer, name, labels)

    def rounds(self, peer: LocalPeer, outcome: str) -> int:
        return int(self.metric(peer, "bertswarm_peer_averaging_rounds_total", f'outcome="{outcome}"'))

    def epochs(self, peers: list[LocalPeer] | None = None) -> list[int]:
        return [self.swarm.epoch(p) for p in (self.live if peers is None else peers)]

    def wait_until(self, what: str, predicate, timeout: float, interval: float = 0.25):
        try:
            return self.swarm.wait_until(what, predicate, timeout, interval)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.round_summary(timeout)}") from None

    def round_summary(self, seconds: float) -> str:
        return round_summary(self.live, seconds, self.swarm.peers)

    def stage(self, peer: LocalPeer) -> str:
        try:
            return (self.workdir / f"{peer.name}.watch" / "stage").read_text()
        except OSError:
            return "IDLE"

    def fingerprints(self, peer: LocalPeer) -> list[dict]:
        """The probe's ``{"epoch", "time", "fp"}`` lines, oldest first."""
        try:
            text = (self.workdir / f"{peer.name}.watch" / "fingerprints.jsonl").read_text()
        except OSError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def assert_healthy(self, peers: list[LocalPeer] | None = None) -> float:
        """No live peer holds a non-finite parameter; the loss is finite and below the swarm's first one. Returns the
        mean loss."""
        peers = self.live if peers is None else peers
        for peer in peers:
            prints = self.fingerprints(peer)
            assert all(math.isfinite(v) for line in prints for v in line["fp"]), f"{peer.name}: non-finite weights"
        losses = [self.metric(p, "bertswarm_peer_loss") for p in peers]
        assert all(math.isfinite(x) for x in losses), losses
        mean = sum(losses) / len(losses)
        assert mean < self.initial_loss, f"loss {mean:.3f} did not fall below the first {self.initial_loss:.3f}"
        return mean

    # --- joining ----------------------------------------------------------------------------------------------------

    def join_and_measure(self, via: LocalPeer, env: dict | None = None, timeout: float = 150) -> tuple[LocalPeer, dict]:
        """A new peer joins through ``via``; seconds from its start to its join line, to holding the swarm's state,
        to holding parameters equal to a live peer's at the same step, and to its first successful round."""
        started = time.monotonic()
        peer = self.start_peer(join=via, env=env)
        peer.wait_for_join_address(90)
        joined = time.monotonic() - started
        self.live.append(peer)
        self.bootstrap = via
        self.wait_until(f"{peer.name} to load the swarm's state",
                        lambda: self.metric(peer, "bertswarm_peer_state_downloads_total") >= 1, timeout)  # fmt: skip
        state = time.monotonic() - started
        self.wait_until(f"{peer.name} to contribute to a successful round",
                        lambda: self.rounds(peer, "success") >= 1, timeout)  # fmt: skip
        contribution = time.monotonic() - started
        equal_at = self.wait_until(f"{peer.name} to hold a live peer's weights", lambda: self._equal_since(peer),
                                   timeout + 60)  # fmt: skip
        return peer, {
            "join_line_s": joined,
            "state_loaded_s": state,
            "equal_params_s": equal_at - self.started_at[peer.name],
            "first_contribution_s": contribution,
        }

    def _equal_since(self, peer: LocalPeer) -> float | None:
        """Wall time of the first step at which ``peer``'s fingerprint equals another live peer's at the same step."""
        mine = self.fingerprints(peer)
        for other in self.others(peer):
            theirs = {line["epoch"]: line["fp"] for line in self.fingerprints(other)}
            for line in mine:
                fp = theirs.get(line["epoch"])
                if fp is not None and _close(fp, line["fp"]):
                    return line["time"]
        return None

    def heal(self) -> None:
        """Back to ``SIZE`` live training peers (after a scenario failed half-way)."""
        for peer in list(self.live):
            peer.kill_group(signal.SIGCONT)  # a stall scenario that failed half-way
            if not peer.alive():
                self.live.remove(peer)
        if not self.live:
            raise RuntimeError("no live peer left to join through")
        while len(self.live) < SIZE:
            self.join_and_measure(self.pick())


def _close(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


def round_summary(peers: list[LocalPeer], seconds: float, named: list[LocalPeer] | None = None) -> str:
    """What each of ``peers``' rounds met in the last ``seconds``: its warnings and hivemind's matchmaking and
    all-reduce debug lines (``DEBUG_LOGGERS``), peers (of ``named``, default ``peers``) by name, numbers as #, most
    frequent first."""
    names = {p.join_address.rsplit("/p2p/", 1)[-1]: p.name for p in named or peers if p.join_address}
    since, now = time.strftime("%H:%M:%S", time.localtime(time.time() - seconds)), time.strftime("%H:%M:%S")
    since = since if since <= now else "00:00:00"  # past midnight: the whole log
    lines = []
    for peer in peers:
        try:
            text = peer.log_path.read_text(errors="replace")
        except OSError:
            continue
        events = collections.Counter()
        for line in text.splitlines():
            timed = line[2:3] == ":" and line[:8] >= since  # not a traceback's line
            if timed and (" WARN " in line[:14] or " hivemind.averaging." in line):
                parts = re.split(r"(Qm\w+)", line[9:])  # peer ids at the odd places
                event = "".join(names.get(part, "?") if i % 2 else re.sub(r"\d+(\.\d+)?", "#", part)
                                for i, part in enumerate(parts))  # fmt: skip
                events[event[:200]] += 1
        lines += [f"{peer.name}: {n} x {event}" for event, n in events.most_common(15)] or [f"{peer.name}: none"]
    joined = "\n".join(lines)
    return f"what the rounds met in the last {seconds:.0f} s:\n{joined}"
