"""Reads that may lag, from a streaming replica; from the primary while the replica cannot answer.

A service's wiring (services/auth/app.py)::

    reports: Reader = pool                       # no replica: the primary reads too
    if config.replica.url is not None:
        replica = await open_replica(config.replica.url, pool)
        stack.push_async_callback(replica.close)
        reports = replica
    UsageStore(pool, reports)                    # the store's lag-tolerant reads use `reports`

`ReplicaReader.fetch` runs a query on the replica and, when the replica
cannot answer it (`REPLICA_ERRORS`: unreachable, refusing connections, shut
down, the query cancelled by a conflict with recovery, a table or column a
migration just added not replayed yet), runs it on the primary instead: a
replica outage costs a read its retry, never the read. A failure also leaves
the replica alone for a while (a `Breaker` of one failure: 5 s, doubling to
60 s while its probes fail), so an outage does not make every read wait for
a connect timeout first; one read at a time probes it again. An error of the
query itself reaches the caller: the primary raises it too.

A warning says the replica failed when it starts failing, and again at most
once a minute (`warn_every`) however long it keeps failing or often it flaps;
an info line says when it answers again. Which
server answered a read is a debug line (`served_by`), never part of an answer.

A replica lags its primary (usually by well under a second, more while
replay is paused or the replica catches up): only reads that may show
slightly old data belong here. Whatever must see a write just made (the
same request's, a key just created) reads the primary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from shared.breaker import CLOSED, OPEN, Breaker, State
from shared.config import Secret, env
from shared.db import CONNECTION_ERRORS, close_pool, create_pool
from shared.logging import get_logger

__all__ = ["REPLICA_ERRORS", "Reader", "ReplicaConfig", "ReplicaReader", "open_replica"]

log = get_logger(__name__)

#: What makes a read go to the primary: the replica cannot be reached or used now, or its schema is
#: behind the primary's (a migration not replayed yet). A query at fault raises the last three on
#: the primary too, so nothing wrong is hidden: it still reaches the caller.
REPLICA_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.OperatorInterventionError,  # shutting down, crashed, starting up, a cancelled query
    asyncpg.SerializationError,  # "canceling statement due to conflict with recovery"
    asyncpg.InvalidCatalogNameError,  # its database is missing (not replayed yet, or misnamed)
    asyncpg.InvalidAuthorizationSpecificationError,  # refused: its role or password
    asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError, asyncpg.UndefinedFunctionError,
)


@dataclass(frozen=True)
class ReplicaConfig:
    """A streaming replica of the service's database; nest it in a service's config."""

    #: None: no replica, the primary (DATABASE_URL) serves every read.
    url: Secret | None = env("DATABASE_REPLICA_URL", default=None)


class Reader(Protocol):
    """What a store's lag-tolerant reads need: an `asyncpg.Pool`, or a `ReplicaReader`."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...


class ReplicaReader:
    """`fetch` on the replica, on the primary while the replica cannot answer (see the module doc)."""

    def __init__(self, replica: asyncpg.Pool, primary: asyncpg.Pool, *, cooldown: float = 5.0,
                 max_cooldown: float = 60.0, warn_every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.replica = replica
        self.primary = primary
        self.warn_every = warn_every
        self._clock = clock
        self._breaker = Breaker(threshold=1, cooldown=cooldown, max_cooldown=max_cooldown, clock=clock,
                                on_change=self._changed)
        self._warned_at: float | None = None
        self._error = ""  #: the last failure, for the warning
        self.fallbacks = 0  #: reads the primary served because the replica failed or was resting

    @property
    def state(self) -> State:
        """The replica's breaker: `closed` while it serves the reads."""
        return self._breaker.state

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        """The rows of `query`, from the replica if it can answer, else from the primary."""
        if self._breaker.allow():
            try:
                rows = await self.replica.fetch(query, *args)
            except REPLICA_ERRORS as exc:
                self._error = f"{type(exc).__name__}: {exc}"
                self._breaker.failed()
            else:
                self._breaker.succeeded()
                log.debug("read served", served_by="replica")
                return list(rows)
        self.fallbacks += 1
        rows = await self.primary.fetch(query, *args)
        log.debug("read served", served_by="primary", replica=self._breaker.state)
        return list(rows)

    def _changed(self, state: State) -> None:
        if state == CLOSED:
            log.info("read replica answers again: lag-tolerant reads go to it")
            return
        now = self._clock()
        if state == OPEN and (self._warned_at is None or now - self._warned_at >= self.warn_every):
            self._warned_at = now
            log.warning("read replica failing: lag-tolerant reads go to the primary", error=self._error,
                        retry_in=round(self._breaker.retry_after(), 3))

    async def close(self) -> None:
        """Close the replica's pool (the primary's belongs to its opener)."""
        await close_pool(self.replica)


async def open_replica(url: str | Secret, primary: asyncpg.Pool, *, max_size: int = 3,
                       connect_timeout: float = 5.0, **options: Any) -> ReplicaReader:
    """A `ReplicaReader` over a small pool of its own on `url` (`DATABASE_REPLICA_URL`), falling
    back to `primary`. No connection is made yet: a replica down at start is fallen back from on the
    first read, never a failed start. `connect_timeout` bounds each attempt to reach it; `options`
    go to `ReplicaReader`."""
    dsn = url.reveal() if isinstance(url, Secret) else url
    pool = await create_pool(dsn, min_size=0, max_size=max_size, timeout=connect_timeout)
    return ReplicaReader(pool, primary, **options)
