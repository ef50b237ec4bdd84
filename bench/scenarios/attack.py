"""Scenario 13: robustness under attack in a live swarm. 4 peers (the product's own ``Trainer``) train the tiny model in
sync mode; in the attacked arms the last peer is a Byzantine sender (``BERTSWARM_TEST_ATTACK``, see
``peer.testing.faults``): it sends its gradient sign-flipped ×1000 for the first half of the global steps, then a
random direction with 10× its norm. Arms, interleaved per repetition (the order rotates): clean and attacked, each
with the robust default (``clipped-mean``) and the plain ``mean``. Measured: held-out MLM loss of the honest peers
after the same global steps (so the same samples), as ratios within one repetition.

One attacked arm per rule runs both attacks back to back, as the issue states them; a rule that fails against the
sign flip is not measured against the random direction (its loss is already ruined), so the mean's ratio is the sign
flip's. The attacker keeps its honest sample count as its weight: the weight is bounded by other defences
(``robust.sanitize_weight``), the attack here is on the direction and size of what it sends."""

from __future__ import annotations

import collections
import math
import statistics

from bench import arms, workload
from peer.run.manifest import DEFAULT_AGGREGATION
from peer.testing.faults import ATTACK_VARIABLE, RANDOM_NORM_FACTOR, SIGN_FLIP_SCALE

NAME = "attack"
TITLE = "13. Robustness under attack: held-out MLM loss, 1 of 4 peers sign-flips ×1000, then sends random ×10"

PEERS = 4
ATTACKER = PEERS - 1  # the first peer is the others' bootstrap; an attacker need not be
HONEST = tuple(range(PEERS - 1))  # held-out loss is the mean over these peers, in every arm (like for like)
ROBUST = DEFAULT_AGGREGATION
ARMS = [("clean", ROBUST), ("clean", "mean"), ("attacked", ROBUST), ("attacked", "mean")]


def config(quick: bool) -> dict:
    """quality's workload (tiny, 64 tokens, micro-batch 16, global batch 128: 2 micro-batches per peer and step),
    long enough that the clean swarm's held-out loss falls well below an untrained model's (about 7.3 against 9.0 after
    16 steps), short enough that 4 arms × 3 repetitions fit in about 15 minutes on 2 cores."""
    return dict(preset="tiny", seq_len=64, batch=16, target=128, warmup=3, steps=6 if quick else 16, eval=True)


def phases(steps: int) -> str:
    """The attacker's ``BERTSWARM_TEST_ATTACK``: sign flip, then a random direction from half the steps on."""
    return f"signflip,random@{steps // 2}"


def arm_label(kind: str, rule: str) -> str:
    return f"{kind} {rule}"


