"""Key-affine gateways on a real mesh (services/gateway/README.md, "Key-affine
gateways"): 3 gateway processes, 1 inference worker process, auth and a DHT seed
in the test process, PostgreSQL. Requests sent as the web service and the CLI
send them (`GatewayClient`) land, for one key, all on one gateway -- the one
rendezvous hashing names -- and for different keys on different gateways; when
a key's gateway is killed, its requests succeed at its next-highest gateway,
and they come back once it has restarted. Where a request landed is read from
each gateway's `gateway.health` request counts."""

from __future__ import annotations

from collections import Counter

import pytest
import pytest_asyncio

from shared.dht import Provider, service_topic
from shared.rpc.mesh import rendezvous
from services.gateway.client import GatewayClient, caller_affinity
from gateway_support import MODEL, GatewayMesh, running_mesh
from waiting import wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.stack]

TOPIC = service_topic("gateway")
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pg_server, tmp_path_factory):
    async with running_mesh(pg_server, tmp_path_factory.mktemp("affine"), workers=1, gateways=3) as running:
        running.ollama.token_delay = running.ollama.prefill_delay = 0.0
        yield running


async def served(mesh: GatewayMesh) -> Counter[str]:
    """Each live gateway's requests so far, by name."""
    counts: Counter[str] = Counter()
    for name in [n for n, child in mesh.children.items() if child.kind == "gateway"]:
        health = await (await mesh.gateway(name)).call("gateway.health", {}, timeout=5.0)
        counts[name] = sum(health["requests"].values())
    return counts


async def landed(mesh: GatewayMesh, before: Counter[str], count: int) -> Counter[str]:
    """Where the last `count` requests landed, by gateway (waiting for their counts)."""
    async def settled() -> Counter[str] | None:
        now = await served(mesh)
        moved = Counter({name: now[name] - before[name] for name in now if now[name] > before[name]})
        return moved if moved.total() >= count else None

    return await wait_until(settled, 10.0, interval=0.05, message=f"{count} requests never counted")


async def live_gateways(mesh: GatewayMesh) -> dict[str, Provider]:
    """The live gateway processes' records, by name."""
    names = {c.ready["endpoint"]: n for n, c in mesh.children.items() if c.kind == "gateway"}
    mesh.client.discovery.forget(TOPIC)
    return {names[p.endpoint]: p for p in await mesh.wait_for(TOPIC, len(names)) if p.endpoint in names}


def expected(gateways: dict[str, Provider], affinity: bytes | None) -> str:
    """The gateway rendezvous hashing names for `affinity`."""
    assert affinity is not None
    chosen = rendezvous(list(gateways.values()), affinity)
    return next(name for name, provider in gateways.items() if provider == chosen)


async def requests(client: GatewayClient, count: int, **caller: str) -> None:
    for _ in range(count):
        async with await client.infer(model=MODEL, messages=MESSAGES, max_tokens=4, timeout=30.0, **caller) as stream:
            chunks = [chunk async for chunk in stream]
        assert chunks[-1].get("done"), chunks[-1]


async def test_one_keys_requests_all_land_on_its_gateway_and_keys_spread(mesh):
    client = GatewayClient.of(mesh.client.mesh)
    gateways = await live_gateways(mesh)
    used: Counter[str] = Counter()
    for i in range(9):
        user = await mesh.user(f"spread{i}")
        before = await served(mesh)
        await requests(client, 6, api_key=user.api_key)
        where = await landed(mesh, before, 6)
        assert where == Counter({expected(gateways, caller_affinity(api_key=user.api_key)): 6}), where
        used.update(where)
        if i == 0:  # a session token goes by its user: every token of the user to one gateway
            before = await served(mesh)
            await requests(client, 3, token=user.token)
            assert await landed(mesh, before, 3) == Counter({expected(gateways, caller_affinity(token=user.token)): 3})
    assert len(used) >= 2, f"nine keys all on one gateway of three: {used}"


async def test_a_keys_requests_move_to_its_next_gateway_when_its_own_is_killed_and_come_back(mesh):
    client = GatewayClient.of(mesh.client.mesh)
    user = await mesh.user("failover")
    affinity = caller_affinity(api_key=user.api_key)
    gateways = await live_gateways(mesh)
    own = expected(gateways, affinity)
    before = await served(mesh)
    await requests(client, 3, api_key=user.api_key)
    assert await landed(mesh, before, 3) == Counter({own: 3})

    mesh.kill(own)  # kill -9: its record stays in the DHT until it expires
    rest = {name: provider for name, provider in gateways.items() if name != own}
    before = await served(mesh)
    await requests(client, 5, api_key=user.api_key)  # every one succeeds
    assert await landed(mesh, before, 5) == Counter({expected(rest, affinity): 5})

    await mesh.restart_gateway(own)  # the same data directory: the same node key
    await live_gateways(mesh)

    async def back_home() -> bool:
        before = await served(mesh)
        await requests(client, 1, api_key=user.api_key)
        return own in await landed(mesh, before, 1)

    await wait_until(back_home, 30.0, interval=0.2, message=f"the key never came back to {own}")
