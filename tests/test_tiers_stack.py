"""Tiers through the whole stack (`inferswarm up`): the REST API (`GET /api/tiers`, `PATCH
/api/tiers/{name}`) and the real `inferswarm admin tiers` processes, as the operator and as
a logged-in user; the environment's token budget shown for a tier never edited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stack import Cli, xdg_homes
from test_prices_stack import call
from web_support import PASSWORD, new_account, web_stack

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("tiers"), INFERSWARM_TIER_PRO_TOKENS_PER_MONTH="123456") as running:
        yield running


def test_rest_tiers_for_users_and_admins(stack):
    user_token, _ = new_account(stack, "uma")
    admin_token, _ = new_account(stack, "victor")
    stack.grant_admin("victor")
    status, listed = call(stack, "GET", "/api/tiers", user_token)
    assert status == 200 and [t["name"] for t in listed["tiers"]] == ["free", "pro", "enterprise", "unlimited"]
    assert {t["name"]: t["limits"]["tokens_per_month"] for t in listed["tiers"]}["pro"] == 123456  # the env
    assert call(stack, "GET", "/api/tiers")[0] == 401
    status, refused = call(stack, "PATCH", "/api/tiers/free", user_token, {"requests_per_hour": 5})
    assert status == 403 and refused["error"]["code"] == "FORBIDDEN"

    status, tier = call(stack, "PATCH", "/api/tiers/enterprise", admin_token,
                        {"spend_per_day": 12.25, "requests_per_month": None, "priority": 5})
    assert status == 200, tier
    assert tier["limits"]["spend_per_day"] == "12.25" and tier["limits"]["requests_per_month"] is None
    assert tier["priority"] == 5 and tier["limits"]["requests_per_hour"] == 10_000  # left out: kept
    for body, param in (({"requests_per_hour": 1.5}, "requests_per_hour"), ({"spend_per_day": 1e-7}, "spend_per_day"),
                        ({"colour": "red"}, "colour"), ({"priority": 12}, "priority")):
        status, error = call(stack, "PATCH", "/api/tiers/enterprise", admin_token, body)
        assert status == 400 and error["error"]["code"] == "INVALID_PARAMS", (body, error)
        assert param in error["error"]["message"], (body, error)
    assert call(stack, "PATCH", "/api/tiers/gold", admin_token, {"priority": 1})[0] == 400


def test_admin_tiers_commands_as_cli_processes(stack, tmp_path):
    operator = Cli(stack.data_dir, int(stack.bootstrap.rsplit(":", 1)[1]), tmp_path / "operator")
    operator.env.update(xdg_homes(stack.data_dir))  # the stack's own user: its mesh.json and secret
    shown = operator("admin", "tiers", "--bootstrap", stack.bootstrap)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:3] == ["tier", "requests/hour", "requests/month"]
    assert lines[3].split()[:4] == ["pro", "1,000", "30,000", "123,456"]  # the environment's budget
    done = operator("admin", "tiers", "set", "free", "--requests-per-month", "2500", "--tokens-per-month", "none",
                    "--budget-day", "1.5", "--priority", "2", "--bootstrap", stack.bootstrap)
    assert done.returncode == 0, done.stderr
    assert "free: set" in done.stdout
    listed = operator("admin", "tiers", "--json", "--bootstrap", stack.bootstrap)
    free = next(t for t in json.loads(listed.stdout) if t["name"] == "free")
    assert free == {"name": "free", "priority": 2, "edited": True, "limits": {
        "requests_per_hour": 100, "requests_per_month": 2500, "tokens_per_month": None,
        "spend_per_day": "1.50", "spend_per_month": None}}

    for args, says in ((("--requests-per-hour", "lots"), "requests_per_hour"),
                       (("--budget-month", "0.1234567"), "spend_per_month"),
                       (("--requests-per-hour", "-3"), "requests_per_hour"),
                       (("--priority", "10"), "priority")):
        refused = operator("admin", "tiers", "set", "free", *args, "--bootstrap", stack.bootstrap)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 9 and len(lines) == 1, refused.stderr
        assert "invalid params" in lines[0].lower() and says in lines[0] and "Traceback" not in refused.stderr
    unknown = operator("admin", "tiers", "set", "gold", "--priority", "1", "--bootstrap", stack.bootstrap)
    assert unknown.returncode == 9 and "no such tier" in unknown.stderr

    # A user of another machine: no mesh secret, a session; a plain user may list, not set.
    mesh = json.loads((Path(xdg_homes(stack.data_dir)["XDG_CONFIG_HOME"]) / "inferswarm" / "mesh.json").read_text())
    nothing = tmp_path / "no-secret"
    nothing.mkdir()
    user = Cli(nothing, int(stack.bootstrap.rsplit(":", 1)[1]), tmp_path / "user")
    user.env["INFERSWARM_MESH_ID"] = mesh["mesh_id"]
    anonymous = user("admin", "tiers", "set", "free", "--priority", "1")
    assert anonymous.returncode == 3 and "log in as an administrator" in anonymous.stderr
    assert user("register", "wes", "wes@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert user("login", "wes", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert user("admin", "tiers").returncode == 0
    refused = user("admin", "tiers", "set", "free", "--priority", "1")
    assert refused.returncode == 3 and "administrators only" in refused.stderr
    stack.grant_admin("wes")
    by_admin = user("admin", "tiers", "set", "free", "--requests-per-hour", "none")
    assert by_admin.returncode == 0, by_admin.stderr
    assert "none" in by_admin.stdout.splitlines()[-1]
