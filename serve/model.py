"""A checkpoint in memory: verified when loaded, immutable afterwards, and its batched inference.

Loading goes through :func:`peer.store.load.load_checkpoint` (strict ``bertswarm.json``, sha256 of the weights,
finite weights, and the run: the manifest fingerprint of the checkpoint served so far); the transformers model is then
built with ``from_pretrained`` from the same directory and checked to hold exactly the verified tensors.
Inference reproduces what ``transformers.pipeline("fill-mask")`` and ``pipeline("text-classification")`` return, for
a whole batch in one forward pass (``tests/unit/test_serve_model.py`` compares the two).

Where the time goes, and why it is spent this way (measured in bench/findings.md, scenario 10):

- A request is tokenised once, when it is checked on the event loop, by the fast tokenizer's Rust backend called
  directly (the ``transformers`` wrapper around it costs ~8× more per call); the batch reuses those ids, padded to its
  longest input, instead of tokenising again.
- Fill-mask runs the encoder on the whole batch but the masked-LM head only at the ``[MASK]`` positions: the head
  (hidden → vocabulary) is most of a small BERT's arithmetic at every position, and only the masked ones are answered.
  It is the same head on the same hidden states, so the answers equal the pipeline's (the test compares them).
- Everything runs under ``torch.inference_mode``; top-k is one ``topk`` over every mask of the batch; the filled-in
  sequences are decoded in one call to the backend and the string of a predicted token is cached per model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
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
    encoder: object
    """the fast tokenizer's backend (``tokenizers.Tokenizer``), without truncation or padding: the same ids as
    calling ``tokenizer`` as the pipelines do"""
    mlm_parts: tuple[torch.nn.Module, torch.nn.Module] | None = None
    """(encoder, masked-LM head) of a BERT masked LM, to apply the head at the masks only; None: the whole model"""
    _token_strs: dict[int, str] = field(default_factory=dict, repr=False)

    # --- checks, on the event loop (cheap: tokenisation of one request) ------------------------------------------

    def check(self, kind: str, texts: list[str]) -> list[list[int]]:
        """The token ids of ``texts``; :class:`RequestError` unless every text can be answered by ``kind``."""
        if kind != self.kind:
            what = "a masked-LM" if kind == FILL_MASK else "a sequence-classification"
            raise RequestError(409, f"the served checkpoint (step {self.step}) is a {self.kind} model; /v1/{kind} "
                                    f"needs {what} checkpoint")  # fmt: skip
        ids = [self.encoder.encode(text).ids for text in texts]
        mask_id = self.tokenizer.mask_token_id
        for i, row in enumerate(ids):
            if len(row) > self.max_tokens:
                raise RequestError(422, f"inputs[{i}] is {len(row)} tokens long; the model takes at most "
                                        f"{self.max_tokens}, shorten it")  # fmt: skip
            if kind == FILL_MASK and mask_id not in row:
                raise RequestError(422, f"inputs[{i}] has no {self.tokenizer.mask_token} token; put one where a word "
                                        "should be filled in")  # fmt: skip
        return ids

    # --- inference, on the inference thread ------------------------------------------------------------------------

    def infer(self, kind: str, texts: list[str]) -> list:
        """The pipeline-shaped answers of ``texts`` (checked first)."""
        return self.infer_ids(kind, self.check(kind, texts))

    def infer_ids(self, kind: str, ids: list[list[int]]) -> list:
        """The pipeline-shaped answers of inputs already tokenised (and checked) by :meth:`check`: one forward pass."""
        if kind != self.kind:
            raise RequestError(409, f"the served checkpoint (step {self.step}) is a {self.kind} model")
        input_ids, attention = self._pad(ids)
        with torch.inference_mode():
            if kind == FILL_MASK:
                return self._fill(ids, input_ids, attention)
            return self._classify(self.model(input_ids=input_ids, attention_mask=attention).logits)

    def _pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded to the batch's longest input (positions unchanged, as the pipeline's single inputs)."""
        lengths = [len(row) for row in ids]
        input_ids = np.full((len(ids), max(lengths)), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        attention = np.zeros(input_ids.shape, dtype=np.int64)
        for i, row in enumerate(ids):
            input_ids[i, : lengths[i]] = row
            attention[i, : lengths[i]] = 1
        return torch.from_numpy(input_ids), torch.from_numpy(attention)

    def _fill(self, ids: list[list[int]], input_ids: torch.Tensor, attention: torch.Tensor) -> list:
        """As ``FillMaskPipeline.postprocess``: top-k per mask; one mask → a list of k, several → a list per mask."""
        tok = self.tokenizer
        rows, positions = torch.nonzero(input_ids == tok.mask_token_id, as_tuple=True)  # row-major: input order
        if self.mlm_parts is not None:
            encoder, head = self.mlm_parts
            hidden = encoder(input_ids=input_ids, attention_mask=attention)[0]
            logits = head(hidden[rows, positions])
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention).logits[rows, positions]
        values, predictions = logits.softmax(dim=-1).topk(TOP_K)
        masks_of: list[list[tuple[int, list[float], list[int]]]] = [[] for _ in ids]
        for row, position, scores, tokens in zip(rows.tolist(), positions.tolist(), values.tolist(),
                                                 predictions.tolist(), strict=True):  # fmt: skip
            masks_of[row].append((position, scores, tokens))
        pad_id = tok.pad_token_id
        filled_of: dict[bool, list[list[int]]] = {True: [], False: []}  # by skip_special_tokens (one mask or more)
        for row_ids, masks in zip(ids, masks_of, strict=True):
            for position, _, tokens in masks:
                for token in tokens:
                    filled = list(row_ids)
                    filled[position] = token
                    filled_of[len(masks) == 1].append([t for t in filled if t != pad_id])  # as the pipeline does
        sequences = {single: iter(self._decode(filled, single)) for single, filled in filled_of.items()}
        outputs = []
        for masks in masks_of:
            single = len(masks) == 1
            answers = [
                [{"score": score, "token": token, "token_str": self._token_str(token),
                  "sequence": next(sequences[single])} for score, token in zip(scores, tokens, strict=True)]
                for _, scores, tokens in masks
            ]  # fmt: skip
            outputs.append(answers[0] if single else answers)
        return outputs

    def _decode(self, sequences: list[list[int]], skip_special_tokens: bool) -> list[str]:
        """``tokenizer.decode`` of each sequence, in one call to the Rust backend when the tokenizer does not clean up
        spaces afterwards (the shipped one does not); else through the wrapper, which does."""
        if not sequences:
            return []
        if self.tokenizer.clean_up_tokenization_spaces:
            return [self.tokenizer.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]
        return self.encoder.decode_batch(sequences, skip_special_tokens=skip_special_tokens)

    def _token_str(self, token: int) -> str:
        text = self._token_strs.get(token)
        if text is None:
            text = self._token_strs[token] = self.tokenizer.decode([token])
        return text

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
    from tokenizers import Tokenizer
    from transformers import (
        AutoConfig,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertForMaskedLM,
    )

    tensors, meta = load_checkpoint(directory, expected_fingerprint)
    config = AutoConfig.from_pretrained(directory)
    classifier = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
    auto = AutoModelForSequenceClassification if classifier else AutoModelForMaskedLM
    try:
        model = auto.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise CheckpointError(directory, f"transformers cannot load it ({' '.join(str(e).split())[:200]})") from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError(directory, "its tokenizer is not a fast (tokenizer.json) one")
    state = model.state_dict()
    if any(name not in state or not torch.equal(state[name], tensor) for name, tensor in tensors.items()):
        raise CheckpointError(directory, "changed while it was being loaded; it is loaded again at the next poll")
    model.eval()
    encoder = Tokenizer.from_str(backend.to_str())  # a copy: the wrapper sets truncation/padding on its own per call
    encoder.no_truncation()
    encoder.no_padding()
    return ServedModel(
        step=meta["epoch"],
        run_id=meta["run_id"],
        fingerprint=meta["fingerprint"],
        sha256=meta["sha256"],
        kind=CLASSIFY if classifier else FILL_MASK,
        model=model,
        tokenizer=tokenizer,
        max_tokens=int(getattr(config, "max_position_embeddings", 512)),
        encoder=encoder,
        mlm_parts=(model.bert, model.cls) if isinstance(model, BertForMaskedLM) else None,
    )
