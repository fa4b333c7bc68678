"""The gateway's limits on a real PostgreSQL: several `Quota` keepers (as several
gateways) sharing one database admit exactly the limit under concurrency, hold
and settle token reservations, wait for each other's leases, and a crashed
keeper's leases come back through the janitor and, exactly, through its journal."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from contextlib import AsyncExitStack

import pytest

from shared.errors import RateLimited
from services.gateway.fleet import Fleet
from services.gateway.quota.leases import window_of
from services.gateway.quota import Quota, Scope
from services.gateway.recovery import close_earlier_leases
from services.gateway.store import QuotaStore

pytestmark = pytest.mark.db

RPH = {"requests_per_hour": 20, "requests_per_month": None, "tokens_per_month": None}




async def keeper(stack: AsyncExitStack, store: QuotaStore, name: str, **options) -> Quota:
    quota = Quota(store, gateway=name, incarnation=secrets.token_hex(4), **options)
    await stack.enter_async_context(quota)
    quota.fleet = Fleet(store, gateway=name, incarnation=quota.incarnation, on_live=quota.set_live,
                        heartbeat_interval=0.2, dead_after=1.0, janitor_interval=0.2, grace=0.2)
    await stack.enter_async_context(quota.fleet)
    return quota


def crash(quota: Quota) -> None:
    """Stop a keeper the way kill -9 would: no settling, no giving back, no heartbeat."""
    quota.halt()
    fleet = getattr(quota, "fleet", None)
    if fleet is not None:
        fleet.halt()


async def granted(store: QuotaStore, user_id: int, counter: str) -> int:
    window = window_of(counter)
    return (await store.counters(f"u:{user_id}", [(counter, window.start)], time.time()))[counter]


def scoped(user_id: int, limits: dict) -> list[Scope]:
    """A user's limits as the one scope a request answers to."""
    return [Scope(f"u:{user_id}", limits)]


async def hammer(quotas: list[Quota], user_id: int, limits: dict, callers: int, tokens: int = 1,
                 work: float = 0.01) -> tuple[int, int]:
    """`callers` requests at once, spread over the keepers: (admitted, refused)."""
    admitted = refused = 0

    async def one(i: int) -> None:
        nonlocal admitted, refused
        quota = quotas[i % len(quotas)]
        try:
            admission = await quota.admit(scoped(user_id, limits), tokens, deadline=time.monotonic() + 5)
        except RateLimited as exc:
            refused += 1
            assert exc.data["retry_after"] >= 1 and "rate_limit" in exc.data
            return
        admitted += 1
        await asyncio.sleep(random.uniform(0, work))
        quota.settle(admission, tokens)

    await asyncio.gather(*(one(i) for i in range(callers)))
    return admitted, refused


async def test_two_gateways_admit_exactly_the_limit_under_64_concurrent_callers(store):
    async with AsyncExitStack() as stack:
        quotas = [await keeper(stack, store, "gw-a"), await keeper(stack, store, "gw-b")]
        admitted, refused = await hammer(quotas, 1, RPH, 64)
        assert (admitted, refused) == (20, 44)
        assert await granted(store, 1, "requests_per_hour") == 20
        assert quotas[0].facts(scoped(1, RPH))["requests_per_hour"]["remaining"] == 0
        # Later requests are refused at once: nobody holds anything that could come back.
        start = time.monotonic()
        assert await hammer(quotas, 1, RPH, 8) == (0, 8)
        assert time.monotonic() - start < 0.5


async def test_far_from_the_limit_leases_keep_the_database_off_the_path(store):
    limits = {"requests_per_hour": None, "requests_per_month": 100_000, "tokens_per_month": None}
    async with AsyncExitStack() as stack:
        quota = await keeper(stack, store, "gw-a", max_lease=500)
        calls = 0
        original = store.turn

        async def counting(*args, **kwargs):
            nonlocal calls
            calls += bool(args[6])  # a turn with grants (its items)
            return await original(*args, **kwargs)

        store.turn = counting
        for _ in range(10):
            assert await hammer([quota], 2, limits, 50, work=0) == (50, 0)
        assert calls <= 3
        await quota.close()
        assert await granted(store, 2, "requests_per_month") == 500  # every unused unit came back


