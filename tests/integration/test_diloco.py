"""DiLoCo engine (``peer.swarm.diloco``) with real peer processes on 127.0.0.1, checked against pure-torch references.

Every worker (``diloco_worker.py``) runs in its own session and is SIGKILLed with its whole process group (DHT, p2pd,
averagers) if still alive when its test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .diloco_worker import loss_fn, make_inner, make_model

WORKER = Path(__file__).with_name("diloco_worker.py")
ATOL = 1e-6


class Worker:
    def __init__(self, out: Path, **cfg):
        self.index = cfg["index"]
        cfg = {"out": str(out), **cfg}
        self.log = open(out / f"worker-{self.index}.log", "wb")  # noqa: SIM115 - closed in reap()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().strip())

    def wait_for(self, prefix: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"worker {self.index} never printed {prefix!r}; log:\n{self.log_tail()}")

    def address(self) -> str:
        return self.wait_for("ADDRESS").split()[1]

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def finish(self, timeout: float) -> None:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.index} did not finish; log:\n{self.log_tail()}") from None
        assert rc == 0, f"worker {self.index} exited with {rc}; log:\n{self.log_tail()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def reap(self) -> None:
        # the whole group: the DHT, p2pd and averager processes too, even after a clean exit of the worker
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()


@pytest.fixture
def workers(tmp_path):
    started: list[Worker] = []

    def start(**cfg) -> Worker:
        worker = Worker(tmp_path, **cfg)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.reap()


def run_swarm(start, n: int, finish_timeout: float = 60, **cfg) -> list[Worker]:
    first = start(index=0, peers=n, **cfg)
    join = first.address()
    procs = [first] + [start(index=i, peers=n, join=join, **cfg) for i in range(1, n)]
    for proc in procs:
        proc.finish(finish_timeout)
    return procs


def record(out: Path, index: int) -> dict:
    return json.loads((out / f"record-{index}.json").read_text())


def outer_dump(path: Path) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        epoch = int(f.metadata()["epoch"])
    params = [tensors[f"param.{i}"] for i in range(sum(k.startswith("param.") for k in tensors))]
    momentum = [tensors[f"momentum.{i}"] for i in range(sum(k.startswith("momentum.") for k in tensors))]
    return params, momentum, epoch


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def diloco_reference(
    n: int, rounds: int, inner_steps: int, inner: str, inner_lr: float, outer_lr: float, momentum: float, overlap: bool
) -> list[torch.Tensor]:
    """Pure-torch lockstep DiLoCo with ``n`` peers in one process (blocking, or the eager variant); returns θ_outer."""
    models = [make_model() for _ in range(n)]
    opts = [make_inner(inner, m.parameters(), inner_lr) for m in models]
    outer = [torch.nn.Parameter(p.detach().clone()) for p in models[0].parameters()]
    outer_opt = torch.optim.SGD(outer, lr=outer_lr, momentum=momentum, nesterov=momentum > 0)
    refs = [[p.detach().clone() for p in m.parameters()] for m in models]
    pending = None

    def outer_step(avg):
        for p, g in zip(outer, avg, strict=True):
            p.grad = g.clone()
        outer_opt.step()

    with torch.no_grad():
        for r in range(rounds):
            for h in range(inner_steps):
                for i, (model, opt) in enumerate(zip(models, opts, strict=True)):
                    with torch.enable_grad():
                        opt.zero_grad()
                        loss_fn(model, i, r * inner_steps + h).backward()
                    opt.step()
            if not overlap:
                deltas = [[o - p for o, p in zip(outer, m.parameters(), strict=True)] for m in models]
                outer_step([sum(ds) / n for ds in zip(*deltas, strict=True)])
                for m in models:
                    for p, o in zip(m.parameters(), outer, strict=True):
                        p.copy_(o)
                continue
            if pending is not None:
                outer_step(pending)
            deltas = [[rf - p for rf, p in zip(refs[i], m.parameters(), strict=True)] for i, m in enumerate(models)]
            pending = [sum(ds) / n for ds in zip(*deltas, strict=True)]
            for i, m in enumerate(models):
                for p, o, d, rf in zip(m.parameters(), outer, deltas[i], refs[i], strict=True):
                    p.copy_(o - d)
                    rf.copy_(p)
        if overlap and pending is not None:
            outer_step(pending)  # the worker's flush()
    return [p.detach() for p in outer]


def assert_all_success(out: Path, n: int, rounds: int) -> None:
    for i in range(n):
        outcomes = [(r["outcome"], r["group_size"]) for r in record(out, i)["reports"]]
        assert outcomes == [("success", n)] * rounds, f"peer {i}: {outcomes}"


@pytest.mark.swarm
@pytest.mark.timeout(90)
def test_h1_equals_data_parallel_sgd(tmp_path, workers):
    """H=1, inner SGD(lr), outer SGD(lr=1, no momentum): θ_{t+1} = θ_t − lr · mean_i ∇L_i(θ_t), step for step."""
    steps, lr = 4, 0.1
    cfg = dict(rounds=steps, inner_steps=1, inner="sgd", inner_lr=lr, outer_lr=1.0, outer_momentum=0.0)
    run_swarm(workers, 2, **cfg)
    assert_all_success(tmp_path, 2, steps)
    model = make_model()
    params = list(model.parameters())
    for k in range(steps):
        grads = []
        for i in range(2):
            model.zero_grad()
            loss_fn(model, i, k).backward()
            grads.append([p.grad.clone() for p in params])
        with torch.no_grad():
            for p, g0, g1 in zip(params, *grads, strict=True):
                p -= lr * (g0 + g1) / 2
    expected = [p.detach() for p in params]
    for i in range(2):
        outer, _, epoch = outer_dump(tmp_path / f"final-{i}.safetensors")
        assert epoch == steps
        assert max_diff(outer, expected) <= ATOL
    assert max_diff(expected, list(make_model().parameters())) > 100 * ATOL  # it did train


@pytest.mark.swarm
@pytest.mark.timeout(90)
@pytest.mark.parametrize("inner", ["adamw"])
def test_h4_nesterov_matches_lockstep_reference(tmp_path, workers, inner):
    rounds, h = 3, 4
    cfg = dict(rounds=rounds, inner_steps=h, inner=inner, inner_lr=0.01, outer_lr=0.7, outer_momentum=0.9)
    run_swarm(workers, 2, **cfg)
    assert_all_success(tmp_path, 2, rounds)
    expected = diloco_reference(2, rounds, h, inner, 0.01, 0.7, 0.9, overlap=False)
    for i in range(2):
        outer, momentum, epoch = outer_dump(tmp_path / f"final-{i}.safetensors")
        assert epoch == rounds and len(momentum) == len(outer)
        assert max_diff(outer, expected) <= ATOL
        status = record(tmp_path, i)["status"]
        assert status["bytes_sent"] > 0 and status["rounds"]["success"] == rounds


@pytest.mark.swarm
@pytest.mark.timeout(90)
def test_joiner_gets_bitwise_outer_state(tmp_path, workers):
    """A peer joining after round 2 holds θ_outer, momentum and epoch bit for bit equal to a peer's."""
    cfg = dict(rounds=2, inner_steps=2, inner="adamw", inner_lr=0.01, outer_lr=0.7, outer_momentum=0.9, linger=True)
    first = workers(index=0, peers=2, **cfg)
    join = first.address()
    second = workers(index=1, peers=2, join=join, **cfg)
    for worker in (first, second):
        worker.wait_for("LINGER")
    joiner = workers(index=2, peers=1, join=join, join_only=True)
    joiner.finish(40)
    (tmp_path / "stop").touch()
    for worker in (first, second):
        worker.finish(30)
    assert_all_success(tmp_path, 2, 2)
    assert record(tmp_path, 2)["loaded"] is True
    params, momentum, epoch = outer_dump(tmp_path / "final-2.safetensors")
    assert epoch == 2 and len(momentum) == len(params)
    matches = []
    for i in range(2):
        p, m, e = outer_dump(tmp_path / f"final-{i}.safetensors")
        matches.append(
            e == epoch
            and all(torch.equal(a, b) for a, b in zip(p, params, strict=True))
            and all(torch.equal(a, b) for a, b in zip(m, momentum, strict=True))
        )
    assert any(matches), "the joiner's outer state equals neither peer's bit for bit"
    assert max(m.abs().max().item() for m in momentum) > 0  # the momentum really was transferred


