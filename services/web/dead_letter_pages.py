"""The Dead letters page (`GET /admin/dead-letters`), for administrators: the newest 100
requests that failed after every fallback (`auth.dead_letters`; services/auth/README.md,
"Dead letters").

One row each: when, the user (and key), the model asked for and the one tried
last, the reason, and the chain tried before it, written as
`llama3 (UNAVAILABLE) → smollm2 (TIMEOUT)` (`describe_chain`, the CLI's too).
Read only: nothing here changes them. Never a prompt: its hash, shortened.
"""

from __future__ import annotations

from aiohttp import web

from services.auth.client import describe_chain
from services.web.session import TOKEN, UPSTREAM, admin_only, login_required
from services.web.views import render

__all__ = ["routes", "PAGE_SIZE"]

routes = web.RouteTableDef()

PAGE_SIZE = 100


@routes.get("/admin/dead-letters")
@login_required
async def dead_letters_page(request: web.Request) -> web.Response:
    admin_only(request)
    page = await request.app[UPSTREAM].auth.dead_letters(token=request[TOKEN], limit=PAGE_SIZE)
    letters = [{**d, "chain": describe_chain(d["tried"])} for d in page["dead_letters"]]
    return render(request, "dead_letters.html", letters=letters, more=page["next"] is not None)
