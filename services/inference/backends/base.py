"""What every model backend provides, and the values that cross that boundary.

A backend serves one configured model: the local llama.cpp model, a model on
an Ollama server, or a model on an OpenAI-compatible server. The service sees
only this interface:

    await backend.start()                      # load / first probe; may raise
    async for event in backend.generate(req):  # str pieces of text, then one Done
        ...
    await backend.probe()                      # cheap health check; raises when down
    await backend.close()

`generate` raises typed errors (`shared.errors`): `Unavailable` when the
backend is down, answers 5xx, sends malformed data or drops the stream;
`NotFound` when it does not know the model; `InvalidParams` when it refuses
the request itself. Closing the iterator early (the caller cancelled) must
stop the work upstream promptly and free what it held.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Message", "GenerateRequest", "Done", "Event", "Backend", "FinishReason"]

FinishReason = Literal["stop", "length"]


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
class Done:
    """The last event of a generation: why it ended and what it cost."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


Event = str | Done


class Backend(ABC):
    """One model behind one engine or server."""

    #: "local", "ollama" or "openai".
    kind: str = ""

    def __init__(self) -> None:
        #: Static facts shown by `inference.models` (family, size, upstream name...).
        self.info: dict[str, Any] = {}
        self.loaded = False

    async def start(self) -> None:
        """Load the model or reach the server once. The default does nothing."""
        self.loaded = True

    @abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        """Stream pieces of text (`str`), then exactly one `Done`."""

    @abstractmethod
    async def probe(self) -> None:
        """Return when the backend can serve the model; raise a typed error otherwise."""

    async def close(self) -> None:
        """Release what `start` acquired. The default does nothing."""
        self.loaded = False

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, **self.info}

