"""The openai backend: a model on any OpenAI-compatible server.

vLLM, llama.cpp's server (`python -m llama_cpp.server`), LM Studio or a hosted
API. `url` is the API base (as the OpenAI SDK's `base_url`, e.g.
`http://host:8000/v1`); an API key, when configured, goes in
`Authorization: Bearer`.

* `GET {url}/models` is the probe: the server is up and lists the model.
* `POST {url}/chat/completions` for messages, `POST {url}/completions` for a
  prompt, both with `"stream": true` and `stream_options.include_usage`, read
  as server-sent events: `data: {chunk}` lines, then `data: [DONE]`.
* Usage comes from the server's usage chunk. A server that ignores
  `include_usage` gets `prompt_tokens` 0 and `completion_tokens` counted as
  the text chunks received (one token each on every server we know).
* Before the first text, `Prompt`: the `prompt_tokens` of a usage the server
  sent with a chunk by then (vLLM's continuous usage), else
  `estimate_tokens` -- what a generation cut short bills for its prompt.

Failures are typed as in `http.py`; a stream that ends before `[DONE]` (or
at least a finish reason) is a dropped stream, UNAVAILABLE.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from shared.config import Secret
from shared.errors import NotFound
from services.inference.backends.base import Done, Event, GenerateRequest, Prompt, estimate_tokens
from services.inference.backends.http import HttpBackend, HttpClient, dropped, malformed

__all__ = ["OpenAIBackend"]


class OpenAIBackend(HttpBackend):
    """One model on one OpenAI-compatible server."""

    kind = "openai"

    def __init__(self, url: str, model: str, *, api_key: Secret | None = None, timeout: float = 120.0) -> None:
        super().__init__()
        self.model = model
        headers = {"Authorization": f"Bearer {api_key.reveal()}"} if api_key is not None else {}
        self.http = HttpClient(url, timeout=timeout, headers=headers, name="openai server")
        self.info = {"upstream": model, "url": self.http.base_url}

    async def probe(self) -> None:
        listing = await self.http.get_json("/models")
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise malformed(self.http.name, "/models has no data list")
        if self.model not in {m.get("id") for m in data if isinstance(m, dict)}:
            raise NotFound(f"{self.http.name} does not list model {self.model!r}")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": request.max_tokens, "temperature": request.temperature,
            "top_p": request.top_p, "stream": True, "stream_options": {"include_usage": True},
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if request.messages is not None:
            path, chat = "/chat/completions", True
            body["messages"] = request.message_dicts()
        else:
            path, chat = "/completions", False
            body["prompt"] = request.prompt
        stream = _StreamState(chat, self.http.name)
        async with self.http.request("POST", path, body) as response:
            async for line in self.http.lines(response):
                if not line.startswith(b"data:"):
                    continue  # comments (":"), event names, ids: not ours
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    yield stream.done()
                    return
                text = stream.feed(self._chunk(payload))
                if text:
                    if not stream.prompted:
                        stream.prompted = True
                        early = (stream.usage or {}).get("prompt_tokens")
                        yield Prompt(early if type(early) is int and early >= 0 else estimate_tokens(request))
                    yield text
        if stream.finish is None:
            raise dropped(self.http.name, "the stream ended before [DONE]")
        yield stream.done()

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


class _StreamState:
    """What the chunks of one stream said so far."""

    def __init__(self, chat: bool, name: str) -> None:
        self.chat, self.name = chat, name
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.pieces = 0
        self.prompted = False

    def feed(self, chunk: dict[str, Any]) -> str:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise malformed(self.name, "a chunk without choices")
        text = ""
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if piece is not None and not isinstance(piece, str):
                raise malformed(self.name, "choice text is not a string")
            text += piece or ""
            if choice.get("finish_reason"):
                self.finish = str(choice["finish_reason"])
        if text:
            self.pieces += 1
        return text

    def done(self) -> Done:
        reason = "length" if self.finish == "length" else "stop"
        usage = self.usage or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is not int or type(completion) is not int:
            prompt, completion = 0, self.pieces
        return Done(reason, prompt, completion)
