"""Peers behind NAT take part fully through a relay: which role this peer takes, and the p2pd options for it.

Three roles (``--relay``; ``auto`` picks one from this peer's addresses, see :func:`plan`):

- ``serve``: this peer has a public address, so it relays for peers that nobody can dial. libp2p's circuit relay v2
  service in p2pd starts only once the peer's reachability is *public*; AutoNAT, which would find that out, never
  tests private-range addresses and must first hear from other peers, so a serving peer declares it
  (``force_reachability="public"``). The service then runs with p2pd's limits (``p2pd -help``: 16 relayed
  connections per peer, 128 reservations, 4 GiB and 30 minutes per relayed connection, after which the next request
  dials a new one). Until then only p2pd's fallback relay answers (go-libp2p's default resources, per the daemon's
  source: 128 kB and 2 minutes per relayed connection), too little for a round.
- ``use``: nobody can dial this peer (its addresses are private and the swarm's are public, so its packets to the
  swarm are address-translated), so it reserves a slot on its ``--join`` peers as relays and announces
  ``/p2p-circuit`` addresses through them; others then dial it through the relay, and it averages and serves its
  state like any peer (it is not in hivemind's client mode). The reservation is made at once: the join peers are
  given to p2pd as static relays (``trustedRelays``, with relay discovery off), since p2pd's discovered relays wait
  3 minutes for 4 candidates before reserving. p2pd's hole punching (DCUtR, on with AutoNAT) may then replace a
  relayed connection with a direct one where both NATs allow it.
- ``off``: neither (a LAN or one machine, where everyone dials everyone; or ``--client-mode``, which opens outbound
  connections only and needs no one to dial it).

Every peer keeps libp2p's relay transport, so it can dial a relayed peer's ``/p2p-circuit`` address.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from peer.swarm import addresses
from peer.swarm.addresses import DEFAULT_LISTEN

logger = logging.getLogger(__name__)

RELAY_MODES = ("auto", "serve", "use", "off")
# route lookups (UDP connect sends no packet) for a wildcard listen address when there is no --join peer to look up
_ROUTE_PROBES = {"ip4": "192.0.2.1", "ip6": "2001:db8::1"}  # documentation addresses (RFC 5737, RFC 3849)


@dataclass(frozen=True)
class RelayPlan:
    role: str  # "serve", "use" or "off"
    reason: str  # why, for the log and the doctor
    relays: tuple[str, ...] = field(default=())  # for "use": the peers to reserve a slot on

    def p2p_options(self) -> dict:
        """Keyword arguments for ``hivemind.DHT`` (passed on to ``hivemind.P2P.create``)."""
        if self.role == "serve":
            return {"use_relay": True, "force_reachability": "public"}
        if self.role == "use":
            return {
                "use_relay": True,
                "use_auto_relay": True,
                "force_reachability": "private",
                "trusted_relays": list(self.relays),
            }
        return {}


def plan(
    mode: str, client_mode: bool, join: Sequence[str], listen: Sequence[str], announce: Sequence[str]
) -> RelayPlan:
    """This peer's role. In ``auto``: ``serve`` when one of its own addresses (announced, else listened on, a
    wildcard standing for the address its route to the swarm leaves from) is public; ``use`` when none is but a
    ``--join`` peer's is, because then this peer reaches the swarm through address translation and nobody there can
    dial the private addresses it would announce; otherwise ``off``. ``--client-mode`` is always ``off``."""
    if client_mode:
        return RelayPlan("off", "--client-mode: outbound connections only")
    if mode == "serve":
        return RelayPlan("serve", "--relay serve")
    relays = tuple(a for a in join if "/p2p-circuit" not in a)  # a relayed peer cannot relay for others
    if mode == "use":
        if not relays:
            raise ValueError("--relay use needs a --join peer that is not itself relayed to relay through")
        return RelayPlan("use", "--relay use", relays)
    if mode == "off":
        return RelayPlan("off", "--relay off")
    theirs = [(a, host_kind(a)) for a in relays]
    mine = own_hosts(listen, announce, join)
    if any(kind == "public" for _, kind in mine):
        shown = ", ".join(host for host, kind in mine if kind == "public")
        return RelayPlan("serve", f"public address {shown}: relaying for peers behind NAT")
    public_join = tuple(a for a, kind in theirs if kind == "public")
    if public_join:
        shown = ", ".join(host for host, _ in mine) or "none"
        return RelayPlan("use", f"private addresses only ({shown}) and a public swarm: reachable through a relay",
                         public_join)  # fmt: skip
    return RelayPlan("off", "no public address here or in --join: peers dial each other directly")


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
        if protocol not in ("ip4", "ip6"):
            hosts.append((host, host_kind(maddr)))
            continue
        if not ipaddress.ip_address(host).is_unspecified:
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


def install() -> None:
    """Let hivemind pass ``-relayDiscovery=0`` with static relays (idempotent; before the DHT process forks).

    hivemind 1.1.12 accepts ``use_relay_discovery`` but passes nothing (deprecated), and p2pd leaves discovery on, in
    which case it feeds the static relays through the discovery path, where autorelay waits 3 minutes for 4 relay
    candidates before reserving a slot on fewer. With discovery off, the static relays are all the candidates there
    are, and the reservation is made at once."""
    from hivemind.p2p import P2P

    if getattr(P2P._make_process_args, "_bertswarm_static_relays", False):
        return
    original = P2P._make_process_args

    def make_process_args(*args, **kwargs):
        if kwargs.get("autoRelay") and kwargs.get("trustedRelays"):
            kwargs["relayDiscovery"] = False
        return original(*args, **kwargs)

    make_process_args._bertswarm_static_relays = True
    P2P._make_process_args = staticmethod(make_process_args)
