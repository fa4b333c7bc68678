"""Embedding models on an Ollama or OpenAI-compatible server.

* Ollama: `POST /api/embed` `{"model", "input": [...], "truncate": true}`
  (+ `"dimensions"` when asked) -> `{"model", "embeddings": [[...], ...],
  "total_duration", "load_duration", "prompt_eval_count"}`. `truncate: true`
  (Ollama's default, sent explicitly) cuts a text longer than the model's
  context instead of failing the batch, as the local embedder does.
* OpenAI-compatible: `POST {url}/embeddings` `{"model", "input": [...],
  "encoding_format": "float"}` (+ `"dimensions"`) -> `{"object": "list",
  "data": [{"object": "embedding", "embedding": [...], "index"}], "model",
  "usage": {"prompt_tokens", "total_tokens"}}`. Items are put back in the
  order of `index`; a server without `usage` is counted 0.

Each embedder talks to its server through the chat backend of the same
server and model (`OllamaBackend`, `OpenAIBackend`): its session, its probe
(`/api/tags`, `/models`) and the facts it finds (`/api/show`), so a server
is reached, probed and described one way for both kinds of model -- and an
OpenAI embedder rotates over the backend's key pool (keys.py), counting each
batch's `prompt_tokens` on the key it went with. Failures
are typed as in `http.py`; `dimensions` is passed through, and a server or
model that cannot shorten its vectors answers 400, which is INVALID_PARAMS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.config import Secret
from services.inference.backends.embedding import Embedded, Embedder, check_batch
from services.inference.backends.http import HttpBackend, malformed
from services.inference.backends.keys import Lease
from services.inference.backends.ollama import OllamaBackend
from services.inference.backends.openai import OpenAIBackend

__all__ = ["OllamaEmbedder", "OpenAIEmbedder"]


class _ServerEmbedder(Embedder):
    """An embedder riding on the chat backend of the same server and model."""

    def __init__(self, server: HttpBackend, model: str) -> None:
        super().__init__()
        self.server, self.model, self.http = server, model, server.http
        self.info = server.info  # the same dict: what the probe learns shows here too

    async def start(self) -> None:
        await self.server.start()
        self.loaded = True

    async def close(self) -> None:
        await self.server.close()
        self.loaded = False

    async def probe(self) -> None:
        await self.server.probe()

    def keys_view(self) -> list[dict[str, Any]] | None:
        return self.server.keys_view()

    def _tokens(self, value: Any) -> int:
        if value is None:
            return 0
        if type(value) is not int or value < 0:
            raise malformed(self.http.name, "the token count is not an integer")
        return value


class OllamaEmbedder(_ServerEmbedder):
    """One embedding model on one Ollama server."""

    kind = "ollama"

    def __init__(self, url: str, model: str, *, timeout: float = 120.0) -> None:
        super().__init__(OllamaBackend(url, model, timeout=timeout), model)

    async def embed(self, texts: list[str], dimensions: int | None) -> Embedded:
        body: dict[str, Any] = {"model": self.model, "input": texts, "truncate": True}
        if dimensions is not None:
            body["dimensions"] = dimensions
        answer = await self.http.post_json("/api/embed", body)
        vectors = answer.get("embeddings") if isinstance(answer, dict) else None
        if not isinstance(vectors, list):
            raise malformed(self.http.name, "/api/embed answered without embeddings")
        return Embedded(check_batch(vectors, len(texts), self.http.name),
                        self._tokens(answer.get("prompt_eval_count")))


class OpenAIEmbedder(_ServerEmbedder):
    """One embedding model on one OpenAI-compatible server."""

    kind = "openai"

    def __init__(self, url: str, model: str, *, api_key: Secret | None = None, api_keys: Sequence[Secret] = (),
                 timeout: float = 120.0, key_cooldown: float = 5.0) -> None:
        super().__init__(OpenAIBackend(url, model, api_key=api_key, api_keys=api_keys, timeout=timeout,
                                       key_cooldown=key_cooldown), model)

    async def embed(self, texts: list[str], dimensions: int | None) -> Embedded:
        body: dict[str, Any] = {"model": self.model, "input": texts, "encoding_format": "float"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        return await self.server.keyed_call(lambda lease: self._embed(lease, body, len(texts)))

    async def _embed(self, lease: Lease | None, body: dict[str, Any], count: int) -> Embedded:
        answer = await self.http.post_json("/embeddings", body, lease)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise malformed(self.http.name, "/embeddings answered without a data list")
        indexes = [d.get("index") for d in data]
        if sorted(i for i in indexes if type(i) is int) != list(range(len(data))):
            raise malformed(self.http.name, "the data's indexes are not 0..n-1")
        ordered = sorted(data, key=lambda d: d["index"])
        usage = answer.get("usage")
        tokens = self._tokens(usage.get("prompt_tokens") if isinstance(usage, dict) else None)
        embedded = Embedded(check_batch([d.get("embedding") for d in ordered], count, self.http.name), tokens)
        if lease is not None:
            lease.used(tokens, 0)
        return embedded
