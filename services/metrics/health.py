"""System health: which service instances are announced, which are reachable.

Every `interval` seconds, in the background (never per request), the monitor:

1. looks up `service_topic(s)` for every service, then `model_topic(m)` for
   every model the inference workers serve. DHT load holds scalars only, so a
   worker's models are read from its record's `load["models"]` when that is a
   comma-separated string of names, else asked of the worker
   (`inference.models`) when it is new, when the model count or the count of
   open breakers (`breakers_open`) in its record changes, and every
   `models_refresh` seconds. That answer also gives each model's circuit
   breaker and upstream keys (served.py), kept per worker;
2. marks each instance (a node key) **announced** while a live record of it is
   found, and keeps an instance whose record vanished for `forget_after`
   seconds as not announced, so a crash shows before it is forgotten;
3. sends each instance an `rpc.ping` (`ping_timeout`): **reachable** with its
   latency, or not, with the error;
4. rolls up: an instance is `ok` (announced and reachable), `unreachable`
   (announced, no answer), `withdrawn` (answers, no record: draining, or its
   record expired) or `gone` (neither). A service is `ok` when all its
   instances are, `degraded` when some are, `down` when none is, `absent`
   when none is known. The system is `down` when a `required` service is
   neither `ok` nor `degraded`; `degraded` when any service is `degraded` or
   `down`; else `ok`.

Worker capacity per model is summed over `ok` workers from their model-topic
records: `slots`, free slots (`free_slots`, or `slots` - `in_use`), and
`queued`. A model whose breaker is open on a worker is not announced by it
(its topic is withdrawn), so it drops out of that worker's capacity; the
worker's report entry still shows it under `served`, with its breaker and
keys, and `breakers()` counts `ok` workers per model and breaker state and
their upstream keys per model and key state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.dht.interface import Discovery, Provider, model_topic, service_topic
from shared.errors import MeshError, NoProviders
from shared.logging import get_logger
from shared.metrics.families import instance_id
from shared.tasks import Background
from services.metrics.served import ModelState, tally

__all__ = ["SERVICES", "REQUIRED", "Prober", "Instance", "HealthMonitor"]

log = get_logger(__name__)

SERVICES = ("auth", "gateway", "inference", "metrics", "web")
REQUIRED = ("auth", "gateway", "inference")
_MAX_MODELS = 64
_CONCURRENT_CALLS = 32
_MODEL_PREFIX = model_topic("")


class Prober(Protocol):
    """How the monitor reaches one instance; a `MeshError` means no answer."""

    async def ping(self, provider: Provider, timeout: float) -> None: ...

    async def models(self, provider: Provider, timeout: float) -> list[ModelState]: ...

    def forget(self, provider: Provider) -> None: ...


@dataclass(slots=True)
class Instance:
    """What the monitor knows of one node."""

    service: str
    instance: str
    provider: Provider  #: the record pinged: the node's service record when it has one
    records: dict[str, Provider] = field(default_factory=dict)  #: every live record, by topic
    announced: bool = True
    reachable: bool = False
    latency_ms: float | None = None
    error: str | None = None
    last_announced: float = 0.0  #: wall clock
    last_reachable: float | None = None

    @property
    def status(self) -> str:
        if self.announced:
            return "ok" if self.reachable else "unreachable"
        return "withdrawn" if self.reachable else "gone"

    @property
    def models(self) -> dict[str, Mapping[str, Any]]:
        """Per model this node announces a topic for, that record's load."""
        return {t[len(_MODEL_PREFIX):]: p.load for t, p in self.records.items()
                if t.startswith(_MODEL_PREFIX)}

    def view(self) -> dict[str, Any]:
        return {
            "service": self.service, "instance": self.instance, "endpoint": self.provider.endpoint,
            "version": self.provider.version, "status": self.status, "announced": self.announced,
            "reachable": self.reachable, "latency_ms": self.latency_ms, "error": self.error,
            "last_announced": self.last_announced, "last_reachable": self.last_reachable,
            "models": sorted(self.models),
        }


