"""`MetricsReporter`: pushes a process's metrics to every metrics service, every second.

    async def build(stack, node):
        metrics = Metrics()
        await stack.enter_async_context(MetricsReporter.for_node(node, metrics, service="gateway"))
        return [GatewayService(..., metrics=metrics)]

Each round the reporter looks the metrics services up (a `Directory`; over
the mesh, `MeshDirectory`: the DHT lookup is cached for a second) and pushes
to each one found, concurrently. A push carries cumulative values since the
process started (shared/metrics/batch.py). Per destination the reporter
remembers the generation of the registry its last acknowledged push covered:
the first push to a destination, and the first after any failed one, is a
`full` snapshot; otherwise only the series changed since. A destination that
answers `unknown` (it restarted, and a partial push means nothing to it) gets
a full snapshot in the next round; one that answers `retired` (it gave this
process up after a long silence) is asked again, with a full snapshot, a
minute later.

Guarantees:

* **Never blocks or fails the caller.** Recording is a dict update; pushing
  happens in a background task, and no error of a push reaches a service.
* **Every metrics service that heard this process's latest push holds its
  exact totals.** Values are cumulative, a destination is brought up to date
  by a full snapshot whenever it may have missed something, and a push that
  arrives late (a seq not above the last applied) is ignored by the service,
  so retries, lost answers and restarts of either side never count twice.
* **One dead destination never delays the others by more than `timeout`**:
  pushes of a round run concurrently, each bounded by `timeout`; a
  destination is forgotten once the directory stops listing it.
* **Bounded.** Nothing is queued: the registry holds one value per series
  (bounded by its series caps) and the reporter one small record per listed
  destination, at most `max_destinations` of them.

On exit the reporter makes one last round (within twice `timeout`: a lookup,
then the pushes) so a clean stop loses nothing. Before each round it samples
the process's own figures (`process.py`: memory, file descriptors, CPU, GC,
build info) and, given a DHT node, its routing table size.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from shared.errors import Cancelled, MeshError, NoProviders, Timeout, Unavailable
from shared.logging import get_logger
from shared.metrics.batch import Source
from shared.metrics.families import DHT_PEERS, instance_id
from shared.metrics.process import ProcessSampler
from shared.metrics.registry import Metrics
from shared.tasks import Background

__all__ = ["Directory", "MeshDirectory", "MetricsReporter", "OneDestination", "Sender"]

log = get_logger(__name__)

RECORD = "metrics.record"
_UNREACHABLE = (Unavailable, Timeout, Cancelled, TimeoutError)
_ASK_RETIRED_AGAIN = 60.0  #: seconds before a service that retired this source gets a full push again


class Sender(Protocol):
    """Whatever delivers one call to one metrics service (a mesh `Connection`, a local service)."""

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   timeout: float = 10.0) -> Any: ...


class Directory(Protocol):
    """The metrics services to push to now, each under a key that stays the same while it lives."""

    async def destinations(self, timeout: float) -> dict[Hashable, Sender]: ...


class OneDestination:
    """A `Directory` of a single, fixed sender."""

    def __init__(self, sender: Sender) -> None:
        self._sender = sender

    async def destinations(self, timeout: float) -> dict[Hashable, Sender]:
        return {"only": self._sender}


class MeshDirectory:
    """Every provider of the `metrics` topic found on the DHT, keyed by (node key, endpoint).

    `local`, with `own_key`: the metrics process's own service, called
    directly; its announced record (the same node key) is skipped."""

    def __init__(self, mesh: Any, *, local: Sender | None = None, own_key: bytes | None = None) -> None:
        self._mesh = mesh
        self._topic = mesh("metrics")
        self._local = local
        self._own_key = own_key

    async def destinations(self, timeout: float) -> dict[Hashable, Sender]:
        found: dict[Hashable, Sender] = {} if self._local is None else {"local": self._local}
        try:
            providers = await self._topic.providers(timeout)
        except (NoProviders, Timeout, Unavailable):
            providers = []
        for provider in providers:
            if provider.node_key != self._own_key:
                found[(provider.node_key, provider.endpoint)] = _ProviderSender(self._mesh, provider)
        return found


class _ProviderSender:
    """One provider over the mesh's kept-open connection; a failure makes the next lookup fresh."""

    def __init__(self, mesh: Any, provider: Any) -> None:
        self._mesh = mesh
        self._provider = provider

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   timeout: float = 10.0) -> Any:
        try:
            return await self._mesh.connection(self._provider).call(method, params, timeout=timeout)
        except _UNREACHABLE:
            self._mesh.cool_down(self._provider)  # closes its idle connection
            self._mesh.discovery.forget(self._provider.topic)
            raise


@dataclass(slots=True)
class _Destination:
    sender: Sender
    #: generation of the registry the last acknowledged push covered; None: send a full snapshot
    since: int | None = None
    #: when the service said it retired this source (pushing more would not count); None: it did not
    retired_at: float | None = None

    def due(self, now: float) -> bool:
        """Not retired there, or retired long enough ago to ask again (the service may have restarted)."""
        return self.retired_at is None or now - self.retired_at >= _ASK_RETIRED_AGAIN


