"""The OpenAI-compatible API: what OpenAI's SDKs call, forwarded to `gateway.infer`.

    GET  /v1/models              -> {"object": "list", "data": [{"id", "object": "model", ...}]}
    GET  /v1/models/{model}      -> {"id", "object": "model", ...}, or 404 `model_not_found`
    POST /v1/chat/completions    -> chat.completion, or SSE chat.completion.chunk ... [DONE]
    POST /v1/completions         -> text_completion, or SSE text_completion chunks ... [DONE]
    (POST /v1/responses          -> responses_api.py: the Responses API, translated to the same path)

`Authorization: Bearer <API key>`. Replies carry `x-ratelimit-limit-requests`,
`x-ratelimit-remaining-requests` and `x-ratelimit-reset-requests` (and the
`-tokens` trio) whenever the gateway reported them -- on successes, on 429s
(with `Retry-After`) and on streams. Errors are OpenAI's error object, so the
SDKs raise `AuthenticationError` (401), `NotFoundError` (404),
`RateLimitError` (429) and so on; an error after a stream began is sent as a
final `data: {"error": ...}` event, which the SDKs raise as `APIError`.
A client that disconnects cancels the handler, which closes the RPC stream:
the gateway and the worker stop generating.

The generation parameters (tools, response_format, logprobs, ...) pass through
to the gateway as the generation contract has them; params.py decides which
names of a body get there (none silently ignored). Replies name the gateway's
request id in `x-request-id`.

`n` (1..INFERSWARM_MAX_N) is taken here: `n` `gateway.infer` calls started at
once, each a request of its own (billed, limited, recorded), answered as `n`
choices; a stream interleaves their chunks as they come, each with its
`index`. `x-request-id` is the first call's id, `x-inferswarm-request-ids`
lists all of them.

Signed usage receipts (shared/receipts.py): a whole reply carries
`x-inferswarm-receipt`, the receipts of its calls comma-separated in choice
order; a stream's headers go before any receipt exists, so each choice's
finish chunk carries `receipt` (its call's) and the usage chunk, when asked,
`receipt` with all of them as the header has them (the SDKs ignore the field). A call refused or failing before its first output fails
the whole request and the others are closed; after a stream began, an error
ends it in-band. Logprobs (a model with the "logprobs" capability) are shown
in chat's `{content, refusal}` or the legacy `{tokens, token_logprobs,
top_logprobs, text_offset}` (README.md, "/v1").
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from shared.errors import InvalidParams, MeshError, NotFound
from shared.generation import logprobs_of, text_of, tool_calls_of
from shared.receipts import HEADER as RECEIPT_HEADER
from services.web.api import bearer, json_body
from services.web.errors import openai_error_body
from services.web.params import DROP_PARAMS, DROPPED_HEADER, MAX_N, fallback_of, generation_params
from services.web.ratelimits import facts_of, openai_headers
from services.web.relay import Relay
from services.web.session import UPSTREAM
from services.web.upstream import Upstream, model_rows

__all__ = ["REQUEST_IDS_HEADER", "routes"]

routes = web.RouteTableDef()
REQUEST_IDS_HEADER = "x-inferswarm-request-ids"
MODEL_HEADER = "x-inferswarm-model"  #: the model that serves: the one named, or its alias's or a fallback's
_T = TypeVar("_T")
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}


@dataclass(frozen=True, slots=True)
class _Asked:
    """What one OpenAI request asks for, beyond the contract's parameters."""

    model: str
    stream: bool
    include_usage: bool
    n: int  #: choices: that many `gateway.infer` calls
    params: dict[str, Any]  #: the contract's parameters (params.py)
    dropped: list[str]  #: the names dropped (INFERSWARM_DROP_PARAMS)

    @property
    def logprobs(self) -> bool:
        return self.params.get("logprobs") is True


