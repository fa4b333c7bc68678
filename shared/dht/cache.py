"""A short-lived cache of lookup results, keyed by topic.

Callers look providers up on every request; the cache turns a burst of
lookups into one crawl. Empty results are never cached (an empty lookup is an
error), and a node's own announce or withdrawal drops its topic's entry.

An entry is fresh for `ttl` seconds, then stale for `stale` more: a stale
entry is still an answer (`stale()`), while the caller refreshes it in the
background (the node's `lookup`), so no request waits on a crawl -- which
takes up to the DHT's RPC timeout when a contact has gone -- while providers
are known. `drop` (a provider failed, or this node announced) forgets both.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from shared.dht.interface import Provider

__all__ = ["LookupCache"]


class LookupCache:
    """Provider lists kept `ttl` seconds fresh and `stale` more, at most `size` topics (oldest evicted)."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic, *,
                 stale: float = 0.0, wall: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self.stale_for = stale
        self.size = size
        self._clock = clock
        self._wall = wall  #: records expire in wall-clock time (their seq is wall milliseconds)
        self._entries: OrderedDict[str, tuple[float, tuple[Provider, ...]]] = OrderedDict()  #: fresh until

    def get(self, topic: str) -> list[Provider] | None:
        """The fresh providers of `topic`, or None when absent or no longer fresh."""
        entry = self._entries.get(topic)
        if entry is None or entry[0] <= self._clock():
            return None
        return list(entry[1])

    def stale(self, topic: str) -> list[Provider] | None:
        """The providers of `topic` past their freshness but within `stale` seconds of it,
        less those whose record has expired since; None when that leaves none, or the
        entry is absent or older (then forgotten)."""
        entry = self._entries.get(topic)
        if entry is None:
            return None
        now = self._wall()
        live = [p for p in entry[1] if p.seq / 1000 + p.ttl > now]
        if not live or entry[0] + self.stale_for <= self._clock():
            del self._entries[topic]
            return None
        return live

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
