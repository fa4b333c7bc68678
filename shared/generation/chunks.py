"""The chunks of a generation stream, told apart the same way by every reader
(services/inference/README.md, "Chunks")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["is_final", "logprobs_of", "output_of", "text_of", "tool_calls_of"]


def is_final(chunk: Any) -> bool:
    """True for the last chunk of a generation stream (`inference.generate`, and
    `gateway.infer` relaying it): the one map with `done: true`, which carries
    `usage`, `finish_reason`, `timing`, `cached` (and from the gateway
    `request_id` and `rate_limit`). The chunks before it carry text (`text_of`)
    or tool calls (`tool_calls_of`)."""
    return isinstance(chunk, Mapping) and chunk.get("done") is True


def text_of(chunk: Any) -> str | None:
    """The piece of text a chunk carries, or None when it carries none."""
    text = chunk.get("text") if isinstance(chunk, Mapping) else None
    return text if isinstance(text, str) else None


def logprobs_of(chunk: Any) -> list[dict[str, Any]]:
    """The log probabilities of a text chunk's tokens (a request with `logprobs`), in
    OpenAI's ChatCompletionTokenLogprob shape: `{token, logprob, bytes, top_logprobs:
    [{token, logprob, bytes}]}` each; [] when it carries none."""
    items = chunk.get("logprobs") if isinstance(chunk, Mapping) else None
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def tool_calls_of(chunk: Any) -> list[dict[str, Any]] | None:
    """The tool calls a chunk carries -- OpenAI's `tool_calls` delta items
    `{index, id, type: "function", function: {name, arguments}}` -- or None."""
    calls = chunk.get("tool_calls") if isinstance(chunk, Mapping) else None
    return calls if isinstance(calls, list) else None


def output_of(chunk: Any) -> bool:
    """Whether a chunk carries output for the caller: text or tool calls."""
    return text_of(chunk) is not None or tool_calls_of(chunk) is not None
