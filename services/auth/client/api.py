"""`AuthClient`: the auth service's RPC methods as typed calls.

    auth = AuthClient(mesh("auth"), timeout=10.0)      # or AuthClient.of(mesh)
    session = await auth.login(username_or_email="ada", password="...")
    keys = await auth.list_keys(token=session["token"])

One method per `auth.*` method (services/auth/service.py has what each does
and who may call it); parameters are keyword-only, None leaves a parameter
out (the server's default applies), and every method takes `timeout`. The
answers are plain dicts as they come off the wire; the `TypedDict`s below
document their shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NotRequired, Required, TypedDict

from shared.rpc.typed import TypedClient, Wire
from services.auth.client.alerts import ALERT_METHODS, AlertCalls
from services.auth.client.dead_letters import DEAD_LETTER_METHODS, DeadLetterCalls
from services.auth.client.orgs import ORG_METHODS, OrgCalls

__all__ = [
    "KEEP", "AccountCreated", "Account", "ActiveUsers", "AdminChange", "ApiKey", "AuditEvent", "AuditPage", "AuthClient",
    "Budget", "Limits", "Scope",
    "Invalidation", "Invalidations", "KeyIdentity", "LoggedOut", "NewApiKey", "Price", "PriceTable", "RecentRequest",
    "RecordCounts", "Report", "ReportRow", "ReportTotals", "RoutingSettings", "Session", "Settings",
    "SettingsTable", "Spender", "TierLimits", "TokenKey", "TriedModel",
    "TierInfo", "TopSpenders", "UsageCost", "UsageDay", "UsageRecord", "UsageReport", "UsageTotals", "User",
]


class TierLimits(TypedDict):
    """A scope's limits (a user's: the tighter of its tier's and its budget; a key's own); None is
    "no limit". Money is a decimal string in the platform currency ("1.50"), never a float."""

    requests_per_hour: int | None
    requests_per_month: int | None
    tokens_per_month: int | None
    spend_per_day: NotRequired[str | None]  #: always present since migration 0012
    spend_per_month: NotRequired[str | None]


#: The same five names, for a key's own limits and the `limits` of `create_key`/`update_key`.
Limits = TierLimits


class Budget(TypedDict):
    """A user's own money budgets (`set_budget`), decimal strings in the platform currency; None: none."""

    spend_per_day: str | None
    spend_per_month: str | None


class TierInfo(TypedDict):
    """A tier (`tiers`, `set_tier_limits`); `edited`: false while it has its defaults."""

    name: str
    limits: TierLimits
    priority: int
    edited: bool


class Scope(TypedDict):
    """One scope a gateway enforces every counter of: the user's, and a key's with limits of its own."""

    scope: Literal["user", "key", "org"]
    id: int  #: the user's id, or the key's
    limits: TierLimits


class User(TypedDict):
    """An account as auth shows it."""

    id: int
    username: str
    email: str
    tier: str
    is_admin: bool
    is_active: bool
    created_at: str | None  #: ISO 8601


class Account(User):
    """An account with its effective limits (`me`, `verify_token`, `set_budget`)."""

    limits: TierLimits  #: the user scope: per counter the tighter of the tier's and `budget`
    priority: int
    budget: Budget  #: the user's own
    currency: str  #: the platform currency (ISO 4217) of money limits
    scopes: NotRequired[list[Scope]]  #: `verify_token` only: the user scope


class AccountCreated(TypedDict):
    """What the public gets from `register`, whether the email was new or not (no id)."""

    username: str
    email: str
    tier: str
    is_admin: bool
    message: str


class Session(TypedDict):
    """A session token (`login`, `change_password`)."""

    token: str
    expires_at: int  #: epoch seconds
    user: User


class LoggedOut(TypedDict):
    logged_out: bool
    everywhere: NotRequired[bool]  #: `logout_all`


class TokenKey(TypedDict):
    """What a `TokenVerifier` needs (`token_key`)."""

    algorithm: str  #: "EdDSA"
    public_key: str  #: PEM
    kid: str
    issuer: str
    audience: str


class ApiKey(TypedDict):
    """An API key as listed: never the key itself."""

    id: int
    name: str
    prefix: str  #: "isk_" and 4 characters
    status: Literal["active", "expired", "revoked"]
    created_at: str | None
    last_used_at: str | None
    expires_at: str | None
    revoked_at: str | None
    rotated_from: int | None  #: the key this one replaced (`rotate_key`), else None
    allowed_models: list[str] | None  #: the models it may name; None: every model
    limits: Limits  #: the key's own (all five names; None: none of its own)
    org_id: NotRequired[int | None]  #: the organisation whose key it is; None: a personal key


