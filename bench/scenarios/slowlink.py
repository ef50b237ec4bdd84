"""Scenario 5: swarm vs DDP-gloo samples/s over a rate-limited link. Two network namespaces of our own, joined by a
veth pair with a ``tbf`` qdisc on both ends (100 and 20 Mbit/s); one peer / rank in each, via ``ip netns exec``.
Needs root (and ``ip``/``tc``); otherwise the scenario is skipped with the reason. Namespaces and links are removed
in ``finally``."""

from __future__ import annotations

import os
import shutil
import subprocess

from bench import arms

NAME = "slowlink"
TITLE = "5. Slow link: swarm vs DDP-gloo over tbf-limited veth"
SUBNET = "10.231.77"


class Link:
    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.ns = [f"bswbench{tag}a", f"bswbench{tag}b"]
        self.dev = [f"bsw{tag}a", f"bsw{tag}b"]
        self.ip = [f"{SUBNET}.1", f"{SUBNET}.2"]
        self.created: list[str] = []

    def __enter__(self) -> Link:
        try:
            for ns in self.ns:
                _ip("netns", "add", ns)
                self.created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
            for ns, dev, ip in zip(self.ns, self.dev, self.ip, strict=True):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def rate(self, mbit: int) -> None:
        for ns, dev in zip(self.ns, self.dev, strict=True):
            _run(
                "tc",
                "-n",
                ns,
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                f"{mbit}mbit",
                "burst",
                "64kb",
                "latency",
                "100ms",
            )

    def prefix(self, i: int) -> tuple:
        return ("ip", "netns", "exec", self.ns[i])

    def __exit__(self, *exc) -> None:
        for ns in reversed(self.created):  # deleting a namespace deletes the veth end inside it (and its peer)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()


def _ip(*args) -> None:
    _run("ip", *args)


def _run(*args) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, tc); run `make bench` as root to include it"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    try:
        with Link() as link:
            link.rate(100)
    except RuntimeError as e:
        return f"cannot build a namespace/veth/tbf link here: {e}"
    return None


def run(workdir, reps: int, quick: bool) -> dict:
    reason = unavailable()
    if reason:
        return {"skipped": reason, "rows": [], "notes": [f"Skipped: {reason}."]}
    cfg = dict(preset="tiny", seq_len=128, batch=16, target=128, steps=3)
    rates = (20,) if quick else (100, 20)
    raw = {f"{r}mbit": {"swarm": [], "ddp": []} for r in rates}
    with Link() as link:
        prefixes = [link.prefix(0), link.prefix(1)]
        for rep in range(reps):
            for mbit in rates:
                link.rate(mbit)
                order = ["swarm", "ddp"] if rep % 2 == 0 else ["ddp", "swarm"]
                for arm in order:
                    if arm == "swarm":
                        records = arms.run_swarm(workdir, cfg, 2, timeout=400, hosts=link.ip, prefixes=prefixes)
                    else:
                        env = [{"GLOO_SOCKET_IFNAME": link.dev[0]}, {"GLOO_SOCKET_IFNAME": link.dev[1]}]
                        records = arms.run_ddp(workdir, cfg, 2, timeout=400, hosts=link.ip, prefixes=prefixes, env=env)
                    raw[f"{mbit}mbit"][arm].append(
                        {
                            "samples_per_s": arms.samples_per_second(records, cfg["target"]),
                            "rounds": [r.get("rounds") for r in records],
                        }
                    )
    rows = []
    for mbit in rates:
        r = raw[f"{mbit}mbit"]
        rows.append(
            {
                "metric": f"{mbit} Mbit/s: swarm ÷ DDP (samples/s)",
                "values": [s["samples_per_s"] / d["samples_per_s"] for s, d in zip(r["swarm"], r["ddp"], strict=True)],
            }
        )
        rows.append(
            {
                "metric": f"{mbit} Mbit/s: swarm samples/s",
                "values": [s["samples_per_s"] for s in r["swarm"]],
                "unit": "samples/s",
            }
        )
        rows.append(
            {
                "metric": f"{mbit} Mbit/s: DDP samples/s",
                "values": [d["samples_per_s"] for d in r["ddp"]],
                "unit": "samples/s",
            }
        )
    notes = [
        f"tiny preset (6.1 MB of fp32 gradients), {cfg['seq_len']} tokens, global batch {cfg['target']}, 1 thread per "
        f"peer/rank, {cfg['steps']} steps per arm; tbf (burst 64 kB, latency 100 ms) on both veth ends; no added delay "
        "(netem is not available here). Arms alternate order every repetition.",
    ]
    return {"config": {**cfg, "rates_mbit": rates}, "rows": rows, "raw": raw, "notes": notes}
