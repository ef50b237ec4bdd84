"""The run manifest: everything the peers of one run must agree on, fingerprinted and shared through the DHT.

The first peer builds it from its flags and publishes it; a joiner needs only ``--join``: it adopts the manifest it
finds. A joiner whose *explicitly passed* flags disagree with the run's manifest refuses to start and prints the
differing fields. The fingerprint (sha256 of the canonical JSON) is what checkpoints and local state are stamped with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass

import hivemind
from hivemind.utils import get_dht_time

from peer.config import PeerConfig
from peer.errors import UserError
from peer.run import schema
from peer.run.model import PRESETS

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
DEFAULT_RUN_ID = "bertswarm"
INIT_SEED = 0  # every peer of a run starts from the same random weights
RECORD_TTL = 600.0  # seconds a published manifest stays in the DHT without refresh

# manifest field -> the flag (PeerConfig field) that sets it; used to detect conflicts with explicit flags
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
}


@dataclass(frozen=True)
class RunManifest:
    run_id: str
    preset: str
    model: dict  # transformers.BertConfig keyword arguments
    tokenizer_fingerprint: str
    seq_len: int
    mlm_probability: float
    nsp: bool
    target_batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    max_grad_norm: float
    warmup_steps: int
    total_steps: int
    init_seed: int = INIT_SEED
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace; the fingerprint is computed over exactly these bytes."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> RunManifest:
        try:
            data = json.loads(text)
            if data.get("version") != MANIFEST_VERSION:
                raise ValueError(f"manifest version {data.get('version')!r}, this peer speaks {MANIFEST_VERSION}")
            names = {f.name for f in dataclasses.fields(cls)}
            if set(data) != names:
                raise ValueError(f"fields {sorted(set(data) ^ names)} missing or unknown")
            return cls(**data)
        except (ValueError, TypeError, AttributeError) as e:
            raise UserError(
                f"the swarm's run manifest is unreadable ({e}); upgrade bertswarm to the version the swarm runs"
            ) from None

    def diff(self, other: RunManifest) -> list[str]:
        """Human-readable ``field: ours -> theirs`` lines for every differing field."""
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        return [f"{k}: {mine[k]!r} -> {theirs[k]!r}" for k in sorted(mine) if mine[k] != theirs[k]]


def from_config(cfg: PeerConfig, run_id: str, tokenizer_fingerprint: str, vocab_size: int) -> RunManifest:
    """The manifest a peer *would* publish, from its own flags and preset defaults."""
    preset = PRESETS[cfg.preset]
    model = dict(
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
    )


def conflicts(run: RunManifest, mine: RunManifest, explicit: set[str]) -> list[str]:
    """Fields where the run differs from what the user *explicitly* asked for (defaults are simply adopted)."""
    ours, theirs = dataclasses.asdict(mine), dataclasses.asdict(run)
    return [
        f"{field} (from --{flag.replace('_', '-')}): run has {theirs[field]!r}, you asked for {ours[field]!r}"
        for field, flag in FLAG_OF_FIELD.items()
        if flag in explicit and ours[field] != theirs[field]
    ]


def publish(dht: hivemind.DHT, manifest: RunManifest) -> None:
    """(Re-)publish the manifest and register the run; every peer of the run does this periodically."""
    expiration = get_dht_time() + RECORD_TTL
    dht.store(schema.manifest_key(manifest.run_id), manifest.to_json(), expiration_time=expiration)
    dht.store(schema.RUNS_KEY, manifest.fingerprint, expiration_time=expiration, subkey=manifest.run_id)


def fetch(dht: hivemind.DHT, run_id: str) -> RunManifest | None:
    found = dht.get(schema.manifest_key(run_id), latest=True)
    if found is None or not isinstance(found.value, str):
        return None
    return RunManifest.from_json(found.value)


def discover_run_id(dht: hivemind.DHT) -> list[str]:
    """Run ids registered in the swarm (normally exactly one)."""
    found = dht.get(schema.RUNS_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    return sorted(str(k) for k in found.value)


def resolve(
    dht: hivemind.DHT, cfg: PeerConfig, explicit: set[str], tokenizer_fingerprint: str, vocab_size: int
) -> RunManifest:
    """Adopt the swarm's manifest when joining (checking explicit flags), or build and publish a new one."""
    if not cfg.join:
        manifest = from_config(cfg, cfg.run_id or DEFAULT_RUN_ID, tokenizer_fingerprint, vocab_size)
        publish(dht, manifest)
        return manifest

    run_id, run = wait_for_run(dht, cfg.run_id, cfg.startup_timeout)
    mine = from_config(cfg, run_id, tokenizer_fingerprint, vocab_size)
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
    publish(dht, run)
    return run


def wait_for_run(dht: hivemind.DHT, run_id: str | None, timeout: float) -> tuple[str, RunManifest]:
    deadline = time.monotonic() + timeout
    while True:
        candidates = [run_id] if run_id else discover_run_id(dht)
        if len(candidates) > 1:
            raise UserError(
                f"the swarm hosts several runs ({', '.join(candidates)}); pass --run-id with the one to join"
            )
        if candidates:
            run = fetch(dht, candidates[0])
            if run is not None:
                return candidates[0], run
        if time.monotonic() > deadline:
            what = f"run {run_id!r}" if run_id else "any bertswarm run"
            raise UserError(
                f"found no manifest of {what} through the bootstrap peer within {timeout:.0f} s; check the --join "
                "address (copy it from a live peer's output) and --run-id, or raise --startup-timeout"
            )
        time.sleep(0.5)
