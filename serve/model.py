"""A checkpoint in memory: verified when loaded, immutable afterwards, and its batched inference.

Loading goes through :func:`peer.store.load.load_checkpoint` (strict ``bertswarm.json``, sha256 of the weights,
finite weights, and the run: the manifest fingerprint of the checkpoint served so far); the transformers model is then
built with ``from_pretrained`` from the same directory and checked to hold exactly the verified tensors.
Inference reproduces what ``transformers.pipeline("fill-mask")`` and ``pipeline("text-classification")`` return, for
a whole batch in one forward pass (``tests/unit/test_serve_model.py`` compares the two).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.store.errors import CheckpointError
from peer.store.load import load_checkpoint

logger = logging.getLogger(__name__)

FILL_MASK, CLASSIFY = "fill-mask", "classify"
TOP_K = 5


class RequestError(ValueError):
    """An input the model cannot answer: HTTP ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, eq=False)
class ServedModel:
    step: int
    run_id: str
    fingerprint: str
    sha256: str
    kind: str
    """``fill-mask`` (a masked-LM checkpoint) or ``classify`` (a sequence-classification one)"""
    model: torch.nn.Module
    tokenizer: object
    max_tokens: int

    # --- checks, on the event loop (cheap: tokenisation of one request) ------------------------------------------

    def check(self, kind: str, texts: list[str]) -> None:
        """Raise :class:`RequestError` unless every text can be answered by ``kind`` with this model."""
        if kind != self.kind:
            what = "a masked-LM" if kind == FILL_MASK else "a sequence-classification"
            raise RequestError(409, f"the served checkpoint (step {self.step}) is a {self.kind} model; /v1/{kind} "
                                    f"needs {what} checkpoint")  # fmt: skip
        ids = self.tokenizer(texts)["input_ids"]
        mask_id = self.tokenizer.mask_token_id
        for i, row in enumerate(ids):
            if len(row) > self.max_tokens:
                raise RequestError(422, f"inputs[{i}] is {len(row)} tokens long; the model takes at most "
                                        f"{self.max_tokens}, shorten it")  # fmt: skip
            if kind == FILL_MASK and mask_id not in row:
                raise RequestError(422, f"inputs[{i}] has no {self.tokenizer.mask_token} token; put one where a word "
                                        "should be filled in")  # fmt: skip

    # --- inference, on the inference thread ------------------------------------------------------------------------

    def infer(self, kind: str, texts: list[str]) -> list:
        if kind != self.kind:
            raise RequestError(409, f"the served checkpoint (step {self.step}) is a {self.kind} model")
        encoded = self.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = self.model(**encoded).logits
        if kind == FILL_MASK:
            return [self._fill(encoded["input_ids"][i], encoded["attention_mask"][i], logits[i]) for i in
                    range(len(texts))]  # fmt: skip
        return self._classify(logits)

    def _fill(self, input_ids: torch.Tensor, attention: torch.Tensor, logits: torch.Tensor) -> list:
        """As ``FillMaskPipeline.postprocess``: top-k per mask; one mask → a list of k, several → a list per mask."""
        tok = self.tokenizer
        ids = input_ids[attention.bool()]  # padding is on the right: positions are unchanged
        masked = torch.nonzero(ids == tok.mask_token_id, as_tuple=False).squeeze(-1)
        values, predictions = logits[masked].softmax(dim=-1).topk(TOP_K)
        single = len(masked) == 1
        rows = []
        for i, (scores, tokens) in enumerate(zip(values.tolist(), predictions.tolist(), strict=True)):
            row = []
            for score, token in zip(scores, tokens, strict=True):
                filled = ids.numpy().copy()
                filled[masked[i]] = token
                filled = filled[filled != tok.pad_token_id]
                row.append({"score": score, "token": token, "token_str": tok.decode([token]),
                            "sequence": tok.decode(filled, skip_special_tokens=single)})  # fmt: skip
            rows.append(row)
        return rows[0] if single else rows

    def _classify(self, logits: torch.Tensor) -> list[dict]:
        """As ``TextClassificationPipeline`` (default ``top_k``): sigmoid for one label or multi-label, else softmax."""
        config = self.model.config
        if config.num_labels == 1 or config.problem_type == "multi_label_classification":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        best = scores.argmax(dim=-1)
        return [{"label": config.id2label[int(b)], "score": float(s[b])} for b, s in zip(best, scores, strict=True)]


def load(directory: Path, expected_fingerprint: str | None) -> ServedModel:
    """Verify and load the checkpoint in ``directory`` (a complete ``epoch-*`` directory). ``CheckpointError`` when
    it fails verification or is of another run than ``expected_fingerprint``."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    tensors, meta = load_checkpoint(directory, expected_fingerprint)
    config = AutoConfig.from_pretrained(directory)
    classifier = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
    auto = AutoModelForSequenceClassification if classifier else AutoModelForMaskedLM
    try:
        model = auto.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise CheckpointError(directory, f"transformers cannot load it ({' '.join(str(e).split())[:200]})") from None
    state = model.state_dict()
    if any(name not in state or not torch.equal(state[name], tensor) for name, tensor in tensors.items()):
        raise CheckpointError(directory, "changed while it was being loaded; it is loaded again at the next poll")
    model.eval()
    return ServedModel(
        step=meta["epoch"],
        run_id=meta["run_id"],
        fingerprint=meta["fingerprint"],
        sha256=meta["sha256"],
        kind=CLASSIFY if classifier else FILL_MASK,
        model=model,
        tokenizer=tokenizer,
        max_tokens=int(getattr(config, "max_position_embeddings", 512)),
    )
