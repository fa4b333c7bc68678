"""What the auth service's handlers share: its state, the caller's checks, parameter helpers.

`AuthService` (service.py) is one class made of a handler class per concern
(key_methods.py, billing_methods.py, admin_methods.py, tier_methods.py, org_methods.py,
setting_methods.py, dead_letter_methods.py) over this base;
the dispatcher sees one service, `auth`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

import asyncpg

from shared.errors import Forbidden, InvalidParams, Unauthenticated
from shared.logging import get_logger
from shared.metrics import BUDGET_ALERTS, Metrics
from shared.roles import OPERATOR
from shared.rpc import current_request
from shared.tiers import TierTable
from services.auth import limits
from services.auth import validation as check
from services.auth.alert_loop import AlertLoop
from services.auth.alert_store import AlertStore
from services.auth.dead_letter_store import DeadLetterStore
from services.auth.housekeeping import Housekeeper
from services.auth.invalidation import InvalidationFeed
from services.auth.org_store import OrgStore
from services.auth.passwords import PasswordHasher
from services.auth.price_store import PriceStore
from services.auth.store import AuthStore
from services.auth.registration import RegistrationThrottle
from services.auth.setting_store import SettingStore
from services.auth.throttle import LoginThrottle
from services.auth.tier_store import TierStore
from services.auth.tokens import TokenIssuer
from services.auth.usage_store import UsageStore
from services.auth.webhook_sender import WebhookSender
from services.auth.webhook_store import WebhookStore


__all__ = ["AuthBase", "KEEP", "check_id", "iso", "is_operator", "parse_day", "user_ref"]

log = get_logger(__name__)


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


#: An `update_key` parameter left out: keep the key's value (null is a value: clear it).
KEEP: Any = ...


class AuthBase:
    """The state every handler class of `AuthService` reads, and the caller checks."""

    def __init__(
        self, store: AuthStore, usage: UsageStore, *, passwords: PasswordHasher,
        tokens: TokenIssuer, tiers: TierTable, throttle: LoginThrottle, feed: InvalidationFeed,
        housekeeper: Housekeeper, registrations: RegistrationThrottle | None = None,
        max_keys_per_user: int = 100, max_key_days: int = 3650, prices: PriceStore | None = None,
        tier_store: TierStore | None = None,
        currency: str = "USD",
        metrics: Metrics | None = None, sender: WebhookSender | None = None, alert_interval: float = 0.0,
        allow_private_webhooks: bool = False,
    ) -> None:
        self.store = store  #: the accounts' SQL (services/auth/store.py)
        self._usage = usage
        self._prices = prices or PriceStore(usage.pool)
        self._orgs = OrgStore(usage.pool)  #: organisations (org_methods.py; `validate_key`'s org scope)
        self._settings = SettingStore(usage.pool)  #: the routing settings (setting_methods.py)
        self._dead_letters = DeadLetterStore(usage.pool)  #: read here (dead_letter_methods.py), written with usage
        self._passwords = passwords
        self._tokens = tokens
        self._tiers = tiers  #: kept in step with the `tiers` table by the feed (tier_methods.py)
        self._tier_store = tier_store or TierStore(usage.pool, tiers.config)
        self._throttle = throttle
        self._registrations = registrations or RegistrationThrottle(store)
        #: The parts an operator's tools and the tests may read: the invalidation
        #: feed (cursor, trust), the key cache it keeps in step, the usage flusher.
        self.feed = feed
        self.cache = feed.cache
        self.housekeeper = housekeeper
        self._max_keys = max_keys_per_user
        self._max_key_days = max_key_days
        #: The platform currency: of budgets and of money limits (INFERSWARM_CURRENCY).
        self.currency = currency
        #: Keys refused for good (unknown, revoked, expired): hash -> reason.
        self._refused: dict[bytes, str] = {}
        #: Spending alerts (alert_methods.py): their SQL, the counter pushed to the metrics
        #: service (the process's registry: `node.metrics`), the sender this instance runs.
        self._alerts = AlertStore(usage.pool)
        self._webhooks = WebhookStore(usage.pool)
        self._alert_counter = (metrics or Metrics()).counter(BUDGET_ALERTS)
        self.sender = sender
        self._allow_private_webhooks = allow_private_webhooks
        #: When usage batches' budgets are looked at (alert_loop.py): with the batch, or coalesced
        #: (the process enters the loop; `alert_interval` > 0 needs it running).
        self.alert_loop = AlertLoop(self._alert_now, interval=alert_interval)


    async def _alert(self, user_ids: list[int], key_ids: list[int]) -> None:
        """Fire the spending alerts of usage just stored (alert_methods.py does)."""
        raise NotImplementedError

    async def _alert_now(self, user_ids: list[int], key_ids: list[int]) -> None:
        """Look at these users' and keys' budgets now (alert_methods.py)."""
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------

    async def _authenticate(self, token: str) -> asyncpg.Record:
        """The active account behind a valid, unrevoked token, else `UNAUTHENTICATED`."""
        user_id, claims = self._claims(token)
        user = await self.store.session_user(user_id, str(claims["jti"]), epoch_of(claims))
        if user is None or not user["is_active"]:
            raise Unauthenticated("session ended, or account disabled or removed")
        return user

    def _claims(self, token: str) -> tuple[int, dict[str, Any]]:
        claims = self._tokens.verify(token)
        try:
            user_id = int(claims["sub"])
        except ValueError:
            raise Unauthenticated("invalid token") from None
        if not 0 < user_id < 2**63:
            raise Unauthenticated("invalid token")
        return user_id, claims

    async def _authenticate_admin(self, token: str) -> asyncpg.Record:
        """The account behind `token` if it is an admin now (read from the database), else `FORBIDDEN`."""
        user = await self._authenticate(token)
        if not user["is_admin"]:
            raise Forbidden("administrators only")
        return user

    async def _admin_or_operator(self, token: str | None) -> int | None:
        """Who sets a price or a tier's limits, or reads every user's spending: an admin's id,
        or None for the operator; else refused."""
        if token is not None:
            return int((await self._authenticate_admin(token))["id"])
        if not is_operator():
            raise Unauthenticated("an administrator's session token is needed")
        return None

    async def _logged_in_or_operator(self, token: str | None) -> None:
        """Anyone logged in (by `token`), or the operator without one; else `UNAUTHENTICATED`."""
        if token is not None:
            await self._authenticate(token)
        elif not is_operator():
            raise Unauthenticated("a session token is needed")
    def _user_limits(self, tier: str, budget: Mapping[str, Any]) -> dict[str, Any]:
        """The user scope's limits: per counter the tighter of the tier's and the user's own."""
        return limits.effective(self._tiers[tier].limits(), budget)

    def _account_view(self, user: asyncpg.Record) -> dict[str, Any]:
        """An account with its own `budget`, its effective `limits` (the user scope), its
        tier's `priority` and the platform `currency` (`me`, `verify_token`, `set_budget`)."""
        own = limits.limits_of(user)
        budget = {name: own[name] for name in limits.BUDGET_NAMES}
        return {**self._user_view(user), "limits": self._user_limits(user["tier"], budget),
                "priority": self._tiers[user["tier"]].priority, "budget": budget, "currency": self.currency}

    def _is_self(self, caller: asyncpg.Record, ref: int | str) -> bool:
        """Whether `ref` (an id, username or email) names the caller: compared, never looked up,
        so a user learns nothing of whether another account exists."""
        if isinstance(ref, int):
            return ref == caller["id"]
        return check.fold(ref) in (check.fold(caller["username"]), check.fold(caller["email"]))

    def _user_view(self, user: asyncpg.Record) -> dict[str, Any]:
        return {
            "id": user["id"], "username": user["username"], "email": user["email"],
            "tier": user["tier"], "is_admin": user["is_admin"],
            "is_active": user["is_active"], "created_at": iso(user["created_at"]),
        }


def is_operator() -> bool:
    """The caller holds the mesh secret itself (`inferswarm admin`), or calls in-process."""
    ctx = current_request.get()
    return ctx is None or (ctx.member and ctx.role == OPERATOR)


def epoch_of(claims: dict[str, Any]) -> int:
    """The session epoch a token was issued in (`sep`; 0 for tokens from before epochs)."""
    epoch = claims.get("sep", 0)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 2**31:
        raise Unauthenticated("invalid token")
    return epoch


def parse_day(text: str, param: str) -> date:
    try:
        if len(text) != 10:
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidParams(f"{param} must be a date as YYYY-MM-DD", {"param": param}) from None


def check_id(value: int, param: str) -> int:
    """A database id: 1 to 2**63-1, else `INVALID_PARAMS` (never an overflow in SQL)."""
    if not 0 < value < 2**63:
        raise InvalidParams(f"{param} is not a valid id", {"param": param})
    return value


def user_ref(user: int | str) -> int | str:
    if isinstance(user, int):
        return check_id(user, "user")
    if not 0 < len(user) <= check.MAX_EMAIL:
        raise InvalidParams("user must be an id, a username or an email", {"param": "user"})
    return user


