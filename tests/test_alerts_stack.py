"""Spending alerts and webhooks through the whole stack (`inferswarm up`): the REST API
(`/api/webhook`, `/api/alerts`), the real CLI (`inferswarm webhook ...`, `inferswarm alerts`), and
the dashboard (its alerts, the Webhook page's form, secret and delivery log) in Chromium at 1280
and 375 px. A request of 8 completion tokens costs exactly $0.01 (the operator's price); a $0.02
budget is reached in two. The receiver is a real local HTTP server (private addresses allowed)."""

from __future__ import annotations

import json
import re
import urllib.request
from decimal import Decimal

import pytest
from playwright.sync_api import expect

from browser_support import DESKTOP, PHONE, fits_the_screen, new_page, register_and_login
from shared.receipts import verify
from shared.webhooks import SIGNATURE_HEADER, verify_signature
from stack import Cli
from test_key_limits_stack import _call
from test_web_mobile import OUT_OF_VIEW
from waiting import wait_until_sync
from web_support import MODEL, PASSWORD, new_account, post_json, web_stack
from webhook_support import receiver_thread

pytestmark = pytest.mark.timeout(240)

SECRET = re.compile(r"^whsec_")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("alerts"), INFERSWARM_WEBHOOK_ALLOW_PRIVATE="true",
                   INFERSWARM_WEBHOOK_POLL_INTERVAL="0.2") as running:
        running.operator("admin", "price", "set", MODEL, "--input", "0", "--output", "1250")
        _, probe = new_account(running, "al-probe")
        wait_until_sync(lambda: _spend(running, probe) == Decimal("0.01"), 20,
                        message="the gateway never charged the price")
        yield running


@pytest.fixture(scope="module")
def receiver():
    with receiver_thread() as running:
        yield running


def _spend(stack, api_key: str) -> Decimal:
    """One request of 8 completion tokens; what its receipt says it cost."""
    answer = post_json(f"{stack.base_url}/api/inference", {"model": MODEL, "prompt": "hi", "max_tokens": 8},
                       {"X-API-Key": api_key})
    keys = json.loads(urllib.request.urlopen(f"{stack.base_url}/api/receipts/keys", timeout=30).read())
    receipt = verify(answer["receipt"], keys)
    return Decimal(receipt.cost or 0)


def _spend_the_budget(stack, token: str, api_key: str) -> list[dict]:
    """A $0.02 daily budget spent in two requests; the alerts, once the three have fired."""
    assert _call(stack, "PUT", "/api/budget", token, {"spend_per_day": "0.02"})[0] == 200
    assert _spend(stack, api_key) == _spend(stack, api_key) == Decimal("0.01")
    return wait_until_sync(lambda: len(alerts := _call(stack, "GET", "/api/alerts", token)[1]["alerts"]) == 3
                           and alerts, 20, message="the three alerts never fired")


@pytest.mark.stack
def test_rest_webhook_and_alerts(stack, receiver):
    token, api_key = new_account(stack, "al-rest")
    status, made = _call(stack, "PUT", "/api/webhook", token, {"url": receiver.url})
    assert status == 201 and made["secret"].startswith("whsec_") and made["thresholds"] == [50, 80, 100]
    status, changed = _call(stack, "PUT", "/api/webhook", token, {"url": receiver.url, "thresholds": [50, 100, 80]})
    assert status == 200 and changed["secret"] is None and changed["thresholds"] == [50, 80, 100]
    status, shown = _call(stack, "GET", "/api/webhook", token)
    assert status == 200 and "secret" not in shown and shown["url"] == receiver.url
    for body, param in [({"url": receiver.url, "thresholds": [0]}, "thresholds"), ({"url": "ftp://x"}, "url"),
                        ({"url": receiver.url, "thresholds": "50"}, "thresholds"), ({"colour": 1}, "colour"),
                        ({}, "url")]:
        status, error = _call(stack, "PUT", "/api/webhook", token, body)
        assert status == 400 and error["error"]["param"] == param, (body, error)

    alerts = _spend_the_budget(stack, token, api_key)
    assert [(a["threshold"], a["counter"], a["scope"]) for a in alerts] == [
        (100, "spend_per_day", "user"), (80, "spend_per_day", "user"), (50, "spend_per_day", "user")]
    ours = {a["event_id"] for a in alerts}
    hits = wait_until_sync(lambda: len(h := [x for x in receiver.hits if x.event["id"] in ours]) == 3 and h, 20)
    assert all(verify_signature(made["secret"], h.headers[SIGNATURE_HEADER], h.body) for h in hits)
    wait_until_sync(lambda: len(_call(stack, "GET", "/api/webhook/deliveries", token)[1]["deliveries"]) == 3, 20,
                    message="the attempts were never logged")  # logged once the receiver has answered
    status, log = _call(stack, "GET", "/api/webhook/deliveries?limit=2", token)
    assert status == 200 and len(log["deliveries"]) == 2 and log["next_before_id"] is not None
    status, rest = _call(stack, "GET", f"/api/webhook/deliveries?before_id={log['next_before_id']}", token)
    assert [d["status"] for d in log["deliveries"] + rest["deliveries"]] == ["delivered"] * 3

    other, _ = new_account(stack, "al-other")
    for path in ("/api/webhook?user=al-rest", "/api/alerts?user=al-rest", "/api/webhook/deliveries?user=al-rest"):
        status, error = _call(stack, "GET", path, other)
        assert status == 403 and error["error"]["code"] == "FORBIDDEN", path
    assert _call(stack, "GET", "/api/alerts?limit=x", token)[1]["error"]["param"] == "limit"
    status, rotated = _call(stack, "POST", "/api/webhook/rotate", token)
    assert status == 200 and rotated["secret"].startswith("whsec_") and rotated["secret"] != made["secret"]
    assert _call(stack, "DELETE", "/api/webhook", token) == (200, {"removed": True})
    status, error = _call(stack, "GET", "/api/webhook", token)
    assert status == 404 and error["error"]["code"] == "NOT_FOUND"


