"""Join authorisation's pieces without a swarm: the --allow file, the creator-signed allowlist and its versions, the
list as the averager processes read it, and the checks every averager makes (``peer.swarm.membership``)."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.crypto import RSAPrivateKey

from peer.errors import UserError
from peer.run.manifest import RunManifest
from peer.run.schema import SignedMembers
from peer.swarm import hivemind_compat, identity, membership
from peer.swarm.membership import Allowlist, Members

from .test_manifest import make as sample_manifest


def _peer_id(key: RSAPrivateKey) -> PeerID:
    return identity.peer_id_of_public_key(key.get_public_key())


@pytest.fixture(scope="module")
def keys() -> list[RSAPrivateKey]:
    return [RSAPrivateKey() for _ in range(3)]


@pytest.fixture
def open_run():
    yield
    membership.restrict(None)


def test_allow_file_takes_ids_multiaddrs_and_comments(tmp_path, keys):
    a, b = (_peer_id(k).to_base58() for k in keys[:2])
    path = tmp_path / "allow.txt"
    path.write_text(f"# volunteers\n{a}   # alice\n\n/ip4/1.2.3.4/tcp/31337/p2p/{b}\n{a}\n")
    assert membership.read_allow_file(path) == {a, b}


@pytest.mark.parametrize(
    "text, problem",
    [
        ("QmNotAPeerId\n", "line 1: 'QmNotAPeerId' is not a peer id"),
        ("# ok\n\n/ip4/1.2.3.4/tcp/1\n", "line 3: '/ip4/1.2.3.4/tcp/1' is not a peer id"),
    ],
)
def test_allow_file_with_a_bad_line_is_refused_naming_the_line(tmp_path, text, problem):
    path = tmp_path / "allow.txt"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        membership.read_allow_file(path)
    assert str(e.value).startswith(f"--allow {path} {problem}")
    assert "\n" not in str(e.value)


def test_allow_file_that_cannot_be_read_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"^--allow .*missing.txt: cannot read the allowlist"):
        membership.read_allow_file(tmp_path / "missing.txt")


def test_signed_allowlist_verifies_only_for_its_creator_and_run(keys):
    creator, other = keys[0], keys[1]
    members = Members("run", 5, frozenset({_peer_id(creator).to_base58()}))
    signed = membership.sign_members(members, creator)
    creator_text = identity.public_key_text(creator)
    assert membership.verify_members(signed, creator_text, "run") == members
    assert membership.verify_members(signed, creator_text, "other-run") is None  # replayed under another run
    forged = membership.sign_members(Members("run", 6, frozenset({_peer_id(other).to_base58()})), other)
    assert membership.verify_members(forged, creator_text, "run") is None  # signed by someone else
    claimed = SignedMembers(members=forged.members, creator=creator_text, signature=forged.signature)
    assert membership.verify_members(claimed, creator_text, "run") is None  # claims the creator, signature is not its
    tampered = SignedMembers(members=forged.members, creator=creator_text, signature=signed.signature)
    assert membership.verify_members(tampered, creator_text, "run") is None


def test_newest_version_the_creator_signed_wins(keys):
    creator, other = keys[0], keys[1]
    ids = [_peer_id(k).to_base58() for k in keys]
    old = membership.sign_members(Members("run", 1, frozenset(ids[:1])), creator)
    new = membership.sign_members(Members("run", 2, frozenset(ids[:2])), creator)
    forged = membership.sign_members(Members("run", 99, frozenset(ids)), other)
    found = membership.newest([old, forged, new], identity.public_key_text(creator), "run")
    assert found is not None and found[0].version == 2 and found[1] == new
    assert membership.newest([forged], identity.public_key_text(creator), "run") is None
    assert membership.new_version(found[0]) > 2


def test_the_averager_processes_see_the_list_the_peer_updates(tmp_path, keys):
    me, friend, stranger = (_peer_id(k) for k in keys)
    first = Members("run", 1, frozenset({me.to_base58(), friend.to_base58()}))
    peer_side = Allowlist(tmp_path / "allowlist.json", first, me)
    averager_side = Allowlist(tmp_path / "allowlist.json", first, me)  # as a forked process holds it
    assert averager_side.allows(friend) and not averager_side.allows(stranger) and averager_side.allows(me)
    peer_side.update(Members("run", 2, frozenset({me.to_base58(), stranger.to_base58()})))
    assert averager_side.allows(stranger) and not averager_side.allows(friend)
    assert averager_side.members.version == 2


def test_an_open_run_allows_everyone(keys, open_run):
    membership.restrict(None)
    assert membership.allows(_peer_id(keys[2]))
    assert membership.allows_owner(b"not an owner subkey")


def test_a_restricted_run_ignores_records_of_non_members(tmp_path, keys, open_run):
    me, friend, stranger = (_peer_id(k) for k in keys)
    allowlist = Allowlist(tmp_path / "allowlist.json", Members("run", 1, frozenset({friend.to_base58()})), me)
    membership.restrict(allowlist)
    assert membership.allows_owner(identity.owner_subkey(keys[1]))
    assert not membership.allows_owner(identity.owner_subkey(keys[2]))
    assert not membership.allows_owner(b"unsigned")
    assert membership.allows(me) and not membership.allows(stranger)


def test_averagers_refuse_non_members_and_never_reach_out_to_them(tmp_path, keys, open_run):
    me, friend, stranger = (_peer_id(k) for k in keys)
    refusals = []
    allowlist = Allowlist(tmp_path / "allowlist.json", Members("run", 1, frozenset({friend.to_base58()})), me)
    membership.restrict(allowlist, on_refusal=lambda reason, index: refusals.append(reason))
    averager_class = hivemind_compat.RobustGradientAverager
    with pytest.raises(membership.NotAMember):
        averager_class.get_stub(None, stranger)

    averager = object.__new__(averager_class)  # the checks come before anything the instance holds is touched
    averager._parent_pid = -1  # hivemind's __del__ reads it
    context = P2PContext(handle_name="x", local_id=me, remote_id=stranger)

    async def answers(method, request):
        return [message async for message in method(request, context)]

    join = asyncio.run(answers(averager.rpc_join_group, averaging_pb2.JoinRequest()))
    assert [m.code for m in join] == [averaging_pb2.PROTOCOL_VIOLATION]
    assert asyncio.run(answers(averager.rpc_download_state, averaging_pb2.DownloadRequest())) == []
    parts = asyncio.run(answers(averager.rpc_aggregate_part, None))
    assert [m.code for m in parts] == [averaging_pb2.PROTOCOL_VIOLATION]
    assert refusals == ["not_member"] * 3


def test_averager_rpc_handlers_keep_hivemind_signatures():
    """hivemind derives each handler's protobuf types from the method's annotations: the overrides must keep them."""
    for name in ("RobustGradientAverager", "RobustStateAverager", "PseudoGradientAverager", "OuterStateAverager"):
        cls = getattr(hivemind_compat, name)
        cls._collect_rpc_handlers()
        handlers = {h.method_name: h for h in cls._rpc_handlers}
        assert handlers["rpc_join_group"].request_type is averaging_pb2.JoinRequest
        assert handlers["rpc_join_group"].stream_output
        assert handlers["rpc_aggregate_part"].stream_input and handlers["rpc_aggregate_part"].stream_output
        assert handlers["rpc_download_state"].response_type is averaging_pb2.DownloadData


def test_restricted_is_pinned_and_an_open_run_keeps_its_fingerprint():
    manifest = sample_manifest()
    assert "restricted" not in manifest.to_json()
    restricted = manifest.model_copy(update={"restricted": True})
    assert '"restricted":true' in restricted.to_json()
    assert restricted.fingerprint != manifest.fingerprint
    assert RunManifest.from_json(restricted.to_json()).restricted


def test_peer_id_command_prints_the_id_a_volunteer_sends_the_creator(tmp_path, capsys):
    from peer import cli

    state = tmp_path / "state"
    assert cli.main(["id", "--state-dir", str(state)]) == 0
    first = capsys.readouterr().out.strip()
    assert cli.main(["id", "--state-dir", str(state)]) == 0  # the same id on every call: the key is kept
    assert capsys.readouterr().out.strip() == first
    key = identity.load_identity_key(state / "identity.key")
    assert first == _peer_id(key).to_base58()
    assert membership.read_allow_file(_write(tmp_path / "allow.txt", first + "\n")) == {first}


def test_peer_id_command_with_an_unwritable_identity_is_one_line(tmp_path, capsys):
    from peer import cli

    (tmp_path / "file").write_text("")
    assert cli.main(["id", "--identity", str(tmp_path / "file" / "identity.key")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bertswarm-peer id: error: --identity ") and "\n" not in err


def _write(path, text):
    path.write_text(text)
    return path
