"""One training process of a benchmark arm: a swarm peer (the product's own ``peer.trainer.Trainer``, stepped with
``Trainer.step``), the single-process reference, or one DDP rank (their own loops over the product's model, optimizer
and schedule). All three use the same manifest, model, batch streams and optimizer math; each records
``(wall time, global step)`` after every optimizer step and writes ``<out>/<name>.json``.

Usage: python -m bench.train_worker MODE --out DIR --name NAME [options]   (MODE: swarm | single | ddp)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from functools import partial
from pathlib import Path
from unittest import mock

import torch
from hivemind.utils import ValueWithExpiration, get_dht_time

from bench import workload
from bench.common import cpu_breakdown, net_tx_bytes
from peer import trainer as product_trainer
from peer.run.model import PretrainingLoss, pretraining_loss
from peer.swarm.optim import (
    GRAD_COMPRESSIONS,
    grad_compression,
    make_optimizer,
    optimizer_factory,
    param_groups,
    scheduler_factory,
)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("swarm", "single", "ddp"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--run-id", default="bench")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--target", type=int, default=256)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--index", type=int, default=0, help="swarm peer index / DDP rank")
    p.add_argument("--peers", type=int, default=1, help="swarm size / DDP world size")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--join", action="append", default=[], help="repeatable")
    p.add_argument("--nat", default="auto", help="the peer's --nat")
    p.add_argument("--master-port", type=int, default=0)
    p.add_argument("--matchmaking-time", type=float, default=None)
    p.add_argument("--averaging-timeout", type=float, default=None)
    p.add_argument("--compression", choices=GRAD_COMPRESSIONS, default=None)
    p.add_argument("--replay", type=Path, nargs="*", default=None, help="single: replay these swarm records")
    p.add_argument("--eval", action="store_true", help="held-out MLM loss at the end")
    # the run's training mode (manifest fields; the product's defaults where not given)
    p.add_argument("--train-mode", choices=("sync", "diloco"), default=None)
    p.add_argument("--inner-steps", type=int, default=None, help="diloco: H")
    p.add_argument("--outer-compression", default=None)
    p.add_argument("--outer-overlap", action="store_true")
    p.add_argument("--outer-lr", type=float, default=None)
    p.add_argument("--outer-momentum", type=float, default=None)
    p.add_argument("--aggregation", default=None, help="the run's aggregation rule (default: the product's)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    mode = dict(mode=args.train_mode, inner_steps=args.inner_steps, outer_compression=args.outer_compression,
                outer_overlap=args.outer_overlap or None, outer_lr=args.outer_lr,
                outer_momentum=args.outer_momentum, aggregation=args.aggregation)  # fmt: skip
    run = workload.make_manifest(args.run_id, args.preset, args.seq_len, args.target, args.warmup, **mode)
    result = {"mode": args.mode, "name": args.name, "index": args.index, "peers": args.peers, "steps": []}
    if args.mode == "swarm":  # the trainer builds the model (``trainer_created`` phase)
        started = time.time()
        # seconds since the process started at which each phase ended: where an arm's time goes besides training
        result["phases"] = {"imports": started - _process_start_time()}
        swarm(args, run, result, partial(_finish, args, run, result, started))
        return
    model = workload.model_for(run)
    started = time.time()
    result["phases"] = {"imports_and_model": started - _process_start_time()}
    if args.mode == "single":
        single(args, run, model, result)
    else:
        ddp(args, run, model, result)
    _finish(args, run, result, started, model)


def _finish(args, run, result: dict, started: float, model: torch.nn.Module) -> None:
    """Evaluate, write ``<out>/<name>.json`` and print DONE (the launcher then stops the whole process group)."""
    result["wall_s"] = time.time() - started
    if args.eval:
        result["heldout_loss"] = workload.heldout_loss(model, run)
    result["phases"]["done"] = time.time() - _process_start_time()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result))
    print("DONE", flush=True)


def swarm(args, run, result, finish) -> None:
    """A swarm peer is the product's own ``peer.trainer.Trainer``, built from the bench's manifest and fed the bench's
    micro-batch stream; the measured forward/backward/optimizer step is ``Trainer.step``."""
    from peer.config import PeerConfig
    from peer.store.state import StateDir
    from peer.swarm import records
    from peer.swarm.dht import join_addresses, keep_request_futures, start_dht, stop_dht
    from peer.telemetry import PeerTelemetry

    timing = {"matchmaking_time": args.matchmaking_time, "averaging_timeout": args.averaging_timeout}
    diloco = run.mode == "diloco"
    # diloco: --steps outer steps = steps × H inner steps of --batch samples; with overlap the last round is still in
    # flight after them (applied by ``flush``), so the trainer must not count itself finished one round early
    max_steps = args.steps + 1 if diloco and run.outer_overlap else args.steps
    cfg = PeerConfig(
        join=args.join,
        nat=args.nat,
        listen=[f"/ip4/{args.host}/tcp/0"],
        state_dir=str(args.out / f"state-{args.name}"),
        batch_size=args.batch,
        device="cpu",  # every arm trains on CPU, whatever the machine has
        threads=args.threads,
        seed=workload.peer_seed(args.index),
        max_steps=max_steps,
        save_every=0,
        **{name: value for name, value in timing.items() if value is not None},
    ).validate()
    dht = start_dht(cfg, records.registry_validators())  # as the product's peer (``peer.trainer.run``)
    dht.add_validators(records.run_validators(run.run_id)[0])
    _phase(result, "dht_started")
    print("ADDRESS", join_addresses(dht)[0], flush=True)
    prepared = product_trainer.Prepared(StateDir(cfg.state_path), workload.tokenizer(), PeerTelemetry(), None)
    trainer = None
    try:
        batches = workload.stream(run, cfg.batch_size, workload.peer_seed(args.index))
        with _grad_compression(args.compression):
            trainer = _BenchTrainer(cfg, prepared, dht, run, batches=batches)
        trainer.hooks.install(trainer)  # as the product's peer: test faults (BERTSWARM_TEST_*) only, else a no-op
        _phase(result, "trainer_created")
        _wait_for_peers(dht, args)
        _phase(result, "peers_ready")
        if diloco:
            roles = {dht.pid: "dht", trainer.opt.engine.state.pid: "outer_state_averager",
                     trainer.opt.engine.pseudograd.pid: "pseudograd_averager"}  # fmt: skip
        else:
            roles = {dht.pid: "dht", trainer.opt.state_averager.pid: "state_averager",
                     trainer.opt.grad_averager.pid: "grad_averager"}  # fmt: skip
        cpu_before, tx_before = cpu_breakdown(roles=roles), net_tx_bytes()
        _train(trainer, result, inner_total=args.steps * run.inner_steps if diloco else None)
        _phase(result, "trained")
        result.update(cpu_during_training=_cpu_used_since(cpu_before, roles), link_tx_bytes=net_tx_bytes() - tx_before)
        result.update(telemetry_bytes_sent=trainer.telemetry.registry.get_sample_value(
            "bertswarm_peer_bytes_sent_total"))  # fmt: skip
        if diloco:
            result.update(engine_bytes_sent=trainer.opt.engine.bytes_sent, outer_epoch=trainer.opt.local_epoch)
        # done before hivemind's shutdown, which takes up to ~10 s and measures nothing; the launcher stops the
        # worker's process group once every peer is done
        finish(trainer.model)
    finally:
        with keep_request_futures(dht):  # as the peer does: no traceback from hivemind's goodbye store at exit
            if trainer is not None:
                trainer.close()
            stop_dht(dht)
        prepared.state_dir.close()


def _train(trainer, result: dict, inner_total: int | None = None) -> None:
    """``trainer.step()`` until the trainer is finished, recording which micro-batches went into which global step
    (``contributions``), when each step was reached, and where the time of each ``Trainer.step`` went: before its
    ``SwarmOptimizer.step`` call (fetching the micro-batch, forward, backward, the finite-gradient check) and from it
    on (accumulation, progress tracker, averaging, the optimizer itself, ``zero_grad``).

    diloco (``inner_total``: the inner steps to train): stops after that many accepted inner steps, applies an
    outer round still in flight (``outer_overlap``: ``flush``) and records the end of every inner step
    (``inner_times``; the last one includes that flush)."""
    clock = _OptStepClock(trainer.opt)
    contributions: dict[int, list[int]] = {}
    pending: list[int] = []
    k = 0  # micro-batch k of this peer's stream
    compute_s = step_s = compute_cpu_s = 0.0  # wall time before/after opt.step, CPU time of the part before
    inner_times: list[float] = []
    while not trainer.finished and (inner_total is None or trainer.mini_steps < inner_total):
        epoch, loads, mini_steps = trainer.opt.local_epoch, trainer.state_loads, trainer.mini_steps
        clock.reached = None
        began, began_cpu = time.perf_counter(), time.thread_time()
        trainer.step()
        ended, ended_cpu = time.perf_counter(), time.thread_time()
        reached, reached_cpu = clock.reached or (ended, ended_cpu)  # a dropped (non-finite) batch never reaches it
        compute_s += reached - began
        compute_cpu_s += reached_cpu - began_cpu
        step_s += ended - reached
        if trainer.state_loads != loads:
            pending = []  # local progress was discarded while catching up
        elif trainer.mini_steps == mini_steps:
            pass  # dropped before the optimizer: non-finite loss or gradients
        else:
            pending.append(k)
            if inner_total is not None:
                inner_times.append(time.time())
            if trainer.opt.local_epoch > epoch:
                contributions[epoch] = pending
                pending = []
                result["steps"].append([time.time(), trainer.opt.local_epoch])
        k += 1
    if inner_total is not None:
        began = time.perf_counter()
        engine = getattr(trainer.opt, "engine", None)
        if engine is not None and engine.overlap and engine.flush() is not None:
            result["steps"].append([time.time(), trainer.opt.local_epoch])
            if inner_times:
                inner_times[-1] = time.time()
        result.update(inner_times=inner_times, flush_s=time.perf_counter() - began)
        step_s += time.perf_counter() - began
    result.update(
        rounds=trainer.round_log,
        state_loads=trainer.state_loads,
        contributions=contributions,
        micro_batches=k,
        compute_s=compute_s,
        compute_cpu_s=compute_cpu_s,
        opt_step_s=step_s,
    )


class _OptStepClock:
    """The one timing seam inside ``Trainer.step``: notes the wall and thread CPU time at which the trainer calls its
    optimizer's ``step`` (wraps that bound method on this optimizer instance; the step itself is unchanged)."""

    def __init__(self, opt):
        self.reached: tuple[float, float] | None = None
        step = opt.step

        def timed_step(*args, **kwargs):
            self.reached = (time.perf_counter(), time.thread_time())
            return step(*args, **kwargs)

        opt.step = timed_step


