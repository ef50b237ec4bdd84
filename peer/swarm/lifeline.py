"""A crash leaves nothing behind: hivemind's helper processes and p2pd die with the process that started them, and
that process leaves at once when one of them is killed.

hivemind 1.1.12 runs each DHT node and each averager in a process forked by ``multiprocessing``, and the DHT process
runs the p2p daemon (p2pd, a Go binary) as its own child. None of them watches its parent: after a SIGKILL of a
``bertswarm-peer`` (or an out-of-memory kill), its DHT process, both averagers and p2pd kept running for good, holding
their ports and memory, and torch's ``torch_shm_manager`` with them (it leaves, and unlinks the shared memory in
``/dev/shm``, two seconds after its last client). The other way round, a helper killed alone (the OOM killer picks the
largest process, which can be one of them) left the peer hanging silently (DHT process) or training on alone, cut off
from the swarm (an averager, p2pd).

``install()`` (``hivemind_compat.install()`` calls it; ``peer.swarm.dht.start_dht`` installs before the DHT forks, so
it covers every helper) sets up, in this process:

- **helpers die with their parent.** Every process ``multiprocessing`` forks from here on asks the kernel for SIGKILL
  when its parent dies (``PR_SET_PDEATHSIG``), then checks ``os.getppid()`` once, for a parent that died before.
  The kernel sends that signal when the *thread* that forked the child ends, not the process, so only a child forked
  by the parent's main thread gets it (the peer forks the DHT and the averagers there: hivemind's averagers must
  start on the main thread, as they call ``signal.signal``); a child forked by another thread (the coordinator starts
  its DHT from an executor thread) polls ``os.getppid()`` every 0.5 s instead, as does every child where ``prctl`` is
  missing (not Linux).
- **p2pd dies with its DHT process.** In those children, hivemind's ``asyncio.subprocess.create_subprocess_exec`` of
  p2pd (run by the DHT process's main thread, whose event loop lives as long as the process) gets a ``preexec_fn``
  that sets ``PR_SET_PDEATHSIG`` to SIGKILL (kept across ``exec``). SIGTERM would buy nothing: with the DHT process
  gone, p2pd's stdout pipe has no reader and p2pd dies on SIGTERM without removing its control socket (measured).
- **a stop of the peer's process group is the peer's.** Helpers and p2pd run in process groups of their own, so
  Ctrl-C in a terminal or a SIGTERM to the group reaches only the peer, which saves and shuts them down in order.
  (A service manager that signals every process of a cgroup, systemd's default ``KillMode=control-group``, still
  reaches them: use ``KillMode=mixed``; ``docker stop`` signals only the container's first process.)
- **a killed helper stops this process.** Each hivemind helper announces itself on a pipe; a watcher thread here
  notices within 0.5 s when one is killed by a signal (SIGKILL from the OOM killer, a segfault), or when the DHT
  process reports that its p2pd was, logs one line that says which and how, and exits with ``HELPER_KILLED_EXIT``
  (75, EX_TEMPFAIL: start it again to resume from the last saved state; a supervisor's restart-on-failure does). The
  other helpers then die with it (above). hivemind cannot replace a dead helper, and the process could not go on
  without it; leaving at once, without a save, also frees memory when memory is what ran out. Deaths by SIGTERM,
  SIGINT or SIGHUP are someone stopping the helper (hivemind's own ``terminate()`` when a shutdown times out, a
  stop of the whole process group) and are left to the owner, as are exits with a code (a Python error in a helper
  prints its own traceback; p2pd failing to start is reported by ``start_dht``).

- **a process that dies while receiving a file descriptor is not a traceback.** ``multiprocessing`` hands file
  descriptors (pipe ends, torch's shared tensors) to another process through a server thread in the sender; when the
  receiver dies mid-handshake (a killed helper), that thread printed a bare traceback (``ConnectionResetError`` in
  ``resource_sharer._serve``) through ``sys.excepthook``, and the server goes on. Such a dropped connection is now
  one debug line; the helper's death itself is reported above.

Linux gives all of this; elsewhere the children poll their parent and the rest is the same. Importing this module
imports neither hivemind nor torch.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.util
import os
import select
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)

HELPER_KILLED_EXIT = 75  # EX_TEMPFAIL: a helper was killed; starting the process again resumes it
POLL_SECONDS = 0.5  # how often a child without PR_SET_PDEATHSIG checks its parent, and the watcher its helpers
POLITE_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})  # someone stopping it: not a crash
PR_SET_PDEATHSIG = 1  # <sys/prctl.h>

_prctl = None  # libc's prctl, resolved by install() (before any fork: a pre-exec child must not load libraries)
_origin: tuple[int, int] | None = None  # (pid, ident of the main thread) of the process whose forks are lifelined
_pipe: tuple[int, int] | None = None  # (read, write): hivemind helpers announce themselves to the installing process
_p2pd_watches: set = set()  # the tasks waiting for this DHT process's p2pd (asyncio keeps only weak references)


class _Token:
    """What ``multiprocessing.util.register_after_fork`` keeps a weak reference to."""


_TOKEN = _Token()


def install() -> None:
    """Install the lifeline in this process (idempotent; forked children inherit it). Call before hivemind forks."""
    global _prctl, _origin, _pipe
    if _origin is not None:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None, use_errno=True).prctl
            prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
            prctl.restype = ctypes.c_int
            _prctl = prctl
    _origin = (os.getpid(), threading.main_thread().ident)
    _pipe = os.pipe()  # both ends non-inheritable across exec (PEP 446): forked helpers get them, p2pd does not
    multiprocessing.util.register_after_fork(_TOKEN, _in_child)
    _quiet_dropped_descriptor_transfers()
    if hasattr(os, "waitid"):  # Linux, macOS
        threading.Thread(target=_watch_helpers, args=(_pipe[0],), name="bertswarm-lifeline", daemon=True).start()


def _set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when the thread that forked it ends (Linux; False elsewhere)."""
    return _prctl is not None and _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _quiet_dropped_descriptor_transfers() -> None:
    """Route ``sys.excepthook`` around one expected case: the receiver of a file descriptor died mid-transfer."""
    from multiprocessing import resource_sharer

    serve = resource_sharer._ResourceSharer._serve.__code__
    previous = sys.excepthook

    def excepthook(exc_type, exc, tb):
        if issubclass(exc_type, (ConnectionError, EOFError)) and tb is not None and tb.tb_frame.f_code is serve:
            logger.debug("a process left while receiving a file descriptor from this one (%s)", exc_type.__name__)
            return
        previous(exc_type, exc, tb)

    sys.excepthook = excepthook


