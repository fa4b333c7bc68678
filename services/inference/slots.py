"""Slots: at most N generations at once per model, and a bounded priority queue.

    async with pool.acquire(priority=2, timeout=30.0):
        ...  # generate

A request takes a free slot at once when nobody is waiting; otherwise it
waits in a queue ordered by priority (higher first: enterprise 2 before pro 1
before free 0), first come first served within a priority. The queue holds at
most `queue_limit` requests: one more is refused at once with `UNAVAILABLE`
whose data carries the queue state, never left to wait without bound. A
waiter that is cancelled (its caller cancelled or its deadline passed) leaves
the queue; a slot handed to it in that same instant goes to the next waiter.
A freed slot goes straight to the best waiter, so a newcomer cannot overtake
the queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from shared.errors import Timeout, Unavailable

__all__ = ["SlotPool"]


class SlotPool:
    """A concurrency cap with a bounded, priority-ordered waiting line."""

    def __init__(self, slots: int, queue_limit: int, *, on_change: Callable[[], None] | None = None) -> None:
        if slots < 1 or queue_limit < 0:
            raise ValueError("slots must be >= 1 and queue_limit >= 0")
        self.slots = slots
        self.queue_limit = queue_limit
        self.in_use = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._on_change = on_change

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def free(self) -> int:
        return self.slots - self.in_use

    def state(self) -> dict[str, Any]:
        """The numbers a refusal carries and a load record announces."""
        return {"slots": self.slots, "in_use": self.in_use, "queued": self.queued, "limit": self.queue_limit}

    @asynccontextmanager
    async def acquire(self, priority: int = 0, timeout: float | None = None) -> AsyncIterator[None]:
        """Hold one slot for the body; wait at most `timeout` seconds for it."""
        await self._take(priority, timeout)
        try:
            yield
        finally:
            self._release()

    async def _take(self, priority: int, timeout: float | None) -> None:
        if self.in_use < self.slots and not self._waiters:
            self.in_use += 1
            self._changed()
            return
        if len(self._waiters) >= self.queue_limit:
            raise Unavailable("all slots busy and the queue is full",
                              {**self.state(), "retry_safe": True, "reason": "queue_full"})
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (-priority, next(self._order), future)
        heapq.heappush(self._waiters, entry)
        self._changed()
        try:
            async with asyncio.timeout(timeout):
                await future
        except BaseException as exc:
            self._leave(entry)
            if isinstance(exc, TimeoutError):
                raise Timeout(f"no slot free within {timeout:.3g}s", {**self.state(), "reason": "queue_timeout"}) from None
            raise

    def _leave(self, entry: tuple[int, int, asyncio.Future[None]]) -> None:
        """A waiter gives up: out of the queue; a slot granted meanwhile moves on."""
        future = entry[2]
        if future.done() and not future.cancelled():
            self._release()  # granted just before it gave up: pass the slot on
            return
        future.cancel()
        try:
            self._waiters.remove(entry)
        except ValueError:
            return
        heapq.heapify(self._waiters)
        self._changed()

    def _release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # the slot changes hands; in_use stays
                self._changed()
                return
        self.in_use -= 1
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
