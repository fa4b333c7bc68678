"""The anthropic backend: a model behind Anthropic's Messages API.

`url` is the API host (`https://api.anthropic.com`, the default), under which
`/v1/messages` and `/v1/models` live; the key, when configured, goes in
`x-api-key` (one key of the entry's pool per request, rotated as keys.py
says), with `anthropic-version: 2023-06-01` on every request.

* `GET {url}/v1/models` is the probe: the key is good and the server answers;
  a complete listing (`has_more: false`) without the model is NOT_FOUND.
* `POST {url}/v1/messages` with `"stream": true`, read as server-sent events:
  `message_start` (the message, with `usage.input_tokens`), per content block
  `content_block_start` / `content_block_delta` (`text_delta` or
  `input_json_delta`) / `content_block_stop`, `message_delta` (`stop_reason`,
  `usage.output_tokens`), `message_stop`; `ping` is ignored; an `error`
  event fails the stream (UNAVAILABLE, not retry-safe once text may be out).

The generation contract in the Messages API's terms:

* `system` and `developer` messages, wherever they are, joined (blank line
  between) into the top-level `system`: the API has no such roles in
  `messages`.
* consecutive messages of one role become one turn (the API wants user and
  assistant to alternate): the `tool` results after a call are one user turn
  of `tool_result` blocks; an assistant's calls are `tool_use` blocks, their
  JSON `arguments` parsed into the `input` object (arguments that are not a
  JSON object are INVALID_PARAMS: the API cannot carry them).
* a `prompt` is sent as one user message: there is no completion endpoint.
* `tools` -> `{name, description, input_schema}`; `tool_choice` auto / required
  / none / a named function -> `{type: auto | any | none | tool, name}`,
  `parallel_tool_calls: false` -> `disable_parallel_tool_use: true`.
* `stop` -> `stop_sequences`; `max_tokens` (the API requires it; the worker
  always fills it, from the request or the model's `max_output`),
  `temperature` as it is (the API takes 0..1: more is its 400, INVALID_PARAMS),
  `top_p` only below 1 (1 filters nothing, and the newest models refuse
  `temperature` and `top_p` together).
* the API has no `seed`, `frequency_penalty`, `presence_penalty` nor
  logprobs: the first three are not sent, logprobs and `response_format`
  are not among the capabilities, so the service refuses them by name
  (INVALID_PARAMS, `reason: "unsupported"`).

`Prompt` carries `message_start`'s input tokens (the server's exact count,
known before the first text, cache reads and writes included); `Done` the
final usage (`input_tokens` -> prompt_tokens, `output_tokens` ->
completion_tokens) and `stop_reason` as a finish reason: `end_turn`,
`stop_sequence`, `pause_turn`, `refusal` -> "stop", `max_tokens` -> "length"
(and no calls: their input is cut), `tool_use` -> "tool_calls" with one
`ToolCalls` of the `tool_use` blocks (ids as the server gave them, input as
the accumulated `partial_json`, `{}` when none).

HTTP failures are typed in `http.py` (401/403 UNAVAILABLE and the key
disabled, 429 UNAVAILABLE and the key exhausted until its reset -- the next
key of the pool tried in both cases --, 529 UNAVAILABLE with `retry_after`,
400 INVALID_PARAMS with Anthropic's message; "prompt is too long" with
`reason: "context_length_exceeded"`).
"""

from __future__ import annotations

import json
from contextlib import aclosing
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any

from shared.config import Secret
from shared.errors import InvalidParams, NotFound
from services.inference.backends.base import (
    Done, Event, FinishReason, GenerateRequest, Message, Prompt, ToolCall, ToolCalls,
)
from services.inference.backends.http import DEFAULT_CONNECTIONS, HttpBackend, HttpClient, dropped, malformed
from services.inference.backends.keys import KeyPool, Lease

__all__ = ["AnthropicBackend", "API_VERSION", "DEFAULT_URL"]

API_VERSION = "2023-06-01"
DEFAULT_URL = "https://api.anthropic.com"

_FINISH: dict[str, FinishReason] = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "refusal": "stop",
    "max_tokens": "length", "tool_use": "tool_calls",
}


