"""Byzantine-robust aggregation for hivemind 1.1.12's all-reduce: a groupmate cannot steer the average alone.

hivemind's reducer folds every groupmate's tensor part into a running weighted sum as it arrives and trusts the
weight each sender claims, so one peer sending its gradient x -1000, or claiming a weight of 1e9, sets the average of
the whole group; a 1-element part is even broadcast over the whole part (``add_``). Here, the peer that reduces a part
keeps every sender's part until all current senders have arrived, then aggregates them with a robust rule:

- ``AGGREGATIONS`` / ``RULES``: the rules, pure torch functions ``rule(parts [n, d], weights [n]) -> [d]``;
  ``DEFAULT_AGGREGATION`` is ``clipped-mean`` (O(n·d), bounds what any one sender can do).
- ``sanitize_weight`` / ``voting_weights``: a claimed weight is never trusted as sent.
- ``REJECT_REASONS``: why a contribution was dropped (a fixed set: the label values of a rejection counter); the
  reducer reports each rejection to an ``on_reject(reason, sender_index)`` callable; ``RejectionCounts`` is one that
  counts across the averager processes hivemind forks.
- ``RobustTensorPartReducer`` -> ``RobustAllReduceRunner`` -> ``RobustAveragingMixin`` (for ``DecentralizedAverager``
  subclasses): the same rule, wired into hivemind at each level.

Which rule (n senders, f of them Byzantine; "honest spread" is the RMS distance of the honest parts from their mean):

- ``mean`` (n·d): hivemind's weighted average, with bounded weights; one sender moves it anywhere. Trusted swarms.
- ``clipped-mean`` (n·d): each part scaled down to at most ``clip_factor`` (c, default 1) x the median part norm, then
  the weighted mean: a Byzantine sender keeps a bias of at most about ``(f/n)·(c·median norm + |honest mean|)``.
- ``centered-clip`` (~6·n·d): BTARD's CenteredClip (Karimireddy et al. 2021) around the coordinate-wise median with an
  adaptive tau (about the honest spread): the result stays within about ``f/(n−f)`` x tau of the honest mean.
- ``trimmed-mean`` (n·d·log n): coordinate-wise; with f at most the count trimmed per side, every coordinate stays
  within the honest values' range.
- ``median`` (n·d·log n): coordinate-wise; within the honest range per coordinate while f < n/2; the noisiest with
  honest data.

The robust rules (all but the two means) count senders, not claimed samples: a claimed weight cannot buy votes, it
only decides whether a sender votes at all (weight 0: hivemind's "tag along" peers, which have nothing to add). All
rules need f < n/2 at least (``min_group_size >= 2f + 1``); none protects against a Byzantine *reducer*, which can
still return anything for the part it reduces (only BTARD-style verification stops that).

This module touches hivemind internals (the reducer's wait protocol, ``AllReduceRunner.__init__``,
``DecentralizedAverager._run_allreduce_inplace_``); like ``peer.swarm.hivemind_compat``, it was read and checked
against the hivemind versions in ``hivemind_compat.CHECKED_VERSIONS`` only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
from collections.abc import Callable, Sequence

import torch
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import as_aiter, azip

from peer.run.manifest import AGGREGATIONS, DEFAULT_AGGREGATION
from peer.run.schema import OUTLIER_FACTOR, REJECT_REASONS

logger = logging.getLogger(__name__)

CLIP_FACTOR = 1.0  # clipped-mean: parts are clipped to this multiple of the median part norm

OnReject = Callable[[str, int], None]
AggregationRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- weights ----------------------------------------------------------------------------------------------------------


def sanitize_weight(weight: float, cap: float = math.inf) -> float:
    """A sender's claimed weight as it may count: clamped into ``[0, cap]``; NaN, ±Inf and negative weights count 0.

    No honest hivemind peer sends a non-finite or negative weight, so such a claim buys nothing (+Inf is not the cap: it
    is a malformed claim, not a large one); the reducer also rejects those contributions (reason ``weight``). A weight
    above ``cap`` is clamped, not rejected: honest peers can overshoot (hivemind's sync mode sends the samples a peer
    accumulated, which can exceed the target batch slightly). ``cap``: the most one peer can honestly claim, e.g. the
    target batch size in sync mode, 1 when every peer sends weight 1 (DiLoCo)."""
    weight = float(weight)
    if not math.isfinite(weight) or weight < 0:
        return 0.0
    return min(weight, cap)


def voting_weights(weights: torch.Tensor, max_ratio: float | None = OUTLIER_FACTOR) -> torch.Tensor:
    """Weights (already sanitized: finite, >= 0) as they count in an aggregate: each at most ``max_ratio`` x the median
    (low) positive weight, so a few senders claiming the cap cannot outweigh the others; zeros stay zero (they do not
    vote). All zero: every sender counts 1 (hivemind would divide 0 by 0). ``max_ratio=None``: no relative bound."""
    weights = weights.to(torch.float64)
    positive = weights[weights > 0]
    if positive.numel() == 0:
        return torch.ones_like(weights)
    if max_ratio is not None:
        weights = weights.clamp(max=max_ratio * positive.median().item())
    return weights


# --- aggregation rules: pure functions over parts [n, d] and weights [n] ----------------------------------------------


def _flat(parts: torch.Tensor) -> torch.Tensor:
    if parts.ndim == 0 or parts.shape[0] == 0:
        raise ValueError("aggregation needs at least one part")
    return parts.reshape(parts.shape[0], -1).to(torch.float32)


def weighted_mean(parts: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """hivemind's average: ``sum(w_i x_i) / sum(w_i)``. Give it bounded weights (``voting_weights``); weights summing to
    0 count equally. One sender can move it anywhere. ``scale``: each part multiplied by ``scale_i`` first (folded
    into the coefficients: no scaled copy of the parts)."""
    flat = _flat(parts)
    weights = weights.to(torch.float64)
    total = weights.sum().item()
    if not total > 0:
        weights, total = torch.ones_like(weights), float(len(weights))
    coefficients = weights / total if scale is None else weights * scale.to(torch.float64) / total
    return (coefficients.to(flat.dtype) @ flat).reshape(parts.shape[1:])


def upper_median(values: torch.Tensor) -> torch.Tensor:
    """The median of a 1-D tensor, the upper of the two middle values for an even count (torch's is the lower)."""
    return values.sort().values[len(values) // 2]


def clipped_mean(parts: torch.Tensor, weights: torch.Tensor, clip_factor: float = CLIP_FACTOR) -> torch.Tensor:
    """Weighted mean after scaling each part down to at most ``clip_factor`` x the (upper) median of the parts' norms.

    O(n·d). While fewer than half the senders are Byzantine the median norm is at most an honest part's, so a Byzantine
    part counts with at most c x an honest norm: its effect on the mean is bounded, not removed (about
    ``(f/n)·(c·median norm + |honest mean|)`` with equal weights). With c = 1 (the default) a sign-flipped part cancels
    at most one honest part, so the mean keeps the honest direction while n > 2f; with c = 3 it could reverse it
    whenever n <= 4f (3 peers with 1 attacker). Honest parts above the median are scaled down to it: a shrink of the
    average by about the spread of the honest norms, which Adam's normalisation absorbs. With 2 senders the upper
    median is the larger norm: nothing is clipped, as no rule can tell which of two is honest."""
    if not clip_factor > 0:
        raise ValueError(f"clip_factor must be > 0, not {clip_factor}")
    flat = _flat(parts)
    norms = flat.norm(dim=1)
    limit = clip_factor * upper_median(norms)
    scale = torch.where(norms > limit, limit / norms, torch.ones_like(norms))
    return weighted_mean(flat, weights, scale).reshape(parts.shape[1:])


def coordinate_median(parts: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Coordinate-wise median (the mean of the two middle values for an even count); one vote per part, weights
    unused. Each coordinate stays within the honest values' range while fewer than half the parts are Byzantine."""
    flat = _flat(parts)
    n = flat.shape[0]
    ordered = flat.sort(dim=0).values
    middle = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return middle.reshape(parts.shape[1:])


def trimmed_count(n: int, trim: float) -> int:
    """How many values ``trimmed_mean`` drops at each end of n: ``ceil(trim·n)``, at least 1 once n >= 3, and never so
    many that nothing is left (n = 3 keeps the median)."""
    if n < 3:
        return 0
    return min((n - 1) // 2, max(1, math.ceil(trim * n - 1e-9)))


def trimmed_mean(parts: torch.Tensor, weights: torch.Tensor | None = None, trim: float = 0.25) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``trimmed_count(n, trim)`` lowest and highest values of each coordinate;
    one vote per part, weights unused. Tolerates as many Byzantine parts as it drops per side (2 of 7 at 0.25)."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), not {trim}")
    flat = _flat(parts)
    n = flat.shape[0]
    k = trimmed_count(n, trim)
    ordered = flat.sort(dim=0).values
    return ordered[k : n - k].mean(dim=0).reshape(parts.shape[1:])


def centered_clip(
    parts: torch.Tensor, weights: torch.Tensor | None = None, tau_factor: float = 1.0, iterations: int = 5
) -> torch.Tensor:
    """CenteredClip (Karimireddy et al. 2021, as in BTARD): from the coordinate-wise median v, repeat
    ``v += mean_i(min(1, tau / |x_i − v|) · (x_i − v))``; one vote per part, weights unused.

    ``tau = tau_factor`` x the median (low) of ``|x_i − median|``: adaptive, because a part's norm scales with the
    part's size (hivemind splits tensors into parts of varying size), so no fixed tau fits. A Byzantine part pulls
    with at most tau per iteration; the result stays within about ``f/(n−f)`` x tau of the honest mean. Smaller
    ``tau_factor``: more robust, slower to converge and more biased by honest outliers."""
    if not tau_factor > 0 or iterations < 0:
        raise ValueError(f"need tau_factor > 0 and iterations >= 0, not {tau_factor}, {iterations}")
    flat = _flat(parts)
    center = coordinate_median(flat)
    tau = tau_factor * (flat - center).norm(dim=1).median()
    if tau > 0:
        for _ in range(iterations):
            diff = flat - center
            norms = diff.norm(dim=1)
            scale = torch.where(norms > tau, tau / norms, torch.ones_like(norms))
            center = center + (diff * scale[:, None]).mean(dim=0)
    return center.reshape(parts.shape[1:])


RULES: dict[str, AggregationRule] = {
    "mean": weighted_mean,
    "clipped-mean": clipped_mean,
    "centered-clip": centered_clip,
    "trimmed-mean": trimmed_mean,
    "median": coordinate_median,
}
if tuple(RULES) != AGGREGATIONS:  # peer.run.manifest names the rules a run may choose: the two lists must agree
    raise ImportError(f"peer.swarm.robust.RULES {tuple(RULES)} differ from the manifest's AGGREGATIONS {AGGREGATIONS}")
WEIGHTED = ("mean", "clipped-mean")  # the rules that use weights beyond "votes or not"


def get_rule(name: str) -> AggregationRule:
    """The rule called ``name``; a ``ValueError`` naming the allowed values for any other name."""
    if name not in RULES:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, not {name!r}")
    return RULES[name]


def aggregate(
    name: str, parts: torch.Tensor, weights: torch.Tensor, *, max_weight_ratio: float | None = OUTLIER_FACTOR
) -> torch.Tensor:
    """Aggregate parts [n, ...] with the rule ``name``: weights as ``voting_weights`` makes them (give it sanitized
    weights), senders with weight 0 left out unless every weight is 0."""
    weights = voting_weights(weights, max_weight_ratio)
    votes = weights > 0
    return get_rule(name)(parts[votes], weights[votes])


# --- rejection bookkeeping across processes -------------------------------------------------------------------------


class RejectionCounts:
    """An ``on_reject`` that counts rejections by reason, shared with every process forked after it was made.

    hivemind runs each averager's all-reduce in a process of its own (forked when the averager starts): make this in
    the trainer's process before the averagers start, pass it as their ``on_reject``, and read ``counts()`` there (for
    a Prometheus counter: add the growth since the last read)."""

    def __init__(self):
        context = mp.get_context("fork")
        self._values = {reason: context.Value("q", 0) for reason in REJECT_REASONS}

    def __call__(self, reason: str, sender_index: int) -> None:
        value = self._values[reason]
        with value.get_lock():
            value.value += 1

    def counts(self) -> dict[str, int]:
        return {reason: int(value.value) for reason, value in self._values.items()}


class PartialRounds:
    """An ``on_partial`` that counts all-reduce rounds that finished in part, shared with every process forked after it
    was made (like ``RejectionCounts``).

    hivemind finishes a round "successfully" when a groupmate's parts stop coming (its sender is dropped after
    ``sender_timeout`` and the part is averaged without it) or when a reducer never returns this peer's averaged part
    (this peer keeps its own values there). The peers of such a round end with different tensors, and hivemind's
    result says nothing. The averager reports each such round here; the trainer's process ``take``s the count after
    each of its rounds and reports the round as ``partial``."""

    def __init__(self):
        self._value = mp.get_context("fork").Value("q", 0)

    def __call__(self, dropped_senders: int, missing_fraction: float) -> None:
        with self._value.get_lock():
            self._value.value += 1

    def take(self) -> int:
        """The rounds finished in part since the last ``take``."""
        with self._value.get_lock():
            count, self._value.value = int(self._value.value), 0
        return count


OnPartial = Callable[[int, float], None]


# --- the reducer --------------------------------------------------------------------------------------------------


def _check_aggregation_options(aggregation: str, weight_cap: float, max_weight_ratio: float | None) -> None:
    get_rule(aggregation)
    if not weight_cap > 0:  # NaN too
        raise ValueError(f"weight_cap must be > 0, not {weight_cap}")
    if max_weight_ratio is not None and not max_weight_ratio >= 1:
        raise ValueError(f"max_weight_ratio must be >= 1 or None, not {max_weight_ratio}")


class RobustTensorPartReducer(TensorPartReducer):
    """hivemind's ``TensorPartReducer`` (same protocol: ``accumulate_part`` per sender and part, in part order; a
    failed sender shrinks the count of senders still expected) aggregating each part with a robust rule.

    Each sender's part is validated as it arrives (``REJECT_REASONS``) and kept until every current sender has sent
    it; then the rule runs in the event loop's executor (sorting and CenteredClip would stall the streams) and every
    waiting sender gets the aggregate. A sender caught once is left out of the rest of the round and reported once
    (``on_reject(reason, sender_index)``, called on the event loop; keep it cheap). If no valid part arrived, each
    sender gets its own part back (its values are kept, as hivemind does for a failed reducer): never 0/0 or zeros,
    which would wipe parameters in a state-averaging round. Memory: n_senders x one part (hivemind: one part).

    :param aggregation: a name from ``AGGREGATIONS``
    :param weight_cap: the most weight a sender may claim (``sanitize_weight``)
    :param max_weight_ratio: a weight counts for at most this x the median positive weight (``voting_weights``)
    :param on_reject: called once per rejected sender and round with ``(reason, sender_index)``
    """

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        *,
        aggregation: str = DEFAULT_AGGREGATION,
        weight_cap: float = math.inf,
        max_weight_ratio: float | None = OUTLIER_FACTOR,
        on_reject: OnReject | None = None,
    ):
        _check_aggregation_options(aggregation, weight_cap, max_weight_ratio)
        self.aggregation, self.weight_cap, self.max_weight_ratio = aggregation, weight_cap, max_weight_ratio
        self.on_reject = on_reject
        self.rejected: dict[int, str] = {}  # sender index -> the reason it was left out of this round
        self._contributions: dict[int, tuple[torch.Tensor, float] | None] = {}  # sender -> (part, weight) or None
        self._aggregation_task: asyncio.Task | None = None
        self._aggregating = False
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        super().reset_accumulators()  # the next part index, its future and its count of current senders
        self.accumulator = None  # hivemind's running sum: unused here
        self._contributions = {}
        self._aggregating = False

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """Keep (or reject) this sender's part, wait for all other current senders, return the aggregate part."""
        # hivemind 1.1.12's TensorPartReducer.accumulate_part up to its add_: the same waits and the same exceptions
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1

        while part_index > self.current_part_index:
            finished = asyncio.create_task(self.finished.wait())
            await asyncio.wait({self.current_part_future, finished}, return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()  # hivemind leaves one such task pending per wait
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")

        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index

        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._contributions[sender_index] = self._admit(sender_index, part_index, tensor_part, weight)
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        result = await current_part_future
        return tensor_part if result is None else result

    def _admit(self, sender_index: int, part_index: int, part: torch.Tensor, weight: float):
        """(fp32 part, weight as it may count), or None with the sender reported once per round."""
        if sender_index in self.rejected:
            return None  # caught earlier in this round: its other parts are not trusted either
        reason = None
        if part.shape != self.part_shapes[part_index]:
            reason = "shape"
        elif not part.is_floating_point():
            reason = "dtype"
        elif not math.isfinite(weight) or weight < 0:
            reason = "weight"
        else:
            part = part.to(torch.float32)  # an fp64 value beyond fp32's range becomes Inf here, and is caught next
            if not bool(torch.isfinite(part).all()):
                reason = "non_finite"
        if reason is None:
            return part, sanitize_weight(weight, self.weight_cap)
        self.rejected[sender_index] = reason
        logger.warning("rejected a groupmate's contribution to an averaging round (%s)", reason)
        if self.on_reject is not None:
            try:
                self.on_reject(reason, sender_index)
            except Exception:  # a metrics callback must not break the round
                logger.exception("on_reject callback failed")
        return None

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders and not self._aggregating:
            self._aggregating = True
            contributions = [self._contributions[i] for i in sorted(self._contributions)]
            self._aggregation_task = asyncio.get_running_loop().create_task(self._aggregate_current_part(contributions))

    async def _aggregate_current_part(self, contributions: list) -> None:
        future, shape = self.current_part_future, self.part_shapes[self.current_part_index]
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, self._reduce, contributions, shape)
        except Exception:  # a bug here must not hang the group: every sender keeps its own values for this part
            logger.exception("robust aggregation failed; keeping local values for this part")
            result = None
        if self.finished.is_set() or future.done():
            return  # finalized (cancelled) while aggregating
        future.set_result(result)
        self.reset_accumulators()

    def _reduce(self, contributions: list, shape: torch.Size) -> torch.Tensor | None:
        valid = [c for c in contributions if c is not None]
        if not valid:
            return None
        parts = torch.stack([part.reshape(-1) for part, _ in valid])
        weights = torch.tensor([weight for _, weight in valid], dtype=torch.float64)
        return aggregate(self.aggregation, parts, weights, max_weight_ratio=self.max_weight_ratio).reshape(shape)

    def finalize(self):
        if not hasattr(self, "finished"):
            return  # __init__ refused an option before hivemind's part of it; this is __del__
        super().finalize()
        self._contributions = {}


# --- hivemind's all-reduce and averagers ----------------------------------------------------------------------------


class RobustAllReduceRunner(AllReduceRunner):
    """hivemind's ``AllReduceRunner`` whose reducer is a ``RobustTensorPartReducer``: the keyword arguments named in
    ``REDUCER_OPTIONS`` go to that reducer (see it for their meaning and defaults), the others are hivemind's. Every
    sender and reducer logic is hivemind's; only how this peer reduces its own part differs."""

    def __init__(self, **kwargs):
        options = {name: kwargs.pop(name) for name in REDUCER_OPTIONS if name in kwargs}
        super().__init__(**kwargs)
        # hivemind built its reducer (the module global TensorPartReducer: hivemind_compat.install() makes it the
        # finite-only one) before any part can arrive; mark it finished first: finalizing an unused reducer (its
        # __del__) would log "received 0.0% of input tensors"
        self.tensor_part_reducer.finished.set()
        self.tensor_part_reducer = RobustTensorPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging), len(self.sender_peer_ids), **options
        )


