"""``bertswarm-peer doctor`` as a volunteer runs it: a real process, alone and against a live peer on 127.0.0.1.

Each run's wall time is printed, not asserted (machines are noisy); the doctor must leave no process behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer.doctor import CHECK_NAMES, NO_JOIN

from .conftest import Swarm, free_port

pytestmark = pytest.mark.swarm
REPO = Path(__file__).resolve().parents[2]
A_PEER_ID = "QmczuXUNmjupofUkbQgc4u1jnpJLbXgygJx3K9KfmkC9Dr"


def doctor(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """``python -m peer doctor ARGS`` in its own session; kills the session if it hangs, and checks that nothing of it
    (its DHT process, p2pd) outlives it."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "peer", "doctor", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        leftovers = _wait_for_group_exit(proc.pid, 10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"doctor {' '.join(args)}: exit {proc.returncode} in {time.monotonic() - started:.1f} s\n{out}{err}")
    assert not leftovers, "the doctor left processes behind"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _wait_for_group_exit(pgid: int, seconds: float) -> bool:
    """True when processes of the group are still alive after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


def row(out: str, name: str) -> str:
    """The table row of one check (its mark, name and detail), and the fix line under it if there is one."""
    lines = out.splitlines()
    for index, line in enumerate(lines):
        if line[2:].startswith(name + " ") or line[2:] == name:
            fix = lines[index + 1] if index + 1 < len(lines) and lines[index + 1].lstrip().startswith("fix: ") else ""
            return line + ("\n" + fix if fix else "")
    raise AssertionError(f"no {name!r} row in:\n{out}")


@pytest.mark.timeout(120)
def test_without_join_every_check_passes_or_is_skipped(tmp_path):
    result = doctor("--state-dir", str(tmp_path / "state"))
    assert result.returncode == 0, result.stderr
    for name in CHECK_NAMES:
        assert row(result.stdout, name)[0] in "✓–"
    for name in ("join", "dial-back", "clock", "manifest"):
        assert row(result.stdout, name).startswith("–") and NO_JOIN in row(result.stdout, name)
    assert row(result.stdout, "p2pd").startswith("✓")
    assert "a peer would work" in result.stdout
    assert not (tmp_path / "state").exists()  # it checked the state dir without creating it


@pytest.mark.timeout(120)
def test_a_dead_join_address_fails_with_its_fix(tmp_path):
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{A_PEER_ID}"
    result = doctor("--state-dir", str(tmp_path / "state"), "--join", dead)
    assert result.returncode == 1
    join = row(result.stdout, "join")
    assert join.startswith("✗") and "could not reach any peer" in join and "\n" in join and "fix: " in join
    assert row(result.stdout, "p2pd").startswith("✓")  # p2pd itself is fine: only the bootstrap peer is missing
    assert row(result.stdout, "manifest").startswith("–")
    assert result.stderr.strip().endswith("see the fixes above") and "join" in result.stderr


@pytest.mark.timeout(120)
def test_an_uncreatable_state_dir_fails_with_its_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = doctor("--state-dir", str(blocker / "state"))
    assert result.returncode == 1
    state = row(result.stdout, "state dir")
    assert state.startswith("✗") and "not a directory" in state and "fix: pass --state-dir" in state
    assert result.stderr.count("\n") == 1 and "state dir" in result.stderr


@pytest.fixture(scope="module")
def live_peer(tmp_path_factory, small_corpus):
    swarm = Swarm(tmp_path_factory.mktemp("doctor-swarm"), small_corpus)
    try:
        peer = swarm.start("bootstrap")
        peer.wait_for_join_address(90)
        yield peer
    finally:
        swarm.close()


@pytest.mark.timeout(240)
def test_joining_a_live_peer(live_peer, tmp_path):
    result = doctor("--state-dir", str(tmp_path / "state"), "--join", live_peer.join_address)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}--- the live peer:\n{live_peer.log_tail()}"
    for name in ("join", "dial-back", "clock", "manifest"):
        assert row(result.stdout, name).startswith("✓"), row(result.stdout, name)
    assert "your flags, tokenizer and data agree" in row(result.stdout, "manifest")
    assert "seq-len 64" in row(result.stdout, "manifest")  # the run's (the harness's), which a joiner adopts
    assert "reachable from this machine" in row(result.stdout, "dial-back")
    assert "cannot be checked without a public peer" in row(result.stdout, "dial-back")
    assert "x 64 tokens" in row(result.stdout, "memory")  # estimated for the run's settings
    assert live_peer.alive()


@pytest.mark.timeout(240)
def test_conflicting_flags_and_a_busy_state_dir_fail_with_fixes(live_peer):
    result = doctor("--state-dir", str(live_peer.state_dir), "--join", live_peer.join_address, "--preset", "mini")
    assert result.returncode == 1
    assert row(result.stdout, "join").startswith("✓"), f"{result.stdout}--- the live peer:\n{live_peer.log_tail()}"
    manifest = row(result.stdout, "manifest")
    assert manifest.startswith("✗") and "run has 'tiny', you asked for 'mini'" in manifest
    assert "fix: drop these flags to adopt the run's settings" in manifest
    state = row(result.stdout, "state dir")
    assert state.startswith("✗") and "in use by another running peer" in state and "fix: " in state
    assert row(result.stdout, "clock").startswith("✓")
    assert "manifest" in result.stderr and "state dir" in result.stderr
    assert live_peer.alive()
