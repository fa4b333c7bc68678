"""Which worker gets a request: discovery, live load, cooldowns.

Workers announce each model on `model_topic(model)` with that model's load
(`free_slots`, `slots`, `queued`, `queue_limit`, `healthy`, `tokens_per_s`).
`choose` drops workers that are cooling down (they failed us recently), that
say they are unhealthy, or whose queue is full, then takes the better of two
at random (power of two choices) by

    expected wait = (1 + backlog / slots) x time to first token (EWMA)
    backlog       = queued + our in-flight requests to it - free slots (>= 0)

so live load -- what the worker announced and what this gateway has sent it
since -- steers the choice, and a slow worker is avoided before it fails.
Waits within 10% of each other are a tie, drawn at random.

A figure is only refreshed when its worker is chosen, so a worker that lost
its draws would keep an old figure for good. Hence:

* a worker not measured yet counts as fast as the fastest known one, so a
  worker that joins takes traffic at once -- and so does one that restarted,
  since figures belong to a worker's endpoint (a new process listens on a
  new one);
* a figure not refreshed fades toward the fastest known one (time constant
  `forget`, 2 s), so one slow answer at low load is forgotten within seconds
  and the worker is tried again; figures unrefreshed for a minute are dropped.
An unknown model is `NOT_FOUND` naming the models the workers serve; workers
that exist but cannot take the request now are `UNAVAILABLE`.

Lookups on a request's path take the request's deadline: a caller stops
waiting for a (shared) worker lookup at its own deadline (`TIMEOUT`), and
each worker's `inference.models` for the catalog gets the caller's time left,
at most `catalog_timeout` (1 s: one dead worker must not hold every
`gateway.models` behind the catalog's lock), less a small margin to answer
with the workers that did. A catalog built with less than `catalog_timeout`,
in which a worker did not answer, is not kept: a caller with little
time left must not shape what the next callers see.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from shared.dht import Provider, model_topic, service_topic
from shared.errors import MeshError, NoProviders, NotFound, Timeout, Unavailable
from shared.logging import get_logger
from shared.rpc import MeshClient
from services.gateway.budget import budget

__all__ = ["Router"]

_TIE = 1.1  #: expected waits within 10% of each other are a tie
_DROP_AFTER = 60.0  #: seconds a figure is kept without being refreshed
_MARGIN = 0.05  #: of a caller's last moments, kept to answer with the catalog found by then

T = TypeVar("T")

log = get_logger(__name__)


class Router:
    """Picks workers for models and keeps the live figures it picks by."""

    def __init__(
        self, mesh: MeshClient, *, latency_alpha: float = 0.3, default_latency: float = 0.05,
        forget: float = 2.0, catalog_ttl: float = 2.0, catalog_timeout: float = 1.0, refresh: float = 0.5,
        stale_after: float = 3.0, model_cooldown: float = 5.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._mesh = mesh
        self._alpha = latency_alpha
        self._default_latency = default_latency
        self._forget = forget
        self._clock = clock
        self._catalog_ttl = catalog_ttl
        self._catalog_timeout = catalog_timeout
        #: (node key, endpoint) -> (time to first token EWMA, when last folded in)
        self._latency: dict[tuple[bytes, str], tuple[float, float]] = {}
        self._fastest = default_latency
        self._fastest_until = 0.0
        self._in_flight: dict[bytes, int] = {}
        #: (node key, model topic) -> until when: the worker answered that its model failed
        self._failing: dict[tuple[bytes, str], float] = {}
        self._model_cooldown = model_cooldown
        self._refresh = refresh
        self._stale_after = stale_after
        self._workers: dict[str, tuple[float, list[Provider]]] = {}
        self._looking: dict[str, asyncio.Future[list[Provider] | None]] = {}
        self._catalog: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._catalog_lock = asyncio.Lock()

    async def workers(self, model: str, *, deadline: float | None = None) -> list[Provider]:
        """The live workers announcing `model`; `NOT_FOUND` when there are none.

        Lookups are kept `refresh` seconds and then refreshed in the
        background (one at a time per model) while the old list serves for up
        to `stale_after`: no request waits on a DHT crawl in steady state. A
        caller waiting for a lookup stops at its `deadline` (`TIMEOUT`); the
        lookup goes on for the others."""
        entry = self._workers.get(model)
        age = time.monotonic() - entry[0] if entry is not None else float("inf")
        if age < self._refresh:
            return entry[1]  # type: ignore[index]
        if age < self._stale_after:
            if model not in self._looking:
                self._looking[model] = asyncio.ensure_future(self._lookup(model))
                self._looking[model].add_done_callback(_quiet)
            return entry[1]  # type: ignore[index]
        looking = self._looking.get(model)
        if looking is None:
            looking = self._looking[model] = asyncio.ensure_future(self._lookup(model))
            looking.add_done_callback(_quiet)  # its failure is logged even if every caller left
        found = await _wait(looking, deadline, f"the workers of model {model!r} were found")
        if found is None:
            models = sorted(await self.catalog(deadline=deadline))
            raise NotFound(f"no worker serves model {model!r}" + (
                f"; available: {', '.join(models)}" if models else "; no model is served right now"),
                {"model": model, "models": models})
        return found

    async def _lookup(self, model: str) -> list[Provider] | None:
        try:
            found = await self._mesh.discovery.lookup(model_topic(model))
        except NoProviders:
            self._workers.pop(model, None)
            return None
        finally:
            self._looking.pop(model, None)
        self._workers[model] = (time.monotonic(), found)
        if len(self._workers) > 1000:  # models looked up by mistake should not pile up
            self._workers.pop(next(iter(self._workers)))
        return found

    def choose(self, model: str, workers: list[Provider], exclude: set[bytes]) -> Provider:
        """A worker for one attempt (power of two choices), or `UNAVAILABLE`."""
        usable = [w for w in workers if w.node_key not in exclude and self._usable(w)]
        if not usable:
            raise Unavailable(f"no worker of model {model!r} can take a request now",
                              {"model": model, "workers": len(workers), "retry_safe": True})
        if len(usable) == 1:
            return usable[0]
        a, b = random.sample(usable, 2)  # in random order: a tie goes to either
        wait_a, wait_b = self.expected_wait(a), self.expected_wait(b)
        return a if wait_a <= wait_b * _TIE else b

    def can_take(self, workers: list[Provider]) -> bool:
        """Whether any of `workers` can take a request now (as `choose` sees them)."""
        return any(self._usable(w) for w in workers)

    def _usable(self, worker: Provider) -> bool:
        load = worker.load or {}
        if load.get("healthy") is False or self._mesh.is_cooling(worker) or self._model_failing(worker):
            return False
        queued, limit = _number(load.get("queued"), 0), load.get("queue_limit")
        full = isinstance(limit, int) and _number(load.get("free_slots"), 1) <= 0 and queued >= limit
        return not full  # as announced; a fresher refusal makes us try the next one

    def measured(self, worker: Provider) -> float | None:
        """The worker's time-to-first-token average, None when not measured (or forgotten)."""
        figure = self._latency.get((worker.node_key, worker.endpoint))
        return None if figure is None else figure[0]

    def expected_wait(self, worker: Provider) -> float:
        load = worker.load or {}
        slots = max(1.0, _number(load.get("slots"), 1))
        backlog = _number(load.get("queued"), 0) + self._in_flight.get(worker.node_key, 0) \
            - _number(load.get("free_slots"), slots)
        return (1 + max(0.0, backlog) / slots) * self._latency_of(worker)

    def _latency_of(self, worker: Provider) -> float:
        now = self._clock()
        fastest = self._fastest_known(now)
        figure = self._latency.get((worker.node_key, worker.endpoint))
        if figure is None:  # not measured yet: tried at once, as fast as the fastest
            return fastest
        value, at = figure
        if value <= fastest:
            return value
        return fastest + (value - fastest) * math.exp(-(now - at) / self._forget)

    def _fastest_known(self, now: float) -> float:
        """The lowest figure, recomputed (and old figures dropped) twice a second."""
        if now >= self._fastest_until:
            for key in [k for k, (_, at) in self._latency.items() if now - at > _DROP_AFTER]:
                del self._latency[key]
            self._fastest = min((v for v, _ in self._latency.values()), default=self._default_latency)
            self._fastest_until = now + 0.5
        return self._fastest

    def started(self, worker: Provider) -> None:
        self._in_flight[worker.node_key] = self._in_flight.get(worker.node_key, 0) + 1

    def first_token(self, worker: Provider, seconds: float) -> None:
        """Fold one time-to-first-token into the worker's moving average."""
        key = (worker.node_key, worker.endpoint)
        old = self._latency.get(key)
        value = seconds if old is None else old[0] + self._alpha * (seconds - old[0])
        self._latency[key] = (value, self._clock())
        self._fastest = min(self._fastest, value)

    def finished(self, worker: Provider, *, failed: bool = False, busy: bool = False, answered: bool = False
                 ) -> None:
        """The request left the worker. A failure cools it down (not a full queue): the
        worker for this model only when it `answered` that its model failed (its other
        models, e.g. a fallback's, are fine), the whole worker when it could not be reached."""
        count = self._in_flight.get(worker.node_key, 1) - 1
        if count > 0:
            self._in_flight[worker.node_key] = count
        else:
            self._in_flight.pop(worker.node_key, None)
        if failed and not busy:
            if answered:
                self._cool_model(worker)
            else:
                self._mesh.cool_down(worker)

    def _cool_model(self, worker: Provider) -> None:
        now = self._clock()
        if len(self._failing) >= 1000:  # bounded: drop what has cooled
            self._failing = {key: until for key, until in self._failing.items() if until > now}
        self._failing[(worker.node_key, worker.topic)] = now + self._model_cooldown

    def _model_failing(self, worker: Provider) -> bool:
        until = self._failing.get((worker.node_key, worker.topic))
        if until is None:
            return False
        if until <= self._clock():
            del self._failing[(worker.node_key, worker.topic)]
            return False
        return True

    async def catalog(self, *, deadline: float | None = None) -> dict[str, dict[str, Any]]:
        """Model -> {"workers", "healthy_workers", "capabilities"}, from every worker's
        `inference.models` (capabilities: what any of its workers can do).

        Within `deadline` (`TIMEOUT` past it); see the module doc."""
        wait = None if deadline is None else budget(deadline, float("inf"), "list the models")
        try:
            async with asyncio.timeout(wait):
                return await self._build_catalog(deadline)
        except TimeoutError:
            raise Timeout("the deadline passed before the models were listed") from None

    async def _build_catalog(self, deadline: float | None) -> dict[str, dict[str, Any]]:
        async with self._catalog_lock:
            cached = self._catalog
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            try:
                workers = await self._mesh.discovery.lookup(service_topic("inference"))
            except NoProviders:
                workers = []
            timeout = budget(deadline, self._catalog_timeout, "list the models")
            if timeout < self._catalog_timeout:  # leave a moment to answer with the workers that did
                timeout -= min(_MARGIN, timeout / 10)
            answers = await asyncio.gather(*(self._models_of(w, timeout) for w in workers))
            catalog: dict[str, dict[str, Any]] = {}
            for worker, answer in zip(workers, answers):
                for entry in answer or []:
                    row = catalog.setdefault(entry["name"], {"workers": 0, "healthy_workers": 0, "capabilities": []})
                    row["workers"] += 1
                    if entry.get("healthy", True) and not self._mesh.is_cooling(worker):
                        row["healthy_workers"] += 1
                    can = entry.get("capabilities")
                    for capability in can if isinstance(can, list) else []:
                        if isinstance(capability, str) and capability not in row["capabilities"]:
                            row["capabilities"].append(capability)
            if timeout >= self._catalog_timeout or None not in answers:  # as good as any caller's
                self._catalog = (time.monotonic() + self._catalog_ttl, catalog)
            return catalog

    async def _models_of(self, worker: Provider, timeout: float) -> list[dict[str, Any]] | None:
        """What the worker serves; None if it did not say within `timeout`."""
        try:
            answer = await self._mesh.connection(worker).call("inference.models", timeout=timeout)
        except MeshError as exc:
            log.info("worker did not list its models", endpoint=worker.endpoint, error=exc.message)
            return None
        models = answer.get("models") if isinstance(answer, dict) else None
        return [m for m in models or [] if isinstance(m, dict) and isinstance(m.get("name"), str)]


async def _wait(future: asyncio.Future[T], deadline: float | None, what: str) -> T:
    """The result of a shared `future`, waiting for it until `deadline` at most (it is not cancelled)."""
    timeout = None if deadline is None else deadline - time.monotonic()
    if timeout is not None and timeout <= 0:
        raise Timeout(f"the deadline passed before {what}")
    done, _ = await asyncio.wait((future,), timeout=timeout)
    if not done:
        raise Timeout(f"the deadline passed before {what}")
    return future.result()


def _quiet(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("worker lookup failed", error=str(future.exception()))


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
