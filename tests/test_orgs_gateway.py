"""An organisation's shared limit enforced by real gateway processes, exactly, across gateways.

Real auth (in this process, on PostgreSQL), two gateway processes, a worker. An
organisation of three members, each with a key of it, and 6 requests a month
for all of them together: however the requests of the three keys are spread
over both gateways, exactly 6 are admitted, and each refusal names the scope
"org" (the members' own tier limits are far above). Raising the limit reaches
both gateways within a second, and so does a member's removal: their key of
the organisation is refused everywhere. A money budget of the organisation is
shared the same way: $0.05 a month, a cent a request, five requests.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio

from decimal import Decimal

from shared.errors import RateLimited, Unauthenticated
from shared.rpc import Connection
from auth_support import PASSWORD
from gateway_support import infer, running_mesh
from waiting import wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.stack]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pg_server, tmp_path_factory):
    async with running_mesh(pg_server, tmp_path_factory.mktemp("gw-orgs"), workers=1) as running:
        running.ollama.token_delay = running.ollama.prefill_delay = 0.0
        yield running


async def _org_keys(mesh, names: list[str], per_month: int | None = None,
                   limits: dict | None = None) -> tuple[int, str, list[str]]:
    """An organisation owned by the first of `names`, the others members; (its id, the owner's
    token, a key of it per member)."""
    auth = mesh.client.mesh("auth")
    tokens = []
    for name in names:
        await auth.call("auth.register", {"username": name, "email": f"{name}@example.com", "password": PASSWORD})
        tokens.append((await auth.call("auth.login", {"username_or_email": name, "password": PASSWORD}))["token"])
    org = (await auth.call("auth.create_org", {"token": tokens[0], "name": f"{names[0]}-co"}))["id"]
    for name, token in zip(names[1:], tokens[1:]):
        invite = await auth.call("auth.invite", {"token": tokens[0], "org": org, "username": name})
        await auth.call("auth.answer_invite", {"token": token, "invite_id": invite["id"], "accept": True})
    await auth.call("auth.set_org_limits", {"token": tokens[0], "org": org,
                                            "limits": limits or {"requests_per_month": per_month}})
    keys = [(await auth.call("auth.create_key", {"token": t, "name": "work", "org": org}))["api_key"] for t in tokens]
    return org, tokens[0], keys


async def _admitted(connection: Connection, api_key: str) -> bool:
    try:
        return bool((await infer(connection, api_key, max_tokens=2))[-1]["done"])
    except RateLimited as refusal:
        assert refusal.data["scope"] == "org", refusal.data
        assert refusal.data["counter"] == "requests_per_month", refusal.data
        return False


async def test_three_members_share_the_orgs_six_requests_across_both_gateways(mesh):
    org, owner, keys = await _org_keys(mesh, ["orla", "oscar", "otto"], per_month=6)
    gateways = await mesh.gateways()
    assert len(gateways) == 2
    # 18 requests, each key on both gateways, all at once: exactly 6 admitted.
    calls = [_admitted(gateways[i % 2], keys[i % 3]) for i in range(18)]
    admitted = sum(await asyncio.gather(*calls))
    assert admitted == 6
    for connection in gateways:  # and none more later, on either gateway, with any key
        for key in keys:
            assert not await _admitted(connection, key)

    auth = mesh.client.mesh("auth")
    await auth.call("auth.set_org_limits", {"token": owner, "org": org, "limits": {"requests_per_month": 7}})
    raised = time.monotonic()
    await wait_until(lambda: _admitted(gateways[0], keys[1]), 1.5, interval=0.02,
                     message="a gateway kept the organisation's old limit")
    assert time.monotonic() - raised <= 1.5
    assert not await _admitted(gateways[1], keys[2])  # the 7th was the last


async def test_a_removed_members_key_is_refused_by_every_gateway_within_a_second(mesh):
    org, owner, keys = await _org_keys(mesh, ["rhea", "rufus"], per_month=100)
    gateways = await mesh.gateways()
    for connection in gateways:  # both hold the key's answer
        assert await _admitted(connection, keys[1])
    await mesh.client.mesh("auth").call("auth.remove_member", {"token": owner, "org": org, "user": "rufus"})
    removed = time.monotonic()

    async def refused(connection: Connection) -> bool:
        try:
            await _admitted(connection, keys[1])
        except Unauthenticated:
            return True
        return False

    await asyncio.gather(*(wait_until(lambda c=c: refused(c), 1.5, interval=0.02,
                                      message="a gateway still admits a removed member's key") for c in gateways))
    assert time.monotonic() - removed <= 1.5
    assert await _admitted(gateways[0], keys[0])  # the owner's key of it is untouched


async def test_three_members_share_the_orgs_money_budget_to_the_cent(mesh):
    auth = mesh.client.mesh("auth")  # the operator: prices without a token
    # 8 tokens of output at 1250 a million, the prompt free: a request costs exactly $0.01.
    await auth.call("auth.set_price", {"model": "m1", "input": "0", "output": "1250"})
    gateways = await mesh.gateways()
    probe = await mesh.user("penny")  # a personal key: learning the price spends nothing of the org's

    async def priced(connection: Connection) -> bool:  # each gateway polls the prices every second
        return receipt_cost(await infer(connection, probe.api_key, max_tokens=8)) == Decimal("0.01")

    for connection in gateways:
        await wait_until(lambda c=connection: priced(c), 10, interval=0.1, message="a gateway never charged")
    org, owner, keys = await _org_keys(mesh, ["mona", "milo", "mira"], limits={"spend_per_month": "0.05"})

    async def spend(i: int) -> bool:
        try:
            return receipt_cost(await infer(gateways[i % 2], keys[i % 3], max_tokens=8)) == Decimal("0.01")
        except RateLimited as refusal:
            assert (refusal.data["scope"], refusal.data["counter"]) == ("org", "spend_per_month"), refusal.data
            return False

    assert sum(await asyncio.gather(*(spend(i) for i in range(15)))) == 5

    async def reported() -> bool:  # the gateways ship usage records in batches, a moment after the reply
        report = await auth.call("auth.org_report", {"token": owner, "org": org, "by": "member"})
        return report["totals"]["cost"] == {"USD": "0.0500000000"}

    await wait_until(reported, 10, interval=0.1, message="the org's reported cost never came to $0.05")


def receipt_cost(chunks: list[dict]) -> Decimal | None:
    """The cost a final chunk's receipt states, None without a price (its payload read, not
    verified: other tests do that)."""
    import base64

    import msgpack

    payload = chunks[-1]["receipt"].split(".")[1]
    cost = msgpack.unpackb(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["cost"]
    return None if cost is None else Decimal(cost)
