"""Whether a peer joins in client mode, decided from its addresses (``peer/swarm/nat.py``)."""

from __future__ import annotations

import socket

import pytest

from peer.config import PeerConfig
from peer.errors import UserError
from peer.swarm import nat

PEER_ID = "QmW5xsJtzqm2MpXxwRBJYhrc7q6dPBnwXc9UP8sLQR1DaA"


def join(host: str) -> str:
    return f"/ip4/{host}/tcp/4000/p2p/{PEER_ID}"


@pytest.mark.parametrize(
    "joins, listen, announce, client",
    [
        ([], ["/ip4/5.77.0.1/tcp/31337"], [], False),  # the first peer on a public address
        ([join("5.77.0.1")], [], ["/ip4/8.8.8.8/tcp/31337"], False),  # a forwarded port, announced
        ([join("5.77.0.1")], ["/ip4/192.168.1.3/tcp/0"], [], True),  # a home network, a public swarm
        ([join("5.77.0.1")], [], [], True),  # the default listen address (loopback), a public swarm
        ([join("5.77.0.1")], [], ["/ip4/100.64.0.7/tcp/31337"], True),  # a CGNAT address announced: still private
        ([join("192.168.1.2")], ["/ip4/192.168.1.3/tcp/0"], [], False),  # a LAN
        ([], [], [], False),  # one machine (the default listen address is loopback)
        ([join("127.0.0.1")], [], [], False),
    ],
)
def test_auto_client_mode_from_addresses(joins, listen, announce, client):
    decided = nat.plan("auto", False, joins, listen, announce)
    assert decided.client_mode is client and decided.automatic is client, decided
    if client:
        assert "behind NAT" in decided.reason and "--announce" in decided.reason  # and what to do with a port


def test_wildcard_listen_stands_for_the_route_to_the_join_peer(monkeypatch):
    monkeypatch.setattr(nat, "route_source", lambda target, family: {"5.77.0.1": "10.78.1.2"}.get(target))
    assert nat.own_hosts(["/ip4/0.0.0.0/tcp/0"], [], [join("5.77.0.1")]) == [("10.78.1.2", "private")]
    assert nat.plan("auto", False, [join("5.77.0.1")], ["/ip4/0.0.0.0/tcp/0"], []).client_mode
    monkeypatch.setattr(nat, "route_source", lambda target, family: "5.77.0.9")  # a public interface
    assert not nat.plan("auto", False, [join("5.77.0.1")], ["/ip4/0.0.0.0/tcp/0"], []).client_mode


def test_route_source_sends_nothing_and_finds_loopback():
    assert nat.route_source("127.0.0.1", socket.AF_INET) == "127.0.0.1"


def test_explicit_choices():
    asked = nat.plan("off", True, [join("5.77.0.1")], [], [])
    assert asked.client_mode and not asked.automatic  # --client-mode always wins
    kept = nat.plan("off", False, [join("5.77.0.1")], ["/ip4/192.168.1.3/tcp/0"], [])
    assert not kept.client_mode and kept.reason == "--nat off"


def test_config_checks_the_nat_flag():
    with pytest.raises(UserError, match="--nat"):
        PeerConfig(nat="sometimes").validate()
    assert PeerConfig(nat="off").validate().nat == "off"


def test_holepunch_relays_through_the_public_join_peers(monkeypatch):
    monkeypatch.setattr(nat, "route_source", lambda target, family: "10.78.1.2")  # a home network
    joins = [join("5.77.0.1"), join("192.168.1.2"), join("5.77.0.11")]
    punched = nat.plan("holepunch", False, joins, ["/ip4/0.0.0.0/tcp/0"], [])
    assert not punched.client_mode and punched.relay == "use", punched
    assert punched.relays == (join("5.77.0.1"),)  # the first public one: p2pd waits for every static relay to answer
    lan_first = nat.plan("holepunch", False, joins[1:], ["/ip4/0.0.0.0/tcp/0"], [])
    assert lan_first.relays == (join("5.77.0.11"),)  # a LAN peer cannot relay for the internet
    assert punched.p2p_options() == {"use_auto_relay": True, "trusted_relays": list(punched.relays),
                                     "force_reachability": "private"}  # fmt: skip
    assert "4 public peers" in punched.reason
    # auto never picks it: client mode, as before
    assert nat.plan("auto", False, joins, ["/ip4/0.0.0.0/tcp/0"], []).client_mode


