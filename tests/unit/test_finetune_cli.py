"""Bad input to ``bertswarm-finetune`` and ``bertswarm-eval``: one line on stderr naming the problem and the fix,
exit code 2, no traceback, nothing written. All answered before any training."""

from __future__ import annotations

import json

import pytest

from peer.finetune import cli
from peer.finetune import eval as evaluate

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [{"text": f"example number {i}", "label": "even" if i % 2 else "odd"} for i in range(40)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    for name in ("BERTSWARM_DATA", "BERTSWARM_OUTPUT", "BERTSWARM_INIT_FROM", "BERTSWARM_OVERWRITE"):
        monkeypatch.delenv(name, raising=False)


def refused(capsys, main, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def finetune(output, *args) -> list[str]:
    return ["--init-from", "random", "--output", str(output), "--epochs", "1", *map(str, args)]


def nothing_written(tmp_path, output) -> None:
    assert not output.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_malformed_data_names_file_and_line(tmp_path, data, capsys):
    data.write_text(data.read_text() + '{"text": "broken", "label": \n')
    out = tmp_path / "out"
    line = refused(capsys, cli.main, finetune(out, "--data", data), f"--data {data}:41: invalid JSON")
    assert line.startswith("bertswarm-finetune: error: ")
    nothing_written(tmp_path, out)


def test_missing_label(tmp_path, data, capsys):
    data.write_text(data.read_text() + '{"text": "no label here"}\n')
    out = tmp_path / "out"
    refused(capsys, cli.main, finetune(out, "--data", data), f"{data}:41", 'missing "label"', "give every record")
    nothing_written(tmp_path, out)


def test_unreadable_data(tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, cli.main, finetune(out, "--data", tmp_path / "absent.csv"), "absent.csv: no such file")
    nothing_written(tmp_path, out)


def test_single_class(tmp_path, capsys):
    path = tmp_path / "one.csv"
    path.write_text("text,label\n" + "".join(f"sentence {i},spam\n" for i in range(30)))
    out = tmp_path / "out"
    refused(capsys, cli.main, finetune(out, "--data", path), "only one class ('spam')", "at least two")
    nothing_written(tmp_path, out)


def test_unknown_checkpoint(tmp_path, data, capsys):
    out = tmp_path / "out"
    argv = ["--init-from", str(tmp_path / "nope"), "--data", str(data), "--output", str(out)]
    refused(capsys, cli.main, argv, f"--init-from {tmp_path / 'nope'}: no such file or directory", "pass a checkpoint")
    nothing_written(tmp_path, out)


def test_existing_output_needs_overwrite(tmp_path, data, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    refused(capsys, cli.main, finetune(out, "--data", data), "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--data", "x.jsonl", "--output", "o"], "--init-from is required"),
        (["--init-from", "random", "--output", "o"], "--data is required"),
        (["--init-from", "random", "--data", "x.jsonl", "--output", "o", "--patience", "0"], "--patience 0"),
        (["--init-from", "random", "--data", "x.jsonl", "--output", "o", "--preset", "huge"], "--preset huge"),
    ],
)
def test_flags(tmp_path, capsys, argv, expected):
    refused(capsys, cli.main, argv, expected)


def test_eval_unknown_checkpoint(tmp_path, capsys):
    refused(capsys, evaluate.main, ["--checkpoint", str(tmp_path / "nope")], "--checkpoint", "no such file")


def test_eval_classifier_needs_labelled_data(tmp_path, capsys):
    classifier = tmp_path / "clf"
    classifier.mkdir()
    (classifier / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    refused(capsys, evaluate.main, ["--checkpoint", str(classifier)], "--data is required for a classifier")
