"""The official `openai` package, unchanged, against /v1 of a real stack.

web -> gateway -> inference worker -> a model server speaking the OpenAI
protocol (tests/openai_server.py), every hop real. The model's reply is
"The quick brown fox jumps over the lazy dog near the quiet river bank",
one token per word.
"""

from __future__ import annotations

import time

import openai
import pytest

from web_support import MODEL, new_key, web_stack

pytestmark = [pytest.mark.timeout(120), pytest.mark.stack]

RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
HELLO = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("web-openai")) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=new_key(stack, "sdk-sam"), max_retries=0)


def test_models_and_a_chat_completion(client):
    listed = client.models.with_raw_response.list()
    assert all(listed.headers.get(name) for name in RATE_HEADERS)
    assert MODEL in [model.id for model in listed.parse()]

    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=4)
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "The quick brown fox "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 4
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 4
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) < 100
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")


def test_streamed_chat_with_usage(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=5, stream=True, stream_options={"include_usage": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(raw.headers.get(name) for name in RATE_HEADERS)
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The quick brown fox jumps "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_legacy_completions_streamed_and_not(client):
    whole = client.completions.create(model=MODEL, prompt="Once", max_tokens=3)
    assert whole.object == "text_completion" and whole.choices[0].text == "The quick brown "
    assert whole.usage.completion_tokens == 3
    pieces = client.completions.create(model=MODEL, prompt="Once", max_tokens=3, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == "The quick brown "


def test_sdk_error_classes(stack, client):
    bad = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="isk_" + "x" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        bad.chat.completions.create(model=MODEL, messages=HELLO)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as invalid:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=9)
    assert invalid.value.body["param"] == "temperature"


def test_rate_limit_is_a_429_with_retry_after_and_headers(stack):
    limited = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=new_key(stack, "sdk-rita"), max_retries=0)
    error = None
    for _ in range(105):  # the free tier admits 100 requests an hour
        try:
            limited.completions.create(model=MODEL, prompt="x", max_tokens=1)
        except openai.RateLimitError as exc:
            error = exc
            break
    assert error is not None, "never rate limited"
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.response.headers["x-ratelimit-limit-requests"] == "100"


def test_an_error_after_the_stream_began_reaches_the_sdk(stack, client):
    stack.model.error_after = 2  # the model server fails after two tokens
    try:
        pieces = []
        with pytest.raises(openai.APIError) as failed:
            for chunk in client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
        assert pieces == ["The ", "quick "]
        assert failed.value.message
    finally:
        stack.model.heal()


def test_a_client_leaving_mid_stream_cancels_the_generation(stack, client):
    model = stack.model
    model.token_delay = 0.25  # 14 tokens: 3.5 s if nobody stops it
    try:
        before = model.disconnects
        started = time.monotonic()
        with client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100, stream=True) as stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    break  # the first word arrived: leave
        deadline = time.monotonic() + 3
        while model.disconnects == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert model.disconnects == before + 1, "the model server kept generating"
        assert time.monotonic() - started < 3.0
    finally:
        model.token_delay = 0.0
