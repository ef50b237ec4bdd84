"""DiLoCo (Douillard et al. 2023) on hivemind 1.1.12: H local steps of the run's optimizer, then one outer round.

One outer round at the boundary of outer epoch ``e`` (``after_inner_step`` runs it after every ``inner_steps`` calls):

1. pseudo-gradient ``Δ = θ_outer − θ_local`` (CPU fp32, written into the outer parameters' ``.grad`` buffers);
2. ``Δ`` is averaged with the peers at the same outer epoch (``PseudoGradientAverager``: a hivemind all-reduce,
   weight 1 per peer, the run's aggregation rule (``peer.swarm.robust``), optional fp16/int8 compression);
3. the outer optimizer ``SGD(outer_lr, outer_momentum, nesterov)`` steps ``θ_outer`` with the averaged ``Δ`` as its
   gradient, the outer epoch becomes ``e + 1`` and ``θ_local ← θ_outer``. The inner optimizer's state is kept.

``θ_outer``, the momentum buffers and the epoch live in ``OuterStateAverager`` (a ``TrainingStateAverager`` with an
offloaded outer optimizer); it also serves them, uncompressed, to joiners and stragglers (``load_state_from_peers``).

How peers are matched into a round (the simplest robust scheme found; alternatives are in the design notes below):

- **Progress records.** Every peer keeps a record ``{run_id}_diloco`` under its own signed subkey (``[owner:<its
  public key>]``: only it can write there, and the key names its peer id, as for the metrics records) with its outer
  epoch and whether it is at the boundary ("ready"), refreshed by a heartbeat thread every ``heartbeat_period`` seconds
  (it expires after 3 periods, so a dead peer is forgotten within ~15 s by default). A peer that leaves cleanly
  (``leave``) overwrites its record with a *withdrawn* one (all zero, ``time`` 0.0), which the others ignore at
  once; a round still looking for its group is given up as soon as no other peer of that round is left on record.
- **Epoch-keyed groups.** Before a round the averager's group key is set to the epoch (16 bits of it), so hivemind's
  matchmaking only ever groups peers of the same outer epoch: a straggler can never mix a pseudo-gradient computed
  from an older ``θ_outer`` into the others' round. The epoch also travels in ``gather`` and is checked.
- **At the boundary** a peer marks itself ready and reads the records: any peer at a *higher* epoch means this peer
  is stale: it downloads the outer state (params, momentum, epoch; outcome ``reloaded``), drops its local progress
  and continues from there. No other peer at its epoch: it steps alone with its own ``Δ`` at once (``solo``).
  Otherwise it waits (at most ``wait_for_peers`` s) until those peers are ready, then runs the all-reduce with a
  matchmaking window of ``matchmaking_time`` s and a bounded ``averaging_timeout``. A round that fails (no group,
  timeout, a groupmate died) falls back to the local ``Δ`` (``failed``); none of this raises or blocks for longer
  than ``wait_for_peers + matchmaking_timeout + averaging_timeout``.
- **Agreement.** Lossy compression makes each peer's averaged ``Δ`` slightly different (hivemind's reducers return
  ``avg − dequant(part_i)`` to each sender), a failed round leaves one peer with its own ``Δ``, and a ``partial``
  round (a groupmate dropped as too slow, or averaged parts that never came back: ``robust.PartialRounds``) leaves
  some parts averaged without a groupmate; all make the peers' ``θ_outer`` drift apart. Every ``agreement_every``
  outer epochs, after a successful or partial round, the peers average ``θ_outer`` and the momentum buffers exactly
  (NoCompression, through ``OuterStateAverager``), which brings them back together (to fp32 rounding: each peer adds
  ``avg − own`` to its own value). Momentum drift is bounded by itself (a decaying sum of per-round errors);
  parameter drift is what the agreement resets.
- **Agreement on demand.** A peer whose round failed, went partial, or went alone while others were expected knows
  that its ``θ_outer`` is now apart from the others' (without compression nothing else would ever bring them back:
  each later round moves every peer by the same average). It says so in the data its next round gathers
  (``apart``); every peer of that group sees the same gathered data, so all of them run an agreement round right
  after that round's outer step, or none does. An agreement that succeeds clears the flag; one that fails leaves it
  for the next round. Seen in the test swarm on busy cores: a leader's ACCEPTED never reached its follower, the
  leader waited out its all-reduce and the follower its matchmaking, and both stepped with their own pseudo-gradient.

Overlap (``overlap=True``, the "eager", one-round-delayed variant): at boundary ``k`` the peer first waits for the
rest of the round it started at boundary ``k − 1`` and applies the outer step with that averaged ``Δ_{k−1}``; then
``Δ_k = ref − θ_local`` (``ref``: the local params right after the previous boundary) is averaged in a background
thread while the inner steps continue from ``θ_local ← θ_outer − Δ_k`` (its own progress stands in for the average
until that arrives), ``ref ← θ_local``. A slow link then costs wall time only when an exchange takes longer than H
inner steps. ``flush()`` applies the round still in flight (call it at the end of training).

Bytes: hivemind counts no traffic, so ``bytes_sent``/``bytes_received`` are *estimates*: a butterfly all-reduce in a
group of n sends (and receives) ``2·(n−1)/n`` of the compressed vector (compressed size = hivemind's
``estimate_compression_ratio`` × 4 bytes × numel). Agreement rounds are counted the same way (uncompressed).

Late joiners: call ``load_state_from_peers()`` before the first inner step; ``θ_outer``, momentum and epoch then equal
a peer's bit for bit. ``on_state_loaded`` and ``joiner_lr_factor`` let the trainer warm up the inner learning rate
(the joiner's inner AdamW starts cold).

Design notes: OpenDiLoCo matches rounds with a progress tracker's ETA, which needs sample counting and throughput
estimates; the records here need neither (the boundary is H steps, a peer's state is its epoch). Matching by
``gather`` alone would group peers of different epochs (``gather`` is only seen after the exchange).

All peers of a run must use the same class names (hivemind embeds them in RPC handler names), the same
``inner_steps``/outer hyper-parameters, compression and ``agreement_every``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from functools import partial

import hivemind
import pydantic.v1 as pydantic
import torch
from hivemind.averaging.control import AveragingStage
from hivemind.compression import (
    CompressionInfo,
    NoCompression,
    ScaledFloat16Compression,
    TensorRole,
    Uniform8BitQuantization,
)
from hivemind.utils import get_dht_time

from peer.run import schema
from peer.run.manifest import DEFAULT_AGGREGATION, OUTER_COMPRESSIONS
from peer.swarm import guards, hivemind_compat, membership, records
from peer.swarm.robust import PartialRounds

logger = logging.getLogger(__name__)

# fp16 is ScaledFloat16: plain Float16Compression clamps at ±65504 and goes subnormal below 6e-5, where many
# pseudo-gradient entries (~ H × lr) lie.
PSEUDOGRAD_COMPRESSION = {"none": NoCompression, "fp16": ScaledFloat16Compression, "int8": Uniform8BitQuantization}
PSEUDOGRAD_COMPRESSIONS = OUTER_COMPRESSIONS  # the manifest's choices; the dict above must cover exactly these
assert set(PSEUDOGRAD_COMPRESSION) == set(OUTER_COMPRESSIONS)
OUTCOMES = ("success", "partial", "solo", "failed", "reloaded")
EPOCH_BITS = 16  # group key bits carrying the outer epoch (mod 2**16)
# A leaving peer's last record: round 0, not ready, at wall time 0.0, which no live heartbeat writes. Peers of this
# version ignore it at once; older ones see a peer at round 0, which no round after the first waits for.
WITHDRAWN = dict(round=0, ready=False, step=0, time=0.0)
# While a round looks for its group: how often it checks the records for peers that left, and in how many checks in a
# row no other peer of the round must be left before it gives up (one more covers a record on its way to the DHT).
DEPARTURE_CHECK_PERIOD = 0.5
DEPARTURE_CHECKS = 2


# The hivemind subclasses of this mode live with bertswarm's other hivemind internals (every peer and the coordinator
# must use these exact classes: hivemind names RPC handlers after them)
PseudoGradientAverager = hivemind_compat.PseudoGradientAverager
OuterStateAverager = hivemind_compat.OuterStateAverager


@dataclasses.dataclass
class RoundReport:
    """One boundary: what happened to the pseudo-gradient of epoch ``epoch``."""

    outcome: str  # success | partial (see robust.PartialRounds) | solo | failed | reloaded
    epoch: int  # the outer epoch the round was for (after it: epoch + 1, or the loaded epoch)
    group_size: int = 1
    seconds: float = 0.0  # duration of the exchange (readiness wait + matchmaking + all-reduce)
    blocked_seconds: float = 0.0  # how long the trainer was blocked at this boundary (overlap: only the remainder)
    bytes_sent: int = 0  # estimated, see the module docstring
    bytes_received: int = 0
    agreed: bool = False  # an exact agreement round of θ_outer/momentum followed and succeeded
    on_demand: bool = False  # that agreement was asked for by a groupmate apart from the others (not the schedule)


@dataclasses.dataclass
class DiLoCoStatus:
    inner_step: int  # inner steps done since the last boundary (0..H-1)
    inner_steps: int  # H
    outer_epoch: int
    round_in_flight: bool  # overlap: an exchange runs in the background
    rounds: dict[str, int]  # outcome -> count
    last: RoundReport | None
    bytes_sent: int  # totals, estimated
    bytes_received: int
    state_loads: int
    last_state_load_seconds: float
    inner_steps_since_load: int | None  # None if this peer never loaded state


@dataclasses.dataclass
class _Exchange:
    outcome: str
    epoch: int
    group_size: int = 1
    seconds: float = 0.0
    apart: bool = False  # this round leaves the peer apart from peers it expected (solo while others were coming)
    agree: bool = False  # a groupmate said it was apart: the whole group agrees after this round


class DiLoCo:
    """The DiLoCo engine of one peer. The trainer steps its inner optimizer as usual, then calls
    ``after_inner_step()``; every ``inner_steps`` calls it runs the outer round (see the module docstring).

    :param dht: this peer's DHT
    :param run_id: the run; prefixes ``{run_id}_outer`` (state), ``{run_id}_pseudograd`` (all-reduce),
      ``{run_id}_diloco`` (progress records)
    :param model: the trained module (its parameters are θ_local, on any device/dtype)
    :param inner_steps: H, inner steps per outer round
    :param outer_lr, outer_momentum, nesterov: the outer SGD (no weight decay, by construction; nesterov only applies
      with momentum > 0)
    :param compression: pseudo-gradient compression, one of ``PSEUDOGRAD_COMPRESSIONS``
    :param overlap: the eager, one-round-delayed variant
    :param agreement_every: exact θ_outer/momentum averaging every this many outer epochs (0: never); default 10
      with lossy compression or overlap, else 0
    :param matchmaking_time: hivemind's matchmaking window (s)
    :param matchmaking_timeout: how long to look for a group at all (default 3 × matchmaking_time)
    :param averaging_timeout: bound on one all-reduce once the group is formed (minutes for large models)
    :param wait_for_peers: how long a peer at the boundary waits for the others of its epoch to get there
    :param load_state_timeout: bound on one state download (also the per-chunk timeout)
    :param heartbeat_period: progress-record refresh period (records expire after 3 periods)
    :param aggregation: the run's rule for combining groupmates' contributions (``peer.swarm.robust``)
    :param on_round: called with each ``RoundReport``
    :param on_state_loaded: called with (outer epoch, seconds) after each successful state download
    """

    def __init__(
        self,
        *,
        dht: hivemind.DHT,
        run_id: str,
        model: torch.nn.Module,
        inner_steps: int,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        compression: str = "none",
        overlap: bool = False,
        agreement_every: int | None = None,
        matchmaking_time: float = 3.0,
        matchmaking_timeout: float | None = None,
        averaging_timeout: float = 120.0,
        wait_for_peers: float = 30.0,
        load_state_timeout: float = 600.0,
        heartbeat_period: float = 5.0,
        client_mode: bool | None = None,
        aggregation: str = DEFAULT_AGGREGATION,
        on_round: Callable[[RoundReport], None] | None = None,
        on_state_loaded: Callable[[int, float], None] | None = None,
    ):
        if inner_steps < 1:
            raise ValueError("inner_steps must be >= 1")
        if compression not in PSEUDOGRAD_COMPRESSION:
            raise ValueError(f"compression must be one of {PSEUDOGRAD_COMPRESSIONS}, not {compression!r}")
        if agreement_every is None:
            agreement_every = 0 if compression == "none" and not overlap else 10
        self.dht, self.run_id, self.model = dht, run_id, model
        self.inner_steps, self.overlap, self.agreement_every = inner_steps, overlap, agreement_every
        self.matchmaking_time = matchmaking_time
        self.matchmaking_timeout = matchmaking_timeout if matchmaking_timeout is not None else 3 * matchmaking_time
        self.averaging_timeout, self.wait_for_peers = averaging_timeout, wait_for_peers
        self.load_state_timeout, self.heartbeat_period = load_state_timeout, heartbeat_period
        self.client_mode = dht.client_mode if client_mode is None else client_mode
        self._on_round = on_round or (lambda report: None)
        self._on_state_loaded = on_state_loaded or (lambda epoch, seconds: None)

        names, params = trained_parameters(model)
        self._local = list(params)
        self.numel = sum(p.numel() for p in self._local)
        compression_impl = PSEUDOGRAD_COMPRESSION[compression]()
        request_timeout = max(0.2, min(3.0, matchmaking_time / 2))
        common = dict(
            dht=dht,
            min_matchmaking_time=matchmaking_time,
            request_timeout=request_timeout,
            allreduce_timeout=averaging_timeout,
            next_chunk_timeout=max(matchmaking_time, averaging_timeout / 2),
            client_mode=self.client_mode,
            start=True,
            **guards.robust_options(aggregation, weight_cap=1.0),  # every peer sends weight 1
        )
        # before hivemind forks the averagers: they must inherit the finite-only reducer and its counter
        guards.share_rejection_counter()
        hivemind_compat.install()  # also the NumPy >= 2.4 fix of hivemind's 8-bit decoder (int8 compression)
        opt_stats = ("momentum_buffer",) if outer_momentum > 0 else ()  # agreements: scheduled or on demand
        self.state = OuterStateAverager(
            prefix=f"{run_id}_outer",
            params=self._local,
            parameter_names=names,
            optimizer=outer_optimizer(outer_lr, outer_momentum, nesterov),
            offload_optimizer=True,
            custom_gradients=True,
            average_opt_statistics=opt_stats,
            state_compression=NoCompression(),
            compression=NoCompression(),  # agreement rounds are exact
            **common,
        )
        self._outer = [p for g in self.state.optimizer.param_groups for p in g["params"]]
        self._grads = [p.grad for p in self._outer]  # created by hivemind (zeros); never set to None
        # the momentum tensors the agreement round averages in place; a state download replaces the optimizer's,
        # so _repoint_momentum copies it back into these
        self._momentum = [self.state.optimizer.state[p].get("momentum_buffer") for p in self._outer]
        self._partial_rounds = PartialRounds()  # pseudo-gradient rounds that finished in part
        self.pseudograd = PseudoGradientAverager(
            self._grads,
            prefix=f"{run_id}_pseudograd",
            allow_state_sharing=False,
            compression=compression_impl,
            on_partial=self._partial_rounds,
            **common,
        )
        ratio = compression_impl.estimate_compression_ratio(
            CompressionInfo.from_tensor(self._grads[0], key=0, role=TensorRole.GRADIENT)
        )
        self._pseudograd_bytes = int(ratio * 4 * self.numel)
        self._state_bytes = 4 * self.numel * (1 + len(opt_stats))

        self._ref = [p.detach().clone() for p in self._outer] if overlap else None  # θ_local after last boundary
        self.inner_step = 0
        self.rounds = dict.fromkeys(OUTCOMES, 0)
        self.last: RoundReport | None = None
        self.bytes_sent = self.bytes_received = 0
        self.state_loads, self.last_state_load_seconds = 0, 0.0
        self._steps_since_load: int | None = None
        self._pending: Future | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-exchange") if overlap else None

        self._record_key = schema.diloco_key(run_id)
        self._subkey = records.run_validators(run_id)[1]  # signed with the peer's identity key
        self._dht_lock = threading.Lock()
        # the round this peer takes part in next (or now, if ready): its outer epoch, or epoch + 1 once the
        # exchange of the current epoch is over (overlap: until the next boundary applies it)
        self._record = dict(round=0, ready=False, step=0)
        # θ_outer may differ from the other peers' since a round that failed, went partial, or went alone while they
        # were expected; gathered in the next round, which then ends with an agreement (module docstring)
        self._apart = False
        self.others_seen = 0  # live peers of the run other than this one, as of the last read of the records
        self._stop = threading.Event()
        self._leaving = threading.Event()  # set on the stop signal (cancel_matchmaking): join no new group
        self._left = False  # the withdrawn record is stored: publish nothing after it (under _dht_lock)
        self._control = None  # the averaging round in progress (pseudo-gradients or agreement), for cancel_matchmaking
        self._store_futures: list = []
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="diloco-heartbeat", daemon=True)
        self._publish(wait=True)
        self._heartbeat.start()

    # --- public API ---------------------------------------------------------------------------------------------------

    @property
    def outer_epoch(self) -> int:
        return self.state.local_epoch

    @property
    def status(self) -> DiLoCoStatus:
        return DiLoCoStatus(
            inner_step=self.inner_step,
            inner_steps=self.inner_steps,
            outer_epoch=self.outer_epoch,
            round_in_flight=self._pending is not None,
            rounds=dict(self.rounds),
            last=self.last,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            state_loads=self.state_loads,
            last_state_load_seconds=self.last_state_load_seconds,
            inner_steps_since_load=self._steps_since_load,
        )

    def joiner_lr_factor(self, warmup_steps: int) -> float:
        """Multiplier for the inner learning rate: linear warm-up over ``warmup_steps`` inner steps after this peer
        last loaded the outer state (its inner optimizer state is cold then); 1.0 if it never loaded state."""
        if self._steps_since_load is None or warmup_steps <= 0:
            return 1.0
        return min(1.0, (self._steps_since_load + 1) / (warmup_steps + 1))

    def after_inner_step(self) -> RoundReport | None:
        """Call once after every inner optimizer step; returns the report of the boundary it ran, if any."""
        self.inner_step += 1
        if self._steps_since_load is not None:
            self._steps_since_load += 1
        if self.inner_step < self.inner_steps:
            return None
        self.inner_step = 0
        return self._boundary_overlap() if self.overlap else self._boundary_blocking()

    def load_state_from_peers(self, timeout: float | None = None) -> bool:
        """Download θ_outer, momentum and epoch from the peer with the highest epoch and set θ_local to it (use
        before the first inner step of a joiner). Returns whether a newer state was loaded."""
        self._collect_discard()
        return self._reload(timeout)

    def outer_state(self, copy: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor | None], int]:
        """(θ_outer, momentum buffers, outer epoch), taken together; ``copy=False`` returns the live tensors (fine on
        the training thread, which is the only one that steps them: the background exchange writes only the
        pseudo-gradient buffers)."""
        with torch.no_grad(), self.state.lock_averaged_tensors:
            params = [p.detach() for p in self._outer]
            momentum = [self.state.optimizer.state[p].get("momentum_buffer") for p in self._outer]
            momentum = [m.detach() if m is not None else None for m in momentum]
            if copy:
                params = [p.clone() for p in params]
                momentum = [m.clone() if m is not None else None for m in momentum]
            return params, momentum, self.state.local_epoch

    @torch.no_grad()
    def restore(self, momentum: list[torch.Tensor | None] | None, epoch: int) -> None:
        """Resume from saved state: θ_outer ← the model's current parameters (θ_local), the outer momentum buffers
        (None: keep zeros) and the outer epoch. Call before the first inner step."""
        with self.state.lock_averaged_tensors:
            for outer, local in zip(self._outer, self._local, strict=True):
                outer.copy_(local.detach().to(device="cpu", dtype=torch.float32))
            for buffer, saved in zip(self._momentum, momentum or [None] * len(self._momentum), strict=True):
                if buffer is not None and saved is not None:
                    buffer.copy_(saved)
            self.state.local_epoch = epoch
        if self._ref is not None:
            for ref, outer in zip(self._ref, self._outer, strict=True):
                ref.copy_(outer)
        self.inner_step = 0
        self._after_epoch_change()
        self._publish(wait=False)

    def flush(self) -> RoundReport | None:
        """Overlap: wait for the round in flight, apply its outer step and set θ_local ← θ_outer (local progress
        since the last boundary is dropped: call it at a boundary, e.g. at the end of training)."""
        if self._pending is None:
            return None
        report = self._collect()
        self._set_local_to_outer()
        for ref, outer in zip(self._ref, self._outer, strict=True):
            ref.copy_(outer)
        self.inner_step = 0
        return report

    def cancel_matchmaking(self) -> bool:
        """This peer is leaving (the stop signal; quick, safe in a signal handler): join no new group, and abandon
        the round in progress if it is still looking for its group (a round exchanging tensors is left to finish:
        cancelling it would fail it for the group). Returns whether a round was cancelled."""
        self._leaving.set()
        control = self._control
        if control is not None and not control.done() and control.stage == AveragingStage.LOOKING_FOR_GROUP:
            return control.cancel()
        return False

    def leave(self, timeout: float = 3.0) -> None:
        """Leave the swarm, first thing on the way out: no more rounds, no more heartbeats, and this peer's record
        replaced by ``WITHDRAWN`` (stored within ``timeout`` seconds), so the others stop waiting for it at once
        instead of when its record expires. ``shutdown`` calls it; ``peer.trainer`` calls it before saving."""
        self.cancel_matchmaking()
        self._stop.set()
        self._heartbeat.join(timeout=5)
        with self._dht_lock:
            if self._left:
                return
            self._left = True
            expiration = get_dht_time() + 3 * self.heartbeat_period  # later than any earlier record's: it replaces it
            future = self.dht.store(self._record_key, WITHDRAWN, expiration, subkey=self._subkey, return_future=True)
            self._store_futures.append(future)
        try:
            future.result(timeout=timeout)
        except Exception as e:  # the others find out when the record expires, as after a crash
            logger.debug("withdrawn progress record not stored: %r", e)

    def shutdown(self) -> None:
        self.leave()
        if self._pending is not None:
            try:
                self._pending.result(timeout=self.matchmaking_timeout + self.averaging_timeout + 10)
            except Exception as e:
                logger.debug("exchange in flight at shutdown: %r", e)
            self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)  # the wait above is the bound
        self._heartbeat.join(timeout=5)
        with self._dht_lock:
            for future in self._store_futures:
                try:
                    future.result(timeout=3)
                except Exception as e:
                    logger.debug("progress record store failed: %r", e)
            self._store_futures = []
        for averager in (self.pseudograd, self.state):
            if averager.is_alive():
                averager.shutdown()

    # --- boundaries ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _boundary_blocking(self) -> RoundReport:
        started = time.perf_counter()
        epoch = self.outer_epoch
        self._load_pseudograd_()
        exchange = self._exchange(epoch)
        report = self._finish_round(exchange)
        if report.outcome != "reloaded":
            self._set_local_to_outer()
        report.blocked_seconds = time.perf_counter() - started
        self._report(report)
        return report

    @torch.no_grad()
    def _boundary_overlap(self) -> RoundReport | None:
        report = self._collect() if self._pending is not None else None
        if report is not None and report.outcome == "reloaded":
            return report  # θ_local = θ_outer = ref: start over, nothing to send
        # Δ_k = ref − θ_local; θ_local ← θ_outer − Δ_k; ref ← θ_local; the exchange of Δ_k runs in the background
        with self.pseudograd.get_tensors():
            for grad, ref, local in zip(self._grads, self._ref, self._local, strict=True):
                torch.sub(ref, local.detach().to(device="cpu", dtype=torch.float32), out=grad)
        for grad, outer, local, ref in zip(self._grads, self._outer, self._local, self._ref, strict=True):
            torch.sub(outer, grad, out=ref)
            local.copy_(ref)
        self._pending = self._executor.submit(self._exchange, self.outer_epoch)
        return report

    def _collect(self) -> RoundReport:
        """Overlap: wait for the exchange in flight and apply its outcome to θ_outer (the local params are left)."""
        started = time.perf_counter()
        pending, self._pending = self._pending, None
        exchange = pending.result()
        report = self._finish_round(exchange)
        report.blocked_seconds = time.perf_counter() - started  # the remainder of the exchange + the outer step
        self._report(report)
        return report

    def _collect_discard(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()
            except Exception as e:
                logger.debug("exchange discarded: %r", e)

    def _finish_round(self, exchange: _Exchange) -> RoundReport:
        """The outer step after an exchange. The caller still owns θ_local (blocking: set it to θ_outer unless the
        state was reloaded)."""
        epoch = exchange.epoch
        report = RoundReport(outcome=exchange.outcome, epoch=epoch, seconds=exchange.seconds)
        if exchange.outcome == "stale":
            if self._reload():
                report.outcome = "reloaded"
                return report
            report.outcome = "failed"
            logger.warning("outer epoch %d: no peer could send the newer outer state; stepping alone", epoch)
        if report.outcome in ("success", "partial"):
            report.group_size = exchange.group_size
            n = exchange.group_size
            report.bytes_sent = report.bytes_received = int(2 * (n - 1) / n * self._pseudograd_bytes)
        elif exchange.outcome == "failed" and self.overlap:
            # an all-reduce broke off: the buffers may hold a partial average; take the local Δ (= θ_outer − ref) again
            with self.pseudograd.get_tensors():
                for grad, outer, ref in zip(self._grads, self._outer, self._ref, strict=True):
                    torch.sub(outer, ref, out=grad)
        elif exchange.outcome == "failed":
            self._load_pseudograd_()
        self._outer_step()
        scheduled = self.agreement_every > 0 and self.outer_epoch % self.agreement_every == 0
        report.on_demand = exchange.agree and not scheduled
        if (
            report.outcome in ("success", "partial")  # the same for every peer of the group: all of them agree or none
            and (scheduled or exchange.agree)
            and self._agree(self.outer_epoch, report.group_size)
        ):
            report.agreed = True
            report.bytes_sent += int(2 * (report.group_size - 1) / report.group_size * self._state_bytes)
            report.bytes_received = report.bytes_sent
        if report.agreed:
            self._apart = False
            if report.on_demand:
                logger.info("outer epoch %d: a groupmate was apart after a failed or partial round; the group averaged "
                            "its outer parameters exactly and is together again", self.outer_epoch)  # fmt: skip
        elif report.outcome in ("failed", "partial") or exchange.apart:
            self._apart = True
        self._publish(wait=False)
        return report

    def _load_pseudograd_(self) -> None:
        """Blocking mode: Δ = θ_outer − θ_local into the averaged buffers."""
        with self.pseudograd.get_tensors():
            for grad, outer, local in zip(self._grads, self._outer, self._local, strict=True):
                torch.sub(outer, local.detach().to(device="cpu", dtype=torch.float32), out=grad)

    def _report(self, report: RoundReport) -> None:
        self.rounds[report.outcome] += 1
        self.bytes_sent += report.bytes_sent
        self.bytes_received += report.bytes_received
        self.last = report
        try:
            self._on_round(report)
        except Exception:
            logger.exception("on_round callback failed")

    # --- the pieces -------------------------------------------------------------------------------------------------

    def _outer_step(self) -> None:
        with torch.no_grad(), self.state.lock_averaged_tensors:
            self.state.optimizer.step()  # grads are the (averaged) pseudo-gradients; never zero_grad(set_to_none)
            self.state.local_epoch += 1
        self._after_epoch_change()

    def _after_epoch_change(self) -> None:
        if not self.client_mode:
            self.state.state_sharing_priority = float(self.outer_epoch)
        with self._dht_lock:
            self._record.update(round=self.outer_epoch, ready=False, step=self.inner_step)

    @torch.no_grad()
    def _set_local_to_outer(self) -> None:
        hivemind_compat.apply_offloaded_parameters(self.state)

    def _reload(self, timeout: float | None = None) -> bool:
        started, before = time.perf_counter(), self.outer_epoch
        try:
            self.state.load_state_from_peers(timeout=timeout or self.load_state_timeout)
        except Exception as e:
            logger.warning("loading the outer state from peers failed: %r", e)
        if self.outer_epoch <= before:
            return False
        self._repoint_momentum()
        if self.overlap:
            # the peers it loaded from have this epoch's round in flight already: join their next one; the update of
            # the round in flight is missed here (until the next agreement round)
            with self.state.lock_averaged_tensors:
                self.state.local_epoch += 1
        with torch.no_grad():
            self._set_local_to_outer()  # hivemind did it already; repeated for clarity after the re-pointing
            if self._ref is not None:
                for ref, outer in zip(self._ref, self._outer, strict=True):
                    ref.copy_(outer)
        self.inner_step = 0
        self._steps_since_load = 0
        self._apart = False  # a copy of a peer's state: apart from the others only as far as that peer is
        self.state_loads += 1
        self.last_state_load_seconds = time.perf_counter() - started
        self._after_epoch_change()
        self._publish(wait=False)
        logger.info("loaded the outer state of epoch %d from peers (was %d)", self.outer_epoch, before)
        try:
            self._on_state_loaded(self.outer_epoch, self.last_state_load_seconds)
        except Exception:
            logger.exception("on_state_loaded callback failed")
        return True

    @torch.no_grad()
    def _repoint_momentum(self) -> None:
        with self.state.lock_averaged_tensors:
            for param, buffer in zip(self._outer, self._momentum, strict=True):
                loaded = self.state.optimizer.state[param].get("momentum_buffer")
                if buffer is not None and loaded is not None and loaded is not buffer:
                    buffer.copy_(loaded)
                    self.state.optimizer.state[param]["momentum_buffer"] = buffer

    def _agree(self, epoch: int, group_size: int) -> bool:
        """Exact average of θ_outer and momentum with the peers of this epoch (``group_size``: the round's group, who
        are expected); True if a group did it."""
        try:
            self.state.set_group_bits(_epoch_bits(epoch))
            self.state.expect_group_size(group_size)
            control = hivemind_compat.average_tensors_once(
                self.state, gather=dict(epoch=epoch), weight=1.0, timeout=self.matchmaking_timeout
            )
            gathered = self._await_group(control, epoch, self.matchmaking_timeout + self.averaging_timeout + 5)
        except _GroupGone as e:
            logger.info("outer epoch %d: agreement round given up: %s", epoch, e)
            return False
        except Exception as e:
            logger.warning("outer epoch %d: agreement round failed (%r); peers may stay apart until the next", epoch, e)
            if "control" in locals() and not control.done():
                control.cancel()
            return False
        return bool(gathered) and len(gathered) > 1

    def _exchange(self, epoch: int) -> _Exchange:
        """Find the peers of this round and average the pseudo-gradients with them (in a thread if overlap)."""
        started = time.perf_counter()
        with self._dht_lock:
            self._record.update(round=epoch, ready=True)
        self._publish(wait=True)
        exchange = _Exchange("failed", epoch)
        try:
            exchange = self._match_and_average(epoch)
            return exchange
        except Exception as e:  # never let a round end training: fall back to the local pseudo-gradient
            logger.warning("outer round %d: %r; stepping with the local pseudo-gradient", epoch, e)
            return exchange
        finally:
            exchange.seconds = time.perf_counter() - started
            with self._dht_lock:  # at once, before the outer step: the others must not take this peer for a straggler
                self._record.update(round=epoch if exchange.outcome == "stale" else epoch + 1, ready=False)
            self._publish(wait=False)

    def _match_and_average(self, epoch: int) -> _Exchange:
        deadline = time.monotonic() + self.wait_for_peers
        while True:
            others = self._read_records()
            if any(r > epoch for r, _ in others):
                return _Exchange("stale", epoch)
            ready = [r == epoch and is_ready for r, is_ready in others]
            # still to come: peers training towards this round, and peers still in the previous round's exchange
            coming = [(r == epoch and not is_ready) or (r == epoch - 1 and is_ready) for r, is_ready in others]
            if self._stop.is_set() or self._leaving.is_set():  # this peer is leaving
                return _Exchange("failed", epoch)
            if not any(coming) or time.monotonic() > deadline:
                break
            time.sleep(min(0.2, self.heartbeat_period))
        if not any(ready):
            if any(coming):
                logger.info("outer round %d: the other peers did not reach the boundary in time; stepping alone", epoch)
            return _Exchange("solo", epoch, apart=any(coming))
        self.pseudograd.set_group_bits(_epoch_bits(epoch))
        # the group forms once every peer at the boundary is in it, not after the whole matchmaking window; a peer that
        # is ready on record but never comes (it crashed) costs the window, and the others average without it
        self.pseudograd.expect_group_size(1 + sum(ready))
        self._partial_rounds.take()  # a report left by an earlier round is not this one's
        control = self.pseudograd.step(
            gather=dict(epoch=epoch, apart=self._apart), weight=1.0, timeout=self.matchmaking_timeout, wait=False
        )
        try:
            gathered = self._await_group(control, epoch, self.matchmaking_timeout + self.averaging_timeout + 5)
        except _GroupGone as e:
            if self._leaving.is_set():
                return _Exchange("failed", epoch)
            logger.warning("outer round %d: %s; stepping alone instead of waiting for a group", epoch, e)
            return _Exchange("solo", epoch, apart=True)
        except Exception as e:
            if not control.done():
                control.cancel()
            logger.warning("outer round %d: averaging failed (%r); stepping with the local pseudo-gradient", epoch, e)
            return _Exchange("failed", epoch)
        epochs = {g.get("epoch") if isinstance(g, dict) else None for g in gathered.values()}
        if epochs != {epoch}:  # cannot happen with epoch-keyed groups unless 2**16 epochs apart
            logger.warning(
                "outer round %d: groupmates at rounds %s; stepping with the local pseudo-gradient", epoch, epochs
            )
            return _Exchange("failed", epoch)
        if len(gathered) <= 1:
            return _Exchange("solo", epoch, apart=True)  # the peers on record at the boundary never joined the group
        outcome = "partial" if self._partial_rounds.take() else "success"
        agree = any(isinstance(g, dict) and g.get("apart") is True for g in gathered.values())
        return _Exchange(outcome, epoch, group_size=len(gathered), agree=agree)

    def _await_group(self, control, epoch: int, timeout: float):
        """``control.result(timeout)``, except that a round still looking for its group is cancelled (``_GroupGone``)
        once this peer is leaving, or once no other peer of round ``epoch`` is left on record (``DEPARTURE_CHECKS``
        reads in a row): they left, and hivemind would look until the matchmaking timeout, then log a traceback."""
        self._control = control
        if self._leaving.is_set():
            self.cancel_matchmaking()  # the stop signal came just before this round began
        deadline = time.monotonic() + timeout
        gone = 0
        try:
            while True:
                try:
                    return control.result(timeout=max(0.0, min(DEPARTURE_CHECK_PERIOD, deadline - time.monotonic())))
                except FutureTimeoutError:
                    if time.monotonic() >= deadline:
                        raise
                if control.stage != AveragingStage.LOOKING_FOR_GROUP:
                    continue
                others = None if self._leaving.is_set() else self._read_others()
                gone = gone + 1 if others is not None and not any(r == epoch for r, _ in others) else 0
                if (self._leaving.is_set() or gone >= DEPARTURE_CHECKS) and control.cancel():
                    raise _GroupGone("this peer is leaving" if self._leaving.is_set() else "the other peers left")
        except CancelledError:
            raise _GroupGone("this peer is leaving" if self._leaving.is_set() else "the round was cancelled") from None
        finally:
            self._control = None

    # --- progress records ---------------------------------------------------------------------------------------------

    def _publish(self, wait: bool) -> None:
        with self._dht_lock:
            if self._left:
                return  # the withdrawn record stays
            record = dict(self._record, step=self.inner_step, time=float(time.time()))
            expiration = get_dht_time() + 3 * self.heartbeat_period
            self._store_futures = [f for f in self._store_futures if not f.done()]
            future = self.dht.store(self._record_key, record, expiration, subkey=self._subkey, return_future=True)
            self._store_futures.append(future)  # hivemind frees the request when its future is collected
        if wait:
            try:
                future.result(timeout=max(5.0, self.heartbeat_period))
            except Exception as e:
                logger.debug("progress record store failed: %r", e)

    def _read_records(self) -> list[tuple[int, bool]]:
        """(round, ready) of every other live peer (withdrawn records left out); [] when the read failed."""
        records, _ = self._read_all()
        return records

    def _read_others(self) -> list[tuple[int, bool]] | None:
        """As ``_read_records``, but None unless the read also found this peer's own record (which its heartbeat keeps
        live): an empty list then means that no other peer is there, not that the read failed."""
        records, own = self._read_all()
        return records if own else None

    def _read_all(self) -> tuple[list[tuple[int, bool]], bool]:
        with self._dht_lock:
            future = self.dht.get(self._record_key, latest=True, return_future=True)
        try:
            found = future.result(timeout=max(5.0, self.heartbeat_period))
        except Exception as e:
            logger.debug("reading progress records failed: %r", e)
            return [], False
        if found is None or not isinstance(found.value, dict):
            self.others_seen = 0
            return [], False
        records, own = [], False
        for subkey, entry in found.value.items():
            if subkey == self._subkey:
                own = True
                continue
            if not membership.allows_owner(subkey):
                continue  # a restricted run counts its members only
            try:
                progress = schema.DiLoCoProgress.parse_obj(getattr(entry, "value", None))
            except (pydantic.ValidationError, TypeError):
                continue  # the DHT's validator refuses such records; one that got through anyway is ignored
            if progress.time <= WITHDRAWN["time"]:
                continue  # that peer left
            records.append((progress.round, progress.ready))
        self.others_seen = len(records)
        return records, own

    def _heartbeat_loop(self) -> None:
        """Refresh this peer's record and count the others' (for the status line, off the training thread)."""
        while not self._stop.wait(self.heartbeat_period):
            try:
                self._publish(wait=False)
                self._read_records()
            except Exception as e:  # the DHT may be shutting down
                logger.debug("progress heartbeat failed: %r", e)


class _GroupGone(Exception):
    """A round given up while looking for its group: this peer is leaving, or the others left."""


def outer_optimizer(outer_lr: float, outer_momentum: float, nesterov: bool = True):
    """The outer optimizer of every peer (and of the coordinator's state downloader: the structures must match)."""
    return partial(torch.optim.SGD, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov and outer_momentum > 0)


def trained_parameters(model: torch.nn.Module) -> tuple[tuple[str, ...], tuple[torch.nn.Parameter, ...]]:
    """(names, parameters) of what the outer state holds, in order (tied weights once, as ``named_parameters``)."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    return names, params


def _epoch_bits(epoch: int) -> str:
    return format(epoch % 2**EPOCH_BITS, f"0{EPOCH_BITS}b")
