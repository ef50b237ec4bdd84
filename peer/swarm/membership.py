"""Join authorisation: a run that only the peers its creator lists may take part in (``--allow FILE``).

The run's manifest pins ``restricted``; the list itself is a companion record, ``{run}_members``, signed by the same
creator key as the manifest (``peer.swarm.identity``), so that the creator can change it while the run goes on without
changing the run's fingerprint (which stamps checkpoints and saved state). Like the manifest, every member republishes
the creator's newest signed list under its own DHT subkey, so the list outlives the creator; a newer ``version`` (the
creator's clock when it signed) replaces an older one, and a list signed by anyone else is ignored.

Enforcement, in every peer of a restricted run:

- ``MembersOnlyMixin`` on every averager (both modes, gradients and state): a non-member's request to join a group,
  its parts in an all-reduce and its state download are refused (counted as ``not_member`` in
  ``bertswarm_peer_rejected_contributions_total``), and this peer never asks a non-member to lead its group nor
  downloads state from one. hivemind's own check (``rpc_aggregate_part`` only from groupmates) then keeps
  non-members out of every all-reduce.
- Records: other peers' training-progress records, DiLoCo progress records and metrics records (shard assignment)
  written by non-members are ignored (``allows_owner``).
- A peer that finds itself off the list, at its join or later, stops with one line and exit code 2.

The averagers run in processes hivemind forks from the peer's process; they read the current list from a small file
in the state dir that the peer's process keeps up to date (``Allowlist``), re-reading it when it changes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator  # noqa: UP035 - hivemind reads typing's AsyncIterator[...] hints, not collections.abc's

from hivemind.p2p import P2PContext, P2PHandlerError, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.crypto import RSAPrivateKey

from peer.errors import UserError
from peer.run.schema import SignedMembers
from peer.store.atomic import atomic_write_text
from peer.swarm import identity

logger = logging.getLogger(__name__)

MAX_PEERS = 1000  # entries in an allowlist (the signed record must fit a DHT value: schema.MAX_MEMBERS_BYTES)
ALLOWLIST_FILE = "allowlist.json"  # in the state dir: the list this peer's averager processes enforce
_PEER_ID_RE = re.compile(r"(?:^|/p2p/)([1-9A-HJ-NP-Za-km-z]{32,128})$")


class NotAMember(P2PHandlerError):
    """Raised instead of opening a stub to a peer outside the run's allowlist; a ``P2PHandlerError`` so that
    hivemind's matchmaking treats it as a leader that refused."""


# --- the allowlist file the creator writes ---------------------------------------------------------------------------


def read_allow_file(path: str | os.PathLike[str]) -> frozenset[str]:
    """The peer ids listed in ``path``: one per line (a bare id or a multiaddr ending in ``/p2p/<id>``), ``#``
    comments and blank lines ignored. Raises ``UserError`` naming the file and line of anything else."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--allow {path}: cannot read the allowlist ({e}); pass a text file of peer ids") from None
    peers = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = _PEER_ID_RE.search(text)
        if match is None or not _valid_peer_id(match.group(1)):
            raise UserError(f"--allow {path} line {number}: {text[:80]!r} is not a peer id; list one peer id per line "
                            "(each peer prints its own as the /p2p/... end of its join line)")  # fmt: skip
        peers.add(match.group(1))
    if len(peers) > MAX_PEERS:
        raise UserError(f"--allow {path}: {len(peers)} peer ids, at most {MAX_PEERS} are supported; shorten the list")
    return frozenset(peers)


def _valid_peer_id(text: str) -> bool:
    try:
        return PeerID.from_base58(text).to_base58() == text
    except (ValueError, KeyError):
        return False


# --- the signed record ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Members:
    """A version of the run's allowlist."""

    run_id: str
    version: int  # the creator's clock (ms) when it signed: a newer list replaces an older one
    peers: frozenset[str]

    def to_json(self) -> str:
        data = dict(run_id=self.run_id, version=self.version, peers=sorted(self.peers))
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Members:
        data = json.loads(text)
        run_id, version, peers = data["run_id"], data["version"], data["peers"]
        if not (isinstance(run_id, str) and isinstance(version, int) and isinstance(peers, list)):
            raise ValueError("malformed allowlist")
        if len(peers) > MAX_PEERS or not all(isinstance(p, str) and _valid_peer_id(p) for p in peers):
            raise ValueError("malformed allowlist")
        return cls(run_id, version, frozenset(peers))

    def allows(self, peer_id: PeerID | str) -> bool:
        return (peer_id.to_base58() if isinstance(peer_id, PeerID) else str(peer_id)) in self.peers


