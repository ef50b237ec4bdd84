"""Scenario 7: how one averaging round's time and memory grow with model size (tiny → mini → base) and with peers
(2 → 4 → 8). Compute is not simulated at all here: peers only average gradient-shaped tensors (no training), which
is what lets 8 peers fit on 2 cores."""

from __future__ import annotations

import statistics

from bench import averaging

NAME = "scaling"
TITLE = "7. Scaling of an averaging round's cost"


def grid(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("tiny", 2), ("tiny", 4)]
    return [("tiny", 2), ("tiny", 4), ("tiny", 8), ("mini", 2), ("mini", 4), ("mini", 8), ("base", 2)]


def run(workdir, reps: int, quick: bool) -> dict:
    rounds = max(3, reps)
    raw, rows = {}, []
    for preset, peers in grid(quick):
        results = averaging.run_hivemind(workdir, peers, preset, ["none"], rounds + 1, timeout=600)
        times = averaging.round_times(results, "none")[1:]
        rss = [r["peak_rss_bytes"] / 2**20 for r in results]
        raw[f"{preset}-{peers}"] = {
            "numel": results[0]["numel"],
            "times": times,
            "rss_mib": rss,
            "failed": averaging.failed_rounds(results, "none"),
            "errors": sorted({e["error"] for r in results for e in r["rounds"]["none"] if e.get("error")}),
            "relative_errors": averaging.relative_errors(results, "none"),
        }
        mb = results[0]["numel"] * 4 / 1e6
        rows.append({"metric": f"{preset} ({mb:.0f} MB fp32), {peers} peers: round", "values": times, "unit": "s"})
        rows.append(
            {
                "metric": f"{preset}, {peers} peers: round throughput per peer",
                "values": [averaging.bytes_moved_per_peer(results[0]["numel"], peers, "none") / t / 1e6 for t in times],
                "unit": "MB/s",
            }
        )
        rows.append(
            {
                "metric": f"{preset}, {peers} peers: peak RSS per peer (median of peers)",
                "values": [statistics.median(rss)],
                "unit": "MiB",
            }
        )
    notes = [
        "No compression. Peak RSS sums VmHWM over each peer's process tree (its DHT and averager processes and p2pd; "
        "shared-memory tensors count once per process that touched them). base runs with 2 peers only: more copies of "
        "its 92M-parameter buffers do not fit 2 shared cores in the scenario's ~5 minutes.",
        "Round throughput per peer = 2(n-1)/n × vector bytes ÷ round time.",
    ]
    return {"config": {"grid": grid(quick), "rounds": rounds}, "rows": rows, "raw": raw, "notes": notes}