@pytest.mark.swarm
@pytest.mark.timeout(90)
def test_straggler_reloads_and_rejoins(tmp_path, workers):
    """Peer 1 sleeps after round 1; peer 0 steps alone, peer 1 finds itself stale, reloads, and both finish together."""
    cfg = dict(until_epoch=6, inner_steps=2, step_seconds=0.2, wait_for_peers=1.5, outer_lr=0.7, outer_momentum=0.9)
    first = workers(index=0, peers=2, **cfg)
    second = workers(index=1, peers=2, join=first.address(), delays={"1": 3.0}, **cfg)
    for worker in (first, second):
        worker.finish(60)
    outcomes = [[r["outcome"] for r in record(tmp_path, i)["reports"]] for i in range(2)]
    assert "solo" in outcomes[0], outcomes
    assert "reloaded" in outcomes[1], outcomes
    assert record(tmp_path, 1)["status"]["state_loads"] >= 1
    assert outcomes[0][-1] == outcomes[1][-1] == "success", outcomes
    finals = [outer_dump(tmp_path / f"final-{i}.safetensors") for i in range(2)]
    assert finals[0][2] == finals[1][2] == 6
    assert max_diff(finals[0][0], finals[1][0]) <= ATOL


@pytest.mark.swarm
@pytest.mark.timeout(90)
def test_sigkill_mid_round_leaves_survivor_training(tmp_path, workers):
    rounds = 5
    cfg = dict(rounds=rounds, inner_steps=2, step_seconds=0.1, wait_for_peers=3.0, averaging_timeout=8.0)
    # the survivor lingers after round 1, so the victim dies at the boundary of round 2, ready on record and waiting for
    # it: the survivor then expects a group of 2 that never forms (a round takes ~0.05 s on loopback once both are
    # there, too short to aim a kill at the all-reduce itself)
    survivor = workers(index=0, peers=2, delays={"1": 2.0}, **cfg)
    victim = workers(index=1, peers=2, join=survivor.address(), **cfg)
    victim.wait_for("ENTER 2", timeout=60)
    time.sleep(0.6)
    victim.kill()
    survivor.finish(60)
    reports = record(tmp_path, 0)["reports"]
    outcomes = [r["outcome"] for r in reports]
    assert len(outcomes) == rounds and outcomes[0] == "success", outcomes
    # round 2: the victim's record still says ready, so the survivor waits out its matchmaking for it, then goes on
    assert all(o in ("failed", "solo") for o in outcomes[1:]), outcomes
    assert record(tmp_path, 0)["status"]["outer_epoch"] == rounds
    for r in reports[1:]:  # no round blocked longer than its bounds
        assert r["blocked_seconds"] < 3.0 + 3 * 1.0 + 8.0 + 10


