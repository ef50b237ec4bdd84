"""The benchmark workload, built from product code: the run manifest (``peer.manifest.from_config``), the model
(``peer.model.build_model``), batches (``peer.batches.BatchStream`` over the embedded corpus) and held-out MLM loss."""

from __future__ import annotations

import functools

import torch

from peer.config import PeerConfig
from peer.data import corpus, embedded
from peer.data.batches import BatchStream
from peer.data.tokenizer import default_tokenizer, tokenizer_fingerprint
from peer.run import manifest
from peer.run.model import build_model, pretraining_loss

HELDOUT_BATCHES = 8
HELDOUT_SEED = 12345


@functools.lru_cache(maxsize=1)
def tokenizer():
    return default_tokenizer()


@functools.lru_cache(maxsize=1)
def documents() -> tuple[list[str], list[str]]:
    return corpus.split_heldout(embedded.default_corpus())


def make_manifest(
    run_id: str, preset: str = "tiny", seq_len: int = 128, target: int | None = None, warmup: int = 50, **mode
) -> manifest.RunManifest:
    """The manifest a user's first peer would publish with these flags (``bertswarm-peer --preset ... ``); ``mode``:
    the training-mode fields of ``PeerConfig`` (``mode="diloco"``, ``inner_steps``, ``outer_compression``,
    ``outer_overlap``, ``outer_lr``, ``outer_momentum``), left at the product's defaults where not given."""
    tok = tokenizer()
    mode = {name: value for name, value in mode.items() if value is not None}
    cfg = PeerConfig(preset=preset, seq_len=seq_len, target_batch_size=target, warmup_steps=warmup, **mode)
    run = manifest.from_config(cfg, run_id, tokenizer_fingerprint(tok), tok.get_vocab_size())
    return run.model_copy(update={"run_id": run_id})


def model_for(run: manifest.RunManifest) -> torch.nn.Module:
    return build_model(run.model, nsp=run.nsp, seed=run.init_seed).train()


def stream(run: manifest.RunManifest, batch_size: int, seed: int) -> BatchStream:
    train, _ = documents()
    return BatchStream(
        train,
        tokenizer(),
        seq_len=run.seq_len,
        batch_size=batch_size,
        mlm_probability=run.mlm_probability,
        nsp=run.nsp,
        seed=seed,
    )


def peer_seed(index: int) -> int:
    """Data seed of swarm peer ``index`` (the single-process replay regenerates the same micro-batches)."""
    return 1000 + index


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, run: manifest.RunManifest, batch_size: int = 32) -> float:
    """Mean MLM loss on held-out documents (no peer trains on them), with fixed masking: the same for every arm."""
    _, heldout = documents()
    batches = BatchStream(
        heldout,
        tokenizer(),
        seq_len=run.seq_len,
        batch_size=batch_size,
        mlm_probability=run.mlm_probability,
        nsp=False,
        seed=HELDOUT_SEED,
    )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = [float(pretraining_loss(model, next(batches))) for _ in range(HELDOUT_BATCHES)]
    model.train(was_training)
    return sum(losses) / len(losses)
