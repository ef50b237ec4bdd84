"""Model presets: one model size each, with the training defaults that suit it (every default can be overridden by a
flag). The one place preset names are declared; ``PeerConfig`` offers exactly these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    batch_size: int
    target_batch_size: int
    lr: float


PRESETS: dict[str, Preset] = {
    # ~1.5M parameters with the 8192-token vocab: a CPU demo that learns visibly in minutes.
    "tiny": Preset(128, 2, 2, 512, batch_size=16, target_batch_size=256, lr=1e-3),
    # ~5.5M parameters (BERT-mini layout): a laptop GPU or a patient CPU.
    "mini": Preset(256, 4, 4, 1024, batch_size=32, target_batch_size=1024, lr=5e-4),
    # BERT-base and BERT-large layouts (92M / 312M with our 8192 vocab; 110M / 340M with the original 30k): GPUs.
    "base": Preset(768, 12, 12, 3072, batch_size=32, target_batch_size=4096, lr=2e-4),
    "large": Preset(1024, 24, 16, 4096, batch_size=16, target_batch_size=8192, lr=1e-4),
}
PRESET_NAMES = tuple(PRESETS)
