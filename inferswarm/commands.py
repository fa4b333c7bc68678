"""The client commands: each talks to the mesh and returns what to show.

A command is `async def name(args, session, creds) -> Result`; `Result.text`
is for people, `Result.data` for `--json`. Streaming commands (`infer`) print
as tokens arrive and return the final facts. Errors are not handled here: they
propagate as typed `MeshError`s, and the CLI turns each into one line and an
exit code (see `errors.py` beside this module).

The session is a `ClientSession` (the mesh) or, with `--base-url`, an
`HttpSession` (the web service's HTTP API, `httpclient.py`): both give
`session("gateway")` and `session("auth")` with the same methods, so no
command knows which it has.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import re
import signal
import sys
import time
from argparse import ArgumentTypeError, Namespace
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeAlias

from inferswarm.config import client_config
from inferswarm.credentials import Credentials
from inferswarm.errors import human_duration
from inferswarm.httpclient import HttpSession
from inferswarm.limits import limit_changes
from inferswarm.session import ClientSession, SessionError
from shared.errors import InvalidParams, MeshError, Unauthenticated
from shared.generation import is_final, text_of
from services.auth.client import AuthClient, describe_limits
from services.gateway.client import GatewayClient

__all__ = ["Result", "COMMANDS", "read_password", "json_schema_format", "overlap_seconds", "expiry_moment",
           "model_list"]

#: The mesh, or the web service over HTTP (`--base-url`): the same calls either way.
Session: TypeAlias = ClientSession | HttpSession


@dataclass
class Result:
    text: str = ""
    data: Any = field(default=None)


def read_password(args: Namespace, *, confirm: bool = False) -> str:
    """From stdin with --password-stdin, `INFERSWARM_PASSWORD`, or a prompt."""
    if getattr(args, "password_stdin", False):
        return sys.stdin.readline().rstrip("\n")
    password = client_config().password
    if password is not None:
        return password.reveal()
    password = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Repeat password: ") != password:
        raise SystemExit("inferswarm: the passwords differ")
    return password


def need_token(creds: Credentials) -> str:
    if not creds.token:
        raise Unauthenticated("not logged in: run `inferswarm login`")
    return creds.token


async def register(args: Namespace, session: Session, creds: Credentials) -> Result:
    """The same answer whether the email was new or not (auth does not say): log in next."""
    password = read_password(args, confirm=not args.password_stdin)
    answer = await _auth(session).register(username=args.username, email=args.email, password=password)
    return Result(f"account created: log in with `inferswarm login {answer['username']}`", answer)


async def login(args: Namespace, session: Session, creds: Credentials) -> Result:
    password = read_password(args)
    answer = await _auth(session).login(username_or_email=args.username, password=password)
    creds.username = answer["user"]["username"]
    creds.token, creds.token_expires_at = answer["token"], answer.get("expires_at")
    creds.save()
    return Result(f"logged in as {creds.username}", {"user": answer["user"], "expires_at": answer.get("expires_at")})


async def password(args: Namespace, session: Session, creds: Credentials) -> Result:
    """Change the password: every other session ends; this CLI keeps the new token."""
    token = need_token(creds)
    if args.password_stdin:  # two lines: the current password, then the new one
        old, new = sys.stdin.readline().rstrip("\n"), sys.stdin.readline().rstrip("\n")
    else:
        old = getpass.getpass("Current password: ")
        new = getpass.getpass("New password: ")
        if getpass.getpass("Repeat new password: ") != new:
            raise SystemExit("inferswarm: the passwords differ")
    answer = await _auth(session).change_password(token=token, old_password=old, new_password=new)
    creds.token, creds.token_expires_at = answer["token"], answer.get("expires_at")
    creds.save()
    return Result("password changed; every other session has ended",
                  {"changed": True, "user": answer["user"], "expires_at": answer.get("expires_at")})


async def logout(args: Namespace, session: Session | None, creds: Credentials,
                 unreachable: str | None = None) -> Result:
    """End the session on the mesh (auth refuses the token from then on), then forget it here.

    With `--everywhere`, every session of the account ends (other machines and
    browsers too); if auth cannot be told, the error is the result and this
    CLI keeps its credentials, so the command can be run again.
    """
    if getattr(args, "everywhere", False) and creds.token:
        if session is None:
            raise SessionError(f"sessions not ended: {unreachable}")
        await _auth(session).logout_all(token=creds.token)
        Credentials.forget()
        return Result("logged out everywhere", {"logged_out": True, "session_ended": True, "everywhere": True})
    ended, problem = False, unreachable
    if session is not None and creds.token:
        try:
            await _auth(session).logout(token=creds.token)
            ended = True
        except MeshError as exc:  # expired already, or auth away: forgetting it is all that is left
            problem = exc.message
    removed = Credentials.forget()
    text = "logged out" if removed else "was not logged in"
    if removed and not ended and problem:
        text += f" here (the session was not ended on the mesh: {problem})"
    return Result(text, {"logged_out": removed, "session_ended": ended})


async def keys_create(args: Namespace, session: Session, creds: Credentials) -> Result:
    key = await _auth(session).create_key(token=need_token(creds), name=args.name,
                                          expires_in_days=args.expires_in_days, expires_at=args.expires,
                                          allowed_models=args.models, limits=limit_changes(args) or None,
                                          org=args.org)
    creds.api_key = key["api_key"]
    creds.save()
    text = (f"{key['api_key']}\n"
            f"This key is shown once: keep it secret. Saved as this CLI's key "
            f"(id {key['id']}, prefix {key['prefix']}).")
    return Result(text, key)


async def keys_list(args: Namespace, session: Session, creds: Credentials) -> Result:
    keys = await _auth(session).list_keys(token=need_token(creds))
    rows = [[k["id"], k["name"], k["prefix"], k["status"], (k["created_at"] or "-")[:19],
             (k.get("last_used_at") or "-")[:19], (k.get("expires_at") or "-")[:19], _models(k),
             describe_limits(k.get("limits"), none="-"), k.get("org_id") or "-"] for k in keys]
    return Result(table(["id", "name", "prefix", "status", "created", "last used", "expires", "models", "limits",
                         "org"], rows), keys)


def _models(key: Any) -> str:
    allowed = key.get("allowed_models")
    return "all" if allowed is None else ",".join(allowed)


async def keys_edit(args: Namespace, session: Session, creds: Credentials) -> Result:
    changes: dict[str, Any] = {}
    if args.name is not None:
        changes["name"] = args.name
    if args.models is not None or args.all_models:
        changes["allowed_models"] = args.models  # None: every model
    if args.expires is not None or args.no_expiry:
        changes["expires_at"] = args.expires  # None: never
    if limit_changes(args):
        changes["limits"] = limit_changes(args)  # a None value clears that limit
    if not changes:
        raise InvalidParams("nothing to change: give --name, --models/--all-models, --expires/--no-expiry "
                            "or a limit (--requests-per-hour, ..., --budget-month)", {"param": "name"})
    key = await _auth(session).update_key(token=need_token(creds), key_id=args.key_id, **changes)
    expires = (key.get("expires_at") or "never")[:19]
    return Result(f"updated key {key['id']} ({key['name']}): models {_models(key)}, expires {expires}, "
                  f"limits {describe_limits(key.get('limits'))}", key)


async def keys_revoke(args: Namespace, session: Session, creds: Credentials) -> Result:
    key = await _auth(session).revoke_key(token=need_token(creds), key_id=args.key_id)
    return Result(f"revoked key {key['id']} ({key['name']})", key)


async def keys_rotate(args: Namespace, session: Session, creds: Credentials) -> Result:
    key = await _auth(session).rotate_key(token=need_token(creds), key_id=args.key_id,
                                          overlap_seconds=args.overlap)
    creds.api_key = key["api_key"]
    creds.save()
    old = key["old_key"]
    text = (f"{key['api_key']}\n"
            f"This key is shown once: keep it secret. Saved as this CLI's key "
            f"(id {key['id']}, prefix {key['prefix']}).\n"
            f"The old key {old['id']} ({old['prefix']}) {_stops(old['expires_at'])}.")
    return Result(text, key)


def _stops(expires_at: str | None) -> str:
    """When a rotated key stops working, as people read it."""
    if expires_at is None:  # not after a rotation: auth always sets it
        return "does not expire"
    left = datetime.fromisoformat(expires_at).timestamp() - time.time()
    if left <= 0:
        return f"stopped working at {expires_at[:19]} UTC (within a second everywhere)"
    return f"keeps working until {expires_at[:19]} UTC (in {human_duration(left)}), then stops"


_DURATION = re.compile(r"(\d{1,7})([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def overlap_seconds(text: str) -> int:
    """`--overlap`: 0, 90s, 90m, 24h, 7d (a bare number is seconds)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ArgumentTypeError(f"{text!r}: expected a duration such as 0, 90m, 24h or 7d")
    return int(match[1]) * _UNIT_S[match[2]]


