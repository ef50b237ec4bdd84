"""Averaging-round micro-benchmark processes: hivemind ``DecentralizedAverager`` peers over tensors shaped like a
model's gradients, a gloo all-reduce of the same bytes, and a loopback socket throughput probe.

python -m bench.avg_worker hivemind --index I --peers N --preset P --compressions none,fp16 --rounds R --out F \
    [--join A]
python -m bench.avg_worker gloo --index I --peers N --preset P --rounds R --port PORT --out F
python -m bench.avg_worker probe --port PORT --megabytes M      (receiver; the sender runs in the scenario process)
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
import time
from pathlib import Path

import torch

from bench.common import process_tree_hwm_bytes

BYTES_PER_ELEMENT = {"none": 4.0, "fp16": 2.0, "int8": 1.0}


def gradient_shapes(preset: str) -> list[torch.Size]:
    """Shapes of the trainable tensors of the preset's model (built on the meta device: no memory, no init time)."""
    from transformers import BertForMaskedLM

    from bench.workload import make_manifest
    from peer.run.model import bert_config

    with torch.device("meta"):
        model = BertForMaskedLM(bert_config(make_manifest("shapes", preset).model))
    return [p.shape for p in model.parameters()]


def hivemind_peer(args) -> None:
    import hivemind
    from hivemind.averaging.control import AveragingStage

    from peer.swarm.optim import grad_compression as compression

    dht = hivemind.DHT(
        initial_peers=[args.join] if args.join else None, host_maddrs=[f"/ip4/{args.host}/tcp/0"], start=True
    )
    print("ADDRESS", str(dht.get_visible_maddrs()[0]), flush=True)
    shapes = gradient_shapes(args.preset)
    names = args.compressions.split(",")
    averagers = {}
    for name in names:
        codec, aggregation = arm(name)
        tensors = initial_tensors(shapes, args.index, codec)
        # the product's settings (peer.optim.make_optimizer with its default 30 s averaging timeout), with a shorter
        # matchmaking time: matchmaking is not part of the measured round
        cls, robust = hivemind.averaging.DecentralizedAverager, {}
        if aggregation is not None:  # the product's reducer (peer.swarm.robust) with this rule
            cls, robust = _robust_averager(), {"aggregation": aggregation}
        averagers[name] = cls(
            tensors, dht, prefix=f"bench_{name.replace('@', '_')}", target_group_size=args.peers,
            min_group_size=args.peers, min_matchmaking_time=2.0, request_timeout=1.0, next_chunk_timeout=15.0,
            allreduce_timeout=args.timeout, compression=compression(codec), start=True, **robust,
        )  # fmt: skip
    rounds = {name: [] for name in averagers}
    try:
        for r in range(args.rounds):
            for name, averager in averagers.items():  # interleaved: compressions alternate within the run
                barrier(dht, f"bench_barrier_{name}_{r}", args.index, args.peers)
                called = time.perf_counter()
                control = averager.step(wait=False, timeout=args.timeout)
                began = None
                while not control.done():
                    if began is None and control.stage == AveragingStage.RUNNING_ALLREDUCE:
                        began = time.perf_counter()
                    time.sleep(0.0005)
                ended = time.perf_counter()
                finished = control.exception() is None
                # hivemind reports success even when a groupmate's parts could not be used (it keeps the local
                # values of those parts), so the result is checked against the true mean of every peer's tensors
                error = relative_error(averager, shapes, args.peers, arm(name)[0]) if finished else float("nan")
                rounds[name].append(
                    {"ok": finished and error < max_relative_error(name), "relative_error": error,
                     "allreduce_s": ended - (began or called), "total_s": ended - called,
                     "group": len(control.result()) if finished else 0,
                     "error": "" if finished else repr(control.exception())[:300]}
                )  # fmt: skip
        result = {
            "numel": sum(s.numel() for s in shapes),
            "rounds": rounds,
            "peak_rss_bytes": process_tree_hwm_bytes(_pid()),
        }
        Path(args.out).write_text(json.dumps(result))
        print("DONE", flush=True)
    finally:
        for averager in averagers.values():
            averager.shutdown()
        dht.shutdown()


# an averaged vector further than this from the true mean (relative L2) is a failed round: a part that was not
# averaged is off by ~100 %, lossy compression by ~0.05 % (fp16) or a few % (8-bit)
MAX_RELATIVE_ERROR = {"none": 1e-4, "fp16": 1e-2, "int8": 0.2}
# a robust rule is not the mean by design (clipped-mean scales parts above the median norm down to it): what it may
# deviate on these Gaussian tensors, on top of the compression's error
ROBUST_EXTRA_ERROR = 0.05


