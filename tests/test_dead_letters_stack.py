"""Dead letters through the whole stack (`inferswarm up`): records shipped to auth as a gateway
ships them (with `asked` and `tried`), then the real `inferswarm admin dead-letters` processes as
the operator, as an admin and as a plain user (refused), and the dashboard's Dead letters page in
Chromium at 1280 and 375 px."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from playwright.sync_api import expect

from inferswarm.session import ClientSession
from services.auth.client import AuthClient
from shared.identity import MeshCredential, MeshId
from browser_support import DESKTOP, OVERFLOWING, PHONE, fits_the_screen, log_in, new_page
from stack import Cli, xdg_homes
from web_support import PASSWORD, new_account, web_stack

pytestmark = pytest.mark.timeout(240)

TRIED = [{"model": "llama3", "code": "UNAVAILABLE"}, {"model": "smollm2", "code": "TIMEOUT"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("dead-letters")) as running:
        yield running


def _ship(stack, name: str, records: list[dict]) -> dict:
    """Record `records` of `name`'s account as a gateway would (the operator may call what gateways do)."""
    async def ship() -> dict:
        credential = MeshCredential.from_text(stack.mesh_secret)
        async with ClientSession([stack.bootstrap], MeshId(credential.mesh_id), timeout=20,
                                 keys=credential.client) as session:
            auth = AuthClient(session("auth"))
            token = (await auth.login(username_or_email=name, password=PASSWORD))["token"]
            user_id = (await auth.me(token=token))["id"]
            batch = [{"user_id": user_id, "model": "qwen2.5:0.5b", "prompt_tokens": 3, "status": "error",
                      "prompt_hash": hashlib.sha256(r["request_id"].encode()).hexdigest(), **r} for r in records]
            return dict(await auth.record_usage(batch=batch))
    # A thread of its own: Playwright's sync API keeps an event loop running in this one.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, ship()).result()


