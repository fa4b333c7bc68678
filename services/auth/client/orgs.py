"""`AuthClient`'s calls of organisations (services/auth/org_methods.py), and their answers' shapes.

A part of `AuthClient` (api.py), kept apart for size: `OrgCalls` is one of its
bases and `ORG_METHODS` part of its `METHODS`. An organisation is named by its
id or its name (`org`); one the caller is not a member of is `NOT_FOUND`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from shared.rpc.typed import TypedClient, Wire

__all__ = ["ORG_METHODS", "Invite", "InviteAnswer", "Member", "MemberRemoved", "Org", "OrgCalls", "OrgDetail",
           "OrgLimits", "OrgListed", "OrgReport"]

Role = Literal["owner", "admin", "member"]


class OrgLimits(TypedDict):
    """An organisation's limits, as a tier's: None is none; budgets are decimal strings ("5.000000")."""

    requests_per_hour: int | None
    requests_per_month: int | None
    tokens_per_month: int | None
    spend_per_day: str | None
    spend_per_month: str | None


class Org(TypedDict):
    """An organisation as its member sees it (`create_org`, `set_org_limits`)."""

    id: int
    name: str
    created_at: str | None
    role: Role  #: the caller's
    limits: OrgLimits


class OrgListed(Org):
    """One of `orgs`."""

    joined_at: str | None
    members: int


class Member(TypedDict):
    user_id: int
    username: str
    role: Role
    joined_at: str | None


class Invite(TypedDict):
    """An invitation not answered yet."""

    id: int
    org_id: int
    org: str
    username: str  #: the invited account
    role: Role
    invited_by: str | None  #: a username
    created_at: str | None


class OrgDetail(Org):
    """`org`: members (owners first) and pending invitations."""

    members: list[Member]
    invites: list[Invite]


class InviteAnswer(TypedDict):
    accepted: bool
    org: Org | None  #: the organisation joined; None when declined


class MemberRemoved(TypedDict):
    removed: Member
    revoked_keys: list[int]  #: the member's keys of the organisation, revoked


class OrgReport(TypedDict):
    """`org_report`: as `Report`, rows by `member` (`user_id`, `username`), `model` or `key`."""

    org_id: int
    org: str
    start: str
    end: str
    group_by: Literal["day", "week", "month"]
    by: Literal["member", "model", "key"] | None
    all_members: bool  #: false: a plain member's report holds their own usage only
    rows: list[dict[str, Any]]
    totals: dict[str, Any]


ORG_METHODS = {
    "create_org": Wire("auth.create_org"),
    "orgs": Wire("auth.orgs", idempotent=True),
    "org": Wire("auth.org", idempotent=True),
    "invite": Wire("auth.invite"),
    "invitations": Wire("auth.invitations", idempotent=True),
    "answer_invite": Wire("auth.answer_invite"),
    "set_member_role": Wire("auth.set_member_role"),
    "remove_member": Wire("auth.remove_member"),
    "set_org_limits": Wire("auth.set_org_limits"),
    "org_report": Wire("auth.org_report", idempotent=True),
}


class OrgCalls(TypedClient):
    """The organisation calls of `AuthClient`."""

    async def create_org(self, *, token: str, name: str, timeout: float | None = None) -> Org:
        return await self._call("create_org", timeout, token=token, name=name)

    async def orgs(self, *, token: str, timeout: float | None = None) -> list[OrgListed]:
        return await self._call("orgs", timeout, token=token)

    async def org(self, *, token: str, org: int | str, timeout: float | None = None) -> OrgDetail:
        return await self._call("org", timeout, token=token, org=org)

    async def invite(self, *, token: str, org: int | str, username: str, role: str | None = None,
                     timeout: float | None = None) -> Invite:
        """Owners and admins (an owner, for `role` "owner"); `role` None: "member"."""
        return await self._call("invite", timeout, token=token, org=org, username=username, role=role)

    async def invitations(self, *, token: str, timeout: float | None = None) -> list[Invite]:
        return await self._call("invitations", timeout, token=token)

    async def answer_invite(self, *, token: str, invite_id: int, accept: bool,
                            timeout: float | None = None) -> InviteAnswer:
        return await self._call("answer_invite", timeout, token=token, invite_id=invite_id, accept=accept)

    async def set_member_role(self, *, token: str, org: int | str, user: int | str, role: str,
                              timeout: float | None = None) -> Member:
        return await self._call("set_member_role", timeout, token=token, org=org, user=user, role=role)

    async def remove_member(self, *, token: str, org: int | str, user: int | str,
                            timeout: float | None = None) -> MemberRemoved:
        return await self._call("remove_member", timeout, token=token, org=org, user=user)

    async def set_org_limits(self, *, token: str, org: int | str, limits: Mapping[str, int | str | None],
                             timeout: float | None = None) -> Org:
        """None: no limit; names left out are kept; budgets as decimal strings."""
        return await self._call("set_org_limits", timeout, token=token, org=org, limits=dict(limits))

    async def org_report(self, *, token: str, org: int | str, start: str | None = None, end: str | None = None,
                         group_by: str | None = None, by: str | None = None,
                         timeout: float | None = None) -> OrgReport:
        return await self._call("org_report", timeout, token=token, org=org, start=start, end=end,
                                group_by=group_by, by=by)
