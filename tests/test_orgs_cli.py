"""`inferswarm org ...` and `keys create --org` as real processes, over the mesh and over HTTP.

A real stack with the web service (tests/web_support.py). Two people, each
with a config home of their own: the owner works over the mesh, the member
over the web service's API (`--base-url`: services/web/org_api.py), so both
paths are run. Output, one-line errors and exit codes as the other commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from waiting import wait_until_sync
from web_support import MODEL, PASSWORD, post_json, web_stack

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("orgs-cli")) as running:
        yield running


class Person:
    """One person with the CLI: their config home; `http` adds `--base-url`."""

    def __init__(self, stack, home: Path, name: str, *, http: bool) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
        self.env = {**clean, "XDG_CONFIG_HOME": str(home / "config"), "XDG_CACHE_HOME": str(home / "cache"),
                    "INFERSWARM_PASSWORD": PASSWORD}
        if http:
            self.env["INFERSWARM_BASE_URL"] = stack.base_url
        else:
            self.env.update(INFERSWARM_BOOTSTRAP=stack.bootstrap, INFERSWARM_DATA_DIR=str(stack.data_dir))
        post_json(f"{stack.base_url}/api/auth/register",
                  {"username": name, "email": f"{name}@example.com", "password": PASSWORD})
        assert self("login", name).returncode == 0

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "inferswarm.cli", *args], capture_output=True, text=True,
                              timeout=90, env=self.env)

    def ok(self, *args: str) -> str:
        done = self(*args)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    def data(self, *args: str) -> object:
        return json.loads(self.ok(*args, "--json"))


def _refused(done: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    line = done.stderr.strip()
    assert line.startswith("inferswarm: ") and "\n" not in line, line
    for word in words:
        assert word in line, line


def test_org_commands_over_the_mesh_and_http(stack, tmp_path):
    owner = Person(stack, tmp_path / "owner", "ottilie", http=False)
    member = Person(stack, tmp_path / "member", "mika", http=True)

    assert "created organisation" in owner.ok("org", "create", "Lab Rats")
    _refused(owner("org", "create", "lab rats"), 8, "exists already")
    org = owner.data("org", "list")[0]
    assert (org["name"], org["role"]) == ("Lab Rats", "owner")

    assert "invited mika to Lab Rats as admin" in owner.ok("org", "invite", "Lab Rats", "mika", "--role", "admin")
    _refused(owner("org", "invite", str(org["id"]), "nobody-here"), 5, "no such user")
    _refused(member("org", "show", "Lab Rats"), 5, "no such organisation")  # not a member yet: not found
    invites = member.data("org", "invites")
    assert [(i["org"], i["role"], i["invited_by"]) for i in invites] == [("Lab Rats", "admin", "ottilie")]
    assert "joined Lab Rats as admin" in member.ok("org", "accept", str(invites[0]["id"]))
    _refused(member("org", "decline", str(invites[0]["id"])), 8, "accepted already")

    shown = member.ok("org", "show", "lab rats")
    assert "ottilie" in shown and "mika" in shown and "requests/month" in shown
    assert "none" in member.ok("org", "limits", "Lab Rats")
    set_out = member.ok("org", "limits", "Lab Rats", "--requests-per-month", "500", "--budget-day", "2.50")
    assert "every gateway applies it" in set_out and "500" in set_out and "2.50" in set_out
    _refused(member("org", "limits", "Lab Rats", "--budget-day", "0.1234567"), 9, "spend_per_day")
    assert owner.data("org", "limits", str(org["id"]))["requests_per_month"] == 500

    _refused(member("org", "role", "Lab Rats", "ottilie", "member"), 3, "owners")
    _refused(owner("org", "role", "Lab Rats", "ottilie", "member"), 8, "last owner")
    # The owner's next changes go over HTTP too (PATCH and DELETE of /api/orgs/{org}/members/{user}).
    assert "mika is now member" in owner.ok("org", "role", "Lab Rats", "mika", "member", "--base-url", stack.base_url)

    key = member.data("keys", "create", "lab-key", "--org", "Lab Rats")
    assert key["org_id"] == org["id"]
    _refused(member("keys", "create", "elsewhere", "--org", "no such org"), 5, "no such organisation")
    post_json(f"{stack.base_url}/api/inference", {"model": MODEL, "prompt": "hi", "max_tokens": 3},
              {"X-API-Key": key["api_key"]})

    def report_rows() -> list:
        return owner.data("org", "report", "Lab Rats", "--by", "member")["rows"]

    wait_until_sync(lambda: report_rows(), 15, interval=0.3, message="the usage record never arrived")
    table = owner.ok("org", "report", "Lab Rats", "--by", "member")
    assert "mika" in table and "1 requests" in table
    csv = member.ok("org", "report", "Lab Rats", "--by", "member", "--csv", "--group-by", "month")
    assert csv.splitlines()[0].startswith("period,user_id,username,requests") and ",mika," in csv
    assert "your own usage only" in member.ok("org", "report", "Lab Rats")

    _rest_checks(stack, org["id"])
    removed = owner.ok("org", "remove", "Lab Rats", "mika", "--base-url", stack.base_url)
    assert "removed mika; 1 of their keys of it revoked" in removed
    assert [k["status"] for k in member.data("keys", "list") if k["id"] == key["id"]] == ["revoked"]
    assert member.data("org", "list") == []
    assert member.ok("org", "list").strip() == "no organisations"


def _get(stack, path: str, token: str) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(f"{stack.base_url}{path}", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _rest_checks(stack, org_id: int) -> None:
    """What the REST API answers a stranger (404, as for no organisation at all) and a member (CSV)."""
    post_json(f"{stack.base_url}/api/auth/register",
              {"username": "stranger", "email": "stranger@example.com", "password": PASSWORD})
    stranger = post_json(f"{stack.base_url}/api/auth/login",
                         {"username_or_email": "stranger", "password": PASSWORD})["token"]
    for path in (f"/api/orgs/{org_id}", "/api/orgs/Lab%20Rats", "/api/orgs/nothing", f"/api/orgs/{org_id}/report"):
        status, _, body = _get(stack, path, stranger)
        assert status == 404 and json.loads(body)["error"]["code"] == "NOT_FOUND", (path, body)
    member = post_json(f"{stack.base_url}/api/auth/login", {"username_or_email": "mika", "password": PASSWORD})["token"]
    status, headers, body = _get(stack, "/api/orgs/Lab%20Rats/report.csv?by=member&group=month", member)
    assert status == 200 and headers["Content-Type"].startswith("text/csv"), headers
    assert "attachment" in headers["Content-Disposition"] and b",mika," in body
