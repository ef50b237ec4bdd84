"""Defences against faulty or lying peers: finite-only averaging, skipped non-finite steps, bounded progress."""

import asyncio
import math

import torch
from hivemind.optim.progress_tracker import ProgressTracker

from peer.swarm import guards
from peer.swarm.optim import ClippedAdamW

NOW = 1_000_000.0


def progress(epoch=5, samples=20, sps=10.0, age=0.5, client=False):
    return dict(peer_id=b"x", epoch=epoch, samples_accumulated=samples, samples_per_second=sps, time=NOW - age,
                client_mode=client)  # fmt: skip


def sanitize(records, local=None, elapsed=3.0):
    return guards.sanitize_progress(records, local or progress(samples=30), now=NOW, epoch_started=NOW - elapsed,
                                    target_batch_size=192)  # fmt: skip


def test_honest_records_pass_unchanged():
    records = {b"a": progress(), b"b": progress(epoch=6, samples=0)}  # b just moved on: one step ahead is fine
    kept, dropped = sanitize(records)
    assert dropped == 0 and kept == records


def test_a_minority_cannot_move_the_epoch_but_a_majority_ahead_is_followed():
    kept, dropped = sanitize({b"a": progress(), b"liar": progress(epoch=10**6)})
    assert dropped == 1 and set(kept) == {b"a"}
    joiner = progress(epoch=0, samples=0)
    kept, dropped = sanitize({b"a": progress(epoch=50), b"b": progress(epoch=50)}, local=joiner)
    assert dropped == 0 and len(kept) == 2  # a joiner far behind still sees the swarm's step
    kept, dropped = sanitize({b"a": progress(epoch=50)}, local=joiner)
    assert dropped == 0  # one other peer, far ahead: a joiner follows it


def test_out_of_bounds_records_are_dropped_and_absurd_claims_capped():
    kept, dropped = sanitize({b"a": progress(), b"big": progress(samples=10**12, sps=1e9)})
    assert dropped == 1 and set(kept) == {b"a"}
    kept, _ = sanitize({b"a": progress(), b"liar": progress(samples=10**8, sps=1e5, age=3600)})
    liar = kept[b"liar"]
    assert liar["samples_per_second"] <= guards.OUTLIER_FACTOR * 10.0
    assert liar["samples_accumulated"] <= guards.OUTLIER_FACTOR * 10.0 * (3.0 + guards.SAMPLES_SLACK_SECONDS)
    assert liar["time"] >= NOW - 3.0  # no credit for time before the epoch began
    cap = guards.OUTLIER_FACTOR * 10.0 * (3.0 + guards.SAMPLES_SLACK_SECONDS)
    estimate = liar["samples_accumulated"] + (NOW - liar["time"]) * liar["samples_per_second"]  # as hivemind does
    assert estimate <= cap + 1e-6


def test_before_a_peer_saw_its_epoch_begin_others_samples_are_capped_at_the_target_only():
    """At start-up or after loading state, the others may have accumulated for a while: a peer that capped them by its
    own time in the epoch missed the swarm's step (a solo round)."""
    records = {b"early": progress(samples=150, sps=10.0), b"liar": progress(samples=10**8, sps=1e5)}
    kept, dropped = guards.sanitize_progress(records, progress(samples=0), now=NOW, epoch_started=None,
                                             target_batch_size=192)  # fmt: skip
    assert dropped == 0
    assert kept[b"early"]["samples_accumulated"] == 150  # capped by time it would have been ~40
    assert kept[b"liar"]["samples_accumulated"] == 192 and kept[b"liar"]["samples_per_second"] <= 40.0


