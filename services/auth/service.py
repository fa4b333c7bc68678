"""The auth service: accounts, sessions, API keys, usage, tiers.

Public methods (any CURVE client; they carry a password or a token) and
internal ones, each for the member role named (shared/roles.py; the operator,
e.g. `inferswarm admin grant|revoke`, may call all):

    auth.register      public    username, email, password[, client_addr] -> the same answer
                                 whether the email was new or not (see `register`)
    auth.login         public    username_or_email, password[, client_addr] -> token
    auth.me            public    token -> user with tier limits
    auth.logout        public    token -> the token is revoked (until it would expire)
    auth.logout_all    public    token -> every session of the user ends, this one too
    auth.change_password public  token, old_password, new_password -> a new token; every
                                 other session ends
    auth.create_key    public    token, name[, expires_in_days | expires_at, allowed_models] -> key
                                 (shown once); allowed_models: the models it may name (null: all)
    auth.list_keys     public    token -> keys (never the key)
    auth.update_key    public    token, key_id[, name, expires_at (null: none), allowed_models
                                 (null: every model)] -> key; dropped from caches within 1 s
    auth.revoke_key    public    token, key_id -> key
    auth.rotate_key    public    token, key_id[, overlap_seconds] -> a new key (shown once) replacing
                                 it; the old one stops after the overlap (default 24 h)
    auth.usage         public    token[, start, end] -> per day and key (and model: costs)
    auth.set_tier      public    token, user, tier -> user (admins only)
    auth.set_active    public    token, user, active -> user (admins only)
    auth.set_price     public    model, input, output[, cached, currency, effective_from, token] ->
                                 the new price version (admins by token, or the operator)
    auth.prices        public    token[, model] (the operator: no token) -> current and scheduled prices
    auth.report        public    token[, start, end, group_by, by] -> the caller's cost and usage per
                                 day/week/month, by model or key
    auth.top_spenders  public    token[, start, end, limit] (the operator: no token) -> users ranked by
                                 cost per currency (admins only)
    auth.audit         public    token[, user, action, since, until, limit, before_id] (the operator: no
                                 token) -> audit events newest first: the caller's own; admins' all
    auth.grant_admin   operator  user[, reason] -> user (the operator: `inferswarm admin grant`)
    auth.revoke_admin  operator  user[, reason] -> user
    auth.token_key     public    -> the JWT public key
    auth.validate_key  gateway   api_key -> user, key, tier, limits, priority, cursor
    auth.verify_token  gateway   token -> user
    auth.record_usage  gateway   batch -> counts (idempotent by request id)
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
from datetime import date, datetime, timedelta, timezone
from typing import Any

import asyncpg

from shared.errors import Conflict, Forbidden, InvalidParams, RateLimited, Unauthenticated
from shared.logging import get_logger
from shared.roles import OPERATOR
from shared.rpc import current_request, method
from shared.tiers import DEFAULT_TIER, TierName, TierTable
from services.auth import keys as apikeys
from services.auth import validation as check
from services.auth.key_edits import check_allowed_models, check_expiry
from services.auth.housekeeping import Housekeeper
from services.auth.invalidation import InvalidationFeed
from services.auth.passwords import PasswordHasher
from services.auth import prices as money
from services.auth import audit as audit_log
from services.auth import reports
from services.auth.price_store import PriceStore
from services.auth.records import parse_batch
from services.auth.store import AuthStore
from services.auth.registration import RegistrationThrottle
from services.auth.throttle import LoginThrottle
from services.auth.tokens import TokenIssuer
from services.auth.usage_store import UsageStore

__all__ = ["AuthService"]

log = get_logger(__name__)

_MAX_REFUSALS = 10_000
_MAX_RANGE_DAYS = 366
_MAX_ADDR = 64
#: Rotation: how long the old key keeps working by default, and at most (30 days).
DEFAULT_OVERLAP_S = 86_400
MAX_OVERLAP_S = 30 * 86_400


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _key_view(key: asyncpg.Record) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    if key["revoked_at"] is not None:
        status = "revoked"
    elif key["expires_at"] is not None and key["expires_at"] <= now:
        status = "expired"
    else:
        status = "active"
    return {
        "id": key["id"], "name": key["name"], "prefix": key["prefix"], "status": status,
        "created_at": _iso(key["created_at"]), "last_used_at": _iso(key["last_used_at"]),
        "expires_at": _iso(key["expires_at"]), "revoked_at": _iso(key["revoked_at"]),
        "rotated_from": key["rotated_from"],
        "allowed_models": list(key["allowed_models"]) if key["allowed_models"] is not None else None,
    }


#: An `update_key` parameter left out: keep the key's value (null is a value: clear it).
KEEP: Any = ...


class AuthService:
    """Who may do what, and the record of what was done."""

    name = "auth"

    def __init__(
        self, store: AuthStore, usage: UsageStore, *, passwords: PasswordHasher,
        tokens: TokenIssuer, tiers: TierTable, throttle: LoginThrottle, feed: InvalidationFeed,
        housekeeper: Housekeeper, registrations: RegistrationThrottle | None = None,
        max_keys_per_user: int = 100, max_key_days: int = 3650, prices: PriceStore | None = None,
    ) -> None:
        self.store = store  #: the accounts' SQL (services/auth/store.py)
        self._usage = usage
        self._prices = prices or PriceStore(usage.pool)
        self._passwords = passwords
        self._tokens = tokens
        self._tiers = tiers
        self._throttle = throttle
        self._registrations = registrations or RegistrationThrottle(store)
        #: The parts an operator's tools and the tests may read: the invalidation
        #: feed (cursor, trust), the key cache it keeps in step, the usage flusher.
        self.feed = feed
        self.cache = feed.cache
        self.housekeeper = housekeeper
        self._max_keys = max_keys_per_user
        self._max_key_days = max_key_days
        #: Keys refused for good (unknown, revoked, expired): hash -> reason.
        self._refused: dict[bytes, str] = {}

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
        """The account behind a token, with its tier's limits."""
        user = await self._authenticate(token)
        tier = self._tiers[user["tier"]]
        return {**self._user_view(user), "limits": tier.limits(), "priority": tier.priority}

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
        """Internal: the account behind a token, checked against the database."""
        user = await self._authenticate(token)
        tier = self._tiers[user["tier"]]
        return {**self._user_view(user), "limits": tier.limits(), "priority": tier.priority}

    # -- API keys --------------------------------------------------------------------

    @method(public=True)
    async def create_key(
        self, token: str, name: str, expires_in_days: int | None = None, expires_at: str | None = None,
        allowed_models: list[str] | None = None,
    ) -> dict[str, Any]:
        """A new API key; the `api_key` field is the only time it is ever shown. It expires
        after `expires_in_days` or at `expires_at` (ISO 8601; not both; default never), and
        may name only `allowed_models` (1-64 model names; default every model)."""
        user = await self._authenticate(token)
        name = check.check_name(name)
        when = None
        if expires_in_days is not None and expires_at is not None:
            raise InvalidParams("give expires_in_days or expires_at, not both", {"param": "expires_at"})
        if expires_in_days is not None:
            if not 1 <= expires_in_days <= self._max_key_days:
                raise InvalidParams(
                    f"expires_in_days must be 1-{self._max_key_days}", {"param": "expires_in_days"}
                )
            when = datetime.now(timezone.utc) + timedelta(days=expires_in_days)
        elif expires_at is not None:
            when = check_expiry(expires_at, max_days=self._max_key_days)
        models = check_allowed_models(allowed_models) if allowed_models is not None else None
        api_key = apikeys.generate_key()
        key = await self.store.create_key(
            user["id"], name, apikeys.hash_key(api_key), apikeys.display_prefix(api_key),
            when, max_keys=self._max_keys, allowed_models=models,
        )
        log.info("api key created", user_id=user["id"], key_id=key["id"])
        return {**_key_view(key), "api_key": api_key}

    @method(public=True)
    async def update_key(
        self, token: str, key_id: int, name: Any = KEEP, expires_at: Any = KEEP, allowed_models: Any = KEEP,
    ) -> dict[str, Any]:
        """Edit one of the caller's keys: its `name`, `expires_at` (ISO 8601, in the future;
        null: never expires) or `allowed_models` (1-64 model names; null: every model). A
        parameter left out is kept. Gateways drop their cached answer for the key within a
        second. `CONFLICT` for a revoked key, `NOT_FOUND` for anyone else's."""
        user = await self._authenticate(token)
        key_id = _check_id(key_id, "key_id")
        changes: dict[str, Any] = {}
        if name is not KEEP:
            if not isinstance(name, str):
                raise InvalidParams("name must be text", {"param": "name"})
            changes["name"] = check.check_name(name)
        if expires_at is not KEEP:
            changes["expires_at"] = None if expires_at is None else check_expiry(
                expires_at, max_days=self._max_key_days)
        if allowed_models is not KEEP:
            changes["allowed_models"] = None if allowed_models is None else check_allowed_models(allowed_models)
        if not changes:
            raise InvalidParams("nothing to change: give name, expires_at or allowed_models", {"param": "name"})
        key = await self.store.update_key(user["id"], key_id, changes)
        self.cache.evict(key_id=key_id)  # here at once; other instances and gateways via the log
        log.info("api key updated", user_id=user["id"], key_id=key_id, fields=sorted(changes))
        return _key_view(key)

    @method(public=True, idempotent=True)
    async def list_keys(self, token: str) -> list[dict[str, Any]]:
        """The caller's keys, newest last: names, prefixes, dates, status; never a key."""
        user = await self._authenticate(token)
        return [_key_view(key) for key in await self.store.list_keys(user["id"])]

    @method(public=True, idempotent=True)
    async def revoke_key(self, token: str, key_id: int) -> dict[str, Any]:
        """Revoke one of the caller's keys, everywhere within a second."""
        user = await self._authenticate(token)
        key = await self.store.revoke_key(user["id"], _check_id(key_id, "key_id"), user["id"])
        self.cache.evict(key_id=key_id)  # here at once; other instances via the log
        log.info("api key revoked", user_id=user["id"], key_id=key_id)
        return _key_view(key)

    @method(public=True)
    async def rotate_key(
        self, token: str, key_id: int, overlap_seconds: int = DEFAULT_OVERLAP_S
    ) -> dict[str, Any]:
        """Replace one of the caller's keys: a new key (`api_key` shown once) with the old
        one's name and expiry and `rotated_from` naming it; the old key keeps working for
        `overlap_seconds` (0..30 days; never longer than its own expiry) and is refused after
        that, everywhere within a second. `old_key` is the old key as it now is."""
        user = await self._authenticate(token)
        key_id = _check_id(key_id, "key_id")
        if isinstance(overlap_seconds, bool) or not 0 <= overlap_seconds <= MAX_OVERLAP_S:
            raise InvalidParams(f"overlap_seconds must be 0-{MAX_OVERLAP_S} (30 days)",
                                {"param": "overlap_seconds"})
        api_key = apikeys.generate_key()
        old, new = await self.store.rotate_key(
            user["id"], key_id, apikeys.hash_key(api_key), apikeys.display_prefix(api_key),
            overlap_seconds, max_keys=self._max_keys,
        )
        self.cache.evict(key_id=key_id)  # its cached expiry is the old one; other instances via the log
        log.info("api key rotated", user_id=user["id"], key_id=key_id, new_key_id=new["id"],
                 overlap_seconds=overlap_seconds)
        return {**_key_view(new), "api_key": api_key, "old_key": _key_view(old)}

    @method(idempotent=True, roles=("gateway",))
    async def validate_key(self, api_key: str) -> dict[str, Any]:
        """Internal: who a key belongs to and what it may do, or `UNAUTHENTICATED`.

        From memory when the cache is trusted; `cursor` is the invalidation
        seq this answer reflects (callers caching it compare it with theirs).
        """
        # Cheap checks only before the cache: a hash found there is a real key.
        if not apikeys.MIN_KEY_LENGTH <= len(api_key) <= apikeys.MAX_KEY_LENGTH:
            raise Unauthenticated("invalid API key")
        key_hash = apikeys.hash_key(api_key)
        feed = self.feed
        if feed.trusted:
            entry = self.cache.get(key_hash)
            if entry is not None:
                self.housekeeper.touch(entry.key_id)
                return {**entry.result, "cursor": feed.cursor}
        refusal = self._refused.get(key_hash)
        if refusal is not None:
            raise Unauthenticated(refusal)
        if not apikeys.looks_like_key(api_key):
            raise Unauthenticated("invalid API key")
        return await self._validate_from_database(key_hash)

    async def _validate_from_database(self, key_hash: bytes) -> dict[str, Any]:
        epoch, cursor = self.cache.epoch, self.feed.cursor
        row = await self.store.key_by_hash(key_hash)
        if row is None or not apikeys.same_hash(row["key_hash"], key_hash):
            self._refuse(key_hash, "invalid API key")
        if row["revoked_at"] is not None:
            self._refuse(key_hash, "API key revoked")
        expires_at = row["expires_at"].timestamp() if row["expires_at"] is not None else None
        if expires_at is not None and expires_at <= datetime.now(timezone.utc).timestamp():
            self._refuse(key_hash, "API key expired")
        if not row["is_active"]:
            raise Unauthenticated("account disabled")  # not for good: it may be re-enabled
        tier = self._tiers[row["tier"]]
        result = {
            "user_id": row["user_id"], "key_id": row["id"], "tier": tier.name,
            "limits": tier.limits(), "priority": tier.priority, "expires_at": expires_at,
            "allowed_models": list(row["allowed_models"]) if row["allowed_models"] is not None else None,
        }
        # Cache only if no invalidation arrived while we read: it may concern this key.
        if self.cache.epoch == epoch:
            self.cache.put(key_hash, result, user_id=row["user_id"], key_id=row["id"],
                            expires_at=expires_at)
        self.housekeeper.touch(row["id"])
        return {**result, "cursor": cursor}

    def _refuse(self, key_hash: bytes, reason: str) -> None:
        if len(self._refused) >= _MAX_REFUSALS:
            del self._refused[next(iter(self._refused))]
        self._refused[key_hash] = reason
        raise Unauthenticated(reason)

    @method(idempotent=True, roles=("gateway",))
    async def invalidations(self, since: int | None = None, limit: int = 1000) -> dict[str, Any]:
        """Internal: invalidation entries after `since` (None: just the current cursor).

        `reset` means the caller's cursor is unknown here (pruned, or another
        database): drop the whole cache. `more` means call again at once.
        """
        if not 1 <= limit <= 10_000:
            raise InvalidParams("limit must be 1-10000", {"param": "limit"})
        if since is not None and not 0 <= since < 2**63:
            raise InvalidParams("since must be a cursor from a previous call", {"param": "since"})
        if since is None:
            _, newest, _ = await self.store.invalidations_since(2**62, 1)
            return {"cursor": newest, "entries": [], "reset": False, "more": False}
        rows, newest, oldest = await self.store.invalidations_since(since, limit)
        reset = since > newest or since < oldest - 1
        entries = [{"seq": r["seq"], "key_id": r["key_id"], "user_id": r["user_id"]} for r in rows]
        more = len(rows) == limit
        cursor = rows[-1]["seq"] if more else newest
        return {"cursor": cursor, "entries": entries, "reset": reset, "more": more}

    # -- usage ---------------------------------------------------------------------------

    @method(idempotent=True, roles=("gateway",))
    async def record_usage(self, batch: list) -> dict[str, int]:  # type: ignore[type-arg]
        """Internal: store usage records; a request id already stored is not counted again."""
        return await self._usage.record(parse_batch(batch))

    @method(idempotent=True, roles=("metrics",))
    async def active_users(self) -> dict[str, int]:
        """Internal: distinct users with a request in the last hour and 24 hours."""
        return await self._usage.active_users()

    @method(public=True, idempotent=True)
    async def usage(self, token: str, start: str | None = None, end: str | None = None) -> dict[str, Any]:
        """Per UTC day and per key, from `start` to `end` (ISO dates, inclusive; default 30 days)."""
        user = await self._authenticate(token)
        last = _parse_day(end, "end") if end is not None else datetime.now(timezone.utc).date()
        first = _parse_day(start, "start") if start is not None else last - timedelta(days=29)
        if first > last or (last - first).days >= _MAX_RANGE_DAYS:
            raise InvalidParams(f"start must be before end, at most {_MAX_RANGE_DAYS} days apart")
        rows = await self._usage.daily(user["id"], first, last)
        costs = await self._usage.costs(user["id"], first, last)
        by_day_key: dict[tuple[date, int | None], list[asyncpg.Record]] = {}
        for c in costs:
            by_day_key.setdefault((c["day"], c["key_id"]), []).append(c)
        days = [{
            "day": r["day"].isoformat(), "key_id": r["key_id"], "key_name": r["key_name"],
            "key_prefix": r["key_prefix"], "requests": r["requests"],
            "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
            "tokens": r["prompt_tokens"] + r["completion_tokens"], "errors": r["errors"],
            "cache_hits": r["cache_hits"], **_cost_totals(by_day_key.get((r["day"], r["key_id"]), [])),
        } for r in rows]
        totals: dict[str, Any] = {f: sum(d[f] for d in days) for f in
                                  ("requests", "prompt_tokens", "completion_tokens", "tokens", "errors",
                                   "cache_hits")}
        totals.update(_cost_totals(costs))
        models = [{
            "day": c["day"].isoformat(), "key_id": c["key_id"], "model": c["model"],
            "currency": c["currency"] or None, "requests": c["requests"],
            "cost": money.money(c["cost"]) if c["currency"] else None, "unpriced": c["unpriced"],
        } for c in costs]
        return {"start": first.isoformat(), "end": last.isoformat(), "days": days, "totals": totals,
                "costs": models}

    @method(public=True, idempotent=True)
    async def report(self, token: str, start: str | None = None, end: str | None = None,
                     group_by: str = "day", by: str | None = None) -> dict[str, Any]:
        """The caller's cost and usage per UTC day, ISO week or month (`group_by`), and per model or
        key (`by`), from `start` to `end` (YYYY-MM-DD, inclusive; default the last 30 days, at most 366).
        See reports.py for the rows' shape."""
        user = await self._authenticate(token)
        first, last = reports.day_range(start, end)
        period, dimension = reports.check_period(group_by), reports.check_by(by)
        # One user: the seam where an organisation's report would pass its members (reports.py).
        records = await self._usage.report([user["id"]], first, last, period, dimension)
        return {"start": first.isoformat(), "end": last.isoformat(), "group_by": period, "by": dimension,
                "rows": reports.report_rows(records, dimension), "totals": reports.report_totals(records)}

    @method(public=True, idempotent=True)
    async def top_spenders(self, token: str | None = None, start: str | None = None, end: str | None = None,
                           limit: int = 10) -> dict[str, Any]:
        """Admins (by token) or the operator (no token): the `limit` (1-100) users who spent most in
        each currency from `start` to `end` (as `report`), by cost then requests; the requests
        without a price are ranked apart (`currency` None), by their number."""
        await self._admin_or_operator(token)
        first, last = reports.day_range(start, end)
        records = await self._usage.top_spenders(first, last, reports.check_limit(limit))
        return {"start": first.isoformat(), "end": last.isoformat(), "spenders": reports.spender_rows(records)}

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
        ref = None if user is None else _user_ref(user)
        if caller is not None and not caller["is_admin"]:
            # Compared, not looked up: a user learns nothing of whether another account exists.
            own = (caller["id"],) if isinstance(ref, int) else (check.fold(caller["username"]),
                                                                  check.fold(caller["email"]))
            if ref is not None and (ref if isinstance(ref, int) else check.fold(ref)) not in own:
                raise Forbidden("only administrators may read another user's events")
            return int(caller["id"])
        return None if ref is None else int((await self.store.find_user(ref))["id"])

    # -- prices --------------------------------------------------------------------------

    @method(public=True)
    async def set_price(
        self, model: str, input: str | int, output: str | int, cached: str | int | None = None,
        currency: str = "USD", effective_from: str | None = None, token: str | None = None,
    ) -> dict[str, Any]:
        """A new version of a model's price per million tokens (decimal strings), from
        `effective_from` (ISO 8601 with an offset, not in the past; default now) on.

        Admins by their token; the operator (a member of the operator role) without one.
        Usage already stored keeps its cost.
        """
        actor_id = await self._admin_or_operator(token)
        row = await self._prices.set_price(
            money.check_model(model), money.check_price(input, "input"), money.check_price(output, "output"),
            None if cached is None else money.check_price(cached, "cached"), money.check_currency(currency),
            None if effective_from is None else money.check_moment(effective_from, "effective_from"),
            actor_id=actor_id, by="admin" if actor_id is not None else "operator",
        )
        log.info("price set", model=model, actor_id=actor_id, effective_from=row["effective_from"].isoformat())
        return money.price_view(row, row["now"])

    @method(public=True, idempotent=True)
    async def prices(self, token: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
        """Every model's price in force now and those scheduled, by model then time: anyone
        logged in (the operator without a token)."""
        if token is not None:
            await self._authenticate(token)
        elif not _is_operator():
            raise Unauthenticated("a session token is needed")
        rows = await self._prices.prices(None if model is None else money.check_model(model))
        return [money.price_view(row, row["now"]) for row in rows]

    async def _admin_or_operator(self, token: str | None) -> int | None:
        """Who sets a price or reads every user's spending: an admin's id, or None for the operator;
        else refused."""
        if token is not None:
            return int((await self._authenticate_admin(token))["id"])
        if not _is_operator():
            raise Unauthenticated("an administrator's session token is needed")
        return None

    # -- administration ----------------------------------------------------------------

    @method(public=True, idempotent=True)
    async def recent_usage(self, token: str, limit: int = 20) -> list[dict[str, Any]]:
        """The caller's latest requests (at most 100), newest first: for the dashboard."""
        user = await self._authenticate(token)
        if not 1 <= limit <= 100:
            raise InvalidParams("limit must be between 1 and 100", {"param": "limit"})
        rows = await self._usage.recent(user["id"], limit)
        return [{
            "created_at": _iso(r["created_at"]), "model": r["model"], "key_name": r["key_name"],
            "key_prefix": r["key_prefix"], "prompt_tokens": r["prompt_tokens"],
            "completion_tokens": r["completion_tokens"], "cached": r["cached"],
            "latency_ms": r["latency_ms"], "status": r["status"],
        } for r in rows]

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
        target = await self.store.find_user(_user_ref(user))
        updated = await self.store.set_tier(target["id"], tier, actor["id"])
        self.cache.evict(user_id=target["id"])
        log.info("tier changed", user_id=target["id"], tier=tier, actor_id=actor["id"])
        return self._user_view(updated)

    @method(public=True, idempotent=True)
    async def set_active(self, token: str, user: int | str, active: bool) -> dict[str, Any]:
        """Admins only: disable (or re-enable) an account and, with it, all its keys."""
        actor = await self._authenticate_admin(token)
        target = await self.store.find_user(_user_ref(user))
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
        target = await self.store.find_user(_user_ref(user))
        updated, changed = await self.store.set_admin(target["id"], is_admin, details)
        if changed:
            log.info("admin granted" if is_admin else "admin revoked", user_id=target["id"])
        return {**self._user_view(updated), "changed": changed}

    # -- helpers -------------------------------------------------------------------------

    async def _authenticate(self, token: str) -> asyncpg.Record:
        """The active account behind a valid, unrevoked token, else `UNAUTHENTICATED`."""
        user_id, claims = self._claims(token)
        user = await self.store.session_user(user_id, str(claims["jti"]), _epoch_of(claims))
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

    def _user_view(self, user: asyncpg.Record) -> dict[str, Any]:
        return {
            "id": user["id"], "username": user["username"], "email": user["email"],
            "tier": user["tier"], "is_admin": user["is_admin"],
            "is_active": user["is_active"], "created_at": _iso(user["created_at"]),
        }


def _is_operator() -> bool:
    """The caller holds the mesh secret itself (`inferswarm admin`), or calls in-process."""
    ctx = current_request.get()
    return ctx is None or (ctx.member and ctx.role == OPERATOR)


def _cost_totals(costs: list[asyncpg.Record]) -> dict[str, Any]:
    """`cost`: the sum per currency, as decimal strings; `unpriced`: requests without a price."""
    sums: dict[str, Any] = {}
    for c in costs:
        if c["currency"]:
            sums[c["currency"]] = sums.get(c["currency"], 0) + c["cost"]
    return {"cost": {cur: money.money(total) for cur, total in sorted(sums.items())},
            "unpriced": sum(c["unpriced"] for c in costs)}


def _epoch_of(claims: dict[str, Any]) -> int:
    """The session epoch a token was issued in (`sep`; 0 for tokens from before epochs)."""
    epoch = claims.get("sep", 0)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 2**31:
        raise Unauthenticated("invalid token")
    return epoch


def _parse_day(text: str, param: str) -> date:
    try:
        if len(text) != 10:
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidParams(f"{param} must be a date as YYYY-MM-DD", {"param": param}) from None


def _check_id(value: int, param: str) -> int:
    """A database id: 1 to 2**63-1, else `INVALID_PARAMS` (never an overflow in SQL)."""
    if not 0 < value < 2**63:
        raise InvalidParams(f"{param} is not a valid id", {"param": param})
    return value


def _user_ref(user: int | str) -> int | str:
    if isinstance(user, int):
        return _check_id(user, "user")
    if not 0 < len(user) <= check.MAX_EMAIL:
        raise InvalidParams("user must be an id, a username or an email", {"param": "user"})
    return user


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