@dataclass(slots=True)
class _Served:
    """The models a worker told us of, and when."""

    models: list[ModelState]
    count: Any  #: the `models` and `breakers_open` entries of its record then
    at: float

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


class HealthMonitor:
    """Probes the mesh in the background; `report()` is the latest picture."""

    def __init__(
        self, discovery: Discovery, prober: Prober, *, services: Iterable[str] = SERVICES,
        required: Iterable[str] = REQUIRED, interval: float = 2.0, ping_timeout: float = 1.0,
        forget_after: float = 60.0, models_refresh: float = 30.0, max_instances: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._discovery = discovery
        self._prober = prober
        self.services = tuple(dict.fromkeys((*services, *required)))
        self.required = frozenset(required)
        self.interval = interval
        self.ping_timeout = ping_timeout
        self.forget_after = forget_after
        self.models_refresh = models_refresh
        self.max_instances = max_instances
        self._clock = clock
        self.instances: dict[bytes, Instance] = {}
        self._served: dict[bytes, _Served] = {}
        self.checked_at: float | None = None
        self._background = Background()
        self._limit = asyncio.Semaphore(_CONCURRENT_CALLS)

    async def __aenter__(self) -> HealthMonitor:
        self._background.start(self._run(), name="health-monitor")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._background.stop()

    async def probe(self) -> None:
        """One round: look every topic up, then ping every known instance."""
        found = await self._lookup_all()
        now = self._clock()
        for node_key, records in found.items():
            own = next((p for t, p in records.items() if t == service_topic(p.service)), None)
            provider = own or next(iter(records.values()))
            known = self.instances.get(node_key)
            if known is None:
                if len(self.instances) >= self.max_instances:
                    log.warning("health: too many instances; ignoring", endpoint=provider.endpoint)
                    continue
                known = self.instances[node_key] = Instance(provider.service, instance_id(node_key), provider)
            known.provider, known.records, known.announced = provider, records, True
            known.last_announced = now
        for node_key, known in list(self.instances.items()):
            if node_key not in found:
                known.announced, known.records = False, {}
                if now - known.last_announced > self.forget_after:
                    del self.instances[node_key]
                    self._served.pop(node_key, None)
                    self._prober.forget(known.provider)
        await asyncio.gather(*(self._ping(known) for known in list(self.instances.values())))
        self.checked_at = self._clock()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.probe()
            except Exception:  # a bug must not end the loop
                log.exception("health: probe failed")
            await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - started)))

    async def _lookup_all(self) -> dict[bytes, dict[str, Provider]]:
        found: dict[bytes, dict[str, Provider]] = {}
        topics = [service_topic(s) for s in self.services]
        workers: list[Provider] = []
        for topic, listed in zip(topics, await asyncio.gather(*map(self._lookup, topics))):
            for provider in listed:
                found.setdefault(provider.node_key, {})[topic] = provider
                if provider.service == "inference":
                    workers.append(provider)
        served = await asyncio.gather(*map(self._models_of, workers))
        models = sorted({name for names in served for name in names})[:_MAX_MODELS]
        model_topics = [model_topic(m) for m in models]
        for topic, listed in zip(model_topics, await asyncio.gather(*map(self._lookup, model_topics))):
            for provider in listed:
                found.setdefault(provider.node_key, {})[topic] = provider
        return found

    async def _lookup(self, topic: str) -> list[Provider]:
        try:
            return await self._discovery.lookup(topic)
        except NoProviders:
            return []
        except MeshError as exc:
            log.warning("health: lookup failed", topic=topic, error=exc.message)
            return []

    async def _models_of(self, worker: Provider) -> list[str]:
        """The models a worker serves: named in its record, else asked of it now and then."""
        listed = worker.load.get("models")
        if isinstance(listed, str):
            return [m.strip() for m in listed.split(",") if m.strip()]
        count = (listed, worker.load.get("breakers_open"))  # either changing: ask again
        cached = self._served.get(worker.node_key)
        now = self._clock()
        if cached is not None and cached.count == count and now - cached.at < self.models_refresh:
            return cached.names
        try:
            async with self._limit:
                models = await self._prober.models(worker, self.ping_timeout)
        except MeshError as exc:
            log.info("health: could not ask a worker its models", endpoint=worker.endpoint, error=exc.message)
            return cached.names if cached is not None else []
        self._served[worker.node_key] = served = _Served(models, count, now)
        return served.names

    async def _ping(self, known: Instance) -> None:
        async with self._limit:
            started = time.perf_counter()
            try:
                await self._prober.ping(known.provider, self.ping_timeout)
            except MeshError as exc:
                known.reachable, known.latency_ms, known.error = False, None, f"{exc.code}: {exc.message}"
                return
            except Exception as exc:  # a transport bug must not stop the round
                log.exception("health: ping failed", endpoint=known.provider.endpoint)
                known.reachable, known.latency_ms, known.error = False, None, type(exc).__name__
                return
            known.reachable, known.error = True, None
            known.latency_ms = round((time.perf_counter() - started) * 1000, 3)
            known.last_reachable = self._clock()

    # -- the picture -----------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Instances, services, models and the rollup, as plain JSON-able values."""
        services = {name: self._service(name) for name in self.services}
        for known in self.instances.values():  # a service outside the list still shows
            services.setdefault(known.service, self._service(known.service))
        return {
            "status": self._rollup(services),
            "checked_at": self.checked_at,
            "interval_s": self.interval,
            "services": services,
            "instances": [{**known.view(), "served": self._served_view(key)} for key, known in sorted(
                self.instances.items(), key=lambda item: (item[1].service, item[1].instance))],
            "models": self.capacity(),
        }

    def _served_view(self, node_key: bytes) -> dict[str, Any]:
        """Per model the worker told us of: its breaker and keys (empty for other services)."""
        served = self._served.get(node_key)
        return {} if served is None else {m.name: m.view() for m in served.models}

    def _service(self, name: str) -> dict[str, Any]:
        mine = [k for k in self.instances.values() if k.service == name]
        ok = sum(1 for k in mine if k.status == "ok")
        status = "absent" if not mine else "ok" if ok == len(mine) else "degraded" if ok else "down"
        return {"status": status, "required": name in self.required, "instances": len(mine), "ok": ok}

    def _rollup(self, services: Mapping[str, Mapping[str, Any]]) -> str:
        if self.checked_at is None:
            return "down"
        if any(s["required"] and s["status"] not in ("ok", "degraded") for s in services.values()):
            return "down"
        if any(s["status"] in ("degraded", "down") for s in services.values()):
            return "degraded"
        return "ok"

    def breakers(self) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
        """Per model, over `ok` workers: workers per breaker state, upstream keys per key state."""
        models = [m for key, known in self.instances.items() if known.service == "inference" and known.status == "ok"
                  for m in (self._served[key].models if key in self._served else ())]
        return tally(models)

    def capacity(self) -> dict[str, dict[str, int]]:
        """Per model: `ok` workers announcing it, their slots, free slots, queue depth."""
        models: dict[str, dict[str, int]] = {}
        for known in self.instances.values():
            if known.service != "inference" or known.status != "ok":
                continue
            for model, load in known.models.items():
                total = models.setdefault(model, {"workers": 0, "slots": 0, "slots_free": 0, "queue_depth": 0})
                total["workers"] += 1
                for name, value in _capacity(load).items():
                    total[name] += value
        return models


def _capacity(load: Mapping[str, Any]) -> dict[str, int]:
    def number(*names: str) -> int | None:
        for name in names:
            value = load.get(name)
            if type(value) in (int, float) and 0 <= value < 2**31:
                return int(value)
        return None

    slots = number("slots") or 0
    free = number("free_slots", "slots_free")
    if free is None:
        in_use = number("in_use")
        free = max(slots - in_use, 0) if in_use is not None else 0
    return {"slots": slots, "slots_free": free, "queue_depth": number("queued", "queue_depth") or 0}
