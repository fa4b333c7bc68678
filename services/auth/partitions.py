"""The monthly partitions of `usage` (migration 0018): made ahead, and dropped past the retention.

`usage` is partitioned by RANGE on `created_at`, one partition per UTC month,
`usage_YYYY_MM`, and a DEFAULT, `usage_default`, that takes a record whose
month has none (so an insert never fails). This module alone creates and drops
them; README.md, "Usage partitions and retention", says why and what is kept.

`ensure` makes the months a record may be stored for: from the month of the
oldest moment a record may carry (records.py accepts 35 days back) to
`months_ahead` months after the current one. Every instance runs it at start
and in each housekeeping round. Two instances at once are serialized by an
advisory lock, and `CREATE TABLE IF NOT EXISTS` under it makes a month that
appeared meanwhile a no-op. A month whose rows sit in DEFAULT (stored while it
had no partition) cannot simply be created -- PostgreSQL refuses a partition
whose range DEFAULT holds rows of -- so those rows are moved into it, in the
same transaction.

`drop_expired` drops, with DROP TABLE (whole, no dead rows to vacuum), the
months entirely before the retention's first kept month: with `retention_months`
R, the current month and the R before it are kept, so every record is kept at
least R whole months. It also deletes from DEFAULT the rows older than that,
and the request ids of those months (`usage_request_ids`). R = 0 keeps
everything; R = 1 is refused (config.py says why: records of two months back
may still arrive). The daily aggregates (`usage_daily`, `usage_daily_costs`) are never
dropped: reports over older months read only them.

The DDL takes an ACCESS EXCLUSIVE lock on `usage`, which every insert and read
of usage then queues behind. Each statement waits for that lock at most
`lock_timeout` seconds: a long reader makes the round give up (and retry next
time) rather than stall the recording of usage behind it.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

import asyncpg

from shared.logging import get_logger
from services.auth.records import MAX_AGE_S

__all__ = ["MONTHS_AHEAD", "UsagePartitions", "add_months", "month_of", "partition_name"]

log = get_logger(__name__)

#: Months made ahead of the current one (migration 0018 makes as many).
MONTHS_AHEAD = 2
#: Serializes the partitions' DDL between auth instances (pg_advisory_xact_lock).
_LOCK = 0x75736167_65706172  # "usagepar"
_NAME = re.compile(r"usage_(\d{4})_(\d{2})")
_DEFAULT = "usage_default"

_CHILDREN = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'usage'::regclass
"""


def month_of(moment: datetime) -> date:
    """The first day of `moment`'s UTC month."""
    utc = moment.astimezone(timezone.utc)
    return date(utc.year, utc.month, 1)


def add_months(month: date, months: int) -> date:
    """The first day of the month `months` after (or before, negative) `month`'s."""
    index = month.year * 12 + month.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def partition_name(month: date) -> str:
    """`usage_YYYY_MM`: the name of `month`'s partition."""
    return f"usage_{month.year:04d}_{month.month:02d}"


def _bound(month: date) -> str:
    """A month's first moment as a timestamptz literal, in UTC whatever the session's time zone."""
    return f"'{month.isoformat()} 00:00:00+00'"


def _start(month: date) -> datetime:
    return datetime(month.year, month.month, 1, tzinfo=timezone.utc)


