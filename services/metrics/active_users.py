"""Active users over 1 h and 24 h, refreshed in the background from auth's usage data.

Asked of `auth.active_users` every `interval` seconds, never per scrape. When
auth cannot be asked, the last answer stays (with its age in `fetched_at`);
before the first answer there is nothing to show.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shared.errors import MeshError
from shared.logging import get_logger
from shared.tasks import Background

__all__ = ["WINDOWS", "ActiveUsers"]

log = get_logger(__name__)

WINDOWS = ("1h", "24h")


class ActiveUsers:
    """The latest `{"1h": n, "24h": n}`, kept fresh by a background loop."""

    def __init__(self, fetch: Callable[[], Awaitable[Any]], *, interval: float = 30.0) -> None:
        self._fetch = fetch
        self.interval = interval
        self.counts: dict[str, int] = {}
        self.fetched_at: float | None = None
        self.error: str | None = None
        self._background = Background()

    async def __aenter__(self) -> ActiveUsers:
        self._background.start(self._run(), name="active-users")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()

    async def refresh(self) -> bool:
        """Ask once; True when the counts were updated."""
        try:
            answer = await self._fetch()
        except MeshError as exc:
            self.error = f"{exc.code}: {exc.message}"
            log.info("active users not refreshed", error=self.error)
            return False
        counts = {w: answer.get(w) for w in WINDOWS} if isinstance(answer, dict) else {}
        if not all(type(v) is int and v >= 0 for v in counts.values()) or len(counts) != len(WINDOWS):
            self.error = "auth.active_users answered an unexpected shape"
            log.warning("active users: unexpected answer", answer=str(answer)[:200])
            return False
        self.counts, self.fetched_at, self.error = counts, time.time(), None
        return True

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("active users refresh failed")
            await asyncio.sleep(self.interval)
