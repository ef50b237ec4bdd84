"""Scenario 8: ``--mode diloco`` swarm vs DDP-gloo (the synchronous reference) on loopback and over the slow-link
scenario's tbf-limited veth pair (10, 20, 100 Mbit/s): samples/s, compute utilisation, held-out MLM loss after the
same samples, bytes on the link per sample (``tx_bytes`` of the veth ends, exact), helper CPU; and the variants that
choose the defaults: H, ``outer_overlap``, ``outer_compression``.

Same samples: on loopback every arm trains ``INNER`` steps of ``batch`` samples per peer (DDP: ``INNER`` steps of the
global batch ``peers × batch``, so the same per-step compute and schedule: the LR schedule counts inner steps in
diloco, global steps in DDP); that is 8 outer rounds at the default H=64, long enough that the comparison is not one
outer step against 64 steps of training. The main diloco arms use the product's defaults (H and compression). The
slow-link arms, which only give samples/s, utilisation and bytes, are shorter (DDP: a few steps; its rate is steady
from the second step on); the options (overlap, fp16, int8) are measured against H=16 without them at 20 Mbit/s, on
the same (shorter) samples. Root is needed for the link arms (otherwise only the loopback arms run)."""

from __future__ import annotations

import os
import statistics

from bench import arms
from bench.scenarios import slowlink, throughput
from peer.run.manifest import DEFAULT_INNER_STEPS, DEFAULT_OUTER_COMPRESSION

NAME = "diloco"
TITLE = "8. DiLoCo: diloco swarm vs DDP-gloo on loopback and over tbf-limited veth"

PEERS = 2
BASE = dict(preset="tiny", seq_len=64, batch=16, target=PEERS * 16, warmup=8)
H = DEFAULT_INNER_STEPS  # the product's defaults are the arms that answer the goals (H and compression are manifest
COMPRESSION = DEFAULT_OUTER_COMPRESSION  # fields, so the arms pin them)
INNER = 512  # loopback: inner steps per peer (diloco) = DDP steps; 8 outer rounds at H=64, for quality and speed
INNER_LINK = 128  # slow links: two rounds at H=64 give samples/s, utilisation and bytes
H_SHORT = 16  # the H=16 arms, and the options measured against H=16 without them at 20 Mbit/s
INNER_OPTIONS = 64  # 4 rounds at H=16
DDP_STEPS = {10: 3, 20: 3, 100: 4}  # DDP on a slow link: ~6 MB all-reduced per step
GOALS_RATIO = {10: ">= 1.8", 20: ">= 1.5", 100: ">= 1.0", "loopback": ">= 1.0"}


def arm_name(h: int, compression: str, overlap: bool = False) -> str:
    return f"diloco_h{h}_{compression}" + ("_overlap" if overlap else "")


def diloco_cfg(h: int, inner: int, compression: str, overlap: bool = False) -> dict:
    return BASE | dict(train_mode="diloco", inner_steps=h, steps=inner // h, outer_compression=compression,
                       outer_overlap=overlap, eval=True)  # fmt: skip


def ddp_cfg(steps: int, evaluate: bool) -> dict:
    return BASE | dict(steps=steps, eval=evaluate)


def sizes(quick: bool) -> tuple[int, int, int]:
    """(H of the main arms, loopback steps, slow-link inner steps)."""
    return (H_SHORT, 2 * H_SHORT, 2 * H_SHORT) if quick else (H, INNER, INNER_LINK)


def plan(quick: bool, have_link: bool) -> list[tuple[object, str, dict]]:
    """``(link, arm, cfg)``: ``link`` is ``"loopback"`` or a rate in Mbit/s; arms of one link run back to back."""
    h, inner, inner_link = sizes(quick)
    out: list[tuple[object, str, dict]] = [
        ("loopback", "ddp", ddp_cfg(inner, evaluate=True)),
        ("loopback", arm_name(h, COMPRESSION), diloco_cfg(h, inner, COMPRESSION)),
    ]
    if not quick:  # the same samples at a quarter of the default H: what H costs in quality and speed
        out.append(("loopback", arm_name(H_SHORT, COMPRESSION), diloco_cfg(H_SHORT, inner, COMPRESSION)))
    if not have_link:
        return out
    for rate in (20,) if quick else (20, 10, 100):
        out += [(rate, "ddp", ddp_cfg(DDP_STEPS[rate], evaluate=False)),
                (rate, arm_name(h, COMPRESSION), diloco_cfg(h, inner_link, COMPRESSION))]  # fmt: skip
        if rate == 20 and not quick:
            out += [
                (rate, arm_name(H_SHORT, "none"), diloco_cfg(H_SHORT, INNER_OPTIONS, "none")),
                (rate, arm_name(H_SHORT, "none", True), diloco_cfg(H_SHORT, INNER_OPTIONS, "none", overlap=True)),
                (rate, arm_name(H_SHORT, "fp16"), diloco_cfg(H_SHORT, INNER_OPTIONS, "fp16")),
                (rate, arm_name(H_SHORT, "int8"), diloco_cfg(H_SHORT, INNER_OPTIONS, "int8")),
            ]
    return out