def _common(request: web.Request, body: dict[str, Any], *, chat: bool) -> _Asked:
    """The request's model, stream, usage option, `n`, and the contract's parameters (params.py)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidParams("model must be a non-empty string", {"param": "model"})
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidParams("stream must be a boolean", {"param": "stream"})
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidParams("stream_options must be an object", {"param": "stream_options"})
    include_usage = options.get("include_usage") is True
    n = _choices(body.get("n"), request.app[MAX_N])
    body = {name: value for name, value in body.items() if name != "n"}
    if not chat and isinstance(body.get("prompt"), list) and len(body["prompt"]) == 1:
        body = {**body, "prompt": body["prompt"][0]}  # one prompt in a list: the SDKs' habit
    params, dropped = generation_params(body, drop_unsupported=request.app[DROP_PARAMS], chat=chat)
    return _Asked(model, stream, include_usage, n, params, dropped)


def _choices(n: Any, most: int) -> int:
    if n is None:
        return 1
    if type(n) is not int or not 1 <= n <= most:
        raise InvalidParams(f"n must be an integer between 1 and {most}", {"param": "n"})
    return n


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


@dataclass(slots=True)
class _Choice:
    """One finished choice of a whole (not streamed) reply."""

    text: str
    calls: list[dict[str, Any]]
    finish: str
    logprobs: list[dict[str, Any]]


class _Shape:
    """OpenAI's objects for one request: chat or legacy completions."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False, logprobs: bool = False) -> None:
        self.chat, self.model, self.include_usage, self.logprobs = chat, model, include_usage, logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # legacy logprobs: characters of each choice so far

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole(self, choices: list[_Choice], usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            shown = []
            for index, choice in enumerate(choices):
                message: dict[str, Any] = {"role": "assistant", "refusal": None,
                                           "content": choice.text if choice.text or not choice.calls else None}
                if choice.calls:
                    message["tool_calls"] = [_call(call) for call in choice.calls]
                shown.append({"index": index, "message": message, "logprobs": self._logprobs(index, choice.logprobs),
                              "finish_reason": choice.finish})
            return {**self._envelope("chat.completion", shown), "usage": usage}
        shown = [{"index": index, "text": choice.text, "logprobs": self._logprobs(index, choice.logprobs),
                  "finish_reason": choice.finish} for index, choice in enumerate(choices)]
        return {**self._envelope("text_completion", shown), "usage": usage}

    def piece(self, delta: dict[str, Any] | None, finish: str | None = None, text: str = "", index: int = 0,
              logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A chunk of choice `index`: chat's `delta` (content, role or tool_calls), or a completion's
        text; `logprobs` those of its tokens (a text chunk of a request that asked for them)."""
        shown = self._logprobs(index, logprobs) if logprobs is not None else None
        if self.chat:
            choice = {"index": index, "delta": delta or {}, "logprobs": shown, "finish_reason": finish}
            chunk = self._envelope("chat.completion.chunk", [choice])
        else:
            chunk = self._envelope("text_completion",
                                   [{"index": index, "text": text, "logprobs": shown, "finish_reason": finish}])
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk has it, null but on the last
        return chunk

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind, []), "usage": usage}

    def _logprobs(self, index: int, items: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Chat's `{content, refusal}`, or the legacy `{tokens, token_logprobs, top_logprobs,
        text_offset}` (each token's alternatives and itself, as OpenAI gives them); None
        when the request did not ask."""
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": items, "refusal": None}
        offsets = []
        for item in items:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(item["token"])
        return {"tokens": [item["token"] for item in items],
                "token_logprobs": [item["logprob"] for item in items],
                "top_logprobs": [{**{top["token"]: top["logprob"] for top in item.get("top_logprobs") or ()},
                                  item["token"]: item["logprob"]} for item in items],
                "text_offset": offsets}


def _call(call: dict[str, Any], *, index: bool = False) -> dict[str, Any]:
    """A tool call as OpenAI shows it: in a message, or (with its index) in a delta."""
    out = {"id": call.get("id"), "type": "function", "function": call.get("function")}
    return {"index": call.get("index", 0), **out} if index else out


def _delta(chunk: dict[str, Any]) -> dict[str, Any]:
    text = text_of(chunk)
    if text is not None:
        return {"content": text}
    return {"tool_calls": [_call(call, index=True) for call in tool_calls_of(chunk) or ()]}


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    api_key = bearer(request)
    body = await json_body(request)
    asked = _common(request, body, chat=chat)
    params = {"api_key": api_key, "model": asked.model, **asked.params, "stream": asked.stream}
    if not fallback_of(request, body):
        params["fallback"] = False
    relays = await _start(request.app[UPSTREAM], params, asked.n)
    shape = _Shape(chat, relays[0].model or asked.model, asked.include_usage, asked.logprobs)
    try:
        if not asked.stream:
            texts = await _all([relay.collect() for relay in relays])  # the final chunks' exact facts with them
            choices = [_Choice(text, relay.calls, relay.finish_reason, relay.logprobs)
                       for text, relay in zip(texts, relays)]
            return web.json_response(shape.whole(choices, _usage(relays)),
                                     headers={**_headers(relays), **_dropped(asked.dropped)})
        response = web.StreamResponse(headers={**_SSE_HEADERS, **_headers(relays), **_dropped(asked.dropped)})
        await response.prepare(request)
        try:
            await _stream(response, shape, relays, asked)
        except MeshError as exc:  # the stream already began: end it with the error
            await response.write(_sse(openai_error_body(exc)))
            await response.write_eof()
            return response
        if asked.include_usage:
            await response.write(_sse({**shape.usage_chunk(_usage(relays)), **_receipts(relays)}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    finally:
        if len(relays) == 1:
            await relays[0].close()
        else:
            await asyncio.gather(*(relay.close() for relay in relays))


async def _start(upstream: Upstream, params: dict[str, Any], n: int) -> list[Relay]:
    """`n` calls of `gateway.infer`, started together, each up to its first output; when
    one is refused or fails first, the others are closed and its error is raised."""
    if n == 1:
        return [await Relay.start(upstream, params)]
    tasks = [asyncio.ensure_future(Relay.start(upstream, params)) for _ in range(n)]
    try:
        return await _all(tasks)
    except BaseException:
        started = [task.result() for task in tasks
                   if task.done() and not task.cancelled() and task.exception() is None]
        await asyncio.gather(*(relay.close() for relay in started))
        raise


async def _all(awaitables: list[Awaitable[_T]]) -> list[_T]:
    """The results of all, in order; on the first failure the others are cancelled and it
    is raised (unlike `asyncio.gather`, which leaves them running)."""
    if len(awaitables) == 1:  # the usual one choice: no task, no wait (a tenth of a request's CPU)
        return [await awaitables[0]]
    tasks = [asyncio.ensure_future(item) for item in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _stream(response: web.StreamResponse, shape: _Shape, relays: list[Relay], asked: _Asked) -> None:
    """Every choice's chunks, interleaved as they come, each choice ending with its finish chunk."""
    if shape.chat:  # as OpenAI: content "" before text, null before tool calls
        for index, relay in enumerate(relays):
            opening = None if relay.opens_with_calls else ""
            await response.write(_sse(shape.piece({"role": "assistant", "content": opening}, index=index)))
    if len(relays) == 1:  # one choice: straight through, so a reader that stops holds the model
        async for item in relays[0].outputs():
            await response.write(_sse(_piece(shape, item, 0, asked)))
        await response.write(_sse(_finish(shape, relays[0], 0)))
        return
    # Several: one pump per choice into a queue of one item per choice at most, so a
    # reader that stops holds every model too (an unbounded queue would not).
    queue: asyncio.Queue[tuple[int, dict[str, Any] | BaseException | None]] = asyncio.Queue(maxsize=len(relays))

    async def pump(index: int, relay: Relay) -> None:
        try:
            async for chunk in relay.outputs():
                await queue.put((index, chunk))
            await queue.put((index, None))
        except Exception as exc:  # noqa: BLE001 - raised again by the writer below
            await queue.put((index, exc))

    pumps = [asyncio.ensure_future(pump(index, relay)) for index, relay in enumerate(relays)]
    try:
        for _ in range(len(relays)):
            while True:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    await response.write(_sse(_finish(shape, relays[index], index)))
                    break
                await response.write(_sse(_piece(shape, item, index, asked)))
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def _piece(shape: _Shape, item: dict[str, Any], index: int, asked: _Asked) -> dict[str, Any]:
    """The chunk of choice `index` carrying one output of its relay."""
    text = text_of(item)
    logprobs = logprobs_of(item) if asked.logprobs and text is not None else None
    return shape.piece(_delta(item), text=text or "", index=index, logprobs=logprobs)


def _finish(shape: _Shape, relay: Relay, index: int) -> dict[str, Any]:
    """The last chunk of choice `index`: its `finish_reason`, and its request's signed `receipt`."""
    return {**shape.piece({}, relay.finish_reason, index=index), **_receipts([relay])}


def _receipts(relays: list[Relay]) -> dict[str, str]:
    """`{"receipt": ...}`: the calls' signed receipts, comma-separated in choice order (as the
    header); nothing when a call has none."""
    receipts = [relay.receipt for relay in relays]
    known = [receipt for receipt in receipts if receipt is not None]
    return {"receipt": ",".join(known)} if known and len(known) == len(receipts) else {}


def _usage(relays: list[Relay]) -> dict[str, int]:
    """The usage of all the choices: each is its own request, billed as such."""
    return {key: sum(relay.usage[key] for relay in relays) for key in ("prompt_tokens", "completion_tokens",
                                                                         "total_tokens")}


def _headers(relays: list[Relay]) -> dict[str, str]:
    """`x-request-id` (the first call's), every call's id in `x-inferswarm-request-ids`, and the
    `x-ratelimit-*` headers of the counters with the least left over all the calls."""
    facts: dict[str, dict[str, Any]] = {}
    for relay in relays:
        for name, counter in relay.facts.items():
            if name not in facts or _left(counter) < _left(facts[name]):
                facts[name] = counter
    headers = openai_headers(facts)
    ids = [relay.request_id for relay in relays if relay.request_id is not None]
    if relays[0].request_id is not None:
        headers["x-request-id"] = relays[0].request_id
    if relays[0].model is not None:
        headers[MODEL_HEADER] = relays[0].model
    if ids:
        headers[REQUEST_IDS_HEADER] = ",".join(ids)
    receipts = _receipts(relays)  # a whole reply's; a stream's headers go before any exists
    if receipts:
        headers[RECEIPT_HEADER] = receipts["receipt"]
    return headers


def _left(counter: dict[str, Any]) -> float:
    remaining = counter.get("remaining")
    return float(remaining) if type(remaining) in (int, float) else math.inf


def _dropped(dropped: list[str]) -> dict[str, str]:
    """The parameters dropped (INFERSWARM_DROP_PARAMS), named."""
    return {DROPPED_HEADER: ",".join(dropped)} if dropped else {}


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    api_key = bearer(request)
    upstream = request.app[UPSTREAM]
    quota, models = await asyncio.gather(upstream.gateway.quota(api_key=api_key), upstream.gateway.models())
    data = [_model_object(row) for row in model_rows(models)]
    return web.json_response({"object": "list", "data": data}, headers=openai_headers(facts_of(quota)))


@routes.get("/v1/models/{model:.+}")  # ids may hold `/` and `:` (`org/name:tag`)
async def retrieve_model(request: web.Request) -> web.Response:
    api_key = bearer(request)
    name = request.match_info["model"]
    upstream = request.app[UPSTREAM]
    quota, models = await asyncio.gather(upstream.gateway.quota(api_key=api_key), upstream.gateway.models())
    row = next((row for row in model_rows(models) if row["name"] == name), None)
    if row is None:
        raise NotFound(f"The model `{name[:200]}` does not exist or you do not have access to it.", {"model": name})
    return web.json_response(_model_object(row), headers=openai_headers(facts_of(quota)))


def _model_object(row: dict[str, Any]) -> dict[str, Any]:
    capabilities = row.get("capabilities")
    return {"id": row["name"], "object": "model", "created": 0, "owned_by": "inferswarm",
            "workers": row["workers"], "capabilities": capabilities if isinstance(capabilities, list) else []}
