"""The routing settings (`auth.settings`, `auth.set_settings`, `auth.settings_table`): their checks
and how they are shown.

Five settings, read by every gateway (services/auth/README.md, "Routing settings"):

* `default_model`: the model a request naming `default` is served by; None: unset;
* `fallback_models`: 0-8 distinct models tried in order when the one asked for has no
  worker, or none that can take the request before it starts;
* `cache_ttl`: whole seconds 0..86400 workers keep a response (0: no caching); None:
  each worker's own INFERSWARM_CACHE_TTL;
* `aliases`: up to 64 alias names -> a chain of 1-9 distinct models (the first serves,
  the rest are tried in order); an alias is never `default` (`default_model`'s) nor in
  its own chain; {}: none. A change replaces the whole object;
* `first_token_timeout`: seconds (0.1..600) a model has to send its first token before
  the gateway falls back to the next of the chain; None: no such limit (the caller's
  deadline alone).

Model names are a catalog's (prices.py `check_model`). Every refusal is
`INVALID_PARAMS` naming the setting (or the unknown name given).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from shared.errors import InvalidParams
from services.auth.prices import check_model

__all__ = ["DEFAULTS", "FIRST_TOKEN_TIMEOUT", "MAX_ALIASES", "MAX_CACHE_TTL", "MAX_CHAIN", "MAX_FALLBACKS", "NAMES", "check_settings",
           "settings_view", "table_view"]

#: Each setting and its value when nothing was set (the migrations seed the same).
DEFAULTS: Mapping[str, Any] = {"default_model": None, "fallback_models": [], "cache_ttl": None, "aliases": {},
                               "first_token_timeout": None}
NAMES = tuple(DEFAULTS)
MAX_FALLBACKS = 8
MAX_CACHE_TTL = 86_400  #: a day, the bound workers are told to expect
MAX_ALIASES = 64
MAX_CHAIN = 9  #: models of an alias's chain: the one serving and up to 8 fallbacks, as `fallback_models`
FIRST_TOKEN_TIMEOUT = (0.1, 600.0)  #: seconds: the least and the most


def check_settings(settings: Mapping[Any, Any]) -> dict[str, Any]:
    """The settings given, checked: a name -> its value (None clears `default_model`, `cache_ttl`)."""
    unknown = [name for name in settings if name not in DEFAULTS]
    if unknown:
        name = str(unknown[0])[:64]
        raise InvalidParams(f"no such setting {name!r}; settings: {', '.join(NAMES)}", {"param": name})
    if not settings:
        raise InvalidParams(f"nothing to change in settings: give any of {', '.join(NAMES)}", {"param": "settings"})
    checks = {"default_model": _default_model, "fallback_models": _fallback_models, "cache_ttl": _cache_ttl,
              "aliases": _aliases, "first_token_timeout": _first_token_timeout}
    return {name: checks[name](value) for name, value in settings.items()}


def _model(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise InvalidParams(f"{param} must be a model name", {"param": param})
    try:
        return check_model(value)
    except InvalidParams as exc:  # check_model names `model`; here it is a setting's value
        raise InvalidParams(exc.message.replace("model must", f"{param} must", 1), {"param": param}) from None


def _default_model(value: Any) -> str | None:
    return None if value is None else _model(value, "default_model")


def _fallback_models(value: Any) -> list[str]:
    param = "fallback_models"
    if not isinstance(value, list) or len(value) > MAX_FALLBACKS:
        raise InvalidParams(f"{param} must be a list of at most {MAX_FALLBACKS} model names ([]: none)",
                            {"param": param})
    models = [_model(model, param) for model in value]
    if len(set(models)) != len(models):
        raise InvalidParams(f"{param} names a model twice", {"param": param})
    return models


def _cache_ttl(value: Any) -> int | None:
    # bool is an int in Python, and True is not a number of seconds.
    if value is not None and (type(value) is not int or not 0 <= value <= MAX_CACHE_TTL):
        raise InvalidParams(f"cache_ttl must be whole seconds from 0 to {MAX_CACHE_TTL}, or null for each "
                            "worker's own", {"param": "cache_ttl"})
    return None if value is None else int(value)


def _aliases(value: Any) -> dict[str, list[str]]:
    param = "aliases"
    if not isinstance(value, dict) or len(value) > MAX_ALIASES:
        raise InvalidParams(f"{param} must be a map of at most {MAX_ALIASES} alias names to lists of models "
                            "({}: none)", {"param": param})
    aliases = {}
    for name, chain in value.items():
        alias = _model(name, param)
        if alias == "default":
            raise InvalidParams(f"{param} may not name an alias `default`: that is default_model's",
                                {"param": param})
        if not isinstance(chain, list) or not 0 < len(chain) <= MAX_CHAIN:
            raise InvalidParams(f"{param}: {alias!r} must be a list of 1 to {MAX_CHAIN} model names",
                                {"param": param})
        models = [_model(model, param) for model in chain]
        if len(set(models)) != len(models):
            raise InvalidParams(f"{param}: {alias!r} names a model twice", {"param": param})
        if alias in models:
            raise InvalidParams(f"{param}: {alias!r} is in its own chain", {"param": param})
        aliases[alias] = models
    return aliases


def _first_token_timeout(value: Any) -> float | None:
    least, most = FIRST_TOKEN_TIMEOUT
    # bool is an int in Python; NaN fails the comparison, so it is refused too.
    if value is not None and (type(value) not in (int, float) or not least <= value <= most):
        raise InvalidParams(f"first_token_timeout must be seconds from {least} to {most:g}, or null for no "
                            "limit but the caller's deadline", {"param": "first_token_timeout"})
    return None if value is None else float(value)


def settings_view(values: Mapping[str, Any], updated_at: Mapping[str, datetime | None]) -> dict[str, Any]:
    """As `auth.settings` answers: each setting, and when it was last set (None: never)."""
    return {**table_view(values),
            "updated_at": {name: None if (at := updated_at[name]) is None else at.isoformat() for name in NAMES}}


def table_view(values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings alone, as gateways read them (`auth.settings_table`)."""
    return {name: values[name] for name in NAMES}
