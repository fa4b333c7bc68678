"""What every model backend provides, and the values that cross that boundary.

A backend serves one configured model: the local llama.cpp model, a model on
an Ollama server, or a model on an OpenAI-compatible server. The service sees
only this interface:

    await backend.start()                      # load / first probe; may raise
    async for event in backend.generate(req):  # Prompt, str pieces of text, then one Done
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
import re
from dataclasses import dataclass
from typing import Any, Literal

from shared.generation import GenerateRequest, Message, ToolCall

__all__ = ["Message", "GenerateRequest", "Prompt", "Done", "Event", "Backend", "Engine", "FinishReason", "Logprobs",
           "ToolCall", "ToolCalls", "estimate_tokens", "token_logprob"]

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class Prompt:
    """The prompt was taken in: its tokens, known before the first piece of text.

    Sent at most once, before the first text piece, so that a generation cut
    short (cancelled, timed out, failed) still bills the prompt it cost. The
    local backend counts the tokenized prompt; the HTTP backends, whose servers
    report prompt tokens only at the end, send `estimate_tokens` of it (the
    server's own figure, in `Done`, is what a completed generation bills)."""

    tokens: int


@dataclass(frozen=True, slots=True)
class Done:
    """The last event of a generation: why it ended and what it cost."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """The model answered with calls of the request's tools (then `Done` with
    finish_reason "tool_calls"). Sent once, after any text."""

    calls: tuple[ToolCall, ...]


@dataclass(frozen=True, slots=True)
class Logprobs:
    """The log probabilities of the tokens of the next piece of text (a request with
    `logprobs`, to a backend with the "logprobs" capability): OpenAI's
    ChatCompletionTokenLogprob items, `{token, logprob, bytes, top_logprobs: [{token,
    logprob, bytes}]}`, `top_logprobs` holding the request's `top_logprobs` most likely
    tokens, most likely first. Sent just before the piece it belongs to."""

    items: tuple[dict[str, Any], ...]


Event = str | Prompt | Logprobs | ToolCalls | Done


def token_logprob(token: str, logprob: float, top: list[tuple[str, float]] | None = None,
                  raw: bytes | None = None) -> dict[str, Any]:
    """One token's item in OpenAI's shape; `raw` its bytes when they are not `token`'s UTF-8."""
    item: dict[str, Any] = {"token": token, "logprob": float(logprob),
                            "bytes": list(raw if raw is not None else token.encode())}
    if top is not None:
        item["top_logprobs"] = [{"token": t, "logprob": float(p), "bytes": list(t.encode())} for t, p in top]
    return item

#: Pre-tokens of the GPT-2 family's split (words with their leading space,
#: runs of digits, runs of other symbols): BPE and SentencePiece tokenizers
#: never merge across them, so their count is a lower bound of the tokens.
_PRE_TOKENS = re.compile(r"\s?[^\W\d_]+|\s?\d+|\s?[^\w\s]+|\s+(?!\S)|_+")


def estimate_tokens(request: GenerateRequest) -> int:
    """The prompt's tokens as far as they can be known without the model's
    tokenizer: its pre-tokens (see `_PRE_TOKENS`), a lower bound of what a
    server counts -- no chat template tokens, at least 1."""
    if request.messages is not None:
        texts = [m.text for m in request.messages]
    else:
        texts = [request.prompt or ""]
    return max(1, sum(len(_PRE_TOKENS.findall(text)) for text in texts))


class Engine(ABC):
    """What every model engine has, chat backend (`Backend`) or embedder
    (`embedding.Embedder`): its kind, capabilities, facts, start, probe, close."""

    #: "local", "ollama", "openai", "anthropic" or "echo".
    kind: str = ""
    #: What the model can do, listed by `inference.models` and announced with its
    #: load: "chat", "tools" (tools and tool_choice), "json" (response_format
    #: json_object and json_schema), "logprobs" (`Logprobs` before its text pieces
    #: when asked); an embedding model says "embeddings".
    capabilities: tuple[str, ...] = ()

    def __init__(self) -> None:
        #: Static facts shown by `inference.models` (family, size, file, upstream name...).
        self.info: dict[str, Any] = {}
        self.loaded = False

    async def start(self) -> None:
        """Load the model or reach the server once. The default does nothing."""
        self.loaded = True

    @abstractmethod
    async def probe(self) -> None:
        """Return when the engine can serve the model; raise a typed error otherwise."""

    async def close(self) -> None:
        """Release what `start` acquired. The default does nothing."""
        self.loaded = False

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, **self.info}

    def keys_view(self) -> list[dict[str, Any]] | None:
        """The upstream API keys this engine rotates over, as operators see them (never
        the key itself: a label such as "key-2 ...c3f9"), each with its `state`
        ("ok", "exhausted", "disabled", "open"), usage and what the upstream says is
        left; None for an engine without a key pool (the default)."""
        return None


class Backend(Engine):
    """One chat model behind one engine or server."""

    capabilities: tuple[str, ...] = ("chat",)

    @abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        """Stream at most one `Prompt` (before any text), pieces of text (`str`, each after
        its `Logprobs` when the request asks for them), at most one `ToolCalls` (a backend
        with the "tools" capability), then exactly one `Done`."""
