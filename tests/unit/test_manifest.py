"""The run manifest: a stable fingerprint, a readable diff, conflicts only for explicit flags."""

import pytest

from peer.config import PeerConfig
from peer.errors import UserError
from peer.join import conflicts
from peer.run.manifest import RunManifest, from_config


def make(**overrides):
    return from_config(PeerConfig(**overrides).validate(), "run", "a" * 64, 8192)


def test_fingerprint_is_stable_and_canonical():
    m = make()
    assert m.fingerprint == make().fingerprint
    assert len(m.fingerprint) == 64
    # the fingerprint of this exact manifest must never change silently: peers of different versions compare it
    assert RunManifest.from_json(m.to_json()) == m
    assert m.to_json() == RunManifest.from_json(m.to_json()).to_json()
    assert make(lr=1e-4).fingerprint != m.fingerprint


def test_preset_defaults_flow_into_the_manifest():
    tiny, mini = make(), make(preset="mini")
    assert tiny.model.hidden_size == 128 and tiny.model.num_hidden_layers == 2
    assert mini.model.hidden_size == 256
    assert tiny.target_batch_size != mini.target_batch_size
    assert make(target_batch_size=99).target_batch_size == 99


def test_diff_lists_each_changed_field():
    lines = make().diff(make(seq_len=64, nsp=True))
    assert lines == ["nsp: False -> True", "seq_len: 128 -> 64"]


def test_conflicts_only_for_explicit_flags():
    run = make()
    mine = make(preset="mini", seq_len=64)
    assert conflicts(run, mine, explicit=set()) == []  # defaults are adopted silently
    found = conflicts(run, mine, explicit={"preset", "seq_len"})
    assert any(line.startswith("preset (from --preset): run has 'tiny', you asked for 'mini'") for line in found)
    assert any(line.startswith("seq_len (from --seq-len): run has 128") for line in found)
    assert conflicts(run, make(), explicit={"preset", "seq_len"}) == []


def test_unreadable_manifest_is_a_user_error():
    data = make().to_dict()
    data["version"] = 99
    import json

    with pytest.raises(UserError, match="upgrade bertswarm"):
        RunManifest.from_json(json.dumps(data))
    with pytest.raises(UserError):
        RunManifest.from_json("{not json")


@pytest.mark.parametrize(
    "field, value",
    [("seq_len", "128"), ("seq_len", 4096), ("lr", -1.0), ("nsp", 1), ("preset", "huge"), ("run_id", "a b"),
     ("tokenizer_fingerprint", "xyz"), ("extra_field", 1)],
)  # fmt: skip
def test_manifest_fields_are_typed_and_bounded(field, value):
    from peer.run.manifest import ManifestError

    data = make().to_dict()
    data[field] = value
    with pytest.raises(ManifestError, match=field):
        RunManifest.from_dict(data)
    data = make().to_dict()
    data["model"]["hidden_size"] = -1
    with pytest.raises(ManifestError, match="model.hidden_size"):
        RunManifest.from_dict(data)


@pytest.mark.parametrize(
    "setting, value, flag",
    [("inner_steps", 200_000, "--inner-steps"), ("weight_decay", 20.0, "--weight-decay"),
     ("target_batch_size", 10**9, "--target-batch-size")],
)  # fmt: skip
def test_a_setting_beyond_the_manifest_bounds_is_a_one_line_error_naming_the_flag(setting, value, flag):
    from peer.run.manifest import ManifestError

    with pytest.raises(ManifestError, match=rf"^{flag}: Input should be less than or equal to"):
        make(**{setting: value})
