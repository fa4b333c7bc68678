"""One lifecycle for every process: join, build, serve, announce, drain, stop.

A service's `__main__` is a few lines::

    async def build(stack: AsyncExitStack, node: MeshNode) -> list[object]:
        pool = ...                      # resources, closed by `stack` in reverse
        return [AuthService(pool)]      # objects with `@method` handlers

    def main() -> None:
        run("auth", build, load(AuthConfig).mesh)

Everything is entered on one `AsyncExitStack`, so what started is closed in
reverse order. On SIGTERM or SIGINT the process, in this order:

1. withdraws its DHT records (TTL 0), so callers stop choosing it;
2. drains: new requests get `UNAVAILABLE` with `retry_safe` (callers retry
   elsewhere), in-flight ones get `drain_timeout` seconds to finish;
3. closes its resources (database pools...), its mesh connections, its DHT node.

Withdrawing before draining means no request is routed to a server that is
already refusing work -- the brief's "drain, withdraw" in the safe order.
When ready, the process prints one JSON line on stdout (logs go to stderr):
``{"ready": "auth", "id": "<node public key>", "endpoint": "tcp://...", "dht": "127.0.0.1:7401", ...}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from shared.config import ConfigError, MeshConfig
from shared.dht import Announcer, KademliaDiscovery, service_topic
from shared.identity import MemberCredential, MeshCredential, NodeIdentity
from shared.membership import mesh_credential
from shared.logging import configure_logging
from shared.tracing import configure_tracing, shutdown_tracing
from shared.metrics import REQUEST_DURATION, REQUESTS, RPC_ERRORS, Metrics, MetricsReporter
from shared.rpc import Dispatcher, Limits, MeshClient, RpcServer

__all__ = ["MeshNode", "join_mesh", "mesh_credential", "serve", "run", "VERSION"]

VERSION = "0.1.0"

log = structlog.get_logger(__name__)

Build = Callable[[AsyncExitStack, "MeshNode"], Awaitable[Sequence[object]]]


@dataclass
class MeshNode:
    """What a process holds once it has joined the mesh."""

    name: str
    config: MeshConfig
    identity: NodeIdentity
    credential: MeshCredential | MemberCredential
    discovery: KademliaDiscovery
    mesh: MeshClient
    #: Set by `serve` once the process announces itself.
    announcer: Announcer | None = None
    #: This process's metrics, pushed to the metrics service every second.
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def state_dir(self) -> Path:
        return self.config.data_dir / "nodes" / self.name

    def announce_soon(self) -> None:
        """Re-announce promptly (rate-limited by the announcer): call it when
        the load a record carries changed, e.g. a worker's free slots."""
        if self.announcer is not None:
            self.announcer.poke()


async def join_mesh(
    stack: AsyncExitStack, name: str, config: MeshConfig, *, role: str | None = None, read_only: bool = False,
) -> MeshNode:
    """Load identity and credential, start a DHT node and a mesh client on `stack`.

    `role` is the member role the process acts in (its service's); None for
    a tool or benchmark that holds the mesh secret (the operator).

    `read_only=True` for a process that only calls others and will not live
    long (a benchmark's or a tool's client): its DHT node enters no routing
    table (see shared/dht/PROTOCOL.md), so its exit leaves no dead contact.
    """
    credential = mesh_credential(config, role)
    state_dir = config.data_dir / "nodes" / name
    identity = NodeIdentity.load_or_create(state_dir / "node.key")
    discovery = KademliaDiscovery(
        identity=identity,
        mesh=credential,
        host=config.dht_host,
        port=config.dht_port,
        seeds=config.bootstrap,
        neighbours_path=None if read_only else state_dir / "neighbours.json",
        ttl=config.record_ttl,
        read_only=read_only,
    )
    await stack.enter_async_context(discovery)
    mesh = MeshClient(discovery, credential.client, max_message_bytes=config.max_message_bytes)
    await stack.enter_async_context(mesh)
    return MeshNode(name, config, identity, credential, discovery, mesh)


