"""8. Bad inputs: every user mistake gets one line on stderr naming the problem and the fix, exit code 2, no
traceback, and nothing of the user's is overwritten. Each case runs the real entry point in a subprocess and is timed
(seconds from start to the answer)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.faults.harness import Session
from tests.integration.conftest import FAST, free_port

PEER_ID = "12D3KooWB72XDuQv8xY5qFEzdJutWeuR5pJuipzJaK1Z5dD9DKVG"


def run(module: str, *args: str, timeout: float = 90, env: dict | None = None) -> tuple[int, str, float]:
    started = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, start_new_session=True)  # fmt: skip
    return proc.returncode, proc.stderr, time.monotonic() - started


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines()
              if line.startswith(("bertswarm-peer: error: ", "bertswarm-coordinator: error: "))]  # fmt: skip
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


class Cases:
    """Runs and times each case; ``seconds`` maps case name to time to the answer."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.seconds: dict[str, float] = {}

    def peer(self, case: str, *args: str, expect: tuple[str, ...], timeout: float = 90, env: dict | None = None) -> str:
        return self._run(case, "peer", args, expect, timeout, env)

    def coordinator(self, case: str, *args: str, expect: tuple[str, ...], timeout: float = 90) -> str:
        return self._run(case, "coordinator", args, expect, timeout)

    def _run(self, case, module, args, expect, timeout, env=None) -> str:
        code, err, seconds = run(module, *args, timeout=timeout, env=env)
        self.seconds[case] = seconds
        try:
            return assert_one_line_error(code, err, *expect)
        except AssertionError as e:
            raise AssertionError(f"case {case}: {e}") from None


def _corrupt_checkpoint(workdir: Path) -> Path:
    """A real checkpoint of this run's tiny model with one flipped byte in its weights."""
    from peer.config import PeerConfig
    from peer.data.tokenizer import default_tokenizer, tokenizer_fingerprint
    from peer.run.manifest import from_config
    from peer.run.model import build_model
    from peer.store.checkpoint import write_checkpoint

    tok = default_tokenizer()
    manifest = from_config(PeerConfig().validate(), "bertswarm", tokenizer_fingerprint(tok), tok.get_vocab_size())
    path = write_checkpoint(workdir / "ckpt", build_model(manifest.model, nsp=False, seed=0), tok, manifest, epoch=1,
                            samples_seen=1, eval_metrics={"mlm_loss": 5.0, "mlm_accuracy": 0.1})  # fmt: skip
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1000] ^= 0x01
    weights.write_bytes(bytes(data))
    return path


class _Background(threading.Thread):
    def __init__(self, target):
        super().__init__(daemon=True)
        self._target_fn, self.error = target, None
        self.start()

    def run(self):
        try:
            self._target_fn()
        except BaseException as e:  # re-raised in join()
            self.error = e

    def join(self, timeout=None):
        super().join(timeout)
        if self.error is not None:
            raise self.error


def bad_inputs(session: Session | None, workdir: Path, corpus: Path) -> dict:
    """Every case once. With a live ``session``, also a manifest conflict and a state dir in use by its peers."""
    workdir.mkdir(parents=True, exist_ok=True)
    c = Cases(workdir)
    if session is not None and session.live:
        peer = session.live[0]
        line = c.peer("manifest_conflict", "--join", peer.join_address, "--preset", "mini", "--seq-len", "32",
                      "--state-dir", str(workdir / "x"),
                      expect=("conflict with the run's manifest",
                              "preset (from --preset): run has 'tiny', you asked for 'mini'",
                              "seq_len (from --seq-len): run has 64", "Drop these flags"))  # fmt: skip
        assert "hidden_size" not in line  # the derived model section does not repeat the preset conflict
        c.peer("state_dir_in_use", "--join", peer.join_address, "--state-dir", str(peer.state_dir),
               expect=("--state-dir", "in use by another running peer", "its own state directory"))  # fmt: skip
        assert peer.alive()

    # the other cases need no swarm: pause it (SIGSTOP), so the answers are timed on a quiet machine
    paused = [] if session is None else list(session.live)
    for peer in paused:
        peer.kill_group(signal.SIGSTOP)
    try:
        figures = _without_swarm(c, workdir, corpus)
    finally:
        for peer in paused:
            peer.kill_group(signal.SIGCONT)
    if paused:
        resumed = time.monotonic()
        target = max(session.epochs()) + 1
        session.wait_until("the swarm to train again after the pause", lambda: min(session.epochs()) >= target, 180)
        figures["swarm_resumed_s"] = time.monotonic() - resumed
    return figures


