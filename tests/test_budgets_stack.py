"""Money budgets and per-key limits on a real mesh: auth (in this process, on PostgreSQL),
two gateway processes, three workers (ollama backends against tests/ollama_server.py).

* a key with a $1.00 monthly budget, 200 concurrent requests through both gateways:
  it ends at most $1.00 spent and at least $0.99, the refusals say why, and each
  receipt's cost is its record's;
* a price changed mid-run (scheduled two seconds ahead): each record is priced at
  the version in force at its start, both versions are seen;
* a key's own request limit binds before its user's, and another key of the user
  is not held by it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg
import pytest
import pytest_asyncio

from shared.errors import RateLimited
from shared.receipts import Receipt, verify
from gateway_support import MODEL, GatewayMesh, infer, running_mesh
from waiting import wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.stack]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pg_server, tmp_path_factory):
    async with running_mesh(pg_server, tmp_path_factory.mktemp("gw-budgets")) as running:
        running.ollama.token_delay = running.ollama.prefill_delay = 0.0
        yield running


def receipt_of(mesh: GatewayMesh, final: dict) -> Receipt:
    """The final chunk's receipt, checked against the gateways' announced keys."""
    return verify(final["receipt"], [c.ready["id"] for c in mesh.children.values() if c.kind == "gateway"])


async def new_key(mesh: GatewayMesh, token: str, name: str, limits: dict) -> dict:
    return await mesh.client.mesh("auth").call("auth.create_key", {"token": token, "name": name, "limits": limits})


async def records(mesh: GatewayMesh, key_id: int) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(mesh.auth_dsn)
    try:
        return await conn.fetch("SELECT request_id, status, cost, currency, created_at, prompt_tokens,"
                                " completion_tokens FROM usage WHERE key_id = $1", key_id)
    finally:
        await conn.close()


async def test_a_one_dollar_budget_hit_by_200_concurrent_requests_through_two_gateways(mesh):
    auth = mesh.client.mesh("auth")  # the operator: sets prices without a token
    # 8 tokens of output at 1237.5 per million: $0.0099; the prompt at 0.5 per million: a few millionths.
    await auth.call("auth.set_price", {"model": MODEL, "input": "0.5", "output": "1237.5"})
    # The free tier's 100 requests an hour would bind first: only the money budget is under test.
    await auth.call("auth.set_tier_limits", {"name": "free", "limits": {"requests_per_hour": 100_000}})
    owner = await mesh.user("bud")
    key = await new_key(mesh, owner.token, "one dollar", {"spend_per_month": "1.00"})
    gateways = await mesh.gateways()
    await _until_priced(mesh, owner.api_key, "0.5", "1237.5")  # the gateways poll the prices every second

    outcomes: list[list[dict] | RateLimited] = []

    async def one(i: int) -> None:
        try:
            outcomes.append(await infer(gateways[i % 2], key["api_key"], max_tokens=8))
        except RateLimited as refusal:
            outcomes.append(refusal)

    await asyncio.gather(*(one(i) for i in range(200)))
    served = [o for o in outcomes if isinstance(o, list)]
    refusals = [o for o in outcomes if isinstance(o, RateLimited)]
    assert len(served) + len(refusals) == 200 and 90 <= len(served) <= 101, len(served)
    for refusal in refusals:
        assert refusal.data["counter"] == "spend_per_month" and refusal.data["scope"] == "key", refusal.data
        assert "budget of 1.00" in refusal.message and "may cost up to" in refusal.message
    rows = await _settled(mesh, key["id"], 200)
    spent = sum((r["cost"] for r in rows if r["cost"] is not None), Decimal(0))
    assert Decimal("0.99") <= spent <= Decimal("1.00"), spent
    assert {r["currency"] for r in rows if r["status"] == "ok"} == {"USD"}
    by_id = {r["request_id"]: r for r in rows}
    for chunks in served:
        receipt = receipt_of(mesh, chunks[-1])
        assert Decimal(receipt.cost) == by_id[receipt.request_id]["cost"] > 0  # what the customer was told
    # Once the gateways' leases are back, the fleet-wide count is exactly what was spent.
    connection = gateways[0]

    async def left() -> bool:
        facts = (await connection.call("gateway.quota", {"api_key": key["api_key"]}))["rate_limit"]
        return facts["spend_per_month"]["remaining"] == str(Decimal("1.00") - spent).rstrip("0")

    await wait_until(left, 10, interval=0.2, message="the budget's count is not what was spent")


async def test_a_price_changed_mid_run_prices_each_record_at_the_price_of_its_moment(mesh):
    auth = mesh.client.mesh("auth")
    model_price = {"model": MODEL, "input": "1", "output": "10"}
    await auth.call("auth.set_price", model_price)
    user = await mesh.user("petra")
    gateways = await mesh.gateways()
    await _until_priced(mesh, user.api_key, "1", "10")
    switch = datetime.now(timezone.utc) + timedelta(seconds=2)
    await auth.call("auth.set_price", {**model_price, "output": "20", "effective_from": switch.isoformat()})
    costs: dict[str, tuple[float, Decimal, int, int]] = {}
    started = time.monotonic()
    while time.monotonic() - started < 4.5:  # from two seconds before the switch to two after
        for connection in gateways:
            final = (await infer(connection, user.api_key, max_tokens=3))[-1]
            receipt = receipt_of(mesh, final)
            costs[receipt.request_id] = (receipt.at, Decimal(receipt.cost), receipt.prompt_tokens,
                                         receipt.completion_tokens)
    before = [c for c in costs.values() if c[0] < switch.timestamp()]
    after = [c for c in costs.values() if c[0] >= switch.timestamp()]
    assert before and after, "the run did not cross the price change"
    for at, cost, prompt, completion in costs.values():
        if abs(at - switch.timestamp()) < 0.001:  # a receipt's `at` has milliseconds: either price fits
            continue
        output = 10 if at < switch.timestamp() else 20
        assert cost == (Decimal(prompt) + Decimal(completion * output)) / 1_000_000, (at, switch)
    rows = {r["request_id"]: r for r in await _settled(mesh, user.key_id, len(costs), costs)}
    assert {request_id: rows[request_id]["cost"] for request_id in costs} == {i: c[1] for i, c in costs.items()}


async def test_a_keys_own_limit_binds_and_spares_the_users_other_keys(mesh):
    user = await mesh.user("kira")
    capped = await new_key(mesh, user.token, "three a month", {"requests_per_month": 3})
    connection = (await mesh.gateways())[0]
    for _ in range(3):
        assert (await infer(connection, capped["api_key"], max_tokens=1))[-1]["done"]
    with pytest.raises(RateLimited) as refused:
        await infer((await mesh.gateways())[1], capped["api_key"], max_tokens=1)
    assert refused.value.data["scope"] == "key" and refused.value.data["counter"] == "requests_per_month"
    assert (await infer(connection, user.api_key, max_tokens=1))[-1]["done"]  # the user's other key
    quota = await connection.call("gateway.quota", {"api_key": capped["api_key"]})
    assert quota["rate_limit"]["requests_per_month"] == {**quota["rate_limit"]["requests_per_month"],
                                                         "limit": 3, "remaining": 0, "used": 3, "scope": "key"}


async def _until_priced(mesh: GatewayMesh, api_key: str, input: str, output: str) -> None:
    """Every gateway charges by the price set (it polls auth's price table each second)."""
    deadline = time.monotonic() + 10
    for connection in await mesh.gateways():
        while True:
            receipt = receipt_of(mesh, (await infer(connection, api_key, max_tokens=1))[-1])
            expected = (receipt.prompt_tokens * Decimal(input) + receipt.completion_tokens * Decimal(output)) / 10**6
            if receipt.cost is not None and Decimal(receipt.cost) == expected:
                break
            assert time.monotonic() < deadline, "a gateway never charged the price"
            await asyncio.sleep(0.1)


async def _settled(mesh: GatewayMesh, key_id: int, count: int, ids: Iterable[str] = ()) -> list[asyncpg.Record]:
    """The key's usage records once at least `count` are stored, `ids` among them."""
    wanted = set(ids)
    deadline = time.monotonic() + 15
    while len(rows := await records(mesh, key_id)) < count or not wanted <= {r["request_id"] for r in rows}:
        assert time.monotonic() < deadline, f"{len(rows)} of {count} usage records shipped"
        await asyncio.sleep(0.1)
    return rows


async def test_a_request_without_max_tokens_gets_what_the_budget_can_pay_for(mesh):
    """No hidden cap: a request that leaves max_tokens to the model is not refused by a budget that
    cannot pay for the model's maximum, but gets the output the budget can pay for."""
    auth = mesh.client.mesh("auth")
    await auth.call("auth.set_price", {"model": MODEL, "input": "0", "output": "1000"})  # 0.001 a token
    user = await mesh.user("rory")
    key = await new_key(mesh, user.token, "five cents", {"spend_per_day": "0.05"})
    await _until_priced(mesh, user.api_key, "0", "1000")
    chunks = await infer((await mesh.gateways())[0], key["api_key"], max_tokens=None)
    final = chunks[-1]
    assert final["usage"]["completion_tokens"] == 50, final["usage"]  # 0.05 / 0.001, the prompt free
    assert Decimal(receipt_of(mesh, final).cost) == Decimal("0.05")
    assert final["rate_limit"]["spend_per_day"]["remaining"] == "0.00"
    with pytest.raises(RateLimited) as spent:
        await infer((await mesh.gateways())[1], key["api_key"], max_tokens=None)
    assert spent.value.data["counter"] == "spend_per_day"
