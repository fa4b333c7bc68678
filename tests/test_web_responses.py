"""`POST /v1/responses` (OpenAI's Responses API) with the official `openai` package.

A real stack (`inferswarm up`, every hop real) whose worker serves two models:
"test-model" through its openai backend from tests/openai_server.py, which
answers "The quick brown fox jumps over the lazy dog near the quiet river
bank" (one token per word) and does chat only, and the embedded SmolLM2
("smollm2": llama.cpp, grammar-constrained tools and JSON). The unit tests
cover the translation of a Responses body into the generation contract.
"""

from __future__ import annotations

import json

import openai
import pytest

from shared.errors import InvalidParams
from services.web.responses_params import responses_request
from waiting import wait_until_sync
from web_support import MODEL, new_key, web_stack

pytestmark = [pytest.mark.timeout(180)]

LOCAL = "smollm2"
ANSWER = "The quick brown fox jumps over the lazy dog near the quiet river bank"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city now.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                          "required": ["city"], "additionalProperties": False}, "strict": True}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
TEXT_DONE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("web-responses"),
                   models={LOCAL: {"backend": "local", "slots": 1}}) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=new_key(stack, "resp-rhea"), max_retries=0)


@pytest.fixture(scope="module")
def local(client) -> openai.OpenAI:
    """The client, once the worker announces the local model (it loads the GGUF first)."""
    wait_until_sync(lambda: LOCAL in [m.id for m in client.models.list()], 60, interval=0.1,
                    message=f"{LOCAL} never appeared in /v1/models")
    return client


# -- test-model: text ---------------------------------------------------------------------------------------


@pytest.mark.stack
def test_a_response_says_what_chat_completions_says(client):
    raw = client.responses.with_raw_response.create(model=MODEL, input="Say something.", temperature=0)
    response = raw.parse()
    chat = client.chat.completions.create(model=MODEL, temperature=0,
                                          messages=[{"role": "user", "content": "Say something."}])
    assert response.output_text == chat.choices[0].message.content == ANSWER
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    assert response.status == "completed" and response.error is None and response.incomplete_details is None
    (message,) = response.output
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    assert message.id.startswith("msg_") and message.content[0].annotations == []
    assert response.usage.output_tokens == 14 and response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + 14
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.temperature == 0 and response.tool_choice == "auto" and response.tools == []
    assert raw.headers["x-request-id"].startswith("gw-")
    assert raw.headers["x-ratelimit-limit-requests"] == "100"


