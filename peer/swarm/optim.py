"""The optimizer side of a run: AdamW or LAMB with clipping of the *averaged* gradient, warm-up + linear decay keyed
to the global epoch, and ``hivemind.Optimizer`` configured for small volunteer swarms.

Tuning advice (the defaults suit 2-16 peers on one continent):

- ``matchmaking_time`` (``--matchmaking-time``, default 3 s): how long a peer gathers a group before averaging. If
  logs show "could not find a group" or rounds fail, raise it to 5-15 s; on loopback 1-3 s is plenty.
- ``averaging_timeout`` (``--averaging-timeout``, default 30 s): after this a round is abandoned and the peer steps
  with its local gradients (it will then resync parameters from peers). Raise it for large models on slow links.
- A groupmate that sends nothing for ``averaging_timeout / 2`` in the middle of a round is dropped, and the round
  completes with the others' contributions. It counts as a ``partial`` round: the group's peers then differ slightly,
  until the next state averaging round (every ``STATE_AVERAGING_EVERY`` steps).
- The target batch is reached by the whole swarm; each peer contributes what it computed, weighted by its samples.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import hivemind
import torch
from hivemind.averaging.control import AveragingStage
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, Uniform8BitQuantization
from hivemind.utils import get_dht_time

from peer.run.manifest import DEFAULT_AGGREGATION, RunManifest
from peer.swarm import guards, hivemind_compat
from peer.swarm.robust import PartialRounds

logger = logging.getLogger(__name__)


STATE_AVERAGING_EVERY = 10  # global steps between parameter/optimizer-state averaging rounds
WAITING_FOR_GROUP = (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP)  # a round's stages before its group formed
# While this peer waits for a group, how often it checks whether the others it counted on have left the swarm, and in
# how many checks in a row they must all be gone before it stops waiting (one more check covers a peer that began
# looking for a group a moment before its first progress record reached the DHT).
DEPARTURE_CHECK_PERIOD = 0.5
DEPARTURE_CHECKS = 2
# Gradient compressions (benchmarks; make_optimizer's grad_compression). Every peer of a run must use the same one:
# hivemind splits tensors into parts by the compression's size ratio, so mixed settings never complete a round.
GRAD_COMPRESSION = {"none": NoCompression, "fp16": Float16Compression, "int8": Uniform8BitQuantization}
GRAD_COMPRESSIONS = tuple(GRAD_COMPRESSION)


def grad_compression(name: str) -> CompressionBase:
    """The named compression, with hivemind's patches installed in this process: hivemind 1.1.12's 8-bit decoder
    fails under NumPy >= 2.4 without them (see ``hivemind_compat``), and whoever picks a compression also decodes it."""
    hivemind_compat.install()
    return GRAD_COMPRESSION[name]()


class ClippingMixin:
    """Clip the global L2 norm of the gradients the optimizer is about to apply (i.e. the swarm-averaged ones), and
    never apply a non-finite one: the step is skipped and ``on_nonfinite`` is called (the last line of defence after
    the sender's own check and the finite-only reducer in ``peer.swarm.guards``)."""

    max_grad_norm: float = 0.0
    on_nonfinite = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if params:
            limit = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, limit)  # with limit inf: the norm, grads unchanged
            if not math.isfinite(float(norm)):
                logger.warning("skipped an optimizer step: the gradient to apply is not finite")
                if self.on_nonfinite is not None:
                    self.on_nonfinite()
                return None
        return super().step(closure)


class ClippedAdamW(ClippingMixin, torch.optim.AdamW):
    def __init__(self, params, *, max_grad_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019): Adam moments with a per-tensor trust ratio ||w|| / ||update||, for large batches."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, clamp_value=10.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clamp_value=clamp_value))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = exp_avg / (1 - beta1**step)
                v_hat = exp_avg_sq / (1 - beta2**step)
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm = p.norm().clamp(max=group["clamp_value"])
                u_norm = update.norm()
                trust = (w_norm / u_norm) if w_norm > 0 and u_norm > 0 else torch.ones(())
                p.add_(update, alpha=-group["lr"] * float(trust))
        return loss


