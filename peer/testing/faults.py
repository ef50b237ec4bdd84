"""Test-only fault injection, read from environment variables inside the peer process (never a CLI flag, never for
users; like hivemind's own test hooks). The fault suite in ``tests/faults`` sets them on one peer of a local swarm.
This package is not in the wheel; ``peer.hooks`` loads it only when one of the variables is set, and warns loudly.

- ``BERTSWARM_TEST_PAUSE_FILE=PATH``: while PATH exists the peer takes no steps (it keeps reporting). If PATH holds a
  step number, the peer trains on until its step reaches it, then holds there: every peer of a swarm holds at that
  one step, even those one round behind when the file appeared.

- ``BERTSWARM_TEST_NONFINITE_GRADS=1``: after the peer's own finite check, its gradients are replaced by NaN/Inf, so
  it *sends* non-finite contributions to the swarm (a buggy or hostile peer that skipped the check).
- ``BERTSWARM_TEST_LIE=1``: the peer's ``{run}_progress`` records take turns claiming absurd samples and throughput
  within the schema's bounds, an epoch a million steps ahead, and values beyond the bounds; its signed metrics record
  claims absurd figures (step 10^9, 10^15 samples, loss 0).
- ``BERTSWARM_TEST_IGNORE_ALLOWLIST=1``: an outsider of a restricted run: the peer goes on when the run's allowlist
  does not name it (instead of stopping with exit 2), and enforces no allowlist itself, so it tries to average with,
  lead and download from every peer.
- ``BERTSWARM_TEST_ATTACK=PHASES``: a Byzantine sender. After the peer's own finite check (like
  ``BERTSWARM_TEST_NONFINITE_GRADS``), each micro-batch's gradients are replaced, so the accumulated gradient the peer
  *sends* to the all-reduce is corrupted: ``signflip`` sends −1000 × its gradient; ``random`` sends a random direction
  with 10 × its gradient's norm (one direction per global step, the same for every micro-batch of that step, so the
  sent mean keeps 10 × the micro-batches' mean norm: at least 10 × the honest mean's norm). ``PHASES`` is one attack,
  or attacks with the global step each starts at: ``signflip,random@6`` (sign flip, then random from step 6; the
  step is the trainer's ``opt.local_epoch``, read through ``install``, which the peer calls at start). Sync mode:
  the peer steps with whatever its group returns, as every honest peer does, so its own weights stay the swarm's
  unless its round fails (then it steps with its own corrupted gradient, clipped to ``max_grad_norm``, and its drift
  enters the next parameter averaging). DiLoCo: the corrupted gradients drive the peer's inner AdamW steps, so it
  sends a pseudo-gradient in the wrong (or a random) direction of about an honest size, not ×1000.
- ``BERTSWARM_TEST_WATCH_DIR=DIR``: a probe thread writes the stage of the peer's current gradient averaging round to
  ``DIR/stage`` (so a test can crash a peer while a round is under way) and appends a fingerprint of the parameters
  (two float64 projections) to ``DIR/fingerprints.jsonl`` after every step (to compare peers' weights while they run),
  with one of the optimizer's state (per-key sums of its tensors, the learning rates, the epoch) under ``opt``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import torch
from hivemind.utils import get_dht_time

from peer.store.atomic import atomic_write_text

NONFINITE_GRADS = os.environ.get("BERTSWARM_TEST_NONFINITE_GRADS") == "1"
LIE = os.environ.get("BERTSWARM_TEST_LIE") == "1"
WATCH_DIR = os.environ.get("BERTSWARM_TEST_WATCH_DIR")
PAUSE_FILE = os.environ.get("BERTSWARM_TEST_PAUSE_FILE")
IGNORE_ALLOWLIST = os.environ.get("BERTSWARM_TEST_IGNORE_ALLOWLIST") == "1"
ATTACK_VARIABLE = "BERTSWARM_TEST_ATTACK"
SIGN_FLIP_SCALE = -1000.0  # BTARD's sign-flip attack (arXiv 2106.11257)
RANDOM_NORM_FACTOR = 10.0
RANDOM_SEED = 11257  # + the global step: one direction per step, the same in every run
ATTACKS = ("signflip", "random")


def ignore_allowlist() -> bool:
    return IGNORE_ALLOWLIST


def paused(step: int) -> bool:
    """While the pause file exists, the peer (at ``step``) takes no steps but stays in the swarm and keeps reporting,
    so a test can compare every peer's weights with a checkpoint at one known step. A step number in the file holds
    the peer only from that step on: a pause that begins mid-round, seen by one groupmate before its step and by the
    other after, would otherwise hold them one step apart."""
    if not PAUSE_FILE:
        return False
    try:
        text = Path(PAUSE_FILE).read_text().strip()
    except FileNotFoundError:
        return False
    return not text or step >= int(text)


def install(trainer) -> None:
    _attack.trainer = trainer  # the attack's schedule and random directions follow the trainer's global step
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


def _optimizer_print(trainer) -> list[float]:
    """Sums of the inner optimizer's state tensors per key (sorted by key), its learning rates, then the epoch."""
    inner = trainer.opt.state_averager.optimizer
    sums = {}
    with torch.no_grad():
        for state in inner.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    sums[key] = sums.get(key, 0.0) + float(value.double().sum())
    lrs = [float(group["lr"]) for group in inner.param_groups]
    return [sums[key] for key in sorted(sums)] + lrs + [float(trainer.opt.state_averager.local_epoch)]


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
                line = json.dumps({"epoch": epoch, "time": time.time(), "fp": prints, "opt": _optimizer_print(trainer)})
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


