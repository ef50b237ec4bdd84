"""Swarm figures from the peers' records: stale records drop out, a lying minority cannot move the step."""

import math

from coordinator.aggregate import MAX_PEER_LABELS, aggregate, peer_label
from peer.run.schema import PeerMetrics

NOW = 1_000_000.0


def record(epoch=5, sps=10.0, samples=100, loss=6.0, mini_steps=4, age=1.0):
    return PeerMetrics(epoch=epoch, samples_per_second=sps, samples_total=samples, loss=loss, mini_steps=mini_steps,
                       time=NOW - age, client_mode=False)  # fmt: skip


def test_sums_weighted_loss_and_median_step():
    view = aggregate({b"a": record(loss=6.0, mini_steps=1), b"b": record(loss=4.0, mini_steps=3, epoch=6)}, NOW, 30)
    assert view.peers == 2 and view.samples_per_second == 20.0 and view.samples == 200
    assert view.loss == (6.0 * 1 + 4.0 * 3) / 4
    assert view.epoch == 6


def test_stale_records_drop_out():
    view = aggregate({b"a": record(), b"old": record(age=31.0, sps=500.0)}, NOW, 30)
    assert view.peers == 1 and view.samples_per_second == 10.0


def test_a_lying_minority_cannot_move_the_step():
    records = {bytes([i]): record(epoch=5) for i in range(3)}
    records[b"liar"] = record(epoch=10**9, sps=1e6)
    assert aggregate(records, NOW, 30).epoch == 5


def test_no_loss_without_mini_steps_and_empty_swarm():
    assert math.isnan(aggregate({b"a": record(mini_steps=0)}, NOW, 30).loss)
    empty = aggregate({}, NOW, 30)
    assert empty.peers == 0 and empty.to_json()["loss"] is None


def test_per_peer_labels_are_short_stable_and_bounded():
    records = {bytes([i]) * 300: record(sps=float(i)) for i in range(MAX_PEER_LABELS + 20)}
    view = aggregate(records, NOW, 30)
    assert len(view.per_peer) == MAX_PEER_LABELS
    assert peer_label(b"x" * 300) == peer_label(b"x" * 300) and len(peer_label(b"x")) == 10
    assert min(view.per_peer.values()) == 20.0  # the busiest peers are kept


def test_a_lying_minority_cannot_inflate_throughput_samples_or_loss():
    honest = {bytes([i]): record(epoch=5, sps=10.0, samples=300, loss=6.0, mini_steps=4) for i in range(3)}
    liar = record(epoch=10**9, sps=1e6, samples=10**15, loss=0.0, mini_steps=10**9)
    view = aggregate({**honest, b"liar": liar}, NOW, 30, target_batch_size=192)
    assert view.epoch == 5
    assert view.samples_per_second <= 3 * 10.0 + 4 * 10.0
    assert view.samples <= (5 + 2) * 192
    assert view.loss == 6.0
    # two honest peers and a liar: the liar's throughput and loss weight are capped
    two = {b"a": honest[b"\x00"], b"b": honest[b"\x01"], b"liar": liar}
    assert aggregate(two, NOW, 30, target_batch_size=192).loss == 6.0