class ClippedLamb(ClippingMixin, Lamb):
    def __init__(self, params, *, max_grad_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (the BERT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_state_(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Create zero Adam moments without stepping.

    hivemind needs optimizer state tensors to exist (to share them with joiners); left empty, it would create them
    with a "virtual" optimizer step on zero gradients, which applies weight decay once and shifts the step count.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = {
                "step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
    return opt


def optimizer_factory(manifest: RunManifest) -> Callable[[Iterable], torch.optim.Optimizer]:
    """The run's optimizer; the single-process reference in the tests builds it with this same function."""
    kwargs = dict(lr=manifest.lr, weight_decay=manifest.weight_decay, max_grad_norm=manifest.max_grad_norm)
    optimizer_class = ClippedLamb if manifest.optimizer == "lamb" else ClippedAdamW
    return lambda params: init_state_(optimizer_class(params, betas=(0.9, 0.999), eps=1e-6, **kwargs))


def lr_lambda(manifest: RunManifest) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps`` global steps, then linear decay to zero at ``total_steps``."""
    warmup, total = manifest.warmup_steps, manifest.total_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def scheduler_factory(manifest: RunManifest):
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(manifest))


@dataclass
class SwarmProgress:
    """What the status line shows of the swarm: how many training peers, and the mode's round progress as text."""

    peers: int
    text: str


class SwarmOptimizer(hivemind_compat.HookedOptimizer):
    """``hivemind.Optimizer`` that reports the outcome and duration of each gradient averaging round, reads the swarm's
    progress through ``guards.BoundedProgressTracker`` and averages finite contributions only.

    ``on_round(outcome, group_size, seconds)`` is called with outcome ``success``, ``partial`` (the round finished
    but left a groupmate's contribution or some of this peer's averaged values out: see ``robust.PartialRounds``; the
    peers now differ slightly, until the next state averaging round), ``failed`` (the round timed out or broke and
    this peer stepped with its local gradients) or ``solo`` (no other peer was there to average with).
    ``partial_rounds``: the ``PartialRounds`` the gradient averager reports to (``make_optimizer`` wires both).
    The hooks into hivemind's private steps are ``hivemind_compat.HookedOptimizer``'s.

    Departures: a leaving peer calls ``leave_swarm`` (no more matchmaking, its progress record withdrawn); a peer whose
    round is still looking for its group when every other peer has left stops waiting and steps alone (``solo``).
    """

    progress_tracker_class = guards.BoundedProgressTracker
    _stopping = False  # the stop signal came (cancel_matchmaking): no more state averaging rounds

    def __init__(
        self,
        *args,
        on_round: Callable[[str, int, float], None] | None = None,
        on_state_loaded: Callable[[float], None] | None = None,
        aggregation: str = DEFAULT_AGGREGATION,
        partial_rounds: PartialRounds | None = None,
        **kwargs,
    ):
        # state rounds average parameters with weight 1 per peer (hivemind's)
        self.state_averager_class = hivemind_compat.RobustStateAverager
        self.state_averager_options = guards.robust_options(aggregation, weight_cap=1.0)
        self._on_round = on_round or (lambda outcome, size, seconds: None)
        self._on_state_loaded = on_state_loaded or (lambda seconds: None)
        self._partial_rounds = partial_rounds if partial_rounds is not None else PartialRounds()
        self._after_state_load = False  # the next gradient round is this peer's first since it loaded the state
        self._resync = ""  # why the next step loads the state again first (see step); empty: it does not
        self._sharing_before_resync: bool | None = None  # state sharing is off until then (see _mark_apart)
        self.skipped_nonfinite_steps = 0
        guards.share_rejection_counter()  # before hivemind forks its averagers
        hivemind_compat.install()  # likewise: the forked averagers keep the (finite-only, NumPy 2.4-fixed) hivemind
        super().__init__(*args, **kwargs)
        self.state_averager.optimizer.on_nonfinite = self._count_nonfinite_step
        # every gradient round gathers the step each groupmate averages for (see _note_group_steps)
        self.grad_averager.epoch_for_rounds = lambda: self.local_epoch
        # the gradient round this peer stopped waiting for because every other peer had left (_watch_departures)
        self._abandoned_grads = None
        self._left = threading.Event()
        self._departures = threading.Thread(target=self._watch_departures, name="departures", daemon=True)
        self._departures.start()

    def _count_nonfinite_step(self) -> None:
        self.skipped_nonfinite_steps += 1

    # --- what the trainer uses in both modes (see peer.swarm.diloco_optim.DiLoCoOptimizer) ---------------------------

    @property
    def learning_rate(self) -> float:
        return self.opt.param_groups[0]["lr"]

    @property
    def ignored_progress_records(self) -> int:
        return self.tracker.dropped_records

    def catch_up(self, timeout: float) -> bool:
        """Before contributing, a peer behind the swarm downloads the current state from its peers."""
        deadline = time.monotonic() + timeout
        while not self.tracker.fetched_global_progress_this_epoch.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.tracker.global_epoch <= self.local_epoch:
            return False
        logger.info("swarm is at step %d, this peer at %d: loading state from peers", self.tracker.global_epoch,
                    self.local_epoch)  # fmt: skip
        self.load_state_from_peers()
        return True

    def progress(self) -> SwarmProgress:
        progress = self.tracker.global_progress
        eta = max(0.0, progress.eta_next_epoch - get_dht_time())
        eta_text = f"{eta:.0f}s" if eta < 86_400 else "?"  # hivemind says ~1e21 s when unsure
        text = f"{progress.samples_accumulated}/{self.tracker.target_batch_size} samples, next step in {eta_text}"
        return SwarmProgress(peers=progress.num_peers, text=text)

    def model_state_for_save(self) -> None:
        return None  # the model's own parameters are the state to save

    def cancel_matchmaking(self) -> bool:
        """Abandon averaging rounds still looking for a group, so a leaving peer is not held for the averaging
        timeout; a round already exchanging tensors is left to finish (cancelling it would fail it for the group).
        From now on, a step begins no state averaging round either (``state_round_wanted``): the stop signal calls
        this, and a stop that landed in a state averaging step waited for that round's group."""
        self._stopping = True
        cancelled = False
        for control in self._rounds_looking_for_group():
            cancelled = control.cancel() or cancelled
        return cancelled

    def state_round_wanted(self) -> bool:
        return not self._stopping

    def leave_swarm(self) -> None:
        """Stop taking part, first thing when leaving: no more matchmaking, and this peer's progress record replaced
        by hivemind's "goodbye" (value None; ``ProgressTracker.shutdown`` stores it), so the others stop counting
        its samples and stop waiting for it at once instead of when its record expires. ``shutdown`` still follows;
        the caller holds the goodbye's store future until the DHT has sent it (``trainer._shutdown``)."""
        self._left.set()
        self.cancel_matchmaking()
        self.tracker.shutdown(self.shutdown_timeout)

    def shutdown(self):
        if hasattr(self, "_left"):  # hivemind's __del__ may call this on a half-built optimizer
            self._left.set()
        # hivemind cancels (or tags along in) the scheduled rounds by their stage, which the averager process updates
        # a moment after a cancellation: a round cancelled just before (cancel_matchmaking) was cancelled a second
        # time, and that raised InvalidStateError. A finished round needs nothing.
        for name in ("scheduled_grads", "scheduled_state"):
            control = getattr(self, name, None)
            if control is not None and control.done():
                setattr(self, name, None)
        # A round whose step an interrupt abandoned (the trainer's stop deadline; see HookedOptimizer) is dropped, not
        # waited for. A gradient round: hivemind would "tag along" until it ends (a whole all-reduce on a slow link),
        # for a result this peer no longer uses; cancelled here, it ends without retrying or an error in the averager
        # process, whose shutdown then stops the exchange (hivemind_compat.shutdown_averager); the groupmates go on
        # with the parts they have, as when a peer crashes mid-round. A state averaging round (every 10th step) the
        # interrupt left waiting for its group: hivemind's shutdown first waits for the state averager's pending step,
        # i.e. for that round, up to the averaging timeout (19.9 s from SIGTERM to exit in test_lifecycle).
        for name, interrupted, what in (("scheduled_grads", "interrupted_round", "gradient"),
                                        ("scheduled_state", "interrupted_state_round", "state")):  # fmt: skip
            dropped = getattr(self, interrupted, None)
            if dropped is not None and dropped is getattr(self, name, None):
                setattr(self, name, None)
                if not dropped.done():
                    dropped.cancel()
                logger.info("dropped the %s averaging round of the interrupted step", what)
        # A round scheduled for a later step and not yet in a group: hivemind cancels it only once its stage says
        # "looking for a group" and otherwise tags along until it ends; a state round scheduled for the next 10th step
        # then held a leaving peer until its matchmaking gave up ("could not find a group", 15 s after SIGTERM).
        for name in ("scheduled_grads", "scheduled_state"):
            control = getattr(self, name, None)
            if control is not None and not control.done() and control.stage in WAITING_FOR_GROUP:
                setattr(self, name, None)
                control.cancel()
        super().shutdown()

    def _rounds_looking_for_group(self) -> list:
        return [
            control
            for control in (self.scheduled_grads, self.scheduled_state)
            if control is not None and not control.done() and control.stage == AveragingStage.LOOKING_FOR_GROUP
        ]

    def _watch_departures(self) -> None:
        """While this peer waits for a group (a round it committed to, still looking for groupmates), check the
        swarm's progress records; once every other peer has left (``guards.others_left``), stop waiting and step
        alone. Without this, the last peer of a swarm whose groupmate left waited out the whole averaging timeout
        (default 30 s), then logged hivemind's "could not find a group" traceback."""
        gone = 0
        while not self._left.wait(DEPARTURE_CHECK_PERIOD):
            try:
                waiting = [control for control in self._rounds_looking_for_group() if control.triggered]
                gone = gone + 1 if waiting and self._others_left() else 0
                if gone < DEPARTURE_CHECKS or self._left.is_set():
                    continue
                gone = 0
                cancelled = False
                for control in waiting:
                    if control is self.scheduled_grads:
                        self._abandoned_grads = control  # before cancelling: the trainer's wait ends at once
                    if control.cancel():
                        cancelled = True
                    elif self._abandoned_grads is control:
                        self._abandoned_grads = None
                if cancelled:
                    logger.warning("the other peers have left the swarm; stepping alone instead of waiting for a group")
            except Exception as e:  # the DHT may be shutting down; the round's own timeout still bounds the wait
                logger.debug("checking for departed peers failed: %r", e)

    def _progress_records(self) -> dict | None:
        found = self.dht.get(self.tracker.training_progress_key, latest=True, return_future=True)
        found = found.result(timeout=max(1.0, self.matchmaking_time))
        return found.value if found is not None else None

    def _others_left(self) -> bool:
        return guards.others_left(self._progress_records(), self.dht.peer_id.to_bytes(), get_dht_time())

    def _others_epoch(self) -> int | None | bool:
        """The other peers' highest step (``guards.others_epoch``); None when no other peer has a live record; False
        when the read failed or found no record at all (not even this peer's own: the DHT may not have it yet)."""
        try:
            records = self._progress_records()
        except Exception as e:  # a slow DHT read: the caller's deadline bounds the wait
            logger.debug("reading the other peers' progress failed: %r", e)
            return False
        if not records:
            return False
        return guards.others_epoch(records, self.dht.peer_id.to_bytes(), get_dht_time())

    def step(self, *args, **kwargs):
        """hivemind's step, except after a first step since a state load that missed the swarm's round
        (``_note_first_round``) or a round with groupmates at another step (``_note_group_steps``): then this call
        leaves the round this peer had scheduled next (with zero weight, as hivemind does before a state load, so that
        the others do not wait for it), waits until the other peers have reached this peer's step (the round it missed
        is over; this peer's own progress record, which hivemind's ``global_epoch`` counts, already says that step),
        loads their state, and drops this micro-batch's gradients (as hivemind does when it finds a peer out of
        sync)."""
        if self._resync:
            reason, self._resync = self._resync, ""
            if self.scheduled_grads is not None and not self.scheduled_grads.done():
                self._tag_along_with_zero_weight(self.scheduled_grads)
                self.scheduled_grads = None
            deadline = time.monotonic() + self.averaging_timeout
            while time.monotonic() < deadline:
                others = self._others_epoch()
                if others is None:  # the others have all left since: there is no swarm state to catch up with
                    self._share_state_again()
                    return super().step(*args, **kwargs)
                if others is not False and others >= self.local_epoch:
                    break
                time.sleep(0.2)
            logger.warning("%s; loading the state again so as not to train on apart from the others", reason)
            try:
                self.load_state_from_peers()
            finally:
                self._share_state_again()
            return None
        return super().step(*args, **kwargs)

    def _mark_apart(self, reason: str) -> None:
        """The next ``step`` loads the state again (see ``step``); until then this peer serves its state to no one. Its
        weights are apart from the swarm's, and with the highest step they would be the first choice of a joiner (seen:
        a joiner's first step alone made its step the newest; the next joiner downloaded it, and the two outvoted the
        swarm's founder in their next round)."""
        self._resync = reason
        if self._sharing_before_resync is None:
            self._sharing_before_resync = self.state_averager.allow_state_sharing
            self.state_averager.allow_state_sharing = False

    def _share_state_again(self) -> None:
        if self._sharing_before_resync is not None:
            self.state_averager.allow_state_sharing = self._sharing_before_resync
            self._sharing_before_resync = None

    def load_state_from_peers(self, **kwargs):
        started, epoch_before = time.perf_counter(), self.local_epoch
        super().load_state_from_peers(**kwargs)
        if self.local_epoch > epoch_before or self.local_epoch >= self.tracker.global_epoch - 1:
            self._after_state_load = True
            self._failed_state_loads = 0
            self._on_state_loaded(time.perf_counter() - started)
            return
        # No peer sent its state: the peers that made the swarm's progress records may have left. hivemind retries on
        # every step; back off instead of spinning until their records expire.
        self._failed_state_loads = getattr(self, "_failed_state_loads", 0) + 1
        delay = min(10.0, 0.5 * 2 ** min(self._failed_state_loads, 5))
        logger.warning(
            "no peer could send the swarm's state (step %d); retrying in %.0fs", self.tracker.global_epoch, delay
        )
        time.sleep(delay)

    def gradient_round_finished(self, control, seconds: float) -> None:
        partial = self._partial_rounds.take()  # this round's report (the averager reported it before the result)
        if control is None:
            self._note_first_round("solo")
            self._on_round("solo", 1, seconds)
        elif control is self._abandoned_grads:  # the others left while it waited for them (_watch_departures)
            self._abandoned_grads = None
            self._note_first_round("solo")
            self._on_round("solo", 1, seconds)
        elif control.cancelled():  # this peer is leaving (see cancel_matchmaking)
            self._note_first_round("leaving")
            self._on_round("failed", 1, seconds)
        elif control.done() and control.exception() is None:
            outcome = "partial" if partial else "success"
            self._note_first_round(outcome)
            self._note_group_steps(control.result())
            self._on_round(outcome, len(control.result()), seconds)
        else:
            self._note_first_round("failed")
            self._on_round("failed", 1, seconds)
            logger.warning(
                "gradient averaging round failed; stepped with local gradients. If this repeats, raise "
                "--matchmaking-time (peers could not find a group) or --averaging-timeout (slow links)"
            )

    def gradients_not_averaged(self) -> None:  # hivemind steps with local gradients and never calls the hook above
        self._partial_rounds.take()
        outcome = "solo" if self.tracker.global_progress.num_peers <= 1 else "failed"
        self._note_first_round(outcome)
        self._on_round(outcome, 1, 0.0)

    def _note_first_round(self, outcome: str) -> None:
        """A joiner's first round after loading the state can miss the others' round: their progress records said
        the round was due (they were in it), so this peer stepped at once and found no group to join ("failed"), or,
        before its own progress record was back from the DHT, counted only one peer and stepped alone ("solo") while
        the peer that had just sent it the state stepped without it. hivemind then steps with the local gradients:
        this peer would train on one step apart from the swarm until the next state averaging round. The next
        ``step`` loads the state again instead (bench scenario 14; the NAT test, where both joiners did this)."""
        if self._after_state_load and outcome in ("failed", "solo"):
            self._mark_apart("this peer's first step after loading the state missed the swarm's averaging round")
        self._after_state_load = False

    def _note_group_steps(self, gathered: dict) -> None:
        """A round whose groupmates were at another step: peers at different steps hold different weights, so the
        round's averaged gradient left them apart, and every later round would "succeed" with them still apart (seen:
        a joiner that loaded the state just before the peer that sent it stepped without it, then took that peer's
        next round as its own step, one step behind for good). Equal weights under two steps happen too (hivemind's
        ``load_state_from_peers`` labels a state one step behind the swarm with the swarm's step); a reload then only
        aligns the steps, which this check cannot tell apart. A peer whose step is not the group's most common one
        (on a tie, the later one: the peer behind had missed a round) loads the state again at its next ``step`` (as
        after ``_note_first_round``). Each groupmate's step is what its averager gathered
        (``RobustGradientAverager.epoch_for_rounds``); a groupmate that gathered none (another bertswarm version) is
        left out."""
        own = gathered.get(self.dht.peer_id)
        steps = collections.Counter(step for step in gathered.values() if isinstance(step, int))
        logger.debug("round from step %s: the groupmates' steps %s", own, dict(steps))
        if not isinstance(own, int) or len(steps) < 2:
            return
        most = max(steps.values())
        common = max(step for step, count in steps.items() if count == most)
        if own != common:
            self._mark_apart(
                f"this peer averaged for its step {own + 1} in the round of step {common + 1} of its group (one of "
                "them had missed a round)"
            )


def make_optimizer(
    model: torch.nn.Module,
    manifest: RunManifest,
    dht: hivemind.DHT,
    *,
    batch_size: int,
    matchmaking_time: float,
    averaging_timeout: float,
    on_round: Callable[[str, int, float], None] | None = None,
    on_state_loaded: Callable[[float], None] | None = None,
    grad_compression: CompressionBase | None = None,
) -> SwarmOptimizer:
    """Wrap the model's parameters in the swarm optimizer; every peer of the run uses exactly this construction."""
    partial_rounds = PartialRounds()  # before hivemind forks the gradient averager, which reports to it
    # hivemind warns (and can deadlock in rare cases) unless a leader's reply timeout is below the matchmaking time
    request_timeout = max(0.2, min(3.0, matchmaking_time / 2))
    return SwarmOptimizer(
        dht=dht,
        run_id=manifest.run_id,
        target_batch_size=manifest.target_batch_size,
        batch_size_per_step=batch_size,
        params=param_groups(model, manifest.weight_decay),
        optimizer=optimizer_factory(manifest),
        scheduler=scheduler_factory(manifest),
        matchmaking_time=matchmaking_time,
        averaging_timeout=averaging_timeout,
        # a groupmate silent for this long mid-round is dropped and the round finishes with partial sums; hivemind's
        # default (= matchmaking time) dropped CPU-starved peers and left the survivors with unequal weights
        next_chunk_timeout=max(matchmaking_time, averaging_timeout / 2),
        load_state_timeout=max(60.0, 4 * averaging_timeout),
        client_mode=dht.client_mode,
        # Parameters and Adam moments are averaged every 10 steps to bound drift after failed or partial rounds.
        # Synchronously: hivemind's delayed variant copies the averaged tensors over the local ones whenever the
        # round finishes, which can undo an optimizer step taken meanwhile (seen as peers ending a step apart).
        average_state_every=STATE_AVERAGING_EVERY,
        delay_state_averaging=False,
        # Adam moments are not averaged: with average_opt_statistics=("exp_avg", "exp_avg_sq"), hivemind 1.1.12
        # left the one peer that had never loaded state with a third of the swarm's moments (3 peers, measured).
        averager_opts=dict(request_timeout=request_timeout),
        # gradients are weighted by the samples a peer claims: at most the target batch counts
        grad_averager_factory=partial(
            hivemind_compat.RobustGradientAverager,
            request_timeout=request_timeout,
            **guards.robust_options(manifest.aggregation, manifest.target_batch_size),
            on_partial=partial_rounds,
        ),
        partial_rounds=partial_rounds,
        aggregation=manifest.aggregation,
        grad_compression=grad_compression if grad_compression is not None else NoCompression(),
        # progress records of peers that vanished expire after 20 s (hivemind's default 60 s stalls joiners longer)
        tracker_opts=dict(
            min_refresh_period=0.5, max_refresh_period=3.0, default_refresh_period=1.0, metadata_expiration=20.0
        ),
        verbose=False,
        on_round=on_round,
        on_state_loaded=on_state_loaded,
    )


def is_finite_gradient(model: torch.nn.Module) -> bool:
    """True when every local gradient is finite; a non-finite batch is dropped before it can reach the swarm."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    total = torch.stack([g.detach().float().abs().sum() for g in grads]).sum()
    return bool(math.isfinite(total.item()))
