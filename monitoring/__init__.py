"""Prometheus rules, Grafana dashboards and a local Prometheus launcher for bertswarm (see monitoring/README.md)."""