async def test_tokens_are_reserved_settled_and_released(store):
    limits = {"requests_per_hour": None, "requests_per_month": None, "tokens_per_month": 1000}
    async with AsyncExitStack() as stack:
        a, b = await keeper(stack, store, "gw-a"), await keeper(stack, store, "gw-b")
        first = await a.admit(scoped(3, limits), 600, deadline=time.monotonic() + 5)
        with pytest.raises(RateLimited):  # 600 reserved on a; 600 more do not fit
            await b.admit(scoped(3, limits), 600, deadline=time.monotonic() + 2)
        a.settle(first, 150)  # used 150: 450 go back to a's lease, and to the fleet when it expires
        second = await b.admit(scoped(3, limits), 600, deadline=time.monotonic() + 5)
        failed = await a.admit(scoped(3, limits), 200, deadline=time.monotonic() + 5)
        a.release(failed)  # failed before generating: nothing kept
        b.settle(second, 600)
        with pytest.raises(RateLimited) as too_big:
            await a.admit(scoped(3, limits), 1001, deadline=time.monotonic() + 1)
        assert "limit is 1000" in too_big.value.message
        await asyncio.sleep(a.ttl + 0.3)  # leases expire and are trimmed
        assert await granted(store, 3, "tokens_per_month") == 750
        facts = await a.snapshot(scoped(3, limits))
        assert facts["tokens_per_month"]["remaining"] == 250
        assert facts["requests_per_hour"]["limit"] is None and facts["requests_per_hour"]["remaining"] is None


async def test_a_refused_request_waits_for_another_gateways_unused_lease(store):
    limits = {"requests_per_hour": 16, "requests_per_month": None, "tokens_per_month": None}
    async with AsyncExitStack() as stack:
        a, b = await keeper(stack, store, "gw-a"), await keeper(stack, store, "gw-b")
        held = await a.admit(scoped(4, limits), 1, deadline=time.monotonic() + 5)
        lease_units = held.parts[0].lease.units  # an eighth of what is left (2 gateways)
        assert lease_units > 1
        a.settle(held, 1)
        others = [await b.admit(scoped(4, limits), 1, deadline=time.monotonic() + 5) for _ in range(16 - lease_units)]
        start = time.monotonic()
        # b is refused by the database, but a's unused units come back within a lease's life.
        late = await b.admit(scoped(4, limits), 1, deadline=time.monotonic() + 5)
        assert time.monotonic() - start < a.ttl + 0.3
        for admission in [*others, late]:
            b.settle(admission, 1)
        assert await granted(store, 4, "requests_per_hour") <= 16


async def test_the_janitor_reclaims_a_crashed_gateways_unclaimed_units(store):
    limits = {"requests_per_hour": None, "requests_per_month": 1000, "tokens_per_month": None}
    async with AsyncExitStack() as stack:
        survivor = await keeper(stack, store, "gw-live")
        crashed = await keeper(AsyncExitStack(), store, "gw-dead", claim_horizon=0.0)
        taken = [await crashed.admit(scoped(5, limits), 1, deadline=time.monotonic() + 5) for _ in range(3)]
        lease = taken[0].parts[0].lease
        assert lease.units > lease.claimed >= 3
        before = await granted(store, 5, "requests_per_month")
        crash(crashed)
        deadline = time.monotonic() + 5
        while await granted(store, 5, "requests_per_month") == before:
            assert time.monotonic() < deadline, "the janitor never came"
            await asyncio.sleep(0.1)
        # What the crashed gateway may have used (its claim) stays counted; the rest is back.
        assert await granted(store, 5, "requests_per_month") == lease.claimed
        assert survivor is not None


async def test_a_restarted_gateway_gives_back_exactly_what_its_journal_says_was_unused(store):
    limits = {"requests_per_hour": None, "requests_per_month": 1000, "tokens_per_month": None}
    async with AsyncExitStack() as stack:
        old = Quota(store, gateway="gw-r", incarnation="before")
        await old.__aenter__()  # never left: it crashes
        taken = [await old.admit(scoped(6, limits), 1, deadline=time.monotonic() + 5) for _ in range(5)]
        old.settle(taken[0], 1)
        old.release(taken[1])  # failed: not used
        crash(old)
        lease = taken[0].parts[0].lease
        assert await granted(store, 6, "requests_per_month") == lease.units
        new = await keeper(stack, store, "gw-r")
        prior = await store.prior_leases("gw-r", new.incarnation)
        # From the journal: requests 0, 2, 3, 4 used a unit (2-4 were cut by the crash).
        returned = await close_earlier_leases(store, prior, {lease.id: 4}, {lease.id})
        assert returned == lease.units - 4
        assert await granted(store, 6, "requests_per_month") == 4
