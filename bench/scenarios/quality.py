"""Scenario 3: held-out MLM loss after the same samples, swarm (2 and 4 peers, fp32; 2 peers with fp16 gradients)
vs one process replaying exactly the swarm's global batches (each peer records which of its micro-batches entered
which global step; the reference regenerates them from the same deterministic streams)."""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor

from bench import arms

NAME = "quality"
TITLE = "3. Quality parity: held-out MLM loss, swarm vs one process on the same global batches"


def config(quick: bool) -> dict:
    return dict(preset="tiny", seq_len=64, batch=16, target=128, warmup=3, steps=3 if quick else 4, eval=True)


def run(workdir, reps: int, quick: bool) -> dict:
    cfg = config(quick)
    arms_list = [("2 peers fp32", 2, None), ("4 peers fp32", 4, None), ("2 peers fp16", 2, "fp16")]
    if quick:
        arms_list = arms_list[:1]
    swarms = []  # (label, the swarm's records), in the order they ran
    for rep in range(reps):
        for label, peers, compression in arms_list[rep % len(arms_list) :] + arms_list[: rep % len(arms_list)]:
            swarms.append((label, arms.run_swarm(workdir, {**cfg, "compression": compression}, peers, timeout=400)))

    def replay(records: list[dict]) -> dict:
        # one thread each: the reference's speed is not measured, only its loss
        return arms.run_single(workdir, cfg, threads=1, timeout=300, replay=[r["path"] for r in records])

    # the references replay recorded batches deterministically, so they run two at a time once the swarms are done
    with ThreadPoolExecutor(max_workers=2) as pool:
        references = list(pool.map(replay, [records for _, records in swarms]))
    raw = {label: [] for label, _, _ in arms_list}
    for (label, records), reference in zip(swarms, references, strict=True):
        raw[label].append(
            {
                "swarm_loss": statistics.mean(r["heldout_loss"] for r in records),
                "peer_losses": [r["heldout_loss"] for r in records],
                "reference_loss": reference["heldout_loss"],
                "samples": reference["samples"],
                "rounds": [r["rounds"] for r in records],
                "state_loads": [r["state_loads"] for r in records],
            }
        )
    rows = []
    for label, _, compression in arms_list:
        rows.append(
            {
                "metric": f"{label}: swarm ÷ reference held-out loss",
                "values": [r["swarm_loss"] / r["reference_loss"] for r in raw[label]],
                "goal": None if compression else "<= 1.01",
            }
        )
        rows.append({"metric": f"{label}: swarm held-out loss", "values": [r["swarm_loss"] for r in raw[label]]})
    rows.append(
        {
            "metric": "reference held-out loss (2 peers fp32 batches)",
            "values": [r["reference_loss"] for r in raw[arms_list[0][0]]],
        }
    )
    first = raw[arms_list[0][0]][0]
    notes = [
        f"tiny preset, {cfg['seq_len']} tokens, micro-batch {cfg['batch']}, global batch {cfg['target']}, "
        f"{cfg['steps']} global steps (~{first['samples']} samples), warm-up {cfg['warmup']} steps; held-out loss on "
        "8×32 held-out sequences with fixed masking, mean over the swarm's peers.",
        "Dropout (0.1, the product's setting) is live in both arms, so the comparison is statistical, not bit-exact; "
        "the fp16 arm's reference replays its batches in fp32, so its ratio is what fp16 gradient averaging costs.",
    ]
    return {"config": cfg, "rows": rows, "raw": raw, "notes": notes}