class NewApiKey(ApiKey):
    """A key just created: `api_key` is the only time it is ever shown."""

    api_key: str


class RotatedApiKey(NewApiKey):
    """A key made by `rotate_key`, and the key it replaces as it now is (its `expires_at`
    is when it stops: the end of the overlap)."""

    old_key: ApiKey


class KeyIdentity(TypedDict):
    """Who an API key belongs to and what it may do (`validate_key`)."""

    user_id: int
    key_id: int
    tier: str
    limits: TierLimits
    priority: int
    expires_at: float | None  #: epoch seconds
    allowed_models: NotRequired[list[str] | None]  #: the models it may name; None (or absent): every model
    org_id: NotRequired[int | None]  #: the key's organisation; None: a personal key
    scopes: list[Scope]  #: enforce every counter of each: the user's; the key's when it has limits; the org's
    currency: str  #: of the money limits (ISO 4217)
    cursor: int | None  #: the invalidation seq this answer reflects


class Invalidation(TypedDict):
    """What to evict: a key, a user's keys and sessions; neither (a tier changed): everything."""

    seq: int
    key_id: int | None
    user_id: int | None


class Invalidations(TypedDict):
    """Invalidation entries after a cursor; `reset`: drop the whole cache; `more`: call again."""

    cursor: int
    entries: list[Invalidation]
    reset: bool
    more: bool


class TriedModel(TypedDict):
    """An attempt of a usage record's `tried`."""

    model: str
    code: str  #: the error code it failed with: UNAVAILABLE, TIMEOUT, RATE_LIMITED, INVALID_PARAMS, ...


class UsageRecord(TypedDict, total=False):
    """One record of `record_usage`'s batch (checked in services/auth/records.py)."""

    request_id: Required[str]  #: the idempotency key: stored once
    user_id: Required[int]
    key_id: int | None
    model: Required[str]
    prompt_hash: str | None  #: 16-128 lowercase hex digits, never the prompt
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    latency_ms: int | None
    status: str  #: "ok", "error", "cancelled", ...
    worker: str | None
    at: float | None  #: epoch seconds; None: now
    #: The model the caller named (an alias, `default`) when it is not `model`, the one that served
    #: (or was tried last); a malformed one is dropped, the record kept.
    asked: str
    #: The attempts that failed before the last, in order (at most 10); with a status other than "ok",
    #: the record is also a dead letter. A malformed list is dropped, the record kept.
    tried: list[TriedModel]


class RecordCounts(TypedDict):
    inserted: int
    duplicates: int
    rejected: int


ActiveUsers = TypedDict("ActiveUsers", {"1h": int, "24h": int})
ActiveUsers.__doc__ = "Distinct users with a request in the last hour and the last 24 hours."


class UsageTotals(TypedDict):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    tokens: int
    errors: int
    cache_hits: int
    cost: dict[str, str]  #: currency -> the sum of priced requests' costs, a decimal string ("0.0123000000")
    unpriced: int  #: requests whose model had no price at their time (no cost)


class UsageDay(UsageTotals):
    """One UTC day of one key."""

    day: str  #: YYYY-MM-DD
    key_id: int | None
    key_name: str | None
    key_prefix: str | None


class UsageCost(TypedDict):
    """One UTC day of one key and one model, in one currency."""

    day: str
    key_id: int | None
    model: str
    currency: str | None  #: None for requests without a price
    requests: int
    cost: str | None  #: a decimal string; None when none of them had a price
    unpriced: int


class UsageReport(TypedDict):
    start: str
    end: str
    days: list[UsageDay]
    totals: UsageTotals
    costs: list[UsageCost]


