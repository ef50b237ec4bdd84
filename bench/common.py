"""Shared machinery: worker processes in their own process groups, free ports, statistics, machine facts, loadavg."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(values: list[float]) -> dict:
    """Median and spread (min, max) of the repetitions; NaN/None values (failed reps) are left out."""
    clean = [float(v) for v in values if v is not None and v == v]
    if not clean:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean), "n": len(clean)}


class Worker:
    """One benchmark subprocess in its own session/process group (so its p2pd and helpers die with it)."""

    def __init__(self, args: list[str], log: Path, threads: int = 1, env: dict | None = None, prefix=()):
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        full_env = dict(
            os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), **(env or {})
        )
        self.started = time.time()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=str(ROOT),
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line[len(prefix) :].strip()
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise RuntimeError(f"no {prefix!r} line from worker (exit {self.proc.poll()}):\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group, then SIGKILL it; always reaps. Only this worker's own process group is signalled."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(timeout=2)
        if not self._log.closed:
            self._log.close()

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def workers_cleanup(workers: list[Worker]):
    try:
        yield workers
    finally:
        for w in workers:
            w.stop(timeout=5)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def machine_facts() -> dict:
    import hivemind
    import torch

    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hivemind": hivemind.__version__,
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


class LoadSampler:
    """Samples the 1-minute load average every few seconds while a scenario runs."""

    def __init__(self, period: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(period):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return summarize(self.samples) if self.samples else {"median": None, "min": None, "max": None, "n": 0}


def _descendants(pid: int) -> list[int]:
    """``pid``'s descendant processes (not ``pid`` itself), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def process_tree_hwm_bytes(pid: int) -> int:
    """Sum of peak resident set sizes (VmHWM) of ``pid`` and its descendants (shared memory counted per process)."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


def _cpu_seconds(stat_path: Path) -> float:
    """utime + stime of one /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat, in seconds."""
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_breakdown(pid: int | None = None, roles: dict[int, str] | None = None) -> dict:
    """CPU seconds used so far by ``pid``'s main thread, its other threads, and each descendant process (named by
    ``roles`` where given, else by its command name): where a peer's CPU goes besides its training loop."""
    pid, roles = pid or os.getpid(), roles or {}
    out = {"main_thread_s": 0.0, "other_threads_s": 0.0, "children_s": {}}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            key = "main_thread_s" if int(task.name) == pid else "other_threads_s"
            out[key] += _cpu_seconds(task / "stat")
    for child in _descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            name = roles.get(child) or Path(f"/proc/{child}/comm").read_text().strip()
            out["children_s"][f"{name}-{child}"] = _cpu_seconds(Path(f"/proc/{child}/stat"))
    return out


def net_tx_bytes(root: Path = Path("/sys/class/net")) -> int:
    """Bytes sent so far on this network namespace's interfaces other than loopback (``tx_bytes`` from sysfs; inside
    ``ip netns exec NS`` that is the namespace's own veth end: exact traffic of whatever runs there)."""
    total = 0
    for dev in root.iterdir() if root.exists() else ():
        if dev.name != "lo":
            with contextlib.suppress(OSError, ValueError):
                total += int((dev / "statistics" / "tx_bytes").read_text())
    return total