# --- in every process multiprocessing forks -------------------------------------------------------------------------


def _in_child(_token) -> None:
    """``multiprocessing`` runs this in each child it forks, before ``run()``."""
    global _origin, _pipe
    parent_pid, parent_main_thread = _origin
    # the forking thread is this process's only thread now, with the same ident it had in the parent
    armed = threading.get_ident() == parent_main_thread and _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the lifeline held
        os.kill(os.getpid(), signal.SIGKILL)
    if not armed:
        threading.Thread(target=_follow_parent, args=(parent_pid,), name="bertswarm-lifeline", daemon=True).start()
    _origin = (os.getpid(), threading.main_thread().ident)  # this process's own forks hang on it
    if _pipe[0] >= 0:  # only the installing process reads (a grandchild must not close a reused descriptor)
        with contextlib.suppress(OSError):
            os.close(_pipe[0])
        _pipe = (-1, _pipe[1])
    process = multiprocessing.current_process()
    if any(cls.__module__.startswith("hivemind.") for cls in type(process).__mro__):
        _own_process_group()
        _announce(f"helper {os.getpid()} {parent_pid} {type(process).__name__}")
        _spawn_p2pd_with_lifeline()


def _own_process_group() -> None:
    """Leave the peer's process group: a stop of the whole group (Ctrl-C in a terminal, ``kill -TERM -PGID``,
    ``timeout``) then reaches only the peer, which shuts its helpers down in order (saving its state first) instead
    of finding them dead (hivemind logged "Averager shutdown has no effect" as an ERROR, and a round in flight never
    ended). They still die with the peer (the parent-death signal above) and on hivemind's own ``terminate()``."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


def _follow_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def _announce(line: str) -> None:
    with contextlib.suppress(OSError):  # the installing process is gone: this one is about to die with it
        os.write(_pipe[1], line.encode() + b"\n")  # one short write: atomic on a pipe


def _spawn_p2pd_with_lifeline() -> None:
    """hivemind's ``P2P.create`` starts p2pd with ``asyncio.subprocess.create_subprocess_exec`` (hivemind 1.1.12,
    ``hivemind/p2p/p2p_daemon.py``); in this helper process, give that p2pd a parent-death signal and watch it."""
    import asyncio.subprocess

    spawn = asyncio.subprocess.create_subprocess_exec
    if getattr(spawn, "lifeline", False):
        return

    async def create_subprocess_exec(program, *args, **kwargs):
        on_main_thread = threading.current_thread() is threading.main_thread()
        if os.path.basename(str(program)) != "p2pd" or "preexec_fn" in kwargs or not on_main_thread:
            return await spawn(program, *args, **kwargs)
        process = await spawn(program, *args, preexec_fn=_p2pd_preexec(os.getpid()), **kwargs)
        watch = asyncio.ensure_future(_report_if_killed(process))
        _p2pd_watches.add(watch)
        watch.add_done_callback(_p2pd_watches.discard)
        return process

    create_subprocess_exec.lifeline = True
    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec


def _p2pd_preexec(parent_pid: int):
    def preexec() -> None:  # in the forked child, before exec: no imports, no locks
        os.setpgid(0, 0)  # as its DHT process (_own_process_group): a stop of the peer's group is the peer's to handle
        _set_parent_death_signal(signal.SIGKILL)  # kept across exec
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


async def _report_if_killed(process) -> None:
    code = await process.wait()
    if code < 0 and -code not in POLITE_SIGNALS:
        _announce(f"killed {process.pid} {os.getpid()} p2pd {code}")


# --- in the process that installed it ---------------------------------------------------------------------------------


def _watch_helpers(read_fd: int) -> None:
    """Follow the hivemind helpers this process forks; leave at once if one is killed."""
    helpers: dict[int, str] = {}  # pid -> hivemind class
    pending = b""
    while True:
        readable, _, _ = select.select([read_fd], [], [], POLL_SECONDS)
        if readable:
            pending += os.read(read_fd, 4096)
            *lines, pending = pending.split(b"\n")
            for line in lines:
                _read_announcement(line.decode(errors="replace"), helpers)
        for pid, role in list(helpers.items()):
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # leaves it for its owner
            except ChildProcessError:  # its owner has reaped it: stopped as planned
                del helpers[pid]
                continue
            if info is None:  # running
                continue
            del helpers[pid]
            if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) and info.si_status not in POLITE_SIGNALS:
                _leave(f"hivemind's {role} process (pid {pid})", info.si_status)


def _read_announcement(line: str, helpers: dict[int, str]) -> None:
    """``helper PID PARENT CLASS`` (a hivemind helper started) or ``killed PID PARENT p2pd CODE`` (a helper's p2pd
    was killed)."""
    try:
        kind, pid, parent, role, *rest = line.split()
        pid, parent = int(pid), int(parent)
        if kind == "helper" and parent == os.getpid():
            helpers[pid] = role
        elif kind == "killed" and parent in helpers:
            _leave(f"the p2p daemon ({role}, pid {pid}) of hivemind's {helpers[parent]} process", -int(rest[0]))
    except (ValueError, IndexError):
        logger.debug("lifeline: unreadable announcement %r", line)


def _leave(what: str, signum: int) -> None:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    cause = " (the out-of-memory killer's signal)" if signum == signal.SIGKILL else ""
    logger.error(
        "%s was killed by %s%s; this process cannot go on without it and exits now (code %d): start it again "
        "to resume from its last saved state",
        what,
        name,
        cause,
        HELPER_KILLED_EXIT,
    )
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(HELPER_KILLED_EXIT)  # the other helpers die with this process (above)
