"""The official `openai` package against a stack whose model is served by a real
OpenAI-compatible server: llama-cpp-python's own `llama_cpp.server` (the embedded
SmolLM2 GGUF) behind the openai backend. Tools and structured output pass through
in OpenAI's protocol, and what that server does not do is made up for by the
backend (a one-tool `required` sent by name; `json_schema` in its own dialect)."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel

from llama_server_support import llama_server
from schema_check import valid
from web_support import new_key, web_stack

pytestmark = pytest.mark.stack

MODEL = "smollm2-server"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                         "parameters": WEATHER}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Answer(BaseModel):
    city: str
    population: int


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with llama_server(MODEL) as url, web_stack(tmp_path_factory.mktemp("llama-server"),
                                               models={MODEL: {"backend": "openai", "url": url, "slots": 1}}) as stack:
        yield openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=new_key(stack, "srv-sam"), max_retries=0,
                            timeout=120)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_call_through_llama_cpp_server(client, choice):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[TOOL], tool_choice=choice,
                                           temperature=0, max_tokens=60)
    first = reply.choices[0]
    assert first.finish_reason == "tool_calls"
    (call,) = first.message.tool_calls
    assert call.function.name == "get_weather" and valid(WEATHER, json.loads(call.function.arguments))


def test_json_schema_through_llama_cpp_server_parsed_by_the_sdk(client):
    parsed = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Name a city and its population."}],
        response_format=Answer, temperature=0, max_tokens=80)
    assert isinstance(parsed.choices[0].message.parsed, Answer)
