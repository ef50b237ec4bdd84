"""The one source of bertswarm's dashboards and alert rules: Grafana JSON and Prometheus rules are generated here.

Every metric name comes from ``peer.telemetry`` or ``serve.metrics``, so a renamed metric cannot silently leave a
panel empty. ``python -m monitoring.build`` rewrites the generated files; ``--check`` fails if they are out of date (a
test runs it). Each alert carries a *signal*: the series the alert looks at. On a healthy swarm the signal returns
data and the alert's expression returns none; the tests check both against a live swarm, and ``rules.test.yml``
checks that every alert fires on the faults it is for.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from monitoring import local
from peer import telemetry as m
from peer.run.schema import MAX_LOSS
from serve import metrics as sm

HERE = Path(__file__).resolve().parent
DASHBOARD_DIR = HERE / "grafana" / "dashboards"
RULES_PATH = local.RULES_PATH
DATASOURCE = {"type": "prometheus", "uid": "bertswarm-prometheus"}
RATE = "$__rate_interval"  # Grafana's window for rate(): at least four scrape intervals
PEER = 'instance=~"$instance"'  # the "My peer" dashboard's peer picker


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # or "stat", "table"
    unit: str = "short"
    width: int = 12
    height: int = 8
    description: str = ""


@dataclass(frozen=True)
class Variable:
    name: str
    label: str
    metric: str  # the variable's values are label_values(metric, name)


@dataclass(frozen=True)
class Dashboard:
    uid: str
    file: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[Variable, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    signal: str  # what the alert watches; returns data on a healthy swarm (checked by the tests)
    summary: str
    for_: str = "0m"
    severity: str = "warning"


def _q(expr: str, legend: str = "") -> tuple[Query, ...]:
    return (Query(expr, legend),)


def _select(metric: str, selector: str) -> str:
    return f"{metric}{{{selector}}}" if selector else metric


def _quantiles(metric: str, selector: str = "", by: str = "", quantiles=((0.5, "median"), (0.95, "p95"))):
    """histogram_quantile of ``metric``'s buckets, one query per (quantile, legend); ``by`` keeps a label apart."""
    group = f"le, {by}" if by else "le"
    inner = f"sum by ({group}) (rate({_select(metric + '_bucket', selector)}[{RATE}]))"
    prefix = f"{{{{{by}}}}} " if by else ""
    return tuple(Query(f"histogram_quantile({q}, {inner})", prefix + legend) for q, legend in quantiles)


def _defences(selector: str = "") -> tuple[Query, ...]:
    """What this peer refused from others: contributions rejected (by reason), steps not applied, implausible
    records."""
    rejected, skipped, ignored = (
        _select(f"{name}_total", selector)
        for name in (m.PEER_REJECTED_CONTRIBUTIONS, m.PEER_SKIPPED_STEPS, m.PEER_IGNORED_PROGRESS_RECORDS)
    )
    return (
        Query(f"sum by (reason) (increase({rejected}[{RATE}]))", "rejected contributions: {{reason}}"),
        Query(f"sum by (reason) (increase({skipped}[{RATE}]))", "skipped steps"),
        Query(f"sum(increase({ignored}[{RATE}]))", "ignored records"),
    )


