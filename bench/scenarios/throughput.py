"""Scenario 1: samples/s of a 2-peer swarm (1 thread each) vs one process (2 threads) vs DDP-gloo (2 ranks, no_sync
accumulation to the same global batch). Arms are interleaved (their order rotates every repetition)."""

from __future__ import annotations

import os
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
        rates, per_micro, beside, averaging, overshoot = {}, {}, {}, None, None
        for arm in order[rep % 3 :] + order[: rep % 3]:
            if arm == "swarm":
                records = arms.run_swarm(workdir, cfg, 2, timeout=300)
                rounds = [s for r in records for outcome, _, s in r["rounds"][1:] if outcome == "success"]
                averaging = statistics.mean(rounds) if rounds else float("nan")
                overshoot = _overshoot(records, target // cfg["batch"])
            elif arm == "single":
                records = [arms.run_single(workdir, cfg, threads=2, timeout=300)]
            else:
                records = arms.run_ddp(workdir, cfg, 2, timeout=300)
            rates[arm] = arms.samples_per_second(records, target)
            per_micro[arm] = _seconds_per_micro_batch(records)
            beside[arm] = _cpu_beside_training(records)
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
                    "compute_cpu_s": [r.get("compute_cpu_s") for r in records],
                    "cpu_during_training": [r.get("cpu_during_training") for r in records],
                    "phases": [r.get("phases") for r in records],
                    "wall_s": [r.get("wall_s") for r in records],
                    "loadavg_1m_after": os.getloadavg()[0],
                }
            )
        step_s = target / rates["swarm"]
        per_rep.append(
            {
                **rates,
                "averaging_s": averaging,
                "step_s": step_s,
                "overshoot": overshoot,
                "per_micro_s": per_micro,
                "cpu_beside_training": beside,
            }
        )
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
        {
            "metric": "swarm: micro-batches computed per step ÷ needed (overshoot)",
            "values": [r["overshoot"] for r in per_rep],
        },
        {
            "metric": "forward/backward time per micro-batch: swarm peer ÷ DDP rank (1 thread each)",
            "values": [r["per_micro_s"]["swarm"] / r["per_micro_s"]["ddp"] for r in per_rep],
        },
        *[
            {
                "metric": f"{arm}: CPU of helper processes and threads ÷ CPU of the training thread",
                "values": [r["cpu_beside_training"][arm] for r in per_rep],
            }
            for arm in ("swarm", "ddp")
        ],
        *[
            {
                "metric": f"forward/backward time per micro-batch: {arm}",
                "values": [r["per_micro_s"][arm] for r in per_rep],
                "unit": "s",
            }
            for arm in order
        ],
    ]
    notes = [
        f"tiny preset ({cfg['seq_len']} tokens, micro-batch {cfg['batch']}), global batch {target} in every arm; "
        f"{cfg['steps']} global steps per arm, rate measured from step 1 to the last (start-up and step 0 excluded).",
        "Swarm samples/s counts the global batch per step (samples a peer adds beyond the target are not counted).",
        "Swarm peers are the product's `Trainer`, stepped with `Trainer.step`. Forward/backward time per micro-batch: "
        "wall time of fetching a micro-batch, forward and backward (swarm: `Trainer.step` up to its optimizer call, "
        "so also the finite-gradient check), averaged over a process's micro-batches (DDP: the no_sync ones; single: "
        "2 intra-op threads, the others 1). "
        "Overshoot: micro-batches that entered steps 1.. ÷ (global batch ÷ micro-batch).",
        "Helper CPU (from /proc, during the training loop, per process and averaged over peers/ranks): a swarm peer's "
        "DHT process, gradient and state averager processes, p2pd and background threads; a DDP rank's gloo and "
        "autograd threads. Per helper in the raw JSON (`cpu_during_training`).",
    ]
    return {"config": cfg, "rows": rows, "raw": raw, "per_rep": per_rep, "notes": notes}


def _seconds_per_micro_batch(records: list[dict]) -> float:
    timed = [(r["compute_s"], r["micro_batches"]) for r in records if r.get("micro_batches")]
    return sum(s for s, _ in timed) / sum(n for _, n in timed) if timed else float("nan")


def _overshoot(records: list[dict], needed: int) -> float:
    """Micro-batches all peers put into each global step after step 0 (the tracker's warm-up), ÷ ``needed``."""
    per_step: dict[str, int] = {}
    for r in records:
        for epoch, ks in r.get("contributions", {}).items():
            if int(epoch) > 0:
                per_step[epoch] = per_step.get(epoch, 0) + len(ks)
    return statistics.mean(per_step.values()) / needed if per_step else float("nan")


def _cpu_beside_training(records: list[dict]) -> float:
    """Mean over processes of (CPU of their other threads + descendant processes) ÷ CPU of their training thread."""
    ratios = []
    for r in records:
        cpu = r.get("cpu_during_training")
        if cpu and cpu["main_thread_s"] > 0:
            ratios.append((cpu["other_threads_s"] + cpu["children_total_s"]) / cpu["main_thread_s"])
    return statistics.mean(ratios) if ratios else float("nan")
