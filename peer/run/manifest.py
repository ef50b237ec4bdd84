"""The run manifest: everything the peers of one run must agree on, typed, bounded and fingerprinted.

The first peer builds it from its settings and publishes it (``peer.swarm.records``); a joiner adopts the manifest it
finds (``peer.join``). The fingerprint (sha256 of the canonical JSON) is what checkpoints and local state are stamped
with. Parsing is strict: a manifest with a missing, unknown, mistyped or out-of-range field is refused with a
``ManifestError`` naming the field, whether it comes from the DHT or from a checkpoint's ``bertswarm.json``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal, Protocol

import pydantic
from pydantic import ConfigDict, Field

from peer.errors import UserError
from peer.run.presets import PRESET_NAMES, PRESETS

MANIFEST_VERSION = 1
DEFAULT_RUN_ID = "bertswarm"
INIT_SEED = 0  # every peer of a run starts from the same random weights
RUN_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MODES = ("sync", "diloco")
OUTER_COMPRESSIONS = ("none", "fp16", "int8")
# DiLoCo defaults (Douillard et al. 2023; OpenDiLoCo): outer Nesterov SGD lr 0.7, momentum 0.9; see docs/performance.md
# for how the default number of inner steps was chosen on this project's presets
DEFAULT_INNER_STEPS = 64
DEFAULT_OUTER_LR = 0.7
DEFAULT_OUTER_MOMENTUM = 0.9
# 8-bit pseudo-gradients: no measurable quality cost against none (1.000x held-out loss) and +31 % samples/s at
# 20 Mbit/s (docs/performance.md); peers re-agree exactly every 10 outer steps, so the peers cannot drift apart
DEFAULT_OUTER_COMPRESSION = "int8"
# how a peer combines its groupmates' contributions to the part of an average it reduces (peer.swarm.robust holds the
# rules; this tuple is the one list of names). clipped-mean: each part clipped to 3x the median norm, then the mean
AGGREGATIONS = ("mean", "clipped-mean", "centered-clip", "trimmed-mean", "median")
DEFAULT_AGGREGATION = "clipped-mean"

PresetName = Literal[PRESET_NAMES]  # type: ignore[valid-type]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Steps = Annotated[int, Field(ge=0, le=10**9)]


class ManifestError(UserError):
    """A manifest that cannot be used: unreadable, another version, or a field of the wrong type or range."""


class _Strict(pydantic.BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


class ModelSection(_Strict):
    """``transformers.BertConfig`` keyword arguments: the architecture every peer of the run builds."""

    vocab_size: Annotated[int, Field(ge=8, le=1_000_000)]
    hidden_size: Annotated[int, Field(ge=8, le=16_384)]
    num_hidden_layers: Annotated[int, Field(ge=1, le=128)]
    num_attention_heads: Annotated[int, Field(ge=1, le=256)]
    intermediate_size: Annotated[int, Field(ge=8, le=65_536)]
    max_position_embeddings: Annotated[int, Field(ge=8, le=8192)]
    type_vocab_size: Annotated[int, Field(ge=1, le=16)]
    hidden_dropout_prob: Probability
    attention_probs_dropout_prob: Probability


class RunManifest(_Strict):
    run_id: Annotated[str, Field(pattern=RUN_ID_PATTERN)]
    preset: PresetName
    model: ModelSection
    tokenizer_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    seq_len: Annotated[int, Field(ge=8, le=512)]
    mlm_probability: Annotated[float, Field(gt=0.0, lt=1.0)]
    nsp: bool
    target_batch_size: Annotated[int, Field(ge=1, le=10**8)]
    optimizer: Literal["adamw", "lamb"]
    lr: Annotated[float, Field(gt=0.0, lt=1.0)]
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)]
    max_grad_norm: Annotated[float, Field(ge=0.0, le=1e6)]
    warmup_steps: Steps
    total_steps: Annotated[int, Field(ge=1, le=10**9)]
    # training mode: "sync" averages gradients every global step; "diloco" takes inner_steps local optimizer steps,
    # then averages the pseudo-gradient (outer - local parameters) and applies an outer Nesterov SGD step
    mode: Literal[MODES] = "sync"  # type: ignore[valid-type]
    inner_steps: Annotated[int, Field(ge=1, le=100_000)] = DEFAULT_INNER_STEPS
    outer_lr: Annotated[float, Field(gt=0.0, le=10.0)] = DEFAULT_OUTER_LR
    outer_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = DEFAULT_OUTER_MOMENTUM
    outer_compression: Literal[OUTER_COMPRESSIONS] = DEFAULT_OUTER_COMPRESSION  # type: ignore[valid-type]
    outer_overlap: bool = False
    aggregation: Literal[AGGREGATIONS] = DEFAULT_AGGREGATION  # type: ignore[valid-type]
    init_seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = INIT_SEED
    # fingerprint of the prepared dataset (``bertswarm-prepare``) every peer must train on; None: each peer trains on
    # its own text. Left out of the canonical JSON when None, so runs without one keep their fingerprints.
    data_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    # only the peers on the creator's signed allowlist (``peer.swarm.membership``) may take part; the list itself is a
    # companion record the creator can update. Left out of the canonical JSON when False, like data_fingerprint.
    restricted: bool = False
    version: Literal[MANIFEST_VERSION] = MANIFEST_VERSION  # type: ignore[valid-type]

    @pydantic.model_validator(mode="after")
    def _warmup_before_end(self) -> RunManifest:
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be below total_steps {self.total_steps}")
        return self

    @pydantic.model_serializer(mode="wrap")
    def _without_absent_data(self, handler) -> dict:
        """Every dump (the canonical JSON, checkpoint metadata) leaves out an absent ``data_fingerprint`` and an open
        run's ``restricted``: the fingerprints of runs that predate these fields stay what they were."""
        data = handler(self)
        if data.get("data_fingerprint", "") is None:
            del data["data_fingerprint"]
        if data.get("restricted", True) is False:
            del data["restricted"]
        return data

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace; the fingerprint is computed over exactly these bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: object) -> RunManifest:
        """Validate a decoded manifest; any problem is a ``ManifestError`` naming the first bad field."""
        if isinstance(data, dict) and data.get("version") != MANIFEST_VERSION:
            raise ManifestError(
                f"run manifest version {data.get('version')!r}, this peer speaks {MANIFEST_VERSION}; upgrade bertswarm "
                "to the version the swarm runs"
            )
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as e:
            raise ManifestError(f"run manifest is invalid ({_first_error(e)}); upgrade bertswarm to the version the "
                                "swarm runs") from None  # fmt: skip

    @classmethod
    def from_json(cls, text: str | bytes) -> RunManifest:
        try:
            data = json.loads(text)
        except (ValueError, TypeError) as e:
            raise ManifestError(
                f"run manifest is unreadable ({e}); upgrade bertswarm to the version the swarm runs"
            ) from None
        return cls.from_dict(data)

    def diff(self, other: RunManifest) -> list[str]:
        """Human-readable ``field: ours -> theirs`` lines for every differing field."""
        mine, theirs = self.model_dump(), other.model_dump()
        keys = sorted(mine | theirs)  # an absent data_fingerprint is left out of a dump: it reads as None
        return [f"{k}: {mine.get(k)!r} -> {theirs.get(k)!r}" for k in keys if mine.get(k) != theirs.get(k)]


