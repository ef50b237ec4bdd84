"""Optimizer pieces: schedule keyed to the global epoch, clipping of the applied gradient, no hidden step at init."""

import math
import types

import pytest
import torch

from peer.config import PeerConfig
from peer.run.manifest import from_config
from peer.swarm import hivemind_compat
from peer.swarm.optim import (
    GRAD_COMPRESSIONS,
    Lamb,
    SwarmOptimizer,
    grad_compression,
    is_finite_gradient,
    lr_lambda,
    optimizer_factory,
    param_groups,
)
from peer.swarm.robust import PartialRounds


def manifest(**kw):
    return from_config(PeerConfig(**kw).validate(), "run", "a" * 64, 100)


def test_warmup_then_linear_decay():
    f = lr_lambda(manifest(warmup_steps=10, total_steps=110))
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(110) == 0.0 and f(500) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(10, 200))


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_optimizer_starts_with_state_but_unchanged_parameters(name):
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = optimizer_factory(manifest(optimizer=name, weight_decay=0.1))(param_groups(model, 0.1))
    assert all(len(opt.state[p]) == 3 for p in model.parameters())  # hivemind needs state tensors to share
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_clipping_limits_the_global_norm_of_the_applied_gradient():
    model = torch.nn.Linear(4, 1, bias=False)
    opt = optimizer_factory(manifest(max_grad_norm=0.5))(param_groups(model, 0.0))
    model.weight.grad = torch.full_like(model.weight, 10.0)
    opt.step()
    assert model.weight.grad.norm().item() == pytest.approx(0.5, rel=1e-5)


