"""Peers behind NAT: whether the swarm can dial this peer, and what it does when it cannot (``--nat``).

A volunteer at home listens on a private address (192.168.x, 10.x, CGNAT) and reaches a swarm on the internet through
address translation: its packets leave, but nobody out there can open a connection to the address it would announce.
hivemind's answer is client mode: such a peer opens every connection itself, never leads a group and reduces no part
of the all-reduce (its share is 0), so it sends its gradients to the groupmates that do and gets the averages back on
the same streams. It trains and averages like any peer, with any other peer behind NAT too, as long as the group
holds at least one peer that can be dialled (it does the reducing); it does not serve its state to joiners.

``--nat auto`` (the default) picks client mode itself (:func:`plan`) when every address this peer would announce is
private while a ``--join`` peer's is public; ``--nat off`` never does (a forwarded port: then pass ``--announce``
with the public address, which ``auto`` also takes as dialable). ``--client-mode`` forces it.

``--nat holepunch`` (asked for, never picked by itself) makes a peer behind NAT a full peer instead: it averages with
other peers behind NAT in groups of their own and serves its state. It reserves a slot on its first public ``--join``
peer as a relay and is dialled through it; p2pd's hole punching (libp2p DCUtR, on with AutoNAT) then opens a direct
connection between the two NATs, and every stream after it goes direct (``tests/integration/test_nat.py``). It
needs, as measured with bare p2pd nodes in ``bench/netns.py``'s topology:

- four public peers connected to it: libp2p takes an outside address of its own as known only once four peers with
  different IP addresses have reported it (go-libp2p v0.32's ``identify.ActivationThresh``), and p2pd starts its hole
  puncher only then; with three public peers nothing was ever punched;
- NATs that keep a port's mapping for every destination and drop unsolicited packets (most home routers): a router
  that answers the other side's first packet with a TCP reset breaks the punch (every attempt failed that way).

Until the punch, traffic goes through the relay: through p2pd's default relay, 128 KiB per connection (below), so a
round with a peer not yet punched finishes in part; through the relay p2pd configures, the whole round (in 2 of 3
bench repetitions no punch happened, and every round went through the public peer: 63-72 MB from each home). p2pd
tries the punch once per relayed connection, when it opens. A connection opened before this peer's own hole puncher was
up (it waits for the four reports) stays relayed for good where the relay does not reset it, so :func:`retry_punches`
drops the connections that still go through a relay a few times in the first minutes, and the next stream tries again.

Public peers (``auto`` or ``holepunch`` with a public address) relay for it: they declare themselves public
(``force_reachability``) because p2pd starts its relay service only then, and AutoNAT cannot confirm it without
other public peers to dial back.

Why relays alone do not carry a round, which p2pd has: measured with two masquerading home routers
(``tests/integration/test_nat.py``'s topology), a relayed connection carries 128 KiB, then the relay resets it (its
log: "relayed 131072 bytes"). p2pd v0.5.0.hivemind1 (hivemind 1.1.12's) builds its relay service with 4 GiB / 30 min
limits, but with ``-relay=1`` its main also starts a second relay with go-libp2p's default resources
(``Daemon.EnableRelayV2``: 128 KiB and 2 minutes per relayed connection), and whichever registers the hop protocol
last answers: the default one in all but a few starts. A round of the tiny preset moves 3 MB per peer each way, so
every round through a relay finished in part (``robust.PartialRounds``: the other peer's parts never arrived) and
state downloads failed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from peer.swarm import addresses
from peer.swarm.addresses import DEFAULT_LISTEN

logger = logging.getLogger(__name__)

NAT_MODES = ("auto", "holepunch", "off")
# public peers (different IP addresses) that must report a peer's outside address before p2pd's hole puncher starts
# (go-libp2p v0.32 ``identify.ActivationThresh``)
PUNCH_OBSERVERS = 4
# route lookups (UDP connect sends no packet) for a wildcard listen address when there is no --join peer to look up
_ROUTE_PROBES = {"ip4": "192.0.2.1", "ip6": "2001:db8::1"}  # documentation addresses (RFC 5737, RFC 3849)


@dataclass(frozen=True)
class NatPlan:
    client_mode: bool  # this peer opens every connection itself (hivemind's client mode)
    automatic: bool  # client mode was picked here (--nat auto), not asked for (--client-mode)
    reason: str  # why, for the log and the doctor
    relay: str = "off"  # "serve": relays for peers behind NAT; "use": reached through relays, then hole-punched
    relays: tuple[str, ...] = field(default=())  # for "use": the public --join peer to reserve a slot on

    def p2p_options(self) -> dict:
        """Keyword arguments for ``hivemind.DHT``, which passes them on to ``hivemind.P2P.create`` (its p2pd)."""
        if self.relay == "serve":
            return {"force_reachability": "public"}
        if self.relay == "use":
            return {"use_auto_relay": True, "trusted_relays": list(self.relays), "force_reachability": "private"}
        return {}


def plan(mode: str, client_mode: bool, join: Sequence[str], listen: Sequence[str], announce: Sequence[str]) -> NatPlan:
    """Client mode or not, and the relay role. ``--client-mode`` always is client mode; in ``auto``, a peer is when
    none of the addresses it would announce (``own_hosts``) is public while one of its ``--join`` peers' is: then it
    reaches the swarm through address translation, and nobody there can dial the private addresses it would
    announce. ``holepunch`` makes such a peer use its first public ``--join`` peer as a relay instead. A peer with a
    public address relays (``auto`` and ``holepunch``)."""
    if client_mode:
        return NatPlan(True, False, "--client-mode: outbound connections only")
    if mode == "off":
        return NatPlan(False, False, "--nat off")
    mine = own_hosts(listen, announce, join)
    if any(kind == "public" for _, kind in mine):
        shown = ", ".join(host for host, kind in mine if kind == "public")
        return NatPlan(False, False, f"public address {shown}: the swarm dials this peer, and it relays for peers "
                       "behind NAT (--nat holepunch)", relay="serve")  # fmt: skip
    # a relayed peer cannot relay for others. One relay: p2pd's autorelay reserves on its static relays only once every
    # one of them has answered as a relay (go-libp2p v0.32 ``WithStaticRelays``: as many candidates as relays), and a
    # public peer that is not a bertswarm peer need not relay (measured: a bare hivemind node did not)
    public_join = tuple(a for a in join if host_kind(a) == "public" and "/p2p-circuit" not in a)[:1]
    shown = ", ".join(host for host, _ in mine) or "none"
    if public_join and mode == "holepunch":
        return NatPlan(False, False, f"behind NAT ({shown}): reached through the first public --join peer as a relay "
                       "until a hole punch connects each peer directly (needs "
                       f"{PUNCH_OBSERVERS} public peers in the swarm)", relay="use", relays=public_join)  # fmt: skip
    if any(host_kind(a) == "public" for a in join):
        return NatPlan(True, True, f"behind NAT: this machine's addresses are private ({shown}) and the swarm is on "
                       "the internet, so nobody there can dial it: joining in client mode (it trains and averages "
                       "through the swarm's reachable peers, but serves no state). With a forwarded port, pass "
                       "--announce /ip4/<public ip>/tcp/PORT; --nat off keeps it dialable")  # fmt: skip
    return NatPlan(False, False, "no public address here or in --join: peers dial each other directly")


def host_kind(maddr: str) -> str:
    """``loopback``, ``private`` (LAN, NAT, CGNAT, link-local, documentation) or ``public``; a DNS name counts as
    public."""
    protocol, host = addresses.parse(maddr, "address", need_peer_id=False)[0]
    if protocol not in ("ip4", "ip6"):
        return "loopback" if host == "localhost" else "public"
    return _ip_kind(ipaddress.ip_address(host))


def _ip_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return "loopback" if ip.is_loopback else "public" if ip.is_global else "private"


def own_hosts(listen: Sequence[str], announce: Sequence[str], join: Sequence[str]) -> list[tuple[str, str]]:
    """``[(host, kind)]`` of the addresses others would be told to dial: the announced ones, else the listened-on
    ones, where a wildcard (0.0.0.0, ::) stands for the local address of this machine's route towards each ``--join``
    peer (or towards the internet without one): the address p2pd would announce for that interface."""
    if announce:
        return [(addresses.parse(a, "--announce", need_peer_id=False)[0][1], host_kind(a)) for a in announce]
    hosts = []
    for maddr in listen or [DEFAULT_LISTEN]:
        protocol, host = addresses.parse(maddr, "--listen", need_peer_id=False)[0]
        if protocol not in ("ip4", "ip6") or not ipaddress.ip_address(host).is_unspecified:
            hosts.append((host, host_kind(maddr)))
            continue
        targets = [h for p, h in (addresses.parse(a, "--join", need_peer_id=False)[0] for a in join) if p == protocol]
        for target in targets or [_ROUTE_PROBES[protocol]]:
            source = route_source(target, socket.AF_INET if protocol == "ip4" else socket.AF_INET6)
            if source is not None:
                hosts.append((source, _ip_kind(ipaddress.ip_address(source))))
    return sorted(set(hosts))


def route_source(target: str, family: int) -> str | None:
    """The local address this machine's routing table picks to reach ``target`` (no packet is sent), or None when
    there is no route."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((target, 9))
            return probe.getsockname()[0]
        except OSError:
            return None


