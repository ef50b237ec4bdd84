"""Join or start a run: adopt the swarm's manifest when joining (refusing explicit flags that contradict it), or
build and publish a new one. The one place where manifest fields are mapped back to the flags that set them."""

from __future__ import annotations

import time

import hivemind

from peer.config import PeerConfig
from peer.errors import UserError
from peer.run.manifest import DEFAULT_RUN_ID, RunManifest, from_config
from peer.swarm import records

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
}


def conflicts(run: RunManifest, mine: RunManifest, explicit: set[str]) -> list[str]:
    """Fields where the run differs from what the user *explicitly* asked for (defaults are simply adopted)."""
    ours, theirs = mine.model_dump(), run.model_dump()
    return [
        f"{field} (from --{flag.replace('_', '-')}): run has {theirs.get(field)!r}, you asked for {ours.get(field)!r}"
        for field, flag in FLAG_OF_FIELD.items()
        if flag in explicit and ours.get(field) != theirs.get(field)
    ]


def resolve(
    dht: hivemind.DHT,
    cfg: PeerConfig,
    explicit: set[str],
    tokenizer_fingerprint: str,
    vocab_size: int,
    data_fingerprint: str | None = None,
) -> RunManifest:
    """Adopt the swarm's manifest when joining (checking explicit flags, the tokenizer and the prepared dataset), or
    build and publish a new one. ``data_fingerprint``: this peer's prepared dataset's, None when it trains on text."""
    if not cfg.join:
        manifest = from_config(cfg, cfg.run_id or DEFAULT_RUN_ID, tokenizer_fingerprint, vocab_size, data_fingerprint)
        records.publish_manifest(dht, manifest)
        return manifest

    run_id, run = wait_for_run(dht, cfg.run_id, cfg.startup_timeout)
    mine = from_config(cfg, run_id, tokenizer_fingerprint, vocab_size, data_fingerprint)
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
    records.publish_manifest(dht, run)
    return run


def data_conflict(run_data: str | None, mine: str | None) -> str:
    """One line for a peer whose training data contradicts the run's pinned prepared dataset."""

    def name(fingerprint: str | None) -> str:
        return f"prepared dataset {fingerprint[:12]}" if fingerprint else "its peers' own text (no prepared dataset)"

    return (f"--data: the run trains on {name(run_data)}, you passed {name(mine)}; pass --data with the run's prepared "
            "dataset directory (every peer needs the same bertswarm-prepare output), or a new --run-id to start a "
            "separate run")  # fmt: skip


def wait_for_run(dht: hivemind.DHT, run_id: str | None, timeout: float) -> tuple[str, RunManifest]:
    """The run to join (``run_id``, or the one the swarm registers) and its manifest, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        candidates = [run_id] if run_id else records.discover_runs(dht)
        if len(candidates) > 1:
            raise UserError(
                f"the swarm hosts several runs ({', '.join(candidates)}); pass --run-id with the one to join"
            )
        if candidates:
            run = records.fetch_manifest(dht, candidates[0])
            if run is not None:
                return candidates[0], run
        if time.monotonic() > deadline:
            what = f"run {run_id!r}" if run_id else "any bertswarm run"
            raise UserError(
                f"found no manifest of {what} through the bootstrap peer within {timeout:.0f} s; check the --join "
                "address (copy it from a live peer's output) and --run-id, or raise --startup-timeout"
            )
        time.sleep(0.5)