def parse_attack(value: str | None) -> list[tuple[int, str]]:
    """``BERTSWARM_TEST_ATTACK``'s value as ``[(first global step, attack), ...]`` in step order; ``[]`` when unset.
    ``"signflip"`` -> ``[(0, "signflip")]``; ``"signflip,random@6"`` -> ``[(0, "signflip"), (6, "random")]``."""
    if not value:
        return []
    phases = []
    for item in value.split(","):
        name, _, start = item.strip().partition("@")
        if name not in ATTACKS or (start and not start.isdigit()):
            raise ValueError(f"{ATTACK_VARIABLE}={value!r}: expected ATTACK[@STEP],... with ATTACK in {ATTACKS}")
        phases.append((int(start) if start else 0, name))
    if [start for start, _ in phases] != sorted({start for start, _ in phases}):
        raise ValueError(f"{ATTACK_VARIABLE}={value!r}: the phases' steps must increase")
    return phases


class _Attack:
    """The Byzantine sender of ``BERTSWARM_TEST_ATTACK`` (see the module docstring)."""

    def __init__(self, phases: list[tuple[int, str]]):
        self.phases, self.trainer = phases, None

    def current(self, epoch: int) -> str | None:
        started = [name for start, name in self.phases if start <= epoch]
        return started[-1] if started else None

    def epoch(self) -> int:
        if self.trainer is None:
            if any(start > 0 for start, _ in self.phases):
                raise RuntimeError(f"{ATTACK_VARIABLE} with steps needs the trainer: call hooks.install(trainer)")
            return 0
        return int(self.trainer.opt.local_epoch)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> None:
        epoch = self.epoch()
        attack = self.current(epoch)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if attack is None or not grads:
            return
        if attack == "signflip":
            for g in grads:
                g.mul_(SIGN_FLIP_SCALE)
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        generator = torch.Generator().manual_seed(RANDOM_SEED + epoch)  # fresh each global step
        noise = [torch.randn(g.shape, generator=generator, dtype=g.dtype) for g in grads]
        noise_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(n) for n in noise]))
        scale = RANDOM_NORM_FACTOR * norm / noise_norm
        for g, n in zip(grads, noise, strict=True):
            g.copy_(n.mul_(scale))


_attack = _Attack(parse_attack(os.environ.get(ATTACK_VARIABLE)))


def corrupt_gradients(model: torch.nn.Module) -> None:
    """The fault suite's senders: non-finite gradients (``BERTSWARM_TEST_NONFINITE_GRADS``) or a Byzantine attack
    (``BERTSWARM_TEST_ATTACK``); called after the peer's own finite check, before the optimizer accumulates them."""
    _attack(model)
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
