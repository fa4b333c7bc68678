"""Scopes, rolling hours and money budgets in the gateway's limits, on a real PostgreSQL:
several `Quota` keepers (as several gateways) share one database.

* an hourly limit is a rolling window (GCRA): 200 requests across the turn of
  the hour admit 100, not 200, and `retry_after` is when the next one fits;
* every scope of a request binds: a key's limit and its user's, the tighter wins;
* a money budget is reserved (worst case) and settled (actual cost) like tokens,
  never overspent by concurrency across gateways.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from contextlib import AsyncExitStack
from decimal import Decimal

import pytest

from shared.errors import RateLimited
from shared.pricing import UNITS, Price
from services.gateway.quota import Quota, Scope
from services.gateway.quota.leases import window_of
from services.gateway.store import QuotaStore

pytestmark = pytest.mark.db




class Clock:
    """Wall-clock time from `start` on, moved ahead by `skip` (shared by the keepers, as NTP would be)."""

    def __init__(self, start: float) -> None:
        self._start, self._origin, self.skipped = start, time.monotonic(), 0.0

    def __call__(self) -> float:
        return self._start + (time.monotonic() - self._origin) + self.skipped


async def keepers(stack: AsyncExitStack, store: QuotaStore, count: int, **options) -> list[Quota]:
    quotas = []
    for i in range(count):
        quota = Quota(store, gateway=f"gw-{i}-{secrets.token_hex(3)}", incarnation=secrets.token_hex(4), **options)
        quotas.append(await stack.enter_async_context(quota))
        quota.set_live(count)
    return quotas


async def test_an_hourly_limit_rolls_across_the_hour_instead_of_resetting(store):
    user = [Scope("u:101", {"requests_per_hour": 100})]
    next_hour = (int(time.time()) // 3600 + 1) * 3600
    clock = Clock(next_hour - 2)  # hh:59:58
    async with AsyncExitStack() as stack:
        quotas = await keepers(stack, store, 2, clock=clock)
        admitted, refusals = 0, []

        async def one(i: int) -> None:
            nonlocal admitted
            try:
                admission = await quotas[i % 2].admit(user, 1, deadline=time.monotonic() + 5)
            except RateLimited as exc:
                refusals.append(exc)
                return
            admitted += 1
            quotas[i % 2].settle(admission, 1)

        tasks = []
        for i in range(200):  # 200 requests from :59:58 to :00:02, through both gateways
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)
        assert clock() > next_hour + 1.5, "the run did not cross the hour"
        assert admitted == 100, f"{admitted} admitted across the turn of the hour"
        assert len(refusals) == 100
        last = refusals[-1]
        assert last.data["counter"] == "requests_per_hour" and last.data["scope"] == "user"
        # One request is worth 36 s of an hour's 100: that is when the next one fits.
        assert 30 <= last.data["retry_after"] <= 36, last.data
        facts = last.data["rate_limit"]["requests_per_hour"]
        assert facts["limit"] == 100 and facts["remaining"] == 0 and facts["reset"] > clock() + 3000
        clock.skipped += last.data["retry_after"]
        await quotas[0].close()  # the leases go back: what is left is what the window drained
        await quotas[1].close()
        quotas = await keepers(stack, store, 2, clock=clock)
        fresh = await quotas[0].admit(user, 1, deadline=time.monotonic() + 5)
        quotas[0].settle(fresh, 1)
        with pytest.raises(RateLimited):
            await quotas[1].admit(user, 1, deadline=time.monotonic() + 2)


async def test_a_key_and_its_user_both_bind_the_tighter_first(store):
    month = {"requests_per_month": 10}
    keys = [[Scope(f"k:{k}", {"requests_per_month": 6}), Scope("u:202", month)] for k in (1, 2)]
    async with AsyncExitStack() as stack:
        a, b = await keepers(stack, store, 2)
        for _ in range(6):
            a.settle(await a.admit(keys[0], 1, deadline=time.monotonic() + 5), 1)
        with pytest.raises(RateLimited) as by_key:
            await b.admit(keys[0], 1, deadline=time.monotonic() + 3)
        assert by_key.value.data["scope"] == "key" and "the key's requests_per_month" in by_key.value.message
        for _ in range(4):  # the second key has 6, but its user only 4 left
            b.settle(await b.admit(keys[1], 1, deadline=time.monotonic() + 5), 1)
        with pytest.raises(RateLimited) as by_user:
            await a.admit(keys[1], 1, deadline=time.monotonic() + 3)
        assert by_user.value.data["scope"] == "user"
        facts = by_user.value.data["rate_limit"]["requests_per_month"]
        assert facts["remaining"] == 0 and facts["scope"] == "user" and facts["limit"] == 10


async def test_a_money_budget_is_never_overspent_by_two_gateways(store):
    """$1.00 a month; each request may cost up to $0.012 and costs what it really used;
    clients keep asking until refused for good: the budget ends between $0.988 and $1.00."""
    price = Price("m", Decimal("300"), Decimal("1200"), None, "USD", 0.0)  # per million tokens
    budget = [Scope("k:303", {"spend_per_month": 1 * UNITS}), Scope("u:303", {})]
    worst = price.worst(8, 8)  # prompt bound 8, max_tokens 8: 8 x 300 + 8 x 1200 = $0.012
    assert worst == 12 * UNITS // 1000
    spent: list[int] = []
    refusals: list[RateLimited] = []
    async with AsyncExitStack() as stack:
        quotas = await keepers(stack, store, 2)

        async def client(i: int) -> None:
            rng = random.Random(i)
            quota = quotas[i % 2]
            while True:
                try:
                    admission = await quota.admit(budget, 16, spend=worst, deadline=time.monotonic() + 5)
                except RateLimited as exc:
                    refusals.append(exc)
                    return
                await asyncio.sleep(rng.uniform(0, 0.01))
                used = price.units(rng.randint(4, 8), rng.randint(1, 8))
                spent.append(used)
                quota.settle(admission, 16, used)

        await asyncio.gather(*(client(i) for i in range(200)))
        total = Decimal(sum(spent)) / UNITS
        assert Decimal("0.988") <= total <= 1, total
        refusal = refusals[-1]
        assert refusal.data["counter"] == "spend_per_month" and refusal.data["scope"] == "key"
        assert "may cost up to 0.012" in refusal.message and "budget of 1.00" in refusal.message
        for quota in quotas:
            await quota.close()
        window = window_of("spend_per_month")
        granted = await store.counters("k:303", [("spend_per_month", window.start)], time.time())
        assert granted["spend_per_month"] == sum(spent)  # exactly what was settled stays counted
