"""`inferswarm admin dead-letters`: the requests that failed after every fallback (`auth.dead_letters`;
services/auth/README.md, "Dead letters").

    inferswarm admin dead-letters [--limit N] [--model M] [--before ID] [--json]

Newest first, a table by default: when, who (user and key ids), the model
asked for and the one tried last, the reason (the record's status) and the
chain of attempts that failed before it, `llama3 (UNAVAILABLE) -> smollm2 (TIMEOUT)`.
When more are left, the last line says how to see them (`--before ID`).
Like `admin settings`, it runs as the operator when the mesh secret is at
hand, else with the saved session of an administrator.
"""

from __future__ import annotations

from argparse import ArgumentParser, Namespace
from typing import Any

from inferswarm.commands import Result, Session, need_token, table
from inferswarm.credentials import Credentials
from inferswarm.session import ClientSession
from services.auth.client import AuthClient, describe_chain

__all__ = ["DEAD_LETTER_COMMANDS", "add_dead_letter_arguments", "admin_dead_letters"]


def add_dead_letter_arguments(command: ArgumentParser) -> None:
    command.add_argument("--limit", type=int, metavar="N", help="at most N, 1-500 (default: 50)")
    command.add_argument("--model", metavar="M", help="only those that asked for M or tried M last")
    command.add_argument("--before", type=int, metavar="ID", help="older than dead letter ID: the next page")


async def admin_dead_letters(args: Namespace, session: Session, creds: Credentials) -> Result:
    """As the operator (the mesh secret), else as the logged-in admin."""
    token = None if getattr(args, "as_operator", False) else need_token(creds)
    page = await _auth(session).dead_letters(token=token, limit=args.limit, before=args.before,
                                                          model=args.model)
    rows: list[list[Any]] = [
        [d["id"], d["at"][:19].replace("T", " "), d["user_id"], "-" if d["key_id"] is None else d["key_id"],
         d["asked"] or d["model"], d["model"], d["status"], describe_chain(d["tried"], arrow="->"), d["request_id"]]
        for d in page["dead_letters"]]
    if not rows:
        return Result("no dead letters", page)
    text = table(["id", "at (UTC)", "user", "key", "asked", "last model", "status", "tried before", "request"], rows)
    if page["next"] is not None:
        text += f"\nmore: --before {page['next']}"
    return Result(text, page)


def _auth(session: Session) -> AuthClient:
    # Over the mesh always: the admin commands take no --base-url (cli.py, HTTP_COMMANDS).
    assert isinstance(session, ClientSession)
    return AuthClient(session("auth"))


DEAD_LETTER_COMMANDS = {"admin dead-letters": admin_dead_letters}
