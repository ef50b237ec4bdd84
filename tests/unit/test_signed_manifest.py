"""The run manifest is signed by the run's creator; a joiner trusts the creator its bootstrap peer (or its own pin)
names and ignores copies signed by anyone else (peer.join._choose, peer.swarm.records, peer.swarm.identity)."""

from __future__ import annotations

import dataclasses

import pytest
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey

from peer import join
from peer.config import PeerConfig
from peer.data.tokenizer import default_tokenizer, tokenizer_fingerprint
from peer.errors import UserError
from peer.run.manifest import RunManifest, from_config
from peer.swarm import identity, records


def manifest(run_id: str = "r", **changes) -> RunManifest:
    tok = default_tokenizer()
    run = from_config(PeerConfig(seq_len=64).validate(), run_id, tokenizer_fingerprint(tok), tok.get_vocab_size())
    return run.model_copy(update=changes) if changes else run


def copy_of(key: RSAPrivateKey, run: RunManifest, publisher: RSAPrivateKey | None = None) -> records.ManifestRecord:
    """What ``fetch_manifests`` returns for a copy of ``run`` signed by ``key``, published by ``publisher``."""
    signed = records.sign_manifest(run, key)
    publisher_id = identity.peer_id_of_public_key((publisher or key).get_public_key())
    ok = identity.verify(signed.creator, signed.manifest.encode(), signed.signature)
    return records.ManifestRecord(str(publisher_id), signed.creator, run if ok else None, signed)


def peer_id(key: RSAPrivateKey) -> str:
    return str(identity.peer_id_of_public_key(key.get_public_key()))


def test_the_identity_key_signs_as_the_peer_id(tmp_path):
    path = tmp_path / "identity.key"
    key, created = identity.ensure_identity(path)
    assert created and identity.ensure_identity(path)[1] is False
    assert identity.peer_id_of_owner(identity.owner_subkey(key)) == PeerID.from_identity(path.read_bytes())
    assert identity.peer_id_of_owner(b"not an owner subkey") is None


def test_a_damaged_identity_file_is_one_line(tmp_path):
    path = tmp_path / "identity.key"
    path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="identity.key: cannot read this peer's key .*remove the file"):
        identity.load_identity_key(path)


def test_a_signed_manifest_verifies_and_a_changed_one_does_not():
    key = RSAPrivateKey()
    signed = records.sign_manifest(manifest(), key)
    assert identity.verify(signed.creator, signed.manifest.encode(), signed.signature)
    forged = manifest(lr=0.5).to_json()
    assert not identity.verify(signed.creator, forged.encode(), signed.signature)
    assert not identity.verify("ssh-rsa garbage", signed.manifest.encode(), signed.signature)


def test_the_bootstrap_peers_creator_wins_and_forgeries_are_counted():
    creator, member, attacker = RSAPrivateKey(), RSAPrivateKey(), RSAPrivateKey()
    real, forged = manifest(), manifest(lr=0.5)
    copies = [copy_of(attacker, forged), copy_of(creator, real, publisher=member), copy_of(creator, real)]
    found = join._choose("r", copies, {peer_id(member)}, None)
    assert found.manifest == real and found.via_bootstrap and found.ignored == 1
    assert found.signed.creator == identity.public_key_text(creator)
    # joining through the attacker's own peer gets the attacker's run: the bootstrap peer is whom the user trusts...
    assert join._choose("r", copies, {peer_id(attacker)}, None).manifest == forged
    # ...unless this peer pinned the real creator at an earlier join
    pinned = join._choose("r", copies, {peer_id(attacker)}, identity.public_key_text(creator))
    assert pinned.manifest == real and not pinned.via_bootstrap and pinned.ignored == 1


def test_without_a_bootstrap_copy_only_an_unambiguous_creator_is_trusted():
    creator, attacker = RSAPrivateKey(), RSAPrivateKey()
    assert join._choose("r", [copy_of(creator, manifest())], set(), None).manifest == manifest()
    two = [copy_of(creator, manifest()), copy_of(attacker, manifest(lr=0.5))]
    assert join._choose("r", two, set(), None) is None  # two keys sign the run: nothing says which is its creator
    assert join._choose("r", [], set(), None) is None


def test_tampered_or_replayed_copies_are_never_trusted():
    creator = RSAPrivateKey()
    good = copy_of(creator, manifest())
    tampered = dataclasses.replace(good, manifest=None)  # what fetch_manifests returns when the signature fails
    other_run = copy_of(creator, manifest("another"))
    found = join._choose("r", [tampered, good], {good.publisher}, None)
    assert found.manifest == manifest() and found.ignored == 1
    assert join._choose("r", [tampered], {good.publisher}, None) is None
    assert other_run.manifest.run_id == "another"  # fetch_manifests drops it for run "r" (tested live)


def test_pins_are_kept_per_run_in_the_state_dir(tmp_path):
    assert join.read_pins(tmp_path) == {}
    join._pin(tmp_path, "r", "ssh-rsa A")
    join._pin(tmp_path, "s", "ssh-rsa B")
    assert join.read_pins(tmp_path) == {"r": "ssh-rsa A", "s": "ssh-rsa B"}
    (tmp_path / join.TRUST_FILE).write_text("not json")
    assert join.read_pins(tmp_path) == {}


def test_bootstrap_peer_ids_come_from_the_join_addresses():
    pid = str(PeerID.from_identity(_identity_bytes()))
    addresses = [f"/ip4/127.0.0.1/tcp/1234/p2p/{pid}", "/ip4/10.0.0.1/tcp/5"]
    assert join.bootstrap_peer_ids(addresses) == {pid}


def _identity_bytes() -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        P2P.generate_identity(str(Path(d) / "k"))
        return (Path(d) / "k").read_bytes()
