"""The dashboard at phone width (375 px) and on a desktop (1280 px), in Chromium.

On every page a logged-in administrator can open, the page does not scroll
sideways, every link, button and field lies inside the screen and can be
clicked, and no table cell's text runs out of its cell -- with a long key
name and a long model name to wrap. At 375 px a key is revoked by its
Revoke button; at 375 px and 1280 px a key is rotated, the new one shown once. Screenshots go to $INFERSWARM_WEB_SCREENSHOTS (default: a
pytest temporary directory, printed at the end) -- look at them.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import Page, expect

from browser_support import DESKTOP, OVERFLOWING, PHONE, fits_the_screen, new_page, register_and_login
from web_support import MODEL, web_stack

pytestmark = [pytest.mark.timeout(180), pytest.mark.browser]

#: served by the same upstream as MODEL, under a name too long for a phone's line
LONG_MODEL = "acme-research/long-model-name-for-small-screens-70b-instruct:q4k"  # 64 characters: the most
LONG_KEY_NAME = "build-server-in-the-basement-rack-3-unit-12-of-the-old-office"
PAGES = ("/dashboard", "/keys", "/orgs", "/models", "/account", "/status", "/admin")
VIEWPORTS = {"phone": PHONE, "desktop": DESKTOP}

# What lies outside the screen (or has no size) among the things one can click or type in.
OUT_OF_VIEW = """() => [...document.querySelectorAll(
    "header a, header button, main a, main button, main input:not([type=hidden]), main select")]
  .map(e => [e.outerHTML.slice(0, 100), e.getBoundingClientRect()])
  .filter(([, r]) => r.width === 0 || r.left < 0 || r.right > window.innerWidth)
  .map(([what, r]) => `${what}: ${r.left}..${r.right}`)"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    long_model = {LONG_MODEL: {"backend": "openai", "url": "openai", "model": MODEL, "slots": 2, "queue": 4}}
    with web_stack(tmp_path_factory.mktemp("web-mobile"), models=long_model) as running:
        yield running


@pytest.fixture(scope="module")
def admin(stack, browser) -> dict:
    """The browser state of an administrator with two keys, one used on the long model, one revoked."""
    page = new_page(browser, stack, viewport=DESKTOP)
    register_and_login(page, "mobile-mo")
    stack.grant_admin("mobile-mo")
    used = _create_key(page, LONG_KEY_NAME)
    _create_key(page, "retired")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("tr", has_text="retired").get_by_role("button", name="Revoke").click()
    expect(page.locator(".notice")).to_contain_text("Key revoked")
    _poll(lambda: _status_of_key(stack.base_url, used, LONG_MODEL) == 200, "the long model never answered")
    _poll(lambda: page.goto("/dashboard") and page.locator("#recent td", has_text=LONG_MODEL).count(),
          "the request never showed on the dashboard")
    _poll(lambda: page.goto("/models") and page.locator("td", has_text=LONG_MODEL).count(),
          "the long model is not listed")
    state = page.context.storage_state()
    page.context.close()
    return state


@pytest.mark.parametrize("viewport", VIEWPORTS.values(), ids=VIEWPORTS.keys())
def test_every_page_fits_and_everything_on_it_is_reachable(stack, browser, shots, admin, viewport):
    page = new_page(browser, stack, viewport=viewport, storage_state=admin)
    width = viewport["width"]
    for path in PAGES:
        reply = page.goto(path)
        page.screenshot(path=shots / f"{width}{path.replace('/', '-')}.png", full_page=True)
        assert reply.status == 200, (path, page.locator("main").inner_text())
        assert fits_the_screen(page), path
        assert page.evaluate(OUT_OF_VIEW) == [], path
        assert page.evaluate(OVERFLOWING) == [], path
        for action in page.locator("main table a, main table button").all():
            action.click(trial=True)  # visible, enabled, and not covered by anything else
        assert page.evaluate("window.scrollX") == 0, path
    page.goto("/keys")
    expect(page.locator("tr", has_text=LONG_KEY_NAME)).to_be_visible()
    page.goto("/models")
    expect(page.locator("td", has_text=LONG_MODEL)).to_be_visible()
    assert not page.csp_violations, page.csp_violations  # type: ignore[attr-defined]
    page.context.close()


def test_a_key_is_revoked_from_a_phone(stack, browser, shots, admin):
    page = new_page(browser, stack, viewport=PHONE, storage_state=admin)
    secret = _create_key(page, "revoke-me-from-the-phone")
    assert fits_the_screen(page)
    page.screenshot(path=shots / "375-key-created.png", full_page=True)
    assert _status_of_key(stack.base_url, secret, MODEL) == 200
    page.goto("/keys")
    row = page.locator("tr", has_text="revoke-me-from-the-phone")
    revoke = row.get_by_role("button", name="Revoke")
    box = revoke.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    page.once("dialog", lambda dialog: dialog.accept())
    revoke.click()
    expect(page.locator(".notice")).to_contain_text("Key revoked")
    expect(page.locator("tr", has_text="revoke-me-from-the-phone").locator(".badge")).to_have_text("revoked")
    assert fits_the_screen(page) and page.evaluate("window.scrollX") == 0
    page.screenshot(path=shots / "375-key-revoked.png", full_page=True)
    _poll(lambda: _status_of_key(stack.base_url, secret, MODEL) == 401, "the revoked key still works", 1.5)
    page.context.close()


