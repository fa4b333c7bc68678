"""The tier table: what each tier may use, from PRODUCT.md.

A shared contract: auth answers with a tier's limits and priority, and
inference turns a tier name into a queue priority (shared/generation/).

| tier       | requests/hour | requests/month | tokens/month (env)   | priority |
| ---------- | ------------- | -------------- | -------------------- | -------- |
| free       | 100           | 3,000          | 100,000              | 0        |
| pro        | 1,000         | 30,000         | 1,000,000            | 1        |
| enterprise | 10,000        | 300,000        | 10,000,000           | 2        |
| unlimited  | 1,000,000     | no limit       | no limit             | 3        |

Token budgets are configurable per tier (`INFERSWARM_TIER_<TIER>_TOKENS_PER_MONTH`,
a number or "none"). A higher priority is served first by gateways. `None` means
no limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shared.config import env

__all__ = ["DEFAULT_TIER", "TierName", "TIER_NAMES", "Tier", "TierTable", "TierConfig", "parse_limit"]

TierName = Literal["free", "pro", "enterprise", "unlimited"]
TIER_NAMES: tuple[str, ...] = ("free", "pro", "enterprise", "unlimited")
DEFAULT_TIER = "free"


def parse_limit(raw: str) -> int | None:
    """A non-negative integer, or "none"/"unlimited" for no limit."""
    text = raw.strip().lower().replace("_", "").replace(",", "")
    if text in ("none", "unlimited", "inf"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a number or 'none', got {raw!r}") from None
    if value < 0:
        raise ValueError(f"expected a non-negative number, got {raw!r}")
    return value


@dataclass(frozen=True)
class TierConfig:
    """Monthly token budgets per tier, read from the environment."""

    free_tokens: int | None = env(
        "INFERSWARM_TIER_FREE_TOKENS_PER_MONTH", default=100_000, parse=parse_limit
    )
    pro_tokens: int | None = env(
        "INFERSWARM_TIER_PRO_TOKENS_PER_MONTH", default=1_000_000, parse=parse_limit
    )
    enterprise_tokens: int | None = env(
        "INFERSWARM_TIER_ENTERPRISE_TOKENS_PER_MONTH", default=10_000_000, parse=parse_limit
    )
    unlimited_tokens: int | None = env(
        "INFERSWARM_TIER_UNLIMITED_TOKENS_PER_MONTH", default=None, parse=parse_limit
    )


@dataclass(frozen=True, slots=True)
class Tier:
    """The limits of one tier; `None` is "no limit"."""

    name: str
    requests_per_hour: int | None
    requests_per_month: int | None
    tokens_per_month: int | None
    priority: int

    def limits(self) -> dict[str, Any]:
        return {
            "requests_per_hour": self.requests_per_hour,
            "requests_per_month": self.requests_per_month,
            "tokens_per_month": self.tokens_per_month,
        }


class TierTable:
    """The tiers by name."""

    def __init__(self, config: TierConfig | None = None) -> None:
        config = config or TierConfig()
        self._tiers = {
            "free": Tier("free", 100, 3_000, config.free_tokens, 0),
            "pro": Tier("pro", 1_000, 30_000, config.pro_tokens, 1),
            "enterprise": Tier("enterprise", 10_000, 300_000, config.enterprise_tokens, 2),
            "unlimited": Tier("unlimited", 1_000_000, None, config.unlimited_tokens, 3),
        }

    def __getitem__(self, name: str) -> Tier:
        # An unknown name in the database (a tier removed since) gets the
        # least: never more than was granted.
        return self._tiers.get(name) or self._tiers[DEFAULT_TIER]

    def __contains__(self, name: object) -> bool:
        return name in self._tiers

    def names(self) -> list[str]:
        return list(self._tiers)
