"""Local state: exclusive state dir, atomic safetensors saves, corrupt files answered clearly and left alone."""

import os

import pytest
import torch

from peer.errors import UserError
from peer.run.model import build_model
from peer.store.errors import StateError
from peer.store.state import StateDir

MODEL = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def test_save_and_load_round_trip(tmp_path):
    sd = StateDir(tmp_path / "s")
    model = build_model(MODEL, nsp=False, seed=1)
    opt_state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}, "local_epoch": 7}
    sd.save(model, opt_state, epoch=7, samples=123, fingerprint="f" * 64)
    loaded = sd.load("f" * 64)
    assert loaded.epoch == 7 and loaded.samples == 123
    assert torch.equal(loaded.optimizer[0]["exp_avg"], torch.ones(2))
    fresh = build_model(MODEL, nsp=False, seed=2)
    missing, unexpected = fresh.load_state_dict(loaded.model, strict=False)
    assert not unexpected and set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
    assert sd.load("0" * 64) is None  # state of another run is not loaded
    assert [p.name for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")] == []
    sd.close()


def test_state_dir_is_exclusive(tmp_path):
    first = StateDir(tmp_path)
    with pytest.raises(
        StateError, match=rf"^{tmp_path}: in use by another running peer; .* its own state directory$"
    ) as e:
        StateDir(tmp_path)
    assert str(e.value.with_flag("--state-dir")).startswith(f"--state-dir {tmp_path}: in use")  # as the peer says it
    first.close()
    StateDir(tmp_path).close()


def test_corrupt_state_is_a_user_error_and_is_not_overwritten(tmp_path):
    sd = StateDir(tmp_path)
    (tmp_path / "state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(UserError, match="is corrupt"):
        sd.load("f" * 64)
    assert (tmp_path / "state.safetensors").read_bytes().endswith(b"{broken")
    sd.close()


def test_unwritable_state_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create or write it"):
        StateDir(blocker / "sub")


def test_failed_save_leaves_previous_state(tmp_path, monkeypatch):
    sd = StateDir(tmp_path)
    model = build_model(MODEL, nsp=False, seed=1)
    sd.save(model, {}, epoch=1, samples=1, fingerprint="f" * 64)
    before = (tmp_path / "state.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        sd.save(model, {}, epoch=2, samples=2, fingerprint="f" * 64)
    assert (tmp_path / "state.safetensors").read_bytes() == before
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
    sd.close()
