"""Cost reports made for people, without a stack: the CSV file (exact money, no formulas), the
periods of a chart, and totals per model or key (issue 18, part 7)."""

from __future__ import annotations

import csv
import io
from datetime import date

import pytest

from shared.report_csv import report_csv, safe_cell
from services.web.report_views import fold, period_starts, series
from services.web.views import bar_chart, make_environment, quota_bars

pytestmark = pytest.mark.unit

REPORT = {
    "start": "2025-12-30", "end": "2026-01-06", "group_by": "week", "by": "key",
    "rows": [
        {"period": "2025-12-29", "key_id": 7, "key_name": "=1+2", "requests": 2, "prompt_tokens": 10,
         "completion_tokens": 5, "cost": {"USD": "0.0000100000", "EUR": "0.5000000000"}, "unpriced": 0},
        {"period": "2026-01-05", "key_id": None, "key_name": None, "requests": 1, "prompt_tokens": 1,
         "completion_tokens": 1, "cost": {}, "unpriced": 1},
        {"period": "2026-01-05", "key_id": 7, "key_name": "=1+2", "requests": 1, "prompt_tokens": 3,
         "completion_tokens": 0, "cost": {"USD": "0.1000000001"}, "unpriced": 0},
    ],
    "totals": {"requests": 4, "prompt_tokens": 14, "completion_tokens": 6, "unpriced": 1,
               "cost": {"EUR": "0.5000000000", "USD": "0.1000100001"}},
}


def test_the_csv_has_a_header_a_column_per_currency_exact_money_and_no_formulas():
    lines = list(csv.reader(io.StringIO(report_csv(REPORT))))
    assert lines == [
        ["period", "key_id", "key_name", "requests", "prompt_tokens", "completion_tokens", "unpriced",
         "cost_EUR", "cost_USD"],
        ["2025-12-29", "7", "'=1+2", "2", "10", "5", "0", "0.5000000000", "0.0000100000"],
        ["2026-01-05", "", "", "1", "1", "1", "1", "", ""],
        ["2026-01-05", "7", "'=1+2", "1", "3", "0", "0", "", "0.1000000001"],
    ]
    for risky in ("=A1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert safe_cell(risky) == "'" + risky
    assert safe_cell("a=b") == "a=b" and safe_cell(None) == "" and safe_cell(3) == "3"


def test_periods_of_a_range_start_on_a_monday_or_the_first_of_a_month():
    assert period_starts(date(2025, 12, 31), date(2026, 1, 12), "week") == [
        date(2025, 12, 29), date(2026, 1, 5), date(2026, 1, 12)]
    assert period_starts(date(2025, 11, 15), date(2026, 2, 1), "month") == [
        date(2025, 11, 1), date(2025, 12, 1), date(2026, 1, 1), date(2026, 2, 1)]
    assert len(period_starts(date(2024, 2, 1), date(2024, 3, 1), "day")) == 30
    points = series(REPORT, "USD")
    assert [(p["day"], p["label"]) for p in points] == [
        ("2025-12-29", "2025-12-29: 0.0000100000 USD"), ("2026-01-05", "2026-01-05: 0.1000000001 USD")]
    assert [p["value"] for p in series(REPORT, None)] == [2, 2]  # both keys of the second week


def test_fold_sums_each_key_over_the_periods_exactly():
    folded = fold(REPORT["rows"], "key_id")
    assert [(f["key_id"], f["requests"], f["unpriced"], f["cost"]) for f in folded] == [
        (7, 3, 0, {"EUR": "0.5000000000", "USD": "0.1000100001"}), (None, 1, 1, {})]


def test_the_dashboard_shows_budgets_beside_the_counters_exactly():
    """Quota bars of every kind (a limit, no limit, a money budget) render on the dashboard."""
    facts = {"requests_per_hour": {"limit": 100, "remaining": 64, "reset": 1_000_036, "scope": "user"},
             "tokens_per_month": {"limit": None, "remaining": None, "reset": 1_100_000},
             "spend_per_month": {"limit": "1.00", "remaining": "0.0100000001", "reset": 1_200_000, "scope": "key"}}
    bars = quota_bars(facts, 1_000_000)
    money = next(b for b in bars if b["counter"] == "spend_per_month")
    assert (money["used"], money["remaining"], money["scope"]) == ("0.9899999999", "0.0100000001", "key")
    page = make_environment().get_template("dashboard.html").render(
        user={"username": "ann", "is_admin": False, "tier": "free", "email": "ann@example.com"}, csrf_field="csrf", csrf_token="t", path="/dashboard",
        totals={}, usage_error=None, requests_chart=bar_chart([], "requests"), tokens_chart=bar_chart([], "tokens"),
        quota=bars, quota_error=None,
        currency="USD", recent=[], recent_error=None, alerts=[], alerts_error=None)
    assert "0.9899999999 of 1.00 USD · 0.0100000001 left (the key's budget)" in page
    assert "36 of 100 · 64 left" in page and "no limit" in page
