"""How many requests this gateway has at workers at once, and who goes first when that is full.

    dispatch = Dispatch(capacity=512, queue_limit=2048)
    await dispatch.enter(priority, deadline)     # at once while there is room; else waits its turn
    try:
        ...                                      # admit, relay
    finally:
        dispatch.leave()

Workers order their own queues by priority (services/inference/slots.py), but
a gateway that sends everything at once lets a flood of low-tier requests
fill every worker queue before a higher tier's request arrives. So a gateway
keeps at most `capacity` requests at workers (INFERSWARM_GATEWAY_MAX_IN_FLIGHT);
past that, requests wait here, and a slot that frees goes to the waiting
request of the **highest priority** (the caller's tier's), the earliest of
that priority first. A request that waits past its deadline is `TIMEOUT`
(`reason: "queue_timeout"`: nothing started); when `queue_limit` requests
wait already, one more is `UNAVAILABLE` (`reason: "gateway_busy"`,
`retry_after`), at once.

While there is room and nobody waits, `enter` takes a slot without awaiting
anything: the path of a gateway that is not full costs two integer updates.
A slot is handed straight to the waiter it goes to (never released and
re-taken), so a late arrival cannot overtake the queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

from shared.errors import Timeout, Unavailable

__all__ = ["Dispatch"]

RETRY_AFTER = 1  #: seconds a caller refused for a full queue is told to wait


class Dispatch:
    """The gateway's slots toward workers, handed out by priority (see the module doc)."""

    def __init__(self, capacity: int, *, queue_limit: int) -> None:
        if capacity < 1 or queue_limit < 0:
            raise ValueError("a dispatch needs capacity >= 1 and queue_limit >= 0")
        self.capacity = capacity
        self.queue_limit = queue_limit
        self.in_flight = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []  #: (-priority, arrival, future)
        self._arrivals = itertools.count()
        self.waiting = 0  #: requests waiting now (the heap may also hold some that gave up)
        self.waited = 0  #: requests that waited for a slot, since start
        self.refused = 0  #: requests refused for a full queue

    async def enter(self, priority: int, deadline: float) -> None:
        """Take a slot: now if one is free and nobody waits, else in priority order by
        `deadline` (time.monotonic()): `TIMEOUT` then, `UNAVAILABLE` if the queue is full."""
        if self.in_flight < self.capacity and not self.waiting:
            self.in_flight += 1
            return
        if self.waiting >= self.queue_limit:
            self.refused += 1
            raise Unavailable("the gateway is at capacity; retry shortly",
                              {"retry_safe": True, "retry_after": RETRY_AFTER, "reason": "gateway_busy"})
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (-priority, next(self._arrivals), future))
        self.waiting += 1
        self.waited += 1
        self._hand_over()  # a slot may be free with only cancelled waiters ahead
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except BaseException as exc:
            if future.done() and not future.cancelled():
                self.leave()  # the slot came as it gave up: pass it on
            else:
                future.cancel()
                self.waiting -= 1
            if isinstance(exc, asyncio.TimeoutError):
                raise Timeout("the deadline passed while the gateway was at capacity",
                              {"retry_safe": True, "reason": "queue_timeout"}) from None
            raise

    def leave(self) -> None:
        """Give a slot back: to the first waiter by priority, else free."""
        self.in_flight -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiting and self.in_flight < self.capacity:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                self.in_flight += 1
                self.waiting -= 1
                future.set_result(None)
