"""Registrations counted per source and for the whole service, before any hash.

Each registration that passes the cheap checks (well-formed fields) is counted
in PostgreSQL (`registration_counts`), so every auth instance shares the
counts and a restart forgets nothing. Two counts, each in fixed windows of
`window` seconds:

* the **source**: the HTTP client address a mesh member (the web service)
  vouches for (`addr:`, an IPv6 client by its /64, as for logins), else a
  direct caller's CurveZMQ key (`peer:`); `per_source` registrations a window;
* **all** registrations of the service: `overall` a window.

The source is counted first and the overall count only for a registration its
source may make, in one transaction: a refused registration counts nowhere, so
one source flooding cannot use up the overall budget for everyone else. A
member naming no client (the operator's tools) is counted only overall.
Refusals are `RATE_LIMITED` with `retry_after` (the end of the window) and
`reason: "registrations"`. Housekeeping deletes rows a day old
(`AuthStore.prune`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.db import unavailable_when_down
from shared.errors import RateLimited
from services.auth.store import AuthStore
from services.auth.throttle import source_of

__all__ = ["RegistrationPolicy", "RegistrationThrottle"]

OVERALL = "all"

# One row per subject: a new window starts once the old one is over.
_COUNT = (
    "INSERT INTO registration_counts AS r (subject, window_start, count) VALUES ($1, now(), 1) "
    "ON CONFLICT (subject) DO UPDATE SET "
    "count = CASE WHEN r.window_start <= now() - make_interval(secs => $2) THEN 1 ELSE r.count + 1 END, "
    "window_start = CASE WHEN r.window_start <= now() - make_interval(secs => $2) THEN now() "
    "ELSE r.window_start END "
    "RETURNING count, extract(epoch FROM window_start + make_interval(secs => $2) - now()) AS left"
)


@dataclass(frozen=True, slots=True)
class RegistrationPolicy:
    per_source: int = 5
    overall: int = 60
    window: float = 60.0


@unavailable_when_down()
class RegistrationThrottle:
    """Counts a registration per source and overall; `RateLimited` past either limit."""

    def __init__(self, store: AuthStore, policy: RegistrationPolicy | None = None) -> None:
        self._store = store
        self.policy = policy or RegistrationPolicy()

    @staticmethod
    def source(addr: str | None, peer: str | None) -> str | None:
        if addr is not None:
            return source_of(addr)
        if peer is not None:
            return f"peer:{peer}"
        return None

    async def count(self, source: str | None) -> None:
        """Count one registration from `source` (None: a member naming no client)."""
        policy = self.policy
        async with self._store.pool.acquire() as conn, conn.transaction():
            for subject, limit in ((source, policy.per_source), (OVERALL, policy.overall)):
                if subject is None:
                    continue
                row = await conn.fetchrow(_COUNT, subject, policy.window)
                if row["count"] > limit:
                    retry_after = max(1, math.ceil(float(row["left"])))
                    whom = "from this source" if subject != OVERALL else "right now"
                    # Raising rolls the transaction back: a refusal counts nowhere.
                    raise RateLimited(f"too many registrations {whom}; retry in {retry_after}s",
                                      {"retry_after": retry_after, "reason": "registrations"})
