"""deploy/: the Prometheus scrape config and rules pass promtool (with the rules'
own unit tests, where every alert fires), every alert links to its section of
deploy/RUNBOOK.md, and the Grafana dashboard queries valid PromQL over metric
families that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.metrics import FAMILIES, REQUESTS, TIME_TO_FIRST_TOKEN

pytestmark = pytest.mark.rpc

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "inferswarm-dashboard.json"
RUNBOOK = DEPLOY / "RUNBOOK.md"
RUNBOOK_URL = "https://github.com/inferswarm/inferswarm/blob/main/deploy/RUNBOOK.md#"
#: Codes of gateway.infer that are the caller's doing: neither good nor bad in the availability SLI.
CALLERS_CODES = {"INVALID_PARAMS", "METHOD_NOT_FOUND", "DECODE_ERROR", "TOO_LARGE", "UNAUTHENTICATED", "FORBIDDEN",
                 "NOT_FOUND", "CONFLICT", "RATE_LIMITED", "CANCELLED"}
#: Dashboard variables, and what the check substitutes for them (Grafana's "All").
VARIABLES = {"model": ".*", "service": ".*", "instance": ".*"}
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


def rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def alert_rules() -> list[dict]:
    return [r for r in rules() if "alert" in r]


def unit_tests() -> list[dict]:
    return yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_alert_rules_pass_promtool_and_their_unit_tests(promtool):
    assert f"SUCCESS: {len(rules())} rules found" in run(promtool, "check", "rules", "alerts.yml")
    run(promtool, "test", "rules", "alerts_test.yml")
    names = set(_NAME.findall((PROMETHEUS / "alerts.yml").read_text()))
    assert names and all(known(n) for n in names), sorted(n for n in names if not known(n))
    alerts = {r["alert"] for r in alert_rules()}
    for wanted in ("InferswarmAvailabilityBudgetBurn", "InferswarmFirstTokenBudgetBurn", "InferswarmModelWithoutWorkers",
                   "InferswarmUsageBacklogGrowing", "InferswarmReportingSourcesLost", "InferswarmProcessMemoryGrowing",
                   "InferswarmServiceInstanceDown", "InferswarmWorkersSaturated", "InferswarmRateLimitViolationsSpiking",
                   "InferswarmBreakerOpen", "InferswarmUpstreamKeyDisabled"):
        assert wanted in alerts
    assert "InferswarmHighErrorRate" not in alerts  # single-window: replaced by the burn rates


def test_every_alert_fires_in_a_unit_test_with_its_labels():
    order = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["group_eval_order"]
    assert order[0] == "inferswarm-slo"  # the SLIs recorded before the burn-rate alerts read them
    fired = [(case["alertname"], expected["exp_labels"]) for test in unit_tests()
             for case in test.get("alert_rule_test", []) for expected in case["exp_alerts"]]
    for rule in alert_rules():
        assert any(name == rule["alert"] and rule["labels"].items() <= {k: str(v) for k, v in labels.items()}.items()
                   for name, labels in fired), f"{rule['alert']} {rule['labels']} fires in no case of alerts_test.yml"
    # The multi-window property: each burn-rate alert also has a case where it must stay quiet.
    quiet = {case["alertname"] for test in unit_tests() for case in test.get("alert_rule_test", [])
             if not case["exp_alerts"]}
    burns = {r["alert"] for r in alert_rules() if r["alert"].endswith("BudgetBurn")}
    assert len(burns) == 2 and burns <= quiet


def test_every_alert_links_to_its_runbook_section():
    anchors = {anchor(line.lstrip("#")) for line in RUNBOOK.read_text().splitlines() if line.startswith("## ")}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        url = notes["runbook_url"]
        assert url.startswith(RUNBOOK_URL) and url.removeprefix(RUNBOOK_URL) in anchors, (rule["alert"], url)
        assert url.removeprefix(RUNBOOK_URL) == anchor(rule["alert"])  # the section is named after the alert
    assert "service-level-objectives" in anchors
    assert "RUNBOOK.md" in (DEPLOY / "README.md").read_text()


def test_availability_sli_places_every_code_once():
    """Every code of a request is bad, good (OK) or the caller's own, in the recording rules and the runbook."""
    codes = next(label.values for label in REQUESTS.labels if label.name == "code")  # OK, every error, "other"
    recorded = [r for r in rules() if r.get("record", "").startswith("slo:gateway_infer_availability_errors:")]
    assert {r["record"].rsplit("_", 1)[1] for r in recorded} == {"rate5m", "rate30m", "rate1h", "rate6h", "rate3d"}
    for rule in recorded:
        bad, valid = (set(m.split("|")) for m in re.findall(r'code=~"([^"]+)"', rule["expr"]))
        assert valid - bad == {"OK"} and bad | valid | CALLERS_CODES == codes, rule["record"]
        assert not valid & CALLERS_CODES
    runbook = RUNBOOK.read_text()
    not_counted = runbook[runbook.index("*not counted*"):runbook.index("The SLI is bad")]
    assert set(re.findall(r"`([A-Z_]+)`", not_counted)) == CALLERS_CODES


def test_scrape_config_is_valid(promtool):
    run(promtool, "check", "config", "prometheus.yml")
    assert "honor_labels: true" in (PROMETHEUS / "prometheus.yml").read_text()  # our `instance` label wins


def test_first_token_sli_threshold_is_a_bucket_bound():
    """`le="2.5"` only exists if 2.5 s is a bucket of the histogram (floatToGoString: "2.5")."""
    recorded = [r for r in rules() if r.get("record", "").startswith("slo:gateway_infer_ttft_slow:")]
    assert len(recorded) == 5
    assert all('le="2.5"' in r["expr"] for r in recorded) and 2.5 in TIME_TO_FIRST_TOKEN.buckets


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_variables_filter_its_panels_and_each_slo_has_a_row():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    exprs = dashboard_exprs(dashboard)
    for name in VARIABLES:
        variable = variables[name]
        assert variable["type"] == "query" and variable["multi"] and variable["includeAll"], name
        assert variable["query"]["query"].startswith("label_values(") and variable["datasource"]["uid"] == "${datasource}"
        assert all(known(n) for n in _NAME.findall(variable["query"]["query"])), name
        assert any(f'{name}=~"${name}"' in e for e in exprs), f"no panel filters by ${name}"
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert sum(t.startswith("SLO: availability") for t in rows) == 1
    assert sum(t.startswith("SLO: time to first token") for t in rows) == 1
    for sli in ("slo:gateway_infer_availability_errors:ratio_rate", "slo:gateway_infer_ttft_slow:ratio_rate"):
        assert any(sli in e for e in exprs)


def test_dashboard_queries_are_valid_promql_over_known_families(promtool, tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) > 15
    names = {n for e in exprs for n in _NAME.findall(e)}
    assert all(known(n) for n in names), sorted(n for n in names if not known(n))
    recorded = {r["record"] for r in rules() if "record" in r}
    used = {n for e in exprs for n in re.findall(r"\bslo:[a-z_]+:[a-z0-9_]+", e)}
    assert used <= recorded, sorted(used - recorded)

    def substituted(expr: str) -> str:
        expr = expr.replace("$__rate_interval", "5m")
        for name, value in VARIABLES.items():
            expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
        assert "$" not in expr, expr
        return expr

    # promtool has no "check expression": check each one as a recording rule.
    checked = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": substituted(e)} for i, e in enumerate(exprs)
    ]}]}
    (tmp_path / "dashboard_rules.yml").write_text(json.dumps(checked))  # JSON is YAML
    run(promtool, "check", "rules", "dashboard_rules.yml", cwd=tmp_path)
