"""Per-key limits and budgets through the whole stack (`inferswarm up`): REST (`limits` on
`POST`/`PATCH /api/auth/api-keys`, `GET`/`PUT /api/budget`), the real CLI over the mesh and over
HTTP (`keys create|edit --requests-per-hour/--budget-month`, `keys list`, `budget`, `budget set`),
and the dashboard's forms in Chromium at 1280 and 375 px."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import expect

from browser_support import DESKTOP, PHONE, fits_the_screen, new_page, register_and_login
from stack import Cli
from test_web_mobile import OUT_OF_VIEW
from web_support import PASSWORD, new_account, web_stack

pytestmark = pytest.mark.timeout(240)

NO_LIMITS = dict.fromkeys(("requests_per_hour", "requests_per_month", "tokens_per_month", "spend_per_day",
                           "spend_per_month"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("key-limits"), INFERSWARM_CURRENCY="EUR") as running:
        yield running


def _call(stack, verb: str, path: str, token: str, body: dict | str | None = None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(f"{stack.base_url}{path}", method=verb, data=data,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.stack
def test_rest_key_limits_and_budgets(stack):
    token, _ = new_account(stack, "kl-rest")
    # A JSON number for money is taken as written, never through a float.
    status, key = _call(stack, "POST", "/api/auth/api-keys", token,
                        '{"name": "ci", "limits": {"requests_per_hour": 5, "spend_per_month": 1.5}}')
    assert status == 201, key
    assert key["limits"] == {**NO_LIMITS, "requests_per_hour": 5, "spend_per_month": "1.50"}
    status, patched = _call(stack, "PATCH", f"/api/auth/api-keys/{key['id']}", token,
                            {"limits": {"spend_per_month": None, "tokens_per_month": 1000}})
    assert status == 200 and patched["limits"] == {**NO_LIMITS, "requests_per_hour": 5, "tokens_per_month": 1000}
    status, listed = _call(stack, "GET", "/api/auth/api-keys", token)
    assert [k["limits"] for k in listed["keys"] if k["id"] == key["id"]] == [patched["limits"]]
    for body, param in [({"limits": {"requests_per_day": 1}}, "requests_per_day"),
                        ('{"limits": {"requests_per_hour": 1.5}}', "requests_per_hour"),
                        ({"limits": {"spend_per_day": "0.1234567"}}, "spend_per_day"),
                        ({"limits": 5}, "limits"), ({"limits": None}, "limits")]:
        status, error = _call(stack, "PATCH", f"/api/auth/api-keys/{key['id']}", token, body)
        assert status == 400 and error["error"]["param"] == param, (body, error)
    status, error = _call(stack, "POST", "/api/auth/api-keys", token, {"name": "x", "limits": {"spend_per_day": "-1"}})
    assert status == 400 and error["error"]["param"] == "spend_per_day"

    status, account = _call(stack, "GET", "/api/budget", token)
    assert status == 200 and account["currency"] == "EUR"
    assert account["budget"] == {"spend_per_day": None, "spend_per_month": None}
    assert account["limits"]["spend_per_month"] is None and account["limits"]["requests_per_hour"] == 100
    status, account = _call(stack, "PUT", "/api/budget", token, '{"spend_per_month": 12.5}')
    assert status == 200 and account["budget"] == {"spend_per_day": None, "spend_per_month": "12.50"}
    assert account["limits"]["spend_per_month"] == "12.50"
    status, account = _call(stack, "PUT", "/api/budget", token, {"spend_per_day": "1", "spend_per_month": None})
    assert status == 200 and account["budget"] == {"spend_per_day": "1.00", "spend_per_month": None}
    assert _call(stack, "GET", "/api/budget", token)[1]["budget"] == account["budget"]
    for body, code, param in [({"spend_per_day": 1e400}, 400, "spend_per_day"), ({"colour": 1}, 400, "colour"),
                              ({}, 400, "spend_per_day"), ({"spend_per_day": True}, 400, "spend_per_day")]:
        status, error = _call(stack, "PUT", "/api/budget", token, body)
        assert status == code and error["error"]["param"] == param, (body, error)
    # Someone else's budget: refused to a user, done by an admin.
    other, _ = new_account(stack, "kl-other")
    status, error = _call(stack, "PUT", "/api/budget", other, {"user": "kl-rest", "spend_per_day": "0"})
    assert status == 403 and error["error"]["code"] == "FORBIDDEN"
    stack.grant_admin("kl-other")
    status, account = _call(stack, "PUT", "/api/budget", other, {"user": "kl-rest", "spend_per_day": "0"})
    assert status == 200 and account["username"] == "kl-rest" and account["budget"]["spend_per_day"] == "0.00"
    assert _call(stack, "GET", "/api/budget", token)[1]["limits"]["spend_per_day"] == "0.00"
    assert _call(stack, "GET", "/api/budget", other)[1]["budget"]["spend_per_day"] is None


@pytest.mark.stack
def test_the_cli_sets_key_limits_and_budgets(stack, tmp_path):
    port = int(stack.bootstrap.rpartition(":")[2])
    cli = Cli(stack.data_dir, port, tmp_path / "config")
    assert cli("register", "kl-cli", "kl-cli@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert cli("login", "kl-cli", "--password-stdin", stdin=PASSWORD).returncode == 0
    created = cli("keys", "create", "ci", "--requests-per-hour", "5", "--budget-month", "1.00", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["limits"] == {**NO_LIMITS, "requests_per_hour": 5, "spend_per_month": "1.00"}
    listed = cli("keys", "list")
    assert listed.returncode == 0 and "5 req/h, 1.00/mo" in listed.stdout and "limits" in listed.stdout

    edited = cli("keys", "edit", str(key["id"]), "--budget-month", "none", "--tokens-per-month", "900")
    assert edited.returncode == 0, edited.stderr
    assert "limits 5 req/h, 900 tok/mo" in edited.stdout
    shown = json.loads(cli("keys", "list", "--json").stdout)[0]["limits"]
    assert shown == {**NO_LIMITS, "requests_per_hour": 5, "tokens_per_month": 900}
    # Over the web service's HTTP API, the same.
    again = cli("keys", "edit", str(key["id"]), "--requests-per-hour", "none", "--budget-day", "0.5", "--json",
                "--base-url", stack.base_url)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["limits"] == {**NO_LIMITS, "tokens_per_month": 900, "spend_per_day": "0.50"}

    budget = cli("budget", "set", "--day", "2", "--month", "20.25")
    assert budget.returncode == 0, budget.stderr
    assert "day 2.00, month 20.25" in budget.stdout and "EUR" in budget.stdout
    cleared = cli("budget", "set", "--day", "none", "--json", "--base-url", stack.base_url)
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(cleared.stdout)["budget"] == {"spend_per_day": None, "spend_per_month": "20.25"}
    for extra in ((), ("--base-url", stack.base_url)):
        shown = cli("budget", "--json", *extra)
        assert shown.returncode == 0, shown.stderr
        account = json.loads(shown.stdout)
        assert account["budget"]["spend_per_month"] == "20.25" and account["limits"]["spend_per_month"] == "20.25"
    assert "month 20.25" in cli("budget").stdout

    # Bad input: one line, a non-zero exit, never a traceback.
    for args, words in [(("keys", "edit", str(key["id"]), "--budget-month", "1.1234567"), "spend_per_month"),
                        (("keys", "create", "x", "--requests-per-hour", "many"), "expected a whole number"),
                        (("keys", "create", "x", "--budget-day", "none"), "expected an amount"),
                        (("budget", "set", "--month", "-3"), "expected an amount"),
                        (("budget", "set"), "nothing to change"),
                        (("budget", "set", "--user", "kl-rest", "--day", "1"), "administrators")]:
        refused = cli(*args)
        assert refused.returncode != 0 and words in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr


def _reachable(page, shots=None, name: str = "") -> None:
    if shots is not None:
        page.screenshot(path=shots / f"limits-{page.viewport_size['width']}-{name}.png", full_page=True)
    assert fits_the_screen(page) and page.evaluate("window.scrollX") == 0
    assert page.evaluate(OUT_OF_VIEW) == []


@pytest.mark.browser
@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_limit_forms_at_every_width(stack, browser, shots, viewport):
    name = f"kl-web-{viewport['width']}"
    page = new_page(browser, stack, viewport=viewport)
    register_and_login(page, name)
    page.goto("/keys")
    _reachable(page)
    page.fill("#f-name", "limited")
    page.fill("#f-requests_per_hour", "five")
    page.click("main button[type=submit] >> text=Create key")
    expect(page.locator("#e-requests_per_hour")).to_contain_text("whole number")
    page.fill("#f-requests_per_hour", "5")
    page.fill("#f-spend_per_month", "1.1234567")
    page.click("main button[type=submit] >> text=Create key")
    expect(page.locator("#e-spend_per_month")).to_contain_text("decimals")  # auth's refusal, by its field
    page.fill("#f-spend_per_month", "1.5")
    page.click("main button[type=submit] >> text=Create key")
    expect(page.locator("#new-key-value")).to_be_visible()
    page.goto("/keys")
    row = page.locator("tr", has_text="limited")
    expect(row.locator("td[data-label=Limits]")).to_have_text("5 req/h, 1.50/mo")
    _reachable(page, shots, "keys")
    row.get_by_role("button", name="Edit").click()
    expect(page.locator("#f-requests_per_hour")).to_have_value("5")
    expect(page.locator("#f-spend_per_month")).to_have_value("1.50")
    _reachable(page, shots, "edit")
    page.fill("#f-spend_per_month", "")
    page.fill("#f-tokens_per_month", "777")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".notice")).to_contain_text("saved")
    expect(page.locator("tr", has_text="limited").locator("td[data-label=Limits]")).to_have_text(
        "5 req/h, 777 tok/mo")

    page.goto("/account")
    _reachable(page)
    expect(page.locator("#limits-in-force")).to_contain_text("100 req/h")
    page.fill("#f-spend_per_day", "2.5")
    page.get_by_role("button", name="Save budget").click()
    expect(page.locator(".notice")).to_contain_text("Budget saved")
    expect(page.locator("#f-spend_per_day")).to_have_value("2.50")
    expect(page.locator("#limits-in-force")).to_contain_text("2.50 EUR/day")
    page.fill("#f-spend_per_month", "lots")
    page.get_by_role("button", name="Save budget").click()
    expect(page.locator("#e-spend_per_month")).to_contain_text("amount")
    _reachable(page, shots, "account")
    # The form is CSRF-checked: a forged save changes nothing.
    forged = page.request.post("/account/budget", form={"spend_per_day": "9", "csrf_token": "x" * 43})
    assert forged.status == 403
    page.goto("/account")
    expect(page.locator("#f-spend_per_day")).to_have_value("2.50")
    assert not page.csp_violations, page.csp_violations  # type: ignore[attr-defined]
    page.context.close()