async def serve(
    service: str,
    build: Build,
    config: MeshConfig,
    *,
    topics: Sequence[str] | None = None,
    load: Callable[[], Mapping[str, Any]] | None = None,
    topic_load: Callable[[str], Mapping[str, Any]] | None = None,
    hidden: Callable[[], Iterable[str]] | None = None,
    ready: Callable[[dict[str, Any]], None] | None = None,
    stop: asyncio.Event | None = None,
    drain_timeout: float = 10.0,
    role: str | None = None,
) -> None:
    """Run `service` until `stop` is set (or SIGTERM/SIGINT), then shut down.

    `load()` goes into every record; `topic_load(topic)` adds to one topic's;
    `hidden()` names the topics not to announce now (withdrawn until it stops
    naming them; see `Announcer`).
    `role`: the member role the process acts in; None means the service's
    own (shared/roles.py).
    """
    stop = stop or _stop_on_signals()
    node_name = config.node_name or service
    async with AsyncExitStack() as stack:
        node = await join_mesh(stack, node_name, config, role=role or service)
        if service != "metrics":  # the metrics service records its own locally
            await stack.enter_async_context(MetricsReporter.for_node(node, node.metrics, service=service))
        handlers = await build(stack, node)
        server = RpcServer(
            Dispatcher(*handlers),
            curve=node.identity.curve,
            members=node.credential.roster,
            host=config.rpc_host,
            port=config.rpc_port,
            advertise_host=config.advertised_host,
            max_message_bytes=config.max_message_bytes,
            limits=Limits(
                max_depth=config.rpc_max_depth,
                public_max_items=config.rpc_public_max_items,
                max_in_flight=config.rpc_max_in_flight,
                public_max_in_flight=config.rpc_public_max_in_flight,
                peer_max_in_flight=config.rpc_peer_max_in_flight,
                public_max_timeout=config.rpc_public_max_timeout,
                stall_timeout=config.rpc_stall_timeout,
            ),
            drain_timeout=drain_timeout,
            observe=_request_counter(node.metrics, service),
        )
        await stack.enter_async_context(server)

        def current_load() -> dict[str, Any]:
            return {"in_flight": server.in_flight, **(load() if load else {})}

        announcer = Announcer(
            node.discovery, list(topics or [service_topic(service)]), service=service,
            endpoint=server.endpoint, version=VERSION, load=current_load, topic_load=topic_load,
            hidden=hidden, ttl=config.record_ttl,
        )
        await stack.enter_async_context(announcer)
        node.announcer = announcer
        info = {"ready": service, "node": node_name, "id": node.identity.public_key.hex(),
                "endpoint": server.endpoint, "dht": node.discovery.address, "pid": os.getpid()}
        log.info("service ready", **info)
        (ready or _print_ready)(info)
        await stop.wait()
        log.info("service stopping", service=service)


def _request_counter(metrics: Metrics, service: str) -> Callable[[str, str, float], None]:
    """Count every RPC request by method and result code (RED: rate, errors, duration),
    and errors by code."""
    requests, errors = metrics.counter(REQUESTS), metrics.counter(RPC_ERRORS)
    duration = metrics.histogram(REQUEST_DURATION)

    def observe(method: str, status: str, seconds: float) -> None:
        if status == "ok":
            requests.inc(service=service, method=method, code="OK")
        else:
            requests.inc(service=service, method=method, code=status)
            errors.inc(service=service, code=status)
        duration.observe(seconds, service=service, method=method)

    return observe


def run(service: str, build: Build, config: MeshConfig, **options: Any) -> None:
    """The entry point of a service process: logging and traces, then `serve` until signalled."""
    configure_logging(config.log_level, config.log_format, service=service)
    configure_tracing(service, config.traces_endpoint)
    try:
        asyncio.run(serve(service, build, config, **options))
    except ConfigError as exc:
        print(f"{service}: configuration error:\n  " + "\n  ".join(exc.problems), file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        shutdown_tracing()  # the spans still buffered are exported before the process ends


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def _print_ready(info: dict[str, Any]) -> None:
    print(json.dumps(info), flush=True)
