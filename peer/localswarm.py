"""Run several peers on this machine: ``make demo`` (``coordinator/demo.py``) and the test harness use it.

Each peer is a real ``bertswarm-peer`` process in its own process session, so stopping one also stops the p2pd and
helper processes it started (they share its process group), and nothing outlives the launcher.
"""

from __future__ import annotations

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
    """One ``python -m peer`` (or ``-m coordinator``) process with its own state dir, stdout watched for the join
    line."""

    def __init__(
        self, name: str, workdir: Path, args: list[str], env: dict | None = None, threads: int = 1, module: str = "peer"
    ):
        self.name, self.workdir = name, workdir
        self.state_dir = workdir / name
        self.log_path = workdir / f"{name}.log"
        self.join_address: str | None = None
        self.signalled = False
        self._join_ready = threading.Event()
        command = [sys.executable, "-m", module, "--state-dir", str(self.state_dir), *args]
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


def follow(log_path: Path, seconds: float, processes: list[LocalPeer], also: Path | None = None) -> None:
    """Echo progress, warnings and errors from a peer's log (and ``also``) while the processes run."""
    deadline = time.monotonic() + seconds
    offsets = {log_path: 0, **({also: 0} if also else {})}
    while time.monotonic() < deadline:
        time.sleep(1.0)
        for path in offsets:
            with open(path, "rb") as f:
                f.seek(offsets[path])
                chunk = f.read()
                offsets[path] += len(chunk)
            for line in chunk.decode(errors="replace").splitlines():
                if any(word in line for word in ("peer.progress", "published", "WARNING", "ERROR")):
                    print(line, flush=True)
        dead = [p.name for p in processes if not p.alive()]
        if dead:
            raise SystemExit(f"demo: {', '.join(dead)} exited early; see {log_path.parent}/<name>.log")
