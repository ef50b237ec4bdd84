"""Scenario: averaging round time when two of three peers sit behind NAT, each behind its own masquerading router,
against the same three peers all on public addresses. Two ways through the NATs: client mode (``--nat auto`` picks it:
the public peer reduces every part), and a hole punch (``--nat holepunch``: the two private peers are dialled through
the public peer as a relay until p2pd punches a direct connection between the two homes; three bare public DHT nodes
make the four public peers libp2p needs for it). The topology is ``bench/netns.py``'s (network namespaces, two home
routers); the "direct" arm runs the two peers in the routers' namespaces, on the same "internet" and public addresses
as the routers, so only the NAT (and the way through it) differs between the arms. Needs root, ``ip`` and ``nft``;
otherwise skipped with the reason. (Relays alone are not an arm: hivemind 1.1.12's p2pd cuts a relayed connection
after 128 KiB, see ``peer/swarm/nat.py``.)"""

from __future__ import annotations

import statistics

from bench import arms, netns
from bench.common import Worker

NAME = "nat"
TITLE = "NAT: averaging rounds with two peers behind NAT (client mode, hole punch) vs all direct"
ARMS = {"direct": ("pub", "r1", "r2"), "nat": ("pub", "a", "b"), "holepunch": ("pub", "a", "b")}
PUNCHED = {1: ["--nat", "holepunch"], 2: ["--nat", "holepunch"]}


def _round_seconds(records: list[dict]) -> list[float]:
    """Seconds of every successful round in a group of 3, from the two peers other than the public one."""
    return [r[2] for rec in records[1:] for r in rec.get("rounds", []) if r[0] == "success" and r[1] == 3]


def _run_arm(workdir, topo: netns.NatTopology, cfg: dict, arm: str) -> list[dict]:
    names = ARMS[arm]
    nodes: list[Worker] = []

    def public_nodes(join: str) -> list[str]:
        started, addresses = topo.start_public_nodes(join, workdir)
        nodes.extend(started)
        return addresses

    punch = arm == "holepunch"
    topo.stealth(arm != "direct")  # the direct arm's peers run in the routers' namespaces, as public hosts
    try:
        return arms.run_swarm(workdir, cfg, 3, timeout=400, hosts=[topo.host_ip(n) for n in names],
                              prefixes=[tuple(topo.prefix(n)) for n in names], args=PUNCHED if punch else None,
                              more_joins=public_nodes if punch else None)  # fmt: skip
    finally:
        for node in nodes:
            node.stop(timeout=5)


def run(workdir, reps: int, quick: bool) -> dict:
    reason = netns.unavailable()
    if reason:
        return {"skipped": reason, "rows": [], "notes": [f"Skipped: {reason}."]}
    cfg = dict(preset="tiny", seq_len=128, batch=16, target=192, steps=4 if quick else 8)
    raw: dict[str, list] = {arm: [] for arm in ARMS}
    with netns.NatTopology() as topo:
        for rep in range(reps):
            for arm in ARMS if rep % 2 == 0 else reversed(ARMS):
                before = {r: topo.sent_bytes(r) for r in ("r1", "r2")}
                records = _run_arm(workdir, topo, cfg, arm)
                # bytes the home networks sent out during the arm: to the public peer, to the other home, to others
                sent = {r: {k: v - before[r][k] for k, v in topo.sent_bytes(r).items()} for r in ("r1", "r2")}
                raw[arm].append({"round_s": _round_seconds(records), "sent": sent,
                                 "rounds": [rec.get("rounds") for rec in records]})  # fmt: skip
    medians = {arm: [statistics.median(r["round_s"]) for r in raw[arm] if r["round_s"]] for arm in ARMS}
    rows = [
        {"metric": "round time behind NAT (client mode) ÷ direct",
         "values": [n / d for n, d in zip(medians["nat"], medians["direct"], strict=False)]},
        {"metric": "round time behind NAT (hole punch) ÷ direct",
         "values": [n / d for n, d in zip(medians["holepunch"], medians["direct"], strict=False)]},
        {"metric": "median round, direct", "values": medians["direct"], "unit": "s"},
        {"metric": "median round, two peers behind NAT (client mode)", "values": medians["nat"], "unit": "s"},
        {"metric": "median round, two peers behind NAT (hole punch)", "values": medians["holepunch"], "unit": "s"},
        {"metric": "bytes home 1 sent to home 2, hole punch arm",
         "values": [r["sent"]["r1"]["to_homes"] for r in raw["holepunch"]], "unit": "B"},
    ]  # fmt: skip
    notes = [
        f"tiny preset (6.1 MB of fp32 gradients), {cfg['seq_len']} tokens, global batch {cfg['target']}, 3 peers of 1 "
        f"thread each, {cfg['steps']} steps per arm; rounds in a group of all 3 peers, timed by the two peers other "
        "than the public one. NAT arm: those two peers behind their own masquerading router (nftables), in client "
        "mode (picked by --nat auto), so the public peer reduces all of every round; direct arm: the same two peers "
        "on public addresses, each reducing a third; hole-punch arm: the two behind NAT with --nat holepunch, three "
        "bare public DHT nodes beside the public peer, rounds that went through before the punch included. veth links "
        "without rate limits: the cost measured here is the public peer doing all the reducing, not bandwidth.",
    ]
    return {"config": cfg, "rows": rows, "raw": raw, "notes": notes}
