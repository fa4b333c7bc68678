"""Logprobs through the inference service: the local SmolLM2 (the figures llama-cpp
itself gives), an OpenAI-compatible server (tests/openai_server.py, chat and legacy
shapes), the refusal of a model without the capability -- by the worker and by the
gateway's check -- and no caching of such requests."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack

import pytest

pytest.importorskip("llama_cpp")

from shared.config import load  # noqa: E402
from shared.dht import Provider  # noqa: E402
from shared.errors import InvalidParams  # noqa: E402
from shared.generation import Limits, build_request  # noqa: E402
from services.gateway.checks import check_capabilities  # noqa: E402
from services.inference.backends.local import default_gguf  # noqa: E402
from services.inference.catalog import SMOLLM2_SAMPLING  # noqa: E402
from services.inference.config import InferenceConfig  # noqa: E402
from services.inference.worker import open_service  # noqa: E402
from openai_server import OpenAIServer  # noqa: E402

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colours."}]
GREEDY = dict(temperature=0.0)


async def start(stack: AsyncExitStack, models: dict, **env: str):
    environ = {"INFERSWARM_MODELS": json.dumps(models), "INFERSWARM_CACHE_TTL": "0", **env}
    return await open_service(stack, load(InferenceConfig, environ), worker_id="logprobs-test", environ=environ)


async def collect(service, **params) -> list[dict]:
    return [chunk async for chunk in service.generate(**params)]


def texts(chunks: list[dict]) -> list[dict]:
    return [c for c in chunks if "text" in c]


@pytest.fixture(scope="module")
def llama_cpp_own():
    """llama-cpp's own logprobs need `logits_all=True` (a context the backend does not use)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(default_gguf()), n_ctx=512, n_threads=1, logits_all=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(params=[False, True], ids=["unbatched", "batched"])
async def local(request):
    """The local model, with a context per slot or with continuous batching (backends/batched.py)."""
    async with AsyncExitStack() as stack:
        yield await start(stack, {"smollm2": {"backend": "local", "slots": 1, "n_threads": 1, "batch": request.param},
                                  "echo": {"backend": "echo"}}, INFERSWARM_CACHE_TTL="60")


