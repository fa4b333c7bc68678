"""An exact-match cache of finished responses to deterministic requests.

Only a request whose answer cannot vary is cached: temperature 0 (greedy) or a
fixed seed -- and not one asking for `logprobs`, which entries do not keep
(service.py never looks such a request up). The key is a SHA-256 over the tenant, the model name and every
input that shapes the answer (messages or prompt, max_tokens, temperature,
top_p, stop, seed, tools, tool choice, response format: every parameter of the
contract), so two requests share an entry only when they are the same
request of the same tenant. Keyed per tenant because a hit shows -- in its
`cached: true` and in its speed -- that the same prompt was sent before: across
users that would tell one what another asked.
Entries live `ttl` seconds; the cache holds at most `max_entries` entries and
`max_bytes` bytes of text, evicting the least recently used first. Hits and
misses are counted (a request that is not deterministic is neither).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.inference.backends.base import GenerateRequest, ToolCall

__all__ = ["CachedResponse", "ResponseCache", "cache_key"]


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A finished generation, as it is replayed."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def size(self) -> int:
        calls = sum(len(c.id) + len(c.name) + len(c.arguments) for c in self.tool_calls)
        return len(self.text.encode()) + calls + 64


def cache_key(model: str, request: GenerateRequest, tenant: str = "") -> str:
    """The key of `tenant`'s `request` to `model`: equal exactly when all of them are."""
    material = {"tenant": tenant, "model": model, **request.to_params()}
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """LRU with a TTL and entry and byte bounds; `ttl` 0 disables it."""

    def __init__(
        self, *, ttl: float, max_entries: int, max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl, self.max_entries, self.max_bytes = ttl, max_entries, max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, CachedResponse]] = OrderedDict()
        self._bytes = 0
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def enabled_for(self, ttl: float | None) -> bool:
        """Whether a response kept `ttl` seconds (None: this cache's own) is cached at all."""
        return (self.ttl if ttl is None else ttl) > 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, model: str, key: str) -> CachedResponse | None:
        """The live entry for `key`, counted as a hit or a miss of `model`."""
        found = self._entries.get(key)
        if found is not None and found[0] <= self._clock():
            self._drop(key)
            found = None
        if found is None:
            self.misses[model] = self.misses.get(model, 0) + 1
            return None
        self._entries.move_to_end(key)
        self.hits[model] = self.hits.get(model, 0) + 1
        return found[1]

    def put(self, key: str, response: CachedResponse, ttl: float | None = None) -> None:
        """Keep `response` for `ttl` seconds (None: this cache's own), evicting the oldest over the bounds."""
        ttl = self.ttl if ttl is None else ttl
        if ttl <= 0 or response.size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + ttl, response)
        self._bytes += response.size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def counts(self, model: str) -> dict[str, Any]:
        return {"hits": self.hits.get(model, 0), "misses": self.misses.get(model, 0)}

    def _drop(self, key: str) -> None:
        _, response = self._entries.pop(key)
        self._bytes -= response.size
