"""What the gateway tells Prometheus: the shared metric families, recorded into
the process's registry (`MeshNode.metrics`), which the runner pushes to the
metrics service every second.

The gateway's own in-process figures (`metrics.py`, shown by `gateway.health`)
stay as they are; this adds the mesh-wide view: tokens in and out, time to
first token, latency and cache hits by model, and rate-limit refusals by tier.
Labels are models and tiers only -- never a user or a key.
"""

from __future__ import annotations

from typing import Any

from shared.metrics import (
    CACHE_HITS,
    CACHE_MISSES,
    RATE_LIMIT_VIOLATIONS,
    REQUEST_DURATION,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    Metrics,
)

__all__ = ["Report"]


class Report:
    """Records into a shared `Metrics` registry; does nothing without one."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._on = metrics is not None
        if metrics is not None:
            self._tokens = metrics.counter(TOKENS)
            self._ttft = metrics.histogram(TIME_TO_FIRST_TOKEN)
            self._duration = metrics.histogram(REQUEST_DURATION)
            self._hits, self._misses = metrics.counter(CACHE_HITS), metrics.counter(CACHE_MISSES)
            self._limited = metrics.counter(RATE_LIMIT_VIOLATIONS)

    def first_token(self, model: str, seconds: float) -> None:
        if self._on:
            self._ttft.observe(seconds, model=model)

    def finished(self, model: str, seconds: float, prompt_tokens: int, completion_tokens: int,
                 cached: bool | None = None) -> None:
        """A request ended (well or not) after `seconds`, with these tokens."""
        if not self._on:
            return
        self._duration.observe(seconds, service="gateway", model=model)
        if prompt_tokens:
            self._tokens.inc(prompt_tokens, model=model, direction="in")
        if completion_tokens:
            self._tokens.inc(completion_tokens, model=model, direction="out")
        if cached is not None:
            (self._hits if cached else self._misses).inc(model=model)

    def rate_limited(self, tier: Any) -> None:
        if self._on:
            self._limited.inc(tier=str(tier))
