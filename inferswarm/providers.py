"""The CLI's discovery: providers remembered across commands, the DHT only when needed.

A CLI command is a short process; joining the DHT for each one is slow and,
in a loop, a burden on the mesh. `CachedDiscovery` keeps the signed records
it found in a file (`ProviderFile`, one per mesh under the user's cache
directory) until each record's own expiry, and answers lookups from it. It
starts a DHT node -- once per process, only then -- when the file has no
live provider of a topic, or after `forget(topic)` (a provider failed), and
saves what that lookup found.

Nothing in the file is trusted: every blob is verified again on load (member
cert of this mesh, signature, expiry), so a tampered or stale record is never
used. The file is rewritten atomically under a lock (`flock`), so concurrent
CLIs neither lose each other's topics nor leave a torn file; one that cannot
be read counts as empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgpack
import structlog

from inferswarm.localmesh import atomic_write, cache_dir
from shared.dht import DHTConfig, Discovery, Provider, RecordVerifier, select_providers
from shared.dht.record import wall_ms
from shared.errors import NoProviders, Unavailable
from shared.identity import MeshId

__all__ = ["CachedDiscovery", "ProviderFile", "cache_path", "verifier_for"]

log = structlog.get_logger(__name__)

FORMAT = 1
MAX_TOPICS = 32  #: topics kept in the file (the least recently saved go first)
MAX_RECORDS = 16  #: records kept per topic (the newest)


def cache_path(mesh_id: MeshId, directory: Path | None = None) -> Path:
    """The provider file of one mesh: `$XDG_CACHE_HOME/inferswarm/providers-<mesh id>.msgpack`."""
    return (directory or cache_dir()) / f"providers-{mesh_id.mesh_id.hex()}.msgpack"


def verifier_for(mesh_id: MeshId, config: DHTConfig | None = None) -> RecordVerifier:
    """A verifier with the same limits as the mesh's DHT nodes."""
    config = config or DHTConfig()
    return RecordVerifier(mesh_id.mesh_id, max_size=config.max_record_size, max_ttl=config.max_ttl,
                          clock_skew=config.clock_skew)


def live(verifier: RecordVerifier, topic: str, blobs: list[bytes], now_ms: int | None = None) -> list[Provider]:
    """The providers among `blobs` that verify and have not reached their own expiry.

    Stricter than the verifier, which grants `clock_skew` past the expiry:
    a cached record is worth nothing once its provider would have refreshed it.
    """
    now_ms = wall_ms() if now_ms is None else now_ms
    return [p for p in select_providers(verifier, topic, blobs) if p.seq + p.ttl * 1000 > now_ms]


class ProviderFile:
    """Signed provider records per topic, in one msgpack file of at most `max_topics` topics.

    Layout: `{"v": 1, "topics": {topic: [saved_ms, [blob, ...]]}}`. Only
    records that verify and are live are ever written back.
    """

    def __init__(self, path: Path, verifier: RecordVerifier, *,
                 max_topics: int = MAX_TOPICS, max_records: int = MAX_RECORDS) -> None:
        self.path = path
        self.verifier = verifier
        self.max_topics = max_topics
        self.max_records = max_records
        self._lock_path = path.with_name(path.name + ".lock")

    def load(self) -> dict[str, list[Provider]]:
        """Every topic with at least one live, verified provider."""
        found = {}
        for topic, (_, blobs) in self._read().items():
            providers = live(self.verifier, topic, blobs)
            if providers:
                found[topic] = providers
        return found

    def save(self, topic: str, providers: list[Provider]) -> None:
        """Replace `topic`'s records with those of `providers` (a fresh lookup's)."""
        blobs = [p.record for p in sorted(providers, key=lambda p: p.seq, reverse=True) if p.record]
        with self._update() as entries:
            entries.pop(topic, None)
            if blobs:
                entries[topic] = (wall_ms(), blobs[: self.max_records])

    def drop(self, topic: str) -> None:
        """Forget `topic`'s records (its providers failed, or there are none)."""
        with self._update() as entries:
            entries.pop(topic, None)

    # -- the file -------------------------------------------------------------------

    def _limit(self) -> int:
        return self.max_topics * (self.max_records * (self.verifier.max_size + 8) + 1024) + 1024

    def _read(self) -> dict[str, tuple[int, list[bytes]]]:
        """The entries as written, unverified; {} when absent, unreadable or malformed."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read(self._limit() + 1)
        except OSError:
            return {}
        if len(data) > self._limit():
            return {}
        try:
            document = msgpack.unpackb(
                data, raw=False, strict_map_key=True, max_bin_len=self.verifier.max_size,
                max_str_len=1024, max_array_len=max(self.max_records, 2), max_map_len=max(self.max_topics, 2),
                max_ext_len=0,
            )
        except Exception:  # any decoding failure: a torn or foreign file
            return {}
        if not isinstance(document, dict) or document.get("v") != FORMAT:
            return {}
        if not isinstance(document.get("topics"), dict):
            return {}
        return {topic: entry for topic, entry in document["topics"].items() if _well_formed(entry)}

    @contextlib.contextmanager
    def _update(self) -> Iterator[dict[str, tuple[int, list[bytes]]]]:
        """Read, let the caller change, prune and write back, all under the file's lock."""
        with self._locked():
            entries = self._read()
            yield entries
            kept = {}
            for topic, (saved, blobs) in sorted(entries.items(), key=lambda item: item[1][0], reverse=True):
                alive = live(self.verifier, topic, blobs)
                if alive and len(kept) < self.max_topics:
                    kept[topic] = [saved, [p.record for p in alive][: self.max_records]]
            atomic_write(self.path, msgpack.packb({"v": FORMAT, "topics": kept}, use_bin_type=True))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _well_formed(entry: Any) -> bool:
    return (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int
            and isinstance(entry[1], list) and all(type(blob) is bytes for blob in entry[1]))


