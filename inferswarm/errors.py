"""How the CLI reports an error: one line, never a traceback, a stable exit code."""

from __future__ import annotations

import math

from shared.errors import MeshError

__all__ = ["EXIT_CODES", "exit_code", "describe", "human_duration"]

#: Exit codes by error code (0 is success, 2 is a usage error from argparse).
EXIT_CODES = {
    "UNAUTHENTICATED": 3,
    "FORBIDDEN": 3,
    "RATE_LIMITED": 4,
    "NOT_FOUND": 5,
    "UNAVAILABLE": 6,
    "TIMEOUT": 7,
    "CONFLICT": 8,
    "INVALID_PARAMS": 9,
    "TOO_LARGE": 9,
    "CANCELLED": 130,
}


def exit_code(error: MeshError) -> int:
    return EXIT_CODES.get(error.to_wire()[0], 1)


def describe(error: MeshError) -> str:
    """The line a person reads, with the facts the error carries."""
    code, message, data = error.to_wire()
    if code == "RATE_LIMITED":
        return _rate_limited(message, data)
    if code == "NOT_FOUND" and data.get("available") is not None:
        available = ", ".join(data["available"]) or "none"
        return f"{message}; available: {available}"
    prefix = code.lower().replace("_", " ")
    return message if message.lower().startswith(prefix) else f"{prefix}: {message}"


def _rate_limited(message: str, data: dict) -> str:
    """E.g. "rate limited: 0 of 100 requests left in the last hour, next in 36 s"."""
    retry = data.get("retry_after")
    counter = data.get("counter")  # e.g. "requests_per_hour", "tokens_per_month"
    fact = (data.get("rate_limit") or {}).get(counter) if isinstance(counter, str) else None
    if isinstance(counter, str) and counter.startswith("spend_"):  # a money budget: its message says it all
        text = f"over budget: {message}"
    elif isinstance(fact, dict) and isinstance(fact.get("limit"), int) and "_per_" in counter:
        unit, window = counter.split("_per_", 1)
        remaining = max(0, int(fact.get("remaining") or 0))
        text = f"rate limited: {remaining} of {fact['limit']} {unit} left"
        text += " in the last hour" if counter == "requests_per_hour" else f" this {window}"
    else:
        text = f"rate limited: {message}"
    if isinstance(retry, (int, float)):
        # The hour rolls: retry_after is when the next request fits, not when all comes back.
        text += f", next in {human_duration(retry)}" if counter == "requests_per_hour" \
            else f", resets in {human_duration(retry)}"
    return text


def human_duration(seconds: float) -> str:
    """12 s, 12 min, 5.5 h, 7.3 days."""
    if seconds < 90:
        return f"{max(1, math.ceil(seconds))} s"
    if seconds < 5400:
        return f"{math.ceil(seconds / 60)} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
