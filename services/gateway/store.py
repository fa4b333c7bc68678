"""All of the gateway's SQL: quota counters, leases, gateway heartbeats.

The arithmetic that must be atomic lives in PL/pgSQL functions of the
migrations (`quota_grant`, `quota_claim`, `quota_release`, `quota_orphan`,
and `quota_turn`, a writer turn's first three in one transaction): each locks
counter rows in key order, each before the lease rows of its key, so
concurrent gateways and janitors never deadlock, and each is one round trip
for a whole batch of keys. A database
that cannot be reached is `UNAVAILABLE` (retryable), never `INTERNAL`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from shared.db import unavailable_when_down

__all__ = ["MIGRATIONS", "Beat", "Claim", "Grant", "GrantItem", "PriorLease", "QuotaStore", "Released", "Turn"]

MIGRATIONS = Path(__file__).with_name("migrations")


@dataclass(frozen=True, slots=True)
class GrantItem:
    """Ask for units of one (subject, counter, window) key."""

    subject: str
    counter: str
    window_start: datetime
    limit: int
    unit_us: int  #: a rolling counter's microseconds per unit; 0 for a calendar window
    need: int  #: at least this many, or nothing
    most: int  #: at most this many
    lease_id: int | None  #: top up this lease of ours, or None for a new one
    claim: int  #: the lease's `claimed` after the grant (capped by its units)
    claim_long: int = 0  #: ... if the lease is (or becomes) a long one (README.md, "Long leases")


@dataclass(frozen=True, slots=True)
class Grant:
    """What one `GrantItem` got; `added == 0` is a refusal."""

    lease_id: int | None
    added: int
    units: int
    claimed: int
    granted: int  #: the counter's `granted` after this grant, fleet-wide
    limit: int
    others_units: int  #: on refusal: units other gateways hold in unexpired leases
    others_expiry: datetime | None  #: ... and when the last of those leases expires
    long: bool = False  #: the lease lives the long TTL (a key far from its limit)


@dataclass(frozen=True, slots=True)
class Released:
    lease_id: int
    returned: int
    granted: int


@dataclass(frozen=True, slots=True)
class Claim:
    lease_id: int
    claimed: int
    orphaned: bool


@dataclass(frozen=True, slots=True)
class Turn:
    """What one writer turn (`QuotaStore.turn`) got: returns, grants (in item order), claims."""

    released: list[Released]
    grants: list[Grant]
    claims: list[Claim]


@dataclass(frozen=True, slots=True)
class Beat:
    """What a heartbeat learns: the live gateways (itself included) and which of
    its long leases were recalled (their keys near their limits: give them back)."""

    live: int
    recalled: list[int]


@dataclass(frozen=True, slots=True)
class PriorLease:
    """A lease of this gateway from an earlier run (found at start)."""

    lease_id: int
    subject: str
    counter: str
    window_start: datetime
    units: int
    claimed: int


@unavailable_when_down("the quota database is unreachable")
class QuotaStore:
    """The quota tables of the gateway database."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def grant(
        self, gateway: str, incarnation: str, ttl: float, live: int, now: float, items: Sequence[GrantItem],
        *, long_ttl: float = 0.0, recall: float = 1.0,
    ) -> list[Grant]:
        """Grant units for every item (sorted by key: the lock order), in one transaction;
        results in item order. `now` (epoch seconds, the gateway's clock) is what rolling
        counters drain by. A key far from its limit gets a lease of `long_ttl` (0: never);
        one near it recalls the long leases of every gateway, which then expire within
        `ttl` + `recall` (their owners' heartbeat interval)."""
        rows = await self._pool.fetch(
            "SELECT * FROM quota_grant($1, $2, $3, $4, $5, $6, $7, $8::text[], $9::text[], $10::timestamptz[],"
            " $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[],"
            " $17::bigint[])",
            gateway, incarnation, int(ttl * 1000), int(long_ttl * 1000), int(recall * 1000), live,
            int(now * 1_000_000),
            [i.subject for i in items], [i.counter for i in items], [i.window_start for i in items],
            [i.limit for i in items], [i.unit_us for i in items], [i.need for i in items],
            [i.most for i in items], [i.lease_id for i in items], [i.claim for i in items],
            [i.claim_long for i in items],
        )
        rows = sorted(rows, key=lambda r: r["idx"])
        return [
            Grant(r["lease_id"], r["added"], r["units"], r["claimed"], r["granted"], r["limit_value"],
                  r["others_units"], r["others_expiry"], r["long"])
            for r in rows
        ]

    async def turn(
        self, gateway: str, incarnation: str, ttl: float, live: int, now: float,
        releases: Sequence[tuple[int, int, bool]], items: Sequence[GrantItem], claims: Sequence[tuple[int, int]],
        *, long_ttl: float = 0.0, recall: float = 1.0,
    ) -> Turn:
        """One writer turn in one transaction: give back (lease id, units it keeps, close
        it), then grant `items` (sorted by key), then raise claims (lease id, target) --
        as `release`, `grant` and `claim` do, each key's counter row locked first."""
        rows = await self._pool.fetch(
            "SELECT * FROM quota_turn($1, $2, $3, $4, $5, $6, $7, $8::bigint[], $9::bigint[], $10::boolean[],"
            " $11::text[], $12::text[], $13::timestamptz[], $14::bigint[], $15::bigint[], $16::bigint[],"
            " $17::bigint[], $18::bigint[], $19::bigint[], $20::bigint[], $21::bigint[], $22::bigint[])",
            gateway, incarnation, int(ttl * 1000), int(long_ttl * 1000), int(recall * 1000), live,
            int(now * 1_000_000),
            [r[0] for r in releases], [r[1] for r in releases], [r[2] for r in releases],
            [i.subject for i in items], [i.counter for i in items], [i.window_start for i in items],
            [i.limit for i in items], [i.unit_us for i in items], [i.need for i in items],
            [i.most for i in items], [i.lease_id for i in items], [i.claim for i in items],
            [i.claim_long for i in items],
            [c[0] for c in claims], [c[1] for c in claims],
        )
        grants = sorted((r for r in rows if r["kind"] == "g"), key=lambda r: r["idx"])
        return Turn(
            [Released(r["lease_id"], r["returned"], r["granted"]) for r in rows if r["kind"] == "r"],
            [Grant(r["lease_id"], r["added"], r["units"], r["claimed"], r["granted"], r["limit_value"],
                   r["others_units"], r["others_expiry"], r["long"]) for r in grants],
            [Claim(r["lease_id"], r["claimed"], r["orphaned"]) for r in rows if r["kind"] == "c"],
        )

    async def release(self, ids: Sequence[int], used: Sequence[int], close: Sequence[bool]) -> list[Released]:
        """Cut each lease to `used` units (and delete it when `close`), returning the rest."""
        rows = await self._pool.fetch(
            "SELECT * FROM quota_release($1::bigint[], $2::bigint[], $3::boolean[])",
            list(ids), list(used), list(close),
        )
        return [Released(r["lease_id"], r["returned"], r["granted"]) for r in rows]

    async def claim(self, ids: Sequence[int], targets: Sequence[int]) -> list[Claim]:
        """Raise each lease's `claimed` towards its target (never past its units)."""
        rows = await self._pool.fetch(
            "SELECT * FROM quota_claim($1::bigint[], $2::bigint[])", list(ids), list(targets))
        return [Claim(r["lease_id"], r["claimed"], r["orphaned"]) for r in rows]

    async def heartbeat(self, gateway: str, incarnation: str, dead_after: float) -> Beat:
        """Record that this gateway lives; the live gateways and its recalled long leases."""
        row = await self._pool.fetchrow(
            """
            WITH beat AS (
                INSERT INTO gateways (id, incarnation) VALUES ($1, $2)
                ON CONFLICT (id) DO UPDATE SET incarnation = EXCLUDED.incarnation, last_seen = now()
                RETURNING id
            )
            SELECT (SELECT 1 + count(*) FROM gateways
                    WHERE id <> $1 AND last_seen > now() - $3 * interval '1 millisecond') AS live,
                   (SELECT coalesce(array_agg(l.id), '{}') FROM quota_leases l
                    WHERE l.gateway = $1 AND l.incarnation = $2 AND l.recalled_at IS NOT NULL
                      AND l.orphaned_at IS NULL) AS recalled
            """,
            gateway, incarnation, int(dead_after * 1000),
        )
        return Beat(row["live"], list(row["recalled"]))

    async def leave(self, gateway: str, incarnation: str) -> None:
        """A clean stop: this gateway no longer counts as live."""
        await self._pool.execute("DELETE FROM gateways WHERE id = $1 AND incarnation = $2", gateway, incarnation)

    async def prior_leases(self, gateway: str, incarnation: str) -> list[PriorLease]:
        """This gateway's leases from earlier runs (orphaned or not)."""
        rows = await self._pool.fetch(
            "SELECT id, subject, counter, window_start, units, claimed FROM quota_leases"
            " WHERE gateway = $1 AND incarnation <> $2"
            " ORDER BY subject COLLATE \"C\", counter COLLATE \"C\", window_start, id",
            gateway, incarnation,
        )
        return [PriorLease(r["id"], r["subject"], r["counter"], r["window_start"], r["units"], r["claimed"])
                for r in rows]

    async def orphan(self, dead_after: float, grace: float, limit: int = 1000) -> list[tuple[int, str, int]]:
        """The janitor: give back the never-claimed units of dead gateways' expired leases."""
        rows = await self._pool.fetch(
            "SELECT * FROM quota_orphan($1, $2, $3)", int(dead_after * 1000), int(grace * 1000), limit
        )
        return [(r["lease_id"], r["gateway"], r["returned"]) for r in rows]

    async def counters(self, subject: str, keys: Sequence[tuple[str, datetime]], now: float) -> dict[str, int]:
        """Units outstanding of each (counter, window) of a subject, 0 for keys never used;
        a rolling counter's at `now` (epoch seconds)."""
        rows = await self._pool.fetch(
            """
            SELECT x.counter,
                   CASE WHEN q.unit_us > 0 THEN GREATEST(0, (q.tat - $4 + q.unit_us - 1) / q.unit_us)
                        ELSE coalesce(q.granted, 0) END AS granted
            FROM unnest($2::text[], $3::timestamptz[]) AS x(counter, window_start)
            LEFT JOIN quota_counters q
              ON q.subject = $1 AND q.counter = x.counter AND q.window_start = x.window_start
            """,
            subject, [k[0] for k in keys], [k[1] for k in keys], int(now * 1_000_000),
        )
        return {r["counter"]: r["granted"] for r in rows}

    async def prune(self, before: datetime, orphan_retention: float) -> tuple[int, int]:
        """Forget windows that started before `before` and orphans nobody came back for."""
        async with self._pool.acquire() as conn:
            leases = await conn.execute(
                "DELETE FROM quota_leases WHERE orphaned_at < now() - $1 * interval '1 millisecond'",
                int(orphan_retention * 1000),
            )
            # Past calendar windows; rolling counters drained for an hour with no lease.
            counters = await conn.execute(
                "DELETE FROM quota_counters q WHERE (q.unit_us = 0 AND q.window_start < $1)"
                " OR (q.unit_us > 0 AND q.tat < $2 AND q.updated_at < now() - interval '1 hour'"
                "     AND NOT EXISTS (SELECT 1 FROM quota_leases l WHERE l.subject = q.subject"
                "                     AND l.counter = q.counter AND l.window_start = q.window_start))",
                before, int(time.time() * 1_000_000) - 3_600_000_000)
        return int(leases.split()[-1]), int(counters.split()[-1])
