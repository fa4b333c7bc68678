"""A real mesh for the gateway tests: processes on loopback, real PostgreSQL.

`GatewayMesh` holds, in the test process, a DHT node (everyone's bootstrap
seed, and the test's mesh client), the auth service (served over CurveZMQ and
announced like any service) and an Ollama-protocol server that the workers'
ollama backends stream from; in child processes, inference workers
(`python -m services.inference`) and gateways (`python -m services.gateway`),
which a test may kill -9 and restart with the same data directory. Each child
is given its role's credential only, as `inferswarm up` gives it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from shared.config import MeshConfig, Secret
from shared.db import ensure_database
from shared.dht import Provider, service_topic
from shared.identity import MeshCredential
from shared.rpc import Connection
from shared.runner import MeshNode, join_mesh, serve
from services.auth.app import open_auth
from auth_support import PASSWORD, cheap_config
from ollama_server import OllamaServer

ROOT = Path(__file__).resolve().parent.parent
MODEL = "m1"
REPLY = " ".join(f"w{i}" for i in range(400))

#: Short timings, so that leases, heartbeats and the janitor act within a test.
GATEWAY_ENV = {
    "INFERSWARM_GATEWAY_LEASE_TTL": "1.0",
    "INFERSWARM_GATEWAY_HEARTBEAT": "0.5",
    "INFERSWARM_GATEWAY_DEAD_AFTER": "2.0",
    "INFERSWARM_GATEWAY_JANITOR_INTERVAL": "0.5",
    "INFERSWARM_GATEWAY_SHIP_INTERVAL": "0.1",
}


@dataclass
class User:
    api_key: str
    key_id: int
    token: str
    id: int


@dataclass
class Child:
    name: str
    kind: str
    proc: subprocess.Popen[str]
    env: dict[str, str]
    ready: dict[str, Any]


@asynccontextmanager
async def gateway_databases(pg_server: str) -> AsyncIterator[list[str]]:
    """Two fresh databases on `pg_server`, auth's and the gateways', dropped after."""
    names = [f"test_{secrets.token_hex(6)}_auth", f"test_{secrets.token_hex(6)}_gw"]
    dsns = [await ensure_database(pg_server, name) for name in names]
    try:
        yield dsns
    finally:
        conn = await asyncpg.connect(pg_server)
        try:
            for name in names:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@asynccontextmanager
async def running_mesh(pg_server: str, root: Path, *, workers: int = 3, gateways: int = 2,
                       auth: dict[str, Any] | None = None) -> AsyncIterator[GatewayMesh]:
    """A started `GatewayMesh` on fresh databases; stopped and dropped after. `auth`: AuthConfig
    fields for its auth service (e.g. `webhook_allow_private=True`)."""
    async with gateway_databases(pg_server) as dsns, AsyncExitStack() as stack:
        yield await GatewayMesh(stack, root, *dsns, auth=auth).start(workers=workers, gateways=gateways)


class GatewayMesh:
    """Everything the gateway tests run against (see the module doc)."""

    def __init__(self, stack: AsyncExitStack, root: Path, auth_dsn: str, gateway_dsn: str,
                 auth: dict[str, Any] | None = None) -> None:
        self.stack = stack
        self.auth_options = auth or {}
        self.root = root
        self.auth_dsn = auth_dsn
        self.gateway_dsn = gateway_dsn
        self.secret = MeshCredential.new_secret().hex()
        self.mesh = MeshCredential.from_text(self.secret)  #: the operator's: children get their role's only
        self.children: dict[str, Child] = {}
        self.client: MeshNode
        self.ollama: OllamaServer

    async def start(self, workers: int = 3, gateways: int = 2) -> GatewayMesh:
        config = MeshConfig(data_dir=self.root / "client", mesh_secret=Secret(self.secret), record_ttl=3.0)
        self.client = await join_mesh(self.stack, "client", config)
        self.ollama = await self.stack.enter_async_context(OllamaServer(("llama3:8b",), reply=REPLY))
        await self._serve_auth()
        self.stack.push_async_callback(self.stop_all)
        starts = [self.start_worker(f"w{i}") for i in range(1, workers + 1)]
        starts += [self.start_gateway(f"g{i}") for i in range(1, gateways + 1)]
        await asyncio.gather(*starts)
        if gateways:
            await self.wait_for(service_topic("gateway"), gateways)
        return self

    async def _serve_auth(self) -> None:
        auth_config = cheap_config(self.root / "auth", **self.auth_options)
        mesh = MeshConfig(data_dir=self.root / "auth", mesh_secret=Secret(self.secret), record_ttl=3.0,
                          bootstrap=(self.client.discovery.address,))
        ready: list[dict[str, Any]] = []
        stop = asyncio.Event()

        async def build(stack: AsyncExitStack, node: MeshNode) -> list[object]:
            self.auth = await open_auth(stack, auth_config, self.auth_dsn, metrics=node.metrics)
            return [self.auth]

        task = asyncio.create_task(serve("auth", build, mesh, ready=ready.append, stop=stop))

        async def stop_auth() -> None:
            stop.set()
            await asyncio.wait_for(task, 20)

        self.stack.push_async_callback(stop_auth)
        for _ in range(400):
            if ready or task.done():
                break
            await asyncio.sleep(0.025)
        assert ready, task.exception() if task.done() else "auth did not start"

    # -- child processes -----------------------------------------------------------

    def _env(self, name: str, extra: dict[str, str]) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("INFERSWARM_") and k != "DATABASE_URL"}
        return {**base, "INFERSWARM_DATA_DIR": str(self.root / name),
                "INFERSWARM_BOOTSTRAP": self.client.discovery.address, "INFERSWARM_RECORD_TTL": "3",
                "INFERSWARM_LOG_LEVEL": "warning", **extra}

    async def start_worker(self, name: str, slots: int = 2, queue: int = 32, *,
                           catalog: dict[str, Any] | None = None, **extra: str) -> Child:
        """A worker serving `catalog` (INFERSWARM_MODELS), by default MODEL from the mesh's Ollama server."""
        catalog = catalog or {MODEL: {"backend": "ollama", "url": self.ollama.url, "model": "llama3:8b",
                                      "slots": slots, "queue": queue}}
        env = self._env(name, {"INFERSWARM_MODELS": json.dumps(catalog), "INFERSWARM_PROBE_INTERVAL": "30", **extra})
        return await self._spawn(name, "inference", env)

    async def start_gateway(self, name: str, **extra: str) -> Child:
        env = self._env(name, {"DATABASE_URL": self.gateway_dsn, **GATEWAY_ENV, **extra})
        return await self._spawn(name, "gateway", env)

    async def _spawn(self, name: str, kind: str, env: dict[str, str]) -> Child:
        env = {**env, "INFERSWARM_CREDENTIAL": self.mesh.member(kind).to_text()}  # as `up` gives it
        log = open(self.root / f"{name}.log", "a")
        proc = subprocess.Popen([sys.executable, "-m", f"services.{kind}"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)  # type: ignore[union-attr]
        if not line:
            raise AssertionError(f"{name} exited ({proc.wait()}): {(self.root / f'{name}.log').read_text()[-3000:]}")
        child = Child(name, kind, proc, env, json.loads(line))
        self.children[name] = child
        return child

    def kill(self, name: str) -> None:
        """kill -9: no draining, no last shipment, no lease given back."""
        child = self.children.pop(name)
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(10)

    async def restart_gateway(self, name: str, **extra: str) -> Child:
        return await self.start_gateway(name, **extra)

    async def stop_all(self) -> None:
        for child in list(self.children.values()):
            child.proc.send_signal(signal.SIGTERM)
        for child in list(self.children.values()):
            try:
                await asyncio.to_thread(child.proc.wait, 20)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
        self.children.clear()

    # -- calls ----------------------------------------------------------------------

    async def wait_for(self, topic: str, count: int, timeout: float = 15.0) -> list[Provider]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = await self.client.discovery.lookup(topic)
                if len(found) >= count:
                    return found
            except Exception:
                pass
            assert time.monotonic() < deadline, f"fewer than {count} providers of {topic}"
            await asyncio.sleep(0.1)

    async def worker_slots(self) -> dict[str, dict[str, int]]:
        """Each live worker's slots of the model now: {name: {slots, in_use, queued, limit}}."""
        providers = await self.client.discovery.lookup(f"inferswarm/model/{MODEL}")
        by_endpoint = {p.endpoint: p for p in providers}
        slots = {}
        for child in self.children.values():
            provider = by_endpoint.get(child.ready["endpoint"])
            if child.kind == "inference" and provider is not None:
                status = await self.client.mesh.connection(provider).call(
                    "inference.model_status", {"model": MODEL}, timeout=2.0)
                slots[child.name] = status["slots"]
        return slots

    async def gateways(self) -> list[Connection]:
        """One connection per live gateway process (by its announced endpoint)."""
        endpoints = {c.ready["endpoint"] for c in self.children.values() if c.kind == "gateway"}
        providers = await self.wait_for(service_topic("gateway"), len(endpoints))
        return [self.client.mesh.connection(p) for p in providers if p.endpoint in endpoints]

    async def gateway(self, name: str) -> Connection:
        endpoint = self.children[name].ready["endpoint"]
        deadline = time.monotonic() + 10
        while True:
            self.client.discovery.forget(service_topic("gateway"))
            for provider in await self.wait_for(service_topic("gateway"), 1):
                if provider.endpoint == endpoint:
                    return self.client.mesh.connection(provider)
            assert time.monotonic() < deadline, f"{name} is not announced"
            await asyncio.sleep(0.1)

    async def user(self, username: str) -> User:
        """A new account (free tier) with one API key."""
        auth = self.client.mesh("auth")
        user = await auth.call("auth.register", {"username": username, "email": f"{username}@example.com",
                                                 "password": PASSWORD})
        token = (await auth.call("auth.login", {"username_or_email": username, "password": PASSWORD}))["token"]
        key = await auth.call("auth.create_key", {"token": token, "name": "test"})
        return User(key["api_key"], key["id"], token, user["id"])

    async def usage(self, token: str) -> dict[str, Any]:
        return await self.client.mesh("auth").call("auth.usage", {"token": token}, idempotent=True)

    async def usage_rows(self, user_id: int) -> list[dict[str, Any]]:
        """The user's usage records, straight from auth's table."""
        import asyncpg

        conn = await asyncpg.connect(self.auth_dsn)
        try:
            rows = await conn.fetch("SELECT request_id, status, prompt_tokens, completion_tokens, worker"
                                    " FROM usage WHERE user_id = $1", user_id)
        finally:
            await conn.close()
        return [dict(r) for r in rows]

    async def records_settle(self, user_id: int, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until the user has `count` usage records (shipping is batched), then a bit more."""
        deadline = time.monotonic() + timeout
        while True:
            rows = await self.usage_rows(user_id)
            if len(rows) >= count:
                await asyncio.sleep(0.3)  # a duplicate would show up by now
                return await self.usage_rows(user_id)
            assert time.monotonic() < deadline, f"{len(rows)} usage records, expected {count}"
            await asyncio.sleep(0.1)


async def infer(connection: Connection, key: str, *, timeout: float = 30.0, **params: Any) -> list[dict[str, Any]]:
    """Every chunk of one `gateway.infer` stream (`params` override the defaults)."""
    request = {"api_key": key, "model": MODEL, "messages": [{"role": "user", "content": "hello"}],
               "max_tokens": 4, **params}
    stream = await connection.stream("gateway.infer", request, timeout=timeout)
    return [chunk async for chunk in stream]
