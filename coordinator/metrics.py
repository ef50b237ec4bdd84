"""The coordinator's Prometheus metrics (names come from ``peer.telemetry``, where every name is defined)."""

from __future__ import annotations

import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge

from coordinator.aggregate import SwarmView
from peer import telemetry as names


class SwarmMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.peers = Gauge(names.SWARM_PEERS, "Training peers with a live metrics record", registry=r)
        self.epoch = Gauge(names.SWARM_EPOCH, "The swarm's global optimizer step (median of the peers')", registry=r)
        self.samples_per_second = Gauge(names.SWARM_SAMPLES_PER_SECOND, "Sum of the peers' throughput", registry=r)
        self.loss = Gauge(names.SWARM_LOSS, "Training MLM loss, averaged over the peers' mini-batches", registry=r)
        self.samples = Gauge(names.SWARM_SAMPLES, "Samples processed by the live peers (sum)", registry=r)
        self.peer_samples_per_second = Gauge(
            names.SWARM_PEER_SAMPLES_PER_SECOND, "Throughput of each of the busiest peers", ["peer"], registry=r
        )
        self.eval_loss = Gauge(names.EVAL_LOSS, "Held-out MLM loss of the last published checkpoint", registry=r)
        self.eval_accuracy = Gauge(names.EVAL_ACCURACY, "Held-out MLM accuracy of the last checkpoint", registry=r)
        self.checkpoint_epoch = Gauge(names.CHECKPOINT_EPOCH, "Global step of the last published checkpoint",
                                      registry=r)  # fmt: skip
        self.checkpoint_age = Gauge(names.CHECKPOINT_AGE, "Seconds since the last checkpoint was published",
                                    registry=r)  # fmt: skip
        self.checkpoint_write_seconds = Gauge(names.CHECKPOINT_WRITE_SECONDS, "Duration of the last checkpoint write",
                                              registry=r)  # fmt: skip
        self.checkpoints = Counter(names.CHECKPOINTS, "Checkpoint attempts by outcome", ["outcome"], registry=r)
        for outcome in ("published", "failed"):
            self.checkpoints.labels(outcome)
        for gauge in (self.eval_loss, self.eval_accuracy, self.checkpoint_epoch, self.checkpoint_write_seconds):
            gauge.set(math.nan)  # "no checkpoint yet", not a loss of 0 in the dashboards
        self.last_checkpoint_time: float | None = None
        self.checkpoint_age.set_function(
            lambda: time.time() - self.last_checkpoint_time if self.last_checkpoint_time else math.nan
        )

    def update(self, view: SwarmView) -> None:
        self.peers.set(view.peers)
        self.epoch.set(view.epoch)
        self.samples_per_second.set(view.samples_per_second)
        self.loss.set(view.loss)
        self.samples.set(view.samples)
        self.peer_samples_per_second.clear()
        for label, value in view.per_peer.items():
            self.peer_samples_per_second.labels(label).set(value)

    def checkpoint_published(self, epoch: int, eval_metrics: dict, seconds: float, created: float) -> None:
        self.checkpoint_epoch.set(epoch)
        self.eval_loss.set(eval_metrics["mlm_loss"])
        self.eval_accuracy.set(eval_metrics["mlm_accuracy"])
        self.checkpoint_write_seconds.set(seconds)
        self.last_checkpoint_time = created
        self.checkpoints.labels("published").inc()
