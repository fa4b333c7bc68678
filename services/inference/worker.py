"""Assembling an inference worker from its configuration.

`InferenceWorker` exists before the process joins the mesh, so `__main__` can
hand its `load` and `topic_load` to the runner; `build` (the runner's build
step) then starts every backend, probes each once, and keeps probing every
`probe_interval` seconds: a remote server that is down at start, or goes down
later, is announced unhealthy until it answers again. Tests and the benchmark
use `open_service` for the same wiring without a mesh.

Each model's circuit breaker (health.py) is fed by requests and probes alike.
While it is open the prober leaves that backend alone; once half-open, the
next probe is the breaker's probe. `hidden` (handed to the runner's
announcer) names the topics of models whose breaker is not closed: they are
withdrawn at once and announced again when the breaker closes (a breaker
change pokes the announcer through `on_change`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any

from shared.dht import model_topic, service_topic
from shared.errors import MeshError, Unavailable
from shared.logging import get_logger
from shared.generation import Limits
from shared.tasks import Background
from services.inference.backends import Backend, Embedder, make_backend, make_embedder
from services.inference.cache import ResponseCache
from services.inference.config import InferenceConfig
from services.inference.health import ModelHealth
from services.inference.service import InferenceService, ServedModel
from services.inference.slots import SlotPool

__all__ = ["InferenceWorker", "open_service", "probe_all"]

log = get_logger(__name__)


async def open_service(
    stack: AsyncExitStack, config: InferenceConfig, *, worker_id: str = "",
    on_change: Callable[[], None] | None = None, environ: Mapping[str, str] = os.environ,
) -> InferenceService:
    """Start every configured backend and the prober on `stack`; the service."""
    changed = on_change or (lambda: None)
    served: dict[str, ServedModel] = {}
    for spec in config.models:
        backend: Backend | Embedder
        if spec.kind == "embedding":
            backend = make_embedder(spec, threads=config.threads, environ=environ)
        else:
            backend = make_backend(spec, threads=config.threads, environ=environ)
        await backend.start()
        stack.push_async_callback(backend.close)
        pool = SlotPool(spec.slots, spec.queue, on_change=changed)
        health = ModelHealth(name=spec.name, on_change=changed, threshold=config.breaker_failures,
                             cooldown=config.breaker_cooldown)
        served[spec.name] = ServedModel(spec.name, backend, pool, health, sampling=spec.sampling)
    service = InferenceService(
        served,
        ResponseCache(ttl=config.cache_ttl, max_entries=config.cache_entries, max_bytes=config.cache_bytes),
        limits=Limits(config.max_tokens, config.max_prompt_chars, config.max_messages),
        worker_id=worker_id,
        queue_timeout=config.queue_timeout,
    )
    await probe_all(service, timeout=config.probe_interval)
    prober = Background()
    prober.start(_probe_forever(service, config.probe_interval), name="inference.prober")
    stack.push_async_callback(prober.stop)
    return service


async def probe_all(service: InferenceService, *, timeout: float) -> None:
    """Probe every backend once, concurrently; record each outcome in its health.

    A backend whose breaker is open is not probed until the breaker is half-open;
    then this probe is the breaker's one probe."""

    async def probe(served: ServedModel) -> None:
        if not served.health.breaker.allow():
            return  # open: the cooldown runs; or half-open with a request out as the probe
        try:
            await asyncio.wait_for(served.backend.probe(), timeout)
        except MeshError as exc:
            if served.health.healthy:
                log.warning("model unhealthy", model=served.name, code=exc.code, error=exc.message)
            served.health.failed(exc)
        except asyncio.TimeoutError:
            served.health.failed(Unavailable(f"health probe took over {timeout:.3g}s"))
        else:
            if not served.health.healthy:
                log.info("model healthy again", model=served.name)
            served.health.succeeded()

    await asyncio.gather(*(probe(s) for s in service.served.values()))


async def _probe_forever(service: InferenceService, interval: float) -> None:
    while True:  # until cancelled by the stack; each turn waits `interval`
        await asyncio.sleep(interval)
        await probe_all(service, timeout=interval)


class InferenceWorker:
    """The process's worker: topics and load for the runner, built on `build`."""

    def __init__(self, config: InferenceConfig) -> None:
        self.config = config
        self.service: InferenceService | None = None

    @property
    def topics(self) -> list[str]:
        """One topic per served model, and the service's own topic."""
        return [model_topic(spec.name) for spec in self.config.models] + [service_topic("inference")]

    async def build(self, stack: AsyncExitStack, node: Any) -> list[object]:
        """The runner's build step: backends started, the service to expose."""
        self.service = await open_service(
            stack, self.config, worker_id=node.identity.public_key.hex(), on_change=node.announce_soon
        )
        return [self.service]

    def load(self) -> dict[str, Any]:
        return self.service.load() if self.service is not None else {}

    def topic_load(self, topic: str) -> dict[str, Any]:
        return self.service.topic_load(topic) if self.service is not None else {}

    def hidden(self) -> list[str]:
        """The model topics not to announce now: those whose breaker is not closed."""
        return self.service.withdrawn_topics() if self.service is not None else []
