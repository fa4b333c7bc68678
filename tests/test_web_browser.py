"""The dashboard in a real browser: Debian's Chromium driven by Playwright.

Against the web process of a real stack (`inferswarm up`). A screenshot of
every page is kept in $INFERSWARM_WEB_SCREENSHOTS (default: a pytest temp
directory, printed at the end) -- look at them.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import Page, expect

from browser_support import PHONE, fits_the_screen, new_page, register_and_login
from services.web.security import CSP
from web_support import ADMIN_EMAIL, MODEL, PASSWORD, web_stack

pytestmark = [pytest.mark.timeout(120), pytest.mark.browser]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("web-browser")) as running:
        yield running


def test_register_login_create_key_once_revoke_and_logout(stack, browser, shots):
    page = new_page(browser, stack)
    landing = page.goto("/")
    assert landing.headers["content-security-policy"] == CSP
    assert landing.headers["x-frame-options"] == "DENY"
    assert landing.headers["x-content-type-options"] == "nosniff"
    assert landing.headers["referrer-policy"] == "same-origin"
    page.screenshot(path=shots / "01-landing.png", full_page=True)

    # Validation errors appear next to their fields, and typed values are kept (never passwords).
    page.goto("/register")
    page.fill("#f-username", "ann")
    page.fill("#f-email", "ann@example.com")
    page.fill("#f-password", PASSWORD)
    page.fill("#f-password2", PASSWORD + "x")
    page.click("main button[type=submit]")
    expect(page.locator("#e-password2")).to_have_text("The two passwords differ")
    expect(page.locator("#f-username")).to_have_value("ann")
    expect(page.locator("#f-password")).to_have_value("")
    page.fill("#f-username", "a")
    page.fill("#f-password", PASSWORD)
    page.fill("#f-password2", PASSWORD)
    page.click("main button[type=submit]")
    expect(page.locator("#e-username")).to_contain_text("3-32 characters")
    page.screenshot(path=shots / "02-register-errors.png", full_page=True)

    # Register, then a wrong password, then the right one.
    page.fill("#f-username", "ann")
    page.fill("#f-password", PASSWORD)
    page.fill("#f-password2", PASSWORD)
    page.click("main button[type=submit]")
    expect(page.locator(".notice")).to_contain_text("Account created")
    page.fill("#f-username_or_email", "ann")
    page.fill("#f-password", "not-the-password")
    page.click("main button[type=submit]")
    expect(page.locator(".form-error")).to_contain_text("wrong username/email or password")
    page.screenshot(path=shots / "03-login-error.png", full_page=True)
    page.fill("#f-password", PASSWORD)
    page.click("main button[type=submit]")
    expect(page).to_have_url(re.compile(r"/dashboard$"))
    session = next(c for c in page.context.cookies() if c["name"] == "inferswarm_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    expect(page.locator("h1")).to_have_text("Dashboard")
    expect(page.locator("#usage svg rect.bar")).to_have_count(60)  # two charts, 30 days each
    page.screenshot(path=shots / "04-dashboard.png", full_page=True)

    # Create a key: shown once, with a copy button and a warning.
    page.goto("/keys")
    page.click("main button[type=submit] >> text=Create key")
    expect(page.locator("#e-name")).to_have_text("Enter a name for the key")
    page.fill("#f-name", "laptop")
    page.select_option("#f-expires_in_days", "30")
    page.click("main button[type=submit] >> text=Create key")
    secret = page.locator("#new-key-value").input_value()
    assert secret.startswith("isk_")
    expect(page.locator("#new-key")).to_contain_text("only time it is shown")
    page.click("button[data-copy]")
    expect(page.locator("button[data-copy]")).to_have_text("Copied")
    page.screenshot(path=shots / "05-key-created.png", full_page=True)
    page.goto("/keys")
    assert secret not in page.content()
    row = page.locator("tr", has_text="laptop")
    expect(row.locator(".badge")).to_have_text("active")

    # use the key, and see it on the dashboard
    _use_key(stack.base_url, secret)
    _wait_for_usage(page)
    page.screenshot(path=shots / "06-dashboard-with-usage.png", full_page=True)
    page.goto("/keys")

    # Revoke: dismissing the confirmation keeps the key; accepting revokes it.
    page.once("dialog", lambda dialog: dialog.dismiss())
    row.locator("button", has_text="Revoke").click()
    page.wait_for_timeout(300)
    expect(row.locator(".badge")).to_have_text("active")
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button", has_text="Revoke").click()
    expect(page.locator(".notice")).to_contain_text("Key revoked")
    expect(page.locator("tr", has_text="laptop").locator(".badge")).to_have_text("revoked")
    page.screenshot(path=shots / "07-key-revoked.png", full_page=True)
    # revocation reaches every gateway within a second (services/auth/README.md)
    revoked_at = time.monotonic()
    while _status_of_key(stack.base_url, secret) != 401:
        assert time.monotonic() - revoked_at < 1.5, "the revoked key still works"
        time.sleep(0.1)

    page.goto("/models")
    # one healthy worker of one, 8 slots (tests/web_support.py); metrics probes every 2 s
    cells = page.locator("tr", has_text=MODEL).locator("td")
    for _ in range(20):
        if cells.nth(3).inner_text() == "8":
            break
        page.wait_for_timeout(250)
        page.reload()
    expect(cells).to_have_text([MODEL, "1", "1", "8", re.compile(r"\d"), "0"])
    page.screenshot(path=shots / "08-models.png", full_page=True)
    expect(page.locator("nav")).not_to_contain_text("Status")  # the mesh's endpoints are for admins
    assert page.goto("/status").status == 403
    stack.grant_admin("ann")
    page.goto("/status")
    expect(page.locator("nav")).to_contain_text("Status")
    expect(page.locator("table").first).to_contain_text("auth")
    page.screenshot(path=shots / "09-status.png", full_page=True)

    session = next(c for c in page.context.cookies() if c["name"] == "inferswarm_session")
    page.click("button >> text=Log out")
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.locator("nav")).to_contain_text("Log in")
    page.goto("/dashboard")
    expect(page).to_have_url(re.compile(r"/login\?next=/dashboard$"))
    # A copy of the session cookie kept from before is dead too: logout ended the session.
    page.context.add_cookies([session])
    page.goto("/dashboard")
    expect(page).to_have_url(re.compile(r"/login\?next=/dashboard$"))
    assert not page.csp_violations, page.csp_violations  # type: ignore[attr-defined]
    page.context.close()


def test_forms_without_a_valid_csrf_token_are_refused(stack, browser):
    page = new_page(browser, stack)
    register_and_login(page, "csrf-cat")
    page.goto("/keys")
    token = page.locator("input[name=csrf_token]").first.input_value()
    forged = page.request.post("/keys", form={"name": "forged", "csrf_token": "x" * 43})
    assert forged.status == 403
    missing = page.request.post("/keys", form={"name": "forged"})
    assert missing.status == 403
    cross_site = page.request.post("/keys", form={"name": "forged", "csrf_token": token},
                                   headers={"Origin": "https://evil.example"})
    assert cross_site.status == 403
    logout = page.request.post("/logout", form={})
    assert logout.status == 403
    page.goto("/keys")
    assert "forged" not in page.content()
    good = page.request.post("/keys", form={"name": "real", "csrf_token": token})
    assert good.status == 201
    # Without script, revoking asks on a page of its own first.
    page.goto("/keys")
    key_id = page.locator("tr", has_text="real").get_attribute("data-key-id")
    asked = page.request.post(f"/keys/{key_id}/revoke", form={"csrf_token": token})
    assert asked.status == 200 and "Revoke the key" in asked.text()
    page.goto("/keys")
    expect(page.locator("tr", has_text="real").locator(".badge")).to_have_text("active")
    page.context.close()


def test_pages_fit_a_phone_screen(stack, browser, shots):
    page = new_page(browser, stack, viewport=PHONE)
    page.goto("/")
    assert fits_the_screen(page)
    page.screenshot(path=shots / "10-phone-landing.png", full_page=True)
    register_and_login(page, "phone-pat")
    stack.grant_admin("phone-pat")  # to see /status too
    for path, name in (("/dashboard", "11-phone-dashboard"), ("/keys", "12-phone-keys"),
                       ("/status", "13-phone-status")):
        page.goto(path)
        assert fits_the_screen(page), path
        page.screenshot(path=shots / f"{name}.png", full_page=True)
    page.goto("/keys")
    page.fill("#f-name", "phone")
    page.click("main button[type=submit] >> text=Create key")
    expect(page.locator("#new-key-value")).to_be_visible()
    assert fits_the_screen(page)
    page.screenshot(path=shots / "14-phone-key-created.png", full_page=True)
    page.context.close()


def test_admin_page_is_for_admins_only(stack, browser, shots):
    member = new_page(browser, stack)
    register_and_login(member, "plain-pia")
    assert member.goto("/admin").status == 403
    expect(member.locator("nav")).not_to_contain_text("Admin")
    member.context.close()

    admin = new_page(browser, stack)
    register_and_login(admin, "boss", ADMIN_EMAIL)
    expect(admin.locator("nav")).not_to_contain_text("Admin")  # an address makes nobody admin
    stack.grant_admin("boss")  # the operator does, with the mesh secret
    admin.reload()
    admin.click("nav >> text=Admin")
    admin.fill("#f-user", "plain-pia")
    admin.select_option("#f-tier", "pro")
    admin.click("main button[type=submit]")
    expect(admin.locator(".notice")).to_have_text("plain-pia: pro tier, enabled")
    admin.fill("#f-user", "nobody-here")
    admin.select_option("#f-tier", "pro")
    admin.click("main button[type=submit]")
    expect(admin.locator("#e-user")).to_contain_text("no such user")
    admin.screenshot(path=shots / "15-admin.png", full_page=True)
    admin.context.close()


def _use_key(base_url: str, key: str) -> None:
    assert _status_of_key(base_url, key) == 200


def _status_of_key(base_url: str, key: str) -> int:
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", method="POST",
        data=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            status = reply.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status


def _wait_for_usage(page: Page) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        page.goto("/dashboard")
        if not page.locator("#usage p", has_text=re.compile(r"^0 requests")).count():
            return
        page.wait_for_timeout(500)
    raise AssertionError("the request never showed on the dashboard")
