"""Multiaddrs are validated before p2pd starts."""

import pytest

from peer.config import PeerConfig
from peer.errors import UserError
from peer.swarm import parse_maddr, validate_addresses

PEER_ID = "12D3KooWB72XDuQv8xY5qFEzdJutWeuR5pJuipzJaK1Z5dD9DKVG"


def test_valid_join_address():
    maddr = parse_maddr(f"/ip4/127.0.0.1/tcp/4000/p2p/{PEER_ID}", "--join", need_peer_id=True)
    assert str(maddr).endswith(PEER_ID)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("garbage", "not a valid multiaddr"),
        ("/ip4/300.1.1.1/tcp/1/p2p/" + PEER_ID, "not a valid multiaddr"),
        ("/ip4/1.2.3.4/tcp/99999/p2p/" + PEER_ID, "not a valid multiaddr"),
        ("/ip4/1.2.3.4/tcp/4000", "lacks the /p2p/<peer-id> part"),
        ("/ip4/1.2.3.4/tcp/4000/p2p/notapeerid", "not a valid multiaddr"),
        ("/ip4/1.2.3.4/p2p/" + PEER_ID, "names no tcp/udp port"),
    ],
)
def test_bad_join_addresses(text, fragment):
    with pytest.raises(UserError, match=fragment):
        validate_addresses(PeerConfig(join=[text]))


def test_listen_needs_no_peer_id_and_announce_needs_a_port():
    validate_addresses(PeerConfig(listen=["/ip4/0.0.0.0/tcp/0"]))
    with pytest.raises(UserError, match="port 0 cannot be dialled"):
        validate_addresses(PeerConfig(announce=["/ip4/1.2.3.4/tcp/0"]))
    with pytest.raises(UserError, match="--listen"):
        validate_addresses(PeerConfig(listen=["localhost:4000"]))
