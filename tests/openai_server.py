"""A small server speaking the OpenAI HTTP API, for testing the openai backend.

Implements what a worker uses, with OpenAI's shapes:

* `GET /v1/models` -> `{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}`
* `POST /v1/chat/completions` and `POST /v1/completions`: with `"stream": true`
  server-sent events `data: {chunk}` (`chat.completion.chunk` with
  `choices[0].delta`, or `text_completion` with `choices[0].text`), a chunk
  carrying `finish_reason`, a usage chunk (`"choices": []`) when
  `stream_options.include_usage` is set, then `data: [DONE]`; without
  streaming one `chat.completion` / `text_completion` object with `usage`.
* `POST /v1/embeddings` `{"model", "input": str | [str], "encoding_format":
  "float" | "base64", "dimensions"}` -> `{"object": "list", "data": [{"object":
  "embedding", "index", "embedding": [float, ...] | base64 of float32}],
  "model", "usage": {"prompt_tokens", "total_tokens"}}` for the models in
  `embedding_dims` (name -> length), vectors as `ollama_server.hash_vector`;
  `dimensions` only for the models in `shortenable` (as OpenAI's
  text-embedding-3 models), else 400; an empty string or list is 400.
  `reverse_data` sends the items last index first.
* `logprobs`: chat's `logprobs: true` with `top_logprobs` 0..20, or the legacy
  `logprobs: 0..5` of /completions (else 400): every chunk with text carries
  `choices[0].logprobs` as OpenAI streams it -- chat `{"content": [{"token",
  "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
  "refusal": null}`, legacy `{"tokens", "token_logprobs", "top_logprobs":
  [{token: logprob}], "text_offset"}` -- with made-up, deterministic figures
  (`_piece_logprobs`); the whole answer has them all.
* errors: `{"error": {"message", "type", "param", "code"}}` with 400, 401
  (a wrong `Authorization: Bearer` key when `api_key` is set), 404
  (`model_not_found`), 500.
* several keys, each failing on command (`keys = {"k1": None, "k2": 429,
  "k3": 401}`, `reset_after`, `requests_by_key`: tests/upstream_keys.py). A
  spent key's 429 is `rate_limit_exceeded` with `retry-after` (whole seconds)
  and `x-ratelimit-reset-requests` / `-tokens` (Go durations, `1m30s`); 401
  `invalid_api_key`, 403 `unsupported_country_region_territory`, 5xx
  `server_error`. Every answer to a request with a key (`keys` or `api_key`
  set) carries `x-ratelimit-limit-requests`, `-limit-tokens`,
  `-remaining-requests`, `-remaining-tokens`, `-reset-requests` and
  `-reset-tokens`, as OpenAI sends them.
* `context_window` (tokens): a chat or completion whose prompt tokens plus
  `max_tokens` exceed it is OpenAI's 400 `context_length_exceeded` ("This
  model's maximum context length is N tokens. However, you requested M
  tokens (P in the messages, C in the completion)..."; "However, your
  messages resulted in M tokens" without max_tokens), `param: "messages"`.

The reply is `reply` split into word tokens, honouring `max_tokens`
(finish_reason "length") and `stop`.

Tools and structured output, deterministic, checked as OpenAI checks them
(`tool_choice` and `parallel_tool_calls` only with `tools`, a named
`tool_choice` one of them, a `tool` message answering an earlier call's id,
`response_format` text / json_object / json_schema with name and schema):

* it calls tools when `tool_choice` is "required" (the first tool), names a
  function (that one), or is "auto" / absent and the last message is the
  user's and mentions tools by name (each of them, in the order of `tools`);
  never with "none"; with `parallel_tool_calls: false`, the first call only.
  The arguments are built from the tool's parameters schema (`sample_of` in
  ollama_server.py). Streamed as OpenAI does: a chunk with the call's
  `index`, `id`, `type` and `function.name` (and `"arguments": ""`), then its
  arguments in pieces of `argument_piece` characters over several chunks
  (each piece counts as a token for `max_tokens`), then `finish_reason:
  "tool_calls"`.
* `response_format` json_object makes the reply `{"reply": reply}`,
  json_schema makes it `sample_of(schema)`, as JSON text in word tokens.
  `llama_cpp_formats = True` takes formats as llama-cpp-python's server
  does: `json_schema` refused (a validation error answered with 500), a
  `schema` inside `json_object` followed. `ignores_required = True` treats
  "required" as "auto", as llama_cpp.server does.

`requests` records every request's path and body, the last one last. Switches as in `ollama_server.py`:
`fail_status`, `malformed_after`, `error_after`, `drop_after`, `token_delay`,
and `usage=False` to ignore `include_usage` as some servers do. `open_now` and
`most_open` count the completion requests being answered at once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from typing import Any

from aiohttp import web

from local_site import serve_locally

from ollama_server import (canned_reply, hash_vector, mentioned_tools, sample_of, structured_reply, tokens_of,
                           unit_vector)
from upstream_keys import KeyedLimits, go_duration, whole_seconds

__all__ = ["OpenAIServer"]


class _Embeddings:
    """`POST /v1/embeddings`, kept apart from the completion endpoints."""

    #: The embedding models among `models`, and the length of their vectors.
    embedding_dims: dict[str, int] = {"text-embedding-3-small": 1536, "text-embedding-ada-002": 1536}
    #: The models that take `dimensions`.
    shortenable: frozenset[str] = frozenset({"text-embedding-3-small"})
    #: Send `data` last index first: a client must order by `index`, not by position.
    reverse_data = False

    def add_embedding_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/embeddings", self.embeddings)

    async def embeddings(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)  # type: ignore[attr-defined]
        if refusal is not None:
            return refusal
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error", None)
        self.requests.append((request.path, body))  # type: ignore[attr-defined]
        model = body.get("model")
        if model not in self.models:  # type: ignore[attr-defined]
            return _error(404, f"The model `{model}` does not exist or you do not have access to it.",
                          "invalid_request_error", "model_not_found")
        native = self.embedding_dims.get(model)
        if native is None:
            return _error(400, f"The model `{model}` does not support embeddings.", "invalid_request_error", None)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            return _error(400, "'$.input' is invalid. Please check the API reference: "
                               "https://platform.openai.com/docs/api-reference.", "invalid_request_error", None)
        size = body.get("dimensions", native)
        if "dimensions" in body and model not in self.shortenable:
            return _error(400, "This model does not support specifying dimensions.", "invalid_request_error", None)
        if type(size) is not int or not 0 < size <= native:
            return _error(400, f"Invalid value for 'dimensions': {size}.", "invalid_request_error", None)
        vectors = [unit_vector(hash_vector(text, native)[:size]) for text in texts]
        encoding = body.get("encoding_format", "float")
        tokens = sum(len(tokens_of(t)) for t in texts)
        data = [{"object": "embedding", "index": i, "embedding": _encoded(v, encoding)} for i, v in enumerate(vectors)]
        if self.reverse_data:
            data.reverse()
        return web.json_response({"object": "list", "data": data, "model": model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


class OpenAIServer(_Embeddings, KeyedLimits):
    """An OpenAI-compatible API on 127.0.0.1 (a random port); `base_url` ends in /v1."""

    def __init__(self, models: tuple[str, ...] = ("gpt-4o-mini",), *, api_key: str | None = None,
                 reply: str = "Hello from the OpenAI protocol test server, one word at a time.",
                 token_delay: float = 0.0) -> None:
        KeyedLimits.__init__(self)
        self.context_window: int | None = None
        self.models = list(models)
        self.api_key = api_key
        self.reply = reply
        self.token_delay = token_delay
        self.usage = True
        self.fail_status: int | None = None
        self.malformed_after: int | None = None
        self.error_after: int | None = None
        self.drop_after: int | None = None
        self.argument_piece = 5
        self.llama_cpp_formats = False
        self.ignores_required = False
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.disconnects = 0
        self.pieces_sent = 0  #: tokens written to streams, all requests together
        self.open_now = 0  #: completion requests being answered now
        self.most_open = 0  #: the most ever answered at once
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> OpenAIServer:
        app = web.Application()
        app.on_response_prepare.append(self._rate_headers)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        self.add_embedding_routes(app)
        self._runner, port = await serve_locally(app, 0)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def heal(self) -> None:
        self.fail_status = self.malformed_after = self.error_after = self.drop_after = None

    # -- endpoints -------------------------------------------------------------

    def _refusal(self, request: web.Request) -> web.Response | None:
        if self.fail_status:
            return _error(self.fail_status, "The server had an error while processing your request.",
                          "server_error", None)
        key = _bearer(request)
        if self.keys is not None:
            return self._key_refusal(key)
        if self.api_key is not None and key != self.api_key:
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        return None

    def _key_refusal(self, key: str) -> web.Response | None:
        """The answer to a key that does not serve now (see tests/upstream_keys.py), None when it serves."""
        behaviour = self.behaviour(key)
        if behaviour is None:
            return None
        if behaviour == 429:
            reset = self.reset_in(key)
            response = _error(429, f"Rate limit reached for requests. Limit: {self.limit_requests}, Used: "
                                   f"{self.limit_requests}, Requested: 1. Please try again in {go_duration(reset)}.",
                              "requests", "rate_limit_exceeded")
            response.headers["retry-after"] = whole_seconds(reset)
            return response
        if behaviour == 401:
            return _error(401, "Incorrect API key provided. You can find your API key at "
                               "https://platform.openai.com/account/api-keys.", "invalid_request_error",
                          "invalid_api_key")
        if behaviour == 403:
            return _error(403, "Country, region, or territory not supported", "request_forbidden",
                          "unsupported_country_region_territory")
        return _error(behaviour, "The server had an error while processing your request.", "server_error", None)

    async def _rate_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """What a key has left, on every answer to a request with a key (as OpenAI sends them)."""
        if self.keys is None and self.api_key is None:
            return
        key = _bearer(request)
        reset = go_duration(self.reset_in(key) or 0.017)
        response.headers.update({
            "x-ratelimit-limit-requests": str(self.limit_requests), "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-requests": str(self.remaining_requests(key)),
            "x-ratelimit-remaining-tokens": str(self.remaining_tokens(key)),
            "x-ratelimit-reset-requests": reset, "x-ratelimit-reset-tokens": reset})

    def _overflow(self, body: dict[str, Any], prompt_tokens: int) -> web.Response | None:
        """OpenAI's 400 for a prompt that, with max_tokens, does not fit `context_window`."""
        window, asked = self.context_window, body.get("max_tokens")
        asked = asked if type(asked) is int else 0
        if window is None or prompt_tokens + asked <= window:
            return None
        said = (f"you requested {prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the "
                "completion). Please reduce the length of the messages or completion." if asked else
                f"your messages resulted in {prompt_tokens} tokens. Please reduce the length of the messages.")
        return _error(400, f"This model's maximum context length is {window} tokens. However, {said}",
                      "invalid_request_error", "context_length_exceeded", "messages")

    async def list_models(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        data = [{"id": m, "object": "model", "created": 1_715_367_049, "owned_by": "inferswarm-tests"}
                for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, chat=False)

    # -- generation ------------------------------------------------------------

    async def _completion(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            return await self._answer(request, chat=chat)
        finally:
            self.open_now -= 1

    async def _answer(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error", None)
        self.requests.append((request.path, body))
        if body.get("model") not in self.models:
            return _error(404, f"The model `{body.get('model')}` does not exist or you do not have access to it.",
                          "invalid_request_error", "model_not_found")
        if chat and not isinstance(body.get("messages"), list) or not chat and "prompt" not in body:
            return _error(400, "Missing required parameter.", "invalid_request_error", None)
        fmt = body.get("response_format") or {}
        if self.llama_cpp_formats and fmt.get("type") == "json_schema":
            detail = ("1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
                      "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema'}")
            return _error(500, detail, "internal_server_error", None)
        problem = (_tools_problem(body) if chat else None) or _logprobs_problem(body, chat)
        if problem is not None:
            return _error(400, problem, "invalid_request_error", None)
        prompt_text = json.dumps(body["messages"]) if chat else str(body["prompt"])
        overflow = self._overflow(body, len(tokens_of(prompt_text)))
        if overflow is not None:
            return overflow
        calls = self._calls(body) if chat else []
        if calls:
            return await self._call_stream(request, body, calls)
        pieces, reason = self._reply(body)
        usage = {"prompt_tokens": len(tokens_of(prompt_text)), "completion_tokens": len(pieces)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.tokens_by_key[_bearer(request)] += usage["total_tokens"]
        ident, created = f"chatcmpl-{time.monotonic_ns()}", int(time.time())
        logprobs = [_piece_logprobs(body, chat, pieces, index) for index in range(len(pieces))]
        if not body.get("stream"):
            whole = self._whole(body, chat, ident, created, "".join(pieces), reason, usage)
            if _wants_logprobs(body, chat):
                whole["choices"][0]["logprobs"] = _joined(logprobs, chat)
            return web.json_response(whole)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        include_usage = self.usage and bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            if chat:
                await self._event(response, self._chunk(body, chat, ident, created, "", None, include_usage, True))
            for index, piece in enumerate(pieces):
                if await self._fault(request, response, index):
                    return response
                chunk = self._chunk(body, chat, ident, created, piece, None, include_usage)
                chunk["choices"][0]["logprobs"] = logprobs[index]
                await self._event(response, chunk)
                self.pieces_sent += 1
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
            if await self._fault(request, response, len(pieces)):
                return response
            await self._event(response, self._chunk(body, chat, ident, created, "", reason, include_usage))
            if include_usage:
                kind = "chat.completion.chunk" if chat else "text_completion"
                await self._event(response, {"id": ident, "object": kind, "created": created,
                                             "model": body["model"], "choices": [], "usage": usage})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return response

    def _reply(self, body: dict[str, Any]) -> tuple[list[str], str]:
        fmt = body.get("response_format") or {}
        text = self.reply
        if fmt.get("type") in ("json_object", "json_schema"):
            text = structured_reply(self.reply, (fmt.get("json_schema") or {}).get("schema") or fmt.get("schema"))
        return canned_reply(text, body.get("stop"), body.get("max_tokens"))

    def _calls(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The calls this answer makes, `{id, type, function: {name, arguments}}` (see the module doc)."""
        choice = body.get("tool_choice", "auto")
        functions = [t["function"] for t in body.get("tools") or []]
        if choice == "none" or not functions:
            return []
        if choice == "required" and self.ignores_required:
            functions = mentioned_tools(body)
        elif choice == "required":
            functions = functions[:1]
        elif isinstance(choice, dict):
            functions = [f for f in functions if f["name"] == choice["function"]["name"]]
        else:
            functions = mentioned_tools(body)
        if body.get("parallel_tool_calls") is False:
            functions = functions[:1]
        return [{"id": f"call_{index:024x}", "type": "function",
                 "function": {"name": f["name"], "arguments": json.dumps(sample_of(f.get("parameters")))}}
                for index, f in enumerate(functions)]

    async def _call_stream(self, request: web.Request, body: dict[str, Any], calls: list[dict[str, Any]]
                           ) -> web.StreamResponse:
        """The answer that calls tools, streamed in fragments (or whole without `stream`)."""
        prompt_tokens = len(tokens_of(json.dumps(body["messages"])))
        ident, created = f"chatcmpl-{time.monotonic_ns()}", int(time.time())
        fragments: list[dict[str, Any]] = []  # one delta.tool_calls item per chunk
        for index, call in enumerate(calls):
            fragments.append({"index": index, "id": call["id"], "type": "function",
                              "function": {"name": call["function"]["name"], "arguments": ""}})
            text, size = call["function"]["arguments"], self.argument_piece
            fragments += [{"index": index, "function": {"arguments": text[i:i + size]}}
                          for i in range(0, len(text), size)]
        limit, reason = body.get("max_tokens"), "tool_calls"
        if isinstance(limit, int) and limit < len(fragments) - len(calls):
            fragments, reason = fragments[: len(calls) + limit], "length"  # roughly: the headers are free
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(fragments) - len(calls)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body["model"],
                "system_fingerprint": "fp_tests"}
        if not body.get("stream"):
            message = {"role": "assistant", "content": None, "tool_calls": calls, "refusal": None}
            return web.json_response({**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        include_usage = self.usage and bool((body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}
        try:
            for index, fragment in enumerate(fragments):
                if await self._fault(request, response, index):
                    return response
                delta: dict[str, Any] = {"tool_calls": [fragment]}
                if index == 0:
                    delta = {"role": "assistant", "content": None, **delta, "refusal": None}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
                await self._event(response, {**base, "choices": [choice], **extra})
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
            if await self._fault(request, response, len(fragments)):
                return response
            last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
            await self._event(response, {**base, "choices": [last], **extra})
            if include_usage:
                await self._event(response, {**base, "choices": [], "usage": usage})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return response

    async def _fault(self, request: web.Request, response: web.StreamResponse, index: int) -> bool:
        if self.malformed_after == index:
            await response.write(b"data: {\"id\": \"chatcmpl-1\", \"choices\": [\n\n")
            return False
        if self.error_after == index:
            await self._event(response, {"error": {"message": "The server had an error while processing "
                                                              "your request.", "type": "server_error",
                                                   "param": None, "code": None}})
            await response.write_eof()
            return True
        if self.drop_after == index:
            assert request.transport is not None
            request.transport.abort()
            return True
        return False

    @staticmethod
    async def _event(response: web.StreamResponse, obj: dict[str, Any]) -> None:
        await response.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

    @staticmethod
    def _chunk(body: dict[str, Any], chat: bool, ident: str, created: int, piece: str, reason: str | None,
               include_usage: bool, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                {"content": piece} if reason is None else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}
        chunk = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                 "created": created, "model": body["model"], "system_fingerprint": "fp_tests",
                 "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    @staticmethod
    def _whole(body: dict[str, Any], chat: bool, ident: str, created: int, text: str, reason: str,
               usage: dict[str, int]) -> dict[str, Any]:
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body["model"], "choices": [choice], "usage": usage}


def _tools_problem(body: dict[str, Any]) -> str | None:
    """What OpenAI would refuse in the tools, tool choice, history or response format of a chat request."""
    tools = body.get("tools")
    names = []
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not function.get("name"):
            return "Invalid value for 'tools': each tool is {type: function, function: {name, ...}}."
        names.append(function["name"])
    for param in ("tool_choice", "parallel_tool_calls"):
        if param in body and not tools:
            return f"Invalid value for '{param}': '{param}' is only allowed when 'tools' are specified."
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or name not in names:
            return f"Invalid value for 'tool_choice': no function named {name!r} was specified in 'tools'."
    elif choice not in ("auto", "none", "required"):
        return "Invalid value for 'tool_choice': must be auto, none, required or a named function."
    called: set[str] = set()
    for message in body["messages"]:
        for call in message.get("tool_calls") or []:
            called.add(call.get("id"))
        if message.get("role") == "tool" and message.get("tool_call_id") not in called:
            return ("Invalid parameter: messages with role 'tool' must be a response to a preceeding message "
                    "with 'tool_calls'.")
    fmt = body.get("response_format")
    if fmt is not None:
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            return "Invalid value for 'response_format.type': must be text, json_object or json_schema."
        if fmt["type"] == "json_schema" and (not isinstance(spec, dict) or not spec.get("name")
                                             or not isinstance(spec.get("schema"), dict)):
            return "Missing required parameter: 'response_format.json_schema.name' or '.schema'."
    return None


def _wants_logprobs(body: dict[str, Any], chat: bool) -> bool:
    return body.get("logprobs") is True if chat else type(body.get("logprobs")) is int


def _logprobs_problem(body: dict[str, Any], chat: bool) -> str | None:
    """What OpenAI refuses in `logprobs` / `top_logprobs` (chat) or the legacy `logprobs` count."""
    if chat:
        top = body.get("top_logprobs")
        if top is not None and (type(top) is not int or not 0 <= top <= 20):
            return "Invalid 'top_logprobs': integer below minimum value or above maximum value (20)."
        if top is not None and body.get("logprobs") is not True:
            return "Invalid value for 'top_logprobs': 'logprobs' must be set to true if 'top_logprobs' is used."
        return None
    count = body.get("logprobs")
    if count is not None and (type(count) is not int or not 0 <= count <= 5):
        return "Invalid value for 'logprobs': must be an integer between 0 and 5."
    return None


def _piece_logprobs(body: dict[str, Any], chat: bool, pieces: list[str], index: int) -> dict[str, Any] | None:
    """The `logprobs` of the chunk of `pieces[index]` as OpenAI streams it, or None when not asked.

    Made-up but well-formed and deterministic: the token's logprob is -0.1 * (1 + index % 3),
    its alternatives the token itself then " alt1", " alt2"... one nat less likely each."""
    if not _wants_logprobs(body, chat):
        return None
    piece = pieces[index]
    logprob = -0.1 * (1 + index % 3)
    count = body.get("top_logprobs", 0) if chat else body["logprobs"]
    top = [(piece, logprob)] + [(f" alt{j}", logprob - j) for j in range(1, count)] if count else []
    if chat:
        item = {"token": piece, "logprob": logprob, "bytes": list(piece.encode()),
                "top_logprobs": [{"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in top]}
        return {"content": [item], "refusal": None}
    offset = len("".join(pieces[:index]))
    return {"tokens": [piece], "token_logprobs": [logprob], "top_logprobs": [dict(top) if count else None],
            "text_offset": [offset]}


def _joined(chunks: list[dict[str, Any] | None], chat: bool) -> dict[str, Any]:
    """The logprobs of a whole answer, from those of its chunks."""
    parts = [c for c in chunks if c is not None]
    if chat:
        return {"content": [item for c in parts for item in c["content"]], "refusal": None}
    return {key: [v for c in parts for v in c[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                  "text_offset")}


def _bearer(request: web.Request) -> str:
    """The key of `Authorization: Bearer <key>` ("" without one)."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key if scheme == "Bearer" else ""


def _error(status: int, message: str, kind: str, code: str | None, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status)
