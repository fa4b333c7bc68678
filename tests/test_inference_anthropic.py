"""The anthropic backend against the Messages API test server (tests/anthropic_server.py,
real HTTP on loopback): streamed text and usage, stop sequences, tools both ways,
the contract's roles in the API's terms, every failure as its typed error, the key
kept out of logs, and a real `python -m services.inference` worker over RPC."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from anthropic_server import AnthropicServer
from waiting import wait_until

from shared.config import MeshConfig, Secret, load
from shared.dht import model_topic
from shared.errors import InvalidParams, NotFound, Unavailable
from shared.generation import tool_calls_of
from shared.identity import MeshCredential
from shared.runner import join_mesh
from services.inference.config import InferenceConfig
from services.inference.worker import open_service

pytestmark = pytest.mark.rpc

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-ant-test-0123456789abcdef"
CHAT = [{"role": "user", "content": "Say hello"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def catalog(server: AnthropicServer, **extra) -> dict:
    return {"claude": {"backend": "anthropic", "url": server.url, "model": "claude-test-1",
                       "api_key_env": "TEST_ANTHROPIC_KEY", **extra}}


async def start_service(stack: AsyncExitStack, models: dict, **env: str):
    environ = {"INFERSWARM_MODELS": json.dumps(models), "INFERSWARM_PROBE_INTERVAL": "0.2",
               "TEST_ANTHROPIC_KEY": KEY, **env}
    return await open_service(stack, load(InferenceConfig, environ), worker_id="test-worker", environ=environ)


async def collect(service, **params) -> list[dict]:
    return [chunk async for chunk in service.generate(**params)]


def text_of(chunks: list[dict]) -> str:
    return "".join(c.get("text", "") for c in chunks)


@pytest.fixture
async def server():
    async with AnthropicServer(api_key=KEY) as running:
        yield running


@pytest.fixture
async def service(server):
    async with AsyncExitStack() as stack:
        yield await start_service(stack, catalog(server))


# -- text --------------------------------------------------------------------------


async def test_streamed_text_with_the_servers_usage_and_headers(service, server):
    chunks = await collect(service, model="claude", messages=CHAT, max_tokens=64)
    assert text_of(chunks) == server.reply
    assert len([c for c in chunks if "text" in c]) == len(server.reply.split())  # one chunk per text_delta
    final = chunks[-1]
    assert final["finish_reason"] == "stop"
    assert final["usage"] == {"prompt_tokens": 2, "completion_tokens": len(server.reply.split()),
                              "total_tokens": 2 + len(server.reply.split())}
    assert chunks[0]["prompt_tokens"] == 2  # message_start's count, before the first text
    path, headers, body = server.requests[-1]
    assert path == "/v1/messages" and headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
    assert body["model"] == "claude-test-1" and body["stream"] is True and body["max_tokens"] == 64
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}]
    assert "top_p" not in body and body["temperature"] == 1.0  # the catalog's defaults; top_p 1 is not sent
    status = await service.model_status("claude")
    assert status["healthy"] and status["backend"] == "anthropic" and status["capabilities"] == ["chat", "tools"]


async def test_stop_sequences_max_tokens_and_sampling(service, server):
    chunks = await collect(service, model="claude", messages=CHAT, stop=["test server"], temperature=0.5,
                           top_p=0.9)
    assert text_of(chunks) == "Hello from the Anthropic protocol " and chunks[-1]["finish_reason"] == "stop"
    body = server.last_body
    assert body["stop_sequences"] == ["test server"] and body["temperature"] == 0.5 and body["top_p"] == 0.9
    chunks = await collect(service, model="claude", messages=CHAT, max_tokens=3)
    assert text_of(chunks) == "Hello from the " and chunks[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_a_prompt_is_one_user_message(service, server):
    chunks = await collect(service, model="claude", prompt="The sea is", max_tokens=8)
    assert text_of(chunks) == "Hello from the Anthropic protocol test server, one "
    assert server.last_body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "The sea is"}]}]


async def test_system_and_developer_messages_become_the_system_field(service, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Answer in English."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Again"}]
    chunks = await collect(service, model="claude", messages=messages)
    assert chunks[-1]["finish_reason"] == "stop"
    body = server.last_body
    assert body["system"] == "Be brief.\n\nAnswer in English."
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert chunks[-1]["usage"]["prompt_tokens"] == 8  # the words of system + every text


# -- tools -------------------------------------------------------------------------


async def test_a_forced_tool_call_streamed_as_input_json_delta(service, server):
    chunks = await collect(service, model="claude", messages=CHAT, tools=[WEATHER], tool_choice="required")
    calls = [call for c in chunks for call in tool_calls_of(c) or ()]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "example"}
    assert calls[0]["id"].startswith("toolu_test")
    assert chunks[-1]["finish_reason"] == "tool_calls" and text_of(chunks) == ""
    body = server.last_body
    assert body["tools"] == [{"name": "get_weather", "description": "The weather in a city",
                              "input_schema": WEATHER["function"]["parameters"]}]
    assert body["tool_choice"] == {"type": "any"}
    # the input came in pieces of 5 characters, put back together
    assert server.json_deltas == -(-len(json.dumps({"city": "example"})) // server.argument_piece) > 1


@pytest.mark.parametrize(("choice", "wire"), [
    ("auto", {"type": "auto"}), ("none", {"type": "none"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
])
async def test_tool_choice_in_the_apis_terms(service, server, choice, wire):
    chunks = await collect(service, model="claude", messages=[{"role": "user", "content": "get_weather please"}],
                           tools=[WEATHER], tool_choice=choice, parallel_tool_calls=False)
    expected = {**wire, "disable_parallel_tool_use": True} if wire["type"] != "none" else wire
    assert server.last_body["tool_choice"] == expected
    assert chunks[-1]["finish_reason"] == ("stop" if wire["type"] == "none" else "tool_calls")


async def test_a_tool_result_turn_is_answered(service, server):
    first = await collect(service, model="claude", messages=CHAT, tools=[WEATHER], tool_choice="required")
    call = next(call for c in first for call in tool_calls_of(c) or ())
    messages = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 C"},
                {"role": "tool", "tool_call_id": call["id"], "content": "Wind 5 km/h"}]
    chunks = await collect(service, model="claude", messages=messages, tools=[WEATHER])
    assert text_of(chunks) == "The tool said: Sunny, 21 C Wind 5 km/h"
    assert chunks[-1]["finish_reason"] == "stop"
    sent = server.last_body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == [{"type": "tool_use", "id": call["id"], "name": "get_weather",
                                   "input": {"city": "example"}}]
    assert sent[2]["content"] == [
        {"type": "tool_result", "tool_use_id": call["id"], "content": "Sunny, 21 C"},
        {"type": "tool_result", "tool_use_id": call["id"], "content": "Wind 5 km/h"}]


async def test_a_tool_result_for_an_unknown_call_is_the_servers_invalid_params(service, server):
    messages = [*CHAT, {"role": "assistant", "content": "Let me see."},
                {"role": "tool", "tool_call_id": "toolu_nope", "content": "Sunny"}]
    with pytest.raises(InvalidParams, match="unexpected `tool_use_id`"):
        await collect(service, model="claude", messages=messages)


async def test_response_format_and_logprobs_are_refused_by_name(service):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(InvalidParams) as refused:
        await collect(service, model="claude", messages=CHAT, response_format=fmt)
    assert refused.value.data["param"] == "response_format" and refused.value.data["reason"] == "unsupported"
    with pytest.raises(InvalidParams) as refused:
        await collect(service, model="claude", messages=CHAT, logprobs=True)
    assert refused.value.data["param"] == "logprobs"


# -- failures ----------------------------------------------------------------------


async def test_a_wrong_key_is_unavailable_not_the_callers_fault(server):
    async with AsyncExitStack() as stack:
        service = await start_service(stack, catalog(server), TEST_ANTHROPIC_KEY="sk-ant-wrong")
        with pytest.raises(Unavailable, match="invalid x-api-key") as refused:
            await collect(service, model="claude", messages=CHAT)
        assert refused.value.data["upstream_status"] == 401 and refused.value.data["retry_safe"]
        assert not (await service.model_status("claude"))["healthy"]


@pytest.mark.parametrize("status, seconds", [(429, 1), (529, 7)])
async def test_rate_limited_and_overloaded_are_retryable_with_retry_after(service, server, status, seconds):
    # A 429 also leaves the (only) key exhausted until its reset: the probe finds it back after that.
    server.fail_status, server.retry_after = status, str(seconds)
    with pytest.raises(Unavailable) as refused:
        await collect(service, model="claude", messages=CHAT)
    assert refused.value.data["upstream_status"] == status
    assert refused.value.data["retry_after"] == seconds and refused.value.data["retry_safe"]
    server.heal()
    await wait_until(lambda: service.served["claude"].health.healthy, 5.0)  # the probe finds it back


async def test_a_bad_request_is_invalid_params_with_the_upstream_message(service, server):
    with pytest.raises(InvalidParams, match="temperature: Input should be less than or equal to 1"):
        await collect(service, model="claude", messages=CHAT, temperature=1.5)
    assert (await service.model_status("claude"))["healthy"]  # the caller's fault, not the backend's


async def test_a_mid_stream_error_fails_the_stream_after_its_first_text(service, server):
    server.error_after = 2
    chunks: list[dict] = []
    with pytest.raises(Unavailable, match="overloaded_error: Overloaded") as failed:
        async for chunk in service.generate(model="claude", messages=CHAT):
            chunks.append(chunk)
    assert text_of(chunks) == "Hello from " and failed.value.data["retry_safe"] is False


async def test_a_dropped_stream_is_unavailable(service, server):
    server.drop_after = 1
    with pytest.raises(Unavailable):
        await collect(service, model="claude", messages=CHAT)


async def test_an_unknown_model_is_not_found(server):
    models = {"claude": {"backend": "anthropic", "url": server.url, "model": "claude-ghost",
                         "api_key_env": "TEST_ANTHROPIC_KEY"}}
    async with AsyncExitStack() as stack:
        service = await start_service(stack, models)
        status = await service.model_status("claude")
        assert not status["healthy"] and status["last_error"]["code"] == "NOT_FOUND"
        with pytest.raises(NotFound):
            await collect(service, model="claude", messages=CHAT)


async def test_the_key_is_never_logged_nor_shown(server, caplog):
    caplog.set_level(logging.DEBUG)
    async with AsyncExitStack() as stack:
        service = await start_service(stack, catalog(server))
        await collect(service, model="claude", messages=CHAT)
        server.fail_status = 401
        with pytest.raises(Unavailable):
            await collect(service, model="claude", messages=CHAT)
        shown = json.dumps([await service.model_status("claude"), await service.models()], default=str)
    assert KEY not in caplog.text and KEY not in shown


# -- a real worker -----------------------------------------------------------------


async def test_a_worker_process_serves_the_model_over_rpc(server, tmp_path):
    secret = MeshCredential.new_secret().hex()
    async with AsyncExitStack() as stack:
        client = await join_mesh(stack, "client", MeshConfig(data_dir=tmp_path / "c", mesh_secret=Secret(secret)))
        env = {**os.environ, "INFERSWARM_DATA_DIR": str(tmp_path / "w"), "INFERSWARM_MESH_SECRET": secret,
               "INFERSWARM_BOOTSTRAP": client.discovery.address, "INFERSWARM_RECORD_TTL": "3",
               "INFERSWARM_MODELS": json.dumps(catalog(server)), "TEST_ANTHROPIC_KEY": KEY,
               "INFERSWARM_LOG_LEVEL": "debug"}
        log = tmp_path / "worker.log"  # a file, not a pipe: debug logs never block the worker
        with log.open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "services.inference"], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
            assert json.loads(line)["ready"] == "inference"
            stream = await client.mesh.topic(model_topic("claude")).stream(
                "inference.generate", {"model": "claude", "messages": CHAT, "max_tokens": 4}, timeout=30)
            chunks = [c async for c in stream]
            assert text_of(chunks) == "Hello from the Anthropic "
            assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 4
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 20) == 0
        logged = log.read_text()
        assert logged and KEY not in logged  # the worker logged (at debug), never the key
