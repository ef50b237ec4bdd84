"""The docker stack's join hand-off, without docker: the bootstrap peer writes its address with --address-file and
a second peer started through docker/entrypoint.sh (as in every other container) waits for it and joins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer.localswarm import JOIN_PREFIX

ENTRYPOINT = Path(__file__).resolve().parents[2] / "docker" / "entrypoint.sh"

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(180)]


def test_a_container_peer_joins_through_the_address_file(swarm, tmp_path):
    shared = tmp_path / "swarm"  # the compose file's shared volume
    shared.mkdir()
    address_file = shared / "bootstrap.addr"
    env = dict(os.environ, BERTSWARM_JOIN_FILE=str(address_file), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("BERTSWARM_JOIN", None)
    # the joiner starts first, as compose may start it: the entrypoint waits for the file
    joiner = subprocess.Popen(["sh", str(ENTRYPOINT), sys.executable, "-m", "peer", "--state-dir",
                               str(tmp_path / "joiner"), "--data", str(swarm.corpus), "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True)  # fmt: skip
    try:
        bootstrap = swarm.start("bootstrap", "--address-file", str(address_file))
        address = bootstrap.wait_for_join_address(timeout=90)
        assert address_file.read_text() == address + "\n"
        assert not list(shared.glob(".*tmp*")), "the address file is written atomically, no temporary file stays"
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = joiner.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith(JOIN_PREFIX):
                break
        assert lines and lines[-1].startswith(JOIN_PREFIX), "".join(lines[-20:])
        assert lines[-1][len(JOIN_PREFIX) :].strip() != address  # its own address: it joined, it did not restart
    finally:
        if joiner.poll() is None:
            os.killpg(joiner.pid, signal.SIGTERM)
        try:
            joiner.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(joiner.pid, signal.SIGKILL)
            joiner.wait(timeout=10)
        joiner.stdout.close()
    # it left on SIGTERM by itself: 0 once training, 130 ("interrupted") while still loading the swarm's state
    assert joiner.returncode in (0, 130), "".join(lines[-20:])


def test_the_entrypoint_gives_up_with_one_line_when_no_address_appears(tmp_path):
    env = dict(os.environ, BERTSWARM_JOIN_FILE=str(tmp_path / "never"), BERTSWARM_JOIN_WAIT="1")
    env.pop("BERTSWARM_JOIN", None)
    result = subprocess.run(["sh", str(ENTRYPOINT), "true"], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "bootstrap peer" in result.stderr


def test_an_explicit_join_wins_over_the_file(tmp_path):
    env = dict(os.environ, BERTSWARM_JOIN_FILE=str(tmp_path / "never"), BERTSWARM_JOIN="/ip4/127.0.0.1/tcp/1/p2p/x")
    result = subprocess.run(["sh", str(ENTRYPOINT), "sh", "-c", 'echo "$BERTSWARM_JOIN"'], capture_output=True,
                            text=True, env=env, timeout=30)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "/ip4/127.0.0.1/tcp/1/p2p/x"


def test_an_address_file_in_a_missing_directory_is_refused_with_one_line(tmp_path):
    target = tmp_path / "missing" / "bootstrap.addr"
    result = subprocess.run([sys.executable, "-m", "peer", "--address-file", str(target), "--state-dir",
                             str(tmp_path / "state")], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--address-file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists() and not target.parent.exists()
