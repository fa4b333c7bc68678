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

The generation parameters (tools, response_format, ...) pass through to the
gateway as the generation contract has them; params.py decides which names
of a body get there (none silently ignored). Replies name the gateway's
request id in `x-request-id`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from aiohttp import web

from shared.errors import InvalidParams, MeshError, NotFound
from shared.generation import text_of, tool_calls_of
from services.web.api import bearer, json_body
from services.web.errors import openai_error_body
from services.web.params import DROP_PARAMS, DROPPED_HEADER, generation_params
from services.web.ratelimits import facts_of, openai_headers
from services.web.relay import Relay
from services.web.session import UPSTREAM
from services.web.upstream import model_rows

__all__ = ["routes"]

routes = web.RouteTableDef()
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def _common(request: web.Request, body: dict[str, Any], *, chat: bool
            ) -> tuple[str, bool, bool, dict[str, Any], list[str]]:
    """model, stream, include_usage, the contract's parameters and the names dropped (params.py)."""
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
    if not chat and isinstance(body.get("prompt"), list) and len(body["prompt"]) == 1:
        body = {**body, "prompt": body["prompt"][0]}  # one prompt in a list: the SDKs' habit
    params, dropped = generation_params(body, drop_unsupported=request.app[DROP_PARAMS], chat=chat)
    return model, stream, include_usage, params, dropped


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class _Shape:
    """OpenAI's objects for one request: chat or legacy completions."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False) -> None:
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole(self, text: str, calls: list[dict[str, Any]], finish: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None,
                                       "refusal": None}
            if calls:
                message["tool_calls"] = [_call(call) for call in calls]
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            return {**self._envelope("chat.completion", [choice]), "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._envelope("text_completion", [choice]), "usage": usage}

    def piece(self, delta: dict[str, Any] | None, finish: str | None = None, text: str = "") -> dict[str, Any]:
        """A chunk: chat's `delta` (content, role or tool_calls), or a completion's text."""
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
            chunk = self._envelope("chat.completion.chunk", [choice])
        else:
            chunk = self._envelope("text_completion",
                                   [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk has it, null but on the last
        return chunk

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind, []), "usage": usage}


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
    model, stream, include_usage, generation, dropped = _common(request, body, chat=chat)
    relay = await Relay.start(request.app[UPSTREAM], {"api_key": api_key, "model": model, **generation,
                                                      "stream": stream})
    shape = _Shape(chat, model, include_usage)
    try:
        if not stream:
            text = await relay.collect()  # the final chunk's exact rate-limit facts with it
            return web.json_response(shape.whole(text, relay.calls, relay.finish_reason, relay.usage),
                                     headers={**relay.headers(), **_dropped(dropped)})
        headers = {**relay.headers(), **_dropped(dropped)}
        response = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
        await response.prepare(request)
        if chat:  # as OpenAI: content "" before text, null before tool calls
            opening = None if relay.opens_with_calls else ""
            await response.write(_sse(shape.piece({"role": "assistant", "content": opening})))
        try:
            async for chunk in relay.outputs():
                await response.write(_sse(shape.piece(_delta(chunk), text=text_of(chunk) or "")))
        except MeshError as exc:  # the stream already began: end it with the error
            await response.write(_sse(openai_error_body(exc)))
            await response.write_eof()
            return response
        await response.write(_sse(shape.piece({}, relay.finish_reason)))
        if include_usage:
            await response.write(_sse(shape.usage_chunk(relay.usage)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    finally:
        await relay.close()


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
