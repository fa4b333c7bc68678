"""Slowing down password guessing, per account and per caller.

Failures are counted in PostgreSQL (`login_failures`), so every auth instance
sees the same counts and a restart forgets nothing. Each subject gets some
free failures (a typo should cost nothing); after that every failure locks the
subject for a delay that doubles, up to `max_delay`. A quiet `window` resets
the count. The account is keyed by user id when the account exists, else by
the identifier typed, so guessing at unknown accounts is slowed the same way
and the throttle tells nothing about which accounts exist. Callers get more
free failures than accounts: many people may share one address.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone

from shared.errors import RateLimited
from services.auth.store import AuthStore

__all__ = ["ThrottlePolicy", "LoginThrottle", "Subject"]


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    account_free_failures: int = 5
    caller_free_failures: int = 20
    base_delay: float = 1.0
    max_delay: float = 300.0
    window: float = 900.0

    def delay(self, failures: int, free: int) -> float:
        """Seconds to lock after the `failures`-th failure."""
        if failures <= free:
            return 0.0
        return min(self.max_delay, self.base_delay * 2 ** min(failures - free - 1, 30))


@dataclass(frozen=True, slots=True)
class Subject:
    """Something failures are counted for, and how many it gets free."""

    name: str  #: "user:42", "name:alice", "peer:<z85>", "addr:203.0.113.9"
    free: int


class LoginThrottle:
    """Refuses logins of locked subjects; counts failures; clears on success."""

    def __init__(self, store: AuthStore, policy: ThrottlePolicy | None = None) -> None:
        self._store = store
        self.policy = policy or ThrottlePolicy()

    def account(self, user_id: int | None, identifier: str) -> Subject:
        name = f"user:{user_id}" if user_id is not None else f"name:{identifier.lower()}"
        return Subject(name, self.policy.account_free_failures)

    def caller(self, caller: str) -> Subject:
        return Subject(caller, self.policy.caller_free_failures)

    async def check(self, subjects: list[Subject]) -> None:
        """`RateLimited` (with `retry_after`, whole seconds) while any subject is locked."""
        until = await self._store.locked_until([s.name for s in subjects])
        if until is not None:
            wait = (until - datetime.now(timezone.utc)).total_seconds()
            retry_after = max(1, math.ceil(wait))
            raise RateLimited(
                f"too many failed logins; retry in {retry_after}s", {"retry_after": retry_after}
            )

    async def failed(self, subjects: list[Subject]) -> None:
        for subject in subjects:
            failures = await self._store.count_failure(subject.name, self.policy.window)
            delay = self.policy.delay(failures, subject.free)
            if delay > 0:
                await self._store.lock(subject.name, delay)

    async def succeeded(self, account: Subject) -> None:
        await self._store.clear_failures(account.name)
