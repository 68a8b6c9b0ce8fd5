"""The observability kit: the exporter's series, and the dashboard and alert rules that use them.

The rules themselves are checked by promtool (`make lint`: check rules, and test rules against
config/prometheus/activator-alerts.test.yml); here: every activator series they name is one the exporter has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from activator.daemon.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "activator-dashboard.json"
ALERTS = ROOT / "config" / "prometheus" / "activator-alerts.yml"
SERIES = re.compile(r"\b((?:activator|process)_[a-z_]+)\b")


def exposed() -> set[str]:
    m = Metrics()
    svc = m.for_service("web")
    svc.restore_duration.observe(0.1)
    svc.first_connection_wait.observe(0.1)
    svc.checkpoint_build_duration.observe(1)
    m.build_info.labels("1", "3.11", "4.2", "1.1", "6.1").set(1)
    m.reloads.labels("applied").inc()
    m.checkpoint_transfers.labels("web", "pull", "ok").inc()
    m.agent_checks.labels("web", "up").inc()
    text = generate_latest(m.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def referenced() -> dict[str, set[str]]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if "query" in v
              and "label_values" in v["query"]]
    rules = [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    return {"dashboard": {n for e in exprs for n in SERIES.findall(e)},
            "alerts": {n for e in rules for n in SERIES.findall(e)}}


def test_every_series_the_dashboard_and_the_alerts_use_is_exported() -> None:
    have = exposed()
    for where, names in referenced().items():
        assert names, where
        assert not names - have, f"{where} uses series the exporter does not have: {sorted(names - have)}"


def test_no_created_series_and_process_metrics_are_there() -> None:
    have = exposed()
    assert not [n for n in have if n.endswith("_created")]
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
            "activator_build_info", "activator_checkpoint_pages_bytes",
            "activator_checkpoint_created_timestamp_seconds", "activator_checkpoint_outdated"} <= have