REDUCER_OPTIONS = ("aggregation", "weight_cap", "max_weight_ratio", "on_reject")  # RobustTensorPartReducer's


class RobustAveragingMixin:
    """Makes a ``DecentralizedAverager`` (or subclass) run every all-reduce with ``RobustAllReduceRunner``.

    Put it first among the bases: ``class RobustGradientAverager(RobustAveragingMixin, GradientAverager)``. Its
    keyword arguments are the runner's (``aggregation``, ``weight_cap``, ``max_weight_ratio``, ``on_reject``), taken
    before the averager forks its process, which inherits them; ``on_reject`` then runs in that process
    (``RejectionCounts`` counts across the fork). ``on_partial`` (``PartialRounds``) hears, in the same way, of every
    round that finished in part (a groupmate dropped as too slow, or averaged parts that never came back). Every peer
    of a group must use the same averager class: hivemind names its RPC handlers after the class, so a robust and a
    plain averager cannot even find each other.

    Each subclass gets a fresh RPC handler cache (hivemind caches handlers per class: a subclass would otherwise reuse
    its parent's, which carry the parent's class name). Override ``_make_allreduce_runner`` to build another runner.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._rpc_handlers = None
        cls._stub_type = None

    def __init__(
        self,
        *args,
        aggregation: str = DEFAULT_AGGREGATION,
        weight_cap: float = math.inf,
        max_weight_ratio: float | None = OUTLIER_FACTOR,
        on_reject: OnReject | None = None,
        on_partial: OnPartial | None = None,
        **kwargs,
    ):
        _check_aggregation_options(aggregation, weight_cap, max_weight_ratio)
        self.robust_options = dict(
            aggregation=aggregation, weight_cap=weight_cap, max_weight_ratio=max_weight_ratio, on_reject=on_reject
        )
        self.on_partial = on_partial
        super().__init__(*args, **kwargs)  # may start (fork) the averager: the options must be set before

    def _make_allreduce_runner(self, **kwargs) -> AllReduceRunner:
        """The runner of one all-reduce; ``kwargs`` are hivemind's ``AllReduceRunner`` arguments."""
        return RobustAllReduceRunner(**self.robust_options, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id: bytes | None = None, **kwargs):
        """hivemind 1.1.12's ``DecentralizedAverager._run_allreduce_inplace_`` (which hard-codes ``AllReduceRunner``)
        with the runner built by ``_make_allreduce_runner``."""
        group_id = group_info.group_id if group_id is None else group_id
        runner = self._make_allreduce_runner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)

        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")
        self._report_partial(runner, len(group_info.peer_ids))

    def _report_partial(self, runner: AllReduceRunner, group_size: int) -> None:
        """One warning and ``on_partial(dropped senders, missing fraction)`` when the round that just finished left a
        groupmate's contribution out of a part this peer reduced, or left this peer without some averaged parts."""
        dropped = len(runner.banned_senders)
        container = runner.tensor_part_container
        missing = container.failed_size / container.total_size if container.total_size else 0.0
        if not dropped and not missing:
            return
        logger.warning(
            "an averaging round of %d peers finished in part (%d groupmate(s) too slow to wait for, %.0f%% of this "
            "peer's averaged values never came back): the group's peers now hold slightly different values",
            group_size, dropped, 100 * missing,
        )  # fmt: skip
        if self.on_partial is not None:
            self.on_partial(dropped, missing)
