"""What a DHT node stores for others: every provider record of each topic.

kademlia's `ForgetfulStorage` keeps one value per key for a week; a topic
needs one record *per announcing node*, living seconds. So this store keys
records by (topic key, node key) and applies these rules:

* a record is accepted only with a seq greater than the one stored (or
  tombstoned) for that node; the very same blob again is a harmless no-op;
* a live record expires at receive time + its lifetime (monotonic clock);
* a withdrawal (ttl 0) deletes the node's record and leaves a *tombstone*
  (its seq and signed blob) for `tombstone_ttl`, so an older record cannot be
  replayed back in, and lookups can tell a peer that missed the withdrawal;
* storage is bounded: `max_topics` keys, `max_records` entries per key
  (tombstones included). When full, expired entries go first, then the
  tombstone closest to expiry; otherwise the new record is refused.

It deliberately does not implement kademlia's `IStorage`, whose contract is
one value per key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.dht.record import Record

__all__ = ["RecordStore"]


@dataclass(slots=True)
class _Entry:
    seq: int
    blob: bytes
    expires_at: float
    withdrawn: bool


class RecordStore:
    """Bounded, expiring storage of signed records, one per node per topic."""

    def __init__(
        self,
        *,
        max_topics: int = 4096,
        max_records: int = 64,
        tombstone_ttl: float = 305.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_topics = max_topics
        self.max_records = max_records
        self.tombstone_ttl = tombstone_ttl
        self._clock = clock
        self._topics: dict[bytes, dict[bytes, _Entry]] = {}

    def __len__(self) -> int:
        return len(self._topics)

    def put(self, key: bytes, record: Record, lifetime: float) -> bool:
        """Store a verified `record` under `key` for `lifetime` seconds.

        True when stored (or already held as the same blob), False when
        refused: stale or replayed seq, equivocation, or storage full.
        """
        now = self._clock()
        entries = self._entries_for(key, now)
        if entries is None:
            return False
        current = entries.get(record.node_key)
        if current is not None and record.seq <= current.seq:
            return record.seq == current.seq and record.blob == current.blob
        if current is None and not self._make_room(entries, now):
            return False
        if record.withdrawn:
            entries[record.node_key] = _Entry(record.seq, record.blob, now + self.tombstone_ttl, True)
        else:
            entries[record.node_key] = _Entry(record.seq, record.blob, now + lifetime, False)
        return True

    def get(self, key: bytes) -> list[bytes]:
        """Blobs stored under `key`, tombstones included, newest first."""
        entries = self._topics.get(key)
        if entries is None:
            return []
        self._purge(key, entries, self._clock())
        ordered = sorted(entries.values(), key=lambda entry: entry.seq, reverse=True)
        return [entry.blob for entry in ordered]

    def live_count(self, key: bytes) -> int:
        """How many live (not withdrawn, not expired) records `key` holds."""
        now = self._clock()
        entries = self._topics.get(key, {})
        return sum(1 for e in entries.values() if not e.withdrawn and e.expires_at > now)

    def expire(self) -> int:
        """Drop every expired entry and empty topic; returns entries dropped."""
        now = self._clock()
        dropped = 0
        for key, entries in list(self._topics.items()):
            dropped += self._purge(key, entries, now)
        return dropped

    def _entries_for(self, key: bytes, now: float) -> dict[bytes, _Entry] | None:
        entries = self._topics.get(key)
        if entries is not None:
            self._purge(key, entries, now)
            # _purge may have dropped an emptied topic; put it back.
            return self._topics.setdefault(key, entries)
        if len(self._topics) >= self.max_topics:
            self.expire()
            if len(self._topics) >= self.max_topics:
                return None
        return self._topics.setdefault(key, {})

    def _purge(self, key: bytes, entries: dict[bytes, _Entry], now: float) -> int:
        expired = [node for node, entry in entries.items() if entry.expires_at <= now]
        for node in expired:
            del entries[node]
        if not entries:
            self._topics.pop(key, None)
        return len(expired)

    def _make_room(self, entries: dict[bytes, _Entry], now: float) -> bool:
        if len(entries) < self.max_records:
            return True
        tombstones = [(e.expires_at, node) for node, e in entries.items() if e.withdrawn]
        if not tombstones:
            return False
        del entries[min(tombstones)[1]]
        return True
