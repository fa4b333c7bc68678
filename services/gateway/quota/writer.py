"""The one task through which a gateway's leases talk to the database.

`Quota` decides what it needs; the `LeaseWriter` asks for it, in batches:
each turn it gives back what expired leases do not use (first, since a grant
may need it), then sends every pending grant in one call, then every claim.
No two statements of one gateway ever wait on each other, and every answer
is applied to the local leases (through the `LeaseBook`, their one owner)
in the same loop turn. An expiry loop retires leases at 0.8 of their TTL,
well before the database's `expires_at`. The writer's own state is its
queues: pending grants, claims, and leases to give back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from shared.errors import Unavailable
from shared.logging import get_logger
from shared.tasks import Background
from services.gateway.quota.book import LeaseBook
from services.gateway.quota.leases import KeyState, Lease
from services.gateway.store import Grant, GrantItem, QuotaStore

__all__ = ["LeaseWriter"]

log = get_logger(__name__)


@dataclass(slots=True)
class _GrantOp:
    state: KeyState
    item: GrantItem
    future: asyncio.Future[Grant]


class LeaseWriter:
    """Grants, claims and returns of one gateway's leases (see the module doc)."""

    def __init__(
        self, store: QuotaStore, book: LeaseBook, *, gateway: str, incarnation: str, ttl: float,
        max_lease: int, horizon: float, clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._book = book
        self.gateway = gateway
        self.incarnation = incarnation
        self.ttl = ttl
        self._max_lease = max_lease
        self._horizon = horizon
        self._clock = clock  #: the quota's clock (rolling counters drain by it)
        self.live = 1  #: live gateways, kept up to date by the heartbeat
        self._grants: list[_GrantOp] = []
        self._claims: dict[Lease, int] = {}
        self._dirty: set[Lease] = set()
        self._wake = asyncio.Event()
        self._background = Background()
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = self._background.start(self._run(), name="quota writer")
        self._background.start(self._expirer(), name="quota expiry")

    def halt(self) -> None:
        """Stop dead: nothing given back, nothing written (`kill -9`, for the fault tests)."""
        self._background.halt()

    async def stop(self, timeout: float = 3.0) -> None:
        """Give back every unused unit (leases of requests still running keep theirs)."""
        for lease in self._book.leases():
            self._book.retire(lease)
            self._dirty.add(lease)
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._dirty and time.monotonic() < deadline and self._loop is not None and not self._loop.done():
            await asyncio.sleep(0.01)
        await self._background.stop()
        await self._release_dirty(final=True)

    def dirty(self, lease: Lease) -> None:
        """`lease` may have units to give back (expired, or settled while expired)."""
        self._dirty.add(lease)
        self._wake.set()

    def grant(self, state: KeyState, n: int, *, background: bool = False) -> asyncio.Future[Grant]:
        """Ask for units: more for the open lease (`top_up`) while it has a while
        to live, else a new lease. In the `background` the open lease serves
        on until the answer; otherwise it cannot serve and is retired now."""
        lease = state.lease
        now = time.monotonic()
        top_up = lease is not None and not lease.expired and lease.expires - now > self.ttl / 2
        if lease is not None and not top_up and not background and self._book.retire(lease):
            self._dirty.add(lease)
        have = lease.free if top_up and lease is not None else 0
        ahead = state.ahead(self._horizon, n)
        need = max(1, n - have)
        used = lease.used if top_up and lease is not None else 0
        # Room for `max_lease` requests (the database cuts it to a share of
        # what is left), but claimed only `ahead` of use: what a crash strands.
        item = GrantItem(
            state.key.subject, state.key.counter, state.key.window_start, state.limit, state.unit_us, need,
            max(need, self._max_lease * n), lease.id if top_up and lease is not None else None,
            used + max(n, 2 * ahead),
        )
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        self._book.granting(state, future)
        self._grants.append(_GrantOp(state, item, future))
        self._wake.set()
        return future

    def claim(self, lease: Lease, target: int) -> asyncio.Future[None]:
        """Raise `lease`'s claimed mark towards `target` (never past its units)."""
        if lease.claiming is not None:
            return lease.claiming
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._book.claiming(lease, future)
        self._claims[lease] = min(lease.units, target)
        self._wake.set()
        return future

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._release_dirty()  # first: a grant may need what comes back
                await self._write_grants()
                await self._write_claims()
                backoff = 0.05
            except Unavailable as exc:
                log.warning("quota database unavailable", error=exc.message)
                # Returns go first, so while the database is down they fail
                # before any grant or claim is tried: fail those now, or their
                # requests would wait for the database's return (or their
                # deadline) instead of getting UNAVAILABLE.
                self._fail_waiting(exc)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                self._wake.set()
            except Exception:  # a bug or a refused statement: keep the writer alive
                log.exception("quota writer failed; retrying")
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                self._wake.set()

    def _fail_waiting(self, exc: Unavailable) -> None:
        """Every grant and claim not written yet fails with `exc`."""
        grants, self._grants = self._grants, []
        for op in grants:
            self._book.granting(op.state, None)
            if not op.future.done():
                op.future.set_exception(exc)
                op.future.exception()  # retrieved: a waiter may have been cancelled
        claims, self._claims = self._claims, {}
        for lease in claims:
            future = self._book.claim_over(lease)
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()

    async def _write_grants(self) -> None:
        ops, self._grants = self._grants, []
        if not ops:
            return
        ops.sort(key=lambda op: (op.item.subject, op.item.counter, op.item.window_start))
        for op in ops:  # claim from where the lease is now, not where it was when asked
            lease = op.state.lease
            if op.item.lease_id is not None and lease is not None and lease.id == op.item.lease_id:
                ahead = op.state.ahead(self._horizon, op.item.need)
                op.item = replace(op.item, claim=max(op.item.claim, lease.used + 2 * ahead))
        sent = time.monotonic()
        try:
            grants = await self._store.grant(self.gateway, self.incarnation, self.ttl, self.live, self._clock(),
                                             [op.item for op in ops])
        except Exception as exc:
            for op in ops:
                self._book.granting(op.state, None)
                if not op.future.done():
                    op.future.set_exception(exc if isinstance(exc, Unavailable) else Unavailable(str(exc)))
                    op.future.exception()  # retrieved: a waiter may have been cancelled
            if isinstance(exc, Unavailable):
                return
            raise
        for op, grant in zip(ops, grants):
            self._apply(op, grant, sent)

    def _apply(self, op: _GrantOp, grant: Grant, sent: float) -> None:
        # A new lease goes back well before the database says it expires, so a
        # request of another gateway waiting (at most a TTL) for it sees it come back.
        retired = self._book.granted(op.state, grant, expires=sent + self.ttl * 0.8)
        if retired is not None:
            self._dirty.add(retired)
        if not op.future.done():
            op.future.set_result(grant)

    async def _write_claims(self) -> None:
        claims, self._claims = self._claims, {}
        if not claims:
            return
        leases = {lease.id: lease for lease in claims}
        try:
            answers = await self._store.claim(list(leases), list(claims.values()))
        except Exception as exc:
            for lease in claims:
                future = self._book.claim_over(lease)
                if future is not None and not future.done():
                    future.set_exception(exc if isinstance(exc, Unavailable) else Unavailable(str(exc)))
                    future.exception()
            if isinstance(exc, Unavailable):
                return
            raise
        for answer in answers:
            lease = leases[answer.lease_id]
            if self._book.claimed(lease, answer.claimed, answer.orphaned):  # a janitor took us for dead
                self._dirty.add(lease)
        for lease in claims:
            future = self._book.claim_over(lease, gone=lease.id not in {a.lease_id for a in answers})
            if future is not None and not future.done():
                future.set_result(None)

    async def _release_dirty(self, *, final: bool = False) -> None:
        dirty, self._dirty = self._dirty, set()
        batch: list[tuple[Lease, int, bool]] = []
        for lease in sorted(dirty, key=lambda l: (l.key.subject, l.key.counter, l.key.window_start, l.id)):
            if lease.closed:
                continue
            if not lease.expired and lease.free == 0 and lease.holders == 0:
                self._book.retire(lease)  # used up and settled: nothing will ever come back
            if lease.expired and (lease.holders == 0 or final):
                batch.append((lease, lease.used, True))
            elif lease.expired and lease.free > 0:
                batch.append((lease, lease.used, False))
        if not batch:
            return
        try:
            answers = await self._store.release([b[0].id for b in batch], [b[1] for b in batch],
                                                [b[2] for b in batch])
        except Exception:
            self._dirty.update(b[0] for b in batch)  # try again on the next turn
            raise
        returned = {a.lease_id: a for a in answers}
        for lease, used, close in batch:
            self._book.gave_back(lease, returned.get(lease.id), close=close, used=used)

    async def _expirer(self) -> None:
        period = max(0.01, min(0.1, self.ttl / 8))
        while True:
            await asyncio.sleep(period)
            self._dirty.update(self._book.expire_due(time.monotonic()))
            if self._dirty:
                self._wake.set()
            self._book.forget_idle()
