"""The manifest of a swarm fine-tuning run: what every peer of one ``bertswarm-finetune --swarm`` run must agree on,
typed, bounded and fingerprinted like the pre-training manifest (:mod:`peer.run.manifest`), and published the same
way (signed by the run's creator, :mod:`peer.swarm.records`).

What it pins, and why:

- ``labels`` (in order: label id *i* is ``labels[i]``): the peers average the weights of one classification head, so
  every peer's data must name the same classes; a joiner whose data has other labels is refused.
- ``base_sha256``: the sha256 of the base checkpoint's ``model.safetensors`` (the one its ``bertswarm.json`` already
  records and the loader verifies), ``None`` for random weights of ``preset``; a joiner that loaded other weights is
  refused (averaging two encoders that started apart averages nothing useful).
- ``tokenizer_fingerprint``, ``max_length``: the inputs every peer's model sees.
- ``init_seed``: the classification head (and, from random weights, the whole model) starts from the same seeded
  initialisation on every peer, as pre-training's ``init_seed``.
- the optimisation: ``target_batch_size`` (examples per global step, all peers together), ``lr``, ``weight_decay``,
  ``max_grad_norm``, ``epochs`` of ``steps_per_epoch`` global steps each, and ``aggregation``. An "epoch" is one pass
  over the creator's training data at the target batch (``steps_per_epoch``); every peer validates on its own
  validation split at the end of each one (the same global steps on every peer) and keeps its best weights.
- ``min_peers``: the peers wait for each other before the first global step.

The fields ``peer.swarm.optim.make_optimizer`` reads (``run_id``, ``target_batch_size``, ``optimizer``, ``lr``,
``weight_decay``, ``max_grad_norm``, ``warmup_steps``, ``total_steps``, ``aggregation``) have the pre-training
manifest's names and meaning, so fine-tuning runs on the very same optimizer construction. ``kind`` tells the two
manifests apart in the DHT: a pre-training peer cannot parse this one, nor this one a pre-training manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Literal

import pydantic
from pydantic import ConfigDict, Field

from peer.errors import UserError
from peer.run.manifest import AGGREGATIONS, DEFAULT_AGGREGATION, RUN_ID_PATTERN, ManifestError
from peer.run.presets import PRESET_NAMES

KIND = "finetune"
FINETUNE_MANIFEST_VERSION = 1
DEFAULT_RUN_ID = "bertswarm-finetune"
WARMUP_FRACTION = 0.1  # of the global steps: the single-machine loop's linear warm-up (peer.finetune.train.Settings)
MAX_GRAD_NORM = 1.0  # the single-machine loop clips each step's gradient to this norm; the swarm clips the average
MAX_LABELS = 1000

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Label = Annotated[str, Field(min_length=1, max_length=200)]

# manifest field -> the bertswarm-finetune setting (flag) that sets it: a joiner's explicit flag that contradicts the
# run is refused, a default is simply adopted (as peer.join.FLAG_OF_FIELD does for pre-training)
FLAG_OF_FIELD = {
    "task": "task",
    "max_length": "max_length",
    "target_batch_size": "target_batch_size",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "epochs": "epochs",
    "aggregation": "aggregation",
    "min_peers": "min_peers",
}


class FinetuneManifest(pydantic.BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    kind: Literal[KIND]  # type: ignore[valid-type]
    run_id: Annotated[str, Field(pattern=RUN_ID_PATTERN)]
    task: Annotated[str, Field(min_length=1, max_length=64)]
    labels: Annotated[tuple[Label, ...], Field(min_length=2, max_length=MAX_LABELS)]
    base_sha256: Sha256 | None
    """sha256 of the base checkpoint's weights; None: random weights of ``preset``"""
    preset: Literal[PRESET_NAMES]  # type: ignore[valid-type]
    tokenizer_fingerprint: Sha256
    max_length: Annotated[int, Field(ge=8, le=512)]
    init_seed: Annotated[int, Field(ge=0, le=2**32 - 1)]
    target_batch_size: Annotated[int, Field(ge=1, le=10**6)]
    optimizer: Literal["adamw"] = "adamw"
    lr: Annotated[float, Field(gt=0.0, lt=1.0)]
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)]
    max_grad_norm: Annotated[float, Field(ge=0.0, le=1e6)] = MAX_GRAD_NORM
    epochs: Annotated[int, Field(ge=1, le=10_000)]
    steps_per_epoch: Annotated[int, Field(ge=1, le=10**7)]
    aggregation: Literal[AGGREGATIONS] = DEFAULT_AGGREGATION  # type: ignore[valid-type]
    min_peers: Annotated[int, Field(ge=1, le=1000)] = 1
    """training starts once this many peers have joined (a short run would otherwise be over, with its creator
    alone, before the first volunteer arrives)"""
    version: Literal[FINETUNE_MANIFEST_VERSION] = FINETUNE_MANIFEST_VERSION  # type: ignore[valid-type]

    @pydantic.field_validator("labels")
    @classmethod
    def _distinct(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        return labels

    @pydantic.model_validator(mode="after")
    def _room_for_peers(self) -> FinetuneManifest:
        if self.min_peers > 1 and self.target_batch_size < 2:
            raise ValueError("target_batch_size must be at least 2 when min_peers > 1")
        return self

    @property
    def total_steps(self) -> int:
        """Global steps until the learning rate has decayed to zero, and the run ends."""
        return self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return int(WARMUP_FRACTION * self.total_steps)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): what the creator signs and the fingerprint hashes."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str | bytes) -> FinetuneManifest:
        """Parse a manifest read from the DHT; anything else (a pre-training manifest, another version, a bad field)
        is a :class:`~peer.run.manifest.ManifestError` naming the problem."""
        try:
            data = json.loads(text)
        except (ValueError, TypeError) as e:
            raise ManifestError(f"fine-tuning manifest is unreadable ({e})") from None
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise ManifestError("not a fine-tuning run (a pre-training run?); join it with bertswarm-peer --join")
        if data.get("version") != FINETUNE_MANIFEST_VERSION:
            raise ManifestError(
                f"fine-tuning manifest version {data.get('version')!r}, this peer speaks {FINETUNE_MANIFEST_VERSION}; "
                "upgrade bertswarm to the version the swarm runs"
            )
        if isinstance(data.get("labels"), list):  # JSON has no tuples
            data["labels"] = tuple(data["labels"])
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "manifest"
            raise ManifestError(f"fine-tuning manifest is invalid ({where}: {first['msg']}); upgrade bertswarm to the "
                                "version the swarm runs") from None  # fmt: skip


