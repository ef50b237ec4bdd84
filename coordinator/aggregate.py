"""Turn the peers' signed metrics records into one swarm-level view (pure functions, no I/O)."""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass, field

from peer.schema import PeerMetrics

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


def aggregate(records: dict[bytes, PeerMetrics], now: float, stale_after: float) -> SwarmView:
    """Swarm figures from the live records.

    - records older than ``stale_after`` seconds drop out;
    - the swarm's epoch is the median (high) of the peers' epochs: honest peers are within one step of each other, so
      a minority claiming an absurd step cannot move it;
    - the loss is the mean over all mini-batches of the last report interval (each peer weighted by its mini-steps).
    """
    live = {k: r for k, r in records.items() if now - r.time <= stale_after}
    if not live:
        return SwarmView()
    weighted = [(r.loss, r.mini_steps) for r in live.values() if r.mini_steps > 0]
    steps = sum(w for _, w in weighted)
    busiest = sorted(live.items(), key=lambda item: item[1].samples_per_second, reverse=True)[:MAX_PEER_LABELS]
    return SwarmView(
        peers=len(live),
        epoch=int(statistics.median_high(r.epoch for r in live.values())),
        samples_per_second=sum(r.samples_per_second for r in live.values()),
        loss=sum(loss * w for loss, w in weighted) / steps if steps else float("nan"),
        samples=sum(r.samples_total for r in live.values()),
        per_peer={peer_label(k): r.samples_per_second for k, r in busiest},
    )
