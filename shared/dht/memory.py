"""An in-process `Discovery`: the same interface and record rules, no network.

For tests of code above discovery (the mesh client, services) and for a
single-process deployment. Several `MemoryDiscovery` instances sharing one
`MemoryRegistry` see each other's records, as nodes of one DHT would.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.dht.interface import Provider
from shared.errors import NoProviders
from shared.identity import NodeIdentity

__all__ = ["MemoryRegistry", "MemoryDiscovery"]


@dataclass
class MemoryRegistry:
    """The shared table: topic -> node key -> (provider, expiry)."""

    topics: dict[str, dict[bytes, tuple[Provider, float]]] = field(default_factory=dict)

    def live(self, topic: str) -> list[Provider]:
        now = time.monotonic()
        records = self.topics.get(topic, {})
        for key in [k for k, (_, expiry) in records.items() if expiry <= now]:
            del records[key]
        return sorted((p for p, _ in records.values()), key=lambda p: p.node_key)


class MemoryDiscovery:
    """`Discovery` over a `MemoryRegistry`, announcing as one node identity."""

    def __init__(self, registry: MemoryRegistry, identity: NodeIdentity, *, ttl: float = 30.0) -> None:
        self._registry = registry
        self._identity = identity
        self._ttl = ttl

    async def announce(
        self,
        topic: str,
        *,
        service: str,
        endpoint: str,
        version: str,
        load: Mapping[str, Any] | None = None,
        ttl: float | None = None,
    ) -> None:
        ttl = self._ttl if ttl is None else ttl
        provider = Provider(
            topic=topic,
            service=service,
            endpoint=endpoint,
            node_key=self._identity.public_key,
            curve_key=self._identity.curve.public,
            version=version,
            seq=int(time.time() * 1000),
            ttl=ttl,
            load=dict(load or {}),
        )
        records = self._registry.topics.setdefault(topic, {})
        records[self._identity.public_key] = (provider, time.monotonic() + ttl)

    async def withdraw(self, topic: str) -> None:
        self._registry.topics.get(topic, {}).pop(self._identity.public_key, None)

    async def lookup(self, topic: str, *, timeout: float | None = None) -> list[Provider]:
        providers = self._registry.live(topic)
        if not providers:
            raise NoProviders(f"no live provider of {topic}", {"topic": topic})
        return providers

    def forget(self, topic: str) -> None:
        """Nothing is cached here."""
