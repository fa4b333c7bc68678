"""OpenAI as real apps use it: the official `openai` package and `langchain-openai`
against a real stack (`inferswarm up`), with the embedded SmolLM2 (tools and
structured output by grammar-constrained decoding), the local MiniLM
embedding model, the echo model and an OpenAI-compatible upstream ("test-model").
"""

from __future__ import annotations

import json
import math
import urllib.request
from collections import Counter

import openai
import pytest
from pydantic import BaseModel

from schema_check import valid
from web_support import MODEL, web_stack, new_key

pytestmark = pytest.mark.stack

WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                 "parameters": WEATHER}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MODELS = {
    "smollm2": {"backend": "local", "slots": 1}, "minilm": {"backend": "local", "kind": "embedding"},
    "echo": {"backend": "echo"},
    # the same app features through the Ollama and OpenAI-compatible backends (faithful test servers)
    "llama-ollama": {"backend": "ollama", "url": "ollama", "model": "llama3.1:8b"},
    "minilm-ollama": {"backend": "ollama", "kind": "embedding", "url": "ollama", "model": "all-minilm"},
    "te3-openai": {"backend": "openai", "kind": "embedding", "url": "openai", "model": "text-embedding-3-small"},
}
#: Chat models that do tools and structured output: one per kind of backend.
TOOL_MODELS = ["smollm2", MODEL, "llama-ollama"]


class City(BaseModel):
    name: str
    country: str
    population: int


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("apps"), models=MODELS, upstream_models=("text-embedding-3-small",),
                   ollama_models=("llama3.1:8b", "all-minilm")) as running:
        yield running


@pytest.fixture(scope="module")
def key(stack) -> str:
    return new_key(stack, "app-ann")


@pytest.fixture(scope="module")
def client(stack, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def test_models_say_what_they_can_do(client):
    listed = {model.id: model for model in client.models.list()}
    assert listed["smollm2"].capabilities == ["chat", "tools", "json", "logprobs"]
    assert listed["llama-ollama"].capabilities == ["chat", "tools", "json"]  # Ollama gives no logprobs
    assert listed["minilm-ollama"].capabilities == listed["te3-openai"].capabilities == ["embeddings"]
    assert listed["minilm"].capabilities == ["embeddings"]
    assert listed["echo"].capabilities == ["chat"]
    assert client.models.retrieve("minilm").capabilities == ["embeddings"]


# -- tools -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", TOOL_MODELS)
def test_a_tool_calling_round_trip(client, model):
    messages: list = list(ASK)
    first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL],
                                           tool_choice="required", temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert valid(WEATHER, arguments), arguments  # by construction: the grammar allows nothing else
    assert first.usage.completion_tokens > 0
    # The app runs the function and answers with a tool message; the model finishes.
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id,
                                  "content": json.dumps({"temperature_c": 18, "sky": "sunny"})}]
    second = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL],
                                            tool_choice="none", temperature=0, max_tokens=60)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content
    assert not answer.message.tool_calls
    if model == "smollm2":  # it answers from the tool's result (structured.py, `_history`)
        assert "18" in answer.message.content, answer.message.content


@pytest.mark.parametrize("model", TOOL_MODELS)
def test_a_named_function_streamed_in_openais_delta_format(client, model):
    with client.chat.completions.stream(
            model=model, messages=ASK, tools=[WEATHER_TOOL], temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}) as stream:
        kinds = Counter(event.type for event in stream)
        final = stream.get_final_completion()
    assert kinds["tool_calls.function.arguments.done"] == 1 and kinds["content.delta"] == 0
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and valid(WEATHER, json.loads(call.function.arguments))


def test_auto_answers_with_text_or_a_valid_call(client):
    reply = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER_TOOL], temperature=0,
                                           max_tokens=40)
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert valid(WEATHER, json.loads(choice.message.tool_calls[0].function.arguments))
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content


# -- structured output -------------------------------------------------------------------


@pytest.mark.parametrize("model", TOOL_MODELS)
def test_json_schema_output_parsed_by_the_sdk(client, model):
    parsed = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Describe the city of Lyon."}],
        response_format=City, temperature=0, max_tokens=120)
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.name


@pytest.mark.parametrize("model", TOOL_MODELS)
def test_json_object_output_is_a_json_object(client, model):
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "List three colours as JSON."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=80)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


# -- embeddings --------------------------------------------------------------------------

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone plays the guitar."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("The stock market fell sharply today.", "Share prices dropped a lot today."),
    ("It is raining heavily in London.", "There is a downpour in London."),
    ("She is reading a novel in the library.", "A woman reads a book at the library."),
]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_of_a_hundred_strings(client, stack):
    texts = [text for pair in PARAPHRASES for text in pair]
    texts += [f"Filler sentence number {n} about topic {n % 7}." for n in range(100 - len(texts))]
    raw = client.embeddings.with_raw_response.create(model="minilm", input=texts)  # the SDK asks for base64
    reply = raw.parse()
    assert len(reply.data) == 100 and [d.index for d in reply.data] == list(range(100))
    vectors = [d.embedding for d in reply.data]
    assert {len(v) for v in vectors} == {384} and reply.model == "minilm"
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 100
    assert raw.headers["x-request-id"].startswith("gw-")
    for index, (first, second) in enumerate(PARAPHRASES):
        paraphrase = cosine(vectors[2 * index], vectors[2 * index + 1])
        unrelated = [cosine(vectors[2 * index], vectors[2 * other + 1])
                     for other in range(len(PARAPHRASES)) if other != index]
        assert paraphrase > max(unrelated) + 0.2, (first, second, paraphrase, unrelated)
    floats = client.embeddings.create(model="minilm", input=texts[:2], encoding_format="float")
    for got, want in zip(floats.data, vectors[:2]):
        assert got.embedding == pytest.approx(want, abs=1e-6)  # float32 either way
    one = client.embeddings.create(model="minilm", input=texts[0])
    assert one.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)


