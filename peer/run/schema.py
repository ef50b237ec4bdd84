"""The wire schema: every DHT record bertswarm writes, declared once (the coordinator imports it from here).

Keys (``{run}`` is the run id):

- ``bertswarm_runs``: subkey = run id, value = manifest fingerprint. Lets a joiner find the run without ``--run-id``.
- ``{run}_manifest``: subkey = a member's RSA public key (signed: only its owner can write it), value =
  ``SignedManifest``: the run manifest as canonical JSON (see ``manifest.py``; a fine-tuning run's is
  ``peer.finetune.manifest.FinetuneManifest``, ``"kind": "finetune"``), signed by the run's creator. Every member
  republishes the creator's signed manifest under its own subkey, so the run outlives its creator.
- ``{run}_metrics``: subkey = a peer's RSA public key (signed), value = ``PeerMetrics``; only its owner can write it.
- ``{run}_checkpoints``: subkey = a coordinator's RSA public key (signed), value = ``CheckpointRecord``.
- ``{run}_diloco``: subkey = a peer's id, value = ``DiLoCoProgress`` (``--mode diloco`` only).

hivemind itself owns ``{run}_progress``, ``{run}_grad_averager*`` and ``{run}_state_averager*``.
Numeric fields are strict and bounded so that a lying peer cannot push absurd values through the DHT. The DHT-side
validators built from these records live in ``peer.swarm.records`` (they need hivemind); this module does not.
"""

from __future__ import annotations

import pydantic.v1 as pydantic

RUNS_KEY = "bertswarm_runs"
MAX_MANIFEST_BYTES = 16_384
MAX_SAMPLES_PER_SECOND = 1e6
MAX_LOSS = 1e4
MAX_EPOCH = 10**9  # epochs, outer rounds and checkpoint steps a record may claim
# A peer's claimed throughput (and its weight in the coordinator's swarm figures) counts for at most this multiple of
# the swarm's median: a fast GPU among CPUs is under-counted a little, a liar cannot claim the swarm's progress alone.
OUTLIER_FACTOR = 4.0

# Why a groupmate's contribution to an average was dropped: the label values
# of bertswarm_peer_rejected_contributions_total, never anything else
# (peer.swarm.robust rejects, peer.swarm.guards counts).
# - shape: not exactly the part's shape (hivemind would broadcast a 1-element part over the whole part);
# - dtype: not a floating-point tensor;
# - weight: a claimed weight that is NaN, infinite or negative;
# - non_finite: NaN or Inf in the part;
# - not_member: a request (to join a group, an all-reduce part, a state download) from a peer outside a restricted
#   run's allowlist (peer.swarm.membership).
REJECT_REASONS = ("shape", "dtype", "weight", "non_finite", "not_member")
MAX_MEMBERS_BYTES = 65_536  # a restricted run's signed allowlist (about 1000 peer ids)


def manifest_key(run_id: str) -> str:
    return f"{run_id}_manifest"


def metrics_key(run_id: str) -> str:
    return f"{run_id}_metrics"


def members_key(run_id: str) -> str:
    return f"{run_id}_members"


def diloco_key(run_id: str) -> str:
    return f"{run_id}_diloco"


def checkpoints_key(run_id: str) -> str:
    return f"{run_id}_checkpoints"


class PeerMetrics(pydantic.BaseModel):
    """What each peer says about itself, refreshed every report interval."""

    epoch: pydantic.conint(ge=0, le=MAX_EPOCH, strict=True)
    samples_per_second: pydantic.confloat(ge=0.0, le=MAX_SAMPLES_PER_SECOND, strict=True)
    samples_total: pydantic.conint(ge=0, le=10**15, strict=True)
    loss: pydantic.confloat(ge=0.0, le=MAX_LOSS, strict=True)
    mini_steps: pydantic.conint(ge=0, le=10**9, strict=True)
    time: pydantic.StrictFloat
    client_mode: pydantic.StrictBool


class SignedManifest(pydantic.BaseModel):
    """The run manifest with its creator's signature (``peer.swarm.records.sign_manifest``): ``signature`` is the
    creator's RSA-PSS signature (base64) of ``manifest``'s bytes; ``creator`` its public key (OpenSSH format), the key
    behind the creator's peer id."""

    manifest: pydantic.constr(strict=True, max_length=MAX_MANIFEST_BYTES)
    creator: pydantic.constr(strict=True, max_length=1024)
    signature: pydantic.constr(strict=True, max_length=1024)


class SignedMembers(pydantic.BaseModel):
    """A restricted run's allowlist (``peer.swarm.membership.Members`` as canonical JSON) with the signature of the
    run's creator, the same key that signs the manifest."""

    members: pydantic.constr(strict=True, max_length=MAX_MEMBERS_BYTES)
    creator: pydantic.constr(strict=True, max_length=1024)
    signature: pydantic.constr(strict=True, max_length=1024)


class DiLoCoProgress(pydantic.BaseModel):
    """A DiLoCo peer's place in the outer rounds (``peer.swarm.diloco``), under ``{run}_diloco`` / its peer id."""

    round: pydantic.conint(ge=0, le=MAX_EPOCH, strict=True)  # the outer round it takes part in next (or now, if ready)
    ready: pydantic.StrictBool  # at the boundary, waiting for its groupmates
    step: pydantic.conint(ge=0, le=10**6, strict=True)  # inner steps done in this round
    time: pydantic.StrictFloat


class CheckpointRecord(pydantic.BaseModel):
    """The newest checkpoint a coordinator published (announced under its own signed subkey)."""

    epoch: pydantic.conint(ge=0, le=MAX_EPOCH, strict=True)
    name: pydantic.constr(strict=True, max_length=64)
    sha256: pydantic.constr(strict=True, min_length=64, max_length=64)
    url: pydantic.constr(strict=True, max_length=512)
    time: pydantic.StrictFloat
