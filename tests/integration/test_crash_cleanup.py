"""A crash leaves nothing behind (``peer/swarm/lifeline.py``): after a SIGKILL of a peer's main process, every process
it started (hivemind's DHT and averager processes, p2pd, torch's shared-memory manager) is gone within 5 s, with its
shared memory; a helper killed alone (as the out-of-memory killer may pick one) makes the peer leave at once with one
line and exit code 75 instead of hanging or training on cut off from the swarm.

The process tree is read from ``/proc`` (Linux) before anything is killed, and the tests wait for the main process
itself (``LocalPeer.wait`` would kill its process group, which holds the helpers); whatever survives a test is killed
by PID at its end, torch's manager last (killed, it would leave its segments in ``/dev/shm``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from peer.swarm.lifeline import HELPER_KILLED_EXIT

pytestmark = [
    pytest.mark.swarm,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc"),
]

DILOCO = ["--mode", "diloco", "--inner-steps", "4"]
GONE_WITHIN = 5.0  # seconds, from the kill (or the main process's exit) to the last descendant gone
SHM_MANAGER = "torch_shm_manager"


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # start time in clock ticks since boot: tells this process from a later one with the same pid
    name: str  # basename of argv[0]
    parent: int

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[2] == self.start and stat[0] != "Z"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of ``pid``, or None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _proc(pid: int) -> Proc | None:
    stat = _stat(pid)
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None
    return None if stat is None else Proc(pid, stat[2], os.path.basename(argv0), stat[1])


def descendants(root: int) -> list[Proc]:
    """Every live descendant of ``root`` (children of all its threads, recursively)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for child in map(int, children.read_text().split()):
                    proc = _proc(child)
                    if proc is not None and proc.pid not in {p.pid for p in found}:
                        found.append(proc)
                        todo.append(child)
    return found


def wait_gone(procs: list[Proc], timeout: float) -> tuple[float, list[Proc]]:
    """Seconds until every process in ``procs`` is gone (or ``timeout``), and those still alive then."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not any(p.alive() for p in procs):
            break
        time.sleep(0.05)
    return time.monotonic() - started, [p for p in procs if p.alive()]


def kill_survivors(procs: list[Proc], peer=None) -> None:
    """Leave nothing behind, even when the test failed: SIGKILL the peer's main process (if still running) and every
    process in ``procs`` by pid, torch's manager last, once its clients are gone (it then unlinks their shared memory
    itself); their segments are removed if it had to be killed."""
    if peer is not None and peer.proc.poll() is None:
        peer.proc.kill()
        peer.proc.wait()
    for proc in procs:
        if proc.name != SHM_MANAGER:
            proc.kill()
    managers = [p for p in procs if p.name == SHM_MANAGER]
    _, stuck = wait_gone(managers, 10)
    for proc in stuck:
        proc.kill()
    if stuck:
        pids = [p.pid for p in procs] + ([peer.proc.pid] if peer is not None else [])
        for path in shared_memory_of(pids):
            path.unlink(missing_ok=True)


def shared_memory_of(pids: list[int]) -> list[Path]:
    """torch's segments in /dev/shm created by the processes ``pids`` (``torch_<pid>_<random>_<n>``)."""
    prefixes = tuple(f"torch_{pid}_" for pid in pids)
    return [path for path in Path("/dev/shm").glob("torch_*") if path.name.startswith(prefixes)]


def start_training_peer(swarm, mode: str):
    """One peer of a new run, once it trains (so every helper it will have is running), and its process tree."""
    peer = swarm.start("a", *(DILOCO if mode == "diloco" else []))
    peer.wait_for_join_address(90)
    swarm.wait_until("the peer to train", lambda: swarm.metric(peer, "bertswarm_peer_samples_total") > 0, timeout=120)
    return peer, descendants(peer.proc.pid)