class _BenchTrainer(product_trainer.Trainer):
    """The product's trainer; only its optimizer callbacks also record each round and count state loads (as the
    equivalence test's worker does)."""

    def __init__(self, *args, **kwargs):
        self.round_log: list[list] = []  # [outcome, group size, seconds] per averaging round
        self.state_loads = 0
        super().__init__(*args, **kwargs)

    def _on_round(self, outcome: str, group_size: int, seconds: float) -> None:
        super()._on_round(outcome, group_size, seconds)
        self.round_log.append([outcome, group_size, seconds])

    def _on_outer_round(self, report) -> None:
        super()._on_outer_round(report)
        self.round_log.append([report.outcome, report.group_size, report.seconds, report.blocked_seconds,
                               report.bytes_sent])  # fmt: skip

    def _on_state_loaded(self, seconds: float) -> None:
        super()._on_state_loaded(seconds)
        self.state_loads += 1


@contextlib.contextmanager
def _grad_compression(name: str | None):
    """``--compression`` is a benchmark arm, not a product setting (every peer of a run must share it, and the
    manifest has no field for it yet): while the trainer is built, its ``make_optimizer`` gets this compression."""
    if name is None:
        yield
        return
    compressed = partial(make_optimizer, grad_compression=grad_compression(name))
    with mock.patch.object(product_trainer, "make_optimizer", compressed):
        yield


