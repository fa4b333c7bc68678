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
pieces, then a final chunk with `usage`, `finish_reason`, `timing`, `cached`,
`request_id` and the rate-limit facts. Anything else is kept as metadata.
`request_id` is kept from whichever chunk carries it first -- the first chunk
(newer gateways), so a stream's `x-request-id` header has it, or the final one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from shared.errors import InvalidParams, MeshError
from shared.generation import is_final, text_of
from shared.rpc import Stream
from services.web.ratelimits import facts_of, openai_headers
from services.web.upstream import Upstream

__all__ = ["Relay", "check_generation", "MAX_STOP"]

MAX_STOP = 4
_SAMPLING = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0)}
_QUOTA_WAIT_S = 1.0


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

    @classmethod
    async def start(cls, upstream: Upstream, params: dict[str, Any]) -> Relay:
        """Start the call and wait for its first chunk; a refusal raises its typed error.

        A streamed reply sends its headers before the final chunk's exact rate-limit
        facts exist, so for streams `gateway.quota` is asked at the same time, and
        its facts (as of the start of the request) go into the headers.
        """
        quota = None
        if params.get("stream") and params.get("api_key"):
            quota = asyncio.ensure_future(upstream.gateway.quota(api_key=params["api_key"]))
            quota.add_done_callback(_consume)  # its failure is not ours to report
        try:
            relay = cls(upstream, await upstream.infer(params))
            try:
                first = await relay._next()
            except BaseException:
                await relay.close()
                raise
            if first is not None:
                relay._pending.append(first)
            if quota is not None and not relay.facts:
                relay.facts = await _facts_of_quota(quota)
            return relay
        finally:
            if quota is not None and not quota.done():
                quota.cancel()

    async def _next(self) -> dict[str, Any] | None:
        """The next text chunk; metadata and the final chunk are absorbed. None at the end."""
        async for chunk in self._stream:
            if not isinstance(chunk, dict):
                continue
            self.facts = facts_of(chunk) or self.facts
            if self.request_id is None and isinstance(chunk.get("request_id"), str) and chunk["request_id"]:
                self.request_id = chunk["request_id"]
            text = text_of(chunk)
            if is_final(chunk):
                self.final = chunk
                if text:
                    return {"text": text}
                continue
            if text is not None:
                self.text_chunks += 1
                return chunk
        return None

    async def texts(self) -> AsyncIterator[str]:
        """The text pieces in order (the first one already received included)."""
        while self._pending:
            yield self._pending.pop(0)["text"]
        while (chunk := await self._next()) is not None:
            yield chunk["text"]

    async def collect(self) -> str:
        """The whole completion (for a non-streaming reply)."""
        return "".join([piece async for piece in self.texts()])

    async def close(self) -> None:
        await self._upstream.release(self._stream)

    def headers(self) -> dict[str, str]:
        """The reply's `x-ratelimit-*` headers and, once known, its `x-request-id`."""
        headers = openai_headers(self.facts)
        if self.request_id is not None:
            headers["x-request-id"] = self.request_id
        return headers

    @property
    def usage(self) -> dict[str, int]:
        usage = self.final.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @property
    def finish_reason(self) -> str:
        reason = self.final.get("finish_reason")
        return reason if isinstance(reason, str) else "stop"


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _facts_of_quota(quota: asyncio.Future[Any]) -> dict[str, dict[str, Any]]:
    """The facts of a `gateway.quota` answer; none if it fails or is slow (headers are best effort)."""
    try:
        return facts_of(await asyncio.wait_for(asyncio.shield(quota), _QUOTA_WAIT_S))
    except (MeshError, TimeoutError):
        return {}


def check_generation(body: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling parameters of a request body, checked; `InvalidParams` names the field."""
    out: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if type(max_tokens) is not int or max_tokens < 1:
            raise InvalidParams("max_tokens must be a positive integer", {"param": "max_tokens"})
        out["max_tokens"] = max_tokens
    for name, (low, high) in _SAMPLING.items():
        value = body.get(name)
        if value is None:
            continue
        if type(value) not in (int, float) or not low <= value <= high:
            raise InvalidParams(f"{name} must be a number from {low:g} to {high:g}", {"param": name})
        out[name] = float(value)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise InvalidParams(f"stop must be a string or up to {MAX_STOP} strings", {"param": "stop"})
        out["stop"] = stop
    seed = body.get("seed")
    if seed is not None:
        if type(seed) is not int:
            raise InvalidParams("seed must be an integer", {"param": "seed"})
        out["seed"] = seed
    return out
