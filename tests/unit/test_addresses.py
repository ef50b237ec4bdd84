"""Multiaddrs are validated before p2pd starts."""

import pytest
from hivemind.utils.multiaddr import Multiaddr

from peer.config import PeerConfig
from peer.errors import UserError
from peer.swarm.addresses import is_peer_id, parse

PEER_ID = "12D3KooWB72XDuQv8xY5qFEzdJutWeuR5pJuipzJaK1Z5dD9DKVG"


@pytest.mark.parametrize(
    "text",
    [
        f"/ip4/127.0.0.1/tcp/4000/p2p/{PEER_ID}",
        "/ip4/127.0.0.1/tcp/46283/p2p/QmZXidpiV1HBAaUah6ARvoq3opSGeZZhgu97BbCWMJFPfU",
        f"/ip6/::1/tcp/4000/p2p/{PEER_ID}",
        f"/dns4/peer.example.org/udp/4000/quic/p2p/{PEER_ID}",
    ],
)
def test_valid_join_addresses_agree_with_hivemind(text):
    parse(text, "--join", need_peer_id=True)
    assert str(Multiaddr(text)) == text  # the light parser accepts only what hivemind's parser accepts too


def test_peer_ids():
    assert is_peer_id(PEER_ID) and is_peer_id("QmZXidpiV1HBAaUah6ARvoq3opSGeZZhgu97BbCWMJFPfU")
    assert not is_peer_id("QmX") and not is_peer_id("0OIl") and not is_peer_id(PEER_ID[:-2])


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("garbage", "not a valid multiaddr"),
        ("/ip4/300.1.1.1/tcp/1/p2p/" + PEER_ID, "not a valid multiaddr"),
        ("/ip4/1.2.3.4/tcp/99999/p2p/" + PEER_ID, "not a valid multiaddr"),
        ("/ip4/1.2.3.4/tcp/4000", "lacks the /p2p/<peer-id> part"),
        ("/ip4/1.2.3.4/tcp/4000/p2p/notapeerid", "not a valid multiaddr"),
        ("/ip4/1.2.3.4/p2p/" + PEER_ID, "names no tcp/udp port"),
        ("/ip4/1.2.3.4/sctp/5/p2p/" + PEER_ID, "unknown protocol"),
        ("/ip4/1.2.3.4/tcp", "needs a value"),
    ],
)
def test_bad_join_addresses(text, fragment):
    with pytest.raises(UserError, match=fragment):
        PeerConfig(join=[text]).validate()


def test_listen_needs_no_peer_id_and_announce_needs_a_port():
    PeerConfig(listen=["/ip4/0.0.0.0/tcp/0"]).validate()
    with pytest.raises(UserError, match="port 0 cannot be dialled"):
        PeerConfig(announce=["/ip4/1.2.3.4/tcp/0"]).validate()
    with pytest.raises(UserError, match="--listen"):
        PeerConfig(listen=["localhost:4000"]).validate()