class UsagePartitions:
    """Makes `usage`'s monthly partitions ahead and drops those past the retention (see the module doc)."""

    def __init__(self, pool: asyncpg.Pool, *, retention_months: int = 0,
                 months_ahead: int = MONTHS_AHEAD, lock_timeout: float = 2.0) -> None:
        if retention_months < 0 or retention_months == 1:  # see config.py's INFERSWARM_USAGE_RETENTION_MONTHS
            raise ValueError(f"retention_months: 0 (for ever) or 2 or more, not {retention_months}")
        self.pool = pool
        self.retention_months = retention_months
        self.months_ahead = months_ahead
        self.lock_timeout = lock_timeout

    async def maintain(self, now: datetime | None = None) -> None:
        """A housekeeping round: the months ahead, then the retention (each logs what it changed)."""
        now = now or await self._now()
        await self.ensure(now)
        await self.drop_expired(now)

    async def ensure(self, now: datetime | None = None) -> list[str]:
        """Make the missing partitions of the months a record may be stored for; their names."""
        now = now or await self._now()
        first = month_of(now - timedelta(seconds=MAX_AGE_S))
        if self.retention_months:
            first = max(first, self.first_kept(now))
        last = add_months(month_of(now), self.months_ahead)
        existing, created = await self.partitions(), []
        for month in (add_months(first, n) for n in range(_months_between(first, last) + 1)):
            if partition_name(month) not in existing and await self._create(month):
                created.append(partition_name(month))
        if created:
            log.info("usage partitions created", partitions=created)
        return created

    async def drop_expired(self, now: datetime | None = None) -> list[str]:
        """Drop the months before the retention's first kept one (none when it is 0); their names."""
        if not self.retention_months:
            return []
        now = now or await self._now()
        first_kept = self.first_kept(now)
        expired = sorted(name for name in await self.partitions()
                         if (month := _month_of_name(name)) is not None and month < first_kept)
        dropped = [name for name in expired if await self._drop(name)]
        async with self.pool.acquire() as conn:
            stray = await conn.execute(f"DELETE FROM {_DEFAULT} WHERE created_at < $1", _start(first_kept))
            ids = await _delete_request_ids(conn, _start(first_kept))
        if dropped or stray != "DELETE 0" or ids:
            log.info("usage past its retention dropped", partitions=dropped, retention_months=self.retention_months,
                     kept_from=first_kept.isoformat(), default_rows=int(stray.split()[-1]), request_ids=ids)
        return dropped

    def first_kept(self, now: datetime) -> date:
        """The oldest month the retention keeps: the current one and the `retention_months` before it."""
        return add_months(month_of(now), -self.retention_months)

    async def partitions(self) -> set[str]:
        """The names of `usage`'s partitions, DEFAULT included."""
        return {row["relname"] for row in await self.pool.fetch(_CHILDREN)}

    async def _create(self, month: date) -> bool:
        """Make one month's partition, moving into it DEFAULT's rows of that month; False when another
        instance made it first."""
        name, low, high = partition_name(month), _bound(month), _bound(add_months(month, 1))
        async with self.pool.acquire() as conn, conn.transaction():
            await self._lock(conn)
            if await conn.fetchval("SELECT to_regclass($1)", name) is not None:
                return False
            in_range = f"created_at >= {low} AND created_at < {high}"
            moving = await conn.fetchval(f"SELECT EXISTS (SELECT FROM {_DEFAULT} WHERE {in_range})")
            if moving:
                await conn.execute("CREATE TEMP TABLE usage_moving (LIKE usage) ON COMMIT DROP")
                await conn.execute(f"WITH moved AS (DELETE FROM {_DEFAULT} WHERE {in_range} RETURNING *) "
                                   "INSERT INTO usage_moving SELECT * FROM moved")
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF usage "
                               f"FOR VALUES FROM ({low}) TO ({high})")
            if moving:
                count = await conn.execute("INSERT INTO usage OVERRIDING SYSTEM VALUE SELECT * FROM usage_moving")
                log.warning("usage rows moved out of the default partition", partition=name,
                            rows=int(count.split()[-1]))
        return True

    async def _drop(self, name: str) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            await self._lock(conn)
            if await conn.fetchval("SELECT to_regclass($1)", name) is None:
                return False  # another instance dropped it
            await conn.execute(f"DROP TABLE {name}")
        return True

    async def _lock(self, conn: asyncpg.Connection) -> None:
        """Inside a transaction: this instance's turn, then `usage` itself, waited for at most
        `lock_timeout` (the parent first, in the order inserts take their locks: no deadlock)."""
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
        await conn.execute(f"SET LOCAL lock_timeout = {int(self.lock_timeout * 1000)}")
        await conn.execute("LOCK TABLE ONLY usage IN ACCESS EXCLUSIVE MODE")

    async def _now(self) -> datetime:
        """The database's clock: the one `created_at` defaults to."""
        value: datetime = await self.pool.fetchval("SELECT now()")
        return value


def _month_of_name(name: str) -> date | None:
    """The month a partition is named for; None for DEFAULT and tables this module did not name."""
    found = _NAME.fullmatch(name)
    if found is None or not 1 <= int(found[2]) <= 12:
        return None
    return date(int(found[1]), int(found[2]), 1)


def _months_between(first: date, last: date) -> int:
    return (last.year - first.year) * 12 + last.month - first.month


async def _delete_request_ids(conn: asyncpg.Connection, before: datetime, batch: int = 50_000) -> int:
    """Forget the request ids of records older than `before`, a batch per statement (short
    transactions: a month of ids may be millions). Their records are gone: a retry cannot come."""
    deleted = 0
    while True:
        status = await conn.execute(
            "DELETE FROM usage_request_ids WHERE request_id IN "
            "(SELECT request_id FROM usage_request_ids WHERE created_at < $1 LIMIT $2)", before, batch)
        count = int(status.split()[-1])
        deleted += count
        if count < batch:
            return deleted
