"""Test-only fault injection, read from environment variables inside the peer process (never a CLI flag, never for
users; like hivemind's own test hooks). The fault suite in ``tests/faults`` sets them on one peer of a local swarm.
This package is not in the wheel; ``peer.hooks`` loads it only when one of the variables is set, and warns loudly.

- ``BERTSWARM_TEST_PAUSE_FILE=PATH``: while PATH exists the peer takes no steps (it keeps reporting).

- ``BERTSWARM_TEST_NONFINITE_GRADS=1``: after the peer's own finite check, its gradients are replaced by NaN/Inf, so
  it *sends* non-finite contributions to the swarm (a buggy or hostile peer that skipped the check).
- ``BERTSWARM_TEST_LIE=1``: the peer's ``{run}_progress`` records take turns claiming absurd samples and throughput
  within the schema's bounds, an epoch a million steps ahead, and values beyond the bounds; its signed metrics record
  claims absurd figures (step 10^9, 10^15 samples, loss 0).
- ``BERTSWARM_TEST_IGNORE_ALLOWLIST=1``: an outsider of a restricted run: the peer goes on when the run's allowlist
  does not name it (instead of stopping with exit 2), and enforces no allowlist itself, so it tries to average with,
  lead and download from every peer.
- ``BERTSWARM_TEST_WATCH_DIR=DIR``: a probe thread writes the stage of the peer's current gradient averaging round to
  ``DIR/stage`` (so a test can crash a peer while a round is under way) and appends a fingerprint of the parameters
  (two float64 projections) to ``DIR/fingerprints.jsonl`` after every step (to compare peers' weights while they run).
"""

from __future__ import annotations

import json
import os
import threading
import time

import torch
from hivemind.utils import get_dht_time

from peer.store.atomic import atomic_write_text

NONFINITE_GRADS = os.environ.get("BERTSWARM_TEST_NONFINITE_GRADS") == "1"
LIE = os.environ.get("BERTSWARM_TEST_LIE") == "1"
WATCH_DIR = os.environ.get("BERTSWARM_TEST_WATCH_DIR")
PAUSE_FILE = os.environ.get("BERTSWARM_TEST_PAUSE_FILE")
IGNORE_ALLOWLIST = os.environ.get("BERTSWARM_TEST_IGNORE_ALLOWLIST") == "1"


def ignore_allowlist() -> bool:
    return IGNORE_ALLOWLIST


def paused() -> bool:
    """While the pause file exists, the peer takes no steps but stays in the swarm and keeps reporting, so a test can
    compare every peer's weights with a checkpoint at one known step."""
    return bool(PAUSE_FILE) and os.path.exists(PAUSE_FILE)


def install(trainer) -> None:
    install_lies(trainer)
    if WATCH_DIR:
        threading.Thread(target=_watch, args=(trainer, WATCH_DIR), name="bertswarm-test-probe", daemon=True).start()


def fingerprint(model: torch.nn.Module) -> list[float]:
    """Two projections of all parameters: equal weights give equal numbers; any NaN/Inf shows as non-finite."""
    total, projected = 0.0, 0.0
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            flat = p.detach().double().flatten()
            total += float(flat.sum())
            weights = torch.linspace(-1.0, 1.0, flat.numel(), dtype=torch.float64) * (1 + i % 7)
            projected += float((flat * weights).sum())
    return [total, projected]


def _write(path: str, text: str) -> None:
    atomic_write_text(path, text, durable=False)  # read by the test while the peer runs; no fsync delays the probe


def _watch(trainer, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    stage_path, prints_path = os.path.join(directory, "stage"), os.path.join(directory, "fingerprints.jsonl")
    last_stage, last_epoch = None, None
    while True:
        control = trainer.opt.scheduled_grads
        try:
            stage = control.stage.name if control is not None and not control.done() else "IDLE"
        except Exception:  # the control's shared memory may be gone while the round ends
            stage = "IDLE"
        if stage != last_stage:
            _write(stage_path, stage)
            last_stage = stage
        epoch = trainer.opt.local_epoch
        if epoch != last_epoch:
            # the epoch moves before hivemind applies the step (and averages state): wait for opt.step to return
            mini_steps, deadline = trainer.mini_steps, time.monotonic() + 30
            while trainer.mini_steps == mini_steps and time.monotonic() < deadline:
                time.sleep(0.01)
            prints = fingerprint(trainer.model)
            if trainer.opt.local_epoch == epoch:
                line = json.dumps({"epoch": epoch, "time": time.time(), "fp": prints})
                with open(prints_path, "a") as f:
                    f.write(line + "\n")
                last_epoch = epoch
        time.sleep(0.01)


class _LyingDHT:
    """The tracker's view of the DHT: progress records it stores take turns lying; everything else passes through."""

    def __init__(self, dht, key: str):
        self._dht, self._key, self._calls = dht, key, 0

    def __getattr__(self, name):
        return getattr(self._dht, name)

    def store(self, *args, **kwargs):
        value = kwargs.get("value")
        if kwargs.get("key") == self._key and isinstance(value, dict):
            self._calls += 1
            lie = self._calls % 3
            if lie == 0:  # within the schema's bounds, absurd for the swarm: samples, throughput, a time long ago
                update = dict(samples_accumulated=10**8, samples_per_second=1e5, time=get_dht_time() - 3600.0)
            elif lie == 1:  # a million steps ahead
                update = dict(epoch=value["epoch"] + 10**6, samples_accumulated=10**8)
            else:  # beyond the schema's bounds
                update = dict(samples_accumulated=10**12, samples_per_second=1e9)
            kwargs["value"] = dict(value, **update)
        return self._dht.store(*args, **kwargs)


def corrupt_gradients(model: torch.nn.Module) -> None:
    if not NONFINITE_GRADS:
        return
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if p.grad is not None:
                p.grad.fill_(float("nan") if i % 2 == 0 else float("inf"))


def install_lies(trainer) -> None:
    """Make ``trainer``'s progress and metrics records lie (see the module docstring)."""
    if not LIE:
        return
    from peer.run import schema

    tracker = trainer.opt.tracker
    tracker.dht = _LyingDHT(tracker.dht, tracker.training_progress_key)  # only what it stores lies: it trains honestly
    publisher = trainer.publisher

    def lying_publish(**_honest):
        if publisher._pending is not None and not publisher._pending.done():
            return
        record = dict(epoch=10**9, samples_per_second=schema.MAX_SAMPLES_PER_SECOND, samples_total=10**15,
                      loss=0.0, mini_steps=10**9, time=float(time.time()), client_mode=False)  # fmt: skip
        publisher.store(record)

    publisher.publish = lying_publish
