"""What other services use to rely on auth: a caching API key validator.

    async with KeyValidator(node.mesh) as validator:
        identity = await validator.validate(api_key)   # dict, or Unauthenticated

`validate` answers from memory when it can and asks `auth.validate_key`
otherwise. Entries live at most `ttl` seconds. A background task polls
`auth.invalidations(since=cursor)` every `poll_interval` and evicts the keys
and users named there, so a revocation, tier change or disabled account stops
being honoured within `poll_interval` plus one round trip.

If polling fails (auth unreachable, a partition), the cache is trusted for
`stale_after` seconds after the last successful poll began and not at all
after that: every call goes to auth (fail closed), which refuses or fails.
So a revoked key is never honoured for longer than `stale_after` (1 s).

While the cache is not trusted, callers of the same key share one
`auth.validate_key` call begun less than `stale_after` ago with no eviction
since, instead of each making their own: under load, one late poll would
otherwise send every request to auth at once, and auth, slowed down by them,
would answer the next polls late too (the answer shared is no older than a
trusted cache's).

Two races are closed: an answer is stored only if no eviction happened while
it was being fetched, and only if the auth instance that gave it had applied
at least the invalidations this validator has seen (its `cursor`), so a
lagging auth instance cannot put a revoked key back.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shared.errors import MeshError, Unauthenticated
from shared.logging import get_logger
from shared.rpc import MeshClient
from services.auth.cache import KeyCache
from services.auth.keys import hash_key, looks_like_key

__all__ = ["KeyValidator"]

log = get_logger(__name__)


class KeyValidator:
    """Validates API keys through `auth.validate_key`, caching answers safely."""

    def __init__(
        self, mesh: MeshClient, *, ttl: float = 30.0, poll_interval: float = 0.25,
        stale_after: float = 1.0, max_entries: int = 100_000, timeout: float = 2.0,
        service: str = "auth",
    ) -> None:
        if poll_interval >= stale_after:
            raise ValueError("poll_interval must be shorter than stale_after")
        self._auth = mesh(service)
        self.cache = KeyCache(ttl=ttl, max_entries=max_entries)
        self.poll_interval = poll_interval
        self.stale_after = stale_after
        self._timeout = timeout
        self.cursor: int | None = None  #: None until the first successful poll
        self.synced_at = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        #: key hash -> (when it began, the cache's epoch then, the auth.validate_key call being made)
        self._calls: dict[bytes, tuple[float, int, asyncio.Task[dict[str, Any]]]] = {}

    @property
    def trusted(self) -> bool:
        """True while the cache reflects every invalidation older than `stale_after`."""
        return self.cursor is not None and time.monotonic() - self.synced_at <= self.stale_after

    async def __aenter__(self) -> KeyValidator:
        try:
            await self.poll()
        except MeshError as exc:  # start anyway, untrusted: every call goes to auth
            log.warning("auth invalidations unavailable at start", error=exc.message)
        self._task = asyncio.create_task(self._run(), name="key validator poll")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def validate(self, api_key: str) -> dict[str, Any]:
        """The key's owner, key id, tier, limits and priority; `Unauthenticated` if refused."""
        if not looks_like_key(api_key):
            raise Unauthenticated("invalid API key")
        key_hash = hash_key(api_key)
        if self.trusted:
            entry = self.cache.get(key_hash)
            if entry is not None:
                return entry.result
        began, epoch, call = self._calls.get(key_hash, (float("-inf"), -1, None))
        if call is None or time.monotonic() - began > self.stale_after or epoch != self.cache.epoch:
            call = asyncio.ensure_future(self._ask_auth(api_key, key_hash))
            self._calls[key_hash] = (time.monotonic(), self.cache.epoch, call)
            call.add_done_callback(lambda done: self._call_done(key_hash, done))
        return await asyncio.shield(call)  # one caller giving up does not cancel it for the others

    def _call_done(self, key_hash: bytes, call: asyncio.Task[dict[str, Any]]) -> None:
        if self._calls.get(key_hash, (0.0, 0, None))[2] is call:
            del self._calls[key_hash]
        if not call.cancelled():
            call.exception()  # retrieved: the callers that still wait get it anyway

    async def _ask_auth(self, api_key: str, key_hash: bytes) -> dict[str, Any]:
        epoch = self.cache.epoch
        result = await self._auth.call(
            "auth.validate_key", {"api_key": api_key}, timeout=self._timeout, idempotent=True
        )
        cursor = self.cursor
        if (
            self.cache.epoch == epoch
            and cursor is not None
            and isinstance(result.get("cursor"), int)
            and result["cursor"] >= cursor
        ):
            self.cache.put(key_hash, result, user_id=result["user_id"], key_id=result["key_id"],
                           expires_at=result.get("expires_at"))
        return result

    async def poll(self) -> None:
        """Read the invalidation log from the cursor to its end; evict what it names."""
        while True:
            started = time.monotonic()
            if self.cursor is None:
                answer = await self._call_invalidations(None)
                self.cache.clear()  # nothing cached yet can be vouched for
            else:
                answer = await self._call_invalidations(self.cursor)
                if answer["reset"]:
                    self.cache.clear()
                for entry in answer["entries"]:
                    self.cache.evict(key_id=entry["key_id"], user_id=entry["user_id"])
            self.cursor = answer["cursor"]
            if not answer["more"]:
                self.synced_at = started
                return

    async def _call_invalidations(self, since: int | None) -> dict[str, Any]:
        return await self._auth.call(
            "auth.invalidations", {"since": since}, timeout=min(self._timeout, self.stale_after),
            idempotent=True,
        )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll()
                if self._failing:
                    log.info("auth invalidations reachable again", cursor=self.cursor)
                self._failing = False
            except (MeshError, OSError, KeyError, TypeError) as exc:
                if not self._failing:
                    log.warning("cannot poll auth invalidations; not trusting the key cache",
                                error=str(exc))
                self._failing = True
