"""Scenario 4: join latency of a real ``bertswarm-peer --join`` process (the product CLI, default tiny run) into a
running swarm: process start → holding the swarm's state → first counted contribution (its first micro-batch accepted
by the swarm optimizer), with the state size and download throughput. Read from the peers' Prometheus metrics."""

from __future__ import annotations

import re
import statistics
import time
import urllib.request

from bench.common import free_port
from peer.localswarm import LocalPeer

NAME = "join"
TITLE = "4. Join latency"
PARAMS = 1_536_128  # tiny preset with the 8192-token vocab (checked against the model in run())


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return None
    match = re.search(rf"^{name} ([0-9.eE+-]+)$", text, re.M)
    return float(match.group(1)) if match else None


def one(workdir, rep: int, first_epoch: int) -> dict:
    pa, pb = free_port(), free_port()
    common = ["--threads", "1", "--save-every", "0", "--log-every", "1"]
    a = LocalPeer(f"a{rep}", workdir, [*common, "--run-id", f"join{rep}", "--metrics-port", str(pa)])
    peers = [a]
    try:
        address = a.wait_for_join_address(60)
        epochs: list[tuple[float, float]] = []
        deadline = time.monotonic() + 120
        while (metric(pa, "bertswarm_peer_epoch") or 0) < first_epoch:
            if time.monotonic() > deadline or not a.alive():
                raise RuntimeError(f"first peer did not reach step {first_epoch}:\n{a.log_tail()}")
            time.sleep(0.2)
        started = time.monotonic()
        b = LocalPeer(f"b{rep}", workdir, [*common, "--join", address, "--metrics-port", str(pb)])
        peers.append(b)
        t_state = t_contrib = t_line = None
        last_epoch = None
        while time.monotonic() - started < 90 and (t_contrib is None or time.monotonic() - started < t_contrib + 2):
            now = time.monotonic() - started
            epoch = metric(pa, "bertswarm_peer_epoch")
            if epoch is not None and (not epochs or epoch != last_epoch):
                epochs.append((now, epoch))
                last_epoch = epoch
            if t_line is None and b.join_address is not None:
                t_line = now
            if t_state is None and (metric(pb, "bertswarm_peer_state_downloads_total") or 0) >= 1:
                t_state = now
            if t_contrib is None and (metric(pb, "bertswarm_peer_samples_total") or 0) > 0:
                t_contrib = now
            time.sleep(0.1)
        download_s = metric(pb, "bertswarm_peer_state_download_seconds")
        intervals = [t2 - t1 for (t1, _), (t2, _) in zip(epochs, epochs[1:], strict=False)]
        return {
            "to_join_line_s": t_line,
            "to_state_s": t_state,
            "to_contribution_s": t_contrib,
            "download_s": download_s,
            "step_s": statistics.median(intervals) if intervals else None,
            "epochs": epochs,
        }
    finally:
        for p in peers:
            p.stop(timeout=15)


def run(workdir, reps: int, quick: bool) -> dict:
    from bench.workload import make_manifest, model_for
    from peer.run.model import count_parameters

    params = count_parameters(model_for(make_manifest("join")))
    state_bytes = 3 * params * 4  # weights + Adam's two moments, fp32
    raw = [one(workdir / "join", rep, first_epoch=1 if quick else 2) for rep in range(reps)]
    rows = [
        {
            "metric": "process start → in the DHT with the run's manifest (join line printed)",
            "values": [r["to_join_line_s"] for r in raw],
            "unit": "s",
        },
        {"metric": "process start → holding the swarm's state", "values": [r["to_state_s"] for r in raw], "unit": "s"},
        {
            "metric": "process start → first counted contribution",
            "values": [r["to_contribution_s"] for r in raw],
            "unit": "s",
        },
        {
            "metric": "(first contribution) ÷ (one global step + 10 s)",
            "values": [
                r["to_contribution_s"] / (r["step_s"] + 10) if r["to_contribution_s"] and r["step_s"] else None
                for r in raw
            ],
            "goal": "<= 1.0",
        },
        {"metric": "global step (first peer's epoch interval)", "values": [r["step_s"] for r in raw], "unit": "s"},
        {"metric": "state download (inside the joiner)", "values": [r["download_s"] for r in raw], "unit": "s"},
        {
            "metric": "state download throughput",
            "values": [state_bytes / r["download_s"] / 1e6 if r["download_s"] else None for r in raw],
            "unit": "MB/s",
        },
    ]
    notes = [
        f"`bertswarm-peer` defaults (tiny preset, global batch 256), 1 thread per peer, one running peer; the joiner "
        f"starts once that peer is at step ≥ {1 if quick else 2}. State = weights + Adam moments, "
        f"{state_bytes / 1e6:.1f} MB ({params / 1e6:.2f}M parameters).",
        "Times are from `Popen` of the joiner, so they include Python/torch import, tokenising the corpus and the "
        "p2p daemon's start-up; read from the joiner's metrics endpoint polled every 0.1 s.",
    ]
    return {"config": {"preset": "tiny", "state_bytes": state_bytes}, "rows": rows, "raw": raw, "notes": notes}
