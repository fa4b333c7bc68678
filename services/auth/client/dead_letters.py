"""The dead letters' call of `AuthClient` (`auth.dead_letters`), its answer's shape, and how a
chain of attempts reads (`describe_chain`: the CLI and the dashboard write it alike).

A mixin of `AuthClient` (api.py): `DEAD_LETTER_METHODS` is merged into its
`METHODS`. services/auth/README.md, "Dead letters", says what they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from shared.rpc.typed import TypedClient, Wire

__all__ = ["DEAD_LETTER_METHODS", "Attempt", "DeadLetter", "DeadLetterCalls", "DeadLetterPage", "describe_chain"]


class Attempt(TypedDict):
    """A model tried for a request, and the error code it failed with."""

    model: str
    code: str  #: UNAVAILABLE, TIMEOUT, RATE_LIMITED, INVALID_PARAMS, ...


class DeadLetter(TypedDict):
    """A request that failed after the gateway had tried more than one model."""

    id: int
    request_id: str
    user_id: int
    key_id: int | None  #: None: made with a session token, or the key was deleted
    asked: str | None  #: the model the caller named (an alias, `default`); None: `model`
    model: str  #: the model tried last
    prompt_hash: str | None  #: a hash, never the prompt
    status: str  #: why it failed: the usage record's status (error, timeout, ...)
    tried: list[Attempt]  #: the attempts that failed before the last, in order
    at: str  #: ISO 8601: when the request was made


class DeadLetterPage(TypedDict):
    dead_letters: list[DeadLetter]  #: newest first
    next: int | None  #: pass as `before` for the next page; None: this was the last


DEAD_LETTER_METHODS = {"dead_letters": Wire("auth.dead_letters", idempotent=True)}


def describe_chain(tried: Sequence[Attempt], arrow: str = "→") -> str:
    """The attempts as people read them: `llama3 (UNAVAILABLE) → smollm2 (TIMEOUT)`."""
    return f" {arrow} ".join(f"{a['model']} ({a['code']})" for a in tried)


class DeadLetterCalls(TypedClient):
    """Dead letters: administrators (by token) and the operator (without one)."""

    async def dead_letters(self, *, token: str | None = None, limit: int | None = None, before: int | None = None,
                           model: str | None = None, timeout: float | None = None) -> DeadLetterPage:
        """The newest dead letters (`limit` 1-500, default 50), below id `before`, naming `model`
        as asked for or last tried."""
        page: DeadLetterPage = await self._call("dead_letters", timeout, token=token, limit=limit, before=before,
                                                model=model)
        return page
