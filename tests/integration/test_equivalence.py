"""A 2-peer swarm and one process applying the same optimizer to the same global batches end with equal weights.

This proves the averaging is *right*, not merely running: each peer records which of its micro-batches entered
which global step; the reference replays exactly those batches, using the same optimizer, clipping and schedule as the
product. The averaged gradient is each peer's mean gradient weighted by its samples, as the product counts a claimed
weight: at most ``OUTLIER_FACTOR`` x the smaller one (``robust.voting_weights``). On a loaded machine one peer can
contribute 7 of a step's 8 micro-batches; the plain mean over the global batch then differs from the product's.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peer.run.model import build_model
from peer.swarm.optim import STATE_AVERAGING_EVERY, optimizer_factory, param_groups, scheduler_factory
from peer.swarm.robust import sanitize_weight, voting_weights

from .equivalence_worker import BATCH_SIZE, MANIFEST, make_batch

WORKER = Path(__file__).with_name("equivalence_worker.py")
STEPS = STATE_AVERAGING_EVERY + 1  # crosses one parameter/optimizer-state averaging round
TOLERANCE = 1e-5  # max |swarm - reference| over all weights; one optimizer step moves weights by ~lr = 3e-3


def start_worker(index, out, join=None):
    args = [sys.executable, str(WORKER), str(index), str(STEPS), str(out), *([join] if join else [])]
    log = open(out / f"worker-{index}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,
        # a round that ends in part fails the test: hivemind says why it dropped a reducer or sender only at DEBUG, so
        # the workers' logs keep the all-reduce's lines, and p2pd's own debug lines (a stream it reset, the cause
        # found and worked around in hivemind_compat), which hivemind passes on to its p2p_daemon logger, to catch it
        # coming back
        env={
            **__import__("os").environ,
            "OMP_NUM_THREADS": "1",
            "BERTSWARM_DEBUG_LOGGERS": "hivemind.averaging.allreduce,hivemind.p2p.p2p_daemon",
            "GOLOG_LOG_LEVEL": "error,p2pd=debug",
        },
    )
    proc.log = log
    return proc


def reference(contributions: dict[int, list[tuple[int, int]]]) -> dict[str, torch.Tensor]:
    model = build_model(MANIFEST.model, nsp=False, seed=MANIFEST.init_seed)
    opt = optimizer_factory(MANIFEST)(param_groups(model, MANIFEST.weight_decay))
    sched = scheduler_factory(MANIFEST)(opt)
    for epoch in range(STEPS):
        peers = sorted({peer for peer, _ in contributions[epoch]})
        means = {}  # each peer's mean gradient over its micro-batches of this step, as its averager sends it
        for peer in peers:
            batches = [k for p, k in contributions[epoch] if p == peer]
            grads = [torch.zeros_like(p) for p in model.parameters()]
            for k in batches:
                model.zero_grad()
                model(**make_batch(peer, k)).loss.backward()
                for g, p in zip(grads, model.parameters(), strict=True):
                    g += p.grad
            means[peer] = [g / len(batches) for g in grads]
        samples = [BATCH_SIZE * sum(p == peer for p, _ in contributions[epoch]) for peer in peers]
        claimed = [sanitize_weight(n, MANIFEST.target_batch_size) for n in samples]
        weights = voting_weights(torch.tensor(claimed, dtype=torch.float64))
        if weights.tolist() != claimed:
            print(f"step {epoch}: samples {samples} count as {weights.tolist()}")
        coefficients = (weights / weights.sum()).tolist()
        for i, p in enumerate(model.parameters()):
            p.grad = sum(c * means[peer][i] for c, peer in zip(coefficients, peers, strict=True))
        opt.step()
        sched.step()
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_two_peer_swarm_matches_single_process(tmp_path):
    first = start_worker(0, tmp_path)
    procs = [first]
    try:
        line = first.stdout.readline().decode()
        assert line.startswith("ADDRESS "), line
        procs.append(start_worker(1, tmp_path, join=line.split()[1]))
        for proc in procs:
            assert proc.wait(timeout=200) == 0, (tmp_path / "worker-0.log").read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                __import__("os").killpg(proc.pid, 9)
            proc.wait()
            proc.log.close()

    records = [json.loads((tmp_path / f"record-{i}.json").read_text()) for i in range(2)]
    for record in records:
        # a round in part here was p2pd resetting a stream at close (worked around in hivemind_compat); should one
        # come back, the workers' logs keep hivemind's reasons for dropping a reducer or sender, shown with the failure
        logs = {i: (tmp_path / f"worker-{i}.log").read_text().splitlines() for i in range(2)}
        why = [f"worker-{i}: {line}" for i, lines in logs.items() for line in lines
               if "caught" in line.lower() or "failed" in line or "Error" in line]  # fmt: skip
        assert all(outcome == "success" and size == 2 for outcome, size in record["rounds"]), (record["rounds"], why)
    contributions = {
        epoch: [(peer, k) for peer in range(2) for k in records[peer]["contributions"].get(str(epoch), [])]
        for epoch in range(STEPS)
    }
    for epoch, batches in contributions.items():
        peers = {peer for peer, _ in batches}
        assert peers == {0, 1}, f"step {epoch} was not averaged across both peers: {batches}"
        assert len(batches) * BATCH_SIZE >= MANIFEST.target_batch_size

    expected = reference(contributions)
    initial = {n: p.detach() for n, p in build_model(MANIFEST.model, nsp=False, seed=0).named_parameters()}
    for i in range(2):
        swarm = load_file(str(tmp_path / f"params-{i}.safetensors"))
        diff = max((swarm[n] - expected[n]).abs().max().item() for n in expected)
        moved = max((swarm[n] - initial[n]).abs().max().item() for n in expected)
        print(f"peer {i}: max |swarm - reference| = {diff:.2e}, max |swarm - initial| = {moved:.2e}")
        assert moved > 100 * TOLERANCE  # the weights really trained
        assert diff <= TOLERANCE
