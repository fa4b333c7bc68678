"""The one owner of a gateway's lease state: the per-key states and the open leases.

Who owns what (README.md, "Limits"):

* `LeaseBook` (here) holds the `KeyState` of every key and every open
  `Lease`, and is the only code that changes their fields (and a request's
  `Part`s): through the named methods below. It tells the `LeaseLog` (the
  journal) when a lease opens and closes.
* `Quota` (admission.py) decides: it admits, settles and waits, and reads the
  states and leases; every change goes through the book.
* `LeaseWriter` (writer.py) talks to the database and applies its answers
  through the book; the queues of grants, claims and leases to give back
  are its own.

Everything here runs on the event loop, without awaiting: each method leaves
the state consistent.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from typing import Any, Protocol

from services.gateway.quota.leases import Key, KeyState, Lease, Part
from services.gateway.store import Grant, Released

__all__ = ["LeaseBook", "LeaseLog"]

_FORGET_ABOVE = 10_000  #: idle key states kept at most


class LeaseLog(Protocol):
    """Where the journal hears about leases (for exact recovery after a crash)."""

    def opened(self, lease_id: int) -> None: ...

    def closed(self, lease_id: int) -> None: ...


class _NoLog:
    def opened(self, lease_id: int) -> None:
        pass

    def closed(self, lease_id: int) -> None:
        pass


class LeaseBook:
    """Per-key states and open leases of one gateway (see the module doc)."""

    def __init__(self, lease_log: LeaseLog | None = None, clock: Callable[[], float] = time.time) -> None:
        self._states: dict[Key, KeyState] = {}
        self._leases: dict[int, Lease] = {}
        self._due: list[tuple[float, int]] = []  #: (expires, lease id), a heap; stale entries skipped
        self._log = lease_log or _NoLog()
        self._clock = clock  #: the quota's clock: when a count was seen (rolling counters drain by it)

    # -- reading ---------------------------------------------------------------

    def state(self, key: Key) -> KeyState | None:
        return self._states.get(key)

    def leases(self) -> list[Lease]:
        """The open leases (a copy: safe to change the book while going through it)."""
        return list(self._leases.values())

    def returning(self, key: Key) -> bool:
        """Units of `key` on their way back from one of our expired leases."""
        return any(l.key == key and l.expired and not l.closed and l.free > 0 for l in self._leases.values())

    # -- the admission side ------------------------------------------------------

    def key_state(self, key: Key, limit: int, reset: int) -> KeyState:
        """The state of `key` (made if new), with the caller's current `limit`."""
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = KeyState(key, limit, reset)
        state.set_limit(limit)
        return state

    def saw_granted(self, key: Key, limit: int, reset: int, granted: int) -> None:
        """The fleet-wide count of `key`, read from the database."""
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = KeyState(key, limit, reset)
        state.set_limit(limit)
        state.granted, state.seen_at = granted, self._clock()

    def take(self, state: KeyState, n: int, now: float) -> Part:
        """Hold `n` units of the open lease of `state` (the caller checked it fits)."""
        lease = state.lease
        assert lease is not None
        lease.used += n
        lease.holders += 1
        state.note(n, now)
        return Part(lease, n)

    def stretch(self, part: Part, extra: int) -> bool:
        """Hold `extra` more units for `part`, if its lease has them claimed."""
        lease = part.lease
        if not lease.closed and lease.used + extra <= lease.claimed:
            lease.used += extra
            part.units += extra
            return True
        return False

    def finish(self, part: Part, final: int) -> bool:
        """`part` keeps `final` units and gives its lease the rest; True if the
        lease may now have units to give back to the database."""
        lease = part.lease
        part.final = final
        lease.used -= part.units - final
        lease.holders -= 1
        return lease.expired or (lease.free == 0 and lease.holders == 0)

    def wait(self, state: KeyState, n: int) -> None:
        """A request waits for `n` units of `state` (`n` < 0: it stopped waiting)."""
        state.waiting += n

    # -- the database side ---------------------------------------------------------

    def retire(self, lease: Lease) -> bool:
        """`lease` admits nothing more; True if it still did until now."""
        if lease.expired:
            return False
        lease.expired = True
        return True

    def expire_due(self, now: float) -> list[Lease]:
        """Retire the leases whose time is up; those retired."""
        due = []
        while self._due and self._due[0][0] <= now:
            _, lease_id = heapq.heappop(self._due)
            lease = self._leases.get(lease_id)
            if lease is not None and not lease.expired and now >= lease.expires:
                lease.expired = True
                due.append(lease)
        return due

    def recalled(self, lease_ids: list[int]) -> list[Lease]:
        """Long leases the database recalled (their keys near their limits) admit
        nothing more; those retired now (to give back)."""
        retired = []
        for lease_id in lease_ids:
            lease = self._leases.get(lease_id)
            if lease is not None:
                lease.long = False
                if self.retire(lease):
                    retired.append(lease)
        return retired

    def granting(self, state: KeyState, future: asyncio.Future[Any] | None) -> None:
        """A grant for `state` is on its way (`future`), or no longer (None)."""
        state.granting = future

    def granted(self, state: KeyState, grant: Grant, expires: float) -> Lease | None:
        """Apply the database's answer to a grant: top the open lease up, or open
        a new one (living until `expires`, monotonic: a long lease's time if the
        grant says `long`). A long lease topped up as a short one (recalled) lives
        until `expires` at most. The lease it retired, if any."""
        state.granted, state.seen_at = grant.granted, self._clock()
        state.granting = None
        retired = None
        if grant.added > 0 and grant.lease_id is not None:
            lease = state.lease
            if lease is not None and lease.id == grant.lease_id:
                lease.units, lease.claimed = grant.units, max(lease.claimed, grant.claimed)
                if lease.long and not grant.long:
                    lease.long = False
                    self._expire_at(lease, min(lease.expires, expires))
            else:
                if lease is not None and self.retire(lease):
                    retired = lease
                lease = Lease(grant.lease_id, state.key, grant.units, grant.claimed, expires, grant.long)
                self._leases[lease.id] = lease
                self._expire_at(lease, expires)
                state.lease = lease
                self._log.opened(lease.id)
        return retired

    def _expire_at(self, lease: Lease, expires: float) -> None:
        lease.expires = expires
        heapq.heappush(self._due, (expires, lease.id))

    def claiming(self, lease: Lease, future: asyncio.Future[None]) -> None:
        lease.claiming = future

    def claimed(self, lease: Lease, claimed: int, orphaned: bool) -> bool:
        """The database's claimed mark of `lease`; True if the lease was retired
        now because a janitor took us for dead (stop using it)."""
        lease.claimed = max(lease.claimed, min(claimed, lease.units))
        return orphaned and self.retire(lease)

    def claim_over(self, lease: Lease, *, gone: bool = False) -> asyncio.Future[None] | None:
        """No claim of `lease` is on its way any more; the future of the last one.
        A lease `gone` from the database (closed meanwhile) admits nothing more."""
        future, lease.claiming = lease.claiming, None
        if gone:
            lease.expired = True
        return future

    def gave_back(self, lease: Lease, answer: Released | None, *, close: bool, used: int) -> None:
        """The database took back what `lease` does not use (`answer`; None: the
        lease was gone); a lease closed, or cut to `used`."""
        state = self._states.get(lease.key)
        if answer is not None and state is not None:
            state.granted, state.seen_at = answer.granted, self._clock()
        if close or answer is None:
            lease.closed = lease.expired = True
            self._leases.pop(lease.id, None)
            if state is not None and state.lease is lease:
                state.lease = None
            self._log.closed(lease.id)
        else:
            lease.units, lease.claimed = used, min(lease.claimed, used)

    def forget_idle(self) -> None:
        """Past `_FORGET_ABOVE` key states, drop those with nothing going on."""
        if len(self._states) <= _FORGET_ABOVE:
            return
        idle = [k for k, s in self._states.items() if s.lease is None and s.granting is None and s.waiting == 0]
        for key in idle:
            del self._states[key]
