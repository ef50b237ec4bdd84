"""Every user mistake gets one line on stderr naming the problem and the fix, exit code 2, no traceback, and
nothing of the user's is overwritten. Each case runs the real ``bertswarm-peer`` entry point in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from .conftest import FAST, free_port

PEER_ID = "12D3KooWB72XDuQv8xY5qFEzdJutWeuR5pJuipzJaK1Z5dD9DKVG"


def run_peer(*args: str, cwd=None, timeout: float = 90) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "peer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    return proc.returncode, proc.stderr, time.monotonic() - started


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [
        line
        for line in stderr.splitlines()
        if line.startswith(("bertswarm-peer: error: ", "bertswarm-coordinator: error: "))
    ]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.mark.timeout(60)
def test_malformed_join_is_answered_before_p2pd_starts(tmp_path):
    code, err, seconds = run_peer("--state-dir", str(tmp_path / "s"), "--join", "/ip4/10.0.0.300/tcp/1")
    assert_one_line_error(code, err, "--join", "not a valid multiaddr")
    code, err, _ = run_peer("--state-dir", str(tmp_path / "s"), "--join", "/ip4/127.0.0.1/tcp/4000")
    assert_one_line_error(code, err, "lacks the /p2p/<peer-id> part")
    print(f"malformed --join answered in {seconds:.2f}s")
    assert not (tmp_path / "s" / "identity.key").exists()  # p2pd never started


@pytest.mark.timeout(90)
def test_unreachable_bootstrap_peer(tmp_path):
    address = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{PEER_ID}"  # nothing listens there
    code, err, seconds = run_peer("--state-dir", str(tmp_path / "s"), "--join", address, "--startup-timeout", "20")
    assert_one_line_error(code, err, "could not reach any peer at", address)
    print(f"unreachable bootstrap answered in {seconds:.2f}s")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: d / "missing.txt", "no such file or directory"),
        (lambda d: (d / "empty.txt").write_text("  \n") and d / "empty.txt", "empty"),
        (lambda d: (d / "blob.txt").write_bytes(b"\x00\x01\x02binary\xff") and d / "blob.txt", "binary"),
    ],
    ids=["missing", "empty", "binary"],
)
def test_bad_data_paths(tmp_path, make, fragment):
    path = make(tmp_path)
    code, err, _ = run_peer("--state-dir", str(tmp_path / "s"), "--data", str(path))
    assert_one_line_error(code, err, "--data", fragment)


@pytest.mark.timeout(60)
def test_unknown_preset_and_bad_number(tmp_path):
    code, err, _ = run_peer("--preset", "gigantic")
    assert_one_line_error(code, err, "--preset 'gigantic'", "tiny, mini, base, large")
    code, err, _ = run_peer("--batch-size", "lots")
    assert_one_line_error(code, err, "--batch-size", "invalid int value")


@pytest.mark.timeout(60)
def test_metrics_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err, _ = run_peer("--state-dir", str(tmp_path / "s"), "--metrics-port", str(port))
    assert_one_line_error(code, err, f"--metrics-port {port}", "pick a free port")


@pytest.mark.timeout(60)
def test_state_dir_problems(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    code, err, _ = run_peer("--state-dir", str(blocker / "state"))
    assert_one_line_error(code, err, "--state-dir", "pick a writable directory")
    assert blocker.read_text() == "keep me"

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "state.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    data = tmp_path / "d.txt"
    data.write_text("Some short text for a peer to tokenise. " * 50)
    code, err, _ = run_peer("--state-dir", str(corrupt), "--data", str(data), *FAST)
    assert_one_line_error(code, err, "is corrupt", "move it away")
    assert (corrupt / "state.safetensors").read_bytes().endswith(b"{garbage")  # nothing overwritten


@pytest.mark.swarm
@pytest.mark.timeout(150)
def test_manifest_conflict_and_busy_state_dir(swarm):
    first = swarm.start("a")
    address = first.wait_for_join_address(60)

    code, err, seconds = run_peer("--join", address, "--preset", "mini", "--seq-len", "32",
                                  "--state-dir", str(swarm.workdir / "x"))  # fmt: skip
    line = assert_one_line_error(
        code, err, "conflict with the run's manifest", "preset (from --preset): run has 'tiny', you asked for 'mini'",
        "seq_len (from --seq-len): run has 64", "Drop these flags",
    )  # fmt: skip
    assert "hidden_size" not in line  # the derived model section does not repeat the preset conflict
    print(f"manifest conflict answered in {seconds:.2f}s: {line}")

    code, err, _ = run_peer("--join", address, "--state-dir", str(first.state_dir))
    assert_one_line_error(code, err, "is in use by another running peer", "its own --state-dir")
    assert first.alive()


def run_coordinator(*args: str, timeout: float = 90) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "coordinator", *args], capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)  # fmt: skip
    return proc.returncode, proc.stderr


@pytest.mark.timeout(120)
def test_coordinator_bad_input(tmp_path):
    unreachable = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{PEER_ID}"
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    code, err = run_coordinator()
    assert_one_line_error(code, err, "--join is required")
    code, err = run_coordinator("--join", unreachable, "--checkpoint-dir", str(blocker / "ckpt"))
    assert_one_line_error(code, err, "--checkpoint-dir", "not writable")
    assert blocker.read_text() == "keep me"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_coordinator("--join", unreachable, "--http-port", str(port), "--checkpoint-dir",
                                    str(tmp_path / "c"), "--state-dir", str(tmp_path / "s"))  # fmt: skip
    assert_one_line_error(code, err, f"--http-port {port}", "pick a free port")
    code, err = run_coordinator("--join", unreachable, "--http-port", "0", "--checkpoint-dir", str(tmp_path / "c"),
                                "--state-dir", str(tmp_path / "s"), "--startup-timeout", "20")  # fmt: skip
    assert_one_line_error(code, err, "could not reach any peer at")
