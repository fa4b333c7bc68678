"""Slowing down password guessing: each attempt is reserved before it is hashed.

Attempts are counted in PostgreSQL (`login_failures`), so every auth instance
sees the same counts and a restart forgets nothing. The count is taken
*before* the Argon2 check, in one transaction that holds the rows: an attempt
first reserves its place (counted as a failure until it proves otherwise), and
only an attempt that got a reservation is hashed. Concurrent guesses therefore
queue on the account's row, and once the account is locked the rest are
refused without any hash.

Subjects, each with its own count and lock:

* the **account**: `user:<id>`, or `name:<what was typed>` when no such account
  exists (behaving identically, so the throttle tells nothing about which
  accounts exist). It never depends on the source: a guesser rotating CURVE
  keys or addresses still draws from the same count. `account_free_failures`
  attempts are free; each further one locks the account for `base_delay`,
  doubling up to `max_delay`, from the moment it is reserved.
* the **caller**: the HTTP client address a mesh member (the web service)
  vouches for, or a direct caller's own address as its TCP connection shows
  it (`addr:`, an IPv6 client by its /64), else -- a direct caller on the
  same host -- its CurveZMQ key (`peer:`). It spans accounts (`caller_free_failures`, then the
  same doubling), and always binds.
* the **pair** of a vouched address and an account. It never locks; it only
  says whether that address has an attempt on that account not yet proved good.

The rule for the owner: an account's lock binds every caller except a vouched
address with no such attempt on that account (its pair is clean). That address
gets one attempt through the lock -- which, if wrong, makes its pair dirty and
binds it too. A CURVE key costs nothing to make, so a direct caller never gets
through a locked account; its owner logs in through the web from any address
that has not failed on the account, or waits for the lock (at most `max_delay`).

A right password gives its reservation back everywhere (its count, and the
lock it set if nobody changed it since); from a vouched address it also
forgives that address's other attempts on the account and makes it clean
again. Attempts from elsewhere stay counted -- an owner's login, through the
lock or not, never reopens the account to guessers -- until a quiet `window`
resets the count; rows quiet that long are deleted.

Each instance also remembers the locks PostgreSQL has shown it (`remember`
entries at most) and refuses attempts that bear one without asking again. It
is only a cache of what the database said: losing it costs a query, never a
wrong verdict (at worst, a lock that another instance gave back is still
honoured here until it would have ended). The SQL lives here rather than in store.py because the decision
is the policy's and must be made while the rows are held.
"""

from __future__ import annotations

import ipaddress
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from shared.db import unavailable_when_down
from shared.errors import RateLimited
from services.auth.store import AuthStore

__all__ = ["ThrottlePolicy", "LoginThrottle", "Subject", "Attempt", "Reservation", "source_of"]

#: A pair never locks: its count only says whether it is clean.
_NEVER = 2**31 - 1
_REMEMBER = 10_000
_PRUNE_EVERY = 60.0

# Rows are always taken in the order of their names, so attempts never deadlock.
# The upsert creates missing rows and locks existing ones (even from a prune)
# in one statement, returning them as they are once held.
_HOLD_NEW = (
    "INSERT INTO login_failures AS f (subject, failures, last_failure, locked_until) "
    "SELECT s, 0, now(), now() FROM unnest($1::text[]) AS s ORDER BY s "
    "ON CONFLICT (subject) DO UPDATE SET subject = f.subject "
    "RETURNING subject, failures, last_failure, locked_until, clock_timestamp() AS now"
)
_HOLD = (
    "SELECT subject, failures FROM login_failures WHERE subject = ANY($1::text[]) "
    "ORDER BY subject FOR UPDATE"
)
_RESERVE = (
    "UPDATE login_failures f SET failures = r.failures, last_failure = $4, locked_until = r.locked_until "
    "FROM unnest($1::text[], $2::int[], $3::timestamptz[]) AS r(subject, failures, locked_until) "
    "WHERE f.subject = r.subject"
)
# Undo a reservation: one attempt less, and its lock gone unless someone else's replaced it.
_GIVE_BACK = (
    "UPDATE login_failures f SET failures = greatest(f.failures - 1, 0), "
    "locked_until = CASE WHEN f.locked_until = r.mine THEN r.before ELSE f.locked_until END "
    "FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS r(subject, before, mine) "
    "WHERE f.subject = r.subject"
)
# A right password from a vouched address: its other attempts on the account are forgiven.
_FORGIVE = "UPDATE login_failures SET failures = greatest(failures - $2, 0) WHERE subject = $1"
_FORGET_PAIR = "DELETE FROM login_failures WHERE subject = $1"
_PRUNE = (  # SKIP LOCKED: never waits for (nor deadlocks with) an attempt holding a row
    "DELETE FROM login_failures WHERE subject IN (SELECT subject FROM login_failures "
    "WHERE last_failure < now() - make_interval(secs => $1) AND locked_until < now() "
    "FOR UPDATE SKIP LOCKED)"
)


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    account_free_failures: int = 5
    caller_free_failures: int = 20
    base_delay: float = 1.0
    max_delay: float = 300.0
    window: float = 900.0

    def delay(self, failures: int, free: int) -> float:
        """Seconds to lock when the `failures`-th attempt is reserved."""
        if failures <= free:
            return 0.0
        return min(self.max_delay, self.base_delay * 2 ** min(failures - free - 1, 30))


