"""Test hooks, kept out of what volunteers run.

The fault suite (``tests/faults``) makes one peer of a local swarm misbehave on purpose by setting ``BERTSWARM_TEST_*``
variables (never flags). The code that acts on them lives in ``peer.testing``, which the wheel leaves out
(``pyproject.toml``); a source checkout has it. With no such variable set, the trainer gets ``NO_HOOKS``, whose every
hook does nothing. With one set, the hooks are loaded and the peer says so loudly, at WARNING, once at start.
"""

from __future__ import annotations

import logging
import os

from peer.errors import UserError

logger = logging.getLogger(__name__)

# as peer.testing.faults reads them: the switches are on at "1", the paths (and the attack's phases) whenever set
TEST_SWITCHES = ("BERTSWARM_TEST_NONFINITE_GRADS", "BERTSWARM_TEST_LIE", "BERTSWARM_TEST_IGNORE_ALLOWLIST")
TEST_PATHS = ("BERTSWARM_TEST_PAUSE_FILE", "BERTSWARM_TEST_WATCH_DIR", "BERTSWARM_TEST_ATTACK")
TEST_VARIABLES = TEST_PATHS + TEST_SWITCHES


class NoHooks:
    """What every volunteer's peer runs: no fault, no probe."""

    @staticmethod
    def install(trainer) -> None:
        pass

    @staticmethod
    def corrupt_gradients(model) -> None:
        pass

    @staticmethod
    def paused(step: int) -> bool:
        return False

    @staticmethod
    def ignore_allowlist() -> bool:
        return False


NO_HOOKS = NoHooks()


def load(environ=os.environ):
    """``NO_HOOKS``, or the fault hooks of ``peer.testing.faults`` when a test variable is set."""
    active = [name for name in TEST_PATHS if environ.get(name)]
    active += [name for name in TEST_SWITCHES if environ.get(name) == "1"]
    if not active:
        return NO_HOOKS
    try:
        from peer.testing import faults
    except ImportError:
        raise UserError(
            f"{', '.join(active)} is set, but this installation has no test hooks (they are not in the wheel); "
            "unset the variable"
        ) from None
    logger.warning(
        "TEST HOOKS ACTIVE (%s): this peer misbehaves on purpose for bertswarm's fault suite; never set these "
        "variables for real training",
        ", ".join(active),
    )
    return faults
