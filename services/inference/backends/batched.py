"""The local backend with continuous batching: one llama.cpp context, many sequences.

`LocalBackend` (local.py) gives each slot its own context and thread, so N
concurrent requests run N single-token decodes side by side. Here one context
holds `slots` sequences (`n_seq_max`, each with its own `n_ctx` cells of KV
cache: `kv_unified` off) and one thread runs the decode loop:

    while requests are active or waiting:
        admit waiting requests while a sequence is free (first come, first
            served);
        evaluate the next chunk (128 tokens) of one admitted request's prompt
            into its sequence, in a decode call of its own; after its last
            chunk, sample its first token: the request is now active (and so
            is every admitted request with the very same prompt, its KV cells
            copied from this one's and its first token sampled from the same
            logits: one evaluation for all of them);
        one `llama_decode` of one token for every active sequence;
        sample each sequence's next token with its own sampler chain;
        a request that ends (end of generation, a stop string, max_tokens, the
            end of its context, or its caller cancelled) leaves: its sequence's
            KV cells are removed (`llama_memory_seq_rm`) and the sequence is free.

Requests join and leave between steps, so a request arriving while others
generate waits one step (~10-30 ms here) plus its own prompt's evaluation,
and a long prompt holds the running streams up by one chunk's evaluation
(~0.5 s here) at a time, never by the whole prompt's.

What a request gets is what `LocalBackend` gives it: the same prompt tokens
(the model's chat template rendered by llama-cpp-python's `Jinja2ChatFormatter`,
as `create_chat_completion` does for a GGUF with a template), the same
sampler chain as llama-cpp-python's `Llama._init_sampler` (penalties over the
last 64 tokens, grammar, then greedy at temperature 0, else top_k 40, typical,
top_p, min_p 0.05, temperature, a seeded draw), stop strings held back until
they can no longer start, the same token counts and the same events,
`Logprobs` included (log-softmax of the raw logits row, as local.py).

Determinism: a request's prompt is evaluated alone (in chunks of 128 tokens;
`Llama.eval` takes 512, which gives the same logits here: tested), so its
first token's logits are those it gets on a context of its own; at each later step attention reads only the request's own
sequence (a stream of its own, `kv_unified` off) and llama.cpp's CPU kernels
compute each row of the batch on its own, so the row does not depend on what
else is in the batch. That holds on this build (tests/test_inference_batched.py:
the same text alone, beside three others, and on the unbatched backend, greedy
and seeded); a backend whose batched kernels reorder a row's sums (a GPU, some
repacked quant types) could differ in the last bits, which those tests catch.
A request sharing another's prompt gets a byte copy of that prompt's KV cells
and samples from the very logits row it would have computed itself.

Throughput: on a CPU a decode step costs nearly as much per token as the
model's compute, so the gain is what the batched matrix products save over
single rows. With the Q4_1 SmolLM2 they save little: llama.cpp has no
multi-row kernel for Q4_1 weights (nor a repacked layout), each row is its own
dot product, and a step of 4 tokens costs 3-3.5x a step of 1 in llama.cpp
alone (bench/batch_ceiling.py: 4 sequences give 1.1-1.3x the tokens of 1 per
CPU second, 1.2-1.5x per wall second on the 2-core test machine). What is
ours is kept small: a greedy request's token is picked in numpy rather than
by the sampler chain (`_greedy`, the same choice), ~0.2 ms a token with its
text and hand-off, beside a step of ~28 ms.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import queue
import secrets
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import ConfigError
from shared.errors import InvalidParams, Unavailable
from shared.logging import get_logger
from services.inference.backends.base import Done, Event, GenerateRequest, Logprobs, Prompt, token_logprob
from services.inference.backends.local import GgufBackend, Output, llama_grammar, model_file, typed_error
from services.inference.backends.structured import grammar_of, prompt_messages

__all__ = ["BatchedBackend"]

log = get_logger(__name__)

#: llama-cpp-python's defaults for what a request cannot set (`Llama._init_sampler`).
TOP_K, MIN_P, TYPICAL_P, PENALTY_LAST_N = 40, 0.05, 1.0, 64
#: Prompt tokens evaluated between two decode steps (~0.5 s of this 2-core machine).
PREFILL_CHUNK = 128


@dataclass(eq=False)
class _Job:
    """One request inside the engine thread."""

    request: GenerateRequest
    tokens: list[int]
    stops: list[str]
    grammar: Any
    emit: Callable[[Any], None]
    stop: threading.Event = field(default_factory=threading.Event)
    seq: int = -1
    n_past: int = 0
    last: int = -1
    sampled: int = 0
    limit: int = 0
    sampler: Any = None
    #: Greedy with no grammar and no frequency or presence penalty: the chain's choice taken
    #: in numpy (`_Engine._greedy`); `recent` is its penalty window, the last 64 tokens.
    greedy: bool = False
    recent: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=PENALTY_LAST_N))
    pending: str = ""
    items: list[dict[str, Any]] = field(default_factory=list)
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))


class BatchedBackend(GgufBackend):
    """One GGUF model, one context of `slots` sequences decoded together."""

    def __init__(self, path: Path | None = None, *, slots: int = 4, n_threads: int = 2, n_ctx: int = 2048,
                 repeat_penalty: float = 1.0) -> None:
        super().__init__(path, slots=slots, n_threads=n_threads, n_ctx=n_ctx, repeat_penalty=repeat_penalty)
        self._engine: _Engine | None = None

    async def start(self) -> None:
        path = model_file(self.path)
        self._engine = await asyncio.to_thread(_Engine, path, self.slots, self.n_threads, self.n_ctx,
                                               self.repeat_penalty)
        self.path = path
        self.info = {"file": path.name, "n_ctx": self.n_ctx, "n_threads": self.n_threads, "batch": self.slots}
        self.loaded = True
        log.info("local model loaded, batched", file=str(path), sequences=self.slots, threads=self.n_threads)

    async def close(self) -> None:
        self.loaded = False
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)

    async def probe(self) -> None:
        if not self.loaded:
            raise Unavailable("local model not loaded")

    @property
    def active(self) -> int:
        """The sequences generating now (for tests and load reports)."""
        return len(self._engine.active) if self._engine is not None else 0

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        output = Output(request)
        async with aclosing(self._raw(request)) as events:
            async for event in events:
                for item in output.feed(event):
                    yield item

    async def _raw(self, request: GenerateRequest) -> AsyncGenerator[Event, None]:
        engine = self._engine
        if engine is None:
            raise Unavailable("local model not loaded", {"retry_safe": True})
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                job.stop.set()

        tokens, stops, grammar = await asyncio.to_thread(engine.prepare, request)
        job = _Job(request, tokens, stops, grammar, emit)
        engine.submit(job)
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise typed_error(item)
                yield item
                if isinstance(item, Done):
                    return
        finally:
            job.stop.set()  # the engine drops the job and frees its sequence at its next step


class _Engine:
    """The context, its sequences and the thread that decodes them."""

    def __init__(self, path: Path, slots: int, n_threads: int, n_ctx: int, repeat_penalty: float) -> None:
        try:
            import llama_cpp
            from llama_cpp import _internals, llama_chat_format
        except ImportError as exc:
            raise ConfigError([f"local backend: llama-cpp-python is not installed ({exc})"]) from None
        self.lib: Any = llama_cpp  # untyped bindings
        self.internals: Any = _internals
        # The `Llama` brings the model, its tokenizer and metadata; its own small context is unused.
        self.llm: Any = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=n_threads,
                                   n_threads_batch=n_threads, verbose=False)
        params = self.llm.context_params
        params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx * slots, slots, False
        params.n_batch = params.n_ubatch = 512
        self.n_ctx, self.n_batch, self.repeat_penalty = n_ctx, PREFILL_CHUNK, repeat_penalty
        self.ctx: Any = _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
        self.batch = llama_cpp.llama_batch_init(max(self.n_batch, slots), 0, 1)
        self.n_vocab = self.llm.n_vocab()
        self.formatter = _chat_formatter(self.llm, llama_chat_format)
        self.free = list(range(slots - 1, -1, -1))  # the lowest last: see `_step`
        self.active: list[_Job] = []
        self.inbox: queue.Queue[_Job | None] = queue.Queue()
        self.waiting: list[_Job] = []
        self.filling: list[_Job] = []  # admitted, their prompts being evaluated a chunk a step
        self.lock, self.closed = threading.Lock(), False
        self.ending = False  # the engine thread has read the closing `None`
        self.thread = threading.Thread(target=self._run, name="llama-batch", daemon=True)
        self.thread.start()

    # -- the caller's side ------------------------------------------------------------

    def prepare(self, request: GenerateRequest) -> tuple[list[int], list[str], Any]:
        """The prompt's tokens, the stop strings and the grammar (in a worker thread)."""
        stops = list(request.stop)
        if request.messages is not None:
            result = self.formatter(messages=prompt_messages(request))
            tokens = self.llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
            if result.stop is not None:
                stops += result.stop if isinstance(result.stop, list) else [result.stop]
        else:  # as `Llama.create_completion` tokenizes a text prompt
            bos = self.llm.token_bos()
            tokens = [bos] if bos != -1 and self.llm._model.add_bos_token() else []
            tokens += self.llm.tokenize((request.prompt or "").encode(), add_bos=False, special=True)
            tokens = tokens or [bos]
        if len(tokens) > self.n_ctx:
            raise InvalidParams(f"prompt too long for the model: Requested tokens ({len(tokens)}) exceed context "
                                f"window of {self.n_ctx}", {"param": "messages", "reason": "context_length_exceeded"})
        text = grammar_of(request)
        return tokens, stops, llama_grammar(text) if text is not None else None

    def submit(self, job: _Job) -> None:
        with self.lock:  # never behind the closing `None`, where nobody would read it
            if self.closed:
                raise Unavailable("local model closed", {"retry_safe": True})
            self.inbox.put(job)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.inbox.put(None)
        self.thread.join()
        self.lib.llama_batch_free(self.batch)
        self.ctx.close()
        self.llm.close()

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if not self._take(block=not self.active and not self.filling):
                    break
                self._admit()
                if self.filling:
                    self._prefill(self.filling[0])
                if self.active:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a failed decode fails every job in it
                for job in list(self.active):
                    job.emit(exc)
                    self._leave(job)
        for job in self.active + self.filling + self.waiting:
            job.emit(Unavailable("local model closed", {"retry_safe": True}))
            self._leave(job)

    def _take(self, *, block: bool) -> bool:
        """Move submitted jobs to `waiting`; False once closed."""
        if self.ending:
            return False
        try:
            job = self.inbox.get(block=block and not self.waiting)
            while True:
                if job is None:
                    self.ending = True
                    return False
                self.waiting.append(job)
                job = self.inbox.get_nowait()
        except queue.Empty:
            return True

    def _admit(self) -> None:
        """Give waiting requests the free sequences, in order of arrival."""
        self.waiting = [job for job in self.waiting if not job.stop.is_set()]
        while self.waiting and self.free:
            job = self.waiting.pop(0)
            job.seq = self.free.pop()
            try:
                request = job.request
                seed = request.seed if request.seed is not None else secrets.randbits(32)
                job.greedy = (not request.temperature and job.grammar is None and not request.frequency_penalty
                              and not request.presence_penalty)
                job.sampler = None if job.greedy else self._sampler(request, job.grammar, seed)
            except Exception as exc:  # noqa: BLE001 - this job's own failure
                job.emit(exc)
                self._leave(job)
                continue
            room = self.n_ctx - len(job.tokens)
            job.limit = min(request.max_tokens, room) if request.max_tokens and request.max_tokens > 0 else room
            self.lib.llama_memory_seq_rm(self.ctx.memory, job.seq, -1, -1)
            self.filling.append(job)

    def _prefill(self, job: _Job) -> None:
        """Evaluate the next chunk of `job`'s prompt, in a decode call of its own (so its
        logits do not depend on the batch); after the last, sample its first token. One
        chunk between two steps, so a long prompt delays the running streams by a chunk's
        time at most, not by the whole prompt's."""
        if job.stop.is_set():
            self._leave(job)
            return
        chunk = job.tokens[job.n_past:job.n_past + self.n_batch]
        last = job.n_past + len(chunk) == len(job.tokens)
        try:
            self._fill([(token, job.n_past + i, job.seq, last and i == len(chunk) - 1)
                        for i, token in enumerate(chunk)])
            self._decode()
        except Exception as exc:  # noqa: BLE001 - this job's own failure
            job.emit(exc)
            self._leave(job)
            return
        job.n_past += len(chunk)
        if last:
            # Requests with the very same prompt (admitted, or come in while it was evaluated)
            # take a copy of its KV cells (llama.cpp copies the stream at the next decode) and
            # sample from the same logits row: what evaluating the prompt themselves would give
            # them, without its cost.
            self._take(block=False)
            self._admit()
            twins = [other for other in self.filling if other.n_past == 0 and other.tokens == job.tokens]
            for twin in twins:
                self.lib.llama_memory_seq_cp(self.ctx.memory, job.seq, twin.seq, -1, -1)
                twin.n_past = job.n_past
            for ready in [job, *twins]:
                self.filling.remove(ready)
                ready.emit(Prompt(len(ready.tokens)))
                self.active.append(ready)
                self._sample(ready, len(chunk) - 1)

    def _step(self) -> None:
        """One token for every active sequence, in one decode call.

        With a KV stream per sequence, llama.cpp evaluates a batch in one graph only if its
        sequence ids are consecutive and increasing (`split_equal`, sequential): otherwise
        in one graph per run of them, each costing nearly a whole step (4 sequences in
        decreasing order: 40 ms a step against 25 here). So the rows go in order of their
        sequence, a request takes the lowest free sequence, and one leaving from the middle
        has its gap closed (`_close_gap`)."""
        for job in [job for job in self.active if job.stop.is_set()]:
            self._leave(job)
        self._close_gap()
        jobs = sorted(self.active, key=lambda job: job.seq)
        if not jobs:
            return
        self._fill([(job.last, job.n_past, job.seq, True) for job in jobs])
        self._decode()
        for index, job in enumerate(jobs):
            job.n_past += 1
            self._sample(job, index)

    def _close_gap(self) -> None:
        """While the active sequences are not consecutive, move the highest to the lowest free
        sequence below it: llama.cpp copies its KV stream whole (~47 MB, 6-8 ms, at the next
        decode, cell for cell, so what it computes next is unchanged), less than the extra
        graph each step would cost."""
        while self.active and self.free:
            seqs = sorted(job.seq for job in self.active)
            if seqs[-1] - seqs[0] == len(seqs) - 1 or self.free[-1] > seqs[-1]:
                return
            job = max(self.active, key=lambda job: job.seq)
            seq = self.free.pop()
            self.lib.llama_memory_seq_cp(self.ctx.memory, job.seq, seq, -1, -1)
            self.lib.llama_memory_seq_rm(self.ctx.memory, job.seq, -1, -1)
            self.free.append(job.seq)
            self.free.sort(reverse=True)
            job.seq = seq

    def _fill(self, rows: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        batch.n_tokens = len(rows)
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq

    def _decode(self) -> None:
        code = self.lib.llama_decode(self.ctx.ctx, self.batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def _sample(self, job: _Job, index: int) -> None:
        """Sample `job`'s next token from row `index` of the last decode, and pass its text on."""
        if job.stop.is_set():
            self._leave(job)
            return
        logits = self._logits(index) if job.request.logprobs else None
        if job.greedy:
            token = self._greedy(job, index)
        else:
            token = self.lib.llama_sampler_sample(job.sampler.sampler, self.ctx.ctx, index)
        job.sampled += 1
        job.last = token
        if self.lib.llama_vocab_is_eog(self.llm._model.vocab, token):
            self._finish(job, "stop", eog=True)
            return
        if logits is not None:
            job.items.append(self._logprob_item(token, logits, job.request.top_logprobs or 0))
        job.pending += job.decoder.decode(self.llm.detokenize([token]))
        cut = min((i for i in (job.pending.find(s) for s in job.stops if s) if i >= 0), default=-1)
        if cut >= 0:
            job.pending = job.pending[:cut]
            self._finish(job, "stop")
        elif job.sampled >= job.limit:
            self._finish(job, "length")
        else:
            self._flush(job, len(job.pending) - _held(job.pending, job.stops))

    def _flush(self, job: _Job, upto: int) -> None:
        if upto <= 0:
            return
        if job.request.logprobs:
            job.emit(Logprobs(tuple(job.items)))
            job.items = []
        job.emit(job.pending[:upto])
        job.pending = job.pending[upto:]

    def _finish(self, job: _Job, reason: str, *, eog: bool = False) -> None:
        job.pending += job.decoder.decode(b"", final=True)
        self._flush(job, len(job.pending))
        self._leave(job)  # first: the caller that sees `Done` sees the sequence free
        job.emit(Done("length" if reason == "length" else "stop", len(job.tokens), job.sampled - int(eog)))

    def _leave(self, job: _Job) -> None:
        if job in self.active:
            self.active.remove(job)
        if job in self.filling:
            self.filling.remove(job)
        if job.seq >= 0:
            self.lib.llama_memory_seq_rm(self.ctx.memory, job.seq, -1, -1)
            self.free.append(job.seq)
            self.free.sort(reverse=True)
            job.seq = -1
        job.sampler = None

    def _sampler(self, request: GenerateRequest, grammar: Any, seed: int) -> Any:
        """llama-cpp-python's chain (`Llama._init_sampler`) for this request."""
        chain = self.internals.LlamaSampler()
        chain.add_penalties(self.n_vocab, PENALTY_LAST_N, self.repeat_penalty,
                            request.frequency_penalty or 0.0, request.presence_penalty or 0.0)
        if grammar is not None:
            chain.add_grammar(self.llm._model, grammar)
        temperature = request.temperature or 0.0  # resolved by the service: never None here
        if temperature == 0:
            chain.add_greedy()
        else:
            chain.add_top_k(TOP_K)
            chain.add_typical(TYPICAL_P, 1)
            chain.add_top_p(request.top_p if request.top_p is not None else 1.0, 1)
            chain.add_min_p(MIN_P, 1)
            chain.add_temp(temperature)
            chain.add_dist(seed)
        return chain

    def _logits(self, index: int) -> Any:
        return self._row(index).copy()

    def _row(self, index: int) -> Any:
        """Row `index` of the last decode's logits, in place (valid until the next decode)."""
        import numpy as np

        pointer = self.lib.llama_get_logits_ith(self.ctx.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def _greedy(self, job: _Job, index: int) -> int:
        """The token `_sampler`'s greedy chain picks, bit for bit, in a third of its time or less
        (the chain builds an array of the whole vocabulary and looks each token up in its penalty
        window):
        llama.cpp's repeat penalty in float32 on the tokens of the window (`logit * penalty`
        if `logit <= 0`, else `logit / penalty`), then the first highest logit."""
        import numpy as np

        row = self._row(index)
        if job.recent and self.repeat_penalty != 1.0:
            seen = np.fromiter(set(job.recent), dtype=np.intp)
            values, penalty = row[seen], np.float32(self.repeat_penalty)
            row = row.copy()
            row[seen] = np.where(values <= 0, values * penalty, values / penalty)
        token = int(row.argmax())
        job.recent.append(token)
        return token

    def _logprob_item(self, token: int, logits: Any, count: int) -> dict[str, Any]:
        """OpenAI's item for `token`, as local.py gives it (before temperature, penalties, grammar)."""
        import numpy as np

        logprobs = self.lib.Llama.logits_to_logprobs(logits)
        best = np.argpartition(-logprobs, count)[:count].tolist() if count else []
        best.sort(key=lambda i: (-float(logprobs[i]), i))
        item = self._entry(token, logprobs)
        item["top_logprobs"] = [self._entry(i, logprobs) for i in best]
        return item

    def _entry(self, token: int, logprobs: Any) -> dict[str, Any]:
        raw = self.llm.detokenize([token])
        return token_logprob(raw.decode("utf-8", errors="replace"), float(logprobs[token]), raw=raw)


def _held(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could begin a stop string (kept back)."""
    for size in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-size:]) for s in stops if s):
            return size
    return 0


def _chat_formatter(llm: Any, llama_chat_format: Any) -> Any:
    """The model's chat template, as `Llama.__init__` builds it for `create_chat_completion`."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ConfigError(["local backend: batching needs a GGUF with a chat template "
                           "(tokenizer.chat_template); set \"batch\": false for this model"])
    eos, bos = llm.token_eos(), llm.token_bos()
    text = llm._model.token_get_text
    return llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=text(eos) if eos != -1 else "",
                                                 bos_token=text(bos) if bos != -1 else "", stop_token_ids=[eos])
