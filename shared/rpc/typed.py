"""The base of the services' typed clients (`services/<name>/client`).

A typed client wraps one `ServiceClient` and has one async method per RPC
method its callers use, with keyword parameters and a `TypedDict` answer.
Its `METHODS` table is the client's half of the wire contract: for each
client method, the wire name (`auth.login`) and whether a failed call may be
retried on another provider (`idempotent`, as the server declares it). The
tests check that table against the servers' `@method` declarations.

Parameters that are None are left out of the call, so the server's default
applies. Every method takes `timeout` (seconds; None: the client's default,
else the mesh client's). A method may pass `affinity` to `_call`/`_stream`
(bytes standing for its caller; never sent) so that one caller's calls go to
one provider: see "Affinity" in shared/rpc/mesh.py.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Self

from shared.rpc.client import Stream
from shared.rpc.mesh import MeshClient, ServiceClient

__all__ = ["TypedClient", "Wire"]


class Wire(NamedTuple):
    """One RPC method as a client calls it."""

    name: str  #: e.g. "auth.login"
    idempotent: bool = False
    stream: bool = False


class TypedClient:
    """One service's calls, by client method name (see `METHODS`)."""

    #: The service's name on the mesh ("auth"): `of(mesh)` asks `mesh(SERVICE)`.
    SERVICE: ClassVar[str] = ""
    #: Client method -> wire method.
    METHODS: ClassVar[dict[str, Wire]] = {}

    def __init__(self, service: ServiceClient, *, timeout: float | None = None) -> None:
        self.service = service
        self.timeout = timeout  #: the default of every call; None: the mesh client's

    @classmethod
    def of(cls, mesh: MeshClient, *, timeout: float | None = None) -> Self:
        """The client of this service on `mesh`."""
        return cls(mesh(cls.SERVICE), timeout=timeout)

    async def _call(self, method: str, timeout: float | None, *, affinity: bytes | None = None,
                    **params: Any) -> Any:
        wire = self.METHODS[method]
        return await self.service.call(
            wire.name, _present(params), timeout=self.timeout if timeout is None else timeout,
            idempotent=wire.idempotent, affinity=affinity)

    async def _stream(self, method: str, timeout: float | None, *, affinity: bytes | None = None,
                      **params: Any) -> Stream:
        wire = self.METHODS[method]
        return await self.service.stream(
            wire.name, _present(params), timeout=self.timeout if timeout is None else timeout,
            affinity=affinity)


def _present(params: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in params.items() if value is not None}
