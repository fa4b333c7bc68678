"""The API-key handlers of `AuthService`: create, edit, list, revoke, rotate, and
the gateways' `validate_key` and `invalidations`.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg

from shared.errors import InvalidParams, Unauthenticated
from shared.logging import get_logger
from shared.rpc import method
from services.auth import keys as apikeys
from services.auth import validation as check
from services.auth.key_edits import check_allowed_models, check_expiry
from services.auth.limits import BUDGET_NAMES, check_limits, limits_of
from services.auth.org_methods import add_org_scope, org_id_of
from services.auth.service_base import KEEP, AuthBase, check_id, iso

__all__ = ["KeyMethods"]

log = get_logger(__name__)

_MAX_REFUSALS = 10_000
#: Rotation: how long the old key keeps working by default, and at most (30 days).
DEFAULT_OVERLAP_S = 86_400
MAX_OVERLAP_S = 30 * 86_400


def _key_view(key: asyncpg.Record) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    if key["revoked_at"] is not None:
        status = "revoked"
    elif key["expires_at"] is not None and key["expires_at"] <= now:
        status = "expired"
    else:
        status = "active"
    return {
        "id": key["id"], "name": key["name"], "prefix": key["prefix"], "status": status,
        "created_at": iso(key["created_at"]), "last_used_at": iso(key["last_used_at"]),
        "expires_at": iso(key["expires_at"]), "revoked_at": iso(key["revoked_at"]),
        "rotated_from": key["rotated_from"],
        "allowed_models": list(key["allowed_models"]) if key["allowed_models"] is not None else None,
        "limits": limits_of(key),
        "org_id": key["org_id"],  # None: a personal key
    }


def _scopes(row: asyncpg.Record, user_limits: dict[str, Any]) -> list[dict[str, Any]]:
    """What a gateway enforces for a key: every counter of every scope (README.md, "Per-key
    limits and budgets"); the key scope only when the key has a limit of its own."""
    scopes = [{"scope": "user", "id": row["user_id"], "limits": user_limits}]
    own = limits_of(row)
    if any(value is not None for value in own.values()):
        scopes.append({"scope": "key", "id": row["id"], "limits": own})
    return scopes


class KeyMethods(AuthBase):
    """`auth.*_key` and the gateways' key checks."""

    # -- API keys --------------------------------------------------------------------

    @method(public=True)
    async def create_key(
        self, token: str, name: str, expires_in_days: int | None = None, expires_at: str | None = None,
        allowed_models: list[str] | None = None, limits: dict[str, Any] | None = None,
        org: int | str | None = None,
    ) -> dict[str, Any]:
        """A new API key; the `api_key` field is the only time it is ever shown. It expires
        after `expires_in_days` or at `expires_at` (ISO 8601; not both; default never), may
        name only `allowed_models` (1-64 model names; default every model), has its own
        `limits` (any of limits.LIMIT_NAMES; default none but the user's), and with `org`
        (an organisation of the caller's, by id or name) is that organisation's key."""
        user = await self._authenticate(token)
        name = check.check_name(name)
        when = None
        if expires_in_days is not None and expires_at is not None:
            raise InvalidParams("give expires_in_days or expires_at, not both", {"param": "expires_at"})
        if expires_in_days is not None:
            if not 1 <= expires_in_days <= self._max_key_days:
                raise InvalidParams(
                    f"expires_in_days must be 1-{self._max_key_days}", {"param": "expires_in_days"}
                )
            when = datetime.now(timezone.utc) + timedelta(days=expires_in_days)
        elif expires_at is not None:
            when = check_expiry(expires_at, max_days=self._max_key_days)
        models = check_allowed_models(allowed_models) if allowed_models is not None else None
        own = check_limits(limits) if limits is not None else {}
        org_id = await org_id_of(self._orgs, org, user["id"])
        api_key = apikeys.generate_key()
        key = await self.store.create_key(
            user["id"], name, apikeys.hash_key(api_key), apikeys.display_prefix(api_key),
            when, max_keys=self._max_keys, allowed_models=models, limits=own, org_id=org_id,
        )
        log.info("api key created", user_id=user["id"], key_id=key["id"])
        return {**_key_view(key), "api_key": api_key}

    @method(public=True)
    async def update_key(
        self, token: str, key_id: int, name: Any = KEEP, expires_at: Any = KEEP, allowed_models: Any = KEEP,
        limits: Any = KEEP,
    ) -> dict[str, Any]:
        """Edit one of the caller's keys: its `name`, `expires_at` (ISO 8601, in the future;
        null: never expires), `allowed_models` (1-64 model names; null: every model) or
        `limits` (a map of some limits to values; null: none; a limit left out is kept). A
        parameter left out is kept. Gateways drop their cached answer for the key within a
        second. `CONFLICT` for a revoked key, `NOT_FOUND` for anyone else's."""
        user = await self._authenticate(token)
        key_id = check_id(key_id, "key_id")
        changes: dict[str, Any] = {}
        if name is not KEEP:
            if not isinstance(name, str):
                raise InvalidParams("name must be text", {"param": "name"})
            changes["name"] = check.check_name(name)
        if expires_at is not KEEP:
            changes["expires_at"] = None if expires_at is None else check_expiry(
                expires_at, max_days=self._max_key_days)
        if allowed_models is not KEEP:
            changes["allowed_models"] = None if allowed_models is None else check_allowed_models(allowed_models)
        if limits is not KEEP:
            changes.update(check_limits(limits))
        if not changes:
            raise InvalidParams("nothing to change: give name, expires_at, allowed_models or limits",
                                {"param": "name"})
        key = await self.store.update_key(user["id"], key_id, changes)
        self.cache.evict(key_id=key_id)  # here at once; other instances and gateways via the log
        log.info("api key updated", user_id=user["id"], key_id=key_id, fields=sorted(changes))
        return _key_view(key)

    @method(public=True, idempotent=True)
    async def list_keys(self, token: str) -> list[dict[str, Any]]:
        """The caller's keys, newest last: names, prefixes, dates, status; never a key."""
        user = await self._authenticate(token)
        return [_key_view(key) for key in await self.store.list_keys(user["id"])]

    @method(public=True, idempotent=True)
    async def revoke_key(self, token: str, key_id: int) -> dict[str, Any]:
        """Revoke one of the caller's keys, everywhere within a second."""
        user = await self._authenticate(token)
        key = await self.store.revoke_key(user["id"], check_id(key_id, "key_id"), user["id"])
        self.cache.evict(key_id=key_id)  # here at once; other instances via the log
        log.info("api key revoked", user_id=user["id"], key_id=key_id)
        return _key_view(key)

    @method(public=True)
    async def rotate_key(
        self, token: str, key_id: int, overlap_seconds: int = DEFAULT_OVERLAP_S
    ) -> dict[str, Any]:
        """Replace one of the caller's keys: a new key (`api_key` shown once) with the old
        one's name and expiry and `rotated_from` naming it; the old key keeps working for
        `overlap_seconds` (0..30 days; never longer than its own expiry) and is refused after
        that, everywhere within a second. `old_key` is the old key as it now is."""
        user = await self._authenticate(token)
        key_id = check_id(key_id, "key_id")
        if isinstance(overlap_seconds, bool) or not 0 <= overlap_seconds <= MAX_OVERLAP_S:
            raise InvalidParams(f"overlap_seconds must be 0-{MAX_OVERLAP_S} (30 days)",
                                {"param": "overlap_seconds"})
        api_key = apikeys.generate_key()
        old, new = await self.store.rotate_key(
            user["id"], key_id, apikeys.hash_key(api_key), apikeys.display_prefix(api_key),
            overlap_seconds, max_keys=self._max_keys,
        )
        self.cache.evict(key_id=key_id)  # its cached expiry is the old one; other instances via the log
        log.info("api key rotated", user_id=user["id"], key_id=key_id, new_key_id=new["id"],
                 overlap_seconds=overlap_seconds)
        return {**_key_view(new), "api_key": api_key, "old_key": _key_view(old)}

    @method(idempotent=True, roles=("gateway",))
    async def validate_key(self, api_key: str) -> dict[str, Any]:
        """Internal: who a key belongs to and what it may do, or `UNAUTHENTICATED`.

        From memory when the cache is trusted; `cursor` is the invalidation
        seq this answer reflects (callers caching it compare it with theirs).
        """
        # Cheap checks only before the cache: a hash found there is a real key.
        if not apikeys.MIN_KEY_LENGTH <= len(api_key) <= apikeys.MAX_KEY_LENGTH:
            raise Unauthenticated("invalid API key")
        key_hash = apikeys.hash_key(api_key)
        feed = self.feed
        if feed.trusted:
            entry = self.cache.get(key_hash)
            if entry is not None:
                self.housekeeper.touch(entry.key_id)
                return {**entry.result, "cursor": feed.cursor}
        refusal = self._refused.get(key_hash)
        if refusal is not None:
            raise Unauthenticated(refusal)
        if not apikeys.looks_like_key(api_key):
            raise Unauthenticated("invalid API key")
        return await self._validate_from_database(key_hash)

    async def _validate_from_database(self, key_hash: bytes) -> dict[str, Any]:
        epoch, cursor = self.cache.epoch, self.feed.cursor
        row = await self.store.key_by_hash(key_hash)
        if row is None or not apikeys.same_hash(row["key_hash"], key_hash):
            self._refuse(key_hash, "invalid API key")
        if row["revoked_at"] is not None:
            self._refuse(key_hash, "API key revoked")
        expires_at = row["expires_at"].timestamp() if row["expires_at"] is not None else None
        if expires_at is not None and expires_at <= datetime.now(timezone.utc).timestamp():
            self._refuse(key_hash, "API key expired")
        if not row["is_active"]:
            raise Unauthenticated("account disabled")  # not for good: it may be re-enabled
        tier = self._tiers[row["tier"]]
        user_limits = self._user_limits(row["tier"], {n: row[f"user_{n}"] for n in BUDGET_NAMES})
        result = {
            "user_id": row["user_id"], "key_id": row["id"], "tier": tier.name,
            "limits": user_limits, "priority": tier.priority, "expires_at": expires_at,
            "allowed_models": list(row["allowed_models"]) if row["allowed_models"] is not None else None,
            "scopes": _scopes(row, user_limits), "currency": self.currency,
        }
        await add_org_scope(self._orgs, result, row["id"])  # org_id; `scopes`: the user's, the org's
        # Cache only if no invalidation arrived while we read: it may concern this key.
        if self.cache.epoch == epoch:
            self.cache.put(key_hash, result, user_id=row["user_id"], key_id=row["id"],
                            expires_at=expires_at)
        self.housekeeper.touch(row["id"])
        return {**result, "cursor": cursor}

    def _refuse(self, key_hash: bytes, reason: str) -> None:
        if len(self._refused) >= _MAX_REFUSALS:
            del self._refused[next(iter(self._refused))]
        self._refused[key_hash] = reason
        raise Unauthenticated(reason)

    @method(idempotent=True, roles=("gateway",))
    async def invalidations(self, since: int | None = None, limit: int = 1000) -> dict[str, Any]:
        """Internal: invalidation entries after `since` (None: just the current cursor).

        `reset` means the caller's cursor is unknown here (pruned, or another
        database): drop the whole cache. `more` means call again at once.
        """
        if not 1 <= limit <= 10_000:
            raise InvalidParams("limit must be 1-10000", {"param": "limit"})
        if since is not None and not 0 <= since < 2**63:
            raise InvalidParams("since must be a cursor from a previous call", {"param": "since"})
        if since is None:
            _, newest, _ = await self.store.invalidations_since(2**62, 1)
            return {"cursor": newest, "entries": [], "reset": False, "more": False}
        rows, newest, oldest = await self.store.invalidations_since(since, limit)
        reset = since > newest or since < oldest - 1
        entries = [{"seq": r["seq"], "key_id": r["key_id"], "user_id": r["user_id"]} for r in rows]
        more = len(rows) == limit
        cursor = rows[-1]["seq"] if more else newest
        return {"cursor": cursor, "entries": entries, "reset": reset, "more": more}

