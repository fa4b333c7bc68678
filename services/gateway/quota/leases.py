"""The pieces of a limit: counters, their windows, leases and per-key state.

A *key* is (subject, counter, window start): a subject is whom a counter
limits -- "u:<user id>", "k:<key id>", "o:<org id>" (`subject_of`). A
*lease* is a block of units of one key that this gateway got from the
database and admits requests from without asking again; `used` counts what
admitted requests hold or consumed, `claimed` is how far the database knows
the lease may have been used (the owner raises it before admitting past it).
See README.md, "Limits".
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any, NamedTuple

from shared.pricing import UNITS

__all__ = [
    "COUNTERS",
    "EPOCH",
    "MONEY_COUNTERS",
    "MONEY_SCALE",
    "REQUEST_COUNTERS",
    "TOKEN_COUNTER",
    "Counter",
    "Key",
    "KeyState",
    "Lease",
    "Part",
    "Window",
    "money_text",
    "money_units",
    "subject_of",
    "window_of",
]


class Counter(NamedTuple):
    """What a counter counts (`unit`) and over what: a rolling span of `rolling`
    seconds (a GCRA), else the calendar `period` ("day" or "month", UTC)."""

    name: str
    unit: str  #: "requests", "tokens" or "money"
    period: str  #: "rolling", "day" or "month"
    rolling: int = 0  #: seconds, for a rolling counter


COUNTERS: dict[str, Counter] = {c.name: c for c in (
    Counter("requests_per_hour", "requests", "rolling", 3600),
    Counter("requests_per_month", "requests", "month"),
    Counter("tokens_per_month", "tokens", "month"),
    Counter("spend_per_day", "money", "day"),
    Counter("spend_per_month", "money", "month"),
)}
REQUEST_COUNTERS = tuple(n for n, c in COUNTERS.items() if c.unit == "requests")
TOKEN_COUNTER = "tokens_per_month"
MONEY_COUNTERS = tuple(n for n, c in COUNTERS.items() if c.unit == "money")

#: Money counters count units of 1e-10 of the currency: the scale of a usage
#: record's cost (NUMERIC(20,10)), so a settled cost is exactly a whole number.
MONEY_SCALE = UNITS
EPOCH = datetime.fromtimestamp(0, UTC)  #: the one "window" of a rolling counter's key


def subject_of(scope: str, ident: int) -> str:
    """The subject of a scope ("user", "key", "org") and its id: "u:42"."""
    return f"{scope[0]}:{ident}"


def money_units(amount: Decimal | str, *, up: bool = False) -> int:
    """An amount of money as whole units of 1e-10 (exact; `up`: rounded up, for reservations)."""
    scaled = Decimal(amount) * MONEY_SCALE
    return int(scaled.to_integral_value(rounding=ROUND_CEILING)) if up else int(scaled)


def money_text(units: int) -> str:
    """Units of 1e-10 as a decimal string, exact, at least 2 decimals ("1.00", "0.0012345")."""
    text = format(Decimal(units).scaleb(-10), "f").rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


class Window(NamedTuple):
    """A UTC day or month, [start, end); for a rolling counter, the epoch (no end)."""

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
    window = _compute(COUNTERS[counter].period, now)
    _current[counter] = (window.start.timestamp(), window.end.timestamp(), window)
    return window


def _compute(period: str, now: float) -> Window:
    if period == "rolling":
        return Window(EPOCH, datetime.max.replace(tzinfo=UTC))
    moment = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return Window(start, datetime.fromtimestamp(start.timestamp() + 86_400, UTC))
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        end = start.replace(year=start.year + 1, month=1)
    else:
        end = start.replace(month=start.month + 1)
    return Window(start, end)


class Key(NamedTuple):
    subject: str
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
    long: bool = False  #: lives the long TTL, claims a few requests ahead (README.md, "Long leases")
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
    reset: int  #: the end of a calendar window, epoch seconds (a rolling counter: see `reset_at`)
    granted: int = 0  #: fleet-wide units outstanding, as last seen in the database
    seen_at: float = 0.0  #: when `granted` was seen (the quota's clock, epoch seconds)
    unit_us: int = 0  #: a rolling counter's pace, microseconds per unit (0: a calendar window)
    lease: Lease | None = None
    granting: asyncio.Future[Any] | None = None
    waiting: int = 0  #: units wanted by requests waiting on this key
    rate: float = 0.0  #: units admitted per second, smoothed
    _count: int = 0
    _since: float = field(default_factory=time.monotonic)

    def set_limit(self, limit: int) -> None:
        """The caller's current limit (and with it a rolling counter's pace)."""
        self.limit = limit
        rolling = COUNTERS[self.key.counter].rolling
        if rolling:
            self.unit_us = -(-rolling * 1_000_000 // max(limit, 1))  # rounded up: never faster

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

    def outstanding(self, now: float) -> int:
        """Units the fleet holds or used, as far as we know: a rolling counter's
        count drains one unit every `unit_us` since it was seen."""
        if not self.unit_us:
            return self.granted
        drained = int((now - self.seen_at) * 1_000_000) // self.unit_us
        return max(0, self.granted - max(0, drained))

    def remaining(self, now: float) -> int:
        """What this gateway can vouch is left: the limit, less what the fleet
        holds, plus what its own open lease holds unused."""
        lease = self.lease
        free = lease.free if lease is not None and not lease.expired else 0
        return max(0, min(self.limit, self.limit - self.outstanding(now) + free))

    def reset_at(self, now: float) -> int:
        """When the counter is whole again, epoch seconds: a window's end, or
        when a rolling counter has drained what is outstanding."""
        if not self.unit_us:
            return self.reset
        return math.ceil(now + self.outstanding(now) * self.unit_us / 1_000_000)

    def retry_after(self, n: int, now: float) -> int:
        """Seconds until `n` units fit (at least 1): a rolling counter drains
        to room for them; a calendar window ends."""
        if not self.unit_us:
            return max(1, math.ceil(self.reset - now))
        short = self.outstanding(now) + n - self.limit
        return max(1, math.ceil(short * self.unit_us / 1_000_000))


@dataclass(slots=True)
class Part:
    """What one request holds of one lease."""

    lease: Lease
    units: int
    final: int | None = None  #: set when settled
