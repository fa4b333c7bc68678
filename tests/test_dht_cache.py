"""The lookup cache: fresh answers, stale answers while a crawl refreshes them, forgetting.

A request must not wait on a DHT crawl while its providers are known: a crawl
waits for the slowest of the k closest nodes (up to the RPC timeout), and under
load that made every request in flight at a cache expiry wait about a second
(the /v1 tail of issue 21). The node answers from a stale entry and refreshes
it in the background (tests/test_dht.py has that on real nodes).
"""

from __future__ import annotations

import pytest

from shared.dht.cache import LookupCache
from shared.dht.interface import Provider

pytestmark = pytest.mark.unit

NOW = 1_800_000_000.0  #: wall-clock seconds


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def provider(name: str, signed_at: float = NOW, ttl: float = 30.0) -> Provider:
    return Provider(topic="t", service="s", endpoint=f"tcp://127.0.0.1:1/{name}", node_key=name.encode(),
                    curve_key=b"", version="1", seq=int(signed_at * 1000), ttl=ttl)


def test_an_entry_is_fresh_then_stale_then_gone():
    clock, wall = Clock(100.0), Clock(NOW)
    cache = LookupCache(1.0, 8, clock, stale=15.0, wall=wall)
    cache.put("t", [provider("a")])
    assert [p.endpoint for p in cache.get("t")] == ["tcp://127.0.0.1:1/a"]
    clock.at += 1.0
    assert cache.get("t") is None  # no longer fresh ...
    assert [p.endpoint for p in cache.stale("t")] == ["tcp://127.0.0.1:1/a"]  # ... still an answer
    clock.at += 14.9
    assert cache.stale("t") is not None
    clock.at += 0.2
    assert cache.stale("t") is None and cache.get("t") is None  # too old: forgotten
    cache.put("t", [provider("b")])  # the refresh's answer is fresh again
    assert [p.endpoint for p in cache.get("t")] == ["tcp://127.0.0.1:1/b"]


def test_a_stale_answer_leaves_out_providers_whose_record_expired():
    clock, wall = Clock(0.0), Clock(NOW)
    cache = LookupCache(1.0, 8, clock, stale=15.0, wall=wall)
    cache.put("t", [provider("short", ttl=5.0), provider("long", ttl=60.0)])
    clock.at, wall.at = 2.0, NOW + 6.0
    assert [p.endpoint for p in cache.stale("t")] == ["tcp://127.0.0.1:1/long"]
    wall.at = NOW + 61.0
    assert cache.stale("t") is None  # none left alive: the caller crawls


def test_drop_forgets_fresh_and_stale_and_no_stale_window_means_none():
    clock = Clock(0.0)
    cache = LookupCache(1.0, 8, clock, stale=15.0, wall=Clock(NOW))
    cache.put("t", [provider("a")])
    cache.drop("t")  # a provider failed, or this node announced
    assert cache.get("t") is None and cache.stale("t") is None
    strict = LookupCache(1.0, 8, clock, wall=Clock(NOW))  # stale=0: every caller after ttl crawls
    strict.put("t", [provider("a")])
    clock.at = 1.0
    assert strict.get("t") is None and strict.stale("t") is None
    uncached = LookupCache(0.0, 8, clock, stale=15.0, wall=Clock(NOW))  # ttl 0: no cache at all
    uncached.put("t", [provider("a")])
    assert uncached.get("t") is None and uncached.stale("t") is None
