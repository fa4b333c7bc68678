"""Reading a submitted form: CSRF first, then plain text values and local checks.

Local checks catch what needs no server (empty fields, two passwords that
differ) and are shown next to the field; everything else is auth's to judge,
and its `INVALID_PARAMS` errors name the field too (see `session.field_errors`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from services.web.security import CSRF_FIELD
from services.web.views import CSRF

__all__ = ["read_form", "text", "require"]

_MAX_FIELD = 4096


async def read_form(request: web.Request) -> Mapping[str, Any]:
    """The posted form, after the CSRF check (`Forbidden` if it fails)."""
    form = await request.post()
    token = form.get(CSRF_FIELD)
    request.app[CSRF].check(request, token if isinstance(token, str) else None)
    return form


def text(form: Mapping[str, Any], name: str, *, strip: bool = True) -> str:
    """A field's text ('' when missing or a file), capped so a huge field costs nothing later."""
    value = form.get(name)
    if not isinstance(value, str):
        return ""
    value = value[:_MAX_FIELD]
    return value.strip() if strip else value


def require(values: Mapping[str, str], labels: Mapping[str, str]) -> dict[str, str]:
    """An error per empty required field: `{"username": "Enter a username"}`."""
    return {name: f"Enter {label}" for name, label in labels.items() if not values.get(name)}
