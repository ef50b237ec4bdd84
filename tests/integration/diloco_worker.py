"""One DiLoCo peer of ``test_diloco``: a tiny MLP trained on fixed per-peer batches through ``peer.swarm.diloco``.

Usage: python diloco_worker.py CONFIG_JSON (keys: see ``DEFAULTS``). Prints ``ADDRESS <maddr>`` once its DHT is up,
``ENTER <b>`` just before the inner step that ends phase ``b`` (1-based), ``BOUNDARY <b> <outcome> <epoch>`` after it,
and ``LINGER`` when it stays up serving its state (until ``OUT/stop`` exists). Writes ``final-<index>.safetensors``
(θ_outer, momentum, epoch), ``outer-<index>-<b>.safetensors`` per boundary if asked, and ``record-<index>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from hivemind.utils import ValueWithExpiration, get_dht_time
from safetensors.torch import save_file

from peer.config import PeerConfig
from peer.swarm.dht import join_addresses, start_dht, stop_dht
from peer.swarm.diloco import DiLoCo, _Exchange

DEFAULTS = dict(
    index=0,
    peers=2,  # start training once this many workers are up (barrier in the DHT)
    out=".",
    join=None,
    run_id="dl",
    rounds=3,  # boundaries to run
    until_epoch=None,  # instead: run until the outer epoch reaches this
    step_seconds=0.0,  # simulated compute per inner step
    inner_steps=2,
    # the plain mean: these tests check DiLoCo's arithmetic against an exact reference (tests/unit/
    # test_robust_aggregation.py and test_robust_allreduce.py check the robust rules, test_swarm.py the product default)
    aggregation="mean",
    inner="sgd",
    inner_lr=0.05,
    outer_lr=0.7,
    outer_momentum=0.9,
    nesterov=True,
    compression="none",
    overlap=False,
    agreement_every=None,
    matchmaking_time=1.0,
    averaging_timeout=20.0,
    wait_for_peers=15.0,
    heartbeat_period=1.0,
    dump_every_boundary=False,
    linger=False,
    join_only=False,  # load the state from peers, dump it, exit
    delays={},  # {"b": seconds}: sleep after boundary b (a straggler)
    fail_epochs=[],  # outer epochs whose round this worker fails on its own, as if its group never formed
)
BATCH, IN, HIDDEN, OUT = 5, 6, 8, 3


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))


def make_batch(peer: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner step ``k`` of peer ``peer``: the same tensors here and in the test's references."""
    g = torch.Generator().manual_seed(7919 * (peer + 1) + k)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)


def loss_fn(model: torch.nn.Module, peer: int, k: int) -> torch.Tensor:
    x, y = make_batch(peer, k)
    return torch.nn.functional.mse_loss(model(x), y)


