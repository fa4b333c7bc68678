"""`POST /v1/responses`: OpenAI's Responses API, answered by the chat-completions path.

The body is translated into the generation contract (responses_params.py) and
sent to `gateway.infer` as `/v1/chat/completions` sends it; the chunks that
come back are written as a `response` object:

    output   a `message` item (`output_text` content, `annotations: []`) for the
             text, a `function_call` item (`fc_...` id, the model's `call_id`,
             `name`, `arguments`) for each tool call, in the order they came
    status   "completed"; "incomplete" with `incomplete_details: {"reason":
             "max_output_tokens"}` when the model stopped at the limit
    usage    input/output/total tokens (cached and reasoning tokens: 0)

and the request's settings (instructions, tools, tool_choice, text, metadata,
...) echoed as OpenAI echoes them. With `stream: true` the reply is SSE,
`event: <type>` and `data: {type, sequence_number, ...}` in OpenAI's order:
`response.created`, `response.in_progress`, then for a text
`response.output_item.added`, `response.content_part.added`,
`response.output_text.delta` (each piece), `response.output_text.done`,
`response.content_part.done`, `response.output_item.done`; for a tool call
`response.output_item.added`, `response.function_call_arguments.delta` and
`.done`, `response.output_item.done`; last `response.completed` (or, as at
OpenAI, `response.incomplete` when cut by `max_output_tokens`) with the whole
response. An error after the stream began ends it with `response.failed`
(status "failed", `error: {code, message}`).

Nothing is stored: `store` is accepted but no response can be retrieved or
continued (`previous_response_id` is a 400). Errors before the first chunk
are the same OpenAI error replies as chat completions' (errors.py); a
refusal of the gateway names the Responses parameter (`input` for
`messages`, `max_output_tokens`, `text.format`). Replies carry
`x-request-id` and the `x-ratelimit-*` headers as chat completions do, and a
whole reply `x-inferswarm-receipt` (the signed usage receipt,
shared/receipts.py); a stream has its receipt as `receipt` in the
`response` object of its last event (`response.completed` or
`.incomplete`).
"""

from __future__ import annotations

import copy
import json
import secrets
import time
from typing import Any

from aiohttp import web

from shared.errors import InvalidParams, MeshError
from shared.generation import text_of, tool_calls_of
from services.web.api import bearer, json_body
from services.web.errors import openai_error_body
from services.web.params import DROP_PARAMS, DROPPED_HEADER
from services.web.relay import Relay
from services.web.responses_params import ResponsesRequest, responses_request
from services.web.session import UPSTREAM

__all__ = ["routes"]

routes = web.RouteTableDef()
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
#: The contract's names of the parameters a gateway's refusal may name, in the Responses API's words.
_PARAM_NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}

Event = dict[str, Any]