class AnthropicBackend(HttpBackend):
    """One model behind Anthropic's Messages API."""

    kind = "anthropic"

    capabilities = ("chat", "tools")

    def __init__(self, url: str, model: str, *, api_key: Secret | None = None, api_keys: Sequence[Secret] = (),
                 timeout: float = 120.0, key_cooldown: float = 5.0, connections: int = DEFAULT_CONNECTIONS) -> None:
        super().__init__()
        self.model = model
        self.http = HttpClient(url, timeout=timeout, headers={"anthropic-version": API_VERSION},
                               name="anthropic server", connections=connections)
        given = [*([api_key] if api_key is not None else []), *api_keys]
        if given:
            self.keys = KeyPool(given, model=model, header=_x_api_key, cooldown=key_cooldown)
        self.info = {"upstream": model, "url": self.http.base_url}

    async def probe(self) -> None:
        listing = await self.keyed_call(lambda lease: self.http.get_json("/v1/models?limit=1000", lease))
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise malformed(self.http.name, "/v1/models has no data list")
        listed = {m.get("id") for m in data if isinstance(m, dict)}
        # A listing cut short may hold the model on a later page: only a complete one can say "not there".
        if self.model not in listed and listing.get("has_more") is False:
            raise NotFound(f"{self.http.name} does not list model {self.model!r}")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        body = request_body(self.model, request)
        async with aclosing(self.keyed(lambda lease: self._attempt(lease, body))) as events:
            async for event in events:
                yield event

    async def _attempt(self, lease: Lease | None, body: dict[str, Any]) -> AsyncGenerator[Event, None]:
        state = _StreamState(self.http.name)
        async with self.http.request("POST", "/v1/messages", body, credential=lease) as response:
            async for line in self.http.lines(response):
                if not line.startswith(b"data:"):
                    continue  # `event:` names repeat the data's `type`; comments are not ours
                for event in state.feed(_event(self.http.name, line[5:].strip())):
                    yield event
            if not state.stopped:
                raise dropped(self.http.name, "the stream ended before message_stop")
        for event in state.end():
            yield event


def _x_api_key(key: str) -> Mapping[str, str]:
    return {"x-api-key": key}


def request_body(model: str, request: GenerateRequest) -> dict[str, Any]:
    """The Messages API body of a generation request (see the module doc)."""
    assert request.max_tokens is not None, "the worker resolves max_tokens before generating"
    messages = request.messages if request.messages is not None else (Message("user", request.prompt or ""),)
    system = [m.text for m in messages if m.role in ("system", "developer") and m.text]
    body: dict[str, Any] = {"model": model, "max_tokens": request.max_tokens,
                            "messages": _turns(m for m in messages if m.role not in ("system", "developer")),
                            "stream": True}
    if system:
        body["system"] = "\n\n".join(system)
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None and request.top_p < 1:  # 1 filters nothing; newer models refuse both
        body["top_p"] = request.top_p
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    if request.tools:
        body["tools"] = [{"name": t.name, "description": t.description, "input_schema": dict(t.parameters)}
                         if t.description else {"name": t.name, "input_schema": dict(t.parameters)}
                         for t in request.tools]
        choice = request.choice
        wire: dict[str, Any] = {"type": {"auto": "auto", "required": "any", "none": "none",
                                         "function": "tool"}[choice.mode]}
        if choice.mode == "function":
            wire["name"] = choice.name
        if not request.parallel_tool_calls and choice.mode != "none":
            wire["disable_parallel_tool_use"] = True
        body["tool_choice"] = wire
    return body


