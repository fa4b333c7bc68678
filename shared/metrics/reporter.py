"""`MetricsReporter`: pushes a process's metrics to `metrics.record` every second.

    async def build(stack, node):
        metrics = Metrics()
        await stack.enter_async_context(MetricsReporter.for_node(node, metrics, service="gateway"))
        return [GatewayService(..., metrics=metrics)]

Guarantees:

* **Never blocks or fails the caller.** Recording is a dict update; pushing
  happens in a background task, and no error of the push reaches a service.
* **Counters are exact across retries.** Each batch carries this process's
  source id and a sequence number; a batch whose answer was lost is resent
  with the same number and the service applies it once. Deltas recorded
  while the service is away are merged into the one batch not yet sent, so an
  outage costs memory bounded by the series caps, not data.
* **Bounded.** At most `max_pending` batches wait; past that the oldest is
  dropped (counted in `dropped`). A batch the service refuses as invalid is
  dropped and logged, never retried.
* **A restart never makes a counter go backwards**: the service sums deltas,
  and a new process is a new source starting from zero deltas.

On exit the reporter makes one last push (within `timeout`) so a clean stop
loses nothing. Before each push it samples the process's own figures
(`process.py`: memory, file descriptors, CPU, GC, build info) and, given a
DHT node, its routing table size.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from shared.errors import Cancelled, MeshError, Timeout, Unavailable
from shared.logging import get_logger
from shared.metrics.batch import Batch, Source
from shared.metrics.families import DHT_PEERS, instance_id
from shared.metrics.process import ProcessSampler
from shared.metrics.registry import Metrics
from shared.tasks import Background

__all__ = ["MetricsReporter", "Sender"]

log = get_logger(__name__)

RECORD = "metrics.record"
_RETRY = (Unavailable, Timeout, Cancelled)


class Sender(Protocol):
    """Whatever delivers one call to the metrics service: `node.mesh("metrics")`."""

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   timeout: float | None = None, idempotent: bool = False) -> Any: ...


@dataclass(slots=True)
class _Pending:
    batch: Batch
    seq: int | None = None  #: given at the first attempt; kept for every retry


class MetricsReporter:
    """Drains a `Metrics` registry every `interval` seconds and pushes the batch."""

    def __init__(
        self, metrics: Metrics, sender: Sender, *, service: str, instance: str,
        interval: float = 1.0, timeout: float = 2.0, max_pending: int = 60,
        peers: Any = None,
    ) -> None:
        self.metrics = metrics
        self._sender = sender
        self.source = Source(service, instance, secrets.token_hex(8))
        self.interval = interval
        self.timeout = timeout
        self._pending: deque[_Pending] = deque()
        self._max_pending = max(max_pending, 1)
        self._seq = 0
        self._peers = peers  # a KademliaDiscovery, whose routing table size is reported
        self._process = ProcessSampler(metrics, service=service, instance=instance)
        self._background = Background()
        self._lock = asyncio.Lock()
        self.sent = 0  #: batches the service acknowledged
        self.dropped = 0  #: batches dropped: over `max_pending`, or refused as invalid

    @classmethod
    def for_node(cls, node: Any, metrics: Metrics, *, service: str, **options: Any) -> MetricsReporter:
        """The reporter of a runner's `MeshNode`: pushes over `node.mesh`, reports its DHT peers."""
        return cls(metrics, node.mesh("metrics"), service=service,
                   instance=instance_id(node.identity.public_key), peers=node.discovery, **options)

    async def __aenter__(self) -> MetricsReporter:
        self._background.start(self._run(), name=f"metrics-reporter {self.source.service}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()
        try:
            async with asyncio.timeout(self.timeout):
                await self.flush()
        except Exception:  # a timeout included: exiting must not wait on the mesh
            log.info("metrics not pushed at exit", pending=len(self._pending))

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> bool:
        """Drain the registry and push every waiting batch, oldest first; True when none is left."""
        async with self._lock:
            self._collect()
            while self._pending:
                if not await self._send(self._pending[0]):
                    return False
                self._pending.popleft()
            return True

    def _collect(self) -> None:
        self._report_peers()
        self._process.sample()
        batch = self.metrics.drain()
        if not batch.counters and not batch.histograms and not batch.folded and not batch.gauges:
            return
        tail = self._pending[-1] if self._pending else None
        if tail is not None and tail.seq is None:
            tail.batch.merge(batch)  # never sent: it can still grow, exactly once
            return
        self._pending.append(_Pending(batch))
        while len(self._pending) > self._max_pending:
            self._pending.popleft()
            self.dropped += 1
            log.warning("metrics batch dropped: the buffer is full", source=self.source.id)

    async def _send(self, item: _Pending) -> bool:
        if item.seq is None:
            self._seq += 1
            item.seq = self._seq
        wire = item.batch.to_wire(self.source, item.seq)
        try:
            await self._sender.call(RECORD, {"batch": wire}, timeout=self.timeout, idempotent=True)
        except _RETRY as exc:
            log.debug("metrics service unavailable; will retry", error=exc.message)
            return False
        except MeshError as exc:
            self.dropped += 1
            log.warning("metrics batch refused; dropped", code=exc.code, error=exc.message)
            return True
        self.sent += 1
        return True

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
