"""Fault scenarios 1-7 on a live ``Session``: each runs one repetition, asserts the properties the issue asks for
(``AssertionError`` when one fails) and returns its figures (seconds, counts). They leave the session with
``SIZE - 1`` or more live peers; ``late_joiner`` (or ``Session.heal``) brings it back to ``SIZE``."""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.request

from peer.store.checkpoint import TMP_PREFIX, latest_path, list_checkpoints
from peer.store.load import load_checkpoint
from peer.telemetry import PEER_REJECTED_CONTRIBUTIONS
from tests.faults.harness import AVERAGING_TIMEOUT, ROUND_UNDER_WAY, SIZE, TARGET_BATCH, Session

REJECTED = f"{PEER_REJECTED_CONTRIBUTIONS}_total"

SUCCESS_TIMEOUT = 150.0


def _advance(session: Session, peers, steps: int, timeout: float = 150.0) -> float:
    """Seconds until every peer in ``peers`` holds a step ``steps`` beyond the highest one now."""
    target = max(session.epochs(peers)) + steps
    started = time.monotonic()
    session.wait_until(f"{[p.name for p in peers]} to reach step {target}",
                       lambda: min(session.epochs(peers)) >= target, timeout)  # fmt: skip
    return time.monotonic() - started


def kill_during_allreduce(session: Session) -> dict:
    """1. SIGKILL a peer (and its p2pd) while its gradient round is under way: the survivors finish or retry the step,
    the epoch keeps advancing, no parameter is NaN, the loss still falls."""
    victim = session.pick()
    survivors = session.others(victim)
    deadline = time.monotonic() + 120
    while (stage := session.stage(victim)) not in ROUND_UNDER_WAY:
        assert time.monotonic() < deadline, f"{victim.name} never reached a round (stage {stage})"
        time.sleep(0.005)
    failed = {p.name: session.rounds(p, "failed") for p in survivors}
    success = {p.name: session.rounds(p, "success") for p in survivors}
    epoch_at_kill = max(session.epochs(survivors))
    victim.kill_group(signal.SIGKILL)
    killed = time.monotonic()
    victim.wait(timeout=15)
    session.live.remove(victim)
    session.wait_until("a survivor's next successful round",
                       lambda: any(session.rounds(p, "success") > success[p.name] for p in survivors),
                       SUCCESS_TIMEOUT)  # fmt: skip
    next_success = time.monotonic() - killed
    session.wait_until("the survivors to advance 2 steps",
                       lambda: min(session.epochs(survivors)) >= epoch_at_kill + 2, SUCCESS_TIMEOUT)  # fmt: skip
    two_steps = time.monotonic() - killed
    loss = session.assert_healthy(survivors)
    return {
        "killed_in_stage": stage,
        "rounds_lost": max(session.rounds(p, "failed") - failed[p.name] for p in survivors),
        "next_success_s": next_success,
        "two_steps_s": two_steps,
        "loss": loss,
    }


def late_joiner(session: Session) -> dict:
    """3. A peer joins a training swarm: time to its join line, to the swarm's state, to weights equal to a live
    peer's, to its first counted contribution. If the session is full, its oldest peer then leaves (SIGTERM, exit 0)."""
    peer, figures = session.join_and_measure(session.pick())
    if len(session.live) > SIZE:
        session.leave(next(p for p in session.live if p is not peer and p is not session.bootstrap))
    return figures


def bootstrap_dies(session: Session) -> dict:
    """2. The peer the others joined through is SIGKILLed: the swarm continues; a new peer joins through another."""
    victim = session.bootstrap if session.bootstrap in session.live else session.pick()
    survivors = session.others(victim)
    session.kill(victim)
    advance = _advance(session, survivors, 1)
    via = session.pick()
    _peer, join = session.join_and_measure(via)
    assert victim.join_address not in (via.join_address,)
    session.assert_healthy()
    return {"survivors_next_step_s": advance, "rejoin_state_loaded_s": join["state_loaded_s"],
            "rejoin_first_contribution_s": join["first_contribution_s"]}  # fmt: skip


