"""The generation contract (shared/generation/) and the names of an HTTP body that reach it
(services/web/params.py): what is accepted, what is refused and how it is named."""

from __future__ import annotations

import json

import pytest

from shared.errors import InvalidParams
from shared.generation import (
    MAX_TOP_LOGPROBS, PARAMETERS, Limits, Message, ToolCall, ToolChoice, build_request, logprobs_of,
)
from services.inference.backends.structured import grammar_of, parse_calls, prompt_messages
from services.web.params import generation_params

pytestmark = pytest.mark.unit

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
HISTORY = [
    {"role": "developer", "content": "Be brief."},
    *ASK,
    {"role": "assistant", "content": None, "refusal": None, "annotations": [],
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
]


def test_a_conversation_with_tools_history_and_a_format():
    request = build_request(Limits(), {
        "messages": HISTORY, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "response_format": {"type": "json_object"}, "presence_penalty": 0.5,
    })
    assert request.messages[0] == Message("developer", "Be brief.")
    assert request.messages[2].tool_calls == (ToolCall("call_1", "get_weather", "{\"city\": \"Paris\"}"),)
    assert request.messages[3].tool_call_id == "call_1"
    assert request.choice == ToolChoice("function", "get_weather") and request.calls_tools and request.wants_json
    assert (request.max_tokens, request.temperature, request.top_p) == (None, None, None)  # left to the model
    # What a gateway sends on is what a worker takes: the same request again.
    assert build_request(Limits(), request.to_params()) == request


def test_defaults_are_filled_only_where_the_caller_left_them():
    request = build_request(Limits(), {"messages": ASK, "temperature": 0.0})
    filled = request.resolved(max_tokens=2048, temperature=0.2, top_p=0.9)
    assert (filled.max_tokens, filled.temperature, filled.top_p) == (2048, 0.0, 0.9)
    assert filled.deterministic
    # A worker fills them as it checks (one construction): the same request.
    assert build_request(Limits(), {"messages": ASK, "temperature": 0.0}, max_tokens=2048, temperature=0.2,
                         top_p=0.9) == filled
    assert build_request(Limits(), {"messages": ASK, "tools": [TOOL]}).choice.mode == "auto"
    assert build_request(Limits(), {"messages": ASK}).choice.mode == "none"


@pytest.mark.parametrize("params, param", [
    ({"messages": ASK, "logprobs": "yes"}, "logprobs"),
    ({"messages": ASK, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": ASK, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"messages": ASK, "logprobs": True, "top_logprobs": 2.0}, "top_logprobs"),
    ({"messages": ASK, "top_logprobs": 2}, "top_logprobs"),  # only with logprobs: true
    ({"messages": ASK, "logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": ASK, "tool_choice": "required"}, "tool_choice"),  # no tools
    ({"messages": ASK, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"messages": ASK, "tools": [TOOL, TOOL]}, "tools"),  # one name twice
    ({"messages": ASK, "tools": [{"type": "retrieval"}]}, "tools"),
    ({"messages": ASK, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),  # no tool_call_id
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages"),  # null content without calls
    ({"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]}, "messages"),
    ({"prompt": "x", "tools": [TOOL]}, "tools"),
    ({"messages": ASK, "top_p": 0}, "top_p"),
    ({"messages": ASK, "frequency_penalty": 3}, "frequency_penalty"),
    ({"messages": ASK, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_refusals_name_the_parameter(params, param):
    with pytest.raises(InvalidParams) as refused:
        build_request(Limits(), params)
    assert refused.value.data["param"] == param


def test_logprobs_and_top_logprobs_go_through_the_contract_and_back():
    request = build_request(Limits(), {"messages": ASK, "logprobs": True, "top_logprobs": 20})
    assert (request.logprobs, request.top_logprobs) == (True, 20)
    assert request.to_params()["logprobs"] is True and request.to_params()["top_logprobs"] == 20
    assert build_request(Limits(), request.to_params()) == request
    only = build_request(Limits(), {"prompt": "x", "logprobs": True})
    assert (only.logprobs, only.top_logprobs) == (True, 0) and "top_logprobs" not in only.to_params()
    # What asks for nothing is accepted and leaves nothing on the wire.
    nothing = build_request(Limits(), {"messages": ASK, "logprobs": False, "top_logprobs": 0})
    assert not nothing.logprobs and "logprobs" not in nothing.to_params()
    assert {"logprobs", "top_logprobs"} <= PARAMETERS and MAX_TOP_LOGPROBS == 20


def test_chunk_logprobs_are_read_whatever_the_chunk_holds():
    item = {"token": " Paris", "logprob": -0.25, "bytes": [32, 80, 97, 114, 105, 115], "top_logprobs": []}
    assert logprobs_of({"text": " Paris", "logprobs": [item]}) == [item]
    assert logprobs_of({"text": "x"}) == [] and logprobs_of({"logprobs": "junk"}) == [] and logprobs_of(None) == []


def test_tool_definitions_count_toward_the_prompt_bound():
    big = {"type": "function", "function": {"name": "f", "description": "d" * 60}}
    with pytest.raises(InvalidParams, match="too long"):
        build_request(Limits(max_prompt_chars=50), {"messages": [{"role": "user", "content": "hi"}], "tools": [big]})


# -- the local backend's part: prompt, grammar, parse ---------------------------------------


def test_tools_are_shown_in_the_system_message_and_results_fold_into_the_users_turn():
    request = build_request(Limits(), {"messages": HISTORY, "tools": [TOOL], "tool_choice": "required"})
    rendered = prompt_messages(request)
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.")
    assert "<tools>" in rendered[0]["content"] and "You must call" in rendered[0]["content"]
    assert rendered[1:] == [{"role": "user", "content":
                             'Weather in Paris?\n\nget_weather({"city": "Paris"}) returned: 18 C and sunny'}]


def test_grammars_for_each_choice_and_format():
    forced = grammar_of(build_request(Limits(), {"messages": ASK, "tools": [TOOL], "tool_choice": "required"}))
    assert forced is not None and forced.startswith('root ::= ("<tool_call>" tc-calls "</tool_call>")\n')
    auto = grammar_of(build_request(Limits(), {"messages": ASK, "tools": [TOOL]}))
    assert auto is not None and auto.splitlines()[0].endswith("| ([^<\\x00] [^\\x00]*)")
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}
    assert "tc-answer" in (grammar_of(build_request(Limits(), {"messages": ASK, "response_format": schema})) or "")
    assert grammar_of(build_request(Limits(), {"messages": ASK, "tools": [TOOL], "tool_choice": "none"})) is None


def test_calls_parse_with_fresh_ids_and_arguments_as_json_text():
    (call,) = parse_calls('<tool_call>[{"name": "get_weather", "arguments": {"city": "Lyon"}}]</tool_call>')
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Lyon"}
    assert call.id.startswith("call_") and len(call.id) == 29


# -- which names of an HTTP body reach the contract ---------------------------------------


def test_an_openai_body_passes_the_contracts_names_through():
    params, dropped = generation_params({"model": "m", "messages": ASK, "stream": True, "user": "u-1",
                                         "max_completion_tokens": 9, "n": 1, "logprobs": False, "tools": [TOOL]},
                                        drop_unsupported=False)
    assert params == {"messages": ASK, "max_tokens": 9, "tools": [TOOL], "logprobs": False} and dropped == []
    params, _ = generation_params({"messages": ASK, "logprobs": True, "top_logprobs": 3}, drop_unsupported=False)
    assert params == {"messages": ASK, "logprobs": True, "top_logprobs": 3}  # the contract's own names


def test_legacy_completions_logprobs_is_a_count_of_alternatives():
    params, _ = generation_params({"prompt": "x", "logprobs": 2}, drop_unsupported=False, chat=False)
    assert params == {"prompt": "x", "logprobs": True, "top_logprobs": 2}
    assert generation_params({"prompt": "x", "logprobs": 0}, drop_unsupported=False, chat=False)[0] == {
        "prompt": "x", "logprobs": True, "top_logprobs": 0}  # the sampled tokens' only
    assert generation_params({"prompt": "x", "logprobs": None}, drop_unsupported=False, chat=False)[0] == {
        "prompt": "x"}
    for wrong in (6, -1, "2", True):
        with pytest.raises(InvalidParams) as refused:
            generation_params({"prompt": "x", "logprobs": wrong}, drop_unsupported=False, chat=False)
        assert refused.value.data["param"] == "logprobs"


def test_unsupported_parameters_are_refused_or_dropped_and_named():
    body = {"model": "m", "messages": ASK, "logit_bias": {"50256": -100}, "n": 3}
    with pytest.raises(InvalidParams) as refused:
        generation_params(body, drop_unsupported=False)
    assert refused.value.data == {"param": "logit_bias", "reason": "unsupported"}
    params, dropped = generation_params(body, drop_unsupported=True)
    assert params == {"messages": ASK} and dropped == ["logit_bias", "n"]
    with pytest.raises(InvalidParams) as unknown:  # not OpenAI's at all: refused either way
        generation_params({"messages": ASK, "frobnicate": 1}, drop_unsupported=True)
    assert unknown.value.data["param"] == "frobnicate"
    with pytest.raises(InvalidParams):
        generation_params({"prompt": "x"}, drop_unsupported=False, chat=True)


@pytest.mark.parametrize("schema", [
    {"type": "array", "items": {"type": "string"}, "minItems": 10**9},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^a{100000}$"}}},
    {"type": "object", "properties": {"deep": {"type": "string", "maxLength": 5000}}},
])
def test_schemas_asking_for_huge_repetitions_are_refused_by_the_contract(schema):
    """Grammars write repetitions out (ours and the model servers'): a few bytes of schema
    must not cost gigabytes anywhere, so the contract refuses them for every backend."""
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    with pytest.raises(InvalidParams) as refused:
        build_request(Limits(), {"messages": ASK, "response_format": fmt})
    assert refused.value.data == {"param": "response_format", "reason": "unsupported"}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                          "properties": {"x": schema}}}}
    with pytest.raises(InvalidParams) as refused:
        build_request(Limits(), {"messages": ASK, "tools": [tool], "tool_choice": "required"})
    assert refused.value.data["param"] == "tools"


def test_a_grammar_over_its_size_bound_is_refused(monkeypatch):
    from services.inference.backends import structured

    monkeypatch.setattr(structured, "MAX_GRAMMAR_CHARS", 200)  # a schema that is fine, a bound it is not
    schema = {"type": "object", "properties": {f"field_{n}": {"type": "string"} for n in range(20)}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    with pytest.raises(InvalidParams) as refused:
        grammar_of(build_request(Limits(), {"messages": ASK, "response_format": fmt}))
    assert refused.value.data == {"param": "response_format", "reason": "unsupported"}


def test_a_response_format_schema_counts_toward_the_size_bound():
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"description": "d" * 100}}}
    with pytest.raises(InvalidParams, match="too long"):
        build_request(Limits(max_prompt_chars=60), {"messages": [{"role": "user", "content": "hi"}],
                                                    "response_format": fmt})
