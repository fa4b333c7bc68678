"""The spending alerts' SQL: budgets and spend of a batch's users and keys, firing, reading.

Per batch of usage, three statements whatever its size: the budgets of its
users and keys (`subjects`), their spend of the UTC day and month in the
platform currency (`spend`, from `usage_daily_costs`: a few rows per user, key,
day and model), and `fire`, which inserts the thresholds reached. Its insert
is `ON CONFLICT DO NOTHING RETURNING`: only new alerts come back, and in the
same statement each gets its audit row (`budget_alert`) and, when its owner has
a webhook, a pending delivery (webhook_store.py sends them).
"""

from __future__ import annotations

import json
from datetime import date

import asyncpg

from shared.db import unavailable_when_down
from services.auth.alerts import Candidate, event_id
from services.auth.limits import money_text

__all__ = ["AlertStore"]

# The scopes a batch counts toward, with their own budgets and their owner's thresholds (NULL:
# the defaults). Organisations: a third branch (orgs joined through api_keys.org_id).
_SUBJECTS = """
SELECT 'user' AS scope, u.id, u.id AS owner, u.tier, u.spend_per_day, u.spend_per_month, w.thresholds
FROM users u LEFT JOIN webhooks w ON w.user_id = u.id
WHERE u.id = ANY($1::bigint[])
UNION ALL
SELECT 'key', k.id, k.user_id, NULL, k.spend_per_day, k.spend_per_month, w.thresholds
FROM api_keys k LEFT JOIN webhooks w ON w.user_id = k.user_id
WHERE k.id = ANY($2::bigint[]) AND (k.spend_per_day IS NOT NULL OR k.spend_per_month IS NOT NULL)
"""

# The spend of this UTC day and month per user and key, in the platform currency ($3).
_SPEND = """
SELECT c.user_id, c.key_id, sum(c.cost) FILTER (WHERE c.day = $2) AS day, sum(c.cost) AS month
FROM usage_daily_costs c
WHERE c.user_id = ANY($1::bigint[]) AND c.day BETWEEN date_trunc('month', $2::timestamp)::date AND $2
  AND c.currency = $3
GROUP BY 1, 2
"""

_FIRE = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::date[],
                         $7::smallint[], $8::numeric[], $9::numeric[], $10::text[])
        AS b(event_id, user_id, scope, subject_id, counter, period_start, threshold, spent, budget, details)
), fired AS (
    INSERT INTO alert_events (event_id, user_id, scope, subject_id, counter, period_start, threshold, spent,
                              budget, currency)
    SELECT event_id, user_id, scope, subject_id, counter, period_start, threshold, spent, budget, $11
    FROM batch
    ON CONFLICT DO NOTHING
    RETURNING *
), audited AS (
    INSERT INTO audit_log (event, user_id, actor_id, details)
    SELECT 'budget_alert', f.user_id, NULL, b.details::jsonb FROM fired f JOIN batch b USING (event_id)
), queued AS (
    INSERT INTO webhook_deliveries (alert_id, user_id, next_attempt_at)
    SELECT f.id, f.user_id, now() FROM fired f JOIN webhooks w ON w.user_id = f.user_id
    RETURNING alert_id
)
SELECT f.*, EXISTS (SELECT 1 FROM queued q WHERE q.alert_id = f.id) AS queued FROM fired f ORDER BY f.id
"""

_ALERTS = """
SELECT id, event_id, scope, subject_id, counter, period_start, threshold, spent, budget, currency, created_at
FROM alert_events WHERE user_id = $1 ORDER BY id DESC LIMIT $2
"""


@unavailable_when_down()
class AlertStore:
    """The alert tables, over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def subjects(self, user_ids: list[int], key_ids: list[int]) -> list[asyncpg.Record]:
        return await self.pool.fetch(_SUBJECTS, user_ids, key_ids)

    async def spend(self, user_ids: list[int], today: date, currency: str) -> list[asyncpg.Record]:
        return await self.pool.fetch(_SPEND, user_ids, today, currency)

    async def fire(self, candidates: list[Candidate], currency: str) -> list[asyncpg.Record]:
        """Insert the candidates; the alerts that are new (each with `queued`: a delivery is pending)."""
        if not candidates:
            return []
        rows = [(event_id(), c.subject.owner, c.subject.scope, c.subject.id, c.counter, c.period_start,
                 c.threshold, c.spent, c.budget, json.dumps(_details(c, currency))) for c in candidates]
        return await self.pool.fetch(_FIRE, *(list(column) for column in zip(*rows)), currency)

    async def alerts(self, user_id: int, limit: int) -> list[asyncpg.Record]:
        """A user's latest alerts, newest first."""
        return await self.pool.fetch(_ALERTS, user_id, limit)


def _details(c: Candidate, currency: str) -> dict[str, object]:
    """The `budget_alert` audit row's details (no secret, nothing but the figures)."""
    return {"scope": c.subject.scope, "id": c.subject.id, "counter": c.counter, "threshold": c.threshold,
            "spent": money_text(c.spent), "budget": money_text(c.budget), "currency": currency,
            "period": c.period_start.isoformat()}
