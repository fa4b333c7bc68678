"""How much a DHT node answers any one address: a token bucket of bytes per peer IP.

A UDP request is small and its reply can be large (a `find_value` reply
carries up to `max_response_size` bytes of records): without a bound, anyone
could flood a node with requests, or make it send 60 KB to a forged source
address for every 100 bytes they send (reflection). Each peer IP has a bucket
of `burst` bytes, refilled at `rate` bytes/s. A request costs `min_cost` before it is
handled (so requests with small replies, a signed `store` among them, are
bounded in number too) and its reply's size beyond that before the reply is
sent. A request the bucket cannot pay for is dropped unanswered, as if the
datagram were lost; its sender retries later.

Loopback sources are exempt by default: they are processes of this host (the
kernel drops loopback-sourced packets arriving from outside), such as a
whole mesh of test nodes or a stack started by `inferswarm up`. At most
`max_peers` buckets are kept; the least recently used is forgotten first.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["PeerBudget"]


class PeerBudget:
    """Bytes each peer IP may still be sent."""

    def __init__(
        self, *, rate: float, burst: float, min_cost: int = 512, exempt_loopback: bool = True,
        max_peers: int = 4096, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.min_cost = rate, burst, min_cost
        self.exempt_loopback = exempt_loopback
        self._max_peers = max_peers
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # ip -> (tokens, at)
        self.refused = 0  #: requests dropped for want of budget

    @property
    def tracked(self) -> list[str]:
        """The peers (IPs) with a bucket, oldest first."""
        return list(self._buckets)

    def admit(self, ip: str) -> bool:
        """Before the work: take `min_cost` from `ip`'s bucket; False (nothing taken) if it cannot pay."""
        return self._take(ip, self.min_cost)

    def pay_reply(self, ip: str, reply_bytes: int) -> bool:
        """After the work: take what the reply costs beyond `min_cost`; False if it cannot pay."""
        return reply_bytes <= self.min_cost or self._take(ip, reply_bytes - self.min_cost)

    def _take(self, ip: str, cost: float) -> bool:
        if self.rate <= 0 or (self.exempt_loopback and _is_loopback(ip)):
            return True
        now = self._clock()
        tokens, at = self._buckets.pop(ip, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= cost
        self._buckets[ip] = (tokens - cost if allowed else tokens, now)
        if len(self._buckets) > self._max_peers:
            self._buckets.popitem(last=False)
        if not allowed:
            self.refused += 1
        return allowed


def _is_loopback(ip: str) -> bool:
    if ip.startswith("127."):
        return True
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False
