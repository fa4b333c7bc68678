"""Model backends behind two interfaces: generation (`base.Backend`: local,
ollama, openai, anthropic, echo) and embedding (`embedding.Embedder`: local, ollama, openai)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from shared.config import ConfigError, Secret
from services.inference.backends.base import Backend, Done, Event, GenerateRequest, Message, Prompt
from services.inference.backends.embedding import Embedded, Embedder
from services.inference.catalog import ModelSpec

__all__ = ["Backend", "Done", "Event", "GenerateRequest", "Message", "Prompt", "Embedded", "Embedder",
           "api_keys", "connections", "make_backend", "make_embedder"]

_SPARE_CONNECTIONS = 4  #: beyond one per slot: the probes of model listings and health


def make_backend(spec: ModelSpec, *, threads: int, environ: Mapping[str, str] = os.environ) -> Backend:
    """The backend a catalog entry describes (not started yet).

    Raises `ConfigError` when the entry names an API key variable that is unset
    or empty, or a key file that cannot be read or holds no key.
    """
    if spec.backend == "local" and spec.batch:
        from services.inference.backends.batched import BatchedBackend

        return BatchedBackend(spec.path, slots=spec.slots, n_threads=spec.n_threads or threads, n_ctx=spec.n_ctx,
                              repeat_penalty=spec.sampling.repeat_penalty)
    if spec.backend == "local":
        from services.inference.backends.local import LocalBackend

        return LocalBackend(spec.path, slots=spec.slots, n_threads=spec.n_threads or threads, n_ctx=spec.n_ctx,
                            repeat_penalty=spec.sampling.repeat_penalty)
    if spec.backend == "echo":
        from services.inference.backends.echo import EchoBackend

        return EchoBackend(delay=spec.delay)
    if spec.backend == "ollama":
        from services.inference.backends.ollama import OllamaBackend

        return OllamaBackend(spec.url, spec.upstream, timeout=spec.timeout, connections=connections(spec))
    if spec.backend == "anthropic":
        from services.inference.backends.anthropic import AnthropicBackend

        return AnthropicBackend(spec.url, spec.upstream, api_keys=api_keys(spec, environ), timeout=spec.timeout,
                                connections=connections(spec))
    from services.inference.backends.openai import OpenAIBackend

    return OpenAIBackend(spec.url, spec.upstream, api_keys=api_keys(spec, environ), timeout=spec.timeout,
                         connections=connections(spec))


def connections(spec: ModelSpec) -> int:
    """The HTTP connections an entry's backend keeps to its server: one per slot, and a few
    for the health probes, so no generation ever waits for the pool."""
    return spec.slots + _SPARE_CONNECTIONS


def make_embedder(spec: ModelSpec, *, threads: int, environ: Mapping[str, str] = os.environ) -> Embedder:
    """The embedder a catalog entry of kind "embedding" describes (not started yet).

    Raises `ConfigError` as `make_backend` does, and for a backend without embeddings.
    """
    if spec.backend == "local":
        from services.inference.backends.minilm import LocalEmbedder

        return LocalEmbedder(spec.path, spec.tokenizer, slots=spec.slots, n_threads=spec.n_threads or threads)
    from services.inference.backends.embedding_http import OllamaEmbedder, OpenAIEmbedder

    if spec.backend == "ollama":
        return OllamaEmbedder(spec.url, spec.upstream, timeout=spec.timeout)
    if spec.backend == "openai":
        return OpenAIEmbedder(spec.url, spec.upstream, api_keys=api_keys(spec, environ), timeout=spec.timeout)
    raise ConfigError([f"model {spec.name!r}: backend {spec.backend!r} has no embedding models"])


def api_keys(spec: ModelSpec, environ: Mapping[str, str] = os.environ) -> tuple[Secret, ...]:
    """The API keys of an openai or anthropic entry: `api_key_env`'s, `api_keys_env`'s
    (separated by commas, whitespace or newlines), then `api_keys_file`'s (one a line,
    blank lines and `#` comments ignored), without duplicates, in that order; none: no
    key sent. A problem is a `ConfigError` naming the entry and the source, never a key."""
    where = f"model {spec.name!r}"
    found: list[str] = []
    if spec.api_key_env is not None:
        value = environ.get(spec.api_key_env, "").strip()
        if not value:
            raise ConfigError([f"{where}: api_key_env {spec.api_key_env} is not set"])
        found.append(value)
    if spec.api_keys_env is not None:
        values = re.split(r"[,\s]+", environ.get(spec.api_keys_env, ""))
        if not any(values):
            raise ConfigError([f"{where}: api_keys_env {spec.api_keys_env} is not set or holds no key"])
        found += [v for v in values if v]
    if spec.api_keys_file is not None:
        try:
            lines = spec.api_keys_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not text"
            raise ConfigError([f"{where}: api_keys_file {spec.api_keys_file} cannot be read ({reason})"]) from None
        keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise ConfigError([f"{where}: api_keys_file {spec.api_keys_file} holds no key"])
        found += keys
    return tuple(Secret(key) for key in dict.fromkeys(found))
