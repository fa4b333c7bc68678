"""When spending alerts are looked at: with the batch (interval 0), or coalesced per instance.

    loop = AlertLoop(service.fire_alerts, interval=0.5)
    async with loop:
        loop.touched(user_ids, key_ids)       # after each usage batch is stored

Looking at the budgets of a batch's users and keys costs two queries. Gateways
ship a batch every 100 ms each, so at load those queries would run with every
batch; coalesced, an instance looks at every user and key touched since its last
look at most once per `interval` (`INFERSWARM_ALERT_INTERVAL`, 0.5 s): an alert
comes at most that much later (the first touch after a quiet spell is looked at
at once), and still exactly once (alert_store.py's unique insert). With
interval 0 the batch is looked at before it is answered. A stopping instance
looks at what is left before it goes.

What is touched but not looked at yet is lost if the process dies: those
thresholds are reached again by the next usage of the user or key in the period
(spend only grows), and fire then. A database that is away puts them back for
the next round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Self

from shared.errors import MeshError
from shared.logging import get_logger
from shared.tasks import Background

__all__ = ["AlertLoop"]

log = get_logger(__name__)

Evaluate = Callable[[list[int], list[int]], Awaitable[None]]


class AlertLoop:
    """The users and keys whose usage was stored, looked at (see the module doc)."""

    def __init__(self, evaluate: Evaluate, *, interval: float = 0.5) -> None:
        self._evaluate = evaluate
        self.interval = interval
        self._users: set[int] = set()
        self._keys: set[int] = set()
        self._wake = asyncio.Event()
        self._background = Background()

    async def __aenter__(self) -> Self:
        if self.interval > 0:
            self._background.start(self._run(), name="spending alerts")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()
        if self._users:  # a last look at what came since the last round
            try:
                await asyncio.wait_for(self._round(), 5.0)
            except (MeshError, TimeoutError) as exc:
                log.warning("spending alerts not looked at before stopping", users=len(self._users),
                            error=str(exc))

    async def touched(self, user_ids: list[int], key_ids: list[int]) -> None:
        """Usage of these users and keys was stored: look at their budgets now (interval 0),
        or in the next round."""
        if self.interval <= 0:
            await self._evaluate(user_ids, key_ids)
            return
        self._users.update(user_ids)
        self._keys.update(key_ids)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._round()
            except MeshError as exc:
                log.warning("spending alerts not looked at; trying again", error=exc.message)
            except Exception:
                log.exception("spending alerts not looked at")
            await asyncio.sleep(self.interval)

    async def _round(self) -> None:
        users, keys = sorted(self._users), sorted(self._keys)
        self._users.clear()
        self._keys.clear()
        try:
            await self._evaluate(users, keys)
        except (MeshError, asyncio.CancelledError):  # the database is away, or we stop: not lost
            self._users.update(users)
            self._keys.update(keys)
            self._wake.set()
            raise