def test_the_tracker_caps_by_time_only_in_epochs_it_entered_by_a_global_step(monkeypatch):
    class Bare(guards.BoundedProgressTracker):  # bookkeeping only: no DHT, no thread
        def __del__(self):
            pass

    tracker = Bare.__new__(Bare)
    tracker._epoch_started, tracker._started_epoch, tracker._first_seen = None, None, {}
    seen = []
    monkeypatch.setattr(ProgressTracker, "report_local_progress", lambda self, *a, **k: seen.append(a))
    tracker.report_local_progress(0, 0)  # start-up
    assert tracker._epoch_started is None
    tracker.report_local_progress(1, 0)  # a global step: the epoch began here, with the swarm
    assert tracker._epoch_started is not None
    tracker.report_local_progress(57, 0)  # loaded the swarm's state: did not see epoch 57 begin
    assert tracker._epoch_started is None
    tracker.report_local_progress(58, 0)
    assert tracker._epoch_started is not None and len(seen) == 4
    # the others entered epoch 59 first (seen at t=1.0); this peer's own round ended later: the epoch began at 1.0
    tracker._note_epochs_seen({b"a": progress(epoch=59), b"b": progress(epoch=58)}, now=1.0)
    tracker.report_local_progress(59, 0)
    assert tracker._epoch_started == 1.0 and tracker._first_seen == {}


def reduce(parts_by_sender, weights):
    async def run():
        reducer = guards.FiniteTensorPartReducer([parts_by_sender[0].shape], len(parts_by_sender))
        pairs = enumerate(zip(parts_by_sender, weights, strict=True))
        return await asyncio.gather(*(reducer.accumulate_part(i, 0, part, weight=w) for i, (part, w) in pairs))

    return asyncio.run(run())


def test_reducer_drops_a_non_finite_contribution_and_counts_it():
    guards.share_rejection_counter()
    before = guards.rejected_contributions()
    good, bad = torch.ones(4), torch.full((4,), float("nan"))
    results = reduce([good, bad, 3 * good], [1.0, 1.0, 1.0])
    assert all(torch.equal(r, 2 * good) for r in results)  # the mean of the finite ones
    assert guards.rejected_contributions() == dict(before, non_finite=before["non_finite"] + 1)
    results = reduce([good, good], [1.0, float("inf")])  # a non-finite weight is dropped too
    assert torch.equal(results[0], good)
    results = reduce([bad, bad], [1.0, 1.0])  # nothing finite: zero, not 0/0
    assert torch.equal(results[0], torch.zeros(4))


def test_optimizer_never_applies_a_non_finite_gradient():
    param = torch.nn.Parameter(torch.ones(3))
    opt = ClippedAdamW([param], lr=0.1, max_grad_norm=1.0)
    skipped = []
    opt.on_nonfinite = lambda: skipped.append(1)
    param.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert torch.equal(param.detach(), torch.ones(3)) and skipped == [1]
    param.grad = torch.tensor([1.0, 1.0, 0.0])
    opt.step()
    assert math.isfinite(param.sum().item()) and not torch.equal(param.detach(), torch.ones(3))


def test_others_epoch_reads_only_the_other_peers_live_records():
    """The resync after a joiner's missed first round waits for the *others* to reach its step: hivemind's
    ``global_epoch`` counts this peer's own record, which already says that step."""
    from hivemind.utils import ValueWithExpiration

    me, now = b"me", 1000.0

    def record(peer_id: bytes, epoch, expires: float = now + 10):
        return ValueWithExpiration({"peer_id": peer_id, "epoch": epoch}, expires)

    assert guards.others_epoch({b"1": record(me, 5), b"2": record(b"b", 4), b"3": record(b"c", 3)}, me, now) == 4
    assert guards.others_epoch({b"1": record(me, 5)}, me, now) is None  # alone
    assert guards.others_epoch({b"1": record(me, 5), b"2": record(b"b", 6, expires=now - 1)}, me, now) is None
    assert guards.others_epoch({b"2": ValueWithExpiration(None, now + 10), b"3": record(b"c", "7")}, me, now) is None
    assert guards.others_epoch(None, me, now) is None