def test_a_key_is_revoked_from_a_phone_without_script(stack, browser, shots, admin):
    # Without script there is no confirm() dialog: the server asks on a page of its own.
    page = new_page(browser, stack, viewport=PHONE, storage_state=admin, java_script_enabled=False)
    _create_key(page, "no-script-phone")
    page.goto("/keys")
    page.locator("tr", has_text="no-script-phone").get_by_role("button", name="Revoke").click()
    expect(page.locator("h1")).to_have_text("Revoke “no-script-phone”?")
    assert fits_the_screen(page) and page.evaluate(OUT_OF_VIEW) == []
    page.screenshot(path=shots / "375-revoke-confirm.png", full_page=True)
    page.get_by_role("button", name="Revoke the key").click()
    expect(page.locator("tr", has_text="no-script-phone").locator(".badge")).to_have_text("revoked")
    page.context.close()


@pytest.mark.parametrize("viewport", VIEWPORTS.values(), ids=VIEWPORTS.keys())
def test_a_key_is_rotated_and_the_new_one_shown_once(stack, browser, shots, admin, viewport):
    page = new_page(browser, stack, viewport=viewport, storage_state=admin)
    width, name = viewport["width"], f"rotate-me-{viewport['width']}"
    old = _create_key(page, name)
    page.goto("/keys")
    # The form is CSRF-checked like every other; without `confirm=yes` it only asks.
    key_id = page.locator("tr", has_text=name).get_attribute("data-key-id")
    token = page.locator("input[name=csrf_token]").first.input_value()
    forged = page.request.post(f"/keys/{key_id}/rotate",
                               form={"confirm": "yes", "overlap_seconds": "0", "csrf_token": "x" * 43})
    assert forged.status == 403
    asked = page.request.post(f"/keys/{key_id}/rotate", form={"csrf_token": token})
    assert asked.status == 200 and "Rotate the key" in asked.text() and "isk_" in asked.text()
    assert old not in asked.text()
    odd = page.request.post(f"/keys/{key_id}/rotate", form={"confirm": "yes", "overlap_seconds": "5",
                                                            "csrf_token": token})
    assert odd.status == 400 and "Choose one of the listed times" in odd.text()
    page.goto("/keys")
    expect(page.locator("tr", has_text=name)).to_have_count(1)  # nothing rotated yet
    rotate = page.locator("tr", has_text=name).get_by_role("button", name="Rotate")
    box = rotate.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, box
    rotate.click()
    # The server asks how long the old key should keep working (24 hours unless chosen).
    expect(page.locator("h1")).to_have_text(f"Rotate “{name}”?")
    expect(page.locator("#f-overlap_seconds")).to_have_value("86400")
    assert fits_the_screen(page) and page.evaluate(OUT_OF_VIEW) == []
    page.screenshot(path=shots / f"{width}-rotate-confirm.png", full_page=True)
    page.select_option("#f-overlap_seconds", "3600")
    page.get_by_role("button", name="Rotate the key").click()

    secret = page.locator("#new-key-value").input_value()
    assert secret.startswith("isk_") and secret != old
    expect(page.locator("#new-key")).to_contain_text("only time it is shown")
    expect(page.locator(".notice")).to_contain_text("keeps working until")
    assert fits_the_screen(page) and page.evaluate(OUT_OF_VIEW) == [] and page.evaluate(OVERFLOWING) == []
    page.screenshot(path=shots / f"{width}-key-rotated.png", full_page=True)
    page.goto("/keys")  # shown once: never again
    assert secret not in page.content() and old not in page.content()
    rows = page.locator("tr", has_text=name)
    expect(rows).to_have_count(2)
    expect(rows.filter(has_text="replaces")).to_have_count(1)
    retiring = rows.filter(has_text="replaced by")
    expect(retiring.locator(".badge")).to_have_text("active")
    expect(retiring.get_by_role("button", name="Rotate")).to_have_count(0)  # rotated already
    assert fits_the_screen(page) and page.evaluate(OVERFLOWING) == []
    assert _status_of_key(stack.base_url, secret, MODEL) == 200
    assert _status_of_key(stack.base_url, old, MODEL) == 200  # the overlap: an hour
    assert not page.csp_violations, page.csp_violations  # type: ignore[attr-defined]
    page.context.close()


def _create_key(page: Page, name: str) -> str:
    page.goto("/keys")
    page.fill("#f-name", name)
    page.click("main button[type=submit] >> text=Create key")
    secret = page.locator("#new-key-value").input_value()
    assert secret.startswith("isk_")
    return secret


def _poll(check, failure: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, failure
        time.sleep(0.1)


def _status_of_key(base_url: str, key: str, model: str) -> int:
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", method="POST",
        data=json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