def _first_error(error: pydantic.ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "manifest"
    return f"{where}: {first['msg']}"


class RunSettings(Protocol):
    """What a manifest is built from (``peer.config.PeerConfig`` has these fields)."""

    preset: str
    seq_len: int
    mlm_probability: float
    nsp: bool
    target_batch_size: int | None
    optimizer: str
    lr: float | None
    weight_decay: float
    max_grad_norm: float
    warmup_steps: int
    total_steps: int
    mode: str
    inner_steps: int
    outer_lr: float
    outer_momentum: float
    outer_compression: str
    outer_overlap: bool
    aggregation: str
    allow: str | None


def from_config(
    cfg: RunSettings, run_id: str, tokenizer_fingerprint: str, vocab_size: int, data_fingerprint: str | None = None
) -> RunManifest:
    """The manifest a peer *would* publish, from its own settings and preset defaults (``data_fingerprint``: its
    prepared dataset's, if it trains on one)."""
    try:
        return _from_config(cfg, run_id, tokenizer_fingerprint, vocab_size, data_fingerprint)
    except pydantic.ValidationError as e:  # a setting the config accepted but the manifest bounds (e.g. --inner-steps)
        first = e.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "manifest"
        flag = "--" + field.replace("_", "-") if field in RunManifest.model_fields and field != "model" else field
        raise ManifestError(f"{flag}: {first['msg']}; pick a value in the allowed range") from None


def _from_config(
    cfg: RunSettings, run_id: str, tokenizer_fingerprint: str, vocab_size: int, data_fingerprint: str | None
) -> RunManifest:
    preset = PRESETS[cfg.preset]
    model = ModelSection(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        intermediate_size=preset.intermediate_size,
        max_position_embeddings=max(512, cfg.seq_len),
        type_vocab_size=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return RunManifest(
        run_id=run_id,
        preset=cfg.preset,
        model=model,
        tokenizer_fingerprint=tokenizer_fingerprint,
        seq_len=cfg.seq_len,
        mlm_probability=cfg.mlm_probability,
        nsp=cfg.nsp,
        target_batch_size=cfg.target_batch_size or preset.target_batch_size,
        optimizer=cfg.optimizer,
        lr=cfg.lr if cfg.lr is not None else preset.lr,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        warmup_steps=cfg.warmup_steps,
        total_steps=cfg.total_steps,
        mode=cfg.mode,
        inner_steps=cfg.inner_steps,
        outer_lr=cfg.outer_lr,
        outer_momentum=cfg.outer_momentum,
        outer_compression=cfg.outer_compression,
        outer_overlap=cfg.outer_overlap,
        aggregation=cfg.aggregation,
        data_fingerprint=data_fingerprint,
        restricted=cfg.allow is not None,
    )
