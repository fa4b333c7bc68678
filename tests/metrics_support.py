"""Helpers of the metrics tests: a mesh with a metrics service in this process,
a reporter process to start and kill, scraping and waiting."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from shared.config import MeshConfig, Secret
from shared.identity import MeshCredential
from shared.metrics import Family
from shared.runner import MeshNode, join_mesh, serve
from services.metrics.app import MetricsApp, open_metrics
from services.metrics.config import MetricsConfig
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
TTL = 2.0  #: record TTL of every node in these tests

#: Fast timings: probes every 0.3 s, pings time out in 0.5 s.
FAST = dict(http_port=0, probe_interval=0.3, ping_timeout=0.5, forget_after=30.0, gauge_ttl=3.0,
            active_users_interval=0.5, required=("metrics",))


async def eventually(check: Callable[[], Any], *, timeout: float, interval: float = 0.1) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; its value."""
    return await wait_until(check, timeout, interval=interval, message=f"{check} never held")


@dataclass
class Mesh:
    """A seed DHT node (with a mesh client for the test's own calls) and the shared secret."""

    root: Path
    secret: str
    seed: MeshNode
    stack: AsyncExitStack
    metrics: list[MetricsApp] = field(default_factory=list)

    def config(self, name: str) -> MeshConfig:
        return MeshConfig(data_dir=self.root / name, bootstrap=(self.seed.discovery.address,),
                          mesh_secret=Secret(self.secret), record_ttl=TTL)

    def env(self, name: str, **extra: str) -> dict[str, str]:
        """The environment of a child process joining this mesh."""
        return {**os.environ, "INFERSWARM_DATA_DIR": str(self.root / name),
                "INFERSWARM_BOOTSTRAP": self.seed.discovery.address,
                "INFERSWARM_MESH_SECRET": self.secret, "INFERSWARM_RECORD_TTL": str(TTL),
                "INFERSWARM_LOG_LEVEL": "warning", **extra}

    async def node(self, name: str) -> MeshNode:
        return await join_mesh(self.stack, name, self.config(name))

    async def serve(self, service: str, build: Any, name: str, **options: Any) -> None:
        """Run `service` through the real runner until the mesh closes."""
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(
            service, build, replace(self.config(name), node_name=name),
            ready=lambda _: ready.set(), stop=stop, **options))

        async def finish() -> None:
            stop.set()
            await asyncio.wait_for(task, 15)

        self.stack.push_async_callback(finish)
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({waiter, task}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raise what it failed with
        assert ready.is_set(), f"{service} not ready"
        waiter.cancel()

    async def start_metrics(self, name: str = "metrics", **overrides: Any) -> MetricsApp:
        config = MetricsConfig(mesh=self.config(name), **{**FAST, **overrides})

        async def build(stack: AsyncExitStack, node: MeshNode) -> list[object]:
            app = await open_metrics(stack, config, node)
            self.metrics.append(app)
            return [app.service]

        await self.serve("metrics", build, name)
        return self.metrics[-1]


@asynccontextmanager
async def mesh(root: Path) -> AsyncIterator[Mesh]:
    async with AsyncExitStack() as stack:
        secret = MeshCredential.new_secret().hex()
        seed = await join_mesh(stack, "seed", MeshConfig(data_dir=root / "seed", mesh_secret=Secret(secret)))
        yield Mesh(root, secret, seed, stack)


class Child:
    """A Python child process that prints one JSON line when ready; killed on exit."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args, self.env = args, env
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}

    async def start(self, timeout: float = 20.0) -> dict[str, Any]:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *self.args, env=self.env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)  # type: ignore[union-attr]
        assert line, f"{self.args} exited before it was ready"
        self.ready = json.loads(line)
        return self.ready

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)

    async def __aenter__(self) -> Child:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.kill()


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await response.text()


async def get_health(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/health") as response:
        return response.status, await response.json()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, parsed by prometheus-client's parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text) for s in fam.samples
    }


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return parsed.get((name, frozenset(labels.items())))


def labels_of(fam: Family, tag: str = "infer") -> dict[str, str]:
    """The labels of one successful gateway request in `fam`, whatever the family's label names:
    service `gateway`, method `gateway.<tag>`, model `<tag>`, direction `in`, the success result."""
    chosen = {"service": "gateway", "method": f"gateway.{tag}", "model": tag, "direction": "in"}
    labels = {}
    for label in fam.labels:
        success = [v for v in label.values or () if v.lower() == "ok"]
        labels[label.name] = chosen[label.name] if label.name in chosen else success[0]
    return labels
