"""Scenario 12: what robust aggregation costs without attackers. One averaging round of the mini preset's gradients at
4 peers, hivemind's own averager vs the product's reducer (``peer.swarm.robust``) with the plain mean, the default
``clipped-mean`` and ``centered-clip``, arms interleaved round by round in one swarm."""

from __future__ import annotations

import statistics

from bench import averaging
from bench.avg_worker import MAX_RELATIVE_ERROR, ROBUST_EXTRA_ERROR

NAME = "robust"
TITLE = "12. Robust aggregation: cost without attackers"
PEERS = 4
ARMS = ["none", "none@mean", "none@clipped-mean", "none@centered-clip"]  # "none": hivemind's own averager


def run(workdir, reps: int, quick: bool) -> dict:
    preset = "tiny" if quick else "mini"
    rounds = max(4, reps + 1)
    results = averaging.run_hivemind(workdir, PEERS, preset, ARMS, rounds + 1, timeout=300)
    times = {name: averaging.round_times(results, name)[1:] for name in ARMS}  # the first round warms up
    rows = []
    for name in ARMS[1:]:
        rule = name.partition("@")[2]
        ratios = [t / h for t, h in zip(times[name], times["none"], strict=False)]
        row = {"metric": f"round time, {rule} ÷ hivemind's mean", "values": ratios}
        if rule == "clipped-mean":
            row["goal"] = "<= 1.10"
        rows.append(row)
    for name in ARMS:
        label = "hivemind's mean" if name == "none" else name.partition("@")[2]
        rows.append({"metric": f"round, {label}", "values": times[name], "unit": "s"})
        failed = averaging.failed_rounds(results, name)
        if failed:
            rows[-1]["note"] = f"{failed} failed rounds"
    rows.append(
        {
            "metric": "clipped-mean: averaged vector's relative error vs the true mean (no attacker)",
            "values": averaging.relative_errors(results, "none@clipped-mean")[1:],
        }
    )
    notes = [
        f"{preset} preset gradients ({results[0]['numel'] / 1e6:.2f}M values, fp32, no compression), {PEERS} peers on "
        "loopback; round = group formed → averaged tensors in place, mean over the group's peers; the ratio is taken "
        "round by round (same round index of both arms).",
        "The tensors are independent Gaussians per peer, so part norms differ only by sampling noise: clipped-mean "
        "scales the parts above the median norm down to it, a small deviation from the mean (last row). A round "
        f"counts as failed if its relative error exceeds {MAX_RELATIVE_ERROR['none']:g}, or "
        f"{MAX_RELATIVE_ERROR['none'] + ROBUST_EXTRA_ERROR:g} for the robust rules.",
        f"median hivemind round: {statistics.median(times['none']) if times['none'] else float('nan'):.3f} s.",
    ]
    return {"config": {"preset": preset, "rounds": rounds, "peers": PEERS}, "rows": rows, "raw": results,
            "notes": notes}  # fmt: skip
