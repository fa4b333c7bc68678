"""The inference service: generation over the worker's models, with slots and a cache.

    inference.generate      model, stream, priority, tenant, cache_ttl, and the generation parameters
                            (shared/generation/: messages | prompt, max_tokens, temperature,
                            top_p, stop, seed, tools, tool_choice, response_format, ...) ->
                            stream of chunks (`tenant`: whose request, an opaque string; the
                            response cache is kept per tenant; `cache_ttl`: seconds it keeps
                            this answer, the operator's setting, 0 for none)
    inference.embed         model, input, dimensions, priority, tenant -> the vectors
    inference.models        -> the models this worker serves, their backends, slots, health,
                            circuit breaker and upstream keys
    inference.model_status  model -> loaded, healthy, breaker, keys, last error, latency, speed,
                            cache counts

`generate` and `embed` serve the gateway role only, `models` and
`model_status` the gateway and metrics roles (and the operator: shared/roles.py).
A model is a chat model (`generate`) or an embedding model (`embed`), as its
catalog entry's `kind` says; asking it for the other is INVALID_PARAMS with
`data: {param: "model", reason: "unsupported"}`. Every model lists what it does
in `capabilities`: a list in `inference.models` and `model_status`, joined by
commas in its announced load (records carry scalars only).

Each model has a circuit breaker over its backend's failures (health.py).
While it is open, `generate` and `embed` fail fast without calling the
backend: `UNAVAILABLE` with `data: {"retry_safe": true, "retry_after":
<whole seconds, at least 1>, "reason": "breaker_open"}` (a cached answer is
still served), and `withdrawn_topics()` names the model's topic, which the
worker then stops announcing. `inference.models` and `model_status` show
each model's `breaker` (`shared/breaker.py` `Breaker.view()`: state,
failures, retry_after, opened) and `keys` (the backend's `keys_view()`: its
upstream API keys, or null); the worker's own load counts `breakers_open`.

Chunks of `generate` (README.md has the full contract):

    {"text": "..."}                  a piece of text (one per token from the local model);
                                     with stream=False, the whole text in one chunk; the
                                     first one also has "prompt_tokens" (what a stream cut
                                     short bills for its prompt); with `logprobs: true`
                                     each also has "logprobs": [{"token", "logprob",
                                     "bytes", "top_logprobs": [{"token", "logprob",
                                     "bytes"}]}] for the tokens of that piece (OpenAI's
                                     ChatCompletionTokenLogprob; a model without the
                                     "logprobs" capability refuses the request)
    {"tool_calls": [{"index", "id", "type": "function",
                     "function": {"name", "arguments"}}]}
                                     the model called tools (OpenAI's delta shape, each
                                     call whole); at most one such chunk, after any text
    {"done": true, "model", "finish_reason": "stop"|"length"|"tool_calls",
     "usage": {"prompt_tokens", "completion_tokens", "total_tokens"},
     "timing": {"queue_ms", "ttft_ms", "tokens_per_s", "total_ms"},
     "cached": bool, "worker": {"id", "load": {...}}}       always last

The answer of `embed` (one map, not a stream; `shared/embedding.py` has the
parameter checks):

    {"model", "vectors": [bytes, ...],   one per text, in order: little-endian float32
     "dimensions": int,                  floats in each vector (bytes / 4)
     "usage": {"prompt_tokens", "total_tokens"},   equal: nothing is generated
     "worker": {"id", "load": {...}}}
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from shared.dht import model_topic
from shared.errors import InvalidParams, NotFound, Unavailable
from shared.logging import bind_request_id, get_logger
from shared.rpc import current_request, method
from shared.embedding import build_embed_request
from shared.generation import GenerateRequest, Limits, ToolCall, build_request, priority_of
from services.inference.backends.base import Backend, Done, Logprobs, Prompt, ToolCalls
from services.inference.backends.embedding import Embedder
from services.inference.cache import CachedResponse, ResponseCache, cache_key
from services.inference.catalog import Sampling
from services.inference.health import ModelHealth
from services.inference.slots import SlotPool

__all__ = ["ServedModel", "InferenceService"]

log = get_logger(__name__)

MAX_CACHE_TTL = 86_400  #: the longest a response may be kept (a day), as auth's `cache_ttl` setting allows


@dataclass(slots=True)
class ServedModel:
    """One model name this worker serves: its backend (a chat `Backend` or an
    `Embedder`), slots and health."""

    name: str
    backend: Backend | Embedder
    pool: SlotPool
    health: ModelHealth
    sampling: Sampling = Sampling()

    @property
    def capabilities(self) -> list[str]:
        """What the model does: "chat", "embeddings"... (its backend's `capabilities`)."""
        return list(self.backend.capabilities)

    def load(self) -> dict[str, Any]:
        """What a gateway routes on, as announced on this model's topic.

        A DHT record's load is a small map of scalars (shared/dht/record.py),
        so `capabilities` is announced as one comma-separated string
        ("chat", "embeddings", "chat,tools"); `inference.models` lists them.
        """
        return {
            "free_slots": self.pool.free, "slots": self.pool.slots, "queued": self.pool.queued,
            "queue_limit": self.pool.queue_limit, "healthy": self.health.healthy,
            "tokens_per_s": round(self.health.tokens_per_s or 0.0, 1),
            "capabilities": ",".join(self.backend.capabilities),  # records hold scalars only
        }


class _Timing:
    """The moments of one request, from its arrival."""

    def __init__(self) -> None:
        self.start = self.slot = time.monotonic()
        self.first: float | None = None

    def view(self, tokens: int, *, generated: bool) -> dict[str, Any]:
        end = time.monotonic()
        first = self.first if self.first is not None else end
        busy = end - self.slot
        return {
            "queue_ms": round((self.slot - self.start) * 1000, 2),
            "ttft_ms": round((first - self.start) * 1000, 2),
            "tokens_per_s": round(tokens / busy, 2) if generated and tokens and busy > 0 else None,
            "total_ms": round((end - self.start) * 1000, 2),
        }


class InferenceService:
    """Generation on this worker's models; a plain class, wired by `worker.py`."""

    name = "inference"

    def __init__(
        self, models: Mapping[str, ServedModel], cache: ResponseCache, *, limits: Limits | None = None,
        worker_id: str = "", queue_timeout: float = 60.0,
    ) -> None:
        self.served = dict(models)
        self.cache = cache
        self.limits = limits or Limits()
        self.worker_id = worker_id
        self.queue_timeout = queue_timeout
        self._by_topic = {model_topic(name): name for name in self.served}

    # -- RPC -------------------------------------------------------------------

    @method(roles=("gateway",))
    async def generate(
        self, model: str, stream: bool = True, priority: int | str = 0, tenant: str = "",
        cache_ttl: int | None = None, request_id: str = "", **generation: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream the generation's text (or tool calls), then one final chunk (see the module doc).

        `generation` holds the parameters of the generation contract
        (shared/generation/); what the request leaves out, the model's
        defaults fill in (catalog.py, `Sampling`). `cache_ttl`: seconds to keep
        the response in the cache (the operator's setting, passed by gateways;
        None: INFERSWARM_CACHE_TTL; 0: not cached, nor answered from the cache).
        `request_id`: the gateway's id of the request, put on this call's log lines."""
        _bind_request_id(request_id)
        served = self._served(model)
        backend = _chat(served)
        request = self._resolved(served, generation)
        rank = priority_of(priority)
        timing = _Timing()
        if not isinstance(tenant, str) or len(tenant) > 128:
            raise InvalidParams("tenant must be a string of at most 128 characters", {"param": "tenant"})
        if cache_ttl is not None and (type(cache_ttl) is not int or not 0 <= cache_ttl <= MAX_CACHE_TTL):
            raise InvalidParams(f"cache_ttl must be whole seconds from 0 to {MAX_CACHE_TTL}", {"param": "cache_ttl"})
        # Logprobs are not kept in the cache: a request that asks for them is never cached.
        cacheable = request.deterministic and not request.logprobs and self.cache.enabled_for(cache_ttl)
        key = cache_key(model, request, tenant) if cacheable else None
        hit = self.cache.get(model, key) if key is not None else None
        if hit is not None:
            for chunk in self._replay(served, hit, timing):
                yield chunk
            return
        served.health.admit()  # an open breaker: fail fast, the backend is not called
        pieces: list[str] = []
        calls: tuple[ToolCall, ...] = ()
        logprobs: list[dict[str, Any]] = []  # of the next piece of text
        all_logprobs: list[dict[str, Any]] = []  # of the whole text (stream=False)
        async with served.pool.acquire(rank, timeout=self._queue_budget()):
            timing.slot = time.monotonic()
            done = None
            prompt_tokens: int | None = None
            async with aclosing(backend.generate(request)) as events:
                try:
                    async for event in events:
                        if isinstance(event, Done):
                            done = event
                            continue
                        if isinstance(event, Prompt):
                            prompt_tokens = event.tokens
                            continue
                        if isinstance(event, Logprobs):
                            logprobs.extend(event.items)
                            continue
                        if timing.first is None:
                            timing.first = time.monotonic()
                        if isinstance(event, ToolCalls):
                            calls = event.calls
                            if stream:
                                yield _calls(calls, prompt_tokens if not pieces else None)
                            continue
                        pieces.append(event)
                        if stream:
                            yield _text(event, prompt_tokens if len(pieces) == 1 else None, logprobs,
                                        request.logprobs)
                        all_logprobs.extend(logprobs)
                        logprobs = []
                except (Unavailable, NotFound) as exc:  # the backend failed: unhealthy
                    served.health.failed(exc)
                    log.warning("backend failed", model=model, code=exc.code, error=exc.message)
                    raise
            result, final = self._settle(served, pieces, calls, done, timing)
        if key is not None:
            self.cache.put(key, result, cache_ttl)
        if not stream:
            for chunk in from_result(result, all_logprobs if request.logprobs else None):
                yield chunk
        final["worker"]["load"] = served.load()  # after the slot was freed
        log.debug("generation done", model=model, completion_tokens=len(pieces), timing=final.get("timing"))
        yield final

    def _resolved(self, served: ServedModel, generation: dict[str, Any]) -> GenerateRequest:
        """The checked request with the model's defaults where it left them out; a
        `max_tokens` beyond the model's maximum, or tools or a format it cannot do, are refused."""
        sampling, limit = served.sampling, self.limits.max_tokens
        most = min(sampling.max_output, limit) if sampling.max_output is not None else limit
        request = build_request(self.limits, generation, max_tokens=most, temperature=sampling.temperature,
                                top_p=sampling.top_p)
        if request.max_tokens is not None and request.max_tokens > most:
            raise InvalidParams(f"max_tokens must be at most {most} for model {served.name!r}",
                                {"param": "max_tokens"})
        capabilities = served.backend.capabilities
        if request.calls_tools and "tools" not in capabilities:
            raise InvalidParams(f"tools: model {served.name!r} does not support tools",
                                {"param": "tools", "reason": "unsupported"})
        if request.wants_json and "json" not in capabilities:
            raise InvalidParams(f"response_format: model {served.name!r} does not support structured output",
                                {"param": "response_format", "reason": "unsupported"})
        if request.logprobs and "logprobs" not in capabilities:
            raise InvalidParams(f"logprobs: model {served.name!r} does not give log probabilities",
                                {"param": "logprobs", "reason": "unsupported"})
        return request

    @method(roles=("gateway",))
    async def embed(self, model: str, input: list[Any], dimensions: int | None = None,
                    priority: int | str = 0, tenant: str = "", request_id: str = "") -> dict[str, Any]:
        """One vector per text of `input`, in order, taking a slot of the model
        like a generation (see the module doc). `tenant` is checked as
        `generate` checks it; nothing is cached, so it is not used yet."""
        _bind_request_id(request_id)
        served = self._served(model)
        embedder = _embedder(served)
        request = build_embed_request(self.limits, input=input, dimensions=dimensions)
        rank = priority_of(priority)
        if not isinstance(tenant, str) or len(tenant) > 128:
            raise InvalidParams("tenant must be a string of at most 128 characters", {"param": "tenant"})
        embedder.check_dimensions(request.dimensions)  # before waiting for a slot
        served.health.admit()  # an open breaker: fail fast, the backend is not called
        async with served.pool.acquire(rank, timeout=self._queue_budget()):
            started = time.monotonic()
            try:
                embedded = await embedder.embed(list(request.texts), request.dimensions)
            except (Unavailable, NotFound) as exc:  # the backend failed: unhealthy
                served.health.failed(exc)
                log.warning("backend failed", model=model, code=exc.code, error=exc.message)
                raise
            busy = time.monotonic() - started
        tokens = embedded.prompt_tokens
        # For an embedding model "latency" is the whole call and speed the input tokens read per second.
        served.health.succeeded(ttft_ms=busy * 1000, tokens_per_s=tokens / busy if tokens and busy > 0 else None)
        return {
            "model": served.name,
            "vectors": embedded.vectors,
            "dimensions": embedded.dimensions,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "worker": {"id": self.worker_id, "load": served.load()},
        }

    @method(idempotent=True, roles=("gateway", "metrics"))
    async def models(self) -> dict[str, Any]:
        """The models this worker serves: backend, slots, queue, health, breaker and keys of each."""
        return {
            "worker": self.worker_id,
            "models": [
                {"name": name, **s.backend.describe(), "loaded": s.backend.loaded, **s.load(),
                 "capabilities": s.capabilities, "breaker": s.health.breaker.view(),
                 "keys": s.backend.keys_view()}
                for name, s in self.served.items()
            ],
        }

    @method(idempotent=True, roles=("gateway", "metrics"))
    async def model_status(self, model: str) -> dict[str, Any]:
        """Loaded, healthy, last error, latency, speed, slots, cache counts, breaker and keys of `model`."""
        served = self._served(model)
        health = served.health.view()
        return {
            "model": model,
            **served.backend.describe(),
            "loaded": served.backend.loaded,
            "capabilities": served.capabilities,
            "healthy": health.pop("healthy"),
            "last_error": health.pop("last_error"),
            "latency": {"ttft_ms": health.pop("ttft_ms")},
            "tokens_per_s": health.pop("tokens_per_s"),
            **health,
            "slots": served.pool.state(),
            "cache": self.cache.counts(model),
            "breaker": served.health.breaker.view(),
            "keys": served.backend.keys_view(),
            "worker": self.worker_id,
        }

    # -- load, as announced ----------------------------------------------------

    def load(self) -> dict[str, Any]:
        """The whole worker's load: in every record it announces."""
        served = list(self.served.values())
        return {
            "models": len(served),
            "free_slots": sum(s.pool.free for s in served),
            "queued": sum(s.pool.queued for s in served),
            "healthy": all(s.health.healthy for s in served),
            # Changes when a breaker opens or closes, so that the metrics service asks again.
            "breakers_open": sum(1 for s in served if s.health.withdrawn),
        }

    def withdrawn_topics(self) -> list[str]:
        """The topics of the models whose breaker is not closed: not to be announced now."""
        return [model_topic(name) for name, s in self.served.items() if s.health.withdrawn]

    def topic_load(self, topic: str) -> dict[str, Any]:
        """One model's load, in the record of that model's topic."""
        name = self._by_topic.get(topic)
        return self.served[name].load() if name is not None else {}

    # -- helpers ---------------------------------------------------------------

    def _served(self, model: str) -> ServedModel:
        served = self.served.get(model)
        if served is None:
            raise NotFound(f"this worker does not serve model {model!r}",
                           {"model": model, "models": sorted(self.served)})
        return served

    def _queue_budget(self) -> float:
        context = current_request.get()
        if context is None:
            return self.queue_timeout
        return max(0.0, min(self.queue_timeout, context.remaining()))

    def _replay(self, served: ServedModel, hit: CachedResponse, timing: _Timing) -> list[dict[str, Any]]:
        """The chunks of a cached answer: its text (or calls) in one chunk, then the final chunk."""
        timing.first = time.monotonic()
        return [*from_result(hit), self._final(served, hit, timing, cached=True)]

    def _settle(self, served: ServedModel, pieces: list[str], calls: tuple[ToolCall, ...], done: Done | None,
                timing: _Timing) -> tuple[CachedResponse, dict[str, Any]]:
        """The result and final chunk of a finished generation; its figures go to health."""
        if done is None:
            error = Unavailable(f"{served.backend.kind} backend ended without a result")
            served.health.failed(error)
            raise error
        result = CachedResponse("".join(pieces), done.finish_reason, done.prompt_tokens, done.completion_tokens,
                                calls)
        final = self._final(served, result, timing, cached=False)
        figures = final["timing"]
        served.health.succeeded(ttft_ms=figures["ttft_ms"] - figures["queue_ms"],
                                tokens_per_s=figures["tokens_per_s"], tokens=done.completion_tokens)
        return result, final

    def _final(self, served: ServedModel, result: CachedResponse, timing: _Timing, *, cached: bool
               ) -> dict[str, Any]:
        return {
            "done": True,
            "model": served.name,
            "finish_reason": result.finish_reason,
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
            "timing": timing.view(result.completion_tokens, generated=not cached),
            "cached": cached,
            "worker": {"id": self.worker_id, "load": served.load()},
        }


def _chat(served: ServedModel) -> Backend:
    """The model's generation backend, or INVALID_PARAMS when it is an embedding model."""
    if isinstance(served.backend, Backend):
        return served.backend
    raise InvalidParams(
        f"model {served.name!r} is an embedding model: it turns texts into vectors (inference.embed), "
        "it does not generate text",
        {"param": "model", "reason": "unsupported", "capabilities": served.capabilities})


def _embedder(served: ServedModel) -> Embedder:
    """The model's embedder, or INVALID_PARAMS when it is a chat model."""
    if isinstance(served.backend, Embedder):
        return served.backend
    raise InvalidParams(
        f"model {served.name!r} is a chat model: it generates text (inference.generate), "
        "it does not make embeddings",
        {"param": "model", "reason": "unsupported", "capabilities": served.capabilities})


def _text(text: str, prompt_tokens: int | None, logprobs: list[dict[str, Any]] | None = None,
          asked: bool = False) -> dict[str, Any]:
    """A text chunk; the first one carries the prompt's tokens, and each the logprobs
    of its tokens when the request asked for them (README.md, "Chunks")."""
    chunk: dict[str, Any] = {"text": text}
    if prompt_tokens is not None:
        chunk["prompt_tokens"] = prompt_tokens
    if asked:
        chunk["logprobs"] = list(logprobs or ())
    return chunk


def _calls(calls: tuple[ToolCall, ...], prompt_tokens: int | None) -> dict[str, Any]:
    """A chunk of tool calls, in OpenAI's delta shape (each call whole, with its index)."""
    chunk: dict[str, Any] = {"tool_calls": [{"index": i, **call.to_dict()} for i, call in enumerate(calls)]}
    if prompt_tokens is not None:
        chunk["prompt_tokens"] = prompt_tokens
    return chunk


def from_result(result: CachedResponse, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The output chunks of a whole answer (not streamed, or replayed): its text (with the
    logprobs of all its tokens, when asked: `logprobs` not None), its calls."""
    chunks = [_text(result.text, result.prompt_tokens, logprobs, logprobs is not None)] if result.text else []
    if result.tool_calls:
        chunks.append(_calls(result.tool_calls, None if chunks else result.prompt_tokens))
    return chunks


_REQUEST_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def _bind_request_id(request_id: Any) -> None:
    """The gateway's request id on this call's log lines ("" : none); a value of another
    shape is the caller's error (INVALID_PARAMS), never logged."""
    if request_id == "":
        return
    if not isinstance(request_id, str) or _REQUEST_ID.fullmatch(request_id) is None:
        raise InvalidParams("request_id must be 1 to 64 letters, digits, '-' or '_'", {"param": "request_id"})
    bind_request_id(request_id)
