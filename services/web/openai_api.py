"""The OpenAI-compatible API: what OpenAI's SDKs call, forwarded to `gateway.infer`.

    GET  /v1/models              -> {"object": "list", "data": [{"id", "object": "model", ...}]}
    GET  /v1/models/{model}      -> {"id", "object": "model", ...}, or 404 `model_not_found`
    POST /v1/chat/completions    -> chat.completion, or SSE chat.completion.chunk ... [DONE]
    POST /v1/completions         -> text_completion, or SSE text_completion chunks ... [DONE]

`Authorization: Bearer <API key>`. Replies carry `x-ratelimit-limit-requests`,
`x-ratelimit-remaining-requests` and `x-ratelimit-reset-requests` (and the
`-tokens` trio) whenever the gateway reported them -- on successes, on 429s
(with `Retry-After`) and on streams. Errors are OpenAI's error object, so the
SDKs raise `AuthenticationError` (401), `NotFoundError` (404),
`RateLimitError` (429) and so on; an error after a stream began is sent as a
final `data: {"error": ...}` event, which the SDKs raise as `APIError`.
A client that disconnects cancels the handler, which closes the RPC stream:
the gateway and the worker stop generating.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from aiohttp import web

from shared.errors import InvalidParams, MeshError, NotFound
from services.web.api import bearer, json_body
from services.web.errors import openai_error_body
from services.web.ratelimits import facts_of, openai_headers
from services.web.relay import Relay, check_generation
from services.web.session import UPSTREAM
from services.web.upstream import model_rows

__all__ = ["routes", "chat_messages", "completion_prompt"]

routes = web.RouteTableDef()
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def _content_text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                return None
            parts.append(part["text"])
        return "".join(parts)
    return None


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParams("messages must be a non-empty array", {"param": "messages"})
    out = []
    for index, message in enumerate(messages):
        text = _content_text(message.get("content")) if isinstance(message, dict) else None
        if text is None or not isinstance(message.get("role"), str):
            raise InvalidParams(f"messages[{index}] must have a role and text content",
                                {"param": f"messages[{index}]"})
        out.append({"role": message["role"], "content": text})
    return out


def completion_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidParams("prompt must be a string (one prompt per request)", {"param": "prompt"})
    return prompt


def _common(body: dict[str, Any]) -> tuple[str, bool, bool, dict[str, Any]]:
    """model, stream, include_usage and the sampling parameters of a request."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidParams("model must be a non-empty string", {"param": "model"})
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidParams("stream must be a boolean", {"param": "stream"})
    if body.get("n", 1) != 1:
        raise InvalidParams("only n=1 is supported", {"param": "n"})
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return model, stream, include_usage, check_generation(body)


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class _Shape:
    """OpenAI's objects for one request: chat or legacy completions."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish}
            return {**self._envelope("chat.completion", [choice]), "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._envelope("text_completion", [choice]), "usage": usage}

    def piece(self, text: str | None, finish: str | None = None, *, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            return self._envelope("chat.completion.chunk",
                                  [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        return self._envelope("text_completion",
                              [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind, []), "usage": usage}


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    api_key = bearer(request)
    body = await json_body(request)
    model, stream, include_usage, sampling = _common(body)
    prompt = {"messages": chat_messages(body)} if chat else {"prompt": completion_prompt(body)}
    params = {"api_key": api_key, "model": model, **prompt, **sampling, "stream": stream}
    relay = await Relay.start(request.app[UPSTREAM], params)
    shape = _Shape(chat, model)
    try:
        if not stream:
            text = await relay.collect()
            return web.json_response(shape.whole(text, relay.finish_reason, relay.usage),
                                     headers=relay.headers())
        response = web.StreamResponse(headers={**_SSE_HEADERS, **relay.headers()})
        await response.prepare(request)
        if chat:
            await response.write(_sse(shape.piece(None, role=True)))
        try:
            async for piece in relay.texts():
                await response.write(_sse(shape.piece(piece)))
        except MeshError as exc:  # the stream already began: end it with the error
            await response.write(_sse(openai_error_body(exc)))
            await response.write_eof()
            return response
        await response.write(_sse(shape.piece(None if chat else "", relay.finish_reason)))
        if include_usage:
            await response.write(_sse(shape.usage_chunk(relay.usage)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    finally:
        await relay.close()


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
    return {"id": row["name"], "object": "model", "created": 0, "owned_by": "inferswarm",
            "workers": row["workers"]}
