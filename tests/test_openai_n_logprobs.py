"""`n` choices and logprobs on /v1, through the official `openai` package against a
real stack (`inferswarm up`) serving the embedded SmolLM2 (logprobs), the echo model
(none) and an OpenAI-compatible upstream ("test-model"): each of the `n` choices is a
request of its own, billed as such; logprobs in OpenAI's chat and legacy shapes."""

from __future__ import annotations

import json
import urllib.request
from collections import defaultdict

import openai
import pytest

from waiting import wait_until_sync
from web_support import MODEL, new_key, web_stack

pytestmark = pytest.mark.stack

ASK = [{"role": "user", "content": "Name a colour."}]
MODELS = {"smollm2": {"backend": "local", "slots": 2}, "echo": {"backend": "echo"}}
MONTHLY_TOKENS = 3000  #: the free tier's budget here: two requests for 1 000 tokens fit, three do not


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("nlog"), models=MODELS,
                   INFERSWARM_TIER_FREE_TOKENS_PER_MONTH=str(MONTHLY_TOKENS)) as running:
        yield running


def client_of(stack, name: str) -> tuple[openai.OpenAI, str]:
    key = new_key(stack, name)
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=120), key


def quota(stack, key: str) -> dict:
    request = urllib.request.Request(f"{stack.base_url}/api/quota", headers={"X-API-Key": key})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())["rate_limit"]


def test_n_choices_each_a_billed_request(stack):
    client, key = client_of(stack, "n-nora")
    before = quota(stack, key)
    raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=ASK, n=3, max_tokens=8,
                                                           temperature=0)
    reply = raw.parse()
    after = quota(stack, key)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert len({choice.message.content for choice in reply.choices}) == 1  # temperature 0: the same answer
    one = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == one.choices[0].message.content
    assert reply.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert reply.usage.prompt_tokens == 3 * one.usage.prompt_tokens
    # Three requests, each billed: the quota went down by the summed usage.
    spent = before["tokens_per_month"]["remaining"] - after["tokens_per_month"]["remaining"]
    assert spent == reply.usage.total_tokens > 0
    assert after["requests_per_hour"]["used"] - before["requests_per_hour"]["used"] == 3
    ids = raw.headers["x-inferswarm-request-ids"].split(",")
    assert len(set(ids)) == 3 and raw.headers["x-request-id"] == ids[0] and ids[0].startswith("gw-")


def test_n_streamed_interleaves_the_choices_then_one_summed_usage(stack):
    client, key = client_of(stack, "n-sam")
    before = quota(stack, key)["tokens_per_month"]
    stream = client.chat.completions.create(model=MODEL, messages=ASK, n=3, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True})
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, list[str]] = defaultdict(list)
    usages = []
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usages.append(chunk.usage)
            continue
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason is not None:
            finishes[choice.index].append(choice.finish_reason)
    assert sorted(texts) == [0, 1, 2] and len(set(texts.values())) == 1 and texts[0]
    assert finishes == {0: ["length"], 1: ["length"], 2: ["length"]}  # one finish chunk each
    (usage,) = usages  # one usage chunk, the last
    assert usage.completion_tokens == 15 and usage.total_tokens == usage.prompt_tokens + 15
    assert before["remaining"] - quota(stack, key)["tokens_per_month"]["remaining"] == usage.total_tokens


def test_n_on_legacy_completions_and_over_the_bound(stack):
    client, _ = client_of(stack, "n-lea")
    reply = client.completions.create(model="echo", prompt="one two three", n=2, max_tokens=2)
    assert [(c.index, c.text) for c in reply.choices] == [(0, "one two"), (1, "one two")]
    assert reply.usage.completion_tokens == 4
    for n in (9, 0):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=ASK, n=n)
        assert refused.value.body["param"] == "n"


def test_one_of_n_refused_fails_the_whole_request_and_closes_the_others(stack):
    client, key = client_of(stack, "n-fay")
    server = stack.model
    server.token_delay = 0.05  # the first two are still generating when the third is refused
    disconnects = server.disconnects
    try:
        with pytest.raises(openai.RateLimitError):  # each reserves ~1 040 of the 3 000 tokens: the third is over
            client.chat.completions.create(model=MODEL, messages=ASK, n=3, max_tokens=1000)
        wait_until_sync(lambda: server.disconnects >= disconnects + 2, 10,
                        message="the two admitted calls were not cancelled")
    finally:
        server.token_delay = 0.0
    assert quota(stack, key)["tokens_per_month"]["remaining"] > MONTHLY_TOKENS - 100  # only what was delivered


def test_logprobs_through_the_sdk_on_the_local_model(stack):
    client, _ = client_of(stack, "lp-lou")
    reply = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(item.token for item in content) == reply.choices[0].message.content
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    streamed = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True)
    items = [item for chunk in streamed for choice in chunk.choices if choice.delta.content
             for item in choice.logprobs.content]
    assert [(i.token, i.logprob) for i in items] == [(i.token, i.logprob) for i in content]


def test_legacy_logprobs_shape_and_the_refusal_of_a_model_without_them(stack):
    client, _ = client_of(stack, "lp-leo")
    reply = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5,
                                      temperature=0, logprobs=2)
    choice = reply.choices[0]
    assert "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.token_logprobs) == len(choice.logprobs.tokens) == 5
    assert all(token in top and 2 <= len(top) <= 3
               for token, top in zip(choice.logprobs.tokens, choice.logprobs.top_logprobs))
    offsets = choice.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for call in (lambda: client.chat.completions.create(model="echo", messages=ASK, logprobs=True),
                 lambda: client.completions.create(model="echo", prompt="x", logprobs=1)):
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert refused.value.body["param"] == "logprobs"