# seconds after the start at which a peer behind NAT (--nat holepunch) drops its connections that still go through a
# relay, so that the next stream opens a new one and p2pd tries the hole punch again; each drop can cut a round in
# flight with that peer, hence a few, early
PUNCH_RETRIES = (10.0, 30.0, 60.0, 120.0)


def retry_punches(dht, schedule: Sequence[float] = PUNCH_RETRIES) -> threading.Thread:
    """At each time of ``schedule`` (seconds after now), drop this peer's relayed-only connections (a daemon thread
    that ends with the DHT). p2pd tries DCUtR once, when a relayed connection opens."""

    def run() -> None:
        started = time.monotonic()
        for at in schedule:
            time.sleep(max(0.0, started + at - time.monotonic()))
            if not dht.is_alive():
                return
            try:
                direct, relayed = dht.run_coroutine(drop_relayed_connections, return_future=True).result(10)
            except Exception as e:  # the DHT is stopping
                logger.debug("hole punch retry failed: %r", e)
                return
            if relayed:
                logger.info("hole punching: %d peer(s) connected directly, %d still through the relay: reconnecting "
                            "those to punch again", direct, relayed)  # fmt: skip
            else:
                logger.debug("hole punching: %d peer(s) connected directly, none through the relay", direct)

    thread = threading.Thread(target=run, name="bertswarm-punch-retries", daemon=True)
    thread.start()
    return thread


async def drop_relayed_connections(_dht, node) -> tuple[int, int]:
    """In the DHT process (``DHT.run_coroutine``): disconnect every peer this node reaches only through a relay
    (``/p2p-circuit`` connections). Returns (peers connected directly, peers dropped)."""
    addrs = defaultdict(list)
    for info in await node.p2p.list_peers():  # one entry per connection, with its remote address
        addrs[info.peer_id].extend(str(a) for a in info.addrs)
    relayed = [peer for peer, found in addrs.items() if found and all("/p2p-circuit" in a for a in found)]
    for peer in relayed:
        await node.p2p._client.disconnect(peer)
    return len(addrs) - len(relayed), len(relayed)
