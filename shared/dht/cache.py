"""A short-lived cache of lookup results, keyed by topic.

Callers look providers up on every request; the cache turns a burst of
lookups into one crawl. Empty results are never cached (an empty lookup is an
error), and a node's own announce or withdrawal drops its topic's entry.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from shared.dht.interface import Provider

__all__ = ["LookupCache"]


class LookupCache:
    """Provider lists kept `ttl` seconds, at most `size` topics (oldest evicted)."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, tuple[Provider, ...]]] = OrderedDict()

    def get(self, topic: str) -> list[Provider] | None:
        """The cached providers of `topic`, or None when absent or stale."""
        entry = self._entries.get(topic)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[topic]
            return None
        return list(entry[1])

    def put(self, topic: str, providers: list[Provider]) -> None:
        """Remember a non-empty result (a ttl of 0 disables the cache)."""
        if not providers or self.ttl <= 0 or self.size <= 0:
            return
        self._entries.pop(topic, None)
        self._entries[topic] = (self._clock() + self.ttl, tuple(providers))
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def drop(self, topic: str) -> None:
        """Forget `topic`, e.g. after this node announced or withdrew it."""
        self._entries.pop(topic, None)
