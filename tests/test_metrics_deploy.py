"""deploy/: the Prometheus scrape config and alert rules pass promtool (with the
rules' own unit tests), and the Grafana dashboard queries valid PromQL over
metric families that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.metrics import FAMILIES

pytestmark = pytest.mark.rpc

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "inferswarm-dashboard.json"
_NAME = re.compile(r"\binferswarm_[a-z_]+")
_SUFFIXES = ("_bucket", "_sum", "_count")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: install Debian's `prometheus` package (it ships promtool)"
    return path


def run(*args: str, cwd: Path = PROMETHEUS) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def known(name: str) -> bool:
    return name in FAMILIES or any(name.endswith(s) and name[: -len(s)] in FAMILIES for s in _SUFFIXES)


def test_alert_rules_pass_promtool_and_their_unit_tests(promtool):
    assert "SUCCESS: 12 rules found" in run(promtool, "check", "rules", "alerts.yml")
    run(promtool, "test", "rules", "alerts_test.yml")
    names = set(_NAME.findall((PROMETHEUS / "alerts.yml").read_text()))
    assert names and all(known(n) for n in names), sorted(n for n in names if not known(n))
    alerts = set(re.findall(r"alert: (\w+)", (PROMETHEUS / "alerts.yml").read_text()))
    for wanted in ("InferswarmServiceInstanceDown", "InferswarmHighErrorRate", "InferswarmHighLatencyP95",
                   "InferswarmWorkersSaturated", "InferswarmRateLimitViolationsSpiking", "InferswarmBreakerOpen",
                   "InferswarmUpstreamKeyDisabled"):
        assert wanted in alerts


def test_scrape_config_is_valid(promtool):
    run(promtool, "check", "config", "prometheus.yml")
    assert "honor_labels: true" in (PROMETHEUS / "prometheus.yml").read_text()  # our `instance` label wins


def test_dashboard_queries_are_valid_promql_over_known_families(promtool, tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) > 15
    names = {n for e in exprs for n in _NAME.findall(e)}
    assert all(known(n) for n in names), sorted(n for n in names if not known(n))
    # promtool has no "check expression": check each one as a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(exprs)
    ]}]}
    (tmp_path / "dashboard_rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    run(promtool, "check", "rules", "dashboard_rules.yml", cwd=tmp_path)
