"""Prepared datasets as peers read them: the index, assignment, the stream, corrupt shards, refusals."""

import json

import numpy as np
import pytest
import torch

from peer.config import PeerConfig
from peer.data import prepare as prep
from peer.data.batches import IGNORE_INDEX
from peer.data.shards import INDEX_NAME, PreparedDataset, assign_slots
from peer.data.stream import ShardStream, prepared_heldout_batches
from peer.data.tokenizer import TokenizerInfo, default_tokenizer, tokenizer_fingerprint
from peer.errors import InputError, UserError
from peer.run.manifest import RunManifest, from_config
from tests.unit.test_prepare import write_corpus

INFO = TokenizerInfo.of(default_tokenizer())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    write_corpus(root / "a.txt", documents=300)
    prep.prepare_dataset([str(root / "a.txt")], root / "out", default_tokenizer(), seq_len=32, shard_chars=2000)
    return PreparedDataset.open(root / "out")


def stream(dataset, **kw):
    kw.setdefault("me", b"me")
    return ShardStream(dataset, INFO, batch_size=4, seed=kw.pop("seed", 1), **kw)


def test_assignment_is_deterministic_disjoint_and_stable_under_churn():
    keys = [f"{i:064x}" for i in range(40)]
    peers = [bytes([i]) for i in range(5)]
    owned = {peer: {slot.shard for slot in assign_slots(keys, peer, peers)} for peer in peers}
    assert set().union(*owned.values()) == set(range(40))
    assert sum(len(shards) for shards in owned.values()) == 40  # a partition: every shard has one owner
    assert all(owned[p] == {s.shard for s in assign_slots(keys, p, list(reversed(peers)))} for p in peers)
    # a sixth peer joins: it only takes shards, nobody else's assignment moves between the others
    newcomer = bytes([9])
    after = {peer: {slot.shard for slot in assign_slots(keys, peer, [*peers, newcomer])} for peer in peers}
    assert all(after[peer] <= owned[peer] for peer in peers)
    taken = set().union(*(owned[p] - after[p] for p in peers))
    assert taken == {slot.shard for slot in assign_slots(keys, newcomer, [*peers, newcomer])}


def test_more_peers_than_shards_share_at_different_offsets():
    keys = ["a" * 64, "b" * 64]
    peers = [bytes([i]) for i in range(6)]
    slots = [assign_slots(keys, peer, peers)[0] for peer in peers]
    assert {slot.start for slot in slots} > {0.0}  # shards are cut into 3 segments: peers start inside them
    assert len({(slot.shard, slot.start) for slot in slots}) >= 4


def test_stream_batches_are_masked_and_resume_at_the_saved_position(dataset):
    first = stream(dataset)
    batches = [next(first) for _ in range(25)]
    batch = batches[-1]
    assert batch["input_ids"].shape == (4, 32) and (batch["labels"] != IGNORE_INDEX).any()
    masked = batch["labels"] != IGNORE_INDEX
    assert (batch["input_ids"][masked] == INFO.mask_id).float().mean() > 0.5
    position = json.loads(json.dumps(first.position))  # survives the state file's JSON
    resumed = stream(dataset, position=position)
    # the same rows come next (masking differs only by the generator's state, so compare the unmasked structure)
    a, b = next(first), next(resumed)
    assert torch.equal(a["attention_mask"], b["attention_mask"])
    assert torch.equal(unmasked(a), unmasked(b))


def unmasked(batch):
    return torch.where(batch["labels"] == IGNORE_INDEX, batch["input_ids"], batch["labels"])


def test_a_lone_peer_reads_every_row_once_per_pass(dataset):
    all_rows = np.concatenate([dataset.load(entry) for entry in dataset.index.shards]).astype(np.int64)
    lone = ShardStream(dataset, INFO, batch_size=1, seed=3, me=b"alone")
    seen = np.concatenate([unmasked(next(lone)).numpy() for _ in range(len(all_rows))])
    assert lone.epoch == 0
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, all_rows.tolist()))


def test_corrupt_shard_is_skipped_once_and_counted(dataset, tmp_path, caplog):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in dataset.path.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    broken = PreparedDataset.open(copy)
    victim = broken.index.shards[0].name
    data = bytearray((copy / victim).read_bytes())
    data[-1] ^= 0xFF
    (copy / victim).write_bytes(bytes(data))
    (copy / broken.index.shards[1].name).write_bytes(b"\x93NUMPY")  # truncated
    skipped = []
    s = stream(broken, on_skip=skipped.append)
    for _ in range(3 * sum(entry.rows for entry in broken.index.shards)):
        next(s)
    assert sorted(skipped) == sorted([victim, broken.index.shards[1].name])  # once each, across passes
    assert sum("skipping shard" in record.message for record in caplog.records) == 2
    for entry in broken.index.shards[2:]:
        (copy / entry.name).unlink()
    with pytest.raises(InputError, match="every shard failed verification"):
        for _ in range(1000):
            next(s)