def check_tree(peer, tree: list[Proc]) -> None:
    names = sorted(p.name for p in tree)
    assert len([p for p in tree if p.name == "p2pd"]) == 1, names
    helpers = [p for p in tree if p.parent == peer.proc.pid and p.name != SHM_MANAGER]
    assert len(helpers) == 3, names  # the DHT process and two averagers, whatever the mode


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["sync", "diloco"])
def test_sigkill_of_the_main_process_leaves_no_process_and_no_shared_memory(swarm, mode):
    peer, tree = start_training_peer(swarm, mode)
    try:
        check_tree(peer, tree)
        print(f"{mode}: process tree of the peer:", ", ".join(f"{p.name} {p.pid}" for p in tree))

        os.kill(peer.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert peer.proc.wait(timeout=10) == -signal.SIGKILL  # not peer.wait(): that kills the process group
        helpers = [p for p in tree if p.name != SHM_MANAGER]
        helpers_gone, survivors = wait_gone(helpers, GONE_WITHIN)
        assert not survivors, f"still running {GONE_WITHIN:.0f}s after the SIGKILL: {survivors}"
        _, survivors = wait_gone(tree, max(0.0, GONE_WITHIN - (time.monotonic() - killed)))
        all_gone = time.monotonic() - killed
        assert not survivors, f"still running {GONE_WITHIN:.0f}s after the SIGKILL: {survivors}"
        print(f"{mode}: helpers and p2pd gone {helpers_gone:.2f}s after the SIGKILL, every process {all_gone:.2f}s")

        assert not shared_memory_of([peer.proc.pid, *(p.pid for p in tree)]), "torch segments left in /dev/shm"
    finally:
        kill_survivors(tree, peer)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("mode", "victim"), [("sync", "dht"), ("sync", "averager"), ("sync", "p2pd"), ("diloco", "averager")]
)
def test_a_helper_killed_alone_makes_the_peer_leave_at_once_with_one_line(swarm, mode, victim):
    """What the out-of-memory killer may do: SIGKILL one helper, not the main process. hivemind cannot replace it, so
    the peer leaves (one ERROR line, exit code 75: restart to resume) instead of hanging or training on alone."""
    peer, tree = start_training_peer(swarm, mode)
    try:
        check_tree(peer, tree)
        (p2pd,) = [p for p in tree if p.name == "p2pd"]
        dht = next(p for p in tree if p.pid == p2pd.parent)
        averager = next(p for p in tree if p.parent == peer.proc.pid and p.name != SHM_MANAGER and p != dht)
        target = {"dht": dht, "averager": averager, "p2pd": p2pd}[victim]

        os.kill(target.pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            code = peer.proc.wait(timeout=10)  # not peer.wait(): that kills the process group
        except subprocess.TimeoutExpired:
            pytest.fail(f"the peer is still running 10s after its {victim} was killed:\n{peer.log_tail()}")
        left = time.monotonic() - killed
        seconds, survivors = wait_gone(tree, GONE_WITHIN)
        assert not survivors, f"still running {GONE_WITHIN:.0f}s after the peer left: {survivors}"
        print(f"{mode}/{victim}: the peer left {left:.2f}s after the kill, every process gone {seconds:.2f}s later")

        assert code == HELPER_KILLED_EXIT, peer.log_tail()
        log = peer.log_path.read_text()
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1, log[-3000:]
        assert f"pid {target.pid}" in errors[0] and "killed by SIGKILL" in errors[0], errors[0]
        assert {"dht": "DHT process", "averager": "Averager process", "p2pd": "p2p daemon"}[victim] in errors[0]
        assert "Traceback" not in log, log[-3000:]
        assert not shared_memory_of([peer.proc.pid, *(p.pid for p in tree)]), "torch segments left in /dev/shm"
    finally:
        kill_survivors(tree, peer)


CHILDREN_SCRIPT = """
    import multiprocessing as mp, threading, time
    from peer.swarm import lifeline

    lifeline.install()
    ctx = mp.get_context("fork")

    def with_grandchild():  # its own fork hangs on it in turn
        ctx.Process(target=time.sleep, args=(600,), daemon=True).start()
        time.sleep(600)

    ctx.Process(target=with_grandchild).start()  # forked by the main thread: parent-death signal
    box = []

    def fork():  # a short-lived thread: its end must not kill the child (the kernel's signal follows the thread)
        box.append(ctx.Process(target=time.sleep, args=(600,), daemon=True))
        box[0].start()

    thread = threading.Thread(target=fork)
    thread.start()
    thread.join()
    time.sleep(1.5)  # three polls of the watchdog after the forking thread ended
    print(int(box[0].is_alive()), flush=True)
    time.sleep(600)
"""


@pytest.mark.timeout(60)
def test_children_die_with_their_parent_whichever_thread_forked_them():
    """Without hivemind: a child forked by the main thread (parent-death signal) with a grandchild of its own, and a
    child forked by a thread that has ended since (no such signal, which would have fired when that thread ended; the
    watchdog polls instead)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILDREN_SCRIPT)], stdout=subprocess.PIPE, text=True)
    children: list[Proc] = []
    try:
        assert proc.stdout.readline().strip() == "1", "the child forked by a thread died when that thread ended"
        children = descendants(proc.pid)
        assert len(children) == 3, children  # two children and a grandchild
        proc.kill()
        proc.wait(10)
        seconds, survivors = wait_gone(children, GONE_WITHIN)
        assert not survivors, survivors
        print(f"children and grandchild gone {seconds:.2f}s after their parent's SIGKILL")
    finally:
        proc.kill()
        proc.wait(10)
        kill_survivors(children)
