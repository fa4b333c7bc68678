"""The auth service: accounts, sessions, API keys, usage, tiers, routing settings, organisations,
dead letters.

Public methods (any CURVE client; they carry a password or a token) and
internal ones, each for the member role named (shared/roles.py; the operator,
e.g. `inferswarm admin grant|revoke`, may call all):

    auth.register      public    username, email, password[, client_addr] -> the same answer
                                 whether the email was new or not (see `register`)
    auth.login         public    username_or_email, password[, client_addr] -> token
    auth.me            public    token -> user with budget, limits (the tighter of tier and budget),
                                 priority, currency
    auth.logout        public    token -> the token is revoked (until it would expire)
    auth.logout_all    public    token -> every session of the user ends, this one too
    auth.change_password public  token, old_password, new_password -> a new token; every
                                 other session ends
    auth.create_key    public    token, name[, expires_in_days | expires_at, allowed_models, limits, org] ->
                                 key (shown once); allowed_models: the models it may name (null: all);
                                 limits: the key's own (requests_per_hour, ..., spend_per_month);
                                 org: a key of that organisation (the caller's)
    auth.list_keys     public    token -> keys (never the key)
    auth.update_key    public    token, key_id[, name, expires_at (null: none), allowed_models
                                 (null: every model), limits (a name null: none)] -> key; dropped
                                 from caches within 1 s
    auth.revoke_key    public    token, key_id -> key
    auth.rotate_key    public    token, key_id[, overlap_seconds] -> a new key (shown once) replacing
                                 it; the old one stops after the overlap (default 24 h)
    auth.usage         public    token[, start, end] -> per day and key (and model: costs)
    auth.set_budget    public    token[, spend_per_day, spend_per_month (null: none), user (admins)]
                                 -> the account as `me` shows it; dropped from caches within 1 s
    auth.set_tier      public    token, user, tier -> user (admins only)
    auth.set_active    public    token, user, active -> user (admins only)
    auth.tiers         public    [token] (the operator: no token) -> every tier: limits, priority
    auth.set_tier_limits public  name, limits[, priority, token] -> the tier (admins by token, or the
                                 operator); every cache drops its answers within 1 s
    auth.settings      public    [token] (the operator: no token) -> default_model, fallback_models,
                                 cache_ttl, aliases, first_token_timeout, updated_at (README.md,
                                 "Routing settings")
    auth.set_settings  public    settings[, token] -> the settings (admins by token, or the operator);
                                 gateways apply them within 1 s
    auth.dead_letters  public    [token, limit, before, model] (the operator: no token) -> requests that
                                 failed after every fallback, newest first (admins only)
    auth.set_price     public    model, input, output[, cached, currency, effective_from, token] ->
                                 the new price version (admins by token, or the operator)
    auth.prices        public    token[, model] (the operator: no token) -> current and scheduled prices
    auth.report        public    token[, start, end, group_by, by] -> the caller's cost and usage per
                                 day/week/month, by model or key
    auth.top_spenders  public    token[, start, end, limit] (the operator: no token) -> users ranked by
                                 cost per currency (admins only)
    auth.audit         public    token[, user, action, since, until, limit, before_id] (the operator: no
                                 token) -> audit events newest first: the caller's own; admins' all
    auth.set_webhook   public    token, url[, thresholds] -> the webhook, its signing secret (once, when
                                 created); refused for a non-public address (README.md, "Spending alerts")
    auth.webhook       public    token[, user (admins)] -> url, thresholds, created_at (never the secret)
    auth.remove_webhook public   token -> {removed}
    auth.rotate_webhook_secret public  token -> the webhook with a new secret (once)
    auth.webhook_deliveries public  token[, limit, before_id, user (admins)] -> the delivery log
    auth.alerts        public    token[, limit, user (admins)] -> the latest spending alerts
    auth.create_org    public    token, name -> the organisation (the caller owns it)
    auth.orgs          public    token -> the caller's organisations and roles
    auth.org           public    token, org -> limits, members, pending invitations (members only)
    auth.invite        public    token, org, username[, role] -> invitation (owners, admins)
    auth.invitations   public    token -> invitations to the caller not answered yet
    auth.answer_invite public    token, invite_id, accept -> {accepted, org}
    auth.set_member_role public  token, org, user, role -> member (owners; the last owner stays)
    auth.remove_member public    token, org, user -> {removed, revoked_keys} (owners, admins; or leaving)
    auth.set_org_limits public   token, org, limits -> the organisation (owners, admins); gateways
                                 apply it within 1 s
    auth.org_report    public    token, org[, start, end, group_by, by] -> usage of its keys by member,
                                 model or key (a plain member: their own)
    auth.grant_admin   operator  user[, reason] -> user (the operator: `inferswarm admin grant`)
    auth.revoke_admin  operator  user[, reason] -> user
    auth.token_key     public    -> the JWT public key
    auth.validate_key  gateway   api_key -> user, key, tier, limits, org_id, scopes (user; key when it has
                                 limits; org for an organisation's key), currency, priority, cursor
    auth.verify_token  gateway   token -> user as `me`, scopes (user)
    auth.record_usage  gateway   batch -> counts (idempotent by request id)
    auth.price_table   gateway   [since] -> {version, prices (None: unchanged since `since`)}
    auth.settings_table gateway  [since] -> {version, settings (None: unchanged since `since`)}
    auth.invalidations gateway   since[, limit] -> entries after the cursor
    auth.active_users  metrics   -> distinct users over 1 h and 24 h (for metrics)

Nobody becomes an administrator by registering: `is_admin` is set only by
`grant_admin`, which mesh members alone may call, and read from the database
on every admin call.

`validate_key` answers from an in-memory cache kept in step with the
invalidation log by an `InvalidationFeed` (see README.md, "Revocation").
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timezone
from typing import Any

from shared.errors import Conflict, Forbidden, InvalidParams, RateLimited, Unauthenticated
from shared.logging import get_logger
from shared.rpc import current_request, method
from shared.tiers import DEFAULT_TIER
from services.auth import validation as check
from services.auth.passwords import PasswordHasher
from services.auth.admin_methods import AdminMethods
from services.auth.alert_methods import AlertMethods
from services.auth.billing_methods import BillingMethods
from services.auth.dead_letter_methods import DeadLetterMethods
from services.auth.key_methods import KeyMethods
from services.auth.org_methods import OrgMethods
from services.auth.setting_methods import SettingMethods
from services.auth.tier_methods import TierMethods

__all__ = ["AuthService"]

log = get_logger(__name__)

_MAX_ADDR = 64


class AuthService(KeyMethods, BillingMethods, AdminMethods, TierMethods, SettingMethods, AlertMethods, OrgMethods,
                  DeadLetterMethods):
    """Who may do what, and the record of what was done: accounts and sessions here; keys,
    usage and prices, administration, tiers, routing settings, spending alerts, organisations, dead
    letters in their handler classes."""

    name = "auth"

    # -- accounts and sessions ---------------------------------------------------

    @method(public=True)
    async def register(
        self, username: str, email: str, password: str, client_addr: str | None = None
    ) -> dict[str, Any]:
        """Create an account on the free tier, never an admin.

        Counted per source and overall before anything is hashed
        (registration.py): `RATE_LIMITED` with `retry_after` past a limit. A
        taken username is `CONFLICT` (usernames are public handles). A taken
        email is not told to the public: the password is hashed all the same
        and the answer is the one a new account gets, `{username, email, tier,
        is_admin, message}`, with no id; nothing is written. Only a mesh member
        naming no client (the operator's tools) gets the account itself and
        `CONFLICT` for a taken email.
        """
        username = check.check_username(username)
        email = check.check_email(email)
        check.check_password(password, username=username, email=email)
        addr, peer = self._login_source(client_addr)
        public = addr is not None or peer is not None
        self._passwords.check_room()
        if await self.store.username_taken(username):  # cheap, and public anyway
            raise Conflict("username already registered")
        await self._registrations.count(self._registrations.source(addr, peer))
        password_hash = await self._passwords.hash(password)
        user = await self.store.create_user(username, email, password_hash, tier=DEFAULT_TIER)
        if user is not None:
            log.info("user registered", user_id=user["id"])
        elif not public:
            raise Conflict("email already registered")
        else:
            log.info("registration for a registered email: answered as a new one")
        if not public:
            return self._user_view(user)
        return {"username": username, "email": email, "tier": DEFAULT_TIER, "is_admin": False,
                "message": "account created: log in"}

    @method(public=True)
    async def login(
        self, username_or_email: str, password: str, client_addr: str | None = None
    ) -> dict[str, Any]:
        """A session token for the right password; guesses are throttled before they are hashed.

        The attempt is reserved (counted) first, then hashed: concurrent
        guesses queue on the account's count, and a locked one is refused
        without a hash (see throttle.py for who gets through a lock). A full
        hashing queue refuses at once, before anything is written.
        """
        identifier = check.check_login_identifier(username_or_email)
        if len(password) > check.MAX_PASSWORD * 4:
            raise InvalidParams("password too long", {"param": "password"})
        addr, peer = self._login_source(client_addr)
        self._passwords.check_room()
        user = await self.store.user_by_login(identifier)
        attempt = self._throttle.attempt(user["id"] if user else None, identifier, addr=addr, peer=peer)
        held = await self._throttle.reserve(attempt)
        try:
            verdict = await self._passwords.verify(user["password_hash"] if user else None, password)
        except RateLimited:  # the queue filled up meanwhile: no verdict, so not counted
            await self._throttle.release(held)
            raise
        if not verdict.ok:
            reason = "bad_password" if user else "unknown_user"
            caller = f"addr:{addr}" if addr is not None else f"peer:{peer}" if peer is not None else None
            await self.store.audit("login_failed", user["id"] if user else None, None,
                                    {"reason": reason, "caller": caller})
            raise Unauthenticated("wrong username/email or password")
        if not user["is_active"]:
            raise Forbidden("this account is disabled")
        if verdict.new_hash is not None:  # parameters changed since it was hashed
            await self.store.set_password_hash(user["id"], verdict.new_hash)
        await self._throttle.succeeded(held)
        token, expires_at = self._tokens.issue(str(user["id"]), name=user["username"],
                                               sep=user["session_epoch"])
        return {"token": token, "expires_at": expires_at, "user": self._user_view(user)}

    def _login_source(self, client_addr: str | None) -> tuple[str | None, str | None]:
        """Where a login or registration comes from: (an address, else the caller's key).

        The address is the client's as a member vouches for it (web: the HTTP
        client), else a direct caller's own, as its TCP connection shows it
        (`Peer-Address`): a real address costs an attacker something, so it
        counts, and may pass an account's lock, as web's does (see throttle.py).
        A caller on this host (loopback) counts by its key instead -- a key is
        chosen by its caller, so it only ever counts against itself -- or every
        local user would share one count. (None, None): a member that named no
        client.
        """
        ctx = current_request.get()
        if client_addr is not None:
            if ctx is not None and not ctx.member:
                raise Forbidden("client_addr is accepted from mesh members only")
            if not 0 < len(client_addr) <= _MAX_ADDR:
                raise InvalidParams(f"client_addr must be 1-{_MAX_ADDR} characters", {"param": "client_addr"})
            return client_addr, None
        if ctx is not None and not ctx.member:
            if ctx.peer_addr and not _is_loopback(ctx.peer_addr):
                return ctx.peer_addr, None
            if ctx.peer:
                return None, ctx.peer
        return None, None

    @property
    def passwords(self) -> PasswordHasher:
        """The password hasher: its bounds and counters (`admitted`, `completed`, `refused`)."""
        return self._passwords

    @method(public=True, idempotent=True)
    async def me(self, token: str) -> dict[str, Any]:
        """The account behind a token, with its own `budget`, its effective `limits` (the
        tighter of its tier's and its budget's), `priority` and the platform `currency`."""
        return self._account_view(await self._authenticate(token))

    @method(public=True, idempotent=True)
    async def logout(self, token: str) -> dict[str, Any]:
        """End this session: the token is refused from now on, everywhere."""
        user_id, claims = self._claims(token)
        expires_at = datetime.fromtimestamp(int(claims["exp"]), timezone.utc)
        revoked = await self.store.revoke_token(str(claims["jti"]), user_id, expires_at)
        if revoked:
            log.info("session ended", user_id=user_id)
        return {"logged_out": True}

    @method(public=True)
    async def logout_all(self, token: str) -> dict[str, Any]:
        """End every session of the token's user, this one included, at once with auth
        (gateways reuse a token's answer at most 1 s)."""
        user = await self._authenticate(token)
        if await self.store.end_sessions(user["id"], user["session_epoch"]) is None:
            raise Unauthenticated("session ended, or account disabled or removed")
        log.info("every session ended", user_id=user["id"])
        return {"logged_out": True, "everywhere": True}

    @method(public=True)
    async def change_password(
        self, token: str, old_password: str, new_password: str, client_addr: str | None = None
    ) -> dict[str, Any]:
        """Set a new password (the rules of registration) after checking the old one,
        throttled like a login; every session of the user ends, and the caller gets a new
        token `{token, expires_at, user}` for this one."""
        user = await self._authenticate(token)
        if len(old_password) > check.MAX_PASSWORD * 4:
            raise InvalidParams("password too long", {"param": "old_password"})
        try:
            check.check_password(new_password, username=user["username"], email=user["email"])
        except InvalidParams as exc:
            raise InvalidParams(exc.message, {"param": "new_password"}) from None
        addr, peer = self._login_source(client_addr)
        self._passwords.check_room()
        attempt = self._throttle.attempt(user["id"], user["username"], addr=addr, peer=peer)
        held = await self._throttle.reserve(attempt)
        try:
            verdict = await self._passwords.verify(user["password_hash"], old_password)
        except RateLimited:
            await self._throttle.release(held)
            raise
        if not verdict.ok:
            caller = f"addr:{addr}" if addr is not None else f"peer:{peer}" if peer is not None else None
            await self.store.audit("password_change_failed", user["id"], user["id"], {"caller": caller})
            raise Unauthenticated("wrong password", {"param": "old_password"})
        await self._throttle.succeeded(held)
        new_hash = await self._passwords.hash(new_password)
        epoch = await self.store.end_sessions(user["id"], user["session_epoch"], password_hash=new_hash,
                                               event="password_changed")
        if epoch is None:  # every session ended meanwhile, this one too
            raise Unauthenticated("session ended, or account disabled or removed")
        log.info("password changed", user_id=user["id"])
        fresh, expires_at = self._tokens.issue(str(user["id"]), name=user["username"], sep=epoch)
        return {"token": fresh, "expires_at": expires_at, "user": self._user_view(user)}

    @method(public=True, idempotent=True)
    async def token_key(self) -> dict[str, Any]:
        """The public key (PEM) and claims other services need to verify tokens locally."""
        return {
            "algorithm": "EdDSA", "public_key": self._tokens.public_pem, "kid": self._tokens.key_id,
            "issuer": self._tokens.issuer, "audience": self._tokens.audience,
        }

    @method(idempotent=True, roles=("gateway",))
    async def verify_token(self, token: str) -> dict[str, Any]:
        """Internal: the account behind a token, checked against the database, as `me` shows it,
        with `scopes`: the user scope alone (a session has no key)."""
        account = self._account_view(await self._authenticate(token))
        return {**account, "scopes": [{"scope": "user", "id": account["id"], "limits": account["limits"]}]}


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
