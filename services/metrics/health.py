"""System health: which service instances are announced, which are reachable.

Every `interval` seconds, in the background (never per request), the monitor:

1. looks up `service_topic(s)` for every service, and `model_topic(m)` for every
   model an inference record mentions (its `load["models"]`, a list of names or
   a map of name -> capacity);
2. marks each instance (a node key) **announced** while a live record of it is
   found, and keeps an instance whose record vanished for `forget_after`
   seconds as not announced, so a crash shows before it is forgotten;
3. sends each instance an `rpc.ping` (`ping_timeout`): **reachable** with its
   latency, or not, with the error;
4. rolls up: an instance is `ok` (announced and reachable), `unreachable`
   (announced, no answer), `withdrawn` (answers, no record: draining or
   expired) or `gone` (neither). A service is `ok` when all its instances are,
   `degraded` when some are, `down` when none is, `absent` when none was seen.
   The system is `down` when a `required` service is not `ok`/`degraded`,
   `degraded` when any service is `degraded` or `down`, else `ok`.

Worker capacity per model (workers, slots, free slots, queue depth) is summed
over reachable, announced workers from their records' load: `slots`, `in_use`
(or `slots_free`/`free`), `queued` (or `queue_depth`).
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

__all__ = ["SERVICES", "REQUIRED", "Pinger", "Instance", "HealthMonitor"]

log = get_logger(__name__)

SERVICES = ("auth", "gateway", "inference", "metrics", "web")
REQUIRED = ("auth", "gateway", "inference")
_MAX_MODELS = 64
_CONCURRENT_PINGS = 32


class Pinger(Protocol):
    """Sends `rpc.ping` to one provider; raises a `MeshError` when it gets no answer."""

    async def ping(self, provider: Provider, timeout: float) -> None: ...

    def forget(self, provider: Provider) -> None: ...


@dataclass(slots=True)
class Instance:
    """What the monitor knows of one node."""

    service: str
    instance: str
    provider: Provider  #: the record pinged: its service record if it has one
    records: dict[str, Provider] = field(default_factory=dict)  #: by topic
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

    def view(self) -> dict[str, Any]:
        return {
            "service": self.service, "instance": self.instance, "endpoint": self.provider.endpoint,
            "version": self.provider.version, "status": self.status, "announced": self.announced,
            "reachable": self.reachable, "latency_ms": self.latency_ms, "error": self.error,
            "last_announced": self.last_announced, "last_reachable": self.last_reachable,
            "models": sorted(_model_loads(self)),
        }


class HealthMonitor:
    """Probes the mesh in the background; `report()` is the latest picture."""

    def __init__(
        self, discovery: Discovery, pinger: Pinger, *, services: Iterable[str] = SERVICES,
        required: Iterable[str] = REQUIRED, interval: float = 2.0, ping_timeout: float = 1.0,
        forget_after: float = 60.0, max_instances: int = 256, clock: Callable[[], float] = time.time,
    ) -> None:
        self._discovery = discovery
        self._pinger = pinger
        self.services = tuple(dict.fromkeys((*services, *required)))
        self.required = frozenset(required)
        self.interval = interval
        self.ping_timeout = ping_timeout
        self.forget_after = forget_after
        self.max_instances = max_instances
        self._clock = clock
        self.instances: dict[bytes, Instance] = {}
        self.checked_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HealthMonitor:
        self._task = asyncio.create_task(self._run(), name="health-monitor")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def probe(self) -> None:
        """One round: look every topic up, then ping every known instance."""
        found = await self._lookup_all()
        now = self._clock()
        for node_key, records in found.items():
            provider = records.get(_service_topic_of(records)) or next(iter(records.values()))
            known = self.instances.get(node_key)
            if known is None:
                if len(self.instances) >= self.max_instances:
                    log.warning("health: too many instances; ignoring", endpoint=provider.endpoint)
                    continue
                known = self.instances[node_key] = Instance(
                    provider.service, instance_id(node_key), provider)
            known.provider, known.records, known.announced = provider, records, True
            known.last_announced = now
        for node_key, known in list(self.instances.items()):
            if node_key not in found:
                known.announced = False
                if now - known.last_announced > self.forget_after:
                    del self.instances[node_key]
                    self._pinger.forget(known.provider)
        limit = asyncio.Semaphore(_CONCURRENT_PINGS)
        await asyncio.gather(*(self._ping(known, limit) for known in list(self.instances.values())))
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
        providers = await asyncio.gather(*(self._lookup(t) for t in topics))
        models: set[str] = set()
        for topic, listed in zip(topics, providers):
            for provider in listed:
                found.setdefault(provider.node_key, {})[topic] = provider
                if provider.service == "inference":
                    models.update(_model_names(provider))
        model_topics = [model_topic(m) for m in sorted(models)[:_MAX_MODELS]]
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

    async def _ping(self, known: Instance, limit: asyncio.Semaphore) -> None:
        async with limit:
            started = time.perf_counter()
            try:
                await self._pinger.ping(known.provider, self.ping_timeout)
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
            "instances": [known.view() for known in sorted(
                self.instances.values(), key=lambda k: (k.service, k.instance))],
            "models": self.capacity(),
        }

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

    def capacity(self) -> dict[str, dict[str, int]]:
        """Per model: reachable announced workers, their slots, free slots, queue depth."""
        models: dict[str, dict[str, int]] = {}
        for known in self.instances.values():
            if known.service != "inference" or known.status != "ok":
                continue
            for model, load in _model_loads(known).items():
                total = models.setdefault(model, {"workers": 0, "slots": 0, "slots_free": 0, "queue_depth": 0})
                total["workers"] += 1
                for name, value in _capacity(load).items():
                    total[name] += value
        return models


def _service_topic_of(records: Mapping[str, Provider]) -> str:
    first = next(iter(records.values()))
    return service_topic(first.service)


def _model_names(provider: Provider) -> set[str]:
    """The models a record names: its `load["models"]`, or the model of its topic."""
    models = provider.load.get("models") if provider.load else None
    if isinstance(models, (list, tuple, dict)):
        return {m for m in models if isinstance(m, str) and 0 < len(m) <= 128}
    prefix = model_topic("")
    return {provider.topic[len(prefix):]} if provider.topic.startswith(prefix) else set()


def _model_loads(known: Instance) -> dict[str, Mapping[str, Any]]:
    """Per model this worker serves, the load entries describing its capacity:
    the model topic's record, else the service record's `load["models"][model]`."""
    loads: dict[str, Mapping[str, Any]] = {}
    for provider in known.records.values():
        models = provider.load.get("models") if provider.load else None
        for model in _model_names(provider):
            entry = models.get(model) if isinstance(models, dict) else None
            if provider.topic == model_topic(model):
                loads[model] = provider.load  # the most specific record wins
            elif isinstance(entry, Mapping):
                loads.setdefault(model, entry)
            else:
                loads.setdefault(model, {})
    return loads


def _capacity(load: Mapping[str, Any]) -> dict[str, int]:
    def number(*names: str) -> int | None:
        for name in names:
            value = load.get(name)
            if type(value) in (int, float) and 0 <= value < 2**31:
                return int(value)
        return None

    slots = number("slots") or 0
    free = number("slots_free", "free")
    if free is None:
        in_use = number("in_use")
        free = max(slots - in_use, 0) if in_use is not None else 0
    return {"slots": slots, "slots_free": free, "queue_depth": number("queued", "queue_depth") or 0}
