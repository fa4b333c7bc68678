"""The auth service's configuration, read once from the environment.

    DATABASE_URL                         PostgreSQL to use (else the embedded one, database "auth")
    DATABASE_REPLICA_URL                 a streaming replica of it, for reports (unset: none; README.md,
                                         "Read replica")
    INFERSWARM_ADMIN_EMAILS              no longer read, and refused when set (see RETIRED_ADMIN_EMAILS)
    INFERSWARM_TOKEN_TTL                 session token lifetime, seconds (3600)
    INFERSWARM_AUTH_JWT_KEY_FILE         Ed25519 signing key (PEM); default <data_dir>/auth/jwt_ed25519.pem
    INFERSWARM_AUTH_ISSUER / _AUDIENCE   JWT iss / aud ("inferswarm-auth" / "inferswarm")
    INFERSWARM_ARGON2_TIME_COST          Argon2id passes (3)
    INFERSWARM_ARGON2_MEMORY_KIB         Argon2id memory (65536 = 64 MiB)
    INFERSWARM_ARGON2_PARALLELISM        Argon2id lanes (4)
    INFERSWARM_AUTH_HASH_CONCURRENCY     password hashes at once (2)
    INFERSWARM_AUTH_POLL_INTERVAL        invalidation log poll, seconds (0.5)
    INFERSWARM_AUTH_STALE_AFTER          distrust the key cache after this long unsynced (1.0)
    INFERSWARM_AUTH_CACHE_TTL            longest a validated key is served from memory (300)
    INFERSWARM_AUTH_MAX_KEYS             live API keys per account (100)
    INFERSWARM_LOGIN_FREE_FAILURES       failed logins per account before slowing down (5)
    INFERSWARM_LOGIN_CALLER_FREE_FAILURES  ... per caller address (20)
    INFERSWARM_LOGIN_BASE_DELAY          first lock past the free failures, seconds; doubles each time (1)
    INFERSWARM_LOGIN_MAX_DELAY           longest lock after repeated failures, seconds (300)
    INFERSWARM_TIER_<TIER>_TOKENS_PER_MONTH  token budgets of tiers no admin has edited (README.md, "Tiers")
    INFERSWARM_CURRENCY                  the platform currency of budgets and money limits (USD)
    INFERSWARM_WEBHOOK_TIMEOUT           seconds a webhook receiver has to answer (10)
    INFERSWARM_WEBHOOK_BASE_DELAY        first retry of a failed delivery, seconds; doubles each time (1)
    INFERSWARM_WEBHOOK_MAX_DELAY         longest wait between two attempts, seconds (3600)
    INFERSWARM_WEBHOOK_MAX_ATTEMPTS      attempts before a delivery is failed (8)
    INFERSWARM_WEBHOOK_POLL_INTERVAL     how often the sender looks for due deliveries, seconds (1)
    INFERSWARM_ALERT_INTERVAL            seconds between an instance's looks at the budgets of the usage
                                         stored since (0.5; 0: with each batch, alert_loop.py)
    INFERSWARM_WEBHOOK_ALLOW_PRIVATE     let webhooks reach private, loopback, link-local addresses (false;
                                         webhook_urls.py: a server-side request forgery otherwise)
    INFERSWARM_DEAD_LETTERS_MAX          dead letters kept, the newest (10000); the housekeeping deletes the
                                         older ones every ten minutes (README.md, "Dead letters")
    INFERSWARM_USAGE_RETENTION_MONTHS    months of per-request usage records kept besides the current one
                                         (0 or unset: for ever; else at least 2); the housekeeping drops the
                                         older monthly partitions of `usage` whole. The daily aggregates, which
                                         reports read, are kept (README.md, "Usage partitions and retention")

Every auth instance of one mesh must use the same signing key: share the
file (or point INFERSWARM_AUTH_JWT_KEY_FILE at a copy) when running several.

Administrators are not configured here: the operator grants them with
`inferswarm admin grant USER` (see README.md, "Administrators").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import ConfigError, MeshConfig, env, positive
from shared.db import DatabaseConfig
from shared.replica import ReplicaConfig
from shared.tiers import TierConfig
from services.auth.passwords import Argon2Params
from services.auth.registration import RegistrationPolicy
from services.auth.throttle import ThrottlePolicy
from services.auth.webhook_sender import WebhookPolicy

__all__ = ["AuthConfig", "RETIRED_ADMIN_EMAILS"]

#: Why auth refuses to start with INFERSWARM_ADMIN_EMAILS set. It made admins of
#: whoever registered a listed address first (addresses are never verified).
#: Refused rather than ignored: a deployment that still sets it expects those
#: people to be admins, and should learn at once, not from a warning in a log,
#: that they are not -- and how admins are made now.
RETIRED_ADMIN_EMAILS = (
    "no longer read: registering an address never makes an admin. Remove it, and grant "
    "administrators with `inferswarm admin grant USER` on a host that holds the mesh secret"
)


def _retired(message: str) -> Callable[[str], None]:
    def refuse(raw: str) -> None:
        raise ValueError(message)

    return refuse


def _currency(raw: str) -> str:
    """An ISO 4217 code: three capital letters (budgets and money limits are in it)."""
    if re.fullmatch(r"[A-Z]{3}", raw) is None:
        raise ValueError(f"expected an ISO 4217 code such as USD (three capital letters), got {raw!r}")
    return raw


def _retention(raw: str) -> int:
    """0 (for ever), or 2 months or more: records up to 35 days old are still accepted
    (records.py), so a retention of 1 would drop, at the start of a month, a month whose records,
    and retries of them, may still arrive -- and forget the request ids that make retries count once."""
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0 or value == 1:
        raise ValueError(f"expected 0 (keep for ever) or a number of months, 2 or more, got {raw!r}")
    return value


def _non_negative(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise ValueError(f"expected a number of seconds, 0 or more, got {raw!r}")
    return value


@dataclass(frozen=True)
class AuthConfig:
    """Everything the auth process reads from its environment."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    db: DatabaseConfig = field(default_factory=DatabaseConfig)
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    tiers: TierConfig = field(default_factory=TierConfig)
    #: Always None: set, it fails the configuration (see RETIRED_ADMIN_EMAILS).
    retired_admin_emails: None = env("INFERSWARM_ADMIN_EMAILS", default=None,
                                     parse=_retired(RETIRED_ADMIN_EMAILS))
    token_ttl: float = env("INFERSWARM_TOKEN_TTL", default=3600.0, parse=positive(float))
    jwt_key_file: Path | None = env("INFERSWARM_AUTH_JWT_KEY_FILE", default=None)
    issuer: str = env("INFERSWARM_AUTH_ISSUER", default="inferswarm-auth")
    audience: str = env("INFERSWARM_AUTH_AUDIENCE", default="inferswarm")
    argon2_time_cost: int = env("INFERSWARM_ARGON2_TIME_COST", default=3, parse=positive(int))
    argon2_memory_kib: int = env("INFERSWARM_ARGON2_MEMORY_KIB", default=65536, parse=positive(int))
    argon2_parallelism: int = env("INFERSWARM_ARGON2_PARALLELISM", default=4, parse=positive(int))
    hash_concurrency: int = env("INFERSWARM_AUTH_HASH_CONCURRENCY", default=2, parse=positive(int))
    poll_interval: float = env("INFERSWARM_AUTH_POLL_INTERVAL", default=0.5, parse=positive(float))
    stale_after: float = env("INFERSWARM_AUTH_STALE_AFTER", default=1.0, parse=positive(float))
    cache_ttl: float = env("INFERSWARM_AUTH_CACHE_TTL", default=300.0, parse=positive(float))
    max_keys_per_user: int = env("INFERSWARM_AUTH_MAX_KEYS", default=100, parse=positive(int))
    login_free_failures: int = env("INFERSWARM_LOGIN_FREE_FAILURES", default=5, parse=positive(int))
    login_caller_free_failures: int = env(
        "INFERSWARM_LOGIN_CALLER_FREE_FAILURES", default=20, parse=positive(int)
    )
    login_base_delay: float = env("INFERSWARM_LOGIN_BASE_DELAY", default=1.0, parse=positive(float))
    login_max_delay: float = env("INFERSWARM_LOGIN_MAX_DELAY", default=300.0, parse=positive(float))
    register_per_source: int = env("INFERSWARM_REGISTER_PER_SOURCE", default=5, parse=positive(int))
    register_overall: int = env("INFERSWARM_REGISTER_OVERALL", default=60, parse=positive(int))
    register_window: float = env("INFERSWARM_REGISTER_WINDOW", default=60.0, parse=positive(float))
    pool_size: int = env("INFERSWARM_AUTH_POOL_SIZE", default=10, parse=positive(int))
    currency: str = env("INFERSWARM_CURRENCY", default="USD", parse=_currency)
    webhook_timeout: float = env("INFERSWARM_WEBHOOK_TIMEOUT", default=10.0, parse=positive(float))
    webhook_base_delay: float = env("INFERSWARM_WEBHOOK_BASE_DELAY", default=1.0, parse=positive(float))
    webhook_max_delay: float = env("INFERSWARM_WEBHOOK_MAX_DELAY", default=3600.0, parse=positive(float))
    webhook_max_attempts: int = env("INFERSWARM_WEBHOOK_MAX_ATTEMPTS", default=8, parse=positive(int))
    webhook_poll_interval: float = env("INFERSWARM_WEBHOOK_POLL_INTERVAL", default=1.0, parse=positive(float))
    webhook_allow_private: bool = env("INFERSWARM_WEBHOOK_ALLOW_PRIVATE", default=False)
    alert_interval: float = env("INFERSWARM_ALERT_INTERVAL", default=0.5, parse=_non_negative)
    dead_letters_max: int = env("INFERSWARM_DEAD_LETTERS_MAX", default=10_000, parse=positive(int))
    usage_retention_months: int = env("INFERSWARM_USAGE_RETENTION_MONTHS", default=0, parse=_retention)

    def __post_init__(self) -> None:
        problems = []
        if self.argon2_memory_kib < 8 * self.argon2_parallelism:
            problems.append("INFERSWARM_ARGON2_MEMORY_KIB: must be at least 8 x INFERSWARM_ARGON2_PARALLELISM")
        if self.poll_interval >= self.stale_after:
            problems.append("INFERSWARM_AUTH_POLL_INTERVAL: must be shorter than INFERSWARM_AUTH_STALE_AFTER")
        if problems:
            raise ConfigError(problems)

    @property
    def jwt_key_path(self) -> Path:
        return self.jwt_key_file or self.mesh.data_dir / "auth" / "jwt_ed25519.pem"

    @property
    def argon2(self) -> Argon2Params:
        return Argon2Params(self.argon2_time_cost, self.argon2_memory_kib, self.argon2_parallelism)

    @property
    def throttle(self) -> ThrottlePolicy:
        return ThrottlePolicy(
            account_free_failures=self.login_free_failures,
            caller_free_failures=self.login_caller_free_failures,
            base_delay=self.login_base_delay,
            max_delay=self.login_max_delay,
        )

    @property
    def webhooks(self) -> WebhookPolicy:
        return WebhookPolicy(timeout=self.webhook_timeout, base_delay=self.webhook_base_delay,
                             max_delay=self.webhook_max_delay, max_attempts=self.webhook_max_attempts,
                             poll_interval=self.webhook_poll_interval, allow_private=self.webhook_allow_private)

    @property
    def registration(self) -> RegistrationPolicy:
        return RegistrationPolicy(per_source=self.register_per_source, overall=self.register_overall,
                                  window=self.register_window)
