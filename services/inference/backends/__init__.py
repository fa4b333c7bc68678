"""Model backends behind one interface (`base.Backend`): local, ollama, openai, echo."""

from __future__ import annotations

import os
from collections.abc import Mapping

from shared.config import ConfigError, Secret
from services.inference.backends.base import Backend, Done, Event, GenerateRequest, Message, Prompt
from services.inference.catalog import ModelSpec

__all__ = ["Backend", "Done", "Event", "GenerateRequest", "Message", "Prompt", "make_backend"]


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
    from services.inference.backends.openai import OpenAIBackend

    api_key = None
    if spec.api_key_env is not None:
        value = environ.get(spec.api_key_env, "")
        if not value:
            raise ConfigError([f"model {spec.name!r}: api_key_env {spec.api_key_env} is not set"])
        api_key = Secret(value)
    return OpenAIBackend(spec.url, spec.upstream, api_key=api_key, timeout=spec.timeout)
