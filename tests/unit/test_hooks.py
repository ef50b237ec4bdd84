"""Test hooks stay out of a volunteer's peer: no variable, no hooks; a variable set, loud hooks."""

import logging

import pytest

from peer import hooks


def test_no_variable_no_hooks():
    loaded = hooks.load(environ={"BERTSWARM_JOIN": "x"})
    assert loaded is hooks.NO_HOOKS and loaded.paused(0) is False
    assert loaded.corrupt_gradients(object()) is None


def test_a_test_variable_loads_the_fault_hooks_with_a_loud_warning(caplog, tmp_path):
    pause = tmp_path / "pause"
    with caplog.at_level(logging.WARNING, logger="peer.hooks"):
        loaded = hooks.load(environ={"BERTSWARM_TEST_PAUSE_FILE": str(pause)})
    assert loaded is not hooks.NO_HOOKS and hasattr(loaded, "install") and hasattr(loaded, "corrupt_gradients")
    assert "TEST HOOKS ACTIVE (BERTSWARM_TEST_PAUSE_FILE)" in caplog.text


def test_the_pause_file_holds_now_or_from_the_step_it_names(tmp_path, monkeypatch):
    from peer.testing import faults

    pause = tmp_path / "pause"
    monkeypatch.setattr(faults, "PAUSE_FILE", str(pause))
    assert not faults.paused(5)  # no file: train
    pause.write_text("")
    assert faults.paused(5)  # an empty file: hold at once
    pause.write_text("7\n")
    assert not faults.paused(5) and not faults.paused(6)  # a peer behind the named step trains on to it
    assert faults.paused(7) and faults.paused(8)
    monkeypatch.setattr(faults, "PAUSE_FILE", None)
    assert not faults.paused(8)


def test_missing_hooks_are_one_line(monkeypatch):
    import sys

    import pytest

    from peer.errors import UserError

    monkeypatch.setitem(sys.modules, "peer.testing", None)  # as in the wheel, which leaves peer.testing out
    with pytest.raises(UserError, match="BERTSWARM_TEST_LIE is set, but this installation has no test hooks"):
        hooks.load(environ={"BERTSWARM_TEST_LIE": "1"})


def test_a_switch_set_to_0_loads_no_hooks():
    assert hooks.load(environ={"BERTSWARM_TEST_LIE": "0", "BERTSWARM_TEST_NONFINITE_GRADS": ""}) is hooks.NO_HOOKS


def test_attack_phases_parse_and_bad_values_are_refused():
    from peer.testing import faults

    assert faults.parse_attack(None) == []
    assert faults.parse_attack("signflip") == [(0, "signflip")]
    assert faults.parse_attack("signflip,random@6") == [(0, "signflip"), (6, "random")]
    for bad in ("flip", "random@x", "random@6,signflip@2", "signflip,signflip"):
        with pytest.raises(ValueError):
            faults.parse_attack(bad)


def test_attack_sends_the_gradient_flipped_x1000_then_a_random_10x_direction_per_step():
    import torch

    from peer.testing import faults

    model = torch.nn.Linear(4, 3)
    honest = [torch.randn_like(p) for p in model.parameters()]

    class Trainer:  # what the attack reads: the global step
        class opt:
            local_epoch = 0

    attack = faults._Attack(faults.parse_attack("signflip,random@2"))
    attack.trainer = Trainer

    def sent(epoch: int) -> list[torch.Tensor]:
        Trainer.opt.local_epoch = epoch
        for p, g in zip(model.parameters(), honest, strict=True):
            p.grad = g.clone()
        attack(model)
        return [p.grad.clone() for p in model.parameters()]

    def norm(grads):
        return float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))

    assert all(torch.equal(s, -1000.0 * g) for s, g in zip(sent(1), honest, strict=True))
    first, again, later = sent(2), sent(2), sent(3)
    assert norm(first) == pytest.approx(10 * norm(honest), rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # one direction per global step
    assert not all(torch.allclose(a, b) for a, b in zip(first, later, strict=True))
