"""The webhooks' SQL: endpoints (audited), deliveries claimed and settled, the delivery log.

A pending delivery is claimed by one sender: `claim` picks due rows with `FOR
UPDATE SKIP LOCKED` (another instance's claim skips them rather than waits)
and, in the same statement, counts the attempt and moves `next_attempt_at` a
lease ahead (the request's timeout and some), so the row is not due again while
it is being sent; a sender that dies mid-send leaves it to be retried when the
lease ends. `settle` writes the outcome only if the row is still at the attempt
claimed, and logs the attempt in `webhook_attempts`.
"""

from __future__ import annotations

import asyncpg

from shared.db import unavailable_when_down
from services.auth.store import write_audit

__all__ = ["WebhookStore"]

_COLUMNS = "user_id, url, thresholds, created_at, updated_at"

_CLAIM = """
WITH claimed AS (
    UPDATE webhook_deliveries d SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
    WHERE d.id IN (SELECT id FROM webhook_deliveries
                   WHERE status = 'pending' AND next_attempt_at <= now()
                   ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
    RETURNING d.id, d.alert_id, d.user_id, d.attempts
)
SELECT c.id, c.user_id, c.attempts, a.event_id, a.scope, a.subject_id, a.counter, a.threshold, a.spent,
       a.budget, a.currency, a.period_start, a.created_at, w.url, w.secret
FROM claimed c JOIN alert_events a ON a.id = c.alert_id LEFT JOIN webhooks w ON w.user_id = c.user_id
"""

_SETTLE = """
WITH d AS (
    UPDATE webhook_deliveries
    SET status = $3, next_attempt_at = now() + make_interval(secs => $4),
        delivered_at = CASE WHEN $3 = 'delivered' THEN now() END
    WHERE id = $1 AND attempts = $2 AND status = 'pending'
    RETURNING id, user_id, attempts, next_attempt_at
)
INSERT INTO webhook_attempts (delivery_id, user_id, attempt, status_code, error, duration_ms, next_attempt_at)
SELECT id, user_id, attempts, $5, $6, $7, next_attempt_at FROM d
"""

_LOG = """
SELECT t.id, a.event_id, t.attempt, t.status_code, t.error, t.duration_ms, t.next_attempt_at, t.at,
       d.status, d.delivered_at
FROM webhook_attempts t JOIN webhook_deliveries d ON d.id = t.delivery_id JOIN alert_events a ON a.id = d.alert_id
WHERE t.user_id = $1 AND ($2::bigint IS NULL OR t.id < $2)
ORDER BY t.id DESC LIMIT $3
"""


@unavailable_when_down()
class WebhookStore:
    """The webhook tables, over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def webhook(self, user_id: int) -> asyncpg.Record | None:
        return await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM webhooks WHERE user_id = $1", user_id)

    async def set_webhook(self, user_id: int, url: str, thresholds: tuple[int, ...] | None, secret: str,
                          audited: dict[str, object]) -> tuple[asyncpg.Record, bool]:
        """Create the endpoint (with `secret` and `thresholds`, default 50/80/100), or change its URL and
        thresholds (None: kept), keeping its secret; (the row, whether it was created). Audited."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO webhooks (user_id, url, secret, thresholds) "
                "VALUES ($1, $2, $3, COALESCE($4::smallint[], '{50,80,100}')) "
                "ON CONFLICT (user_id) DO UPDATE SET url = EXCLUDED.url, updated_at = now(), "
                "thresholds = COALESCE($4::smallint[], webhooks.thresholds) "
                f"RETURNING {_COLUMNS}, (xmax = 0) AS created", user_id, url, secret,
                None if thresholds is None else list(thresholds))
            await write_audit(conn, "webhook_set", user_id, user_id,
                              {**audited, "thresholds": list(row["thresholds"]), "created": row["created"]})
        return row, bool(row["created"])

    async def rotate_secret(self, user_id: int, secret: str) -> asyncpg.Record | None:
        """A new secret for the endpoint (None: there is none); audited."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"UPDATE webhooks SET secret = $2, updated_at = now() WHERE user_id = $1 "
                                      f"RETURNING {_COLUMNS}", user_id, secret)
            if row is not None:
                await write_audit(conn, "webhook_secret_rotated", user_id, user_id, {})
        return row

    async def remove(self, user_id: int) -> bool:
        """Delete the endpoint; its pending deliveries fail when they come due. Audited."""
        async with self.pool.acquire() as conn, conn.transaction():
            removed = await conn.fetchval("DELETE FROM webhooks WHERE user_id = $1 RETURNING true", user_id)
            if removed:
                await write_audit(conn, "webhook_removed", user_id, user_id, {})
        return bool(removed)

    async def claim(self, limit: int, lease: float) -> list[asyncpg.Record]:
        """Up to `limit` due deliveries, each now this sender's for `lease` seconds."""
        return await self.pool.fetch(_CLAIM, limit, lease)

    async def settle(self, delivery_id: int, attempt: int, status: str, retry_in: float | None, *,
                     status_code: int | None, error: str | None, duration_ms: int) -> None:
        """An attempt's outcome: `status` ('pending' with `retry_in` seconds, 'delivered', 'failed')."""
        await self.pool.execute(_SETTLE, delivery_id, attempt, status, retry_in, status_code, error, duration_ms)

    async def log(self, user_id: int, before_id: int | None, limit: int) -> list[asyncpg.Record]:
        """The user's delivery attempts, newest first (keyset by id)."""
        return await self.pool.fetch(_LOG, user_id, before_id, limit)