SWARM = Dashboard(
    uid="bertswarm-swarm",
    file="swarm.json",
    title="bertswarm / Swarm",
    description="The whole swarm as the coordinator sees it, plus averaging figures of every scraped peer.",
    panels=(
        Panel("Peers", _q(m.SWARM_PEERS), kind="stat", width=4, height=4),
        Panel("Global step", _q(m.SWARM_EPOCH), kind="stat", width=4, height=4),
        Panel("Swarm samples/s", _q(m.SWARM_SAMPLES_PER_SECOND), kind="stat", width=4, height=4),
        Panel("Samples processed (live peers)", _q(m.SWARM_SAMPLES), kind="stat", width=6, height=4),
        Panel("Last checkpoint age", _q(m.CHECKPOINT_AGE), kind="stat", unit="s", width=6, height=4),
        Panel("Peers over time", _q(m.SWARM_PEERS, "training peers")),
        Panel("Swarm throughput (samples/s)", _q(m.SWARM_SAMPLES_PER_SECOND, "samples/s")),
        Panel("Global step (epoch)", _q(m.SWARM_EPOCH, "global step")),
        Panel(
            "Loss",
            (Query(m.SWARM_LOSS, "training loss (peers' batches)"), Query(m.EVAL_LOSS, "held-out loss (checkpoints)")),
            description="Training MLM loss weighted by the peers' mini-batches; held-out loss of each checkpoint.",
        ),
        Panel("Held-out MLM accuracy", _q(m.EVAL_ACCURACY, "accuracy"), unit="percentunit"),
        Panel(
            "Averaging outcomes (all scraped peers)",
            _q(f"sum by (outcome) (increase({m.PEER_AVERAGING_ROUNDS}_total[{RATE}]))", "{{outcome}}"),
            description="success: averaged with others; solo: no groupmates found; failed: the round broke off.",
        ),
        Panel("Averaging round duration", _quantiles(m.PEER_ROUND_DURATION), unit="s"),
        Panel(
            "Averaging group size",
            (Query(f"avg({m.PEER_GROUP_SIZE})", "mean group size"), Query(f"max({m.PEER_SWARM_SIZE})", "peers seen")),
        ),
        Panel(
            "Checkpoints",
            (Query(m.CHECKPOINT_AGE, "age of the last checkpoint"), Query(m.CHECKPOINT_WRITE_SECONDS, "write time")),
            unit="s",
        ),
        Panel("Checkpoint step", _q(m.CHECKPOINT_EPOCH, "step of the last checkpoint")),
        Panel(
            "Checkpoint attempts",
            _q(f"sum by (outcome) (increase({m.CHECKPOINTS}_total[{RATE}]))", "{{outcome}}"),
        ),
        Panel(
            "Defences against faulty peers (all scraped peers)",
            _defences(),
            description="Groupmates' non-finite contributions dropped, optimizer steps not applied, and other "
            "peers' implausible progress records ignored.",
        ),
        Panel(
            "Averaging traffic (all scraped peers, estimated)",
            (
                Query(f"sum(rate({m.PEER_BYTES_SENT}_total[{RATE}]))", "sent"),
                Query(f"sum(rate({m.PEER_BYTES_RECEIVED}_total[{RATE}]))", "received"),
            ),
            unit="Bps",
            description="Gradients (sync mode) or pseudo-gradients (DiLoCo) exchanged, estimated from group sizes.",
        ),
        Panel(
            "DiLoCo outer rounds (all scraped peers)",
            _q(f"sum by (outcome) (increase({m.PEER_OUTER_ROUNDS}_total[{RATE}]))", "{{outcome}}"),
            description="--mode diloco: success, solo, failed (stepped with the local pseudo-gradient) or reloaded "
            "(the peer was behind and loaded the outer state). Zero in sync mode.",
        ),
        Panel(
            "Per-peer throughput (samples/s, busiest 50)",
            _q(f"sort_desc({m.SWARM_PEER_SAMPLES_PER_SECOND})", "{{peer}}"),
            kind="table",
            width=24,
        ),
    ),
)

MY_PEER = Dashboard(
    uid="bertswarm-my-peer",
    file="my-peer.json",
    title="bertswarm / My peer",
    description="One peer's own view, from its --metrics-port; works without a coordinator.",
    variables=(Variable("instance", "Peer", m.PEER_EPOCH),),
    panels=(
        Panel("Step", _q(f"{m.PEER_EPOCH}{{{PEER}}}"), kind="stat", width=6, height=4),
        Panel("Samples contributed", _q(f"{m.PEER_SAMPLES}_total{{{PEER}}}"), kind="stat", width=6, height=4),
        Panel("Samples/s", _q(f"{m.PEER_SAMPLES_PER_SECOND}{{{PEER}}}"), kind="stat", width=6, height=4),
        Panel("Peers seen", _q(f"{m.PEER_SWARM_SIZE}{{{PEER}}}"), kind="stat", width=6, height=4),
        Panel("Throughput (samples/s)", _q(f"{m.PEER_SAMPLES_PER_SECOND}{{{PEER}}}", "{{instance}}")),
        Panel("Loss (this peer's batches)", _q(f"{m.PEER_LOSS}{{{PEER}}}", "{{instance}}")),
        Panel("Global step held", _q(f"{m.PEER_EPOCH}{{{PEER}}}", "{{instance}}")),
        Panel("Learning rate", _q(f"{m.PEER_LEARNING_RATE}{{{PEER}}}", "{{instance}}")),
        Panel(
            "Averaging rounds",
            _q(f"sum by (outcome) (increase({m.PEER_AVERAGING_ROUNDS}_total{{{PEER}}}[{RATE}]))", "{{outcome}}"),
        ),
        Panel("Round duration", _quantiles(m.PEER_ROUND_DURATION, PEER), unit="s"),
        Panel("Group size", _q(f"{m.PEER_GROUP_SIZE}{{{PEER}}}", "{{instance}}")),
        Panel(
            "State downloads",
            (
                Query(f"increase({m.PEER_STATE_DOWNLOADS}_total{{{PEER}}}[{RATE}])", "downloads"),
                Query(f"{m.PEER_STATE_DOWNLOAD_SECONDS}{{{PEER}}}", "seconds of the last one"),
            ),
            description="Loading the swarm's state: at join, after falling behind, and after a restart.",
        ),
        Panel(
            "Dropped local batches",
            (
                Query(f"sum by (reason) (increase({m.PEER_SKIPPED_BATCHES}_total{{{PEER}}}[{RATE}]))", "{{reason}}"),
                Query(f"increase({m.PEER_SKIPPED_SHARDS}_total{{{PEER}}}[{RATE}])", "corrupt prepared-data shards"),
            ),
        ),
        Panel("Defences against faulty peers", _defences(PEER)),
        Panel("DiLoCo outer step", _q(f"{m.PEER_OUTER_STEP}{{{PEER}}}", "{{instance}}")),
        Panel(
            "DiLoCo outer rounds",
            _q(f"sum by (outcome) (increase({m.PEER_OUTER_ROUNDS}_total{{{PEER}}}[{RATE}]))", "{{outcome}}"),
        ),
        Panel(
            "Averaging traffic (estimated)",
            (
                Query(f"rate({m.PEER_BYTES_SENT}_total{{{PEER}}}[{RATE}])", "sent"),
                Query(f"rate({m.PEER_BYTES_RECEIVED}_total{{{PEER}}}[{RATE}])", "received"),
            ),
            unit="Bps",
        ),
    ),
)

