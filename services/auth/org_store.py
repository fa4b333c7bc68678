"""The SQL of organisations (migration 0015): the organisations, their members, invitations, limits.

Every change is one transaction with its audit row (`org_created`,
`org_invited`, `org_joined`, `org_role_changed`, `org_member_removed`,
`org_limits_changed`). Changes to one organisation's membership or limits
take its `orgs` row first (`FOR UPDATE`), so they happen one after another:
two owners demoting each other at once cannot leave it without an owner.

What cached key answers are made of is logged as an invalidation of each key
it concerns, in the same transaction (store.py's `log_invalidation`): a change
of limits names every live key of the organisation (each answer carries the
organisation's limits); a removal revokes the member's keys of the
organisation and names them. Gateways drop those answers within a second.

Who may do what is the service's to decide (org_methods.py); here only what
the data itself forbids: the last owner stays, a member is not invited again.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from shared.db import unavailable_when_down
from shared.errors import Conflict, NotFound
from shared.tiers import LIMIT_NAMES
from services.auth.limits import limits_of
from services.auth.store import log_invalidation, write_audit
from services.auth.validation import fold

__all__ = ["OrgStore", "limits_view"]

_ORG_COLUMNS = f"o.id, o.name, o.created_at, o.created_by, {', '.join('o.' + n for n in LIMIT_NAMES)}"
_NOT_FOUND = "no such organisation (or you are not a member)"


def limits_view(row: Any) -> dict[str, Any]:
    """An organisation's limits as the wire carries them: counts, budgets as decimal strings, None."""
    return limits_of(row)


