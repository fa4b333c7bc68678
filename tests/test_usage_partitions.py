"""`usage` partitioned by month (migration 0018, services/auth/partitions.py), on a real PostgreSQL:
records land in their UTC month's partition; the migration moves the rows stored before it; a
request id counts once even when its retry falls in the next month; the retention drops whole old
months and leaves the reports as they were; two instances making the same months at once do not
fail; a record for a month without a partition lands in DEFAULT and moves when its month is made."""

from __future__ import annotations

import asyncio
import json
import shutil
from contextlib import AsyncExitStack
from datetime import date, datetime, timedelta, timezone

import asyncpg
import pytest

from shared.db import apply_migrations, create_pool
from services.auth.app import MIGRATIONS
from services.auth.partitions import MONTHS_AHEAD, UsagePartitions, add_months, month_of, partition_name
from services.auth.records import MAX_AGE_S
from services.auth.usage_store import UsageRecord, UsageStore
from auth_support import start_auth

pytestmark = pytest.mark.db

ONCE = {"inserted": 1, "duplicates": 0, "rejected": 0}
AGAIN = {"inserted": 0, "duplicates": 1, "rejected": 0}


def _record(request_id: str, user_id: int, at: datetime, tokens: int = 10) -> UsageRecord:
    return UsageRecord(request_id=request_id, user_id=user_id, key_id=None, model="qwen2.5:0.5b",
                       prompt_hash=None, prompt_tokens=tokens, completion_tokens=5, cached=False,
                       latency_ms=12, status="ok", worker=None, created_at=at)


def _at(month: date, **delta: float) -> datetime:
    """A moment `delta` after the first of `month`, 00:00 UTC."""
    return datetime(month.year, month.month, 1, tzinfo=timezone.utc) + timedelta(**delta)


def _this_month() -> date:
    return month_of(datetime.now(timezone.utc))


def _months(first: date, last: date) -> list[date]:
    months = [first]
    while months[-1] < last:
        months.append(add_months(months[-1], 1))
    return months


async def _user_id(auth, name: str) -> tuple[str, int]:
    token = await auth.user(name)
    return token, (await auth("me", token=token))["id"]


async def _partitions(db) -> set[str]:
    rows = await db.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                          "WHERE i.inhparent = 'usage'::regclass")
    return {row["relname"] for row in rows}


async def _where(db) -> dict[str, str]:
    """Each stored request id -> the partition holding its row."""
    rows = await db.fetch("SELECT request_id, tableoid::regclass::text AS part FROM usage")
    return {row["request_id"]: row["part"] for row in rows}


async def test_records_land_in_their_months_partition(auth, db):
    token, user_id = await _user_id(auth, "adam")
    this = _this_month()
    # Made at start: the months a record may still be stored for (35 days back) and two ahead.
    oldest = month_of(datetime.now(timezone.utc) - timedelta(seconds=MAX_AGE_S))
    made = {partition_name(m) for m in _months(oldest, add_months(this, MONTHS_AHEAD))}
    assert await _partitions(db) == made | {"usage_default"}

    store = UsageStore(auth.service.store.pool)
    moments = {"last-month-end": _at(this, microseconds=-1), "first-moment": _at(this),
               "this-month": _at(this, days=2, hours=3), "next-month": _at(add_months(this, 1), days=27),
               "in-two-months": _at(add_months(this, 2), days=1), "years-ahead": _at(add_months(this, 40))}
    counts = await store.record([_record(request_id, user_id, at) for request_id, at in moments.items()])
    assert counts == {"inserted": 6, "duplicates": 0, "rejected": 0}
    assert await _where(db) == {
        "last-month-end": partition_name(add_months(this, -1)), "first-moment": partition_name(this),
        "this-month": partition_name(this), "next-month": partition_name(add_months(this, 1)),
        "in-two-months": partition_name(add_months(this, 2)), "years-ahead": "usage_default"}

    # Over the wire, without `at`: stamped now, in the month of now.
    await auth("record_usage", batch=[{"request_id": "wire", "user_id": user_id, "model": "m", "prompt_tokens": 1,
                                       "completion_tokens": 1, "cached": False, "status": "ok"}])
    row = await db.fetchrow("SELECT created_at, tableoid::regclass::text AS part FROM usage WHERE request_id = 'wire'")
    assert row["part"] == partition_name(month_of(row["created_at"]))
    # The readers of `usage` read every partition.
    assert len(await auth("recent_usage", token=token)) == 7
    assert (await auth("active_users"))["24h"] == 1