def _process_start_time() -> float:
    """Wall-clock time at which this process started (from /proc: includes interpreter start-up and imports)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def _phase(result: dict, name: str) -> None:
    result["phases"][name] = time.time() - _process_start_time()


def _cpu_used_since(before: dict, roles: dict[int, str] | None = None) -> dict:
    """CPU seconds used since ``before`` (a ``cpu_breakdown()``): main thread, other threads, helper processes."""
    now = cpu_breakdown(roles=roles)
    children = {name: s - before["children_s"].get(name, 0.0) for name, s in now["children_s"].items()}
    return {
        "main_thread_s": now["main_thread_s"] - before["main_thread_s"],
        "other_threads_s": now["other_threads_s"] - before["other_threads_s"],
        "children_s": children,
        "children_total_s": sum(children.values()),
    }


def _wait_for_peers(dht, args) -> None:
    """Start together: hivemind's progress tracker only sees peers that have reported samples."""
    key = f"{args.run_id}_bench_ready"
    dht.store(key, True, get_dht_time() + 600, subkey=args.index)
    deadline = time.monotonic() + 120
    while len((dht.get(key, latest=True) or ValueWithExpiration({}, 0)).value) < args.peers:
        if time.monotonic() > deadline:
            raise RuntimeError("the other peers never showed up")
        time.sleep(0.1)