@pytest.mark.stack
def test_the_cli_webhook_and_alerts(stack, receiver, tmp_path):
    port = int(stack.bootstrap.rpartition(":")[2])
    cli = Cli(stack.data_dir, port, tmp_path / "config")
    assert cli("register", "al-cli", "al-cli@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert cli("login", "al-cli", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert cli("alerts").stdout.strip() == "no alerts"
    made = cli("webhook", "set", receiver.url, "--thresholds", "50,80,100")
    assert made.returncode == 0, made.stderr
    assert "signing secret: whsec_" in made.stdout and "shown once" in made.stdout
    secret = made.stdout.split("signing secret: ")[1].split()[0]
    shown = cli("webhook", "show")
    assert shown.returncode == 0 and receiver.url in shown.stdout and "whsec_" not in shown.stdout
    assert "50%, 80%, 100%" in shown.stdout

    token = post_json(f"{stack.base_url}/api/auth/login", {"username_or_email": "al-cli", "password": PASSWORD})
    key = json.loads(cli("keys", "create", "spend", "--json").stdout)["api_key"]
    alerts = _spend_the_budget(stack, token["token"], key)
    listed = cli("alerts")
    assert listed.returncode == 0 and listed.stdout.count("spend_per_day") == 3 and "100%" in listed.stdout
    assert [a["threshold"] for a in json.loads(cli("alerts", "--json").stdout)["alerts"]] == [100, 80, 50]
    ours = {a["event_id"] for a in alerts}
    hits = wait_until_sync(lambda: len(h := [x for x in receiver.hits if x.event["id"] in ours]) == 3 and h, 20)
    assert all(verify_signature(secret, h.headers[SIGNATURE_HEADER], h.body) for h in hits)
    log = wait_until_sync(lambda: (out := cli("webhook", "deliveries").stdout).count("delivered") == 3 and out, 20)
    assert log.count("200") >= 3

    rotated = cli("webhook", "rotate-secret")
    assert rotated.returncode == 0 and "signing secret: whsec_" in rotated.stdout and secret not in rotated.stdout
    assert "webhook removed" in cli("webhook", "remove").stdout
    assert "no webhook to remove" in cli("webhook", "remove").stdout
    for args, words in [(("webhook", "show"), "no webhook"), (("webhook", "set", "ftp://x"), "url"),
                        (("webhook", "set", receiver.url, "--thresholds", "fifty"), "whole percentages"),
                        (("webhook", "set", receiver.url, "--thresholds", "0,50"), "thresholds")]:
        refused = cli(*args)
        assert refused.returncode != 0 and words in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr


@pytest.mark.stack
def test_the_cli_webhook_and_alerts_over_http(stack, receiver, tmp_path):
    """The same commands with --base-url: through the web service's /api/webhook and /api/alerts."""
    port = int(stack.bootstrap.rpartition(":")[2])
    cli = Cli(stack.data_dir, port, tmp_path / "config")
    http = ("--base-url", stack.base_url)
    assert cli("register", "al-http", "al-http@example.com", "--password-stdin", *http,
               stdin=PASSWORD).returncode == 0
    assert cli("login", "al-http", "--password-stdin", *http, stdin=PASSWORD).returncode == 0
    made = cli("webhook", "set", receiver.url, "--thresholds", "50,100", *http)
    assert made.returncode == 0 and "signing secret: whsec_" in made.stdout, made.stderr
    shown = cli("webhook", "show", *http)
    assert shown.returncode == 0 and "50%, 100%" in shown.stdout and "whsec_" not in shown.stdout
    assert cli("alerts", *http).stdout.strip() == "no alerts"
    assert cli("webhook", "deliveries", *http).stdout.strip() == "no deliveries"
    refused = cli("webhook", "set", "ftp://x", *http)
    assert refused.returncode != 0 and "url" in refused.stderr and "Traceback" not in refused.stderr
    assert "signing secret: whsec_" in cli("webhook", "rotate-secret", *http).stdout
    assert "webhook removed" in cli("webhook", "remove", *http).stdout


@pytest.mark.browser
@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_dashboard_alerts_and_the_webhook_page(stack, receiver, browser, shots, viewport):
    name = f"al-web-{viewport['width']}"
    page = new_page(browser, stack, viewport=viewport)
    register_and_login(page, name)
    expect(page.locator("#alerts")).to_contain_text("No alerts")
    page.goto("/account")
    page.click("#webhook-link")
    expect(page).to_have_url(f"{stack.base_url}/account/webhook")
    expect(page.locator("#f-thresholds")).to_have_value("50, 80, 100")
    page.fill("#f-url", "ftp://example.com/")
    page.click("main button[type=submit] >> text=Save webhook")
    expect(page.locator("#e-url")).to_contain_text("https")  # auth's refusal, by its field
    page.fill("#f-url", receiver.url)
    page.fill("#f-thresholds", "50, lots")
    page.click("main button[type=submit] >> text=Save webhook")
    expect(page.locator("#e-thresholds")).to_contain_text("percentages")
    page.fill("#f-thresholds", "50, 80, 100")
    page.click("main button[type=submit] >> text=Save webhook")
    secret = page.locator("#webhook-secret-value")
    expect(secret).to_have_value(SECRET)
    _fits(page, shots, f"webhook-secret-{viewport['width']}")
    page.goto("/account/webhook")  # shown once: not on the next visit
    expect(page.locator("#webhook-secret")).to_have_count(0)
    expect(page.locator("#deliveries")).to_contain_text("Nothing sent yet")

    token = post_json(f"{stack.base_url}/api/auth/login", {"username_or_email": name, "password": PASSWORD})["token"]
    key = post_json(f"{stack.base_url}/api/auth/api-keys", {"name": "web"}, {"Authorization": f"Bearer {token}"})
    _spend_the_budget(stack, token, key["api_key"])
    page.goto("/dashboard")
    rows = page.locator("#alerts tr.alert-row")
    expect(rows).to_have_count(3)
    expect(rows.first).to_contain_text("100 %")
    expect(rows.first).to_contain_text("0.02 of 0.02 USD")
    _fits(page, shots, f"dashboard-alerts-{viewport['width']}")
    wait_until_sync(lambda: [d["status"] for d in _call(stack, "GET", "/api/webhook/deliveries", token)[1][
        "deliveries"]] == ["delivered"] * 3, 20, message="the three deliveries never arrived")
    page.goto("/account/webhook")
    expect(page.locator("#deliveries tbody tr")).to_have_count(3)
    expect(page.locator("#deliveries")).to_contain_text("delivered")
    _fits(page, shots, f"webhook-log-{viewport['width']}")
    page.click("#rotate-secret")
    expect(page.locator("#webhook-secret-value")).to_have_value(SECRET)
    page.click("#remove-webhook")
    expect(page.locator(".notice")).to_contain_text("removed")
    expect(page.locator("#f-url")).to_have_value("")
    forged = page.request.post("/account/webhook", form={"url": receiver.url, "csrf_token": "x" * 43})
    assert forged.status == 403
    assert not page.csp_violations, page.csp_violations  # type: ignore[attr-defined]
    page.context.close()


def _fits(page, shots, name: str) -> None:
    page.screenshot(path=shots / f"{name}.png", full_page=True)
    assert fits_the_screen(page) and page.evaluate("window.scrollX") == 0
    assert page.evaluate(OUT_OF_VIEW) == []
