"""Where a fine-tuning run starts: a published pre-training checkpoint (verified by :mod:`peer.store.load`: a
checkpoint directory, a checkpoint root's ``latest``, or a coordinator's URL) or random weights of a preset's
architecture; and the ``BertForSequenceClassification`` built on it.

The classifier takes the checkpoint's encoder (``bert.*``); its pooler (absent from a ``BertForMaskedLM``
checkpoint) and classification head start from the seeded random initialisation, as in Hugging Face fine-tuning.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import BertConfig, BertForSequenceClassification

from peer.config import PeerConfig
from peer.data.tokenizer import default_tokenizer, load_tokenizer, tokenizer_fingerprint
from peer.errors import InputError, UserError
from peer.run.manifest import RunManifest, from_config
from peer.run.model import bert_config
from peer.store.checkpoint import latest_path
from peer.store.errors import CheckpointError
from peer.store.load import load_checkpoint
from peer.store.metadata import METADATA_FILE

logger = logging.getLogger(__name__)

RANDOM = "random"
"""``--init-from random``: the same architecture from random weights (the baseline of pre-training)."""
_FRESH = ("bert.pooler.", "classifier.")  # what a classifier may lack from an MLM checkpoint


@dataclass
class Init:
    config: BertConfig
    """the pre-training model's architecture"""
    state: dict[str, torch.Tensor] | None
    """the checkpoint's weights (verified), or None for random weights"""
    tokenizer: Tokenizer
    seq_len: int
    """the run's sequence length: the default ``--max-length``"""
    provenance: dict
    """what ``metrics.json`` records about the start: the source, and the run, epoch, samples and weights' sha256 of a
    checkpoint"""
    preset: str
    """the architecture's preset (the checkpoint run's, or ``--preset`` for random weights)"""

    @property
    def base_sha256(self) -> str | None:
        """sha256 of the checkpoint's ``model.safetensors`` (verified when loaded); None for random weights. What a
        swarm fine-tuning run pins (``peer.finetune.manifest``)."""
        return self.provenance.get("sha256")


def load_init(init_from: str, tokenizer_path: str | None, preset: str) -> Init:
    """The weights, architecture and tokenizer to fine-tune from. Errors are :class:`~peer.errors.UserError`\\ s that
    name the flag."""
    tokenizer = _tokenizer(tokenizer_path) if tokenizer_path else None
    if init_from == RANDOM:
        tokenizer = tokenizer or default_tokenizer()
        cfg = PeerConfig(preset=preset).validate()  # an unknown preset: "--preset x: ..." (UserError)
        manifest = from_config(cfg, "finetune", tokenizer_fingerprint(tokenizer), tokenizer.get_vocab_size())
        return Init(bert_config(manifest.model), None, tokenizer, manifest.seq_len,
                    {"init_from": RANDOM, "preset": preset}, preset)  # fmt: skip
    try:
        state, meta = load_checkpoint(init_from, expected_fingerprint=None)
    except CheckpointError as e:
        raise e.with_flag("--init-from") from None
    manifest = RunManifest.from_dict(meta["manifest"])  # already validated by the strict metadata parser
    tokenizer = tokenizer or checkpoint_tokenizer(init_from)
    if tokenizer_fingerprint(tokenizer) != manifest.tokenizer_fingerprint:
        raise UserError(
            f"--init-from {init_from}: the run was trained with another tokenizer than "
            f"{'--tokenizer ' + tokenizer_path if tokenizer_path else 'the shipped one'}; pass --tokenizer with the "
            "run's vocab.txt or tokenizer.json"
        )
    provenance = {"init_from": str(init_from), "run_id": meta["run_id"], "fingerprint": meta["fingerprint"],
                  "epoch": meta["epoch"], "samples_seen": meta["samples_seen"], "sha256": meta["sha256"]}  # fmt: skip
    return Init(bert_config(manifest.model), state, tokenizer, manifest.seq_len, provenance, manifest.preset)


def _tokenizer(path: str) -> Tokenizer:
    try:
        return load_tokenizer(path)
    except InputError as e:
        raise e.with_flag("--tokenizer") from None


def checkpoint_tokenizer(init_from: str) -> Tokenizer:
    """The tokenizer files of a local checkpoint; the shipped vocab for a URL (checked against the run after)."""
    if str(init_from).startswith(("http://", "https://")):
        return default_tokenizer()
    path = Path(init_from).expanduser()
    directory = path if (path / METADATA_FILE).is_file() else latest_path(path)
    try:
        return load_tokenizer(directory) if directory is not None else default_tokenizer()
    except InputError:
        return default_tokenizer()


def build_classifier(init: Init, labels: list[str], seed: int) -> BertForSequenceClassification:
    """A sequence classifier over ``labels`` (ids in that order) on the ``init`` encoder; seeded head."""
    config = copy.deepcopy(init.config)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.problem_type = "single_label_classification"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    if init.state is not None:
        encoder = {name: tensor for name, tensor in init.state.items() if name.startswith("bert.")}
        missing, _unexpected = model.load_state_dict(encoder, strict=False)
        absent = [name for name in missing if not name.startswith(_FRESH)]
        if not encoder or absent:
            raise UserError(
                f"--init-from {init.provenance['init_from']}: the checkpoint lacks encoder weights "
                f"({(absent or ['bert.*'])[0]}); pass a bertswarm pre-training checkpoint"
            )
        logger.info("loaded %d encoder tensors; fresh: %s", len(encoder), ", ".join(missing) or "none")
    return model