class MetricsReporter:
    """Takes a snapshot of a `Metrics` registry every `interval` seconds and pushes it everywhere."""

    def __init__(
        self, metrics: Metrics, directory: Directory, *, service: str, instance: str,
        interval: float = 1.0, timeout: float = 2.0, max_destinations: int = 16, peers: Any = None,
    ) -> None:
        self.metrics = metrics
        self._directory = directory
        self.source = Source(service, instance, secrets.token_hex(8))
        self.interval = interval
        self.timeout = timeout
        self.max_destinations = max(max_destinations, 1)
        self._destinations: dict[Hashable, _Destination] = {}
        self._seq = 0
        self._peers = peers  # a KademliaDiscovery, whose routing table size is reported
        self._process = ProcessSampler(metrics, service=service, instance=instance)
        self._background = Background()
        self._lock = asyncio.Lock()
        self.sent = 0  #: pushes a service acknowledged
        self.failed = 0  #: pushes not acknowledged (unreachable, timed out, refused, `unknown`): a full one follows
        self.dropped = 0  #: pushes refused as invalid (a bug: logged)

    @classmethod
    def for_node(cls, node: Any, metrics: Metrics, *, service: str, **options: Any) -> MetricsReporter:
        """The reporter of a runner's `MeshNode`: pushes to every metrics service over `node.mesh`,
        reports its DHT peers."""
        return cls(metrics, MeshDirectory(node.mesh), service=service,
                   instance=instance_id(node.identity.public_key), peers=node.discovery, **options)

    async def __aenter__(self) -> MetricsReporter:
        self._background.start(self._run(), name=f"metrics-reporter {self.source.service}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()
        try:
            async with asyncio.timeout(2 * self.timeout):
                await self.flush()
        except Exception:  # a timeout included: exiting must not wait on the mesh
            log.info("metrics not pushed at exit", destinations=len(self._destinations))

    @property
    def destinations(self) -> int:
        """Metrics services listed at the last round."""
        return len(self._destinations)

    @property
    def behind(self) -> int:
        """Listed destinations whose last push failed (or that none reached yet)."""
        return sum(1 for d in self._destinations.values() if d.since is None and d.retired_at is None)

    async def flush(self) -> bool:
        """One round: look the services up and push to each; True when every one listed
        acknowledged (False when none is listed)."""
        async with self._lock:
            self._report_peers()
            self._process.sample()
            found = await self._directory.destinations(self.timeout)
            keys = sorted(found, key=repr)[: self.max_destinations]
            old = self._destinations
            self._destinations = {k: old.get(k) or _Destination(found[k]) for k in keys}
            for key in keys:
                self._destinations[key].sender = found[key]  # the freshest way to reach it
            now = time.monotonic()
            live = [d for d in self._destinations.values() if d.due(now)]
            if not live:
                return False
            self._seq += 1
            done = await asyncio.gather(*(self._push(d, self._seq) for d in live))
            return all(done)

    async def _push(self, destination: _Destination, seq: int) -> bool:
        generation, batch = self.metrics.snapshot(destination.since)
        wire = batch.to_wire(self.source, seq)
        try:
            async with asyncio.timeout(self.timeout):
                answer = await destination.sender.call(RECORD, {"batch": wire}, timeout=self.timeout)
        except _UNREACHABLE as exc:
            log.debug("metrics service unavailable; a full snapshot follows", error=str(exc))
            return self._failed(destination)
        except MeshError as exc:
            self.dropped += 1
            log.warning("metrics push refused", code=exc.code, error=exc.message)
            return self._failed(destination)
        result = answer.get("result") if isinstance(answer, dict) else None
        if result in ("ok", "duplicate"):  # duplicate: it already holds a later push of ours
            destination.since, destination.retired_at = generation, None
            self.sent += 1
            return True
        if result == "retired":
            if destination.retired_at is None:
                log.warning("a metrics service retired this process's figures; asking again in a minute",
                            source=self.source.id)
            destination.since, destination.retired_at = None, time.monotonic()
            return False
        return self._failed(destination)  # "unknown": it restarted, or never had a full snapshot

    def _failed(self, destination: _Destination) -> bool:
        destination.since = None
        self.failed += 1
        return False

    def _report_peers(self) -> None:
        count = _peer_count(self._peers)
        if count is not None:
            self.metrics.gauge(DHT_PEERS).set(count, service=self.source.service,
                                              instance=self.source.instance)

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.interval
            try:
                await self.flush()
            except Exception:  # a bug must not end the loop, nor reach the service
                log.exception("metrics push failed")
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - self.interval)


def _peer_count(discovery: Any) -> int | None:
    """Contacts in a Kademlia node's routing table, or None when it has none to show."""
    try:
        buckets = discovery.server.protocol.router.buckets
        return sum(len(bucket) for bucket in buckets)
    except (AttributeError, TypeError):
        return None
