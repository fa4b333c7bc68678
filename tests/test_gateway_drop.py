"""Many requests dropped at once on a mesh of their own: 2 gateway processes, 3
inference workers (ollama backend against the Ollama-protocol test server),
auth and a DHT seed in the test process, PostgreSQL for auth and the limits."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio

from gateway_support import MODEL, running_mesh

pytestmark = [pytest.mark.stack, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pg_server, tmp_path_factory):
    async with running_mesh(pg_server, tmp_path_factory.mktemp("drop"), workers=3, gateways=2) as running:
        yield running


async def test_dropping_many_streams_at_once_settles_each_once(mesh):
    """64 requests in flight on both gateways -- streaming, waiting in a worker's
    queue, being admitted -- dropped at the same moment: each is settled and
    recorded once, the workers stop, and no gateway logs an error."""
    ida = await mesh.user("ida")
    mesh.ollama.token_delay = 0.02  # 200 tokens: 4 s, far longer than the test waits
    connections = await mesh.gateways()
    logs = {name: (mesh.root / f"{name}.log") for name, child in mesh.children.items() if child.kind == "gateway"}
    sizes = {name: path.stat().st_size for name, path in logs.items()}
    chunks = [0] * 64

    async def one(i: int) -> None:
        stream = await connections[i % len(connections)].stream(
            "gateway.infer", {"api_key": ida.api_key, "model": MODEL, "prompt": f"drop {i}", "max_tokens": 200},
            timeout=30)
        async for _ in stream:
            chunks[i] += 1

    tasks = [asyncio.create_task(one(i)) for i in range(64)]
    deadline = time.monotonic() + 15
    while sum(c > 0 for c in chunks) < 6:  # every worker slot is streaming; the rest wait behind them
        ended = [t.exception() for t in tasks if t.done()]
        assert time.monotonic() < deadline and not ended, (chunks, ended[:3])
        await asyncio.sleep(0.01)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    rows = await mesh.records_settle(ida.id, 64)
    assert len(rows) == 64 and len({r["request_id"] for r in rows}) == 64
    assert {r["status"] for r in rows} == {"cancelled"}
    streamed = [r for r in rows if r["completion_tokens"] > 0]
    assert len(streamed) >= 6 and all(r["prompt_tokens"] > 0 for r in streamed)  # billed what was delivered
    deadline = time.monotonic() + 10
    while True:  # every request left both gateways and their journals, and no worker still generates
        health = [await c.call("gateway.health") for c in connections]
        if all(h["in_flight"] == 0 and h["usage_unshipped"] == 0 for h in health) and mesh.ollama.active == 0:
            break
        assert time.monotonic() < deadline, (health, mesh.ollama.active)
        await asyncio.sleep(0.05)
    for name, path in logs.items():
        with open(path) as log:
            log.seek(sizes[name])
            written = log.read()
        assert "already running" not in written and '"level": "error"' not in written, written[-2000:]
