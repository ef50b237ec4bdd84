"""``bertswarm-serve``'s inference and request checks, without HTTP: batched fill-mask and classification equal
``transformers.pipeline`` on checkpoints written by the product's writer; every malformed request and flag is one
line; the CLI's error paths exit 2 without a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from peer.config import PeerConfig
from peer.data.tokenizer import default_tokenizer, tokenizer_fingerprint
from peer.run.manifest import from_config
from peer.run.model import build_model
from peer.store.checkpoint import write_checkpoint
from serve import cli
from serve import model as served_model
from serve.app import parse_inputs
from serve.model import RequestError

REPO = Path(__file__).resolve().parents[2]
TEXTS = [
    "the [MASK] of the function.",
    "returns a [MASK] of the input",
    "a [MASK] is [MASK] here.",
    "Ünïcode ÀCCENTS, CAPS and a literal [PAD]: [MASK]!",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = default_tokenizer()
    manifest = from_config(PeerConfig().validate(), "test", tokenizer_fingerprint(tok), tok.get_vocab_size())
    model = build_model(manifest.model, nsp=False, seed=0)
    root = tmp_path_factory.mktemp("mlm")
    write_checkpoint(root, model, tok, manifest, epoch=3, samples_seen=1, eval_metrics={})

    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        **{**model.config.to_dict(), "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}
    )
    torch.manual_seed(0)
    classifier = BertForSequenceClassification(config)
    classifier_root = tmp_path_factory.mktemp("classifier")
    write_checkpoint(classifier_root, classifier, tok, manifest, epoch=5, samples_seen=1, eval_metrics={})
    return SimpleNamespace(root=root, classifier_root=classifier_root, manifest=manifest)


@pytest.mark.timeout(60)
def test_fill_mask_equals_the_pipeline(tiny, monkeypatch):
    from transformers import pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    served = served_model.load(tiny.root / "latest", tiny.manifest.fingerprint)
    assert (served.step, served.kind, served.run_id) == (3, "fill-mask", "test")
    fill = pipeline("fill-mask", model=str(tiny.root / "latest"), device="cpu")
    ours = served.infer("fill-mask", TEXTS)  # one padded batch of three
    for text, got in zip(TEXTS, ours, strict=True):
        want = fill(text)
        assert _strip_scores(got) == _strip_scores(want)
        assert _scores(got) == pytest.approx(_scores(want), abs=1e-5)
    served.check("fill-mask", TEXTS)
    with pytest.raises(RequestError, match=r"^inputs\[1\] has no \[MASK\] token") as caught:
        served.check("fill-mask", ["a [MASK]", "no mask"])
    assert caught.value.status == 422
    limit = served.max_tokens
    with pytest.raises(RequestError, match=rf"^inputs\[0\] is \d+ tokens long; the model takes at most {limit}"):
        served.check("fill-mask", ["word " * limit + "[MASK]"])
    with pytest.raises(RequestError, match="is a fill-mask model; /v1/classify needs a sequence-classification") as e:
        served.check("classify", ["text"])
    assert e.value.status == 409


@pytest.mark.timeout(60)
def test_the_served_tokenisation_and_the_head_at_the_masks_equal_the_full_model(tiny):
    """The server tokenises with the fast tokenizer's backend (not the wrapper) and applies the masked-LM head at the
    masks only: the same ids as the wrapper, and the same answers as the full model's logits at every position."""
    import dataclasses

    served = served_model.load(tiny.root / "latest", tiny.manifest.fingerprint)
    assert served.mlm_parts is not None
    texts = [*TEXTS, "a literal [PAD] then [MASK]", "  spaces\t[MASK]\n "]
    ids = served.check("fill-mask", texts)
    assert ids == served.tokenizer(texts)["input_ids"]
    fast = served.infer_ids("fill-mask", ids)
    full = dataclasses.replace(served, mlm_parts=None).infer_ids("fill-mask", ids)
    assert [_strip_scores(r) for r in fast] == [_strip_scores(r) for r in full]
    for got, want in zip(fast, full, strict=True):
        assert _scores(got) == pytest.approx(_scores(want), abs=1e-5)
    assert fast == served.infer("fill-mask", texts)  # the same answers alone or in a batch (the whole batch here)
    assert "[PAD]" not in fast[4][0]["sequence"]  # dropped from the sequence, as the pipeline drops it


