"""The validated-key cache, shared by the auth service and gateways' `KeyValidator`.

Entries are keyed by the key's SHA-256 and indexed by key id and user id, so an
invalidation ("key 7 revoked", "user 3's tier changed") evicts exactly the
entries it concerns. An entry stops being served when the key expires or when
it is older than `ttl`, whichever comes first.

`epoch` counts evictions. A caller that read the truth from elsewhere (the
database, or auth over RPC) stores it only if no eviction happened while it
was reading: otherwise an invalidation that arrived mid-read would be undone
by a stale answer stored after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

__all__ = ["CachedKey", "KeyCache"]


@dataclass(slots=True)
class CachedKey:
    """One validated key: the answer to give, and when to stop giving it."""

    result: dict[str, Any]
    user_id: int
    key_id: int
    expires_at: float | None  #: the key's own expiry, epoch seconds
    #: time.monotonic() after which it is not served: the earlier of the
    #: cache's ttl and the key's expiry, so `get` reads one clock once.
    valid_until: float


class KeyCache:
    """Bounded map of key hash -> validated key, with eviction by key and user."""

    def __init__(self, *, ttl: float = 300.0, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.epoch = 0
        self._entries: dict[bytes, CachedKey] = {}
        self._by_key: dict[int, bytes] = {}
        self._by_user: dict[int, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CachedKey]:
        """The cached answers now, oldest insertion first."""
        return list(self._entries.values())

    def get(self, key_hash: bytes) -> CachedKey | None:
        """The live entry for `key_hash`, or None (dropping a dead one)."""
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        if time.monotonic() >= entry.valid_until:
            self._drop(key_hash)
            return None
        return entry

    def put(
        self, key_hash: bytes, result: dict[str, Any], *, user_id: int, key_id: int,
        expires_at: float | None,
    ) -> None:
        if key_hash not in self._entries and len(self._entries) >= self.max_entries:
            self._drop(next(iter(self._entries)))  # the oldest insertion
        now = time.monotonic()
        valid_until = now + self.ttl
        if expires_at is not None:
            valid_until = min(valid_until, now + (expires_at - time.time()))
        self._entries[key_hash] = CachedKey(result, user_id, key_id, expires_at, valid_until)
        self._by_key[key_id] = key_hash
        self._by_user.setdefault(user_id, set()).add(key_hash)

    def evict(self, *, key_id: int | None = None, user_id: int | None = None) -> int:
        """Drop the entries of a key and/or of every key of a user; count them."""
        self.epoch += 1
        dropped = 0
        if key_id is not None:
            key_hash = self._by_key.get(key_id)
            if key_hash is not None:
                dropped += self._drop(key_hash)
        if user_id is not None:
            for key_hash in list(self._by_user.get(user_id, ())):
                dropped += self._drop(key_hash)
        return dropped

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()
        self._by_key.clear()
        self._by_user.clear()

    def _drop(self, key_hash: bytes) -> int:
        entry = self._entries.pop(key_hash, None)
        if entry is None:
            return 0
        self._by_key.pop(entry.key_id, None)
        hashes = self._by_user.get(entry.user_id)
        if hashes is not None:
            hashes.discard(key_hash)
            if not hashes:
                del self._by_user[entry.user_id]
        return 1
