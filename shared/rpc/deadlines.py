"""Many deadlines, one timer.

Every call and every served request has a deadline. A `TimerHandle` each
(`loop.call_later`, `asyncio.timeout`) costs object churn and Python-level heap
comparisons on the hottest path; this queue keeps plain `(when, key)` tuples in
one heap, compared in C, and arms a single loop timer for the earliest one.
Entries that finish early are not removed (that would cost a search); the
expiry callback ignores keys that are no longer in flight, and the heap is
compacted when stale entries pile up.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Container, Hashable

__all__ = ["DeadlineQueue"]


class DeadlineQueue:
    """Call `on_expire(key)` once `loop.time()` reaches the key's deadline."""

    def __init__(
        self,
        on_expire: Callable[[Hashable], None],
        live: Container[Hashable],
        *,
        resolution: float = 0.002,
    ) -> None:
        self._on_expire = on_expire
        self._live = live  #: keys still in flight; the rest are stale entries
        self._resolution = resolution
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = float("inf")

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, loop: asyncio.AbstractEventLoop, delay: float, key: Hashable) -> None:
        """Expire `key` after `delay` seconds unless it left `live` by then."""
        when = loop.time() + delay
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, key))
        if when < self._timer_when - self._resolution:
            self._arm(loop, when)
        elif len(self._heap) > 1024 and len(self._heap) > 4 * _size(self._live):
            self._compact()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_when = None, float("inf")
        self._heap.clear()

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = loop.call_at(when, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._timer_when = None, float("inf")
        now = loop.time() + self._resolution
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, key = heapq.heappop(heap)
            if key in self._live:
                self._on_expire(key)
        if heap:
            self._arm(loop, heap[0][0])

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2] in self._live]
        heapq.heapify(self._heap)


def _size(container: Container[Hashable]) -> int:
    return len(container) if hasattr(container, "__len__") else 0  # type: ignore[arg-type]
