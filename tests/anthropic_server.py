"""A small server speaking Anthropic's Messages API, for testing the anthropic backend.

Implements what a worker uses, with Anthropic's shapes:

* every request needs `anthropic-version` (else 400) and, when `api_key` is
  set, `x-api-key` equal to it (else 401 `authentication_error`).
* `GET /v1/models` -> `{"data": [{"type": "model", "id", "display_name",
  "created_at"}], "has_more": false, "first_id", "last_id"}`.
* `POST /v1/messages` `{model, max_tokens, messages, system?, stop_sequences?,
  temperature?, top_p?, tools?, tool_choice?, stream?}`, validated as the API
  does (400 `invalid_request_error` with its message): `max_tokens` a
  positive integer; `messages` non-empty, roles user/assistant alternating
  and starting with user; content a string or blocks (text, non-empty;
  tool_use {id, name, input object} in assistant turns; tool_result
  {tool_use_id, content} in user turns, each answering a tool_use of the
  assistant turn just before); `system` a string or text blocks; `tools`
  {name, input_schema}; `tool_choice` {type: auto|any|tool|none, name with
  tool} only with tools. An unknown model is 404 `not_found_error`.
* the answer: `reply` in word tokens (`ollama_server.tokens_of`), cut at the
  first stop sequence (`stop_reason: "stop_sequence"` and `stop_sequence`)
  and at `max_tokens` (`"max_tokens"`), else `"end_turn"`; or a tool_use when
  tools are given and tool_choice is `any` (the first tool) or `tool` (that
  one), or `auto` / absent and the last user turn's text names a tool (the
  first named) -- never with `none`, nor when the last turn holds
  tool_results (then the answer is text: `tool_reply` followed by the
  results' text). Its input is `sample_of(input_schema)`.
* streamed (`stream: true`) as the API streams: `message_start`, a `ping`,
  per block `content_block_start`, `content_block_delta`s (`text_delta`
  per token; `input_json_delta` per `argument_piece` characters of the
  input's JSON), `content_block_stop`, then `message_delta` (stop_reason,
  stop_sequence, usage.output_tokens) and `message_stop`, each `event: name`
  + `data: {json}`. Not streamed: one `message` object.
* tokens are whitespace-separated words: `input_tokens` counts those of the
  system text, every text block, tool_result content and tool_use input JSON
  (no role or template tokens); `output_tokens` counts the text tokens sent,
  or 1 per input_json piece of a tool_use.

Failures on command: `fail_status` (answered with Anthropic's error type for
the status, and `retry_after` as the `retry-after` header), `error_after` (an
`event: error` of `error_type` after that many text deltas), `drop_after`
(the connection closed after that many). `requests` records every
request's (path, headers, body), `json_deltas` counts the input_json_delta
events sent.

Several keys, each failing on command (`keys = {"k1": None, "k2": 429, "k3":
401}`, `reset_after`, `requests_by_key`: tests/upstream_keys.py; `keys` wins
over `api_key`): a spent key's 429 is `rate_limit_error` with `retry-after`
(whole seconds) and the `anthropic-ratelimit-*-reset` times (RFC 3339); 401
`authentication_error`, 403 `permission_error`, 5xx `api_error` (529
`overloaded_error`). Every answer to a request with a key carries
`anthropic-ratelimit-requests-{limit,remaining,reset}`,
`anthropic-ratelimit-tokens-{limit,remaining,reset}` and the same for
`input-tokens` and `output-tokens`, as the API sends them.

`context_window` (tokens): a prompt over it is the API's 400 "prompt is too
long: M tokens > N maximum"; one that fits but not with its `max_tokens`,
"input length and `max_tokens` exceed context limit: P + C > N, decrease
input length or `max_tokens` and try again".
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from local_site import serve_locally

from ollama_server import sample_of, tokens_of
from upstream_keys import KeyedLimits, rfc3339, whole_seconds

__all__ = ["AnthropicServer", "ERROR_TYPES"]

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               529: "overloaded_error"}


class AnthropicServer(KeyedLimits):
    """The Messages API on 127.0.0.1 (a random port); `url` is the host, as `https://api.anthropic.com`."""

    def __init__(self, models: tuple[str, ...] = ("claude-test-1",), *, api_key: str | None = None,
                 reply: str = "Hello from the Anthropic protocol test server, one word at a time.") -> None:
        super().__init__()
        self.context_window: int | None = None
        self.models = list(models)
        self.api_key = api_key
        self.reply = reply
        self.tool_reply = "The tool said:"
        self.fail_status: int | None = None
        self.retry_after: str | None = None
        self.error_after: int | None = None
        self.error_type = "overloaded_error"
        self.drop_after: int | None = None
        self.argument_piece = 5
        self.json_deltas = 0  #: input_json_delta events sent, all requests together
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._ids = 0

    async def __aenter__(self) -> AnthropicServer:
        app = web.Application()
        app.on_response_prepare.append(self._rate_headers)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/messages", self.messages)
        self._runner, port = await serve_locally(app, 0)
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def heal(self) -> None:
        self.fail_status = self.retry_after = self.error_after = self.drop_after = None

    @property
    def last_body(self) -> dict[str, Any]:
        return self.requests[-1][2]

    # -- endpoints -------------------------------------------------------------

    def _refusal(self, request: web.Request) -> web.Response | None:
        if self.fail_status:
            headers = {"retry-after": self.retry_after} if self.retry_after else {}
            return _error(self.fail_status, "The server failed on command.", headers)
        if not request.headers.get("anthropic-version"):
            return _error(400, "anthropic-version: header is required")
        if self.keys is not None:
            return self._key_refusal(request.headers.get("x-api-key", ""))
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return _error(401, "invalid x-api-key")
        return None

    def _key_refusal(self, key: str) -> web.Response | None:
        """The answer to a key that does not serve now (see tests/upstream_keys.py), None when it serves."""
        behaviour = self.behaviour(key)
        if behaviour is None:
            return None
        if behaviour == 429:
            return _error(429, f"This request would exceed the rate limit for your organization of "
                               f"{self.limit_requests} requests per minute. For details, refer to: "
                               "https://docs.claude.com/en/api/rate-limits.",
                          {"retry-after": whole_seconds(self.reset_in(key))})
        messages = {401: "invalid x-api-key", 403: "Your API key does not have permission to use the specified "
                                                   "resource."}
        return _error(behaviour, messages.get(behaviour, "Internal server error"))

    async def _rate_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """What a key has left, on every answer to a request with a key (as the API sends them)."""
        if self.keys is None and self.api_key is None:
            return
        key = request.headers.get("x-api-key", "")
        reset = rfc3339(self.reset_in(key) or 1.0)
        requests, tokens = self.remaining_requests(key), self.remaining_tokens(key)
        headers = {"anthropic-ratelimit-requests-limit": str(self.limit_requests),
                   "anthropic-ratelimit-requests-remaining": str(requests),
                   "anthropic-ratelimit-requests-reset": reset}
        for kind in ("tokens", "input-tokens", "output-tokens"):
            headers.update({f"anthropic-ratelimit-{kind}-limit": str(self.limit_tokens),
                            f"anthropic-ratelimit-{kind}-remaining": str(tokens),
                            f"anthropic-ratelimit-{kind}-reset": reset})
        response.headers.update(headers)

    def _overflow(self, body: dict[str, Any]) -> web.Response | None:
        """The API's 400 for a prompt that, alone or with max_tokens, does not fit `context_window`."""
        window, prompt, asked = self.context_window, _input_tokens(body), body["max_tokens"]
        if window is None or prompt + asked <= window:
            return None
        if prompt > window:
            return _error(400, f"prompt is too long: {prompt} tokens > {window} maximum")
        return _error(400, f"input length and `max_tokens` exceed context limit: {prompt} + {asked} > {window}, "
                           "decrease input length or `max_tokens` and try again")

    async def list_models(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.headers), {}))
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m in self.models]
        return web.json_response({"data": data, "has_more": False, "first_id": self.models[0] if data else None,
                                  "last_id": self.models[-1] if data else None})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        self.requests.append((request.path, dict(request.headers), body if isinstance(body, dict) else {}))
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        if not isinstance(body, dict):
            return _error(400, "The request body is not valid JSON.")
        problem = _problem(body)
        if problem is not None:
            return _error(400, problem)
        if body["model"] not in self.models:
            return _error(404, f"model: {body['model']}")
        overflow = self._overflow(body)
        if overflow is not None:
            return overflow
        self._ids += 1
        message_id = f"msg_test{self._ids:020d}"
        blocks, stop_reason, stop_sequence, output = self._answer(body)
        usage_in = _input_tokens(body)
        self.tokens_by_key[request.headers.get("x-api-key", "")] += usage_in + output
        if not body.get("stream"):
            return web.json_response({
                "id": message_id, "type": "message", "role": "assistant", "model": body["model"],
                "content": [{"type": "text", "text": "".join(b)} if k == "text" else {**b} for k, b in blocks],
                "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": {"input_tokens": usage_in, "output_tokens": output}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await _send(response, "message_start", {"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": usage_in, "output_tokens": 1}}})
        await _send(response, "ping", {"type": "ping"})
        deltas = 0
        for index, (kind, block) in enumerate(blocks):
            if kind == "text":
                await _send(response, "content_block_start", {"type": "content_block_start", "index": index,
                                                              "content_block": {"type": "text", "text": ""}})
                for token in block:
                    if self.error_after is not None and deltas >= self.error_after:
                        await _send(response, "error", {"type": "error", "error": {
                            "type": self.error_type, "message": "Overloaded"}})
                        return response
                    if self.drop_after is not None and deltas >= self.drop_after:
                        assert request.transport is not None
                        request.transport.close()
                        return response
                    await _send(response, "content_block_delta", {
                        "type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": token}})
                    deltas += 1
            else:
                await _send(response, "content_block_start", {"type": "content_block_start", "index": index,
                                                              "content_block": {**block, "input": {}}})
                text = json.dumps(block["input"])
                for start in range(0, len(text), self.argument_piece):
                    self.json_deltas += 1
                    await _send(response, "content_block_delta", {
                        "type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": text[start:start + self.argument_piece]}})
            await _send(response, "content_block_stop", {"type": "content_block_stop", "index": index})
        await _send(response, "message_delta", {"type": "message_delta",
                                                 "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                                 "usage": {"output_tokens": output}})
        await _send(response, "message_stop", {"type": "message_stop"})
        await response.write_eof()
        return response

    def _answer(self, body: dict[str, Any]) -> tuple[list[tuple[str, Any]], str, str | None, int]:
        """The blocks of the answer (("text", tokens) or ("tool_use", block)), stop_reason,
        stop_sequence and output tokens."""
        tool = self._called_tool(body)
        limit = body["max_tokens"]
        if tool is not None:
            self._ids += 1
            block = {"type": "tool_use", "id": f"toolu_test{self._ids:020d}", "name": tool["name"],
                     "input": sample_of(tool["input_schema"])}
            pieces = max(1, -(-len(json.dumps(block["input"])) // self.argument_piece))
            if pieces > limit:
                return [], "max_tokens", None, limit
            return [("tool_use", block)], "tool_use", None, pieces
        last = body["messages"][-1]
        results = [b for b in _blocks(last) if b.get("type") == "tool_result"]
        text = self.reply
        if results:
            text = " ".join([self.tool_reply] + [_result_text(b) for b in results])
        stop_reason, stop_sequence = "end_turn", None
        for marker in body.get("stop_sequences") or []:
            if marker in text:
                text, stop_reason, stop_sequence = text[: text.index(marker)], "stop_sequence", marker
                break
        tokens = tokens_of(text)
        if len(tokens) > limit:
            tokens, stop_reason, stop_sequence = tokens[:limit], "max_tokens", None
        return [("text", tokens)], stop_reason, stop_sequence, len(tokens)

    def _called_tool(self, body: dict[str, Any]) -> dict[str, Any] | None:
        tools = body.get("tools") or []
        choice = body.get("tool_choice") or {"type": "auto"}
        if not tools or choice["type"] == "none":
            return None
        if choice["type"] == "any":
            return tools[0]
        if choice["type"] == "tool":
            return next(t for t in tools if t["name"] == choice["name"])
        last = body["messages"][-1]
        if last["role"] != "user" or any(b.get("type") == "tool_result" for b in _blocks(last)):
            return None
        said = " ".join(b.get("text", "") for b in _blocks(last) if b.get("type") == "text")
        return next((t for t in tools if t["name"] in said), None)


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _result_text(block: dict[str, Any]) -> str:
    content = block.get("content", "")
    if isinstance(content, list):
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict))
    return str(content)


def _input_tokens(body: dict[str, Any]) -> int:
    """Whitespace words of everything the model reads (see the module doc)."""
    system = body.get("system") or ""
    texts = [system] if isinstance(system, str) else [b.get("text", "") for b in system]
    for message in body["messages"]:
        for block in _blocks(message):
            if block["type"] == "text":
                texts.append(block["text"])
            elif block["type"] == "tool_use":
                texts.append(json.dumps(block["input"]))
            elif block["type"] == "tool_result":
                texts.append(_result_text(block))
    return sum(len(t.split()) for t in texts)


def _problem(body: dict[str, Any]) -> str | None:
    """What the Messages API would refuse in `body`, in its words (None: nothing)."""
    if not isinstance(body.get("model"), str):
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        return "max_tokens: Field required"
    if type(max_tokens) is not int or max_tokens < 1:
        return "max_tokens: Input should be greater than or equal to 1"
    for key, low, high in (("temperature", 0, 1), ("top_p", 0, 1)):
        value = body.get(key)
        if value is not None and (type(value) not in (int, float) or not low <= value <= high):
            return f"{key}: Input should be less than or equal to {high}"
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) and s.strip() for s in stops)):
        return "stop_sequences: each element must contain non-whitespace"
    system = body.get("system")
    if system is not None and not isinstance(system, str) and not (
            isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in system)):
        return "system: Input should be a valid string or a list of text blocks"
    tools = body.get("tools")
    names: set[str] = set()
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: Input should be a valid list"
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) \
                    or not isinstance(tool.get("input_schema"), dict):
                return f"tools.{i}: name and input_schema are required"
            names.add(tool["name"])
    choice = body.get("tool_choice")
    if choice is not None:
        if not tools:
            return "tool_choice may only be specified while providing tools."
        if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
            return "tool_choice: Input tag does not match any of the expected tags: 'auto', 'any', 'tool', 'none'"
        if choice["type"] == "tool" and choice.get("name") not in names:
            return f"tool_choice: Tool '{choice.get('name')}' not found in provided tools"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    previous: dict[str, Any] | None = None
    for i, message in enumerate(messages):
        problem = _message_problem(i, message, previous)
        if problem is not None:
            return problem
        previous = message
    return None


