"""How long a lookup waits for one reply: the measured round trip, as TCP does it.

A lookup that waited the full `rpc_timeout` (1 s) on every dead contact it met
spent seconds on a routing table full of short-lived clients. Instead it waits
`srtt + 4 * rttvar` (RFC 6298's retransmission timeout, Jacobson/Karels
smoothing), clamped to `[floor, ceiling]`: a few milliseconds on loopback, a
few hundred across continents, never more than the ceiling. Until the first
reply is measured the wait is the ceiling.

Every reply is a sample, a late one too (it arrived after the adaptive wait had
given up on it), so a node whose peers slow down under load waits longer at
once instead of declaring them dead one after the other.
"""

from __future__ import annotations

__all__ = ["RttEstimator"]

_ALPHA = 1 / 8  # gain of the smoothed round trip (RFC 6298)
_BETA = 1 / 4  # gain of its variation
_K = 4  # variations of slack


class RttEstimator:
    """Smoothed round trip and its variation; `timeout` is the wait they imply."""

    def __init__(self, floor: float, ceiling: float) -> None:
        if not 0 < floor <= ceiling:
            raise ValueError("RttEstimator: need 0 < floor <= ceiling")
        self.floor = floor
        self.ceiling = ceiling
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.samples = 0

    def __repr__(self) -> str:
        return f"RttEstimator(srtt={self.srtt}, rttvar={self.rttvar:.6f}, timeout={self.timeout:.4f})"

    def sample(self, seconds: float) -> None:
        """Fold in one measured round trip."""
        seconds = max(0.0, seconds)
        if self.srtt is None:
            self.srtt, self.rttvar = seconds, seconds / 2
        else:
            self.rttvar += _BETA * (abs(self.srtt - seconds) - self.rttvar)
            self.srtt += _ALPHA * (seconds - self.srtt)
        self.samples += 1

    @property
    def timeout(self) -> float:
        """Seconds to wait for a reply before counting the peer as failed."""
        if self.srtt is None:
            return self.ceiling
        return min(self.ceiling, max(self.floor, self.srtt + _K * self.rttvar))
