"""The budget of an internal call made while serving a request: the caller's time left, capped.

    timeout = budget(deadline, cap=30.0, what="verify the session token")

Every remote call on a request's path (key validation, token checks,
lookups) waits at most until the request's deadline (`current_request`'s, in
`time.monotonic()` seconds), never a fixed budget shorter than what the caller
granted: a caller with 60 s left does not get `TIMEOUT` after 2 s. A cap,
documented and configurable where it is set, keeps one call from holding a
long-lived request's whole budget. A deadline already passed is `TIMEOUT`
at once, without calling: the server would refuse the request anyway.
"""

from __future__ import annotations

import time

from shared.errors import Timeout

__all__ = ["budget"]


def budget(deadline: float | None, cap: float, what: str) -> float:
    """Seconds the call may take: the time left until `deadline`, at most `cap`.

    No deadline (a caller outside any request) means `cap`; none left is `Timeout`."""
    if deadline is None:
        return cap
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Timeout(f"the deadline passed before the gateway could {what}")
    return min(cap, remaining)
