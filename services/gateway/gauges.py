"""The gateway's operational figures as metrics, sampled once a second.

`gateway.health` shows them to whoever asks; this puts the same numbers on
the process's registry, so the metrics service (and Prometheus) sees them
without polling every gateway:

* `inferswarm_gateway_usage_unshipped`: usage records journaled, not yet
  shipped to auth (the journal's `unshipped`);
* `inferswarm_gateway_dispatch_waiting`, `..._dispatch_in_flight`: the
  dispatch's queue and its slots in use toward workers;
* `inferswarm_gateway_worker_retries_total`, `..._streams_cut_total`: the
  relay's counts since start, recorded as their growth since the last sample.

Sampling reads a few attributes; nothing here is on a request's path.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from shared.logging import get_logger
from shared.metrics import Metrics
from shared.metrics.families import (
    GATEWAY_DISPATCH_IN_FLIGHT,
    GATEWAY_DISPATCH_WAITING,
    GATEWAY_STREAMS_CUT,
    GATEWAY_USAGE_UNSHIPPED,
    GATEWAY_WORKER_RETRIES,
)
from shared.tasks import Background

__all__ = ["GatewayGauges"]

log = get_logger(__name__)


class _Journal(Protocol):
    @property
    def unshipped(self) -> int: ...


class _Dispatch(Protocol):
    waiting: int
    in_flight: int


class _Relay(Protocol):
    retries: int
    cut: int


class GatewayGauges:
    """Samples the journal, dispatch and relay into `metrics` every `interval` seconds while entered."""

    def __init__(self, metrics: Metrics, *, journal: _Journal, dispatch: _Dispatch, relay: _Relay,
                 instance: str, interval: float = 1.0) -> None:
        self._journal, self._dispatch, self._relay = journal, dispatch, relay
        self._labels = {"service": "gateway", "instance": instance}
        self.interval = interval
        self._unshipped = metrics.gauge(GATEWAY_USAGE_UNSHIPPED)
        self._waiting = metrics.gauge(GATEWAY_DISPATCH_WAITING)
        self._in_flight = metrics.gauge(GATEWAY_DISPATCH_IN_FLIGHT)
        self._retries = metrics.counter(GATEWAY_WORKER_RETRIES)
        self._cut = metrics.counter(GATEWAY_STREAMS_CUT)
        self._seen = (0, 0)  #: (retries, cut) at the last sample
        self._background = Background()

    def sample(self) -> None:
        """Set the gauges to the current figures; add the counts' growth since the last sample."""
        self._unshipped.set(self._journal.unshipped, **self._labels)
        self._waiting.set(self._dispatch.waiting, **self._labels)
        self._in_flight.set(self._dispatch.in_flight, **self._labels)
        retries, cut = self._relay.retries, self._relay.cut
        self._retries.inc(retries - self._seen[0], **self._labels)  # a zero delta records nothing
        self._cut.inc(cut - self._seen[1], **self._labels)
        self._seen = (retries, cut)

    async def __aenter__(self) -> GatewayGauges:
        self.sample()
        self._background.start(self._run(), name="gateway gauges")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()
        self.sample()  # the last figures, for the reporter's last push

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.sample()
            except Exception:  # a bug must not end the loop, nor reach a request
                log.exception("gateway gauges not sampled")
