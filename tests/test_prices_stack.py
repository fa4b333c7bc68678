"""Prices through the front doors of a real stack: REST (`/api/prices`, `/api/usage`) and
`inferswarm admin price` as CLI processes, the operator's and a logged-in user's."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest

from services.auth.prices import cost_of
from stack import Cli, xdg_homes
from waiting import wait_until_sync
from web_support import MODEL, PASSWORD, new_account, post_json, web_stack

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("prices")) as running:
        yield running


def call(stack, method: str, path: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of one REST call, errors included."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{stack.base_url}{path}", method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_rest_prices_and_the_cost_of_a_real_request(stack, tmp_path):
    user_token, api_key = new_account(stack, "paula")
    admin_token, _ = new_account(stack, "quentin")
    stack.grant_admin("quentin")
    price = {"model": MODEL, "input": 0.15, "output": "0.6", "cached": "0"}  # a JSON number is taken as written

    assert call(stack, "POST", "/api/prices", user_token, price)[0] == 403
    assert call(stack, "POST", "/api/prices", None, price)[0] == 401
    for bad, param in (({"input": -1}, "input"), ({"output": "0.1234567"}, "output"), ({"input": "x"}, "input"),
                       ({"model": "no spaces"}, "model"), ({"cached": [1]}, "cached"), ({"colour": 1}, "colour")):
        status, answer = call(stack, "POST", "/api/prices", admin_token, {**price, **bad})
        assert status == 400 and answer["error"]["code"] == "INVALID_PARAMS", (bad, answer)
        assert answer["error"]["param"] == param, (bad, answer)
    status, created = call(stack, "POST", "/api/prices", admin_token, price)
    assert status == 201, created
    assert (created["input"], created["output"], created["cached"]) == ("0.150000", "0.600000", "0.000000")

    assert call(stack, "GET", "/api/prices")[0] == 401
    status, listed = call(stack, "GET", f"/api/prices?model={MODEL}", user_token)
    assert status == 200 and [p["input"] for p in listed["prices"]] == ["0.150000"]

    answer = post_json(f"{stack.base_url}/api/inference", {"model": MODEL, "prompt": "hello", "max_tokens": 8},
                       {"X-API-Key": api_key})
    usage = answer["usage"]

    def priced():  # the gateway ships usage records to auth in batches
        report = call(stack, "GET", "/api/usage", user_token)[1]
        return report if report["totals"]["cost"] else None

    report = wait_until_sync(priced, 30, interval=0.2, message="the request was never priced")
    expected = cost_of(usage["prompt_tokens"], usage["completion_tokens"], False,
                       input=Decimal("0.15"), output=Decimal("0.6"))
    assert report["totals"]["cost"] == {"USD": str(expected)} and report["totals"]["unpriced"] == 0
    assert [(c["model"], c["cost"]) for c in report["costs"]] == [(MODEL, str(expected))]
    # The same total in `inferswarm usage`.
    cli = Cli(stack.data_dir, int(stack.bootstrap.rsplit(":", 1)[1]), tmp_path / "paula")
    assert cli("login", "paula", "--password-stdin", stdin=PASSWORD).returncode == 0
    shown = cli("usage")
    assert shown.returncode == 0 and f"tokens, {expected} USD" in shown.stdout, shown.stdout


def test_admin_price_commands_as_cli_processes(stack, tmp_path):
    operator = Cli(stack.data_dir, int(stack.bootstrap.rsplit(":", 1)[1]), tmp_path / "operator")
    operator.env.update(xdg_homes(stack.data_dir))  # the stack's own user: its mesh.json and secret
    done = operator("admin", "price", "set", "cli-model", "--input", "1.5", "--output", "2", "--cached", "0.5",
                    "--bootstrap", stack.bootstrap)
    assert done.returncode == 0, done.stderr
    assert "cli-model: input 1.500000, output 2.000000, cached input 0.500000 USD per million" in done.stdout
    listed = operator("admin", "price", "list", "--model", "cli-model", "--json", "--bootstrap", stack.bootstrap)
    assert listed.returncode == 0, listed.stderr
    assert [(p["input"], p["status"]) for p in json.loads(listed.stdout)] == [("1.500000", "current")]
    table = operator("admin", "price", "list", "--bootstrap", stack.bootstrap)
    assert table.returncode == 0 and "cli-model" in table.stdout and "current" in table.stdout

    for args, says in ((("--input", "-1", "--output", "2"), "input"),
                       (("--input", "1", "--output", "0.1234567"), "output"),
                       (("--input", "1", "--output", "2", "--from", "yesterday"), "effective_from")):
        refused = operator("admin", "price", "set", "cli-model", *args, "--bootstrap", stack.bootstrap)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 9 and len(lines) == 1, refused.stderr
        assert "invalid params" in lines[0].lower() and says in lines[0] and "Traceback" not in refused.stderr

    # A user of another machine: no mesh secret, only a session; a plain user may list, not set.
    mesh = json.loads((Path(xdg_homes(stack.data_dir)["XDG_CONFIG_HOME"]) / "inferswarm" / "mesh.json").read_text())
    nothing = tmp_path / "no-secret"
    nothing.mkdir()
    user = Cli(nothing, int(stack.bootstrap.rsplit(":", 1)[1]), tmp_path / "user")
    user.env["INFERSWARM_MESH_ID"] = mesh["mesh_id"]
    anonymous = user("admin", "price", "list")
    assert anonymous.returncode == 3 and "log in as an administrator" in anonymous.stderr
    assert user("register", "rita", "rita@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert user("login", "rita", "--password-stdin", stdin=PASSWORD).returncode == 0
    seen = user("admin", "price", "list", "--json")
    assert seen.returncode == 0, seen.stderr
    assert "cli-model" in {p["model"] for p in json.loads(seen.stdout)}
    refused = user("admin", "price", "set", "cli-model", "--input", "1", "--output", "1")
    assert refused.returncode == 3 and "administrators only" in refused.stderr
    stack.grant_admin("rita")
    later = "2099-01-01T00:00:00+00:00"
    by_admin = user("admin", "price", "set", "cli-model", "--input", "1", "--output", "1", "--from", later)
    assert by_admin.returncode == 0, by_admin.stderr
    assert [p["status"] for p in json.loads(user("admin", "price", "list", "--json").stdout)
            if p["model"] == "cli-model"] == ["current", "scheduled"]
