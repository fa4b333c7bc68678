"""What the gateway counts: one sink for every request's figures.

Two readers, one writer (the request, request.py, once when it ends):

* Prometheus, through the process's shared registry (`MeshNode.metrics`,
  pushed to the metrics service every second): tokens in and out, time to
  first token, latency and cache hits by model, rate-limit refusals by tier,
  fallbacks by the model that failed and how.
  Labels are models and tiers only -- never a user or a key.
* `gateway.health`: requests by outcome, requests in flight, worker retries,
  streams cut and fallbacks, as plain numbers of this process.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from shared.metrics import (
    CACHE_HITS,
    CACHE_MISSES,
    FALLBACKS,
    RATE_LIMIT_VIOLATIONS,
    REQUEST_DURATION,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    Metrics,
)

__all__ = ["Counts"]

#: Outcomes kept apart in `gateway.health`; others are counted as "other".
_OUTCOMES = 32


class Counts:
    """The gateway's figures (see the module doc); `metrics` None keeps them in-process only."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.outcomes: Counter[str] = Counter()  #: requests by how they ended
        self.in_flight = 0
        self._metrics = metrics
        if metrics is not None:
            self._tokens = metrics.counter(TOKENS)
            self._ttft = metrics.histogram(TIME_TO_FIRST_TOKEN)
            self._duration = metrics.histogram(REQUEST_DURATION)
            self._hits, self._misses = metrics.counter(CACHE_HITS), metrics.counter(CACHE_MISSES)
            self._limited = metrics.counter(RATE_LIMIT_VIOLATIONS)
            self._fallbacks = metrics.counter(FALLBACKS)
        self.fallbacks = 0  #: requests moved on to another model, since start

    def first_token(self, model: str, seconds: float) -> None:
        if self._metrics is not None:
            self._ttft.observe(seconds, model=model)

    def refused(self, tier: Any) -> None:
        """A request refused by a rate limit."""
        if self._metrics is not None:
            self._limited.inc(tier=str(tier))

    def fell_back(self, model: str, code: str) -> None:
        """A request left `model`, failed with `code`, for the next model of its chain."""
        self.fallbacks += 1
        if self._metrics is not None:
            self._fallbacks.inc(model=model, code=code)

    def ended(self, status: str) -> None:
        """A request ended with `status` (before or after admission)."""
        if status not in self.outcomes and len(self.outcomes) >= _OUTCOMES:
            status = "other"
        self.outcomes[status] += 1

    def served(self, model: str, seconds: float, prompt_tokens: int, completion_tokens: int,
               cached: bool | None = None) -> None:
        """An admitted request ended after `seconds`, with these tokens (`cached` known on success)."""
        if self._metrics is None:
            return
        self._duration.observe(seconds, service="gateway", model=model)
        if prompt_tokens:
            self._tokens.inc(prompt_tokens, model=model, direction="in")
        if completion_tokens:
            self._tokens.inc(completion_tokens, model=model, direction="out")
        if cached is not None:
            (self._hits if cached else self._misses).inc(model=model)
