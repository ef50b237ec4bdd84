"""bertswarm's records in the DHT: the validators that guard them, the run manifest's publish / fetch / discovery, and
each peer's signed metrics record (written by ``MetricsPublisher``, read by the coordinator).

The record types themselves are declared once in ``peer.run.schema``; this module is where they meet hivemind.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import hivemind
import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peer.errors import UserError
from peer.run import schema
from peer.run.manifest import RunManifest
from peer.run.schema import CheckpointRecord, DiLoCoProgress, PeerMetrics, SignedManifest, SignedMembers
from peer.swarm import identity

logger = logging.getLogger(__name__)

MANIFEST_TTL = 600.0  # seconds a published manifest stays in the DHT without refresh
METRICS_TTL = 60.0  # seconds a peer's DHT metrics record lives without refresh


class RunRecords(pydantic.BaseModel):
    """Schema of the per-run keys; ``SchemaValidator(prefix=run_id)`` maps field ``x`` to key ``{run}_x``."""

    manifest: dict[BytesWithPublicKey, SignedManifest]
    members: dict[BytesWithPublicKey, SignedMembers]
    metrics: dict[BytesWithPublicKey, PeerMetrics]
    checkpoints: dict[BytesWithPublicKey, CheckpointRecord]
    diloco: dict[BytesWithPublicKey, DiLoCoProgress]


class RunsRegistry(pydantic.BaseModel):
    bertswarm_runs: dict[pydantic.constr(strict=True, max_length=64), pydantic.constr(strict=True, max_length=64)]


def registry_validators() -> list:
    return [SchemaValidator(RunsRegistry, allow_extra_keys=True)]


def run_validators(run_id: str, private_key: RSAPrivateKey | None = None) -> tuple[list, bytes]:
    """Validators for one run's keys, and the signed subkey under which this process writes its metrics."""
    signature = RSASignatureValidator(private_key)
    return [SchemaValidator(RunRecords, allow_extra_keys=True, prefix=run_id), signature], signature.local_public_key


# --- the run manifest -----------------------------------------------------------------------------------------------