COMPRESSED_ROUNDS, AGREE_EVERY = 6, 3
# With 8-bit pseudo-gradients each peer gets a slightly different average; θ_outer of the two peers differ by at most
# DRIFT_BOUND between agreements (measured ~1e-4 here; the outer update per round is ~1e-2), and by fp32 rounding
# right after an exact agreement round.
DRIFT_BOUND = 2e-3


@pytest.mark.swarm
@pytest.mark.timeout(90)
def test_int8_drift_is_bounded_and_agreement_restores_equality(tmp_path, workers):
    cfg = dict(
        rounds=COMPRESSED_ROUNDS, inner_steps=2, compression="int8", agreement_every=AGREE_EVERY,
        outer_lr=0.7, outer_momentum=0.9, dump_every_boundary=True,
    )  # fmt: skip
    run_swarm(workers, 2, **cfg)
    reports = [record(tmp_path, i)["reports"] for i in range(2)]
    for rs in reports:
        assert [r["outcome"] for r in rs] == ["success"] * COMPRESSED_ROUNDS
        assert [r["agreed"] for r in rs] == [(b + 1) % AGREE_EVERY == 0 for b in range(COMPRESSED_ROUNDS)]
        assert rs[0]["bytes_sent"] > 0
    drifts = []
    for b in range(1, COMPRESSED_ROUNDS + 1):
        (pa, ma, ea), (pb, mb, eb) = (outer_dump(tmp_path / f"outer-{i}-{b}.safetensors") for i in range(2))
        assert ea == eb == b
        drift = max_diff(pa, pb)
        print(f"boundary {b}: max |θ_outer(0) − θ_outer(1)| = {drift:.2e}, momentum {max_diff(ma, mb):.2e}")
        if b % AGREE_EVERY == 0:
            assert drift <= 1e-6 and max_diff(ma, mb) <= 1e-6
        else:
            assert drift <= DRIFT_BOUND
            drifts.append(drift)
    assert max(drifts) > 1e-7  # the compression really is lossy: without agreement the peers would drift


