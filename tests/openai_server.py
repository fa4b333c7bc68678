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
* errors: `{"error": {"message", "type", "param", "code"}}` with 400, 401
  (a wrong `Authorization: Bearer` key when `api_key` is set), 404
  (`model_not_found`), 500.

The reply is `reply` split into word tokens, honouring `max_tokens`
(finish_reason "length") and `stop`. Switches as in `ollama_server.py`:
`fail_status`, `malformed_after`, `error_after`, `drop_after`, `token_delay`,
and `usage=False` to ignore `include_usage` as some servers do.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from typing import Any

from aiohttp import web

from ollama_server import canned_reply, hash_vector, tokens_of, unit_vector

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


class OpenAIServer(_Embeddings):
    """An OpenAI-compatible API on 127.0.0.1 (a random port); `base_url` ends in /v1."""

    def __init__(self, models: tuple[str, ...] = ("gpt-4o-mini",), *, api_key: str | None = None,
                 reply: str = "Hello from the OpenAI protocol test server, one word at a time.",
                 token_delay: float = 0.0) -> None:
        self.models = list(models)
        self.api_key = api_key
        self.reply = reply
        self.token_delay = token_delay
        self.usage = True
        self.fail_status: int | None = None
        self.malformed_after: int | None = None
        self.error_after: int | None = None
        self.drop_after: int | None = None
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.disconnects = 0
        self.pieces_sent = 0  #: tokens written to streams, all requests together
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> OpenAIServer:
        app = web.Application()
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        self.add_embedding_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
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
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        return None

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
        pieces, reason = self._reply(body)
        prompt_text = json.dumps(body["messages"]) if chat else str(body["prompt"])
        usage = {"prompt_tokens": len(tokens_of(prompt_text)), "completion_tokens": len(pieces)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        ident, created = f"chatcmpl-{time.monotonic_ns()}", int(time.time())
        if not body.get("stream"):
            return web.json_response(self._whole(body, chat, ident, created, "".join(pieces), reason, usage))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        include_usage = self.usage and bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            if chat:
                await self._event(response, self._chunk(body, chat, ident, created, "", None, include_usage, True))
            for index, piece in enumerate(pieces):
                if await self._fault(request, response, index):
                    return response
                await self._event(response, self._chunk(body, chat, ident, created, piece, None, include_usage))
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
        return canned_reply(self.reply, body.get("stop"), body.get("max_tokens"))

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


def _error(status: int, message: str, kind: str, code: str | None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": code}},
                             status=status)
