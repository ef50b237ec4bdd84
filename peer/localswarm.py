"""Run several peers on this machine: ``make demo`` (``python -m peer.localswarm``) and the test harness use it.

Each peer is a real ``bertswarm-peer`` process in its own process session, so stopping one also stops the p2pd and
helper processes it started (they share its process group), and nothing outlives the launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

JOIN_PREFIX = "bertswarm-peer --join "


class LocalPeer:
    """One ``python -m peer`` process with its own state dir, stdout watched for the join line."""

    def __init__(self, name: str, workdir: Path, args: list[str], env: dict | None = None, threads: int = 1):
        self.name, self.workdir = name, workdir
        self.state_dir = workdir / name
        self.log_path = workdir / f"{name}.log"
        self.join_address: str | None = None
        self.signalled = False
        self._join_ready = threading.Event()
        command = [sys.executable, "-m", "peer", "--state-dir", str(self.state_dir), *args]
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), **(env or {}))
        workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
        )
        self.stdout_lines: list[str] = []
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.stdout_lines.append(line)
            if line.startswith(JOIN_PREFIX) and self.join_address is None:
                self.join_address = line[len(JOIN_PREFIX) :].strip()
                self._join_ready.set()

    def wait_for_join_address(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not self._join_ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} printed no join line (exit {self.proc.poll()}):\n{self.log_tail()}")
        return self.join_address

    def metrics(self, port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the peer's main process only (as a user's Ctrl-C or a service manager would)."""
        if self.alive():
            self.proc.send_signal(sig)
            self.signalled = True

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Crash the whole peer: its main process, p2pd and helpers (like a machine losing power)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self._cleanup()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (once: a second one during interpreter exit kills with -15), wait; then SIGKILL the whole group.
        Always reaps the process and its group."""
        if not self.signalled:
            self.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.kill_group(signal.SIGKILL)  # leftovers of the group (p2pd) if the peer could not clean up
        self.proc.wait()
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(timeout=2)
        if not self._log.closed:
            self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def run_demo(peers: int, seconds: float, workdir: Path, extra: list[str]) -> int:
    """Start a swarm of ``peers`` local peers, let it train for ``seconds``, then stop every peer cleanly."""
    started: list[LocalPeer] = []
    try:
        first = LocalPeer("peer-0", workdir, ["--metrics-port", "9400", *extra])
        started.append(first)
        address = first.wait_for_join_address(timeout=120)
        print(
            f"demo: swarm started; join it from this machine with:\n  bertswarm-peer --join {address} "
            "--state-dir <a new dir>",
            flush=True,
        )
        for i in range(1, peers):
            started.append(
                LocalPeer(f"peer-{i}", workdir, ["--join", address, "--metrics-port", str(9400 + i), *extra])
            )
        print(
            f"demo: {peers} peers training for {seconds:.0f}s; logs in {workdir}/peer-*.log, metrics on "
            f"http://127.0.0.1:9400/metrics (and :9401, ...)",
            flush=True,
        )
        _follow(first.log_path, seconds, started)
    finally:
        for peer in started:  # all at once, like Ctrl-C on every volunteer's terminal
            peer.send_signal(signal.SIGTERM)
        codes = [peer.stop() for peer in started]
    print(f"demo: all peers left (exit codes {codes})", flush=True)
    return 0 if all(code == 0 for code in codes) else 1


def _follow(log_path: Path, seconds: float, peers: list[LocalPeer]) -> None:
    """Echo the first peer's progress lines while the demo runs."""
    deadline = time.monotonic() + seconds
    offset = 0
    while time.monotonic() < deadline:
        time.sleep(1.0)
        with open(log_path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
            offset += len(chunk)
        for line in chunk.decode(errors="replace").splitlines():
            if "peer.progress" in line or "WARNING" in line or "ERROR" in line:
                print(line, flush=True)
        dead = [p.name for p in peers if not p.alive()]
        if dead:
            raise SystemExit(f"demo: {', '.join(dead)} exited early; see {log_path.parent}/<name>.log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peer.localswarm", description="Run a local demo swarm.")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--workdir", type=Path, default=Path("demo-state"))
    args, extra = parser.parse_known_args(argv)
    return run_demo(args.peers, args.seconds, args.workdir, extra)


if __name__ == "__main__":
    sys.exit(main())
