"""The tier table: what each tier may use.

A shared contract: auth answers with a tier's limits and priority, and
inference turns a tier name into a queue priority (shared/generation/).

The limits live in PostgreSQL (auth's `tiers` table, migration 0013), edited
by administrators (`auth.set_tier_limits`); auth loads them with
`TierTable.load` and every auth instance reloads them within a second of a
change (services/auth/README.md, "Tiers"). What is built here without rows
are the defaults the migration seeds, PRODUCT.md's table:

| tier       | requests/hour | requests/month | tokens/month (env)   | budget/day, /month | priority |
| ---------- | ------------- | -------------- | -------------------- | ------------------ | -------- |
| free       | 100           | 3,000          | 100,000              | none               | 0        |
| pro        | 1,000         | 30,000         | 1,000,000            | none               | 1        |
| enterprise | 10,000        | 300,000        | 10,000,000           | none               | 2        |
| unlimited  | 1,000,000     | no limit       | no limit             | none               | 3        |

Token budgets are configurable per tier (`INFERSWARM_TIER_<TIER>_TOKENS_PER_MONTH`,
a number or "none"); they apply to the rows no administrator has edited (see
`Tier.from_row`). A higher priority is served first by gateways. `None` means
no limit; money (the spending budgets) is a `Decimal`, a decimal string on the wire.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from shared.config import env

__all__ = ["BUDGET_NAMES", "COUNT_NAMES", "DEFAULT_TIER", "as_money", "LIMIT_NAMES", "MONEY_LIMITS", "money_text", "TierName", "TIER_NAMES", "Tier", "TierTable",
           "TierConfig", "parse_limit"]

TierName = Literal["free", "pro", "enterprise", "unlimited"]
TIER_NAMES: tuple[str, ...] = ("free", "pro", "enterprise", "unlimited")
DEFAULT_TIER = "free"
#: The limits of a tier, in the order they are shown; the last two are money.
#: The limits of a scope (a tier, a user, a key, an organisation): counts, then money budgets.
COUNT_NAMES: tuple[str, ...] = ("requests_per_hour", "requests_per_month", "tokens_per_month")
MONEY_LIMITS: tuple[str, ...] = ("spend_per_day", "spend_per_month")
BUDGET_NAMES = MONEY_LIMITS
LIMIT_NAMES: tuple[str, ...] = COUNT_NAMES + MONEY_LIMITS
_CENTS = Decimal("0.01")
_MONEY_PLACES = Decimal("0.000001")  #: NUMERIC(18,6)


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

    def tokens_of(self, name: str) -> int | None:
        value: int | None = getattr(self, f"{name}_tokens")
        return value


@dataclass(frozen=True, slots=True)
class Tier:
    """The limits of one tier; `None` is "no limit"."""

    name: str
    requests_per_hour: int | None
    requests_per_month: int | None
    tokens_per_month: int | None
    priority: int
    spend_per_day: Decimal | None = None
    spend_per_month: Decimal | None = None
    #: Whether an administrator has set it (False: the seeded defaults, env budgets apply).
    edited: bool = False

    def limits(self) -> dict[str, Any]:
        """The limits as the wire carries them: money as decimal strings ("5.000000")."""
        return {name: _wire(getattr(self, name)) for name in LIMIT_NAMES}

    @classmethod
    def from_row(cls, row: Mapping[str, Any], config: TierConfig) -> Tier:
        """A `tiers` row. One no administrator has edited (`updated_at` NULL: as the migration
        seeded it) takes its token budget from the environment, so deployments that set
        `INFERSWARM_TIER_<TIER>_TOKENS_PER_MONTH` keep it until an admin decides otherwise."""
        edited = row["updated_at"] is not None
        tokens = row["tokens_per_month"]
        if not edited and row["name"] in TIER_NAMES:
            tokens = config.tokens_of(row["name"])
        return cls(row["name"], row["requests_per_hour"], row["requests_per_month"], tokens, row["priority"],
                   _budget(row["spend_per_day"]), _budget(row["spend_per_month"]), edited)


def as_money(value: Decimal) -> Decimal:
    """A budget as stored (NUMERIC(18,6)): 6 decimals, so "5" and "5.000000" are one value."""
    return value.quantize(_MONEY_PLACES)


def _budget(value: Decimal | None) -> Decimal | None:
    return None if value is None else as_money(value)


def money_text(value: Decimal | str | int | None) -> str | None:
    """An amount for the wire: its exact decimal string with at least 2 decimals ("1.50",
    "0.123456"), or None."""
    if value is None:
        return None
    amount = Decimal(str(value)).normalize()
    exponent = amount.as_tuple().exponent
    if not isinstance(exponent, int) or exponent > -2:  # "1", "1E+2", "1.5": to cents
        amount = amount.quantize(_CENTS)
    return format(amount, "f")


def _wire(value: int | Decimal | None) -> int | str | None:
    return money_text(value) if isinstance(value, Decimal) else value


def _defaults(config: TierConfig) -> dict[str, Tier]:
    return {
        "free": Tier("free", 100, 3_000, config.free_tokens, 0),
        "pro": Tier("pro", 1_000, 30_000, config.pro_tokens, 1),
        "enterprise": Tier("enterprise", 10_000, 300_000, config.enterprise_tokens, 2),
        "unlimited": Tier("unlimited", 1_000_000, None, config.unlimited_tokens, 3),
    }


class TierTable:
    """The tiers by name: the defaults until `load` gives it the database's rows."""

    def __init__(self, config: TierConfig | None = None) -> None:
        self.config = config or TierConfig()
        self._tiers = _defaults(self.config)

    def load(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Replace the tiers by these rows (one assignment: readers see the old table or the
        new one, never half of each). A default tier missing from the rows keeps its defaults,
        so an unknown name always has a least tier to fall back to."""
        tiers = _defaults(self.config)
        tiers.update((row["name"], Tier.from_row(row, self.config)) for row in rows)
        self._tiers = tiers

    def __getitem__(self, name: str) -> Tier:
        # An unknown name in the database (a tier removed since) gets the
        # least: never more than was granted.
        return self._tiers.get(name) or self._tiers[DEFAULT_TIER]

    def __contains__(self, name: object) -> bool:
        return name in self._tiers

    def names(self) -> list[str]:
        return list(self._tiers)
