"""A client's way into the mesh: cached providers, a DHT node only when needed, a public CURVE key.

The CLI is not a mesh member: it holds the mesh's public id (to check that the
records it finds were announced by members) and a throwaway CurveZMQ key pair,
so it can call public methods only -- authenticated by the token or API key it
passes, like any other client on the network. The operator's commands
(`inferswarm admin grant`) are the exception: given the mesh secret
(`member.py`), they call with the mesh client key instead.

Which mesh, and where to join it:

* the mesh id: `INFERSWARM_MESH_ID`, else the `mesh.secret` of an explicitly
  given data directory (`--data-dir`, `INFERSWARM_DATA_DIR`), else the
  `mesh.json` that `inferswarm up` wrote on this machine (`localmesh.py`);
* the bootstrap: `--bootstrap` / `INFERSWARM_BOOTSTRAP`, else `mesh.json`'s
  (when it describes that same mesh), else 127.0.0.1:7400.

The current directory plays no part.
"""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack
from pathlib import Path

from nacl.public import PrivateKey

from inferswarm.config import client_config
from inferswarm.localmesh import load_local_mesh, mesh_file
from inferswarm.providers import CachedDiscovery, ProviderFile, cache_path, verifier_for
from shared.dht import KademliaDiscovery
from shared.errors import Unavailable
from shared.identity import CurveKeyPair, MeshCredential, MeshId, NodeIdentity
from shared.rpc import MeshClient, ServiceClient

__all__ = ["ClientSession", "SessionError", "resolve_mesh_id", "resolve_bootstrap"]

DEFAULT_BOOTSTRAP = "127.0.0.1:7400"


class SessionError(Exception):
    """The client cannot reach or recognise the mesh (a one-line message)."""


def resolve_mesh_id(data_dir: Path | None = None) -> MeshId:
    """`INFERSWARM_MESH_ID`, else `data_dir`'s mesh secret, else the local stack's `mesh.json`."""
    text = client_config().mesh_id
    if text:
        return _mesh_id(text, "INFERSWARM_MESH_ID")
    if data_dir is not None:
        secret_path = data_dir / "mesh.secret"
        try:
            return MeshId(MeshCredential.from_text(secret_path.read_text()).mesh_id)
        except (OSError, ValueError) as exc:
            raise SessionError(f"no mesh id in the data directory {data_dir} ({_reason(exc)}): "
                               f"set INFERSWARM_MESH_ID (printed by `inferswarm up`) instead") from None
    local = load_local_mesh()
    if local is not None:
        return _mesh_id(local.mesh_id, str(mesh_file()))
    raise SessionError(
        f"no mesh id: start a stack on this machine with `inferswarm up` (it writes {mesh_file()}), "
        f"or set INFERSWARM_MESH_ID and INFERSWARM_BOOTSTRAP (both printed by `inferswarm up`)"
    )


def resolve_bootstrap(explicit: str | None, mesh_id: MeshId) -> list[str]:
    """The seeds to join through: `explicit`, else the local stack's if it is `mesh_id`'s mesh."""
    if not explicit:
        local = load_local_mesh()
        same_mesh = local is not None and local.mesh_id.lower() == mesh_id.mesh_id.hex()
        explicit = local.bootstrap if same_mesh else DEFAULT_BOOTSTRAP
    return [seed.strip() for seed in explicit.split(",") if seed.strip()] or [DEFAULT_BOOTSTRAP]


def _mesh_id(text: str, source: str) -> MeshId:
    try:
        return MeshId.from_text(text)
    except ValueError as exc:
        raise SessionError(f"{source}: {exc}") from None


def _reason(exc: Exception) -> str:
    return "no mesh.secret" if isinstance(exc, FileNotFoundError) else str(exc)


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
    """Discovery and a mesh client with a public key, for one command.

    Lookups are answered from the provider cache when it can (`cache_dir`,
    e.g. `cache_dir()` of `localmesh`; None keeps it in memory); only when it
    cannot does the session start a read-only DHT node and join the mesh, so
    a command whose providers are cached sends no datagram at all.
    """

    def __init__(self, bootstrap: list[str], mesh_id: MeshId, *, timeout: float = 30.0,
                 cache_dir: Path | None = None, keys: CurveKeyPair | None = None) -> None:
        self._bootstrap = bootstrap or [DEFAULT_BOOTSTRAP]
        self._mesh_id = mesh_id
        self.timeout = timeout
        self._cache_dir = cache_dir
        #: The CURVE key to call with: a throwaway one, or a member's (`MeshCredential.client`).
        self._keys = keys
        self._stack = AsyncExitStack()
        self.discovery: CachedDiscovery | None = None
        self.mesh: MeshClient | None = None

    async def __aenter__(self) -> ClientSession:
        store = None
        if self._cache_dir is not None:
            store = ProviderFile(cache_path(self._mesh_id, self._cache_dir), verifier_for(self._mesh_id))
        self.discovery = CachedDiscovery(self._join, store)
        keys = self._keys or CurveKeyPair.from_private(PrivateKey.generate())
        self.mesh = MeshClient(self.discovery, keys, default_timeout=self.timeout)
        await self._stack.enter_async_context(self.mesh)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    def __call__(self, service: str) -> ServiceClient:
        if self.mesh is None:
            raise Unavailable("session not open")
        return self.mesh(service)

    async def _join(self) -> KademliaDiscovery:
        """A read-only DHT node joined to the mesh, closed with the session."""
        node = KademliaDiscovery(
            identity=NodeIdentity.generate(), mesh=self._mesh_id, host=source_address(self._bootstrap[0]),
            port=0, seeds=self._bootstrap, rpc_timeout=1.0, read_only=True,
        )
        await node.start()
        if not node.joined:
            await node.close()
            seeds = ", ".join(self._bootstrap)
            raise SessionError(f"cannot reach the mesh at {seeds} (is `inferswarm up` running?)")
        self._stack.push_async_callback(node.close)
        return node
