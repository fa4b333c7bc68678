"""The Audit page (`GET /audit`): the audit log for a logged-in browser.

A user sees their own events (those they did, and those about them); an
administrator sees everyone's, and may narrow them to one user. The filters
come from the query through a GET form (`action`, `since`, `until`, and `user`
for admins); a value auth refuses is shown on the page with the field it
names. "Older" links to the next page with the same filters and `before_id`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from shared.errors import Forbidden, InvalidParams, MeshError
from services.web.session import TOKEN, UPSTREAM, login_required
from services.web.views import ME, render

__all__ = ["routes", "PAGE_SIZE"]

routes = web.RouteTableDef()

PAGE_SIZE = 50
_FILTERS = ("user", "action", "since", "until")


@routes.get("/audit")
@login_required
async def audit_page(request: web.Request) -> web.Response:
    is_admin = bool(request[ME].get("is_admin"))
    values = {name: request.query.get(name, "").strip() for name in _FILTERS}
    if not is_admin:
        values["user"] = ""
    params: dict[str, Any] = {name: value or None for name, value in values.items()}
    before = request.query.get("before_id", "")
    try:
        if before and (not before.isdigit() or len(before) > 19):
            raise InvalidParams("before_id must be a whole number", {"param": "before_id"})
        page = await request.app[UPSTREAM].auth.audit(
            token=request[TOKEN], limit=PAGE_SIZE, before_id=int(before) if before else None, **params)
    except MeshError as exc:
        if exc.code == "UNAUTHENTICATED":
            raise
        # NOT_FOUND: no such user (only admins name one); FORBIDDEN: no longer an admin.
        field = exc.data.get("param") if isinstance(exc, InvalidParams) else "user" if exc.code == "NOT_FOUND" \
            else None
        status = 400 if field else 403 if isinstance(exc, Forbidden) else 503
        return render(request, "audit.html", status=status, events=None, error=exc.message,
                      field=field, values=values, is_admin=is_admin, older=None)
    events = [{**e, "when": _when(e["at"]), "details_text": json.dumps(e["details"], sort_keys=True)}
              for e in page["events"]]
    older = None
    if page["next_before_id"] is not None:
        older = "/audit?" + urlencode({**{k: v for k, v in values.items() if v},
                                       "before_id": page["next_before_id"]})
    return render(request, "audit.html", events=events, error=None, field=None, values=values,
                  is_admin=is_admin, older=older)


def _when(at: str) -> str:
    """An event's ISO time as people read it: to the second, in UTC."""
    return datetime.fromisoformat(at).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
