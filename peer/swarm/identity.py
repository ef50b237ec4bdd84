"""A peer's identity key (the RSA key behind its libp2p peer id, in ``<state-dir>/identity.key``) used to sign what it
publishes: its DHT records (hivemind's ``RSASignatureValidator`` protects a subkey ``[owner:<public key>]`` so that
only the key's holder can write it) and, for the run's creator, the run manifest itself (``peer.swarm.records``).

Because the key *is* the peer id's, a signed record can be traced to a peer id (:func:`peer_id_of_owner`): a joiner
knows which record its bootstrap peer wrote, since the ``--join`` address names that peer's id.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from peer.errors import UserError

_OWNER_RE = re.compile(rb"^\[owner:(.+)\]$")


def load_identity_key(path: str | Path) -> RSAPrivateKey:
    """The private key of the identity file p2pd uses (written by hivemind on a peer's first start)."""
    try:
        data = crypto_pb2.PrivateKey.FromString(Path(path).read_bytes())
        if data.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not an RSA key")
        loaded = serialization.load_der_private_key(data.data, password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise ValueError("not an RSA key")
    except (OSError, ValueError, DecodeError) as e:
        raise UserError(
            f"--identity {path}: cannot read this peer's key ({e}); remove the file to get a new one"
        ) from None
    key = RSAPrivateKey.__new__(RSAPrivateKey)  # hivemind's wrapper around an existing key (its __init__ makes one)
    key._private_key = loaded
    return key


def ensure_identity(path: Path) -> tuple[RSAPrivateKey, bool]:
    """The peer's identity key, created first (as hivemind would create it) if the file does not exist yet; and
    whether it was created now (a new key cannot be in use by another peer: hivemind need not check)."""
    created = not Path(path).exists()
    if created:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            P2P.generate_identity(str(path))
        except OSError as e:
            raise UserError(f"--identity {path}: cannot write this peer's key ({e}); pick a writable --state-dir or "
                            "--identity") from None  # fmt: skip
    return load_identity_key(path), created


def use_for_this_process(key: RSAPrivateKey) -> None:
    """Make ``key`` hivemind's process-wide key, so every ``RSASignatureValidator`` made later in this process (the
    run's records, hivemind's progress tracker) signs with the peer id's key. Call it before any is made: the DHT
    keeps the first one it is given."""
    RSAPrivateKey._process_wide_key = key


def owner_subkey(key: RSAPrivateKey) -> bytes:
    """The DHT subkey only ``key``'s holder can write (``[owner:<OpenSSH public key>]``)."""
    return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", key.get_public_key().to_bytes())


def public_key_text(key: RSAPrivateKey) -> str:
    return key.get_public_key().to_bytes().decode()


def peer_id_of_public_key(public_key: RSAPublicKey) -> PeerID:
    """The libp2p peer id of an RSA public key (as ``PeerID.from_identity`` derives it from the private key)."""
    der = public_key._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))


def peer_id_of_owner(subkey: bytes) -> PeerID | None:
    """The peer id whose key protects a DHT subkey ``[owner:...]``; None for any other subkey."""
    match = _OWNER_RE.match(subkey) if isinstance(subkey, bytes) else None
    if match is None:
        return None
    try:
        return peer_id_of_public_key(RSAPublicKey.from_bytes(match.group(1)))
    except ValueError:
        return None


def verify(public_key_text_: str, data: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64, as ``RSAPrivateKey.sign`` makes it) is ``public_key_text_``'s over ``data``."""
    try:
        key = RSAPublicKey.from_bytes(public_key_text_.encode())
    except ValueError:
        return False
    return key.verify(data, signature.encode())
