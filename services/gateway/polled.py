"""A versioned table of auth's that a gateway keeps in step by polling (prices, routing settings).

    table = Polled("model prices", fetch, apply)      # fetch(since) -> (version, rows or None)
    async with table:                                  # loads now if auth answers, then polls
        ...

Every `interval` (a second) the table asks auth for its `version` and, when it
moved, for the rows, which `apply` takes; a change made in auth applies here
within an interval. Until the first load succeeds `loaded` is False (auth may
come up after the gateway; the loop keeps asking, and says so once per outage).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Self

from shared.errors import MeshError
from shared.logging import get_logger
from shared.tasks import Background

__all__ = ["Polled"]

log = get_logger(__name__)

Fetch = Callable[[int | None], Awaitable[tuple[int, Any]]]


class Polled:
    """One of auth's versioned tables, polled (see the module doc)."""

    def __init__(self, name: str, fetch: Fetch, apply: Callable[[Any], None], *, interval: float = 1.0) -> None:
        self.name = name
        self._fetch = fetch
        self._apply = apply
        self._interval = interval
        self._version: int | None = None
        self._background = Background()
        self.loaded = False

    async def __aenter__(self) -> Self:
        try:
            await self.refresh()
        except MeshError as exc:
            log.warning("not loaded yet", table=self.name, error=exc.message)
        self._background.start(self._polling(), name=self.name)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()

    async def refresh(self) -> None:
        """Ask auth once; apply the rows if they changed."""
        version, rows = await self._fetch(self._version)
        if rows is not None:
            self._apply(rows)
            log.info("loaded", table=self.name, version=version)
        self._version = version
        self.loaded = True

    async def _polling(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
                failing = False
            except MeshError as exc:
                if not failing:
                    log.warning("cannot refresh; keeping what is known", table=self.name, error=exc.message)
                failing = True
