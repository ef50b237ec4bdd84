"""Robust aggregation (``peer.swarm.robust``): the rules, the weight bounds, the rejections, and the reducer driven as
hivemind's all-reduce drives it (one task per sender, its parts in order).

Every attack runs on one group: n = 7 senders of 2 parts (600 and 400 values), 5 honest (``x_i = g + z_i``, g and z_i
standard normal: gradient noise as large as the signal) and f = 2 Byzantine (senders 1 and 4). Distances are in
units of the honest spread ``s`` = RMS of ``|x_i − μ|`` over the honest senders, μ being their mean (here s ≈ 28,
|μ| ≈ 34). The bounds:

- ``centered-clip``, ``trimmed-mean``, ``median``: ``|out − μ| <= 1.0 s``: two attackers move the result less than a
  typical honest part is from μ. (For the coordinate-wise rules, every coordinate stays between honest values, which
  alone gives ``sqrt(5)·s`` for any attack; the measured worst is 0.66 s, CenteredClip's 0.48 s.)
- ``clipped-mean``: ``|out − μ| <= (W_b / W)·(limit + |μ|)`` per part, ``limit`` = 3 x the median part norm, ``W_b``
  the attackers' bounded weights out of ``W`` (no honest part is clipped at c = 3 here): the clipped mean does not
  remove a Byzantine part, it bounds it (measured: 0.6–0.85 of the bound: 1.0–1.5 s with equal weights, 3.1 s when
  both claim weight 1e9).
- ``mean``, as hivemind computes it: the same sign flip moves it by > 100 s (measured ~400 s): these tests can fail.
"""

import asyncio
import math
import multiprocessing as mp

import pytest
import torch
from hivemind.averaging.partition import TensorPartReducer

from peer.swarm import robust
from peer.swarm.robust import RobustTensorPartReducer

N, SIZES = 7, (600, 400)
BYZANTINE = (1, 4)
HONEST = tuple(i for i in range(N) if i not in BYZANTINE)
ROBUST = ("centered-clip", "trimmed-mean", "median")  # bound: 1.0 s
CAP = 10.0  # the weight cap the reducers get (honest peers claim 1)
EPS_SPREAD = 1.0


def _make_group(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    signal = [torch.randn(d, generator=gen) for d in SIZES]
    parts = [[g + torch.randn(g.shape, generator=gen) for g in signal] for _ in range(N)]
    unit = [torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0) for d in SIZES]
    # a random unit direction per sender and part (used by the Byzantine ones)
    random = [[torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0) for d in SIZES] for _ in range(N)]
    return parts, unit, random


PARTS, UNIT, RANDOM = _make_group()


def honest_mean(senders=HONEST) -> list[torch.Tensor]:
    return [torch.stack([PARTS[i][k] for i in senders]).mean(0) for k in range(len(SIZES))]


def spread(senders=HONEST) -> float:
    mu = torch.cat(honest_mean(senders))
    return torch.stack([torch.cat(PARTS[i]) - mu for i in senders]).norm(dim=1).pow(2).mean().sqrt().item()


def distance(out: list[torch.Tensor], senders=HONEST) -> float:
    """|out − μ| in units of the honest spread."""
    return (torch.cat(out) - torch.cat(honest_mean(senders))).norm().item() / spread(senders)