def stall(session: Session, seconds: float = AVERAGING_TIMEOUT + 10) -> dict:
    """4. SIGSTOP a peer (all its processes) for longer than the averaging timeout, then SIGCONT: the others are not
    blocked beyond the timeout; the stalled peer recovers or resyncs."""
    victim = session.pick()
    others = session.others(victim)
    epoch_before = max(session.epochs(others))
    success_before = session.rounds(victim, "success")
    victim.kill_group(signal.SIGSTOP)
    stopped = time.monotonic()
    first_advance = None
    try:
        while time.monotonic() - stopped < seconds:
            if first_advance is None and min(session.epochs(others)) > epoch_before:
                first_advance = time.monotonic() - stopped
            time.sleep(0.25)
    finally:
        victim.kill_group(signal.SIGCONT)
    resumed = time.monotonic()
    advanced = min(session.epochs(others)) - epoch_before
    assert first_advance is not None and advanced >= 1, f"the others took no step in {seconds:.0f}s of stall"
    session.wait_until(f"{victim.name} to train with the swarm again",
                       lambda: session.rounds(victim, "success") > success_before
                       and session.swarm.epoch(victim) >= max(session.epochs(others)) - 1, SUCCESS_TIMEOUT)  # fmt: skip
    recovered = time.monotonic() - resumed
    session.assert_healthy()
    return {
        "stall_s": seconds,
        "others_first_step_s": first_advance,
        "others_steps_during_stall": advanced,
        "resync_downloads": session.metric(victim, "bertswarm_peer_state_downloads_total"),
        "recovered_s": recovered,
    }


def nonfinite_sender(session: Session) -> dict:
    """6. A peer sends NaN/Inf gradients (test-only injection): no peer applies them; its contributions are dropped
    by the others' reducers and counted."""
    honest = list(session.live)
    rejected = lambda: sum(session.metric(p, REJECTED, 'reason="non_finite"') for p in honest)  # noqa: E731
    skipped = lambda p: session.metric(p, "bertswarm_peer_skipped_steps_total", 'reason="nonfinite"')  # noqa: E731
    rejected_before = rejected()
    skipped_before = [skipped(p) for p in honest]
    bad = session.start_peer(join=session.pick(), env={"BERTSWARM_TEST_NONFINITE_GRADS": "1"}, kind="nan")
    session.wait_until("the honest peers to drop the bad peer's contributions",
                       lambda: rejected() >= rejected_before + 1, SUCCESS_TIMEOUT)  # fmt: skip
    steps = _advance(session, honest, 1)
    bad_rounds = session.rounds(bad, "success")
    bad_skipped = skipped(bad)
    assert [skipped(p) for p in honest] == skipped_before, "an honest peer got a non-finite gradient to apply"
    session.assert_healthy(honest + [bad])  # the bad peer refused its own garbage too: every weight is finite
    figures = {"rejected_contributions": rejected() - rejected_before, "bad_peer_rounds": bad_rounds,
               "bad_peer_skipped_steps": bad_skipped, "next_step_s": steps}  # fmt: skip
    session.live.append(bad)
    session.leave(bad)
    return figures


def lying_records(session: Session) -> dict:
    """7. A peer's progress and metrics records lie (test-only injection): bounded by the schema, the epoch does not
    jump, the coordinator's figures stay sane."""
    honest = list(session.live)
    liar = session.start_peer(join=session.pick(), env={"BERTSWARM_TEST_LIE": "1"}, kind="liar")
    ignored = lambda: min(session.metric(p, "bertswarm_peer_ignored_progress_records_total") for p in honest)  # noqa: E731
    session.wait_until("every honest peer to ignore a lying record", lambda: ignored() >= 1, SUCCESS_TIMEOUT)
    samples = lambda: sum(session.metric(p, "bertswarm_peer_samples_total") for p in honest)  # noqa: E731
    epoch0, samples0 = max(session.epochs(honest)), samples()
    seconds = _advance(session, honest, 2)
    epochs = max(session.epochs(honest)) - epoch0
    per_epoch = (samples() - samples0) / max(1, epochs)
    assert max(session.epochs(honest)) < 10**5, "the epoch jumped"
    for peer in honest:  # not even for a moment: no honest peer took the liar's step for the swarm's (seen unguarded)
        steps = [int(n) for n in re.findall(r"step (\d+)", peer.log_path.read_text(errors="replace"))]
        assert max(steps, default=0) < 10**5, f"{peer.name} believed the liar's step {max(steps)}"
    # without the bounds, every honest peer stepped after each mini-batch (8-24 samples per step); honest peers
    # must still compute a real share of every step's target batch
    assert per_epoch >= TARGET_BATCH / 4, f"honest samples per step fell to {per_epoch:.0f}: the liar drives the epoch"
    figures = {"honest_samples_per_step": per_epoch, "two_steps_s": seconds}
    if session.coordinator is not None and session.coordinator.alive():
        status = _coordinator_status(session)["swarm"]
        figures.update(coordinator_epoch=status["epoch"], coordinator_samples=status["samples"],
                       coordinator_samples_per_second=status["samples_per_second"])  # fmt: skip
        low, high = min(session.epochs(honest)), max(session.epochs(honest))
        assert low - 2 <= status["epoch"] <= high + 2, status
        assert status["samples"] <= (status["epoch"] + 2) * TARGET_BATCH, status
        assert status["loss"] is None or 1.0 < status["loss"] < 12.0, status
        assert status["samples_per_second"] < 1e4, status
    session.assert_healthy(honest)
    session.live.append(liar)
    session.leave(liar)
    session.stop_coordinator()  # started by the coordinator scenario; it costs CPU the other scenarios need
    return figures


