"""A key's model allow-list and editing a key, through the whole stack (`inferswarm up`):
REST (`POST`/`PATCH /api/auth/api-keys`), the real CLI (`keys create --models`, `keys edit`,
`keys list`), `/v1` through the official openai package, and the dashboard's Edit at 375 px."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

import openai
import pytest
from playwright.sync_api import expect

from browser_support import PHONE, chromium, fits_the_screen, new_page, register_and_login
from stack import Cli
from waiting import wait_until_sync
from web_support import MODEL, PASSWORD, new_account, web_stack

pytestmark = pytest.mark.timeout(240)

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("key-models")) as running:
        yield running


def _call(stack, verb: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{stack.base_url}{path}", method=verb, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _sdk(stack, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key, max_retries=0)


@pytest.mark.stack
def test_rest_create_and_patch_and_the_v1_refusal(stack):
    token, _ = new_account(stack, "km-rest")
    status, key = _call(stack, "POST", "/api/auth/api-keys", token, {"name": "narrow", "allowed_models": ["other"]})
    assert status == 201 and key["allowed_models"] == ["other"], key
    # /v1 through the openai package: a 403 PermissionDeniedError naming the model.
    with pytest.raises(openai.PermissionDeniedError) as refused:
        _sdk(stack, key["api_key"]).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert refused.value.status_code == 403 and refused.value.code == "model_not_allowed"
    assert refused.value.body["param"] == "model" and refused.value.body["type"] == "permission_error"
    # PATCH: widen the list; the same key is admitted within about a second.
    status, patched = _call(stack, "PATCH", f"/api/auth/api-keys/{key['id']}", token,
                            {"allowed_models": ["other", MODEL]})
    assert status == 200 and patched["allowed_models"] == ["other", MODEL] and patched["name"] == "narrow"

    def admitted() -> bool:
        try:
            return bool(_sdk(stack, key["api_key"]).chat.completions.create(model=MODEL, messages=HELLO,
                                                                              max_tokens=2).choices)
        except openai.PermissionDeniedError:
            return False

    wait_until_sync(admitted, 3.0, interval=0.05, message="the widened list never reached the gateway")
    # null clears: every model; an expiry is set, then cleared.
    when = (datetime.now(timezone.utc) + timedelta(days=3)).isoformat()
    status, patched = _call(stack, "PATCH", f"/api/auth/api-keys/{key['id']}", token,
                            {"allowed_models": None, "expires_at": when})
    assert status == 200 and patched["allowed_models"] is None and patched["expires_at"]
    status, patched = _call(stack, "PATCH", f"/api/auth/api-keys/{key['id']}", token, {"expires_at": None})
    assert status == 200 and patched["expires_at"] is None
    # Refusals name the field.
    for body, field in [({"allowed_models": ["bad name"]}, "allowed_models"), ({"allowed_models": "a"}, "allowed_models"),
                        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"), ({"colour": "red"}, "colour"),
                        ({"name": ""}, "name")]:
        status, error = _call(stack, "PATCH", f"/api/auth/api-keys/{key['id']}", token, body)
        assert status == 400 and error["error"]["param"] == field, (body, error)
    status, error = _call(stack, "PATCH", "/api/auth/api-keys/424242", token, {"name": "x"})
    assert status == 404
    _call(stack, "DELETE", f"/api/auth/api-keys/{key['id']}", token)
    status, error = _call(stack, "PATCH", f"/api/auth/api-keys/{key['id']}", token, {"name": "x"})
    assert status == 409 and error["error"]["code"] == "CONFLICT"


@pytest.mark.stack
def test_the_cli_creates_lists_and_edits_a_limited_key(stack, tmp_path):
    port = int(stack.bootstrap.rpartition(":")[2])
    cli = Cli(stack.data_dir, port, tmp_path / "config")
    assert cli("register", "km-cli", "km-cli@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert cli("login", "km-cli", "--password-stdin", stdin=PASSWORD).returncode == 0
    created = cli("keys", "create", "ci", "--models", f"{MODEL},other", "--expires", "30d", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["allowed_models"] == [MODEL, "other"]
    left = datetime.fromisoformat(key["expires_at"]).timestamp() - time.time()
    assert 30 * 86_400 - 120 < left <= 30 * 86_400
    listed = cli("keys", "list")
    assert listed.returncode == 0 and f"{MODEL},other" in listed.stdout and "models" in listed.stdout

    edited = cli("keys", "edit", str(key["id"]), "--models", "other", "--no-expiry", "--name", "ci-2")
    assert edited.returncode == 0, edited.stderr
    assert "models other" in edited.stdout and "expires never" in edited.stdout
    shown = json.loads(cli("keys", "list", "--json").stdout)[0]
    assert (shown["name"], shown["allowed_models"], shown["expires_at"]) == ("ci-2", ["other"], None)
    # Over the web service's HTTP API, the same (PATCH).
    next_year = (datetime.now(timezone.utc) + timedelta(days=365)).date().isoformat()
    again = cli("keys", "edit", str(key["id"]), "--all-models", "--expires", f"{next_year}T00:00:00Z", "--json",
                "--base-url", stack.base_url)
    assert again.returncode == 0, again.stderr
    answer = json.loads(again.stdout)
    assert answer["allowed_models"] is None and answer["expires_at"].startswith(next_year)

    for args, words in [(("--models", "bad name"), "allowed_models"), ((), "nothing to change"),
                        (("--models", "a", "--all-models"), "not allowed with")]:
        refused = cli("keys", "edit", str(key["id"]), *args)
        assert refused.returncode != 0 and words in refused.stderr, (args, refused.stderr)
    assert cli("keys", "edit", "424242", "--name", "x").returncode != 0


@pytest.mark.browser
def test_a_key_is_edited_from_a_phone(stack):
    with chromium() as browser:
        page = new_page(browser, stack, viewport=PHONE)
        register_and_login(page, "km-phone")
        page.goto("/keys")
        page.fill("#f-name", "phone-key")
        page.fill("#f-models", "other")
        page.click("main button[type=submit] >> text=Create key")
        secret = page.locator("#new-key-value").input_value()
        page.goto("/keys")
        row = page.locator("tr", has_text="phone-key")
        expect(row.locator("td[data-label=Models]")).to_have_text("other")
        # The form is CSRF-checked: a forged save changes nothing.
        key_id = row.get_attribute("data-key-id")
        forged = page.request.post(f"/keys/{key_id}/edit", form={"save": "yes", "name": "x", "csrf_token": "x" * 43})
        assert forged.status == 403
        edit = row.get_by_role("button", name="Edit")
        box = edit.bounding_box()
        assert box and 0 <= box["x"] and box["x"] + box["width"] <= PHONE["width"], box
        edit.click()
        expect(page.locator("h1")).to_have_text("Edit “phone-key”")
        expect(page.locator("#f-models")).to_have_value("other")
        assert fits_the_screen(page)
        page.fill("#f-models", "bad name!")
        page.get_by_role("button", name="Save").click()
        expect(page.locator("#e-models")).to_contain_text("model name")
        page.fill("#f-models", f"other, {MODEL}")
        page.fill("#f-expires", (datetime.now(timezone.utc) + timedelta(days=10)).date().isoformat())
        page.get_by_role("button", name="Save").click()
        expect(page.locator(".notice")).to_contain_text("saved")
        row = page.locator("tr", has_text="phone-key")
        expect(row.locator("td[data-label=Models]")).to_have_text(f"other, {MODEL}")
        assert fits_the_screen(page) and page.evaluate("window.scrollX") == 0
        wait_until_sync(lambda: _sdk_status(stack, secret) == 200, 3.0, interval=0.05,
                        message="the edited key was not admitted for the model")
        assert not page.csp_violations, page.csp_violations  # type: ignore[attr-defined]
        page.context.close()


def _sdk_status(stack, api_key: str) -> int:
    try:
        _sdk(stack, api_key).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code
