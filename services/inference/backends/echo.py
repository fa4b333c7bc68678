"""The echo backend: the request's own words back, at no cost.

It answers with the words of the prompt (or of the last message), one word per
token, up to `max_tokens` -- `finish_reason` "length" when it stopped there,
"stop" otherwise -- and honours `stop` strings. Token counts are word counts:
`prompt_tokens` the words of everything sent, `completion_tokens` the words
returned. An optional `delay` (seconds between words) gives it the pace of a
real model without its CPU.

It exists for what a deployment needs without a model: load and soak runs,
fault drills, smoke tests of a new host (like LiteLLM's `mock_response`).
The answer is deterministic, so it exercises the cache like a greedy model.
It has no "logprobs" capability: its words are not drawn from a distribution,
and made-up figures would only mislead; a request with `logprobs` is refused
(it is also the model the tests use for that refusal).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from services.inference.backends.base import Backend, Done, Event, FinishReason, GenerateRequest, Prompt

__all__ = ["EchoBackend"]


class EchoBackend(Backend):
    """Streams the request's words back, optionally `delay` seconds apart."""

    kind = "echo"

    def __init__(self, *, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.info = {"delay": delay}

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        if request.messages is not None:
            sent = " ".join(m.text for m in request.messages)
            source = request.messages[-1].text if request.messages else ""
        else:
            sent = source = request.prompt or ""
        words = source.split() or ["echo"]
        finish: FinishReason = "length" if len(words) > request.max_tokens else "stop"
        answer = " ".join(words[: request.max_tokens])
        cut = _stop_cut(answer, request.stop)
        if cut is not None:
            answer, finish = answer[:cut], "stop"
        pieces = answer.split(" ") if answer else []
        yield Prompt(len(sent.split()))
        for index, word in enumerate(pieces):
            if index and self.delay:
                await asyncio.sleep(self.delay)
            yield word if index == 0 else f" {word}"
        yield Done(finish, len(sent.split()), len(pieces))

    async def probe(self) -> None:
        return None


def _stop_cut(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in `text`, if any does."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None
