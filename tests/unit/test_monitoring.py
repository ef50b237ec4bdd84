"""monitoring/: generated files are current, every metric name is one the code exports, promtool accepts the configs
and rules, and each alert fires on its fault (promtool's rule unit tests). The live check against a real swarm is in
tests/integration/test_monitoring.py."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from coordinator.metrics import SwarmMetrics
from monitoring import build, local
from peer import telemetry
from peer.telemetry import PeerTelemetry
from serve import metrics as serve_metrics
from serve.metrics import ServeMetrics
from tests.binaries import require_binary

pytestmark = pytest.mark.timeout(60)

PROMETHEUS_DIR = build.HERE / "prometheus"
GRAFANA_DIR = build.HERE / "grafana"
NAME = re.compile(r"\bbertswarm_[a-z_]+\b")


def promtool() -> str:
    return require_binary("promtool")


def exported_names() -> set[str]:
    """Every sample name the peer, the coordinator and the server expose (counters with _total, histograms with
    _bucket...)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for registry in (PeerTelemetry().registry, SwarmMetrics().registry, ServeMetrics().registry):
        for family in registry.collect():  # families without samples yet (labelled gauges) count too
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every query in the committed dashboard JSON, variables included."""
    found = []
    for path in sorted((GRAFANA_DIR / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            found += [(f"{path.name}: {panel['title']} [{t['refId']}]", t["expr"]) for t in panel["targets"]]
        found += [(f"{path.name}: ${v['name']}", v["definition"]) for v in dashboard["templating"]["list"]]
    return found


def rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return [(r["alert"], r["expr"]) for group in rules["groups"] for r in group["rules"]]


def test_generated_files_are_current():
    assert build.main(["--check"]) == 0, "run python -m monitoring.build and commit the result"


def test_every_metric_name_in_dashboards_and_rules_is_exported_by_the_code():
    exported = exported_names()
    assert f"{telemetry.PEER_SAMPLES}_total" in exported and f"{telemetry.PEER_ROUND_DURATION}_bucket" in exported
    assert f"{serve_metrics.REQUESTS}_total" in exported and f"{serve_metrics.REQUEST_SECONDS}_bucket" in exported
    used = {(where, name) for where, expr in dashboard_exprs() + rule_exprs() for name in NAME.findall(expr)}
    unknown = sorted((where, name) for where, name in used if name not in exported)
    assert not unknown, f"queries use metrics the code does not export: {unknown}"


def test_every_exported_metric_is_on_a_dashboard():
    shown = {name for _, expr in dashboard_exprs() for name in NAME.findall(expr)}
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in shown}
    for module in (telemetry, serve_metrics):
        declared = {
            v
            for k, v in vars(module).items()
            if k.isupper() and k != "PREFIX" and isinstance(v, str) and v.startswith("bertswarm_")
        }
        assert declared, module.__name__
        assert declared - families == set(), f"metrics defined in {module.__name__} but shown on no dashboard"


def test_dashboards_are_well_formed_and_use_the_provisioned_datasource():
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape  # Grafana's $__rate_interval depends on it
    uids = set()
    for path in (GRAFANA_DIR / "dashboards").glob("*.json"):
        dashboard = json.loads(path.read_text())
        uids.add(dashboard["uid"])
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path
        for panel in dashboard["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, (path.name, panel["title"])
            assert panel["datasource"]["uid"] == datasource["uid"], (path.name, panel["title"])
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
    assert uids == {d.uid for d in build.DASHBOARDS}


def test_promtool_accepts_configs_and_rules(tmp_path):
    tool = promtool()
    local_config = tmp_path / "prometheus.yml"
    local_config.write_text(
        yaml.safe_dump(local.prometheus_config(["127.0.0.1:9500"], ["127.0.0.1:9400"], serves=["127.0.0.1:9600"]))
    )
    for command in (
        ["check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        ["check", "config", str(local_config)],
        ["check", "rules", str(PROMETHEUS_DIR / "rules.yml")],
    ):
        result = subprocess.run([tool, *command], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"


def test_each_alert_fires_on_its_fault_and_only_then():
    tool = promtool()
    tests = yaml.safe_load((PROMETHEUS_DIR / "rules.test.yml").read_text())
    covered = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"] if not case["exp_alerts"]}
    names = {a.name for a in build.ALERTS}
    assert covered == names and quiet == names, "every alert needs a firing and a quiet case in rules.test.yml"
    result = subprocess.run([tool, "test", "rules", str(PROMETHEUS_DIR / "rules.test.yml")], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_monitor_refuses_a_busy_port_with_one_line(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = f"127.0.0.1:{s.getsockname()[1]}"
        assert local.main(["--listen", busy]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and busy in err and "--listen" in err


def test_monitor_without_prometheus_answers_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(local.shutil, "which", lambda name: None)
    assert local.main(["--listen", "127.0.0.1:0", "--workdir", str(tmp_path / "prom")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "apt-get install prometheus" in err
    assert not (tmp_path / "prom").exists()