def summarize_arm(records: list[dict], cfg: dict) -> dict:
    """The figures of one arm from its workers' records (pure; unit-tested)."""
    diloco = cfg.get("train_mode") == "diloco"
    if diloco:
        rate = arms.diloco_samples_per_second(records, cfg["batch"])
        samples = sum(len(r.get("inner_times") or []) for r in records) * cfg["batch"]
    else:
        rate = arms.samples_per_second(records, cfg["target"])
        samples = min(len(r["steps"]) for r in records) * cfg["target"]
    losses = [r["heldout_loss"] for r in records if r.get("heldout_loss") is not None]
    out = {
        "samples_per_s": rate,
        "samples": samples,
        "heldout_loss": statistics.mean(losses) if losses else None,
        "link_tx_bytes": sum(r.get("link_tx_bytes") or 0 for r in records),
        "rounds": [r.get("rounds") for r in records],
    }
    out["link_bytes_per_sample"] = out["link_tx_bytes"] / samples if samples and out["link_tx_bytes"] else None
    if diloco:
        out["utilisation"] = statistics.mean(arms.compute_utilisation(r) for r in records)
        out["helper_cpu_ratio"] = _helper_cpu_ratio(records)
        out["telemetry_bytes_sent"] = sum(r.get("telemetry_bytes_sent") or 0 for r in records)
        out["outer_epochs"] = [r.get("outer_epoch") for r in records]
        out["not_success"] = [o[0] for r in records for o in (r.get("rounds") or []) if o[0] != "success"]
        # [outcome, group size, exchange seconds, seconds the trainer was blocked, bytes] per round and peer
        rounds = [o for r in records for o in (r.get("rounds") or []) if len(o) >= 4]
        out["round_s"] = statistics.median(o[2] for o in rounds) if rounds else None
        out["blocked_s"] = statistics.median(o[3] for o in rounds) if rounds else None
        micro = sum(r.get("micro_batches") or 0 for r in records)
        out["inner_step_compute_s"] = sum(r.get("compute_s") or 0 for r in records) / micro if micro else None
    return out


_helper_cpu_ratio = throughput._cpu_beside_training  # one definition of "helper CPU ÷ training-thread CPU"


def ratio(a, b) -> float:
    return a / b if a is not None and b and a == a and b == b else float("nan")