def expiry_moment(text: str) -> str:
    """`--expires`: a duration from now (30d, 12h, 90m) or an ISO 8601 date-time (UTC unless it says),
    as the ISO 8601 moment auth takes."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is not None and int(match[1]) > 0:
        moment = datetime.now(timezone.utc) + timedelta(seconds=int(match[1]) * _UNIT_S[match[2]])
        return moment.isoformat(timespec="seconds")
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ArgumentTypeError(f"{text!r}: expected a duration such as 30d or 12h, or an ISO 8601 date-time") \
            from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def model_list(text: str) -> list[str]:
    """`--models a,b`: the names, comma-separated (auth checks each)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ArgumentTypeError("expected one or more model names, comma-separated")
    return names


async def usage(args: Namespace, session: Session, creds: Credentials) -> Result:
    report = await _auth(session).usage(token=need_token(creds), start=args.start or None, end=args.end or None)
    rows = [[d["day"], d.get("key_name") or "-", d["requests"], d["tokens"], d["errors"], d["cache_hits"]]
            for d in report["days"]]
    totals = report["totals"]
    text = table(["day", "key", "requests", "tokens", "errors", "cache hits"], rows)
    text += f"\ntotal: {totals.get('requests', 0)} requests, {totals.get('tokens', 0)} tokens"
    for currency, cost in sorted((totals.get("cost") or {}).items()):
        text += f", {cost} {currency}"
    if totals.get("unpriced"):
        text += f" ({totals['unpriced']} requests without a price)"
    return Result(text, report)


