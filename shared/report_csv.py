"""A cost report (`auth.report`'s answer) as a CSV file: what `GET /api/reports.csv`, the
dashboard's "Download CSV" and `inferswarm costs --csv` all give.

One line per row of the report, after a header line: `period`, then `model`
(by model), `key_id`, `key_name` (by key) or `user_id`, `username` (an
organisation's report by member: `auth.org_report`), the figures, and a `cost_<CURRENCY>`
column per currency of the report (empty where a row has none of it).
Money is its exact decimal string, never a float. Every cell a spreadsheet
would take for a formula (starting with `=`, `+`, `-`, `@`, a tab or a
carriage return) gets a leading `'` (OWASP's advice on CSV injection): key
names are typed by people.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

__all__ = ["report_csv", "safe_cell"]

_FORMULA = ("=", "+", "-", "@", "\t", "\r")
_FIGURES = ("requests", "prompt_tokens", "completion_tokens", "unpriced")


def safe_cell(value: Any) -> str:
    """A cell as text; one a spreadsheet would read as a formula gets a leading `'`."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA) else text


def _currencies(report: Mapping[str, Any]) -> list[str]:
    """Every currency of the report, in order."""
    found: set[str] = set(report.get("totals", {}).get("cost") or {})
    for row in report.get("rows", []):
        found.update(row.get("cost") or {})
    return sorted(found)


def report_csv(report: Mapping[str, Any]) -> str:
    """The rows of an `auth.report` answer as CSV, with a header line."""
    by = report.get("by")
    dimension = {"model": ["model"], "key": ["key_id", "key_name"], "member": ["user_id", "username"]}.get(by or "", [])
    currencies = _currencies(report)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["period", *dimension, *_FIGURES, *(f"cost_{c}" for c in currencies)])
    for row in report.get("rows", []):
        cost = row.get("cost") or {}
        writer.writerow([safe_cell(row.get(name)) for name in ("period", *dimension, *_FIGURES)]
                        + [safe_cell(cost.get(c, "")) for c in currencies])
    return out.getvalue()