_P50_P99 = ((0.5, "p50"), (0.99, "p99"))
_served = f"min({sm.STEP})"

SERVING = Dashboard(
    uid="bertswarm-serving",
    file="serving.json",
    title="bertswarm / Serving",
    description="Every scraped bertswarm-serve: requests, latency, dynamic batching and the checkpoint it serves "
    "against the coordinator's newest.",
    panels=(
        Panel(
            "Requests/s", _q(f"sum(rate({sm.REQUESTS}_total[{RATE}]))"), kind="stat", unit="reqps", width=6, height=4
        ),  # fmt: skip
        Panel("Served step (oldest server)", _q(_served), kind="stat", width=6, height=4),
        Panel(
            "Steps behind the coordinator's checkpoint",
            _q(f"max({m.CHECKPOINT_EPOCH}) - {_served}"),
            kind="stat",
            width=6,
            height=4,
            description="Newest published checkpoint step minus the step the slowest server answers with.",
        ),
        Panel(
            "Refused checkpoints",
            _q(f'sum(increase({sm.RELOADS}_total{{outcome="refused"}}[1h]))'),
            kind="stat",
            width=6,
            height=4,
            description="Checkpoints that failed verification in the last hour (the old one kept serving).",
        ),
        Panel(
            "Requests/s by endpoint and code",
            _q(f"sum by (endpoint, code) (rate({sm.REQUESTS}_total[{RATE}]))", "{{endpoint}} {{code}}"),
            unit="reqps",
            description="4xx: the client's request was wrong; 503: no checkpoint loaded yet.",
        ),
        Panel(
            "Latency by endpoint",
            _quantiles(sm.REQUEST_SECONDS, by="endpoint", quantiles=_P50_P99),
            unit="s",
            description="From reading the request to the answer, batching wait included.",
        ),
        Panel(
            "Served step vs published checkpoint",
            (
                Query(sm.STEP, "served ({{instance}})"),
                Query(m.CHECKPOINT_EPOCH, "published (coordinator)"),
            ),
        ),
        Panel(
            "Checkpoint reloads",
            _q(f"sum by (outcome) (increase({sm.RELOADS}_total[{RATE}]))", "{{outcome}}"),
            description="loaded: swapped in; refused: failed verification (one warning, the old one keeps serving); "
            "failed: went away while loading (retried).",
        ),
        Panel(
            "Batch size (inputs per model call)",
            (
                *_quantiles(sm.BATCH_SIZE, quantiles=_P50_P99),
                Query(f"sum(rate({sm.BATCH_SIZE}_sum[{RATE}])) / sum(rate({sm.BATCH_SIZE}_count[{RATE}]))", "mean"),
            ),
            description="Dynamic batching: requests that arrive within --batch-window-ms share one forward pass.",
        ),
        Panel(
            "Model calls/s",
            _q(f"sum(rate({sm.BATCH_SIZE}_count[{RATE}]))", "forward passes/s"),
            unit="ops",
        ),
    ),
)

