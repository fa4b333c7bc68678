"""The Costs page in a real browser (issue 18, part 7): charts drawn without script, the tables by
model and key, the CSV download, the admin's top spenders, at 1280 and 375 px."""

from __future__ import annotations

import csv
import io
import json
import re
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from playwright.sync_api import expect

from browser_support import DESKTOP, PHONE, fits_the_screen, log_in, new_page
from services.auth.prices import cost_of
from waiting import wait_until_sync
from web_support import MODEL, new_account, post_json, web_stack

pytestmark = [pytest.mark.timeout(180), pytest.mark.browser]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("reports-browser")) as running:
        yield running


def _report(stack, token: str) -> dict:
    request = urllib.request.Request(f"{stack.base_url}/api/reports", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def test_costs_page_charts_tables_csv_and_top_spenders(stack, browser, shots):
    token, api_key = new_account(stack, "cora")
    admin, _ = new_account(stack, "dora")
    stack.grant_admin("dora")
    post_json(f"{stack.base_url}/api/prices", {"model": MODEL, "input": "2", "output": "3"},
              {"Authorization": f"Bearer {admin}"})
    usage = post_json(f"{stack.base_url}/api/inference", {"model": MODEL, "prompt": "hi", "max_tokens": 5},
                      {"X-API-Key": api_key})["usage"]
    cost = cost_of(usage["prompt_tokens"], usage["completion_tokens"], False, input=Decimal(2), output=Decimal(3))
    wait_until_sync(lambda: _report(stack, token)["totals"]["cost"], 30, interval=0.2,
                    message="the request was never priced")

    page = new_page(browser, stack, viewport=DESKTOP, accept_downloads=True)
    log_in(page, "cora")
    page.click("nav >> text=Costs")
    expect(page).to_have_url(re.compile(r"/costs$"))
    expect(page.locator("nav a[aria-current=page]")).to_have_text("Costs")
    expect(page.locator("#totals figure")).to_have_count(2)  # cost in USD, requests
    expect(page.locator("#totals figure").first.locator("rect.bar")).to_have_count(30)  # a bar a day
    expect(page.locator("#totals figcaption").first).to_contain_text(f"Cost per day (USD) (peak {cost:f} USD")
    expect(page.locator("#by-model tbody tr")).to_have_count(1)
    expect(page.locator("#by-model td[data-label=Model]")).to_have_text(MODEL)
    expect(page.locator("#by-model td[data-label=Cost]")).to_have_text(f"{cost:f} USD")
    expect(page.locator("#by-key td[data-label=Key]")).to_have_text("sdk")
    assert fits_the_screen(page)
    page.screenshot(path=shots / "20-costs.png", full_page=True)

    with page.expect_download() as download:
        page.click("#csv-model")
    assert re.fullmatch(r"inferswarm-costs-\d{4}-\d\d-\d\d-\d{4}-\d\d-\d\d-day-by-model\.csv",
                        download.value.suggested_filename)
    lines = list(csv.reader(io.StringIO(Path(download.value.path()).read_text())))
    assert lines[0] == ["period", "model", "requests", "prompt_tokens", "completion_tokens", "unpriced", "cost_USD"]
    assert [(line[1], line[2], Decimal(line[6])) for line in lines[1:]] == [(MODEL, "1", cost)]

    page.select_option("#f-group", "week")
    page.click("main button[type=submit] >> text=Show")
    expect(page).to_have_url(re.compile(r"group=week"))
    assert 5 <= page.locator("#totals figure").first.locator("rect.bar").count() <= 6  # 30 days: 5 or 6 weeks
    page.goto("/costs?start=2020-01-01&end=2026-01-01")
    expect(page.locator("#e-start")).to_contain_text("366 days")
    assert page.csp_violations == []  # type: ignore[attr-defined]
    page.context.close()

    phone = new_page(browser, stack, viewport=PHONE)
    log_in(phone, "cora")
    phone.goto("/costs")
    expect(phone.locator("#by-model td[data-label=Cost]")).to_have_text(f"{cost:f} USD")
    assert fits_the_screen(phone)
    phone.screenshot(path=shots / "21-phone-costs.png", full_page=True)
    phone.context.close()

    for viewport, name in ((DESKTOP, "22-admin-top-spenders"), (PHONE, "23-phone-admin-top-spenders")):
        boss = new_page(browser, stack, viewport=viewport)
        log_in(boss, "dora")
        boss.goto("/admin")
        row = boss.locator("#top-spenders tbody tr").first
        expect(row.locator("td[data-label=User]")).to_contain_text("cora")
        expect(row.locator("td[data-label=Cost]")).to_have_text(format(cost, "f"))
        assert fits_the_screen(boss), name
        boss.screenshot(path=shots / f"{name}.png", full_page=True)
        boss.context.close()