def new_version(previous: Members | None) -> int:
    """A version newer than ``previous``'s, from the clock (so that a creator's restart also publishes a newer one)."""
    now = int(time.time() * 1000)
    return now if previous is None else max(now, previous.version + 1)


def sign_members(members: Members, key: RSAPrivateKey) -> SignedMembers:
    text = members.to_json()
    signature = key.sign(text.encode()).decode()
    return SignedMembers(members=text, creator=identity.public_key_text(key), signature=signature)


def verify_members(signed: SignedMembers, creator: str, run_id: str) -> Members | None:
    """The list, if ``creator`` signed it for ``run_id``; else None (forged, damaged, or another run's)."""
    if signed.creator != creator or not identity.verify(creator, signed.members.encode(), signed.signature):
        return None
    try:
        members = Members.from_json(signed.members)
    except (ValueError, KeyError, TypeError):
        return None
    return members if members.run_id == run_id else None


# --- what this process enforces --------------------------------------------------------------------------------------


class Allowlist:
    """The current list as this process's averagers enforce it: kept in a file by the peer's own process
    (:meth:`update`), re-read by the forked averager processes when the file changes (:meth:`allows`)."""

    def __init__(self, path: Path, members: Members, me: PeerID):
        self.path, self.me = Path(path), me
        self._members, self._stamp = members, None
        self.update(members)

    @property
    def members(self) -> Members:
        return self._members

    def update(self, members: Members) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, members.to_json(), durable=False)
        self._members, self._stamp = members, self._file_stamp()

    def allows(self, peer_id: PeerID) -> bool:
        if peer_id == self.me:
            return True
        stamp = self._file_stamp()
        if stamp is not None and stamp != self._stamp:
            try:
                self._members = Members.from_json(self.path.read_text(encoding="utf-8"))
                self._stamp = stamp
            except (OSError, ValueError, KeyError, TypeError) as e:  # mid-replace or damaged: keep the last list
                logger.debug("allowlist file not re-read: %r", e)
        return self._members.allows(peer_id)

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino


_current: Allowlist | None = None  # None: an open run (and the coordinator, which only observes)
_on_refusal = None  # counts refusals (guards.count_rejection), set with the list


def restrict(allowlist: Allowlist | None, on_refusal=None) -> None:
    """Enforce ``allowlist`` in this process and the averager processes it forks afterwards (None: open)."""
    global _current, _on_refusal
    _current, _on_refusal = allowlist, on_refusal


def allows(peer_id: PeerID) -> bool:
    return _current is None or _current.allows(peer_id)


def allows_owner(subkey: bytes) -> bool:
    """Whether the peer whose key protects a DHT subkey (``[owner:...]``) is a member; unsigned subkeys count as
    nobody's in a restricted run."""
    if _current is None:
        return True
    owner = identity.peer_id_of_owner(subkey)
    return owner is not None and _current.allows(owner)


def _refuse(peer_id: PeerID, what: str) -> None:
    logger.debug("refused %s from %s: not on the run's allowlist", what, peer_id)
    if _on_refusal is not None:
        _on_refusal("not_member", -1)


class MembersOnlyMixin:
    """Makes a hivemind averager refuse non-members and never reach out to them (see the module docstring). Put it
    first among the bases; the RPC methods keep hivemind's signatures (hivemind derives the handlers from them)."""

    @classmethod
    def get_stub(cls, p2p, peer: PeerID, *, namespace: str | None = None):
        if not allows(peer):
            raise NotAMember(f"{peer} is not on the run's allowlist")
        return super().get_stub(p2p, peer, namespace=namespace)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not allows(context.remote_id):
            _refuse(context.remote_id, "a request to join a group")
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if not allows(context.remote_id):
            _refuse(context.remote_id, "an all-reduce part")
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not allows(context.remote_id):
            _refuse(context.remote_id, "a state download")
            return
        async for message in super().rpc_download_state(request, context):
            yield message


