"""Test-only fault hooks for the fault suite (``tests/faults``). Not in the wheel; ``peer.hooks`` loads them only when
a ``BERTSWARM_TEST_*`` variable is set."""