def steps_per_epoch(train_examples: int, target_batch_size: int) -> int:
    """Global steps of one pass over ``train_examples`` at the target batch (the last, partial batch counts)."""
    return max(1, math.ceil(train_examples / target_batch_size))


def base_name(base_sha256: str | None, preset: str) -> str:
    return f"the checkpoint with weights sha256 {base_sha256[:12]}" if base_sha256 else f"random {preset} weights"


def check_joiner(
    run: FinetuneManifest,
    *,
    labels: list[str],
    base_sha256: str | None,
    preset: str,
    tokenizer_fingerprint: str,
    explicit: dict[str, object],
) -> None:
    """Refuse, in one line (a :class:`~peer.errors.UserError`, exit code 2), a joiner that cannot fine-tune this run
    with the others: another base checkpoint, other labels, another tokenizer, or an explicit flag (``explicit``:
    setting name -> value the user passed) that contradicts the run."""
    if base_sha256 != run.base_sha256 or (base_sha256 is None and preset != run.preset):
        raise UserError(
            f"--init-from: run {run.run_id} fine-tunes {base_name(run.base_sha256, run.preset)}, you passed "
            f"{base_name(base_sha256, preset)}; pass --init-from with the run's base checkpoint, or start a run of "
            "your own with --swarm"
        )
    if list(run.labels) != list(labels):
        raise UserError(
            f"--data: run {run.run_id} classifies into {_labels(run.labels)}, your data has {_labels(labels)}; every "
            "peer's data must name the same classes (pass --data with the run's labels, or start a run of your own "
            "with --swarm)"
        )
    if tokenizer_fingerprint != run.tokenizer_fingerprint:
        raise UserError(
            f"--tokenizer: run {run.run_id} uses the tokenizer with sha256 {run.tokenizer_fingerprint[:12]}, yours is "
            f"{tokenizer_fingerprint[:12]}; pass --tokenizer with the run's vocab file"
        )
    theirs = run.model_dump()
    clashes = [
        f"{field} (from --{flag.replace('_', '-')}): run has {theirs[field]!r}, you asked for {explicit[flag]!r}"
        for field, flag in FLAG_OF_FIELD.items()
        if flag in explicit and explicit[flag] != theirs[field]
    ]
    if clashes:
        raise UserError("your flags conflict with the fine-tuning run's manifest: " + "; ".join(clashes) + ". Drop "
                        "these flags to adopt the run's settings, or start a run of your own with --swarm")  # fmt: skip


def _labels(labels) -> str:
    shown = ", ".join(map(repr, list(labels)[:8]))
    return f"{len(labels)} labels ({shown}{', ...' if len(labels) > 8 else ''})"