def summarize_arm(records: list[dict], attacked: bool) -> dict:
    """The honest peers' held-out loss (``inf`` when any is not finite: the run diverged), steps reached, round
    outcomes per peer, and the group sizes of the attacker's successful rounds (the attack only bites in a group)."""
    by_index = {r["index"]: r for r in records}
    losses = [by_index[i]["heldout_loss"] for i in HONEST]
    diverged = not all(math.isfinite(x) for x in losses)
    outcomes = {i: dict(collections.Counter(round_[0] for round_ in r["rounds"])) for i, r in by_index.items()}
    attacker_rounds = by_index[ATTACKER]["rounds"]
    groups = collections.Counter(size for outcome, size, *_ in attacker_rounds if outcome == "success")
    return {
        "loss": math.inf if diverged else statistics.mean(losses),
        "diverged": diverged,
        "peer_losses": [by_index[i]["heldout_loss"] for i in sorted(by_index)],
        "last_step": min(max(epoch for _, epoch in by_index[i]["steps"]) for i in HONEST),
        "outcomes": outcomes,  # per peer: its rounds by outcome (success, solo, failed)
        # peer ATTACKER's successful rounds by group size (in the clean arms that peer is honest: the same count)
        "attacker_groups": {str(size): n for size, n in sorted(groups.items())},
        "attacker_rounds": len(attacker_rounds),
        "state_loads": [by_index[i]["state_loads"] for i in sorted(by_index)],
        "attacked": attacked,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; a diverged numerator (``inf``) stays ``inf``; None when either is missing."""
    if numerator is None or denominator is None or not math.isfinite(denominator):
        return None
    return numerator / denominator


def success_share(arm: dict) -> float | None:
    """Share of all peers' gradient averaging rounds that succeeded (the others: ``solo`` or ``failed``)."""
    if "error" in arm:
        return None
    counts = collections.Counter()
    for outcomes in arm["outcomes"].values():
        counts.update(outcomes)
    return counts["success"] / sum(counts.values()) if counts else None


def group_share(arm: dict | None) -> float | None:
    """Share of peer ATTACKER's rounds that succeeded in a group of 3 or 4 (where a robust rule can outvote one)."""
    if not arm or not arm.get("attacker_rounds"):
        return None
    big = sum(n for size, n in arm["attacker_groups"].items() if int(size) >= 3)
    return big / arm["attacker_rounds"]


def build_rows(raw: dict[str, list[dict]], reps: int) -> list[dict]:
    def loss(kind: str, rule: str, rep: int) -> float | None:
        arm = raw[arm_label(kind, rule)][rep]
        return arm.get("loss") if "error" not in arm else None

    def per_rep(fn) -> list[float | None]:
        return [fn(rep) for rep in range(reps)]

    rows = [
        {
            "metric": f"attacked {ROBUST} ÷ clean {ROBUST} held-out loss",
            "values": per_rep(lambda r: ratio(loss("attacked", ROBUST, r), loss("clean", ROBUST, r))),
            "goal": "<= 1.05",
        },
        {
            "metric": f"attacked mean ÷ clean {ROBUST} held-out loss (inf: diverged)",
            "values": per_rep(lambda r: ratio(loss("attacked", "mean", r), loss("clean", ROBUST, r))),
            "goal": ">= 1.20",
        },
        {
            "metric": f"clean {ROBUST} ÷ clean mean held-out loss (cost without attackers)",
            "values": per_rep(lambda r: ratio(loss("clean", ROBUST, r), loss("clean", "mean", r))),
            "goal": "<= 1.01",
        },
        {
            "metric": f"untrained model ÷ clean {ROBUST} held-out loss (the scale of the ratios above)",
            "values": per_rep(lambda r: ratio(raw["untrained"][0]["loss"], loss("clean", ROBUST, r))),
        },
    ]
    for kind, rule in ARMS:
        label = arm_label(kind, rule)
        arm_raw = raw[label]
        rows.append({"metric": f"held-out loss, {label}", "values": [loss(kind, rule, r) for r in range(reps)]})
        failed = sum("error" in arm for arm in arm_raw)
        if failed:
            rows[-1]["note"] = f"{failed} failed runs"
        rows.append(
            {
                "metric": f"averaging rounds that succeeded, share, {label}",
                "values": [success_share(a) for a in arm_raw],
            }
        )
    for kind, rule in ARMS:
        if kind == "attacked":
            rows.append(
                {
                    "metric": f"attacker's rounds in a group of ≥ 3, share, {arm_label(kind, rule)}",
                    "values": [group_share(arm) for arm in raw[arm_label(kind, rule)]],
                }
            )
    return rows


def run(workdir, reps: int, quick: bool) -> dict:
    cfg = config(quick)
    attack = phases(cfg["steps"])
    run_manifest = workload.make_manifest("untrained", cfg["preset"], cfg["seq_len"], cfg["target"], cfg["warmup"])
    raw: dict[str, list[dict]] = {arm_label(kind, rule): [] for kind, rule in ARMS}
    raw["untrained"] = [{"loss": workload.heldout_loss(workload.model_for(run_manifest), run_manifest)}]
    order = 0  # the arms' running order, kept with each result
    for rep in range(reps):
        for kind, rule in ARMS[rep % len(ARMS) :] + ARMS[: rep % len(ARMS)]:
            env = {ATTACKER: {ATTACK_VARIABLE: attack}} if kind == "attacked" else None
            try:
                records = arms.run_swarm(workdir, {**cfg, "aggregation": rule}, PEERS, timeout=400, env=env)
                summary = summarize_arm(records, kind == "attacked")
            except Exception as e:  # a stalled or crashed swarm: recorded, the other arms still run
                summary = {"error": f"{type(e).__name__}: {e}"[-2000:]}
            raw[arm_label(kind, rule)].append(summary | {"order": order})
            order += 1
    mean_runs = [arm for arm in raw[arm_label("attacked", "mean")] if "error" not in arm]
    notes = [
        f"{PEERS} peers of the product's Trainer in sync mode (gradient averaging every global step), tiny preset, "
        f"{cfg['seq_len']} tokens, micro-batch {cfg['batch']}, global batch {cfg['target']}, {cfg['steps']} global "
        f"steps, warm-up {cfg['warmup']}, the product's matchmaking time and timeouts; held-out loss on 8×32 held-out "
        f"sequences with fixed masking, mean over peers {', '.join(map(str, HONEST))} (peer {ATTACKER} is the "
        "attacker in the attacked arms), taken after the same global steps in every arm.",
        f"Attack ({ATTACK_VARIABLE}={attack}): peer {ATTACKER} multiplies each micro-batch gradient by "
        f"{SIGN_FLIP_SCALE:g} after its own finite check (what it accumulates and sends to the all-reduce), and from "
        f"step {cfg['steps'] // 2} on replaces it by a random direction with {RANDOM_NORM_FACTOR:g}× its norm (one "
        "direction per global step). It claims its honest sample count as its weight, and steps with the aggregate "
        "its group returns, like the honest peers.",
        "A diverged run (a non-finite held-out loss on an honest peer) counts as a ratio of inf, which meets "
        f"'>= 1.20'; attacked mean diverged in {sum(arm['diverged'] for arm in mean_runs)} of {len(mean_runs)} "
        "runs. A run that failed (a peer stalled or crashed) has no value.",
        "Groups: sync mode sets no target group size; a group is whoever is looking for one within the matchmaking "
        "window, so the attacker's groups are counted from its own round log (a group of 2 with one honest peer "
        "is one no rule can defend: clipped-mean clips nothing there).",
    ]
    return {"config": {**cfg, "peers": PEERS, "attacker": ATTACKER, "attack": attack}, "rows": build_rows(raw, reps),
            "raw": raw, "notes": notes}  # fmt: skip
