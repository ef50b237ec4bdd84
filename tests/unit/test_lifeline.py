"""``peer.swarm.lifeline``'s quiet path: a process that dies while it receives a file descriptor from this one is one
debug line, not a bare traceback in the peer's terminal (seen when a helper was killed: test_crash_cleanup). Each case
runs in a fresh interpreter, since the lifeline changes process-wide hooks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import os, socket, sys, time
    from multiprocessing import resource_sharer
    if sys.argv[1] == "lifeline":
        from peer.swarm import lifeline
        lifeline.install()
    r, w = os.pipe()
    shared = resource_sharer.DupFd(r)  # what pickling a pipe end or a tensor's descriptor for another process does
    client = socket.socket(socket.AF_UNIX)
    client.connect(resource_sharer._resource_sharer._address)
    client.close()  # the receiving process dies mid-handshake
    time.sleep(0.5)
    try:
        raise ConnectionResetError("a real bug elsewhere")
    except ConnectionResetError:
        sys.excepthook(*sys.exc_info())
    print("done")
    """
)


def _run(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr
    return done.stderr


@pytest.mark.timeout(60)
def test_a_receiver_that_dies_mid_transfer_prints_no_traceback():
    plain = _run("plain")
    assert "resource_sharer.py" in plain, plain  # the probe does reach the case (Python prints it without the hook)
    quiet = _run("lifeline")
    assert "resource_sharer.py" not in quiet, quiet
    assert "a real bug elsewhere" in quiet, quiet  # any other exception keeps its traceback