DASHBOARDS = (SWARM, MY_PEER, SERVING)

CHECKPOINT_MAX_AGE_SECONDS = 2 * 3600
_rounds = f"{m.PEER_AVERAGING_ROUNDS}_total"
_failed_share = f'sum(rate({_rounds}{{outcome="failed"}}[10m])) / sum(rate({_rounds}[10m]))'
_peers_kept = f"{m.SWARM_PEERS} / max_over_time({m.SWARM_PEERS}[10m])"

ALERTS = (
    Alert(
        "BertswarmNoGlobalProgress",
        f"changes({m.SWARM_EPOCH}[15m]) == 0",
        f"changes({m.SWARM_EPOCH}[15m])",
        "The swarm's global step has not advanced for 15 minutes",
        for_="5m",
        severity="critical",
    ),
    Alert(
        "BertswarmPeersDropped",
        f"{_peers_kept} < 0.5",
        _peers_kept,
        "More than half of the training peers left within 10 minutes",
        for_="1m",
    ),
    Alert(
        "BertswarmLossNotFinite",
        f"{m.SWARM_LOSS} != {m.SWARM_LOSS} or {m.SWARM_LOSS} >= {MAX_LOSS:g}",
        m.SWARM_LOSS,
        "Training loss is NaN or infinite (peers report such losses at the schema's ceiling)",
        severity="critical",
    ),
    Alert(
        "BertswarmCheckpointStale",
        f"{m.CHECKPOINT_AGE} > {CHECKPOINT_MAX_AGE_SECONDS}",
        m.CHECKPOINT_AGE,
        f"No checkpoint was published for over {CHECKPOINT_MAX_AGE_SECONDS // 3600} hours",
    ),
    Alert(
        "BertswarmAveragingFailing",
        f"{_failed_share} > 0.5",
        _failed_share,
        "More than half of the averaging rounds of the scraped peers failed in the last 10 minutes",
        for_="10m",
    ),
    Alert(
        "BertswarmCoordinatorDown",
        'up{job="bertswarm-coordinator"} == 0',
        'up{job="bertswarm-coordinator"}',
        "Prometheus cannot scrape the coordinator",
        for_="2m",
    ),
)


def grafana_dashboard(d: Dashboard) -> dict:
    panels, x, y, row_height = [], 0, 0, 0
    for i, p in enumerate(d.panels, start=1):
        if x + p.width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_grafana_panel(i, p, {"h": p.height, "w": p.width, "x": x, "y": y}))
        x, row_height = x + p.width, max(row_height, p.height)
    variables = [
        {
            "name": v.name,
            "label": v.label,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": f"label_values({v.metric}, {v.name})",
            "query": {"query": f"label_values({v.metric}, {v.name})", "refId": "PrometheusVariableQueryEditor"},
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }
        for v in d.variables
    ]
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": ["bertswarm"],
        "editable": False,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "version": 1,
        "annotations": {"list": []},
        "templating": {"list": variables},
        "panels": panels,
    }


def _grafana_panel(panel_id: int, p: Panel, grid: dict) -> dict:
    targets = []
    for i, q in enumerate(p.queries):
        target = {
            "refId": chr(ord("A") + i),
            "datasource": DATASOURCE,
            "expr": q.expr,
            "legendFormat": q.legend or "__auto",
        }
        if p.kind == "table":
            target.update(format="table", instant=True, range=False)
        targets.append(target)
    panel = {
        "id": panel_id,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
    }
    if p.kind == "stat":
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    elif p.kind == "table":
        panel["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]
    else:
        panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    return panel


def prometheus_rules() -> dict:
    rules = [
        {
            "alert": a.name,
            "expr": a.expr,
            "for": a.for_,
            "labels": {"severity": a.severity},
            "annotations": {"summary": a.summary},
        }
        for a in ALERTS
    ]
    return {"groups": [{"name": "bertswarm", "rules": rules}]}


def rendered() -> dict[Path, str]:
    """Every generated file and its exact text."""
    files = {DASHBOARD_DIR / d.file: json.dumps(grafana_dashboard(d), indent=2) + "\n" for d in DASHBOARDS}
    header = "# Generated by `python -m monitoring.build` from monitoring/build.py; edit that, not this file.\n"
    files[RULES_PATH] = header + yaml.safe_dump(prometheus_rules(), sort_keys=False, width=1000)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a generated file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.relative_to(HERE.parent))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print(f"out of date: {', '.join(map(str, stale))}; run python -m monitoring.build", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
