"""Raw results (JSON) and the ``docs/reliability.md`` table: scenario, repetitions, passes, median / p95 figures."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RAW = REPO / "docs" / "reliability.json"
SOAK_RAW = REPO / "docs" / "soak.json"
DOC = REPO / "docs" / "reliability.md"

ORDER = [
    ("kill_during_allreduce", "1. peer SIGKILLed during an all-reduce (3 peers)"),
    ("bootstrap_dies", "2. bootstrap peer dies; a new peer joins through another"),
    ("late_joiner", "3. late joiner"),
    ("stall", "4. peer stalls (SIGSTOP 25 s > averaging timeout 15 s, SIGCONT)"),
    ("coordinator_killed_mid_checkpoint", "5. coordinator SIGKILLed mid-checkpoint"),
    ("nonfinite_sender", "6. a peer sends NaN/Inf gradients"),
    ("lying_records", "7. a peer lies in its progress and metrics records"),
    ("bad_inputs", "8. bad inputs (one line, exit 2, no traceback, nothing overwritten)"),
]


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "load_at_start": os.getloadavg()[0],
        "commit": commit,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(results: list[dict]) -> dict[str, dict]:
    """{scenario: {reps, passes, figures: {name: (median, p95)}, failures: [first messages]}}"""
    table: dict[str, dict] = {}
    for r in results:
        row = table.setdefault(r["scenario"], {"reps": 0, "passes": 0, "figures": {}, "failures": [], "labels": {}})
        row["reps"] += 1
        row["passes"] += bool(r["passed"])
        if not r["passed"]:
            row["failures"].append(r["error"].splitlines()[0][:200] if r["error"] else "?")
        for key, value in r["figures"].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                row["figures"].setdefault(key, []).append(float(value))
            else:
                row["labels"].setdefault(key, {}).setdefault(str(value), 0)
                row["labels"][key][str(value)] += 1
    for row in table.values():
        row["figures"] = {k: (statistics.median(v), percentile(v, 0.95)) for k, v in row["figures"].items()}
    return table


def _fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def write(raw: dict, path: Path = DOC) -> str:
    table = summarize(raw["results"])
    m = raw["machine"]
    lines = [
        "# Reliability: volunteers crash, lie and leave",
        "",
        "Written by `make faults` (`python -m tests.faults --repeat N`); raw results in `docs/reliability.json`. Each "
        "scenario is in `tests/faults/` (one function per repetition: asserts its properties, returns its figures); "
        "`make test` runs each once. Figures are median / p95 over the repetitions that passed; times in seconds.",
        "",
        f"Last run: {m['date']}, {m['host']}, 1-minute load {m['load_at_start']:.2f} at start, commit {m['commit']}, "
        f"{raw['repeat']} repetitions requested, {raw['minutes']:.0f} min.",
        "",
        "| scenario | reps | passes | figures (median / p95) |",
        "|---|---:|---:|---|",
    ]
    for key, title in ORDER:
        row = table.get(key)
        if row is None:
            lines.append(f"| {title} | 0 | 0 | not run |")
            continue
        figures = [f"{k} {_fmt(a)} / {_fmt(b)}" for k, (a, b) in row["figures"].items()]
        figures += [f"{k}: " + ", ".join(f"{v} x{n}" for v, n in counts.items()) for k, counts in row["labels"].items()]
        lines.append(f"| {title} | {row['reps']} | {row['passes']} | {'; '.join(figures)} |")
    failures = [(k, f) for k, _ in ORDER if k in table for f in table[k]["failures"]]
    if failures:
        lines += ["", "Failed repetitions (first line of the error):", ""]
        lines += [f"- {k}: `{f}`" for k, f in failures]
    lines += ["", "## What the figures mean", ""]
    lines += [
        "- **1** `rounds_lost`: most failed gradient rounds on any survivor after the kill; `next_success_s`: kill to "
        "a survivor's next successful round; `two_steps_s`: kill to every survivor two steps further; "
        "`killed_in_stage`: the victim's averaging stage at the kill (read from the test-only probe).",
        "- **2** `survivors_next_step_s`: bootstrap kill to both survivors a step further; `rejoin_*`: the new "
        "peer, joined through another live peer.",
        "- **3** from the joiner's start: its join line, the swarm's state loaded, parameters equal (1e-6) to a live "
        "peer's at the same step (fingerprints from the probe), first successful round.",
        "- **4** `others_first_step_s`: SIGSTOP to the others' next step; `recovered_s`: SIGCONT to the stalled peer "
        "training in sync again (a successful round at the swarm's step).",
        "- **5** `visible_checkpoints`: complete checkpoints listed after the kill (each verified by sha256); "
        "`restart_to_checkpoint_s`: restarted coordinator to its first newer checkpoint.",
        "- **6** `rejected_contributions`: non-finite contributions dropped by the honest peers' reducers; "
        "`bad_peer_skipped_steps`: optimizer steps the bad peer refused to apply.",
        "- **7** `honest_samples_per_step`: samples the honest peers computed per global step with the liar present "
        "(target 192); the scenario also fails if any honest log ever names the liar's step (an unguarded peer took "
        "step 1000008 for the swarm's and tried to download it); `coordinator_*`: its /status figures.",
        "- **8** time from process start to the one-line answer; `unreachable_join_s` waits `--startup-timeout 10`.",
    ]
    lines += ["", "## Weaknesses the suite found, and the fixes", ""]
    lines += [
        "- **A peer sending NaN/Inf poisoned every groupmate** (hivemind 1.1.12 averages every part it receives). "
        "`peer/guards.py::FiniteTensorPartReducer` drops a non-finite part or weight with weight 0 inside the "
        "all-reduce, so the round completes with the finite contributions (counted in "
        "`bertswarm_peer_rejected_contributions_total`); the optimizer never applies a non-finite gradient "
        '(`bertswarm_peer_skipped_steps_total{reason="nonfinite"}`), which also protects the faulty peer itself.',
        "- **One lying `{run}_progress` record steered the swarm** (hivemind takes the *maximum* epoch of all records "
        "and sums unbounded `samples_accumulated`; a claimed throughput moves the ETA): "
        "`guards.BoundedProgressTracker` parses records with bounded types, takes the majority's (median) epoch, and "
        "caps a record's throughput at 4x the median and its samples at what that throughput yields since the epoch "
        "began (`bertswarm_peer_ignored_progress_records_total`).",
        "- **The coordinator summed what peers claimed**: its throughput, loss weight and samples now resist a lying "
        "minority (`coordinator/aggregate.py`: 4x-median caps, loss outliers left out, samples <= (epoch + 2) x "
        "target).",
        "- **A corrupt `--init-from` was answered only after p2pd had started** (~11 s on an idle machine): the "
        "checkpoint is now verified in `prepare`, before the network; the run check follows once the manifest is "
        "known.",
    ]
    if SOAK_RAW.exists():
        lines += ["", soak_section(json.loads(SOAK_RAW.read_text()))]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def soak_section(soak: dict) -> str:
    lines = ["## Soak (`make soak`)", "", f"{soak['date']}, {soak['host']}: {soak['minutes']:.0f} min with 4 peers, "
             f"one random peer SIGKILLed and restarted every {soak['churn_every_s']:.0f} s "
             f"({soak['restarts']} restarts), then a no-churn run of the same length.", ""]  # fmt: skip
    lines += ["| | churn | no churn |", "|---|---:|---:|"]
    for key in ("successful_round_share", "final_loss", "final_epoch"):
        lines.append(f"| {key} | {_fmt(soak['churn'][key])} | {_fmt(soak['calm'][key])} |")
    lines += ["", "Per peer (churn run): peak RSS (MiB) and open fds in the first and last third of each process life "
              "the highest over its restarts:", "", "| peer | RSS first | RSS last | fds first | fds last |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, p in soak["churn"]["per_peer"].items():
        lines.append(f"| {name} | {p['rss_first']:.0f} | {p['rss_last']:.0f} | {p['fds_first']} | {p['fds_last']} |")
    return "\n".join(lines)
