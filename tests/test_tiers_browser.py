"""The Tiers page in a real browser: an admin edits a tier (saved, shown, refused by field),
a user gets no link and a 403, at 1280 and 375 px."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from browser_support import DESKTOP, PHONE, fits_the_screen, log_in, new_page
from web_support import new_account, web_stack

pytestmark = [pytest.mark.timeout(180), pytest.mark.browser]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("tiers-browser")) as running:
        yield running


def test_tiers_page_for_an_admin_and_a_user(stack, browser, shots):
    new_account(stack, "xena")
    new_account(stack, "yuri")
    stack.grant_admin("yuri")

    page = new_page(browser, stack, viewport=DESKTOP)
    log_in(page, "yuri")
    page.click("nav >> text=Tiers")
    expect(page).to_have_url(re.compile(r"/admin/tiers$"))
    expect(page.locator("nav a[aria-current=page]")).to_have_text("Tiers")
    expect(page.locator("#tiers tbody tr")).to_have_count(4)
    free = page.locator("#row-free")
    expect(free.locator("td[data-label='Requests/month']")).to_have_text("3,000")
    expect(free.locator("td[data-label=Values]")).to_have_text("defaults")

    page.fill("#f-free-requests_per_month", "2000")
    page.fill("#f-free-spend_per_month", "25.5")
    page.fill("#f-free-tokens_per_month", "")
    page.select_option("#f-free-priority", "1")
    page.click("#tier-free button[type=submit]")
    expect(page.locator(".notice")).to_contain_text("free: saved")
    expect(free.locator("td[data-label='Requests/month']")).to_have_text("2,000")
    expect(free.locator("td[data-label='Budget/month']")).to_have_text("25.50")
    expect(free.locator("td[data-label='Tokens/month']")).to_have_text("no limit")
    expect(free.locator("td[data-label=Priority]")).to_have_text("1")
    expect(free.locator("td[data-label=Values]")).to_have_text("edited")
    expect(page.locator("#f-free-spend_per_month")).to_have_value("25.50")

    page.fill("#f-pro-requests_per_hour", "many")  # refused here, by its field
    page.click("#tier-pro button[type=submit]")
    expect(page.locator("#e-pro-requests_per_hour")).to_contain_text("whole number")
    expect(page.locator("#f-pro-requests_per_hour")).to_have_value("many")  # what was typed stays
    page.fill("#f-pro-requests_per_hour", "1000")
    page.fill("#f-pro-spend_per_day", "0.1234567")  # refused by auth, by its field
    page.click("#tier-pro button[type=submit]")
    expect(page.locator("#e-pro-spend_per_day")).to_contain_text("decimals")
    expect(page.locator("#row-pro td[data-label='Budget/day']")).to_have_text("no limit")
    assert page.csp_violations == []  # type: ignore[attr-defined]
    page.screenshot(path=shots / "tiers-desktop.png", full_page=True)
    page.context.close()

    phone = new_page(browser, stack, viewport=PHONE)
    log_in(phone, "yuri")
    phone.goto("/admin/tiers")
    expect(phone.locator("#row-free td[data-label=Values]")).to_have_text("edited")
    phone.fill("#f-unlimited-requests_per_hour", "")
    phone.click("#tier-unlimited button[type=submit]")
    expect(phone.locator("#row-unlimited td[data-label='Requests/hour']")).to_have_text("no limit")
    assert fits_the_screen(phone)
    phone.screenshot(path=shots / "tiers-phone.png", full_page=True)
    phone.context.close()

    user = new_page(browser, stack, viewport=PHONE)
    log_in(user, "xena")
    expect(user.locator("nav >> text=Tiers")).to_have_count(0)
    assert user.goto("/admin/tiers").status == 403
    user.context.close()
