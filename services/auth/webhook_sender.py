"""The webhook sender: one per auth instance, delivering the pending alerts of the whole database.

It claims due deliveries (webhook_store.py: `FOR UPDATE SKIP LOCKED`, a lease,
so two instances never send one at once), POSTs each alert as JSON to its
owner's URL as it is now, signed with its secret as it is now (shared/webhooks.py),
and settles it: a 2xx is delivered; anything else -- another status, a
timeout, a refused connection, an address refused (webhook_urls.py) -- is
retried after `base_delay` doubling up to `max_delay`, each delay drawn
between its half and itself (jitter, so receivers coming back are not hit by
every retry at once), until `max_attempts`; then the delivery is `failed`.
Every attempt is in the delivery log. A removed webhook's pending deliveries
fail at once.

It wakes when this instance queues a delivery (`wake`), else every
`poll_interval` seconds, which is also how soon a retry or another
instance's delivery is seen.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import asyncpg

from shared.errors import InvalidParams, MeshError
from shared.logging import get_logger
from shared.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, signature_header
from services.auth.limits import money_text
from services.auth.webhook_store import WebhookStore
from services.auth.webhook_urls import PublicResolver, RefusedAddress, check_destination

__all__ = ["EVENT_TYPE", "WebhookPolicy", "WebhookSender", "payload"]

log = get_logger(__name__)

EVENT_TYPE = "budget.threshold_reached"
_CLAIM_BATCH = 16
_MAX_ERROR = 200


@dataclass(frozen=True)
class WebhookPolicy:
    """How deliveries are made and retried (AuthConfig's INFERSWARM_WEBHOOK_* variables)."""

    timeout: float = 10.0
    base_delay: float = 1.0
    max_delay: float = 3600.0
    max_attempts: int = 8
    poll_interval: float = 1.0
    allow_private: bool = False

    def retry_in(self, attempt: int) -> float:
        """Seconds before the attempt after `attempt` (1 for the first): exponential, with jitter."""
        delay = min(self.max_delay, self.base_delay * 2 ** min(attempt - 1, 62))
        return random.uniform(delay / 2, delay)


def payload(row: Any) -> dict[str, Any]:
    """An alert as the receiver gets it (money as decimal strings)."""
    return {"id": row["event_id"], "type": EVENT_TYPE, "created": int(row["created_at"].timestamp()),
            "data": {"scope": row["scope"], "id": row["subject_id"], "counter": row["counter"],
                     "threshold": row["threshold"], "spent": money_text(row["spent"]),
                     "budget": money_text(row["budget"]), "currency": row["currency"],
                     "period_start": row["period_start"].isoformat()}}


class WebhookSender:
    """`async with WebhookSender(store, policy) as sender:` delivers until the block ends."""

    def __init__(self, store: WebhookStore, policy: WebhookPolicy) -> None:
        self.store = store
        self.policy = policy
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> WebhookSender:
        resolver = None if self.policy.allow_private else PublicResolver()
        connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=_CLAIM_BATCH)
        self._http = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                           trust_env=False, headers={"user-agent": "inferswarm-webhooks/1"})
        self._task = asyncio.create_task(self._run(), name="webhook-sender")
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def wake(self) -> None:
        """Deliveries were queued: look now rather than at the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                claimed = await self.deliver_due()
            except (MeshError, asyncpg.PostgresError, OSError) as exc:  # the database is away: try later
                log.warning("webhook deliveries not claimed", error=type(exc).__name__)
                claimed = 0
            if claimed < _CLAIM_BATCH:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.policy.poll_interval)
                except TimeoutError:
                    pass
                self._wake.clear()

    async def deliver_due(self) -> int:
        """Send the deliveries due now (at most a batch); how many were claimed."""
        rows = await self.store.claim(_CLAIM_BATCH, self.policy.timeout + 30.0)
        await asyncio.gather(*(self._deliver(row) for row in rows))
        return len(rows)

    async def _deliver(self, row: asyncpg.Record) -> None:
        started = time.monotonic()
        code, error = await self._post(row) if row["url"] is not None else (None, "the webhook was removed")
        duration_ms = int((time.monotonic() - started) * 1000)
        attempt = row["attempts"]
        if code is not None and 200 <= code < 300:
            status, retry_in = "delivered", None
        elif attempt >= self.policy.max_attempts or row["url"] is None:
            status, retry_in = "failed", None
        else:
            status, retry_in = "pending", self.policy.retry_in(attempt)
        await self.store.settle(row["id"], attempt, status, retry_in, status_code=code, error=error,
                                duration_ms=duration_ms)
        log.info("webhook attempt", delivery_id=row["id"], user_id=row["user_id"], attempt=attempt,
                 status_code=code, error=error, outcome=status)

    async def _post(self, row: asyncpg.Record) -> tuple[int | None, str | None]:
        """One POST: (the status code, None), or (None, why there was no answer)."""
        assert self._http is not None
        body = json.dumps(payload(row), separators=(",", ":")).encode()
        headers = {"content-type": "application/json", EVENT_ID_HEADER: row["event_id"],
                   SIGNATURE_HEADER: signature_header(row["secret"], body)}
        try:
            await check_destination(row["url"], self.policy.allow_private)
            async with self._http.post(row["url"], data=body, headers=headers, allow_redirects=False,
                                       timeout=aiohttp.ClientTimeout(total=self.policy.timeout)) as response:
                return response.status, None
        except (InvalidParams, RefusedAddress):
            return None, "address refused: not a public address"
        except TimeoutError:
            return None, f"no answer within {self.policy.timeout:g} s"
        except aiohttp.ClientError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]
