"""Password hashing: Argon2id, off the event loop, with rehash on login.

The default parameters are RFC 9106's second recommended option (the "low
memory" profile: t=3, m=64 MiB, p=4); a deployment may choose stronger ones.
Hashing runs in a worker thread (`asyncio.to_thread`) so the service keeps
answering, and at most `concurrency` hashes run at once so that a burst of
logins cannot take 64 MiB per request. An unknown user is checked against a
dummy hash made with the same parameters, so it costs what a wrong password
costs and the timing tells nothing about which accounts exist.

The queue in front of those threads is bounded too: at most `queue` more
hashes wait (by default `QUEUE_PER_THREAD` per thread, well under a second of
work). Past that, `hash` and `verify` -- and `check_room`, which callers use to
refuse before doing anything else -- raise `RateLimited` at once
(`retry_after` 1 s, `reason` "busy") instead of letting waiters pile up until
their deadlines pass. A hash keeps its thread until it finishes, even when its
caller gave up (deadline, cancellation): the bound counts threads at work, not
callers still waiting.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from argon2 import PasswordHasher as _Argon2
from argon2 import Type, profiles
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from shared.errors import RateLimited

__all__ = ["Argon2Params", "PRODUCTION", "QUEUE_PER_THREAD", "PasswordHasher", "Verdict", "normalize"]

#: Hashes allowed to wait per hashing thread: with the production parameters
#: (about 0.1-0.2 s each) a full queue drains in under a second.
QUEUE_PER_THREAD = 8

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Argon2Params:
    """Argon2id cost parameters (memory in KiB)."""

    time_cost: int = profiles.RFC_9106_LOW_MEMORY.time_cost
    memory_kib: int = profiles.RFC_9106_LOW_MEMORY.memory_cost
    parallelism: int = profiles.RFC_9106_LOW_MEMORY.parallelism


PRODUCTION = Argon2Params()


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of a check: does it match, and is a new hash due."""

    ok: bool
    new_hash: str | None = None  #: set when the stored hash used other parameters


def normalize(password: str) -> str:
    """NFC, so that the same password typed on two keyboards hashes the same."""
    return unicodedata.normalize("NFC", password)


class PasswordHasher:
    """Argon2id hashing and verification that never blocks the event loop.

    `concurrency` hashes run at once and `queue` more may wait (default
    `QUEUE_PER_THREAD` x `concurrency`); beyond, calls are refused at once.
    `admitted`, `completed` and `refused` are there for tests and metrics.
    """

    def __init__(
        self, params: Argon2Params = PRODUCTION, *, concurrency: int = 2, queue: int | None = None
    ) -> None:
        self.params = params
        self.concurrency = concurrency
        self.queue = QUEUE_PER_THREAD * concurrency if queue is None else queue
        self._argon2 = _Argon2(
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._slots = asyncio.Semaphore(concurrency)
        self.admitted = 0  #: hashes waiting or running now
        self.completed = 0  #: hashes finished since start (each one Argon2 computation, or two on a rehash)
        self.refused = 0  #: calls turned away because the queue was full
        # Same parameters as real hashes, so verifying against it costs the same.
        self._dummy = self._argon2.hash("inferswarm dummy password, never matches")

    def check_room(self) -> None:
        """`RateLimited` at once when the queue is full; reserves nothing."""
        if self.admitted >= self.concurrency + self.queue:
            self.refused += 1
            raise RateLimited("too many passwords being checked right now; retry in 1s",
                              {"retry_after": 1, "reason": "busy"})

    async def hash(self, password: str) -> str:
        """The encoded Argon2id hash of `password`."""
        return await self._run(self._argon2.hash, normalize(password))

    async def verify(self, encoded: str | None, password: str) -> Verdict:
        """Check `password` against `encoded` (None: an unknown user, always False)."""
        return await self._run(self._verify, encoded, normalize(password))

    async def _run(self, work: Callable[..., T], *args: object) -> T:
        self.check_room()
        self.admitted += 1
        try:
            await self._slots.acquire()
        except BaseException:  # cancelled while waiting: it never ran
            self.admitted -= 1
            raise
        job = asyncio.ensure_future(asyncio.to_thread(work, *args))
        job.add_done_callback(self._finished)
        # A caller that gives up does not free the slot: the thread still hashes.
        return await asyncio.shield(job)

    def _finished(self, job: asyncio.Future[object]) -> None:
        self._slots.release()
        self.admitted -= 1
        self.completed += 1
        if not job.cancelled():
            job.exception()  # retrieved here, so a caller that left causes no warning

    def _verify(self, encoded: str | None, password: str) -> Verdict:
        target = encoded if encoded is not None else self._dummy
        try:
            self._argon2.verify(target, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return Verdict(False)
        if encoded is None:  # the dummy matched: impossible, but never a login
            return Verdict(False)
        if self._argon2.check_needs_rehash(encoded):
            return Verdict(True, self._argon2.hash(password))
        return Verdict(True)