@pytest.mark.parametrize("model, upstream, dims", [("minilm-ollama", "ollama", 384),
                                                   ("te3-openai", "openai", 1536)])
def test_embeddings_through_ollama_and_openai_compatible_servers(client, stack, model, upstream, dims):
    server = stack.ollama if upstream == "ollama" else stack.model
    reply = client.embeddings.create(model=model, input=["first text", "second text"])
    assert [len(d.embedding) for d in reply.data] == [dims, dims] and reply.usage.prompt_tokens > 0
    path, body = server.requests[-1]
    assert path.endswith("/embed" if upstream == "ollama" else "/embeddings")
    assert body["input"] == ["first text", "second text"]
    if upstream == "openai":
        shorter = client.embeddings.create(model=model, input="first text", dimensions=256)
        assert len(shorter.data[0].embedding) == 256 and server.requests[-1][1]["dimensions"] == 256


def test_embeddings_are_limited_and_billed_like_generation(stack):
    key = new_key(stack, "app-emma")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    before = quota(stack, key)["tokens_per_month"]
    reply = client.embeddings.create(model="minilm", input=["one text", "and another one"])
    after = quota(stack, key)["tokens_per_month"]
    assert before["remaining"] - after["remaining"] == reply.usage.prompt_tokens > 0
    assert after["used"] == before["used"] + reply.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as refused:  # a chat model makes no vectors
        client.embeddings.create(model="smollm2", input="x")
    assert refused.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as refused:  # and an embedding model no text
        client.chat.completions.create(model="minilm", messages=ASK)
    assert refused.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="minilm", input=[[1, 2, 3]])
    assert refused.value.body["param"] == "input"


def quota(stack, key: str) -> dict:
    request = urllib.request.Request(f"{stack.base_url}/api/quota", headers={"X-API-Key": key})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())["rate_limit"]


# -- faithful defaults and refusals -------------------------------------------------------


def test_no_hidden_token_cap_and_the_models_own_sampling(client, stack):
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Write a haiku about the sea"}])
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"  # not cut at a hidden 256
    lines = [line.strip() for line in choice.message.content.splitlines() if line.strip()]
    assert lines and max(Counter(lines).values()) <= 2, choice.message.content  # no loop
    # Where the catalog sets nothing, OpenAI's defaults reach the upstream server.
    client.chat.completions.create(model=MODEL, messages=ASK)
    sent = stack.model.requests[-1][1]
    assert (sent["temperature"], sent["top_p"]) == (1.0, 1.0) and sent["max_tokens"] == 4096


def test_what_is_not_supported_is_refused_by_name(client):
    cases = [
        (dict(model="echo", logprobs=True), "logprobs"),  # a model without the capability
        (dict(n=99), "n"),  # over INFERSWARM_MAX_N
        (dict(extra_body={"frobnicate": 1}), "frobnicate"),
        (dict(model="echo", tools=[WEATHER_TOOL], tool_choice="required"), "tools"),
        (dict(model="echo", response_format={"type": "json_object"}), "response_format"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         "messages"),
    ]
    for change, param in cases:
        args = {"model": MODEL, "messages": ASK, **change}
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**args)
        assert refused.value.body["param"] == param, (change, refused.value.body)
    assert client.chat.completions.create(model=MODEL, messages=ASK, n=1, logprobs=False).choices


def test_a_prompt_over_the_context_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "sea " * 3000}],
                                       max_tokens=4)
    assert refused.value.code == "context_length_exceeded"


def test_usage_is_null_on_every_chunk_but_the_last_with_include_usage(stack, key):
    body = {"model": MODEL, "messages": ASK, "stream": True, "max_tokens": 5,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"{stack.base_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        events = [line[6:] for line in reply.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all("usage" in chunk for chunk in chunks)
    assert [chunk["usage"] is None for chunk in chunks] == [True] * (len(chunks) - 1) + [False]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


# -- langchain-openai ----------------------------------------------------------------------


def test_langchain_tools_structured_output_and_embeddings(stack, key):
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    base = f"{stack.base_url}/v1"
    llm = ChatOpenAI(model="smollm2", base_url=base, api_key=key, temperature=0, max_retries=0, timeout=120)
    message = llm.bind_tools([WEATHER_TOOL], tool_choice="get_weather").invoke("What is the weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and valid(WEATHER, call["args"])
    city = llm.with_structured_output(City, method="json_schema").invoke("Describe the city of Lyon.")
    assert isinstance(city, City)
    embeddings = OpenAIEmbeddings(model="minilm", base_url=base, api_key=key, check_embedding_ctx_length=False)
    first, second = embeddings.embed_documents(["A man is playing a guitar.", "Someone plays the guitar."])
    assert len(first) == 384 and cosine(first, second) > 0.6
    assert embeddings.embed_query("A man is playing a guitar.") == pytest.approx(first, abs=1e-6)
