"""Scenario 1: samples/s of a 2-peer swarm (1 thread each) vs one process (2 threads) vs DDP-gloo (2 ranks, no_sync
accumulation to the same global batch). Arms are interleaved (their order rotates every repetition)."""

from __future__ import annotations

import statistics

from bench import arms

NAME = "throughput"
TITLE = "1. Throughput: swarm vs single process vs DDP-gloo"


def config(quick: bool) -> dict:
    return dict(preset="tiny", seq_len=128, batch=16, target=128 if quick else 256, steps=3)


def run(workdir, reps: int, quick: bool) -> dict:
    cfg = config(quick)
    target = cfg["target"]
    order = ["swarm", "single", "ddp"]
    raw = {arm: [] for arm in order}
    per_rep = []
    for rep in range(reps):
        rates, averaging = {}, None
        for arm in order[rep % 3 :] + order[: rep % 3]:
            if arm == "swarm":
                records = arms.run_swarm(workdir, cfg, 2, timeout=300)
                rounds = [s for r in records for outcome, _, s in r["rounds"][1:] if outcome == "success"]
                averaging = statistics.mean(rounds) if rounds else float("nan")
            elif arm == "single":
                records = [arms.run_single(workdir, cfg, threads=2, timeout=300)]
            else:
                records = arms.run_ddp(workdir, cfg, 2, timeout=300)
            rates[arm] = arms.samples_per_second(records, target)
            raw[arm].append(
                {
                    "samples_per_s": rates[arm],
                    "steps": [r["steps"] for r in records],
                    "rounds": [r.get("rounds") for r in records],
                    "micro_batches": [r.get("micro_batches") for r in records],
                    "micro_batches_per_step": [
                        {e: len(v) for e, v in r.get("contributions", {}).items()} for r in records
                    ],
                    "compute_s": [r.get("compute_s") for r in records],
                    "opt_step_s": [r.get("opt_step_s") for r in records],
                    "wall_s": [r.get("wall_s") for r in records],
                }
            )
        step_s = target / rates["swarm"]
        per_rep.append({**rates, "averaging_s": averaging, "step_s": step_s})
    rows = [
        {
            "metric": "swarm ÷ single (samples/s)",
            "values": [r["swarm"] / r["single"] for r in per_rep],
            "goal": ">= 0.97",
        },
        {"metric": "swarm ÷ DDP (samples/s)", "values": [r["swarm"] / r["ddp"] for r in per_rep], "goal": ">= 1.0"},
        {"metric": "swarm samples/s", "values": [r["swarm"] for r in per_rep], "unit": "samples/s"},
        {"metric": "single samples/s", "values": [r["single"] for r in per_rep], "unit": "samples/s"},
        {"metric": "DDP samples/s", "values": [r["ddp"] for r in per_rep], "unit": "samples/s"},
        {
            "metric": "swarm: averaging-call time per step ÷ step time",
            "values": [r["averaging_s"] / r["step_s"] for r in per_rep],
        },
    ]
    notes = [
        f"tiny preset ({cfg['seq_len']} tokens, micro-batch {cfg['batch']}), global batch {target} in every arm; "
        f"{cfg['steps']} global steps per arm, rate measured from step 1 to the last (start-up and step 0 excluded).",
        "Swarm samples/s counts the global batch per step (samples a peer adds beyond the target are not counted).",
    ]
    return {"config": cfg, "rows": rows, "raw": raw, "per_rep": per_rep, "notes": notes}