def expected_weights(claimed: list[float]) -> list[float]:
    """What the voters' claimed weights should count for, worked out here rather than by the module: at most CAP, at
    most 4 (OUTLIER_FACTOR) x the median (low) positive weight; every sender 1 if none is positive."""
    capped = [min(w, CAP) for w in claimed]
    positive = sorted(w for w in capped if w > 0)
    if not positive:
        return [1.0] * len(claimed)
    return [min(w, 4.0 * positive[(len(positive) - 1) // 2]) for w in capped]


def clipped_mean_part_bound(k: int, parts_by_sender, weights, senders=HONEST, voters=range(N)) -> float:
    """The clipped mean's bound on part k (module docstring): ``voters`` are the senders whose part counts."""
    w = expected_weights([weights[i] for i in voters])
    share = sum(w[j] for j, i in enumerate(voters) if i not in senders) / sum(w)
    norms = torch.stack([parts_by_sender[i][k].norm() for i in voters])
    limit = robust.CLIP_FACTOR * robust.upper_median(norms).item()
    # honest parts above the limit are scaled down to it: the average moves by at most their weighted excess
    shrink = sum(w[j] * max(0.0, norms[j].item() - limit) for j, i in enumerate(voters) if i in senders) / sum(w)
    return share * (limit + honest_mean(senders)[k].norm().item()) + shrink


def clipped_mean_bound(parts_by_sender, weights, senders=HONEST, voters=range(N)) -> float:
    """The clipped mean's bound over both parts, in units of the honest spread."""
    bounds = [clipped_mean_part_bound(k, parts_by_sender, weights, senders, voters) for k in range(len(SIZES))]
    return math.hypot(*bounds) / spread(senders)


def with_byzantine(make_part, weight: float = 1.0):
    """The group's parts and weights with senders 1 and 4 replaced: ``make_part(own_part, part_index, sender)``."""
    parts = [list(p) for p in PARTS]
    weights = [1.0] * N
    for i in BYZANTINE:
        parts[i] = [make_part(p, k, i) for k, p in enumerate(PARTS[i])]
        weights[i] = weight
    return parts, weights


def median_honest_norm(k: int) -> float:
    return torch.stack([PARTS[i][k].norm() for i in HONEST]).median().item()


ATTACKS = {
    "sign_flip_x1000": lambda p, k, i: -1000 * p,
    "random_direction_10x_norm": lambda p, k, i: RANDOM[i][k] * 10 * median_honest_norm(k),
    "constant_direction_10x_norm": lambda p, k, i: UNIT[k] * 10 * median_honest_norm(k),
    # "a little is enough" (Baruch et al. 2019): every coordinate one honest std below the honest mean, in range
    "a_little_is_enough": lambda p, k, i: honest_mean()[k] - torch.stack([PARTS[h][k] for h in HONEST]).std(0),
}


def run_reducer(parts_by_sender, weights, aggregation="clipped-mean", *, drop_after=None, on_reject=None, plain=False):
    """Drive a reducer as hivemind's all-reduce does: one task per sender sending its parts in order, each awaited
    before the next. A sender in ``drop_after`` (index -> parts sent) fails there, mid-round, once the others already
    wait for that part: hivemind's ``on_sender_failed``. ``plain``: hivemind's own ``TensorPartReducer``. Returns
    each sender's results (one tensor per part it was answered)."""
    shapes = [torch.Size([d]) for d in SIZES]

    async def main():
        if plain:
            reducer = TensorPartReducer(shapes, N)
        else:
            reducer = RobustTensorPartReducer(shapes, N, aggregation=aggregation, weight_cap=CAP, on_reject=on_reject)

        async def send(i: int) -> list[torch.Tensor]:
            results = []
            for k, part in enumerate(parts_by_sender[i]):
                if drop_after is not None and drop_after.get(i) == k:
                    await asyncio.sleep(0.05)  # the others are waiting for part k by now
                    reducer.on_sender_failed(i)
                    return results
                results.append(await reducer.accumulate_part(i, k, part, weight=weights[i]))
            return results

        results[:] = await asyncio.wait_for(asyncio.gather(*(send(i) for i in range(N))), timeout=5)

    results = []  # not main()'s result: asyncio.run's SIGINT bookkeeping formats that, tensors and all (~0.2 s)
    asyncio.run(main())
    return results


def check_robust(results, aggregation, parts, weights, voters=range(N)):
    """Every honest sender got the same aggregate, within its rule's bound (``voters``: the senders whose parts
    count, for the clipped mean's bound); returns the distance."""
    first = results[HONEST[0]]
    for i in HONEST:
        assert all(torch.equal(a, b) for a, b in zip(results[i], first, strict=True))
    measured = distance(first)
    bound = clipped_mean_bound(parts, weights, voters=voters) if aggregation == "clipped-mean" else EPS_SPREAD
    assert measured <= bound + 1e-5, f"{aggregation}: {measured:.3f} s > {bound:.3f} s"  # + fp32 rounding
    return measured


# --- attacks that send plausible (finite, well-shaped) parts --------------------------------------------------------


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("aggregation", ("clipped-mean", *ROBUST))
def test_two_byzantine_senders_of_seven_stay_within_the_bound(aggregation, attack):
    parts, weights = with_byzantine(ATTACKS[attack])
    check_robust(run_reducer(parts, weights, aggregation), aggregation, parts, weights)


@pytest.mark.parametrize("aggregation", robust.AGGREGATIONS)
def test_without_attack_every_rule_is_close_to_the_mean(aggregation):
    results = run_reducer(PARTS, [1.0] * N, aggregation)
    # 7 honest senders: the coordinate-wise rules are noisier estimators of the same mean (measured 0.33 s)
    assert distance(results[0], range(N)) <= 0.5


def test_hivemind_mean_fails_the_sign_flip_and_so_does_a_mean_with_bounded_weights():
    parts, weights = with_byzantine(ATTACKS["sign_flip_x1000"])
    plain = run_reducer(parts, weights, plain=True)
    assert distance(plain[0]) > 100
    bounded = run_reducer(parts, weights, "mean")
    assert distance(bounded[0]) > 100
    assert torch.allclose(torch.cat(plain[0]), torch.cat(bounded[0]), rtol=1e-4)


def test_hivemind_broadcasts_a_one_element_part_and_the_robust_reducer_rejects_it():
    parts, weights = with_byzantine(lambda p, k, i: torch.tensor([1e6]))
    assert distance(run_reducer(parts, weights, plain=True)[0]) > 100  # added to every value of the part
    rejected = []
    results = run_reducer(parts, weights, "mean", on_reject=lambda reason, i: rejected.append((reason, i)))
    assert sorted(rejected) == [("shape", 1), ("shape", 4)]
    assert distance(results[0]) < 1e-5  # the mean of the 5 honest parts


# --- malformed contributions and weights ----------------------------------------------------------------------------


def _non_finite_parts():
    """One NaN (sender 1), one Inf (sender 4) in the first part; their second parts are sign-flipped x1000, left out
    too: a sender caught once is not trusted for the rest of the round."""
    parts = [list(p) for p in PARTS]
    for i, value in ((1, float("nan")), (4, float("inf"))):
        parts[i] = [PARTS[i][0].clone(), -1000 * PARTS[i][1]]
        parts[i][0][7] = value
    return parts


@pytest.mark.parametrize("aggregation", robust.AGGREGATIONS)
@pytest.mark.parametrize("bad", ["non_finite", "shape"])
def test_non_finite_and_wrong_shape_parts_are_left_out(aggregation, bad):
    if bad == "non_finite":
        parts, weights = _non_finite_parts(), [1.0] * N
    else:
        parts, weights = with_byzantine(lambda p, k, i: p[:1] * 1e6)
    rejected = []
    results = run_reducer(parts, weights, aggregation, on_reject=lambda r, i: rejected.append((r, i)))
    assert sorted(rejected) == [(bad, 1), (bad, 4)]  # once per sender and round, not per part
    assert all(torch.isfinite(t).all() for t in results[0])
    check_robust(results, aggregation, parts, weights, voters=HONEST)


@pytest.mark.parametrize("aggregation", robust.AGGREGATIONS)
def test_lying_weights_buy_nothing(aggregation):
    # 1e9 with honest parts: capped at CAP, then at 4x the median weight (the weighted means), or one vote (the others)
    parts, weights = with_byzantine(lambda p, k, i: p.clone(), weight=1e9)
    assert distance(run_reducer(parts, weights, aggregation)[0], range(N)) <= 0.5
    # −1 and NaN: rejected, with reason "weight"
    parts, weights = with_byzantine(ATTACKS["sign_flip_x1000"])
    weights[1], weights[4] = -1.0, float("nan")
    rejected = []
    results = run_reducer(parts, weights, aggregation, on_reject=lambda r, i: rejected.append((r, i)))
    assert sorted(rejected) == [("weight", 1), ("weight", 4)]
    check_robust(results, aggregation, parts, weights, voters=HONEST)
    # 1e9 with sign-flipped parts: within the rule's bound (the mean has none: it is the weight it lets through)
    if aggregation != "mean":
        parts, weights = with_byzantine(ATTACKS["sign_flip_x1000"], weight=1e9)
        check_robust(run_reducer(parts, weights, aggregation), aggregation, parts, weights)


@pytest.mark.parametrize("aggregation", robust.AGGREGATIONS)
def test_all_zero_weights_count_every_sender_equally(aggregation):
    """hivemind divides 0 by 0 (NaN) when every weight is 0; here every sender then counts 1."""
    if aggregation == "mean":
        assert distance(run_reducer(PARTS, [0.0] * N, aggregation)[0], range(N)) < 1e-5
        return
    parts, _ = with_byzantine(ATTACKS["sign_flip_x1000"])
    check_robust(run_reducer(parts, [0.0] * N, aggregation), aggregation, parts, [1.0] * N)


def test_a_zero_weight_sender_does_not_vote():
    """hivemind's "tag along" peers send weight 0 with stale tensors: they must not pull a median."""
    parts, weights = with_byzantine(ATTACKS["sign_flip_x1000"], weight=0.0)
    for aggregation in robust.AGGREGATIONS:
        assert distance(run_reducer(parts, weights, aggregation)[0]) <= 0.5, aggregation


@pytest.mark.parametrize("aggregation", ("clipped-mean", *ROBUST))
def test_a_sender_dropping_mid_round_does_not_stall_the_others(aggregation):
    """Honest sender 6 fails after its first part (while the others wait on the second); sender 4 (Byzantine) fails
    before sending anything. Part 0 is aggregated with 6, part 1 without it."""
    parts, weights = with_byzantine(ATTACKS["sign_flip_x1000"])
    results = run_reducer(parts, weights, aggregation, drop_after={6: 1, 4: 0})
    assert len(results[6]) == 1 and results[4] == [] and len(results[0]) == 2
    for k, senders in ((0, HONEST), (1, HONEST[:-1])):
        voters = [i for i in senders + (1,)]
        measured = (results[0][k] - honest_mean(senders)[k]).norm().item() / spread(senders)
        if aggregation == "clipped-mean":
            bound = clipped_mean_part_bound(k, parts, weights, senders, voters) / spread(senders)
        else:
            bound = EPS_SPREAD
        assert measured <= bound, (k, measured, bound)


def test_with_no_valid_part_every_sender_keeps_its_own():
    """Zeros (or 0/0) would wipe the parameters of a state-averaging round; each sender's values stay instead."""
    parts = [[torch.full_like(p, float("nan")) for p in PARTS[i]] for i in range(N)]
    parts[0] = [p[:1] for p in PARTS[0]]  # wrong shape: its own part back, as sent
    results = run_reducer(parts, [1.0] * N, "median")
    for i in range(N):
        assert all(r is p for r, p in zip(results[i], parts[i], strict=True))


def test_a_failing_rule_keeps_local_values_instead_of_hanging(monkeypatch, caplog):
    def broken(parts, weights):
        raise RuntimeError("bug")

    monkeypatch.setitem(robust.RULES, "median", broken)
    results = run_reducer(PARTS, [1.0] * N, "median")
    assert all(r is p for r, p in zip(results[3], PARTS[3], strict=True))
    assert "robust aggregation failed" in caplog.text


# --- pure pieces ----------------------------------------------------------------------------------------------------


def test_sanitize_weight_clamps_into_zero_cap_and_zeroes_malformed_claims():
    assert robust.sanitize_weight(0.5, 10.0) == 0.5
    assert robust.sanitize_weight(1e9, 10.0) == 10.0
    assert robust.sanitize_weight(1e9) == 1e9  # no cap given: only the relative bound applies later
    for bad in (-1.0, -0.0001, float("nan"), float("inf"), float("-inf")):
        assert robust.sanitize_weight(bad, 10.0) == 0.0, bad


def test_voting_weights_bound_each_weight_by_the_median():
    w = robust.voting_weights(torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 10.0, 10.0]), max_ratio=4.0)
    assert w.tolist() == [1.0, 1.0, 2.0, 1.0, 1.0, 4.0, 4.0]
    assert robust.voting_weights(torch.tensor([0.0, 3.0, 1.0])).tolist() == [0.0, 3.0, 1.0]  # zero: no vote
    assert robust.voting_weights(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    assert robust.voting_weights(torch.tensor([1.0, 100.0]), max_ratio=None).tolist() == [1.0, 100.0]


def test_trimmed_count():
    assert [robust.trimmed_count(n, 0.25) for n in range(1, 11)] == [0, 0, 1, 1, 2, 2, 2, 2, 3, 3]
    assert robust.trimmed_count(7, 0.0) == 1  # at least one per side once n >= 3
    assert robust.trimmed_count(5, 0.49) == 2  # never all: keeps the median


def test_rules_on_a_small_example():
    parts = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [1000.0, -1000.0]])
    ones = torch.ones(5)
    assert robust.coordinate_median(parts).tolist() == [3.0, 20.0]
    assert robust.coordinate_median(parts[:4]).tolist() == [2.5, 25.0]
    assert robust.trimmed_mean(parts, ones, trim=0.2).tolist() == [3.0, 20.0]  # drops 1 per side: (2,3,4), (10,20,30)
    assert robust.weighted_mean(parts[:2], torch.tensor([1.0, 3.0])).tolist() == [1.75, 17.5]
    assert robust.weighted_mean(parts[:2], torch.zeros(2)).tolist() == [1.5, 15.0]
    # norms 3, 4, 500: the third is scaled to the median norm (c = 1), to (2.4, 3.2)
    three = torch.tensor([[3.0, 0.0], [0.0, 4.0], [300.0, 400.0]])
    assert robust.clipped_mean(three, torch.ones(3), clip_factor=1.0).tolist() == pytest.approx([1.8, 2.4])
    assert robust.centered_clip(parts[:4].repeat(2, 1)).tolist() == pytest.approx([2.5, 25.0])
    assert robust.aggregate("median", parts, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])).tolist() == [2.5, 25.0]