def run(workdir, reps: int, quick: bool) -> dict:
    reason = slowlink.unavailable()
    arm_plan = plan(quick, have_link=reason is None)
    raw: dict[str, list] = {}  # "<link>/<arm>" -> per repetition: the arm's figures (or its failure)
    failures: list[str] = []
    link = slowlink.Link() if reason is None else None
    try:
        if link is not None:
            link.__enter__()
        for rep in range(reps):
            links = list(dict.fromkeys(lk for lk, _, _ in arm_plan))
            for lk in links:
                group = [(arm, cfg) for lk2, arm, cfg in arm_plan if lk2 == lk]
                if rep % 2:
                    group.reverse()  # arms alternate order every repetition
                for arm, cfg in group:
                    key = f"{lk}/{arm}"
                    try:
                        records = _run_arm(workdir, link, lk, cfg)
                        figures = summarize_arm(records, cfg) | {"loadavg_1m_after": os.getloadavg()[0]}
                        if lk == "loopback":  # tx_bytes of the default namespace: not this arm's traffic
                            figures.update(link_tx_bytes=None, link_bytes_per_sample=None)
                    except RuntimeError as e:
                        figures = {"error": str(e)[-800:]}
                        failures.append(f"rep {rep + 1} {key}: {str(e).strip().splitlines()[0][:200]}")
                    for outcome in figures.get("not_success") or []:
                        failures.append(f"rep {rep + 1} {key}: an outer round ended {outcome!r}")
                    raw.setdefault(key, []).append(figures)
                    print(f"  rep {rep + 1} {key}: {_brief(figures)}", flush=True)
    finally:
        if link is not None:
            link.__exit__()
    h, inner, inner_link = sizes(quick)
    rows = build_rows(raw, reps, h, quick)
    notes = [
        f"tiny preset (1.5 M parameters, 6.1 MB fp32 pseudo-gradient), {BASE['seq_len']} tokens, {PEERS} peers/ranks "
        f"with 1 thread each, per-peer batch {BASE['batch']}, DDP global batch {BASE['target']}. Loopback: every "
        f"diloco arm and the DDP reference train {inner} steps (= {inner * BASE['target']} samples); slow links: "
        f"diloco {inner_link} inner steps, DDP {'/'.join(str(v) for v in DDP_STEPS.values())} steps at "
        f"{'/'.join(str(k) for k in DDP_STEPS)} Mbit/s; the options at H={H_SHORT}: {INNER_OPTIONS} inner steps. "
        "Held-out MLM loss of the final model (diloco: θ_outer after the last round, mean of the peers). "
        "The mini preset would not fit the time budget on 2 shared cores (~4× the compute per sample of tiny).",
        "'sync' is DDP-gloo on loopback: gradients of the global batch averaged every step with the run's optimizer "
        "and schedule — the synchronous swarm's math without its matchmaking. diloco arms use the product's "
        f"`Trainer` with `mode=diloco`, H={h} and `outer_compression` {COMPRESSION} (the product's defaults) unless "
        "the arm's name says otherwise, outer Nesterov SGD (lr 0.7, momentum 0.9), the product's matchmaking_time "
        "(3 s; a round's group forms as soon as the peers at the boundary are in it) and averaging_timeout (30 s).",
        "samples/s: diloco from the end of each peer's first inner step to the end of its last (which includes the "
        "final outer round); DDP from its first step on. Utilisation: forward/backward wall time ÷ wall time of "
        "the training loop, mean of the peers. Link bytes: `tx_bytes` of both veth ends during the training loop "
        "(after DDP's initial broadcast), read inside the namespaces.",
        f"Link arms: tbf (burst 64 kB, latency 100 ms) on both veth ends, no added delay. Arms of each link "
        f"alternate order every repetition. {'' if reason is None else 'Link arms skipped: ' + reason + '.'}",
    ]
    if failures:
        notes.append("Failed arms / rounds not 'success': " + "; ".join(failures[:20]) + ".")
    else:
        notes.append("Every outer round of every diloco arm ended 'success' (2 peers); no arm failed.")
    config = {**BASE, "inner": inner, "inner_link": inner_link, "h": h, "compression": COMPRESSION}
    return {"config": config | {"plan": [[str(a), b, c] for a, b, c in arm_plan]},
            "rows": rows, "raw": raw, "failures": failures, "notes": notes}  # fmt: skip


def _run_arm(workdir, link, lk, cfg) -> list[dict]:
    if lk == "loopback":
        if cfg.get("train_mode") == "diloco":
            return arms.run_swarm(workdir, cfg, PEERS, timeout=400)
        return arms.run_ddp(workdir, cfg, PEERS, timeout=400)
    link.rate(lk)
    prefixes = [link.prefix(0), link.prefix(1)]
    if cfg.get("train_mode") == "diloco":
        return arms.run_swarm(workdir, cfg, PEERS, timeout=400, hosts=link.ip, prefixes=prefixes)
    env = [{"GLOO_SOCKET_IFNAME": link.dev[0]}, {"GLOO_SOCKET_IFNAME": link.dev[1]}]
    return arms.run_ddp(workdir, cfg, PEERS, timeout=400, hosts=link.ip, prefixes=prefixes, env=env)


def _brief(f: dict) -> str:
    if "error" in f:
        return "FAILED"
    parts = [f"{f['samples_per_s']:.1f} samples/s"]
    if f.get("heldout_loss") is not None:
        parts.append(f"loss {f['heldout_loss']:.4f}")
    if f.get("utilisation") is not None:
        parts.append(f"util {f['utilisation']:.2f}")
    if f.get("link_bytes_per_sample"):
        parts.append(f"{f['link_bytes_per_sample'] / 1e3:.1f} kB/sample")
    return ", ".join(parts)


