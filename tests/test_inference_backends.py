"""The ollama and openai backends through the inference service, against the
protocol servers in tests/ (real HTTP on loopback): streaming, usage, every
failure as its typed error, health that flips and recovers, priority order
with one busy slot, and a cancelled stream closing the upstream connection."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack

import pytest
from ollama_server import OllamaServer, tokens_of
from openai_server import OpenAIServer

from shared.config import load
from shared.errors import InvalidParams, MeshError, NotFound, Timeout, Unavailable
from shared.rpc import RequestContext, current_request
from services.inference.config import InferenceConfig
from services.inference.worker import open_service, probe_all

pytestmark = pytest.mark.rpc

CHAT = [{"role": "user", "content": "Say hello"}]


async def start_service(stack: AsyncExitStack, models: dict, **env: str):
    environ = {"INFERSWARM_MODELS": json.dumps(models), "INFERSWARM_PROBE_INTERVAL": "0.2", **env}
    config = load(InferenceConfig, environ)
    return await open_service(stack, config, worker_id="test-worker", environ=environ)


async def collect(service, **params) -> list[dict]:
    return [chunk async for chunk in service.generate(**params)]


def text_of(chunks: list[dict]) -> str:
    return "".join(c.get("text", "") for c in chunks)


async def eventually(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def ollama():
    async with OllamaServer(("llama3:8b", "qwen2:0.5b")) as server:
        yield server


@pytest.fixture
async def openai():
    async with OpenAIServer(("gpt-4o-mini",), api_key="sk-test-key") as server:
        yield server


@pytest.fixture
async def services(ollama, openai):
    models = {
        "llama3": {"backend": "ollama", "url": ollama.url, "model": "llama3:8b", "slots": 2},
        "gpt": {"backend": "openai", "url": openai.base_url, "model": "gpt-4o-mini",
                "api_key_env": "TEST_OPENAI_KEY", "slots": 2},
    }
    async with AsyncExitStack() as stack:
        yield await start_service(stack, models, TEST_OPENAI_KEY="sk-test-key")


# -- the happy paths -------------------------------------------------------------


@pytest.mark.parametrize("model", ["llama3", "gpt"])
async def test_chat_streams_tokens_then_usage_and_timing(services, ollama, openai, model):
    chunks = await collect(services, model=model, messages=CHAT, max_tokens=100, temperature=0.5)
    server = ollama if model == "llama3" else openai
    assert text_of(chunks) == server.reply
    assert all(set(c) == {"text"} for c in chunks[1:-1]) and len(chunks) - 1 == len(tokens_of(server.reply))
    final = chunks[-1]
    # The first text chunk says what the prompt costs (an estimate: these servers count only at the end).
    assert set(chunks[0]) == {"text", "prompt_tokens"} and chunks[0]["prompt_tokens"] > 0
    assert final["done"] and final["finish_reason"] == "stop" and not final["cached"]
    assert final["usage"]["completion_tokens"] == len(tokens_of(server.reply))
    assert final["usage"]["prompt_tokens"] > 0
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + final["usage"]["completion_tokens"]
    assert set(final["timing"]) == {"queue_ms", "ttft_ms", "tokens_per_s", "total_ms"}
    assert final["worker"]["id"] == "test-worker" and final["worker"]["load"]["free_slots"] == 2


@pytest.mark.parametrize("model", ["llama3", "gpt"])
async def test_prompt_max_tokens_stop_and_options_reach_the_server(services, ollama, openai, model):
    server = ollama if model == "llama3" else openai
    chunks = await collect(services, model=model, prompt="Once upon", max_tokens=3, temperature=0.2,
                           top_p=0.5, seed=11, stop=["never"])
    assert text_of(chunks) == "".join(tokens_of(server.reply)[:3])
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 3
    path, body = server.requests[-1]
    if model == "llama3":
        assert path == "/api/generate" and body["raw"] is True and body["prompt"] == "Once upon"
        assert body["options"] == {"num_predict": 3, "temperature": 0.2, "top_p": 0.5, "seed": 11,
                                   "stop": ["never"]}
    else:
        assert path == "/v1/completions" and body["prompt"] == "Once upon"
        assert (body["max_tokens"], body["seed"], body["stop"]) == (3, 11, ["never"])
        assert body["stream_options"] == {"include_usage": True}
    stopped = await collect(services, model=model, messages=CHAT, stop="protocol", temperature=0.3)
    assert text_of(stopped) == server.reply[: server.reply.index("protocol")]


async def test_non_streamed_result_is_one_text_chunk_and_deterministic_requests_are_cached(services, ollama):
    streamed = await collect(services, model="llama3", messages=CHAT, temperature=0.0)
    whole = await collect(services, model="llama3", messages=CHAT, temperature=0.0, stream=False)
    assert [c["text"] for c in whole[:-1]] == [text_of(streamed)]
    assert whole[-1]["cached"] and whole[-1]["usage"] == streamed[-1]["usage"]
    chats = [path for path, _ in ollama.requests if path == "/api/chat"]
    assert len(chats) == 1  # the second one never reached the server
    await collect(services, model="llama3", messages=CHAT, temperature=0.9)  # not deterministic
    status = await services.model_status("llama3")
    assert status["cache"] == {"hits": 1, "misses": 1}


async def test_finished_streams_keep_the_connection_for_the_next_request(services, ollama):
    for _ in range(3):
        await collect(services, model="llama3", prompt="hi", temperature=0.5)
    assert len(set(ollama.peers[-3:])) == 1


async def test_openai_server_without_usage_counts_chunks(services, openai):
    openai.usage = False
    chunks = await collect(services, model="gpt", messages=CHAT, temperature=0.4)
    assert chunks[-1]["usage"]["completion_tokens"] == len(tokens_of(openai.reply))
    assert chunks[-1]["usage"]["prompt_tokens"] == 0


async def test_models_and_model_status(services):
    listing = await services.models()
    by_name = {m["name"]: m for m in listing["models"]}
    assert by_name["llama3"]["backend"] == "ollama" and by_name["gpt"]["backend"] == "openai"
    assert by_name["llama3"]["details"]["family"] == "llama"  # from /api/show
    assert by_name["llama3"]["context_length"] == 8192
    assert all(m["healthy"] and m["slots"] == 2 for m in listing["models"])
    status = await services.model_status("gpt")
    assert status["loaded"] and status["healthy"] and status["last_error"] is None
    with pytest.raises(NotFound):
        await services.model_status("nope")
    with pytest.raises(NotFound):
        await collect(services, model="nope", prompt="x")


# -- failures ------------------------------------------------------------------


def _break(server, how: str) -> None:
    if how == "500":
        server.fail_status = 500
    elif how == "malformed":
        server.malformed_after = 2
    elif how == "error line":
        server.error_after = 2
    elif how == "dropped":
        server.drop_after = 2


@pytest.mark.parametrize("model", ["llama3", "gpt"])
@pytest.mark.parametrize("how, fragment", [
    ("500", "answered 500"), ("malformed", "malformed"), ("error line", "dropped the stream"),
    ("dropped", "dropped the stream"),
])
async def test_failures_are_unavailable_and_flip_health_until_a_call_succeeds(
    services, ollama, openai, model, how, fragment,
):
    server = ollama if model == "llama3" else openai
    _break(server, how)
    with pytest.raises(Unavailable) as failed:
        await collect(services, model=model, messages=CHAT, temperature=0.5)
    assert fragment in failed.value.message
    status = await services.model_status(model)
    assert not status["healthy"] and status["last_error"]["code"] == "UNAVAILABLE"
    assert services.topic_load(f"inferswarm/model/{model}")["healthy"] is False
    server.heal()
    await collect(services, model=model, messages=CHAT, temperature=0.5)
    assert (await services.model_status(model))["healthy"]


async def test_a_server_that_is_down_is_unavailable_and_the_probe_finds_it_back():
    async with OllamaServer() as gone:
        port, url = gone.port, gone.url
    async with AsyncExitStack() as stack:  # the server is down before the worker starts
        service = await start_service(stack, {"llama3": {"backend": "ollama", "url": url, "model": "llama3:8b"}})
        assert not (await service.model_status("llama3"))["healthy"]  # the first probe failed
        with pytest.raises(Unavailable, match="cannot reach") as down:
            await collect(service, model="llama3", prompt="hi")
        assert down.value.data["retry_safe"] is True
        await stack.enter_async_context(OllamaServer(port=port))  # back on the same port
        await eventually(lambda: service.served["llama3"].health.healthy)  # the periodic probe saw it
        assert text_of(await collect(service, model="llama3", prompt="hi", temperature=0.5))


async def test_unknown_upstream_model_is_not_found_and_unhealthy(ollama, openai):
    models = {
        "ghost": {"backend": "ollama", "url": ollama.url, "model": "ghost:1b"},
        "phantom": {"backend": "openai", "url": openai.base_url, "model": "phantom"},
    }
    async with AsyncExitStack() as stack:
        service = await start_service(stack, models)
        for model in models:
            status = await service.model_status(model)
            assert not status["healthy"] and status["last_error"]["code"] in ("NOT_FOUND", "UNAVAILABLE")
        with pytest.raises(NotFound, match="not found, try pulling it first"):
            await collect(service, model="ghost", prompt="hi")
        ollama.models.append("ghost:1b")
        await eventually(lambda: service.served["ghost"].health.healthy)  # pulled: the probe sees it


async def test_a_wrong_api_key_is_unavailable_not_the_callers_fault(openai):
    models = {"gpt": {"backend": "openai", "url": openai.base_url, "model": "gpt-4o-mini",
                      "api_key_env": "WRONG_KEY"}}
    async with AsyncExitStack() as stack:
        service = await start_service(stack, models, WRONG_KEY="sk-wrong")
        with pytest.raises(Unavailable, match="Incorrect API key") as refused:
            await collect(service, model="gpt", messages=CHAT)
        assert refused.value.data["upstream_status"] == 401


async def test_a_request_the_server_refuses_is_invalid_params(services):
    backend = services.served["llama3"].backend
    with pytest.raises(InvalidParams, match="messages is required"):
        async with backend.http.request("POST", "/api/chat", {"model": "llama3:8b", "messages": "x"}):
            pass


# -- slots, priority, cancellation -----------------------------------------------


async def test_one_busy_slot_serves_the_queue_enterprise_then_pro_then_free(ollama):
    ollama.token_delay = 0.02
    models = {"llama3": {"backend": "ollama", "url": ollama.url, "model": "llama3:8b", "slots": 1, "queue": 4}}
    async with AsyncExitStack() as stack:
        service = await start_service(stack, models)
        order: list[str] = []

        async def run(label: str, priority: str) -> None:
            chunks = await collect(service, model="llama3", prompt=label, priority=priority, max_tokens=3,
                                   temperature=0.7)
            order.append(label)
            assert chunks[-1]["done"]

        busy = asyncio.create_task(run("busy", "free"))
        await eventually(lambda: ollama.active == 1)
        queued = []
        for label, priority in [("free", "free"), ("pro", "pro"), ("enterprise", "enterprise"), ("free-2", 0)]:
            queued.append(asyncio.create_task(run(label, priority)))
            await asyncio.sleep(0.005)
        assert service.served["llama3"].pool.state() == {"slots": 1, "in_use": 1, "queued": 4, "limit": 4}
        with pytest.raises(Unavailable) as full:
            await collect(service, model="llama3", prompt="one too many", priority="enterprise")
        assert full.value.data == {"slots": 1, "in_use": 1, "queued": 4, "limit": 4, "retry_safe": True,
                                   "reason": "queue_full"}
        assert service.topic_load("inferswarm/model/llama3")["queued"] == 4
        await asyncio.wait_for(asyncio.gather(busy, *queued), 10)
        assert order == ["busy", "enterprise", "pro", "free", "free-2"]
        assert [body["prompt"] for path, body in ollama.requests if path == "/api/generate"] == order


async def test_a_queued_request_leaves_the_queue_when_its_callers_deadline_passes(ollama):
    ollama.token_delay = 0.05
    models = {"llama3": {"backend": "ollama", "url": ollama.url, "model": "llama3:8b", "slots": 1}}
    async with AsyncExitStack() as stack:
        service = await start_service(stack, models)
        busy = service.generate(model="llama3", prompt="busy", temperature=0.5)
        await anext(busy)
        pool = service.served["llama3"].pool
        context = RequestContext("inference.generate", "t" * 32, time.monotonic() + 0.15, "", True)
        token = current_request.set(context)
        try:
            started = time.monotonic()
            with pytest.raises(Timeout) as late:
                await collect(service, model="llama3", prompt="late", temperature=0.5)
        finally:
            current_request.reset(token)
        # at its 0.15 s deadline, not whenever the busy stream ends (room above it for a loaded box)
        assert 0.1 < time.monotonic() - started < 1.0 and late.value.data["queued"] == 0
        assert late.value.data["reason"] == "queue_timeout"
        assert pool.queued == 0 and pool.in_use == 1
        await busy.aclose()
        assert pool.in_use == 0


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_cancelling_a_stream_frees_the_slot_and_closes_the_upstream_stream(kind, ollama, openai):
    server = ollama if kind == "ollama" else openai
    server.token_delay = 0.05
    url = ollama.url if kind == "ollama" else openai.base_url
    models = {"m": {"backend": kind, "url": url, "model": server.models[0], "slots": 1}}
    environ = {"TEST_OPENAI_KEY": "sk-test-key"}
    if kind == "openai":
        models["m"]["api_key_env"] = "TEST_OPENAI_KEY"
    async with AsyncExitStack() as stack:
        service = await start_service(stack, models, **environ)
        stream = service.generate(model="m", messages=CHAT, temperature=0.5)
        assert "text" in await anext(stream)
        pool = service.served["m"].pool
        assert pool.in_use == 1
        started = time.monotonic()
        await stream.aclose()
        assert pool.in_use == 0 and time.monotonic() - started < 0.5  # at once, with room for a loaded box
        await eventually(lambda: server.disconnects == 1, timeout=2)
        assert (await service.model_status("m"))["healthy"]  # a cancel is no backend failure


async def test_every_slot_of_an_openai_backend_has_a_connection_beyond_aiohttps_default_pool(openai):
    """140 slots: 140 generations reach the server at once (aiohttp's default pool holds 100;
    the rest waited, unseen, for a connection while their slots looked busy)."""
    openai.api_key = None
    openai.token_delay = 1.0  # a stream lasts about 12 s: all of them are open at once
    slots = 140
    models = {"m": {"backend": "openai", "url": openai.base_url, "model": "gpt-4o-mini", "slots": slots}}
    async with AsyncExitStack() as stack:
        service = await start_service(stack, models)
        streams = [service.generate(model="m", messages=CHAT, temperature=0.5) for _ in range(slots)]
        try:
            firsts = await asyncio.wait_for(asyncio.gather(*(anext(s) for s in streams)), timeout=20)
            assert all("text" in first for first in firsts)
            assert openai.most_open == slots  # every one of them held a connection at once
        finally:
            for stream in streams:
                await stream.aclose()


async def test_a_wait_for_a_connection_of_the_pool_is_bounded_and_typed(openai):
    """The pool is sized to the slots, so this should not happen; if it does, the wait ends
    with the backend's timeout as UNAVAILABLE (retry_safe), not never."""
    from services.inference.backends.http import HttpClient

    openai.api_key = None
    openai.token_delay = 0.2
    client = HttpClient(openai.base_url, timeout=0.5, connections=1)
    await client.open()
    body = {"model": "gpt-4o-mini", "messages": CHAT, "stream": True}
    try:
        async with client.request("POST", "/chat/completions", body):  # holds the one connection
            started = time.monotonic()
            with pytest.raises(Unavailable) as refused:
                async with client.request("POST", "/chat/completions", body):
                    pass
            assert refused.value.data.get("retry_safe") is True
            assert 0.4 < time.monotonic() - started < 5
    finally:
        await client.close()


async def test_backend_errors_are_mesh_errors_never_raw_exceptions(services, ollama):
    ollama.drop_after = 0
    with pytest.raises(MeshError):
        await collect(services, model="llama3", messages=CHAT)
    ollama.heal()
    await probe_all(services, timeout=1.0)
    assert services.served["llama3"].health.healthy
