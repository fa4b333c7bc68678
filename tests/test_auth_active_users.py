"""`auth.active_users` against a real PostgreSQL: distinct users per window,
counted from the usage table, for the metrics service."""

from __future__ import annotations

import time

import asyncpg
import pytest

from auth_support import Calls

pytestmark = pytest.mark.db


async def _user_ids(pg_dsn: str, auth: Calls, names: list[str]) -> dict[str, int]:
    for name in names:
        await auth.user(name)
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch("SELECT id, username FROM users")
    finally:
        await conn.close()
    return {r["username"]: r["id"] for r in rows}


async def test_active_users_counts_distinct_users_per_window(auth, pg_dsn):
    assert await auth("active_users") == {"1h": 0, "24h": 0}
    ids = await _user_ids(pg_dsn, auth, ["ann", "bob", "cyd", "dee"])
    now = time.time()
    usage = [  # (user, seconds ago): ann twice within the hour, bob hours ago, cyd too long ago
        ("ann", 60), ("ann", 1800), ("bob", 3 * 3600), ("bob", 20 * 3600), ("cyd", 30 * 3600),
    ]
    batch = [
        {"request_id": f"r{i}", "user_id": ids[who], "model": "smollm2", "prompt_tokens": 3,
         "completion_tokens": 5, "cached": False, "status": "ok", "at": now - ago}
        for i, (who, ago) in enumerate(usage)
    ]
    assert (await auth("record_usage", batch=batch))["inserted"] == len(batch)
    assert await auth("active_users") == {"1h": 1, "24h": 2}


async def test_active_users_is_internal(auth):
    handler = auth.dispatcher.get("auth.active_users")
    assert handler is not None and not handler.spec.public and handler.spec.idempotent
