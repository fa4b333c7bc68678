"""All of the auth service's SQL: accounts, keys, audit, invalidations, login failures.

Usernames and emails are looked up by their folded form (`validation.fold`,
computed here in Python and stored beside them), never by PostgreSQL's
`lower()`. Every query is parameterized. Database errors a caller can cause become domain
errors here: a taken username is `Conflict`; a taken email is told to the
service only (`create_user` returns None), which decides what the caller hears.
Changes that caches must hear about (`revoke_key`, `rotate_key`, `update_key`, `set_tier`, `set_active`,
`set_admin`, `set_budget`, sessions ending: `revoke_token`, `end_sessions`, and a tier's limits: tier_store.py) append to
the invalidation log and NOTIFY `INVALIDATION_CHANNEL` in the same
transaction as the change itself; see README.md, "Revocation".
Usage records live in `usage_store.py`.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg

from shared.db import unavailable_when_down
from shared.errors import Conflict, NotFound
from services.auth.limits import BUDGET_NAMES, LIMIT_NAMES, money_text
from services.auth.validation import fold

__all__ = ["AuthStore", "INVALIDATION_CHANNEL", "log_invalidation", "write_audit"]

INVALIDATION_CHANNEL = "auth_invalidations"
# Serializes writers of the invalidation log ("invalidt" in ASCII), so that
# seq order is commit order: a reader following `seq > cursor` skips nothing.
_INVALIDATION_LOCK = 0x696E7661_6C696474

_USER_COLUMNS = ("id, username, email, password_hash, tier, is_admin, is_active, created_at, session_epoch, "
                 "spend_per_day, spend_per_month")
#: A key's own limits (migration 0012), in `LIMIT_NAMES` order.
_LIMIT_COLUMNS = ", ".join(LIMIT_NAMES)
_KEY_COLUMNS = ("id, user_id, name, prefix, created_at, last_used_at, expires_at, revoked_at, rotated_from, "
                f"allowed_models, org_id, {_LIMIT_COLUMNS}")


@unavailable_when_down()
class AuthStore:
    """The auth tables, over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # -- users -------------------------------------------------------------------

    async def create_user(
        self, username: str, email: str, password_hash: str, *, tier: str
    ) -> asyncpg.Record | None:
        """Insert an account, never an admin. `Conflict` when the username is
        taken (also in another form of the same name, see `fold`); None, and
        nothing written, when only the email is (the caller decides what to say)."""
        async with self.pool.acquire() as conn, conn.transaction():
            user = await conn.fetchrow(
                f"INSERT INTO users (username, email, password_hash, tier, username_key, email_key) "
                f"VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING {_USER_COLUMNS}",
                username, email, password_hash, tier, fold(username), fold(email),
            )
            if user is not None:
                await _audit(conn, "user_registered", user["id"], user["id"], {"tier": tier})
                return user
        if await self.username_taken(username):
            raise Conflict("username already registered")
        return None

    async def username_taken(self, username: str) -> bool:
        """Whether an account has this username (folded; or exactly, for an unfolded one)."""
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM users WHERE username_key = $1 "
            "OR (username_key IS NULL AND username = $2))", fold(username), username,
        ))

    async def user_by_login(self, identifier: str) -> asyncpg.Record | None:
        """The account whose email (when `identifier` has an @) or username is
        `identifier` once folded; an account left without a folded name (see
        `fill_folded_names`) only by its exact stored name, which wins."""
        key = fold(identifier)
        column = "email" if "@" in key else "username"
        return await self.pool.fetchrow(
            f"SELECT {_USER_COLUMNS} FROM users WHERE {column}_key = $1 "
            f"OR ({column}_key IS NULL AND {column} = $2) ORDER BY {column} = $2 DESC LIMIT 1",
            key, identifier,
        )

    async def fill_folded_names(self) -> list[tuple[int, str]]:
        """Fold the names of accounts created before names were folded.

        Where older accounts' names fold to the same text (they were distinct
        under `lower()`), the oldest gets it and the others keep NULL: each is
        still found by its exact name, and no new account can take the folded
        one. Returns those (user id, column) for the operator to look at.
        """
        left: list[tuple[int, str]] = []
        if not await self.pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM users WHERE username_key IS NULL OR email_key IS NULL)"):
            return left  # the usual start: nothing to fold, no lock taken
        async with self.pool.acquire() as conn, conn.transaction():
            # Instances starting together take turns: the second finds nothing left.
            await conn.execute("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")
            for column in ("username", "email"):
                taken = {r["k"] for r in await conn.fetch(
                    f"SELECT {column}_key AS k FROM users WHERE {column}_key IS NOT NULL")}
                ids, keys = [], []
                for row in await conn.fetch(
                        f"SELECT id, {column} AS name FROM users WHERE {column}_key IS NULL ORDER BY id"):
                    key = fold(row["name"])
                    if key in taken:
                        left.append((row["id"], column))
                        continue
                    taken.add(key)
                    ids.append(row["id"])
                    keys.append(key)
                await conn.execute(
                    f"UPDATE users u SET {column}_key = t.key FROM unnest($1::bigint[], $2::text[]) "
                    f"AS t(id, key) WHERE u.id = t.id", ids, keys,
                )
        return left

    async def user_by_id(self, user_id: int) -> asyncpg.Record | None:
        return await self.pool.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1", user_id)

    async def session_user(self, user_id: int, jti: str, epoch: int) -> asyncpg.Record | None:
        """The account behind a session token, unless that token was revoked, alone or with
        every session of an older epoch (one query)."""
        return await self.pool.fetchrow(
            f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1 AND session_epoch = $3 "
            "AND NOT EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = $2)", user_id, jti, epoch,
        )

    async def end_sessions(self, user_id: int, epoch: int, *, password_hash: str | None = None,
                           event: str = "logged_out_everywhere") -> int | None:
        """End every session of the user (its epoch moves on), and set a new password hash
        if given; only while the epoch is still `epoch` (the caller's session). The new
        epoch, or None when the caller's session had ended meanwhile."""
        async with self.pool.acquire() as conn, conn.transaction():
            new_epoch = await conn.fetchval(
                "UPDATE users SET session_epoch = session_epoch + 1, "
                "password_hash = coalesce($3, password_hash) "
                "WHERE id = $1 AND session_epoch = $2 RETURNING session_epoch",
                user_id, epoch, password_hash,
            )
            if new_epoch is not None:
                await _audit(conn, event, user_id, user_id, {})
                await _invalidate(conn, event, user_id=user_id)  # cached sessions of the user go
        return new_epoch

    async def revoke_token(self, jti: str, user_id: int, expires_at: datetime) -> bool:
        """End one session token; False when it already was."""
        async with self.pool.acquire() as conn, conn.transaction():
            added = await conn.fetchval(
                "INSERT INTO revoked_tokens (jti, user_id, expires_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (jti) DO NOTHING RETURNING true", jti, user_id, expires_at,
            )
            if added:
                await _audit(conn, "logged_out", user_id, user_id, {})
                await _invalidate(conn, "logged_out", user_id=user_id)  # cached sessions of the user go
        return bool(added)

    async def list_users(self, limit: int, offset: int) -> list[asyncpg.Record]:
        """Accounts in the order they were created."""
        return await self.pool.fetch("SELECT * FROM users ORDER BY id LIMIT $1 OFFSET $2", limit, offset)

    async def find_user(self, ref: int | str) -> asyncpg.Record:
        """An account by id, username or email; `NotFound` otherwise."""
        user = await (self.user_by_id(ref) if isinstance(ref, int) else self.user_by_login(ref))
        if user is None:
            raise NotFound("no such user")
        return user

    async def set_password_hash(self, user_id: int, password_hash: str) -> None:
        await self.pool.execute(
            "UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash
        )

    async def set_admin(
        self, user_id: int, is_admin: bool, details: dict[str, Any]
    ) -> tuple[asyncpg.Record, bool]:
        """Grant or withdraw administration, audited; (the account, whether it changed).

        The only writer of `is_admin`: the operator's `auth.grant_admin` and
        `auth.revoke_admin`. No user is the actor: the audit row's `actor_id` is NULL.
        """
        event = "admin_granted" if is_admin else "admin_revoked"
        return await self._change_user(user_id, "is_admin", is_admin, event, None, details)

    async def set_tier(self, user_id: int, tier: str, actor_id: int) -> asyncpg.Record:
        """Change a user's tier, audited, and invalidate the user's cached keys."""
        return (await self._change_user(user_id, "tier", tier, "tier_changed", actor_id, None))[0]

    async def set_active(self, user_id: int, active: bool, actor_id: int) -> asyncpg.Record:
        """Disable or re-enable an account, audited, and invalidate its cached keys."""
        event = "user_enabled" if active else "user_disabled"
        return (await self._change_user(user_id, "is_active", active, event, actor_id, {}))[0]

    async def _change_user(
        self, user_id: int, column: Literal["is_admin", "tier", "is_active"], value: Any, event: str,
        actor_id: int | None, details: dict[str, Any] | None,
    ) -> tuple[asyncpg.Record, bool]:
        """Set one column of a user in one transaction; when it changed, audit `event`
        (`details`, or {"from", "to"} when None) and log an invalidation: caches of the
        user's keys and sessions must hear of it. (The account, whether it changed.)"""
        async with self.pool.acquire() as conn, conn.transaction():
            old = await conn.fetchval(f"SELECT {column} FROM users WHERE id = $1 FOR UPDATE", user_id)
            if old is None:
                raise NotFound("no such user")
            user = await conn.fetchrow(
                f"UPDATE users SET {column} = $2 WHERE id = $1 RETURNING {_USER_COLUMNS}", user_id, value
            )
            if old != value:
                await _audit(conn, event, user_id, actor_id, {"from": old, "to": value} if details is None else details)
                await _invalidate(conn, event, user_id=user_id)
            return user, old != value

    async def set_budget(self, user_id: int, budget: dict[str, Decimal | None], actor_id: int) -> asyncpg.Record:
        """Set a user's own money budgets (`budget`: some of `BUDGET_NAMES`, None clears); when
        they changed, audited (`budget_changed`, from and to) and logged as an invalidation of
        the user: every cached answer for their keys and sessions carries the old limits."""
        names = [n for n in BUDGET_NAMES if n in budget]
        async with self.pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1 FOR UPDATE", user_id)
            if old is None:
                raise NotFound("no such user")
            changed = [n for n in names if old[n] != budget[n]]
            if not changed:
                return old
            sets = ", ".join(f"{n} = ${i}" for i, n in enumerate(changed, start=2))
            user = await conn.fetchrow(f"UPDATE users SET {sets} WHERE id = $1 RETURNING {_USER_COLUMNS}",
                                       user_id, *(budget[n] for n in changed))
            details = {"from": {n: _plain(old[n]) for n in changed}, "to": {n: _plain(budget[n]) for n in changed}}
            await _audit(conn, "budget_changed", user_id, actor_id, details)
            await _invalidate(conn, "budget_changed", user_id=user_id)
            return user

    # -- API keys ------------------------------------------------------------------

    async def create_key(
        self, user_id: int, name: str, key_hash: bytes, prefix: str,
        expires_at: datetime | None, *, max_keys: int, allowed_models: list[str] | None = None,
        limits: dict[str, Any] | None = None, org_id: int | None = None,
    ) -> asyncpg.Record:
        """Store a new key's hash (and its model allow-list, None: every model; its own `limits`,
        `LIMIT_NAMES` to values, a name left out: none; its organisation, None: a personal key);
        `Conflict` past `max_keys` live keys; `NotFound` when the user is not (or no longer) a
        member of `org_id`."""
        limits = limits or {}
        async with self.pool.acquire() as conn, conn.transaction():
            # Lock the user row: concurrent creations count one after another.
            await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
            # The membership row is held until commit: a removal (which revokes the member's
            # organisation keys) waits for this key, and so revokes it too.
            if org_id is not None and await conn.fetchval(
                    "SELECT 1 FROM org_members WHERE org_id = $1 AND user_id = $2 FOR SHARE", org_id, user_id) is None:
                raise NotFound("no such organisation", {"param": "org"})
            live = await conn.fetchval(
                "SELECT count(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > now())", user_id,
            )
            if live >= max_keys:
                raise Conflict(f"at most {max_keys} live keys per account; revoke one first")
            key = await conn.fetchrow(
                f"INSERT INTO api_keys (user_id, name, key_hash, prefix, expires_at, allowed_models, org_id, "
                f"{_LIMIT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING {_KEY_COLUMNS}",
                user_id, name, key_hash, prefix, expires_at, allowed_models, org_id,
                *(limits.get(n) for n in LIMIT_NAMES),
            )
            details = {"key_id": key["id"], "name": name, "prefix": prefix, "allowed_models": allowed_models,
                       "limits": {n: _plain(v) for n, v in limits.items() if v is not None}, "org_id": org_id}
            await _audit(conn, "key_created", user_id, user_id, details)
            return key

    async def list_keys(self, user_id: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE user_id = $1 ORDER BY id", user_id
        )

    async def revoke_key(self, user_id: int, key_id: int, actor_id: int) -> asyncpg.Record:
        """Revoke one of `user_id`'s keys (again is a no-op); `NotFound` for anyone else's."""
        async with self.pool.acquire() as conn, conn.transaction():
            revoked = await conn.fetchrow(
                "SELECT revoked_at FROM api_keys WHERE id = $1 AND user_id = $2 FOR UPDATE",
                key_id, user_id,
            )
            if revoked is None:
                raise NotFound("no such key")
            if revoked["revoked_at"] is None:
                await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
                await _audit(conn, "key_revoked", user_id, actor_id, {"key_id": key_id})
                await _invalidate(conn, "key_revoked", key_id=key_id, user_id=None)
            return await conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = $1", key_id)

    async def rotate_key(
        self, user_id: int, key_id: int, key_hash: bytes, prefix: str, overlap_seconds: int, *, max_keys: int,
    ) -> tuple[asyncpg.Record, asyncpg.Record]:
        """Replace one of `user_id`'s keys: a new key with its name and expiry, `rotated_from`
        naming it, while the old key's expiry comes forward to now + `overlap_seconds` (never
        later than it was). One transaction, audited (`key_rotated`), logged as an
        invalidation of the old key: caches holding its old expiry drop it. (old, new).

        `NotFound` for anyone else's key; `Conflict` for a revoked or expired key, for one
        already rotated (a successor not revoked), and past `max_keys` live keys.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)  # as create_key
            # An organisation's key: its membership row first, as create_key and a removal take it
            # (a removal waits, then revokes the successor too; never a deadlock on the key row).
            await conn.execute(
                "SELECT 1 FROM org_members m JOIN api_keys k ON k.org_id = m.org_id AND k.user_id = m.user_id "
                "WHERE k.id = $1 AND k.user_id = $2 FOR SHARE OF m", key_id, user_id)
            old = await conn.fetchrow(
                f"SELECT {_KEY_COLUMNS}, expires_at <= now() AS expired FROM api_keys "
                f"WHERE id = $1 AND user_id = $2 FOR UPDATE", key_id, user_id,
            )
            if old is None:
                raise NotFound("no such key")
            if old["revoked_at"] is not None:
                raise Conflict("a revoked key cannot be rotated", {"param": "key_id", "status": "revoked"})
            if old["expired"]:
                raise Conflict("an expired key cannot be rotated", {"param": "key_id", "status": "expired"})
            # Rotated already (a double submit, say): one successor per key, unless it was
            # revoked -- that undoes the rotation.
            successor = await conn.fetchval(
                "SELECT id FROM api_keys WHERE rotated_from = $1 AND revoked_at IS NULL ORDER BY id LIMIT 1",
                key_id,
            )
            if successor is not None:
                raise Conflict(f"this key was already rotated: key {successor} replaces it",
                               {"param": "key_id", "status": "rotated", "successor": successor})
            retired = await conn.fetchrow(
                f"UPDATE api_keys SET expires_at = LEAST(expires_at, now() + make_interval(secs => $2)) "
                f"WHERE id = $1 RETURNING {_KEY_COLUMNS}", key_id, overlap_seconds,
            )
            live = await conn.fetchval(
                "SELECT count(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > now())", user_id,
            )
            if live >= max_keys:  # the old key still counts while its overlap lasts
                raise Conflict(f"at most {max_keys} live keys per account; revoke one first")
            # The successor keeps the old key's list and limits: the same credential's next version.
            new = await conn.fetchrow(
                f"INSERT INTO api_keys (user_id, name, key_hash, prefix, expires_at, rotated_from, allowed_models, "
                f"org_id, {_LIMIT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) "
                f"RETURNING {_KEY_COLUMNS}",
                user_id, old["name"], key_hash, prefix, old["expires_at"], key_id, old["allowed_models"],
                old["org_id"],  # the successor of an organisation's key is the organisation's
                *(old[n] for n in LIMIT_NAMES),
            )
            details = {"key_id": key_id, "new_key_id": new["id"], "prefix": prefix,
                       "overlap_seconds": overlap_seconds, "old_expires_at": _iso(retired["expires_at"])}
            await _audit(conn, "key_rotated", user_id, user_id, details)
            await _invalidate(conn, "key_rotated", key_id=key_id, user_id=None)
            return retired, new

    async def update_key(self, user_id: int, key_id: int, changes: dict[str, Any]) -> asyncpg.Record:
        """Change one of `user_id`'s keys: `changes` maps `name`, `expires_at`, `allowed_models`
        and any of `LIMIT_NAMES` to their new values (None clears all but the name). One
        transaction; when anything changed, audited (`key_updated`, each field's old and new
        value) and logged as an invalidation of the key, so cached answers (its old allow-list,
        expiry or limits) are dropped.

        `NotFound` for anyone else's key; `Conflict` for a revoked one.
        """
        fields = [f for f in ("name", "expires_at", "allowed_models", *LIMIT_NAMES) if f in changes]
        async with self.pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = $1 AND user_id = $2 FOR UPDATE", key_id, user_id,
            )
            if old is None:
                raise NotFound("no such key")
            if old["revoked_at"] is not None:
                raise Conflict("a revoked key cannot be edited", {"param": "key_id", "status": "revoked"})
            changed = {f: {"from": _plain(old[f]), "to": _plain(changes[f])}
                       for f in fields if old[f] != changes[f]}
            if not changed:
                return old
            sets = ", ".join(f"{f} = ${i}" for i, f in enumerate(changed, start=2))
            key = await conn.fetchrow(
                f"UPDATE api_keys SET {sets} WHERE id = $1 RETURNING {_KEY_COLUMNS}",
                key_id, *(changes[f] for f in changed),
            )
            await _audit(conn, "key_updated", user_id, user_id, {"key_id": key_id, "changed": changed})
            await _invalidate(conn, "key_updated", key_id=key_id, user_id=None)
            return key

    async def key_by_hash(self, key_hash: bytes) -> asyncpg.Record | None:
        """A key and the state of its owner, for validation."""
        return await self.pool.fetchrow(
            "SELECT k.id, k.user_id, k.key_hash, k.expires_at, k.revoked_at, k.allowed_models, "
            f"{', '.join('k.' + n for n in LIMIT_NAMES)}, "
            f"{', '.join(f'u.{n} AS user_{n}' for n in BUDGET_NAMES)}, "
            "u.tier, u.is_active FROM api_keys k JOIN users u ON u.id = k.user_id "
            "WHERE k.key_hash = $1", key_hash,
        )

    async def touch_keys(self, last_used: dict[int, datetime]) -> None:
        """Record when keys were last used, many keys in one statement."""
        if last_used:
            await self.pool.execute(
                "UPDATE api_keys k SET last_used_at = GREATEST(k.last_used_at, t.at) "
                "FROM unnest($1::bigint[], $2::timestamptz[]) AS t(id, at) WHERE k.id = t.id",
                list(last_used), list(last_used.values()),
            )

    # -- audit -----------------------------------------------------------------------

    async def audit(
        self, event: str, user_id: int | None, actor_id: int | None, details: dict[str, Any]
    ) -> None:
        await _audit(self.pool, event, user_id, actor_id, details)

    async def audit_events(
        self, *, involving: int | None, events: list[str] | None, since: datetime | None,
        until: datetime | None, before_id: int | None, limit: int,
    ) -> list[asyncpg.Record]:
        """Audit rows newest first (by id: keyset pages with `before_id`), with the usernames of
        subject and actor; `involving`: only rows where that user is the subject or the actor;
        `since` included, `until` excluded."""
        return await self.pool.fetch(
            "SELECT a.id, a.event, a.details, a.created_at, a.actor_id, "
            "s.username AS subject, ac.username AS actor "
            "FROM audit_log a LEFT JOIN users s ON s.id = a.user_id LEFT JOIN users ac ON ac.id = a.actor_id "
            "WHERE ($1::bigint IS NULL OR a.user_id = $1 OR a.actor_id = $1) "
            "AND ($2::text[] IS NULL OR a.event = ANY($2::text[])) "
            "AND ($3::timestamptz IS NULL OR a.created_at >= $3) "
            "AND ($4::timestamptz IS NULL OR a.created_at < $4) "
            "AND ($5::bigint IS NULL OR a.id < $5) "
            "ORDER BY a.id DESC LIMIT $6",
            involving, events, since, until, before_id, limit,
        )

    # -- invalidations -----------------------------------------------------------------

    async def invalidations_since(self, since: int, limit: int) -> tuple[list[asyncpg.Record], int, int]:
        """Entries after `since` (at most `limit`), the newest seq and the oldest kept."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            bounds = await conn.fetchrow(
                "SELECT COALESCE(max(seq), 0) AS newest, COALESCE(min(seq), 1) AS oldest "
                "FROM invalidations"
            )
            rows = await conn.fetch(
                "SELECT seq, key_id, user_id FROM invalidations WHERE seq > $1 ORDER BY seq LIMIT $2",
                since, limit,
            )
            return rows, bounds["newest"], bounds["oldest"]

    async def prune(self, keep_seconds: float) -> None:
        """Forget old invalidations (always keeping the newest), expired revocations, alerts of
        periods over a year gone and webhook attempts older than 90 days."""
        await self.pool.execute(
            "DELETE FROM invalidations WHERE created_at < now() - make_interval(secs => $1) "
            "AND seq < (SELECT max(seq) FROM invalidations)", keep_seconds,
        )
        # login_failures are pruned by their owner, the throttle (throttle.py).
        await self.pool.execute("DELETE FROM revoked_tokens WHERE expires_at < now() - interval '1 minute'")
        await self.pool.execute("DELETE FROM registration_counts WHERE window_start < now() - interval '1 day'")
        # Spending alerts: only a period's own decide what fires again, so keep 13 months for
        # people to read (their deliveries and attempts go with them); the delivery log, 90 days.
        await self.pool.execute("DELETE FROM alert_events WHERE period_start < now() - interval '400 days'")
        await self.pool.execute("DELETE FROM webhook_attempts WHERE at < now() - interval '90 days'")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _plain(value: Any) -> Any:
    """A column's value as the audit log's JSON keeps it (money as its decimal string)."""
    if isinstance(value, Decimal):
        return money_text(value)
    return _iso(value) if isinstance(value, datetime) else value


async def _audit(
    conn: asyncpg.Connection | asyncpg.Pool, event: str, user_id: int | None,
    actor_id: int | None, details: dict[str, Any],
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (event, user_id, actor_id, details) VALUES ($1, $2, $3, $4::jsonb)",
        event, user_id, actor_id, json.dumps(details),
    )


async def _invalidate(
    conn: asyncpg.Connection, reason: str, *, key_id: int | None = None, user_id: int | None = None
) -> int:
    """Append to the invalidation log and NOTIFY, inside the caller's transaction.

    Called last in the transaction: the lock is held only until the commit,
    which is also when PostgreSQL delivers the notification.
    """
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _INVALIDATION_LOCK)
    seq = await conn.fetchval(
        "INSERT INTO invalidations (key_id, user_id, reason) VALUES ($1, $2, $3) RETURNING seq",
        key_id, user_id, reason,
    )
    payload = f"{seq}:{key_id if key_id is not None else ''}:{user_id if user_id is not None else ''}"
    await conn.execute("SELECT pg_notify($1, $2)", INVALIDATION_CHANNEL, payload)
    return seq


#: For the other stores' transactions (tier_store.py): the same audit row and log entry.
write_audit, log_invalidation = _audit, _invalidate
