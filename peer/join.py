"""Join or start a run: adopt the swarm's manifest when joining (refusing explicit flags that contradict it), or
build and publish a new one. The one place where manifest fields are mapped back to the flags that set them."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hivemind
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from peer.config import PeerConfig
from peer.errors import UserError
from peer.run.manifest import DEFAULT_RUN_ID, RunManifest, from_config
from peer.run.schema import SignedManifest, SignedMembers
from peer.store.atomic import atomic_write_text
from peer.swarm import identity, membership, records
from peer.swarm.membership import Members

logger = logging.getLogger(__name__)

TRUST_FILE = "trusted-runs.json"  # in the state dir: run id -> its creator's public key, pinned at the first join
_P2P_RE = re.compile(r"/p2p/([1-9A-HJ-NP-Za-km-z]+)$")

# manifest field -> the setting (PeerConfig field, i.e. flag) that sets it; used to detect conflicts with explicit flags
FLAG_OF_FIELD = {
    "preset": "preset",  # the preset also sets the model section, whose differences would only repeat this one
    "tokenizer_fingerprint": "tokenizer",
    "seq_len": "seq_len",
    "mlm_probability": "mlm_probability",
    "nsp": "nsp",
    "target_batch_size": "target_batch_size",
    "optimizer": "optimizer",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "warmup_steps": "warmup_steps",
    "total_steps": "total_steps",
    "mode": "mode",
    "inner_steps": "inner_steps",
    "outer_lr": "outer_lr",
    "outer_momentum": "outer_momentum",
    "outer_compression": "outer_compression",
    "outer_overlap": "outer_overlap",
    "aggregation": "aggregation",
    "data_fingerprint": "data",  # also checked without the flag: see data_conflict
    "restricted": "allow",
}


def conflicts(run: RunManifest, mine: RunManifest, explicit: set[str]) -> list[str]:
    """Fields where the run differs from what the user *explicitly* asked for (defaults are simply adopted)."""
    ours, theirs = mine.model_dump(), run.model_dump()
    return [
        f"{field} (from --{flag.replace('_', '-')}): run has {theirs.get(field)!r}, you asked for {ours.get(field)!r}"
        for field, flag in FLAG_OF_FIELD.items()
        if flag in explicit and ours.get(field) != theirs.get(field)
    ]


@dataclass(frozen=True)
class JoinedRun:
    """The run a peer takes part in: its manifest, and the creator-signed copy every member republishes."""

    run_id: str
    manifest: RunManifest
    signed: SignedManifest
    members: tuple[Members, SignedMembers] | None = None  # a restricted run's allowlist, as its creator signed it


def resolve(
    dht: hivemind.DHT,
    cfg: PeerConfig,
    explicit: set[str],
    tokenizer_fingerprint: str,
    vocab_size: int,
    data_fingerprint: str | None = None,
    *,
    publish: bool = True,
    allow: frozenset[str] | None = None,
    ignore_allowlist: bool = False,
) -> JoinedRun:
    """Adopt the swarm's manifest when joining (checking the creator's signature, explicit flags, the tokenizer and
    the prepared dataset), or build, sign and publish a new one. ``data_fingerprint``: this peer's prepared dataset's,
    None when it trains on text. With ``publish`` (a peer, not the doctor), the run's validators go into the DHT, the
    signed manifest is published under this peer's own subkey and the creator's key is pinned in the state dir.
    ``allow``: the peer ids of ``--allow FILE`` (its creator's only). A restricted run's signed allowlist is read (or,
    by its creator, made) and a peer it does not name is refused in one line (``ignore_allowlist``: the fault suite's
    outsider, which goes on regardless). This process must sign with the peer's identity key
    (``identity.use_for_this_process``) before."""
    if not cfg.join:
        manifest = from_config(cfg, cfg.run_id or DEFAULT_RUN_ID, tokenizer_fingerprint, vocab_size, data_fingerprint)
        joined = JoinedRun(manifest.run_id, manifest, records.sign_manifest(manifest, RSAPrivateKey.process_wide()))
    else:
        found = wait_for_run(dht, cfg.run_id, cfg.startup_timeout, bootstrap=bootstrap_peer_ids(cfg.join),
                             pinned=read_pins(cfg.state_path))  # fmt: skip
        joined = JoinedRun(found.run_id, found.manifest, found.signed)
        check_compatible(joined.manifest, cfg, explicit, tokenizer_fingerprint, vocab_size, data_fingerprint)
    if allow is not None and joined.signed.creator != identity.public_key_text(RSAPrivateKey.process_wide()):
        raise UserError(f"--allow: only the creator of run {joined.run_id} sets its allowlist; drop --allow (to take "
                        "part in a restricted run, send your peer id to its creator)")  # fmt: skip
    if joined.manifest.restricted:
        joined = JoinedRun(joined.run_id, joined.manifest, joined.signed,
                           _members(dht, joined, allow, cfg.startup_timeout, ignore_allowlist))  # fmt: skip
    if publish:
        subkey = records.install_run_validators(dht, joined.run_id)
        records.publish_manifest(dht, joined.signed, subkey)
        if joined.members is not None:
            records.publish_members(dht, joined.members[1], joined.run_id, subkey)
        _pin(cfg.state_path, joined.run_id, joined.signed.creator)
    return joined


def _members(
    dht: hivemind.DHT, run: JoinedRun, allow: frozenset[str] | None, timeout: float, ignore: bool
) -> tuple[Members, SignedMembers]:
    """A restricted run's allowlist: the creator's ``--allow`` list (and itself), else the newest version its
    creator signed, found in the DHT; this peer must be on it."""
    key = RSAPrivateKey.process_wide()
    me = identity.peer_id_of_public_key(key.get_public_key())
    creator = run.signed.creator
    is_creator = creator == identity.public_key_text(key)
    found = membership.wait_for_members(dht, run.run_id, creator, 0.0 if allow is not None else timeout)
    if allow is not None or (found is None and is_creator):
        if allow is None:
            logger.warning("run %s is restricted, and no allowlist of it is left in the swarm: only this peer may take "
                           "part until you restart it with --allow FILE", run.run_id)  # fmt: skip
        members = Members(run.run_id, membership.new_version(found[0] if found else None),
                          frozenset(allow or ()) | {me.to_base58()})  # fmt: skip
        return members, membership.sign_members(members, key)
    if found is None:
        raise UserError(f"run {run.run_id} is restricted to its creator's allowlist, and no copy of the list was found "
                        "within the startup timeout; check the --join address, or raise --startup-timeout")  # fmt: skip
    if not found[0].allows(me) and not ignore:
        raise membership.not_on_list(run.run_id, me)
    return found


def check_compatible(
    run: RunManifest,
    cfg: PeerConfig,
    explicit: set[str],
    tokenizer_fingerprint: str,
    vocab_size: int,
    data_fingerprint: str | None,
) -> None:
    """Refuse, in one line, a peer whose explicit flags, tokenizer or prepared data contradict the run's manifest."""
    mine = from_config(cfg, run.run_id, tokenizer_fingerprint, vocab_size, data_fingerprint)
    clashes = conflicts(run, mine, explicit)
    if clashes:
        raise UserError(
            "your flags conflict with the run's manifest: " + "; ".join(clashes) + ". Drop these flags to adopt the "
            "run's settings, or pass a new --run-id to start a separate run"
        )
    if run.tokenizer_fingerprint != tokenizer_fingerprint:
        raise UserError(
            f"your tokenizer (sha256 {tokenizer_fingerprint[:12]}) differs from the run's "
            f"({run.tokenizer_fingerprint[:12]}); pass --tokenizer with the run's vocab file"
        )
    if run.data_fingerprint != data_fingerprint:
        raise UserError(data_conflict(run.data_fingerprint, data_fingerprint))


def data_conflict(run_data: str | None, mine: str | None) -> str:
    """One line for a peer whose training data contradicts the run's pinned prepared dataset."""

    def name(fingerprint: str | None) -> str:
        return f"prepared dataset {fingerprint[:12]}" if fingerprint else "its peers' own text (no prepared dataset)"

    return (f"--data: the run trains on {name(run_data)}, you passed {name(mine)}; pass --data with the run's prepared "
            "dataset directory (every peer needs the same bertswarm-prepare output), or a new --run-id to start a "
            "separate run")  # fmt: skip


@dataclass(frozen=True)
class FoundRun:
    run_id: str
    manifest: RunManifest
    signed: SignedManifest
    via_bootstrap: bool  # the peer the user joined through publishes it
    ignored: int  # copies of the run's manifest not signed by its creator (forged, damaged or of another run)


def bootstrap_peer_ids(join_addresses: Sequence[str]) -> set[str]:
    """The peer ids the ``--join`` multiaddrs name (``.../p2p/<id>``)."""
    return {match.group(1) for address in join_addresses if (match := _P2P_RE.search(address))}


def wait_for_run(
    dht: hivemind.DHT,
    run_id: str | None,
    timeout: float,
    *,
    bootstrap: set[str] = frozenset(),
    pinned: dict[str, str] | None = None,
) -> FoundRun:
    """The run to join and its creator-signed manifest, within ``timeout`` seconds.

    Which run: ``run_id``, else the only one the swarm registers, else the one the ``bootstrap`` peer takes part
    in. Which creator: the one ``pinned`` for the run (an earlier join), else the one whose signed manifest the
    bootstrap peer publishes, else the only one that signs the run's copies. Copies signed by anyone else are ignored
    (and counted), so a forged manifest changes nothing for a peer that joins through a member of the run."""
    pinned = pinned or {}
    deadline = time.monotonic() + timeout
    while True:
        candidates = [run_id] if run_id else records.discover_runs(dht)
        found = [run for rid in candidates if (run := _choose(rid, records.fetch_manifests(dht, rid), bootstrap,
                                                               pinned.get(rid))) is not None]  # fmt: skip
        if len(found) == 1 and (run_id or len(candidates) == 1):
            return _report(found[0])
        own = [run for run in found if run.via_bootstrap]
        if not run_id and len(own) == 1:
            logger.info("the swarm hosts runs %s; joining %s, the run of the peer you joined through (--run-id to "
                        "choose)", ", ".join(candidates), own[0].run_id)  # fmt: skip
            return _report(own[0])
        if time.monotonic() > deadline:
            raise UserError(_not_found(run_id, candidates, found, pinned))
        time.sleep(0.5)


def _choose(run_id: str, copies: list, bootstrap: set[str], pinned: str | None) -> FoundRun | None:
    valid = [copy for copy in copies if copy.manifest is not None]
    from_bootstrap = [copy for copy in valid if copy.publisher in bootstrap]
    if pinned is not None:
        creator = pinned
    elif from_bootstrap:
        creator = from_bootstrap[0].creator
    else:
        creators = {copy.creator for copy in valid}
        if len(creators) != 1:
            return None  # none yet, or several keys sign this run and nothing says which is its creator
        creator = creators.pop()
    trusted = [copy for copy in valid if copy.creator == creator]
    if not trusted:
        return None
    # the creator's own copy, else the bootstrap peer's, else any: all carry the creator's signature
    creator_id = str(identity.peer_id_of_public_key(RSAPublicKey.from_bytes(creator.encode())))
    best = min(trusted, key=lambda copy: (copy.publisher != creator_id, copy.publisher not in bootstrap))
    via = any(copy.publisher in bootstrap for copy in trusted)
    return FoundRun(run_id, best.manifest, best.signed, via, len(copies) - len(trusted))


def _report(run: FoundRun) -> FoundRun:
    if run.ignored:
        logger.warning("run %s: ignored %d cop%s of its manifest not signed by its creator", run.run_id, run.ignored,
                       "y" if run.ignored == 1 else "ies")  # fmt: skip
    return run


def _not_found(run_id: str | None, candidates: list[str], found: list[FoundRun], pinned: dict[str, str]) -> str:
    if not run_id and len(found) > 1:
        return (f"the swarm hosts several runs ({', '.join(candidates)}) and the peer you joined through is in none of "
                "them; pass --run-id with the one to join")  # fmt: skip
    if run_id and run_id in pinned:
        return (f"found no manifest of run {run_id!r} signed by the creator this peer trusted before (pinned in "
                f"{TRUST_FILE} in --state-dir); if the run was restarted by someone else on purpose, delete that "
                "file, else pass --run-id with another run")  # fmt: skip
    what = f"run {run_id!r}" if run_id else "any bertswarm run"
    return (f"found no manifest of {what} through the bootstrap peer within the startup timeout; check the --join "
            "address (copy it from a live peer's output) and --run-id, or raise --startup-timeout")  # fmt: skip


# --- the creator's key, pinned per state dir ----------------------------------------------------------------------


def read_pins(state_dir: Path) -> dict[str, str]:
    try:
        pins = json.loads((Path(state_dir) / TRUST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in pins.items()} if isinstance(pins, dict) else {}


def _pin(state_dir: Path, run_id: str, creator: str) -> None:
    """Remember the run's creator key (trust on first use): a later join of this run trusts only its signature."""
    pins = read_pins(state_dir)
    if pins.get(run_id) == creator:
        return
    pins[run_id] = creator
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(state_dir) / TRUST_FILE, json.dumps(pins, indent=1, sort_keys=True))
