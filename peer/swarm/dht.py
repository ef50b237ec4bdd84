"""Start this peer's DHT node: identity file, listen/announce addresses, client mode (asked for, or picked behind NAT:
``nat.py``), clear errors.

Failures of the p2p daemon that are the user's to fix (unreachable bootstrap peer, address in use, identity in use)
become one-line ``UserError``s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2PDaemonError

from peer.errors import UserError
from peer.store.atomic import atomic_write_text
from peer.swarm import hivemind_compat, nat
from peer.swarm import identity as peer_identity
from peer.swarm.addresses import DEFAULT_LISTEN, JOIN_HINT
from peer.swarm.hivemind_compat import keep_request_futures as keep_request_futures  # re-exported: used with stop_dht

logger = logging.getLogger(__name__)


class DhtSettings(Protocol):
    """What starting a DHT node needs (``peer.config.PeerConfig`` has these fields)."""

    join: list[str]
    listen: list[str]
    announce: list[str]
    client_mode: bool
    nat: str
    identity_path: Path
    startup_timeout: float


def start_dht(cfg: DhtSettings, record_validators: Sequence = ()) -> hivemind.DHT:
    """Start the DHT node (and its p2pd). Addresses were validated with the config (``addresses.py``)."""
    identity = cfg.identity_path
    identity.parent.mkdir(parents=True, exist_ok=True)
    # this process signs its DHT records with the key behind its peer id; the signature validator goes in first (the
    # DHT keeps the first one it is given), so records signed by others (the run's manifest) read back stripped
    key, created = peer_identity.ensure_identity(identity)
    peer_identity.use_for_this_process(key)
    # before the DHT process forks: it and its p2pd inherit the lifeline (swarm/lifeline.py), and p2pd reserves on
    # static relays at once (--nat holepunch)
    hivemind_compat.install()
    reach = nat.plan(cfg.nat, cfg.client_mode, cfg.join, cfg.listen, cfg.announce)
    if reach.automatic or reach.relay == "use":
        logger.info(reach.reason)
    try:
        dht = hivemind.DHT(
            initial_peers=list(cfg.join) or None,
            host_maddrs=list(cfg.listen) or [DEFAULT_LISTEN],
            announce_maddrs=list(cfg.announce) or None,
            client_mode=reach.client_mode,
            identity_path=str(identity),
            startup_timeout=cfg.startup_timeout,
            record_validators=[RSASignatureValidator(key), *record_validators],
            check_if_identity_free=not created,  # as hivemind does for the identities it creates itself
            start=True,
            **reach.p2p_options(),
        )
    except P2PDaemonError as e:
        raise UserError(_explain_daemon_error(str(e), cfg, identity)) from None
    if reach.relay == "use":
        nat.retry_punches(dht)
    return dht


def _explain_daemon_error(message: str, cfg: DhtSettings, identity: Path) -> str:
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
    with the node's shutdown and prints an ``EOFError`` traceback from the DHT process on every normal exit
    (``hivemind_compat.shutdown_dht``). Stores made inside ``keep_request_futures`` reach the process before it stops.
    """
    if not dht.is_alive():
        return
    try:
        # barrier: the DHT process has received every earlier request (fire-and-forget stores included) before we
        # stop it; a request still in the pipe at exit fails in that process with ConnectionResetError
        dht.run_coroutine(_noop, return_future=True).result(timeout)
    except Exception as e:
        logger.debug("DHT barrier before shutdown failed: %r", e)
    hivemind_compat.shutdown_dht(dht, timeout)


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
    try:
        atomic_write_text(Path(path).expanduser(), address + "\n")
    except OSError as e:
        raise UserError(f"--address-file {path}: cannot write it ({e.strerror}); pick a writable path") from None
