"""Priority at the gateway: when it is full, a higher tier's request overtakes lower ones.

Real auth, a worker (Ollama backend against tests/ollama_server.py, slow to start
each answer) and a gateway process that keeps one request at workers at once
(INFERSWARM_GATEWAY_MAX_IN_FLIGHT=1). While a request holds that slot, two
free-tier requests wait at the gateway, then a pro-tier one arrives: when the slot
frees, the pro request goes first, then the free ones in their order -- as the
model server sees them arrive. A request that waits past its deadline is a typed
TIMEOUT, and the gateway's health shows what waits.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from shared.errors import Timeout
from shared.dht import service_topic
from auth_support import PASSWORD
from gateway_support import infer, running_mesh
from waiting import wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.stack]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pg_server, tmp_path_factory):
    async with running_mesh(pg_server, tmp_path_factory.mktemp("gw-priority"), workers=1, gateways=0) as running:
        await running.start_gateway("g1", INFERSWARM_GATEWAY_MAX_IN_FLIGHT="1")
        await running.wait_for(service_topic("gateway"), 1)
        yield running


def _asked(server) -> list[str]:
    """What each request the model server received asked, in arrival order."""
    return [body["messages"][-1]["content"] for path, body in server.requests if path == "/api/chat"]


async def test_a_higher_tier_overtakes_lower_ones_waiting_at_the_gateway(mesh):
    auth = mesh.client.mesh("auth")
    free, pro = await mesh.user("freya"), await mesh.user("prosper")
    await mesh.user("ada")
    await auth.call("auth.grant_admin", {"user": "ada", "reason": "test"})  # as the operator grants it
    admin = await auth.call("auth.login", {"username_or_email": "ada", "password": PASSWORD})
    await auth.call("auth.set_tier", {"token": admin["token"], "user": "prosper", "tier": "pro"})
    connection = (await mesh.gateways())[0]
    mesh.ollama.prefill_delay = 0.4  # each answer holds the gateway's one slot a while
    mesh.ollama.token_delay = 0.0

    def ask(user, text: str):
        return asyncio.create_task(infer(connection, user.api_key, messages=[{"role": "user", "content": text}],
                                         max_tokens=1))

    async def waiting(count: int) -> bool:
        health = await connection.call("gateway.health")
        return health["dispatch"]["waiting"] == count

    first = len(_asked(mesh.ollama))
    blocker = ask(free, "block")
    await wait_until(lambda: "block" in _asked(mesh.ollama), 10)
    lows = [ask(free, "free-1")]
    await wait_until(lambda: waiting(1), 10)
    lows.append(ask(free, "free-2"))
    await wait_until(lambda: waiting(2), 10)
    high = ask(pro, "pro")
    await wait_until(lambda: waiting(3), 10)
    await asyncio.gather(blocker, high, *lows)
    seen = [t for t in _asked(mesh.ollama)[first:] if t in ("block", "free-1", "free-2", "pro")]
    assert seen == ["block", "pro", "free-1", "free-2"]
    health = await connection.call("gateway.health")
    assert health["dispatch"]["waited"] >= 3 and health["dispatch"]["in_flight"] == 0


async def test_waiting_past_the_deadline_is_a_typed_timeout(mesh):
    user = await mesh.user("tess")
    connection = (await mesh.gateways())[0]
    mesh.ollama.prefill_delay = 2.0
    blocker = asyncio.create_task(infer(connection, user.api_key, max_tokens=1))
    try:
        async def holding() -> bool:
            return (await connection.call("gateway.health"))["dispatch"]["in_flight"] == 1

        await wait_until(holding, 10)
        with pytest.raises(Timeout) as late:
            await infer(connection, user.api_key, max_tokens=1, timeout=0.5)
        assert late.value.code == "TIMEOUT"
    finally:
        await blocker
        mesh.ollama.prefill_delay = 0.0
