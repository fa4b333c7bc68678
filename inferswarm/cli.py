"""`inferswarm` — the command-line entry point.

    inferswarm up [--data-dir DIR] [--gateways N] [--workers N] [--json]
    inferswarm register USERNAME EMAIL        inferswarm login USERNAME_OR_EMAIL
    inferswarm logout [--everywhere]          inferswarm keys create|list|revoke
    inferswarm keys rotate KEY_ID [--overlap 24h|90m|0]   (a new key; the old one stops after the overlap)
    inferswarm keys create NAME [--models a,b] [--expires 30d|ISO8601] [--org ORG]   (limited to those models;
                                              expiring; an organisation's key)
    inferswarm keys edit KEY_ID [--name N] [--models a,b | --all-models] [--expires 30d|ISO8601 | --no-expiry]
    inferswarm keys create|edit ... [--requests-per-hour N] [--requests-per-month N] [--tokens-per-month N]
                               [--budget-day AMOUNT] [--budget-month AMOUNT]   (`none` clears, on edit)
    inferswarm budget                         inferswarm budget set [--day AMOUNT|none] [--month AMOUNT|none] [--user U]
    inferswarm password
    inferswarm usage [--start D] [--end D]    inferswarm admin set-tier USER TIER
    inferswarm costs [--from D] [--to D] [--by model|key] [--group day|week|month] [--csv]
    inferswarm admin top-spenders [--from D] [--to D] [--limit N]   (the operator, else a logged-in admin)
    inferswarm audit [--user U] [--action A] [--since ISO] [--until ISO] [--limit N] [--before-id N]
                                              (your own events; an admin's: everyone's)
    inferswarm admin grant|revoke USER        (the operator: needs the mesh secret)
    inferswarm admin price set MODEL --input X --output Y [--cached Z] [--currency C] [--from ISO8601]
    inferswarm admin price list [--model M]   (the operator, else a logged-in admin)
    inferswarm admin tiers                    (the operator, else anyone logged in)
    inferswarm admin tiers set NAME [--requests-per-hour N|none] [--requests-per-month N|none]
        [--tokens-per-month N|none] [--budget-day AMOUNT|none] [--budget-month AMOUNT|none] [--priority P]
                                              (the operator, else a logged-in admin)
    inferswarm admin settings                 (the operator, else anyone logged in)
    inferswarm admin settings set [--default-model M|none] [--fallback-models A,B|none] [--cache-ttl SECONDS|none]
                        [--alias NAME=M1,M2 ...] [--remove-alias NAME ...] [--first-token-timeout SECONDS|none]
                                              (routing settings: the operator, else a logged-in admin)
    inferswarm admin dead-letters [--limit N] [--model M] [--before ID]
                                              (requests failed after every fallback: the operator, or admins)
    inferswarm webhook set URL [--thresholds 50,80,100]   (your spending alerts' webhook; its secret shown once)
    inferswarm webhook show|rotate-secret|remove|deliveries     inferswarm alerts [--limit N]
    inferswarm org create|list|show|invite|invites|accept|decline|role|remove|limits|report ...
                                              (organisations: orgs.py)
    inferswarm credential ROLE [--out FILE]   (the operator: a service's credential)
    inferswarm receipts verify FILE [--keys FILE | --base-url URL]   (signed usage receipts)

Client commands work from any directory: they find the mesh through
`--bootstrap HOST:PORT` (or `INFERSWARM_BOOTSTRAP`; default the local stack's,
from the `mesh.json` that `up` writes in the user's config directory) and
remember the providers they found in the user's cache directory, so that most
commands call them directly, without joining the DHT. Every command accepts
`--json`. Errors are one line on stderr with a meaningful exit code.

Where the mesh cannot be reached, `--base-url URL` (or `INFERSWARM_BASE_URL`)
sends `infer`, `chat`, `models`, `quota`, `usage`, `costs`, `register`, `login`,
`logout`, `password`, `keys`, `budget` and `org` to the web service's HTTP API instead
(`httpclient.py`), with the same output, error lines and exit codes;
`--ca-file FILE` trusts a certificate authority for an https URL. The other
commands need the mesh and do not take `--base-url` (but `receipts verify`,
which may ask the web service for the gateways' keys: receipts.py).

`admin grant` and `admin revoke` call auth as a mesh member, with the key
derived from the mesh secret (`member.py`): whoever holds the secret is the
operator. Without it they stop at once with exit code 3. `admin price set`,
`admin price list`, `admin tiers`, `admin tiers set`, `admin settings`,
`admin settings set` and `admin dead-letters` do the same with the secret, and without it use the saved session (an administrator's, for `set`). So does
`credential ROLE`, which prints one member role's credential (e.g. `inference`
for a worker on another host): what a service process is given instead of
the secret (`INFERSWARM_CREDENTIAL` or `INFERSWARM_CREDENTIAL_FILE`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from inferswarm import receipts, up
from inferswarm.audit import AUDIT_COMMANDS
from inferswarm.budget import BUDGET_COMMANDS
from inferswarm.commands import COMMANDS, Result, expiry_moment, model_list, overlap_seconds
from inferswarm.costs import COST_COMMANDS
from inferswarm.dead_letters import DEAD_LETTER_COMMANDS, add_dead_letter_arguments
from inferswarm.orgs import ORG_COMMANDS, add_org_commands, org_ref
from inferswarm.settings import SETTING_COMMANDS, add_settings_arguments
from inferswarm.tiers import TIER_COMMANDS, add_set_arguments
from inferswarm.webhooks import WEBHOOK_COMMANDS, add_webhook_parsers
from inferswarm.config import client_config
from inferswarm.credentials import Credentials
from inferswarm.errors import describe, exit_code
from inferswarm.limits import add_budget_options, add_limit_options
from inferswarm.httpclient import HttpSession
from inferswarm.localmesh import cache_dir
from inferswarm.member import NotAMember, member_credential
from inferswarm.session import ClientSession, SessionError, resolve_bootstrap, resolve_mesh_id
from shared.errors import MeshError
from shared.identity import MeshId, write_private_file
from shared.roles import OPERATOR, ROLES
from shared.logging import configure_logging

__all__ = ["main", "parser"]

#: Commands that call members-only methods, with the mesh secret's key.
MEMBER_COMMANDS = frozenset({"admin grant", "admin revoke"})
#: Commands run as the operator when the mesh secret is at hand, else with the saved session token.
OPERATOR_OR_SESSION = frozenset({"admin price set", "admin price list", "admin top-spenders", "admin tiers",
                                 "admin tiers set", "admin settings", "admin settings set", "admin dead-letters"})
#: Commands the web service's HTTP API can answer (`--base-url`); the others need the mesh.
HTTP_COMMANDS = frozenset({"register", "login", "logout", "password", "keys create", "keys list",
                           "keys revoke", "keys rotate", "keys edit", "usage", "costs", "models", "quota", "infer", "chat",
                           "budget", "budget set", *ORG_COMMANDS, *WEBHOOK_COMMANDS})


def _client_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--bootstrap", default=client_config().bootstrap,
                        help="host:port of any mesh node (default: the local stack's)")
    common.add_argument("--data-dir", type=Path, default=client_config().data_dir,
                        help="a stack's data directory, for its mesh id (and, for admin grant/revoke, "
                             "its mesh.secret; default: INFERSWARM_MESH_ID, else the stack `inferswarm up` "
                             "runs on this machine)")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer")
    return common


def _http_options() -> argparse.ArgumentParser:
    http = argparse.ArgumentParser(add_help=False)
    http.add_argument("--base-url", metavar="URL", default=client_config().base_url,
                      help="use the web service at URL (http[s]://HOST[:PORT]) instead of the mesh, e.g. "
                           "where the mesh cannot be reached (default: INFERSWARM_BASE_URL; the API key is "
                           "INFERSWARM_API_KEY or the saved one)")
    http.add_argument("--ca-file", type=Path, metavar="FILE", default=client_config().ca_file,
                      help="trust this certificate authority (PEM) for an https URL (default: "
                           "INFERSWARM_CA_FILE, else the system's)")
    return http


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="inferswarm", description="An AI inference platform on a DHT mesh.",
        epilog="Client commands reach the mesh through --bootstrap (default: the stack `inferswarm up` runs "
               "here). Where the mesh cannot be reached, infer, chat, models, quota, usage, costs, register, login, "
               "logout, password, keys, budget and org take --base-url URL (or INFERSWARM_BASE_URL): the web service's "
               "HTTP API, with the same output and exit codes. The API key: INFERSWARM_API_KEY, else the one "
               "`keys create` saved. `inferswarm COMMAND --help` for each command's options.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up_parser = commands.add_parser("up", help="start the whole stack on this machine")
    up.add_arguments(up_parser)
    up_parser.set_defaults(run=up.up)
    credential = commands.add_parser("credential", help="print a member role's credential (the operator: "
                                                        "needs the mesh secret)")
    credential.add_argument("role", choices=[role for role in ROLES if role != OPERATOR],
                            help="the role of the process it is for")
    credential.add_argument("--data-dir", type=Path, default=client_config().data_dir,
                            help="the stack's data directory, for its mesh.secret (default: "
                                 "INFERSWARM_MESH_SECRET, else the stack `inferswarm up` runs on this machine)")
    credential.add_argument("--out", type=Path, metavar="FILE",
                            help="write it to FILE (owner-only, 0600) instead of stdout")
    credential.set_defaults(run=run_credential)

    common, http = _client_options(), _http_options()

    def client(name: str, help: str, sub: argparse._SubParsersAction = commands) -> argparse.ArgumentParser:
        parents = [common, http] if name in HTTP_COMMANDS else [common]
        command = sub.add_parser(name.split()[-1], help=help, parents=parents)
        command.set_defaults(run=run_client, action=name)
        return command

    register = client("register", "create an account")
    register.add_argument("username")
    register.add_argument("email")
    register.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    login = client("login", "log in and keep the session token")
    login.add_argument("username", metavar="USERNAME_OR_EMAIL")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    logout = client("logout", "end this session and forget the saved token and key")
    logout.add_argument("--everywhere", action="store_true",
                        help="end every session of the account (other machines and browsers too)")
    change = client("password", "change your password (every other session ends)")
    change.add_argument("--password-stdin", action="store_true",
                        help="read two lines from stdin: the current password, then the new one")

    keys = commands.add_parser("keys", help="create, list, edit, revoke and rotate API keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION")
    create = client("keys create", "create a key (shown once)", keys)
    create.add_argument("name")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in-days", type=int)
    expiry.add_argument("--expires", type=expiry_moment, metavar="WHEN",
                        help="when the key stops: a duration from now (30d, 12h) or an ISO 8601 date-time")
    create.add_argument("--models", type=model_list, metavar="A,B",
                        help="the only models the key may use, comma-separated (default: every model)")
    add_limit_options(create, clearing=False)
    create.add_argument("--org", type=org_ref, metavar="ORG",
                        help="a key of this organisation (id or name; you must be a member): its limits apply")
    client("keys list", "list your keys", keys)
    edit = client("keys edit", "change a key's name, models, expiry or limits (gateways see it within a second)",
                  keys)
    edit.add_argument("key_id", type=int, help="the id shown by `keys list`")
    edit.add_argument("--name")
    models = edit.add_mutually_exclusive_group()
    models.add_argument("--models", type=model_list, metavar="A,B", help="the only models the key may use")
    models.add_argument("--all-models", action="store_true", help="let the key use every model")
    expires = edit.add_mutually_exclusive_group()
    expires.add_argument("--expires", type=expiry_moment, metavar="WHEN",
                         help="a duration from now (30d, 12h) or an ISO 8601 date-time")
    expires.add_argument("--no-expiry", action="store_true", help="the key never expires")
    add_limit_options(edit, clearing=True)
    revoke = client("keys revoke", "revoke a key", keys)
    revoke.add_argument("key_id", type=int, help="the id shown by `keys list`")
    rotate = client("keys rotate", "replace a key: a new key (shown once, saved), the old one stops after "
                                   "--overlap", keys)
    rotate.add_argument("key_id", type=int, help="the id shown by `keys list`")
    rotate.add_argument("--overlap", type=overlap_seconds, metavar="DURATION",
                        help="how long the old key keeps working: 0 (stops now), 90m, 24h, 7d; at most 30 days "
                             "(default: 24h)")

    budget = client("budget", "your money budgets and the limits in force")
    set_budget = client("budget set", "set (or clear, with none) a budget: yours, or --user's (admins)",
                        budget.add_subparsers(dest="budget_command", metavar="ACTION"))
    add_budget_options(set_budget)
    add_webhook_parsers(client, commands)
    add_org_commands(commands, client)

    usage = client("usage", "requests and tokens per day")
    usage.add_argument("--start", help="YYYY-MM-DD (default: 30 days ago)")
    usage.add_argument("--end", help="YYYY-MM-DD (default: today)")

    costs = client("costs", "your cost and usage per day, week or month, by model or key")
    costs.add_argument("--from", dest="start", metavar="DATE", help="YYYY-MM-DD (default: the 30 days ending --to)")
    costs.add_argument("--to", dest="end", metavar="DATE", help="YYYY-MM-DD, included (default: today, UTC)")
    costs.add_argument("--group", choices=["day", "week", "month"], default="day",
                       help="one row per UTC day, ISO week (from Monday) or month (default: day)")
    costs.add_argument("--by", choices=["model", "key"], help="one row per model, or per API key, in each period")
    costs.add_argument("--csv", action="store_true", help="CSV with a header line, to stdout")

    client("status", "every service and worker: announced, reachable, capacity")
    client("models", "models served, and by how many workers")
    client("quota", "your limits: used, remaining, reset")
    for name, help in (("infer", "generate a completion (tokens printed as they arrive)"),
                       ("chat", "an interactive conversation (Ctrl-C stops the answer)")):
        command = client(name, help)
        if name == "infer":
            command.add_argument("prompt", help="the prompt, or - to read it from stdin")
        command.add_argument("--model", default="smollm2", help="a model, an alias or default (default: smollm2)")
        command.add_argument("--no-fallback", action="store_true",
                             help="only the model named (an alias's first): no fallback to other models")
        command.add_argument("--system", metavar="TEXT", help="a system message, before the conversation")
        command.add_argument("--max-tokens", type=int, metavar="N",
                             help="the most tokens to generate (default: the model's, what its context leaves)")
        command.add_argument("--temperature", type=float, metavar="T",
                             help="sampling temperature in [0, 2] (default: the model's)")
        command.add_argument("--top-p", type=float, metavar="X",
                             help="sample only from the likeliest tokens whose probabilities add up to X, "
                                  "in (0, 1] (default: the model's)")
        command.add_argument("--stop", action="append", metavar="TEXT",
                             help="end the answer before TEXT (repeatable, up to 4)")
        command.add_argument("--seed", type=int, metavar="N", help="a sampling seed: the same request, "
                                                                   "the same answer")
        command.add_argument("--json-schema", type=Path, metavar="FILE",
                             help="answer in JSON valid against the JSON Schema in FILE (OpenAI's "
                                  "response_format json_schema, strict)")
        command.add_argument("--no-stream", action="store_true", help="print the answer when complete")

    verify = commands.add_parser("receipts", help="signed usage receipts").add_subparsers(
        dest="receipts_command", required=True, metavar="ACTION").add_parser(
        "verify", parents=[common, http], help="check receipts against the gateways' keys (--keys FILE, the web "
                                               "service at --base-url, else the mesh)")
    receipts.add_arguments(verify)

    admin = commands.add_parser("admin", help="administration").add_subparsers(
        dest="admin_command", required=True, metavar="ACTION")
    set_tier = client("admin set-tier", "change a user's tier (admins only)", admin)
    set_tier.add_argument("user", help="id, username or email")
    set_tier.add_argument("tier", choices=["free", "pro", "enterprise", "unlimited"])
    for action, help in (("grant", "make a user an administrator (the operator: needs the mesh secret)"),
                         ("revoke", "withdraw a user's administration (needs the mesh secret)")):
        command = client(f"admin {action}", help, admin)
        command.add_argument("user", help="id (digits), username or email")
        command.add_argument("--reason", help="recorded in the audit log")
    top = client("admin top-spenders", "the users who spent most, per currency (the operator, or admins)", admin)
    top.add_argument("--from", dest="start", metavar="DATE", help="YYYY-MM-DD (default: the 30 days ending --to)")
    top.add_argument("--to", dest="end", metavar="DATE", help="YYYY-MM-DD, included (default: today, UTC)")
    top.add_argument("--limit", type=int, metavar="N", help="the first N of each currency, 1-100 (default: 10)")
    trail = client("audit", "the audit log: your own events (an admin's: everyone's), newest first")
    trail.add_argument("--user", metavar="U", help="a username or email (admins; a user: only their own)")
    trail.add_argument("--action", dest="event", metavar="A", help="an event (key_created) or a prefix of events (key_*)")
    trail.add_argument("--since", metavar="ISO", help="from this time on, ISO 8601 (UTC unless an offset is given)")
    trail.add_argument("--until", metavar="ISO", help="before this time, ISO 8601")
    trail.add_argument("--limit", type=int, metavar="N", help="at most N events, 1-500 (default: 100)")
    trail.add_argument("--before-id", type=int, metavar="N", help="older than event N: the next page")
    price = admin.add_parser("price", help="model prices per million tokens (the operator, or admins)"
                             ).add_subparsers(dest="price_command", required=True, metavar="ACTION")
    set_price = client("admin price set", "a new price version for a model, from now or --from on", price)
    set_price.add_argument("model")
    set_price.add_argument("--input", required=True, metavar="X", help="per million prompt tokens, e.g. 0.15")
    set_price.add_argument("--output", required=True, metavar="Y", help="per million completion tokens")
    set_price.add_argument("--cached", metavar="Z", help="per million prompt tokens of a cached answer "
                                                         "(default: the input price; 0: free)")
    set_price.add_argument("--currency", metavar="CODE", help="ISO 4217 (default: USD)")
    set_price.add_argument("--from", dest="effective_from", metavar="ISO8601",
                           help="when it applies, with a time zone, e.g. 2027-01-01T00:00:00Z (default: now)")
    list_prices = client("admin price list", "prices in force now, and scheduled ones", price)
    list_prices.add_argument("--model", help="one model only")
    tiers = client("admin tiers", "the tiers and their limits; `set` changes them (the operator, or admins)", admin)
    set_tier_limits = client("admin tiers set", "change a tier's limits and priority; every gateway applies "
                                                "them within a second", tiers.add_subparsers(
                                                    dest="tiers_command", metavar="[ACTION]"))
    add_set_arguments(set_tier_limits)
    settings = client("admin settings", "the routing settings: default model, fallback models, cache TTL, "
                                        "aliases, first-token timeout; `set` changes them (the operator, or "
                                        "admins)", admin)
    add_settings_arguments(client("admin settings set", "change routing settings; every gateway applies them "
                                                        "within a second", settings.add_subparsers(
                                                            dest="settings_command", metavar="[ACTION]")))
    add_dead_letter_arguments(client("admin dead-letters", "requests that failed after every fallback, newest "
                                                           "first (the operator, or admins)", admin))
    return root


def run_credential(args: argparse.Namespace) -> int:
    """Print (or write) the credential of `args.role`, derived from the mesh secret."""
    try:
        mesh = member_credential(args.data_dir, "`inferswarm credential`")
    except SessionError as error:
        print(f"inferswarm: {error}", file=sys.stderr)
        return 3 if isinstance(error, NotAMember) else 6
    text = mesh.member(args.role).to_text()
    if args.out is None:
        print(text)
        return 0
    write_private_file(args.out, text.encode() + b"\n")
    print(f"the {args.role} credential of mesh {mesh.mesh_id.hex()} is in {args.out} (0600): give it to "
          f"the process as INFERSWARM_CREDENTIAL_FILE={args.out}", file=sys.stderr)
    return 0


def run_client(args: argparse.Namespace) -> int:
    """Run one client command; print its result or one error line."""
    try:
        result = asyncio.run(_run(args))
    except MeshError as error:
        print(f"inferswarm: {describe(error)}", file=sys.stderr)
        return exit_code(error)
    except NotAMember as error:
        print(f"inferswarm: {error}", file=sys.stderr)
        return 3
    except SessionError as error:
        print(f"inferswarm: {error}", file=sys.stderr)
        return 6
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(result.data, default=str))
    elif result.text:
        print(result.text)
    return 0


async def _run(args: argparse.Namespace) -> Result:
    command = {**COMMANDS, **COST_COMMANDS, **AUDIT_COMMANDS, **TIER_COMMANDS, **SETTING_COMMANDS,
               **BUDGET_COMMANDS, **WEBHOOK_COMMANDS, **ORG_COMMANDS, **DEAD_LETTER_COMMANDS}[args.action]
    creds = Credentials.load()
    if args.action == "logout" and not creds.token:
        return await command(args, None, creds)
    if getattr(args, "base_url", None):
        web = HttpSession(args.base_url, api_key=creds.effective_api_key(), timeout=args.timeout,
                          ca_file=args.ca_file)
        async with web:
            return await command(args, web, creds)
    try:
        keys = None
        args.as_operator = False
        if args.action in MEMBER_COMMANDS | OPERATOR_OR_SESSION:
            try:
                credential = member_credential(args.data_dir, f"`inferswarm {args.action}`")
            except NotAMember as exc:
                if args.action not in OPERATOR_OR_SESSION:
                    raise
                if not creds.token:
                    raise NotAMember(f"{exc}; or log in as an administrator") from None
                credential = None  # a logged-in user: auth decides with the token
            if credential is not None:
                mesh_id, keys, args.as_operator = MeshId(credential.mesh_id), credential.client, True
            else:
                mesh_id = resolve_mesh_id(args.data_dir)
        else:
            mesh_id = resolve_mesh_id(args.data_dir)
        seeds = resolve_bootstrap(args.bootstrap, mesh_id)
        session = ClientSession(seeds, mesh_id, timeout=args.timeout, cache_dir=cache_dir(), keys=keys)
        async with session:
            return await command(args, session, creds)
    except SessionError as exc:
        if args.action != "logout":
            raise
        return await command(args, None, creds, unreachable=str(exc))  # forget it here at least


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # stdout is for people and scripts (`--json`); logs go to stderr, quietly.
    level = "warning" if args.command == "up" else "error"
    configure_logging(level, "console" if sys.stderr.isatty() else "json", service="inferswarm")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
