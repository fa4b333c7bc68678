"""The organisation handlers of `AuthService`: organisations, members, invitations, limits, reports.

An organisation has members, each an `owner`, `admin` or `member`:

* anyone logged in creates one (and is its owner);
* owners and admins invite (only an owner invites an owner), remove members
  (an admin not an owner), set the organisation's limits, and see every
  member's usage in its report; owners change roles;
* any member sees the organisation (members, pending invitations, limits),
  creates keys of it (`auth.create_key(org=...)`), sees their own usage of it,
  and may leave; the last owner can be neither demoted nor removed (`CONFLICT`).

An organisation is named by its id or its name (compared folded). One the
caller is not a member of is `NOT_FOUND`, exactly like one that does not exist.

A key of an organisation is its owner's (billed to them) and the
organisation's: its usage is attributed to both (usage_store.py), and a
gateway enforces the organisation's limits over all its keys together: the
scope "org" of `validate_key`'s answer (`add_org_scope`). A removed member's
keys of the organisation are revoked. Changes reach gateways within a second
through the invalidation log (org_store.py).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from shared.errors import Forbidden, InvalidParams, NotFound
from shared.logging import get_logger
from shared.rpc import method
from services.auth import reports
from services.auth import validation as check
from services.auth.org_store import OrgStore, limits_view
from services.auth.service_base import AuthBase, check_id, iso, user_ref
from services.auth.limits import check_limits

__all__ = ["MAX_ORG_NAME", "ROLES", "OrgMethods", "add_org_scope", "check_org", "org_id_of", "org_scope"]

log = get_logger(__name__)

ROLES = ("owner", "admin", "member")
_MANAGERS = ("owner", "admin")
MAX_ORG_NAME = 64


def check_org(org: int | str) -> int | str:
    """An organisation's id, or its name (1-64 characters)."""
    if isinstance(org, int):
        return check_id(org, "org")
    if not 0 < len(org) <= MAX_ORG_NAME:
        raise InvalidParams(f"org must be an organisation's id or name (1-{MAX_ORG_NAME} characters)",
                            {"param": "org"})
    return org


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidParams("role must be owner, admin or member", {"param": "role"})
    return role


def org_scope(row: asyncpg.Record | None) -> dict[str, Any] | None:
    """A gateway's scope of an organisation (`validate_key`): its id and limits; None without one."""
    return None if row is None else {"scope": "org", "id": row["id"], "limits": limits_view(row)}


async def add_org_scope(orgs: OrgStore, result: dict[str, Any], key_id: int) -> None:
    """Complete `validate_key`'s answer for key `key_id`: `org_id` (None: a personal key), and the
    organisation's scope after the others (the user's, the key's)."""
    row = await orgs.org_of_key(key_id)
    result["org_id"] = None if row is None else row["id"]
    scope = org_scope(row)
    if scope is not None:
        result["scopes"].append(scope)


async def org_id_of(orgs: OrgStore, org: int | str | None, user_id: int) -> int | None:
    """The id of organisation `org` for a new key of `user_id`, who must be a member (else
    `NOT_FOUND`); None for a personal key."""
    return None if org is None else int((await orgs.membership(check_org(org), user_id))["id"])


def _org_view(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "created_at": iso(row["created_at"]), "role": row["role"],
            "limits": limits_view(row)}


def _member_view(row: asyncpg.Record) -> dict[str, Any]:
    return {"user_id": row["user_id"], "username": row["username"], "role": row["role"],
            "joined_at": iso(row["joined_at"])}


def _invite_view(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "org_id": row["org_id"], "org": row["org"], "username": row["username"],
            "role": row["role"], "invited_by": row["invited_by"], "created_at": iso(row["created_at"])}


