"""Defences against peers that crash, lie or send garbage: what hivemind 1.1.12 trusts and bertswarm does not.

- ``FiniteTensorPartReducer``: hivemind averages every tensor part a groupmate sends, so one peer sending NaN/Inf
  poisons the average for the whole group. Non-finite parts (or weights) are dropped with weight 0, so the others'
  round completes with the finite contributions; every dropped contribution is counted. ``hivemind_compat.install``
  puts it into hivemind's all-reduce.
- ``BoundedProgressTracker``: hivemind takes the *maximum* epoch over all ``{run}_progress`` records and sums every
  record's ``samples_accumulated`` (unbounded), so one lying record can make the epoch jump or every peer step after
  each mini-batch. Records are parsed with bounded types, the epoch is the majority's (median), and a record's
  samples and throughput are capped by what a peer a few times faster than the swarm's median could have computed
  (``sanitize_progress``; ``hivemind_compat.FilteredProgressTracker`` feeds it hivemind's records).
"""

from __future__ import annotations

import logging
import math
import statistics
import time

import pydantic.v1 as pydantic
import torch
from hivemind.averaging import partition
from hivemind.utils import get_dht_time

from peer.run.schema import MAX_EPOCH, MAX_SAMPLES_PER_SECOND, OUTLIER_FACTOR, REJECT_REASONS
from peer.swarm import hivemind_compat, membership
from peer.swarm.robust import RejectionCounts

logger = logging.getLogger(__name__)

SAMPLES_SLACK_SECONDS = 1.0  # peers enter an epoch up to about one refresh period apart


# --- non-finite contributions ---------------------------------------------------------------------------------------

# Shared with the averager processes hivemind forks (created before they start): contributions dropped there, by
# reason (peer.run.schema.REJECT_REASONS), by this module's reducer and by peer.swarm.robust's.
_rejections: RejectionCounts | None = None


def rejected_contributions() -> dict[str, int]:
    return {reason: 0 for reason in REJECT_REASONS} if _rejections is None else _rejections.counts()


def share_rejection_counter() -> None:
    """Create the counters in this process before hivemind forks its averagers, so they increment the same values."""
    global _rejections
    if _rejections is None:
        _rejections = RejectionCounts()


def robust_options(aggregation: str, weight_cap: float) -> dict:
    """The ``peer.swarm.robust.RobustAveragingMixin`` options of every averager of a run (both modes): the run's rule,
    the largest weight a groupmate may claim, rejections counted here."""
    return dict(aggregation=aggregation, weight_cap=weight_cap, on_reject=count_rejection)


def count_rejection(reason: str, sender_index: int) -> None:
    """The ``on_reject`` of every averager: counts where :func:`share_rejection_counter` made the counters."""
    if _rejections is not None:
        _rejections(reason, sender_index)


def _finite(tensor: torch.Tensor, weight: float) -> bool:
    return math.isfinite(weight) and weight >= 0 and bool(torch.isfinite(tensor).all())


class FiniteTensorPartReducer(partition.TensorPartReducer):
    """A ``TensorPartReducer`` that averages only finite parts; a non-finite one counts with weight 0."""

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight=1.0):
        if not _finite(tensor_part, weight):
            if not hasattr(self, "_rejected_senders"):
                self._rejected_senders = set()
            if sender_index not in self._rejected_senders:  # one contribution per sender and round
                self._rejected_senders.add(sender_index)
                count_rejection("non_finite", sender_index)
                logger.warning("dropped a groupmate's non-finite contribution to an averaging round")
            tensor_part, weight = torch.zeros_like(tensor_part), 0.0
        return await super().accumulate_part(sender_index, part_index, tensor_part, weight)

    def check_current_part_finished(self):
        if self.current_part_accumulated_from == self.num_current_senders and self.denominator == 0:
            self.denominator = 1.0  # every contribution was dropped: the average is zero, not 0/0 = NaN
        super().check_current_part_finished()


# --- lying progress records -----------------------------------------------------------------------------------------


class BoundedProgress(pydantic.BaseModel):
    """hivemind's ``LocalTrainingProgress`` with bounds: what a progress record may say at all."""

    peer_id: pydantic.StrictBytes
    epoch: pydantic.conint(ge=0, le=MAX_EPOCH, strict=True)
    samples_accumulated: pydantic.conint(ge=0, le=10**9, strict=True)
    samples_per_second: pydantic.confloat(ge=0.0, le=MAX_SAMPLES_PER_SECOND, strict=True)
    time: pydantic.StrictFloat
    client_mode: pydantic.StrictBool


