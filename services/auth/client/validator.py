"""A caching API key validator for the services that take API keys (gateways).

    async with KeyValidator(node.mesh) as validator:
        identity = await validator.validate(api_key, deadline=d)   # a KeyIdentity, or Unauthenticated

`validate` answers from memory when it can and asks `auth.validate_key`
otherwise. Entries live at most `ttl` seconds. A background task polls
`auth.invalidations(since=cursor)` every `poll_interval` and evicts the keys
and users named there -- from its own cache and from every cache added with
`sync_also` (a gateway's session tokens) -- so a revocation, tier change,
disabled account or ended session stops being honoured within
`poll_interval` plus one round trip. An entry naming neither a key nor a
user (a tier's limits changed: every answer may carry them) drops every
cache entirely.

If polling fails (auth unreachable, a partition), the cache is trusted for
`stale_after` seconds after the last successful poll began and not at all
after that: every call goes to auth (fail closed), which refuses or fails.
So a revoked key is never honoured for longer than `stale_after` (1 s).

**Deadlines come from the caller.** `deadline` is the caller's (a
`time.monotonic()` value, e.g. the request's being served); a call to
`auth.validate_key` gets the time left until it, capped at `max_timeout`
(30 s) so that one call cannot hold a long-lived request's whole budget, and
never less. A deadline already passed is `Timeout` without a call; each
caller stops waiting at its own deadline with `Timeout`. Without a deadline
a caller waits up to `max_timeout`.

While the cache is not trusted, callers of the same key share one
`auth.validate_key` call begun less than `stale_after` ago with no eviction
since, instead of each making their own: under load, one late poll would
otherwise send every request to auth at once, and auth, slowed down by them,
would answer the next polls late too (the answer shared is no older than a
trusted cache's). A shared call carries the deadline of the caller who began
it, so a caller joins it only if that deadline is at most `stale_after`
earlier than its own (capped) one -- callers arriving within the sharing
window with the same budget all share, while a caller with 60 s left does not
join a call begun by a caller with 1 s left: it begins a new one, which
replaces the old one for later callers (the old one still serves its own
waiters). And when a call it joined runs out of time before the caller's
own deadline, the caller asks again with the time it has left. So no caller
gets `Timeout` before its own deadline (or the cap) because of another
caller's budget.

Two races are closed: an answer is stored only if no eviction happened while
it was being fetched, and only if the auth instance that gave it had applied
at least the invalidations this validator has seen (its `cursor`), so a
lagging auth instance cannot put a revoked key back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol, cast

from shared.errors import MeshError, Timeout, Unauthenticated
from shared.logging import get_logger
from shared.rpc import MeshClient
from shared.tasks import Background
from services.auth.cache import KeyCache
from services.auth.client.api import AuthClient, Invalidations, KeyIdentity
from services.auth.keys import hash_key, looks_like_key

__all__ = ["KeyValidator", "SyncedCache"]

log = get_logger(__name__)


class SyncedCache(Protocol):
    """A cache the invalidation log keeps in step (`KeyCache`, a gateway's `TokenCache`)."""

    def evict(self, *, key_id: int | None = None, user_id: int | None = None) -> int: ...

    def clear(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Shared:
    """One `auth.validate_key` call that concurrent callers of a key may join."""

    began: float  #: time.monotonic() when it was made
    epoch: int  #: the cache's epoch then (an eviction since makes it unjoinable)
    deadline: float  #: when its own budget ends
    task: asyncio.Task[KeyIdentity]


class KeyValidator:
    """Validates API keys through `auth.validate_key`, caching answers safely."""

    def __init__(
        self, mesh: MeshClient, *, ttl: float = 30.0, poll_interval: float = 0.25,
        stale_after: float = 1.0, max_entries: int = 100_000, max_timeout: float = 30.0,
        service: str = "auth",
    ) -> None:
        if poll_interval >= stale_after:
            raise ValueError("poll_interval must be shorter than stale_after")
        if max_timeout <= 0:
            raise ValueError("max_timeout must be positive")
        self._client = AuthClient(mesh(service))
        self.cache = KeyCache(ttl=ttl, max_entries=max_entries)
        #: Every cache the invalidation log keeps in step: the key cache, and
        #: any other a caller adds (`sync_also`, e.g. a gateway's session tokens).
        self._caches: list[SyncedCache] = [self.cache]
        self.poll_interval = poll_interval
        self.stale_after = stale_after
        self.max_timeout = max_timeout  #: the longest one auth.validate_key call may take
        self.cursor: int | None = None  #: None until the first successful poll
        self.synced_at = float("-inf")
        self._background = Background()
        self._failing = False
        self.asked = 0  #: `auth.validate_key` calls made (answers not served from the cache)
        #: key hash -> the auth.validate_key call later callers of that key may join
        self._calls: dict[bytes, _Shared] = {}

    @property
    def trusted(self) -> bool:
        """True while the cache reflects every invalidation older than `stale_after`."""
        return self.cursor is not None and time.monotonic() - self.synced_at <= self.stale_after

    async def __aenter__(self) -> KeyValidator:
        try:
            await self.poll()
        except MeshError as exc:  # start anyway, untrusted: every call goes to auth
            log.warning("auth invalidations unavailable at start", error=exc.message)
        self._background.start(self._run(), name="key validator poll")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()

    async def pause_polling(self) -> None:
        """Poll auth's invalidations no more, holding this validator's view still:
        once `stale_after` passes it is not trusted and every call goes to auth."""
        await self._background.stop()

    async def validate(self, api_key: str, *, deadline: float | None = None) -> KeyIdentity:
        """The key's owner, key id, tier, limits and priority; `Unauthenticated` if refused.

        `deadline` (time.monotonic()) is when the caller stops waiting: `Timeout`
        then, or at once if it has passed and the answer is not in the cache.
        None means `max_timeout` from now."""
        if not looks_like_key(api_key):
            raise Unauthenticated("invalid API key")
        key_hash = hash_key(api_key)
        if self.trusted:
            entry = self.cache.get(key_hash)
            if entry is not None:
                return cast(KeyIdentity, entry.result)
        if deadline is None:
            deadline = time.monotonic() + self.max_timeout
        while True:
            now = time.monotonic()
            if deadline <= now:
                raise Timeout("the deadline passed before the API key could be validated")
            call = self._call_for(api_key, key_hash, now, min(deadline, now + self.max_timeout))
            # Waiting on the task, not awaiting it: one caller giving up does not cancel it for the others.
            done, _ = await asyncio.wait((call.task,), timeout=deadline - now)
            if not done:
                raise Timeout("the deadline passed while auth was validating the API key")
            try:
                return call.task.result()
            except Timeout:
                if call.deadline >= min(deadline, call.began + self.max_timeout) - 0.001:
                    raise  # it had all the time this caller would have given it
                # A call joined with a shorter budget ran out: ask again with the time left.

    def _call_for(self, api_key: str, key_hash: bytes, now: float, until: float) -> _Shared:
        """The shared call this caller may join (see the module doc), or a new one until `until`."""
        shared = self._calls.get(key_hash)
        if (
            shared is not None
            and now - shared.began <= self.stale_after
            and shared.epoch == self.cache.epoch
            and now < shared.deadline
            and shared.deadline >= until - self.stale_after
            and not shared.task.done()
        ):
            return shared
        task = asyncio.ensure_future(self._ask_auth(api_key, key_hash, until - now))
        shared = self._calls[key_hash] = _Shared(now, self.cache.epoch, until, task)
        task.add_done_callback(lambda done: self._call_done(key_hash, done))
        return shared

    def _call_done(self, key_hash: bytes, call: asyncio.Task[KeyIdentity]) -> None:
        shared = self._calls.get(key_hash)
        if shared is not None and shared.task is call:
            del self._calls[key_hash]
        if not call.cancelled():
            call.exception()  # retrieved: the callers that still wait get it anyway

    async def _ask_auth(self, api_key: str, key_hash: bytes, timeout: float) -> KeyIdentity:
        self.asked += 1
        epoch = self.cache.epoch
        result = await self._client.validate_key(api_key=api_key, timeout=timeout)
        cursor, answered = self.cursor, result.get("cursor")
        if (
            self.cache.epoch == epoch
            and cursor is not None
            and isinstance(answered, int)
            and answered >= cursor
        ):
            self.cache.put(key_hash, cast(dict[str, Any], result), user_id=result["user_id"],
                           key_id=result["key_id"], expires_at=result.get("expires_at"))
        return result

    async def poll(self) -> None:
        """Read the invalidation log from the cursor to its end; evict what it names."""
        while True:
            started = time.monotonic()
            if self.cursor is None:
                answer = await self._call_invalidations(None)
                self._clear()  # nothing cached yet can be vouched for
            else:
                answer = await self._call_invalidations(self.cursor)
                if answer["reset"]:
                    self._clear()
                for entry in answer["entries"]:
                    self._apply(entry["key_id"], entry["user_id"])
            self.cursor = answer["cursor"]
            if not answer["more"]:
                self.synced_at = started
                return

    def sync_also(self, cache: SyncedCache) -> None:
        """Keep `cache` in step with the invalidation log too (cleared now: it may be
        used only while `trusted`, like the key cache)."""
        cache.clear()
        self._caches.append(cache)

    def _apply(self, key_id: int | None, user_id: int | None) -> None:
        """One entry: evict what it names; naming nothing (a tier's limits changed), everything."""
        if key_id is None and user_id is None:
            self._clear()
            return
        for cache in self._caches:
            cache.evict(key_id=key_id, user_id=user_id)

    def _clear(self) -> None:
        for cache in self._caches:
            cache.clear()

    async def _call_invalidations(self, since: int | None) -> Invalidations:
        return await self._client.invalidations(since=since, timeout=min(self.max_timeout, self.stale_after))

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
