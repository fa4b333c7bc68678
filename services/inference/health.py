"""What a worker knows about how one model is doing: health, breaker, latency, speed.

A model is healthy until its backend fails (down, 5xx, malformed data, a
dropped stream, an unknown upstream model); it stays unhealthy -- announced as
such, so gateways route around it -- until a later request or a periodic probe
succeeds. Latency (time to first token) and speed (tokens per second) are
exponentially weighted over recent requests.

On top of the healthy flag, each model has a circuit breaker (shared/breaker.py)
over the same outcomes: `threshold` backend failures in a row open it. While it
is open, `admit` refuses every request at once -- `UNAVAILABLE` with
`{"retry_safe": True, "retry_after": <whole seconds, at least 1>, "reason":
"breaker_open"}` -- without calling the backend, and `withdrawn` is True: the
worker stops announcing the model's topic. When the cooldown has passed
(half-open) one call is let through -- the periodic probe, or one request --
and its outcome closes the breaker or opens it again for longer. This object
is the breaker's only owner: every outcome reaches it through `succeeded` and
`failed`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from shared.breaker import CLOSED, Breaker, State
from shared.errors import MeshError, Unavailable
from shared.logging import get_logger

__all__ = ["KEYS_RESTING", "ModelHealth"]

KEYS_RESTING = "upstream_keys_exhausted"  #: keys.py's reason when every key waits for its reset

log = get_logger(__name__)

_WEIGHT = 0.3  # of the newest sample in the moving averages
_MAX_COOLDOWN_FACTOR = 12  # a failed probe doubles the wait, up to 12 x the cooldown (60 s for 5 s)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + _WEIGHT * (new - old)


class ModelHealth:
    """Health, circuit breaker and recent performance of one served model."""

    def __init__(self, *, name: str = "", on_change: Callable[[], None] | None = None,
                 threshold: int = 5, cooldown: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.healthy = True
        self.last_error: dict[str, Any] | None = None
        self.ttft_ms: float | None = None
        self.tokens_per_s: float | None = None
        self.requests = 0
        self.failures = 0
        self.completion_tokens = 0
        self._on_change = on_change
        self.breaker = Breaker(threshold=threshold, cooldown=cooldown,
                               max_cooldown=cooldown * _MAX_COOLDOWN_FACTOR, clock=clock,
                               on_change=self._breaker_changed)

    # -- the breaker -------------------------------------------------------------

    @property
    def withdrawn(self) -> bool:
        """True while the breaker is not closed: the model is not to be announced."""
        return self.breaker.state != CLOSED

    def admit(self) -> None:
        """Let a call to the backend go, or raise the fail-fast `Unavailable` of an open breaker.

        In half-open this admits exactly one call (the probe); call it only
        right before calling the backend, so that its outcome is reported."""
        if self.breaker.allow():
            return
        wait = max(1, math.ceil(self.breaker.retry_after()))
        raise Unavailable(
            f"model {self.name!r} is failing on this worker: its circuit breaker is open, retry in {wait}s",
            {"retry_safe": True, "retry_after": wait, "reason": "breaker_open"})

    def _breaker_changed(self, state: State) -> None:
        if state == CLOSED:
            log.info("breaker closed", model=self.name)
        else:
            log.warning("breaker open", model=self.name, retry_after=round(self.breaker.retry_after(), 3))
        if self._on_change is not None:
            self._on_change()

    # -- outcomes ----------------------------------------------------------------

    def succeeded(self, *, ttft_ms: float | None = None, tokens_per_s: float | None = None,
                  tokens: int = 0) -> None:
        """A request (or probe, without figures) worked: healthy again, the breaker closed."""
        if ttft_ms is not None:
            self.requests += 1
            self.completion_tokens += tokens
            self.ttft_ms = _ewma(self.ttft_ms, ttft_ms)
        if tokens_per_s is not None:
            self.tokens_per_s = _ewma(self.tokens_per_s, tokens_per_s)
        self._set(True)
        self.breaker.succeeded()

    def failed(self, error: MeshError) -> None:
        """The backend failed: unhealthy until something succeeds; counted by the breaker --
        unless its key pool said every key rests until a reset the upstream gave (the pool
        fails fast until then on its own: opening the breaker too would keep the model
        away for a cooldown past that reset)."""
        self.failures += 1
        self.last_error = {"code": error.code, "message": error.message, "at": time.time()}
        self._set(False)
        if error.data.get("reason") != KEYS_RESTING:
            self.breaker.failed()

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
