"""Long leases on a real PostgreSQL (services/gateway/README.md, "Long leases"): a key far
from its limit keeps one lease across requests seconds apart (no grant, no return); as
the key nears its limit its long leases are recalled and the limit is still hit exactly,
over two gateways; a crashed gateway's long lease comes back within the documented bound."""

from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import AsyncExitStack

import pytest

from shared.errors import RateLimited
from services.gateway.fleet import Fleet
from services.gateway.quota import Quota, Scope
from services.gateway.quota.leases import window_of
from services.gateway.store import QuotaStore

pytestmark = pytest.mark.db

TTL = 0.5  #: the short lease's life: the tests' requests come further apart than this
HEARTBEAT = 0.2
DEAD_AFTER = 1.0
GRACE = 0.2




class Counted(QuotaStore):
    """The real store, counting the writer's transactions (turns) and what they carried."""

    def __init__(self, store: QuotaStore) -> None:
        super().__init__(store._pool)
        self.calls = {"turns": 0, "releases": 0, "grants": 0, "claims": 0}

    async def turn(self, gateway, incarnation, ttl, live, now, releases, items, claims, **options):
        self.calls["turns"] += 1
        for name, batch in (("releases", releases), ("grants", items), ("claims", claims)):
            self.calls[name] += len(batch)
        return await super().turn(gateway, incarnation, ttl, live, now, releases, items, claims, **options)


async def keeper(stack: AsyncExitStack | None, store: QuotaStore, name: str, **options) -> Quota:
    """A gateway's quota and fleet loops (heartbeat, recalls, janitor), timings shrunk."""
    options = {"lease_ttl": TTL, "long_lease_ttl": 10.0, "recall_wait": HEARTBEAT, **options}
    quota = Quota(store, gateway=name, incarnation=secrets.token_hex(4), **options)
    fleet = Fleet(store, gateway=name, incarnation=quota.incarnation, on_live=quota.set_live,
                  on_recalled=quota.recalled, heartbeat_interval=HEARTBEAT, dead_after=DEAD_AFTER,
                  janitor_interval=0.1, grace=GRACE)
    quota.fleet = fleet  # type: ignore[attr-defined]
    if stack is None:  # to be crashed: never left cleanly
        await quota.__aenter__()
        await fleet.__aenter__()
    else:
        await stack.enter_async_context(fleet)
        await stack.enter_async_context(quota)
    return quota


def crash(quota: Quota) -> None:
    """Stop a keeper the way kill -9 would: no settling, no giving back, no heartbeat."""
    quota.halt()
    quota.fleet.halt()  # type: ignore[attr-defined]


def requests(user: int, per_month: int) -> list[Scope]:
    return [Scope(f"u:{user}", {"requests_per_hour": None, "requests_per_month": per_month,
                                "tokens_per_month": None})]


async def granted(store: QuotaStore, user: int) -> int:
    window = window_of("requests_per_month")
    return (await store.counters(f"u:{user}", [("requests_per_month", window.start)], time.time()))[
        "requests_per_month"]


async def one(quota: Quota, scopes: list[Scope], deadline: float = 5.0) -> bool:
    """One request through `quota`, settled at once: admitted or refused."""
    try:
        admission = await quota.admit(scopes, 1, deadline=time.monotonic() + deadline)
    except RateLimited:
        return False
    quota.settle(admission, 1)
    return True


async def test_a_key_far_from_its_limit_keeps_its_lease_across_requests_seconds_apart(store):
    counted = Counted(store)
    scopes = requests(1, 1_000_000)
    async with AsyncExitStack() as stack:
        quota = await keeper(stack, counted, "gw-a")
        leases = []
        for _ in range(4):  # 3.6 s: over seven short TTLs
            assert await one(quota, scopes)
            leases.append(quota._book.state(quota.needs(scopes, 1)[0][0].key).lease)  # the open lease
            await asyncio.sleep(1.2)
        # One transaction (one grant) for the four requests, claimed 8 requests ahead, nothing given back.
        assert counted.calls == {"turns": 1, "releases": 0, "grants": 1, "claims": 0}
        assert len({lease.id for lease in leases}) == 1 and leases[0].long and not leases[0].expired
        row = await store._pool.fetchrow(
            "SELECT long, claimed, expires_at - now() AS left FROM quota_leases WHERE id = $1", leases[0].id)
        assert row["long"] and row["claimed"] == 8 and row["left"].total_seconds() > 5
        # A key near its limit (a share of 1/4 of what is left) gets short leases, as before.
        near = requests(2, 100)
        assert await one(quota, near)
        assert not quota._book.state(quota.needs(near, 1)[0][0].key).lease.long
    assert await granted(store, 1) == 4  # closing gave back every unused unit


