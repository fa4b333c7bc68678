"""A circuit breaker: stop calling what keeps failing, probe it now and then.

    breaker = Breaker(threshold=5, cooldown=5.0)
    if not breaker.allow():              # open: fail fast, do not call
        raise Unavailable("...", {"retry_after": breaker.retry_after()})
    try:
        result = await call()
    except Failure:
        breaker.failed()
        raise
    breaker.succeeded()

Three states:

* **closed**: every call is allowed; `threshold` failures in a row open it
  (a success in between starts the count again);
* **open**: no call is allowed for `cooldown` seconds;
* **half_open**: the cooldown passed; `allow()` lets exactly one call through
  (the probe). Its success closes the breaker; its failure opens it again for
  twice the last cooldown (at most `max_cooldown`). A probe whose outcome is
  never reported (cancelled) frees the way for another after `cooldown`.

The breaker holds no task and no lock: a single event loop calls it, and the
state is read from the clock when asked. `on_change(state)` is called on each
transition (e.g. to re-announce, to count it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["Breaker", "CLOSED", "HALF_OPEN", "OPEN", "State"]

State = Literal["closed", "open", "half_open"]
CLOSED: State = "closed"
OPEN: State = "open"
HALF_OPEN: State = "half_open"


class Breaker:
    """One circuit breaker (see the module doc)."""

    def __init__(self, *, threshold: int = 5, cooldown: float = 5.0, max_cooldown: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[State], None] | None = None) -> None:
        if threshold < 1 or cooldown <= 0 or max_cooldown < cooldown:
            raise ValueError("a breaker needs threshold >= 1 and 0 < cooldown <= max_cooldown")
        self.threshold = threshold
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._on_change = on_change
        self._open = False  #: opened and not closed since (open or half-open, by the clock)
        self.failures = 0  #: in a row, while closed
        self._wait = cooldown  #: the current open period
        self._opened_at = 0.0
        self._probe_until: float | None = None  #: a probe is out until then
        self.opened = 0  #: times it opened, since it was made

    @property
    def state(self) -> State:
        if not self._open:
            return CLOSED
        return OPEN if self._clock() < self._opened_at + self._wait else HALF_OPEN

    def allow(self) -> bool:
        """Whether a call may go now; in half-open, True once per probe."""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            return False
        now = self._clock()
        if self._probe_until is not None and now < self._probe_until:
            return False  # a probe is out
        self._probe_until = now + self.cooldown
        return True

    def retry_after(self) -> float:
        """Seconds until a call may be tried (0 when closed or half-open)."""
        if not self._open:
            return 0.0
        return max(0.0, self._opened_at + self._wait - self._clock())

    def succeeded(self) -> None:
        """A call worked: closed, the failure count cleared."""
        self.failures = 0
        if self._open:
            self._open = False
            self._wait = self.cooldown
            self._probe_until = None
            self._changed(CLOSED)

    def failed(self) -> None:
        """A call failed: counted while closed (opening at `threshold`); a failed probe opens it again for longer."""
        if not self._open:
            self.failures += 1
            if self.failures >= self.threshold:
                self._trip(self.cooldown)
            return
        if self.state == HALF_OPEN:
            self._trip(min(self._wait * 2, self.max_cooldown))

    def _trip(self, wait: float) -> None:
        self._open = True
        self._wait = wait
        self._opened_at = self._clock()
        self._probe_until = None
        self.opened += 1
        self._changed(OPEN)

    def _changed(self, state: State) -> None:
        if self._on_change is not None:
            self._on_change(state)

    def view(self) -> dict[str, Any]:
        """As /health and the status page show it."""
        return {"state": self.state, "failures": self.failures, "retry_after": round(self.retry_after(), 3),
                "opened": self.opened}
