"""The discovery interface: what the RPC layer and services need of a DHT.

Any implementation (the Kademlia one in this package, or another DHT) provides
`announce`, `withdraw` and `lookup` with these semantics:

* `announce` publishes a signed record "this node serves `topic` at `endpoint`,
  with this load" that lives `ttl` seconds unless announced again. A topic
  holds one record per node, so every live provider is returned by `lookup`.
* `withdraw` publishes a tombstone (TTL 0): the node's record disappears at once.
* `lookup` returns every live, verified provider of a topic, or raises
  `NoProviders` -- never an empty list. With `timeout`, it takes at most that
  many seconds and returns what it found by then (`Timeout` if nothing).
* `forget` drops whatever the implementation cached for a topic, so that a
  caller who found a provider dead gets a fresh answer next time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Provider", "Discovery", "service_topic", "model_topic"]


def service_topic(service: str) -> str:
    """The topic a service announces on, e.g. `inferswarm/auth/v1`."""
    return f"inferswarm/{service}/v1"


def model_topic(model: str) -> str:
    """The topic inference workers serving `model` announce on, e.g. `inferswarm/model/llama3`.

    Models have a namespace of their own: no model name can collide with a
    service topic (a model called "v1" once shared `inferswarm/inference/v1`).
    """
    return f"inferswarm/model/{model}"


@dataclass(frozen=True, slots=True)
class Provider:
    """One live, verified record of a topic."""

    topic: str
    service: str
    endpoint: str  #: ZeroMQ endpoint, e.g. "tcp://127.0.0.1:5555"
    node_key: bytes  #: raw Ed25519 public key of the announcing node
    curve_key: bytes  #: Z85 CurveZMQ server key, derived from node_key
    version: str
    seq: int  #: wall-clock milliseconds when the record was signed
    ttl: float  #: seconds the record lives unless refreshed
    load: Mapping[str, Any] = field(default_factory=dict)
    #: The signed record it came from (empty from `MemoryDiscovery`): a client
    #: may keep it and verify it again later, e.g. the CLI's provider cache.
    record: bytes = field(default=b"", repr=False, compare=False)

    @property
    def node_hex(self) -> str:
        return self.node_key.hex()


@runtime_checkable
class Discovery(Protocol):
    """Announce, withdraw and look up providers of topics."""

    async def announce(
        self,
        topic: str,
        *,
        service: str,
        endpoint: str,
        version: str,
        load: Mapping[str, Any] | None = None,
        ttl: float | None = None,
    ) -> None: ...

    async def withdraw(self, topic: str) -> None: ...

    async def lookup(self, topic: str, *, timeout: float | None = None) -> list[Provider]: ...

    def forget(self, topic: str) -> None:
        """A provider of `topic` failed: the next lookup must not answer from a cache."""
        ...
