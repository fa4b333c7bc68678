"""Usage records and their daily aggregates (the SQL half of `auth.record_usage`/`auth.usage`).

A batch is written by one statement: each request id is first claimed in
`usage_request_ids` (`ON CONFLICT DO NOTHING`: an id already stored is not
claimed again), only the claimed records are inserted into `usage`, and only
those are added to `usage_daily`, in the same statement and so the same
transaction. A retried batch, or two gateways sending the same record, count
once, whichever monthly partition of `usage` each copy's moment falls in
(migration 0018: the request ids have their own table because a unique index
of a partitioned table must hold its partition key). Rows naming an unknown
user, or a key that is not that user's, are rejected and counted as such.

Each record is priced as it is inserted, in the same statement: by what its
gateway charged when the gateway priced it (`cost`, `currency`: the price it
knew at the request's start, as its receipt and the budgets say), else by the
version of its model's price in force at its moment (`model_prices`,
price_store.py), `cost` rounded half to even to 10 decimals (shared/pricing.py
has the rule), NULL without a price. `usage_daily_costs` sums cost per day, key, model and
currency (with the tokens, migration 0009), and counts the unpriced requests.

A record made with a key of an organisation is attributed to it as it is
stored: the key's `org_id` goes into `usage.org_id` and `usage_daily_costs.org_id`
(gateways' records do not name it; a daily row's organisation follows from its
key, so the daily rows' unique index is unchanged). Its user is billed all the same.

A failed record with the attempts that failed before it (`tried`) is also a
dead letter (dead_letter_store.py): a batch holding any is stored in one
transaction, the usage statement then the dead letters of the rows it inserted.

Reports (`auth.report`, `auth.org_report`, `auth.top_spenders`) read `usage_daily_costs` only:
it has every figure per day, key and model, so a year of a user's usage is at
most a few thousand rows, whatever the number of requests.

They and `auth.usage` (`daily`, `costs`) read through `reports_pool`: the read
replica when one is configured (shared/replica.py; a little lag is fine for
them), else the primary. Everything else, writes and reads alike, uses `pool`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

import asyncpg

from shared.db import unavailable_when_down
from shared.replica import Reader
from services.auth.dead_letter_store import Attempt, is_dead, write_dead_letters

__all__ = ["UsageRecord", "UsageStore"]


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One request, as a gateway reports it (validated by the service)."""

    request_id: str
    user_id: int
    key_id: int | None
    model: str
    prompt_hash: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    latency_ms: int | None
    status: str
    worker: str | None
    created_at: datetime | None  #: None: now
    #: What the gateway charged (its price at the request's start, as its receipt says);
    #: None: priced here, by the version in force at `created_at`.
    cost: Decimal | None = None
    currency: str | None = None
    #: The model the caller named (an alias, `default`) when another served (`model`); None: `model`.
    asked: str | None = None
    #: The attempts that failed before the last (`model`), in order; None: none.
    tried: tuple[Attempt, ...] | None = None