@pytest.mark.stack
def test_admin_dead_letters_as_cli_processes(stack, tmp_path):
    new_account(stack, "ines")
    shipped = _ship(stack, "ines", [
        {"request_id": "cli-1", "asked": "fast", "tried": TRIED},
        {"request_id": "cli-2", "model": "other", "tried": TRIED[:1], "status": "timeout"},
        {"request_id": "cli-ok", "asked": "fast", "tried": TRIED, "status": "ok"},
    ])
    assert shipped["inserted"] == 3
    operator = Cli(stack.data_dir, int(stack.bootstrap.rsplit(":", 1)[1]), tmp_path / "operator")
    operator.env.update(xdg_homes(stack.data_dir))  # the stack's own user: its mesh.json and secret
    shown = operator("admin", "dead-letters", "--bootstrap", stack.bootstrap)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:4] == ["id", "at", "(UTC)", "user"] and len(lines) == 4, shown.stdout
    assert "cli-2" in lines[2] and "timeout" in lines[2] and "llama3 (UNAVAILABLE)" in lines[2]
    assert "fast" in lines[3] and "llama3 (UNAVAILABLE) -> smollm2 (TIMEOUT)" in lines[3] and "cli-1" in lines[3]
    first = operator("admin", "dead-letters", "--limit", "1", "--json", "--bootstrap", stack.bootstrap)
    assert first.returncode == 0, first.stderr
    page = json.loads(first.stdout)
    assert [d["request_id"] for d in page["dead_letters"]] == ["cli-2"] and page["next"] is not None
    older = operator("admin", "dead-letters", "--before", str(page["next"]), "--json", "--bootstrap", stack.bootstrap)
    assert [d["request_id"] for d in json.loads(older.stdout)["dead_letters"]] == ["cli-1"]
    more = operator("admin", "dead-letters", "--limit", "1", "--bootstrap", stack.bootstrap)
    assert more.stdout.strip().endswith(f"more: --before {page['next']}")
    by_model = operator("admin", "dead-letters", "--model", "fast", "--json", "--bootstrap", stack.bootstrap)
    assert [d["request_id"] for d in json.loads(by_model.stdout)["dead_letters"]] == ["cli-1"]
    none = operator("admin", "dead-letters", "--model", "nobody", "--bootstrap", stack.bootstrap)
    assert none.returncode == 0 and none.stdout.strip() == "no dead letters"
    refused = operator("admin", "dead-letters", "--limit", "0", "--bootstrap", stack.bootstrap)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 9 and len(lines) == 1 and "limit" in lines[0], refused.stderr

    # A user of another machine: no mesh secret, a session; a plain user is refused, an admin reads them.
    mesh = json.loads((Path(xdg_homes(stack.data_dir)["XDG_CONFIG_HOME"]) / "inferswarm" / "mesh.json").read_text())
    nothing = tmp_path / "no-secret"
    nothing.mkdir()
    user = Cli(nothing, int(stack.bootstrap.rsplit(":", 1)[1]), tmp_path / "user")
    user.env["INFERSWARM_MESH_ID"] = mesh["mesh_id"]
    anonymous = user("admin", "dead-letters")
    assert anonymous.returncode == 3 and "log in as an administrator" in anonymous.stderr
    assert user("register", "jon", "jon@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert user("login", "jon", "--password-stdin", stdin=PASSWORD).returncode == 0
    refused = user("admin", "dead-letters")
    assert refused.returncode == 3 and "administrators only" in refused.stderr
    stack.grant_admin("jon")
    by_admin = user("admin", "dead-letters", "--json")
    assert by_admin.returncode == 0, by_admin.stderr
    assert {"cli-1", "cli-2"} <= {d["request_id"] for d in json.loads(by_admin.stdout)["dead_letters"]}


@pytest.mark.browser
def test_dead_letters_page_for_an_admin_and_a_user(stack, browser, shots):
    new_account(stack, "kay")
    new_account(stack, "lou")
    stack.grant_admin("lou")
    _ship(stack, "kay", [{"request_id": "page-1", "asked": "fast", "tried": TRIED},
                         {"request_id": "page-2-" + "x" * 100, "model": "a-rather-long-model-name:latest",
                          "tried": [{"model": f"fallback-model-{i}", "code": "UNAVAILABLE"} for i in range(10)]}])

    page = new_page(browser, stack, viewport=DESKTOP)
    log_in(page, "lou")
    page.goto("/admin")
    page.click("#admin-pages >> text=Dead letters")  # linked from the Admin page, and in the menu
    expect(page).to_have_url(re.compile(r"/admin/dead-letters$"))
    expect(page.locator("nav a[aria-current=page]")).to_have_text("Dead letters")
    row = page.locator("#dead-letters tbody tr", has_text="page-1")
    expect(row.locator("td[data-label=Asked]")).to_have_text("fast")
    expect(row.locator("td[data-label='Last model']")).to_have_text("qwen2.5:0.5b")
    expect(row.locator("td[data-label=Status]")).to_have_text("error")
    expect(row.locator("td[data-label='Tried before']")).to_have_text("llama3 (UNAVAILABLE) → smollm2 (TIMEOUT)")
    rows = page.locator("#dead-letters tbody tr")
    expect(rows.first).to_contain_text("page-2-")  # newest first
    assert page.csp_violations == []  # type: ignore[attr-defined]
    page.screenshot(path=shots / "dead-letters-desktop.png", full_page=True)
    page.context.close()

    phone = new_page(browser, stack, viewport=PHONE)
    log_in(phone, "lou")
    phone.click("nav >> text=Dead letters")
    expect(phone.locator("#dead-letters tbody tr", has_text="page-1")).to_be_visible()
    assert fits_the_screen(phone)
    assert phone.evaluate(OVERFLOWING) == []
    phone.screenshot(path=shots / "dead-letters-phone.png", full_page=True)
    phone.context.close()

    user = new_page(browser, stack, viewport=PHONE)
    log_in(user, "kay")
    expect(user.locator("nav >> text=Dead letters")).to_have_count(0)
    assert user.goto("/admin/dead-letters").status == 403
    user.context.close()