async def admin_set_tier(args: Namespace, session: Session, creds: Credentials) -> Result:
    user = await _auth(session).set_tier(token=need_token(creds), user=args.user, tier=args.tier)
    return Result(f"{user['username']} is now on the {user['tier']} tier", user)


async def admin_grant(args: Namespace, session: Session, creds: Credentials) -> Result:
    """As a mesh member: `auth.grant_admin` (no login needed, the mesh secret is the authority)."""
    return await _set_admin(args, session, "grant")


async def admin_revoke(args: Namespace, session: Session, creds: Credentials) -> Result:
    return await _set_admin(args, session, "revoke")


async def _set_admin(args: Namespace, session: Session, action: str) -> Result:
    ref = args.user
    user_ref = int(ref) if ref.isascii() and ref.isdigit() else ref
    auth = _auth(session)
    change = auth.grant_admin if action == "grant" else auth.revoke_admin
    user = await change(user=user_ref, reason=args.reason or None)
    # Non-ASCII shown escaped: the operator sees "\u0430dmin", not a look-alike of "admin".
    who = f"{shown(user['username'])} (id {user['id']}, {shown(user['email'])})"
    outcomes = {
        ("grant", True): "is now an administrator", ("grant", False): "was already an administrator",
        ("revoke", True): "is no longer an administrator", ("revoke", False): "was not an administrator",
    }
    return Result(f"{who} {outcomes[action, user['changed']]}", user)


async def admin_price_set(args: Namespace, session: Session, creds: Credentials) -> Result:
    """As the operator (the mesh secret), else as the logged-in admin."""
    token = None if args.as_operator else need_token(creds)
    price = await _auth(session).set_price(
        token=token, model=args.model, input=args.input, output=args.output, cached=args.cached,
        currency=args.currency, effective_from=args.effective_from)
    cached = f", cached input {price['cached']}" if price["cached"] is not None else ""
    return Result(f"{price['model']}: input {price['input']}, output {price['output']}{cached} "
                  f"{price['currency']} per million tokens, from {price['effective_from']}", price)


async def admin_price_list(args: Namespace, session: Session, creds: Credentials) -> Result:
    token = None if args.as_operator else need_token(creds)
    prices = await _auth(session).prices(token=token, model=args.model)
    rows = [[p["model"], p["input"], p["output"], p["cached"] or "-", p["currency"], p["effective_from"][:19],
             p["status"]] for p in prices]
    return Result(table(["model", "input", "output", "cached", "currency", "from", "status"], rows), prices)


