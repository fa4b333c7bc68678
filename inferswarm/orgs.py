"""`inferswarm org ...`: organisations (`auth.create_org` ... `auth.org_report`).

    inferswarm org create NAME                 inferswarm org list
    inferswarm org show ORG                    inferswarm org invites
    inferswarm org invite ORG USER [--role member|admin|owner]
    inferswarm org accept ID                   inferswarm org decline ID
    inferswarm org role ORG USER ROLE          inferswarm org remove ORG USER
    inferswarm org limits ORG [--requests-per-hour N|none] [--requests-per-month N|none]
        [--tokens-per-month N|none] [--budget-day AMOUNT|none] [--budget-month AMOUNT|none]
    inferswarm org report ORG [--from D] [--to D] [--by member|model|key] [--group-by day|week|month] [--csv]
    inferswarm keys create NAME --org ORG      (a key of the organisation: cli.py)

ORG is an organisation's id (digits) or its name; USER a member's id or
username. With the saved session, over the mesh or the web service
(`--base-url`), like `keys`. `org limits` without an option shows the limits;
with some, it changes those (`none`: no limit; left out: kept), the options and
values as `admin tiers set` takes them (tiers.py).
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from inferswarm.commands import Result, Session, need_token, table
from inferswarm.costs import report_result
from inferswarm.credentials import Credentials
from inferswarm.tiers import SET_OPTIONS, add_limit_options, limit_value, shown
from services.auth.client import AuthClient, Org, OrgDetail

__all__ = ["ORG_COMMANDS", "add_org_commands", "org_ref"]


def org_ref(text: str) -> int | str:
    """An organisation (or member) as typed: digits are an id, anything else a name."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else text


def add_org_commands(commands: Any, client: Any) -> None:
    """The `org` subcommands, each made by `client(name, help, subparsers)` (cli.py)."""
    org = commands.add_parser("org", help="organisations: shared limits and reports over members' keys"
                              ).add_subparsers(dest="org_command", required=True, metavar="ACTION")
    client("org create", "create an organisation (you own it)", org).add_argument("name")
    client("org list", "your organisations and your role in each", org)
    client("org show", "an organisation: limits, members, pending invitations", org).add_argument("org", type=org_ref)
    invite = client("org invite", "invite an account (owners and admins)", org)
    invite.add_argument("org", type=org_ref)
    invite.add_argument("user", help="their username")
    invite.add_argument("--role", choices=["member", "admin", "owner"], default="member")
    client("org invites", "invitations to you, not answered yet", org)
    for action in ("accept", "decline"):
        client(f"org {action}", f"{action} an invitation", org).add_argument("invite_id", type=int, metavar="ID")
    role = client("org role", "give a member another role (owners)", org)
    role.add_argument("org", type=org_ref)
    role.add_argument("user", type=org_ref, help="id or username")
    role.add_argument("role", choices=["member", "admin", "owner"])
    remove = client("org remove", "remove a member, or leave (their keys of it are revoked)", org)
    remove.add_argument("org", type=org_ref)
    remove.add_argument("user", type=org_ref, help="id or username")
    limits = client("org limits", "show or change the organisation's limits (owners and admins change)", org)
    limits.add_argument("org", type=org_ref)
    add_limit_options(limits)
    report = client("org report", "the organisation's usage and cost (a member: their own)", org)
    report.add_argument("org", type=org_ref)
    report.add_argument("--from", dest="start", metavar="DATE", help="YYYY-MM-DD (default: 30 days ending --to)")
    report.add_argument("--to", dest="end", metavar="DATE", help="YYYY-MM-DD, included (default: today, UTC)")
    report.add_argument("--group-by", choices=["day", "week", "month"], default="day")
    report.add_argument("--by", choices=["member", "model", "key"])
    report.add_argument("--csv", action="store_true", help="CSV with a header line, to stdout")


def _auth(session: Session) -> AuthClient:
    return AuthClient(session("auth"))


def _limits_text(org: Org) -> str:
    rows = [[header, shown(org["limits"][limit])] for _, limit, _, header in SET_OPTIONS]  # type: ignore[literal-required]
    return table(["limit", "value"], rows)


async def org_create(args: Namespace, session: Session, creds: Credentials) -> Result:
    org = await _auth(session).create_org(token=need_token(creds), name=args.name)
    return Result(f"created organisation {org['id']} ({org['name']}); you own it", org)