def _optimizer(run, model):
    opt = optimizer_factory(run)(param_groups(model, run.weight_decay))
    return opt, scheduler_factory(run)(opt)


def single(args, run, model, result) -> None:
    """Gradient of the mean loss over the global batch, then the run's optimizer (clipping, schedule) once."""
    opt, sched = _optimizer(run, model)
    if args.replay:
        plan, batches = _replay_plan(args, run)
    else:
        stream = workload.stream(run, args.batch, workload.peer_seed(0))
        n = run.target_batch_size // args.batch
        plan = [[(0, None)] * n for _ in range(args.steps)]
        batches = {0: stream}
    compute_s, compute_cpu_s, timed = 0.0, 0.0, 0  # single's CPU time counts its main thread only
    for micro in plan:
        for peer, k in micro:
            began, began_cpu = time.perf_counter(), time.thread_time()
            batch = next(batches[peer]) if k is None else batches[peer].get(k)
            (pretraining_loss(model, batch) / len(micro)).backward()
            compute_s, timed = compute_s + time.perf_counter() - began, timed + 1
            compute_cpu_s += time.thread_time() - began_cpu
        opt.step()
        sched.step()
        opt.zero_grad()
        result["steps"].append([time.time(), len(result["steps"]) + 1])
    result.update(samples=sum(len(m) for m in plan) * args.batch, compute_s=compute_s, micro_batches=timed,
                  compute_cpu_s=compute_cpu_s)  # fmt: skip


class _Indexed:
    """Micro-batch ``k`` of one peer's deterministic stream (the k-th ``next()``), generated in order and cached."""

    def __init__(self, stream):
        self.stream, self.cache, self.next_k = stream, {}, 0

    def get(self, k: int):
        while self.next_k <= k:
            self.cache[self.next_k] = next(self.stream)
            self.next_k += 1
        return self.cache.pop(k)


def _replay_plan(args, run):
    records = [json.loads(p.read_text()) for p in args.replay]
    steps = min(len(r["steps"]) for r in records)
    plan = [
        [(r["index"], k) for r in records for k in r["contributions"].get(str(epoch), [])] for epoch in range(steps)
    ]
    batches = {r["index"]: _Indexed(workload.stream(run, args.batch, workload.peer_seed(r["index"]))) for r in records}
    return plan, batches


def ddp(args, run, model, result) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR=args.host, MASTER_PORT=str(args.master_port))
    dist.init_process_group("gloo", rank=args.index, world_size=args.peers)
    try:
        ddp_model = DistributedDataParallel(PretrainingLoss(model))  # the loss the peers compute
        opt, sched = _optimizer(run, model)
        n = run.target_batch_size // args.batch // args.peers  # micro-batches per rank: same global batch
        stream = workload.stream(run, args.batch, workload.peer_seed(args.index))
        dist.barrier()
        tx_before = net_tx_bytes()  # after the initial broadcast of the model and the barrier: training traffic only
        # forward/backward of the no_sync micro-batches (the last one of a step also all-reduces)
        compute_s, compute_cpu_s, timed = 0.0, 0.0, 0
        cpu_before = cpu_breakdown()
        for _ in range(args.steps):
            for i in range(n):
                if i < n - 1:
                    began, began_cpu = time.perf_counter(), time.thread_time()
                    with ddp_model.no_sync():
                        (ddp_model(**next(stream)) / n).backward()
                    compute_s, timed = compute_s + time.perf_counter() - began, timed + 1
                    compute_cpu_s += time.thread_time() - began_cpu
                else:
                    (ddp_model(**next(stream)) / n).backward()  # all-reduce (mean over ranks) here
            opt.step()
            sched.step()
            opt.zero_grad()
            result["steps"].append([time.time(), len(result["steps"]) + 1])
        dist.barrier()
        result.update(link_tx_bytes=net_tx_bytes() - tx_before)
        result.update(compute_s=compute_s, compute_cpu_s=compute_cpu_s, micro_batches=timed,
                      cpu_during_training=_cpu_used_since(cpu_before))  # fmt: skip
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
