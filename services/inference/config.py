"""The inference worker's configuration, read once from the environment.

    INFERSWARM_MODELS              the model catalog as JSON (see catalog.py / README.md)
    INFERSWARM_MODELS_FILE         ... or a .json / .toml file holding it (not both)
    INFERSWARM_LOCAL_THREADS       CPU threads of local models without n_threads (all cores)
    INFERSWARM_MAX_TOKENS          largest max_tokens a request may ask for (4096)
    INFERSWARM_MAX_PROMPT_CHARS    largest prompt, or sum of message contents, in characters (32768)
    INFERSWARM_MAX_MESSAGES        most messages in one chat request (256)
    INFERSWARM_QUEUE_TIMEOUT       longest a request waits for a slot, seconds (60)
    INFERSWARM_CACHE_TTL           seconds a cached response lives; 0 disables the cache (300)
    INFERSWARM_CACHE_ENTRIES       most cached responses (1024)
    INFERSWARM_CACHE_BYTES         most bytes of cached text (16 MiB)
    INFERSWARM_PROBE_INTERVAL      seconds between health probes of every backend (10)
    INFERSWARM_BREAKER_FAILURES    backend failures in a row that open a model's circuit breaker (5)
    INFERSWARM_BREAKER_COOLDOWN    seconds an open breaker refuses requests before a probe (5); each
                                   failed probe doubles it, up to 12 x this (60 s by default)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from shared.config import ConfigError, MeshConfig, env, positive
from services.inference.catalog import DEFAULT_MODELS, ModelSpec, parse_models, read_models_file

__all__ = ["InferenceConfig"]


def _non_negative(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError(f"expected zero or a positive number, got {raw!r}")
    return value


@dataclass(frozen=True)
class InferenceConfig:
    """Everything an inference worker reads from its environment."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    models_json: tuple[ModelSpec, ...] | None = env("INFERSWARM_MODELS", default=None, parse=parse_models)
    models_file: tuple[ModelSpec, ...] | None = env(
        "INFERSWARM_MODELS_FILE", default=None, parse=read_models_file
    )
    local_threads: int | None = env("INFERSWARM_LOCAL_THREADS", default=None, parse=positive(int))
    max_tokens: int = env("INFERSWARM_MAX_TOKENS", default=4096, parse=positive(int))
    max_prompt_chars: int = env("INFERSWARM_MAX_PROMPT_CHARS", default=32768, parse=positive(int))
    max_messages: int = env("INFERSWARM_MAX_MESSAGES", default=256, parse=positive(int))
    queue_timeout: float = env("INFERSWARM_QUEUE_TIMEOUT", default=60.0, parse=positive(float))
    cache_ttl: float = env("INFERSWARM_CACHE_TTL", default=300.0, parse=_non_negative)
    cache_entries: int = env("INFERSWARM_CACHE_ENTRIES", default=1024, parse=positive(int))
    cache_bytes: int = env("INFERSWARM_CACHE_BYTES", default=16 * 1024 * 1024, parse=positive(int))
    probe_interval: float = env("INFERSWARM_PROBE_INTERVAL", default=10.0, parse=positive(float))
    breaker_failures: int = env("INFERSWARM_BREAKER_FAILURES", default=5, parse=positive(int))
    breaker_cooldown: float = env("INFERSWARM_BREAKER_COOLDOWN", default=5.0, parse=positive(float))

    def __post_init__(self) -> None:
        if self.models_json is not None and self.models_file is not None:
            raise ConfigError(["INFERSWARM_MODELS_FILE: set either it or INFERSWARM_MODELS, not both"])

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        """The catalog: from the variable, else the file, else the local default."""
        return self.models_json or self.models_file or DEFAULT_MODELS

    @property
    def threads(self) -> int:
        """CPU threads for a local model that does not name its own."""
        return self.local_threads or os.cpu_count() or 1
