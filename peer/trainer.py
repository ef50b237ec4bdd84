"""The training peer, read as steps: prepare, join, load state, then step / report / save until told to stop.

``run(cfg, explicit)`` is the whole life of a peer. Everything the user can get wrong (addresses, data, state dir,
metrics port) is checked *before* the p2p daemon starts, so mistakes are answered in well under a second.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import hashlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import hivemind
import torch

from peer import hooks, join
from peer.config import PeerConfig
from peer.data import corpus, embedded, text_cache
from peer.data.shards import PreparedDataset, is_prepared
from peer.data.stream import ShardStream
from peer.data.tokenizer import TokenizerInfo, default_tokenizer, load_tokenizer, tokenizer_fingerprint
from peer.errors import InputError, UserError
from peer.progress import Snapshot, StatusDisplay, Window
from peer.run.manifest import DEFAULT_RUN_ID, RunManifest, from_config
from peer.run.model import build_model, count_parameters, pretraining_loss
from peer.run.presets import PRESETS
from peer.run.schema import SignedManifest
from peer.store.errors import CheckpointError, StateError
from peer.store.load import load_checkpoint, verify_run
from peer.store.state import SavedState, StateDir
from peer.swarm import dht as swarm
from peer.swarm import guards, hivemind_compat, identity, membership, records
from peer.swarm.diloco import RoundReport
from peer.swarm.diloco_optim import DiLoCoOptimizer
from peer.swarm.optim import SwarmOptimizer, is_finite_gradient, make_optimizer
from peer.swarm.records import MetricsPublisher
from peer.telemetry import OUTER_ROUND_OUTCOMES, ROUND_OUTCOMES, PeerTelemetry

logger = logging.getLogger(__name__)

STEP_DEADLINE = 6.0  # seconds the current step may still take after SIGINT/SIGTERM; saving and leaving take 1-2 s
# how long the deadline waits, at most, for an optimizer step being applied (``StopSignal.hold``): a plain step takes
# well under a second; one that also averages parameters with the swarm (every 10th) can take longer, and is then cut
STEP_APPLY_GRACE = 2.0
LEAVE_DEADLINE = 3.0  # seconds a leaving peer waits for the DHT to store its goodbye (withdrawn progress record)
REPUBLISH_EVERY = records.MANIFEST_TTL / 3


class StopSignal:
    """SIGINT/SIGTERM set an event the loop checks between steps; a second signal interrupts at once.

    A step still running ``STEP_DEADLINE`` seconds after the first signal is interrupted (``KeyboardInterrupt`` in the
    main thread, by a SIGINT to this process): typically a gradient averaging round still exchanging tensors on a slow
    link, which cannot be cancelled without failing it for the group. The optimizer then abandons that step (no
    optimizer step, the state stays at the step before: ``hivemind_compat.HookedOptimizer``) and drops the round when
    it shuts down, and the peer saves and leaves. While ``hold()`` is true (the optimizer is applying a step, whose
    parts must not be left half-done) the deadline waits, up to ``STEP_APPLY_GRACE`` seconds more."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.pid = os.getpid()
        self.on_stop: list = []  # called from the handler on the first signal; must be quick
        self.hold = lambda: False  # true while the deadline's interrupt must wait (see the class docstring)
        self._deadline: threading.Timer | None = None
        self._deadline_due = False  # the next SIGINT is the deadline's, not the user's
        self._held_until = 0.0
        self._deadline_off = False

    def install(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            # hivemind's forked helper processes inherit this handler: let them die the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.event.is_set():
            deadline, self._deadline_due = self._deadline_due, False
            if deadline and self._deadline_off:
                return  # the deadline's timer fired just as the step ended: nothing left to interrupt
            if deadline and time.monotonic() < self._held_until and self.hold():
                self._arm(0.05)  # an optimizer step is being applied: interrupt once it is done
                return
            raise KeyboardInterrupt
        logger.info("received %s: finishing the current step, saving state and leaving", signal.Signals(signum).name)
        self.event.set()
        for callback in self.on_stop:
            callback()
        # a round that is already exchanging tensors cannot be cancelled; if it outlives the deadline, interrupt it
        self._held_until = time.monotonic() + STEP_DEADLINE + STEP_APPLY_GRACE
        self._arm(STEP_DEADLINE)

    def _arm(self, seconds: float) -> None:
        self._deadline = threading.Timer(seconds, self._interrupt)
        self._deadline.daemon = True
        self._deadline.start()

    def _interrupt(self) -> None:  # the deadline's timer thread
        self._deadline_due = True
        os.kill(self.pid, signal.SIGINT)

    def cancel_deadline(self) -> None:
        self._deadline_off = True
        if self._deadline is not None:
            self._deadline.cancel()

    def is_set(self) -> bool:
        return self.event.is_set()


@dataclass
class Prepared:
    """What a peer checks and loads before touching the network."""

    state_dir: StateDir
    tokenizer: object
    telemetry: PeerTelemetry
    metrics_port: int | None
    init_checkpoint: tuple[dict, dict] | None = None  # --init-from, verified (all but the run) before p2pd starts
    # the training data, always prepared: the bertswarm-prepare directory --data names (pinned in the run's manifest),
    # else --data's text or the embedded corpus prepared into the cache for this peer's --seq-len/--nsp
    dataset: PreparedDataset | None = None
    pinned: bool = False
    cfg: PeerConfig | None = None  # the settings, with --seq-len/--nsp taken from the prepared dataset unless given
    allow: frozenset[str] | None = None  # the peer ids of --allow FILE


def prepare(cfg: PeerConfig, explicit: set[str] = frozenset()) -> Prepared:
    try:
        state_dir = StateDir(cfg.state_path)
    except StateError as e:
        raise e.with_flag("--state-dir") from None
    tokenizer = load_tokenizer_flag(cfg.tokenizer)
    dataset = open_prepared_flag(cfg.data)
    if dataset is not None:
        cfg = adopt_dataset_settings(cfg, explicit, dataset)
        try:
            dataset.check(tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), seq_len=cfg.seq_len, nsp=cfg.nsp)
        except InputError as e:
            raise e.with_flag("--data") from None
    allow = membership.read_allow_file(cfg.allow) if cfg.allow is not None else None
    # a setting outside the manifest's bounds is answered now, not after p2pd has started
    from_config(cfg, cfg.run_id or DEFAULT_RUN_ID, tokenizer_fingerprint(tokenizer), tokenizer.get_vocab_size())
    telemetry = PeerTelemetry()
    port = telemetry.serve(cfg.metrics_host, cfg.metrics_port) if cfg.metrics_port is not None else None
    try:
        # a corrupt --init-from is answered in ~1 s, not after the DHT has started; the run is checked once it is known
        try:
            init = load_checkpoint(cfg.init_from, expected_fingerprint=None) if cfg.init_from else None
        except CheckpointError as e:
            raise e.with_flag("--init-from") from None
        # last, as it can take minutes the first time: every quick check above is answered before it
        pinned = dataset is not None
        if not pinned:  # with this peer's settings; a joiner whose run says otherwise prepares again (Trainer)
            dataset = prepare_text_flag(cfg.data, tokenizer, seq_len=cfg.seq_len, nsp=cfg.nsp)
    except BaseException:
        telemetry.close()
        raise
    return Prepared(state_dir, tokenizer, telemetry, port, init, dataset, pinned, cfg, allow)


