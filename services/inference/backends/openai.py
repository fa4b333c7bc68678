"""The openai backend: a model on any OpenAI-compatible server.

vLLM, llama.cpp's server (`python -m llama_cpp.server`), LM Studio or a hosted
API. `url` is the API base (as the OpenAI SDK's `base_url`, e.g.
`http://host:8000/v1`); an API key, when configured, goes in
`Authorization: Bearer` -- one key of the entry's pool per request, rotated
(keys.py: a key refused with 429, 401 or 403, or failing with 5xx, makes way
for the next one; `keys_view()` shows each key's state and usage).

* `GET {url}/models` is the probe: the server is up and lists the model.
* `POST {url}/chat/completions` for messages, `POST {url}/completions` for a
  prompt, both with `"stream": true` and `stream_options.include_usage`, read
  as server-sent events: `data: {chunk}` lines, then `data: [DONE]`.
* Usage comes from the server's usage chunk. A server that ignores
  `include_usage` gets `prompt_tokens` 0 and `completion_tokens` counted as
  the chunks with output received (one token each on every server we know).
* Before the first output (text or a tool call), `Prompt`: the
  `prompt_tokens` of a usage the server sent with a chunk by then (vLLM's
  continuous usage), else `estimate_tokens` -- what a generation cut short
  bills for its prompt.

Tools and structured output pass through in OpenAI's own shapes: `tools`,
`tool_choice` and `parallel_tool_calls` (sent with the tools only: OpenAI
refuses them without), `response_format`, `frequency_penalty` and
`presence_penalty`; messages as OpenAI shapes them, except that a
`developer` message is sent as `system` -- most compatible servers (vLLM,
llama_cpp.server) refuse the newer role, and to the models it means the same.
Not every server honours `tool_choice`: llama_cpp.server constrains a
named function's arguments with a grammar and ignores "required". So
"required" with one tool is sent as that tool by name (the same demand), and
a forced call (required, or a named function) that the server answers
without a call is an error (UNAVAILABLE, malformed answer) rather than text
the caller did not ask for.

llama-cpp-python's server (0.3.x) takes `response_format` only as `text` or
`json_object`, with the JSON Schema in its own `schema` key, and refuses
OpenAI's `json_schema` (a validation error, which it answers with status 500).
When a server refuses a `json_schema` format with an error status that names
`response_format`, the request is sent again at once in that form,
`{"type": "json_object", "schema": ...}`, and the backend keeps using it for
this server once it was taken. (Prompt requests send `response_format` to
`/completions` too: vLLM honours it there, llama_cpp.server ignores it.)

Streamed tool calls are put together as the OpenAI SDK does: `delta.tool_calls`
fragments by `index`, the first fragment of a call giving its `id`, `type`
and `function.name`, every fragment appending to `function.arguments`
(llama_cpp.server repeats the id and name in every fragment: only the first
counts). When the stream ends, one `ToolCalls` event (the server's ids; a
call without one gets `call_` + 24 hex digits) then `Done` with
finish_reason "tool_calls" -- also when the server said "stop" after calls.
A stream cut at max_tokens reports "length" and no calls (their arguments
are cut). Fragments that are not OpenAI's shape are malformed data.

Logprobs pass through too: chat sends `logprobs: true` and `top_logprobs`, and
reads each chunk's `choices[0].logprobs.content` (OpenAI's
ChatCompletionTokenLogprob items, `bytes` filled in from the token when a
server leaves it null); a prompt sends the legacy `logprobs: <top count>` and
turns the legacy `{tokens, token_logprobs, top_logprobs: [{token: logprob}]}`
into the same items (alternatives most likely first). A server that sends
none gives text without them; one that sends them malformed is malformed data.

Failures are typed as in `http.py`; a stream that ends before `[DONE]` (or
at least a finish reason) is a dropped stream, UNAVAILABLE. A 400 with
`code: "context_length_exceeded"` is INVALID_PARAMS with `reason:
"context_length_exceeded"`: another model with a larger context may take it.
"""

from __future__ import annotations

import json
import secrets
from contextlib import aclosing
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any

