"""Checks for what a key may carry besides its name: a model allow-list and an expiry.

Used by `auth.create_key` and `auth.update_key`; every refusal is
`INVALID_PARAMS` naming its field. A model name has the catalog's shape (the
gateway's `check_model`), so a list can only name models a gateway would
accept; whether any worker serves them is not checked (a model may come later).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from shared.errors import InvalidParams

__all__ = ["MAX_ALLOWED_MODELS", "check_allowed_models", "check_expiry"]

MAX_ALLOWED_MODELS = 64
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,63}")


def check_allowed_models(value: Any, param: str = "allowed_models") -> list[str]:
    """1-64 model names of the catalog's shape, duplicates dropped, in the order given."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_ALLOWED_MODELS:
        raise InvalidParams(f"{param} must be a list of 1-{MAX_ALLOWED_MODELS} model names "
                            "(leave it out, or null, for every model)", {"param": param})
    names: list[str] = []
    for index, name in enumerate(value):
        if not isinstance(name, str) or _MODEL.fullmatch(name) is None:
            raise InvalidParams(f"{param}[{index}]: a model name is 1-64 of A-Z a-z 0-9 . _ : / + -, "
                                "starting with a letter or digit", {"param": param, "index": index})
        if name not in names:
            names.append(name)
    return names


def check_expiry(value: Any, *, max_days: int, param: str = "expires_at") -> datetime:
    """An ISO 8601 moment with an offset (or Z), in the future, at most `max_days` away."""
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidParams(f"{param} must be an ISO 8601 date-time with an offset", {"param": param})
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise InvalidParams(f"{param} must be an ISO 8601 date-time with an offset", {"param": param}) from None
    if moment.tzinfo is None:
        raise InvalidParams(f"{param} needs an offset (e.g. Z or +02:00)", {"param": param})
    now = datetime.now(timezone.utc)
    if moment <= now:
        raise InvalidParams(f"{param} is in the past", {"param": param})
    if (moment - now).days >= max_days:
        raise InvalidParams(f"{param} must be within {max_days} days", {"param": param})
    return moment