def load_tokenizer_flag(tokenizer_path: str | None):
    """``--tokenizer``'s tokenizer (default: the shipped vocab); a problem is one line naming the flag."""
    try:
        return load_tokenizer(tokenizer_path) if tokenizer_path else default_tokenizer()
    except InputError as e:
        raise e.with_flag("--tokenizer") from None


def open_prepared_flag(data: list[str]) -> PreparedDataset | None:
    """The bertswarm-prepare directory ``--data`` names, else None (text, or nothing: the embedded corpus)."""
    try:
        if any(is_prepared(entry) for entry in data):
            if len(data) > 1:
                raise UserError("--data: a prepared dataset directory must be the only --data entry; drop the others")
            return PreparedDataset.open(data[0])
    except InputError as e:
        raise e.with_flag("--data") from None
    return None


def prepare_text_flag(data: list[str], tokenizer, *, seq_len: int, nsp: bool) -> PreparedDataset:
    """``--data``'s text (default: the embedded corpus) prepared for training, from the cache or now."""
    try:
        return text_cache.training_text(data, tokenizer, seq_len=seq_len, nsp=nsp)
    except InputError as e:
        raise e.with_flag("--data") from None


def load_inputs(tokenizer_path: str | None, data: list[str]) -> tuple[object, list[str], PreparedDataset | None]:
    """The tokenizer, and the documents or the prepared dataset the flags name (defaults: the shipped vocab, the
    embedded corpus), for evaluation (the coordinator's CLI); a problem with either is answered in one line that
    names the flag. A prepared dataset comes back as ``(tokenizer, [], dataset)``."""
    tokenizer = load_tokenizer_flag(tokenizer_path)
    dataset = open_prepared_flag(data)
    if dataset is not None:
        return tokenizer, [], dataset
    try:
        documents = corpus.load_documents(data) if data else embedded.default_corpus()
    except InputError as e:
        raise e.with_flag("--data") from None
    return tokenizer, documents, None