_RECORD = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
                         $6::int[], $7::int[], $8::bool[], $9::int[], $10::text[], $11::text[],
                         $12::timestamptz[], $13::numeric[], $14::text[])
        AS b(request_id, user_id, key_id, model, prompt_hash, prompt_tokens, completion_tokens,
             cached, latency_ms, status, worker, created_at, charged, charged_currency)
), accepted AS (
    -- A key's record is attributed to the key's organisation, if any (gateways do not name it).
    SELECT b.*, k.org_id FROM batch b JOIN users u ON u.id = b.user_id
    LEFT JOIN api_keys k ON k.id = b.key_id
    WHERE b.key_id IS NULL OR k.user_id = b.user_id
), priced AS (
    -- What the gateway charged, if it priced the request (its receipt says the same); else the
    -- version of the model's price in force at the record's moment, if any. `* 0.000001`,
    -- not `/ 1000000`: numeric multiplication is exact, division keeps only ~16 digits.
    SELECT a.*, COALESCE(a.charged_currency, p.currency) AS currency,
           COALESCE(a.charged,
                    round_half_even((a.prompt_tokens * CASE WHEN a.cached AND p.cached_price IS NOT NULL
                                                            THEN p.cached_price ELSE p.input_price END
                                     + a.completion_tokens * p.output_price) * 0.000001, 10)) AS cost
    FROM (SELECT accepted.*, COALESCE(accepted.created_at, now()) AS at FROM accepted) a
    LEFT JOIN LATERAL (
        SELECT mp.input_price, mp.output_price, mp.cached_price, mp.currency FROM model_prices mp
        WHERE mp.model = a.model AND mp.effective_from <= a.at
        ORDER BY mp.effective_from DESC LIMIT 1
    ) p ON true
), claimed AS (
    -- The ids stored for the first time (a concurrent claim of the same id waits for its commit).
    INSERT INTO usage_request_ids (request_id, created_at) SELECT request_id, at FROM priced
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id
), inserted AS (
    -- DISTINCT ON: one row per id claimed, should a batch name an id twice (records.py drops such).
    INSERT INTO usage (request_id, user_id, key_id, model, prompt_hash, prompt_tokens,
                       completion_tokens, cached, latency_ms, status, worker, created_at, cost, currency, org_id)
    SELECT DISTINCT ON (request_id) request_id, user_id, key_id, model, prompt_hash, prompt_tokens,
           completion_tokens, cached, latency_ms, status, worker, at, cost, currency, org_id
    FROM priced JOIN claimed USING (request_id)
    RETURNING request_id, user_id, key_id, created_at, model, prompt_tokens, completion_tokens, cached, status,
              cost, currency, org_id
), daily AS (
    INSERT INTO usage_daily AS d (user_id, key_id, day, requests, prompt_tokens,
                                  completion_tokens, errors, cache_hits)
    SELECT user_id, key_id, (created_at AT TIME ZONE 'UTC')::date, count(*),
           sum(prompt_tokens), sum(completion_tokens),
           count(*) FILTER (WHERE status <> 'ok'), count(*) FILTER (WHERE cached)
    FROM inserted GROUP BY 1, 2, 3
    ON CONFLICT (user_id, day, (COALESCE(key_id, 0))) DO UPDATE SET
        requests = d.requests + EXCLUDED.requests,
        prompt_tokens = d.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
        errors = d.errors + EXCLUDED.errors,
        cache_hits = d.cache_hits + EXCLUDED.cache_hits
), costs AS (
    INSERT INTO usage_daily_costs AS c (user_id, key_id, day, model, currency, requests, cost, unpriced,
                                        prompt_tokens, completion_tokens, org_id)
    SELECT user_id, key_id, (created_at AT TIME ZONE 'UTC')::date, model, COALESCE(currency, ''),
           count(*), COALESCE(sum(cost), 0), count(*) FILTER (WHERE cost IS NULL),
           sum(prompt_tokens), sum(completion_tokens), org_id
    FROM inserted GROUP BY 1, 2, 3, 4, 5, 11  -- org_id follows from key_id: no more rows
    ON CONFLICT (user_id, day, (COALESCE(key_id, 0)), model, currency) DO UPDATE SET
        requests = c.requests + EXCLUDED.requests,
        cost = c.cost + EXCLUDED.cost,
        unpriced = c.unpriced + EXCLUDED.unpriced,
        prompt_tokens = c.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = c.completion_tokens + EXCLUDED.completion_tokens
)
SELECT (SELECT count(*) FROM accepted) AS accepted, (SELECT count(*) FROM inserted) AS inserted,
       (SELECT array_agg(DISTINCT user_id) FROM accepted) AS user_ids,
       (SELECT array_agg(DISTINCT key_id) FROM accepted WHERE key_id IS NOT NULL) AS key_ids,
       -- Only asked for (`$15`) when the batch holds dead letters: they are written for these.
       CASE WHEN $15::bool THEN (SELECT array_agg(request_id) FROM inserted) END AS inserted_ids
