"""`GatewayClient`: the gateway's RPC methods as typed calls.

    gateway = GatewayClient(mesh("gateway"))          # or GatewayClient.of(mesh)
    async with await gateway.infer(model="m", api_key=key, prompt="Hi") as stream:
        async for chunk in stream: ...

`infer` starts the stream (`gateway.infer`): chunks as `inference.generate`
sends them, the last one also carrying `request_id`, `rate_limit` and the
signed `receipt` (shared/receipts.py). The caller iterates the returned
`Stream` and must close it (closing a running stream cancels the work
upstream). Who may call what, and what each does, is
in services/gateway/service.py.

`infer`, `embed` and `quota` go to the caller's own gateway while it is
healthy (`caller_affinity`, and "Affinity" in shared/rpc/mesh.py), so a key
holds quota leases at one gateway, not at each (services/gateway/README.md,
"Key-affine gateways"); `models`, `status` and `health` go to any.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, TypedDict

from shared.rpc import Stream
from shared.rpc.typed import TypedClient, Wire
from services.metrics.client import HealthReport

__all__ = ["CounterFacts", "Embeddings", "GatewayClient", "GatewayHealth", "ModelEntry", "Models", "Quota",
           "caller_affinity"]


def caller_affinity(api_key: str | None = None, token: str | None = None) -> bytes | None:
    """What picks a caller's gateway (never sent): a digest of the API key; for a session
    token, of its user (the token's `sub`, read unverified: a routing hint only, the
    gateway verifies the token), so a user's tokens share a gateway, else of the token."""
    if api_key:
        seed = b"key:" + api_key.encode()
    elif token:
        subject = _subject(token)
        seed = b"user:" + subject.encode() if subject else b"token:" + token.encode()
    else:
        return None
    return hashlib.blake2b(seed, digest_size=16, person=b"gw-affinity").digest()


def _subject(token: str) -> str | None:
    """The `sub` claim of a JWT, unverified; None if it has none."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) else None


class ModelEntry(TypedDict):
    name: str
    workers: int
    healthy_workers: int
    capabilities: list[str]  #: "chat", "tools", "json", "embeddings": what any of its workers can do


class Embeddings(TypedDict):
    model: str
    vectors: list[bytes]  #: little-endian float32, one per text, in order
    dimensions: int
    usage: dict[str, int]
    request_id: str
    rate_limit: dict[str, CounterFacts]
    receipt: str  #: the signed usage receipt (shared/receipts.py)


class Models(TypedDict):
    models: list[ModelEntry]


class CounterFacts(TypedDict, total=False):
    """One counter (`requests_per_hour`, `requests_per_month`, `tokens_per_month`; money, as
    decimal strings: `spend_per_day`, `spend_per_month`), of the scope with the least left."""

    limit: int | str | None
    used: int | str | None
    remaining: int | str | None
    reset: float  #: epoch seconds: a window's end; the rolling hour's, when it is whole again
    scope: str  #: "key", "user" or "org" (absent without a limit)


class Quota(TypedDict):
    user_id: int
    tier: str
    priority: int
    rate_limit: dict[str, CounterFacts]
    currency: str | None  #: of the money counters


class GatewayHealth(TypedDict):
    status: str
    gateway: str
    live_gateways: int
    in_flight: int
    usage_unshipped: int
    usage_shipped: int
    requests: dict[str, int]  #: by status
    worker_retries: int
    streams_cut: int
    fallbacks: int  #: requests moved on to the next model of their chain
    sessions_cached: int
    dispatch: dict[str, int]  #: in_flight, waiting, capacity, waited, refused (dispatch.py)


class GatewayClient(TypedClient):
    """Typed calls to a gateway."""

    SERVICE = "gateway"
    METHODS = {
        "infer": Wire("gateway.infer", stream=True),
        "embed": Wire("gateway.embed"),
        "models": Wire("gateway.models", idempotent=True),
        "quota": Wire("gateway.quota", idempotent=True),
        "status": Wire("gateway.status", idempotent=True),
        "health": Wire("gateway.health", idempotent=True),
    }

    async def infer(
        self, *, model: str, api_key: str | None = None, token: str | None = None, stream: bool | None = None,
        fallback: bool | None = None, timeout: float | None = None, **generation: Any,
    ) -> Stream:
        """Start a generation with an API key or a session token. `model` is a model, an
        alias or `default`; `fallback=False` keeps it on the chain's first model.
        `generation` holds the parameters of the generation contract (shared/generation/:
        messages | prompt, max_tokens, temperature, top_p, stop, seed, tools, tool_choice,
        response_format...); None values are left out."""
        return await self._stream("infer", timeout, affinity=caller_affinity(api_key, token), model=model,
                                  api_key=api_key, token=token, stream=stream, fallback=fallback, **generation)

    async def embed(
        self, *, model: str, input: list[str], api_key: str | None = None, token: str | None = None,
        dimensions: int | None = None, timeout: float | None = None,
    ) -> Embeddings:
        """One vector per text (little-endian float32 bytes each), billed as prompt tokens."""
        return await self._call("embed", timeout, affinity=caller_affinity(api_key, token), model=model,
                                input=input, api_key=api_key, token=token, dimensions=dimensions)

    async def models(self, *, timeout: float | None = None) -> Models:
        return await self._call("models", timeout)

    async def quota(self, *, api_key: str | None = None, token: str | None = None,
                    timeout: float | None = None) -> Quota:
        return await self._call("quota", timeout, affinity=caller_affinity(api_key, token), api_key=api_key,
                                token=token)

    async def status(self, *, token: str, timeout: float | None = None) -> HealthReport:
        """The mesh's health report, for administrators (an admin's session token)."""
        return await self._call("status", timeout, token=token)

    async def health(self, *, timeout: float | None = None) -> GatewayHealth:
        return await self._call("health", timeout)