def sanitize_progress(
    records: dict[bytes, dict], local: dict, *, now: float, epoch_started: float | None, target_batch_size: int
) -> tuple[dict[bytes, dict], int]:
    """Bounded, majority-checked progress records (``local`` is this peer's own, trusted); returns (kept, dropped).

    - a record that does not parse as ``BoundedProgress`` is dropped;
    - the reference epoch is the median (high) of the training peers' epochs, this peer's included; a record more than
      one step ahead of it is dropped (a minority cannot move the epoch; a joiner still follows a majority ahead);
    - throughput counts for at most ``OUTLIER_FACTOR`` x the median (low) throughput, this peer's included;
    - samples at this peer's epoch (reported, plus hivemind's extrapolation since the report) count for at most what
      that capped throughput yields since the epoch began here; with ``epoch_started`` None (this peer did not see
      its epoch begin: at start-up and after loading state) they are capped at the target batch only.
    """
    parsed, dropped = {}, 0
    for key, value in records.items():
        if value is None:
            continue
        try:
            parsed[key] = BoundedProgress.parse_obj(value)
        except pydantic.ValidationError:
            dropped += 1
    epochs = [p.epoch for p in parsed.values() if not p.client_mode]
    if not local["client_mode"]:
        epochs.append(local["epoch"])
    reference = statistics.median_high(epochs) if epochs else local["epoch"]
    # hivemind reports ~0 samples/s until a peer's first update: such records say nothing about the swarm's speed (they
    # capped a fast peer's rate to ~0 in a slow starter's view, which then missed the swarm's first step)
    rates = [r for r in [p.samples_per_second for p in parsed.values()] + [local["samples_per_second"]] if r > 1e-3]
    sps_cap = OUTLIER_FACTOR * max(statistics.median_low(rates), local["samples_per_second"]) if rates else math.inf
    kept = {}
    for key, p in parsed.items():
        if p.epoch > reference + 1:
            dropped += 1
            continue
        sps = min(p.samples_per_second, sps_cap)
        samples = p.samples_accumulated
        record_time = min(p.time, now)
        if p.epoch == local["epoch"] and epoch_started is None:
            samples = min(samples, target_batch_size)
        elif p.epoch == local["epoch"]:
            cap = sps * (max(0.0, now - epoch_started) + SAMPLES_SLACK_SECONDS)
            samples = min(samples, int(cap), target_batch_size)
            # hivemind adds (now - time) x throughput to a record's samples: keep that estimate within the cap too
            record_time = max(record_time, epoch_started, now - (cap - samples) / max(sps, 1e-9))
        kept[key] = dict(p.dict(), samples_per_second=sps, samples_accumulated=samples, time=record_time)
    return kept, dropped


def others_left(records: dict | None, me: bytes, now: float) -> bool:
    """Whether a fresh read of ``{run}_progress`` (``records``: subkey -> ``ValueWithExpiration``, as hivemind's
    ``DHT.get`` returns them) shows that every other peer has left: this peer's own live record is there (the read
    worked) and no other peer's live one is. A peer that leaves cleanly replaces its record with hivemind's "goodbye"
    (value None, ``SwarmOptimizer.leave_swarm``); a crashed peer's record counts until it expires. Any other live
    record counts as a peer that may still come, whatever it says."""
    if not isinstance(records, dict):
        return False
    own = False
    for entry in records.values():
        value, expiration = getattr(entry, "value", None), getattr(entry, "expiration_time", -math.inf)
        if value is None or expiration < now:
            continue  # withdrawn or expired
        if isinstance(value, dict) and value.get("peer_id") == me:
            own = True
        else:
            return False
    return own


def others_epoch(records: dict | None, me: bytes, now: float) -> int | None:
    """The highest step in the other peers' live progress records of a fresh read of ``{run}_progress`` (as
    ``others_left`` reads it), or None when there is none. hivemind's ``global_epoch`` counts this peer's own record."""
    if not isinstance(records, dict):
        return None
    epochs = []
    for entry in records.values():
        value, expiration = getattr(entry, "value", None), getattr(entry, "expiration_time", -math.inf)
        if isinstance(value, dict) and value.get("peer_id") != me and expiration >= now:
            epoch = value.get("epoch")
            if isinstance(epoch, int) and not isinstance(epoch, bool):
                epochs.append(epoch)
    return max(epochs, default=None)


class BoundedProgressTracker(hivemind_compat.FilteredProgressTracker):
    """hivemind's ProgressTracker reading the other peers' progress records through ``sanitize_progress``."""

    def __init__(self, *args, **kwargs):
        self.dropped_records = 0
        self._last_warning = -math.inf
        # When the swarm's current epoch began, as far as this peer can tell: the earlier of its own entry and the first
        # kept record of another peer in that epoch (a peer whose round ends late enters after the others have been
        # accumulating; capping their samples by its own time in the epoch made it miss their next round). Only an
        # epoch entered by a global step (one more than the last) is timed: at start-up and after loading state the
        # others may have accumulated for a while already (a solo first round in the equivalence test).
        self._epoch_started: float | None = None
        self._started_epoch: int | None = None
        self._first_seen: dict[int, float] = {}
        super().__init__(*args, **kwargs)

    def report_local_progress(self, local_epoch: int, samples_accumulated: int, update_global_samples: bool = True):
        if local_epoch != self._started_epoch:
            stepped = self._started_epoch is not None and local_epoch == self._started_epoch + 1
            now = get_dht_time()
            self._epoch_started = min(now, self._first_seen.get(local_epoch, now)) if stepped else None
            self._started_epoch = local_epoch
            self._first_seen = {e: t for e, t in self._first_seen.items() if e > local_epoch}
        super().report_local_progress(local_epoch, samples_accumulated, update_global_samples)

    def _note_epochs_seen(self, kept: dict[bytes, dict], now: float) -> None:
        """Remember when another peer was first seen in an epoch ahead of this one (at most one ahead is kept)."""
        for record in kept.values():
            if self._started_epoch is not None and record["epoch"] > self._started_epoch:
                self._first_seen.setdefault(record["epoch"], now)

    def filter_records(self, records: dict[bytes, dict]) -> dict[bytes, dict]:
        now = get_dht_time()
        records = {key: value for key, value in records.items() if membership.allows_owner(key)}  # restricted runs
        kept, dropped = sanitize_progress(
            records,
            self.local_progress.dict(),
            now=now,
            epoch_started=self._epoch_started,
            target_batch_size=self.target_batch_size,
        )
        self._note_epochs_seen(kept, now)
        if dropped:
            self.dropped_records += dropped
            if time.monotonic() - self._last_warning > 60:  # once a minute, not on every fetch
                self._last_warning = time.monotonic()
                logger.warning("ignoring implausible training-progress records of other peers (%d so far)",
                               self.dropped_records)  # fmt: skip
        return kept
