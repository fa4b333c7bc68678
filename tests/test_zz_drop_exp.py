import asyncio, secrets, time
from contextlib import AsyncExitStack
import pytest, pytest_asyncio, zmq.asyncio
from shared.rpc import Connection
from shared.identity import CurveKeyPair
from nacl.public import PrivateKey
from gateway_support import MODEL, GatewayMesh, gateway_databases

pytestmark = pytest.mark.asyncio(loop_scope="module")

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pg_server, tmp_path_factory):
    async with gateway_databases(pg_server) as dsns, AsyncExitStack() as stack:
        yield await GatewayMesh(stack, tmp_path_factory.mktemp("drop"), *dsns).start(workers=2, gateways=1)

async def test_drop(mesh):
    users = [await mesh.user(f"dropper{i}") for i in range(4)]
    boss = await mesh.user("dropboss")
    auth = mesh.client.mesh("auth")
    await auth.call("auth.grant_admin", {"user": "dropboss"})
    for i in range(4):
        await auth.call("auth.set_tier", {"token": boss.token, "user": f"dropper{i}", "tier": "unlimited"})
    import random
    mesh.ollama.token_delay = 0.05
    gw = (await mesh.gateways())[0]
    ctx = zmq.asyncio.Context()
    provider = [p for p in await mesh.wait_for("inferswarm/gateway/v1", 1)][0]
    for round_ in range(3):
        conns = []
        tasks = []
        for i in range(64):
            keys = CurveKeyPair.from_private(PrivateKey.generate())
            c = Connection(provider.endpoint, provider.curve_key, keys, context=ctx); c.open(); conns.append(c)
            async def one(c=c, u=users[i % 4]):
                s = await c.stream("gateway.infer", {"api_key": u.api_key, "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}, timeout=30)
                async for ch in s:
                    pass
            tasks.append(asyncio.create_task(one()))
        async def cancel_later(t):
            await asyncio.sleep(random.random() * 0.6)
            t.cancel()
        await asyncio.gather(*(cancel_later(t) for t in tasks))
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns: await c.close()
    await asyncio.sleep(1)
    log = (mesh.root / "g1.log").read_text()
    print("ALREADY", log.count("already running"), "lines", len(log.splitlines()))
    print(log[-3000:])