@pytest.mark.rpc
async def test_local_logprobs_are_llama_cpps_own_with_sorted_alternatives(local, llama_cpp_own):
    chunks = await collect(local, model="smollm2", prompt=PROMPT, max_tokens=8, logprobs=True, top_logprobs=3,
                           **GREEDY)
    items = [item for chunk in texts(chunks) for item in chunk["logprobs"]]
    assert all(chunk["logprobs"] for chunk in texts(chunks))  # every piece has its tokens'
    assert len(items) == chunks[-1]["usage"]["completion_tokens"] == 8
    assert "".join(item["token"] for item in items) == "".join(c["text"] for c in texts(chunks))
    for item in items:
        assert item["logprob"] <= 0 and bytes(item["bytes"]).decode() == item["token"]
        top = item["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["logprob"] >= item["logprob"]  # raw figures: the repeat penalty may pick another
    llama_cpp_own.reset()
    own = llama_cpp_own.create_completion(PROMPT, max_tokens=8, logprobs=3, temperature=0.0,
                                          repeat_penalty=SMOLLM2_SAMPLING.repeat_penalty)["choices"][0]
    assert own["text"] == "".join(c["text"] for c in texts(chunks))
    assert [item["token"] for item in items] == own["logprobs"]["tokens"]
    assert [item["logprob"] for item in items] == pytest.approx(own["logprobs"]["token_logprobs"], abs=1e-3)
    for item, alternatives in zip(items, own["logprobs"]["top_logprobs"]):
        assert {t["token"] for t in item["top_logprobs"]} <= set(alternatives)


@pytest.mark.rpc
async def test_local_whole_answer_has_every_tokens_logprobs_and_is_never_cached(local):
    asked = dict(model="smollm2", messages=CHAT, max_tokens=10, logprobs=True, **GREEDY)
    streamed = await collect(local, **asked)
    whole = await collect(local, stream=False, **asked)
    again = await collect(local, stream=False, **asked)
    (chunk,) = texts(whole)
    assert chunk["logprobs"] == [item for c in texts(streamed) for item in c["logprobs"]]
    assert all(item["top_logprobs"] == [] for item in chunk["logprobs"])  # top_logprobs left at 0
    assert not whole[-1]["cached"] and not again[-1]["cached"] and texts(again) == texts(whole)
    assert (await local.model_status("smollm2"))["cache"] == {"hits": 0, "misses": 0}  # never looked up
    plain = await collect(local, model="smollm2", messages=CHAT, max_tokens=10, stream=False, **GREEDY)
    assert "logprobs" not in texts(plain)[0]  # only when asked


@pytest.mark.rpc
async def test_a_model_without_the_capability_refuses_logprobs_by_name(local):
    with pytest.raises(InvalidParams) as refused:
        await collect(local, model="echo", messages=CHAT, logprobs=True)
    assert refused.value.data == {"param": "logprobs", "reason": "unsupported"}
    listed = {m["name"]: m["capabilities"] for m in (await local.models())["models"]}
    assert listed == {"smollm2": ["chat", "tools", "json", "logprobs"], "echo": ["chat"]}


@pytest.mark.unit
def test_the_gateway_refuses_logprobs_when_no_worker_announces_them():
    def worker(capabilities: str) -> Provider:
        return Provider("t", "inference", "tcp://127.0.0.1:1", b"k" * 32, b"c" * 40, "1", 0, 30.0,
                        {"capabilities": capabilities})

    asked = build_request(Limits(), {"messages": CHAT, "logprobs": True})
    with pytest.raises(InvalidParams) as refused:
        check_capabilities(asked, [worker("chat"), worker("chat,tools,json")])
    assert refused.value.data == {"param": "logprobs", "reason": "unsupported"}
    check_capabilities(asked, [worker("chat"), worker("chat,tools,json,logprobs")])  # one can: admitted
    check_capabilities(build_request(Limits(), {"messages": CHAT}), [worker("chat")])


@pytest.fixture
async def upstream():
    async with OpenAIServer(("gpt-4o-mini",)) as server, AsyncExitStack() as stack:
        service = await start(stack, {"gpt": {"backend": "openai", "url": server.base_url, "model": "gpt-4o-mini"}})
        yield server, service


@pytest.mark.rpc
async def test_openai_chat_logprobs_pass_through_as_the_server_sent_them(upstream):
    server, service = upstream
    chunks = await collect(service, model="gpt", messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=2)
    sent = server.requests[-1][1]
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)
    pieces = texts(chunks)
    assert len(pieces) == 4 and all(len(c["logprobs"]) == 1 for c in pieces)
    first = pieces[0]["logprobs"][0]
    assert first == {"token": pieces[0]["text"], "logprob": -0.1, "bytes": list(pieces[0]["text"].encode()),
                     "top_logprobs": [{"token": pieces[0]["text"], "logprob": -0.1,
                                       "bytes": list(pieces[0]["text"].encode())},
                                      {"token": " alt1", "logprob": -1.1, "bytes": list(b" alt1")}]}
    whole = await collect(service, model="gpt", messages=CHAT, max_tokens=4, logprobs=True, stream=False)
    assert [item["token"] for item in texts(whole)[0]["logprobs"]] == [c["text"] for c in pieces]
    assert server.requests[-1][1]["top_logprobs"] == 0
    await collect(service, model="gpt", messages=CHAT, max_tokens=4)
    assert "logprobs" not in server.requests[-1][1]  # not asked: not sent


@pytest.mark.rpc
async def test_openai_legacy_completion_logprobs_become_the_same_items(upstream):
    server, service = upstream
    chunks = await collect(service, model="gpt", prompt="Once upon", max_tokens=3, logprobs=True, top_logprobs=2)
    sent = server.requests[-1]
    assert sent[0] == "/v1/completions" and sent[1]["logprobs"] == 2 and "top_logprobs" not in sent[1]
    items = [item for c in texts(chunks) for item in c["logprobs"]]
    assert [item["token"] for item in items] == [c["text"] for c in texts(chunks)]
    assert [item["logprob"] for item in items] == pytest.approx([-0.1, -0.2, -0.3])
    for item in items:
        top = item["top_logprobs"]
        assert [t["token"] for t in top] == [item["token"], " alt1"] and top[0]["bytes"] == item["bytes"]