def _turns(messages: Any) -> list[dict[str, Any]]:
    """User and assistant turns of content blocks, one turn per run of one role."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return turns


def _blocks(message: Message) -> list[dict[str, Any]]:
    if message.role == "tool":
        return [{"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.text}]
    # The API refuses empty text blocks; an assistant turn of calls only has none.
    blocks: list[dict[str, Any]] = [{"type": "text", "text": message.text}] if message.text else []
    for call in message.tool_calls:
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise InvalidParams(f"tool call {call.id}: arguments must be a JSON object for this model",
                                {"param": "messages"})
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments})
    if not blocks:
        blocks.append({"type": "text", "text": " "})  # an empty message still takes its turn
    return blocks


def _event(name: str, payload: bytes) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        raise malformed(name, f"an event that is not JSON: {payload[:80]!r}") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise malformed(name, "an event that is not an object with a type")
    return event


class _StreamState:
    """What the events of one stream said so far."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.stop_reason: str | None = None
        self.stopped = False
        self.started = False
        self.blocks: dict[int, dict[str, Any]] = {}

    def feed(self, event: dict[str, Any]) -> list[Event]:
        kind = event["type"]
        if kind == "error":
            error = event.get("error")
            detail = error.get("message") if isinstance(error, dict) else error
            kind_of = error.get("type") if isinstance(error, dict) else None
            raise dropped(self.name, f"{kind_of or 'error'}: {str(detail)[:500]}")
        if kind == "message_start":
            usage = (event.get("message") or {}).get("usage") or {}
            self.prompt_tokens = _input_tokens(usage)
            self.completion_tokens = _int(usage.get("output_tokens"))
            if self.started:
                raise malformed(self.name, "a second message_start")
            self.started = True
            return [Prompt(self.prompt_tokens)]
        if not self.started and kind != "ping":
            raise malformed(self.name, f"{kind} before message_start")
        if kind == "content_block_start":
            block = event.get("content_block")
            index = event.get("index")
            if not isinstance(block, dict) or type(index) is not int:
                raise malformed(self.name, "content_block_start without {index, content_block}")
            if block.get("type") == "tool_use":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise malformed(self.name, "a tool_use block without id and name")
                self.blocks[index] = {"id": block["id"], "name": block["name"], "json": ""}
            text = block.get("text") if block.get("type") == "text" else None
            return [text] if isinstance(text, str) and text else []
        if kind == "content_block_delta":
            delta = event.get("delta")
            if not isinstance(delta, dict):
                raise malformed(self.name, "content_block_delta without a delta")
            if delta.get("type") == "text_delta":
                if not isinstance(delta.get("text"), str):
                    raise malformed(self.name, "a text_delta without text")
                return [delta["text"]] if delta["text"] else []
            if delta.get("type") == "input_json_delta":
                call = self.blocks.get(event.get("index"))  # type: ignore[arg-type]
                if call is None or not isinstance(delta.get("partial_json"), str):
                    raise malformed(self.name, "an input_json_delta outside a tool_use block")
                call["json"] += delta["partial_json"]
            return []  # thinking and signature deltas: not part of the answer
        if kind == "message_delta":
            delta, usage = event.get("delta") or {}, event.get("usage") or {}
            if isinstance(delta, dict) and delta.get("stop_reason"):
                self.stop_reason = str(delta["stop_reason"])
            if isinstance(usage, dict) and "output_tokens" in usage:
                self.completion_tokens = _int(usage.get("output_tokens"))
                if "input_tokens" in usage:  # newer servers repeat the final input count here
                    self.prompt_tokens = _input_tokens(usage) or self.prompt_tokens
            return []
        if kind == "message_stop":
            self.stopped = True
        return []  # ping, content_block_stop, and event types added later

    def end(self) -> list[Event]:
        finish = _FINISH.get(self.stop_reason or "")
        if finish is None:
            raise malformed(self.name, f"stop_reason {self.stop_reason!r}")
        if finish == "length" or not self.blocks:
            if finish == "tool_calls":
                raise malformed(self.name, "stop_reason tool_use without any tool_use block")
            return [Done(finish, self.prompt_tokens, self.completion_tokens)]
        calls = []
        for index in sorted(self.blocks):
            block = self.blocks[index]
            arguments = block["json"] or "{}"
            try:
                json.loads(arguments)
            except ValueError:
                raise malformed(self.name, f"tool_use {block['id']}: input is not JSON") from None
            calls.append(ToolCall(block["id"], block["name"], arguments))
        return [ToolCalls(tuple(calls)), Done("tool_calls", self.prompt_tokens, self.completion_tokens)]


def _int(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def _input_tokens(usage: Any) -> int:
    """All the prompt's tokens: fresh, written to and read from the prompt cache."""
    if not isinstance(usage, dict):
        return 0
    return sum(_int(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens",
                                            "cache_read_input_tokens"))
