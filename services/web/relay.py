"""One `gateway.infer` call as the HTTP handlers use it, and the checks of its input.

The HTTP status must be chosen before the first byte of a reply, and an
admission error (a bad key, a limit, an unknown model) arrives as the stream's
first item, so `Relay.start` waits for the first chunk: errors before it become
proper 401/404/429 replies, errors after it end the stream in-band.

`Relay` is closed in a `finally` by every handler: leaving early -- the client
went away (aiohttp cancels the handler), a write failed, the process stops --
closes the RPC stream, which sends CANCEL, and the gateway and worker stop
generating and bill for what was delivered.

Chunks (services/inference/README.md, via the gateway): `{"text": ...}`
pieces (with `logprobs` when asked) or `{"tool_calls": [...]}`, then a final chunk with `usage`,
`finish_reason`, `timing`, `cached`, `request_id`, the rate-limit facts and
the signed `receipt`.
The first chunk carries `request_id` too, and the `model` routed to (the
alias's or fallback's model that serves), so a reply names them in its headers.
Anything else is kept as metadata.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from shared.generation import is_final, logprobs_of, output_of, text_of, tool_calls_of
from shared.receipts import HEADER as RECEIPT_HEADER
from shared.rpc import Stream
from services.web.ratelimits import facts_of, openai_headers
from services.web.upstream import Upstream

__all__ = ["Relay"]


class Relay:
    """The chunks of one inference, with the final facts kept aside."""

    def __init__(self, upstream: Upstream, stream: Stream) -> None:
        self._upstream = upstream
        self._stream = stream
        self._pending: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}
        self.facts: dict[str, dict[str, Any]] = {}
        self.text_chunks = 0
        self.request_id: str | None = None  #: the gateway's id of this request, once a chunk told it
        self.model: str | None = None  #: the model the gateway routed to (after any fallback), from the first chunk
        self.calls: list[dict[str, Any]] = []  #: tool calls gathered by `texts`
        self.logprobs: list[dict[str, Any]] = []  #: the text's token logprobs gathered by `texts`

    @classmethod
    async def start(cls, upstream: Upstream, params: dict[str, Any]) -> Relay:
        """Start the call and wait for its first chunk; a refusal raises its typed error.

        A streamed reply sends its headers before the final chunk's exact rate-limit
        facts exist: a stream's first chunk carries the facts as the gateway admitted
        the request (services/gateway/README.md, "Chunks"), and they go into the headers.
        """
        relay = cls(upstream, await upstream.infer(params))
        try:
            first = await relay._next()
        except BaseException:
            await relay.close()
            raise
        if first is not None:
            relay._pending.append(first)
        return relay

    async def _next(self) -> dict[str, Any] | None:
        """The next chunk of output (text or tool calls); metadata and the final chunk
        are absorbed. None at the end."""
        async for chunk in self._stream:
            if not isinstance(chunk, dict):
                continue
            self.facts = facts_of(chunk) or self.facts
            if self.request_id is None and isinstance(chunk.get("request_id"), str) and chunk["request_id"]:
                self.request_id = chunk["request_id"]
            if self.model is None and isinstance(chunk.get("model"), str) and chunk["model"]:
                self.model = chunk["model"]
            if is_final(chunk):
                self.final = chunk
                text = text_of(chunk)
                if text:
                    return {"text": text}
                continue
            if output_of(chunk):
                self.text_chunks += 1
                return chunk
        return None

    @property
    def opens_with_calls(self) -> bool:
        """Whether the answer's first output (already received) is tool calls, not text."""
        return bool(self._pending) and tool_calls_of(self._pending[0]) is not None

    async def outputs(self) -> AsyncIterator[dict[str, Any]]:
        """The chunks of output in order (the first one already received included):
        `text_of` or `tool_calls_of` each (shared/generation/)."""
        while self._pending:
            yield self._pending.pop(0)
        while (chunk := await self._next()) is not None:
            yield chunk

    async def texts(self) -> AsyncIterator[str]:
        """The text pieces in order (tool calls are kept in `calls`, logprobs in `logprobs`)."""
        async for chunk in self.outputs():
            text = text_of(chunk)
            if text is not None:
                self.logprobs.extend(logprobs_of(chunk))
                yield text
            self.calls.extend(tool_calls_of(chunk) or ())

    async def collect(self) -> str:
        """The whole completion (for a non-streaming reply); tool calls in `calls`."""
        return "".join([piece async for piece in self.texts()])

    async def close(self) -> None:
        await self._upstream.release(self._stream)

    def headers(self) -> dict[str, str]:
        """The reply's `x-ratelimit-*` headers and, once known, its `x-request-id` and
        `x-inferswarm-receipt`."""
        headers = openai_headers(self.facts)
        if self.request_id is not None:
            headers["x-request-id"] = self.request_id
        if self.receipt is not None:
            headers[RECEIPT_HEADER] = self.receipt
        return headers

    @property
    def usage(self) -> dict[str, int]:
        usage = self.final.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @property
    def receipt(self) -> str | None:
        """The gateway's signed usage receipt (shared/receipts.py), once the final chunk came."""
        receipt = self.final.get("receipt")
        return receipt if isinstance(receipt, str) and receipt else None

    @property
    def finish_reason(self) -> str:
        reason = self.final.get("finish_reason")
        return reason if isinstance(reason, str) else "stop"
