"""The one task through which a gateway's leases talk to the database.

`Quota` decides what it needs; the `LeaseWriter` asks for it, in batches:
each turn is one transaction (`quota_turn`) that gives back what expired
leases do not use (first, since a grant may need it), then grants every
pending grant, then raises every pending claim. No two statements of one
gateway ever wait on each other, and every answer is applied to the local
leases (through the `LeaseBook`, their one owner) in the same loop turn. An expiry loop retires leases 0.2 of a short TTL
before the database's `expires_at` (a short lease at 0.8 of its TTL), and the
heartbeat retires long leases the database recalled (`recalled`). A long
lease that ends (far from its limit: nobody waits for its units) is given
back with the others of the next second, in one batch; any other at the next
turn. The writer's own state is its queues: pending grants, claims, and
leases to give back (now, or within a heartbeat).
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
        max_lease: int, horizon: float, long_ttl: float = 0.0, long_ahead: int = 8, recall: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._book = book
        self.gateway = gateway
        self.incarnation = incarnation
        self.ttl = ttl
        self.long_ttl = long_ttl  #: a long lease's life in the database (0: none)
        self.long_ahead = long_ahead  #: requests' worth a long lease claims ahead
        self._recall = recall  #: how soon a recalled long lease's owner hears of it (its heartbeat)
        self._max_lease = max_lease
        self._horizon = horizon
        self._clock = clock  #: the quota's clock (rolling counters drain by it)
        self.live = 1  #: live gateways, kept up to date by the heartbeat
        self._grants: list[_GrantOp] = []
        self._claims: dict[Lease, int] = {}
        self._dirty: set[Lease] = set()
        self._later: set[Lease] = set()  #: long leases to give back within `recall` seconds
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
        self._later.clear()
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._dirty and time.monotonic() < deadline and self._loop is not None and not self._loop.done():
            await asyncio.sleep(0.01)
        await self._background.stop()
        await self._release_dirty(final=True)

    def dirty(self, lease: Lease) -> None:
        """`lease` may have units to give back (expired, or settled while expired)."""
        self._give_back(lease)
        self._wake.set()

    def _give_back(self, lease: Lease) -> None:
        """Queue `lease`'s return: a long one with the next second's batch, any other now."""
        if lease.long:
            self._later.add(lease)
        else:
            self._later.discard(lease)
            self._dirty.add(lease)

    def recalled(self, lease_ids: list[int]) -> None:
        """The database recalled these long leases (their keys near their limits): give
        back what they do not use, now."""
        for lease in self._book.recalled(lease_ids):
            self._give_back(lease)
        for lease in [l for l in self._later if not l.long]:  # recalled after it ended: now
            self._give_back(lease)
        if self._dirty:
            self._wake.set()

    def reach(self, lease: Lease, ahead: int, n: int) -> int:
        """How far past its use a lease is claimed: `ahead` (`horizon` seconds of traffic)
        twice; a long lease (its key far from its limit) 8 times, or a few requests."""
        if lease.long:
            return max(n, 8 * ahead, self.long_ahead * n)
        return max(n, 2 * ahead)

    def grant(self, state: KeyState, n: int, *, background: bool = False) -> asyncio.Future[Grant]:
        """Ask for units: more for the open lease (`top_up`) while it has a while
        to live, else a new lease. In the `background` the open lease serves
        on until the answer; otherwise it cannot serve and is retired now."""
        lease = state.lease
        now = time.monotonic()
        top_up = lease is not None and not lease.expired and lease.expires - now > self.ttl / 2
        if lease is not None and not top_up and not background and self._book.retire(lease):
            self._give_back(lease)
        have = lease.free if top_up and lease is not None else 0
        ahead = state.ahead(self._horizon, n)
        need = max(1, n - have)
        used = lease.used if top_up and lease is not None else 0
        # Room for `max_lease` requests (the database cuts it to a share of
        # what is left), but claimed only `ahead` of use: what a crash strands.
        item = GrantItem(
            state.key.subject, state.key.counter, state.key.window_start, state.limit, state.unit_us, need,
            max(need, self._max_lease * n), lease.id if top_up and lease is not None else None,
            used + max(n, 2 * ahead), used + max(n, 8 * ahead, self.long_ahead * n),
        )
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        self._book.granting(state, future)
        self._grants.append(_GrantOp(state, item, future))
        self._wake.set()
        return future

    def claim(self, lease: Lease, target: int, *, urgent: bool = True) -> asyncio.Future[None]:
        """Raise `lease`'s claimed mark towards `target` (never past its units); not
        `urgent`, it waits for the next turn rather than making one."""
        if lease.claiming is None:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._book.claiming(lease, future)
            self._claims[lease] = min(lease.units, target)
        if urgent:
            self._wake.set()
        assert lease.claiming is not None
        return lease.claiming

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._turn()
                backoff = 0.05
            except Unavailable as exc:
                log.warning("quota database unavailable", error=exc.message)
                self._fail_waiting(exc)  # asked meanwhile: UNAVAILABLE now, not at their deadline
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                self._wake.set()
            except Exception:  # a bug or a refused statement: keep the writer alive
                log.exception("quota writer failed; retrying")
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                self._wake.set()

    async def _turn(self) -> None:
        """Everything pending, in one transaction (`quota_turn`): the returns first
        (a grant may need what comes back), then the grants, then the claims."""
        if self._later and (self._dirty or self._grants or self._claims):
            self._dirty.update(self._later)  # long leases ride along: no transaction of their own
            self._later.clear()
        releases, ops, claims = self._releases(), self._take_grants(), self._take_claims()
        if not (releases or ops or claims):
            return
        leases = {lease.id: lease for lease in claims}
        sent = time.monotonic()
        try:
            turn = await self._store.turn(
                self.gateway, self.incarnation, self.ttl, self.live, self._clock(),
                [(b[0].id, b[1], b[2]) for b in releases], [op.item for op in ops],
                [(lease.id, target) for lease, target in claims.items()],
                long_ttl=self.long_ttl, recall=self._recall)
        except Exception as exc:
            self._dirty.update(b[0] for b in releases)  # given back on a later turn
            failure = exc if isinstance(exc, Unavailable) else Unavailable(str(exc))
            self._fail(ops, list(claims), failure)
            raise
        returned = {a.lease_id: a for a in turn.released}
        for lease, used, close in releases:
            self._book.gave_back(lease, returned.get(lease.id), close=close, used=used)
        for op, grant in zip(ops, turn.grants):
            self._apply(op, grant, sent)
        answered = set()
        for answer in turn.claims:
            lease = leases[answer.lease_id]
            answered.add(lease.id)
            if self._book.claimed(lease, answer.claimed, answer.orphaned):  # a janitor took us for dead
                self._dirty.add(lease)
        for lease in claims:
            future = self._book.claim_over(lease, gone=lease.id not in answered)
            if future is not None and not future.done():
                future.set_result(None)

    def _fail_waiting(self, exc: Unavailable) -> None:
        """Every grant and claim not written yet fails with `exc`."""
        grants, self._grants = self._grants, []
        claims, self._claims = self._claims, {}
        self._fail(grants, list(claims), exc)

    def _fail(self, grants: list[_GrantOp], claims: list[Lease], exc: Unavailable) -> None:
        for op in grants:
            self._book.granting(op.state, None)
            if not op.future.done():
                op.future.set_exception(exc)
                op.future.exception()  # retrieved: a waiter may have been cancelled
        for lease in claims:
            future = self._book.claim_over(lease)
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()

    def _take_grants(self) -> list[_GrantOp]:
        ops, self._grants = self._grants, []
        ops.sort(key=lambda op: (op.item.subject, op.item.counter, op.item.window_start))
        for op in ops:  # claim from where the lease is now, not where it was when asked
            lease = op.state.lease
            if op.item.lease_id is not None and lease is not None and lease.id == op.item.lease_id:
                ahead = op.state.ahead(self._horizon, op.item.need)
                op.item = replace(op.item, claim=max(op.item.claim, lease.used + 2 * ahead),
                                  claim_long=max(op.item.claim_long, lease.used + 8 * ahead))
        return ops

    def _take_claims(self) -> dict[Lease, int]:
        claims, self._claims = self._claims, {}
        return claims

    def _apply(self, op: _GrantOp, grant: Grant, sent: float) -> None:
        # A new lease goes back well before the database says it expires (0.2 of a
        # short TTL), so a request of another gateway waiting for it sees it come back.
        life = self.long_ttl if grant.long else self.ttl
        retired = self._book.granted(op.state, grant, expires=sent + life - self.ttl * 0.2)
        if retired is not None:
            self._give_back(retired)
        if not op.future.done():
            op.future.set_result(grant)

    def _releases(self, *, final: bool = False) -> list[tuple[Lease, int, bool]]:
        """The leases to give back now, in key order: (lease, units it keeps, close it)."""
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
        return batch

    async def _release_dirty(self, *, final: bool = False) -> None:
        batch = self._releases(final=final)
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
        batched = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for lease in self._book.expire_due(now):
                self._give_back(lease)
            if self._later and now - batched >= self._recall:
                self._dirty.update(self._later)
                self._later.clear()
                batched = now
            if self._dirty:
                self._wake.set()
            self._book.forget_idle()
