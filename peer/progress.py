"""What a volunteer sees: a live status line on a terminal, plain periodic log lines otherwise.

The same numbers feed the Prometheus gauges and the peer's signed metrics record in the DHT.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass

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
    """Rewrites one line in place on a TTY; logs a line per report otherwise (files, pipes, journald)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._width = 0

    def show(self, snapshot: Snapshot) -> None:
        text = snapshot.line()
        if self.live:
            self.stream.write("\r" + text.ljust(self._width))
            self.stream.flush()
            self._width = len(text)
        else:
            logger.info(text)

    def close(self) -> None:
        if self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