"""

_DAILY = """
SELECT d.day, d.key_id, k.name AS key_name, k.prefix AS key_prefix, d.requests,
       d.prompt_tokens, d.completion_tokens, d.errors, d.cache_hits
FROM usage_daily d LEFT JOIN api_keys k ON k.id = d.key_id
WHERE d.user_id = $1 AND d.day BETWEEN $2 AND $3
ORDER BY d.day, d.key_id NULLS FIRST
"""

_COSTS = """
SELECT c.day, c.key_id, c.model, c.currency, c.requests, c.cost, c.unpriced
FROM usage_daily_costs c
WHERE c.user_id = $1 AND c.day BETWEEN $2 AND $3
ORDER BY c.day, c.key_id NULLS FIRST, c.model, c.currency
"""

_RECENT = """
SELECT u.created_at, u.model, u.prompt_tokens, u.completion_tokens, u.cached, u.latency_ms,
       u.status, k.name AS key_name, k.prefix AS key_prefix
FROM usage u LEFT JOIN api_keys k ON k.id = u.key_id
WHERE u.user_id = $1
ORDER BY u.created_at DESC
LIMIT $2
"""

# A report: per period (the start of its UTC day, ISO week (Monday) or month) and, with `$5`,
# per model, key or member, one row per currency ('' for requests without a price). `$1`: the
# users whose usage counts (NULL: everyone's); `$6`: only what is attributed to that organisation
# (NULL: wherever it was made). A user's report: [the user], NULL; an organisation's: its
# members' usage of its keys, or one member's ([the member], the organisation).
# `day::timestamp`, not `day`: a date would be cast to timestamptz, in the session's time zone.
_REPORT = """
SELECT date_trunc($4, c.day::timestamp)::date AS period,
       CASE WHEN $5 = 'model' THEN c.model END AS model,
       CASE WHEN $5 = 'key' THEN c.key_id END AS key_id,
       CASE WHEN $5 = 'key' THEN k.name END AS key_name,
       CASE WHEN $5 = 'member' THEN c.user_id END AS user_id,
       CASE WHEN $5 = 'member' THEN u.username END AS username,
       c.currency, sum(c.requests) AS requests, sum(c.prompt_tokens) AS prompt_tokens,
       sum(c.completion_tokens) AS completion_tokens, sum(c.cost) AS cost, sum(c.unpriced) AS unpriced
FROM usage_daily_costs c LEFT JOIN api_keys k ON k.id = c.key_id LEFT JOIN users u ON u.id = c.user_id
WHERE ($1::bigint[] IS NULL OR c.user_id = ANY($1::bigint[])) AND ($6::bigint IS NULL OR c.org_id = $6)
  AND c.day BETWEEN $2 AND $3
GROUP BY 1, 2, 3, 4, 5, 6, 7
ORDER BY 1, 2, 3 NULLS FIRST, 6, 7
"""

# Users ranked per currency by cost, then requests (then id, so ties are stable); the
# requests without a price form the currency '' and rank by requests alone.
_TOP_SPENDERS = """
WITH per_user AS (
    SELECT c.user_id, c.currency, sum(c.requests) AS requests, sum(c.prompt_tokens) AS prompt_tokens,
           sum(c.completion_tokens) AS completion_tokens, sum(c.cost) AS cost, sum(c.unpriced) AS unpriced
    FROM usage_daily_costs c
    WHERE c.day BETWEEN $1 AND $2
    GROUP BY 1, 2
), ranked AS (
    SELECT p.*, row_number() OVER (PARTITION BY p.currency
                                   ORDER BY p.cost DESC, p.requests DESC, p.user_id) AS rank
    FROM per_user p
)
SELECT r.*, u.username FROM ranked r JOIN users u ON u.id = r.user_id
WHERE r.rank <= $3
ORDER BY r.currency = '', r.currency, r.rank
"""

# Distinct users over both windows in one pass over the last 24 hours.
_ACTIVE_USERS = """
SELECT count(DISTINCT user_id) FILTER (WHERE created_at >= now() - interval '1 hour') AS last_hour,
       count(DISTINCT user_id) AS last_day
