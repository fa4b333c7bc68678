"""Rate-limit facts: read from the gateway's answers, written as HTTP headers.

The gateway reports, per counter (`requests_per_hour`, `requests_per_month`,
`tokens_per_month`), `{limit, remaining, reset}` with `reset` in epoch
seconds: in `gateway.quota`, in the final chunk of `gateway.infer`, and in the
data of a `RATE_LIMITED` error. `facts_of` finds that mapping wherever the
answer carries it; `openai_headers` turns the binding request counter (the one
with the fewest requests left) and the token counter into OpenAI's headers:

    x-ratelimit-limit-requests      x-ratelimit-limit-tokens
    x-ratelimit-remaining-requests  x-ratelimit-remaining-tokens
    x-ratelimit-reset-requests      x-ratelimit-reset-tokens     (a duration: "59m12s", "3s")

and the money budget with the least left (`spend_per_day`, `spend_per_month`:
decimal strings) into ours: `x-inferswarm-budget-limit`, `-remaining` (in the
budget's currency) and `-reset` (a duration).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["COUNTERS", "MONEY_COUNTERS", "QUOTA_COUNTERS", "facts_of", "binding_requests", "openai_headers", "reset_duration"]

COUNTERS = ("requests_per_hour", "requests_per_month", "tokens_per_month")
#: Counters that refill only with the next day or month (budgets): being over one is
#: "insufficient quota", not "slow down".
QUOTA_COUNTERS = ("requests_per_month", "tokens_per_month", "spend_per_day", "spend_per_month")
MONEY_COUNTERS = ("spend_per_day", "spend_per_month")
_CONTAINERS = ("rate_limits", "ratelimits", "rate_limit", "ratelimit", "limits", "quota", "counters")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_counter(value: Any) -> bool:
    """`{limit, remaining, reset}`; a null limit (and remaining) means "no limit"."""
    return isinstance(value, Mapping) and "limit" in value and "remaining" in value and (
        (_number(value["limit"]) and _number(value["remaining"]))
        or (value["limit"] is None and value["remaining"] is None))


def _limited(value: Mapping[str, Any] | None) -> bool:
    return value is not None and _number(value.get("limit"))


def facts_of(payload: Any, depth: int = 0) -> dict[str, dict[str, Any]]:
    """`{counter: {limit, remaining, reset}}` found in `payload`, or {}."""
    if not isinstance(payload, Mapping) or depth > 3:
        return {}
    direct = {name: dict(payload[name]) for name in COUNTERS if _is_counter(payload.get(name))}
    direct.update({name: dict(payload[name]) for name in MONEY_COUNTERS if _money(payload.get(name)) is not None})
    if direct:
        return direct
    for name in _CONTAINERS:
        found = facts_of(payload.get(name), depth + 1)
        if found:
            return found
    return {}


def binding_requests(facts: Mapping[str, Mapping[str, Any]]) -> tuple[str, Mapping[str, Any]] | None:
    """The request counter closest to its limit (ties: the one resetting first)."""
    counters = [(name, facts[name]) for name in COUNTERS[:2] if _limited(facts.get(name))]
    if not counters:
        return None
    return min(counters, key=lambda item: (item[1]["remaining"], item[1].get("reset") or 0))


def reset_duration(reset: Any, now: float | None = None) -> str:
    """OpenAI's reset format: the time left as `1h2m3s` / `6m0s` / `3s`."""
    if not isinstance(reset, (int, float)):
        return "0s"
    seconds = max(0, int(reset - (time.time() if now is None else now) + 0.999))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def openai_headers(facts: Mapping[str, Mapping[str, Any]], now: float | None = None) -> dict[str, str]:
    """The `x-ratelimit-*` headers for `facts` (empty when none are known)."""
    headers: dict[str, str] = {}
    binding = binding_requests(facts)
    if binding is not None:
        _, counter = binding
        headers["x-ratelimit-limit-requests"] = str(int(counter["limit"]))
        headers["x-ratelimit-remaining-requests"] = str(max(int(counter["remaining"]), 0))
        headers["x-ratelimit-reset-requests"] = reset_duration(counter.get("reset"), now)
    budget = _binding_budget(facts)
    if budget is not None:
        headers["x-inferswarm-budget-limit"] = str(budget["limit"])
        headers["x-inferswarm-budget-remaining"] = str(budget["remaining"])
        headers["x-inferswarm-budget-reset"] = reset_duration(budget.get("reset"), now)
    tokens = facts.get("tokens_per_month")
    if tokens is not None and _limited(tokens):
        headers["x-ratelimit-limit-tokens"] = str(int(tokens["limit"]))
        headers["x-ratelimit-remaining-tokens"] = str(max(int(tokens["remaining"]), 0))
        headers["x-ratelimit-reset-tokens"] = reset_duration(tokens.get("reset"), now)
    return headers


def _money(value: Any) -> Decimal | None:
    """A money counter's `remaining`, when `value` is one with a limit (decimal strings)."""
    if not isinstance(value, Mapping) or not isinstance(value.get("remaining"), str) \
            or not isinstance(value.get("limit"), str):
        return None
    try:
        return Decimal(value["remaining"])
    except InvalidOperation:
        return None


def _binding_budget(facts: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The money counter with the least left, if any has a limit."""
    budgets = [(left, facts[name]) for name in MONEY_COUNTERS if (left := _money(facts.get(name))) is not None]
    return min(budgets, key=lambda item: item[0])[1] if budgets else None
