"""Cost reports through the front doors of a real stack (issue 18, part 7): REST JSON and CSV,
`/api/admin/top-spenders`, and `inferswarm costs` / `admin top-spenders` as CLI processes
(over the mesh and over HTTP)."""

from __future__ import annotations

import csv
import io
import json
import urllib.error
import urllib.request
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from services.auth.prices import cost_of
from stack import Cli, xdg_homes
from waiting import wait_until_sync
from web_support import MODEL, PASSWORD, new_account, post_json, web_stack

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]

FORMULA_KEY = "=HYPERLINK(\"http://evil\")"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("reports")) as running:
        yield running


def get(stack, path: str, token: str | None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers in lower case, body) of one GET, errors included."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{stack.base_url}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def _infer(stack, api_key: str) -> dict:
    return post_json(f"{stack.base_url}/api/inference", {"model": MODEL, "prompt": "hello", "max_tokens": 8},
                     {"X-API-Key": api_key})["usage"]


def test_reports_over_rest_csv_and_the_cli(stack, tmp_path):
    token, sdk_key = new_account(stack, "rhea")
    formula = post_json(f"{stack.base_url}/api/auth/api-keys", {"name": FORMULA_KEY},
                        {"Authorization": f"Bearer {token}"})
    admin, _ = new_account(stack, "sami")
    stack.grant_admin("sami")
    post_json(f"{stack.base_url}/api/prices", {"model": MODEL, "input": "0.15", "output": "0.6"},
              {"Authorization": f"Bearer {admin}"})
    usages = [_infer(stack, sdk_key), _infer(stack, formula["api_key"])]
    costs = [cost_of(u["prompt_tokens"], u["completion_tokens"], False, input=Decimal("0.15"),
                     output=Decimal("0.6")) for u in usages]

    def reported():  # the gateway ships usage records to auth in batches
        status, _, body = get(stack, "/api/reports?group=month&by=key", token)
        answer = json.loads(body)
        return answer if status == 200 and answer["totals"]["requests"] == 2 else None

    report = wait_until_sync(reported, 30, interval=0.2, message="the requests never reached the report")
    month = datetime.now(timezone.utc).date().replace(day=1).isoformat()
    assert (report["group_by"], report["by"]) == ("month", "key")
    assert [(r["period"], r["key_name"], r["requests"], Decimal(r["cost"]["USD"])) for r in report["rows"]] == [
        (month, "sdk", 1, costs[0]), (month, FORMULA_KEY, 1, costs[1])]
    assert report["totals"]["cost"] == {"USD": format(costs[0] + costs[1], "f")}
    assert report["totals"]["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)

    status, headers, body = get(stack, "/api/reports.csv?group=month&by=key", token)
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert headers["content-disposition"].startswith("attachment; filename=")
    assert "-month-by-key.csv" in headers["content-disposition"]
    lines = list(csv.reader(io.StringIO(body.decode())))
    assert lines[0] == ["period", "key_id", "key_name", "requests", "prompt_tokens", "completion_tokens",
                        "unpriced", "cost_USD"]
    assert [(line[2], line[3], Decimal(line[7])) for line in lines[1:]] == [
        ("sdk", "1", costs[0]), ("'" + FORMULA_KEY, "1", costs[1])]  # a formula is never a formula

    status, _, body = get(stack, "/api/reports?group=year", token)
    assert status == 400 and json.loads(body)["error"]["param"] == "group_by"
    assert get(stack, "/api/reports", None)[0] == 401
    assert get(stack, "/api/admin/top-spenders", token)[0] == 403
    status, _, body = get(stack, "/api/admin/top-spenders?limit=5", admin)
    spenders = json.loads(body)["spenders"]
    assert status == 200 and [(s["currency"], s["rank"], s["username"], s["cost"]) for s in spenders] == [
        ("USD", 1, "rhea", format(costs[0] + costs[1], "f"))]
    assert get(stack, "/api/admin/top-spenders?limit=x", admin)[0] == 400

    # `inferswarm costs`, over the mesh and over HTTP: the same CSV as the REST API's.
    port = int(stack.bootstrap.rsplit(":", 1)[1])
    cli = Cli(stack.data_dir, port, tmp_path / "rhea")
    assert cli("login", "rhea", "--password-stdin", stdin=PASSWORD).returncode == 0
    for extra in ((), ("--base-url", stack.base_url)):
        shown = cli("costs", "--csv", "--group", "month", "--by", "key", *extra)
        assert shown.returncode == 0, shown.stderr
        assert list(csv.reader(io.StringIO(shown.stdout))) == lines, extra
    table = cli("costs", "--by", "model")
    assert table.returncode == 0, table.stderr
    assert MODEL in table.stdout and f"{costs[0] + costs[1]:f} USD" in table.stdout
    as_json = json.loads(cli("costs", "--json", "--group", "week").stdout)
    assert as_json["group_by"] == "week" and as_json["totals"]["requests"] == 2
    refused = cli("costs", "--from", "2020-01-01", "--to", "2026-01-01")
    assert refused.returncode == 9 and "366 days" in refused.stderr and "Traceback" not in refused.stderr

    # `inferswarm admin top-spenders`: the operator (the mesh secret), and a logged-in admin.
    operator = Cli(stack.data_dir, port, tmp_path / "operator")
    operator.env.update(xdg_homes(stack.data_dir))
    top = operator("admin", "top-spenders", "--json", "--bootstrap", stack.bootstrap)
    assert top.returncode == 0, top.stderr
    assert [(s["username"], s["cost"]) for s in json.loads(top.stdout)["spenders"]] == [
        ("rhea", format(costs[0] + costs[1], "f"))]
    table = operator("admin", "top-spenders", "--limit", "3", "--bootstrap", stack.bootstrap)
    assert table.returncode == 0 and "rhea" in table.stdout and "USD" in table.stdout, table.stderr
