"""Scenario 14: stopping and staying (issue 16). Two figures of the product CLI (``python -m peer``), each peer in its
own session as a service manager would start it:

1. **Group SIGTERM mid-round on a 20 Mbit/s link.** Two mini-preset peers (5.5M parameters: 22 MB of fp32 gradients,
   several seconds per round at 20 Mbit/s) in two network namespaces joined by a veth pair with a ``tbf`` qdisc on
   both ends (``slowlink.Link``). Once a gradient averaging round of one of them is exchanging tensors (the test probe
   ``BERTSWARM_TEST_WATCH_DIR`` writes the round's stage), its whole process group gets SIGTERM, as systemd and
   ``docker stop`` send it. Recorded per repetition: seconds from the signal to the exit, the exit code, whether its
   ``state.safetensors`` was written after the signal at a step no lower than the one before it, the lines with
   "ERROR" or "Traceback" in its log, and how many of its processes (helpers, p2pd) are left 5 s after it exited;
   where the time went, from its log lines as they appear (the round's end, the end of ``_shutdown``) and its exit.
   The stopped peer alternates between the first peer and the joiner. The other peer then gets its own group SIGTERM
   (its groupmate gone, usually between rounds) and is recorded the same way.
2. **Missed rounds after a join.** Two tiny-preset peers on loopback with the product's defaults (matchmaking,
   averaging timeout, batch sizes, data); the second joins once the first has taken a few steps. From the moment the
   joiner holds the swarm's state (it loaded it, or contributed its first sample) both run for 10 minutes (``--quick``:
   90 s), and the rounds are counted by outcome from both peers' Prometheus metrics. One run per scenario run (the
   repetitions apply to figure 1).

Needs root for figure 1 (network namespaces); without it that figure is skipped with the reason and figure 2 runs.
``BENCH_STOPPING_FIGURES=1`` (or ``2``) runs only that figure, e.g. to re-measure figure 1 after a change of the stop
path (``python -m bench --only stopping --results DIR``: the result then lacks the other figure, so keep it out of
``bench/results/``); the default runs both.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

from safetensors import safe_open

from bench.common import Worker, _descendants, free_port, workers_cleanup
from bench.scenarios import slowlink
from peer.config import PeerConfig
from peer.localswarm import JOIN_PREFIX
from peer.run.presets import PRESETS
from peer.store.state import STATE_FILE
from peer.telemetry import PEER_AVERAGING_ROUNDS, PEER_EPOCH, PEER_SAMPLES, PEER_STATE_DOWNLOADS, ROUND_OUTCOMES

NAME = "stopping"
TITLE = "14. Stopping and staying: group SIGTERM mid-round over a 20 Mbit/s link, missed rounds after a join"

MBIT = 20
EXIT_GOAL_S = 10.0  # issue 16: exit 0 within 10 s of the group SIGTERM, state saved
EXIT_WAIT_S = 40.0  # how long the scenario waits for the exit before it SIGKILLs the group (and records a miss)
LEFTOVER_WAIT_S = 5.0  # a helper or p2pd still alive this long after the peer exited counts as left over
ROUND_STAGE = "RUNNING_ALLREDUCE"  # hivemind's AveragingStage while the group exchanges tensors
BAD_LINE = re.compile(r"ERROR|Traceback")
# the stopped peer's log lines kept in the raw results: how its way out went
SHUTDOWN_WORDS = (
    "received SIGTERM",
    "did not finish",
    "dropped the gradient averaging round",
    "saved local state",
    "leaving at step",
    "left the swarm",
    "WARN",
)
# mini preset; a small global batch (4 micro-batches of 8 per peer) so each step's time is mostly its round
STOP_PEER_ARGS = [
    "--preset", "mini", "--threads", "1", "--batch-size", "8", "--target-batch-size", "64", "--seq-len", "64",
    "--save-every", "0", "--log-every", "1", "--startup-timeout", "120",
]  # fmt: skip
ROUNDS_FIRST_STEPS = 3  # the first peer's steps before the second joins (so the joiner loads state, as volunteers do)
ROUNDS_MINUTES, ROUNDS_MINUTES_QUICK = 10.0, 1.5
ROUNDS_METRIC = f"{PEER_AVERAGING_ROUNDS}_total"


def peer_args(state_dir: Path, *args: str) -> list[str]:
    return ["-m", "peer", "--state-dir", str(state_dir), *args]


# --- figure 1: group SIGTERM mid-round -------------------------------------------------------------------------------


def read_stage(watch: Path) -> str | None:
    with contextlib.suppress(OSError):
        return (watch / "stage").read_text().strip()
    return None


def last_epoch(watch: Path) -> int:
    """The peer's step after its last completed optimizer step, from the probe's fingerprints (0 before any)."""
    with contextlib.suppress(OSError):
        lines = (watch / "fingerprints.jsonl").read_text().splitlines()
        return max((json.loads(line)["epoch"] for line in lines if line.strip()), default=0)
    return 0


def saved_epoch(state_dir: Path, after: float) -> int | None:
    """The step stored in the peer's state file if the file was written at or after wall time ``after``."""
    path = state_dir / STATE_FILE
    if not path.exists() or path.stat().st_mtime < after:
        return None
    with safe_open(path, framework="pt") as f:
        return int((f.metadata() or {})["epoch"])


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells it from a later process with the same pid)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return None