class ResponseBuilder:
    """One `response` object, built from the chunks of a generation; each step
    returns the stream events it makes (a non-streamed reply ignores them)."""

    def __init__(self, asked: ResponsesRequest) -> None:
        self.id = "resp_" + secrets.token_hex(24)
        self.created_at = int(time.time())
        self.asked = asked
        self.status = "in_progress"
        self.output: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, str] | None = None
        self.incomplete: dict[str, str] | None = None
        self.completed_at: int | None = None
        self._message: dict[str, Any] | None = None  #: the message item being written
        self._sequence = 0

    def body(self) -> dict[str, Any]:
        """The `response` object as it stands."""
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
                "completed_at": self.completed_at, "background": False, "error": self.error,
                "incomplete_details": self.incomplete, "model": self.asked.model, "output": copy.deepcopy(self.output), "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": False, "truncation": "disabled",
                "usage": self.usage, **self.asked.echo}

    def start(self) -> list[Event]:
        return [self._event("response.created", response=self.body()),
                self._event("response.in_progress", response=self.body())]

    def take(self, chunk: dict[str, Any]) -> list[Event]:
        """The events of one chunk of output: a piece of text or whole tool calls."""
        text = text_of(chunk)
        if text is not None:
            events = self._open_message() if self._message is None else []
            message = self._message
            assert message is not None
            message["content"][0]["text"] += text
            return events + [self._event("response.output_text.delta", item_id=message["id"],
                                         output_index=len(self.output) - 1, content_index=0, delta=text,
                                         logprobs=[])]
        events = self._close_message("completed")
        for call in tool_calls_of(chunk) or ():
            events += self._call(call)
        return events

    def finish(self, finish_reason: str, usage: dict[str, int], receipt: str | None = None) -> list[Event]:
        """The last events: open items closed, then `response.completed` (or `.incomplete`),
        whose response carries the request's signed `receipt` (a stream's only place for it)."""
        cut = finish_reason == "length"
        events = self._open_message() if not self.output else []  # an empty answer is an empty message
        events += self._close_message("incomplete" if cut else "completed")
        self.status = "incomplete" if cut else "completed"
        self.incomplete = {"reason": "max_output_tokens"} if cut else None
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        self.usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt + completion}
        self.completed_at = int(time.time())
        kind = "response.incomplete" if cut else "response.completed"
        body = self.body()
        if receipt is not None:
            body["receipt"] = receipt
        return events + [self._event(kind, response=body)]

    def fail(self, exc: MeshError) -> list[Event]:
        """`response.failed`, for an error after the stream began."""
        self.status = "failed"
        code = "rate_limit_exceeded" if exc.code == "RATE_LIMITED" else "server_error"
        self.error = {"code": code, "message": openai_error_body(exc)["error"]["message"]}
        return [self._event("response.failed", response=self.body())]

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **copy.deepcopy(fields)}
        self._sequence += 1
        return event

    def _open_message(self) -> list[Event]:
        self._message = {"type": "message", "id": "msg_" + secrets.token_hex(24), "status": "in_progress",
                         "role": "assistant", "content": []}
        self.output.append(self._message)
        where = {"item_id": self._message["id"], "output_index": len(self.output) - 1}
        added = self._event("response.output_item.added", output_index=where["output_index"], item=self._message)
        self._message["content"].append(_text_part(""))  # written into by `take`
        return [added, self._event("response.content_part.added", **where, content_index=0, part=_text_part(""))]

    def _close_message(self, status: str) -> list[Event]:
        message = self._message
        if message is None:
            return []
        self._message = None
        text, message["status"] = message["content"][0]["text"], status
        where = {"item_id": message["id"], "output_index": self.output.index(message), "content_index": 0}
        return [self._event("response.output_text.done", **where, text=text, logprobs=[]),
                self._event("response.content_part.done", **where, part=_text_part(text)),
                self._event("response.output_item.done", output_index=where["output_index"], item=message)]

    def _call(self, call: dict[str, Any]) -> list[Event]:
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        item = {"type": "function_call", "id": "fc_" + secrets.token_hex(24), "call_id": call.get("id"),
                "name": function.get("name"), "arguments": "", "status": "in_progress"}
        self.output.append(item)
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        events = [self._event("response.output_item.added", output_index=where["output_index"], item=item),
                  self._event("response.function_call_arguments.delta", **where, delta=arguments),
                  self._event("response.function_call_arguments.done", **where, arguments=arguments)]
        item["arguments"], item["status"] = arguments, "completed"
        return events + [self._event("response.output_item.done", output_index=where["output_index"], item=item)]


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _sse(events: list[Event]) -> bytes:
    return b"".join(f"event: {event['type']}\ndata: ".encode() + json.dumps(event, separators=(",", ":")).encode()
                    + b"\n\n" for event in events)


async def _start(request: web.Request, api_key: str, asked: ResponsesRequest) -> Relay:
    """`Relay.start`, with a refusal naming the Responses parameter rather than the contract's."""
    params = {"api_key": api_key, "model": asked.model, **asked.params, "stream": asked.stream}
    try:
        return await Relay.start(request.app[UPSTREAM], params)
    except InvalidParams as exc:
        param = exc.data.get("param")
        if param not in _PARAM_NAMES:
            raise
        named = _PARAM_NAMES[param]
        raise InvalidParams(f"{named}: {exc.message}", {**exc.data, "param": named}) from None


@routes.post("/v1/responses")
async def create_response(request: web.Request) -> web.StreamResponse:
    api_key = bearer(request)
    body = await json_body(request)
    asked = responses_request(body, drop_unsupported=request.app[DROP_PARAMS])
    relay = await _start(request, api_key, asked)
    built = ResponseBuilder(asked)
    dropped = {DROPPED_HEADER: ",".join(asked.dropped)} if asked.dropped else {}
    try:
        if not asked.stream:
            async for chunk in relay.outputs():
                built.take(chunk)
            built.finish(relay.finish_reason, relay.usage)
            return web.json_response(built.body(), headers={**relay.headers(), **dropped})  # the final facts
        response = web.StreamResponse(headers={**_SSE_HEADERS, **relay.headers(), **dropped})
        await response.prepare(request)
        await response.write(_sse(built.start()))
        try:
            async for chunk in relay.outputs():
                await response.write(_sse(built.take(chunk)))
        except MeshError as exc:  # the stream already began: end it with the failure
            await response.write(_sse(built.fail(exc)))
        else:
            await response.write(_sse(built.finish(relay.finish_reason, relay.usage, relay.receipt)))
        await response.write_eof()
        return response
    finally:
        await relay.close()
