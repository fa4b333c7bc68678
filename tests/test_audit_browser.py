"""The Audit page in a real browser (issue 18, part 8): a user's own events, an admin's everyone's
with the user filter, a refused filter shown by its field, "Older", at 1280 and 375 px."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from browser_support import DESKTOP, PHONE, fits_the_screen, log_in, new_page
from web_support import new_account, post_json, web_stack

pytestmark = [pytest.mark.timeout(180), pytest.mark.browser]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("audit-browser")) as running:
        yield running


def test_audit_page_for_a_user_and_an_admin(stack, browser, shots):
    token, api_key = new_account(stack, "vera")
    for i in range(50):  # 51 key events and a registration: more than a page of 50
        post_json(f"{stack.base_url}/api/auth/api-keys", {"name": f"k{i}"}, {"Authorization": f"Bearer {token}"})
    new_account(stack, "wade")
    stack.grant_admin("wade")

    page = new_page(browser, stack, viewport=DESKTOP)
    log_in(page, "vera")
    page.click("nav >> text=Audit")
    expect(page).to_have_url(re.compile(r"/audit$"))
    expect(page.locator("nav a[aria-current=page]")).to_have_text("Audit")
    expect(page.locator("#f-user")).to_have_count(0)  # a user reads only their own
    expect(page.locator("#events tbody tr")).to_have_count(50)
    expect(page.locator("#events tbody tr").first.locator("td[data-label=Action]")).to_have_text("key_created")
    assert api_key not in page.content()
    page.click("#older")
    expect(page.locator("#events tbody tr")).to_have_count(2)
    expect(page.locator("#events tbody tr").last.locator("td[data-label=Action]")).to_have_text("user_registered")
    page.goto("/audit?action=nope")
    expect(page.locator("#e-action")).to_contain_text("action must be")
    assert page.csp_violations == []  # type: ignore[attr-defined]
    page.context.close()

    for viewport, name in ((PHONE, "24-phone-audit"), (PHONE, "25-phone-admin-audit")):
        phone = new_page(browser, stack, viewport=viewport)
        admin = name.endswith("admin-audit")
        log_in(phone, "wade" if admin else "vera")
        if admin:
            phone.goto("/audit")
            phone.fill("#f-user", "wade")
            phone.click("#filters button[type=submit]")
            expect(phone).to_have_url(re.compile(r"/audit\?user=wade"))
            expect(phone.locator("#events td[data-label=Action]")).to_have_text(["admin_granted", "key_created",
                                                                                 "user_registered"])
            expect(phone.locator("#events td[data-label=By]").first).to_have_text("operator")
        else:
            phone.goto("/audit?action=key_*&since=2020-01-01")
            expect(phone.locator("#events tbody tr")).to_have_count(50)
        assert fits_the_screen(phone), name
        phone.screenshot(path=shots / f"{name}.png", full_page=True)
        phone.context.close()
