"""Password hashing: Argon2id, off the event loop, with rehash on login.

The default parameters are RFC 9106's second recommended option (the "low
memory" profile: t=3, m=64 MiB, p=4); a deployment may choose stronger ones.
Hashing runs in a worker thread (`asyncio.to_thread`) so the service keeps
answering, and at most `concurrency` hashes run at once so that a burst of
logins cannot take 64 MiB per request. An unknown user is checked against a
dummy hash made with the same parameters, so it costs what a wrong password
costs and the timing tells nothing about which accounts exist.
"""

from __future__ import annotations

import asyncio
import unicodedata
from dataclasses import dataclass

from argon2 import PasswordHasher as _Argon2
from argon2 import Type, profiles
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["Argon2Params", "PRODUCTION", "PasswordHasher", "Verdict", "normalize"]


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
    """Argon2id hashing and verification that never blocks the event loop."""

    def __init__(self, params: Argon2Params = PRODUCTION, *, concurrency: int = 2) -> None:
        self.params = params
        self._argon2 = _Argon2(
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._slots = asyncio.Semaphore(concurrency)
        # Same parameters as real hashes, so verifying against it costs the same.
        self._dummy = self._argon2.hash("inferswarm dummy password, never matches")

    async def hash(self, password: str) -> str:
        """The encoded Argon2id hash of `password`."""
        async with self._slots:
            return await asyncio.to_thread(self._argon2.hash, normalize(password))

    async def verify(self, encoded: str | None, password: str) -> Verdict:
        """Check `password` against `encoded` (None: an unknown user, always False)."""
        async with self._slots:
            return await asyncio.to_thread(self._verify, encoded, normalize(password))

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
