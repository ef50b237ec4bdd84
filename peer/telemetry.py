"""Metric names (defined once) and the peer's Prometheus exporter (its signed DHT record: ``peer.swarm.records``).

Prometheus conventions: prefix ``bertswarm_``, base units, counters end in ``_total``, labels of bounded cardinality.
Dashboards, alert rules and the coordinator take their names from here.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from peer.errors import UserError
from peer.run.schema import REJECT_REASONS

logger = logging.getLogger(__name__)

PEER_EPOCH = "bertswarm_peer_epoch"
PEER_LOSS = "bertswarm_peer_loss"
PEER_SAMPLES_PER_SECOND = "bertswarm_peer_samples_per_second"
PEER_SAMPLES = "bertswarm_peer_samples"  # counter: exposed as bertswarm_peer_samples_total
PEER_AVERAGING_ROUNDS = "bertswarm_peer_averaging_rounds"  # counter with label outcome
PEER_ROUND_DURATION = "bertswarm_peer_averaging_round_duration_seconds"
PEER_GROUP_SIZE = "bertswarm_peer_averaging_group_size"
PEER_SWARM_SIZE = "bertswarm_peer_swarm_size"
PEER_SKIPPED_BATCHES = "bertswarm_peer_skipped_batches"  # counter with label reason
PEER_STATE_DOWNLOADS = "bertswarm_peer_state_downloads"  # counter
PEER_STATE_DOWNLOAD_SECONDS = "bertswarm_peer_state_download_seconds"
PEER_LEARNING_RATE = "bertswarm_peer_learning_rate"
PEER_SKIPPED_SHARDS = "bertswarm_peer_skipped_shards"  # counter: prepared-data shards skipped as corrupt or missing

# coordinator (swarm-level view built from the peers' signed DHT records)
SWARM_PEERS = "bertswarm_swarm_peers"
SWARM_EPOCH = "bertswarm_swarm_epoch"
SWARM_SAMPLES_PER_SECOND = "bertswarm_swarm_samples_per_second"
SWARM_LOSS = "bertswarm_swarm_loss"
SWARM_SAMPLES = "bertswarm_swarm_samples"  # gauge: sum of live peers' reported samples
SWARM_PEER_SAMPLES_PER_SECOND = "bertswarm_swarm_peer_samples_per_second"  # label peer (bounded)
EVAL_LOSS = "bertswarm_eval_loss"
EVAL_ACCURACY = "bertswarm_eval_accuracy"
CHECKPOINT_EPOCH = "bertswarm_checkpoint_epoch"
CHECKPOINT_AGE = "bertswarm_checkpoint_age_seconds"
CHECKPOINT_WRITE_SECONDS = "bertswarm_checkpoint_write_seconds"
CHECKPOINTS = "bertswarm_checkpoints"  # counter with label outcome

# defences against faulty or lying peers (peer/swarm/guards.py)
PEER_REJECTED_CONTRIBUTIONS = "bertswarm_peer_rejected_contributions"  # counter with label reason: parts dropped
PEER_SKIPPED_STEPS = "bertswarm_peer_skipped_steps"  # counter with label reason: optimizer steps not applied
PEER_IGNORED_PROGRESS_RECORDS = "bertswarm_peer_ignored_progress_records"  # counter: implausible progress records

# DiLoCo mode (peer/swarm/diloco.py): outer rounds, and traffic estimates in both modes
PEER_OUTER_STEP = "bertswarm_peer_outer_step"
PEER_OUTER_ROUNDS = "bertswarm_peer_outer_rounds"  # counter with label outcome
PEER_BYTES_SENT = "bertswarm_peer_bytes_sent"  # counter: averaging traffic (estimated: hivemind counts none)
PEER_BYTES_RECEIVED = "bertswarm_peer_bytes_received"  # counter

# partial: the round finished, but a groupmate was dropped as too slow or some averaged parts never came back, so the
# group's peers now differ slightly (peer.swarm.robust.PartialRounds)
ROUND_OUTCOMES = ("success", "partial", "failed", "solo")
OUTER_ROUND_OUTCOMES = ("success", "partial", "failed", "solo", "reloaded")
SKIP_REASONS = ("nonfinite",)


class PeerTelemetry:
    """All of one peer's Prometheus metrics, in their own registry (tests run several peers in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.epoch = Gauge(PEER_EPOCH, "Global optimizer step (epoch) this peer holds", registry=r)
        self.loss = Gauge(PEER_LOSS, "Mean MLM loss of this peer's recent local batches", registry=r)
        self.samples_per_second = Gauge(PEER_SAMPLES_PER_SECOND, "This peer's recent training throughput", registry=r)
        self.samples = Counter(PEER_SAMPLES, "Samples this peer has processed and contributed", registry=r)
        self.rounds = Counter(PEER_AVERAGING_ROUNDS, "Gradient averaging rounds by outcome", ["outcome"], registry=r)
        self.round_duration = Histogram(
            PEER_ROUND_DURATION,
            "Time from the end of local accumulation to averaged gradients",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
            registry=r,
        )
        self.group_size = Gauge(PEER_GROUP_SIZE, "Peers in this peer's last averaging group", registry=r)
        self.swarm_size = Gauge(PEER_SWARM_SIZE, "Training peers visible in the swarm's progress records", registry=r)
        self.skipped = Counter(PEER_SKIPPED_BATCHES, "Local batches dropped before sending", ["reason"], registry=r)
        self.state_downloads = Counter(PEER_STATE_DOWNLOADS, "Times this peer loaded state from peers", registry=r)
        self.state_download_seconds = Gauge(
            PEER_STATE_DOWNLOAD_SECONDS, "Duration of the last state download from peers", registry=r
        )
        self.learning_rate = Gauge(PEER_LEARNING_RATE, "Current learning rate", registry=r)
        self.skipped_shards = Counter(
            PEER_SKIPPED_SHARDS, "Shards of the prepared dataset skipped (sha256 mismatch, missing or truncated)",
            registry=r,
        )  # fmt: skip
        self.rejected_contributions = Counter(
            PEER_REJECTED_CONTRIBUTIONS,
            "Groupmates' contributions dropped from averaging rounds this peer reduced, by reason",
            ["reason"],
            registry=r,
        )
        self.skipped_steps = Counter(
            PEER_SKIPPED_STEPS, "Optimizer steps not applied (the gradient to apply was not finite)", ["reason"],
            registry=r,
        )  # fmt: skip
        self.ignored_progress_records = Counter(
            PEER_IGNORED_PROGRESS_RECORDS, "Other peers' training-progress records ignored as implausible", registry=r
        )
        self.outer_step = Gauge(PEER_OUTER_STEP, "DiLoCo: outer step this peer holds (0 in sync mode)", registry=r)
        self.outer_rounds = Counter(
            PEER_OUTER_ROUNDS, "DiLoCo outer rounds by outcome (reloaded: this peer was behind and loaded the state)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.bytes_sent = Counter(
            PEER_BYTES_SENT, "Bytes this peer sent in averaging rounds (estimated from the group size)", registry=r
        )
        self.bytes_received = Counter(
            PEER_BYTES_RECEIVED, "Bytes this peer received in averaging rounds (estimated)", registry=r
        )
        for outcome in OUTER_ROUND_OUTCOMES:
            self.outer_rounds.labels(outcome)
        self.skipped_steps.labels("nonfinite")
        for reason in REJECT_REASONS:
            self.rejected_contributions.labels(reason)
        for outcome in ROUND_OUTCOMES:
            self.rounds.labels(outcome)
        for reason in SKIP_REASONS:
            self.skipped.labels(reason)
        self._server = None
        self._synced: dict[int, int] = {}  # counter -> the external total it was last brought up to

    def sync_guard_totals(self, *, rejected: dict[str, int], skipped_steps: int, ignored_records: int) -> None:
        """Bring the guard counters up to the totals counted elsewhere (the optimizer, the averager processes);
        ``rejected``: by reason."""
        for counter, total in (
            *((self.rejected_contributions.labels(reason), count) for reason, count in rejected.items()),
            (self.skipped_steps.labels("nonfinite"), skipped_steps),
            (self.ignored_progress_records, ignored_records),
        ):
            delta = total - self._synced.get(id(counter), 0)
            if delta > 0:
                counter.inc(delta)
                self._synced[id(counter)] = total

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the bound port (useful with port 0)."""
        try:
            self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise UserError(
                f"--metrics-port {port} on {host} is unavailable ({e.strerror}); pick a free port or 0"
            ) from None
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