def build_rows(raw: dict, reps: int, h: int, quick: bool) -> list[dict]:
    """The report's rows from the per-arm figures (pure; unit-tested): ratios are taken within each repetition."""

    def values(key: str, field: str) -> list:
        return [f.get(field) if "error" not in f else None for f in raw.get(key, [])]

    def ratios(a: str, b: str, field: str) -> list:
        return [ratio(x, y) for x, y in zip(values(a, field), values(b, field), strict=False)]

    base = arm_name(h, COMPRESSION)
    label = f"H={h}, {COMPRESSION}"
    rows = []
    for lk in ("loopback", 10, 20, 100):
        if f"{lk}/{base}" not in raw:
            continue
        name = "loopback" if lk == "loopback" else f"{lk} Mbit/s"
        rows.append({"metric": f"{name}: diloco ({label}) ÷ DDP samples/s", "goal": GOALS_RATIO[lk],
                     "values": ratios(f"{lk}/{base}", f"{lk}/ddp", "samples_per_s")})  # fmt: skip
        rows.append({"metric": f"{name}: diloco ({label}) samples/s", "unit": "samples/s",
                     "values": values(f"{lk}/{base}", "samples_per_s")})  # fmt: skip
        rows.append({"metric": f"{name}: DDP samples/s", "unit": "samples/s",
                     "values": values(f"{lk}/ddp", "samples_per_s")})  # fmt: skip
        rows.append({"metric": f"{name}: compute utilisation, diloco ({label})",
                     "goal": ">= 0.90" if lk == 20 else None,
                     "values": values(f"{lk}/{base}", "utilisation")})  # fmt: skip
        rows.append({"metric": f"{name}: diloco ({label}) outer round, seconds the trainer waited (median of rounds)",
                     "unit": "s", "values": values(f"{lk}/{base}", "blocked_s")})  # fmt: skip
        if lk != "loopback":
            rows.append({"metric": f"{name}: link bytes per sample, DDP ÷ diloco ({label})", "goal": f">= {h / 2:g}",
                         "values": ratios(f"{lk}/ddp", f"{lk}/{base}", "link_bytes_per_sample")})  # fmt: skip
    rows.append({"metric": f"held-out MLM loss, diloco ({label}) ÷ sync, same samples", "goal": "<= 1.03",
                 "values": ratios(f"loopback/{base}", "loopback/ddp", "heldout_loss")})  # fmt: skip
    rows.append({"metric": "diloco: forward/backward seconds per inner step (per peer, loopback)", "unit": "s",
                 "values": values(f"loopback/{base}", "inner_step_compute_s")})  # fmt: skip
    rows.append({"metric": "held-out MLM loss, sync (DDP)", "values": values("loopback/ddp", "heldout_loss")})
    rows.append(
        {"metric": f"held-out MLM loss, diloco ({label})", "values": values(f"loopback/{base}", "heldout_loss")}
    )
    rows.append({"metric": f"diloco ({label}, loopback): helper CPU ÷ training-thread CPU", "goal": "<= 0.15",
                 "values": values(f"loopback/{base}", "helper_cpu_ratio")})  # fmt: skip
    if f"20/{base}" in raw:
        estimate = zip(values(f"20/{base}", "telemetry_bytes_sent"), values(f"20/{base}", "link_tx_bytes"), strict=True)
        rows.append({"metric": f"20 Mbit/s: Trainer's bytes_sent counter ÷ measured link bytes, diloco ({label})",
                     "values": [ratio(t, b) for t, b in estimate]})  # fmt: skip
    short = f"loopback/{arm_name(H_SHORT, COMPRESSION)}"
    if short in raw and h != H_SHORT:
        rows += [
            {"metric": f"held-out loss, diloco (H={H_SHORT}, {COMPRESSION}) ÷ sync, same samples",
             "values": ratios(short, "loopback/ddp", "heldout_loss")},
            {"metric": f"loopback samples/s, diloco H={H_SHORT} ÷ H={h}",
             "values": ratios(short, f"loopback/{base}", "samples_per_s")},
        ]  # fmt: skip
    ref = f"20/{arm_name(H_SHORT, 'none')}"
    if ref in raw:
        rows += [
            {"metric": f"20 Mbit/s: compute utilisation, diloco (H={H_SHORT}, none)",
             "values": values(ref, "utilisation")},
            {"metric": f"20 Mbit/s: link bytes per sample, DDP ÷ diloco (H={H_SHORT}, none)",
             "goal": f">= {H_SHORT / 2:g}", "values": ratios("20/ddp", ref, "link_bytes_per_sample")},
        ]  # fmt: skip
    for key, what in (
        (arm_name(H_SHORT, "none", True), "outer_overlap true ÷ false"),
        (arm_name(H_SHORT, "fp16"), "outer_compression fp16 ÷ none"),
        (arm_name(H_SHORT, "int8"), "outer_compression int8 ÷ none"),
    ):
        key = f"20/{key}"
        if key not in raw:
            continue
        rows.append({"metric": f"held-out loss (H={H_SHORT}), {what}", "values": ratios(key, ref, "heldout_loss")})
        rows.append({"metric": f"20 Mbit/s samples/s (H={H_SHORT}), {what}",
                     "values": ratios(key, ref, "samples_per_s")})  # fmt: skip
        if "overlap" in what:
            rows.append({"metric": f"20 Mbit/s: compute utilisation, diloco H={H_SHORT} with overlap",
                         "values": values(key, "utilisation")})  # fmt: skip
        else:
            rows.append({"metric": f"20 Mbit/s link bytes per sample (H={H_SHORT}), {what}",
                         "values": ratios(key, ref, "link_bytes_per_sample")})  # fmt: skip
    return rows
