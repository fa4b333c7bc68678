"""`inferswarm admin settings` and `inferswarm admin settings set`: the routing settings
(`auth.settings`, `auth.set_settings`; services/auth/README.md, "Routing settings").

    inferswarm admin settings                                     # each setting, and when it was set
    inferswarm admin settings set [--default-model M|none] [--fallback-models a,b|none] [--cache-ttl SECONDS|none]

Like `admin tiers`, they run as the operator when the mesh secret is at hand,
else with the saved session (an administrator's, for `set`). `none` clears a
setting; one left out is kept. Values are sent as typed, for auth to check
(a model name's shape, duplicates, the range of seconds).
"""

from __future__ import annotations

from argparse import ArgumentParser, Namespace
from typing import Any

from inferswarm.commands import Result, Session, need_token, table
from inferswarm.credentials import Credentials
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
)


def add_settings_arguments(command: ArgumentParser) -> None:
    for option, name, metavar, help in _OPTIONS:
        command.add_argument(option, dest=name, metavar=metavar, help=f"{help}; left out: kept")


async def admin_settings(args: Namespace, session: Session, creds: Credentials) -> Result:
    token = None if args.as_operator else need_token(creds)
    settings = await AuthClient(session("auth")).settings(token=token)
    return Result(_table(settings), settings)


async def admin_settings_set(args: Namespace, session: Session, creds: Credentials) -> Result:
    """As the operator (the mesh secret), else as the logged-in admin."""
    token = None if args.as_operator else need_token(creds)
    given = {name: _value(name, getattr(args, name)) for _, name, _, _ in _OPTIONS if getattr(args, name) is not None}
    if not given:
        raise InvalidParams("nothing to change: give --default-model, --fallback-models or --cache-ttl",
                            {"param": "settings"})
    settings = await AuthClient(session("auth")).set_settings(settings=given, token=token)
    return Result(f"settings saved; every gateway applies them within a second\n{_table(settings)}", settings)


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
    return typed


def _table(settings: Settings) -> str:
    shown = {"default_model": settings["default_model"] or "none",
             "fallback_models": ", ".join(settings["fallback_models"]) or "none",
             "cache_ttl": "none (each worker's own)" if settings["cache_ttl"] is None else f"{settings['cache_ttl']} s"}
    rows: list[list[Any]] = [[name, shown[name], settings["updated_at"][name] or "never"] for name in shown]
    return table(["setting", "value", "last set"], rows)


SETTING_COMMANDS = {"admin settings": admin_settings, "admin settings set": admin_settings_set}