def alive(processes: dict[int, int]) -> list[int]:
    """The processes of ``{pid: start time}`` still running (zombies count as gone)."""
    out = []
    for pid, started in processes.items():
        with contextlib.suppress(OSError, IndexError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if start_time(pid) == started and state != "Z":
                out.append(pid)
    return out


def bad_lines(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if BAD_LINE.search(line)]


def wait_for(what: str, predicate, timeout: float, workers: list[Worker], interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in workers:
            if w.proc.poll() is not None:
                raise RuntimeError(
                    f"{w.log_path.stem} exited with {w.proc.poll()} while waiting for {what}:\n{w.tail()}"
                )
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    tails = "\n".join(f"--- {w.log_path.stem}\n{w.tail(15)}" for w in workers)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


class LogMarks:
    """Seconds from ``started`` (monotonic) until each marker first appears in a log that is being written: where a
    peer's way out spends its time (the log's own timestamps have whole seconds only)."""

    def __init__(self, log: Path, markers: dict[str, re.Pattern], started: float):
        self.seconds: dict[str, float] = {}
        self._log, self._markers, self._started = log, markers, started
        self._offset = log.stat().st_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        pending = b""
        while True:
            with open(self._log, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
            now = time.monotonic() - self._started
            self._offset += len(chunk)
            lines, _, pending = (pending + chunk).rpartition(b"\n")  # whole lines only
            text = lines.decode(errors="replace")
            for name, pattern in self._markers.items():
                if name not in self.seconds and pattern.search(text):
                    self.seconds[name] = round(now, 2)
            if self._stop.wait(0.05):
                return

    def close(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.seconds


def stop_group(peer: Worker, state_dir: Path, step_before: int, marks: dict[str, re.Pattern]) -> dict:
    """SIGTERM to ``peer``'s whole process group; what its way out took and left behind (see the module docstring)."""
    pids = [peer.proc.pid, *_descendants(peer.proc.pid)]
    helpers = {pid: t for pid in pids[1:] if (t := start_time(pid)) is not None}
    signalled_wall, signalled = time.time(), time.monotonic()
    follow = LogMarks(peer.log_path, marks, signalled)
    try:
        os.killpg(peer.proc.pid, signal.SIGTERM)
        code = peer.wait(EXIT_WAIT_S)
        exit_s = time.monotonic() - signalled if code is not None else None
        if code is not None:  # helpers and p2pd have their own process groups: they must die with the peer
            deadline = time.monotonic() + LEFTOVER_WAIT_S
            while alive(helpers) and time.monotonic() < deadline:
                time.sleep(0.1)
        left = alive(helpers)
    finally:
        if peer.proc.poll() is None:
            peer.stop(timeout=0)
        time.sleep(0.2)  # the follower's last look at the log
        seconds = follow.close()
        for pid in alive(helpers):  # only this peer's own processes, by pid and start time
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    saved = saved_epoch(state_dir, signalled_wall)
    return {
        "step_before": step_before,
        "exit_s": exit_s,
        "exit_code": code,
        "saved_step": saved,
        "state_saved": saved is not None and saved >= step_before,
        "bad_lines": bad_lines(peer.log_path),
        "helpers": len(helpers),
        "left_over": len(left),
        "marks_s": seconds,  # seconds after the signal: the round's end, the save, the end of _shutdown
    }


def shutdown_marks(step_before: int) -> dict[str, re.Pattern]:
    return {
        "round_ended": re.compile(rf"peer\.progress: step {step_before + 1} |averaging round failed|did not finish"),
        "saved": re.compile(r"saved local state"),
        "left": re.compile(r"left the swarm in"),
    }


def stop_mid_round(workdir: Path, link: slowlink.Link, rep: int) -> dict:
    """One repetition of figure 1: the peer ``rep % 2`` gets the group SIGTERM mid-round; then the other one gets
    its own (between rounds, its groupmate gone), recorded the same way."""
    target = rep % 2
    other = 1 - target
    out = workdir / f"stop{rep}"
    out.mkdir(parents=True)
    pause = out / "pause"  # the first peer holds still until the second is in, so neither downloads state over tbf
    pause.touch()
    watches = [out / f"p{i}.watch" for i in range(2)]
    workers: list[Worker] = []
    with workers_cleanup(workers):
        join = None
        for i in range(2):
            env = {"BERTSWARM_TEST_WATCH_DIR": str(watches[i])}
            if i == 0:
                env["BERTSWARM_TEST_PAUSE_FILE"] = str(pause)
            args = [*STOP_PEER_ARGS, "--run-id", f"stopping{rep}", "--listen", f"/ip4/{link.ip[i]}/tcp/0"]
            args += ["--join", join] if join else []
            workers.append(Worker(peer_args(out / f"p{i}", *args), out / f"p{i}.log", threads=1, env=env,
                                  prefix=link.prefix(i)))  # fmt: skip
            join = join or workers[0].wait_line(JOIN_PREFIX, timeout=180)
        # the joiner's probe starts once its trainer is built, just before it syncs: release the first peer then
        wait_for("the joiner's trainer", lambda: read_stage(watches[1]) is not None, 180, workers)
        pause.unlink()
        watch = watches[target]
        wait_for(f"a first step of p{target}", lambda: last_epoch(watch) >= 1, 300, workers)
        wait_for(f"a gradient round of p{target} exchanging tensors", lambda: read_stage(watch) == ROUND_STAGE,
                 300, workers, interval=0.02)  # fmt: skip
        step, stage = last_epoch(watch), read_stage(watch)
        stopped = stop_group(workers[target], out / f"p{target}", step, shutdown_marks(step))
        step = last_epoch(watches[other])
        survivor = stop_group(workers[other], out / f"p{other}", step, shutdown_marks(step))
        log = workers[target].log_path.read_text(errors="replace").splitlines()
    return {
        "stopped": f"p{target}",
        "stage_at_signal": stage,
        **stopped,
        "other": survivor,
        "shutdown_log": [line for line in log if any(word in line for word in SHUTDOWN_WORDS)][-12:],
    }


# --- figure 2: missed rounds after a join ---------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """``{"name{labels}": value}`` of one peer's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def round_counts(metrics: dict[str, float]) -> dict[str, int]:
    return {o: int(metrics.get(f'{ROUNDS_METRIC}{{outcome="{o}"}}', 0)) for o in ROUND_OUTCOMES}


def rounds_after_join(workdir: Path, minutes: float) -> dict:
    out = workdir / "rounds"
    ports = [free_port(), free_port()]
    workers: list[Worker] = []
    with workers_cleanup(workers):

        def metrics(i: int) -> dict[str, float]:
            if workers[i].proc.poll() is not None:
                raise RuntimeError(f"p{i} exited with {workers[i].proc.poll()}:\n{workers[i].tail()}")
            try:
                return scrape(ports[i])
            except OSError:
                return {}

        for i in range(2):
            args = ["--threads", "1", "--run-id", "stopping_rounds", "--metrics-port", str(ports[i])]
            if i == 1:
                args += ["--join", workers[0].wait_line(JOIN_PREFIX, timeout=120)]
                ahead = lambda: metrics(0).get(PEER_EPOCH, 0) >= ROUNDS_FIRST_STEPS  # noqa: E731
                wait_for(f"{ROUNDS_FIRST_STEPS} steps of the first peer", ahead, 300, workers, interval=1.0)
            workers.append(Worker(peer_args(out / f"p{i}", *args), out / f"p{i}.log", threads=1))
        started = time.monotonic()

        def joined():
            m = metrics(1)
            return m.get(f"{PEER_STATE_DOWNLOADS}_total", 0) >= 1 or m.get(f"{PEER_SAMPLES}_total", 0) > 0

        wait_for("the joiner to hold the swarm's state", joined, 300, workers, interval=0.5)
        join_s = time.monotonic() - started
        baseline = [round_counts(metrics(i)) for i in range(2)]
        began = time.monotonic()
        timeline, last = [], baseline
        while time.monotonic() - began < minutes * 60:
            time.sleep(2.0)
            now = [round_counts(m) if (m := metrics(i)) else last[i] for i in range(2)]
            for i in range(2):
                changed = {o: now[i][o] - last[i][o] for o in ROUND_OUTCOMES if now[i][o] != last[i][o]}
                if any(o != "success" for o in changed):
                    timeline.append({"t_s": round(time.monotonic() - began, 1), "peer": f"p{i}", **changed})
            last = now
        final = [round_counts(metrics(i)) for i in range(2)]
        epochs = [metrics(i).get(PEER_EPOCH) for i in range(2)]
        logs = {f"p{i}": workers[i].log_path for i in range(2)}
    after = [{o: final[i][o] - baseline[i][o] for o in ROUND_OUTCOMES} for i in range(2)]
    return {
        "minutes": minutes,
        "join_to_state_s": join_s,
        "rounds_after_join": {f"p{i}": after[i] for i in range(2)},
        "rounds_before_join": {f"p{i}": baseline[i] for i in range(2)},
        "missed_timeline": timeline,
        "epochs_at_end": epochs,
        "warning_lines": {
            name: [
                line
                for line in path.read_text(errors="replace").splitlines()
                if "WARNING" in line or BAD_LINE.search(line)
            ][-20:]  # fmt: skip
            for name, path in logs.items()
        },
    }


# --- the scenario ---------------------------------------------------------------------------------------------------


def _exit_s(stop: dict) -> float:
    return stop["exit_s"] if stop["exit_s"] is not None else float("inf")  # still running: SIGKILLed, a miss


def _between(stop: dict, start: str, end: str | None) -> float | None:
    """Seconds between two marks of a stop's log (``end`` None: the exit); None where either is missing."""
    marks = stop["marks_s"]
    finish = stop["exit_s"] if end is None else marks.get(end)
    return finish - marks[start] if start in marks and finish is not None else None


def build_rows(stops: list[dict], rounds: dict | None) -> list[dict]:
    """Rows of both figures: figure 1 one value per repetition (``None`` for a failed one), figure 2 one value."""
    rows = []
    if stops:
        ok = [s for s in stops if "error" not in s]
        prefix = f"group SIGTERM mid-round at {MBIT} Mbit/s"

        def each(f):
            return [f(s) if "error" not in s else None for s in stops]

        rows += [
            {"metric": f"{prefix}: seconds to exit", "unit": "s", "goal": f"<= {EXIT_GOAL_S:g}",
             "values": each(_exit_s)},
            {"metric": f"{prefix}: exit code 0 (1 = yes)", "goal": ">= 1",
             "values": each(lambda s: float(s["exit_code"] == 0))},
            {"metric": f"{prefix}: state saved at ≥ the step before (1 = yes)", "goal": ">= 1",
             "values": each(lambda s: float(s["state_saved"]))},
            {"metric": "ERROR/Traceback lines when the process group gets SIGTERM (mid-round)", "goal": "<= 0",
             "values": each(lambda s: float(len(s["bad_lines"])))},
            {"metric": f"{prefix}: processes left {LEFTOVER_WAIT_S:g} s after the exit", "goal": "<= 0",
             "values": each(lambda s: float(s["left_over"]))},
        ]  # fmt: skip
        met = [
            s["exit_code"] == 0
            and s["exit_s"] is not None
            and s["exit_s"] <= EXIT_GOAL_S
            and s["state_saved"]
            and not s["bad_lines"]
            and s["left_over"] == 0
            for s in ok
        ]
        rows.append({"metric": f"{prefix}: repetitions meeting every goal ÷ repetitions", "goal": ">= 1",
                     "values": [sum(met) / len(stops)], "headline": True})  # fmt: skip
        rows += [
            {"metric": f"{prefix}: seconds from the signal to the round's end (or abandonment)", "unit": "s",
             "values": each(lambda s: s["marks_s"].get("round_ended"))},
            {"metric": f"{prefix}: seconds from the round's end to the end of the shutdown", "unit": "s",
             "values": each(lambda s: _between(s, "round_ended", "left"))},
            {"metric": f"{prefix}: seconds from the end of the shutdown to the exit", "unit": "s",
             "values": each(lambda s: _between(s, "left", None))},
            {"metric": "the other peer, group SIGTERM next (its groupmate gone): seconds to exit", "unit": "s",
             "goal": f"<= {EXIT_GOAL_S:g}", "values": each(lambda s: _exit_s(s["other"]))},
            {"metric": "the other peer: exit code 0 and state saved (1 = yes)", "goal": ">= 1",
             "values": each(lambda s: float(s["other"]["exit_code"] == 0 and s["other"]["state_saved"]))},
            {"metric": "the other peer: ERROR/Traceback lines in its log", "goal": "<= 0",
             "values": each(lambda s: float(len(s["other"]["bad_lines"])))},
        ]  # fmt: skip
    if rounds is not None and "error" not in rounds:
        after = rounds["rounds_after_join"].values()
        label = f"2 peers, {rounds['minutes']:g} min after the join (both peers)"
        rows += [
            {"metric": f"{label}: rounds not successful (solo + failed)", "goal": "<= 0",
             "values": [float(sum(a["solo"] + a["failed"] for a in after))]},
            {"metric": f"{label}: solo rounds", "values": [float(sum(a["solo"] for a in after))]},
            {"metric": f"{label}: failed rounds", "values": [float(sum(a["failed"] for a in after))]},
            {"metric": f"{label}: successful rounds", "values": [float(sum(a["success"] for a in after))]},
        ]  # fmt: skip
    return rows


FIGURES_ENV = "BENCH_STOPPING_FIGURES"


def selected_figures() -> set[int]:
    """The figures ``BENCH_STOPPING_FIGURES`` names (comma-separated: ``1``, ``2``); unset or empty: both."""
    value = os.environ.get(FIGURES_ENV, "").strip()
    if not value:
        return {1, 2}
    figures = {part.strip() for part in value.split(",") if part.strip()}
    if not figures or not figures <= {"1", "2"}:
        raise ValueError(f"{FIGURES_ENV}={value!r}: name figures 1 and/or 2, comma-separated")
    return {int(figure) for figure in figures}


def run(workdir, reps: int, quick: bool) -> dict:
    workdir = Path(workdir)
    notes, raw = [], {"stops": [], "rounds": None}
    figures = selected_figures()
    reason = slowlink.unavailable()
    if 1 not in figures:
        notes.append(f"Figure 1 not run ({FIGURES_ENV}={os.environ[FIGURES_ENV]}).")
    elif reason:
        notes.append(f"Figure 1 skipped: {reason}.")
    else:
        with slowlink.Link() as link:
            link.rate(MBIT)
            for rep in range(reps):
                try:
                    raw["stops"].append(stop_mid_round(workdir, link, rep))
                except RuntimeError as e:  # a repetition that never reached a round in flight: recorded, not hidden
                    raw["stops"].append({"error": str(e)[-3000:]})
    minutes = ROUNDS_MINUTES_QUICK if quick else ROUNDS_MINUTES
    tiny = PRESETS["tiny"]
    if 2 not in figures:
        notes.append(f"Figure 2 not run ({FIGURES_ENV}={os.environ[FIGURES_ENV]}).")
    else:
        try:
            raw["rounds"] = rounds_after_join(workdir, minutes)
        except RuntimeError as e:
            raw["rounds"] = {"error": str(e)[-3000:]}
    failed = [s["error"].splitlines()[0] for s in raw["stops"] if "error" in s]
    if failed:
        notes.append(f"Figure 1: {len(failed)} of {reps} repetitions failed before the signal: {'; '.join(failed)}.")
    if raw["rounds"] is not None and "error" in raw["rounds"]:
        notes.append(f"Figure 2 failed: {raw['rounds']['error'].splitlines()[0]}.")
    notes += [note for figure, note in enumerate(_figure_notes(tiny), start=1) if figure in figures]
    return {
        "config": {
            "mbit": MBIT,
            "stop_peer_args": STOP_PEER_ARGS,
            "rounds_minutes": minutes,
            "figures": sorted(figures),
        },
        "rows": build_rows(raw["stops"], raw["rounds"]),
        "raw": raw,
        "notes": notes,
    }


def _figure_notes(tiny) -> list[str]:
    return [
        f"Figure 1: mini preset (5.5M parameters, 22 MB of fp32 gradients per round), batch 8 × 64 tokens, global "
        f"batch 64, 1 thread per peer, `--save-every 0` (the state is saved only on the way out); {MBIT} Mbit/s tbf "
        "(burst 64 kB, latency 100 ms) on both veth ends. The signal goes to the peer's process group "
        f"(`os.killpg`) as soon as its probe reports `{ROUND_STAGE}` after its first step; the stopped peer "
        f"alternates between the first peer and the joiner. The scenario SIGKILLs a peer still running "
        f"{EXIT_WAIT_S:g} s after the signal (seconds to exit: inf).",
        f"Figure 2: tiny preset with the product's defaults (matchmaking {PeerConfig.matchmaking_time:g} s, averaging "
        f"timeout {PeerConfig.averaging_timeout:g} s, batch {tiny.batch_size}, global batch {tiny.target_batch_size}, "
        "the embedded corpus), `--threads 1`, on 127.0.0.1; the second peer joins after the first "
        f"reached step {ROUNDS_FIRST_STEPS}; rounds are counted from the moment it holds the swarm's state (state "
        "downloaded or first sample contributed) for the stated minutes, from both peers' "
        f"`{ROUNDS_METRIC}{{outcome}}`. One run; the repetitions apply to figure 1.",
    ]
