"""The SQL of the routing settings (`settings`, migration 0016): reading them, and a change.

A change is one transaction: every row locked (in name order, as every change
locks them), the changed rows written with one new `version` from the
`settings_version` sequence, and the audit (`settings_changed`, each changed
setting's old and new value). Locking every row, not only those changed,
makes changes take their versions in commit order: a gateway that read
version v (`auth.settings_table`) has seen every change up to v, and none
numbered below v can commit after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from shared.db import unavailable_when_down
from services.auth.store import write_audit

__all__ = ["SettingRows", "SettingStore"]

_SELECT = "SELECT name, value, version, updated_at FROM settings ORDER BY name"


@dataclass(frozen=True, slots=True)
class SettingRows:
    """The settings as stored: name -> value, name -> when last set (None: never), the version."""

    values: dict[str, Any]
    updated_at: dict[str, datetime | None]
    version: int

    @classmethod
    def of(cls, rows: list[asyncpg.Record]) -> SettingRows:
        # jsonb arrives as its text (the pool has no JSON codec).
        return cls({r["name"]: json.loads(r["value"]) for r in rows}, {r["name"]: r["updated_at"] for r in rows},
                   max((r["version"] for r in rows), default=0))


@unavailable_when_down()
class SettingStore:
    """The `settings` table, over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def load(self) -> SettingRows:
        """The settings now, with the version: the newest row's (rows are never removed, so it only grows)."""
        return SettingRows.of(await self.pool.fetch(_SELECT))

    async def set(self, changes: dict[str, Any], *, actor_id: int | None, by: str) -> tuple[SettingRows, bool]:
        """Apply `changes` (a setting -> its new value, checked), audited when anything changed.
        (The settings now, whether they changed.)"""
        async with self.pool.acquire() as conn, conn.transaction():
            old = SettingRows.of(await conn.fetch(f"{_SELECT} FOR UPDATE"))
            changed = {name: value for name, value in changes.items() if old.values[name] != value}
            if not changed:
                return old, False
            version = await conn.fetchval("SELECT nextval('settings_version')")
            await conn.executemany(
                "UPDATE settings SET value = $2::jsonb, version = $3, updated_at = now(), updated_by = $4 "
                "WHERE name = $1",
                [(name, json.dumps(value), version, actor_id) for name, value in changed.items()])
            await write_audit(conn, "settings_changed", None, actor_id, {
                "by": by, "from": {name: old.values[name] for name in changed}, "to": changed})
            return SettingRows.of(await conn.fetch(_SELECT)), True