@pytest.mark.timeout(60)
def test_classify_equals_the_pipeline(tiny, monkeypatch):
    from transformers import pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    served = served_model.load(tiny.classifier_root / "latest", None)
    assert (served.step, served.kind) == (5, "classify")
    texts = ["a good function.", "it failed badly", "x"]
    want = pipeline("text-classification", model=str(tiny.classifier_root / "latest"), device="cpu")(texts)
    got = served.infer("classify", texts)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-5)
    with pytest.raises(RequestError, match="is a classify model; /v1/fill-mask needs a masked-LM checkpoint"):
        served.check("fill-mask", ["a [MASK]"])


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ([], 400, 'body has no "inputs"'),
        ({"text": "a"}, 400, 'body has no "inputs"'),
        ({"inputs": ["a"], "top_k": 3}, 400, "unknown field 'top_k'"),
        ({"inputs": "a [MASK]"}, 400, '"inputs" is a str, not a list'),
        ({"inputs": []}, 400, '"inputs" is empty'),
        ({"inputs": ["a", 3]}, 400, r"inputs\[1\] is a int, not a string"),
        ({"inputs": ["a", "  "]}, 400, r"inputs\[1\] is empty"),
        ({"inputs": ["a"] * 5}, 413, '"inputs" has 5 texts, more than 4; split the request'),
    ],
)
def test_malformed_requests(body, status, reason):
    with pytest.raises(RequestError, match=f"^{reason}") as caught:
        parse_inputs(body, max_inputs=4)
    assert caught.value.status == status and "\n" not in str(caught.value)
    assert parse_inputs({"inputs": ["a", "b"]}, 4) == ["a", "b"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--checkpoints is required"),
        (["--checkpoints", "/nonexistent/dir"], "--checkpoints /nonexistent/dir: does not exist; pass the"),
        (["--checkpoints", "ftp://host/x"], "only http:// and https:// URLs are supported"),
        (["--checkpoints", "http://"], "--checkpoints http://: not a usable URL"),
        (["--checkpoints", "http://host:99999999/x"], "not a usable URL"),
        (["--checkpoints", "{tmp}", "--port", "70000"], "--port 70000: must be a TCP port"),
        (["--checkpoints", "{tmp}", "--max-batch", "0"], "--max-batch 0: must be 1-1024"),
        (["--checkpoints", "{tmp}", "--poll-seconds", "0"], "--poll-seconds 0.0: must be > 0 seconds"),
        (["--checkpoints", "{file}"], "is not a directory"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("x")
    args = [a.format(tmp=tmp_path, file=tmp_path / "file") for a in args]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("bertswarm-serve: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.timeout(60)
def test_port_in_use_and_unreadable_dir_exit_2_without_traceback(tmp_path):
    """As a user runs it: ``python -m serve``; an empty directory is fine (not ready until a checkpoint appears)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "serve", "--checkpoints", str(tmp_path), "--port", str(port)],
                              cwd=REPO, capture_output=True, text=True, timeout=50)  # fmt: skip
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"bertswarm-serve: error: --port {port} on 127.0.0.1 is unavailable") and "pick a free" in last
    )
    assert "Traceback" not in done.stderr
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        if _can_read(locked):  # root reads everything: nothing to test
            return
        assert cli.main(["--checkpoints", str(locked)]) == 2
    finally:
        locked.chmod(0o755)


def _can_read(path: Path) -> bool:
    try:
        list(path.iterdir())
    except PermissionError:
        return False
    return True


def _strip_scores(rows: list[dict]) -> list[tuple]:
    return [(r["token"], r["token_str"], r["sequence"]) for r in _flat(rows)]


def _scores(rows: list[dict]) -> list[float]:
    return [r["score"] for r in _flat(rows)]


def _flat(rows: list) -> list[dict]:
    return [r for row in rows for r in (row if isinstance(row, list) else [row])]
