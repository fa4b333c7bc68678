"""The administration handlers of `AuthService`: the audit log, accounts, tiers, admins.
"""

from __future__ import annotations

from typing import Any


from shared.errors import Conflict, Forbidden, InvalidParams
from shared.logging import get_logger
from shared.rpc import method
from shared.tiers import TierName
from services.auth import validation as check
from services.auth import audit as audit_log
from services.auth.service_base import AuthBase, user_ref

__all__ = ["AdminMethods"]

log = get_logger(__name__)


class AdminMethods(AuthBase):
    """What administrators (and the operator) do to accounts, and the audit log."""

    # -- audit -----------------------------------------------------------------------------

    @method(public=True, idempotent=True)
    async def audit(self, token: str | None = None, user: int | str | None = None, action: str | None = None,
                    since: str | None = None, until: str | None = None, limit: int = audit_log.DEFAULT_LIMIT,
                    before_id: int | None = None) -> dict[str, Any]:
        """Audit events, newest first: a user's own (as actor or subject); an admin's (or the operator's,
        without a token) everyone's, or `user`'s. `action`: an event or a prefix ("key_*"); `since`
        (included) and `until` (excluded): ISO 8601; `limit` 1-500; the next page: `before_id`."""
        events = audit_log.check_actions(action)
        first, last = audit_log.check_moment(since, "since"), audit_log.check_moment(until, "until")
        if first is not None and last is not None and first > last:
            raise InvalidParams("since must not be after until", {"param": "since"})
        limit, before_id = audit_log.check_limit(limit), audit_log.check_before_id(before_id)
        involving = await self._audit_subject(token, user)
        rows = await self.store.audit_events(involving=involving, events=events, since=first, until=last,
                                             before_id=before_id, limit=limit + 1)
        page = rows[:limit]
        return {"events": [audit_log.event_view(r) for r in page],
                "next_before_id": page[-1]["id"] if len(rows) > limit else None}

    async def _audit_subject(self, token: str | None, user: int | str | None) -> int | None:
        """Whose events the caller may read: a user's id, or None for everyone's (admins, the operator)."""
        if token is None:
            await self._admin_or_operator(None)
            caller = None
        else:
            caller = await self._authenticate(token)
        ref = None if user is None else user_ref(user)
        if caller is not None and not caller["is_admin"]:
            if ref is not None and not self._is_self(caller, ref):
                raise Forbidden("only administrators may read another user's events")
            return int(caller["id"])
        return None if ref is None else int((await self.store.find_user(ref))["id"])

    @method(public=True, idempotent=True)
    async def list_users(self, token: str, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Admins only: accounts in the order they were created."""
        await self._authenticate_admin(token)
        if not 1 <= limit <= 1000 or offset < 0:
            raise InvalidParams("limit must be 1..1000 and offset >= 0", {"param": "limit"})
        return [self._user_view(row) for row in await self.store.list_users(limit, offset)]

    @method(public=True, idempotent=True)
    async def set_tier(self, token: str, user: int | str, tier: TierName) -> dict[str, Any]:
        """Admins only: move an account (id, username or email) to another tier."""
        actor = await self._authenticate_admin(token)
        target = await self.store.find_user(user_ref(user))
        updated = await self.store.set_tier(target["id"], tier, actor["id"])
        self.cache.evict(user_id=target["id"])
        log.info("tier changed", user_id=target["id"], tier=tier, actor_id=actor["id"])
        return self._user_view(updated)

    @method(public=True, idempotent=True)
    async def set_active(self, token: str, user: int | str, active: bool) -> dict[str, Any]:
        """Admins only: disable (or re-enable) an account and, with it, all its keys."""
        actor = await self._authenticate_admin(token)
        target = await self.store.find_user(user_ref(user))
        if target["id"] == actor["id"] and not active:
            raise Conflict("an admin cannot disable their own account")
        updated = await self.store.set_active(target["id"], active, actor["id"])
        self.cache.evict(user_id=target["id"])
        log.info("account active changed", user_id=target["id"], active=active, actor_id=actor["id"])
        return self._user_view(updated)

    @method(idempotent=True, roles=())  # the operator only
    async def grant_admin(self, user: int | str, reason: str | None = None) -> dict[str, Any]:
        """Internal: make an account (id, username or email) an administrator.

        Mesh members only: the operator, through `inferswarm admin grant` with
        the mesh secret. `changed` is false when it already was one.
        """
        return await self._set_admin(user, True, reason)

    @method(idempotent=True, roles=())  # the operator only
    async def revoke_admin(self, user: int | str, reason: str | None = None) -> dict[str, Any]:
        """Internal: withdraw administration; the account's next admin call is refused."""
        return await self._set_admin(user, False, reason)

    async def _set_admin(self, user: int | str, is_admin: bool, reason: str | None) -> dict[str, Any]:
        details: dict[str, Any] = {"by": "mesh member"}
        if reason is not None:
            details["reason"] = check.check_name(reason, "reason")
        target = await self.store.find_user(user_ref(user))
        updated, changed = await self.store.set_admin(target["id"], is_admin, details)
        if changed:
            log.info("admin granted" if is_admin else "admin revoked", user_id=target["id"])
        return {**self._user_view(updated), "changed": changed}
