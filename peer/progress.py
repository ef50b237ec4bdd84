"""What a volunteer sees: a live status line on a terminal, plain periodic log lines otherwise.

The same numbers feed the Prometheus gauges and the peer's signed metrics record in the DHT.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

from peer import logs

logger = logging.getLogger(__name__)


@dataclass
class Snapshot:
    epoch: int
    round_text: str  # the mode's progress toward the next step, e.g. "96/192 samples, next step in 4s"
    peers: int
    loss: float
    samples_per_second: float
    samples_total: int
    learning_rate: float

    def line(self) -> str:
        loss = f"{self.loss:.3f}" if math.isfinite(self.loss) else "n/a"
        return (
            f"step {self.epoch} | {self.round_text} | "
            f"{self.peers} peer{'s' if self.peers != 1 else ''} | loss {loss} | {self.samples_per_second:.1f} "
            f"samples/s | lr {self.learning_rate:.2e}"
        )


class Window:
    """Loss and throughput over the interval since the last report."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.loss_sum, self.batches, self.samples = 0.0, 0, 0

    def add(self, loss: float, samples: int) -> None:
        self.loss_sum += loss
        self.batches += 1
        self.samples += samples

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.batches if self.batches else float("nan")

    @property
    def samples_per_second(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.samples / elapsed if elapsed > 0 else 0.0


class StatusDisplay:
    """Rewrites one line in place on a terminal (``peer.logs.Terminal``: log lines are printed above it, never over
    it); a log line per report otherwise (files, pipes, journald; with ``--log-format json`` the numbers are fields);
    nothing with ``--quiet``."""

    def __init__(self) -> None:
        self.live = logs.status_line_wanted()

    def show(self, snapshot: Snapshot) -> None:
        if self.live:
            logs.terminal().show_status(snapshot.line())
        else:
            logger.info(snapshot.line(), extra={"fields": dataclasses.asdict(snapshot)})

    def close(self) -> None:
        if self.live:
            logs.terminal().end_status()
