"""Turn the peers' signed metrics records into one swarm-level view (pure functions, no I/O)."""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass, field

from peer.run.schema import OUTLIER_FACTOR, PeerMetrics

MAX_PEER_LABELS = 50  # per-peer series are limited to the busiest peers: bounded label cardinality


@dataclass
class SwarmView:
    peers: int = 0
    epoch: int = 0
    samples_per_second: float = 0.0
    loss: float = float("nan")
    samples: int = 0
    per_peer: dict[str, float] = field(default_factory=dict)  # short peer label -> samples/s

    def to_json(self) -> dict:
        return {
            "peers": self.peers,
            "epoch": self.epoch,
            "samples_per_second": self.samples_per_second,
            "loss": None if self.loss != self.loss else self.loss,
            "samples": self.samples,
        }


def peer_label(subkey: bytes) -> str:
    """A short stable label for a peer's record (its signed subkey is hundreds of bytes long)."""
    return hashlib.sha256(subkey).hexdigest()[:10]


def _capped(values: list[float]) -> float:
    """The most any one peer's value may count for: OUTLIER_FACTOR x the median (low) of the positive values."""
    positive = [v for v in values if v > 0]
    return OUTLIER_FACTOR * statistics.median_low(positive) if len(positive) >= 2 else float("inf")


def aggregate(
    records: dict[bytes, PeerMetrics], now: float, stale_after: float, target_batch_size: int | None = None
) -> SwarmView:
    """Swarm figures from the live records, robust to a lying minority (each record is already schema-bounded).

    - records older than ``stale_after`` seconds drop out;
    - the swarm's epoch is the median (high) of the peers' epochs: honest peers are within one step of each other, so
      a minority claiming an absurd step cannot move it;
    - a peer's throughput and its loss weight (mini-steps) count for at most ``OUTLIER_FACTOR`` x the median;
    - the loss is the mean over all mini-batches of the last report interval (each peer weighted by its mini-steps);
      with 3 or more peers, a loss outside [median / 2, 2 x median] is left out (honest peers train the same model);
    - with ``target_batch_size``, samples count for at most what the swarm's epochs hold: (epoch + 2) x target.
    """
    live = {k: r for k, r in records.items() if now - r.time <= stale_after}
    if not live:
        return SwarmView()
    epoch = int(statistics.median_high(r.epoch for r in live.values()))
    sps_cap = _capped([r.samples_per_second for r in live.values()])
    steps_cap = _capped([float(r.mini_steps) for r in live.values()])
    weighted = [(r.loss, min(r.mini_steps, steps_cap)) for r in live.values() if r.mini_steps > 0]
    if len(weighted) >= 3:
        median_loss = statistics.median(loss for loss, _ in weighted)
        weighted = [(loss, w) for loss, w in weighted if median_loss / 2 <= loss <= 2 * median_loss]
    steps = sum(w for _, w in weighted)
    samples_cap = (epoch + 2) * target_batch_size if target_batch_size else float("inf")
    rates = {k: min(r.samples_per_second, sps_cap) for k, r in live.items()}
    busiest = sorted(rates.items(), key=lambda item: item[1], reverse=True)[:MAX_PEER_LABELS]
    return SwarmView(
        peers=len(live),
        epoch=epoch,
        samples_per_second=sum(rates.values()),
        loss=sum(loss * w for loss, w in weighted) / steps if steps else float("nan"),
        samples=int(min(sum(min(r.samples_total, samples_cap) for r in live.values()), samples_cap)),
        per_peer={peer_label(k): sps for k, sps in busiest},
    )
