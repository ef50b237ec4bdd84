"""Scenario 6: DHT store/get latency (p50/p95) and success rate with 2, 8 and 16 hivemind DHT nodes on loopback.
Each store goes to a random node, the get of the same key to another random node."""

from __future__ import annotations

import json
import random
import sys
import time

from bench.common import Worker, workers_cleanup

NAME = "dht"
TITLE = "6. DHT store/get latency"


def worker(nodes: int, ops: int, out: str) -> None:
    import hivemind
    from hivemind.utils import get_dht_time

    dhts = [hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)]
    initial = [str(a) for a in dhts[0].get_visible_maddrs()]
    dhts += [
        hivemind.DHT(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True) for _ in range(nodes - 1)
    ]
    time.sleep(2.0)  # let routing tables fill
    rng = random.Random(nodes)
    stores, gets, ok = [], [], 0
    try:
        for i in range(ops):
            a, b = rng.sample(range(nodes), 2)
            key, value = f"bench-{nodes}-{i}", rng.random()
            started = time.perf_counter()
            stored = dhts[a].store(key, value, get_dht_time() + 60)
            stores.append(time.perf_counter() - started)
            started = time.perf_counter()
            found = dhts[b].get(key)
            gets.append(time.perf_counter() - started)
            ok += bool(stored) and found is not None and found.value == value
    finally:
        for d in dhts:
            d.shutdown()
    with open(out, "w") as f:
        json.dump({"stores": stores, "gets": gets, "ok": ok, "ops": ops}, f)
    print("DONE", flush=True)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run(workdir, reps: int, quick: bool) -> dict:
    sizes = (2, 8) if quick else (2, 8, 16)
    ops = 10 if quick else 40
    raw = {n: [] for n in sizes}
    for rep in range(reps):
        for n in sizes[rep % len(sizes) :] + sizes[: rep % len(sizes)]:
            out = workdir / f"dht-{n}-{rep}.json"
            w = Worker(["-m", "bench.scenarios.dht", str(n), str(ops), str(out)], workdir / f"dht-{n}-{rep}.log")
            with workers_cleanup([w]):
                w.wait_line("DONE", timeout=240)
            raw[n].append(json.loads(out.read_text()))
    rows = []
    for n in sizes:
        rows += [
            {
                "metric": f"{n} nodes: store p50",
                "values": [percentile(r["stores"], 0.5) * 1e3 for r in raw[n]],
                "unit": "ms",
            },
            {
                "metric": f"{n} nodes: store p95",
                "values": [percentile(r["stores"], 0.95) * 1e3 for r in raw[n]],
                "unit": "ms",
            },
            {
                "metric": f"{n} nodes: get p50",
                "values": [percentile(r["gets"], 0.5) * 1e3 for r in raw[n]],
                "unit": "ms",
            },
            {
                "metric": f"{n} nodes: get p95",
                "values": [percentile(r["gets"], 0.95) * 1e3 for r in raw[n]],
                "unit": "ms",
            },
            {"metric": f"{n} nodes: success rate", "values": [r["ok"] / r["ops"] for r in raw[n]]},
        ]
    notes = [
        f"{ops} store+get pairs per repetition; each DHT node is its own process with its own p2p daemon, all on "
        "one machine, so 16 nodes share 2 cores; latencies include the call from the node's owning process."
    ]
    return {
        "config": {"sizes": sizes, "ops": ops},
        "rows": rows,
        "raw": {str(k): v for k, v in raw.items()},
        "notes": notes,
    }


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
