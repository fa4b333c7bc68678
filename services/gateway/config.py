"""The gateway's configuration, read once from the environment.

    DATABASE_URL                          PostgreSQL for the limits (else the embedded one, database "gateway");
                                          every gateway of a mesh must share it
    INFERSWARM_GATEWAY_LEASE_TTL          seconds a lease lives before its unused units go back (1.0)
    INFERSWARM_GATEWAY_LONG_LEASE_TTL     seconds a lease of a key far from its limit lives (30; 0: none); recalled
                                          to the short TTL as the key nears its limit (README.md, "Long leases")
    INFERSWARM_GATEWAY_MAX_LEASE          most requests' worth of units in one lease (10000)
    INFERSWARM_GATEWAY_CLAIM_HORIZON      seconds of use a lease's claim runs ahead (0.25)
    INFERSWARM_GATEWAY_HEARTBEAT          seconds between heartbeats (1.0)
    INFERSWARM_GATEWAY_DEAD_AFTER         a gateway silent this long is dead to the janitor (10)
    INFERSWARM_GATEWAY_JANITOR_INTERVAL   seconds between janitor passes (1.0)
    INFERSWARM_GATEWAY_SHIP_INTERVAL      seconds between usage batches to auth (0.1)
    INFERSWARM_GATEWAY_SHIP_BATCH         most usage records per batch (500)
    INFERSWARM_GATEWAY_JOURNAL_FSYNC      fdatasync every journal entry: survives power loss, slower (false)
    INFERSWARM_GATEWAY_ATTEMPTS           workers tried before the first token (3)
    INFERSWARM_GATEWAY_MAX_IN_FLIGHT      requests at workers at once; more wait here, the highest priority
                                          first (512; dispatch.py)
    INFERSWARM_GATEWAY_QUEUE              requests that may wait for a slot; one more is UNAVAILABLE (2048)
    INFERSWARM_GATEWAY_AUTH_TIMEOUT       most seconds one call to auth on a request's path (key validation,
                                          token check) may wait, within the caller's deadline (30)
    INFERSWARM_MAX_TOKENS, INFERSWARM_MAX_PROMPT_CHARS, INFERSWARM_MAX_MESSAGES
                                          request bounds, as the workers read them (4096, 32768, 256)
    INFERSWARM_GATEWAY_POOL_SIZE          database connections (10)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.config import ConfigError, MeshConfig, env, parse_bool, positive
from shared.db import DatabaseConfig
from services.gateway.checks import Limits

__all__ = ["GatewayConfig"]


def _seconds_or_off(raw: str) -> float:
    """Seconds, or 0 for "off"."""
    value = float(raw)
    if value < 0:
        raise ValueError("must be 0 (off) or more")
    return value


@dataclass(frozen=True)
class GatewayConfig:
    """Everything a gateway process reads from its environment."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    db: DatabaseConfig = field(default_factory=DatabaseConfig)
    lease_ttl: float = env("INFERSWARM_GATEWAY_LEASE_TTL", default=1.0, parse=positive(float))
    long_lease_ttl: float = env("INFERSWARM_GATEWAY_LONG_LEASE_TTL", default=30.0, parse=_seconds_or_off)
    max_lease: int = env("INFERSWARM_GATEWAY_MAX_LEASE", default=10_000, parse=positive(int))
    claim_horizon: float = env("INFERSWARM_GATEWAY_CLAIM_HORIZON", default=0.25, parse=positive(float))
    heartbeat: float = env("INFERSWARM_GATEWAY_HEARTBEAT", default=1.0, parse=positive(float))
    dead_after: float = env("INFERSWARM_GATEWAY_DEAD_AFTER", default=10.0, parse=positive(float))
    janitor_interval: float = env("INFERSWARM_GATEWAY_JANITOR_INTERVAL", default=1.0, parse=positive(float))
    ship_interval: float = env("INFERSWARM_GATEWAY_SHIP_INTERVAL", default=0.1, parse=positive(float))
    ship_batch: int = env("INFERSWARM_GATEWAY_SHIP_BATCH", default=500, parse=positive(int))
    journal_fsync: bool = env("INFERSWARM_GATEWAY_JOURNAL_FSYNC", default=False, parse=parse_bool)
    attempts: int = env("INFERSWARM_GATEWAY_ATTEMPTS", default=3, parse=positive(int))
    max_in_flight: int = env("INFERSWARM_GATEWAY_MAX_IN_FLIGHT", default=512, parse=positive(int))
    queue_limit: int = env("INFERSWARM_GATEWAY_QUEUE", default=2048, parse=positive(int))
    auth_timeout: float = env("INFERSWARM_GATEWAY_AUTH_TIMEOUT", default=30.0, parse=positive(float))
    #: Seconds between looks at auth's price table and routing settings (a change applies here within this).
    price_poll: float = env("INFERSWARM_GATEWAY_PRICE_POLL", default=1.0, parse=positive(float))
    max_tokens: int = env("INFERSWARM_MAX_TOKENS", default=4096, parse=positive(int))
    max_prompt_chars: int = env("INFERSWARM_MAX_PROMPT_CHARS", default=32768, parse=positive(int))
    max_messages: int = env("INFERSWARM_MAX_MESSAGES", default=256, parse=positive(int))
    pool_size: int = env("INFERSWARM_GATEWAY_POOL_SIZE", default=10, parse=positive(int))

    def __post_init__(self) -> None:
        problems = []
        if self.ship_batch > 1000:
            problems.append("INFERSWARM_GATEWAY_SHIP_BATCH: at most 1000 (auth.record_usage's batch limit)")
        if 0 < self.long_lease_ttl < 2 * self.lease_ttl:
            problems.append("INFERSWARM_GATEWAY_LONG_LEASE_TTL: 0 (off) or at least two INFERSWARM_GATEWAY_LEASE_TTL")
        if self.heartbeat * 2 >= self.dead_after:
            problems.append("INFERSWARM_GATEWAY_DEAD_AFTER: must be more than two heartbeats")
        if problems:
            raise ConfigError(problems)

    @property
    def limits(self) -> Limits:
        return Limits(self.max_tokens, self.max_prompt_chars, self.max_messages)
