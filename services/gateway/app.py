"""Assembling a `GatewayService` from its configuration, a database and the mesh.

Used by `__main__` (inside the runner's lifecycle), the tests and the
benchmark, so all three run the same wiring. Everything is entered on the
caller's `AsyncExitStack`; on exit, in reverse: usage is shipped one last
time, unused lease units go back, the heartbeat row goes, the pool closes.
"""

from __future__ import annotations

import secrets
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from shared.db import apply_migrations, close_pool, create_pool
from shared.logging import get_logger
from shared.metrics import Metrics, instance_id
from shared.receipts import Signer
from shared.rpc import MeshClient
from services.auth.client import AuthClient, KeyValidator
from services.metrics.client import MetricsClient
from services.gateway.accounts import Accounts
from services.gateway.callers import Callers
from services.gateway.config import GatewayConfig
from services.gateway.fleet import Fleet
from services.gateway.prices import PriceBook
from services.gateway.counts import Counts
from services.gateway.dispatch import Dispatch
from services.gateway.gauges import GatewayGauges
from services.gateway.quota import Quota
from services.gateway.recovery import close_earlier_leases, replay_journal, usage_journal
from services.gateway.relay import Relay
from services.gateway.request import Parts
from services.gateway.router import Router
from services.gateway.routing_settings import RoutingSettings
from services.gateway.service import GatewayService
from services.gateway.shipper import UsageShipper
from services.gateway.store import MIGRATIONS, QuotaStore

__all__ = ["open_gateway"]

log = get_logger(__name__)


async def open_gateway(
    stack: AsyncExitStack, config: GatewayConfig, mesh: MeshClient, *, dsn: str, signer: Signer,
    state_dir: Path, metrics: Metrics | None = None,
) -> GatewayService:
    """Pool, migrations, journal replay, leases of an earlier run, loops; the service.

    `signer` is the node's identity: its public key is the gateway's id, and
    it signs the usage receipts (shared/receipts.py).

    `metrics` is the process's registry for the metrics service (the runner's
    `node.metrics`); without it nothing leaves the process (counts.py, gauges.py)."""
    gateway_id = signer.public_key.hex()
    pool = await create_pool(dsn, min_size=2, max_size=config.pool_size)
    stack.push_async_callback(close_pool, pool)
    await apply_migrations(pool, MIGRATIONS)
    store = QuotaStore(pool)

    journal = usage_journal(state_dir / "journal", fsync=config.journal_fsync)
    journal.open()
    replay = replay_journal(journal, Accounts.interrupted)
    stack.callback(journal.close)
    if replay.interrupted:
        log.warning("requests cut by the last stop billed as interrupted", requests=len(replay.interrupted))

    incarnation = secrets.token_hex(8)
    auth = AuthClient(mesh("auth"))

    async def ship(batch: list[dict[str, Any]]) -> dict[str, Any]:
        return {**await auth.record_usage(batch=batch, timeout=5.0)}

    shipper = UsageShipper(journal, ship, interval=config.ship_interval, max_batch=config.ship_batch)
    accounts = Accounts(journal, on_record=shipper.poke)
    quota = Quota(store, gateway=gateway_id, incarnation=incarnation, lease_ttl=config.lease_ttl,
                  max_lease=config.max_lease, claim_horizon=config.claim_horizon,
                  long_lease_ttl=config.long_lease_ttl, recall_wait=config.heartbeat, lease_log=accounts)
    fleet = Fleet(store, gateway=gateway_id, incarnation=incarnation, on_live=quota.set_live,
                  on_recalled=quota.recalled,
                  heartbeat_interval=config.heartbeat, dead_after=config.dead_after,
                  janitor_interval=config.janitor_interval, grace=max(2 * config.lease_ttl, 1.0))
    await stack.enter_async_context(fleet)  # entered first, left last: our leases go back before we leave
    await stack.enter_async_context(quota)
    await close_earlier_leases(store, await store.prior_leases(gateway_id, incarnation), replay.used, replay.leases)

    await stack.enter_async_context(shipper)
    validator = await stack.enter_async_context(KeyValidator(mesh, max_timeout=config.auth_timeout))
    prices = await stack.enter_async_context(PriceBook(auth, interval=config.price_poll))
    settings = await stack.enter_async_context(RoutingSettings(auth, interval=config.price_poll))
    router = Router(mesh)
    relay = Relay(mesh, router, attempts=config.attempts)
    dispatch = Dispatch(config.max_in_flight, queue_limit=config.queue_limit)
    if metrics is not None:  # gateway.health's figures, as metrics too (gauges.py)
        await stack.enter_async_context(GatewayGauges(
            metrics, journal=journal, dispatch=dispatch, relay=relay, instance=instance_id(signer.public_key)))
    parts = Parts(
        callers=Callers(validator, auth, max_timeout=config.auth_timeout), quota=quota, router=router,
        relay=relay, accounts=accounts, counts=Counts(metrics),
        limits=config.limits, signer=signer, prices=prices, settings=settings, dispatch=dispatch,
    )
    return GatewayService(parts, journal, gateway_id=gateway_id, metrics_service=MetricsClient.of(mesh))
