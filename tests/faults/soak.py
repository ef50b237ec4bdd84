"""9. Soak (``make soak``, not in CI): ``python -m tests.faults.soak --minutes 30``.

4 peers train for ``--minutes``; every ``--churn-every`` seconds one random peer is SIGKILLed (with its p2pd) and
restarted on its state dir. Sampled every 10 s: each peer's RSS and open file descriptors (main process), its rounds
by outcome, loss and step. Then a no-churn swarm trains for the same time. Writes ``docs/soak.json`` and refreshes
``docs/reliability.md``. Fails (exit 1) if a peer's RSS or fd count grows by more than 25% / 20 fds between the first
and the last third of its process lives.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.faults import report
from tests.integration.conftest import Swarm, write_small_corpus

PEERS = 4
SAMPLE_EVERY = 10.0


def proc_figures(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open fds) of one process; (nan, -1) if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return float("nan"), -1


def run_swarm(workdir: Path, corpus: Path, seconds: float, churn_every: float | None, rng: random.Random) -> dict:
    swarm = Swarm(workdir, corpus)
    samples: list[dict] = []
    restarts = 0
    try:
        first = swarm.start("s0")
        first.wait_for_join_address(90)
        live = {"s0": first} | {f"s{i}": swarm.start(f"s{i}", join=first) for i in range(1, PEERS)}
        started = time.monotonic()
        next_churn = started + churn_every if churn_every else float("inf")
        next_sample = started
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            if now >= next_churn:
                name = rng.choice(sorted(live))
                live[name].kill_group(signal.SIGKILL)
                live[name].wait(timeout=15)
                via = rng.choice([p for n, p in live.items() if n != name])
                live[name] = swarm.start(name, join=via)  # same state dir: it resumes, then syncs
                restarts += 1
                next_churn += churn_every
            if now >= next_sample:
                for name, peer in live.items():
                    rss, fds = proc_figures(peer.proc.pid)
                    row = {"t": now - started, "peer": name, "pid": peer.proc.pid, "rss_mib": rss, "fds": fds}
                    try:
                        text = peer.metrics(swarm.ports[name])
                        for key in ("success", "failed", "solo"):
                            row[key] = _sample(text, f'bertswarm_peer_averaging_rounds_total{{outcome="{key}"}}')
                        row["loss"] = _sample(text, "bertswarm_peer_loss")
                        row["epoch"] = _sample(text, "bertswarm_peer_epoch")
                    except OSError:
                        pass  # just restarted: its metrics endpoint is not up yet
                    samples.append(row)
                next_sample += SAMPLE_EVERY
            time.sleep(0.5)
    finally:
        swarm.close()
    return summarize(samples, restarts)


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return float("nan")


def summarize(samples: list[dict], restarts: int) -> dict:
    by_pid: dict[int, list[dict]] = {}
    for row in samples:
        by_pid.setdefault(row["pid"], []).append(row)
    rounds = {"success": 0.0, "failed": 0.0}
    for rows in by_pid.values():  # counters restart with each process: add each life's last value
        last = [r for r in rows if "success" in r]
        if last:
            for key in rounds:
                rounds[key] += last[-1][key]
    per_peer: dict[str, dict] = {}
    for rows in by_pid.values():
        rows = [r for r in rows if r["fds"] >= 0]
        if len(rows) < 6:
            continue  # too short a life to compare its thirds
        third = len(rows) // 3
        entry = per_peer.setdefault(rows[0]["peer"], {"rss_first": 0.0, "rss_last": 0.0, "fds_first": 0, "fds_last": 0})
        entry["rss_first"] = max(entry["rss_first"], max(r["rss_mib"] for r in rows[third : 2 * third]))
        entry["rss_last"] = max(entry["rss_last"], max(r["rss_mib"] for r in rows[2 * third :]))
        entry["fds_first"] = max(entry["fds_first"], max(r["fds"] for r in rows[third : 2 * third]))
        entry["fds_last"] = max(entry["fds_last"], max(r["fds"] for r in rows[2 * third :]))
    final = [r for r in samples[-PEERS * 3 :] if r.get("loss", float("nan")) == r.get("loss")]
    total = rounds["success"] + rounds["failed"]
    return {
        "restarts": restarts,
        "rounds": rounds,
        "successful_round_share": rounds["success"] / total if total else float("nan"),
        "final_loss": sum(r["loss"] for r in final) / len(final) if final else float("nan"),
        "final_epoch": max((r.get("epoch", 0) for r in samples), default=0),
        "per_peer": per_peer,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="length of each run (churn, then no churn)")
    parser.add_argument("--churn-every", type=float, default=120.0, help="seconds between kill-and-restart")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bertswarm-soak-"))
    try:
        corpus = write_small_corpus(workdir / "corpus.txt")
        seconds = 60 * args.minutes
        churn = run_swarm(workdir / "churn", corpus, seconds, args.churn_every, random.Random(args.seed))
        calm = run_swarm(workdir / "calm", corpus, seconds, None, random.Random(args.seed))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    m = report.machine()
    soak = {"date": m["date"], "host": m["host"], "minutes": args.minutes, "churn_every_s": args.churn_every,
            "restarts": churn["restarts"], "churn": churn, "calm": calm}  # fmt: skip
    report.SOAK_RAW.write_text(json.dumps(soak, indent=1) + "\n")
    if report.RAW.exists():
        report.write(json.loads(report.RAW.read_text()))
    print(report.soak_section(soak))
    grew = [name for name, p in churn["per_peer"].items()
            if p["rss_last"] > 1.25 * p["rss_first"] or p["fds_last"] > p["fds_first"] + 20]  # fmt: skip
    if grew:
        print(f"RSS or open fds grew over the process lives of: {', '.join(grew)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
