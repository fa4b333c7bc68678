"""What a worker knows about how one model is doing: health, latency, speed.

A model is healthy until its backend fails (down, 5xx, malformed data, a
dropped stream, an unknown upstream model); it stays unhealthy -- announced as
such, so gateways route around it -- until a later request or a periodic probe
succeeds. Latency (time to first token) and speed (tokens per second) are
exponentially weighted over recent requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from shared.errors import MeshError

__all__ = ["ModelHealth"]

_WEIGHT = 0.3  # of the newest sample in the moving averages


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + _WEIGHT * (new - old)


class ModelHealth:
    """Health and recent performance of one served model."""

    def __init__(self, *, on_change: Callable[[], None] | None = None) -> None:
        self.healthy = True
        self.last_error: dict[str, Any] | None = None
        self.ttft_ms: float | None = None
        self.tokens_per_s: float | None = None
        self.requests = 0
        self.failures = 0
        self.completion_tokens = 0
        self._on_change = on_change

    def succeeded(self, *, ttft_ms: float | None = None, tokens_per_s: float | None = None,
                  tokens: int = 0) -> None:
        """A request (or probe, without figures) worked: healthy again."""
        if ttft_ms is not None:
            self.requests += 1
            self.completion_tokens += tokens
            self.ttft_ms = _ewma(self.ttft_ms, ttft_ms)
        if tokens_per_s is not None:
            self.tokens_per_s = _ewma(self.tokens_per_s, tokens_per_s)
        self._set(True)

    def failed(self, error: MeshError) -> None:
        """The backend failed: unhealthy until something succeeds."""
        self.failures += 1
        self.last_error = {"code": error.code, "message": error.message, "at": time.time()}
        self._set(False)

    def _set(self, healthy: bool) -> None:
        changed = healthy != self.healthy
        self.healthy = healthy
        if changed and self._on_change is not None:
            self._on_change()

    def view(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "last_error": self.last_error,
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 1),
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 1),
            "requests": self.requests,
            "failures": self.failures,
            "completion_tokens": self.completion_tokens,
        }