def test_refuses_another_tokenizer_seq_len_or_nsp(dataset):
    fp = tokenizer_fingerprint(default_tokenizer())
    dataset.check(tokenizer_fingerprint=fp, seq_len=32, nsp=False)
    with pytest.raises(InputError, match="prepared with another tokenizer"):
        dataset.check(tokenizer_fingerprint="0" * 64, seq_len=32, nsp=False)
    with pytest.raises(InputError, match=r"prepared for sequence length 32, the run uses 64; .*--seq-len 64$"):
        dataset.check(tokenizer_fingerprint=fp, seq_len=64, nsp=False)
    with pytest.raises(InputError, match="without NSP"):
        dataset.check(tokenizer_fingerprint=fp, seq_len=32, nsp=True)


def test_incomplete_or_foreign_directory_is_refused(tmp_path, dataset):
    (tmp_path / "train-00000.npy").write_bytes(b"x")
    with pytest.raises(InputError, match="incomplete"):
        PreparedDataset.open(tmp_path)
    (tmp_path / INDEX_NAME).write_text('{"format": "other"}')
    with pytest.raises(InputError, match="not a bertswarm prepared dataset index"):
        PreparedDataset.open(tmp_path)


def test_heldout_batches_are_reproducible(dataset):
    a = prepared_heldout_batches(dataset, INFO, batch_size=4, max_batches=2)
    b = prepared_heldout_batches(dataset, INFO, batch_size=4, max_batches=2)
    assert 1 <= len(a) <= 2 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))


def test_manifest_pins_the_dataset_and_keeps_old_fingerprints(dataset):
    cfg = PeerConfig().validate()
    plain = from_config(cfg, "run", "a" * 64, 100)
    assert "data_fingerprint" not in plain.to_dict()  # runs without prepared data keep their fingerprints
    pinned = from_config(cfg, "run", "a" * 64, 100, dataset.fingerprint)
    assert RunManifest.from_json(pinned.to_json()) == pinned and pinned.fingerprint != plain.fingerprint
    assert plain.diff(pinned) == [f"data_fingerprint: None -> {dataset.fingerprint!r}"]


def test_join_refuses_other_data_with_the_difference(dataset):
    from peer.join import data_conflict

    line = data_conflict(dataset.fingerprint, None)
    assert dataset.fingerprint[:12] in line and "no prepared dataset" in line and "\n" not in line


def test_peer_load_inputs_takes_a_prepared_directory(dataset, tmp_path):
    from peer.trainer import adopt_dataset_settings, load_inputs

    _tok, docs, found = load_inputs(None, [str(dataset.path)])
    assert docs == [] and found.fingerprint == dataset.fingerprint
    cfg = adopt_dataset_settings(PeerConfig().validate(), set(), found)
    assert cfg.seq_len == 32
    assert adopt_dataset_settings(PeerConfig(seq_len=64).validate(), {"seq_len"}, found).seq_len == 64
    with pytest.raises(UserError, match="must be the only --data entry"):
        load_inputs(None, [str(dataset.path), str(tmp_path)])
    (tmp_path / "train-00000.npy").write_bytes(b"")
    with pytest.raises(UserError, match=rf"^--data {tmp_path}: prepared dataset is incomplete"):
        load_inputs(None, [str(tmp_path)])


def test_saved_state_keeps_the_data_position(tmp_path):
    from peer.store.state import StateDir

    model = torch.nn.Linear(2, 2)
    sd = StateDir(tmp_path)
    sd.save(model, {}, epoch=3, samples=9, fingerprint="f", data_position={"shard": "train-00001.npy", "cursor": 7})
    assert sd.load("f").data_position == {"shard": "train-00001.npy", "cursor": 7}
    sd.save(model, {}, epoch=3, samples=9, fingerprint="f")
    assert sd.load("f").data_position is None
    sd.close()


def test_skipped_shards_metric_is_declared_once():
    from peer import telemetry

    assert telemetry.PEER_SKIPPED_SHARDS == "bertswarm_peer_skipped_shards"
    t = telemetry.PeerTelemetry()
    t.skipped_shards.inc()
    assert t.registry.get_sample_value("bertswarm_peer_skipped_shards_total") == 1.0
    assert np.iinfo(np.uint16).max >= INFO.vocab_size - 1
