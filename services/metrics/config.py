"""The metrics service's configuration, read once from the environment.

    INFERSWARM_METRICS_HOST              HTTP bind address (127.0.0.1)
    INFERSWARM_METRICS_PORT              HTTP port of /metrics and /health (9100; 0 = any free port)
    INFERSWARM_METRICS_PROBE_INTERVAL    seconds between health rounds (2)
    INFERSWARM_METRICS_PING_TIMEOUT      seconds an rpc.ping may take (1)
    INFERSWARM_METRICS_FORGET_AFTER      seconds an instance without a record stays listed (60)
    INFERSWARM_METRICS_REQUIRED          services the system is down without (auth,gateway,inference)
    INFERSWARM_METRICS_ACTIVE_USERS_INTERVAL  seconds between auth.active_users calls (30)
    INFERSWARM_METRICS_SERIES_CAP        series per pushed family (1000)
    INFERSWARM_METRICS_GAUGE_TTL         seconds a node's gauge values count without a new batch (15)
    INFERSWARM_METRICS_RETENTION         seconds a silent source's values are held before they are
                                         folded into the retired base (3600)
    INFERSWARM_METRICS_MAX_SOURCES       sources held at most; the least recently heard is retired (4096)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.config import ConfigError, MeshConfig, env, port, positive

__all__ = ["MetricsConfig"]


@dataclass(frozen=True)
class MetricsConfig:
    """Everything the metrics process reads from its environment."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    http_host: str = env("INFERSWARM_METRICS_HOST", default="127.0.0.1")
    http_port: int = env("INFERSWARM_METRICS_PORT", default=9100, parse=port)
    probe_interval: float = env("INFERSWARM_METRICS_PROBE_INTERVAL", default=2.0, parse=positive(float))
    ping_timeout: float = env("INFERSWARM_METRICS_PING_TIMEOUT", default=1.0, parse=positive(float))
    forget_after: float = env("INFERSWARM_METRICS_FORGET_AFTER", default=60.0, parse=positive(float))
    required: tuple[str, ...] = env("INFERSWARM_METRICS_REQUIRED", default=("auth", "gateway", "inference"))
    active_users_interval: float = env(
        "INFERSWARM_METRICS_ACTIVE_USERS_INTERVAL", default=30.0, parse=positive(float))
    series_cap: int = env("INFERSWARM_METRICS_SERIES_CAP", default=1000, parse=positive(int))
    gauge_ttl: float = env("INFERSWARM_METRICS_GAUGE_TTL", default=15.0, parse=positive(float))
    retention: float = env("INFERSWARM_METRICS_RETENTION", default=3600.0, parse=positive(float))
    max_sources: int = env("INFERSWARM_METRICS_MAX_SOURCES", default=4096, parse=positive(int))

    def __post_init__(self) -> None:
        if self.series_cap < 2:
            raise ConfigError(["INFERSWARM_METRICS_SERIES_CAP: at least 2 (one series and the overflow)"])
