"""Ship the usage journal to `auth.record_usage`, in batches, at least once.

Every `interval` (or as soon as `max_batch` records wait) the shipper sends
the oldest unshipped records in one call and, when auth answers, moves the
journal's shipped mark past them: one batch an interval, or more while they
go full (each batch is a transaction at auth). A failed call is retried with
backoff, never skipped; a record auth refuses as invalid is logged and
dropped (it would otherwise block every later one). Auth stores each request
id once, so a batch sent twice -- lost answer, crash before the mark moved --
counts once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Self

from shared.errors import InvalidParams, MeshError
from shared.logging import get_logger
from shared.tasks import Background
from services.gateway.journal import Journal

__all__ = ["UsageShipper"]

log = get_logger(__name__)

Send = Callable[[list[dict[str, Any]]], Awaitable[dict[str, Any]]]


class UsageShipper:
    """The background task that empties the journal into auth."""

    def __init__(
        self, journal: Journal, send: Send, *, interval: float = 0.1, max_batch: int = 500,
        max_backoff: float = 2.0, stop_timeout: float = 3.0,
    ) -> None:
        self._journal = journal
        self._send = send
        self.interval = interval
        self.max_batch = max_batch
        self._max_backoff = max_backoff
        self._stop_timeout = stop_timeout
        self._wake = asyncio.Event()
        self._background = Background()
        self.failures = 0
        self.rejected = 0

    async def __aenter__(self) -> Self:
        self._background.start(self._run(), name="usage shipper")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()
        try:  # a clean stop ships what is left; whatever fails stays in the journal
            await asyncio.wait_for(self.flush(), self._stop_timeout)
        except (MeshError, TimeoutError) as exc:
            log.warning("usage left in the journal for the next start", error=str(exc),
                        records=self._journal.unshipped)

    def poke(self) -> None:
        """A record was appended: ship early if a full batch waits."""
        if self._journal.unshipped >= self.max_batch:
            self._wake.set()

    async def flush(self) -> int:
        """Ship until nothing is pending; the number of records shipped."""
        total = 0
        while True:
            shipped = await self.ship_once()
            total += shipped
            if shipped == 0:
                return total

    async def ship_once(self) -> int:
        """Send one batch; the number of records it took off the journal."""
        batch = self._journal.pending(self.max_batch)
        if not batch:
            return 0
        try:
            answer = await self._send([record for _, record in batch])
        except InvalidParams as exc:
            index = exc.data.get("index")
            if not isinstance(index, int) or not 0 <= index < len(batch):
                raise
            log.error("auth refused a usage record; dropped", error=exc.message, record=batch[index][1])
            self._journal.drop(batch[index][0])
            self.rejected += 1
            return await self.ship_once()
        self._journal.shipped(batch[-1][0], len(batch))
        if isinstance(answer, dict) and answer.get("rejected"):
            self.rejected += answer["rejected"]
            log.warning("auth rejected usage records (unknown user or key)", rejected=answer["rejected"])
        return len(batch)

    async def _run(self) -> None:
        backoff = self.interval
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), backoff)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                # One batch a turn, more only while they go full: under load the
                # records of an interval go to auth in one statement, not in
                # back-to-back batches as small as a round trip lets them be.
                while await self.ship_once() >= self.max_batch:
                    pass
                backoff = self.interval
            except MeshError as exc:
                self.failures += 1
                backoff = min(self._max_backoff, backoff * 2)
                log.warning("usage shipping failed; will retry", error=exc.message,
                            waiting=self._journal.unshipped, retry_in=backoff)
