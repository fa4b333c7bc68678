"""An HTTP client dropping many streams at once, on a stack of its own:
web -> gateway -> inference worker -> a model server speaking the OpenAI
protocol (tests/openai_server.py), every process real (`inferswarm up`)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import aiohttp
import openai
import pytest

from test_web_openai import HELLO
from web_support import MODEL, PASSWORD, web_stack
from web_support import post_json as post

pytestmark = [pytest.mark.stack, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("web-drop")) as running:
        yield running


def test_dropping_many_streams_at_once_bills_each_once(stack):
    """An HTTP client drops 32 streaming requests at the same moment (8 streaming, the rest
    queued at the worker): one usage record each, the model server stops, and neither
    web nor the gateway logs an error (once: `aclose(): asynchronous generator is already running`)."""
    name = "sdk-dropper"
    post(f"{stack.base_url}/api/auth/register", {"username": name, "email": f"{name}@example.com",
                                                  "password": PASSWORD})
    token = post(f"{stack.base_url}/api/auth/login", {"username_or_email": name, "password": PASSWORD})["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    key = post(f"{stack.base_url}/api/auth/api-keys", {"name": "sdk"}, bearer)["api_key"]
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    deadline = time.monotonic() + 15
    while True:  # the stack may be new, or the worker cooling down after an earlier test's failures
        try:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
            break
        except (openai.NotFoundError, openai.InternalServerError) as exc:
            assert time.monotonic() < deadline, f"the worker never took a request: {exc}"
            time.sleep(0.1)
    logs = [stack.data_dir / "logs" / f"{service}.log" for service in ("gateway", "web")]
    sizes = [path.stat().st_size for path in logs]
    model = stack.model
    model.token_delay = 0.25  # 14 tokens: 3.5 s a stream if nobody stops it
    before = model.disconnects

    async def drop_all() -> int:
        streaming = [0] * 32
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            async def one(i: int) -> None:
                async with session.post(f"{stack.base_url}/v1/chat/completions", json={
                        "model": MODEL, "messages": HELLO, "max_tokens": 100, "stream": True}) as reply:
                    assert reply.status == 200, await reply.text()
                    async for _ in reply.content:
                        streaming[i] += 1

            tasks = [asyncio.create_task(one(i)) for i in range(32)]
            deadline = time.monotonic() + 15
            while sum(n > 0 for n in streaming) < 8:  # every slot streams; the others wait behind them
                assert time.monotonic() < deadline and not any(t.done() for t in tasks), streaming
                await asyncio.sleep(0.01)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return sum(n > 0 for n in streaming)

    try:
        assert asyncio.run(drop_all()) >= 8
        deadline = time.monotonic() + 15
        while True:  # shipping to auth is batched: wait for the count to reach 33
            with urllib.request.urlopen(urllib.request.Request(f"{stack.base_url}/api/usage", headers=bearer),
                                        timeout=10) as reply:
                totals = json.loads(reply.read())["totals"]
            if totals["requests"] >= 33 and model.disconnects - before >= 8:
                break
            assert time.monotonic() < deadline, (totals, model.disconnects - before)
            time.sleep(0.1)
        assert totals["requests"] == 33  # the 32 dropped and the first
    finally:
        model.token_delay = 0.0
    for path, size in zip(logs, sizes):
        with open(path) as log:
            log.seek(size)
            written = log.read()
        assert "already running" not in written and '"level": "error"' not in written, written[-2000:]