class OrgMethods(AuthBase):
    """`auth.create_org`, `auth.orgs`, `auth.org`, invitations, roles, limits and `auth.org_report`."""

    async def _member_of(self, token: str, org: int | str, *roles: str) -> tuple[asyncpg.Record, asyncpg.Record]:
        """(the caller, the organisation with the caller's role); `NOT_FOUND` unless a member,
        `FORBIDDEN` unless one of `roles` (when given)."""
        user = await self._authenticate(token)
        membership = await self._orgs.membership(check_org(org), user["id"])
        if roles and membership["role"] not in roles:
            raise Forbidden(f"only the organisation's {' and '.join(r + 's' for r in roles)} may do this")
        return user, membership

    @method(public=True)
    async def create_org(self, token: str, name: str) -> dict[str, Any]:
        """A new organisation (1-64 printable characters, unique whatever the case); the caller owns it."""
        user = await self._authenticate(token)
        name = check.check_name(name)
        if len(name) > MAX_ORG_NAME:
            raise InvalidParams(f"name must be 1-{MAX_ORG_NAME} printable characters", {"param": "name"})
        row = await self._orgs.create(name, user["id"])
        log.info("organisation created", org_id=row["id"], user_id=user["id"])
        return _org_view(row)

    @method(public=True, idempotent=True)
    async def orgs(self, token: str) -> list[dict[str, Any]]:
        """The caller's organisations: each with the caller's role and its number of members."""
        user = await self._authenticate(token)
        return [{**_org_view(r), "joined_at": iso(r["joined_at"]), "members": r["members"]}
                for r in await self._orgs.orgs_of(user["id"])]

    @method(public=True, idempotent=True)
    async def org(self, token: str, org: int | str) -> dict[str, Any]:
        """One of the caller's organisations: its limits, members and pending invitations."""
        _, row = await self._member_of(token, org)
        members = await self._orgs.members(row["id"])
        invites = await self._orgs.pending_invites(org_id=row["id"])
        return {**_org_view(row), "members": [_member_view(m) for m in members],
                "invites": [_invite_view(i) for i in invites]}

    @method(public=True)
    async def invite(self, token: str, org: int | str, username: str, role: str = "member") -> dict[str, Any]:
        """Invite an account (by username) as `role`: owners and admins; as an owner, owners only."""
        user, row = await self._member_of(token, org, *_MANAGERS)
        if _check_role(role) == "owner" and row["role"] != "owner":
            raise Forbidden("only an owner may invite an owner")
        invitee = await self.store.user_by_login(check.check_username(username))
        if invitee is None:
            raise NotFound("no such user", {"param": "username"})
        invite = await self._orgs.invite(row, invitee, role, user["id"])
        log.info("organisation invitation", org_id=row["id"], invite_id=invite["id"], user_id=user["id"])
        return _invite_view(invite)

    @method(public=True, idempotent=True)
    async def invitations(self, token: str) -> list[dict[str, Any]]:
        """The invitations to the caller not answered yet."""
        user = await self._authenticate(token)
        return [_invite_view(i) for i in await self._orgs.pending_invites(user_id=user["id"])]

    @method(public=True)
    async def answer_invite(self, token: str, invite_id: int, accept: bool) -> dict[str, Any]:
        """Accept or decline an invitation to the caller: `{accepted, org}` (`org` the organisation as
        `orgs` lists it once joined, else None); `CONFLICT` once answered, `NOT_FOUND` for another's."""
        user = await self._authenticate(token)
        if not isinstance(accept, bool):
            raise InvalidParams("accept must be true or false", {"param": "accept"})
        row = await self._orgs.answer(check_id(invite_id, "invite_id"), user["id"], accept)
        return {"accepted": accept, "org": None if row is None else _org_view(row)}

    @method(public=True)
    async def set_member_role(self, token: str, org: int | str, user: int | str, role: str) -> dict[str, Any]:
        """Owners: give a member (id or username) another role; the last owner stays one (`CONFLICT`)."""
        actor, row = await self._member_of(token, org, "owner")
        member = await self._orgs.set_role(row["id"], user_ref(user), _check_role(role), actor["id"])
        return _member_view(member)

    @method(public=True)
    async def remove_member(self, token: str, org: int | str, user: int | str) -> dict[str, Any]:
        """Remove a member (owners: anyone; admins: admins and members) or leave (anyone); their keys
        of the organisation are revoked, everywhere within a second. `{removed, revoked_keys}`."""
        actor, row = await self._member_of(token, org)
        member = await self._orgs.member(row["id"], user_ref(user))
        leaving = member["user_id"] == actor["id"]
        if not leaving and (row["role"] not in _MANAGERS or (member["role"] == "owner" and row["role"] != "owner")):
            raise Forbidden("only owners remove owners, and owners and admins other members")
        revoked = await self._orgs.remove(row["id"], member["user_id"], actor["id"])
        for key_id in revoked:
            self.cache.evict(key_id=key_id)  # here at once; other instances and gateways via the log
        log.info("organisation member removed", org_id=row["id"], user_id=member["user_id"], keys=len(revoked))
        return {"removed": _member_view(member), "revoked_keys": revoked}

    @method(public=True)
    async def set_org_limits(self, token: str, org: int | str, limits: dict[str, Any]) -> dict[str, Any]:
        """Owners and admins: change some of the organisation's limits (as a tier's: None for none,
        names left out kept); every gateway applies them within a second. The organisation."""
        actor, row = await self._member_of(token, org, *_MANAGERS)
        changes = check_limits(limits)
        if not changes:
            raise InvalidParams("nothing to change: give a limit", {"param": "limits"})
        new, keys = await self._orgs.set_limits(row["id"], changes, actor["id"])
        for key_id in keys:
            self.cache.evict(key_id=key_id)  # here at once; other instances and gateways via the log
        if keys:
            log.info("organisation limits changed", org_id=row["id"], fields=sorted(changes))
        return _org_view({**dict(new), "role": row["role"]})

    @method(public=True, idempotent=True)
    async def org_report(self, token: str, org: int | str, start: str | None = None, end: str | None = None,
                         group_by: str = "day", by: str | None = None) -> dict[str, Any]:
        """The usage attributed to the organisation (its keys'), as `auth.report` answers it, `by`
        member, model or key: every member's for owners and admins, a member's own otherwise."""
        user, row = await self._member_of(token, org)
        first, last = reports.day_range(start, end)
        period, dimension = reports.check_period(group_by), reports.check_by(by, reports.ORG_BY)
        users = None if row["role"] in _MANAGERS else [user["id"]]
        records = await self._usage.report(users, first, last, period, dimension, org_id=row["id"])
        return {"org_id": row["id"], "org": row["name"], "start": first.isoformat(), "end": last.isoformat(),
                "group_by": period, "by": dimension, "all_members": users is None,
                "rows": reports.report_rows(records, dimension), "totals": reports.report_totals(records)}