FROM usage WHERE created_at >= now() - interval '24 hours'
"""


@unavailable_when_down()
class UsageStore:
    """The usage tables, over an asyncpg pool; the reports over `reports_pool` (default: `pool`)."""

    def __init__(self, pool: asyncpg.Pool, reports_pool: Reader | None = None) -> None:
        self.pool = pool
        self.reports_pool: Reader = pool if reports_pool is None else reports_pool

    async def record(self, records: list[UsageRecord]) -> dict[str, int]:
        """Store a batch; how many were new, already known, or rejected."""
        return (await self.record_naming(records))[0]

    async def record_naming(self, records: list[UsageRecord]) -> tuple[dict[str, int], list[int], list[int]]:
        """Store a batch: the counts of `record`, and the users and keys of its accepted records
        (new or already known: a batch retried after a crash is looked at again, see alerts.py)."""
        if not records:
            return {"inserted": 0, "duplicates": 0, "rejected": 0}, [], []
        columns = list(zip(*(
            (r.request_id, r.user_id, r.key_id, r.model, r.prompt_hash, r.prompt_tokens,
             r.completion_tokens, r.cached, r.latency_ms, r.status, r.worker, r.created_at, r.cost, r.currency)
            for r in records
        )))
        if any(is_dead(r) for r in records):
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(_RECORD, *(list(c) for c in columns), True)
                new = set(row["inserted_ids"] or ())
                await write_dead_letters(conn, [r for r in records if r.request_id in new])
        else:
            row = await self.pool.fetchrow(_RECORD, *(list(c) for c in columns), False)
        accepted, inserted = row["accepted"], row["inserted"]
        counts = {"inserted": inserted, "duplicates": accepted - inserted, "rejected": len(records) - accepted}
        return counts, list(row["user_ids"] or []), list(row["key_ids"] or [])

    async def daily(self, user_id: int, start: date, end: date) -> list[asyncpg.Record]:
        """Per day and per key, from `start` to `end` inclusive (UTC days)."""
        return await self.reports_pool.fetch(_DAILY, user_id, start, end)

    async def costs(self, user_id: int, start: date, end: date) -> list[asyncpg.Record]:
        """Cost per day, key, model and currency ('' for unpriced requests), `start` to `end` inclusive."""
        return await self.reports_pool.fetch(_COSTS, user_id, start, end)

    async def report(self, user_ids: list[int] | None, start: date, end: date, period: str,
                     by: str | None, *, org_id: int | None = None) -> list[asyncpg.Record]:
        """Per `period` ('day', 'week', 'month') and `by` (None, 'model', 'key', 'member') and
        currency, the usage of `user_ids` (None: anyone's) attributed to `org_id` (None: wherever
        made) from `start` to `end` inclusive (UTC days)."""
        return await self.reports_pool.fetch(_REPORT, user_ids, start, end, period, by, org_id)

    async def top_spenders(self, start: date, end: date, limit: int) -> list[asyncpg.Record]:
        """The `limit` first users of each currency by cost, then requests, `start` to `end` inclusive."""
        return await self.reports_pool.fetch(_TOP_SPENDERS, start, end, limit)

    async def recent(self, user_id: int, limit: int) -> list[asyncpg.Record]:
        """A user's latest requests, newest first."""
        return await self.pool.fetch(_RECENT, user_id, limit)

    async def active_users(self) -> dict[str, int]:
        """Distinct users with a usage record in the last hour and the last 24 hours."""
        row = await self.pool.fetchrow(_ACTIVE_USERS)
        return {"1h": row["last_hour"], "24h": row["last_day"]}