def test_lamb_decreases_a_quadratic():
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = Lamb([w], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert w.norm().item() < 0.5


def test_no_decay_on_bias_and_layernorm():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    decay, no_decay = param_groups(model, 0.01)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_non_finite_gradient_is_detected():
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    assert is_finite_gradient(model)
    model.weight.grad[0, 0] = math.nan
    assert not is_finite_gradient(model)
    model.weight.grad[0, 0] = math.inf
    assert not is_finite_gradient(model)


@pytest.mark.parametrize(
    "name, rel_error, wire_bytes_per_value", [("none", 0.0, 4), ("fp16", 1e-3, 2), ("int8", 0.1, 1)]
)
def test_grad_compression_choices_put_fewer_bytes_on_the_wire(name, rel_error, wire_bytes_per_value):
    """Each gradient compression serialises a part as hivemind sends it, and a peer decodes it (8-bit: with the
    NumPy 2.4 fix in peer/swarm/hivemind_compat.py, which grad_compression installs)."""
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    assert set(GRAD_COMPRESSIONS) == {"none", "fp16", "int8"}
    part = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    wire = serialize_torch_tensor(part, grad_compression(name).compression_type)
    assert len(wire.buffer) <= wire_bytes_per_value * part.numel() + 2048
    decoded = deserialize_torch_tensor(wire)
    assert decoded.dtype == torch.float32
    assert (decoded - part).norm() <= rel_error * part.norm()


# what the all-reduce sends: a part compressed and wrapped in an AveragingData message (relative error bound)
WIRE_ERROR = {"NONE": 0.0, "FLOAT16": 1e-3, "MEANSTD_16BIT": 1e-3, "UNIFORM_8BIT": 0.05, "QUANTILE_8BIT": 0.05,
              "BLOCKWISE_8BIT": 0.05}  # fmt: skip


@pytest.mark.parametrize("shape", [(10_000,), (37, 129)])
@pytest.mark.parametrize("name", sorted(WIRE_ERROR))
def test_every_hivemind_compression_decodes_what_it_sent(name, shape):
    """Each of hivemind's compressions, encoded as a groupmate sends a part (compressed, in a protobuf message on the
    wire) and decoded as the receiver does, with hivemind_compat's patches: under NumPy >= 2.4 hivemind 1.1.12's own
    8-bit decoders (uniform, quantile and blockwise) raise, and the all-reduce then silently keeps local values."""
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.compression.base import CompressionInfo
    from hivemind.compression.serialization import _BASE_COMPRESSION_TYPES
    from hivemind.proto import averaging_pb2

    from peer.swarm import hivemind_compat

    if name == "BLOCKWISE_8BIT":
        pytest.importorskip("bitsandbytes", reason="hivemind's blockwise 8-bit compression needs bitsandbytes")
    assert set(WIRE_ERROR) == set(_BASE_COMPRESSION_TYPES)  # a new hivemind compression gets a bound here
    hivemind_compat.install()
    part = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    compressed = _BASE_COMPRESSION_TYPES[name].compress(part, CompressionInfo.from_tensor(part))
    wire = averaging_pb2.AveragingData(tensor_part=compressed, weight=1.0).SerializeToString()
    decoded = deserialize_torch_tensor(averaging_pb2.AveragingData.FromString(wire).tensor_part)
    assert decoded.dtype == part.dtype and decoded.shape == part.shape
    assert (decoded - part).norm() <= WIRE_ERROR[name] * part.norm()


class _FinishedRound:
    """A gradient round's control as hivemind leaves it: done, with the gathered data of a group of 2."""

    def __init__(self, error=None, gathered=None):
        self.error = error
        self.gathered = gathered if gathered is not None else {"a": None, "b": None}

    def cancelled(self):
        return False

    def done(self):
        return True

    def exception(self):
        return self.error

    def result(self):
        return self.gathered


class _BareOptimizer(SwarmOptimizer):
    def __del__(self):  # nothing was started
        pass


def _bare_optimizer(rounds: list) -> SwarmOptimizer:
    """Only what ``gradient_round_finished`` reads: no DHT, no averagers."""
    opt = object.__new__(_BareOptimizer)
    opt._partial_rounds = PartialRounds()
    opt._abandoned_grads = None
    opt._after_state_load, opt._resync, opt._sharing_before_resync = False, "", None
    opt.dht = types.SimpleNamespace(peer_id="a")  # this peer's key in a round's gathered data
    opt._on_round = lambda outcome, size, seconds: rounds.append((outcome, size))
    return opt


def test_a_round_the_averager_reported_as_partial_is_counted_partial_not_success():
    rounds = []
    opt = _bare_optimizer(rounds)
    opt.gradient_round_finished(_FinishedRound(), 1.0)
    opt._partial_rounds(1, 0.25)  # what the averager process does before it sets the round's result
    opt.gradient_round_finished(_FinishedRound(), 1.0)
    opt.gradient_round_finished(_FinishedRound(), 1.0)  # the report belonged to the round before: taken once
    assert rounds == [("success", 2), ("partial", 2), ("success", 2)]


def test_a_partial_report_left_by_a_round_that_then_failed_does_not_mark_the_next_one():
    rounds = []
    opt = _bare_optimizer(rounds)
    opt._partial_rounds(1, 0.0)
    opt.gradient_round_finished(_FinishedRound(error=TimeoutError()), 1.0)
    opt.gradient_round_finished(_FinishedRound(), 1.0)
    assert [outcome for outcome, _ in rounds] == ["failed", "success"]


def test_partial_rounds_are_counted_across_a_fork():
    import multiprocessing as mp

    counter = PartialRounds()
    child = mp.get_context("fork").Process(target=counter, args=(2, 0.5))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    assert counter.take() == 1
    assert counter.take() == 0


def test_a_failed_or_solo_first_round_after_a_state_load_loads_the_state_again(monkeypatch):
    """A joiner's first round can miss the others' round (bench scenario 14, the NAT test): it must not train on one
    step apart from them; its next step waits for their round, loads their state and drops its micro-batch."""
    from types import SimpleNamespace

    rounds, loads = [], []
    opt = _bare_optimizer(rounds)
    opt.state_averager = SimpleNamespace(local_epoch=4, allow_state_sharing=True)  # after its own step 3 -> 4
    opt.averaging_timeout = 5.0
    opt.scheduled_grads = None
    epochs = iter([False, 3, 3, 4])  # the others' records: not read yet, still in the round 3 -> 4, then past it
    opt._others_epoch = lambda: next(epochs, 4)
    opt.load_state_from_peers = lambda: loads.append((opt.local_epoch, next(epochs, "waited")))

    opt._after_state_load = True
    opt.gradient_round_finished(_FinishedRound(), 1.0)  # a first round that succeeded: nothing to do
    assert not opt._resync
    opt.gradient_round_finished(_FinishedRound(error=TimeoutError()), 1.0)  # a failed round, not the first
    assert not opt._resync
    opt._after_state_load = True
    opt.gradient_round_finished(_FinishedRound(error=TimeoutError()), 1.0)
    assert opt._resync and not opt.state_averager.allow_state_sharing  # nobody downloads its apart state meanwhile
    assert opt.step() is None and loads == [(4, "waited")] and not opt._resync
    assert opt.state_averager.allow_state_sharing
    # a joiner that counted only one peer (its own record not back from the DHT yet) and stepped alone: the same
    opt._after_state_load = True
    opt.gradient_round_finished(None, 0.0)
    assert opt._resync
    assert opt.step() is None and loads == [(4, "waited"), (4, "waited")] and not opt._resync
    # ... unless the others have all left since (no live record but its own): it trains on, nothing to reload
    monkeypatch.setattr(hivemind_compat.HookedOptimizer, "step", lambda self, *a, **k: "stepped")
    opt._others_epoch = lambda: None
    opt._after_state_load = True
    opt.gradient_round_finished(None, 0.0)
    assert opt.step() == "stepped" and len(loads) == 2 and not opt._resync
    assert opt.state_averager.allow_state_sharing
    # a client-mode peer (it shares no state) stays without sharing
    opt.state_averager.allow_state_sharing = False
    opt._after_state_load = True
    opt.gradient_round_finished(None, 0.0)
    assert opt.step() == "stepped" and not opt.state_averager.allow_state_sharing


def test_a_round_with_groupmates_at_another_step_loads_the_state_again(caplog):
    """A joiner that loaded the state just before its sender stepped without it took that peer's next round as its
    own step: every round "succeeded" with it one step behind (the NAT test, at 1f25ad1). The step each groupmate
    gathered shows it; a peer off the group's most common step (on a tie, the one behind) loads the state again."""
    rounds, loads = [], []
    opt = _bare_optimizer(rounds)
    opt.state_averager = types.SimpleNamespace(local_epoch=6, allow_state_sharing=True)  # after its step 5 -> 6
    opt.averaging_timeout = 5.0
    opt.scheduled_grads = None
    opt._others_epoch = lambda: 7
    opt.load_state_from_peers = lambda: loads.append(opt.local_epoch)

    # this peer is "a": in step with the group, the later one of a tie, the majority, or beside older peers
    for fine in ({"a": 5, "b": 5}, {"a": 6, "b": 5}, {"a": 5, "b": 5, "c": 6}, {"a": 5, "b": None}, {"b": 6}):
        opt.gradient_round_finished(_FinishedRound(gathered=fine), 1.0)
        assert not opt._resync, fine
    for apart in ({"a": 5, "b": 6}, {"a": 6, "b": 5, "c": 5}):  # behind in a tie; ahead of the rest of its group
        opt.gradient_round_finished(_FinishedRound(gathered=apart), 1.0)
        assert opt._resync and not opt.state_averager.allow_state_sharing, apart
        opt._resync = ""
        opt._share_state_again()
    opt.gradient_round_finished(_FinishedRound(gathered={"a": 5, "b": 6, "c": 6}), 1.0)
    assert opt._resync and rounds[-1] == ("success", 3)
    with caplog.at_level("WARNING", logger="peer.swarm.optim"):
        assert opt.step() is None
    assert loads == [6] and not opt._resync and opt.state_averager.allow_state_sharing
    assert "averaged for its step 6 in the round of step 7" in caplog.text and "loading the state again" in caplog.text


def test_shutdown_drops_the_rounds_an_interrupted_step_left_waiting(monkeypatch):
    """After the stop's deadline interrupted a step (``HookedOptimizer``), its gradient round and its state averaging
    round are cancelled before hivemind's shutdown, which would otherwise wait for them (up to the averaging timeout:
    19.9 s from SIGTERM to exit in test_lifecycle when the step was a state-averaging one)."""
    from types import SimpleNamespace

    from hivemind.averaging.control import AveragingStage

    cancelled, shut = [], []

    def control(name, stage=AveragingStage.AWAITING_TRIGGER):
        return SimpleNamespace(done=lambda: False, stage=stage, cancel=lambda: cancelled.append(name) or True)

    monkeypatch.setattr(hivemind_compat.HookedOptimizer, "shutdown", lambda self: shut.append(
        (self.scheduled_grads, self.scheduled_state)))  # fmt: skip
    opt = _bare_optimizer([])
    opt.scheduled_grads = opt.interrupted_round = control("grads")
    opt.scheduled_state = opt.interrupted_state_round = control("state")
    opt.shutdown()
    assert cancelled == ["grads", "state"] and shut == [(None, None)]

    opt = _bare_optimizer([])  # an uninterrupted stop: rounds in a group are left to hivemind's shutdown (tag along)
    opt.scheduled_grads, opt.scheduled_state = control("grads"), control("state")
    opt.shutdown()
    assert cancelled == ["grads", "state"] and shut[-1] == (opt.scheduled_grads, opt.scheduled_state)

    opt = _bare_optimizer([])  # ... and rounds not in a group yet are cancelled, not waited for
    opt.scheduled_grads = control("grads", AveragingStage.LOOKING_FOR_GROUP)
    opt.scheduled_state = control("state", AveragingStage.IDLE)
    opt.shutdown()
    assert cancelled == ["grads", "state", "grads", "state"] and shut[-1] == (None, None)
