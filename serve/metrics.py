"""The server's Prometheus metrics: every name once, here (prefix ``bertswarm_serve_``, base units, counters exposed
with ``_total``, labels of bounded cardinality: endpoints are the server's routes, codes its HTTP statuses)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "bertswarm_serve_"
REQUEST_SECONDS = PREFIX + "request_duration_seconds"  # histogram, label endpoint
REQUESTS = PREFIX + "requests"  # counter, labels endpoint and code: exposed as bertswarm_serve_requests_total
STEP = PREFIX + "checkpoint_step"  # gauge: the step (epoch) of the checkpoint being served, NaN before the first
RELOADS = PREFIX + "reloads"  # counter, label outcome: loaded | refused | failed
BATCH_SIZE = PREFIX + "batch_size"  # histogram: inputs per model call

ENDPOINTS = ("fill-mask", "classify")
RELOAD_OUTCOMES = ("loaded", "refused", "failed")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """One registry per server (no global state: tests run several servers in one process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.request_seconds = Histogram(REQUEST_SECONDS, "Time from request to answer, by endpoint", ["endpoint"],
                                         buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.requests = Counter(REQUESTS, "Answered requests by endpoint and HTTP status code", ["endpoint", "code"],
                                registry=r)  # fmt: skip
        self.step = Gauge(STEP, "Step (epoch) of the checkpoint being served; NaN before the first", registry=r)
        self.step.set(math.nan)
        self.reloads = Counter(RELOADS, "Checkpoint loads by outcome (refused: failed verification)", ["outcome"],
                               registry=r)  # fmt: skip
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)
        self.batch_size = Histogram(BATCH_SIZE, "Inputs per model call (dynamic batching)", buckets=BATCH_BUCKETS,
                                    registry=r)  # fmt: skip
        for endpoint in ENDPOINTS:
            self.request_seconds.labels(endpoint)
