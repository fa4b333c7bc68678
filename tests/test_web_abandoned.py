"""Callers that leave mid-request leave nothing held (the hang bench/peer_litellm.py found).

Under wrk, whose connections close mid-request at the end of every run, the stack
used to stop answering after 10-20 thousand requests: requests cancelled before
their server task first ran left their handlers suspended for good (shared/rpc/eager.py),
holding a worker's upstream HTTP connections and slots and a gateway's admissions.
Here, on a whole stack (`inferswarm up`, the worker's `openai` backend calling the
OpenAI test server), hundreds of streamed and plain /v1 requests are abandoned at
once or after their first bytes, many at a time; then a request is answered at
once, and the gateway and the worker come back to nothing in flight, every slot
free. The deterministic case (a request and its cancel in one frame) is in
test_rpc_eager.py.
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from shared.config import MeshConfig, Secret  # noqa: E402
from shared.dht import service_topic  # noqa: E402
from shared.runner import join_mesh  # noqa: E402
from waiting import wait_until  # noqa: E402
from web_support import MODEL, web_stack  # noqa: E402

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]

HELLO = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("abandoned")) as running:
        yield running


async def abandon(http: aiohttp.ClientSession, url: str, key: str, stream: bool, after_bytes: bool) -> None:
    """Send a request and leave: at once, or once its first bytes came."""
    body = {"model": MODEL, "messages": HELLO, "stream": stream}
    try:
        async with asyncio.timeout(0.005 if not after_bytes else 5):
            async with http.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as reply:
                await reply.content.read(1)
    except (TimeoutError, aiohttp.ClientError):
        pass


async def test_requests_left_midway_leave_nothing_in_flight_and_every_slot_free(stack):
    from web import unlimited_key  # bench/web.py: an unlimited-tier key (the limits do not bind here)

    key = await unlimited_key(stack.base_url, stack.data_dir, stack.bootstrap)
    url = f"{stack.base_url}/v1/chat/completions"
    async with AsyncExitStack() as exits:
        node = await join_mesh(exits, "abandoned-probe", MeshConfig(
            data_dir=stack.data_dir.parent / "probe", bootstrap=(stack.bootstrap,),
            mesh_secret=Secret(stack.mesh_secret)), read_only=True)
        http = await exits.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)))
        for round_ in range(6):
            await asyncio.gather(*(abandon(http, url, key, stream=i % 2 == 0, after_bytes=(i + round_) % 3 != 0)
                                   for i in range(64)))
        async with http.post(url, json={"model": MODEL, "messages": HELLO},
                             headers={"Authorization": f"Bearer {key}"}) as reply:
            assert reply.status == 200, await reply.text()
            assert (await reply.json())["choices"][0]["message"]["content"]

        [gateway] = await node.discovery.lookup(service_topic("gateway"))
        [worker] = await node.discovery.lookup(service_topic("inference"))

        async def idle() -> bool:
            health = await node.mesh.connection(gateway).call("gateway.health")
            [model] = (await node.mesh.connection(worker).call("inference.models"))["models"]
            return (health["in_flight"] == 0 and health["dispatch"]["in_flight"] == 0
                    and model["free_slots"] == model["slots"] and model["breaker"]["state"] == "closed")

        await wait_until(idle, 30, interval=0.2, message="requests left midway still hold the gateway or worker")