def make_inner(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.SGD(params, lr=lr)


def dump(engine: DiLoCo, path: Path) -> None:
    params, momentum, epoch = engine.outer_state()
    tensors = {f"param.{i}": p.contiguous() for i, p in enumerate(params)}
    tensors.update({f"momentum.{i}": m.contiguous() for i, m in enumerate(momentum) if m is not None})
    save_file(tensors, str(path), metadata={"epoch": str(epoch)})


def barrier(dht, cfg: dict) -> None:
    key = f"{cfg['run_id']}_ready"
    dht.store(key, True, get_dht_time() + 300, subkey=cfg["index"])
    deadline = time.monotonic() + 60
    while len((dht.get(key, latest=True) or ValueWithExpiration({}, 0)).value) < cfg["peers"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the other workers never showed up")
        time.sleep(0.1)


def main() -> None:
    cfg = {**DEFAULTS, **json.loads(sys.argv[1])}
    out, index = Path(cfg["out"]), cfg["index"]
    torch.set_num_threads(1)
    peer_cfg = PeerConfig(join=[cfg["join"]] if cfg["join"] else [], state_dir=str(out / f"state-{index}"))
    dht = start_dht(peer_cfg)
    print("ADDRESS", join_addresses(dht)[0], flush=True)
    model = make_model()
    reports = []
    engine = DiLoCo(
        dht=dht,
        run_id=cfg["run_id"],
        model=model,
        inner_steps=cfg["inner_steps"],
        outer_lr=cfg["outer_lr"],
        outer_momentum=cfg["outer_momentum"],
        nesterov=cfg["nesterov"],
        compression=cfg["compression"],
        overlap=cfg["overlap"],
        agreement_every=cfg["agreement_every"],
        matchmaking_time=cfg["matchmaking_time"],
        averaging_timeout=cfg["averaging_timeout"],
        wait_for_peers=cfg["wait_for_peers"],
        heartbeat_period=cfg["heartbeat_period"],
        aggregation=cfg["aggregation"],
        on_round=lambda report: reports.append(dataclasses.asdict(report)),
    )
    if cfg["fail_epochs"]:
        fail_rounds(engine, set(cfg["fail_epochs"]))
    try:
        if cfg["join_only"]:
            loaded = engine.load_state_from_peers()
            dump(engine, out / f"final-{index}.safetensors")
            (out / f"record-{index}.json").write_text(json.dumps({"loaded": loaded, "status": status(engine)}))
            return
        train(cfg, engine, model, reports)
        if cfg["linger"]:
            print("LINGER", flush=True)
            deadline = time.monotonic() + 120
            while not (out / "stop").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        engine.shutdown()
        stop_dht(dht)


def fail_rounds(engine: DiLoCo, epochs: set[int]) -> None:
    """The rounds of these outer epochs fail on this worker alone: it marks itself ready, looks for no group, and once
    its groupmates are at the boundary too it waits out their matchmaking, then steps with its own pseudo-gradient, as
    when hivemind's matchmaking loses a group (they wait in vain and step alone). Returning at once instead would let a
    slower groupmate find this worker a round ahead and simply load its state."""
    match = engine._match_and_average

    def match_or_fail(epoch: int) -> _Exchange:
        if epoch not in epochs:
            return match(epoch)
        deadline = time.monotonic() + 60
        while not any(r == epoch and ready for r, ready in engine._read_records()) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(engine.matchmaking_timeout + 1.0)
        return _Exchange("failed", epoch)

    engine._match_and_average = match_or_fail


def status(engine: DiLoCo) -> dict:
    return {k: v for k, v in dataclasses.asdict(engine.status).items() if k != "last"}


def train(cfg: dict, engine: DiLoCo, model: torch.nn.Module, reports: list) -> None:
    out, index = Path(cfg["out"]), cfg["index"]
    opt = make_inner(cfg["inner"], model.parameters(), cfg["inner_lr"])
    barrier(engine.dht, cfg)
    k, boundary = 0, 0

    def more() -> bool:
        return boundary < cfg["rounds"] if cfg["until_epoch"] is None else engine.outer_epoch < cfg["until_epoch"]

    while more():
        if engine.inner_step == cfg["inner_steps"] - 1:
            print("ENTER", boundary + 1, flush=True)
        time.sleep(cfg["step_seconds"])
        opt.zero_grad()
        loss_fn(model, index, k).backward()
        opt.step()
        k += 1
        report = engine.after_inner_step()
        if engine.inner_step == 0:
            boundary += 1
            outcome = report.outcome if report is not None else "-"
            print("BOUNDARY", boundary, outcome, engine.outer_epoch, flush=True)
            if cfg["dump_every_boundary"]:
                dump(engine, out / f"outer-{index}-{boundary}.safetensors")
            time.sleep(float(cfg["delays"].get(str(boundary), 0.0)))
    if cfg["overlap"]:
        engine.flush()
    dump(engine, out / f"final-{index}.safetensors")
    (out / f"record-{index}.json").write_text(json.dumps({"reports": reports, "status": status(engine)}))


if __name__ == "__main__":
    main()
