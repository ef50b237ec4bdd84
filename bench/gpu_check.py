"""The GPU check: the product's CUDA path end to end, and the compute figure that DiLoCo's H is chosen against.

Run on a machine with an NVIDIA GPU (the CPU benchmarks cannot show either):

    python -m bench.gpu_check --out DIR [--steps N] [--presets mini,base,large]

1. ``compute``: per preset, one training step of the product's model and optimizer (``bench.workload``'s manifest,
   ``peer.swarm.optim.optimizer_factory``, bf16 autocast exactly as ``peer.trainer`` sets it) on the GPU: samples/s,
   peak GPU memory, and what an outer round at the default H costs in compute against the bytes an int8 outer
   all-reduce moves on 20 and 100 Mbit/s links (derived, not measured: the link figures come from scenario 8).
2. ``swarm``: two real ``bertswarm-peer`` processes on this GPU, ``--mode diloco --preset base --device cuda``, on
   loopback until ``--max-steps``: every outer round's outcome (from the peers' Prometheus endpoints), samples/s,
   GPU memory per process, and that each peer saved a loadable ``state.safetensors``.

Writes ``DIR/gpu_check.json`` and the peers' logs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from bench import workload
from bench.common import free_port, summarize
from peer.localswarm import LocalPeer
from peer.run.model import count_parameters, pretraining_loss
from peer.run.presets import PRESETS
from peer.swarm.optim import optimizer_factory, param_groups

INNER_STEPS = 64  # the product's default H (peer.config)
LINKS_MBIT = (20, 100)


def compute(preset: str, steps: int, seq_len: int = 128) -> dict:
    """Time ``steps`` training steps (after 5 warm-up steps) of ``preset`` at its own batch size on the GPU."""
    run = workload.make_manifest(f"gpu-{preset}", preset=preset, seq_len=seq_len)
    batch_size = PRESETS[preset].batch_size
    model = workload.model_for(run).cuda()
    optimizer = optimizer_factory(run)(param_groups(model, run.weight_decay))
    vocab = run.model.vocab_size
    ids = torch.randint(5, vocab, (batch_size, seq_len), device="cuda")
    labels = torch.where(torch.rand(ids.shape, device="cuda") < run.mlm_probability, ids, -100)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = pretraining_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    params = count_parameters(model)
    step_s = summarize(times)["median"]
    round_compute_s = INNER_STEPS * step_s
    # an all-reduce of int8 pseudo-gradients: each peer sends and receives about the model's size in bytes
    outer_bytes = params * 1
    links = {}
    for mbit in LINKS_MBIT:
        comm_s = outer_bytes * 8 / (mbit * 1e6)
        links[f"{mbit}mbit"] = {
            "outer_round_comm_s": round(comm_s, 2),
            "utilisation_no_overlap": round(round_compute_s / (round_compute_s + comm_s), 3),
            "inner_steps_for_0.9": int(0.9 / 0.1 * comm_s / step_s) + 1,
        }
    result = {
        "preset": preset,
        "parameters": params,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "step_seconds": summarize(times),
        "samples_per_second": round(batch_size / step_s, 1),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "outer_round_compute_s_at_default_h": round(round_compute_s, 2),
        "links_derived": links,
    }
    return result


def _scrape(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        if line.startswith("bertswarm_peer_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _gpu_memory_mib() -> dict[int, int]:
    """GPU memory per process (nvidia-smi), {pid: MiB}; empty where nvidia-smi cannot tell."""
    if not shutil.which("nvidia-smi"):
        return {}
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    memory = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            memory[int(parts[0])] = int(parts[1])
    return memory


def swarm(
    workdir: Path, max_steps: int, timeout: float, preset: str = "base", device: str = "cuda", inner: int = INNER_STEPS
) -> dict:
    """Two DiLoCo peers of ``preset`` on this GPU until outer step ``max_steps`` (``device``: cpu for a smoke run)."""
    common = ["--mode", "diloco", "--preset", preset, "--device", device, "--max-steps", str(max_steps)]
    common += ["--inner-steps", str(inner), "--run-id", "gpu-check", "--log-every", "5", "--threads", "4"]
    ports = [free_port(), free_port()]
    started = time.monotonic()
    first = LocalPeer("peer0", workdir, [*common, "--metrics-port", str(ports[0])], threads=4)
    peers = [first]
    try:
        join = first.wait_for_join_address(timeout=180)
        peers.append(LocalPeer("peer1", workdir, [*common, "--metrics-port", str(ports[1]), "--join", join], threads=4))
        last: list[dict] = [{}, {}]
        memory: dict[str, int] = {}
        while any(p.alive() for p in peers) and time.monotonic() - started < timeout:
            for i, (peer, port) in enumerate(zip(peers, ports, strict=False)):
                scraped = _scrape(port)
                if scraped:
                    last[i] = scraped
                used = _gpu_memory_mib().get(peer.proc.pid)
                if used:
                    memory[peer.name] = max(memory.get(peer.name, 0), used)
            time.sleep(2)
        codes = [p.wait(timeout=60) for p in peers]
    finally:
        for peer in peers:
            peer.stop(timeout=10)
    outcome = re.compile(r'bertswarm_peer_outer_rounds_total\{outcome="([a-z_]+)"\}')
    result: dict = {"wall_s": round(time.monotonic() - started, 1), "exit_codes": codes, "peers": {}}
    for peer, scraped in zip(peers, last, strict=False):
        rounds = {m.group(1): v for k, v in scraped.items() if (m := outcome.match(k))}
        state = peer.state_dir / "state.safetensors"
        loadable = False
        if state.exists():
            from safetensors.torch import load_file

            loadable = len(load_file(str(state))) > 0
        result["peers"][peer.name] = {
            "outer_rounds": rounds,
            "outer_step": scraped.get("bertswarm_peer_outer_step"),
            "samples_per_second_last": scraped.get("bertswarm_peer_samples_per_second"),
            "samples_total": scraped.get("bertswarm_peer_samples_total"),
            "loss_last": scraped.get("bertswarm_peer_loss"),
            "gpu_memory_mib_max": memory.get(peer.name),
            "state_saved_and_loadable": loadable,
            "log_tail": peer.log_tail(12),
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--presets", default="mini,base,large")
    parser.add_argument("--swarm-steps", type=int, default=3, help="outer steps")
    parser.add_argument("--swarm-timeout", type=float, default=240)
    parser.add_argument("--swarm-only-cpu", action="store_true", help="smoke-test the swarm part on CPU (tiny)")
    args = parser.parse_args(argv)
    if not args.swarm_only_cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still stops the peers (finally)
    if args.swarm_only_cpu:
        report = swarm(Path(tempfile.mkdtemp()), args.swarm_steps, args.swarm_timeout, "tiny", "cpu", inner=8)
        print(json.dumps(report, indent=2))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "bf16": torch.cuda.is_bf16_supported(),
        "compute": [],
    }
    for preset in args.presets.split(","):
        report["compute"].append(compute(preset, args.steps))
        torch.cuda.empty_cache()
        print(json.dumps(report["compute"][-1]), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    workdir = Path(tempfile.mkdtemp(prefix="gpu-swarm-"))  # state files are large: only the logs go to --out
    report["swarm"] = swarm(workdir, args.swarm_steps, args.swarm_timeout)
    for log in workdir.glob("*.log"):
        shutil.copy(log, args.out / log.name)
    print(json.dumps(report["swarm"], indent=2), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
