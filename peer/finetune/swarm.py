"""Fine-tuning together: ``bertswarm-finetune --swarm`` starts a fine-tuning run and prints a join line,
``bertswarm-finetune --join MADDR`` takes part in one. Pre-training's machinery, reused as it is:

- the DHT node (``peer.swarm.dht.start_dht``: identity file, addresses, lifeline of hivemind's helpers, one-line
  errors), with the same records and validators (``peer.swarm.records``);
- the creator-signed manifest (:class:`~peer.finetune.manifest.FinetuneManifest`, published under ``{run}_manifest``
  by every member like pre-training's), found and trusted the way ``peer.join`` does it (the creator the ``--join``
  peer vouches for, or the one pinned in ``<state-dir>/trusted-runs.json`` at an earlier join);
- the optimizer (``peer.swarm.optim.make_optimizer``: ``hivemind.Optimizer`` with clipping of the averaged gradient,
  warm-up and linear decay keyed to the global step, the robust ``--aggregation``, departures, state downloads for a
  late joiner), and the peer's stop signal and orderly leave (``peer.trainer``).

Each peer trains on its own labelled data and validates on its own validation split at the end of every epoch of the
run (the same global steps on every peer, ``FinetuneManifest.steps_per_epoch``), keeps its best weights, stops early
after ``--patience`` epochs without a better accuracy (it then leaves; the others go on), and writes its own
``--output`` as the single-machine command does. A joiner whose base checkpoint, labels or tokenizer differ from the
run's, or whose explicit flags contradict it, is refused in one line (exit code 2) before it trains.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import hivemind
import torch
from hivemind.utils.crypto import RSAPrivateKey

from peer import join
from peer.config import PeerConfig
from peer.data.tokenizer import tokenizer_fingerprint
from peer.errors import UserError
from peer.finetune.data import Encoder, Example, batches
from peer.finetune.manifest import DEFAULT_RUN_ID, FinetuneManifest, check_joiner, steps_per_epoch
from peer.finetune.metrics import majority_baseline
from peer.finetune.model import Init, build_classifier
from peer.finetune.train import BestWeights, Result
from peer.swarm import dht as swarm_dht
from peer.swarm import hivemind_compat, records
from peer.swarm.optim import SwarmOptimizer, is_finite_gradient, make_optimizer
from peer.trainer import REPUBLISH_EVERY, StopSignal, _leave_swarm, _run_shutdown_step

logger = logging.getLogger(__name__)

JOIN_PREFIX = "bertswarm-finetune --join "
PROGRESS_EVERY = 10.0  # seconds between "global step" log lines


@dataclass
class SwarmRun:
    """What a swarm fine-tuning leaves for ``metrics.json``: the model (best weights loaded), the loop's result, the
    run it took part in and how its averaging rounds went."""

    model: torch.nn.Module
    result: Result
    manifest: FinetuneManifest
    global_step: int
    rounds: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"run_id": self.manifest.run_id, "manifest": self.manifest.model_dump(mode="json"),
                "fingerprint": self.manifest.fingerprint, "global_step": self.global_step,
                "rounds": dict(sorted(self.rounds.items()))}  # fmt: skip


def new_manifest(cfg, init: Init, labels: list[str], train_examples: int, max_length: int) -> FinetuneManifest:
    """The manifest the creator publishes, from its settings, its base and its data (bounds: one line naming the
    setting)."""
    target = cfg.target_batch_size
    run_id = cfg.run_id or DEFAULT_RUN_ID
    try:
        return FinetuneManifest(kind="finetune", run_id=run_id, task=cfg.task or run_id, labels=tuple(labels),
                                base_sha256=init.base_sha256, preset=init.preset,
                                tokenizer_fingerprint=tokenizer_fingerprint(init.tokenizer), max_length=max_length,
                                init_seed=cfg.seed, target_batch_size=target, lr=cfg.lr,
                                weight_decay=cfg.weight_decay, epochs=cfg.epochs,
                                steps_per_epoch=steps_per_epoch(train_examples, target),
                                aggregation=cfg.aggregation, min_peers=cfg.min_peers)  # fmt: skip
    except ValueError as e:  # pydantic's ValidationError
        raise UserError(f"cannot start a fine-tuning run with these settings ({_first_error(e)}); pick values in the "
                        "allowed range") from None  # fmt: skip


def _first_error(error: ValueError) -> str:
    errors = getattr(error, "errors", None)
    if errors is None:
        return str(error)
    first = errors()[0]
    return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"


def wait_for_run(dht: hivemind.DHT, run_id: str | None, timeout: float, *, bootstrap: set[str],
                 pinned: dict[str, str], stop: StopSignal | None = None) -> join.FoundRun:  # fmt: skip
    """The fine-tuning run to join and its creator-signed manifest: ``peer.join.wait_for_run``'s choice (which run,
    which creator: ``join._choose``) over the copies that parse as fine-tuning manifests. ``stop``: Ctrl-C ends the
    wait (``KeyboardInterrupt``)."""
    deadline = time.monotonic() + timeout
    while stop is None or not stop.is_set():
        candidates = [run_id] if run_id else records.discover_runs(dht)
        copies = {rid: records.fetch_manifests(dht, rid, FinetuneManifest.from_json) for rid in candidates}
        found = [run for rid in candidates if (run := join._choose(rid, copies[rid], bootstrap, pinned.get(rid)))]
        mine = [run for run in found if run.via_bootstrap]
        if len(found) == 1 and (run_id or len(candidates) == 1):
            return join._report(found[0])
        if not run_id and len(mine) == 1:
            return join._report(mine[0])
        if time.monotonic() > deadline:
            what = f"fine-tuning run {run_id!r}" if run_id else "fine-tuning run"
            unparsed = any(c.creator and c.manifest is None for run_copies in copies.values() for c in run_copies)
            other = " (its peers take part in a pre-training run: join those with bertswarm-peer)" if unparsed else ""
            several = f"; the swarm hosts {len(found)}: pass --run-id" if len(found) > 1 else ""
            raise UserError(f"found no {what} through the bootstrap peer within the startup timeout{other}{several}; "
                            "check the --join address (copy it from the run's join line) and --run-id, or raise "
                            "--startup-timeout")  # fmt: skip
        time.sleep(0.5)
    raise KeyboardInterrupt


def fine_tune(cfg, explicit: set[str], init: Init, train: Sequence[Example], validation: Sequence[Example],
              labels: list[str], max_length: int, report: Callable[[dict], None], out) -> SwarmRun:  # fmt: skip
    """Start (``cfg.swarm``) or join (``cfg.join``) a fine-tuning run, train this peer's part of it and leave; the
    returned model holds this peer's best validation weights. Raises ``KeyboardInterrupt`` when stopped by a signal
    (nothing is to be written then, as in the single-machine command)."""
    hivemind_compat.check_version()  # bertswarm patches this hivemind's internals
    stop = StopSignal().install()
    settings = cfg.dht_settings()
    mine = new_manifest(cfg, init, labels, len(train), max_length) if cfg.swarm else None  # bounds, before p2pd
    dht = swarm_dht.start_dht(settings, records.registry_validators())
    opt = None
    try:
        signed = _create(mine) if mine is not None else _join(dht, cfg, settings, explicit, init, labels, stop)
        run = FinetuneManifest.from_json(signed.manifest)
        subkey = records.install_run_validators(dht, run.run_id)
        publish = partial(records.publish_manifest, dht, signed, subkey, FinetuneManifest.from_json)
        publish()  # every member republishes the creator's copy: the run outlives its creator
        join._pin(settings.state_path, run.run_id, signed.creator)
        addresses = swarm_dht.join_addresses(dht)
        if cfg.address_file:  # before the join line, so whoever saw the line finds the file
            swarm_dht.write_address_file(cfg.address_file, addresses[0])
        print(f"{JOIN_PREFIX}{addresses[0]}", file=out, flush=True)
        logger.info("fine-tuning run %s (manifest %s): %s, %d labels, %d epochs of %d global steps, target batch %d",
                    run.run_id, run.fingerprint[:12], run.task, len(run.labels), run.epochs, run.steps_per_epoch,
                    run.target_batch_size)  # fmt: skip
        model = build_classifier(init, list(run.labels), run.init_seed)
        rounds: collections.Counter[str] = collections.Counter()
        batch_size = min(cfg.batch_size, local_batch_limit(run))
        opt = make_optimizer(model, run, dht, batch_size=batch_size, matchmaking_time=cfg.matchmaking_time,
                             averaging_timeout=cfg.averaging_timeout,
                             on_round=lambda outcome, size, seconds: rounds.update([outcome]))  # fmt: skip
        stop.install()  # hivemind's averagers set SIGINT to SIG_IGN in this process when they start; undo that
        stop.on_stop.append(opt.cancel_matchmaking)
        opt.catch_up(cfg.startup_timeout)  # a late joiner downloads the run's current weights first
        loop = _Loop(model, opt, run, Encoder(init.tokenizer, run.max_length), labels, batch_size, cfg.seed,
                     cfg.patience, report, republish=publish)  # fmt: skip
        result = loop.train(train, validation, stop)
        return SwarmRun(model, result, run, opt.local_epoch, dict(rounds))
    finally:
        stop.cancel_deadline()
        _leave(dht, opt)


def local_batch_limit(run: FinetuneManifest) -> int:
    """The largest local batch: the target batch, or half of it when the run waits for ``min_peers``, so that a
    peer's first batch never completes a global step alone (it is what makes the peer visible to the others)."""
    return run.target_batch_size if run.min_peers == 1 else max(1, run.target_batch_size // 2)


def _create(manifest: FinetuneManifest):
    return records.sign_manifest(manifest, RSAPrivateKey.process_wide())


def _join(dht, cfg, settings: PeerConfig, explicit: set[str], init: Init, labels: list[str], stop: StopSignal):
    found = wait_for_run(dht, cfg.run_id, cfg.startup_timeout, bootstrap=join.bootstrap_peer_ids(cfg.join),
                         pinned=join.read_pins(settings.state_path), stop=stop)  # fmt: skip
    check_joiner(found.manifest, labels=labels, base_sha256=init.base_sha256, preset=init.preset,
                 tokenizer_fingerprint=tokenizer_fingerprint(init.tokenizer),
                 explicit={name: getattr(cfg, name) for name in explicit})  # fmt: skip
    return found.signed


def _leave(dht: hivemind.DHT, opt: SwarmOptimizer | None) -> None:
    """The peer's orderly leave (``peer.trainer._shutdown``, less the state save): withdraw from matchmaking and the
    progress records, stop the optimizer's averagers, then the DHT; each step runs even if an earlier one failed."""
    with swarm_dht.keep_request_futures(dht) as stores:
        steps = [] if opt is None else [partial(_leave_swarm, opt, stores), opt.shutdown]
        for step in [*steps, partial(swarm_dht.stop_dht, dht)]:
            _run_shutdown_step(step)


class _Loop:
    """This peer's part of the run: passes over its own data in its own shuffled order, one ``hivemind`` step per
    local batch, validation at the end of each of the run's epochs (a global step count every peer reaches)."""

    def __init__(self, model, opt: SwarmOptimizer, run: FinetuneManifest, encoder: Encoder, labels: list[str],
                 batch_size: int, seed: int, patience: int, report: Callable[[dict], None],
                 republish: Callable[[], None]):  # fmt: skip
        self.model, self.opt, self.run, self.encoder = model, opt, run, encoder
        self.label_ids = {label: i for i, label in enumerate(labels)}
        self.batch_size, self.seed, self.patience, self.report, self.republish = (batch_size, seed, patience, report,
                                                                                  republish)  # fmt: skip
        self._last_publish = self._last_progress = time.monotonic()

    def train(self, train: Sequence[Example], validation: Sequence[Example], stop: StopSignal) -> Result:
        run, opt = self.run, self.opt
        keeper = BestWeights(self.model, validation, self.encoder, self.label_ids, self.batch_size, self.patience,
                             self.report)  # fmt: skip
        gold = [self.label_ids[e.label] for e in validation]
        baseline = majority_baseline([self.label_ids[e.label] for e in train], gold, len(self.label_ids))
        generator = torch.Generator().manual_seed(self.seed)
        losses: list[float] = []
        stopped_early, gathered = False, run.min_peers == 1

        def evaluate() -> bool:
            step = opt.local_epoch
            loss = sum(losses) / len(losses) if losses else math.nan
            losses.clear()
            return keeper.evaluate(step // run.steps_per_epoch, loss, step=step)  # the run's epochs completed

        next_eval = (opt.local_epoch // run.steps_per_epoch + 1) * run.steps_per_epoch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # dropout
            while not stopped_early and opt.local_epoch < run.total_steps and not stop.is_set():
                self.model.train()
                order = torch.randperm(len(train), generator=generator).tolist()
                for batch in batches(train, self.encoder, self.label_ids, self.batch_size, order):
                    if stop.is_set() or opt.local_epoch >= run.total_steps:
                        break
                    loss = self._step(batch)
                    if loss is not None:
                        losses.append(loss)
                    if not gathered:
                        self._wait_for_peers(stop)
                        gathered = True
                    if opt.local_epoch >= next_eval:
                        stopped_early = evaluate()
                        next_eval = (opt.local_epoch // run.steps_per_epoch + 1) * run.steps_per_epoch
                        self.model.train()
                        if stopped_early:
                            logger.info("no better validation accuracy in %d epochs: leaving the run", self.patience)
                            break
                    self._tick()
        if stop.is_set():
            raise KeyboardInterrupt
        if not keeper.history or keeper.history[-1]["step"] != opt.local_epoch:
            evaluate()  # where this peer's part ended, if no epoch boundary was scored there
        keeper.restore()
        return Result(keeper.best, baseline, keeper.best_epoch, len(keeper.history), stopped_early, keeper.history)

    def _step(self, batch: dict[str, torch.Tensor]) -> float | None:
        """One local batch into the swarm's step; a non-finite loss or gradient never leaves this peer."""
        loss = self.model(**batch).loss
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value) or not is_finite_gradient(self.model):
            logger.warning("dropped a batch with non-finite loss or gradients (loss=%s)", value)
            self.opt.zero_grad()
            return None
        self.opt.step(batch_size=int(batch["labels"].shape[0]))
        self.opt.zero_grad()
        return value

    def _wait_for_peers(self, stop: StopSignal) -> None:
        """Until the swarm's progress records name ``min_peers`` peers, this one included: each peer waits after its
        first local batch, whose progress record (hivemind publishes one once a peer has samples to count) is what
        makes it visible to the others. Without this wait, the first peer of a short run with a small target batch
        took every global step alone before the others had started. Ctrl-C ends the wait like training."""
        last_log = -math.inf
        while not stop.is_set():
            peers = self.opt.tracker.global_progress.num_peers
            if peers >= self.run.min_peers:
                return
            if time.monotonic() - last_log > PROGRESS_EVERY:
                last_log = time.monotonic()
                logger.info("waiting for peers: %d of the %d the run starts with are here", peers, self.run.min_peers)
            stop.event.wait(0.2)

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_publish > REPUBLISH_EVERY:  # the manifest outlives its creator only if members republish
            self._last_publish = now
            self.republish()
        if now - self._last_progress > PROGRESS_EVERY:
            self._last_progress = now
            progress = self.opt.progress()
            logger.info("global step %d of %d; %d peers; %s", self.opt.local_epoch, self.run.total_steps,
                        progress.peers, progress.text)  # fmt: skip