# --- keeping the list current in a peer ------------------------------------------------------------------------------

REFRESH_EVERY = 10.0  # seconds between reads of the signed list from the DHT (or of --allow FILE, for the creator)


def not_on_list(run_id: str, me: PeerID) -> UserError:
    return UserError(f"run {run_id} is restricted to its creator's allowlist and this peer ({me}) is not on it; send "
                     "this peer id to the run's creator, who adds it to their --allow file (no restart needed), then "
                     "start again")  # fmt: skip


def newest(copies: list[SignedMembers], creator: str, run_id: str) -> tuple[Members, SignedMembers] | None:
    """The newest version among the copies the run's creator signed."""
    verified = [(members, signed) for signed in copies if (members := verify_members(signed, creator, run_id))]
    return max(verified, key=lambda pair: pair[0].version, default=None)


def wait_for_members(dht, run_id: str, creator: str, timeout: float) -> tuple[Members, SignedMembers] | None:
    from peer.swarm import records

    deadline = time.monotonic() + timeout
    while True:
        found = newest(records.fetch_members(dht, run_id), creator, run_id)
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


class MembersKeeper:
    """Keeps a restricted run's allowlist current in this peer (call :meth:`tick` often; it acts every
    ``REFRESH_EVERY`` seconds): the creator re-reads its ``--allow`` file and publishes a new signed version when the
    file changed (a broken file is one warning; the last list stays); every other member adopts the newest version
    the creator signed. Each republishes the current version under its own subkey, and stops with one line (a
    ``UserError``, exit 2) once the list no longer names it."""

    def __init__(
        self,
        dht,
        run_id: str,
        creator: str,
        allowlist: Allowlist,
        signed: SignedMembers,
        subkey: bytes,
        *,
        allow_file: str | None = None,
        key: RSAPrivateKey | None = None,
        enforce_self: bool = True,
    ):
        self.dht, self.run_id, self.creator, self.allowlist = dht, run_id, creator, allowlist
        self.signed, self.subkey, self.allow_file, self.key = signed, subkey, allow_file, key
        self.enforce_self = enforce_self  # False only for the fault suite's outsider (peer.testing)
        self._file_stamp = _stat(allow_file) if allow_file else None
        self._last_refresh = self._last_publish = time.monotonic()

    def publish(self) -> None:
        from peer.swarm import records

        records.publish_members(self.dht, self.signed, self.run_id, self.subkey)
        self._last_publish = time.monotonic()

    def tick(self, republish_every: float) -> None:
        now = time.monotonic()
        if now - self._last_refresh >= REFRESH_EVERY:
            self._last_refresh = now
            self._reread_file() if self.allow_file else self._adopt_newest()
        if now - self._last_publish >= republish_every:
            self.publish()

    def _adopt(self, members: Members, signed: SignedMembers) -> None:
        before = self.allowlist.members
        self.allowlist.update(members)
        self.signed = signed
        self.publish()
        added, removed = len(members.peers - before.peers), len(before.peers - members.peers)
        logger.info("run %s: allowlist version %d, %d peers (+%d, -%d)", self.run_id, members.version,
                    len(members.peers), added, removed)  # fmt: skip
        if self.enforce_self and not members.allows(self.allowlist.me):
            raise not_on_list(self.run_id, self.allowlist.me)

    def _reread_file(self) -> None:
        stamp = _stat(self.allow_file)
        if stamp == self._file_stamp:
            return
        self._file_stamp = stamp
        try:
            peers = read_allow_file(self.allow_file)
        except UserError as e:
            logger.warning("%s; the run keeps its previous allowlist", e)
            return
        peers |= {self.allowlist.me.to_base58()}
        if peers == self.allowlist.members.peers:
            return
        members = Members(self.run_id, new_version(self.allowlist.members), frozenset(peers))
        self._adopt(members, sign_members(members, self.key))

    def _adopt_newest(self) -> None:
        from peer.swarm import records

        found = newest(records.fetch_members(self.dht, self.run_id), self.creator, self.run_id)
        if found is not None and found[0].version > self.allowlist.members.version:
            self._adopt(*found)


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
