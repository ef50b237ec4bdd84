"""The labelled data of ``peer.finetune``: the offline topics set (deterministic, balanced, split by hash, with its
provenance), the ``.jsonl``/``.csv``/``hf:`` readers and their one-line errors, the validation split, the metrics."""

from __future__ import annotations

import json
import sys
import types

import pytest

from peer.errors import InputError
from peer.finetune import labelled
from peer.finetune.data import Encoder, Example, batches, carve_validation, check_labels, load_examples
from peer.finetune.metrics import classification_metrics, majority_baseline

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def topics():
    return labelled.build_topics(per_class=40)


def test_topics_are_deterministic_balanced_and_split_by_hash(topics, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a cold build, from the sources
    again = labelled.build_topics(per_class=40)
    assert list(tmp_path.glob("bertswarm/topics-*.json"))
    assert labelled.fingerprint(again) == labelled.fingerprint(topics)
    records = [r for split in labelled.SPLITS for r in topics[split]]
    labels = {r["label"] for r in records}
    assert labels == {"hivemind", "python", "torch", "transformers"}  # all are installed with bertswarm
    assert all(sum(r["label"] == label for r in records) == 40 for label in labels)
    texts = [r["text"] for r in records]
    assert len(texts) == len(set(texts))  # one paragraph, one label, one split
    for split in labelled.SPLITS:
        assert topics[split], split
        assert all(labelled.split_of(r["text"]) == split for r in topics[split])


def test_written_set_records_provenance_and_licences(tmp_path):
    info = labelled.write_topics(tmp_path, per_class=5)
    on_disk = json.loads((tmp_path / "info.json").read_text())
    assert on_disk == info
    assert info["sources"]["torch"]["licence"] == "BSD-3-Clause" and info["sources"]["hivemind"]["version"]
    lines = [json.loads(line) for split in labelled.SPLITS for line in (tmp_path / f"{split}.jsonl").open()]
    assert len(lines) == 4 * 5 and all(set(line) == {"text", "label"} for line in lines)
    assert load_examples([tmp_path / "train.jsonl"])  # readable by the fine-tuning reader


def test_jsonl_and_csv_with_pairs(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"text": "good film", "label": 1}\n\n{"text": "x", "text_pair": "y", "label": "b"}\n'
    )
    (tmp_path / "b.csv").write_text('text,label,text_pair,extra\n"a, quoted",pos,second,z\nplain,neg,,z\n')
    examples = load_examples([tmp_path / "a.jsonl", str(tmp_path / "b.csv")])
    assert examples == [
        Example("good film", "1"),
        Example("x", "b", "y"),
        Example("a, quoted", "pos", "second"),
        Example("plain", "neg"),
    ]
    encoded = next(batches(examples, Encoder(labelled_tokenizer(), 16), {"1": 0, "b": 1, "pos": 0, "neg": 1}, 4))
    assert encoded["input_ids"].shape[0] == 4 and encoded["labels"].tolist() == [0, 1, 0, 1]
    assert encoded["token_type_ids"][1].max() == 1  # the pair's second text is segment 1


def labelled_tokenizer():
    from peer.data.tokenizer import default_tokenizer

    return default_tokenizer()


@pytest.mark.parametrize(
    ("name", "content", "where", "problem"),
    [
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 2\n', "bad.jsonl:2", "invalid JSON"),
        ("nolabel.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "nolabel.jsonl:2", 'missing "label"'),
        ("notext.jsonl", '{"label": 1}\n', "notext.jsonl:1", 'missing or empty "text"'),
        ("nolabel.csv", "text,score\na,1\n", "nolabel.csv:1", "header lacks column label"),
        ("ragged.csv", "text,label\na,1\nb,2,3\n", "ragged.csv:3", "expected 2 fields"),
        ("empty.jsonl", "\n", "empty.jsonl", "no records"),
        ("data.tsv", "a\t1\n", "data.tsv", "unknown file type"),
        ("binary.jsonl", "\0\1", "binary.jsonl", "binary file"),
    ],
)
def test_malformed_files_name_the_file_and_line(tmp_path, name, content, where, problem):
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError) as caught:
        load_examples([tmp_path / name])
    message = str(caught.value)
    assert message.startswith(str(tmp_path / where) + ":") and problem in message
    assert "\n" not in message and ";" in message  # one line: the problem, then the fix


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_examples([tmp_path / "absent.jsonl"])


def test_validation_split_is_stable_and_order_free():
    examples = [Example(f"sentence number {i}", str(i % 3)) for i in range(300)]
    train, validation = carve_validation(examples, 0.1)
    again_train, again_validation = carve_validation(list(reversed(examples)), 0.1)
    assert {e.text for e in validation} == {e.text for e in again_validation}
    assert 10 < len(validation) < 60 and len(train) + len(validation) == 300
    assert not {e.text for e in train} & {e.text for e in validation}


def test_labels_need_two_classes_and_validation_labels_seen_in_training():
    one = [Example("a", "x"), Example("b", "x")]
    with pytest.raises(InputError, match="only one class"):
        check_labels(one, [], "data.jsonl")
    with pytest.raises(InputError, match="never occur in training"):
        check_labels([*one, Example("c", "y")], [Example("d", "z")], "data.jsonl")
    assert check_labels([*one, Example("c", "y")], [Example("d", "y")], "data.jsonl") == ["x", "y"]


class _FakeHFDataset:
    """What ``datasets.load_dataset(...)`` returns for GLUE/SST-2, in memory (tests never download)."""

    column_names = ["sentence", "label", "idx"]
    features = {"label": types.SimpleNamespace(names=["negative", "positive"])}

    def __iter__(self):
        yield {"sentence": "a gripping film ", "label": 1, "idx": 0}
        yield {"sentence": "dull", "label": 0, "idx": 1}


def test_hf_datasets_go_through_the_corpus_loader(monkeypatch):
    calls = []

    def load_dataset(name, config, split, **kwargs):
        calls.append((name, config, split))
        return _FakeHFDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = load_examples(["hf:glue:sst2:validation"])
    assert calls == [("glue", "sst2", "validation")]
    assert examples == [Example("a gripping film", "positive"), Example("dull", "negative")]


def test_hf_without_the_datasets_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as when the extra is not installed
    with pytest.raises(InputError, match=r"pip install 'bertswarm\[datasets\]'"):
        load_examples(["hf:glue:sst2"])


def test_accuracy_and_macro_f1():
    figures = classification_metrics([0, 0, 1, 2], [0, 1, 1, 1], 3)
    # class 0: tp 1 fp 1 fn 0 → 2/3; class 1: tp 1 fp 0 fn 2 → 1/2; class 2: tp 0 → 0
    assert figures == {"accuracy": 0.5, "macro_f1": pytest.approx((2 / 3 + 1 / 2 + 0) / 3), "examples": 4}
    assert majority_baseline([1, 1, 0], [0, 1, 1, 1], 2)["accuracy"] == 0.75
