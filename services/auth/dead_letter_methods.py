"""The dead-letter handler of `AuthService` (`auth.dead_letters`): the requests that failed
after every fallback, for administrators and the operator.

A dead letter is written with its usage record (dead_letter_store.py); this
only reads them, newest first, a page at a time (`before`: the `next` of the
previous page), optionally those naming one model -- the one asked for (an
alias, `default`) or the last one tried. Never a prompt: its hash, as usage
records carry it. services/auth/README.md, "Dead letters".
"""

from __future__ import annotations

import json
import re
from typing import Any

import asyncpg

from shared.errors import InvalidParams
from shared.rpc import method
from services.auth.service_base import AuthBase, check_id, iso

__all__ = ["DeadLetterMethods", "MAX_LIMIT"]

MAX_LIMIT = 500
_MODEL = re.compile(r"[\x20-\x7e]{1,200}")  # as records.py takes a model: printable ASCII


class DeadLetterMethods(AuthBase):
    """Dead letters: read by administrators (by token) and the operator (without one)."""

    @method(public=True, idempotent=True)
    async def dead_letters(self, token: str | None = None, limit: int = 50, before: int | None = None,
                           model: str | None = None) -> dict[str, Any]:
        """The newest dead letters (`limit` 1-500) with an id below `before` (None: the newest),
        naming `model` as asked for or last tried (None: any); `next`: the `before` of the next
        page, None when this was the last."""
        await self._admin_or_operator(token)
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidParams(f"limit must be 1..{MAX_LIMIT}", {"param": "limit"})
        if before is not None:
            check_id(before, "before")
        if model is not None and not _MODEL.fullmatch(model):
            raise InvalidParams("model must be a model name (printable ASCII, 1-200 characters)",
                                {"param": "model"})
        rows = await self._dead_letters.page(limit=limit + 1, before=before, model=model)
        page = rows[:limit]
        return {"dead_letters": [_view(r) for r in page], "next": page[-1]["id"] if len(rows) > limit else None}


def _view(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "request_id": row["request_id"], "user_id": row["user_id"], "key_id": row["key_id"],
            "asked": row["asked"], "model": row["model"], "prompt_hash": row["prompt_hash"],
            "status": row["status"], "tried": json.loads(row["tried"]), "at": iso(row["at"])}