def _without_swarm(c: Cases, workdir: Path, corpus: Path) -> dict:
    state = str(workdir / "s")

    c.peer("malformed_join", "--state-dir", state, "--join", "/ip4/10.0.0.300/tcp/1", expect=("--join",
           "not a valid multiaddr"))  # fmt: skip
    c.peer("join_without_peer_id", "--state-dir", state, "--join", "/ip4/127.0.0.1/tcp/4000",
           expect=("lacks the /p2p/<peer-id> part",))  # fmt: skip
    assert not (workdir / "s" / "identity.key").exists()  # p2pd never started
    unreachable = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{PEER_ID}"  # nothing listens there
    # the slowest case mostly waits (--startup-timeout): it runs alongside the others
    waiting = _Background(lambda: c.peer("unreachable_join", "--state-dir", str(workdir / "u"), "--join", unreachable,
                          "--startup-timeout", "10", expect=("could not reach any peer at", unreachable)))  # fmt: skip

    (workdir / "empty.txt").write_text("  \n")
    (workdir / "blob.txt").write_bytes(b"\x00\x01\x02binary\xff")
    data_cases = {"missing_data": ("missing.txt", "no such file or directory"), "empty_data": ("empty.txt", "empty"),
                  "binary_data": ("blob.txt", "binary")}  # fmt: skip
    for case, (name, fragment) in data_cases.items():
        c.peer(case, "--state-dir", state, "--data", str(workdir / name), expect=("--data", fragment))
    if os.geteuid() != 0:  # root reads any file
        unreadable = workdir / "unreadable.txt"
        unreadable.write_text("text " * 100)
        unreadable.chmod(0)
        c.peer("unreadable_data", "--state-dir", state, "--data", str(unreadable), expect=("--data",))

    c.peer("unknown_preset", "--preset", "gigantic", expect=("--preset 'gigantic'", "tiny, mini, base, large"))
    c.peer("bad_number", "--batch-size", "lots", expect=("--batch-size", "invalid int value"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # answered before new text is prepared (minutes for a large corpus the first time): nothing is cached
        cache = workdir / "cache"
        c.peer("metrics_port_in_use", "--state-dir", state, "--metrics-port", str(port), "--data", str(corpus),
               expect=(f"--metrics-port {port}", "pick a free port"), env={"XDG_CACHE_HOME": str(cache)})  # fmt: skip
        prepared = cache / "bertswarm" / "prepared"
        assert not prepared.exists() or not any(prepared.iterdir()), list(prepared.iterdir())

    blocker = workdir / "a-file"
    blocker.write_text("keep me")
    c.peer("unwritable_state_dir", "--state-dir", str(blocker / "state"), expect=("--state-dir",
           "pick a writable directory"))  # fmt: skip
    assert blocker.read_text() == "keep me"
    corrupt = workdir / "corrupt"
    corrupt.mkdir(exist_ok=True)
    (corrupt / "state.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    c.peer("corrupt_state_file", "--state-dir", str(corrupt), "--data", str(corpus), *FAST,
           expect=("is corrupt", "move it away"))  # fmt: skip
    assert (corrupt / "state.safetensors").read_bytes().endswith(b"{garbage")  # nothing overwritten

    checkpoint = _corrupt_checkpoint(workdir)
    weights = (checkpoint / "model.safetensors").read_bytes()
    c.peer("corrupt_init_from", "--state-dir", str(workdir / "fresh"), "--data", str(corpus), *FAST,
           "--init-from", str(checkpoint), expect=("--init-from", "model.safetensors is corrupt"))  # fmt: skip
    assert (checkpoint / "model.safetensors").read_bytes() == weights
    assert not (workdir / "fresh" / "state.safetensors").exists()

    c.coordinator("coordinator_without_join", expect=("--join is required",))
    c.coordinator("unwritable_checkpoint_dir", "--join", unreachable, "--checkpoint-dir", str(blocker / "ckpt"),
                  expect=("--checkpoint-dir", "not writable"))  # fmt: skip
    assert blocker.read_text() == "keep me"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        c.coordinator("http_port_in_use", "--join", unreachable, "--http-port", str(port), "--checkpoint-dir",
                      str(workdir / "c"), "--state-dir", str(workdir / "cs"),
                      expect=(f"--http-port {port}", "pick a free port"))  # fmt: skip

    waiting.join()
    slow = {"unreachable_join"}  # waits for --startup-timeout by design
    quick = [s for case, s in c.seconds.items() if case not in slow]
    figures = {"cases": len(c.seconds), "max_answer_s": max(quick), "median_answer_s": sorted(quick)[len(quick) // 2]}
    figures.update({f"{case}_s": c.seconds[case] for case in ("malformed_join", "unreachable_join",
                                                               "corrupt_state_file", "manifest_conflict")
                    if case in c.seconds})  # fmt: skip
    return figures
