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