class Manifest(Protocol):
    """What is signed and published under ``{run}_manifest``: a pre-training ``RunManifest``, or a fine-tuning run's
    ``peer.finetune.manifest.FinetuneManifest``. The reader says which it expects (``parse``); the other kind does not
    parse, and its copies are ignored like damaged ones."""

    @property
    def run_id(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    def to_json(self) -> str: ...


def sign_manifest(manifest: Manifest, key: RSAPrivateKey) -> SignedManifest:
    """The run's creator signs its manifest (its canonical JSON) with its identity key (``peer.swarm.identity``)."""
    text = manifest.to_json()
    signature = key.sign(text.encode()).decode()
    return SignedManifest(manifest=text, creator=identity.public_key_text(key), signature=signature)


def install_run_validators(dht: hivemind.DHT, run_id: str) -> bytes:
    """Add the run's validators to the DHT (signing with this process's key: the peer's identity key once
    ``identity.use_for_this_process`` ran); returns the subkey only this peer can write."""
    validators, subkey = run_validators(run_id)
    dht.add_validators(validators)
    return subkey


def publish_manifest(
    dht: hivemind.DHT,
    signed: SignedManifest,
    subkey: bytes,
    parse: Callable[[str], Manifest] = RunManifest.from_json,
) -> None:
    """(Re-)publish the creator-signed manifest under this peer's own ``subkey`` and register the run; every member
    does this periodically (the run's validators must be installed: ``install_run_validators``). ``parse``: the
    manifest's kind (``FinetuneManifest.from_json`` for a fine-tuning run)."""
    manifest = parse(signed.manifest)
    expiration = get_dht_time() + MANIFEST_TTL
    dht.store(schema.manifest_key(manifest.run_id), signed.dict(), expiration_time=expiration, subkey=subkey)
    dht.store(schema.RUNS_KEY, manifest.fingerprint, expiration_time=expiration, subkey=manifest.run_id)


@dataclass(frozen=True)
class ManifestRecord:
    """One member's copy of the run's manifest: who published it (the peer id behind its subkey), the creator's key
    and the manifest, if the creator's signature verifies and the manifest parses (else ``manifest`` is None)."""

    publisher: str | None
    creator: str | None
    manifest: Manifest | None
    signed: SignedManifest | None = None


def fetch_manifests(
    dht: hivemind.DHT, run_id: str, parse: Callable[[str], Manifest] = RunManifest.from_json
) -> list[ManifestRecord]:
    """Every member's copy of ``run_id``'s signed manifest (the validators already dropped records whose DHT
    signature or schema was wrong; the creator's signature is checked here). ``parse``: the kind of manifest the
    caller takes part in; a copy of the other kind reads as one without a manifest."""
    found = dht.get(schema.manifest_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    copies = []
    for subkey, item in found.value.items():
        publisher = identity.peer_id_of_owner(subkey)
        try:
            signed = SignedManifest.parse_obj(item.value)
        except (pydantic.ValidationError, AttributeError):
            copies.append(ManifestRecord(str(publisher) if publisher else None, None, None))
            continue
        manifest = None
        if identity.verify(signed.creator, signed.manifest.encode(), signed.signature):
            try:
                manifest = parse(signed.manifest)
            except UserError:
                manifest = None
        if manifest is not None and manifest.run_id != run_id:
            manifest = None  # another run's manifest replayed under this run's key
        copies.append(ManifestRecord(str(publisher) if publisher else None, signed.creator, manifest, signed))
    return copies


def publish_members(dht: hivemind.DHT, signed: SignedMembers, run_id: str, subkey: bytes) -> None:
    """(Re-)publish a restricted run's creator-signed allowlist under this peer's own ``subkey`` (as the manifest)."""
    expiration = get_dht_time() + MANIFEST_TTL
    dht.store(schema.members_key(run_id), signed.dict(), expiration_time=expiration, subkey=subkey)


def fetch_members(dht: hivemind.DHT, run_id: str) -> list[SignedMembers]:
    """Every member's copy of a restricted run's signed allowlist, unverified (``membership.verify_members``)."""
    found = dht.get(schema.members_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    copies = []
    for item in found.value.values():
        try:
            copies.append(SignedMembers.parse_obj(item.value))
        except (pydantic.ValidationError, AttributeError):
            continue
    return copies


def discover_runs(dht: hivemind.DHT) -> list[str]:
    """Run ids registered in the swarm (normally exactly one)."""
    found = dht.get(schema.RUNS_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    return sorted(str(k) for k in found.value)


# --- peers' metrics ---------------------------------------------------------------------------------------------------


class MetricsPublisher:
    """Writes this peer's signed ``PeerMetrics`` record under ``{run}_metrics`` (fire-and-forget)."""

    def __init__(self, dht: hivemind.DHT, run_id: str, subkey: bytes, client_mode: bool):
        self.dht, self.key, self.subkey, self.client_mode = dht, schema.metrics_key(run_id), subkey, client_mode
        # hivemind frees a request's shared memory when its future is garbage-collected, so the future of a
        # fire-and-forget store must live until the DHT process has picked the request up
        self._pending = None

    def publish(self, *, epoch: int, samples_per_second: float, samples_total: int, loss: float, mini_steps: int):
        if self._pending is not None and not self._pending.done():
            return  # the previous record is still on its way: skip rather than queue up
        loss = float(loss) if math.isfinite(loss) else schema.MAX_LOSS
        record = PeerMetrics(
            epoch=int(epoch),
            samples_per_second=float(min(max(samples_per_second, 0.0), schema.MAX_SAMPLES_PER_SECOND)),
            samples_total=int(samples_total),
            loss=min(max(loss, 0.0), schema.MAX_LOSS),
            mini_steps=int(mini_steps),
            time=float(time.time()),
            client_mode=bool(self.client_mode),
        )
        self.store(record.dict())

    def store(self, record: dict) -> None:
        self._pending = self.dht.store(
            self.key, record, expiration_time=get_dht_time() + METRICS_TTL, subkey=self.subkey, return_future=True
        )

    def close(self, timeout: float = 3.0) -> None:
        if self._pending is not None:
            try:
                self._pending.result(timeout)
            except Exception as e:  # the swarm may already be gone; nothing to save here
                logger.debug("last metrics record not stored: %r", e)


def read_swarm_metrics(dht: hivemind.DHT, run_id: str) -> dict[bytes, PeerMetrics]:
    """All live peers' metrics records (invalid ones are dropped by the DHT's validators and again here)."""
    found = dht.get(schema.metrics_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    records = {}
    for subkey, entry in found.value.items():
        try:
            records[subkey] = PeerMetrics.parse_obj(entry.value)
        except Exception as e:  # a malformed record from a buggy or hostile peer is ignored, not fatal
            logger.debug("ignoring malformed metrics record: %s", e)
    return records
