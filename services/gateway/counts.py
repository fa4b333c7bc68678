"""What the gateway counts: one sink for every request's figures.

Two readers, one writer (the request, request.py, once when it ends):

* Prometheus, through the process's shared registry (`MeshNode.metrics`,
  pushed to the metrics service every second): tokens in and out, time to
  first token, requests by result code, latency and cache hits by model, rate-limit refusals by tier,
  fallbacks by the model that failed and how; and, from the final chunk of a
  request served (its `usage` and the worker's `timing`), per model: tokens
  per request, the decode time per token after the first, the wait for a slot.
  Labels are models and tiers only -- never a user or a key.
* `gateway.health`: requests by outcome, requests in flight, worker retries,
  streams cut and fallbacks, as plain numbers of this process.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from shared.metrics import (
    CACHE_HITS,
    CACHE_MISSES,
    FALLBACKS,
    MODEL_REQUEST_DURATION,
    MODEL_REQUESTS,
    QUEUE_WAIT,
    RATE_LIMIT_VIOLATIONS,
    TIME_PER_OUTPUT_TOKEN,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    TOKENS_PER_REQUEST,
    Metrics,
)

__all__ = ["Counts", "time_per_output_token"]

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
            self._duration = metrics.histogram(MODEL_REQUEST_DURATION)
            self._requests = metrics.counter(MODEL_REQUESTS)
            self._hits, self._misses = metrics.counter(CACHE_HITS), metrics.counter(CACHE_MISSES)
            self._limited = metrics.counter(RATE_LIMIT_VIOLATIONS)
            self._fallbacks = metrics.counter(FALLBACKS)
            self._tpot = metrics.histogram(TIME_PER_OUTPUT_TOKEN)
            self._per_request = metrics.histogram(TOKENS_PER_REQUEST)
            self._queue_wait = metrics.histogram(QUEUE_WAIT)
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

    def served(self, model: str, status: str, seconds: float, prompt_tokens: int, completion_tokens: int,
               cached: bool | None = None) -> None:
        """An admitted request ended with `status` ("ok", or the lowercase error code the
        record keeps) after `seconds`, with these tokens (`cached` known on success)."""
        if self._metrics is None:
            return
        # A stream its worker cut counts as the platform's failure, as UNAVAILABLE does.
        self._requests.inc(model=model, code="UNAVAILABLE" if status == "worker_failed" else status.upper())
        self._duration.observe(seconds, model=model)
        if prompt_tokens:
            self._tokens.inc(prompt_tokens, model=model, direction="in")
        if completion_tokens:
            self._tokens.inc(completion_tokens, model=model, direction="out")
        if cached is not None:
            (self._hits if cached else self._misses).inc(model=model)

    def generated(self, model: str, timing: Any, prompt_tokens: int, completion_tokens: int,
                  cached: bool) -> None:
        """A request served to the end: its tokens, and (generated, not replayed from the
        cache, whose `timing` says nothing of a slot or a decode) the worker's `timing`."""
        if self._metrics is None:
            return
        self._per_request.observe(prompt_tokens, model=model, direction="in")
        self._per_request.observe(completion_tokens, model=model, direction="out")
        if cached or not isinstance(timing, dict):
            return
        queue_ms = _milliseconds(timing.get("queue_ms"))
        if queue_ms is not None:
            self._queue_wait.observe(queue_ms / 1000, model=model)
        tpot = time_per_output_token(timing, completion_tokens)
        if tpot is not None:
            self._tpot.observe(tpot, model=model)


def time_per_output_token(timing: dict[str, Any], completion_tokens: int) -> float | None:
    """Seconds per token after the first: (total - ttft) / (tokens - 1), from a worker's
    `timing` (milliseconds); None with fewer than 2 tokens or figures that do not add up."""
    total, ttft = _milliseconds(timing.get("total_ms")), _milliseconds(timing.get("ttft_ms"))
    if total is None or ttft is None or completion_tokens < 2 or total < ttft:
        return None
    return (total - ttft) / 1000 / (completion_tokens - 1)


def _milliseconds(value: Any) -> float | None:
    """A worker's figure in milliseconds, when it is one (a finite number >= 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)
