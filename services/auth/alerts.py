"""Spending alerts: which budgets a batch of usage counts toward, and which thresholds it crossed.

Right after `auth.record_usage` stores a batch, the users and keys it named are
looked at again (alert_store.py reads their budgets and their periods' spend in
a few indexed queries, whatever the batch's size): every budget -- a scope's
`spend_per_day` over the UTC day, `spend_per_month` over the UTC month -- whose
spend reached a threshold (its owner's, default 50, 80, 100 %) is a candidate;
the database keeps the first of each (scope, id, counter, period, threshold)
and drops the others, so an alert fires once however often it is found.

`budget_subjects` is the one place that knows the scopes: the user scope's
budgets are the tighter of its tier's and its own (`limits.effective`), a key's
its own. Organisations add a branch there (and their rows to alert_store's
`_SUBJECTS`, their spend to `spend_by_subject`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from shared.errors import InvalidParams
from services.auth import limits

__all__ = ["Candidate", "DEFAULT_THRESHOLDS", "Subject", "budget_subjects", "check_thresholds", "crossed",
           "event_id", "period_start", "spend_by_subject"]

DEFAULT_THRESHOLDS = (50, 80, 100)
MAX_THRESHOLDS = 5


@dataclass(frozen=True, slots=True)
class Subject:
    """A scope with a budget: what its spend is compared with, and whom an alert tells."""

    scope: str  #: "user", "key" (later "org")
    id: int
    owner: int  #: the user told (the account itself, a key's user)
    budgets: Mapping[str, Decimal]  #: counter -> budget; only the counters that have one
    thresholds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A threshold reached, to be inserted (and so fired) unless it already was this period."""

    subject: Subject
    counter: str
    period_start: date
    threshold: int
    spent: Decimal
    budget: Decimal


def check_thresholds(value: Any) -> tuple[int, ...]:
    """1 to 5 whole percentages 1..100; duplicates dropped, sorted."""
    if (not isinstance(value, list) or not 1 <= len(value) <= MAX_THRESHOLDS
            or any(type(v) is not int or not 1 <= v <= 100 for v in value)):
        raise InvalidParams(f"thresholds must be a list of 1 to {MAX_THRESHOLDS} whole percentages from 1 to 100",
                            {"param": "thresholds"})
    return tuple(sorted(set(value)))


def budget_subjects(rows: Iterable[Mapping[str, Any]],
                    tier_limits: Callable[[str], Mapping[str, Any]]) -> list[Subject]:
    """The scopes of `rows` (alert_store's `_SUBJECTS`) that have a money budget above zero.

    A zero budget is left out: nothing may be spent, the gateways refuse every
    request, and "100 % of nothing" would fire on the first free request."""
    subjects = []
    for row in rows:
        own = {name: row[name] for name in limits.BUDGET_NAMES}
        budget = limits.effective(tier_limits(row["tier"]), own) if row["scope"] == "user" else own
        amounts = {name: Decimal(str(budget[name])) for name in limits.BUDGET_NAMES
                   if budget[name] is not None and Decimal(str(budget[name])) > 0}
        if amounts:
            subjects.append(Subject(row["scope"], row["id"], row["owner"], amounts,
                                    tuple(row["thresholds"] or DEFAULT_THRESHOLDS)))
    return subjects


def spend_by_subject(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], dict[str, Decimal]]:
    """Per (scope, id), the spend of the day and of the month, from rows per (user, key):
    a user's is the sum over all its keys (and its sessions), a key's its own."""
    spend: dict[tuple[str, int], dict[str, Decimal]] = {}
    for row in rows:
        subjects = [("user", row["user_id"])] + ([("key", row["key_id"])] if row["key_id"] is not None else [])
        for subject in subjects:
            totals = spend.setdefault(subject, {name: Decimal(0) for name in limits.BUDGET_NAMES})
            totals["spend_per_day"] += row["day"] or 0
            totals["spend_per_month"] += row["month"] or 0
    return spend


def period_start(counter: str, today: date) -> date:
    """The first day of the period a counter is spent over: the UTC day, or its month."""
    return today if counter == "spend_per_day" else today.replace(day=1)


def crossed(subjects: Iterable[Subject], spend: Mapping[tuple[str, int], Mapping[str, Decimal]],
            today: date) -> list[Candidate]:
    """Every threshold each subject's spend has reached this period (100 %: spend >= budget)."""
    found = []
    for subject in subjects:
        spent_now = spend.get((subject.scope, subject.id))
        if spent_now is None:
            continue
        for counter, budget in subject.budgets.items():
            spent = spent_now[counter]
            for threshold in subject.thresholds:
                if spent * 100 >= budget * threshold:  # exact: no division
                    found.append(Candidate(subject, counter, period_start(counter, today), threshold, spent,
                                           budget))
    return found


def event_id() -> str:
    """A new event's id, as receivers see it (`evt_` and 24 hex digits)."""
    return "evt_" + secrets.token_hex(12)
