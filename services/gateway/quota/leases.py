"""The pieces of a limit: counters, their UTC windows, leases and per-key state.

A *key* is (user, counter, window start). A *lease* is a block of units of
one key that this gateway got from the database and admits requests from
without asking again; `used` counts what admitted requests hold or consumed,
`claimed` is how far the database knows the lease may have been used (the
owner raises it before admitting past it). See README.md, "Limits".
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

__all__ = [
    "COUNTERS",
    "REQUEST_COUNTERS",
    "TOKEN_COUNTER",
    "Key",
    "KeyState",
    "Lease",
    "Part",
    "Window",
    "window_of",
]

REQUEST_COUNTERS = ("requests_per_hour", "requests_per_month")
TOKEN_COUNTER = "tokens_per_month"
COUNTERS = (*REQUEST_COUNTERS, TOKEN_COUNTER)


class Window(NamedTuple):
    """A UTC hour or month: [start, end)."""

    start: datetime
    end: datetime

    @property
    def reset(self) -> int:
        """When the window ends, epoch seconds (what callers see as `reset`)."""
        return int(self.end.timestamp())


_current: dict[str, tuple[float, float, Window]] = {}


def window_of(counter: str, now: float | None = None) -> Window:
    """The window of `counter` that contains `now` (epoch seconds)."""
    now = time.time() if now is None else now
    cached = _current.get(counter)
    if cached is not None and cached[0] <= now < cached[1]:
        return cached[2]  # asked on every request: computed once per window
    window = _compute(counter, now)
    _current[counter] = (window.start.timestamp(), window.end.timestamp(), window)
    return window


def _compute(counter: str, now: float) -> Window:
    moment = datetime.fromtimestamp(now, UTC)
    if counter == "requests_per_hour":
        start = moment.replace(minute=0, second=0, microsecond=0)
        return Window(start, datetime.fromtimestamp(start.timestamp() + 3600, UTC))
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        end = start.replace(year=start.year + 1, month=1)
    else:
        end = start.replace(month=start.month + 1)
    return Window(start, end)


class Key(NamedTuple):
    user_id: int
    counter: str
    window_start: datetime


@dataclass(eq=False, slots=True)
class Lease:
    """Units of one key held by this gateway (mirrors a `quota_leases` row)."""

    id: int
    key: Key
    units: int
    claimed: int
    expires: float  #: monotonic time after which it admits nothing more
    used: int = 0
    holders: int = 0  #: admitted requests not settled yet
    expired: bool = False
    closed: bool = False
    claiming: asyncio.Future[None] | None = None

    @property
    def free(self) -> int:
        return self.units - self.used

    def fits(self, n: int) -> bool:
        """Admitting `n` needs neither the database nor a claim."""
        return not self.expired and self.used + n <= self.claimed

    @property
    def settled(self) -> bool:
        return self.holders == 0


@dataclass(eq=False, slots=True)
class KeyState:
    """What this gateway knows of one key: its open lease, the fleet's count, demand."""

    key: Key
    limit: int
    reset: int
    granted: int = 0  #: fleet-wide units granted, as last seen in the database
    lease: Lease | None = None
    granting: asyncio.Future[Any] | None = None
    waiting: int = 0  #: units wanted by requests waiting on this key
    rate: float = 0.0  #: units admitted per second, smoothed
    _count: int = 0
    _since: float = field(default_factory=time.monotonic)

    def note(self, n: int, now: float) -> None:
        """Count `n` admitted units towards the rate estimate."""
        self._count += n
        elapsed = now - self._since
        if elapsed >= 0.05:
            current = self._count / elapsed
            weight = min(1.0, elapsed * 4)  # about a quarter of a second of memory
            self.rate = max(current, (1 - weight) * self.rate + weight * current)  # quick to rise
            self._count, self._since = 0, now

    def ahead(self, horizon: float, need: int) -> int:
        """Units worth claiming or leasing ahead: `horizon` seconds of demand."""
        return max(need, self.waiting, math.ceil(self.rate * horizon))

    def remaining(self) -> int:
        """What this gateway can vouch is left: the limit, less what the fleet
        was granted, plus what its own open lease holds unused."""
        lease = self.lease
        free = lease.free if lease is not None and not lease.expired else 0
        return max(0, min(self.limit, self.limit - self.granted + free))


@dataclass(slots=True)
class Part:
    """What one request holds of one lease."""

    lease: Lease
    units: int
    final: int | None = None  #: set when settled
