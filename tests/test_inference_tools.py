"""Tools and structured output through the ollama and openai backends, against
the protocol servers in tests/ (real HTTP on loopback): what each backend sends
in its protocol's shape (the servers record the bodies), and the events it
makes of the answers -- text, then one `ToolCalls`, then `Done("tool_calls")`.
The same against the real llama_cpp.server is in test_inference_llama_server.py."""

from __future__ import annotations

import json
import re
from contextlib import AsyncExitStack
from typing import Any

import pytest
from ollama_server import OllamaServer
from openai_server import OpenAIServer
from schema_check import valid

from shared.config import Secret, load
from shared.errors import InvalidParams, Unavailable
from shared.generation import GenerateRequest, Limits, build_request
from services.inference.backends.base import Done, Event, Prompt, ToolCalls
from services.inference.backends.ollama import OllamaBackend
from services.inference.backends.openai import OpenAIBackend, _StreamState
from services.inference.config import InferenceConfig
from services.inference.worker import open_service

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "minimum": 2}},
       "required": ["a", "b"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "The sum of two integers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ANSWER = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["title", "year", "tags"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def request(**params: Any) -> GenerateRequest:
    """A checked request, resolved as a worker resolves it before its backend sees it."""
    return build_request(Limits(), params).resolved(max_tokens=200, temperature=0.0, top_p=1.0)


async def events_of(backend: Any, req: GenerateRequest) -> list[Event]:
    return [event async for event in backend.generate(req)]


def calls_of(events: list[Event]) -> ToolCalls:
    """The one `ToolCalls` event, checked to come after any text and right before `Done("tool_calls")`."""
    found = [i for i, e in enumerate(events) if isinstance(e, ToolCalls)]
    assert len(found) == 1, events
    assert found[0] == len(events) - 2 and events[-1].finish_reason == "tool_calls"
    assert not any(isinstance(e, str) for e in events[found[0]:])
    return events[found[0]]


@pytest.fixture
async def ollama():
    async with OllamaServer(("llama3.1:8b",)) as server:
        backend = OllamaBackend(server.url, "llama3.1:8b")
        await backend.start()
        try:
            yield server, backend
        finally:
            await backend.close()


@pytest.fixture
async def openai():
    async with OpenAIServer(("gpt-4o-mini",), api_key="sk-test") as server:
        backend = OpenAIBackend(server.base_url, "gpt-4o-mini", api_key=Secret("sk-test"))
        await backend.start()
        try:
            yield server, backend
        finally:
            await backend.close()


@pytest.fixture(params=["ollama", "openai"])
def either(request, ollama, openai):
    return ollama if request.param == "ollama" else openai


# -- forced calls ----------------------------------------------------------------------


@pytest.mark.rpc
@pytest.mark.parametrize("choice, name", [("required", "get_weather"),
                                          ({"type": "function", "function": {"name": "add"}}, "add")])
async def test_a_forced_call_is_one_tool_calls_event_with_valid_arguments(either, choice, name):
    server, backend = either
    events = await events_of(backend, request(messages=ASK, tools=TOOLS, tool_choice=choice))
    (call,) = calls_of(events).calls
    assert call.name == name and valid(SCHEMAS[name], json.loads(call.arguments))
    assert isinstance(events[0], Prompt) and events[0].tokens > 0
    path, body = server.requests[-1]
    if backend.kind == "openai":  # passed through: the server does the forcing
        assert (path, body["tool_choice"], body["tools"]) == ("/v1/chat/completions", choice, TOOLS)
        assert body["parallel_tool_calls"] is True
        return
    # Ollama has no tool_choice: no tools, but a format that only a valid call matches
    assert path == "/api/chat" and "tools" not in body
    if name == "add":
        assert body["format"] == ADD
    else:
        assert [branch["properties"]["name"] for branch in body["format"]["anyOf"]] == [
            {"enum": ["get_weather"]}, {"enum": ["add"]}]
        assert body["format"]["anyOf"][0]["properties"]["arguments"] == WEATHER
    assert body["messages"][0]["role"] == "system" and name in body["messages"][0]["content"]
    assert CALL_ID.fullmatch(call.id)


@pytest.mark.rpc
async def test_required_with_one_tool_goes_by_name_and_an_ignored_forced_call_is_an_error(openai):
    server, backend = openai
    server.ignores_required = True  # as llama_cpp.server: "required" taken as "auto"
    events = await events_of(backend, request(messages=ASK, tools=TOOLS[:1], tool_choice="required"))
    (call,) = calls_of(events).calls  # sent as the one tool, by name: a demand servers honour
    assert call.name == "get_weather"
    assert server.requests[-1][1]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    with pytest.raises(Unavailable, match="without one"):  # two tools, none mentioned: text came back
        await events_of(backend, request(messages=ASK, tools=TOOLS, tool_choice="required"))
    assert server.requests[-1][1]["tool_choice"] == "required"


@pytest.mark.rpc
async def test_a_forced_call_wins_over_a_response_format_on_ollama(ollama):
    server, backend = ollama
    events = await events_of(backend, request(
        messages=[{"role": "system", "content": "Be brief."}, *ASK], tools=TOOLS, tool_choice="required",
        response_format={"type": "json_object"}))
    assert calls_of(events).calls[0].name == "get_weather"
    body = server.requests[-1][1]
    assert body["format"]["anyOf"] and body["messages"][0]["content"].startswith("Be brief.\n\n")


@pytest.mark.rpc
async def test_a_forced_call_cut_at_max_tokens_is_length_and_no_call(ollama):
    server, backend = ollama
    req = request(messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=2)
    events = await events_of(backend, req)
    assert not any(isinstance(e, (ToolCalls, str)) for e in events) and events[-1].finish_reason == "length"


# -- auto ------------------------------------------------------------------------------


@pytest.mark.rpc
async def test_auto_calls_the_tools_the_user_names_and_keeps_the_servers_ids(either):
    server, backend = either
    ask = [{"role": "user", "content": "Use get_weather for Paris, and add 2 and 3."}]
    events = await events_of(backend, request(messages=ask, tools=TOOLS))
    calls = calls_of(events).calls
    assert [c.name for c in calls] == ["get_weather", "add"]
    assert all(valid(SCHEMAS[c.name], json.loads(c.arguments)) for c in calls)
    if backend.kind == "openai":
        assert [c.id for c in calls] == [f"call_{i:024x}" for i in range(2)]  # the server's, kept
    else:
        assert [c.id for c in calls] == ["call_00000000", "call_00000001"]
    body = server.requests[-1][1]
    assert body["tools"] == TOOLS and "format" not in body


@pytest.mark.rpc
async def test_auto_without_a_call_is_text_and_stop(either):
    server, backend = either
    events = await events_of(backend, request(messages=ASK, tools=TOOLS, tool_choice="auto"))
    assert "".join(e for e in events if isinstance(e, str)) == server.reply
    assert not any(isinstance(e, ToolCalls) for e in events) and events[-1].finish_reason == "stop"


@pytest.mark.rpc
async def test_parallel_tool_calls_false_gives_one_call(either):
    server, backend = either
    ask = [{"role": "user", "content": "get_weather then add"}]
    events = await events_of(backend, request(messages=ask, tools=TOOLS, parallel_tool_calls=False))
    assert [c.name for c in calls_of(events).calls] == ["get_weather"]
    if backend.kind == "openai":
        assert server.requests[-1][1]["parallel_tool_calls"] is False


@pytest.mark.rpc
async def test_ollama_calls_without_ids_get_fresh_ones(ollama):
    server, backend = ollama
    server.call_ids = False  # Ollama before 0.12
    events = await events_of(backend, request(messages=[{"role": "user", "content": "add"}], tools=TOOLS))
    (call,) = calls_of(events).calls
    assert CALL_ID.fullmatch(call.id) and json.loads(call.arguments) == {"a": 1, "b": 2}


@pytest.mark.rpc
async def test_none_sends_no_tools_to_ollama_and_openai_answers_text(either):
    server, backend = either
    ask = [{"role": "user", "content": "get_weather for Paris?"}]  # would be a call under auto
    events = await events_of(backend, request(messages=ask, tools=TOOLS, tool_choice="none"))
    assert not any(isinstance(e, ToolCalls) for e in events) and events[-1].finish_reason == "stop"
    body = server.requests[-1][1]
    if backend.kind == "ollama":
        assert "tools" not in body and "format" not in body
    else:  # OpenAI's own way: the tools, and tool_choice none
        assert body["tool_choice"] == "none"


# -- history -----------------------------------------------------------------------------

HISTORY = [
    {"role": "developer", "content": "Answer in French."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees, sunny"},
]


@pytest.mark.rpc
async def test_history_with_calls_and_results_is_sent_in_each_protocols_shape(either):
    server, backend = either
    events = await events_of(backend, request(messages=HISTORY, tools=TOOLS))
    assert "".join(e for e in events if isinstance(e, str)) == server.reply  # the answer after the result
    sent = server.requests[-1][1]["messages"]
    if backend.kind == "openai":
        assert sent == [{**HISTORY[0], "role": "system"}, *HISTORY[1:]]
    else:
        assert sent == [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "18 degrees, sunny", "tool_name": "get_weather"},
        ]


@pytest.mark.rpc
async def test_past_arguments_that_are_no_json_object_are_refused_for_ollama(ollama):
    _, backend = ollama
    history = json.loads(json.dumps(HISTORY))
    history[2]["tool_calls"][0]["function"]["arguments"] = "Paris"
    with pytest.raises(InvalidParams, match="must be a JSON object"):
        await events_of(backend, request(messages=history))


# -- structured output -------------------------------------------------------------------


@pytest.mark.rpc
async def test_response_format_json_schema_gives_json_valid_against_it(either):
    server, backend = either
    fmt = {"type": "json_schema", "json_schema": {"name": "film", "schema": ANSWER, "strict": True}}
    events = await events_of(backend, request(messages=ASK, response_format=fmt))
    assert valid(ANSWER, json.loads("".join(e for e in events if isinstance(e, str))))
    assert events[-1].finish_reason == "stop"
    body = server.requests[-1][1]
    if backend.kind == "openai":
        assert body["response_format"] == fmt
    else:
        assert body["format"] == ANSWER


@pytest.mark.rpc
async def test_a_server_that_takes_schemas_only_in_json_object_is_asked_again_in_that_form(openai):
    server, backend = openai
    server.llama_cpp_formats = True  # as llama_cpp.server: json_schema is a validation error, 500
    fmt = {"type": "json_schema", "json_schema": {"name": "film", "schema": ANSWER, "strict": False}}
    for _ in range(2):
        events = await events_of(backend, request(messages=ASK, response_format=fmt))
        assert valid(ANSWER, json.loads("".join(e for e in events if isinstance(e, str))))
    sent = [body["response_format"] for _, body in server.requests]
    assert sent == [fmt, {"type": "json_object", "schema": ANSWER}, {"type": "json_object", "schema": ANSWER}]
    await events_of(backend, request(messages=ASK, response_format={"type": "json_object"}))
    assert server.requests[-1][1]["response_format"] == {"type": "json_object"}  # only schemas change form
    with pytest.raises(Unavailable, match="answered 500"):  # any other failure is not retried
        server.fail_status = 500
        await events_of(backend, request(messages=ASK, response_format=fmt))
    assert len(server.requests) == 4


@pytest.mark.rpc
async def test_json_object_and_penalties_reach_the_server(either):
    server, backend = either
    req = request(messages=ASK, response_format={"type": "json_object"}, frequency_penalty=0.5,
                  presence_penalty=-0.25)
    events = await events_of(backend, req)
    assert isinstance(json.loads("".join(e for e in events if isinstance(e, str))), dict)
    body = server.requests[-1][1]
    if backend.kind == "openai":
        assert body["response_format"] == {"type": "json_object"}
        assert (body["frequency_penalty"], body["presence_penalty"]) == (0.5, -0.25)
        assert "tools" not in body and "parallel_tool_calls" not in body
    else:
        assert body["format"] == "json"
        assert (body["options"]["frequency_penalty"], body["options"]["presence_penalty"]) == (0.5, -0.25)


# -- through the service: the chunks ----------------------------------------------------


@pytest.mark.rpc
async def test_calls_reach_the_caller_as_one_tool_calls_chunk(ollama, openai):
    models = {
        "llama": {"backend": "ollama", "url": ollama[0].url, "model": "llama3.1:8b"},
        "gpt": {"backend": "openai", "url": openai[0].base_url, "model": "gpt-4o-mini", "api_key_env": "KEY"},
    }
    environ = {"INFERSWARM_MODELS": json.dumps(models), "KEY": "sk-test"}
    async with AsyncExitStack() as stack:
        service = await open_service(stack, load(InferenceConfig, environ), worker_id="w", environ=environ)
        for model in models:
            chunks = [c async for c in service.generate(model=model, messages=ASK, tools=TOOLS,
                                                        tool_choice={"type": "function",
                                                                     "function": {"name": "add"}})]
            assert len(chunks) == 2 and chunks[-1]["finish_reason"] == "tool_calls"
            (call,) = chunks[0]["tool_calls"]
            assert call["index"] == 0 and call["function"]["name"] == "add" and chunks[0]["prompt_tokens"] > 0
            models_list = {m["name"]: m for m in (await service.models())["models"]}
            expected = ["chat", "tools", "json"] + (["logprobs"] if model == "gpt" else [])  # not Ollama
            assert models_list[model]["capabilities"] == expected


# -- the OpenAI stream's tool call fragments, as servers send them ----------------------


def _chunk(*fragments: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    delta = {"tool_calls": list(fragments)} if fragments else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@pytest.mark.unit
def test_fragments_repeating_id_and_name_as_llama_cpp_server_does_are_one_call():
    state = _StreamState(True, "server")
    head = {"index": 0, "id": "call__0_add_cmpl-1", "type": "function", "function": {"name": "add"}}
    state.feed({"choices": [{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": None}}]})
    for piece in ('{"a": ', '1, "b"', ': 2}'):
        state.feed(_chunk({**head, "function": {"name": "add", "arguments": piece}}))
    state.feed(_chunk(finish="tool_calls"))
    calls, done = state.end()
    assert calls.calls[0].to_dict() == {"id": "call__0_add_cmpl-1", "type": "function",
                                        "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    assert done == Done("tool_calls", 0, 3)


@pytest.mark.unit
def test_calls_after_stop_are_tool_calls_and_a_missing_id_is_made():
    state = _StreamState(True, "server")
    state.feed(_chunk({"index": 1, "type": "function", "function": {"name": "add", "arguments": ""}}))
    state.feed(_chunk({"index": 0, "id": "call_x", "function": {"name": "get_weather", "arguments": "{}"}}))
    state.feed(_chunk(finish="stop"))
    calls, done = state.end()
    assert [c.name for c in calls.calls] == ["get_weather", "add"] and calls.calls[0].id == "call_x"
    assert CALL_ID.fullmatch(calls.calls[1].id) and calls.calls[1].arguments == "{}"
    assert done.finish_reason == "tool_calls"


@pytest.mark.unit
@pytest.mark.parametrize("fragments, finish", [
    ([{"index": 0, "function": {"name": "add", "arguments": {"a": 1}}}], "tool_calls"),
    ([{"index": "0", "function": {"name": "add"}}], "tool_calls"),
    ([{"index": 0, "id": 7, "function": {"name": "add"}}], "tool_calls"),
    (["add"], "tool_calls"),
    ([{"index": 0, "function": {"arguments": "{}"}}], "tool_calls"),  # never named
    ([], "tool_calls"),  # says tool_calls, made none
])
def test_malformed_fragments_are_malformed_data(fragments, finish):
    state = _StreamState(True, "server")
    with pytest.raises(Unavailable, match="malformed"):
        state.feed(_chunk(*fragments))
        state.feed(_chunk(finish=finish))
        state.end()
