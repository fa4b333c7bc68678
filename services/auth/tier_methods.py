"""The tier handlers of `AuthService`: the tiers' limits, read by anyone logged in, set by admins.

A tier's limits (shared/tiers.py `LIMIT_NAMES`) and priority live in the
`tiers` table (tier_store.py). `auth.set_tier_limits` changes some of them;
every auth instance reloads the tiers and every cache (auth's, each
gateway's keys and sessions) drops its answers within a second, through the
invalidation log (README.md, "Tiers").
"""

from __future__ import annotations

from typing import Any

from shared.errors import InvalidParams
from shared.logging import get_logger
from shared.rpc import method
from shared.tiers import Tier
from services.auth.limits import check_limits
from services.auth.service_base import AuthBase

__all__ = ["MAX_PRIORITY", "TierMethods", "check_priority", "tier_view"]

log = get_logger(__name__)

MAX_PRIORITY = 9


class TierMethods(AuthBase):
    """The tiers: listed for anyone logged in, changed by administrators or the operator."""

    @method(public=True, idempotent=True)
    async def tiers(self, token: str | None = None) -> list[dict[str, Any]]:
        """Every tier with its limits and priority: anyone logged in (the operator without a token)."""
        await self._logged_in_or_operator(token)
        return [tier_view(self._tiers[name]) for name in self._tiers.names()]

    @method(public=True, idempotent=True)
    async def set_tier_limits(self, name: str, limits: dict[str, Any], priority: int | None = None,
                              token: str | None = None) -> dict[str, Any]:
        """Change some of tier `name`'s limits (`limits`: a limit's name -> its value, None for no
        limit; names left out are kept) and its `priority` (0-9; None: kept). Admins by `token`,
        the operator without one. Every cache drops its answers within a second."""
        actor_id = await self._admin_or_operator(token)
        if name not in self._tiers:
            raise InvalidParams(f"no such tier; tiers: {', '.join(self._tiers.names())}", {"param": "name"})
        changes = check_limits(limits)
        if priority is not None:
            changes["priority"] = check_priority(priority)
        if not changes:
            raise InvalidParams("nothing to change: give limits or a priority", {"param": "limits"})
        tier, changed = await self._tier_store.set_limits(
            name, changes, actor_id=actor_id, by="admin" if actor_id is not None else "operator")
        if changed:
            await self.feed.reset()  # here at once; other instances and gateways via the log
            log.info("tier limits changed", tier=name, fields=sorted(changes), actor_id=actor_id)
        return tier_view(tier)


def check_priority(priority: int) -> int:
    if isinstance(priority, bool) or not 0 <= priority <= MAX_PRIORITY:
        raise InvalidParams(f"priority must be 0 to {MAX_PRIORITY}", {"param": "priority"})
    return priority


def tier_view(tier: Tier) -> dict[str, Any]:
    """A tier as auth answers it; `edited`: false while it has the defaults (and the environment's
    token budget)."""
    return {"name": tier.name, "limits": tier.limits(), "priority": tier.priority, "edited": tier.edited}
