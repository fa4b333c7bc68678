"""The spending-alert handlers of `AuthService`: alerts fired from stored usage, webhooks to tell owners.

After `auth.record_usage` stores a batch, `_alert` looks at the budgets its
users and keys count toward (alerts.py) and fires every threshold reached
this period, once (alert_store.py); each alert is audited (`budget_alert`),
counted (`inferswarm_budget_alerts_total{counter, threshold}`), listed by
`auth.alerts` and the dashboard, and, when its owner has a webhook, delivered
by the sender (webhook_sender.py), signed (shared/webhooks.py).

A user manages their own webhook; an admin may read anyone's (`user`), a user
naming someone else is `FORBIDDEN` (without a lookup).
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from shared.errors import Forbidden, InvalidParams, MeshError, NotFound
from shared.logging import get_logger
from shared.rpc import method
from services.auth import alerts
from services.auth.limits import money_text
from services.auth.service_base import AuthBase, check_id, iso, user_ref
from services.auth.webhook_urls import check_destination, check_url

__all__ = ["AlertMethods"]

log = get_logger(__name__)

_MAX_ALERTS = 100
_MAX_DELIVERIES = 500


class AlertMethods(AuthBase):
    """Spending alerts and the webhook that carries them."""

    async def _alert(self, user_ids: list[int], key_ids: list[int]) -> None:
        """Usage of these users and keys was stored: their budgets are looked at, with the batch
        or in the next round of this instance's loop (alert_loop.py, `INFERSWARM_ALERT_INTERVAL`)."""
        await self.alert_loop.touched(user_ids, key_ids)

    async def _alert_now(self, user_ids: list[int], key_ids: list[int]) -> None:
        """Fire the thresholds that the usage of these users and keys reached (each once).

        A database that is away fails the call (`UNAVAILABLE`): with the batch, the gateway sends
        the batch again; in the loop, the next round looks again. Any other failure is logged: the
        usage is stored already, and a batch refused for ever would stop its gateway's shipping."""
        try:
            await self._fire_alerts(user_ids, key_ids)
        except MeshError:
            raise
        except Exception:
            log.exception("spending alerts not evaluated", users=len(user_ids))

    async def _fire_alerts(self, user_ids: list[int], key_ids: list[int]) -> None:
        if not user_ids:
            return
        rows = await self._alerts.subjects(user_ids, key_ids)
        subjects = alerts.budget_subjects(rows, lambda tier: self._tiers[tier].limits())
        if not subjects:
            return
        today = datetime.now(timezone.utc).date()
        spend = alerts.spend_by_subject(await self._alerts.spend(user_ids, today, self.currency))
        fired = await self._alerts.fire(alerts.crossed(subjects, spend, today), self.currency)
        for row in fired:
            self._alert_counter.inc(counter=row["counter"], threshold=str(row["threshold"]))
            log.info("budget alert", user_id=row["user_id"], scope=row["scope"], subject_id=row["subject_id"],
                     counter=row["counter"], threshold=row["threshold"], queued=row["queued"])
        if self.sender is not None and any(row["queued"] for row in fired):
            self.sender.wake()

    # -- the webhook -----------------------------------------------------------------------

    @method(public=True)
    async def set_webhook(self, token: str, url: str, thresholds: list | None = None  # type: ignore[type-arg]
                          ) -> dict[str, Any]:
        """Create the caller's webhook (its `secret` is in this answer only) or change its URL and
        `thresholds` (None: kept; 50, 80, 100 at creation), keeping its secret (`secret` None)."""
        caller = await self._authenticate(token)
        url = check_url(url)
        chosen = None if thresholds is None else alerts.check_thresholds(thresholds)
        await check_destination(url, self._allow_private_webhooks)
        secret = _new_secret()  # stored only if the webhook is created; an update keeps its own
        row, created = await self._webhooks.set_webhook(caller["id"], url, chosen, secret,
                                                        {"host": urlsplit(url).hostname})
        log.info("webhook set", user_id=caller["id"], created=created)
        return {**_webhook_view(row), "secret": secret if created else None}

    @method(public=True, idempotent=True)
    async def webhook(self, token: str, user: int | str | None = None) -> dict[str, Any]:
        """The caller's webhook (an admin: `user`'s): url, thresholds, created_at; never its secret."""
        target = await self._readable(token, user)
        return _webhook_view(await self._webhook_of(target["id"]))

    @method(public=True, idempotent=True)
    async def remove_webhook(self, token: str) -> dict[str, Any]:
        """Delete the caller's webhook; its pending deliveries fail. `{removed}` (false: there was none)."""
        caller = await self._authenticate(token)
        removed = await self._webhooks.remove(caller["id"])
        log.info("webhook removed", user_id=caller["id"], removed=removed)
        return {"removed": removed}

    @method(public=True)
    async def rotate_webhook_secret(self, token: str) -> dict[str, Any]:
        """A new signing secret (in this answer only); the old one signs nothing from now on."""
        caller = await self._authenticate(token)
        secret = _new_secret()
        row = await self._webhooks.rotate_secret(caller["id"], secret)
        if row is None:
            raise NotFound("no webhook: set one first")
        log.info("webhook secret rotated", user_id=caller["id"])
        return {**_webhook_view(row), "secret": secret}

    @method(public=True, idempotent=True)
    async def webhook_deliveries(self, token: str, limit: int = 50, before_id: int | None = None,
                                 user: int | str | None = None) -> dict[str, Any]:
        """The delivery log, newest attempt first (`limit` 1-500; the next page: `before_id`)."""
        if type(limit) is not int or not 1 <= limit <= _MAX_DELIVERIES:
            raise InvalidParams(f"limit must be 1 to {_MAX_DELIVERIES}", {"param": "limit"})
        before = None if before_id is None else check_id(before_id, "before_id")
        target = await self._readable(token, user)
        rows = await self._webhooks.log(target["id"], before, limit + 1)
        page = rows[:limit]
        return {"deliveries": [_attempt_view(r) for r in page],
                "next_before_id": page[-1]["id"] if len(rows) > limit else None}

    @method(public=True, idempotent=True)
    async def alerts(self, token: str, limit: int = 20, user: int | str | None = None) -> dict[str, Any]:
        """The latest spending alerts (`limit` 1-100), newest first: the caller's (an admin: `user`'s)."""
        if type(limit) is not int or not 1 <= limit <= _MAX_ALERTS:
            raise InvalidParams(f"limit must be 1 to {_MAX_ALERTS}", {"param": "limit"})
        target = await self._readable(token, user)
        return {"alerts": [_alert_view(r) for r in await self._alerts.alerts(target["id"], limit)]}

    async def _readable(self, token: str, user: int | str | None) -> asyncpg.Record:
        """Whose alerts and webhook the caller reads: their own, or (admins) `user`'s."""
        caller = await self._authenticate(token)
        if user is None:
            return caller
        ref = user_ref(user)
        if self._is_self(caller, ref):
            return caller
        if not caller["is_admin"]:
            raise Forbidden("only administrators may read another user's alerts and webhook")
        return await self.store.find_user(ref)

    async def _webhook_of(self, user_id: int) -> asyncpg.Record:
        row = await self._webhooks.webhook(user_id)
        if row is None:
            raise NotFound("no webhook set")
        return row


def _new_secret() -> str:
    """256 random bits, as the receiver's HMAC key (`whsec_`, like `isk_` for API keys)."""
    return "whsec_" + secrets.token_urlsafe(32)


def _webhook_view(row: asyncpg.Record) -> dict[str, Any]:
    return {"url": row["url"], "thresholds": list(row["thresholds"]), "created_at": iso(row["created_at"]),
            "updated_at": iso(row["updated_at"])}


def _alert_view(row: asyncpg.Record) -> dict[str, Any]:
    return {"event_id": row["event_id"], "scope": row["scope"], "id": row["subject_id"], "counter": row["counter"],
            "threshold": row["threshold"], "spent": money_text(row["spent"]), "budget": money_text(row["budget"]),
            "currency": row["currency"], "period_start": row["period_start"].isoformat(),
            "created_at": iso(row["created_at"])}


def _attempt_view(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "event_id": row["event_id"], "attempt": row["attempt"],
            "status_code": row["status_code"], "error": row["error"], "duration_ms": row["duration_ms"],
            "next_attempt_at": iso(row["next_attempt_at"]), "at": iso(row["at"]), "status": row["status"],
            "delivered_at": iso(row["delivered_at"])}