class CachedDiscovery:
    """Lookups for one CLI process: from the provider file, else through the DHT.

    `join` starts the DHT node and returns it; it is called at most once, on
    the first lookup the file cannot answer (its error is raised again by
    later lookups). `store` is None to keep providers in memory only.
    """

    def __init__(self, join: Callable[[], Awaitable[Discovery]], store: ProviderFile | None = None) -> None:
        self._join = join
        self._store = store
        self._known: dict[str, list[Provider]] | None = None  #: read from the file on first use
        self._stale: set[str] = set()  #: topics forgotten: the DHT must answer
        self._dht: Discovery | None = None
        self._join_failure: Exception | None = None
        self._joining = asyncio.Lock()

    @property
    def joined(self) -> bool:
        """True once this process started a DHT node (the file could not answer)."""
        return self._dht is not None

    async def lookup(self, topic: str, *, timeout: float | None = None) -> list[Provider]:
        """The live providers of `topic`; `NoProviders` when the DHT has none either."""
        if topic not in self._stale:
            providers = self._cached(topic)
            if providers:
                return providers
        dht = await self._node()
        try:
            providers = await dht.lookup(topic, timeout=timeout)
        except NoProviders:
            self._remember(topic, [])
            raise
        self._stale.discard(topic)
        self._remember(topic, providers)
        return providers

    def forget(self, topic: str) -> None:
        """A provider of `topic` failed: ask the DHT next time, and let other CLIs know."""
        self._stale.add(topic)
        if self._dht is not None:
            self._dht.forget(topic)
        self._remember(topic, [])

    async def announce(self, topic: str, *, service: str, endpoint: str, version: str,
                       load: Mapping[str, Any] | None = None, ttl: float | None = None) -> None:
        raise Unavailable("a CLI does not announce")

    async def withdraw(self, topic: str) -> None:
        raise Unavailable("a CLI does not announce")

    # -- helpers --------------------------------------------------------------------

    def _cached(self, topic: str) -> list[Provider]:
        if self._known is None:
            self._known = self._store.load() if self._store is not None else {}
        now_ms = wall_ms()
        return [p for p in self._known.get(topic, []) if p.seq + p.ttl * 1000 > now_ms]

    def _remember(self, topic: str, providers: list[Provider]) -> None:
        if self._known is None:
            self._known = {}
        self._known[topic] = providers
        if self._store is None:
            return
        try:
            self._store.save(topic, providers)
        except OSError as exc:  # a read-only or full disk costs a lookup next time, nothing more
            log.warning("provider cache not saved", path=str(self._store.path), error=str(exc))

    async def _node(self) -> Discovery:
        async with self._joining:  # concurrent lookups (e.g. `chat`) start one node
            if self._dht is None:
                if self._join_failure is not None:
                    raise self._join_failure
                try:
                    self._dht = await self._join()
                except Exception as exc:
                    self._join_failure = exc
                    raise
            return self._dht
