"""``bertswarm.json``, the metadata of a checkpoint: the one parser, typed and bounded.

It records which run the weights belong to (run id, the run manifest and its fingerprint), where in the run they are
(epoch, samples seen), how good they were (held-out eval metrics) and how to check them (sha256 and size of
``model.safetensors``). Writing, listing and loading (local or over HTTP) all go through :class:`CheckpointMetadata`;
a file with a missing, unknown, mistyped or out-of-range field, or whose manifest does not match its fingerprint, is
refused with a :class:`~peer.store.errors.CheckpointError` naming the checkpoint and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Annotated, Literal

import pydantic
from pydantic import ConfigDict, Field

from peer.run.manifest import RUN_ID_PATTERN, ManifestError, RunManifest
from peer.store.errors import CheckpointError

FORMAT_VERSION = 1
METADATA_FILE = "bertswarm.json"

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0)]


class CheckpointMetadata(pydantic.BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    format_version: Literal[FORMAT_VERSION]  # type: ignore[valid-type]
    run_id: Annotated[str, Field(pattern=RUN_ID_PATTERN)]
    fingerprint: Sha256
    """sha256 of the run manifest (``RunManifest.fingerprint``)"""
    manifest: RunManifest
    epoch: Count
    """the swarm's global step these weights are the result of"""
    samples_seen: Count
    eval_metrics: dict[str, float | None]
    """e.g. ``{"mlm_loss": 2.31, "mlm_accuracy": 0.41}``; a non-finite value is stored as ``None`` (JSON has no NaN)"""
    sha256: Sha256
    """of ``model.safetensors``"""
    model_bytes: Count
    """size of ``model.safetensors``"""
    created_at: str
    """ISO-8601 UTC, seconds, e.g. ``2024-05-01T12:00:00Z``"""

    @pydantic.field_validator("manifest", mode="before")
    @classmethod
    def _manifest(cls, value: object) -> RunManifest:
        return value if isinstance(value, RunManifest) else RunManifest.from_dict(value)  # raises ManifestError

    @pydantic.field_validator("created_at")
    @classmethod
    def _timestamp(cls, value: str) -> str:
        datetime.fromisoformat(value)  # ValueError if it is not a timestamp
        return value

    @pydantic.model_validator(mode="after")
    def _stamped_with_its_manifest(self) -> CheckpointMetadata:
        if self.fingerprint != self.manifest.fingerprint:
            raise ValueError(f"fingerprint {self.fingerprint[:12]} is not that of its manifest")
        if self.run_id != self.manifest.run_id:
            raise ValueError(f"run_id {self.run_id!r} is not that of its manifest ({self.manifest.run_id!r})")
        return self

    @classmethod
    def create(
        cls,
        run: Mapping,
        *,
        epoch: int,
        samples_seen: int,
        eval_metrics: Mapping[str, float],
        sha256: str,
        model_bytes: int,
    ) -> CheckpointMetadata:
        """For a new checkpoint, stamped now. ``run``: ``run_id``, ``fingerprint`` and ``manifest`` as made by
        :func:`run_stamp` or read from another checkpoint. Out-of-range values raise ``pydantic.ValidationError``
        (a ``ValueError``): a bug of the caller, not of a file."""
        return cls(
            format_version=FORMAT_VERSION,
            run_id=run["run_id"],
            fingerprint=run["fingerprint"],
            manifest=run["manifest"],
            epoch=epoch,
            samples_seen=samples_seen,
            eval_metrics={str(k): _finite_or_none(v) for k, v in eval_metrics.items()},
            sha256=sha256,
            model_bytes=model_bytes,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        )

    @classmethod
    def parse(cls, data: bytes | str, where: object) -> CheckpointMetadata:
        """The content of a ``bertswarm.json``; ``where`` (the checkpoint's path or URL) leads the error message."""
        try:
            return cls.model_validate(json.loads(data))
        except ManifestError as e:
            raise CheckpointError(where, f"{METADATA_FILE}: {e}") from None
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            message = first["msg"].removeprefix("Value error, ")
            detail = ": ".join(filter(None, (".".join(str(part) for part in first["loc"]), message)))
        except (ValueError, TypeError) as e:  # not JSON, not UTF-8
            detail = f"{type(e).__name__}: {e}"
        raise CheckpointError(
            where,
            f"{METADATA_FILE} is unreadable ({detail}); the checkpoint is corrupt, pass another one "
            "(e.g. an older epoch-* directory)",
        )

    def to_dict(self) -> dict:
        """JSON-ready, as stored (the manifest as a plain dict)."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def run_stamp(manifest: RunManifest) -> dict:
    """What identifies the run in ``bertswarm.json``: run id, manifest fingerprint and the manifest itself."""
    return {"run_id": manifest.run_id, "fingerprint": manifest.fingerprint, "manifest": manifest.to_dict()}


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN
