"""The relay role a peer picks from its addresses (``peer/swarm/nat.py``) and the p2pd options it becomes."""

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
    "joins, listen, announce, role",
    [
        ([], ["/ip4/5.77.0.1/tcp/31337"], [], "serve"),  # the first peer on a public address
        ([join("5.77.0.1")], [], ["/ip4/8.8.8.8/tcp/31337"], "serve"),  # a forwarded port, announced
        ([join("5.77.0.1")], ["/ip4/192.168.1.3/tcp/0"], [], "use"),  # a home network, a public swarm
        ([join("192.168.1.2")], ["/ip4/192.168.1.3/tcp/0"], [], "off"),  # a LAN
        ([], [], [], "off"),  # one machine (the default listen address is loopback)
        ([join("127.0.0.1")], [], [], "off"),
    ],
)
def test_auto_role_from_addresses(joins, listen, announce, role):
    assert nat.plan("auto", False, joins, listen, announce).role == role


def test_wildcard_listen_stands_for_the_route_to_the_join_peer(monkeypatch):
    monkeypatch.setattr(nat, "route_source", lambda target, family: {"5.77.0.1": "10.78.1.2"}.get(target))
    assert nat.own_hosts(["/ip4/0.0.0.0/tcp/0"], [], [join("5.77.0.1")]) == [("10.78.1.2", "private")]
    relayed = nat.plan("auto", False, [join("5.77.0.1")], ["/ip4/0.0.0.0/tcp/0"], [])
    assert relayed.role == "use" and relayed.relays == (join("5.77.0.1"),)
    monkeypatch.setattr(nat, "route_source", lambda target, family: "5.77.0.9")
    assert nat.plan("auto", False, [join("5.77.0.1")], ["/ip4/0.0.0.0/tcp/0"], []).role == "serve"


def test_route_source_sends_nothing_and_finds_loopback():
    assert nat.route_source("127.0.0.1", socket.AF_INET) == "127.0.0.1"


def test_explicit_roles_and_client_mode():
    assert nat.plan("auto", True, [join("5.77.0.1")], [], []).role == "off"
    assert nat.plan("off", False, [join("5.77.0.1")], ["/ip4/192.168.1.3/tcp/0"], []).role == "off"
    assert nat.plan("serve", False, [], [], []).role == "serve"
    circuit = f"{join('5.77.0.1')}/p2p-circuit/p2p/{PEER_ID}"
    used = nat.plan("use", False, [join("192.168.1.2"), circuit], [], [])
    assert used.relays == (join("192.168.1.2"),)  # a relayed peer relays for no one


def test_p2p_options():
    assert nat.RelayPlan("off", "").p2p_options() == {}
    assert nat.RelayPlan("serve", "").p2p_options() == {"use_relay": True, "force_reachability": "public"}
    use = nat.RelayPlan("use", "", (join("5.77.0.1"),)).p2p_options()
    assert use == {"use_relay": True, "use_auto_relay": True, "force_reachability": "private",
                   "trusted_relays": [join("5.77.0.1")]}  # fmt: skip


def test_static_relays_turn_discovery_off():
    from hivemind.p2p import P2P

    nat.install()
    nat.install()  # idempotent
    args = P2P._make_process_args("p2pd", autoRelay=True, trustedRelays="x", relay=True)
    assert "-relayDiscovery=0" in args
    assert not any(a.startswith("-relayDiscovery") for a in P2P._make_process_args("p2pd", autoRelay=True))


def test_config_checks_the_relay_flag():
    with pytest.raises(UserError, match="--relay"):
        PeerConfig(relay="sometimes").validate()
    with pytest.raises(UserError, match="--relay use needs a --join"):
        PeerConfig(relay="use").validate()
    with pytest.raises(UserError, match="--client-mode"):
        PeerConfig(relay="serve", client_mode=True).validate()
