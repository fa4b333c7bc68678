"""A tier's limits changed by an administrator reach real gateway processes within a second.

Real auth (in this process, on PostgreSQL), two gateway processes, a worker. The free
tier's requests per month lowered below what a user has used: both gateways refuse the
user's next request within about a second, by the new limit, whether it comes with an
API key (the validator's key cache) or a session token (the gateway's token cache);
raised again, both admit it as fast.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio

from shared.errors import RateLimited
from shared.rpc import Connection
from gateway_support import infer, running_mesh
from waiting import wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.stack]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pg_server, tmp_path_factory):
    async with running_mesh(pg_server, tmp_path_factory.mktemp("gw-tiers"), workers=1) as running:
        running.ollama.token_delay = running.ollama.prefill_delay = 0.0
        yield running


async def _admitted(connection: Connection, api_key: str) -> bool:
    try:
        return bool((await infer(connection, api_key, max_tokens=2))[-1]["done"])
    except RateLimited as refusal:
        assert refusal.data["counter"] == "requests_per_month", refusal.data
        return False


async def _month_limit(connection: Connection, token: str) -> int | None:
    quota = await connection.call("gateway.quota", {"token": token})
    return quota["rate_limit"]["requests_per_month"]["limit"]


async def test_a_lowered_limit_is_enforced_by_every_gateway_within_a_second(mesh):
    user = await mesh.user("tess")
    auth = mesh.client.mesh("auth")  # the operator (the mesh secret): no token needed
    gateways = await mesh.gateways()
    for connection in gateways:  # both gateways hold the user's key and session with the defaults
        assert await _admitted(connection, user.api_key)
        assert await _month_limit(connection, user.token) == 3000

    await auth.call("auth.set_tier_limits", {"name": "free", "limits": {"requests_per_month": 1}})
    lowered = time.monotonic()

    async def refused(connection: Connection) -> bool:
        return not await _admitted(connection, user.api_key)

    await asyncio.gather(*(wait_until(lambda c=c: refused(c), 1.5, interval=0.02,
                                      message="a gateway admitted by the old limit") for c in gateways))
    assert time.monotonic() - lowered <= 1.5
    for connection in gateways:  # the session token's cached answer was dropped too
        assert await _month_limit(connection, user.token) == 1

    await auth.call("auth.set_tier_limits", {"name": "free", "limits": {"requests_per_month": 3000}})
    raised = time.monotonic()
    await asyncio.gather(*(wait_until(lambda c=c: _admitted(c, user.api_key), 1.5, interval=0.02,
                                      message="a gateway refused by the old limit") for c in gateways))
    assert time.monotonic() - raised <= 1.5
