"""Launch one arm of a training benchmark (swarm / single / DDP) as worker processes and collect their records."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from bench.common import Worker, free_port, workers_cleanup


def _common(cfg: dict) -> list[str]:
    out = []
    for key in (
        "preset",
        "seq_len",
        "batch",
        "target",
        "warmup",
        "steps",
        "matchmaking_time",
        "averaging_timeout",
        "compression",
        "train_mode",
        "inner_steps",
        "outer_compression",
        "outer_lr",
        "outer_momentum",
        "aggregation",
    ):
        if cfg.get(key) is not None:
            out += [f"--{key.replace('_', '-')}", str(cfg[key])]
    if cfg.get("eval"):
        out.append("--eval")
    if cfg.get("outer_overlap"):
        out.append("--outer-overlap")
    return out


def run_swarm(
    workdir: Path,
    cfg: dict,
    peers: int,
    timeout: float,
    hosts=None,
    prefixes=None,
    env=None,
    args=None,
    more_joins=None,
) -> list[dict]:
    """``peers`` swarm peers (1 thread each); ``hosts``/``prefixes`` place peer i at an address / in a netns;
    ``env``: {peer index: extra environment variables} (e.g. a test fault for one peer); ``args``: {peer index:
    extra worker arguments}; ``more_joins(first peer's address) -> [addresses]``, called once the first peer is up:
    more addresses for the others' ``--join``."""
    name = f"swarm{peers}-{uuid.uuid4().hex[:6]}"
    out = workdir / name
    hosts = hosts or ["127.0.0.1"] * peers
    prefixes = prefixes or [()] * peers
    workers: list[Worker] = []
    with workers_cleanup(workers):
        joins: list[str] = []
        for i in range(peers):
            worker_args = [
                "-m",
                "bench.train_worker",
                "swarm",
                "--out",
                str(out),
                "--name",
                f"peer{i}",
                "--index",
                str(i),
                "--peers",
                str(peers),
                "--run-id",
                name.replace("-", "_"),
                "--host",
                hosts[i],
                *_common(cfg),
            ]
            worker_args += [*(f for j in joins for f in ("--join", j)), *(args or {}).get(i, [])]
            workers.append(
                Worker(worker_args, out / f"peer{i}.log", threads=1, prefix=prefixes[i], env=(env or {}).get(i))
            )
            if not joins:
                joins.append(workers[0].wait_line("ADDRESS", timeout=60))
                joins += more_joins(joins[0]) if more_joins else []
        for w in workers:
            w.wait_line("DONE", timeout=timeout)
    return [
        json.loads((out / f"peer{i}.json").read_text()) | {"path": str(out / f"peer{i}.json")} for i in range(peers)
    ]


def run_single(workdir: Path, cfg: dict, threads: int, timeout: float, replay: list[str] | None = None) -> dict:
    name = f"single-{uuid.uuid4().hex[:6]}"
    out = workdir / name
    args = [
        "-m",
        "bench.train_worker",
        "single",
        "--out",
        str(out),
        "--name",
        "single",
        "--threads",
        str(threads),
        *_common(cfg),
    ]
    if replay:
        args += ["--replay", *replay]
    workers = [Worker(args, out / "single.log", threads=threads)]
    with workers_cleanup(workers):
        workers[0].wait_line("DONE", timeout=timeout)
    return json.loads((out / "single.json").read_text())


def run_ddp(workdir: Path, cfg: dict, ranks: int, timeout: float, hosts=None, prefixes=None, env=None) -> list[dict]:
    name = f"ddp{ranks}-{uuid.uuid4().hex[:6]}"
    out = workdir / name
    hosts = hosts or ["127.0.0.1"] * ranks
    prefixes = prefixes or [()] * ranks
    port = free_port()
    workers: list[Worker] = []
    with workers_cleanup(workers):
        for i in range(ranks):
            args = [
                "-m",
                "bench.train_worker",
                "ddp",
                "--out",
                str(out),
                "--name",
                f"rank{i}",
                "--index",
                str(i),
                "--peers",
                str(ranks),
                "--host",
                hosts[0],
                "--master-port",
                str(port),
                *_common(cfg),
            ]
            workers.append(
                Worker(args, out / f"rank{i}.log", threads=1, prefix=prefixes[i], env=(env or [{}] * ranks)[i])
            )
        for w in workers:
            w.wait_line("DONE", timeout=timeout)
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(ranks)]


def steps_per_second(records: list[dict], first: int = 1) -> tuple[float, int]:
    """Global steps per second between the first time any process reached step ``first`` and the last step reached
    by all; excludes start-up and the first step (hivemind's tracker warms up). Returns (steps/s, steps measured)."""
    reached: dict[int, float] = {}
    for r in records:
        for t, epoch in r["steps"]:
            reached[epoch] = min(t, reached.get(epoch, t))
    last = min(max(e for _, e in r["steps"]) for r in records)
    if last <= first or first not in reached:
        return float("nan"), 0
    return (last - first) / (reached[last] - reached[first]), last - first


def samples_per_second(records: list[dict], target: int, first: int = 1) -> float:
    """Useful samples/s: global steps/s × the global batch (samples a peer adds beyond the target are not counted)."""
    rate, _ = steps_per_second(records, first)
    return rate * target


def diloco_samples_per_second(records: list[dict], batch: int) -> float:
    """Samples/s of a diloco swarm: each peer records the wall time at the end of every inner step (``inner_times``;
    the last one includes the final outer round). Like ``steps_per_second`` the first inner step is left out: the
    peers' inner steps after their first, times ``batch``, over the time from the earliest first step to the latest
    end."""
    times = [r["inner_times"] for r in records if len(r.get("inner_times") or []) > 1]
    if len(times) != len(records) or not times:
        return float("nan")
    span = max(t[-1] for t in times) - min(t[0] for t in times)
    return sum(len(t) - 1 for t in times) * batch / span if span > 0 else float("nan")


def compute_utilisation(record: dict) -> float:
    """Forward/backward time ÷ wall time of the training loop (from all peers ready to trained) of one peer."""
    phases = record.get("phases") or {}
    wall = phases.get("trained", 0.0) - phases.get("peers_ready", 0.0)
    return record["compute_s"] / wall if wall > 0 and record.get("compute_s") is not None else float("nan")