@unavailable_when_down()
class OrgStore:
    """The organisation tables, over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(self, name: str, user_id: int) -> asyncpg.Record:
        """A new organisation with `user_id` its owner; `Conflict` for a taken name (folded)."""
        async with self.pool.acquire() as conn, conn.transaction():
            org_id = await conn.fetchval(
                "INSERT INTO orgs (name, name_key, created_by) VALUES ($1, $2, $3) "
                "ON CONFLICT (name_key) DO NOTHING RETURNING id", name, fold(name), user_id)
            if org_id is None:
                raise Conflict("an organisation of that name exists already", {"param": "name"})
            await conn.execute("INSERT INTO org_members (org_id, user_id, role) VALUES ($1, $2, 'owner')",
                               org_id, user_id)
            await write_audit(conn, "org_created", user_id, user_id, {"org_id": org_id, "org": name})
            return await _membership(conn, org_id, user_id)

    async def orgs_of(self, user_id: int) -> list[asyncpg.Record]:
        """The organisations `user_id` belongs to, with the role and the number of members."""
        return await self.pool.fetch(
            f"SELECT {_ORG_COLUMNS}, m.role, m.joined_at, "
            "(SELECT count(*) FROM org_members a WHERE a.org_id = o.id) AS members "
            "FROM org_members m JOIN orgs o ON o.id = m.org_id WHERE m.user_id = $1 ORDER BY o.name_key", user_id)

    async def membership(self, org: int | str, user_id: int) -> asyncpg.Record:
        """The organisation `org` (id or name) with the caller's `role`; `NotFound` unless a member."""
        row = await self.pool.fetchrow(
            f"SELECT {_ORG_COLUMNS}, m.role, m.joined_at FROM orgs o "
            "JOIN org_members m ON m.org_id = o.id AND m.user_id = $3 "
            "WHERE o.id = $1 OR o.name_key = $2",
            org if isinstance(org, int) else None, None if isinstance(org, int) else fold(org), user_id)
        if row is None:
            raise NotFound(_NOT_FOUND, {"param": "org"})
        return row

    async def members(self, org_id: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT m.user_id, u.username, m.role, m.joined_at FROM org_members m JOIN users u ON u.id = m.user_id "
            "WHERE m.org_id = $1 ORDER BY m.role = 'member', m.role = 'admin', u.username", org_id)

    async def pending_invites(self, *, org_id: int | None = None, user_id: int | None = None) -> list[asyncpg.Record]:
        """Invitations not answered yet: of an organisation, or to a user."""
        return await self.pool.fetch(
            "SELECT i.id, i.org_id, o.name AS org, i.user_id, u.username, i.role, b.username AS invited_by, "
            "i.created_at FROM org_invites i JOIN orgs o ON o.id = i.org_id JOIN users u ON u.id = i.user_id "
            "LEFT JOIN users b ON b.id = i.invited_by "
            "WHERE ($1::bigint IS NULL OR i.org_id = $1) AND ($2::bigint IS NULL OR i.user_id = $2) "
            "AND i.accepted_at IS NULL AND i.declined_at IS NULL ORDER BY i.id", org_id, user_id)

    async def invite(self, org: asyncpg.Record, user: asyncpg.Record, role: str, actor_id: int) -> asyncpg.Record:
        """Invite `user` to `org` as `role`; `Conflict` for a member, or one invited already."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock(conn, org["id"])
            if await conn.fetchval("SELECT 1 FROM org_members WHERE org_id = $1 AND user_id = $2",
                                   org["id"], user["id"]):
                raise Conflict(f"{user['username']} is a member already", {"param": "username"})
            invite_id = await conn.fetchval(
                "INSERT INTO org_invites (org_id, user_id, role, invited_by) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT DO NOTHING RETURNING id", org["id"], user["id"], role, actor_id)
            if invite_id is None:
                raise Conflict(f"{user['username']} is invited already", {"param": "username"})
            await write_audit(conn, "org_invited", user["id"], actor_id,
                              {"org_id": org["id"], "org": org["name"], "invite_id": invite_id, "role": role})
        return next(i for i in await self.pending_invites(org_id=org["id"]) if i["id"] == invite_id)

    async def answer(self, invite_id: int, user_id: int, accept: bool) -> asyncpg.Record | None:
        """Accept (become a member with the invitation's role) or decline one's own invitation;
        `NotFound` for anyone else's, `Conflict` for one answered already. The membership (accepted)
        or the organisation (declined), as `membership` gives it, or None when declined."""
        async with self.pool.acquire() as conn, conn.transaction():
            invite = await conn.fetchrow("SELECT * FROM org_invites WHERE id = $1 AND user_id = $2",
                                         invite_id, user_id)
            if invite is None:
                raise NotFound("no such invitation", {"param": "invite_id"})
            await _lock(conn, invite["org_id"])
            invite = await conn.fetchrow("SELECT * FROM org_invites WHERE id = $1 FOR UPDATE", invite_id)
            if invite["accepted_at"] is not None or invite["declined_at"] is not None:
                status = "accepted" if invite["accepted_at"] is not None else "declined"
                raise Conflict(f"this invitation was {status} already", {"param": "invite_id", "status": status})
            column = "accepted_at" if accept else "declined_at"
            await conn.execute(f"UPDATE org_invites SET {column} = now() WHERE id = $1", invite_id)
            if not accept:
                return None
            await conn.execute("INSERT INTO org_members (org_id, user_id, role) VALUES ($1, $2, $3) "
                               "ON CONFLICT DO NOTHING", invite["org_id"], user_id, invite["role"])
            await write_audit(conn, "org_joined", user_id, user_id,
                              {"org_id": invite["org_id"], "invite_id": invite_id, "role": invite["role"]})
            return await _membership(conn, invite["org_id"], user_id)

    async def set_role(self, org_id: int, user: int | str, role: str, actor_id: int) -> asyncpg.Record:
        """Give member `user` (id or username) `role`; `Conflict` for demoting the last owner."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock(conn, org_id)
            member = await _member(conn, org_id, user)
            if member["role"] != role:
                await _keep_an_owner(conn, org_id, member, "demoted")
                await conn.execute("UPDATE org_members SET role = $3 WHERE org_id = $1 AND user_id = $2",
                                   org_id, member["user_id"], role)
                await write_audit(conn, "org_role_changed", member["user_id"], actor_id,
                                  {"org_id": org_id, "from": member["role"], "to": role})
            return await _member(conn, org_id, member["user_id"])

    async def member(self, org_id: int, user: int | str) -> asyncpg.Record:
        """Member `user` (id or username) of the organisation; `NotFound` otherwise."""
        async with self.pool.acquire() as conn:
            return await _member(conn, org_id, user)

    async def remove(self, org_id: int, user_id: int, actor_id: int) -> list[int]:
        """Remove a member, revoking their keys of the organisation (logged as invalidations);
        `Conflict` for the last owner. The ids of the keys revoked."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock(conn, org_id)
            member = await _member(conn, org_id, user_id)
            await _keep_an_owner(conn, org_id, member, "removed")
            await conn.execute("DELETE FROM org_members WHERE org_id = $1 AND user_id = $2", org_id, user_id)
            revoked = [r["id"] for r in await conn.fetch(
                "UPDATE api_keys SET revoked_at = now() WHERE org_id = $1 AND user_id = $2 AND revoked_at IS NULL "
                "RETURNING id", org_id, user_id)]
            await write_audit(conn, "org_member_removed", user_id, actor_id,
                              {"org_id": org_id, "role": member["role"], "left": actor_id == user_id,
                               "revoked_keys": revoked})
            for key_id in revoked:
                await log_invalidation(conn, "org_member_removed", key_id=key_id)
            return revoked

    async def set_limits(self, org_id: int, changes: dict[str, Any],
                         actor_id: int) -> tuple[asyncpg.Record, list[int]]:
        """Apply `changes` (a limit -> its value, None: none) to the organisation; audited, and each
        live key of it logged as an invalidation, when anything changed. (The organisation now, the
        keys whose answers are to be dropped: none when nothing changed.)"""
        async with self.pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow(f"SELECT {_ORG_COLUMNS} FROM orgs o WHERE o.id = $1 FOR UPDATE", org_id)
            changed = {n: v for n, v in changes.items() if old[n] != v}
            if not changed:
                return old, []
            sets = ", ".join(f"{n} = ${i}" for i, n in enumerate(changed, start=2))
            new = await conn.fetchrow(f"UPDATE orgs o SET {sets} WHERE o.id = $1 RETURNING {_ORG_COLUMNS}",
                                      org_id, *changed.values())
            before, after = limits_view(old), limits_view(new)
            await write_audit(conn, "org_limits_changed", None, actor_id, {
                "org_id": org_id, "org": old["name"], "from": {n: before[n] for n in changed},
                "to": {n: after[n] for n in changed}})
            keys = await conn.fetchval(
                "SELECT array_agg(id) FROM api_keys WHERE org_id = $1 AND revoked_at IS NULL", org_id) or []
            for key_id in keys:
                await log_invalidation(conn, "org_limits_changed", key_id=key_id)
            return new, keys

    async def org_of_key(self, key_id: int) -> asyncpg.Record | None:
        """The organisation of a key (its limits), or None for a personal key."""
        return await self.pool.fetchrow(
            f"SELECT {_ORG_COLUMNS} FROM api_keys k JOIN orgs o ON o.id = k.org_id WHERE k.id = $1", key_id)


async def _lock(conn: asyncpg.Connection, org_id: int) -> None:
    """Serialize the changes to one organisation's membership (see the module doc)."""
    await conn.execute("SELECT 1 FROM orgs WHERE id = $1 FOR UPDATE", org_id)


async def _membership(conn: asyncpg.Connection, org_id: int, user_id: int) -> asyncpg.Record:
    return await conn.fetchrow(
        f"SELECT {_ORG_COLUMNS}, m.role, m.joined_at FROM orgs o JOIN org_members m ON m.org_id = o.id "
        "WHERE o.id = $1 AND m.user_id = $2", org_id, user_id)


async def _member(conn: asyncpg.Connection, org_id: int, user: int | str) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT m.user_id, u.username, m.role, m.joined_at FROM org_members m JOIN users u ON u.id = m.user_id "
        "WHERE m.org_id = $1 AND (u.id = $2 OR u.username_key = $3)",
        org_id, user if isinstance(user, int) else None, None if isinstance(user, int) else fold(user))
    if row is None:
        raise NotFound("no such member", {"param": "user"})
    return row


async def _keep_an_owner(conn: asyncpg.Connection, org_id: int, member: asyncpg.Record, change: str) -> None:
    if member["role"] == "owner" and await conn.fetchval(
            "SELECT count(*) FROM org_members WHERE org_id = $1 AND role = 'owner'", org_id) == 1:
        raise Conflict(f"the last owner cannot be {change}: make another member an owner first",
                       {"param": "user", "reason": "last_owner"})
