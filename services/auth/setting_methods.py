"""The routing-setting handlers of `AuthService`: read by anyone logged in, set by admins, polled
by gateways.

The settings (settings.py: `default_model`, `fallback_models`, `cache_ttl`, `aliases`,
`first_token_timeout`) live
in the `settings` table (setting_store.py). Unlike a tier's limits they are in
no cached answer of auth's, so a change needs no invalidation: every gateway
polls `auth.settings_table` each second with the `version` it holds, and
applies a change within a second (README.md, "Routing settings").
"""

from __future__ import annotations

from typing import Any

from shared.errors import InvalidParams
from shared.logging import get_logger
from shared.rpc import method
from services.auth.service_base import AuthBase
from services.auth.settings import check_settings, settings_view, table_view

__all__ = ["SettingMethods"]

log = get_logger(__name__)


class SettingMethods(AuthBase):
    """The routing settings: shown to anyone logged in, changed by administrators or the operator."""

    @method(public=True, idempotent=True)
    async def settings(self, token: str | None = None) -> dict[str, Any]:
        """Every setting and when it was last set: anyone logged in (the operator without a token)."""
        await self._logged_in_or_operator(token)
        rows = await self._settings.load()
        return settings_view(rows.values, rows.updated_at)

    @method(public=True, idempotent=True)
    async def set_settings(self, settings: dict[str, Any], token: str | None = None) -> dict[str, Any]:
        """Change some settings (`settings`: a name -> its value; a name left out is kept; None
        clears `default_model`, `cache_ttl` and `first_token_timeout`, [] `fallback_models`, {}
        `aliases`, whose value replaces them all). Admins by `token`, the operator without one.
        Audited when anything changed; gateways apply it within a second."""
        actor_id = await self._admin_or_operator(token)
        changes = check_settings(settings)
        rows, changed = await self._settings.set(changes, actor_id=actor_id,
                                                 by="admin" if actor_id is not None else "operator")
        if changed:
            log.info("settings changed", names=sorted(changes), actor_id=actor_id, version=rows.version)
        return settings_view(rows.values, rows.updated_at)

    @method(idempotent=True, roles=("gateway",))
    async def settings_table(self, since: int | None = None) -> dict[str, Any]:
        """Internal (gateways, each second): the settings with `version` (grows with each change);
        `settings` is None when `since` is that version already (nothing changed)."""
        if since is not None and not 0 <= since < 2**63:
            raise InvalidParams("since must be a version from a previous call", {"param": "since"})
        rows = await self._settings.load()  # five rows: as cheap as reading the version alone
        return {"version": rows.version, "settings": None if since == rows.version else table_view(rows.values)}
