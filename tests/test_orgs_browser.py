"""The Organisations pages in a real browser, at 1280 and 375 px: an owner creates an organisation,
invites; the invitee accepts, makes a key of it and uses it; the owner sees the usage by member,
sets limits (refused by field, then saved), changes the member's role and removes them -- every
table readable and every action reachable without scrolling sideways on a phone."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from browser_support import DESKTOP, OVERFLOWING, PHONE, fits_the_screen, log_in, new_page
from waiting import wait_until_sync
from web_support import MODEL, new_account, post_json, web_stack

pytestmark = [pytest.mark.timeout(180), pytest.mark.browser]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("orgs-browser")) as running:
        yield running


def test_organisation_pages_on_desktop_and_phone(stack, browser, shots):
    new_account(stack, "orsola")
    new_account(stack, "marek")

    owner = new_page(browser, stack, viewport=DESKTOP)
    log_in(owner, "orsola")
    owner.click("nav >> text=Organisations")
    expect(owner).to_have_url(re.compile(r"/orgs$"))
    owner.click("#create button[type=submit]")  # empty: refused by its field
    expect(owner.locator("#e-name")).to_contain_text("Enter a name")
    owner.fill("#f-name", "Night Shift")
    owner.click("#create button[type=submit]")
    expect(owner).to_have_url(re.compile(r"/orgs/\d+\?created=1$"))
    org_url = owner.url.split("?")[0]
    expect(owner.locator(".notice")).to_contain_text("you own it")
    owner.fill("#f-username", "nobody-at-all")
    owner.click("#invite button[type=submit]")
    expect(owner.locator("#e-username")).to_contain_text("no such user")
    owner.fill("#f-username", "marek")
    owner.select_option("#f-role", "admin")
    owner.click("#invite button[type=submit]")
    expect(owner.locator(".notice")).to_contain_text("marek is invited as admin")
    expect(owner.locator("#pending tbody tr")).to_have_count(1)

    phone = new_page(browser, stack, viewport=PHONE)
    log_in(phone, "marek")
    phone.goto("/orgs")
    expect(phone.locator("#invitations td[data-label=Organisation]")).to_have_text("Night Shift")
    assert fits_the_screen(phone)
    phone.screenshot(path=shots / "orgs-invited-phone.png", full_page=True)
    phone.click("#invitations button >> text=Accept")
    expect(phone).to_have_url(re.compile(r"/orgs/\d+\?joined=1$"))
    expect(phone.locator("#members tbody tr")).to_have_count(2)
    assert fits_the_screen(phone)
    phone.goto("/keys")
    phone.fill("#f-name", "night-key")
    phone.select_option("#f-org", label="Night Shift")
    phone.click("main form[action='/keys'] button[type=submit]")
    expect(phone.locator("#new-key")).to_be_visible()
    api_key = phone.locator("#new-key-value").input_value()
    expect(phone.locator("tr", has_text="night-key").locator("td[data-label=Name] .org")).to_have_text("of Night Shift")
    assert fits_the_screen(phone)
    post_json(f"{stack.base_url}/api/inference", {"model": MODEL, "prompt": "hi", "max_tokens": 3},
              {"X-API-Key": api_key})

    def usage_shown() -> bool:
        owner.goto(org_url)
        return owner.locator("#by-member tbody tr").count() == 1

    wait_until_sync(usage_shown, 15, interval=0.3, message="the usage record never reached the report")
    expect(owner.locator("#by-member td[data-label=Member]")).to_have_text("marek")
    expect(owner.locator("#usage figure.chart")).not_to_have_count(0)

    owner.fill("#f-requests_per_month", "lots")  # refused here
    owner.click("#limits button[type=submit]")
    expect(owner.locator("#e-requests_per_month")).to_contain_text("whole number")
    owner.fill("#f-requests_per_month", "600")
    owner.fill("#f-spend_per_day", "0.1234567")  # refused by auth
    owner.click("#limits button[type=submit]")
    expect(owner.locator("#e-spend_per_day")).to_contain_text("decimals")
    owner.fill("#f-spend_per_day", "3.5")
    owner.click("#limits button[type=submit]")
    expect(owner.locator(".notice")).to_contain_text("Limits saved")
    expect(owner.locator("#f-spend_per_day")).to_have_value("3.50")
    expect(owner.locator("#f-requests_per_month")).to_have_value("600")

    row = owner.locator("#members tr", has_text="marek")
    row.locator("select").select_option("member")
    row.locator("button >> text=Save").click()
    expect(owner.locator(".notice")).to_contain_text("Role changed to member")
    assert owner.csp_violations == []  # type: ignore[attr-defined]
    assert owner.evaluate(OVERFLOWING) == []  # no cell, no table wider than its box
    owner.screenshot(path=shots / "org-desktop.png", full_page=True)

    # The member now: a plain member sees the limits as a table, and only their own usage.
    phone.goto(org_url)
    expect(phone.locator("#limits tr[data-limit=requests_per_month] td[data-label=Value]")).to_have_text("600")
    expect(phone.locator("#invite")).to_have_count(0)
    expect(phone.locator("#usage h2")).to_contain_text("(yours)")
    assert fits_the_screen(phone) and phone.evaluate(OVERFLOWING) == []
    phone.screenshot(path=shots / "org-member-phone.png", full_page=True)

    # The owner on a phone: every action reachable, then the member removed (asked first).
    owner_phone = new_page(browser, stack, viewport=PHONE)
    log_in(owner_phone, "orsola")
    owner_phone.goto(org_url)
    assert fits_the_screen(owner_phone) and owner_phone.evaluate(OVERFLOWING) == []
    for action in owner_phone.locator("main table button, main table select").all():
        action.click(trial=True)  # visible, enabled, and not covered by anything else
    owner_phone.screenshot(path=shots / "org-owner-phone.png", full_page=True)
    owner_phone.on("dialog", lambda dialog: dialog.accept())
    owner_phone.locator("#members tr", has_text="marek").locator("button >> text=Remove").click()
    expect(owner_phone.locator(".notice")).to_contain_text("Member removed")
    expect(owner_phone.locator("#members tbody tr")).to_have_count(1)
    assert fits_the_screen(owner_phone)
    for page in (owner, phone, owner_phone):
        page.context.close()