class ReportTotals(TypedDict):
    """Usage and cost over a report's whole range."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: dict[str, str]  #: currency -> exact decimal string; currencies are never added together
    unpriced: int  #: requests whose model had no price at their time


class ReportRow(ReportTotals, total=False):
    """One period (and model or key) of a `report`."""

    period: Required[str]  #: YYYY-MM-DD: the UTC day, the Monday of the ISO week, or the 1st of the month
    model: str  #: with by="model"
    key_id: int | None  #: with by="key"; None: requests made without an API key
    key_name: str | None  #: with by="key"; None without a key (or for a deleted one)


class Report(TypedDict):
    start: str
    end: str
    group_by: Literal["day", "week", "month"]
    by: Literal["model", "key"] | None
    rows: list[ReportRow]
    totals: ReportTotals


class Spender(TypedDict):
    """One user's rank among a currency's spenders (`top_spenders`)."""

    currency: str | None  #: None: the requests without a price, ranked by their number
    rank: int  #: 1 is the first, within its currency
    user_id: int
    username: str
    cost: str | None  #: exact decimal string; None for `currency` None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    unpriced: int


class TopSpenders(TypedDict):
    start: str
    end: str
    spenders: list[Spender]  #: by currency (the unpriced last), then rank


class Price(TypedDict):
    """A version of a model's price, per million tokens; money as decimal strings ("0.150000")."""

    model: str
    input: str
    output: str
    cached: str | None  #: a cached answer's prompt tokens; None: the input price
    currency: str  #: ISO 4217
    effective_from: str  #: ISO 8601
    status: Literal["current", "scheduled"]
    created_at: str


class PriceTable(TypedDict):
    """`auth.price_table`: the prices in force and scheduled; None when unchanged since `since`."""

    version: int
    prices: list[Price] | None


class Settings(TypedDict):
    """`auth.settings`, `auth.set_settings`: the routing settings (services/auth/README.md,
    "Routing settings") and when each was last set (ISO 8601; None: never)."""

    default_model: str | None  #: serves a request naming the model `default`; None: unset
    fallback_models: list[str]  #: tried in order when the model asked for cannot take a request
    cache_ttl: int | None  #: seconds workers keep a response (0: no caching); None: each worker's own
    aliases: dict[str, list[str]]  #: an alias -> its chain: the first model serves, the rest are tried in order
    first_token_timeout: float | None  #: seconds a model has to send its first token; None: no such limit
    updated_at: dict[str, str | None]


class RoutingSettings(TypedDict):
    """The settings alone, as `auth.settings_table` gives them to gateways."""

    default_model: str | None
    fallback_models: list[str]
    cache_ttl: int | None
    aliases: dict[str, list[str]]
    first_token_timeout: float | None


class SettingsTable(TypedDict):
    """`auth.settings_table`: the settings with their `version`; None when unchanged since `since`."""

    version: int
    settings: RoutingSettings | None


class RecentRequest(TypedDict):
    created_at: str | None
    model: str
    key_name: str | None
    key_prefix: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    latency_ms: int | None
    status: str


class AdminChange(User):
    changed: bool  #: false when the account already was (or was not) an administrator


class AuditEvent(TypedDict):
    """One audit event (`audit`): who did what, to whom, when."""

    id: int
    at: str  #: ISO 8601
    actor: str | None  #: a username, "operator", or None (nobody: a failed login)
    user: str | None  #: the account it is about (None: none, or a deleted one)
    action: str  #: key_created, login_failed, price_set, ...
    details: dict[str, Any]  #: never a secret (keys by prefix only)


class AuditPage(TypedDict):
    events: list[AuditEvent]  #: newest first
    next_before_id: int | None  #: pass as `before_id` for the next page; None: this was the last


#: `update_key`, `set_budget`: a field left as this is not sent, so auth keeps it (None is sent: it clears).
KEEP: Any = ...


