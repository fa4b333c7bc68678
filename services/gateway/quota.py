"""Limits exact across any number of gateways, mostly without the database.

    quota = Quota(store, gateway="3fa0…", incarnation="9c1e…")
    async with quota:
        admission = await quota.admit(user_id, limits, tokens=300, deadline=d)   # or RateLimited
        ...                                       # the work
        quota.settle(admission, tokens_used=120)  # or quota.release(admission) if it failed

Requests are admitted from local leases (blocks of units the database
granted this gateway). The database is asked only when a lease runs out, to
raise a lease's `claimed` mark ahead of use, and to give unused units back.
All of those go through one writer task, in batches: one statement per kind
per turn, and no two statements of one gateway ever wait on each other.
The design and its guarantees are in README.md, "Limits".
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, Self

from shared.errors import RateLimited, Unavailable
from shared.logging import get_logger
from services.gateway.leases import (
    COUNTERS,
    TOKEN_COUNTER,
    Key,
    KeyState,
    Lease,
    Part,
    window_of,
)
from services.gateway.store import Grant, GrantItem, PriorLease, QuotaStore

__all__ = ["Admission", "LeaseLog", "Quota"]

log = get_logger(__name__)

_MAX_ROUNDS = 500  # of the slow path: each round waits on the database or `poll_interval`


class LeaseLog(Protocol):
    """Where the journal hears about leases (for exact recovery after a crash)."""

    def opened(self, lease_id: int) -> None: ...

    def closed(self, lease_id: int) -> None: ...


class _NoLog:
    def opened(self, lease_id: int) -> None:
        pass

    def closed(self, lease_id: int) -> None:
        pass


class Admission:
    """What one admitted request holds; settled or released exactly once."""

    __slots__ = ("done", "parts")

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts
        self.done = False

    def reserved(self) -> list[list[int]]:
        """[[lease id, units]] held now (for the journal)."""
        return [[p.lease.id, p.units] for p in self.parts]

    def finals(self) -> list[list[int]]:
        """[[lease id, units]] kept after settling (for the journal)."""
        return [[p.lease.id, p.final if p.final is not None else p.units] for p in self.parts]


@dataclass(slots=True)
class _GrantOp:
    state: KeyState
    item: GrantItem
    future: asyncio.Future[Grant]
    sent: float = 0.0


class Quota:
    """This gateway's side of the fleet-wide limits (see the module doc)."""

    def __init__(
        self, store: QuotaStore, *, gateway: str, incarnation: str, lease_ttl: float = 1.0,
        max_lease: int = 10_000, claim_horizon: float = 0.25, poll_interval: float = 0.05,
        lease_log: LeaseLog | None = None, clock: Any = time.time,
    ) -> None:
        self._store = store
        self.gateway = gateway
        self.incarnation = incarnation
        self.ttl = lease_ttl
        self._max_lease = max_lease
        self._horizon = claim_horizon
        self._poll = poll_interval
        self._log = lease_log or _NoLog()
        self._clock = clock
        self.live = 1  #: live gateways, kept up to date by the heartbeat
        self._states: dict[Key, KeyState] = {}
        self._leases: dict[int, Lease] = {}
        self._grants: list[_GrantOp] = []
        self._claims: dict[Lease, int] = {}
        self._dirty: set[Lease] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.overruns = 0  #: tokens used beyond a reservation (a worker over-reporting)

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._tasks = [asyncio.create_task(self._writer(), name="quota writer"),
                       asyncio.create_task(self._expirer(), name="quota expiry")]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, timeout: float = 3.0) -> None:
        """Give back every unused unit (requests still running keep theirs)."""
        for lease in self._leases.values():
            lease.expired = True
            self._dirty.add(lease)
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._dirty and time.monotonic() < deadline and not self._tasks[0].done():
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._release_dirty(final=True)

    # -- admission -------------------------------------------------------------

    def needs(self, user_id: int, limits: Mapping[str, Any], tokens: int) -> list[tuple[KeyState, int]]:
        """The (key, units) a request needs, for the counters that have a limit."""
        now = self._clock()
        wanted = []
        for counter in COUNTERS:
            limit = limits.get(counter)
            if limit is None:
                continue
            window = window_of(counter, now)
            key = Key(user_id, counter, window.start)
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = KeyState(key, int(limit), window.reset)
            state.limit = int(limit)
            wanted.append((state, tokens if counter == TOKEN_COUNTER else 1))
        return wanted

    async def admit(
        self, user_id: int, limits: Mapping[str, Any], tokens: int, *, deadline: float
    ) -> Admission:
        """Hold what the request needs of every limited counter, or raise `RateLimited`."""
        needs = self.needs(user_id, limits, tokens)
        admission = self._take(needs)
        if admission is None:
            admission = await self._admit_slow(needs, limits, deadline)
        return admission

    def settle(self, admission: Admission, tokens_used: int) -> None:
        """The request is over: keep what it used, give its lease the rest."""
        if admission.done:
            return
        admission.done = True
        for part in admission.parts:
            final = part.units
            if part.lease.key.counter == TOKEN_COUNTER:
                final = self._token_final(part, max(0, tokens_used))
            self._finish(part, final)

    def release(self, admission: Admission) -> None:
        """The request failed before any work was delivered: give everything back."""
        if admission.done:
            return
        admission.done = True
        for part in admission.parts:
            self._finish(part, 0)

    def _token_final(self, part: Part, used: int) -> int:
        if used <= part.units:
            return used
        lease, extra = part.lease, used - part.units
        if not lease.closed and lease.used + extra <= lease.claimed:
            lease.used += extra
            part.units += extra
            return used
        self.overruns += used - part.units
        log.warning("tokens used beyond the reservation", reserved=part.units, used=used)
        return part.units

    def _finish(self, part: Part, final: int) -> None:
        lease = part.lease
        part.final = final
        lease.used -= part.units - final
        lease.holders -= 1
        if lease.expired or (lease.free == 0 and lease.holders == 0):
            self._dirty.add(lease)
            self._wake.set()

    def _take(self, needs: list[tuple[KeyState, int]]) -> Admission | None:
        """Admit from the open leases, all counters or none; no awaiting."""
        for state, n in needs:
            lease = state.lease
            if lease is None or not lease.fits(n):
                return None
        now = time.monotonic()
        parts = []
        for state, n in needs:
            lease = state.lease
            assert lease is not None
            lease.used += n
            lease.holders += 1
            state.note(n, now)
            parts.append(Part(lease, n))
            # Ahead of need, in the background: claim further, top the lease up
            # (or renew it near its end), so that requests rarely wait.
            ahead = state.ahead(self._horizon, n)
            if lease.claimed < lease.units and lease.claiming is None and lease.claimed - lease.used < ahead:
                self._start_claim(lease, lease.used + 2 * ahead)
            if state.granting is None and (lease.free < ahead or lease.expires - now < self.ttl / 4):
                self._start_grant(state, n, background=True)
        return Admission(parts)

    async def _admit_slow(
        self, needs: list[tuple[KeyState, int]], limits: Mapping[str, Any], deadline: float
    ) -> Admission:
        started = time.monotonic()
        wait_until: float | None = None
        for state, n in needs:
            state.waiting += n
        try:
            for _ in range(_MAX_ROUNDS):
                admission = self._take(needs)
                if admission is not None:
                    return admission
                steps = [self._step(state, n) for state, n in needs]
                results = await asyncio.gather(*steps)
                refused = next(((s, n, g) for (s, n), g in zip(needs, results) if g is not None and g.added == 0), None)
                if refused is None:
                    continue
                state, n, grant = refused
                if wait_until is None or self._returning(state.key):
                    wait_until = max(wait_until or 0.0, self._wait_until(state, grant, started, deadline))
                now = time.monotonic()
                if now >= wait_until:
                    raise self._refusal(state, n, limits)
                await asyncio.sleep(min(self._poll, wait_until - now))
            raise Unavailable("the quota could not be settled in time", {"retry_safe": True})
        finally:
            for state, n in needs:
                state.waiting -= n

    async def _step(self, state: KeyState, n: int) -> Grant | None:
        """Make the open lease of `state` fit `n`: claim further, or ask for units."""
        lease = state.lease
        if lease is not None and lease.fits(n):
            return None
        if lease is not None and not lease.expired and lease.free >= n:
            await asyncio.shield(self._start_claim(lease, lease.used + state.ahead(self._horizon, n)))
            return None
        if state.granting is not None:  # someone asked already: see what they got
            await asyncio.shield(state.granting)
            return None
        return await asyncio.shield(self._start_grant(state, n))

    def _wait_until(self, state: KeyState, grant: Grant, started: float, deadline: float) -> float:
        """How long a refused request waits for leases to come back: other
        gateways' (until they expire) and our own that are being trimmed."""
        limit = min(started + self.ttl, deadline - 0.05)
        until = started
        if self._returning(state.key):
            until = time.monotonic() + 2 * self._poll
        if grant.others_units > 0 and grant.others_expiry is not None:
            now = time.monotonic()
            expiry = now + (grant.others_expiry.timestamp() - self._clock())
            until = max(until, max(now, expiry) + 2 * self._poll)
        return min(limit, until)

    def _returning(self, key: Key) -> bool:
        """Units of `key` on their way back from one of our expired leases."""
        return any(l.key == key and l.expired and not l.closed and l.free > 0 for l in self._leases.values())

    def _refusal(self, state: KeyState, n: int, limits: Mapping[str, Any]) -> RateLimited:
        counter = state.key.counter
        facts = self.facts(state.key.user_id, limits)
        retry_after = max(1, math.ceil(state.reset - self._clock()))
        if n > state.limit:
            message = f"this request needs {n} of {counter} but the limit is {state.limit}"
        else:
            message = f"{counter} limit of {state.limit} reached"
        return RateLimited(message, {"retry_after": retry_after, "counter": counter, "rate_limit": facts})

    # -- what callers are told ---------------------------------------------------

    def facts(self, user_id: int, limits: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Limit, remaining and reset of each counter, as this gateway knows them."""
        now = self._clock()
        facts = {}
        for counter in COUNTERS:
            window = window_of(counter, now)
            limit = limits.get(counter)
            if limit is None:
                facts[counter] = {"limit": None, "remaining": None, "reset": window.reset}
                continue
            state = self._states.get(Key(user_id, counter, window.start))
            remaining = state.remaining() if state is not None else int(limit)
            facts[counter] = {"limit": int(limit), "remaining": min(remaining, int(limit)), "reset": window.reset}
        return facts

    async def snapshot(self, user_id: int, limits: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """`facts`, with the fleet-wide count read from the database now."""
        now = self._clock()
        windows = {c: window_of(c, now) for c in COUNTERS if limits.get(c) is not None}
        granted = await self._store.counters(user_id, [(c, w.start) for c, w in windows.items()])
        for counter, window in windows.items():
            state = self._states.get(Key(user_id, counter, window.start))
            if state is not None:
                state.granted = granted.get(counter, 0)
            else:
                limit = int(limits[counter])
                self._states[Key(user_id, counter, window.start)] = KeyState(
                    Key(user_id, counter, window.start), limit, window.reset, granted=granted.get(counter, 0))
        return self.facts(user_id, limits)

    # -- talking to the database (one writer) --------------------------------------

    def _start_grant(self, state: KeyState, n: int, *, background: bool = False) -> asyncio.Future[Grant]:
        """Ask for units: more for the open lease (`top_up`) while it has a while
        to live, else a new lease. In the `background` the open lease serves
        on until the answer; otherwise it cannot serve and is retired now."""
        lease = state.lease
        now = time.monotonic()
        top_up = lease is not None and not lease.expired and lease.expires - now > self.ttl / 2
        if lease is not None and not top_up and not background and not lease.expired:
            lease.expired = True
            self._dirty.add(lease)
        have = lease.free if top_up and lease is not None else 0
        ahead = state.ahead(self._horizon, n)
        need = max(1, n - have)
        used = lease.used if top_up and lease is not None else 0
        # Room for `max_lease` requests (the database cuts it to a share of
        # what is left), but claimed only `ahead` of use: what a crash strands.
        item = GrantItem(
            state.key.user_id, state.key.counter, state.key.window_start, state.limit, need,
            max(need, self._max_lease * n), lease.id if top_up and lease is not None else None,
            used + max(n, 2 * ahead),
        )
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        state.granting = future
        self._grants.append(_GrantOp(state, item, future))
        self._wake.set()
        return future

    def _start_claim(self, lease: Lease, target: int) -> asyncio.Future[None]:
        if lease.claiming is not None:
            return lease.claiming
        lease.claiming = asyncio.get_running_loop().create_future()
        self._claims[lease] = min(lease.units, target)
        self._wake.set()
        return lease.claiming

    async def _writer(self) -> None:
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
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                self._wake.set()
            except Exception:  # a bug or a refused statement: keep the writer alive
                log.exception("quota writer failed; retrying")
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                self._wake.set()

    async def _write_grants(self) -> None:
        ops, self._grants = self._grants, []
        if not ops:
            return
        ops.sort(key=lambda op: (op.item.user_id, op.item.counter, op.item.window_start))
        for op in ops:  # claim from where the lease is now, not where it was when asked
            lease = op.state.lease
            if op.item.lease_id is not None and lease is not None and lease.id == op.item.lease_id:
                ahead = op.state.ahead(self._horizon, op.item.need)
                op.item = replace(op.item, claim=max(op.item.claim, lease.used + 2 * ahead))
        sent = time.monotonic()
        try:
            grants = await self._store.grant(self.gateway, self.incarnation, self.ttl, self.live,
                                             [op.item for op in ops])
        except Exception as exc:
            for op in ops:
                op.state.granting = None
                if not op.future.done():
                    op.future.set_exception(exc if isinstance(exc, Unavailable) else Unavailable(str(exc)))
                    op.future.exception()  # retrieved: a waiter may have been cancelled
            if isinstance(exc, Unavailable):
                return
            raise
        for op, grant in zip(ops, grants):
            self._apply_grant(op, grant, sent)

    def _apply_grant(self, op: _GrantOp, grant: Grant, sent: float) -> None:
        state = op.state
        state.granted = grant.granted
        state.granting = None
        if grant.added > 0 and grant.lease_id is not None:
            lease = state.lease
            if lease is not None and lease.id == grant.lease_id:
                lease.units, lease.claimed = grant.units, max(lease.claimed, grant.claimed)
            else:
                if lease is not None and not lease.expired:
                    lease.expired = True
                    self._dirty.add(lease)
                # Given back well before the database says it expires, so a request
                # of another gateway waiting (at most a TTL) for it sees it come back.
                expires = sent + self.ttl * 0.8
                lease = Lease(grant.lease_id, state.key, grant.units, grant.claimed, expires)
                self._leases[lease.id] = lease
                state.lease = lease
                self._log.opened(lease.id)
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
                future, lease.claiming = lease.claiming, None
                if future is not None and not future.done():
                    future.set_exception(exc if isinstance(exc, Unavailable) else Unavailable(str(exc)))
                    future.exception()
            if isinstance(exc, Unavailable):
                return
            raise
        for answer in answers:
            lease = leases[answer.lease_id]
            lease.claimed = max(lease.claimed, min(answer.claimed, lease.units))
            if answer.orphaned and not lease.expired:  # a janitor took us for dead: stop using it
                lease.expired = True
                self._dirty.add(lease)
        for lease in claims:
            future, lease.claiming = lease.claiming, None
            if lease.id not in {a.lease_id for a in answers}:  # gone: closed meanwhile
                lease.expired = True
            if future is not None and not future.done():
                future.set_result(None)

    async def _release_dirty(self, *, final: bool = False) -> None:
        dirty, self._dirty = self._dirty, set()
        batch: list[tuple[Lease, int, bool]] = []
        for lease in sorted(dirty, key=lambda l: (l.key.user_id, l.key.counter, l.key.window_start, l.id)):
            if lease.closed:
                continue
            if not lease.expired and lease.free == 0 and lease.holders == 0:
                lease.expired = True  # used up and settled: nothing will ever come back
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
            answer = returned.get(lease.id)
            state = self._states.get(lease.key)
            if answer is not None and state is not None:
                state.granted = answer.granted
            if close or answer is None:
                self._close(lease, state)
            else:
                lease.units, lease.claimed = used, min(lease.claimed, used)

    def _close(self, lease: Lease, state: KeyState | None) -> None:
        lease.closed = lease.expired = True
        self._leases.pop(lease.id, None)
        if state is not None and state.lease is lease:
            state.lease = None
        self._log.closed(lease.id)

    async def _expirer(self) -> None:
        period = max(0.01, min(0.1, self.ttl / 8))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for lease in self._leases.values():
                if not lease.expired and now >= lease.expires:
                    lease.expired = True
                    self._dirty.add(lease)
            if self._dirty:
                self._wake.set()
            if len(self._states) > 10_000:
                self._forget_idle()

    def _forget_idle(self) -> None:
        idle = [k for k, s in self._states.items() if s.lease is None and s.granting is None and s.waiting == 0]
        for key in idle:
            del self._states[key]

    # -- after a crash ---------------------------------------------------------------

    async def recover(self, prior: list[PriorLease], used: Mapping[int, int], known: set[int]) -> int:
        """Close this gateway's leases from an earlier run; the units given back.

        A lease the journal knows (`known`) keeps exactly what its requests
        used; one it does not know keeps its `claimed` mark (what was possibly
        used), as a janitor would."""
        if not prior:
            return 0
        ids = [p.lease_id for p in prior]
        kept = [used.get(p.lease_id, 0) if p.lease_id in known else p.claimed for p in prior]
        answers = await self._store.release(ids, kept, [True] * len(ids))
        total = sum(a.returned for a in answers)
        log.info("leases of an earlier run closed", leases=len(answers), returned=total)
        return total