async def org_list(args: Namespace, session: Session, creds: Credentials) -> Result:
    orgs = await _auth(session).orgs(token=need_token(creds))
    rows = [[o["id"], o["name"], o["role"], o["members"]] for o in orgs]
    return Result(table(["id", "name", "role", "members"], rows) if orgs else "no organisations", orgs)


async def org_show(args: Namespace, session: Session, creds: Credentials) -> Result:
    org: OrgDetail = await _auth(session).org(token=need_token(creds), org=args.org)
    members = table(["id", "member", "role", "joined"],
                    [[m["user_id"], m["username"], m["role"], (m["joined_at"] or "-")[:10]] for m in org["members"]])
    text = f"{org['name']} (id {org['id']}; you: {org['role']})\n\n{members}\n\n{_limits_text(org)}"
    if org["invites"]:
        text += "\n\npending invitations:\n" + table(
            ["id", "user", "role", "by"], [[i["id"], i["username"], i["role"], i["invited_by"] or "-"]
                                           for i in org["invites"]])
    return Result(text, org)


async def org_invite(args: Namespace, session: Session, creds: Credentials) -> Result:
    invite = await _auth(session).invite(token=need_token(creds), org=args.org, username=args.user, role=args.role)
    return Result(f"invited {invite['username']} to {invite['org']} as {invite['role']} (invitation {invite['id']})",
                  invite)


async def org_invites(args: Namespace, session: Session, creds: Credentials) -> Result:
    invites = await _auth(session).invitations(token=need_token(creds))
    rows = [[i["id"], i["org"], i["role"], i["invited_by"] or "-"] for i in invites]
    text = table(["id", "organisation", "role", "by"], rows) if invites else "no invitations"
    return Result(text, invites)


async def _answer(args: Namespace, session: Session, creds: Credentials, accept: bool) -> Result:
    answer = await _auth(session).answer_invite(token=need_token(creds), invite_id=args.invite_id, accept=accept)
    org = answer["org"]
    return Result(f"joined {org['name']} as {org['role']}" if org else f"declined invitation {args.invite_id}", answer)


async def org_accept(args: Namespace, session: Session, creds: Credentials) -> Result:
    return await _answer(args, session, creds, True)


async def org_decline(args: Namespace, session: Session, creds: Credentials) -> Result:
    return await _answer(args, session, creds, False)


async def org_role(args: Namespace, session: Session, creds: Credentials) -> Result:
    member = await _auth(session).set_member_role(token=need_token(creds), org=args.org, user=args.user,
                                                  role=args.role)
    return Result(f"{member['username']} is now {member['role']}", member)


async def org_remove(args: Namespace, session: Session, creds: Credentials) -> Result:
    answer = await _auth(session).remove_member(token=need_token(creds), org=args.org, user=args.user)
    keys = answer["revoked_keys"]
    return Result(f"removed {answer['removed']['username']}; {len(keys)} of their keys of it revoked", answer)


async def org_limits(args: Namespace, session: Session, creds: Credentials) -> Result:
    """Show the limits, or change those given."""
    limits = {limit: limit_value(getattr(args, limit), limit, is_money) for _, limit, is_money, _ in SET_OPTIONS
              if getattr(args, limit) is not None}
    auth, token = _auth(session), need_token(creds)
    if not limits:
        org: Org = await auth.org(token=token, org=args.org)
        return Result(f"{org['name']}:\n{_limits_text(org)}", org["limits"])
    org = await auth.set_org_limits(token=token, org=args.org, limits=limits)
    return Result(f"{org['name']}: set; every gateway applies it within a second\n{_limits_text(org)}", org)


async def org_report(args: Namespace, session: Session, creds: Credentials) -> Result:
    report = await _auth(session).org_report(token=need_token(creds), org=args.org, start=args.start, end=args.end,
                                             group_by=args.group_by, by=args.by)
    result = report_result(report, csv=args.csv)
    if not args.csv and not report["all_members"]:
        result.text += "\n(your own usage only: owners and admins see every member's)"
    return result


ORG_COMMANDS = {
    "org create": org_create, "org list": org_list, "org show": org_show, "org invite": org_invite,
    "org invites": org_invites, "org accept": org_accept, "org decline": org_decline, "org role": org_role,
    "org remove": org_remove, "org limits": org_limits, "org report": org_report,
}
