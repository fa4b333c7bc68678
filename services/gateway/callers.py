"""Who is calling: an API key (through auth's `KeyValidator`) or a dashboard token.

Keys are validated by auth's `KeyValidator` (services/auth/client), which
caches answers and stops honouring a revoked key within one second. Tokens go
to `auth.verify_token` (`AuthClient.verify_token`, checked against auth's
database); an answer is kept in a `TokenCache` that the same validator's
invalidation loop keeps in step (`sync_also`): a logout, a "log out
everywhere", a password change, a disabled account, a tier or admin change
evicts the user's cached sessions within the loop's second, as for keys. An
answer is used only while that loop is trusted, for at most `token_ttl` (60 s)
and never past the token's own expiry.

Both wait for auth until the request's `deadline` (the caller's), at most
`max_timeout` (`INFERSWARM_GATEWAY_AUTH_TIMEOUT`, 30 s) per call; a deadline
already passed is `TIMEOUT` without a call.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import Forbidden, InvalidParams, Unauthenticated
from services.auth.client import MAX_TOKEN_LENGTH, AuthClient, KeyValidator
from services.gateway.budget import budget
from services.gateway.quota import COUNTERS, Scope, money_units, subject_of

__all__ = ["Caller", "Callers", "TokenCache", "scopes_of"]

_MAX_TOKENS_CACHED = 10_000


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller and what they may use: the limits of each scope they
    answer to (their key, their account, their organisation; `scopes_of`)."""

    user_id: int
    key_id: int | None
    tier: str
    scopes: tuple[Scope, ...]
    priority: int
    is_admin: bool = False  #: known from a token (an API key never acts as an admin)
    #: The models an API key may name (its allow-list); None: every model (and a session token).
    allowed_models: tuple[str, ...] | None = None
    currency: str | None = None  #: of the money limits (auth's `currency`)

    def check_model(self, model: str) -> None:
        """`FORBIDDEN` naming `model` when the caller's key may not use it."""
        if self.allowed_models is not None and model not in self.allowed_models:
            raise Forbidden(f"this API key may not use model {model!r}",
                            {"param": "model", "allowed": list(self.allowed_models)})


class TokenCache:
    """Callers by token digest, evicted by user (see the module doc)."""

    def __init__(self, max_entries: int = _MAX_TOKENS_CACHED) -> None:
        self._entries: dict[bytes, tuple[float, Caller]] = {}  #: digest -> (until, caller), monotonic
        self._by_user: dict[int, set[bytes]] = {}
        self._max_entries = max_entries
        self.epoch = 0  #: counts evictions: an answer fetched across one is not kept

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: float) -> Caller | None:
        entry = self._entries.get(digest)
        return entry[1] if entry is not None and entry[0] > now else None

    def put(self, digest: bytes, caller: Caller, until: float) -> None:
        if len(self._entries) >= self._max_entries:
            self.clear()
        self._entries[digest] = (until, caller)
        self._by_user.setdefault(caller.user_id, set()).add(digest)

    def evict(self, *, key_id: int | None = None, user_id: int | None = None) -> int:
        self.epoch += 1
        digests = self._by_user.pop(user_id, set()) if user_id is not None else set()
        for digest in digests:
            self._entries.pop(digest, None)
        return len(digests)

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()
        self._by_user.clear()


class Callers:
    """Turns `api_key` / `token` parameters into a `Caller`, or `UNAUTHENTICATED`."""

    def __init__(self, validator: KeyValidator, auth: AuthClient, *, token_ttl: float = 60.0,
                 max_timeout: float = 30.0) -> None:
        self._validator = validator
        self._auth = auth
        self._token_ttl = token_ttl
        self._max_timeout = max_timeout
        self._tokens = TokenCache()
        validator.sync_also(self._tokens)
        #: the Caller made of each answer the validator keeps (by its identity): a new answer, a new Caller
        self._keys: dict[int, tuple[Mapping[str, Any], Caller]] = {}

    @property
    def sessions_cached(self) -> int:
        """Session tokens whose answer is kept (shown by `gateway.health`)."""
        return len(self._tokens)

    async def identify(self, api_key: str | None, token: str | None, *, deadline: float | None = None) -> Caller:
        """The caller behind `api_key` or `token`, asking auth until `deadline` (time.monotonic()) at most."""
        if api_key is not None and token is not None:
            raise InvalidParams("give an api_key or a token, not both", {"param": "token"})
        if api_key is not None:
            answer = await self._validator.validate(api_key, deadline=deadline)
            known = self._keys.get(id(answer))
            if known is not None and known[0] is answer:  # the validator's cached answer: the same caller
                return known[1]
            allowed = answer.get("allowed_models")
            caller = Caller(answer["user_id"], answer["key_id"], answer["tier"], scopes_of(answer, answer["user_id"]),
                            int(answer.get("priority") or 0),
                            allowed_models=tuple(allowed) if isinstance(allowed, list) else None,
                            currency=answer.get("currency"))
            if len(self._keys) >= _MAX_TOKENS_CACHED:
                self._keys.clear()
            self._keys[id(answer)] = (answer, caller)  # holding the answer: its id is not reused meanwhile
            return caller
        if token is not None:
            return await self._by_token(token, deadline)
        raise Unauthenticated("an API key (api_key) or a session token (token) is required")

    async def _by_token(self, token: str, deadline: float | None) -> Caller:
        if not 0 < len(token) <= MAX_TOKEN_LENGTH:
            raise Unauthenticated("invalid token")
        digest = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        trusted = self._validator.trusted
        cached = self._tokens.get(digest, now) if trusted else None
        if cached is not None:
            return cached
        epoch = self._tokens.epoch
        timeout = budget(deadline, self._max_timeout, "verify the session token")
        answer = await self._auth.verify_token(token=token, timeout=timeout)
        caller = Caller(answer["id"], None, answer["tier"], scopes_of(answer, answer["id"]),
                        int(answer.get("priority") or 0), is_admin=answer.get("is_admin") is True,
                        currency=answer.get("currency"))
        if trusted and self._validator.trusted and self._tokens.epoch == epoch:  # no eviction meanwhile
            until = min(now + self._token_ttl, now + _seconds_left(token))  # from before the call: never older
            self._tokens.put(digest, caller, until)
        return caller


def scopes_of(answer: Mapping[str, Any], user_id: int) -> tuple[Scope, ...]:
    """The scopes of auth's answer (`scopes`: [{scope, id, limits}]; an older auth's
    `limits` alone: the user's), money limits as units of 1e-10."""
    listed = answer.get("scopes")
    if not isinstance(listed, list):
        listed = [{"scope": "user", "id": user_id, "limits": answer.get("limits") or {}}]
    return tuple(Scope(subject_of(item["scope"], int(item["id"])), _limits(item.get("limits") or {}))
                 for item in listed)


def _limits(limits: Mapping[str, Any]) -> dict[str, int | None]:
    """Counter -> limit in the counter's units; names this gateway does not know are ignored."""
    out: dict[str, int | None] = {}
    for name, counter in COUNTERS.items():
        value = limits.get(name)
        if value is None:
            out[name] = None
        elif counter.unit == "money":
            out[name] = money_units(str(value))
        else:
            out[name] = int(value)
    return out


def _seconds_left(token: str) -> float:
    """Seconds until the token's own `exp` (auth verified it just now; this only reads it)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"]) - time.time()
    except (IndexError, ValueError, KeyError, TypeError):
        return 0.0  # unreadable: not cached
