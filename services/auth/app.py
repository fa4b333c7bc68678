"""Assembling an `AuthService` from its configuration and a database.

Used by `__main__` (inside the runner's lifecycle), by the tests and by the
benchmark, so that all three run the same wiring.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg

from shared.db import apply_migrations, close_pool, create_pool
from shared.logging import get_logger
from shared.metrics import Metrics
from shared.replica import Reader, open_replica
from shared.tiers import TierTable
from services.auth.cache import KeyCache
from services.auth.config import AuthConfig
from services.auth.housekeeping import Housekeeper
from services.auth.invalidation import InvalidationFeed
from services.auth.partitions import UsagePartitions
from services.auth.passwords import PRODUCTION, PasswordHasher
from services.auth.price_store import PriceStore
from services.auth.registration import RegistrationThrottle
from services.auth.service import AuthService
from services.auth.store import AuthStore
from services.auth.throttle import LoginThrottle
from services.auth.tier_store import TierStore
from services.auth.tokens import TokenIssuer, load_or_create_key
from services.auth.usage_store import UsageStore
from services.auth.webhook_sender import WebhookSender
from services.auth.webhook_store import WebhookStore

__all__ = ["MIGRATIONS", "open_auth"]

MIGRATIONS = Path(__file__).with_name("migrations")

log = get_logger(__name__)


async def open_auth(stack: AsyncExitStack, config: AuthConfig, dsn: str,
                    metrics: Metrics | None = None) -> AuthService:
    """Pool, migrations, background loops and the service; all closed by `stack`. `metrics`: the
    process's registry, pushed to the metrics service (`node.metrics`); None: counted, never sent.
    With DATABASE_REPLICA_URL the reports read a replica (README.md, "Read replica")."""
    pool = await create_pool(dsn, min_size=2, max_size=config.pool_size)
    stack.push_async_callback(close_pool, pool)
    await apply_migrations(pool, MIGRATIONS)
    reports: Reader = pool  # no replica: the primary serves the reports too
    if config.replica.url is not None:
        replica = await open_replica(config.replica.url, pool)
        stack.push_async_callback(replica.close)  # after the service's last read: closed before the primary
        reports = replica
    store = AuthStore(pool)
    for user_id, column in await store.fill_folded_names():
        log.warning("account name folds like an older account's: found by its exact name only",
                    user_id=user_id, column=column)
    # The tiers as the database has them, before any answer is made of them; reloaded by the
    # feed whenever the log says they changed.
    tiers, tier_store = TierTable(config.tiers), TierStore(pool, config.tiers)
    await tier_store.load(tiers)
    cache = KeyCache(ttl=config.cache_ttl)
    feed = InvalidationFeed(
        store, dsn, cache, poll_interval=config.poll_interval, stale_after=config.stale_after,
        reload=lambda: tier_store.load(tiers),
    )
    await stack.enter_async_context(feed)
    partitions = UsagePartitions(pool, retention_months=config.usage_retention_months)
    try:  # the months ahead, before any usage is recorded (the DEFAULT partition would take it)
        await partitions.ensure()
    except asyncpg.LockNotAvailableError:
        log.warning("usage partitions not made: `usage` busy; the housekeeping will try again")
    housekeeper = await stack.enter_async_context(
        Housekeeper(store, dead_letters_max=config.dead_letters_max, partitions=partitions))
    # One sender per instance; they share the deliveries through the database (webhook_store.py).
    sender = await stack.enter_async_context(WebhookSender(WebhookStore(pool), config.webhooks))
    params = config.argon2
    if params.memory_kib < PRODUCTION.memory_kib or params.time_cost < PRODUCTION.time_cost:
        log.warning("argon2 parameters below RFC 9106 low-memory profile", **_params_of(params))
    signing_key = load_or_create_key(config.jwt_key_path)
    service = AuthService(
        store, UsageStore(pool, reports),
        passwords=PasswordHasher(params, concurrency=config.hash_concurrency),
        tokens=TokenIssuer(signing_key, issuer=config.issuer, audience=config.audience,
                           ttl=config.token_ttl),
        tiers=tiers,
        throttle=LoginThrottle(store, config.throttle),
        feed=feed,
        housekeeper=housekeeper,
        registrations=RegistrationThrottle(store, config.registration),
        max_keys_per_user=config.max_keys_per_user,
        prices=PriceStore(pool),
        tier_store=tier_store,
        currency=config.currency,
        metrics=metrics,
        sender=sender,
        allow_private_webhooks=config.webhook_allow_private,
        alert_interval=config.alert_interval,
    )
    await stack.enter_async_context(service.alert_loop)  # left before the pool closes: a last round
    return service


def _params_of(params: object) -> dict[str, object]:
    return {name: getattr(params, name) for name in params.__slots__}  # type: ignore[attr-defined]