async def test_the_migration_moves_the_rows_stored_before_it(pg_dsn, tmp_path, db):
    """A database at migration 0017, with usage in several months, then 0018 (applied at start)."""
    old = tmp_path / "migrations-0017"
    old.mkdir()
    for path in sorted(MIGRATIONS.glob("*.sql"))[:17]:
        shutil.copy(path, old / path.name)
    assert sorted(p.name for p in old.iterdir())[-1].startswith("0017_")
    this = _this_month()
    moments = {"old-1": datetime(2025, 3, 4, 10, tzinfo=timezone.utc),
               "old-2": datetime(2025, 3, 31, 23, 59, 59, 999_999, tzinfo=timezone.utc),
               "old-3": datetime(2025, 4, 1, tzinfo=timezone.utc), "recent": _at(this, hours=5)}
    pool = await create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        await apply_migrations(pool, old)
        user_id = await pool.fetchval("INSERT INTO users (username, email, password_hash) "
                                      "VALUES ('ada', 'ada@example.com', 'x') RETURNING id")
        for n, (request_id, at) in enumerate(moments.items()):
            await pool.execute(
                "INSERT INTO usage (request_id, user_id, model, prompt_tokens, completion_tokens, status, "
                "created_at, cost, currency) VALUES ($1, $2, 'm', $3, 2, 'ok', $4, 0.25, 'EUR')",
                request_id, user_id, n + 1, at)
        before = [dict(r) for r in await pool.fetch("SELECT * FROM usage ORDER BY id")]
    finally:
        await pool.close()

    async with AsyncExitStack() as stack:
        auth = await start_auth(stack, tmp_path, pg_dsn)
        # Every row, every column, its id too, now in its month's partition.
        assert [dict(r) for r in await db.fetch("SELECT * FROM usage ORDER BY id")] == before
        assert await _where(db) == {"old-1": "usage_2025_03", "old-2": "usage_2025_03", "old-3": "usage_2025_04",
                                    "recent": partition_name(this)}
        months = {partition_name(m) for m in _months(date(2025, 3, 1), add_months(this, MONTHS_AHEAD))}
        assert await _partitions(db) == months | {"usage_default"}
        assert {r["request_id"]: r["created_at"] for r in await db.fetch("SELECT * FROM usage_request_ids")} \
            == moments
        indexes = {r["indexname"]: r["indexdef"] for r in await db.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'usage'")}
        assert set(indexes) == {"usage_pkey", "usage_user_created", "usage_created", "usage_request_id"}
        assert "(id, created_at)" in indexes["usage_pkey"]

        # The ids migrated are known: a retry of one counts once; new rows follow the old ids.
        store = UsageStore(auth.service.store.pool)
        assert await store.record([_record("old-1", user_id, moments["old-1"])]) == AGAIN
        assert await store.record([_record("new", user_id, _at(this, hours=6))]) == ONCE
        new_id = await db.fetchval("SELECT id FROM usage WHERE request_id = 'new'")
        assert new_id > max(row["id"] for row in before)
        # Deleting a user still deletes their usage, in every partition.
        await db.execute("DELETE FROM users WHERE id = $1", user_id)
        assert await db.fetchval("SELECT count(*) FROM usage") == 0


async def test_a_request_id_counts_once_across_a_month_boundary(auth, db):
    """A record shipped without `at` is stamped when stored: a gateway's retry arriving after
    midnight of the 1st has a moment of the next month, and must still count once."""
    _, user_id = await _user_id(auth, "bear")
    this = _this_month()
    before_midnight, after_midnight = _at(this, microseconds=-1), _at(this, seconds=1)
    store = UsageStore(auth.service.store.pool)
    assert await store.record([_record("retried", user_id, before_midnight)]) == ONCE
    assert await store.record([_record("retried", user_id, after_midnight),
                               _record("fresh", user_id, after_midnight)]) == {
        "inserted": 1, "duplicates": 1, "rejected": 0}
    # The other way round (the later month first), and four copies racing each other.
    assert await store.record([_record("backwards", user_id, after_midnight)]) == ONCE
    assert await store.record([_record("backwards", user_id, before_midnight)]) == AGAIN
    raced = await asyncio.gather(*(store.record([_record("raced", user_id, at)])
                                   for at in (before_midnight, after_midnight) * 2))
    assert sorted(r["inserted"] for r in raced) == [0, 0, 0, 1]
    # Over the wire, without `at`, today: still the same request.
    wire = {"request_id": "retried", "user_id": user_id, "model": "qwen2.5:0.5b", "prompt_tokens": 10,
            "completion_tokens": 5, "cached": False, "status": "ok"}
    assert await auth("record_usage", batch=[wire]) == AGAIN

    where = await _where(db)
    assert set(where) == {"retried", "fresh", "backwards", "raced"}
    assert where["retried"] == partition_name(add_months(this, -1))
    assert where["backwards"] == where["fresh"] == partition_name(this)
    assert await db.fetchval("SELECT sum(requests) FROM usage_daily WHERE user_id = $1", user_id) == 4
    assert await db.fetchval("SELECT sum(requests) FROM usage_daily_costs WHERE user_id = $1", user_id) == 4
    assert await db.fetchval("SELECT count(*) FROM usage_request_ids") == 4


async def test_retention_drops_whole_old_months_and_keeps_the_reports(pg_dsn, tmp_path, db, log_stream):
    this = _this_month()
    past = [add_months(this, -n) for n in range(6, -1, -1)]  # six months ago .. this month
    async with AsyncExitStack() as stack:  # an instance keeping everything, for months
        auth = await start_auth(stack, tmp_path, pg_dsn)
        token, user_id = await _user_id(auth, "cyd")
        pool = auth.service.store.pool
        for month in past:  # the months each of those months' rounds made
            await UsagePartitions(pool).ensure(now=_at(month, days=10))
        records = [_record(f"m{n}", user_id, _at(month, days=3), tokens=n + 1) for n, month in enumerate(past)]
        records.append(_record("ancient", user_id, datetime(2001, 1, 1, tzinfo=timezone.utc)))  # in DEFAULT
        assert (await UsageStore(pool).record(records))["inserted"] == len(records)
        query = {"token": token, "start": past[0].isoformat(), "end": (add_months(this, 1) - timedelta(days=1))
                 .isoformat(), "group_by": "month"}
        report = await auth("report", **query)
        assert len(report["rows"]) == len(past)
        daily = [dict(r) for r in await db.fetch("SELECT * FROM usage_daily ORDER BY day")]
    first_kept = add_months(this, -2)
    expired = sorted(name for name in await _partitions(db) if name != "usage_default" and name < partition_name(
        first_kept))
    assert {partition_name(m) for m in past if m < first_kept} <= set(expired)

    async with AsyncExitStack() as stack:  # then one keeping two months besides the current one
        auth = await start_auth(stack, tmp_path, pg_dsn, usage_retention_months=2)
        await auth.service.housekeeper.prune()  # the round each instance runs every ten minutes
        kept = {partition_name(m) for m in _months(first_kept, add_months(this, MONTHS_AHEAD))}
        assert await _partitions(db) == kept | {"usage_default"}
        survivors = {f"m{n}" for n, month in enumerate(past) if month >= first_kept}
        assert set(await _where(db)) == survivors
        assert {r["request_id"] for r in await db.fetch("SELECT request_id FROM usage_request_ids")} == survivors
        # Dropped whole (DROP TABLE), and said so; the daily aggregates, and so the reports, untouched.
        dropped = [line for line in map(json.loads, log_stream.getvalue().splitlines())
                   if line["event"] == "usage past its retention dropped"]
        assert sorted(name for line in dropped for name in line["partitions"]) == expired
        assert await auth("report", **query) == report
        assert [dict(r) for r in await db.fetch("SELECT * FROM usage_daily ORDER BY day")] == daily
        # A second round has nothing left to drop.
        assert await auth.service.housekeeper.partitions.drop_expired() == []


async def test_two_instances_make_the_same_months_at_once(auth, pg_dsn, db):
    _, user_id = await _user_id(auth, "dana")
    this = _this_month()
    later = _at(add_months(this, 30), days=1)  # months nobody has made yet
    wanted = {partition_name(m) for m in _months(month_of(later - timedelta(seconds=MAX_AGE_S)),
                                                  add_months(this, 30 + MONTHS_AHEAD))}
    assert not wanted & await _partitions(db)
    pools = [await create_pool(pg_dsn, min_size=1, max_size=3) for _ in range(2)]
    try:
        instances = [UsagePartitions(pool) for pool in pools for _ in range(2)]
        # And usage of those months recorded meanwhile: into DEFAULT, or already its month.
        records = [_record(f"r{n}", user_id, _at(add_months(this, 28 + n % 5), days=n)) for n in range(10)]
        results = await asyncio.gather(*(p.ensure(now=later) for p in instances),
                                       *(UsageStore(pools[n % 2]).record([r]) for n, r in enumerate(records)))
    finally:
        for pool in pools:
            await pool.close()
    made = [name for result in results[:4] for name in result]
    assert sorted(made) == sorted(wanted)  # each month made once, by one of them
    assert all(result == ONCE for result in results[4:])
    where = await _where(db)
    assert all(where[r.request_id] == partition_name(month_of(r.created_at)) for r in records)


async def test_a_month_without_a_partition_lands_in_default_and_moves_when_made(auth, db):
    _, user_id = await _user_id(auth, "evie")
    this = _this_month()
    far, beyond = add_months(this, 12), add_months(this, 20)
    store = UsageStore(auth.service.store.pool)
    assert (await store.record([_record("early", user_id, _at(far, days=4)),
                                _record("later", user_id, _at(far, days=20)),
                                _record("beyond", user_id, _at(beyond, days=1))]))["inserted"] == 3
    assert set((await _where(db)).values()) == {"usage_default"}
    ids = {r["request_id"]: r["id"] for r in await db.fetch("SELECT request_id, id FROM usage")}
    # Why a plain CREATE would not do: DEFAULT holds rows of that month.
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(f"CREATE TABLE {partition_name(far)} PARTITION OF usage FOR VALUES "
                         f"FROM ('{far.isoformat()} 00:00:00+00') TO ('{add_months(far, 1).isoformat()} 00:00:00+00')")

    made = await auth.service.housekeeper.partitions.ensure(now=_at(far, days=1))  # that month's round
    assert partition_name(far) in made
    assert await _where(db) == {"early": partition_name(far), "later": partition_name(far), "beyond": "usage_default"}
    assert {r["request_id"]: r["id"] for r in await db.fetch("SELECT request_id, id FROM usage")} == ids
    # Still known: a retry counts once; new records of that month go straight to its partition.
    assert await store.record([_record("early", user_id, _at(far, days=4))]) == AGAIN
    assert await store.record([_record("new", user_id, _at(far, days=5))]) == ONCE
    assert (await _where(db))["new"] == partition_name(far)
    assert await auth.service.housekeeper.partitions.ensure(now=_at(far, days=1)) == []  # idempotent
