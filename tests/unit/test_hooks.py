"""Test hooks stay out of a volunteer's peer: no variable, no hooks; a variable set, loud hooks."""

import logging

from peer import hooks


def test_no_variable_no_hooks():
    loaded = hooks.load(environ={"BERTSWARM_JOIN": "x"})
    assert loaded is hooks.NO_HOOKS and loaded.paused() is False
    assert loaded.corrupt_gradients(object()) is None


def test_a_test_variable_loads_the_fault_hooks_with_a_loud_warning(caplog, tmp_path):
    pause = tmp_path / "pause"
    with caplog.at_level(logging.WARNING, logger="peer.hooks"):
        loaded = hooks.load(environ={"BERTSWARM_TEST_PAUSE_FILE": str(pause)})
    assert loaded is not hooks.NO_HOOKS and hasattr(loaded, "install") and hasattr(loaded, "corrupt_gradients")
    assert "TEST HOOKS ACTIVE (BERTSWARM_TEST_PAUSE_FILE)" in caplog.text


def test_missing_hooks_are_one_line(monkeypatch):
    import sys

    import pytest

    from peer.errors import UserError

    monkeypatch.setitem(sys.modules, "peer.testing", None)  # as in the wheel, which leaves peer.testing out
    with pytest.raises(UserError, match="BERTSWARM_TEST_LIE is set, but this installation has no test hooks"):
        hooks.load(environ={"BERTSWARM_TEST_LIE": "1"})


def test_a_switch_set_to_0_loads_no_hooks():
    assert hooks.load(environ={"BERTSWARM_TEST_LIE": "0", "BERTSWARM_TEST_NONFINITE_GRADS": ""}) is hooks.NO_HOOKS
