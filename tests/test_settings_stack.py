"""Routing settings through the whole stack (`inferswarm up`): the REST API (`GET`/`PATCH
/api/settings`), the real `inferswarm admin settings` processes as the operator, as an admin
and as a plain user (refused), and the dashboard's Settings page in Chromium at 1280 and 375 px."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from browser_support import DESKTOP, PHONE, fits_the_screen, log_in, new_page
from stack import Cli, xdg_homes
from test_prices_stack import call
from web_support import PASSWORD, new_account, web_stack

pytestmark = pytest.mark.timeout(240)

_SETTINGS = ("default_model", "fallback_models", "cache_ttl", "aliases", "first_token_timeout")
_NONE = {"default_model": None, "fallback_models": [], "cache_ttl": None, "aliases": {}, "first_token_timeout": None}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("settings")) as running:
        yield running


def _values(view: dict) -> dict:
    return {name: view[name] for name in _SETTINGS}


@pytest.mark.stack
def test_rest_settings_for_users_and_admins(stack):
    user_token, _ = new_account(stack, "uma")
    admin_token, _ = new_account(stack, "victor")
    stack.grant_admin("victor")
    status, shown = call(stack, "GET", "/api/settings", user_token)
    assert status == 200 and _values(shown) == _NONE
    assert shown["updated_at"] == {name: None for name in _SETTINGS}
    assert call(stack, "GET", "/api/settings")[0] == 401
    status, refused = call(stack, "PATCH", "/api/settings", user_token, {"cache_ttl": 5})
    assert status == 403 and refused["error"]["code"] == "FORBIDDEN"

    status, view = call(stack, "PATCH", "/api/settings", admin_token,
                        {"default_model": "qwen2.5:0.5b", "fallback_models": ["smollm2", "test-model"]})
    assert status == 200, view
    assert _values(view) == {**_NONE, "default_model": "qwen2.5:0.5b",
                             "fallback_models": ["smollm2", "test-model"]}  # left out: kept
    status, view = call(stack, "PATCH", "/api/settings", admin_token, {"cache_ttl": 0, "default_model": None})
    assert status == 200 and view["cache_ttl"] == 0 and view["default_model"] is None
    assert view["fallback_models"] == ["smollm2", "test-model"] and view["updated_at"]["default_model"] is not None
    for body, param in (({"cache_ttl": 1.5}, "cache_ttl"), ({"cache_ttl": True}, "cache_ttl"),
                        ({"cache_ttl": 86_401}, "cache_ttl"), ({"fallback_models": ["a", "a"]}, "fallback_models"),
                        ({"fallback_models": [f"m{i}" for i in range(9)]}, "fallback_models"),
                        ({"default_model": "two words"}, "default_model"), ({"colour": "red"}, "colour"),
                        ({"aliases": {"default": ["smollm2"]}}, "aliases"), ({"aliases": ["fast"]}, "aliases"),
                        ({"first_token_timeout": 0}, "first_token_timeout"), ({}, "settings")):
        status, error = call(stack, "PATCH", "/api/settings", admin_token, body)
        assert status == 400 and error["error"]["code"] == "INVALID_PARAMS", (body, error)
        assert error["error"]["param"] == param, (body, error)
    assert _values(call(stack, "GET", "/api/settings", user_token)[1]) == _values(view)  # nothing refused was kept
    status, view = call(stack, "PATCH", "/api/settings", admin_token,
                        {"aliases": {"fast": ["smollm2", "test-model"]}, "first_token_timeout": 1.5})
    assert status == 200 and view["aliases"] == {"fast": ["smollm2", "test-model"]} and view["first_token_timeout"] == 1.5
    status, view = call(stack, "PATCH", "/api/settings", admin_token, {"aliases": {}, "first_token_timeout": None})
    assert status == 200 and view["aliases"] == {} and view["first_token_timeout"] is None


@pytest.mark.stack
def test_admin_settings_commands_as_cli_processes(stack, tmp_path):
    operator = Cli(stack.data_dir, int(stack.bootstrap.rsplit(":", 1)[1]), tmp_path / "operator")
    operator.env.update(xdg_homes(stack.data_dir))  # the stack's own user: its mesh.json and secret
    done = operator("admin", "settings", "set", "--default-model", "smollm2", "--fallback-models", "a, b",
                    "--cache-ttl", "600", "--bootstrap", stack.bootstrap)
    assert done.returncode == 0, done.stderr
    assert "settings saved" in done.stdout
    shown = operator("admin", "settings", "--bootstrap", stack.bootstrap)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["setting", "value", "last", "set"]
    assert lines[2].split()[:2] == ["default_model", "smollm2"] and lines[3].split()[:3] == ["fallback_models", "a,", "b"]
    assert lines[4].split()[:3] == ["cache_ttl", "600", "s"]
    cleared = operator("admin", "settings", "set", "--fallback-models", "none", "--cache-ttl", "none", "--json",
                       "--bootstrap", stack.bootstrap)
    assert cleared.returncode == 0, cleared.stderr
    assert _values(json.loads(cleared.stdout)) == {**_NONE, "default_model": "smollm2"}

    for args, says in ((("--cache-ttl", "soon"), "cache_ttl"), (("--cache-ttl", "-3"), "cache_ttl"),
                       (("--cache-ttl", "86401"), "cache_ttl"), (("--default-model", "a b"), "default_model"),
                       (("--fallback-models", "x,x"), "fallback_models"), ((), "--default-model")):
        refused = operator("admin", "settings", "set", *args, "--bootstrap", stack.bootstrap)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 9 and len(lines) == 1, refused.stderr
        assert "invalid params" in lines[0].lower() and says in lines[0] and "Traceback" not in refused.stderr

    # A user of another machine: no mesh secret, a session; a plain user may show, not set.
    mesh = json.loads((Path(xdg_homes(stack.data_dir)["XDG_CONFIG_HOME"]) / "inferswarm" / "mesh.json").read_text())
    nothing = tmp_path / "no-secret"
    nothing.mkdir()
    user = Cli(nothing, int(stack.bootstrap.rsplit(":", 1)[1]), tmp_path / "user")
    user.env["INFERSWARM_MESH_ID"] = mesh["mesh_id"]
    anonymous = user("admin", "settings", "set", "--cache-ttl", "1")
    assert anonymous.returncode == 3 and "log in as an administrator" in anonymous.stderr
    assert user("register", "wes", "wes@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert user("login", "wes", "--password-stdin", stdin=PASSWORD).returncode == 0
    listed = user("admin", "settings")
    assert listed.returncode == 0 and "smollm2" in listed.stdout, listed.stderr
    refused = user("admin", "settings", "set", "--cache-ttl", "1")
    assert refused.returncode == 3 and "administrators only" in refused.stderr
    stack.grant_admin("wes")
    by_admin = user("admin", "settings", "set", "--cache-ttl", "1", "--json")
    assert by_admin.returncode == 0, by_admin.stderr
    assert json.loads(by_admin.stdout)["cache_ttl"] == 1


@pytest.mark.browser
def test_settings_page_for_an_admin_and_a_user(stack, browser, shots):
    new_account(stack, "xena")
    new_account(stack, "yuri")
    stack.grant_admin("yuri")

    page = new_page(browser, stack, viewport=DESKTOP)
    log_in(page, "yuri")
    page.click("nav >> text=Settings")
    expect(page).to_have_url(re.compile(r"/admin/settings$"))
    expect(page.locator("nav a[aria-current=page]")).to_have_text("Settings")
    page.fill("#f-default_model", "qwen2.5:0.5b")
    page.fill("#f-fallback_models", "smollm2, test-model")
    page.fill("#f-cache_ttl", "3600")
    page.click("#edit-settings button[type=submit]")
    expect(page.locator(".notice")).to_contain_text("Settings saved")
    expect(page.locator("#row-default_model td[data-label=Value]")).to_have_text("qwen2.5:0.5b")
    expect(page.locator("#row-fallback_models td[data-label=Value]")).to_have_text("smollm2, test-model")
    expect(page.locator("#row-cache_ttl td[data-label=Value]")).to_have_text("3,600")
    expect(page.locator("#f-cache_ttl")).to_have_value("3600")

    page.fill("#f-cache_ttl", "an hour")  # refused here, by its field
    page.click("#edit-settings button[type=submit]")
    expect(page.locator("#e-cache_ttl")).to_contain_text("whole seconds")
    expect(page.locator("#f-cache_ttl")).to_have_value("an hour")  # what was typed stays
    page.fill("#f-cache_ttl", "3600")
    page.fill("#f-fallback_models", "smollm2, smollm2")  # refused by auth, by its field
    page.click("#edit-settings button[type=submit]")
    expect(page.locator("#e-fallback_models")).to_contain_text("twice")
    expect(page.locator("#row-fallback_models td[data-label=Value]")).to_have_text("smollm2, test-model")
    assert page.csp_violations == []  # type: ignore[attr-defined]
    page.screenshot(path=shots / "settings-desktop.png", full_page=True)
    page.context.close()

    phone = new_page(browser, stack, viewport=PHONE)
    log_in(phone, "yuri")
    phone.goto("/admin/settings")
    expect(phone.locator("#row-default_model td[data-label=Value]")).to_have_text("qwen2.5:0.5b")
    phone.fill("#f-default_model", "")  # empty: cleared
    phone.fill("#f-cache_ttl", "0")
    phone.click("#edit-settings button[type=submit]")
    expect(phone.locator("#row-default_model td[data-label=Value]")).to_have_text("none")
    expect(phone.locator("#row-cache_ttl td[data-label=Value]")).to_have_text("0 (no caching)")
    assert fits_the_screen(phone)
    phone.screenshot(path=shots / "settings-phone.png", full_page=True)
    phone.context.close()

    user = new_page(browser, stack, viewport=PHONE)
    log_in(user, "xena")
    expect(user.locator("nav >> text=Settings")).to_have_count(0)
    assert user.goto("/admin/settings").status == 403
    user.context.close()


@pytest.mark.stack
def test_aliases_and_first_token_timeout_as_cli_processes(stack, tmp_path):
    operator = Cli(stack.data_dir, int(stack.bootstrap.rsplit(":", 1)[1]), tmp_path / "operator")
    operator.env.update(xdg_homes(stack.data_dir))

    def run(*args: str):
        return operator("admin", "settings", *args, "--bootstrap", stack.bootstrap)

    done = run("set", "--alias", "fast=smollm2, qwen2.5:0.5b", "--alias", "big=llama3", "--first-token-timeout", "2.5")
    assert done.returncode == 0, done.stderr
    shown = run()
    lines = [line.split() for line in shown.stdout.splitlines()]
    at = next(i for i, line in enumerate(lines) if line[:1] == ["aliases"])
    assert lines[at][:4] == ["aliases", "big", "=", "llama3"] and lines[at + 1][:4] == ["fast", "=", "smollm2,",
                                                                                       "qwen2.5:0.5b"]
    assert lines[at + 2][:3] == ["first_token_timeout", "2.5", "s"]
    # --alias merges into the aliases as they are; --remove-alias takes one out.
    merged = run("set", "--alias", "big=llama3,smollm2", "--json")
    assert json.loads(merged.stdout)["aliases"] == {"fast": ["smollm2", "qwen2.5:0.5b"], "big": ["llama3", "smollm2"]}
    removed = run("set", "--remove-alias", "big", "--first-token-timeout", "none", "--json")
    assert removed.returncode == 0, removed.stderr
    view = json.loads(removed.stdout)
    assert view["aliases"] == {"fast": ["smollm2", "qwen2.5:0.5b"]} and view["first_token_timeout"] is None
    assert "none (the caller's deadline)" in run().stdout

    for args, says in ((("--remove-alias", "nope"), "aliases"), (("--alias", "default=smollm2"), "aliases"),
                       (("--alias", "fast="), "aliases"), (("--alias", "fast"), "aliases"),
                       (("--alias", "loop=a,loop"), "aliases"), (("--alias", "x=" + ",".join("abcdefghij")), "aliases"),
                       (("--first-token-timeout", "0"), "first_token_timeout"),
                       (("--first-token-timeout", "601"), "first_token_timeout"),
                       (("--first-token-timeout", "soon"), "first_token_timeout")):
        refused = run("set", *args)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 9 and len(lines) == 1, (args, refused.stderr)
        assert "invalid params" in lines[0].lower() and says in lines[0] and "Traceback" not in refused.stderr
    assert json.loads(run("--json").stdout)["aliases"] == {"fast": ["smollm2", "qwen2.5:0.5b"]}  # nothing kept
    assert run("set", "--remove-alias", "fast").returncode == 0


@pytest.mark.browser
def test_aliases_and_first_token_timeout_on_the_settings_page(stack, browser, shots):
    new_account(stack, "zoe")
    stack.grant_admin("zoe")
    page = new_page(browser, stack, viewport=DESKTOP)
    log_in(page, "zoe")
    page.goto("/admin/settings")
    page.fill("#f-aliases", "fast = smollm2, test-model\n\nbig = qwen2.5:0.5b")
    page.fill("#f-first_token_timeout", "2.5")
    page.click("#edit-settings button[type=submit]")
    expect(page.locator(".notice")).to_contain_text("Settings saved")
    expect(page.locator("#row-aliases td[data-label=Value] .alias")).to_have_text(
        ["big = qwen2.5:0.5b", "fast = smollm2, test-model"])
    expect(page.locator("#row-first_token_timeout td[data-label=Value]")).to_have_text("2.5 s")
    expect(page.locator("#f-aliases")).to_have_value("big = qwen2.5:0.5b\nfast = smollm2, test-model")
    expect(page.locator("#f-first_token_timeout")).to_have_value("2.5")

    for aliases, timeout, field, says in (
            ("fast smollm2", "2.5", "aliases", "one alias a line"),  # refused here
            ("fast = a\nfast = b", "2.5", "aliases", "twice"),
            ("default = smollm2", "2.5", "aliases", "default"),  # refused by auth
            ("loop = smollm2, loop", "2.5", "aliases", "own chain"),
            ("fast = smollm2", "soon", "first_token_timeout", "Enter seconds"),
            ("fast = smollm2", "0", "first_token_timeout", "first_token_timeout")):
        page.fill("#f-aliases", aliases)
        page.fill("#f-first_token_timeout", timeout)
        page.click("#edit-settings button[type=submit]")
        expect(page.locator(f"#e-{field}")).to_contain_text(says)
        expect(page.locator("#f-aliases")).to_have_value(aliases)  # what was typed stays
        expect(page.locator("#f-first_token_timeout")).to_have_value(timeout)
        expect(page.locator("#row-first_token_timeout td[data-label=Value]")).to_have_text("2.5 s")  # unchanged
    assert page.csp_violations == []  # type: ignore[attr-defined]
    page.screenshot(path=shots / "settings-aliases-desktop.png", full_page=True)
    page.context.close()

    phone = new_page(browser, stack, viewport=PHONE)
    log_in(phone, "zoe")
    phone.goto("/admin/settings")
    phone.fill("#f-aliases", "")  # empty: no alias
    phone.fill("#f-first_token_timeout", "")
    phone.click("#edit-settings button[type=submit]")
    expect(phone.locator("#row-aliases td[data-label=Value]")).to_have_text("none")
    expect(phone.locator("#row-first_token_timeout td[data-label=Value]")).to_have_text("no limit")
    assert fits_the_screen(phone)
    phone.screenshot(path=shots / "settings-aliases-phone.png", full_page=True)
    phone.context.close()
