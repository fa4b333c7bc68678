"""The openai backend against a real OpenAI-compatible server: llama-cpp's own
`python -m llama_cpp.server` over the same GGUF as the local backend. Skipped
when the server's extra packages (llama-cpp-python[server]: fastapi, uvicorn,
sse-starlette, starlette-context, pydantic-settings) are not installed."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack

import pytest

pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] extras not installed")

from llama_server_support import llama_server as running_llama_server  # noqa: E402
from schema_check import valid  # noqa: E402

from shared.config import load  # noqa: E402
from shared.generation import Limits, build_request  # noqa: E402
from services.inference.backends.base import Done, ToolCalls  # noqa: E402
from services.inference.backends.openai import OpenAIBackend  # noqa: E402
from services.inference.config import InferenceConfig  # noqa: E402
from services.inference.worker import open_service  # noqa: E402

pytestmark = pytest.mark.rpc

CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
GREEDY = dict(temperature=0.0, seed=5)


@pytest.fixture
def llama_server():
    with running_llama_server() as url:
        yield url


async def test_openai_backend_on_llama_cpp_server_matches_llama_cpp_in_process(llama_server):
    models = {
        "smollm2": {"backend": "local", "n_threads": 1},
        "smollm2-server": {"backend": "openai", "url": llama_server, "model": "smollm2-server"},
    }
    environ = {"INFERSWARM_MODELS": json.dumps(models), "INFERSWARM_CACHE_TTL": "0"}
    async with AsyncExitStack() as stack:
        service = await open_service(stack, load(InferenceConfig, environ), environ=environ)
        assert (await service.model_status("smollm2-server"))["healthy"]  # /v1/models lists it
        chunks = [c async for c in service.generate(model="smollm2-server", messages=CHAT, max_tokens=24, **GREEDY)]
        text, final = "".join(c.get("text", "") for c in chunks), chunks[-1]
        # The same generation in this process: llama_cpp.server applies its own
        # default repeat_penalty of 1.1 (the library's is 1.0), so ask for that.
        (llm,) = service.served["smollm2"].backend.idle
        llm.reset()
        direct = llm.create_chat_completion(CHAT, max_tokens=24, repeat_penalty=1.1, **GREEDY)
        assert text == direct["choices"][0]["message"]["content"] != ""
        assert final["finish_reason"] == direct["choices"][0]["finish_reason"]
        # llama_cpp.server ignores include_usage: completion tokens are the chunks counted.
        assert final["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]
        prompt = [c async for c in service.generate(model="smollm2-server", prompt="The sea is", max_tokens=6,
                                                    **GREEDY)]
        assert prompt[-1]["finish_reason"] == "length" and prompt[-1]["usage"]["completion_tokens"] == 6


# -- tools and structured output ---------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
REPORT = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _request(**params):
    return build_request(Limits(), params).resolved(max_tokens=64, temperature=0.0, top_p=1.0)


@pytest.fixture
async def backend(llama_server):
    server = OpenAIBackend(llama_server, "smollm2-server")
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def test_response_format_json_schema_on_llama_cpp_server_gives_valid_json(backend):
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT}}
    for attempt in range(2):
        events = [e async for e in backend.generate(_request(messages=ASK, response_format=fmt, seed=5))]
        assert events[-1] == Done("stop", 0, events[-1].completion_tokens)
        assert valid(REPORT, json.loads("".join(e for e in events if isinstance(e, str))))
        # llama_cpp.server refuses OpenAI's json_schema: the first request learnt its dialect
        assert backend.schema_in_json_object


async def test_a_named_tool_choice_on_llama_cpp_server_is_a_valid_call(backend):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
             {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    events = [e async for e in backend.generate(_request(messages=ASK, tools=tools, tool_choice=choice, seed=5))]
    calls, done = events[-2:]
    assert isinstance(calls, ToolCalls) and done.finish_reason == "tool_calls"
    assert not any(isinstance(e, str) for e in events)
    (call,) = calls.calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    assert valid(WEATHER, json.loads(call.arguments))
