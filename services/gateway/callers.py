"""Who is calling: an API key (through auth's `KeyValidator`) or a dashboard token.

Keys are validated by auth's `KeyValidator` (services/auth/client), which
caches answers and stops honouring a revoked key within one second. Tokens go
to `auth.verify_token` (`AuthClient.verify_token`, checked against auth's
database); an answer is reused for at most `token_ttl` (1 s), so a disabled
account's token stops working within that too.

Both wait for auth until the request's `deadline` (the caller's), at most
`max_timeout` (`INFERSWARM_GATEWAY_AUTH_TIMEOUT`, 30 s) per call; a deadline
already passed is `TIMEOUT` without a call.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidParams, Unauthenticated
from services.auth.client import MAX_TOKEN_LENGTH, AuthClient, KeyValidator
from services.gateway.budget import budget

__all__ = ["Caller", "Callers"]

_MAX_TOKENS_CACHED = 10_000


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller and what their tier allows."""

    user_id: int
    key_id: int | None
    tier: str
    limits: Mapping[str, Any]
    priority: int
    is_admin: bool = False  #: known from a token (an API key never acts as an admin)


class Callers:
    """Turns `api_key` / `token` parameters into a `Caller`, or `UNAUTHENTICATED`."""

    def __init__(self, validator: KeyValidator, auth: AuthClient, *, token_ttl: float = 1.0,
                 max_timeout: float = 30.0) -> None:
        self._validator = validator
        self._auth = auth
        self._token_ttl = token_ttl
        self._max_timeout = max_timeout
        self._tokens: dict[bytes, tuple[float, Caller]] = {}

    async def identify(self, api_key: str | None, token: str | None, *, deadline: float | None = None) -> Caller:
        """The caller behind `api_key` or `token`, asking auth until `deadline` (time.monotonic()) at most."""
        if api_key is not None and token is not None:
            raise InvalidParams("give an api_key or a token, not both", {"param": "token"})
        if api_key is not None:
            answer = await self._validator.validate(api_key, deadline=deadline)
            return Caller(answer["user_id"], answer["key_id"], answer["tier"], answer["limits"],
                          int(answer.get("priority") or 0))
        if token is not None:
            return await self._by_token(token, deadline)
        raise Unauthenticated("an API key (api_key) or a session token (token) is required")

    async def _by_token(self, token: str, deadline: float | None) -> Caller:
        if not 0 < len(token) <= MAX_TOKEN_LENGTH:
            raise Unauthenticated("invalid token")
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._tokens.get(digest)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        timeout = budget(deadline, self._max_timeout, "verify the session token")
        answer = await self._auth.verify_token(token=token, timeout=timeout)
        caller = Caller(answer["id"], None, answer["tier"], answer["limits"], int(answer.get("priority") or 0),
                        is_admin=answer.get("is_admin") is True)
        if len(self._tokens) >= _MAX_TOKENS_CACHED:
            self._tokens.clear()
        self._tokens[digest] = (now + self._token_ttl, caller)  # from before the call: never older
        return caller