def test_names_and_options_are_checked():
    assert tuple(robust.RULES) == robust.AGGREGATIONS and robust.DEFAULT_AGGREGATION in robust.AGGREGATIONS
    with pytest.raises(ValueError, match="aggregation must be one of mean, clipped-mean"):
        robust.get_rule("krum")
    for bad in (
        dict(aggregation="avg"),
        dict(weight_cap=0.0),
        dict(weight_cap=float("nan")),
        dict(max_weight_ratio=0.5),
    ):
        with pytest.raises(ValueError):
            asyncio.run(_make_reducer(**bad))
    with pytest.raises(ValueError):
        robust.trimmed_mean(torch.ones(3, 2), None, trim=0.5)


async def _make_reducer(**kwargs):
    return RobustTensorPartReducer([torch.Size([2])], 2, **kwargs)


def test_rejections_are_reported_with_a_known_reason_once_per_sender():
    parts = [list(p) for p in PARTS]
    parts[1] = [p.to(torch.int64) for p in PARTS[1]]
    parts[2] = [PARTS[2][0], torch.full_like(PARTS[2][1], float("nan"))]  # caught in the second part
    parts[3] = [p.double() * 1e300 for p in PARTS[3]]  # finite in fp64, Inf in fp32
    weights = [1.0] * N
    weights[5] = -1.0
    seen = []
    run_reducer(parts, weights, on_reject=lambda reason, i: seen.append((reason, i)))
    assert sorted(seen) == [("dtype", 1), ("non_finite", 2), ("non_finite", 3), ("weight", 5)]
    assert {reason for reason, _ in seen} <= set(robust.REJECT_REASONS)


def test_a_failing_callback_does_not_break_the_round():
    parts, weights = with_byzantine(lambda p, k, i: p[:1])

    def callback(reason, i):
        raise RuntimeError("metrics down")

    check_robust(run_reducer(parts, weights, "median", on_reject=callback), "median", parts, weights)


def test_rejection_counts_are_shared_with_forked_processes():
    counts = robust.RejectionCounts()
    counts("shape", 3)
    child = mp.get_context("fork").Process(target=lambda: [counts("non_finite", 1), counts("non_finite", 2)])
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert counts.counts() == {"shape": 1, "dtype": 0, "weight": 0, "non_finite": 2, "not_member": 0}
