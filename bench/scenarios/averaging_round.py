"""Scenario 2: one averaging round of the model's gradients, hivemind (none / fp16 / 8-bit) at 2 and 4 peers vs a
gloo all-reduce of the same tensor vs the ideal (bytes each peer moves ÷ loopback bandwidth measured in this run)."""

from __future__ import annotations

import statistics

from bench import averaging
from bench.avg_worker import MAX_RELATIVE_ERROR

NAME = "averaging_round"
TITLE = "2. Averaging round: hivemind vs gloo vs ideal"
COMPRESSIONS = ["none", "fp16", "int8"]
GLOO_DTYPE = {"none": "fp32", "fp16": "fp16", "int8": "fp32"}


def run(workdir, reps: int, quick: bool) -> dict:
    preset = "tiny" if quick else "mini"
    rounds = max(3, reps)
    rows, raw = [], {}
    bandwidths = []
    for peers in (2, 4):
        bandwidths.append(averaging.loopback_bandwidth(workdir, 256 if quick else 1024))
        hm = averaging.run_hivemind(workdir, peers, preset, COMPRESSIONS, rounds + 1, timeout=300)
        gloo = averaging.run_gloo(workdir, peers, preset, rounds + 1, timeout=300)
        bandwidths.append(averaging.loopback_bandwidth(workdir, 256 if quick else 1024))
        numel = hm[0]["numel"]
        bw = statistics.median(bandwidths[-2:])
        raw[f"{peers}_peers"] = {"hivemind": hm, "gloo": gloo, "loopback_Bps": bandwidths[-2:]}
        for c in COMPRESSIONS:
            times = averaging.round_times(hm, c)[1:]  # the first round also warms up connections
            gloo_times = gloo[GLOO_DTYPE[c]][1:]
            ideal = averaging.bytes_moved_per_peer(numel, peers, c) / bw
            rows.append(
                {
                    "metric": f"{peers} peers, {c}: η = ideal ÷ measured",
                    "values": [ideal / t for t in times],
                    "goal": ">= 0.25",
                }
            )
            rows.append(
                {
                    "metric": f"{peers} peers, {c}: hivemind ÷ gloo-{GLOO_DTYPE[c]} (time)",
                    "values": [t / g for t, g in zip(times, gloo_times, strict=False)],
                }
            )
            rows.append({"metric": f"{peers} peers, {c}: hivemind round", "values": times, "unit": "s"})
            if averaging.failed_rounds(hm, c):
                rows[-1]["note"] = f"{averaging.failed_rounds(hm, c)} failed rounds"
            rows.append(
                {
                    "metric": f"{peers} peers, {c}: averaged vector's relative error vs the true mean",
                    "values": averaging.relative_errors(hm, c)[1:],
                }
            )
        rows.append({"metric": f"{peers} peers: gloo fp32 all-reduce", "values": gloo["fp32"][1:], "unit": "s"})
    notes = [
        f"{preset} preset gradients ({raw['2_peers']['hivemind'][0]['numel'] / 1e6:.2f}M values, fp32). Round = group "
        "formed → averaged tensors in place (matchmaking excluded), mean over the group's peers; gloo = all_reduce, "
        "slowest rank. Ideal = 2(n-1)/n × vector bytes ÷ one TCP stream's loopback bandwidth, "
        f"measured around each arm: median {statistics.median(bandwidths) / 1e9:.2f} GB/s.",
        "hivemind ÷ gloo compares 8-bit hivemind against gloo fp32 (gloo has no 8-bit all-reduce) and fp16 with fp16.",
        "Compressions alternate round by round inside one swarm (interleaved); the first round of each is dropped.",
        "Every peer checks each round's result against the true mean of all peers' initial tensors (it regenerates "
        "them): a round counts as failed if it raised or if its relative L2 error exceeds "
        + ", ".join(f"{limit:g} ({name})" for name, limit in MAX_RELATIVE_ERROR.items())
        + ", since hivemind reports success even when a groupmate's parts were not used.",
    ]
    return {"config": {"preset": preset, "rounds": rounds}, "rows": rows, "raw": raw, "notes": notes}
