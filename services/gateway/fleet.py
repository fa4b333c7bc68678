"""The gateways as a fleet: heartbeats, and the janitor for the dead ones' leases.

Every gateway writes its heartbeat every `heartbeat_interval` and learns how
many gateways are live (which sizes leases: a 1/(4 x live) share of what is
left), and which of its long leases other gateways recalled (their keys near
their limits; `on_recalled` gives them back: README.md, "Long leases"). Every
gateway also runs the janitor every `janitor_interval`: a lease
that expired more than `grace` ago, whose owner has not beaten for
`dead_after` (or restarted since), gets its never-claimed units back at once
(`units - claimed`; see README.md, "Limits", for why that is safe and what a
restarting owner adds). Old windows and long-dead orphans are pruned hourly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Self

from shared.errors import MeshError
from shared.logging import get_logger
from shared.tasks import Background
from services.gateway.store import QuotaStore

__all__ = ["Fleet"]

log = get_logger(__name__)

_PRUNE_EVERY = 3600.0
_KEEP_WINDOWS = timedelta(days=62)  # last month's counters stay readable
_ORPHAN_RETENTION = 35 * 86_400.0


class Fleet:
    """Heartbeat and janitor loops of one gateway (`gateway`, in its `incarnation`);
    every heartbeat tells `on_live` how many gateways are live (at least 1) and
    `on_recalled` the ids of its recalled long leases (if any)."""

    def __init__(
        self, store: QuotaStore, *, gateway: str, incarnation: str, on_live: Callable[[int], None],
        on_recalled: Callable[[list[int]], None] | None = None,
        heartbeat_interval: float = 1.0, dead_after: float = 10.0, janitor_interval: float = 1.0,
        grace: float = 2.0,
    ) -> None:
        if heartbeat_interval * 2 >= dead_after:
            raise ValueError("dead_after must be more than two heartbeats")
        self._store = store
        self.gateway = gateway
        self.incarnation = incarnation
        self._on_live = on_live
        self._on_recalled = on_recalled
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.janitor_interval = janitor_interval
        self.grace = grace
        self.reclaimed = 0  #: units the janitor gave back, in this process
        self._background = Background()

    async def __aenter__(self) -> Self:
        await self.beat()
        self._background.start(self._beating(), name="gateway heartbeat")
        self._background.start(self._sweeping(), name="quota janitor")
        return self

    def halt(self) -> None:
        """Stop dead: no more heartbeats, nothing left cleanly (`kill -9`, for the fault tests)."""
        self._background.halt()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()
        try:
            await self._store.leave(self.gateway, self.incarnation)
        except MeshError as exc:
            log.warning("could not sign off the fleet", error=exc.message)

    async def beat(self) -> int:
        beat = await self._store.heartbeat(self.gateway, self.incarnation, self.dead_after)
        self._on_live(max(1, beat.live))
        if beat.recalled and self._on_recalled is not None:
            self._on_recalled(beat.recalled)
        return beat.live

    async def sweep(self) -> int:
        """One janitor pass; the units given back."""
        orphaned = await self._store.orphan(self.dead_after, self.grace)
        returned = sum(r[2] for r in orphaned)
        if orphaned:
            self.reclaimed += returned
            log.info("janitor reclaimed leases of dead gateways", leases=len(orphaned), returned=returned,
                     gateways=sorted({r[1] for r in orphaned}))
        return returned

    async def _beating(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.beat()
            except MeshError as exc:
                log.warning("heartbeat failed", error=exc.message)

    async def _sweeping(self) -> None:
        pruned_at = time.monotonic()
        while True:
            await asyncio.sleep(self.janitor_interval)
            try:
                await self.sweep()
                if time.monotonic() - pruned_at > _PRUNE_EVERY:
                    pruned_at = time.monotonic()
                    before = datetime.now(UTC) - _KEEP_WINDOWS
                    await self._store.prune(before, _ORPHAN_RETENTION)
            except MeshError as exc:
                log.warning("janitor pass failed", error=exc.message)
