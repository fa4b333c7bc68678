"""The SQL of the tiers (`tiers`, migration 0013): reading them, and an administrator's change.

A change is one transaction: the row, its audit (`tier_changed`, each changed
limit's old and new value) and an invalidation naming neither a key nor a
user (reason `tier_limits_changed`), which every cache reads as "drop
everything": each cached answer carries its tier's limits, and which answers
are of that tier only the answers know (README.md, "Tiers").
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import asyncpg

from shared.db import unavailable_when_down
from shared.errors import NotFound
from shared.tiers import LIMIT_NAMES, Tier, TierConfig, TierTable
from services.auth.store import log_invalidation, write_audit

__all__ = ["TIER_RESET_REASON", "TierStore"]

#: The invalidation reason of a tier's change; the only one naming no key nor user (migration 0013).
TIER_RESET_REASON = "tier_limits_changed"
_FIELDS = (*LIMIT_NAMES, "priority")
_COLUMNS = f"name, {', '.join(_FIELDS)}, updated_at, updated_by"


@unavailable_when_down()
class TierStore:
    """The `tiers` table, over an asyncpg pool; `config`: the environment's token budgets."""

    def __init__(self, pool: asyncpg.Pool, config: TierConfig) -> None:
        self.pool = pool
        self._config = config

    async def load(self, table: TierTable) -> None:
        """Give `table` the tiers as they are now."""
        table.load(await self.pool.fetch(f"SELECT {_COLUMNS} FROM tiers ORDER BY priority, name"))

    async def set_limits(self, name: str, changes: dict[str, Any], *, actor_id: int | None,
                         by: str) -> tuple[Tier, bool]:
        """Apply `changes` (a limit or `priority` -> its new value) to tier `name`, as it is in
        effect (a row never edited: with the environment's token budget); audited and logged
        as an invalidation when anything changed. (The tier now, whether it changed.)"""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM tiers WHERE name = $1 FOR UPDATE", name)
            if row is None:
                raise NotFound("no such tier", {"param": "name"})
            old = Tier.from_row(row, self._config)
            changed = {f: v for f, v in changes.items() if getattr(old, f) != v}
            if not changed:
                return old, False
            new = replace(old, **changed)
            row = await conn.fetchrow(
                f"UPDATE tiers SET {', '.join(f'{f} = ${i}' for i, f in enumerate(_FIELDS, start=2))}, "
                f"updated_at = now(), updated_by = ${len(_FIELDS) + 2} WHERE name = $1 RETURNING {_COLUMNS}",
                name, *(getattr(new, f) for f in _FIELDS), actor_id,
            )
            await write_audit(conn, "tier_changed", None, actor_id, {
                "tier": name, "by": by, "from": _shown(old, changed), "to": _shown(new, changed)})
            await log_invalidation(conn, TIER_RESET_REASON)
            return Tier.from_row(row, self._config), True


def _shown(tier: Tier, fields: dict[str, Any]) -> dict[str, Any]:
    """Those fields of `tier` as the audit's JSON keeps them (money as decimal strings)."""
    wire = {**tier.limits(), "priority": tier.priority}
    return {f: wire[f] for f in fields}