@pytest.mark.stack
def test_a_streamed_response_comes_in_openai_order(client):
    events = list(client.responses.create(model=MODEL, input="Say something.", stream=True))
    kinds = [event.type for event in events]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert kinds == TEXT_EVENTS + ["response.output_text.delta"] * 14 + TEXT_DONE + ["response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(deltas) == ANSWER and deltas[0] == "The "
    assert events[-1].response.output_text == ANSWER and events[-1].response.usage.output_tokens == 14
    assert {event.response.id for event in events if hasattr(event, "response")} == {events[0].response.id}
    assert events[0].response.status == "in_progress" and events[0].response.output == []

    with client.responses.stream(model=MODEL, input="Say something.") as stream:
        pieces = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(pieces) == final.output_text == ANSWER and final.status == "completed"


@pytest.mark.stack
def test_instructions_and_a_list_of_items_become_the_chat_messages(stack, client):
    response = client.responses.create(
        model=MODEL, instructions="Answer in English.", input=[
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name an animal."}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "A fox."}]},
            {"role": "user", "content": "Another?"}])
    assert response.output_text == ANSWER and response.instructions == "Answer in English."
    path, body = stack.model.requests[-1]  # what the model server was asked
    assert path == "/v1/chat/completions"
    assert [(m["role"], m["content"]) for m in body["messages"]][-4:] == [
        ("system", "Be brief."), ("user", "Name an animal."), ("assistant", "A fox."), ("user", "Another?")]
    assert body["messages"][0]["content"].startswith("Answer in English.")


@pytest.mark.stack
def test_max_output_tokens_makes_an_incomplete_response(client):
    response = client.responses.create(model=MODEL, input="Say something.", max_output_tokens=4)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "The quick brown fox " and response.output[0].status == "incomplete"
    assert response.usage.output_tokens == 4 and response.max_output_tokens == 4
    events = list(client.responses.create(model=MODEL, input="Say something.", max_output_tokens=4, stream=True))
    assert events[-1].type == "response.incomplete"  # as OpenAI: not response.completed
    assert events[-1].response.output_text == "The quick brown fox "


@pytest.mark.stack
def test_an_error_after_the_stream_began_is_response_failed(stack, client):
    stack.model.error_after = 2  # the model server fails after two tokens
    try:
        events = list(client.responses.create(model=MODEL, input="Say something.", stream=True))
    finally:
        stack.model.heal()
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["The ", "quick "]
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error.code == "server_error" and failed.response.error.message
    assert failed.response.output[0].content[0].text == "The quick "


@pytest.mark.stack
def test_a_client_leaving_mid_stream_cancels_the_generation(stack, client):
    model = stack.model
    model.token_delay = 0.25  # 14 tokens: 3.5 s if nobody stops it
    try:
        before = model.disconnects
        with client.responses.create(model=MODEL, input="Say something.", stream=True) as stream:
            for event in stream:
                if event.type == "response.output_text.delta":
                    break  # the first word arrived: leave
        wait_until_sync(lambda: model.disconnects > before, 3, interval=0.05,
                        message="the model server kept generating")
    finally:
        model.token_delay = 0.0


# -- errors -------------------------------------------------------------------------------------------------


@pytest.mark.stack
def test_refusals_are_openai_errors_naming_the_parameter(stack, client):
    def refused(**options) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(**{"model": MODEL, "input": "Say something.", **options})
        return caught.value

    assert refused(extra_body={"frobnicate": 1}).body["param"] == "frobnicate"
    unsupported = refused(previous_response_id="resp_0123")
    assert unsupported.body["param"] == "previous_response_id" and "stored" in unsupported.body["message"]
    assert refused(tools=[{"type": "web_search"}]).body["param"] == "tools"
    assert refused(input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://example.com/a.png"}]}]).body["param"] == "input"
    assert refused(reasoning={"effort": "high"}).body["param"] == "reasoning"
    # the gateway's refusals, in the Responses API's words
    bad_tool = {**WEATHER, "parameters": {"type": "array", "minItems": 10**9}}  # a schema no grammar should build
    assert refused(tools=[bad_tool]).body["param"] == "tools"
    too_many = refused(max_output_tokens=10**6)
    assert too_many.body["param"] == "max_output_tokens" and too_many.body["message"].startswith("max_output_tokens: ")
    assert client.responses.create(model=MODEL, input="Hi", store=True, metadata={"k": "v"}).metadata == {"k": "v"}

    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model="no-such-model", input="Hi")
    assert unknown.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="isk_" + "x" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        bad.responses.create(model=MODEL, input="Hi")
    assert denied.value.code == "invalid_api_key"


# -- smollm2: tools and JSON ---------------------------------------------------------------------------------


@pytest.mark.stack
def test_a_function_call_and_its_output_round_trip(local):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    called = local.responses.create(model=LOCAL, input=[question], tools=[WEATHER], tool_choice="required",
                                    temperature=0, max_output_tokens=60)
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls and called.status == "completed" and called.output_text == ""
    call = calls[0]
    assert call.name == "get_weather" and call.id.startswith("fc_") and call.call_id and call.status == "completed"
    arguments = json.loads(call.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)

    answer = local.responses.create(
        model=LOCAL, tools=[WEATHER], tool_choice="none", temperature=0, max_output_tokens=30,
        input=[question, *called.output,  # the SDK's items, sent back as they came
               {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}])
    assert [item.type for item in answer.output] == ["message"]
    assert answer.output_text.strip()


@pytest.mark.stack
def test_a_streamed_function_call(local):
    events = list(local.responses.create(model=LOCAL, input="Weather in Oslo?", tools=[WEATHER],
                                         tool_choice={"type": "function", "name": "get_weather"},
                                         temperature=0, max_output_tokens=60, stream=True))
    assert [event.type for event in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    added, delta, done, item_done, completed = events[2:]
    assert added.item.type == "function_call" and added.item.arguments == "" and added.item.status == "in_progress"
    assert delta.delta == done.arguments == item_done.item.arguments and "city" in json.loads(done.arguments)
    assert added.item.id == delta.item_id == item_done.item.id and item_done.item.status == "completed"
    assert completed.response.output[0].arguments == done.arguments


@pytest.mark.stack
def test_a_json_schema_text_format(local):
    form = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    response = local.responses.create(model=LOCAL, input="Invent a person: a name and an age.",
                                      text={"format": form}, temperature=0, max_output_tokens=60)
    person = json.loads(response.output_text)
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and len(person["name"]) <= 30
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 150
    assert response.text.format.type == "json_schema" and response.text.format.name == "person"


# -- the translation ----------------------------------------------------------------------------------------


@pytest.mark.unit
def test_items_become_messages_and_calls_join_one_assistant_message():
    asked = responses_request({"model": "m", "instructions": "Be kind.", "input": [
        {"role": "user", "content": "Hi"},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}", "id": "fc_1",
         "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{\"a\": 1}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "one"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "two"}]},
    ], "max_output_tokens": 9, "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_object"}}, "store": True, "user": "u1"}, drop_unsupported=False)
    assert asked.params["messages"] == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{\"a\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "one"},
        {"role": "tool", "tool_call_id": "call_2", "content": "two"}]
    assert asked.params["max_tokens"] == 9 and asked.params["response_format"] == {"type": "json_object"}
    assert asked.params["tools"] == [{"type": "function", "function": {
        k: WEATHER[k] for k in ("name", "description", "parameters", "strict")}}]
    assert asked.params["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert asked.echo["tools"] == [WEATHER] and asked.echo["user"] == "u1" and not asked.stream


@pytest.mark.unit
@pytest.mark.parametrize(("body", "param"), [
    ({"temprature": 1}, "temprature"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs"]}]}, "tools"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"metadata": {"k": 1}}, "metadata"),
])
def test_what_cannot_be_honoured_is_refused_by_name(body, param):
    with pytest.raises(InvalidParams) as refused:
        responses_request({"model": "m", "input": "Hi", **body}, drop_unsupported=False)
    assert refused.value.data["param"] == param


@pytest.mark.unit
def test_drop_params_drops_what_we_do_not_do_but_never_the_conversation():
    asked = responses_request({"model": "m", "input": "Hi", "reasoning": {"effort": "low"}, "truncation": "auto",
                               "service_tier": "auto", "background": False}, drop_unsupported=True)
    assert asked.dropped == ["reasoning", "truncation"] and set(asked.params) == {"messages"}
    with pytest.raises(InvalidParams):
        responses_request({"model": "m", "input": "Hi", "previous_response_id": "r"}, drop_unsupported=True)