def arm(name: str) -> tuple[str, str | None]:
    """An arm's compression and aggregation rule: ``none`` is hivemind's own averager, ``none@clipped-mean`` the
    product's reducer (``peer.swarm.robust``) with that rule."""
    codec, _, aggregation = name.partition("@")
    return codec, aggregation or None


def max_relative_error(name: str) -> float:
    codec, aggregation = arm(name)
    return MAX_RELATIVE_ERROR[codec] + (ROBUST_EXTRA_ERROR if aggregation not in (None, "mean") else 0.0)


@functools.lru_cache(maxsize=1)
def _robust_averager():
    from hivemind.averaging import DecentralizedAverager

    from peer.swarm.robust import RobustAveragingMixin

    class BenchRobustAverager(RobustAveragingMixin, DecentralizedAverager):
        pass

    return BenchRobustAverager


def initial_tensors(shapes: list[torch.Size], index: int, name: str) -> list[torch.Tensor]:
    """Peer ``index``'s gradient-shaped random tensors for one compression arm (any process can regenerate them)."""
    return [_randn(s, index, name, k) for k, s in enumerate(shapes)]


def _randn(shape: torch.Size, index: int, name: str, k: int) -> torch.Tensor:
    from peer.swarm.optim import GRAD_COMPRESSIONS

    seed = index * 1_000_003 + GRAD_COMPRESSIONS.index(name) * 10_007 + k
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def relative_error(averager, shapes: list[torch.Size], peers: int, name: str) -> float:
    """||averaged - true mean of all peers' initial tensors|| / ||true mean||, tensor by tensor (little memory).
    Repeated rounds keep the mean, so the reference is the same after every round."""
    diff = norm = 0.0
    with averager.get_tensors() as tensors:
        for k, (t, s) in enumerate(zip(tensors, shapes, strict=True)):
            mean = sum(_randn(s, i, name, k) for i in range(peers)) / peers
            diff += float((t - mean).pow(2).sum())
            norm += float(mean.pow(2).sum())
    return (diff / norm) ** 0.5


def barrier(dht, key: str, index: int, peers: int, timeout: float = 120.0) -> None:
    """Every peer starts the round together (a late peer would otherwise miss the group and fail the round)."""
    from hivemind.utils import ValueWithExpiration, get_dht_time

    dht.store(key, True, get_dht_time() + 600, subkey=index)
    deadline = time.monotonic() + timeout
    while len((dht.get(key, latest=True) or ValueWithExpiration({}, 0)).value) < peers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"barrier {key}: the other peers never arrived")
        time.sleep(0.05)


def _pid() -> int:
    import os

    return os.getpid()


def gloo_rank(args) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR=args.host, MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=args.index, world_size=args.peers)
    numel = sum(s.numel() for s in gradient_shapes(args.preset))
    flat = {"fp32": torch.randn(numel), "fp16": torch.randn(numel).half()}
    times = {k: [] for k in flat}
    for _ in range(args.rounds):
        for name, tensor in flat.items():
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(tensor)
            times[name].append(time.perf_counter() - started)
    dist.barrier()
    dist.destroy_process_group()
    Path(args.out).write_text(json.dumps({"numel": numel, "times": times}))
    print("DONE", flush=True)


def probe_receiver(args) -> None:
    """Accept one connection and read until EOF; the sender times the transfer."""
    with socket.socket() as server:
        server.bind((args.host, args.port))
        server.listen(1)
        print("LISTENING", flush=True)
        conn, _ = server.accept()
        with conn:
            buf = bytearray(4 << 20)
            while conn.recv_into(buf):
                pass
            conn.sendall(b"k")
    print("DONE", flush=True)


def probe_send(host: str, port: int, megabytes: int) -> float:
    """Bytes/s of one TCP stream to a receiver process (until it has read everything)."""
    chunk = b"\0" * (4 << 20)
    total = megabytes << 20
    with socket.create_connection((host, port)) as s:
        started = time.perf_counter()
        sent = 0
        while sent < total:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
        return sent / (time.perf_counter() - started)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("hivemind", "gloo", "probe"))
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--compressions", default="none,fp16,int8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--join", default=None)
    p.add_argument("--out", default="")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one round may take")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    {"hivemind": hivemind_peer, "gloo": gloo_rank, "probe": probe_receiver}[args.mode](args)


if __name__ == "__main__":
    main()
