"""When an admitted request moves on to the next model of its chain, and how long it waits.

    chain = Chain(["llama3", "smollm2"])      # routing_settings.candidates(...)
    chain.take("llama3")                      # the model routed to leaves the chain
    if chain.left and falls_back(error, cut_short=...):
        chain.failed("llama3", error)         # kept for the record and the error: `tried`
        await asyncio.sleep(backoff(len(chain.tried)))

A request's chain is its alias's, or the model asked then the operator's
fallbacks (routing_settings.py). request.py routes to the first model that
can take the request; once admitted, a failure **before the first chunk**
moves it to the next model when the failure is the model's, not the
caller's:

| what the relay raised (every worker of the model tried)        | falls back |
| -------------------------------------------------------------- | ---------- |
| UNAVAILABLE: workers down, queues full, upstream down, an      | yes        |
| upstream's 429 (its keys exhausted), a breaker open            |            |
| NOT_FOUND: the model is not on its workers after all           | yes        |
| TIMEOUT of the model's first-token time (`first_token_timeout`) | yes        |
| INVALID_PARAMS `reason: context_length_exceeded`               | yes: the next model may have a larger context |
| TIMEOUT of the caller's own deadline                           | no: no time is left |
| any other INVALID_PARAMS, TOO_LARGE, FORBIDDEN, ...            | no: the request is at fault |

After the first chunk nothing moves: the caller has part of an answer.

Between models the request waits an exponential backoff with jitter --
`BASE` × 2^(step-1), at most `CAP`, times a random 0.5..1 -- and never past
the caller's deadline: a wait that would end after it ends the chain.

Each model tried and failed is kept as `{"model", "code"}` (`tried`): the
usage record carries it (auth keeps the records of requests that failed
after every fallback as dead letters), and so do the final chunk and the
last error. An upstream's rate limit (a 429 behind the UNAVAILABLE) is
kept as `RATE_LIMITED`.
"""

from __future__ import annotations

import random
from typing import Any

from shared.errors import MeshError

__all__ = ["BASE", "CAP", "Chain", "backoff", "code_of", "falls_back"]

BASE = 0.02  #: seconds before the second model
CAP = 1.0  #: the longest wait between two models
MAX_TRIED = 10  #: models kept in `tried` (a chain is at most 9 long)
_CONTEXT = "context_length_exceeded"
_RATE_LIMITED = ("upstream_keys_exhausted", "upstream_rate_limited")


def falls_back(error: MeshError, *, cut_short: bool) -> bool:
    """Whether `error` (a model failing before its first chunk) moves the request to the
    next model; `cut_short`: the attempt had less time than the caller's deadline (its
    first-token time), so a TIMEOUT is the model's."""
    if error.code in ("UNAVAILABLE", "NOT_FOUND"):
        return True
    if error.code == "TIMEOUT":
        return cut_short
    return error.code == "INVALID_PARAMS" and error.data.get("reason") == _CONTEXT


def backoff(step: int, *, rng: random.Random | None = None) -> float:
    """Seconds to wait before the `step`-th fallback (1 for the first)."""
    jitter = rng.uniform(0.5, 1.0) if rng is not None else random.uniform(0.5, 1.0)
    return float(min(CAP, BASE * 2 ** (step - 1)) * jitter)


def code_of(error: MeshError) -> str:
    """The code `tried` keeps: the relay's, or RATE_LIMITED for an upstream's 429 behind it."""
    cause = error.__cause__ if isinstance(error.__cause__, MeshError) else error
    if cause.data.get("upstream_status") in (429, 529) or cause.data.get("reason") in _RATE_LIMITED:
        return "RATE_LIMITED"
    return error.code


class Chain:
    """The models a request may still try, in order, and those it tried."""

    def __init__(self, models: list[str]) -> None:
        self.pending = list(models)
        self.tried: list[dict[str, Any]] = []

    @property
    def left(self) -> bool:
        return bool(self.pending)

    def take(self, model: str) -> None:
        """`model` is being tried: it leaves the chain."""
        if model in self.pending:
            self.pending.remove(model)

    def failed(self, model: str, error: MeshError) -> None:
        if len(self.tried) < MAX_TRIED:
            self.tried.append({"model": model, "code": code_of(error)})
