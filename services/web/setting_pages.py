"""The Settings page (`GET /admin/settings`), for administrators: the routing settings, and a form.

The form shows the settings as they are; saving sends all five to
`auth.set_settings` (a value equal to the current one changes nothing, and
only what changed is audited). An empty field clears its setting: no default
model, no fallback, each worker's own cache TTL, no alias, no first-token
timeout. Fallback models are typed comma-separated, aliases one a line as
`name = model, model` (the whole map is sent: a line removed removes its
alias); the TTL is checked here to be whole seconds, the timeout to be a
number and the aliases' lines to be of that shape, so the field can say so;
the rest is auth's to judge, and a refusal is shown next to the field it names,
with what was typed. Every gateway applies a change within a second
(services/auth/README.md, "Routing settings").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from shared.errors import MeshError
from services.web.errors import status_of
from services.web.forms import read_form, text
from services.web.session import TOKEN, UPSTREAM, admin_only, field_errors, login_required
from services.web.views import render

__all__ = ["routes", "LABELS", "form_settings"]

routes = web.RouteTableDef()

#: Each setting as the page names it (the table's rows and the form's fields).
LABELS = {"default_model": "Default model", "fallback_models": "Fallback models", "cache_ttl": "Cache TTL (seconds)",
          "aliases": "Aliases", "first_token_timeout": "First-token timeout (seconds)"}
#: The longest aliases text taken: 64 aliases of 9 models of 64 characters fit (forms.py's cap is for one line).
_MAX_ALIASES_TEXT = 48_000


@routes.get("/admin/settings")
@login_required
async def settings_page(request: web.Request) -> web.Response:
    admin_only(request)
    return await _page(request)


@routes.post("/admin/settings")
@login_required
async def settings_update(request: web.Request) -> web.Response:
    admin_only(request)
    form = await read_form(request)
    values = {field: text(form, field) for field in LABELS if field != "aliases"}
    aliases = form.get("aliases")
    values["aliases"] = aliases.strip() if isinstance(aliases, str) else ""
    settings, errors = form_settings(values)
    if errors:
        return await _page(request, status=400, values=values, errors=errors)
    try:
        await request.app[UPSTREAM].auth.set_settings(token=request[TOKEN], settings=settings)
    except MeshError as exc:
        if exc.code in ("UNAUTHENTICATED", "FORBIDDEN"):
            raise
        return await _page(request, status=status_of(exc), values=values, errors=field_errors(exc, tuple(LABELS)))
    return await _page(request, notice="Settings saved; every gateway applies them within a second")


def form_settings(values: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings as auth takes them (empty: cleared), and the fields that are not what they must be."""
    ttl, fallbacks = values["cache_ttl"].replace(",", "").replace("_", ""), values["fallback_models"]
    errors = {}
    if ttl and not (ttl.isascii() and ttl.isdigit() and len(ttl) <= 12):  # short: no int msgpack cannot carry
        errors["cache_ttl"] = "Enter whole seconds, or leave it empty for each worker's own"
    aliases, why = _aliases(values["aliases"])
    if why:
        errors["aliases"] = why
    timeout, why = _seconds(values["first_token_timeout"])
    if why:
        errors["first_token_timeout"] = why
    return {"default_model": values["default_model"] or None,
            "fallback_models": [model.strip() for model in fallbacks.split(",")] if fallbacks else [],
            "cache_ttl": int(ttl) if ttl and "cache_ttl" not in errors else None,
            "aliases": aliases, "first_token_timeout": timeout}, errors


def _aliases(typed: str) -> tuple[dict[str, list[str]], str | None]:
    """One alias a line, `name = model, model` (blank lines skipped); or why not."""
    if len(typed) > _MAX_ALIASES_TEXT:
        return {}, f"At most {_MAX_ALIASES_TEXT:,} characters"
    aliases: dict[str, list[str]] = {}
    for line in typed.splitlines():
        name, equals, models = line.partition("=")
        if not line.strip():
            continue
        if not equals or not name.strip():
            return {}, f"Write one alias a line, as name = model, model (not “{line.strip()[:40]}”)"
        if name.strip() in aliases:
            return {}, f"The alias {name.strip()[:64]} is written twice"
        aliases[name.strip()] = [model.strip() for model in models.split(",")]  # blanks: auth refuses them
    return aliases, None


def _seconds(typed: str) -> tuple[float | None, str | None]:
    """A number of seconds as typed (None: empty, no limit), its range auth's to judge; or why not."""
    try:
        return (float(typed) if typed else None), None
    except ValueError:
        return None, "Enter seconds, such as 2.5, or leave it empty for no limit"


async def _page(request: web.Request, *, status: int = 200, values: Mapping[str, str] | None = None,
                errors: Mapping[str, str] | None = None, notice: str | None = None) -> web.Response:
    """The page; after a refusal the form shows what was typed, else the settings as they are."""
    settings = await request.app[UPSTREAM].auth.settings(token=request[TOKEN])
    return render(request, "settings.html", status=status, settings=settings, labels=LABELS,
                  values=dict(values) if values is not None else _form_values(settings),
                  errors=errors or {}, notice=notice)


def _form_values(settings: Mapping[str, Any]) -> dict[str, str]:
    ttl, timeout = settings["cache_ttl"], settings["first_token_timeout"]
    return {"default_model": settings["default_model"] or "", "fallback_models": ", ".join(settings["fallback_models"]),
            "cache_ttl": "" if ttl is None else str(ttl),
            "aliases": "\n".join(f"{name} = {', '.join(chain)}" for name, chain in sorted(settings["aliases"].items())),
            "first_token_timeout": "" if timeout is None else f"{timeout:g}"}
