"""Model backends behind two interfaces: generation (`base.Backend`: local,
ollama, openai, anthropic, echo) and embedding (`embedding.Embedder`: local, ollama, openai)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from shared.config import ConfigError, Secret
from services.inference.backends.base import Backend, Done, Event, GenerateRequest, Message, Prompt
from services.inference.backends.embedding import Embedded, Embedder
from services.inference.catalog import ModelSpec

__all__ = ["Backend", "Done", "Event", "GenerateRequest", "Message", "Prompt", "Embedded", "Embedder",
           "make_backend", "make_embedder"]


def make_backend(spec: ModelSpec, *, threads: int, environ: Mapping[str, str] = os.environ) -> Backend:
    """The backend a catalog entry describes (not started yet).

    Raises `ConfigError` when the entry names an API key variable that is unset.
    """
    if spec.backend == "local":
        from services.inference.backends.local import LocalBackend

        return LocalBackend(spec.path, slots=spec.slots, n_threads=spec.n_threads or threads, n_ctx=spec.n_ctx,
                            repeat_penalty=spec.sampling.repeat_penalty)
    if spec.backend == "echo":
        from services.inference.backends.echo import EchoBackend

        return EchoBackend(delay=spec.delay)
    if spec.backend == "ollama":
        from services.inference.backends.ollama import OllamaBackend

        return OllamaBackend(spec.url, spec.upstream, timeout=spec.timeout)
    if spec.backend == "anthropic":
        from services.inference.backends.anthropic import AnthropicBackend

        return AnthropicBackend(spec.url, spec.upstream, api_key=_api_key(spec, environ), timeout=spec.timeout)
    from services.inference.backends.openai import OpenAIBackend

    return OpenAIBackend(spec.url, spec.upstream, api_key=_api_key(spec, environ), timeout=spec.timeout)


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
        return OpenAIEmbedder(spec.url, spec.upstream, api_key=_api_key(spec, environ), timeout=spec.timeout)
    raise ConfigError([f"model {spec.name!r}: backend {spec.backend!r} has no embedding models"])


def _api_key(spec: ModelSpec, environ: Mapping[str, str]) -> Secret | None:
    """The API key of an openai or anthropic entry, from the variable it names (None: no key sent)."""
    if spec.api_key_env is None:
        return None
    value = environ.get(spec.api_key_env, "")
    if not value:
        raise ConfigError([f"model {spec.name!r}: api_key_env {spec.api_key_env} is not set"])
    return Secret(value)