@pytest.mark.parametrize("mode", ["auto", "holepunch"])
def test_a_public_peer_relays_for_peers_behind_nat(mode):
    public = nat.plan(mode, False, [], ["/ip4/5.77.0.1/tcp/31337"], [])
    assert public.relay == "serve" and public.p2p_options() == {"force_reachability": "public"}
    for local in (nat.plan(mode, False, [], [], []), nat.plan("off", False, [], ["/ip4/5.77.0.1/tcp/1"], [])):
        assert local.relay == "off" and local.p2p_options() == {}  # one machine, or --nat off: p2pd as hivemind has it


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"join": [join("5.77.0.1")], "listen": ["/ip4/0.0.0.0/tcp/0"], "client_mode": True}, "--client-mode"),
        ({"join": [join("192.168.1.2")], "listen": ["/ip4/0.0.0.0/tcp/0"]}, "a --join peer with a public address"),
        ({"join": [], "listen": ["/ip4/0.0.0.0/tcp/0"]}, "a --join peer with a public address"),
        ({"join": [join("5.77.0.1")]}, "listens on loopback only"),
    ],
)
def test_config_refuses_a_holepunch_that_cannot_work(kwargs, words):
    with pytest.raises(UserError, match=words) as e:
        PeerConfig(nat="holepunch", **kwargs).validate()
    assert "\n" not in str(e.value)
    assert PeerConfig(nat="holepunch", join=[join("5.77.0.1")], listen=["/ip4/0.0.0.0/tcp/0"]).validate()


def test_install_turns_relay_discovery_off_only_with_static_relays():
    from hivemind.p2p import P2P

    from peer.swarm import hivemind_compat

    hivemind_compat.install()
    hivemind_compat.install()  # idempotent
    static = P2P._make_process_args("p2pd", autoRelay=True, trustedRelays="/ip4/5.77.0.1/tcp/1/p2p/x")
    assert "-relayDiscovery=0" in static
    assert not any(a.startswith("-relayDiscovery") for a in P2P._make_process_args("p2pd", autoRelay=False))


def test_only_peers_reached_through_a_relay_alone_are_dropped():
    import asyncio
    import types

    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    others = ("QmVpRS6rQQmWrPbvQVakaKVtT2gbZMdYLx2yWS5nXugSgU", "QmYg4LJmohmHVgYT7oFDnFqbuVUr1Lo7HhhFa8zZJZvrSY")
    relay, punched, relayed = (PeerID.from_base58(p) for p in (PEER_ID, *others))
    circuit = Multiaddr(f"/ip4/5.77.0.1/tcp/4000/p2p/{PEER_ID}/p2p-circuit")
    connections = [
        types.SimpleNamespace(peer_id=relay, addrs=[Multiaddr("/ip4/5.77.0.1/tcp/4000")]),
        types.SimpleNamespace(peer_id=punched, addrs=[circuit]),  # its relayed connection, and the punched one
        types.SimpleNamespace(peer_id=punched, addrs=[Multiaddr("/ip4/5.77.0.3/tcp/4002")]),
        types.SimpleNamespace(peer_id=relayed, addrs=[circuit]),
    ]
    dropped = []

    async def list_peers():
        return connections

    async def disconnect(peer):
        dropped.append(peer)

    client = types.SimpleNamespace(disconnect=disconnect)
    node = types.SimpleNamespace(p2p=types.SimpleNamespace(list_peers=list_peers, _client=client))
    assert asyncio.run(nat.drop_relayed_connections(None, node)) == (2, 1)
    assert dropped == [relayed]
