"""The web service's view of the mesh: typed clients of auth, gateway and metrics.

The web process is a mesh member; everything it shows or does goes through
`upstream.auth` (`AuthClient`), `upstream.gateway` (`GatewayClient`) and
`upstream.metrics` (`MetricsClient`), each call with a deadline (`rpc_timeout`,
or `infer_timeout` for a stream). Calls the servers declare idempotent may be
retried by the mesh client on another provider. A caller's `gateway.infer`,
`embed` and `quota` go to its own gateway, chosen by its key (`GatewayClient`;
services/gateway/README.md, "Key-affine gateways"). Open inference streams
are tracked so that a shutdown closes them, which cancels the work upstream.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shared.errors import Unauthenticated
from shared.rpc import MeshClient, Stream
from services.auth.client import AuthClient, TokenVerifier
from services.gateway.client import GatewayClient
from services.metrics.client import MetricsClient

__all__ = ["Upstream", "model_rows"]

_KEY_REFRESH_S = 300.0


class Upstream:
    """Typed, deadline-bound calls from the web service to the other services."""

    def __init__(self, mesh: MeshClient, *, rpc_timeout: float = 10.0, infer_timeout: float = 300.0) -> None:
        self.rpc_timeout = rpc_timeout
        self.infer_timeout = infer_timeout
        self.auth = AuthClient(mesh("auth"), timeout=rpc_timeout)
        self._gateways = mesh("gateway")
        self.gateway = GatewayClient(self._gateways, timeout=rpc_timeout)
        self.metrics = MetricsClient(mesh("metrics"), timeout=rpc_timeout)
        self._verifier: TokenVerifier | None = None
        self._verifier_at = 0.0
        self._verifier_lock = asyncio.Lock()
        self._streams: set[Stream] = set()

    async def infer(self, params: dict[str, Any]) -> Stream:
        """Start `gateway.infer` (`params`: its keyword parameters); the caller iterates the
        stream and must close it."""
        stream = await self.gateway.infer(**params, timeout=self.infer_timeout)
        self._streams.add(stream)
        return stream

    async def release(self, stream: Stream) -> None:
        """Close a stream (sending CANCEL if it is still running) and forget it."""
        self._streams.discard(stream)
        await stream.aclose()

    async def close(self) -> None:
        """Cancel every inference still streaming (the process is stopping)."""
        streams, self._streams = list(self._streams), set()
        for stream in streams:
            await stream.aclose()

    async def gateway_keys(self) -> list[str]:
        """The node keys (hex, sorted) of the gateways the mesh knows live now: the keys that
        sign usage receipts. From the same verified, role-bound records (and the same cached
        lookup) that `gateway.*` calls are routed by; `UNAVAILABLE` (503) when none is live."""
        providers = await self._gateways.providers(timeout=self.rpc_timeout)
        return sorted({provider.node_hex for provider in providers})

    async def verifier(self) -> TokenVerifier:
        """Verifies session tokens locally, with auth's public key (refetched every 5 minutes)."""
        async with self._verifier_lock:
            if self._verifier is None or time.monotonic() - self._verifier_at > _KEY_REFRESH_S:
                info = await self.auth.token_key()
                self._verifier = TokenVerifier(info["public_key"], issuer=info["issuer"],
                                               audience=info["audience"])
                self._verifier_at = time.monotonic()
            return self._verifier

    async def verify_token(self, token: str) -> dict[str, Any]:
        """The claims of a valid session token (no RPC once the key is known)."""
        if not token:
            raise Unauthenticated("not logged in")
        return (await self.verifier()).verify(token)


def model_rows(answer: Any) -> list[dict[str, Any]]:
    """`gateway.models` as rows `{name, workers (healthy), total_workers, ...}`."""
    if isinstance(answer, dict) and "models" in answer:
        answer = answer["models"]
    if isinstance(answer, dict):
        answer = [{"name": name, **(facts if isinstance(facts, dict) else {})} for name, facts in answer.items()]
    rows = []
    for item in answer or []:
        if isinstance(item, str):
            item = {"name": item}
        if isinstance(item, dict):
            name = item.get("name") or item.get("id") or item.get("model")
            if isinstance(name, str):
                total = item.get("workers", 0)
                healthy = item.get("healthy_workers", total)
                rows.append({**item, "name": name, "workers": healthy if isinstance(healthy, int) else 0,
                             "total_workers": total if isinstance(total, int) else 0})
    return sorted(rows, key=lambda row: row["name"])
