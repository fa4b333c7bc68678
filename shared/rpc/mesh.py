"""The mesh client: call a service by name, wherever its providers are.

`mesh("auth").call("auth.validate_key", {...})` looks the service's topic up
through discovery, picks a provider by its reported load (power of two
choices, counting this client's own in-flight calls too) or, given an
`affinity`, the caller's own provider ("Affinity" below), reuses one kept-open
connection per provider, and when a provider fails:

* a request that provably never reached it (`retry_safe`) is retried on
  another provider, whatever the method;
* a request that may have run is retried only when the call is marked
  `idempotent=True`;
* the provider is put in a short cooldown so the next picks avoid it, and
  discovery is told to `forget` the topic, so the retry looks it up afresh
  (a provider restarted on another endpoint is found at once).

Lookups spend the call's own deadline: a call with 60 s left never fails
because discovery had a budget of its own, and one with 50 ms left never
waits a second on a crawl.

**Affinity.** A call may pass `affinity` (bytes standing for its caller, e.g.
a digest of an API key: the gateway's callers do, services/gateway/client.py)
so that one caller's calls go to one provider, which then holds that caller's
state alone (the gateway's quota leases). The choice is rendezvous hashing:
of the providers neither tried nor cooling down, the one whose
`blake2b(affinity + node_key)` is highest. It is the same for a caller while
the set of providers is, a provider that leaves moves only its own callers,
and one that joins takes about 1/N of them. The failover above excludes what
it tried, so a failed call goes to the caller's next-highest provider, the
same one for every call of that caller. Bounded load: when the chosen
provider's load is more than `AFFINITY_LOAD_FACTOR` times the mean of the
other candidates' plus `AFFINITY_LOAD_SLACK` (both count this client's own
calls in flight), the call is placed by the power of two choices instead, so
a hot caller cannot swamp its provider while others idle. The mean is the
*others'*, not all candidates': with two providers and every call on one,
the mean of all is half its load and twice that never exceeds it. The
affinity is a local choice: nothing of it is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog
import zmq.asyncio

from shared.dht.interface import Discovery, Provider, service_topic
from shared.errors import NoProviders, Timeout, Unauthenticated, Unavailable
from shared.identity import CurveKeyPair
from shared.rpc.client import Connection, Stream

__all__ = ["AFFINITY_LOAD_FACTOR", "AFFINITY_LOAD_SLACK", "MeshClient", "ServiceClient", "rendezvous"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: An affine provider is passed over when its load is above this times the other candidates' mean ...
AFFINITY_LOAD_FACTOR = 2.0
#: ... plus this many calls in flight. Moving a caller has a cost (a gateway: a new lease, a
#: transaction), and the reported part of a load is as old as the provider's last record (up to
#: a third of its TTL): a small slack would move a provider's callers for that long on one burst.
#: 32 is half of what keeps a gateway's core busy (services/gateway/README.md, "Benchmark").
AFFINITY_LOAD_SLACK = 32.0


def rendezvous(providers: Sequence[Provider], affinity: bytes) -> Provider:
    """The provider of highest random weight for `affinity` (rendezvous hashing): the
    `blake2b(affinity + node_key)` digest that is highest. `providers` must not be empty."""
    return max(providers, key=lambda p: hashlib.blake2b(affinity + p.node_key, digest_size=8).digest())


class MeshClient:
    """Pooled connections to mesh providers, found through a `Discovery`."""

    def __init__(
        self,
        discovery: Discovery,
        client_keys: CurveKeyPair,
        *,
        default_timeout: float = 10.0,
        max_message_bytes: int = 1 << 20,
        connect_timeout: float = 3.0,
        cooldown: float = 5.0,
        attempts: int = 3,
    ) -> None:
        self.discovery = discovery
        self._client_keys = client_keys
        self.default_timeout = default_timeout
        self._max = max_message_bytes
        self._connect_timeout = connect_timeout
        self._cooldown = cooldown
        self.attempts = attempts
        self._ctx = zmq.asyncio.Context()
        self._connections: dict[tuple[str, bytes], Connection] = {}
        #: Every connection opened and not yet closed, in the pool or not, so
        #: that closing the client closes each properly (its tasks too).
        self._open: set[Connection] = set()
        self._closing = False
        self._cooling: dict[bytes, float] = {}

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True  # from now on connect() refuses: nothing new can leak
        self._connections = {}
        while self._open:
            batch, self._open = list(self._open), set()
            await asyncio.gather(*(connection.close() for connection in batch))
        self._ctx.destroy(linger=0)

    @property
    def context(self) -> zmq.asyncio.Context:
        """The ZeroMQ context of this client's connections (for a connection made beside them)."""
        return self._ctx

    def __call__(self, service: str) -> ServiceClient:
        """The client for a service by name, e.g. `mesh("auth")`."""
        return ServiceClient(self, service_topic(service))

    def topic(self, topic: str) -> ServiceClient:
        """The client for any topic, e.g. a model's `inferswarm/model/<model>`."""
        return ServiceClient(self, topic)

    def connect(self, endpoint: str, server_key: bytes) -> Connection:
        """The kept-open connection to one endpoint (opened on first use)."""
        if self._closing:
            raise Unavailable("the mesh client is closed", {"retry_safe": True})
        key = (endpoint, server_key)
        connection = self._connections.get(key)
        if connection is None or connection.closed:
            connection = Connection(
                endpoint, server_key, self._client_keys, context=self._ctx,
                max_message_bytes=self._max, connect_timeout=self._connect_timeout,
            )
            connection.open()
            self._connections[key] = connection
            self._open.add(connection)
        return connection

    def connection(self, provider: Provider) -> Connection:
        return self.connect(provider.endpoint, provider.curve_key)

    def cool_down(self, provider: Provider) -> None:
        """Avoid `provider` for a while; drop its connection if it is idle."""
        self._cooling[provider.node_key] = time.monotonic() + self._cooldown
        key = (provider.endpoint, provider.curve_key)
        connection = self._connections.get(key)
        if connection is not None and connection.in_flight == 0:
            del self._connections[key]
            if not connection.closed:
                asyncio.get_running_loop().create_task(self._close(connection))

    async def _close(self, connection: Connection) -> None:
        await connection.close()
        self._open.discard(connection)

    def is_cooling(self, provider: Provider) -> bool:
        until = self._cooling.get(provider.node_key)
        if until is None:
            return False
        if until < time.monotonic():
            del self._cooling[provider.node_key]
            return False
        return True

    def load_of(self, provider: Provider) -> float:
        """Lower is better: what the provider reports plus our own calls to it."""
        reported = provider.load.get("in_flight", 0) if provider.load else 0
        connection = self._connections.get((provider.endpoint, provider.curve_key))
        mine = connection.in_flight if connection is not None else 0
        return float(reported if isinstance(reported, (int, float)) else 0) + mine


