"""Keeping an auth instance's key cache in step with the invalidation log.

Two paths, one for speed and one for certainty (README.md, "Revocation"):

* LISTEN: a dedicated connection hears each invalidation's NOTIFY when its
  transaction commits and evicts the entry at once (milliseconds);
* poll: every `poll_interval` the log is read from the cursor on. This catches
  whatever a lost connection made us miss, and it is what `trusted` rests on.

An entry naming neither a key nor a user (a tier's limits changed) means
"everything": the tiers are reloaded (`reload`) and then the whole cache is
dropped -- in that order, so no answer computed with the old limits can be
stored after the drop (the drop bumps the cache's epoch). Such an entry is
applied by the poll only, never from its NOTIFY, which just wakes the poll:
the cursor must not pass it before the reload is done.

`synced_at` is when the last successful poll *started*: every invalidation
committed before it has been applied. While it is older than `stale_after`
the cache is not trusted and `validate_key` reads the database, so a
revocation stops being honoured within `stale_after` even if PostgreSQL
notifications and polls both fail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from shared.errors import Unavailable
from shared.logging import get_logger
from shared.tasks import Background
from services.auth.cache import KeyCache
from services.auth.store import INVALIDATION_CHANNEL, AuthStore

__all__ = ["InvalidationFeed"]

log = get_logger(__name__)


class InvalidationFeed:
    """Applies invalidations to `cache`: from NOTIFY at once, from polls for sure."""

    def __init__(
        self, store: AuthStore, dsn: str, cache: KeyCache, *, poll_interval: float = 0.5,
        stale_after: float = 1.0, batch: int = 1000, reload: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._dsn = dsn
        self.cache = cache
        self.poll_interval = poll_interval
        self.stale_after = stale_after
        self._batch = batch
        self._reload = reload  #: reads what the cache's answers are made of again (the tiers)
        #: Every invalidation with seq <= cursor has been applied.
        self.cursor = 0
        self.synced_at = float("-inf")
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._background = Background()
        self._failing = False

    @property
    def trusted(self) -> bool:
        """True while the cache provably reflects every invalidation older than `stale_after`."""
        return time.monotonic() - self.synced_at <= self.stale_after

    async def __aenter__(self) -> InvalidationFeed:
        await self._listen()
        await self.sync()
        self._background.start(self._run(), name="auth invalidations")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()
        await self._close_listener()

    async def pause_polling(self) -> None:
        """Poll no more, as if every poll failed from now on: once `stale_after`
        passes the cache is not trusted (what an outage of the log looks like)."""
        await self._background.stop()

    async def sync(self) -> None:
        """Apply every invalidation after the cursor, reading the log until its end."""
        while True:
            started, since = time.monotonic(), self.cursor
            rows, newest, oldest = await self._store.invalidations_since(since, self._batch)
            # Another database, or entries pruned before we saw them: anything may have changed.
            lost = since > newest or since < oldest - 1
            if lost or any(_is_reset(row["key_id"], row["user_id"]) for row in rows):
                await self.reset()
            else:
                for row in rows:
                    self.cache.evict(key_id=row["key_id"], user_id=row["user_id"])
            if lost:
                self.cursor = newest
            if rows:
                self.cursor = max(self.cursor, rows[-1]["seq"])
            if len(rows) < self._batch:
                self.synced_at = started
                return

    async def reset(self) -> None:
        """Reload the tiers, then drop the whole cache (see the module doc for the order)."""
        if self._reload is not None:
            await self._reload()
        self.cache.clear()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if self._listener is None or self._listener.is_closed():
                    await self._listen()
                await self.sync()
                if self._failing:
                    log.info("invalidation log reachable again", cursor=self.cursor)
                self._failing = False
            except (Unavailable, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                if not self._failing:  # once per outage, not every half second
                    log.warning("cannot read the invalidation log", error=str(exc))
                self._failing = True

    @property
    def listener_pid(self) -> int | None:
        """The server process of the LISTEN connection; None while there is none."""
        listener = self._listener
        return listener.get_server_pid() if listener is not None and not listener.is_closed() else None

    async def stop_listening(self) -> None:
        """Hear no notification, keep the connection (a listener that went deaf: polls
        alone then keep the cache in step)."""
        if self._listener is not None:
            await self._listener.remove_listener(INVALIDATION_CHANNEL, self._on_notify)

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            seq_text, key_text, user_text = payload.split(":")
            seq = int(seq_text)
            key_id = int(key_text) if key_text else None
            user_id = int(user_text) if user_text else None
        except ValueError:
            self._wake.set()
            return
        if _is_reset(key_id, user_id):
            self._wake.set()  # the poll reloads the tiers, then drops everything (module doc)
            return
        self.cache.evict(key_id=key_id, user_id=user_id)
        if seq == self.cursor + 1:
            self.cursor = seq  # writers are serialized: nothing can be missing below it
        elif seq > self.cursor:
            self._wake.set()  # a gap (a missed notice or a rolled-back seq): read the log now

    async def _listen(self) -> None:
        await self._close_listener()
        try:
            conn = await asyncpg.connect(self._dsn)
            await conn.add_listener(INVALIDATION_CHANNEL, self._on_notify)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("cannot listen for invalidations; polling only", error=str(exc))
            return
        conn.add_termination_listener(lambda _conn: self._wake.set())
        self._listener = conn

    async def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:
                conn.terminate()


def _is_reset(key_id: int | None, user_id: int | None) -> bool:
    """An entry naming neither a key nor a user: everything is to be dropped (a tier changed)."""
    return key_id is None and user_id is None
