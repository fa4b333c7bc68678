"""A client's way into the mesh: a short-lived DHT node and a public CURVE key.

The CLI is not a mesh member: it holds the mesh's public id (to check that the
records it finds were announced by members) and a throwaway CurveZMQ key pair,
so it can call public methods only -- authenticated by the token or API key it
passes, like any other client on the network.
"""

from __future__ import annotations

import os
import socket
from contextlib import AsyncExitStack
from pathlib import Path

from nacl.public import PrivateKey

from shared.dht import KademliaDiscovery
from shared.errors import Unavailable
from shared.identity import CurveKeyPair, MeshCredential, MeshId, NodeIdentity
from shared.rpc import MeshClient, ServiceClient

__all__ = ["ClientSession", "SessionError", "resolve_mesh_id"]

DEFAULT_BOOTSTRAP = "127.0.0.1:7400"


class SessionError(Exception):
    """The client cannot reach or recognise the mesh (a one-line message)."""


def resolve_mesh_id(data_dir: Path) -> MeshId:
    """`INFERSWARM_MESH_ID`, else the id of the local stack's mesh secret."""
    text = os.environ.get("INFERSWARM_MESH_ID")
    if text:
        return MeshId.from_text(text)
    secret_path = data_dir / "mesh.secret"
    if secret_path.exists():
        return MeshId(MeshCredential.from_text(secret_path.read_text()).mesh_id)
    raise SessionError(
        f"no mesh id: set INFERSWARM_MESH_ID (printed by `inferswarm up`) "
        f"or run next to the stack's data directory ({data_dir})"
    )


def source_address(seed: str) -> str:
    """The local address this host sends from to reach `seed` ("host:port").

    The client's DHT node binds there: 127.0.0.1 for a stack on this machine,
    the right interface's address for a mesh on another host. Connecting a
    UDP socket sends nothing; it only asks the kernel for the route.
    """
    host, _, port = seed.rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host.strip("[]") or "127.0.0.1", int(port)))
            return probe.getsockname()[0]
    except (OSError, ValueError):
        return "127.0.0.1"  # an unreachable seed: joining fails with the usual message


class ClientSession:
    """Lookup-only DHT node + mesh client with a public key, for one command."""

    def __init__(self, bootstrap: list[str], mesh_id: MeshId, *, timeout: float = 30.0) -> None:
        self._bootstrap = bootstrap or [DEFAULT_BOOTSTRAP]
        self._mesh_id = mesh_id
        self.timeout = timeout
        self._stack = AsyncExitStack()
        self.mesh: MeshClient | None = None

    async def __aenter__(self) -> ClientSession:
        discovery = KademliaDiscovery(
            identity=NodeIdentity.generate(), mesh=self._mesh_id, host=source_address(self._bootstrap[0]),
            port=0, seeds=self._bootstrap, rpc_timeout=1.0,
        )
        await self._stack.enter_async_context(discovery)
        if not discovery.joined:
            await self._stack.aclose()
            seeds = ", ".join(self._bootstrap)
            raise SessionError(f"cannot reach the mesh at {seeds} (is `inferswarm up` running?)")
        keys = CurveKeyPair.from_private(PrivateKey.generate())
        self.mesh = MeshClient(discovery, keys, default_timeout=self.timeout)
        await self._stack.enter_async_context(self.mesh)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    def __call__(self, service: str) -> ServiceClient:
        if self.mesh is None:
            raise Unavailable("session not open")
        return self.mesh(service)
