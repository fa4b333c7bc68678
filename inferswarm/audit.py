"""`inferswarm audit`: the audit log (`auth.audit`), a table by default.

    inferswarm audit [--user U] [--action A] [--since ISO] [--until ISO] [--limit N] [--before-id N] [--json]

With the saved session: a user's own events (those they did, and those about
them); an administrator's everyone's, or `--user`'s. `--action` is an event
(key_created) or a prefix (key_*). Newest first; when there are older events
the last line says how to ask for them (`--before-id`); `--json` is the answer
as it is, `next_before_id` included.
"""

from __future__ import annotations

import json
from argparse import Namespace

from inferswarm.commands import Result, Session, need_token, table
from inferswarm.credentials import Credentials
from services.auth.client import AuthClient

__all__ = ["AUDIT_COMMANDS", "audit"]


async def audit(args: Namespace, session: Session, creds: Credentials) -> Result:
    page = await AuthClient(session("auth")).audit(
        token=need_token(creds), user=args.user, action=args.event, since=args.since, until=args.until,
        limit=args.limit, before_id=args.before_id)
    rows = [[e["id"], e["at"], e["actor"] or "-", e["user"] or "-", e["action"],
             json.dumps(e["details"], separators=(",", ":"), sort_keys=True)] for e in page["events"]]
    text = table(["id", "at", "actor", "user", "action", "details"], rows) if rows else "no events"
    if page["next_before_id"] is not None:
        text += f"\nolder events: add --before-id {page['next_before_id']}"
    return Result(text, page)


AUDIT_COMMANDS = {"audit": audit}