def _is_answer(exc: Exception) -> bool:
    """An UNAUTHENTICATED sent by the method (a refused API key or token) is its
    answer, not a provider failure: only the transport's own refusal of our
    CURVE key (marked `retry_safe`) should cool the provider down and fail over."""
    return isinstance(exc, Unauthenticated) and not exc.data.get("retry_safe")


class ServiceClient:
    """Calls to whichever provider of one topic is best right now."""

    def __init__(self, mesh: MeshClient, topic: str) -> None:
        self._mesh = mesh
        self.topic = topic

    async def providers(self, timeout: float | None = None) -> list[Provider]:
        return await self._mesh.discovery.lookup(self.topic, timeout=timeout)

    async def pick(
        self, exclude: set[tuple[bytes, str]] | frozenset[tuple[bytes, str]] = frozenset(),
        timeout: float | None = None, affinity: bytes | None = None,
    ) -> Provider:
        """Choose a provider among those not cooling down: the affine one (module doc,
        "Affinity") when `affinity` is given and it is not overloaded, else by the power
        of two choices.

        `exclude` holds `(node_key, endpoint)` pairs already tried: the same
        node found again at another endpoint (it restarted) is a new choice.
        """
        providers = [p for p in await self.providers(timeout) if (p.node_key, p.endpoint) not in exclude]
        if not providers:
            raise NoProviders(f"no other provider of {self.topic}", {"topic": self.topic})
        healthy = [p for p in providers if not self._mesh.is_cooling(p)] or providers
        if len(healthy) == 1:
            return healthy[0]
        if affinity is not None:
            chosen = rendezvous(healthy, affinity)
            if not self._overloaded(chosen, healthy):
                return chosen
        a, b = random.sample(healthy, 2)
        return a if self._mesh.load_of(a) <= self._mesh.load_of(b) else b

    def _overloaded(self, chosen: Provider, candidates: list[Provider]) -> bool:
        """The bounded-load rule of the module doc ("Affinity")."""
        others = [self._mesh.load_of(p) for p in candidates if p is not chosen]
        mean = sum(others) / len(others)
        return self._mesh.load_of(chosen) > AFFINITY_LOAD_FACTOR * mean + AFFINITY_LOAD_SLACK

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *,
        timeout: float | None = None, idempotent: bool = False, affinity: bytes | None = None,
    ) -> Any:
        """Call `method` on a provider (chosen by `affinity` if given), failing over as the
        module doc says."""
        async def attempt(connection: Connection, remaining: float) -> Any:
            return await connection.call(method, params, timeout=remaining)

        return await self._with_failover(method, attempt, timeout, idempotent, affinity)

    async def stream(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float | None = None,
        affinity: bytes | None = None,
    ) -> Stream:
        """Start a stream on a provider (chosen by `affinity` if given); only a start that
        never ran is retried."""
        async def attempt(connection: Connection, remaining: float) -> Stream:
            return await connection.stream(method, params, timeout=remaining)

        return await self._with_failover(method, attempt, timeout, False, affinity)

    async def _with_failover(
        self, method: str, attempt: Callable[[Connection, float], Awaitable[T]],
        timeout: float | None, idempotent: bool, affinity: bytes | None,
    ) -> T:
        deadline = time.monotonic() + (self._mesh.default_timeout if timeout is None else timeout)
        tried: set[tuple[bytes, str]] = set()
        for number in range(1, self._mesh.attempts + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"no time left to call {method}", {"topic": self.topic})
            provider = await self.pick(tried, timeout=left, affinity=affinity)
            try:
                return await attempt(self._mesh.connection(provider), deadline - time.monotonic())
            except (Unavailable, Unauthenticated) as exc:
                if _is_answer(exc):
                    raise
                self._on_failure(provider, exc)
                tried.add((provider.node_key, provider.endpoint))
                retry = exc.data.get("retry_safe") or idempotent
                if not retry or number == self._mesh.attempts or time.monotonic() >= deadline:
                    raise
                log.info("retrying on another provider", method=method, error=exc.message)
        raise AssertionError("unreachable")

    def _on_failure(self, provider: Provider, exc: Exception) -> None:
        log.warning("provider failed", topic=self.topic, endpoint=provider.endpoint, error=str(exc))
        self._mesh.cool_down(provider)
        self._mesh.discovery.forget(self.topic)
