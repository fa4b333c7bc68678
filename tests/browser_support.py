"""Driving the dashboard in Debian's Chromium through Playwright: launching it,
a page per browser context, an account logged in, and whether a page fits."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from web_support import PASSWORD

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "PHONE", "DESKTOP", "OVERFLOWING", "chromium", "log_in", "new_page",
           "register_and_login", "fits_the_screen"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PHONE = {"width": 375, "height": 740}
DESKTOP = {"width": 1280, "height": 800}


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium for the block (a missing browser fails: it is a test dependency)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Browser, stack, viewport=None, **options) -> Page:
    """A page in a context of its own (`options`: more of `Browser.new_context`'s, such as
    `storage_state`); `page.csp_violations` collects what the CSP refused."""
    context = browser.new_context(base_url=stack.base_url, viewport=viewport or {"width": 1200, "height": 900},
                                  **options)
    context.set_default_timeout(10_000)
    page = context.new_page()
    page.csp_violations = []  # type: ignore[attr-defined]
    page.on("console", lambda msg: "Content Security Policy" in msg.text and page.csp_violations.append(msg.text))
    return page


def register_and_login(page: Page, name: str, email: str | None = None) -> None:
    page.goto("/register")
    page.fill("#f-username", name)
    page.fill("#f-email", email or f"{name}@example.com")
    page.fill("#f-password", PASSWORD)
    page.fill("#f-password2", PASSWORD)
    page.click("button[type=submit] >> text=Create account")
    expect(page).to_have_url(re.compile(r"/login\?registered=1$"))
    _submit_login(page, name)


def log_in(page: Page, name: str) -> None:
    """Log an existing account in from the login page (the password of web_support's accounts)."""
    page.goto("/login")
    _submit_login(page, name)


def _submit_login(page: Page, name: str) -> None:
    page.fill("#f-username_or_email", name)
    page.fill("#f-password", PASSWORD)
    page.click("main button[type=submit]")
    expect(page).to_have_url(re.compile(r"/dashboard$"))


def fits_the_screen(page: Page) -> bool:
    """No horizontal scrolling of the page itself."""
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


#: Table cells whose text runs out of them, and containers that scroll sideways (`page.evaluate`: a list).
OVERFLOWING = """() => [...document.querySelectorAll("main td, main .scroll")]
  .filter(e => e.getClientRects().length && e.scrollWidth > e.clientWidth)
  .map(e => `${e.outerHTML.slice(0, 100)}: ${e.scrollWidth} > ${e.clientWidth}`)"""