# --- 5. the coordinator ---------------------------------------------------------------------------------------------


def _coordinator_status(session: Session) -> dict:
    port = session.swarm.ports[session.coordinator.name]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
        return json.loads(response.read())


def start_coordinator(session: Session) -> None:
    root = session.workdir / "checkpoints"
    name = f"coord{session._count}"
    session._count += 1
    args = ["--checkpoint-dir", str(root), "--checkpoint-every", "1", "--tick", "0.5", "--eval-batches", "1",
            "--keep", "3"]  # fmt: skip
    session.coordinator = session.swarm.start_coordinator(name, *args, join=session.pick())


def coordinator_killed_mid_checkpoint(session: Session) -> dict:
    """5. SIGKILL the coordinator while it writes a checkpoint: no partial checkpoint is ever visible; training goes
    on; a restarted coordinator cleans up and publishes newer checkpoints."""
    root = session.workdir / "checkpoints"
    if session.coordinator is None or not session.coordinator.alive():
        start_coordinator(session)
    deadline = time.monotonic() + 180
    session.wait_until("a first complete checkpoint", lambda: list_checkpoints(root), 180)
    while not any(p.name.startswith(TMP_PREFIX) for p in root.iterdir()):  # the next one is being written
        assert session.coordinator.alive(), session.coordinator.log_tail()
        assert time.monotonic() < deadline, "the coordinator wrote no checkpoint"
        time.sleep(0.002)
    session.coordinator.kill_group(signal.SIGKILL)
    session.coordinator.wait(timeout=15)
    killed_epoch = max(session.epochs())
    visible = list_checkpoints(root)
    for info in visible:  # every checkpoint a reader can see is complete and verifies
        load_checkpoint(str(info.path), expected_fingerprint=None)
    latest = latest_path(root)
    assert latest is None or not latest.name.startswith(TMP_PREFIX)
    if latest is not None:
        load_checkpoint(str(root), expected_fingerprint=None)
    training = _advance(session, session.live, 1)
    started = time.monotonic()
    start_coordinator(session)
    newer = lambda: (_coordinator_status(session).get("last_checkpoint") or {}).get("epoch", -1) > killed_epoch  # noqa: E731
    session.wait_until("the restarted coordinator to publish a newer checkpoint", newer, 180)
    republished = time.monotonic() - started
    assert not any(p.name.startswith(TMP_PREFIX) for p in root.iterdir() if p.stat().st_mtime < started - 1)
    session.assert_healthy()
    return {"visible_checkpoints": len(visible), "training_next_step_s": training,
            "restart_to_checkpoint_s": republished}  # fmt: skip


SCENARIOS = {
    "kill_during_allreduce": kill_during_allreduce,
    "late_joiner": late_joiner,
    "bootstrap_dies": bootstrap_dies,
    "stall": stall,
    "nonfinite_sender": nonfinite_sender,
    "coordinator_killed_mid_checkpoint": coordinator_killed_mid_checkpoint,
    "lying_records": lying_records,
}