def shown(text: str) -> str:
    """`text` as typed when it is plain printable ASCII, else with escapes (\\u212a)."""
    return text if text.isascii() and text.isprintable() else ascii(text)[1:-1]


def _auth(session: Session) -> AuthClient:
    return AuthClient(session("auth"))


def _gateway(session: Session) -> GatewayClient:
    return GatewayClient(session("gateway"))


def _caller(creds: Credentials) -> dict[str, str]:
    """The API key if there is one, else the session token (the gateway takes either)."""
    key = creds.effective_api_key()
    if key:
        return {"api_key": key}
    if creds.token:
        return {"token": creds.token}
    raise Unauthenticated("no API key: run `inferswarm keys create NAME` or set INFERSWARM_API_KEY")


def json_schema_format(path: Path) -> dict[str, Any]:
    """OpenAI's `response_format` for the JSON Schema in `path` (`--json-schema`).

    Named after the file (its stem, in the characters OpenAI allows); strict, so
    the answer is JSON valid against the schema. A file that cannot be read, is
    not JSON or is not a JSON object is INVALID_PARAMS, before anything is sent.
    """
    try:
        schema = json.loads(path.read_bytes())
    except OSError as exc:
        raise InvalidParams(f"--json-schema {path}: {(exc.strerror or str(exc)).lower()}",
                            {"param": "json_schema"}) from None
    except ValueError as exc:  # not UTF-8, or not JSON
        raise InvalidParams(f"--json-schema {path}: not JSON ({exc})", {"param": "json_schema"}) from None
    if not isinstance(schema, dict):
        raise InvalidParams(f"--json-schema {path}: a JSON Schema is an object, not {type(schema).__name__}",
                            {"param": "json_schema"})
    name = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:64] or "schema"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