@dataclass(frozen=True, slots=True)
class Subject:
    """Something attempts are counted for, and how many it gets free."""

    name: str  #: "user:42", "name:alice", "peer:<z85>", "addr:203.0.113.9", "pair:addr:...|user:42"
    free: int


@dataclass(frozen=True, slots=True)
class Attempt:
    """One login attempt: the account, where it comes from, and the pair of both."""

    account: Subject
    caller: Subject | None = None  #: None: a member that named no client
    pair: Subject | None = None  #: only for an address a member vouches for

    @property
    def subjects(self) -> list[Subject]:
        found = [self.account, self.caller, self.pair]
        return sorted((s for s in found if s is not None), key=lambda s: s.name)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What `reserve` changed, so that it can be given back."""

    attempt: Attempt
    names: list[str]
    before: list[datetime]  #: each subject's lock before this attempt
    mine: list[datetime]  #: ... and after it (the same when it set none)


def source_of(client_addr: str) -> str:
    """The subject name of an HTTP client address: an IPv6 client by its /64."""
    try:
        ip = ipaddress.ip_address(client_addr)
    except ValueError:
        return f"addr:{client_addr}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"addr:{ip.ipv4_mapped}"
        return f"addr:{ipaddress.IPv6Network((ip.packed, 64), strict=False)}"
    return f"addr:{ip}"


def _locked(seconds: float) -> RateLimited:
    retry_after = max(1, math.ceil(seconds))
    return RateLimited(f"too many failed logins; retry in {retry_after}s",
                       {"retry_after": retry_after, "reason": "locked"})


@unavailable_when_down()
class LoginThrottle:
    """Reserves attempts before they are hashed; refuses those of locked subjects."""

    def __init__(self, store: AuthStore, policy: ThrottlePolicy | None = None, *,
                 remember: int = _REMEMBER) -> None:
        self._store = store
        self.policy = policy or ThrottlePolicy()
        #: subject -> time.monotonic() until which attempts bearing it are refused here.
        self._locks: dict[str, float] = {}
        self._remember = remember
        self._next_prune = time.monotonic() + _PRUNE_EVERY

    def attempt(self, user_id: int | None, identifier: str, *, addr: str | None = None,
                peer: str | None = None) -> Attempt:
        """The subjects of a login: `addr` a member vouches for, else a caller's `peer` key."""
        name = f"user:{user_id}" if user_id is not None else f"name:{identifier.lower()}"
        account = Subject(name, self.policy.account_free_failures)
        if addr is not None:
            caller = Subject(source_of(addr), self.policy.caller_free_failures)
            return Attempt(account, caller, Subject(f"pair:{caller.name}|{name}", _NEVER))
        if peer is not None:
            return Attempt(account, Subject(f"peer:{peer}", self.policy.caller_free_failures))
        # A member naming no client: every member shares one key, so counting
        # it would lock out everyone at once.
        return Attempt(account)

    async def reserve(self, attempt: Attempt) -> Reservation:
        """Count this attempt now, before any hash; `RateLimited` (with `retry_after`) while locked."""
        wait = self._remembered(attempt)
        if wait > 0:
            raise _locked(wait)
        await self._maybe_prune()
        subjects = attempt.subjects
        names = [s.name for s in subjects]
        async with self._store.pool.acquire() as conn, conn.transaction():
            rows = {r["subject"]: r for r in await conn.fetch(_HOLD_NEW, names)}
            now = max(r["now"] for r in rows.values())
            counts = {n: self._count(rows[n], now) for n in names}
            wait = self._lock_binding(attempt, rows, counts, now)
            if wait > 0:
                raise _locked(wait)  # rolls back: a refused attempt leaves nothing behind
            before = [rows[n]["locked_until"] for n in names]
            mine = [self._lock_after(s, counts[s.name] + 1, rows[s.name]["locked_until"], now)
                    for s in subjects]
            await conn.execute(_RESERVE, names, [counts[n] + 1 for n in names], mine, now)
        return Reservation(attempt, names, before, mine)

    async def release(self, held: Reservation) -> None:
        """The attempt got no verdict (say, no room to hash it): it does not count."""
        await self._give_back(held, clear=False)

    async def succeeded(self, held: Reservation) -> None:
        """The right password: give the reservation back and clear what it proves clean."""
        await self._give_back(held, clear=True)

    async def _give_back(self, held: Reservation, *, clear: bool) -> None:
        pair = held.attempt.pair
        async with self._store.pool.acquire() as conn, conn.transaction():
            rows = {r["subject"]: r for r in await conn.fetch(_HOLD, held.names)}
            await conn.execute(_GIVE_BACK, held.names, held.before, held.mine)
            if clear and pair is not None and pair.name in rows:
                others = rows[pair.name]["failures"] - 1  # besides this one, given back above
                await conn.execute(_FORGIVE, held.attempt.account.name, others)
                await conn.execute(_FORGET_PAIR, pair.name)
        self._forget(held.names)

    # -- the decision, made while the rows are held -------------------------------------

    def _count(self, row: asyncpg.Record, now: datetime) -> int:
        quiet = row["last_failure"] < now - timedelta(seconds=self.policy.window)
        return 0 if quiet else row["failures"]

    def _lock_binding(self, attempt: Attempt, rows: dict[str, asyncpg.Record],
                      counts: dict[str, int], now: datetime) -> float:
        """Seconds until no lock binds this attempt (0: none does); remembers what it saw."""
        def left(subject: Subject | None) -> float:
            if subject is None:
                return 0.0
            return max(0.0, (rows[subject.name]["locked_until"] - now).total_seconds())

        account, caller, pair = left(attempt.account), left(attempt.caller), 0.0
        if attempt.pair is not None and counts[attempt.pair.name] == 0:
            account_binds = False  # a vouched address that has not failed here passes the lock
        else:
            account_binds = True
            if attempt.pair is not None:
                pair = account  # this address is bound by the account's lock from now on
        for subject, seconds in ((attempt.account, account), (attempt.caller, caller),
                                 (attempt.pair, pair)):
            if subject is not None and seconds > 0:
                self._note(subject.name, seconds)
        return max(account if account_binds else 0.0, caller)

    def _lock_after(self, subject: Subject, failures: int, locked_until: datetime,
                    now: datetime) -> datetime:
        delay = self.policy.delay(failures, subject.free)
        if delay <= 0:
            return locked_until
        return max(locked_until, now + timedelta(seconds=delay))

    # -- what this instance remembers -----------------------------------------------------

    def _remembered(self, attempt: Attempt) -> float:
        """Seconds a lock seen earlier still refuses this attempt (0 or less: ask the database)."""
        bearing = [attempt.caller, attempt.pair]
        if attempt.pair is None:
            bearing.append(attempt.account)  # nothing here could pass the account's lock
        now, until = time.monotonic(), 0.0
        for subject in bearing:
            if subject is not None and (seen := self._locks.get(subject.name)) is not None:
                if seen <= now:
                    del self._locks[subject.name]
                until = max(until, seen)
        return until - now

    def _note(self, name: str, seconds: float) -> None:
        self._locks.pop(name, None)  # noted again goes last: the dict stays in noting order
        if len(self._locks) >= self._remember:
            del self._locks[next(iter(self._locks))]  # the oldest noted: only a query lost
        self._locks[name] = time.monotonic() + seconds

    def _forget(self, names: list[str]) -> None:
        for name in names:
            self._locks.pop(name, None)

    async def _maybe_prune(self) -> None:
        """Delete rows quiet for a whole window: they count as nothing already."""
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + _PRUNE_EVERY
        await self._store.pool.execute(_PRUNE, self.policy.window)
