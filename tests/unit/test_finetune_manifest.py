"""The manifest of a swarm fine-tuning run (``peer.finetune.manifest``): what it pins, its canonical JSON and strict
parsing, its signature through the pre-training records (whose manifests stay byte-identical), and the one-line
refusals of a joiner that cannot fine-tune with the run; the ``--swarm``/``--join`` flags' own checks."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from peer import join
from peer.config import PeerConfig
from peer.data.tokenizer import default_tokenizer, tokenizer_fingerprint
from peer.errors import UserError
from peer.finetune import cli
from peer.finetune.manifest import FinetuneManifest, ManifestError, check_joiner, steps_per_epoch
from peer.finetune.model import load_init
from peer.finetune.swarm import local_batch_limit, new_manifest
from peer.run.manifest import RunManifest, from_config
from peer.swarm import identity, records

pytestmark = pytest.mark.timeout(60)

LABELS = ["hivemind", "python", "torch", "transformers"]
BASE = "ab" * 32


def manifest(**changes) -> FinetuneManifest:
    fields = dict(kind="finetune", run_id="ft", task="topics", labels=tuple(LABELS), base_sha256=BASE, preset="tiny",
                  tokenizer_fingerprint=tokenizer_fingerprint(default_tokenizer()), max_length=64, init_seed=0,
                  target_batch_size=64, lr=1e-3, weight_decay=0.01, epochs=5, steps_per_epoch=7)  # fmt: skip
    return FinetuneManifest(**(fields | changes))


def joiner(run: FinetuneManifest, **changes) -> None:
    mine = dict(labels=list(run.labels), base_sha256=run.base_sha256, preset=run.preset,
                tokenizer_fingerprint=run.tokenizer_fingerprint, explicit={})  # fmt: skip
    check_joiner(run, **(mine | changes))


def test_canonical_json_round_trips_and_fingerprints():
    run = manifest()
    text = run.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert FinetuneManifest.from_json(text) == run and FinetuneManifest.from_json(text).fingerprint == run.fingerprint
    assert manifest(labels=("a", "b")).fingerprint != run.fingerprint
    assert manifest(base_sha256="cd" * 32).fingerprint != run.fingerprint
    assert (run.total_steps, run.warmup_steps) == (35, 3)  # what make_optimizer's schedule reads, as pre-training's


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("labels"), "labels"),
        (lambda d: d.update(labels=["a", "a"]), "distinct"),
        (lambda d: d.update(labels=["a"]), "labels"),
        (lambda d: d.update(base_sha256="not a sha"), "base_sha256"),
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d.update(lr=2.0), "lr"),
        (lambda d: d.update(version=2), "version 2"),
        (lambda d: d.update(kind="pretrain"), "not a fine-tuning run"),
        (lambda d: d.update(min_peers=2, target_batch_size=1), "at least 2 when min_peers > 1"),
    ],
)
def test_parsing_is_strict(change, expected):
    data = json.loads(manifest().to_json())
    change(data)
    with pytest.raises(ManifestError, match=expected):
        FinetuneManifest.from_json(json.dumps(data))


def test_the_two_kinds_of_manifest_do_not_parse_as_each_other():
    tok = default_tokenizer()
    pretraining = from_config(PeerConfig(seq_len=64).validate(), "r", tokenizer_fingerprint(tok), tok.get_vocab_size())
    with pytest.raises(ManifestError, match="not a fine-tuning run"):
        FinetuneManifest.from_json(pretraining.to_json())
    with pytest.raises(UserError):
        RunManifest.from_json(manifest().to_json())  # a pre-training peer ignores a fine-tuning run's copies


def test_signed_like_the_pretraining_manifest_whose_bytes_are_unchanged():
    key = RSAPrivateKey()
    tok = default_tokenizer()
    pretraining = from_config(PeerConfig(seq_len=64).validate(), "r", tokenizer_fingerprint(tok), tok.get_vocab_size())
    assert records.sign_manifest(pretraining, key).manifest == pretraining.to_json()
    signed = records.sign_manifest(manifest(), key)
    assert identity.verify(signed.creator, signed.manifest.encode(), signed.signature)
    assert FinetuneManifest.from_json(signed.manifest) == manifest()


def test_a_joiner_trusts_the_creator_its_bootstrap_peer_vouches_for():
    """``join._choose``, the pre-training joiner's choice, over fine-tuning copies: a forged copy (another key, other
    labels) is ignored and counted."""
    creator, forger = RSAPrivateKey(), RSAPrivateKey()

    def copy(key, run):
        signed = records.sign_manifest(run, key)
        return records.ManifestRecord(str(identity.peer_id_of_public_key(key.get_public_key())), signed.creator,
                                      FinetuneManifest.from_json(signed.manifest), signed)  # fmt: skip

    good, forged = copy(creator, manifest()), copy(forger, manifest(labels=("spam", "ham")))
    found = join._choose("ft", [forged, good], {good.publisher}, None)
    assert found.manifest == manifest() and found.ignored == 1


def test_a_joiner_with_the_runs_base_labels_and_tokenizer_is_accepted():
    run = manifest()
    joiner(run)
    joiner(run, explicit={"lr": 1e-3, "max_length": 64, "seed": 5})  # equal values, and the seed is not pinned
    joiner(manifest(base_sha256=None), base_sha256=None)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"base_sha256": "cd" * 32},
            "--init-from: run ft fine-tunes the checkpoint with weights sha256 abababababab, "
            "you passed the checkpoint with weights sha256 cdcdcdcdcdcd",
        ),  # fmt: skip
        ({"base_sha256": None}, "you passed random tiny weights"),
        ({"labels": ["hivemind", "python"]}, "--data: run ft classifies into 4 labels ('hivemind', 'python', 'torch'"),
        ({"labels": ["python", "hivemind", "torch", "transformers"]}, "your data has 4 labels ('python', 'hivemind'"),
        ({"tokenizer_fingerprint": "ef" * 32}, "--tokenizer: run ft uses the tokenizer with sha256"),
        ({"explicit": {"lr": 5e-4}}, "lr (from --lr): run has 0.001, you asked for 0.0005"),
        ({"explicit": {"epochs": 2, "max_length": 32}}, "max_length (from --max-length): run has 64"),
    ],
)
def test_a_joiner_that_cannot_train_with_the_run_is_refused_in_one_line(changes, expected):
    with pytest.raises(UserError) as refused:
        joiner(manifest(), **changes)
    line = str(refused.value)
    assert expected in line and "\n" not in line


def test_a_first_local_batch_never_completes_a_global_step_alone_when_the_run_waits_for_peers():
    assert local_batch_limit(manifest()) == 64
    assert local_batch_limit(manifest(min_peers=2)) == 32
    assert local_batch_limit(manifest(min_peers=3, target_batch_size=3)) == 1


def test_random_weights_pin_the_preset():
    with pytest.raises(UserError, match="fine-tunes random tiny weights, you passed random mini weights"):
        joiner(manifest(base_sha256=None), base_sha256=None, preset="mini")


def test_the_creators_manifest_pins_its_labels_base_and_epochs():
    cfg = cli.FinetuneConfig(init_from="random", data=["x.jsonl"], output="o", swarm=True, epochs=3, seed=7,
                             target_batch_size=32, lr=2e-3).validate()  # fmt: skip
    init = load_init("random", None, "tiny")
    run = new_manifest(cfg, init, ["neg", "pos"], train_examples=100, max_length=48)
    assert (run.labels, run.base_sha256, run.preset, run.init_seed) == (("neg", "pos"), None, "tiny", 7)
    assert (run.run_id, run.task, run.max_length, run.lr) == ("bertswarm-finetune", "bertswarm-finetune", 48, 2e-3)
    assert (run.steps_per_epoch, run.total_steps) == (4, 12) == (steps_per_epoch(100, 32), 3 * steps_per_epoch(100, 32))
    with pytest.raises(UserError, match="cannot start a fine-tuning run .*max_length"):
        new_manifest(cfg, init, ["neg", "pos"], train_examples=100, max_length=4)


def test_swarm_settings_are_the_peers_own():
    """One declaration: the swarm flags' help and defaults are ``PeerConfig``'s, and ``PeerConfig.validate`` checks
    them."""
    peer = {f.name: f for f in dataclasses.fields(PeerConfig)}
    for f in dataclasses.fields(cli.FinetuneConfig):
        if f.name in ("listen", "announce", "client_mode", "matchmaking_time", "averaging_timeout", "aggregation"):
            assert f.metadata["help"] == peer[f.name].metadata["help"]
    settings = cli.FinetuneConfig(init_from="random", data=["x"], output="o", swarm=True, state_dir="st").validate()
    assert isinstance(settings.dht_settings(), PeerConfig) and settings.dht_settings().state_dir == "st"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--swarm", "--join", "/ip4/127.0.0.1/tcp/1/p2p/QmXx"], "--swarm starts a new fine-tuning run and --join"),
        (["--listen", "/ip4/127.0.0.1/tcp/0"], "--listen applies to fine-tuning together only; add --swarm"),
        (["--min-peers", "2"], "--min-peers applies to fine-tuning together only"),
        (["--swarm", "--min-peers", "0"], "--min-peers 0: must be an integer from 1 to 1000"),
        (["--swarm", "--target-batch-size", "0"], "--target-batch-size 0"),
        (["--swarm", "--aggregation", "vote"], "--aggregation 'vote': unknown"),
        (["--join", "not-an-address"], "--join"),
        (["--swarm", "--run-id", "no spaces"], "--run-id 'no spaces'"),
    ],
)
def test_swarm_flags_are_checked_before_anything_starts(tmp_path, capsys, argv, expected):
    base = ["--init-from", "random", "--data", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "o")]
    assert cli.main([*base, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert expected in captured.err, captured.err
    assert not (tmp_path / "o").exists()