async def test_an_idle_long_lease_is_recalled_and_another_gateway_gets_the_last_units_exactly(store):
    scopes = requests(3, 200)
    async with AsyncExitStack() as stack:
        # Leases of 10 at most: far (long) while 8 x 2 gateways x 10 are left after the grant.
        a = await keeper(stack, store, "gw-a", max_lease=10)
        b = await keeper(stack, store, "gw-b", max_lease=10)
        await asyncio.sleep(HEARTBEAT * 2)  # both see 2 live gateways
        assert await one(a, scopes)
        lease = a._book.state(a.needs(scopes, 1)[0][0].key).lease
        assert lease.long and lease.units == 10 and lease.used == 1
        # All further traffic goes to b: it drains the key; a's idle units must come back to it.
        admitted = refused = 0
        started = time.monotonic()
        while refused < 8:
            results = await asyncio.gather(*(one(b, scopes) for _ in range(16)))
            admitted += sum(results)
            refused += len(results) - sum(results)
        assert admitted == 199  # every unit but the one a used: nothing stranded in a's long lease
        assert lease.expired and not lease.long  # recalled through a's heartbeat, given back
        assert await granted(store, 3) == 200
        assert time.monotonic() - started < 10
        assert not await one(a, scopes, deadline=1.0)


async def test_two_gateways_under_concurrency_admit_exactly_the_limit_through_long_leases(store):
    scopes = requests(4, 300)
    async with AsyncExitStack() as stack:
        quotas = [await keeper(stack, store, name, max_lease=5) for name in ("gw-a", "gw-b")]
        await asyncio.sleep(HEARTBEAT * 2)
        first = [await one(q, scopes) for q in quotas]  # far: each gateway opens a long lease
        assert all(first) and all(q._book.state(q.needs(scopes, 1)[0][0].key).lease.long for q in quotas)
        results = await asyncio.gather(*(one(quotas[i % 2], scopes) for i in range(398)))
        assert sum(results) + 2 == 300 and len(results) - sum(results) == 100
        assert await granted(store, 4) == 300
        # Near the limit every long lease was recalled: none is left in the database.
        assert await store._pool.fetchval("SELECT count(*) FROM quota_leases WHERE long") == 0


async def test_a_crashed_gateways_long_lease_is_reclaimed_within_the_bound(store):
    far, near = requests(5, 1_000_000), requests(6, 400)  # far while 8 x 3 live x 10 are left
    async with AsyncExitStack() as stack:
        survivor = await keeper(stack, store, "gw-live", max_lease=10)
        # Two gateways that will crash: one whose long leases live 30 s, one 2 s.
        slow = await keeper(None, store, "gw-dead-30", max_lease=10, long_lease_ttl=30.0)
        quick = await keeper(None, store, "gw-dead-2", max_lease=10, long_lease_ttl=2.0)
        await asyncio.sleep(HEARTBEAT * 2)
        assert await one(slow, near) and await one(quick, far)
        leases = [q._book.state(q.needs(s, 1)[0][0].key).lease for q, s in ((slow, near), (quick, far))]
        assert all(lease.long and lease.claimed == 8 for lease in leases)
        crash(slow)
        crash(quick)
        died = time.monotonic()
        await asyncio.sleep(DEAD_AFTER + 0.6)
        assert await granted(store, 5) == 10  # dead, but its far lease is not over: nobody needs it
        # Near its limit: the survivor drains the key and so recalls the dead gateway's
        # 30 s lease; the janitor gives its unclaimed units back once the owner is dead
        # (DEAD_AFTER), not at the end of its long life. What it may have used (its
        # claim, 8) stays counted; every other unit is admitted.
        admitted = 0
        while admitted < 400 - 8:
            assert time.monotonic() - died < DEAD_AFTER + TTL + HEARTBEAT + GRACE + 3.0, "never reclaimed"
            admitted += sum(await asyncio.gather(*(one(survivor, near, deadline=2.0) for _ in range(16))))
        assert admitted == 400 - 8 and await granted(store, 6) == 400
        # Far from its limit: nobody needs the units, the 2 s lease runs out and the janitor
        # takes back the unclaimed ones within max(long TTL + grace, DEAD_AFTER) of the crash.
        while await granted(store, 5) != 8:
            assert time.monotonic() - died < max(2.0 + GRACE, DEAD_AFTER) + 1.5, "never reclaimed"
            await asyncio.sleep(0.1)
