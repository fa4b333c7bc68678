"""The generation contract: what `inference.generate` (and `gateway.infer`) accept.

`build_request` checks a generation request's parameters into a
`GenerateRequest`; workers run it and gateways run it before they spend any
quota, so a request a gateway admits is one a worker accepts.

Every refusal is INVALID_PARAMS naming the parameter (`data.param`):
exactly one of `messages` and `prompt`; messages a non-empty list of
`{"role": "system"|"user"|"assistant", "content": str}`; the prompt (or all
message contents together) within the size cap; `max_tokens` between 1 and
the cap; `temperature` in [0, 2]; `top_p` in (0, 1]; at most 4 stop strings
of 1-64 characters; a seed in [0, 2^32); a priority that is a tier name or
an integer (`priority_of`, with the tiers of shared/tiers.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from shared.errors import InvalidParams
from shared.tiers import TierTable

__all__ = ["GenerateRequest", "Limits", "Message", "build_request", "is_final", "priority_of", "text_of"]

_ROLES = ("system", "user", "assistant")
_MAX_STOPS = 4
_MAX_STOP_CHARS = 64
_TIERS = TierTable()


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message."""

    role: Literal["system", "user", "assistant"]
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A validated generation request; exactly one of `messages` and `prompt` is set."""

    messages: tuple[Message, ...] | None
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def deterministic(self) -> bool:
        """Greedy decoding or a fixed seed: the same request gives the same answer."""
        return self.temperature == 0 or self.seed is not None

    def message_dicts(self) -> list[dict[str, str]]:
        return [m.to_dict() for m in self.messages or ()]


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds a request must fit."""

    max_tokens: int = 4096
    max_prompt_chars: int = 32768
    max_messages: int = 256


def _refuse(param: str, text: str) -> InvalidParams:
    return InvalidParams(f"inference.generate: {param} {text}", {"param": param})


def build_request(
    limits: Limits, *, messages: list[Any] | None, prompt: str | None, max_tokens: int,
    temperature: float, top_p: float, stop: str | list[Any] | None, seed: int | None,
) -> GenerateRequest:
    """The validated request; `InvalidParams` for anything out of shape or bounds."""
    if (messages is None) == (prompt is None):
        raise InvalidParams("inference.generate: give exactly one of messages and prompt", {"param": "messages"})
    parsed = _messages(messages, limits) if messages is not None else None
    size = sum(len(m.content) for m in parsed) if parsed is not None else len(prompt or "")
    if size > limits.max_prompt_chars:
        what = "messages" if parsed is not None else "prompt"
        raise _refuse(what, f"too long: {size} characters, at most {limits.max_prompt_chars}")
    if prompt is not None and not prompt:
        raise _refuse("prompt", "must not be empty")
    if not 1 <= max_tokens <= limits.max_tokens:
        raise _refuse("max_tokens", f"must be between 1 and {limits.max_tokens}")
    if not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise _refuse("temperature", "must be between 0 and 2")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise _refuse("top_p", "must be in (0, 1]")
    if seed is not None and not 0 <= seed < 2**32:
        raise _refuse("seed", "must be in [0, 2^32)")
    return GenerateRequest(
        messages=parsed, prompt=prompt, max_tokens=max_tokens, temperature=float(temperature),
        top_p=float(top_p), stop=_stops(stop), seed=seed,
    )


def _messages(messages: list[Any], limits: Limits) -> tuple[Message, ...]:
    if not messages:
        raise _refuse("messages", "must not be empty")
    if len(messages) > limits.max_messages:
        raise _refuse("messages", f"too many: {len(messages)}, at most {limits.max_messages}")
    parsed = []
    for index, item in enumerate(messages):
        if not isinstance(item, dict) or set(item) - {"role", "content", "name"}:
            raise _refuse("messages", f"[{index}] must be {{role, content}}")
        role, content = item.get("role"), item.get("content")
        if role not in _ROLES:
            raise _refuse("messages", f"[{index}].role must be one of {', '.join(_ROLES)}")
        if not isinstance(content, str):
            raise _refuse("messages", f"[{index}].content must be a string")
        parsed.append(Message(role, content))
    return tuple(parsed)


def _stops(stop: str | list[Any] | None) -> tuple[str, ...]:
    items = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if len(items) > _MAX_STOPS:
        raise _refuse("stop", f"at most {_MAX_STOPS} strings")
    for item in items:
        if not isinstance(item, str) or not 1 <= len(item) <= _MAX_STOP_CHARS:
            raise _refuse("stop", f"items must be strings of 1-{_MAX_STOP_CHARS} characters")
    return tuple(items)


def priority_of(priority: int | str) -> int:
    """A queue priority from a tier name (free 0 < pro 1 < enterprise 2 <
    unlimited 3, as in shared/tiers.py) or an integer given by a gateway."""
    if isinstance(priority, int):
        if not -1000 <= priority <= 1000:
            raise _refuse("priority", "must be between -1000 and 1000")
        return priority
    if priority not in _TIERS:
        raise _refuse("priority", f"must be an integer or a tier name ({', '.join(_TIERS.names())})")
    return _TIERS[priority].priority


# -- the chunks of a generation stream (services/inference/README.md, "Chunks") --------


def is_final(chunk: Any) -> bool:
    """True for the last chunk of a generation stream (`inference.generate`, and
    `gateway.infer` relaying it): the one map with `done: true`, which carries
    `usage`, `finish_reason`, `timing`, `cached` (and from the gateway
    `request_id` and `rate_limit`). The chunks before it carry text (`text_of`)."""
    return isinstance(chunk, Mapping) and chunk.get("done") is True


def text_of(chunk: Any) -> str | None:
    """The piece of text a chunk carries, or None when it carries none."""
    text = chunk.get("text") if isinstance(chunk, Mapping) else None
    return text if isinstance(text, str) else None
