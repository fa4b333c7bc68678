"""The audit log through the front doors of a real stack (issue 18, part 8): `GET /api/audit` as a
user and as an admin, and `inferswarm audit` as a CLI process."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from stack import Cli
from web_support import PASSWORD, new_account, post_json, web_stack

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("audit")) as running:
        yield running


def get(stack, path: str, token: str | None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{stack.base_url}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_audit_over_rest_and_the_cli(stack, tmp_path):
    token, api_key = new_account(stack, "tess")
    admin, admin_key = new_account(stack, "ursa")
    stack.grant_admin("ursa")
    post_json(f"{stack.base_url}/api/auth/api-keys", {"name": "second"}, {"Authorization": f"Bearer {token}"})

    status, mine = get(stack, "/api/audit", token)
    assert status == 200 and mine["next_before_id"] is None
    assert [(e["action"], e["actor"], e["user"]) for e in mine["events"]] == [
        ("key_created", "tess", "tess"), ("key_created", "tess", "tess"), ("user_registered", "tess", "tess")]
    assert api_key not in json.dumps(mine) and mine["events"][0]["details"]["name"] == "second"
    assert get(stack, "/api/audit?user=ursa", token)[0] == 403
    assert get(stack, "/api/audit", None)[0] == 401
    status, refused = get(stack, "/api/audit?action=nope", token)
    assert status == 400 and refused["error"]["param"] == "action"
    assert get(stack, "/api/audit?limit=x", token)[1]["error"]["param"] == "limit"
    assert get(stack, "/api/audit?since=soon", token)[1]["error"]["param"] == "since"

    status, everyone = get(stack, "/api/audit?limit=500", admin)
    assert status == 200 and {"tess", "ursa"} <= {e["user"] for e in everyone["events"]}
    granted = [e for e in everyone["events"] if e["action"] == "admin_granted"]
    assert [(e["actor"], e["user"]) for e in granted] == [("operator", "ursa")]
    text = json.dumps(everyone)
    assert api_key not in text and admin_key not in text
    status, keys = get(stack, "/api/audit?user=tess&action=key_*&limit=1", admin)
    assert status == 200 and [e["action"] for e in keys["events"]] == ["key_created"]
    status, rest = get(stack, f"/api/audit?user=tess&action=key_*&before_id={keys['next_before_id']}", admin)
    assert [e["id"] for e in rest["events"]] == [mine["events"][1]["id"]] and rest["next_before_id"] is None

    port = int(stack.bootstrap.rsplit(":", 1)[1])
    cli = Cli(stack.data_dir, port, tmp_path / "tess")
    assert cli("login", "tess", "--password-stdin", stdin=PASSWORD).returncode == 0
    shown = cli("audit", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == mine
    paged = cli("audit", "--limit", "1", "--action", "key_created")
    assert paged.returncode == 0 and "key_created" in paged.stdout and "--before-id" in paged.stdout, paged.stderr
    refused = cli("audit", "--user", "ursa")
    assert refused.returncode != 0 and "administrators" in refused.stderr and "Traceback" not in refused.stderr
    boss = Cli(stack.data_dir, port, tmp_path / "ursa")
    assert boss("login", "ursa", "--password-stdin", stdin=PASSWORD).returncode == 0
    theirs = json.loads(boss("audit", "--json", "--user", "tess").stdout)
    assert [e["id"] for e in theirs["events"]] == [e["id"] for e in mine["events"]]
