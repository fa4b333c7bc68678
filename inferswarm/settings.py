"""`inferswarm admin settings` and `inferswarm admin settings set`: the routing settings
(`auth.settings`, `auth.set_settings`; services/auth/README.md, "Routing settings").

    inferswarm admin settings                                     # each setting, and when it was set
    inferswarm admin settings set [--default-model M|none] [--fallback-models a,b|none] [--cache-ttl SECONDS|none]
        [--alias NAME=m1,m2 ...] [--remove-alias NAME ...] [--first-token-timeout SECONDS|none]

Like `admin tiers`, they run as the operator when the mesh secret is at hand,
else with the saved session (an administrator's, for `set`). `none` clears a
setting; one left out is kept. Values are sent as typed, for auth to check
(a model name's shape, duplicates, the range of seconds).

Aliases are one setting, a map that `auth.set_settings` replaces whole; so
`--alias` (add or replace one alias's chain) and `--remove-alias` read the
aliases first and send them merged. Two admins editing aliases at the same
moment: the last one's map wins.
"""

from __future__ import annotations

from argparse import ArgumentParser, Namespace
from typing import Any

from inferswarm.commands import Result, Session, need_token, table
from inferswarm.credentials import Credentials
from inferswarm.session import ClientSession
from services.auth.client import AuthClient, Settings
from shared.errors import InvalidParams

__all__ = ["SETTING_COMMANDS", "add_settings_arguments", "admin_settings", "admin_settings_set"]

#: `set`'s options: (option, the setting, what it takes, its help).
_OPTIONS = (
    ("--default-model", "default_model", "M|none", "the model serving requests for the model `default` "
                                                    "(none: no default)"),
    ("--fallback-models", "fallback_models", "A,B|none",
     "up to 8 models, comma-separated, tried in order when the one asked for cannot take a request (none: no "
     "fallback)"),
    ("--cache-ttl", "cache_ttl", "SECONDS|none",
     "how long workers keep a response, 0-86400 (0: no caching; none: each worker's own)"),
    ("--first-token-timeout", "first_token_timeout", "SECONDS|none",
     "how long a model has to send its first token before the gateway falls back to the next of the chain, "
     "0.1-600 (none: no limit but the caller's deadline)"),
)


def add_settings_arguments(command: ArgumentParser) -> None:
    for option, name, metavar, help in _OPTIONS:
        command.add_argument(option, dest=name, metavar=metavar, help=f"{help}; left out: kept")
    command.add_argument("--alias", dest="alias", action="append", metavar="NAME=M1,M2",
                         help="a model name standing for a chain of 1-9 models: the first serves, the rest are "
                              "tried in order (repeatable; replaces that alias, keeps the others)")
    command.add_argument("--remove-alias", dest="remove_alias", action="append", metavar="NAME",
                         help="remove an alias (repeatable)")


async def admin_settings(args: Namespace, session: Session, creds: Credentials) -> Result:
    token = None if args.as_operator else need_token(creds)
    settings = await _auth(session).settings(token=token)
    return Result(_table(settings), settings)


async def admin_settings_set(args: Namespace, session: Session, creds: Credentials) -> Result:
    """As the operator (the mesh secret), else as the logged-in admin."""
    token = None if args.as_operator else need_token(creds)
    given = {name: _value(name, getattr(args, name)) for _, name, _, _ in _OPTIONS if getattr(args, name) is not None}
    auth = _auth(session)
    if args.alias or args.remove_alias:
        given["aliases"] = _merged(dict((await auth.settings(token=token))["aliases"]), args.alias or [],
                                   args.remove_alias or [])
    if not given:
        raise InvalidParams("nothing to change: give --default-model, --fallback-models, --cache-ttl, --alias, "
                            "--remove-alias or --first-token-timeout", {"param": "settings"})
    settings = await auth.set_settings(settings=given, token=token)
    return Result(f"settings saved; every gateway applies them within a second\n{_table(settings)}", settings)


def _merged(aliases: dict[str, list[str]], added: list[str], removed: list[str]) -> dict[str, list[str]]:
    """The aliases with `added` ("NAME=m1,m2": set, whether new or not) then `removed` (names)."""
    for typed in added:
        name, equals, models = typed.partition("=")
        if not equals or not name.strip():
            raise InvalidParams(f"aliases: --alias takes NAME=MODEL,MODEL..., not {typed[:60]!r}",
                                {"param": "aliases"})
        aliases[name.strip()] = [model.strip() for model in models.split(",")]  # blanks: auth refuses them
    for name in removed:
        if aliases.pop(name.strip(), None) is None:
            raise InvalidParams(f"aliases: there is no alias {name[:60]!r} to remove", {"param": "aliases"})
    return aliases


def _value(name: str, text: str) -> Any:
    """What was typed: "none" clears; a list of models comma-separated; seconds as an integer."""
    typed = text.strip()
    if typed.lower() == "none":
        return [] if name == "fallback_models" else None
    if name == "fallback_models":
        return [model.strip() for model in typed.split(",")]  # duplicates and blanks: auth refuses them
    if name == "cache_ttl":
        try:
            return int(typed.replace("_", ""))
        except ValueError:
            raise InvalidParams(f"cache_ttl must be whole seconds or none, not {text[:40]!r}",
                                {"param": "cache_ttl"}) from None
    if name == "first_token_timeout":
        try:
            return float(typed)  # nan, inf, out of range: auth refuses them
        except ValueError:
            raise InvalidParams(f"first_token_timeout must be seconds (such as 2.5) or none, not {text[:40]!r}",
                                {"param": "first_token_timeout"}) from None
    return typed


def _table(settings: Settings) -> str:
    shown = {"default_model": settings["default_model"] or "none",
             "fallback_models": ", ".join(settings["fallback_models"]) or "none",
             "cache_ttl": "none (each worker's own)" if settings["cache_ttl"] is None else f"{settings['cache_ttl']} s"}
    rows: list[list[Any]] = [[name, shown[name], settings["updated_at"][name] or "never"] for name in shown]
    aliases = [f"{name} = {', '.join(chain)}" for name, chain in sorted(settings["aliases"].items())] or ["none"]
    rows.append(["aliases", aliases[0], settings["updated_at"]["aliases"] or "never"])
    rows += [["", alias, ""] for alias in aliases[1:]]  # one line per alias
    timeout = settings["first_token_timeout"]
    rows.append(["first_token_timeout", "none (the caller's deadline)" if timeout is None else f"{timeout:g} s",
                 settings["updated_at"]["first_token_timeout"] or "never"])
    return table(["setting", "value", "last set"], rows)


def _auth(session: Session) -> AuthClient:
    # Over the mesh always: the admin commands take no --base-url (cli.py, HTTP_COMMANDS).
    assert isinstance(session, ClientSession)
    return AuthClient(session("auth"))


SETTING_COMMANDS = {"admin settings": admin_settings, "admin settings set": admin_settings_set}
