"""Spending alerts on a real mesh: auth (in this process, on PostgreSQL), two gateway processes,
three workers (ollama backends against tests/ollama_server.py), and a real HTTP receiver.

The operator prices the model so that each request costs exactly $0.01 (8 completion tokens at
1250 per million, the prompt free); a key with a $0.10 monthly budget is used through both
gateways until they refuse it. The receiver gets exactly three webhooks -- 50, 80 and 100 % --
each once, each validly signed; the key's alerts say the same.
"""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import pytest
import pytest_asyncio

from shared.errors import RateLimited
from shared.receipts import Receipt, verify
from shared.webhooks import SIGNATURE_HEADER, verify_signature
from gateway_support import MODEL, infer, running_mesh
from waiting import wait_until
from webhook_support import Receiver

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.stack]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pg_server, tmp_path_factory):
    auth = {"webhook_allow_private": True, "webhook_poll_interval": 0.1}  # the receiver is on loopback
    async with running_mesh(pg_server, tmp_path_factory.mktemp("gw-alerts"), auth=auth) as running:
        running.ollama.token_delay = running.ollama.prefill_delay = 0.0
        yield running


async def test_a_ten_cent_budget_spent_a_cent_at_a_time_sends_three_signed_webhooks(mesh):
    auth = mesh.client.mesh("auth")  # the operator: sets prices without a token
    await auth.call("auth.set_price", {"model": MODEL, "input": "0", "output": "1250"})
    owner = await mesh.user("alba")
    key = await auth.call("auth.create_key", {"token": owner.token, "name": "capped",
                                              "limits": {"spend_per_month": "0.10"}})
    gateways = await mesh.gateways()
    async with Receiver() as receiver:
        hook = await auth.call("auth.set_webhook", {"token": owner.token, "url": receiver.url})
        await _until_priced(mesh, gateways, owner.api_key)
        served = 0
        for i in range(20):
            try:
                final = (await infer(gateways[i % 2], key["api_key"], max_tokens=8))[-1]
            except RateLimited as refusal:
                assert refusal.data["scope"] == "key" and refusal.data["counter"] == "spend_per_month"
                break
            receipt = _receipt(mesh, final)
            assert receipt.completion_tokens == 8 and Decimal(receipt.cost) == Decimal("0.01")
            served += 1
        assert served == 10
        await mesh.records_settle(owner.id, 10 + 2)  # and the two pricing probes of the owner's other key
        await wait_until(lambda: _settled(mesh.auth_dsn, 3), 20, message="three deliveries never settled")
        assert len(receiver.hits) == 3
        assert sorted(hit.event["data"]["threshold"] for hit in receiver.hits) == [50, 80, 100]
        for hit in receiver.hits:
            assert verify_signature(hook["secret"], hit.headers[SIGNATURE_HEADER], hit.body)
            data = hit.event["data"]
            assert (data["scope"], data["id"], data["counter"], data["budget"]) == (
                "key", key["id"], "spend_per_month", "0.10")
            assert Decimal(data["spent"]) * 100 >= Decimal("0.10") * data["threshold"]
        alerts = await auth.call("auth.alerts", {"token": owner.token})
        # Records arrive in batches: an alert's `spent` is the spend when its batch was stored.
        assert [a["threshold"] for a in alerts["alerts"]] == [100, 80, 50]
        assert alerts["alerts"][0]["spent"] == "0.10" and {a["scope"] for a in alerts["alerts"]} == {"key"}


async def _until_priced(mesh, gateways, api_key: str) -> None:
    """Each gateway charges the new price (they poll auth's price table every second)."""
    for connection in gateways:
        async def priced() -> bool:
            receipt = _receipt(mesh, (await infer(connection, api_key, max_tokens=1))[-1])
            return receipt.cost is not None and Decimal(receipt.cost) > 0
        await wait_until(priced, 10, interval=0.1, message="a gateway never charged the price")


def _receipt(mesh, final: dict) -> Receipt:
    return verify(final["receipt"], [c.ready["id"] for c in mesh.children.values() if c.kind == "gateway"])


async def _settled(dsn: str, count: int) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'") >= count
    finally:
        await conn.close()

