"""Start this peer's DHT node: identity file, listen/announce addresses, client mode, clear errors.

Failures of the p2p daemon that are the user's to fix (unreachable bootstrap peer, address in use, identity in use)
become one-line ``UserError``s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import hivemind
from hivemind.p2p import P2PDaemonError

from peer.config import DEFAULT_LISTEN, PeerConfig
from peer.errors import UserError
from peer.swarm.addresses import JOIN_HINT

logger = logging.getLogger(__name__)


def start_dht(cfg: PeerConfig, record_validators: Sequence = ()) -> hivemind.DHT:
    """Start the DHT node (and its p2pd). Addresses were validated with the config (``addresses.py``)."""
    identity = cfg.identity_path
    identity.parent.mkdir(parents=True, exist_ok=True)
    try:
        return hivemind.DHT(
            initial_peers=list(cfg.join) or None,
            host_maddrs=list(cfg.listen) or [DEFAULT_LISTEN],
            announce_maddrs=list(cfg.announce) or None,
            client_mode=cfg.client_mode,
            identity_path=str(identity),
            startup_timeout=cfg.startup_timeout,
            record_validators=list(record_validators),
            start=True,
        )
    except P2PDaemonError as e:
        raise UserError(_explain_daemon_error(str(e), cfg, identity)) from None


def _explain_daemon_error(message: str, cfg: PeerConfig, identity: Path) -> str:
    text = message.lower()
    if "bootstrap" in text:
        return f"could not reach any peer at {', '.join(cfg.join)}; check that it is running and reachable, {JOIN_HINT}"
    if "address already in use" in text:
        return f"a --listen address is already in use ({', '.join(cfg.listen)}); pick another port or port 0"
    if "already taken" in text:
        return f"identity {identity} is in use by another live peer; give this peer its own --state-dir or --identity"
    if "failed to start in" in text:
        return f"the p2p daemon did not start within {cfg.startup_timeout:.0f} s; raise --startup-timeout"
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return f"the p2p daemon failed to start ({first_line}); check --listen/--announce/--join"


def stop_dht(dht: hivemind.DHT, timeout: float = 5.0) -> None:
    """Stop the DHT process (and its p2pd) within ``timeout`` seconds.

    Unlike ``DHT.shutdown``, this keeps the command pipe open until the process has exited: closing it first races
    with the node's shutdown and prints an ``EOFError`` traceback from the DHT process on every normal exit.
    """
    if not dht.is_alive():
        return
    try:
        # barrier: the DHT process has received every earlier request (fire-and-forget stores included) before we
        # stop it; a request still in the pipe at exit fails in that process with ConnectionResetError
        dht.run_coroutine(_noop, return_future=True).result(timeout)
    except Exception as e:
        logger.debug("DHT barrier before shutdown failed: %r", e)
    dht._outer_pipe.send(("_shutdown", [], {}))
    dht.join(timeout)
    if dht.is_alive():
        logger.warning("DHT did not stop within %.0fs; terminating it", timeout)
        dht.terminate()
        dht.join(timeout)
    dht._outer_pipe.close()


@contextlib.contextmanager
def keep_request_futures(dht: hivemind.DHT):
    """Keep every future of a DHT request made inside this block alive until the block ends.

    hivemind's ProgressTracker sends a fire-and-forget "goodbye" store at shutdown and drops its future at once; the
    future's shared memory is then freed before the DHT process reads the request, which fails there with a
    FileNotFoundError traceback. Holding the futures until ``stop_dht``'s barrier has run avoids that.
    """
    kept, original = [], dht.store

    def store(*args, **kwargs):
        result = original(*args, **kwargs)
        kept.append(result)
        return result

    dht.store = store
    try:
        yield kept
    finally:
        del dht.store  # back to the class's method


async def _noop(_dht, _node) -> None:
    return None


def join_addresses(dht: hivemind.DHT) -> list[str]:
    """Addresses others can pass to ``--join``, most useful first (non-loopback before loopback)."""
    addrs = [str(a) for a in dht.get_visible_maddrs()]
    peer_suffix = f"/p2p/{dht.peer_id}"
    addrs = [a if "/p2p/" in a else a + peer_suffix for a in addrs]
    return sorted(set(addrs), key=lambda a: ("/ip4/127." in a or "/ip6/::1/" in a, "/ip6/" in a, a))


def write_address_file(path: str, address: str) -> None:
    """Write the join address to ``path`` atomically, so a reader (a container entrypoint) never sees half a line."""
    target = Path(path).expanduser()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(address + "\n")
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"--address-file {path}: cannot write it ({e.strerror}); pick a writable path") from None
