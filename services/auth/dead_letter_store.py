"""The SQL of the dead letters (`dead_letters`, migration 0017): written with the usage they
belong to, read by operators (`auth.dead_letters`), bounded by the housekeeper.

A dead letter is a request that failed after the gateway had tried more than
one model: a usage record whose `status` is not ok and whose `tried` lists
the attempts that failed before the last. It is written by `write_dead_letters`
inside the transaction of `UsageStore.record_naming` that inserts its usage
row, and only for rows that insert actually added: a batch shipped twice, or
by two gateways, leaves one dead letter, and one the bound has removed is not
brought back by a retry. `ON CONFLICT (request_id) DO NOTHING` keeps it once
all the same.

Only the newest `keep` rows (by id: the order they were stored in, the order
`auth.dead_letters` pages in) outlive a housekeeping round (`prune`):
INFERSWARM_DEAD_LETTERS_MAX, 10000 by default.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from shared.db import unavailable_when_down

if TYPE_CHECKING:
    from services.auth.usage_store import UsageRecord

__all__ = ["Attempt", "DeadLetterStore", "is_dead", "write_dead_letters"]


@dataclass(frozen=True, slots=True)
class Attempt:
    """A model a gateway tried for a request, and the error code it failed with."""

    model: str
    code: str  #: UNAVAILABLE, TIMEOUT, RATE_LIMITED, INVALID_PARAMS, ...


# `at`: the record's moment, else now() -- the transaction's, as its usage row's.
_INSERT = """
INSERT INTO dead_letters (request_id, user_id, key_id, asked, model, prompt_hash, status, tried, at)
SELECT request_id, user_id, key_id, asked, model, prompt_hash, status, tried, COALESCE(at, now())
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::jsonb[], $9::timestamptz[])
    AS d(request_id, user_id, key_id, asked, model, prompt_hash, status, tried, at)
ON CONFLICT (request_id) DO NOTHING
"""

_LIST = """
SELECT id, request_id, user_id, key_id, asked, model, prompt_hash, status, tried, at
FROM dead_letters
WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR model = $2 OR asked = $2)
ORDER BY id DESC
LIMIT $3
"""

# Everything at or below the id of the (keep+1)-th newest row; nothing when there are fewer.
_PRUNE = """
DELETE FROM dead_letters
WHERE id <= (SELECT id FROM dead_letters ORDER BY id DESC OFFSET $1 LIMIT 1)
"""


def is_dead(record: UsageRecord) -> bool:
    """Whether a record is a dead letter: failed, after other models had failed before it."""
    return record.status != "ok" and bool(record.tried)


async def write_dead_letters(conn: asyncpg.Connection, records: Sequence[UsageRecord]) -> None:
    """Store the dead letters of `records` (those that are), in the caller's transaction."""
    letters = [r for r in records if is_dead(r)]
    if not letters:
        return
    columns = list(zip(*(
        (r.request_id, r.user_id, r.key_id, r.asked, r.model, r.prompt_hash, r.status,
         json.dumps([{"model": a.model, "code": a.code} for a in r.tried or ()]), r.created_at)
        for r in letters
    )))
    await conn.execute(_INSERT, *(list(c) for c in columns))


@unavailable_when_down()
class DeadLetterStore:
    """Reading and bounding `dead_letters`, over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def page(self, *, limit: int, before: int | None, model: str | None) -> list[asyncpg.Record]:
        """Newest first: at most `limit` rows with an id below `before` (None: from the newest),
        naming `model` as the one asked for or the last tried (None: any)."""
        rows: list[asyncpg.Record] = await self.pool.fetch(_LIST, before, model, limit)
        return rows

    async def prune(self, keep: int) -> int:
        """Delete all but the `keep` newest rows; how many were deleted."""
        status = await self.pool.execute(_PRUNE, keep)
        return int(status.split()[-1])