def adopt_dataset_settings(cfg: PeerConfig, explicit: set[str], dataset: PreparedDataset) -> PeerConfig:
    """A prepared dataset fixes the sequence length and NSP: adopt them unless the user set them (then
    ``PreparedDataset.check`` refuses a contradiction in one line)."""
    adopted = {name: getattr(dataset.index, name) for name in ("seq_len", "nsp") if name not in explicit}
    return dataclasses.replace(cfg, **adopted)


class Trainer:
    def __init__(
        self,
        cfg: PeerConfig,
        prepared: Prepared,
        dht: hivemind.DHT,
        run: RunManifest,
        batches: Iterator[dict[str, torch.Tensor]] | None = None,
        signed_manifest: SignedManifest | None = None,
        members: membership.MembersKeeper | None = None,
        test_hooks=None,
    ):
        """``batches``: the micro-batches to train on; default: this peer's shuffle of the prepared documents (the
        equivalence test passes fixed batches, to check this very class against a single-process reference);
        ``signed_manifest``: the run's creator-signed manifest this peer republishes (None: it publishes none);
        ``members``: a restricted run's allowlist keeper; ``test_hooks``: ``hooks.load()``'s, if already loaded."""
        self.cfg, self.dht, self.run, self.signed_manifest = cfg, dht, run, signed_manifest
        self.members = members
        self.state_dir, self.telemetry = prepared.state_dir, prepared.telemetry
        self.device = _pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.batch_size = cfg.batch_size or PRESETS[run.preset].batch_size
        self.batch_size = min(self.batch_size, run.target_batch_size)
        self.seed = cfg.seed if cfg.seed is not None else _seed_from_peer_id(dht.peer_id)
        self.samples_total = 0
        self.mini_steps = 0
        self.rounds: collections.Counter[str] = collections.Counter()
        self.last_round: str | None = None  # the outcome of this session's last averaging round
        # test hooks (peer.testing) when a BERTSWARM_TEST_* variable is set, else no-ops
        self.hooks = test_hooks if test_hooks is not None else hooks.load()

        self.model = build_model(run.model, nsp=run.nsp, seed=run.init_seed)
        saved = self.state_dir.load(run.fingerprint)
        init_epoch = None
        if saved is not None:
            _load_model_tensors(self.model, saved.model)
            self.samples_total = saved.samples
        elif cfg.init_from:
            tensors, meta = prepared.init_checkpoint
            try:
                verify_run(meta, run.fingerprint, cfg.init_from)
            except CheckpointError as e:
                raise e.with_flag("--init-from") from None
            _load_model_tensors(self.model, tensors)
            init_epoch, self.samples_total = int(meta["epoch"]), int(meta.get("samples_seen", 0))
            logger.info("starting from checkpoint %s (step %d)", cfg.init_from, init_epoch)
        self.model.to(self.device).train()
        logger.info(
            "model: %s preset, %.2fM parameters on %s", run.preset, count_parameters(self.model) / 1e6, self.device
        )

        self._gradient_bytes = 4 * count_parameters(self.model)  # fp32, as the sync mode averages them
        self.opt = self._make_optimizer(saved, init_epoch)

        _, subkey = records.run_validators(run.run_id)
        self.subkey = subkey
        self.batches = batches if batches is not None else self._make_batches(prepared, saved, subkey)
        self.publisher = MetricsPublisher(dht, run.run_id, subkey, dht.client_mode)
        self.autocast = _autocast(self.device)
        self.window = Window()
        self.display = StatusDisplay()
        self.start_epoch = self.opt.local_epoch
        self._last_report = self._last_save = self._last_publish = time.monotonic()

    def _make_batches(self, prepared: Prepared, saved: SavedState | None, me: bytes) -> Iterator[dict]:
        """This peer's stream: its shards of the prepared dataset, resumed at the saved position. Text prepared for
        this peer's own --seq-len/--nsp is prepared again when the run it joined uses others."""
        run, dataset = self.run, prepared.dataset
        if not prepared.pinned and (dataset.index.seq_len, dataset.index.nsp) != (run.seq_len, run.nsp):
            dataset = prepare_text_flag(self.cfg.data, prepared.tokenizer, seq_len=run.seq_len, nsp=run.nsp)

        def peers() -> list[bytes]:  # the signed-record keys of live peers (members): what the shard assignment hashes
            return [key for key in records.read_swarm_metrics(self.dht, run.run_id) if membership.allows_owner(key)]

        return ShardStream(dataset, TokenizerInfo.of(prepared.tokenizer), batch_size=self.batch_size,
                           mlm_probability=run.mlm_probability, seed=self.seed, me=me, peers=peers,
                           on_skip=lambda _name: self.telemetry.skipped_shards.inc(),
                           position=saved.data_position if saved is not None else None)  # fmt: skip

    def _make_optimizer(self, saved: SavedState | None, init_epoch: int | None) -> SwarmOptimizer | DiLoCoOptimizer:
        """The run's mode: ``sync`` (gradients averaged every global step) or ``diloco`` (outer rounds every
        ``inner_steps`` local steps); either resumes the saved state or continues from ``--init-from``'s step."""
        cfg, run = self.cfg, self.run
        if run.mode == "diloco":
            opt = DiLoCoOptimizer(self.model, run, self.dht, matchmaking_time=cfg.matchmaking_time,
                                  averaging_timeout=cfg.averaging_timeout, on_round=self._on_outer_round,
                                  on_state_loaded=self._on_state_loaded)  # fmt: skip
            if saved is not None:
                opt.load_state_dict({"state": saved.optimizer, "param_groups": opt.opt.state_dict()["param_groups"]},
                                    epoch=saved.epoch)  # fmt: skip
            elif init_epoch is not None:
                opt.start_at(init_epoch)
        else:
            opt = make_optimizer(self.model, run, self.dht, batch_size=self.batch_size,
                                 matchmaking_time=cfg.matchmaking_time, averaging_timeout=cfg.averaging_timeout,
                                 on_round=self._on_round, on_state_loaded=self._on_state_loaded)  # fmt: skip
            if saved is not None:
                state = {"state": dict(saved.optimizer, local_epoch=saved.epoch),
                         "param_groups": opt.state_dict()["param_groups"]}  # fmt: skip
                opt.load_state_dict(state)
                hivemind_compat.sync_lr_schedule(opt.state_averager)  # LR to the resumed epoch (hivemind: lazily)
            elif init_epoch is not None:
                opt.state_averager.local_epoch = init_epoch  # the LR schedule continues from the checkpoint's step
                hivemind_compat.sync_lr_schedule(opt.state_averager)
        if saved is not None:
            logger.info("resumed local state at step %d from %s", saved.epoch, self.state_dir.state_file)
        return opt

    # --- the steps -------------------------------------------------------------------------------------------------

    def sync_with_swarm(self, timeout: float) -> None:
        """Before contributing, a peer behind the swarm downloads the current state from its peers."""
        self.opt.catch_up(timeout)
        self.start_epoch = self.opt.local_epoch
        self.telemetry.epoch.set(self.opt.local_epoch)

    def train(self, stop: StopSignal) -> None:
        try:
            while not stop.is_set() and not self.finished:
                if self.hooks.paused(self.opt.local_epoch):
                    self.report()  # test hook: hold the weights still between steps, keep reporting (never for users)
                    time.sleep(0.1)
                    continue
                self.step()
                self.report()
                self.checkpoint()
        except KeyboardInterrupt:
            if not stop.is_set():
                raise
            # the step was abandoned where it stood; interrupted in its gradient round (the usual case) or before,
            # none of it was applied (HookedOptimizer), so the state saved on the way out is the last completed step's
            logger.warning("the step did not finish within %.0fs of the stop signal; leaving without it (state stays "
                           "at step %d)", STEP_DEADLINE, self.opt.local_epoch)  # fmt: skip
        finally:
            stop.cancel_deadline()

    @property
    def finished(self) -> bool:
        return self.cfg.max_steps is not None and self.opt.local_epoch >= self.cfg.max_steps

    def step(self) -> None:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self.batches).items()}
        with self.autocast:
            loss = pretraining_loss(self.model, batch)
        loss.backward()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value) or not is_finite_gradient(self.model):
            # never send a non-finite gradient to the swarm: drop this batch, count it
            self.telemetry.skipped.labels("nonfinite").inc()
            logger.warning("dropped a batch with non-finite loss or gradients (loss=%s)", loss_value)
            self.opt.zero_grad()
            return
        self.hooks.corrupt_gradients(self.model)  # the fault suite's NaN sender; a no-op for volunteers
        self.opt.step()
        self.opt.zero_grad()
        samples = batch["input_ids"].shape[0]
        self.samples_total += samples
        self.mini_steps += 1
        self.window.add(loss_value, samples)
        self.telemetry.samples.inc(samples)
        self.telemetry.epoch.set(self.opt.local_epoch)
        if self.run.mode == "diloco":  # also right after a resume or a state download, before any round
            self.telemetry.outer_step.set(self.opt.local_epoch)

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < self.cfg.log_every:
            return
        self._last_report = now
        progress = self.opt.progress()
        snapshot = Snapshot(
            epoch=self.opt.local_epoch,
            round_text=progress.text,
            peers=progress.peers,
            loss=self.window.mean_loss,
            samples_per_second=self.window.samples_per_second,
            samples_total=self.samples_total,
            learning_rate=self.opt.learning_rate,
        )
        self.display.show(snapshot)
        t = self.telemetry
        t.swarm_size.set(progress.peers)
        t.samples_per_second.set(snapshot.samples_per_second)
        t.learning_rate.set(snapshot.learning_rate)
        t.sync_guard_totals(rejected=guards.rejected_contributions(), skipped_steps=self.opt.skipped_nonfinite_steps,
                            ignored_records=self.opt.ignored_progress_records)  # fmt: skip
        if math.isfinite(snapshot.loss):
            t.loss.set(snapshot.loss)
            self.publisher.publish(
                epoch=snapshot.epoch,
                samples_per_second=snapshot.samples_per_second,
                samples_total=self.samples_total,
                loss=snapshot.loss,
                mini_steps=self.window.batches,
            )
        self.window.reset()
        if now - self._last_publish > REPUBLISH_EVERY and self.signed_manifest is not None:
            self._last_publish = now
            records.publish_manifest(self.dht, self.signed_manifest, self.subkey)
        if self.members is not None:
            self.members.tick(REPUBLISH_EVERY)  # a UserError once the run's creator took this peer off its allowlist

    def checkpoint(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (self.cfg.save_every == 0 or now - self._last_save < self.cfg.save_every):
            return
        self._last_save = now
        started = time.perf_counter()
        self.state_dir.save(
            self.model,
            self.opt.state_dict()["state"],
            epoch=self.opt.local_epoch,
            samples=self.samples_total,
            fingerprint=self.run.fingerprint,
            parameters=self.opt.model_state_for_save(),
            data_position=self.batches.position if isinstance(self.batches, ShardStream) else None,
        )
        logger.info("saved local state at step %d in %.2fs", self.opt.local_epoch, time.perf_counter() - started)

    def close(self) -> None:
        logger.info(
            "leaving at step %d after contributing %d samples this session (%d in total); averaging rounds: %s%s",
            self.opt.local_epoch,
            self.mini_steps * self.batch_size,
            self.samples_total,
            ", ".join(
                f"{outcome}={self.rounds[outcome]}"
                for outcome in OUTER_ROUND_OUTCOMES
                if outcome in self.rounds or outcome in ROUND_OUTCOMES
            ),  # fmt: skip
            "" if self.last_round is None else f"; the last one: {self.last_round}",
        )
        self.publisher.close()
        self.opt.shutdown()

    # --- telemetry callbacks from the optimizer ---------------------------------------------------------------------

    def _on_round(self, outcome: str, group_size: int, seconds: float) -> None:
        self.rounds[outcome] += 1
        self.last_round = outcome
        self.telemetry.rounds.labels(outcome).inc()
        if outcome in ("success", "partial"):
            self.telemetry.group_size.set(group_size)
            self.telemetry.round_duration.observe(seconds)
            # a butterfly all-reduce sends and receives 2(n-1)/n of the (uncompressed fp32) gradient; an estimate,
            # hivemind counts no traffic
            moved = int(2 * (group_size - 1) / group_size * self._gradient_bytes)
            self.telemetry.bytes_sent.inc(moved)
            self.telemetry.bytes_received.inc(moved)

    def _on_outer_round(self, report: RoundReport) -> None:
        self.rounds[report.outcome] += 1
        self.last_round = report.outcome
        t = self.telemetry
        t.outer_rounds.labels(report.outcome).inc()
        t.bytes_sent.inc(report.bytes_sent)
        t.bytes_received.inc(report.bytes_received)
        if report.outcome in ("success", "partial"):
            t.group_size.set(report.group_size)
            t.round_duration.observe(report.seconds)
        if report.outcome in ROUND_OUTCOMES:
            t.rounds.labels(report.outcome).inc()

    def _on_state_loaded(self, seconds: float) -> None:
        self.telemetry.state_downloads.inc()
        self.telemetry.state_download_seconds.set(seconds)
        logger.info("loaded state from peers in %.2fs, now at step %d", seconds, self.opt.local_epoch)


def run(cfg: PeerConfig, explicit: set[str], out=sys.stdout) -> None:
    """The life of a peer: prepare, join, load state, train, and always leave cleanly."""
    hivemind_compat.check_version()  # before anything starts: bertswarm patches this hivemind's internals
    stop = StopSignal().install()
    prepared = prepare(cfg, explicit)
    cfg = prepared.cfg
    if prepared.metrics_port is not None:
        logger.info("Prometheus metrics on http://%s:%d/metrics", cfg.metrics_host, prepared.metrics_port)
    dht = swarm.start_dht(cfg, records.registry_validators())
    trainer = None
    try:
        tokenizer_fp = tokenizer_fingerprint(prepared.tokenizer)
        data_fp = prepared.dataset.fingerprint if prepared.pinned else None
        test_hooks = hooks.load()  # the fault suite's faults and probes; no-ops for volunteers
        joined = join.resolve(dht, cfg, explicit, tokenizer_fp, prepared.tokenizer.get_vocab_size(), data_fp,
                              allow=prepared.allow, ignore_allowlist=test_hooks.ignore_allowlist())  # fmt: skip
        run_manifest = joined.manifest
        logger.info("run %s, manifest %s", run_manifest.run_id, run_manifest.fingerprint[:12])
        addresses = swarm.join_addresses(dht)
        if cfg.address_file:  # before the join line, so whoever saw the line finds the file
            swarm.write_address_file(cfg.address_file, addresses[0])
        print(f"bertswarm-peer --join {addresses[0]}", file=out, flush=True)
        members = _keep_members(dht, cfg, joined, test_hooks.ignore_allowlist())
        trainer = Trainer(cfg, prepared, dht, run_manifest, signed_manifest=joined.signed, members=members,
                          test_hooks=test_hooks)  # fmt: skip
        trainer.hooks.install(trainer)
        stop.install()  # hivemind's averagers set SIGINT to SIG_IGN in this process when they start; undo that
        stop.on_stop.append(trainer.opt.cancel_matchmaking)
        stop.hold = lambda: getattr(trainer.opt, "applying_step", False)  # DiLoCo's optimizer has no such stretch
        trainer.sync_with_swarm(timeout=cfg.startup_timeout)
        trainer.train(stop)
    finally:
        _shutdown(trainer, dht, prepared)


def _keep_members(dht: hivemind.DHT, cfg: PeerConfig, joined: join.JoinedRun, ignore: bool):
    """A restricted run's allowlist, enforced in this process and the averager processes it forks from now on, and
    kept current while the peer runs (None for an open run). ``ignore``: the fault suite's outsider enforces nothing."""
    if joined.members is None:
        return None
    members, signed = joined.members
    allowlist = membership.Allowlist(cfg.state_path / membership.ALLOWLIST_FILE, members, dht.peer_id)
    if not ignore:
        membership.restrict(allowlist, on_refusal=guards.count_rejection)
    key = hivemind.utils.crypto.RSAPrivateKey.process_wide()
    creator = joined.signed.creator == identity.public_key_text(key)
    _, subkey = records.run_validators(joined.run_id)
    return membership.MembersKeeper(dht, joined.run_id, joined.signed.creator, allowlist, signed, subkey,
                                    allow_file=cfg.allow if creator else None, key=key if creator else None,
                                    enforce_self=not ignore)  # fmt: skip


def _shutdown(trainer: Trainer | None, dht: hivemind.DHT, prepared: Prepared) -> None:
    """Leave the swarm, save, then stop hivemind's processes and threads; each step runs even if an earlier one
    failed. Last, the heap is frozen (``gc.freeze``): the process exits next, and the interpreter's exit would walk
    the whole heap of torch, transformers and hivemind objects with the cyclic garbage collector, 2.7-4 s on a busy
    2-core machine, after the state is saved (bench scenario ``stopping``); frozen, the exit takes 0.3 s and the
    memory goes back to the OS as it would anyway. Only cyclic garbage is left uncollected; reference counting,
    ``atexit`` handlers and the flushing of files and logs are unchanged."""
    started = time.perf_counter()
    with swarm.keep_request_futures(dht) as stores:
        steps = [] if trainer is None else [trainer.display.close, partial(_leave_swarm, trainer.opt, stores),
                                            partial(trainer.checkpoint, force=True), trainer.close]  # fmt: skip
        steps += [partial(swarm.stop_dht, dht)]
        for step in steps:
            _run_shutdown_step(step)
    for step in (prepared.telemetry.close, prepared.state_dir.close):
        _run_shutdown_step(step)
    logger.info("left the swarm in %.1fs", time.perf_counter() - started)
    gc.freeze()


def _leave_swarm(opt: SwarmOptimizer | DiLoCoOptimizer, stores: list) -> None:
    """First on the way out, before saving: leave matchmaking and withdraw this peer's progress record, so the
    others go on without it at once instead of waiting for the record to expire; then wait (at most
    ``LEAVE_DEADLINE``) until the DHT has stored that goodbye (``stores``: the futures ``keep_request_futures``
    holds)."""
    opt.leave_swarm()
    deadline = time.monotonic() + LEAVE_DEADLINE
    for future in list(stores):
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as e:  # the others find out when the record expires, as after a crash
            logger.debug("goodbye record not stored: %r", e)


def _run_shutdown_step(step) -> None:
    try:
        step()
    except Exception:
        logger.exception("error while leaving the swarm (continuing shutdown)")


def _pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch; use --device cpu or install CUDA torch")
    return torch.device(choice)


def _autocast(device: torch.device):
    """bf16 autocast on GPUs that support it (no loss scaling needed); full precision elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _seed_from_peer_id(peer_id) -> int:
    return int.from_bytes(hashlib.sha256(peer_id.to_bytes()).digest()[:4], "little")


def _load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if unexpected or set(missing) - tied:
        raise UserError(
            f"local state does not fit this run's model (missing {sorted(set(missing) - tied)[:3]}, unexpected "
            f"{unexpected[:3]}); move the state dir away to start fresh"
        )