@pytest.mark.swarm
@pytest.mark.timeout(90)
def test_a_failed_round_leaves_the_peers_apart_until_the_next_round_agrees(tmp_path, workers):
    # uncompressed, no scheduled agreement (the defaults): only the on-demand agreement can bring them back together
    cfg = dict(rounds=3, inner_steps=2, dump_every_boundary=True)
    first = workers(index=0, peers=2, **cfg)
    join = first.address()
    second = workers(index=1, peers=2, join=join, fail_epochs=[1], **cfg)  # its round of epoch 1 fails
    for worker in (first, second):
        worker.finish(60)
    reports = [record(tmp_path, i)["reports"] for i in range(2)]
    outcomes = [[r["outcome"] for r in rs] for rs in reports]
    assert outcomes[1] == ["success", "failed", "success"], outcomes
    assert outcomes[0][0] == "success" and outcomes[0][1] in ("solo", "failed") and outcomes[0][2] == "success"
    drifts = []
    for b in range(1, 4):
        (pa, ma, ea), (pb, mb, eb) = (outer_dump(tmp_path / f"outer-{i}-{b}.safetensors") for i in range(2))
        assert ea == eb == b
        drifts.append(max(max_diff(pa, pb), max_diff(ma, mb)))
    print("max |outer(0) − outer(1)| (params and momentum) per boundary:", [f"{d:.1e}" for d in drifts])
    assert drifts[0] <= 1e-6  # together after a successful round
    assert drifts[1] > 1e-4  # each stepped with its own pseudo-gradient
    assert drifts[2] <= 1e-6  # both said "apart" in the next round's gathered data, so that round ended agreeing
    for rs in reports:
        assert [(r["agreed"], r["on_demand"]) for r in rs] == [(False, False), (False, False), (True, True)]


@pytest.mark.swarm
@pytest.mark.timeout(90)
def test_overlap_two_peers_match_eager_reference(tmp_path, workers):
    rounds, h = 4, 2
    cfg = dict(
        rounds=rounds, inner_steps=h, inner="adamw", inner_lr=0.01, outer_lr=0.7, outer_momentum=0.9, overlap=True
    )
    run_swarm(workers, 2, **cfg)
    assert_all_success(tmp_path, 2, rounds)  # the flush at the end reports the last round
    expected = diloco_reference(2, rounds, h, "adamw", 0.01, 0.7, 0.9, overlap=True)
    finals = [outer_dump(tmp_path / f"final-{i}.safetensors") for i in range(2)]
    for params, _, epoch in finals:
        assert epoch == rounds
        assert max_diff(params, expected) <= ATOL
    assert max_diff(finals[0][0], finals[1][0]) <= ATOL


@pytest.mark.swarm
@pytest.mark.timeout(60)
def test_overlap_bookkeeping_single_peer(tmp_path, workers):
    """One peer, overlap: Δ_k = ref − θ_local, θ_local ← θ_outer − Δ_k, the outer step one boundary late, flush."""
    rounds, h = 4, 3
    cfg = dict(rounds=rounds, inner_steps=h, inner="sgd", inner_lr=0.05, outer_lr=0.7, outer_momentum=0.9)
    workers(index=0, peers=1, overlap=True, **cfg).finish(40)
    outcomes = [r["outcome"] for r in record(tmp_path, 0)["reports"]]
    assert outcomes == ["solo"] * rounds
    expected = diloco_reference(1, rounds, h, "sgd", 0.05, 0.7, 0.9, overlap=True)
    params, _, epoch = outer_dump(tmp_path / "final-0.safetensors")
    assert epoch == rounds
    assert max_diff(params, expected) <= 1e-7
    blocking = diloco_reference(1, rounds, h, "sgd", 0.05, 0.7, 0.9, overlap=False)
    assert max_diff(params, blocking) > 1e-4  # the eager variant is not the blocking one
