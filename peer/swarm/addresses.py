"""Multiaddr validation without importing hivemind (and torch): a typo in ``--join`` is answered in milliseconds.

Covers the address forms a volunteer swarm uses: ``/ip4|ip6|dns|dns4|dns6/<host>/tcp|udp/<port>[/quic|quic-v1|ws|wss]
[/p2p/<peer-id>]``. Peer ids are checked as base58 multihashes (``Qm...`` sha2-256 or ``12D3KooW...`` identity keys).
"""

from __future__ import annotations

import ipaddress

from peer.errors import UserError

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"  # loopback, any free port: reachable only from this machine
JOIN_HINT = "copy the exact address from a live peer's 'bertswarm-peer --join ...' line"
_VALUED = {"ip4", "ip6", "dns", "dns4", "dns6", "tcp", "udp", "p2p"}
_FLAGS = {"quic", "quic-v1", "ws", "wss", "p2p-circuit"}
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def parse(text: str, flag: str, *, need_peer_id: bool) -> list[tuple[str, str | None]]:
    """``[(protocol, value), ...]`` of a multiaddr, or a ``UserError`` naming the flag and the expected shape."""
    shape = "/ip4/<ip>/tcp/<port>/p2p/<peer-id>" if need_peer_id else "/ip4/<ip>/tcp/<port>"

    def fail(reason: str) -> UserError:
        return UserError(f"{flag} {text!r} is not a valid multiaddr ({reason}); expected {shape}")

    if not text.startswith("/"):
        raise fail("it must begin with /")
    parts, pairs = text.strip("/").split("/"), []
    i = 0
    while i < len(parts):
        proto = parts[i]
        if proto in _FLAGS:
            pairs.append((proto, None))
            i += 1
            continue
        if proto not in _VALUED:
            raise fail(f"unknown protocol {proto!r}")
        if i + 1 >= len(parts) or not parts[i + 1]:
            raise fail(f"/{proto} needs a value")
        value = parts[i + 1]
        _check_value(proto, value, fail)
        pairs.append((proto, value))
        i += 2
    protocols = [p for p, _ in pairs]
    if not protocols or protocols[0] not in ("ip4", "ip6", "dns", "dns4", "dns6"):
        raise fail("it must start with /ip4, /ip6 or /dns")
    if not {"tcp", "udp"} & set(protocols):
        raise UserError(f"{flag} {text!r} names no tcp/udp port; expected {shape}")
    if need_peer_id and "p2p" not in protocols:
        raise UserError(f"{flag} {text!r} lacks the /p2p/<peer-id> part; {JOIN_HINT}")
    return pairs


def _check_value(proto: str, value: str, fail) -> None:
    if proto == "ip4" or proto == "ip6":
        try:
            (ipaddress.IPv4Address if proto == "ip4" else ipaddress.IPv6Address)(value)
        except ValueError:
            raise fail(f"{value!r} is not an IPv{proto[-1]} address") from None
    elif proto in ("tcp", "udp"):
        if not value.isdigit() or not 0 <= int(value) <= 65535:
            raise fail(f"port {value!r} is not 0-65535")
    elif proto == "p2p" and not is_peer_id(value):
        raise fail(f"{value!r} is not a peer id")


def is_peer_id(text: str) -> bool:
    """A base58 multihash: sha2-256 (0x12, 32 bytes) or identity (0x00) of a public key."""
    raw = _b58decode(text)
    if raw is None or len(raw) < 2:
        return False
    code, length, digest = raw[0], raw[1], raw[2:]
    return code in (0x00, 0x12) and length == len(digest) and (code != 0x12 or length == 32)


def _b58decode(text: str) -> bytes | None:
    number = 0
    for char in text:
        index = _B58.find(char)
        if index < 0:
            return None
        number = number * 58 + index
    body = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return b"\x00" * (len(text) - len(text.lstrip("1"))) + body


def validate(join: list[str], listen: list[str], announce: list[str]) -> None:
    for text in join:
        parse(text, "--join", need_peer_id=True)
    for text in listen:
        parse(text, "--listen", need_peer_id=False)
    for text in announce:
        pairs = parse(text, "--announce", need_peer_id=False)
        if any(proto in ("tcp", "udp") and value == "0" for proto, value in pairs):
            raise UserError(f"--announce {text!r}: port 0 cannot be dialled; announce the real port you listen on")