def _message_problem(i: int, message: Any, previous: dict[str, Any] | None) -> str | None:
    where = f"messages.{i}"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        return f"{where}.role: Input should be 'user' or 'assistant'"
    role = message["role"]
    if previous is None and role != "user":
        return "messages: first message must use the \"user\" role"
    if previous is not None and previous["role"] == role:
        return "messages: roles must alternate between \"user\" and \"assistant\""
    content = message.get("content")
    if isinstance(content, str):
        return None if content or role == "assistant" else f"{where}: user messages must have non-empty content"
    if not isinstance(content, list) or not content:
        return f"{where}.content: Input should be a valid string or a non-empty list"
    calls = {b.get("id") for b in _blocks(previous) if b.get("type") == "tool_use"} if previous else set()
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str) or not block["text"]:
                return f"{where}.content.{j}: text content blocks must be non-empty"
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
                    or not isinstance(block.get("input"), dict):
                return f"{where}.content.{j}.tool_use: id, name and an input object are required"
        elif kind == "tool_result" and role == "user":
            if block.get("tool_use_id") not in calls:
                return (f"{where}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                        "`tool_use` block in the previous message.")
        else:
            return f"{where}.content.{j}: a {kind!r} block is not allowed in a {role} message"
    return None


async def _send(response: web.StreamResponse, name: str, data: dict[str, Any]) -> None:
    await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
    await asyncio.sleep(0)  # let the client read as it comes, as a real stream does


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}
    return web.json_response(body, status=status, headers=headers)