class AuthClient(AlertCalls, OrgCalls, DeadLetterCalls, TypedClient):
    """Typed calls to the auth service (the spending alerts' in alerts.py, organisations' in orgs.py,
    dead letters' in dead_letters.py)."""

    SERVICE = "auth"
    METHODS = {
        "register": Wire("auth.register"),
        "login": Wire("auth.login"),
        "me": Wire("auth.me", idempotent=True),
        "logout": Wire("auth.logout", idempotent=True),
        "logout_all": Wire("auth.logout_all"),
        "change_password": Wire("auth.change_password"),
        "token_key": Wire("auth.token_key", idempotent=True),
        "verify_token": Wire("auth.verify_token", idempotent=True),
        "create_key": Wire("auth.create_key"),
        "list_keys": Wire("auth.list_keys", idempotent=True),
        "revoke_key": Wire("auth.revoke_key", idempotent=True),
        "rotate_key": Wire("auth.rotate_key"),
        "update_key": Wire("auth.update_key"),
        "validate_key": Wire("auth.validate_key", idempotent=True),
        "invalidations": Wire("auth.invalidations", idempotent=True),
        "record_usage": Wire("auth.record_usage", idempotent=True),
        "active_users": Wire("auth.active_users", idempotent=True),
        "tiers": Wire("auth.tiers", idempotent=True),
        "set_tier_limits": Wire("auth.set_tier_limits", idempotent=True),
        "usage": Wire("auth.usage", idempotent=True),
        "recent_usage": Wire("auth.recent_usage", idempotent=True),
        "list_users": Wire("auth.list_users", idempotent=True),
        "set_tier": Wire("auth.set_tier", idempotent=True),
        "set_budget": Wire("auth.set_budget", idempotent=True),
        "set_active": Wire("auth.set_active", idempotent=True),
        "set_price": Wire("auth.set_price"),
        "prices": Wire("auth.prices", idempotent=True),
        "price_table": Wire("auth.price_table", idempotent=True),
        "settings": Wire("auth.settings", idempotent=True),
        "set_settings": Wire("auth.set_settings", idempotent=True),
        "settings_table": Wire("auth.settings_table", idempotent=True),
        "report": Wire("auth.report", idempotent=True),
        "top_spenders": Wire("auth.top_spenders", idempotent=True),
        "audit": Wire("auth.audit", idempotent=True),
        "grant_admin": Wire("auth.grant_admin", idempotent=True),
        "revoke_admin": Wire("auth.revoke_admin", idempotent=True),
        **ALERT_METHODS,
        **ORG_METHODS,
        **DEAD_LETTER_METHODS,
    }

    # -- accounts and sessions -------------------------------------------------------

    async def register(self, *, username: str, email: str, password: str, client_addr: str | None = None,
                       timeout: float | None = None) -> AccountCreated | User:
        """A new account (`User` only for a member naming no client; the public gets `AccountCreated`)."""
        return await self._call("register", timeout, username=username, email=email, password=password,
                                client_addr=client_addr)

    async def login(self, *, username_or_email: str, password: str, client_addr: str | None = None,
                    timeout: float | None = None) -> Session:
        return await self._call("login", timeout, username_or_email=username_or_email, password=password,
                                client_addr=client_addr)

    async def me(self, *, token: str, timeout: float | None = None) -> Account:
        return await self._call("me", timeout, token=token)

    async def logout(self, *, token: str, timeout: float | None = None) -> LoggedOut:
        return await self._call("logout", timeout, token=token)

    async def logout_all(self, *, token: str, timeout: float | None = None) -> LoggedOut:
        return await self._call("logout_all", timeout, token=token)

    async def change_password(self, *, token: str, old_password: str, new_password: str,
                              client_addr: str | None = None, timeout: float | None = None) -> Session:
        return await self._call("change_password", timeout, token=token, old_password=old_password,
                                new_password=new_password, client_addr=client_addr)

    async def token_key(self, *, timeout: float | None = None) -> TokenKey:
        return await self._call("token_key", timeout)

    async def verify_token(self, *, token: str, timeout: float | None = None) -> Account:
        """Internal (gateway): the account behind a token, checked against auth's database."""
        return await self._call("verify_token", timeout, token=token)

    # -- API keys ----------------------------------------------------------------------

    async def create_key(self, *, token: str, name: str, expires_in_days: int | None = None,
                         expires_at: str | None = None, allowed_models: list[str] | None = None,
                         limits: Mapping[str, int | str | None] | None = None, org: int | str | None = None,
                         timeout: float | None = None) -> NewApiKey:
        """A new key: it expires after `expires_in_days` or at `expires_at` (ISO 8601), may name only
        `allowed_models` (None: every model), has its own `limits` (counts as ints, money as
        decimal strings; None: none but the user's), and with `org` is an organisation's key (None: personal)."""
        return await self._call("create_key", timeout, token=token, name=name, expires_in_days=expires_in_days,
                                expires_at=expires_at, allowed_models=allowed_models,
                                limits=None if limits is None else dict(limits), org=org)

    async def update_key(self, *, token: str, key_id: int, name: Any = KEEP, expires_at: Any = KEEP,
                         allowed_models: Any = KEEP, limits: Any = KEEP, timeout: float | None = None) -> ApiKey:
        """Edit a key: each of `name`, `expires_at` (ISO 8601), `allowed_models`, `limits` (a map of
        some limits; a None value clears that one) given is sent, None included (it clears the
        expiry, or allows every model); one left out (`KEEP`) is kept."""
        return await self._keeping("update_key", timeout, {"token": token, "key_id": key_id}, name=name,
                                   expires_at=expires_at, allowed_models=allowed_models, limits=limits)

    async def _keeping(self, method: str, timeout: float | None, params: dict[str, Any], /, **maybe: Any) -> Any:
        """Call `method` with `params` and those of `maybe` not `KEEP` (None is sent: it clears)."""
        wire = self.METHODS[method]
        return await self.service.call(
            wire.name, {**params, **{k: v for k, v in maybe.items() if v is not KEEP}},
            timeout=self.timeout if timeout is None else timeout, idempotent=wire.idempotent)

    async def list_keys(self, *, token: str, timeout: float | None = None) -> list[ApiKey]:
        return await self._call("list_keys", timeout, token=token)

    async def revoke_key(self, *, token: str, key_id: int, timeout: float | None = None) -> ApiKey:
        return await self._call("revoke_key", timeout, token=token, key_id=key_id)

    async def rotate_key(self, *, token: str, key_id: int, overlap_seconds: int | None = None,
                         timeout: float | None = None) -> RotatedApiKey:
        """A new key replacing `key_id`, which stops after `overlap_seconds` (None: auth's 24 h)."""
        return await self._call("rotate_key", timeout, token=token, key_id=key_id, overlap_seconds=overlap_seconds)

    async def validate_key(self, *, api_key: str, timeout: float | None = None) -> KeyIdentity:
        """Internal (gateway): use a `KeyValidator`, which caches, rather than this."""
        return await self._call("validate_key", timeout, api_key=api_key)

    async def invalidations(self, *, since: int | None = None, limit: int | None = None,
                            timeout: float | None = None) -> Invalidations:
        """Internal (gateway): `since` None asks for the current cursor only."""
        return await self._call("invalidations", timeout, since=since, limit=limit)

    # -- usage -------------------------------------------------------------------------

    async def record_usage(self, *, batch: Sequence[UsageRecord] | Sequence[Mapping[str, Any]],
                           timeout: float | None = None) -> RecordCounts:
        """Internal (gateway): idempotent by each record's `request_id`."""
        return await self._call("record_usage", timeout, batch=batch)

    async def active_users(self, *, timeout: float | None = None) -> ActiveUsers:
        """Internal (metrics)."""
        return await self._call("active_users", timeout)

    async def usage(self, *, token: str, start: str | None = None, end: str | None = None,
                    timeout: float | None = None) -> UsageReport:
        """Per UTC day and key from `start` to `end` (YYYY-MM-DD, inclusive; default the last 30 days)."""
        return await self._call("usage", timeout, token=token, start=start, end=end)

    async def report(self, *, token: str, start: str | None = None, end: str | None = None,
                     group_by: str | None = None, by: str | None = None, timeout: float | None = None) -> Report:
        """The caller's cost and usage per `group_by` ("day", "week", "month") and `by` (None, "model",
        "key"), `start` to `end` (YYYY-MM-DD, inclusive; default the last 30 days, at most 366)."""
        return await self._call("report", timeout, token=token, start=start, end=end, group_by=group_by, by=by)

    async def recent_usage(self, *, token: str, limit: int | None = None,
                           timeout: float | None = None) -> list[RecentRequest]:
        return await self._call("recent_usage", timeout, token=token, limit=limit)

    # -- administration ----------------------------------------------------------------

    async def list_users(self, *, token: str, limit: int | None = None, offset: int | None = None,
                         timeout: float | None = None) -> list[User]:
        return await self._call("list_users", timeout, token=token, limit=limit, offset=offset)

    async def set_tier(self, *, token: str, user: int | str, tier: str, timeout: float | None = None) -> User:
        return await self._call("set_tier", timeout, token=token, user=user, tier=tier)

    async def tiers(self, *, token: str | None = None, timeout: float | None = None) -> list[TierInfo]:
        """Every tier, its limits and priority (anyone logged in; the operator without a token)."""
        return await self._call("tiers", timeout, token=token)

    async def set_tier_limits(self, *, name: str, limits: Mapping[str, int | str | None],
                              priority: int | None = None, token: str | None = None,
                              timeout: float | None = None) -> TierInfo:
        """Change some of a tier's limits (None: no limit; names left out are kept; budgets as
        decimal strings) and its priority (None: kept): admins by `token`, the operator without."""
        return await self._call("set_tier_limits", timeout, name=name, limits=dict(limits), priority=priority,
                                token=token)

    async def set_budget(self, *, token: str, spend_per_day: Any = KEEP, spend_per_month: Any = KEEP,
                         user: int | str | None = None, timeout: float | None = None) -> Account:
        """Set the caller's own money budgets (decimal strings; None clears; `KEEP` keeps), or, for an
        admin, `user`'s; the account with its `budget` and effective `limits`."""
        return await self._keeping("set_budget", timeout, {"token": token, **({"user": user} if user is not None
                                                                              else {})},
                                   spend_per_day=spend_per_day, spend_per_month=spend_per_month)

    async def set_active(self, *, token: str, user: int | str, active: bool,
                         timeout: float | None = None) -> User:
        return await self._call("set_active", timeout, token=token, user=user, active=active)

    async def set_price(self, *, model: str, input: str | int, output: str | int, cached: str | int | None = None,
                        currency: str | None = None, effective_from: str | None = None, token: str | None = None,
                        timeout: float | None = None) -> Price:
        """A new price version (per million tokens, decimal strings): admins by `token`, the operator
        without one. `effective_from`: ISO 8601 with an offset, not in the past (default now)."""
        return await self._call("set_price", timeout, model=model, input=input, output=output, cached=cached,
                                currency=currency, effective_from=effective_from, token=token)

    async def price_table(self, *, since: int | None = None, timeout: float | None = None) -> PriceTable:
        """Internal (gateway): the prices in force and scheduled, with their `version`
        (`prices` None when `since` is it already)."""
        return await self._call("price_table", timeout, since=since)

    async def settings(self, *, token: str | None = None, timeout: float | None = None) -> Settings:
        """The routing settings (anyone logged in; the operator without a token)."""
        return await self._call("settings", timeout, token=token)

    async def set_settings(self, *, settings: Mapping[str, Any], token: str | None = None,
                           timeout: float | None = None) -> Settings:
        """Change some routing settings (a name left out is kept; None clears `default_model`,
        `cache_ttl` and `first_token_timeout`, [] `fallback_models`, {} `aliases`, whose value
        replaces them all): admins by `token`, the operator without one."""
        return await self._call("set_settings", timeout, settings=dict(settings), token=token)

    async def settings_table(self, *, since: int | None = None, timeout: float | None = None) -> SettingsTable:
        """Internal (gateway): the routing settings with their `version` (`settings` None when
        `since` is it already)."""
        return await self._call("settings_table", timeout, since=since)

    async def prices(self, *, token: str | None = None, model: str | None = None,
                     timeout: float | None = None) -> list[Price]:
        """The prices in force now and those scheduled (anyone logged in; the operator without a token)."""
        return await self._call("prices", timeout, token=token, model=model)

    async def top_spenders(self, *, token: str | None = None, start: str | None = None, end: str | None = None,
                           limit: int | None = None, timeout: float | None = None) -> TopSpenders:
        """Admins (by `token`) or the operator (without): users ranked by cost per currency, then requests."""
        return await self._call("top_spenders", timeout, token=token, start=start, end=end, limit=limit)

    async def audit(self, *, token: str | None = None, user: int | str | None = None, action: str | None = None,
                    since: str | None = None, until: str | None = None, limit: int | None = None,
                    before_id: int | None = None, timeout: float | None = None) -> AuditPage:
        """Audit events, newest first: the caller's own; an admin's (or the operator's, without `token`)
        everyone's, or `user`'s. `action`: an event or a prefix ("key_*")."""
        return await self._call("audit", timeout, token=token, user=user, action=action, since=since,
                                until=until, limit=limit, before_id=before_id)

    async def grant_admin(self, *, user: int | str, reason: str | None = None,
                          timeout: float | None = None) -> AdminChange:
        """The operator only (a mesh member with no role: `inferswarm admin grant`)."""
        return await self._call("grant_admin", timeout, user=user, reason=reason)

    async def revoke_admin(self, *, user: int | str, reason: str | None = None,
                           timeout: float | None = None) -> AdminChange:
        return await self._call("revoke_admin", timeout, user=user, reason=reason)
