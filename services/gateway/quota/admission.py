"""Limits exact across any number of gateways, mostly without the database.

    quota = Quota(store, gateway="3fa0…", incarnation="9c1e…")
    async with quota:
        scopes = [Scope("u:42", {"requests_per_hour": 100}), Scope("k:7", {"spend_per_month": 10**10})]
        admission = await quota.admit(scopes, tokens=300, spend=0, deadline=d)   # or RateLimited
        ...                                                 # the work
        quota.settle(admission, tokens_used=120, spend_used=0)  # or quota.release(admission) if it failed

A request needs units of every limited counter of every scope it answers to
(its key, its user, its organisation): 1 of each request counter, its token
reservation of `tokens_per_month`, its worst-case cost of each money counter
(units of 1e-10, leases.py) -- so the tighter limit always binds.

Requests are admitted from local leases (blocks of units the database
granted this gateway) without waiting, from every limited counter or none.
The database is asked (through the `LeaseWriter`, in the background as a
rule) to top leases up and renew them, to raise a lease's `claimed` mark
ahead of use, and to take unused units back. A request the database refuses
waits -- at most a lease TTL, within its deadline -- for other gateways'
leases to come back before it is `RATE_LIMITED` (plus a heartbeat, for long
leases recalled by the refusal). The design and its
guarantees are in README.md, "Limits". The per-key states and the leases
belong to the `LeaseBook` (book.py): `Quota` reads them and changes them
only through it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Self

from shared.errors import RateLimited, Unavailable
from shared.logging import get_logger
from services.gateway.quota.book import LeaseBook, LeaseLog
from services.gateway.quota.leases import COUNTERS, Key, KeyState, Part, money_text, window_of
from services.gateway.quota.writer import LeaseWriter
from services.gateway.store import Grant, QuotaStore

__all__ = ["Admission", "Quota", "Scope"]

log = get_logger(__name__)

_MAX_ROUNDS = 500  # of the slow path: each round waits on the database or `poll_interval`
_SCOPES = {"u": "user", "k": "key", "o": "org"}


class Scope(NamedTuple):
    """Whom a request answers to (a subject, leases.py's `subject_of`) and its limits:
    counter -> limit in the counter's units (money in units of 1e-10), None for none."""

    subject: str
    limits: Mapping[str, int | None]

    @property
    def name(self) -> str:
        """"user", "key" or "org"."""
        return _SCOPES.get(self.subject[0], self.subject)


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


class Quota:
    """This gateway's side of the fleet-wide limits (see the module doc)."""

    def __init__(
        self, store: QuotaStore, *, gateway: str, incarnation: str, lease_ttl: float = 1.0,
        max_lease: int = 10_000, claim_horizon: float = 0.25, poll_interval: float = 0.05,
        long_lease_ttl: float = 0.0, long_lease_ahead: int = 8, recall_wait: float = 1.0,
        lease_log: LeaseLog | None = None, clock: Any = time.time,
    ) -> None:
        self._store = store
        self.gateway = gateway
        self.incarnation = incarnation
        self.ttl = lease_ttl
        self._horizon = claim_horizon
        self._poll = poll_interval
        self._clock = clock
        # A refusal recalls long leases; their owners hear of it within a heartbeat (`recall_wait`).
        self._recall_wait = recall_wait if long_lease_ttl > 0 else 0.0
        self._book = LeaseBook(lease_log, clock)
        self._writer = LeaseWriter(store, self._book, gateway=gateway, incarnation=incarnation,
                                   ttl=lease_ttl, max_lease=max_lease, horizon=claim_horizon,
                                   long_ttl=long_lease_ttl, long_ahead=long_lease_ahead, recall=recall_wait,
                                   clock=clock)
        self.overruns = 0  #: tokens used beyond a reservation (a worker over-reporting)

    @property
    def live(self) -> int:
        """Live gateways (see `set_live`): leases are a 1/(4 x live) share."""
        return self._writer.live

    def set_live(self, count: int) -> None:
        """How many gateways are live (the heartbeat's `Fleet(on_live=)`)."""
        self._writer.live = count

    def recalled(self, lease_ids: list[int]) -> None:
        """Long leases of ours the database recalled (the heartbeat's `Fleet(on_recalled=)`)."""
        self._writer.recalled(lease_ids)

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._writer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def halt(self) -> None:
        """Stop dead, giving nothing back (`kill -9`, for the fault tests)."""
        self._writer.halt()

    async def close(self, timeout: float = 3.0) -> None:
        """Give back every unused unit (requests still running keep theirs)."""
        await self._writer.stop(timeout)

    # -- admission -------------------------------------------------------------

    def needs(self, scopes: Sequence[Scope], tokens: int, spend: int = 0) -> list[tuple[KeyState, int]]:
        """The (key, units) a request needs, for the counters that have a limit (a money
        counter only when the request costs something)."""
        now = self._clock()
        wanted = []
        for scope in scopes:
            for name, counter in COUNTERS.items():
                limit = scope.limits.get(name)
                n = 1 if counter.unit == "requests" else tokens if counter.unit == "tokens" else spend
                if limit is None or n <= 0:
                    continue
                window = window_of(name, now)
                state = self._book.key_state(Key(scope.subject, name, window.start), int(limit), window.reset)
                wanted.append((state, n))
        return wanted

    async def admit(self, scopes: Sequence[Scope], tokens: int, *, spend: int = 0, deadline: float) -> Admission:
        """Hold what the request needs of every limited counter, or raise `RateLimited`."""
        needs = self.needs(scopes, tokens, spend)
        admission = self._take(needs)
        if admission is None:
            admission = await self._admit_slow(needs, scopes, deadline)
        return admission

    def settle(self, admission: Admission, tokens_used: int, spend_used: int = 0) -> None:
        """The request is over: keep what it used, give its lease the rest."""
        if admission.done:
            return
        admission.done = True
        for part in admission.parts:
            unit = COUNTERS[part.lease.key.counter].unit
            final = part.units
            if unit != "requests":
                final = self._final(part, max(0, tokens_used if unit == "tokens" else spend_used))
            self._finish(part, final)

    def release(self, admission: Admission) -> None:
        """The request failed before any work was delivered: give everything back."""
        if admission.done:
            return
        admission.done = True
        for part in admission.parts:
            self._finish(part, 0)

    def _final(self, part: Part, used: int) -> int:
        """What a part of tokens or money keeps: what was used, within what its lease has claimed."""
        if used <= part.units:
            return used
        if self._book.stretch(part, used - part.units):
            return used
        self.overruns += used - part.units
        log.warning("used beyond the reservation", counter=part.lease.key.counter, reserved=part.units, used=used)
        return part.units

    def _finish(self, part: Part, final: int) -> None:
        if self._book.finish(part, final):
            self._writer.dirty(part.lease)

    def _take(self, needs: list[tuple[KeyState, int]]) -> Admission | None:
        """Admit from the open leases, all counters or none; no awaiting."""
        for state, n in needs:
            lease = state.lease
            if lease is None or not lease.fits(n):
                return None
        now = time.monotonic()
        parts = []
        for state, n in needs:
            part = self._book.take(state, n, now)
            lease = part.lease
            parts.append(part)
            # Ahead of need, in the background: claim further, top the lease up
            # (or renew it near its end), so that requests rarely wait.
            ahead = state.ahead(self._horizon, n)
            spare, reach = lease.claimed - lease.used, self._writer.reach(lease, ahead, n)
            # Claim again with less than `ahead` claimed left; a long lease (far from
            # its limit) asks earlier, at half its reach, riding on the next turn.
            if lease.claimed < lease.units and (spare < ahead or (lease.long and spare < reach // 2)):
                self._writer.claim(lease, lease.used + reach, urgent=spare < ahead)
            if state.granting is None and (lease.free < ahead or lease.expires - now < self.ttl / 4):
                self._writer.grant(state, n, background=True)
        return Admission(parts)

    async def _admit_slow(
        self, needs: list[tuple[KeyState, int]], scopes: Sequence[Scope], deadline: float
    ) -> Admission:
        started = time.monotonic()
        wait_until: float | None = None
        for state, n in needs:
            self._book.wait(state, n)
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
                if wait_until is None or self._book.returning(state.key):
                    wait_until = max(wait_until or 0.0, self._wait_until(state, grant, started, deadline))
                now = time.monotonic()
                if now >= wait_until:
                    raise self._refusal(state, n, scopes)
                await asyncio.sleep(min(self._poll, wait_until - now))
            raise Unavailable("the quota could not be settled in time", {"retry_safe": True})
        finally:
            for state, n in needs:
                self._book.wait(state, -n)

    async def _step(self, state: KeyState, n: int) -> Grant | None:
        """Make the open lease of `state` fit `n`: claim further, or ask for units."""
        lease = state.lease
        if lease is not None and lease.fits(n):
            return None
        if lease is not None and not lease.expired and lease.free >= n:
            await asyncio.shield(self._writer.claim(lease, lease.used + state.ahead(self._horizon, n)))
            return None
        if state.granting is not None:  # someone asked already: see what they got
            await asyncio.shield(state.granting)
            return None
        return await asyncio.shield(self._writer.grant(state, n))

    def _wait_until(self, state: KeyState, grant: Grant, started: float, deadline: float) -> float:
        """How long a refused request waits for leases to come back: other
        gateways' (until they expire) and our own that are being trimmed."""
        limit = min(started + self.ttl + self._recall_wait, deadline - 0.05)
        until = started
        if self._book.returning(state.key):
            until = time.monotonic() + 2 * self._poll
        if grant.others_units > 0 and grant.others_expiry is not None:
            now = time.monotonic()
            expiry = now + (grant.others_expiry.timestamp() - self._clock())
            until = max(until, max(now, expiry) + 2 * self._poll)
        return min(limit, until)

    def _refusal(self, state: KeyState, n: int, scopes: Sequence[Scope]) -> RateLimited:
        counter = state.key.counter
        now = self._clock()
        scope = next((sc.name for sc in scopes if sc.subject == state.key.subject), state.key.subject)
        whose = f"the {scope}'s {counter}"
        if COUNTERS[counter].unit == "money":
            left = state.remaining(now)
            message = (f"{whose} budget of {money_text(state.limit)} has {money_text(left)} left; this request "
                       f"may cost up to {money_text(n)} (its prompt and max_tokens at the model's prices)")
        elif n > state.limit:
            message = f"this request needs {n} of {whose} but the limit is {state.limit}"
        else:
            message = f"{whose} limit of {state.limit} reached"
        return RateLimited(message, {"retry_after": state.retry_after(n, now), "counter": counter, "scope": scope,
                                     "rate_limit": self.facts(scopes)})

    # -- what callers are told ---------------------------------------------------

    def facts(self, scopes: Sequence[Scope]) -> dict[str, dict[str, Any]]:
        """Limit, remaining and reset of each counter, as this gateway knows them: of
        the scope with the least left (its `scope`). Money as decimal strings."""
        now = self._clock()
        facts = {}
        for name, counter in COUNTERS.items():
            window = window_of(name, now)
            best: tuple[int, int, int, str] | None = None  # remaining, limit, reset, scope
            for scope in scopes:
                limit = scope.limits.get(name)
                if limit is None:
                    continue
                state = self._book.state(Key(scope.subject, name, window.start))
                if state is None:
                    fact = (int(limit), int(limit), now if counter.rolling else window.reset, scope.name)
                else:
                    fact = (min(state.remaining(now), int(limit)), int(limit), state.reset_at(now), scope.name)
                if best is None or fact[0] < best[0]:
                    best = fact
            if best is None:
                reset = int(now) if counter.rolling else window.reset
                facts[name] = {"limit": None, "remaining": None, "reset": reset}
            elif counter.unit == "money":
                facts[name] = {"limit": money_text(best[1]), "remaining": money_text(best[0]),
                               "reset": int(best[2]), "scope": best[3]}
            else:
                facts[name] = {"limit": best[1], "remaining": best[0], "reset": int(best[2]), "scope": best[3]}
        return facts

    async def snapshot(self, scopes: Sequence[Scope]) -> dict[str, dict[str, Any]]:
        """`facts`, with the fleet-wide counts read from the database now."""
        now = self._clock()
        for scope in scopes:
            windows = {c: window_of(c, now) for c in COUNTERS if scope.limits.get(c) is not None}
            if not windows:
                continue
            granted = await self._store.counters(scope.subject, [(c, w.start) for c, w in windows.items()], now)
            for counter, window in windows.items():
                self._book.saw_granted(Key(scope.subject, counter, window.start), int(scope.limits[counter] or 0),
                                       window.reset, granted.get(counter, 0))
        return self.facts(scopes)
