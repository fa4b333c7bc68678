"""The spending alerts' and webhooks' calls of `AuthClient`, and their answers' shapes.

A mixin of `AuthClient` (api.py): `ALERT_METHODS` is merged into its `METHODS`.
services/auth/README.md, "Spending alerts and webhooks", says what each does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from shared.rpc.typed import TypedClient, Wire

__all__ = ["ALERT_METHODS", "Alert", "AlertCalls", "AlertList", "Webhook", "WebhookAttempt", "WebhookLog",
           "WebhookRemoved", "WebhookWithSecret"]


class Webhook(TypedDict):
    url: str
    thresholds: list[int]  #: percentages of each budget that raise an alert
    created_at: str  #: ISO 8601
    updated_at: str


class WebhookWithSecret(Webhook):
    #: `whsec_...`, the HMAC key of the signatures: in the answer that made it only (`set_webhook` creating
    #: the webhook, `rotate_webhook_secret`); None when `set_webhook` changed an existing one.
    secret: str | None


class WebhookRemoved(TypedDict):
    removed: bool  #: false: there was none


class WebhookAttempt(TypedDict):
    """One attempt of the delivery log."""

    id: int
    event_id: str  #: `evt_...`, the alert's (and the receiver's `x-inferswarm-event-id`)
    attempt: int  #: 1 for the first
    status_code: int | None  #: the receiver's answer; None: none (see `error`)
    error: str | None  #: why there was no answer (timeout, refused connection, address refused)
    duration_ms: int
    next_attempt_at: str | None  #: when it is retried; None: it is not
    at: str
    status: str  #: the delivery's, now: pending, delivered, failed
    delivered_at: str | None


class WebhookLog(TypedDict):
    deliveries: list[WebhookAttempt]  #: newest first
    next_before_id: int | None


class Alert(TypedDict):
    """A threshold of a budget reached in a period (once per threshold, period and budget)."""

    event_id: str
    scope: str  #: user, key (org later)
    id: int  #: the user's or the key's id
    counter: str  #: spend_per_day, spend_per_month
    threshold: int  #: a percentage
    spent: str  #: decimal string, in `currency`, when it fired
    budget: str
    currency: str
    period_start: str  #: YYYY-MM-DD: the UTC day, or the first of the UTC month
    created_at: str


class AlertList(TypedDict):
    alerts: list[Alert]  #: newest first


ALERT_METHODS = {
    "set_webhook": Wire("auth.set_webhook"),
    "webhook": Wire("auth.webhook", idempotent=True),
    "remove_webhook": Wire("auth.remove_webhook", idempotent=True),
    "rotate_webhook_secret": Wire("auth.rotate_webhook_secret"),
    "webhook_deliveries": Wire("auth.webhook_deliveries", idempotent=True),
    "alerts": Wire("auth.alerts", idempotent=True),
}


class AlertCalls(TypedClient):
    """Spending alerts and the caller's webhook."""

    async def set_webhook(self, *, token: str, url: str, thresholds: Sequence[int] | None = None,
                          timeout: float | None = None) -> WebhookWithSecret:
        """Create the webhook (`secret` shown here once) or change its URL and thresholds (None: kept)."""
        return await self._call("set_webhook", timeout, token=token, url=url,
                                thresholds=None if thresholds is None else list(thresholds))

    async def webhook(self, *, token: str, user: int | str | None = None, timeout: float | None = None) -> Webhook:
        return await self._call("webhook", timeout, token=token, user=user)

    async def remove_webhook(self, *, token: str, timeout: float | None = None) -> WebhookRemoved:
        return await self._call("remove_webhook", timeout, token=token)

    async def rotate_webhook_secret(self, *, token: str, timeout: float | None = None) -> WebhookWithSecret:
        return await self._call("rotate_webhook_secret", timeout, token=token)

    async def webhook_deliveries(self, *, token: str, limit: int | None = None, before_id: int | None = None,
                                 user: int | str | None = None, timeout: float | None = None) -> WebhookLog:
        return await self._call("webhook_deliveries", timeout, token=token, limit=limit, before_id=before_id,
                                user=user)

    async def alerts(self, *, token: str, limit: int | None = None, user: int | str | None = None,
                     timeout: float | None = None) -> AlertList:
        return await self._call("alerts", timeout, token=token, limit=limit, user=user)
