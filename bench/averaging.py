"""Launchers for the averaging micro-benchmarks (hivemind averager peers, gloo ranks, loopback probe)."""

from __future__ import annotations

import json
import statistics
import uuid
from pathlib import Path

from bench.avg_worker import probe_send
from bench.common import Worker, free_port, workers_cleanup


def run_hivemind(
    workdir: Path,
    peers: int,
    preset: str,
    compressions: list[str],
    rounds: int,
    timeout: float,
    hosts=None,
    prefixes=None,
) -> list[dict]:
    out = workdir / f"avg-hm{peers}-{preset}-{uuid.uuid4().hex[:6]}"
    hosts = hosts or ["127.0.0.1"] * peers
    prefixes = prefixes or [()] * peers
    workers: list[Worker] = []
    with workers_cleanup(workers):
        join = None
        for i in range(peers):
            args = [
                "-m",
                "bench.avg_worker",
                "hivemind",
                "--index",
                str(i),
                "--peers",
                str(peers),
                "--preset",
                preset,
                "--compressions",
                ",".join(compressions),
                "--rounds",
                str(rounds),
                "--host",
                hosts[i],
                "--out",
                str(out / f"peer{i}.json"),
            ]
            if join:
                args += ["--join", join]
            workers.append(Worker(args, out / f"peer{i}.log", prefix=prefixes[i]))
            if join is None:
                join = workers[0].wait_line("ADDRESS", timeout=60)
        for w in workers:
            w.wait_line("DONE", timeout=timeout)
    return [json.loads((out / f"peer{i}.json").read_text()) for i in range(peers)]


def round_times(results: list[dict], compression: str) -> list[float]:
    """Per round: the all-reduce time (group formed → averaged tensors in place), mean over the group's peers;
    rounds where any peer failed are left out (their count is reported separately)."""
    out = []
    for r in range(len(results[0]["rounds"][compression])):
        entries = [res["rounds"][compression][r] for res in results]
        if all(e["ok"] for e in entries):
            out.append(statistics.mean(e["allreduce_s"] for e in entries))
    return out


def relative_errors(results: list[dict], compression: str) -> list[float]:
    """Per round: the worst peer's relative L2 error of its averaged vector against the true mean."""
    return [
        max(res["rounds"][compression][r].get("relative_error", float("nan")) for res in results)
        for r in range(len(results[0]["rounds"][compression]))
    ]


def failed_rounds(results: list[dict], compression: str) -> int:
    return sum(
        not all(res["rounds"][compression][r]["ok"] for res in results)
        for r in range(len(results[0]["rounds"][compression]))
    )


def run_gloo(workdir: Path, peers: int, preset: str, rounds: int, timeout: float) -> dict[str, list[float]]:
    """Per dtype, the all-reduce time of each round (max over ranks: the collective ends when the last rank does)."""
    out = workdir / f"avg-gloo{peers}-{preset}-{uuid.uuid4().hex[:6]}"
    port = free_port()
    workers = [
        Worker(
            [
                "-m",
                "bench.avg_worker",
                "gloo",
                "--index",
                str(i),
                "--peers",
                str(peers),
                "--preset",
                preset,
                "--rounds",
                str(rounds),
                "--port",
                str(port),
                "--out",
                str(out / f"rank{i}.json"),
            ],
            out / f"rank{i}.log",
        )
        for i in range(peers)
    ]
    with workers_cleanup(workers):
        for w in workers:
            w.wait_line("DONE", timeout=timeout)
    ranks = [json.loads((out / f"rank{i}.json").read_text())["times"] for i in range(peers)]
    return {dtype: [max(r[dtype][k] for r in ranks) for k in range(rounds)] for dtype in ranks[0]}


def loopback_bandwidth(workdir: Path, megabytes: int = 512) -> float:
    """Bytes/s of one TCP stream between two processes over 127.0.0.1, measured now."""
    port = free_port()
    w = Worker(["-m", "bench.avg_worker", "probe", "--port", str(port)], workdir / "probe.log")
    with workers_cleanup([w]):
        w.wait_line("LISTENING", timeout=60)
        return probe_send("127.0.0.1", port, megabytes)


def bytes_moved_per_peer(numel: int, peers: int, compression: str) -> float:
    """Butterfly all-reduce: each peer sends (n-1)/n of its vector for reduction and (n-1)/n of the averaged
    vector back out (and receives as much, concurrently on a full-duplex link): 2 (n-1)/n of the vector's bytes."""

    from bench.avg_worker import BYTES_PER_ELEMENT

    return 2 * (peers - 1) / peers * numel * BYTES_PER_ELEMENT[compression]