from shared.config import Secret
from shared.errors import InvalidParams, MeshError, NotFound
from shared.generation import ToolChoice
from services.inference.backends.base import (
    Done, Event, GenerateRequest, Logprobs, Prompt, ToolCall, ToolCalls, estimate_tokens, token_logprob,
)
from services.inference.backends.http import DEFAULT_CONNECTIONS, HttpBackend, HttpClient, dropped, malformed
from services.inference.backends.keys import KeyPool, Lease

__all__ = ["OpenAIBackend"]


class OpenAIBackend(HttpBackend):
    """One model on one OpenAI-compatible server."""

    kind = "openai"

    capabilities = ("chat", "tools", "json", "logprobs")

    def __init__(self, url: str, model: str, *, api_key: Secret | None = None, api_keys: Sequence[Secret] = (),
                 timeout: float = 120.0, key_cooldown: float = 5.0, connections: int = DEFAULT_CONNECTIONS) -> None:
        super().__init__()
        self.model = model
        self.http = HttpClient(url, timeout=timeout, name="openai server", connections=connections)
        given = [*([api_key] if api_key is not None else []), *api_keys]
        if given:
            self.keys = KeyPool(given, model=model, header=_bearer, cooldown=key_cooldown)
        self.info = {"upstream": model, "url": self.http.base_url}
        #: The server takes a JSON Schema only as llama-cpp-python's `json_object` + `schema`.
        self.schema_in_json_object = False

    async def probe(self) -> None:
        listing = await self.keyed_call(lambda lease: self.http.get_json("/models", lease))
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise malformed(self.http.name, "/models has no data list")
        if self.model not in {m.get("id") for m in data if isinstance(m, dict)}:
            raise NotFound(f"{self.http.name} does not list model {self.model!r}")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        forced = request.calls_tools and request.choice.mode in ("required", "function")
        called = False
        async with aclosing(self._generate(request)) as events:
            async for event in events:
                called = called or isinstance(event, ToolCalls)
                if forced and isinstance(event, Done) and not called and event.finish_reason != "length":
                    raise malformed(self.http.name, "tool_choice asked for a tool call and the server answered "
                                    "without one (it does not honour tool_choice)")
                yield event

    async def _generate(self, request: GenerateRequest) -> AsyncGenerator[Event, None]:
        path, body = self._body(request)
        started = False
        try:
            async with aclosing(self._stream(request, path, body)) as events:
                async for event in events:
                    started = True
                    yield event
        except MeshError as refused:
            if started or not self._schema_refused(request, refused):
                raise
            body["response_format"] = _llama_cpp_format(request)
            try:
                async with aclosing(self._stream(request, path, body)) as events:
                    async for event in events:
                        self.schema_in_json_object = True
                        yield event
            except MeshError:
                if not self.schema_in_json_object:
                    raise refused from None  # this form was refused too: the first answer says why
                raise

    def _schema_refused(self, request: GenerateRequest, error: MeshError) -> bool:
        """Whether the server refused OpenAI's `json_schema` format (see the module doc)."""
        fmt = request.response_format
        refusal = isinstance(error, InvalidParams) or "upstream_status" in error.data
        return (fmt is not None and fmt.type == "json_schema" and not self.schema_in_json_object and refusal
                and "response_format" in error.message)

    def _body(self, request: GenerateRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": request.max_tokens, "temperature": request.temperature,
            "top_p": request.top_p, "stream": True, "stream_options": {"include_usage": True},
        }
        for name in ("seed", "frequency_penalty", "presence_penalty"):
            if getattr(request, name) is not None:
                body[name] = getattr(request, name)
        if request.stop:
            body["stop"] = list(request.stop)
        if request.logprobs:  # chat's flag and count; the legacy endpoint's count (added below)
            body.update(logprobs=True, top_logprobs=request.top_logprobs)
        fmt = request.response_format
        if fmt is not None:
            dialect = fmt.type == "json_schema" and self.schema_in_json_object
            body["response_format"] = _llama_cpp_format(request) if dialect else fmt.to_wire()
        if request.messages is None:
            body["prompt"] = request.prompt
            if request.logprobs:
                body["logprobs"] = request.top_logprobs
                del body["top_logprobs"]
            return "/completions", body
        body["messages"] = [_message(m) for m in request.message_dicts()]
        if request.tools:  # tool_choice and parallel_tool_calls only with them, as OpenAI wants
            body["tools"] = [tool.to_dict() for tool in request.tools]
            body["parallel_tool_calls"] = request.parallel_tool_calls
            choice = request.tool_choice
            if choice is not None and choice.mode == "required" and len(request.tools) == 1:
                choice = ToolChoice("function", request.tools[0].name)  # the same, and more servers honour it
            if choice is not None:
                body["tool_choice"] = choice.to_wire()
        return "/chat/completions", body

    def _stream(self, request: GenerateRequest, path: str, body: dict[str, Any]) -> AsyncGenerator[Event, None]:
        return self.keyed(lambda lease: self._attempt(lease, request, path, body))

    async def _attempt(self, lease: Lease | None, request: GenerateRequest, path: str, body: dict[str, Any]
                       ) -> AsyncGenerator[Event, None]:
        stream = _StreamState(path == "/chat/completions", self.http.name)
        async with self.http.request("POST", path, body, credential=lease) as response:
            async for line in self.http.lines(response):
                if not line.startswith(b"data:"):
                    continue  # comments (":"), event names, ids: not ours
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                text = stream.feed(self._chunk(payload))
                if stream.output and not stream.prompted:
                    stream.prompted = True
                    early = (stream.usage or {}).get("prompt_tokens")
                    yield Prompt(early if type(early) is int and early >= 0 else estimate_tokens(request))
                if text:
                    if request.logprobs:
                        yield Logprobs(stream.take_logprobs())
                    yield text
            else:
                if stream.finish is None:
                    raise dropped(self.http.name, "the stream ended before [DONE]")
        for event in stream.end():
            yield event

    def _chunk(self, payload: bytes) -> dict[str, Any]:
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise malformed(self.http.name, f"an event that is not JSON: {payload[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise malformed(self.http.name, "an event that is not an object")
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise dropped(self.http.name, str(message)[:500])
        return chunk


def _bearer(key: str) -> Mapping[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as compatible servers take it: `developer` is `system` (see the module doc)."""
    if message["role"] == "developer":
        return {**message, "role": "system"}
    return message


def _llama_cpp_format(request: GenerateRequest) -> dict[str, Any]:
    """`response_format` in llama-cpp-python's dialect: a JSON Schema inside `json_object`."""
    fmt = request.response_format
    assert fmt is not None
    return {"type": "json_object", "schema": dict(fmt.schema or {})}


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def _is_logprob(item: Any, *, top: bool) -> bool:
    """Whether `item` is a ChatCompletionTokenLogprob (`top`) or one of its alternatives."""
    if not isinstance(item, dict) or not isinstance(item.get("token"), str) or not _number(item.get("logprob")):
        return False
    raw = item.get("bytes")
    if raw is not None and not (isinstance(raw, list) and all(type(b) is int and 0 <= b < 256 for b in raw)):
        return False
    alternatives = item.get("top_logprobs") if top else None
    return alternatives is None or (isinstance(alternatives, list)
                                    and all(_is_logprob(a, top=False) for a in alternatives))


def _logprob(item: dict[str, Any], *, top: bool) -> dict[str, Any]:
    """A checked item (`_is_logprob`) with exactly the contract's keys."""
    raw = item.get("bytes")
    out = {"token": item["token"], "logprob": float(item["logprob"]),
           "bytes": list(raw) if raw is not None else list(item["token"].encode())}
    if top:
        out["top_logprobs"] = [_logprob(a, top=False) for a in item.get("top_logprobs") or ()]
    return out


class _StreamState:
    """What the chunks of one stream said so far."""

    def __init__(self, chat: bool, name: str) -> None:
        self.chat, self.name = chat, name
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.pieces = 0
        self.prompted = False
        self.output = False
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[dict[str, Any]] = []  #: of the text not yet taken

    def take_logprobs(self) -> tuple[dict[str, Any], ...]:
        items, self.logprobs = tuple(self.logprobs), []
        return items

    def feed(self, chunk: dict[str, Any]) -> str:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise malformed(self.name, "a chunk without choices")
        text, fragments = "", False
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = (choice.get("delta") or {}) if self.chat else {}
            if not isinstance(delta, dict):
                raise malformed(self.name, "a choice's delta is not an object")
            piece = delta.get("content") if self.chat else choice.get("text")
            if piece is not None and not isinstance(piece, str):
                raise malformed(self.name, "choice text is not a string")
            text += piece or ""
            self.logprobs += self._logprobs(choice.get("logprobs")) if piece else []
            fragments = self._fragments(delta.get("tool_calls")) or fragments
            if choice.get("finish_reason"):
                self.finish = str(choice["finish_reason"])
        if text or fragments:
            self.pieces += 1
            self.output = True
        return text

    def _logprobs(self, value: Any) -> list[dict[str, Any]]:
        """A choice's logprobs in the contract's shape: chat's `{content: [...]}` as they
        are, the legacy `{tokens, token_logprobs, top_logprobs: [{token: logprob}]}`
        turned into it."""
        if value is None:
            return []
        if not isinstance(value, dict):
            raise malformed(self.name, "a choice's logprobs is not an object")
        if self.chat:
            items = value.get("content") or []
            if not isinstance(items, list) or not all(_is_logprob(item, top=True) for item in items):
                raise malformed(self.name, "logprobs.content is not a list of {token, logprob, bytes, top_logprobs}")
            return [_logprob(item, top=True) for item in items]
        tokens, values, tops = value.get("tokens"), value.get("token_logprobs"), value.get("top_logprobs")
        tops = tops if tops is not None else [None] * len(tokens or [])
        ok = (isinstance(tokens, list) and isinstance(values, list) and isinstance(tops, list)
              and len(tokens) == len(values) == len(tops) and all(isinstance(t, str) for t in tokens)
              and all(_number(v) for v in values) and all(t is None or isinstance(t, dict) for t in tops))
        if not ok or not isinstance(tokens, list) or not isinstance(values, list):  # (the last two for mypy)
            raise malformed(self.name, "logprobs is not {tokens, token_logprobs, top_logprobs}")
        out = []
        for token, logprob, top in zip(tokens, values, tops):
            alternatives = sorted(((str(t), float(p)) for t, p in (top or {}).items() if _number(p)),
                                  key=lambda pair: -pair[1])
            out.append(token_logprob(token, float(logprob), alternatives))
        return out

    def _fragments(self, items: Any) -> bool:
        """Add the `delta.tool_calls` fragments of one chunk; True when there were any."""
        if items is None:
            return False
        if not isinstance(items, list):
            raise malformed(self.name, "delta.tool_calls is not a list")
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                raise malformed(self.name, "a tool call fragment is not an object")
            index, function = item.get("index", position), item.get("function") or {}
            if type(index) is not int or not isinstance(function, dict):
                raise malformed(self.name, "a tool call fragment is not {index, id?, function: {...}}")
            call = self.calls.setdefault(index, {"id": None, "name": None, "arguments": ""})
            for key, value in (("id", item.get("id")), ("name", function.get("name")),
                               ("arguments", function.get("arguments"))):
                if value is not None and not isinstance(value, str):
                    raise malformed(self.name, f"a tool call's {key} is not a string")
            if call["id"] is None and item.get("id"):
                call["id"] = item["id"]
            if call["name"] is None and function.get("name"):
                call["name"] = function["name"]
            call["arguments"] += function.get("arguments") or ""
        return bool(items)

    def end(self) -> list[Event]:
        """The last events: `ToolCalls` when calls were made, then `Done`."""
        usage = self.usage or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is not int or type(completion) is not int:
            prompt, completion = 0, self.pieces
        if self.finish == "length":
            return [Done("length", prompt, completion)]
        if not self.calls:
            if self.finish == "tool_calls":
                raise malformed(self.name, "finish_reason tool_calls without any tool call")
            return [Done("stop", prompt, completion)]
        calls = []
        for index in sorted(self.calls):
            call = self.calls[index]
            if not call["name"]:
                raise malformed(self.name, f"tool call {index} has no function name")
            call_id = call["id"] or "call_" + secrets.token_hex(12)
            calls.append(ToolCall(call_id, call["name"], call["arguments"] or "{}"))
        return [ToolCalls(tuple(calls)), Done("tool_calls", prompt, completion)]