async def generate(args: Namespace, session: Session, creds: Credentials, messages: list[dict[str, str]], *,
                   echo: bool, response_format: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """One `gateway.infer` call; prints text as it arrives when `echo`; (text, final chunk)."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    params: dict[str, Any] = {**_caller(creds), "model": args.model, "messages": system + messages,
                              "max_tokens": args.max_tokens, "temperature": args.temperature,
                              "top_p": args.top_p, "stop": args.stop, "seed": args.seed,
                              "stream": not args.no_stream}
    if args.no_fallback:
        params["fallback"] = False
    parts: list[str] = []
    final: dict[str, Any] = {}
    async with await _gateway(session).infer(**params, response_format=response_format) as stream:
        async for chunk in stream:
            text = text_of(chunk)
            if is_final(chunk):
                final = chunk
            elif text is not None:
                parts.append(text)
                if echo:
                    sys.stdout.write(text)
                    sys.stdout.flush()
    return "".join(parts), final


async def infer(args: Namespace, session: Session, creds: Credentials) -> Result:
    response_format = json_schema_format(args.json_schema) if args.json_schema else None
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    text, final = await generate(args, session, creds, [{"role": "user", "content": prompt}],
                                 echo=not args.json, response_format=response_format)
    if not args.json:
        sys.stdout.write("\n")
    return Result("", {"text": text, **{k: v for k, v in final.items() if k != "done"}})


async def chat(args: Namespace, session: Session, creds: Credentials) -> Result:
    """A conversation: Ctrl-C stops the current answer, Ctrl-D (or an empty line) ends."""
    response_format = json_schema_format(args.json_schema) if args.json_schema else None
    messages: list[dict[str, str]] = []
    loop = asyncio.get_running_loop()
    answering: list[asyncio.Future[Any]] = []

    def interrupt() -> None:
        if answering and not answering[0].done():
            answering[0].cancel()  # the stream's exit tells the gateway to stop
        else:
            sys.stdout.write("\n(Ctrl-D ends the chat)\nyou> ")
            sys.stdout.flush()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        while True:
            try:
                line = await loop.run_in_executor(None, input, "you> ")
            except EOFError:
                sys.stdout.write("\n")  # end the prompt's line
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            answering[:] = [asyncio.ensure_future(generate(args, session, creds, messages, echo=True,
                                                           response_format=response_format))]
            try:
                text, _ = await answering[0]
            except asyncio.CancelledError:
                if not answering[0].cancelled():
                    raise  # the session itself is being cancelled
                text = ""
            sys.stdout.write("\n")
            if text:
                messages.append({"role": "assistant", "content": text})
            else:
                messages.pop()  # an interrupted turn is not part of the conversation
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    return Result("", {"messages": messages})


async def models(args: Namespace, session: Session, creds: Credentials) -> Result:
    catalog = await _gateway(session).models()
    rows = [[m["name"], m.get("workers", "-"), m.get("healthy_workers", "-")] for m in catalog["models"]]
    return Result(table(["model", "workers", "healthy"], rows), catalog)


async def quota(args: Namespace, session: Session, creds: Credentials) -> Result:
    caller = _caller(creds)
    answer = await _gateway(session).quota(api_key=caller.get("api_key"), token=caller.get("token"))
    rows = []
    for counter, fact in sorted(answer["rate_limit"].items()):
        reset = fact.get("reset")
        in_min = "-" if reset is None else human_duration(max(0.0, reset - time.time()))
        limit = "unlimited" if fact.get("limit") is None else fact["limit"]
        rows.append([counter, limit, fact.get("used", "-"), fact.get("remaining", "-"), in_min])
    text = f"tier: {answer['tier']}\n" + table(["counter", "limit", "used", "remaining", "resets in"], rows)
    return Result(text, answer)


async def status(args: Namespace, session: Session, creds: Credentials) -> Result:
    # Through the gateway, for administrators: the report names every endpoint of the mesh.
    report = await _gateway(session).status(token=need_token(creds))
    return Result(status_text(report), report)


def status_text(report: Mapping[str, Any]) -> str:
    """The health report as `inferswarm status` prints it: instances, capacity, model backends."""
    instances = sorted(report["instances"], key=lambda i: (i["service"], i["instance"]))
    rows = [[i["service"], i["instance"], i["status"], i.get("endpoint") or "-",
             "-" if i.get("latency_ms") is None else f"{i['latency_ms']:.1f} ms"]
            for i in instances]
    text = f"system: {report['status']}\n" + table(["service", "instance", "status", "endpoint", "ping"], rows)
    models = report.get("models") or {}
    if models:
        model_rows = [[name, m["workers"], m["slots"], m["slots_free"], m["queue_depth"]]
                      for name, m in sorted(models.items())]
        text += "\n\n" + table(["model", "workers", "slots", "free", "queued"], model_rows)
    backend_rows = [row for i in instances for row in _backend_rows(i)]
    if backend_rows:
        text += "\n\n" + table(["instance", "model", "breaker", "key", "state", "requests", "remaining"],
                               backend_rows)
    return text


def _backend_rows(instance: Mapping[str, Any]) -> list[list[Any]]:
    """One row per upstream key of each model of a worker (one row without keys), for models
    whose breaker is not closed or that have keys."""
    rows = []
    for model, served in sorted((instance.get("served") or {}).items()):
        breaker = served.get("breaker") or {}
        state = breaker.get("state") or "-"
        keys = served.get("keys") or []
        if state in ("closed", "-") and not keys:
            continue
        shown = state.replace("_", "-")
        if state != "closed" and breaker.get("retry_after"):
            shown += f" ({breaker['retry_after']:.1f}s)"
        for key in keys or [{}]:
            remaining = "/".join(f"{key[f'remaining_{what}']} {what}" for what in ("requests", "tokens")
                                 if key.get(f"remaining_{what}") is not None) or "-"
            rows.append([instance["instance"], model, shown, key.get("key", "-"), key.get("state", "-"),
                         key.get("requests", "-"), remaining])
    return rows


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


COMMANDS = {
    "register": register,
    "login": login,
    "logout": logout,
    "password": password,
    "keys create": keys_create,
    "keys list": keys_list,
    "keys revoke": keys_revoke,
    "keys rotate": keys_rotate,
    "keys edit": keys_edit,
    "usage": usage,
    "admin set-tier": admin_set_tier,
    "admin grant": admin_grant,
    "admin revoke": admin_revoke,
    "admin price set": admin_price_set,
    "admin price list": admin_price_list,
    "status": status,
    "infer": infer,
    "chat": chat,
    "models": models,
    "quota": quota,
}
