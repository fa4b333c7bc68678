"""A small server speaking Ollama's HTTP API, for testing the ollama backend.

No Ollama can be installed on these machines, so this implements the part of
its API a worker uses, with Ollama's field names and error shapes:

* `GET /api/tags` -> `{"models": [{"name", "model", "modified_at", "size", "digest", "details"}]}`
* `POST /api/show` `{"model"}` -> `{"modelfile", "parameters", "template", "details", "model_info", ...}`
* `POST /api/chat` `{"model", "messages", "stream", "options"}` and
  `POST /api/generate` `{"model", "prompt", "raw", "stream", "options"}`:
  NDJSON lines `{"model", "created_at", "message": {"role", "content"} | "response", "done": false}`,
  then `{"done": true, "done_reason", "total_duration", "load_duration",
  "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"}`
  (`/api/generate`'s last line also has `context`); `"stream": false` gives one object.
* `POST /api/embed` `{"model", "input": str | [str], "truncate", "dimensions"}`
  -> `{"model", "embeddings": [[float, ...]], "total_duration", "load_duration",
  "prompt_eval_count"}` for the models in `embedding_dims` (name -> length):
  unit vectors drawn from a hash of each text (`hash_vector`), `dimensions`
  keeping the first ones, renormalised; a chat model answers 400
  (`"x" does not support embeddings`), as Ollama does. `prefill_delay`
  holds the answer that long (the texts' evaluation).
* errors: `{"error": "..."}` with 400 (bad request), 404 (unknown model:
  `model "x" not found, try pulling it first`) or 500.

The reply is `reply` split into word tokens, honouring `options.num_predict`
(done_reason "length") and `options.stop`. Switches make it fail the ways a
real server does: `fail_status` (every call answers that status),
`malformed_after` (a non-JSON line after N chunks), `error_after` (an
`{"error"}` line after N chunks, as Ollama sends when a runner dies),
`drop_after` (the connection is cut after N chunks), `token_delay` (seconds
between chunks), `prefill_delay` (seconds before the first chunk: the prompt's
evaluation), `stall_after` (after N chunks nothing more is sent until the
client goes away). `disconnects` counts streams whose client went away.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import struct
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

__all__ = ["OllamaServer", "tokens_of", "canned_reply", "hash_vector", "unit_vector"]


def tokens_of(text: str) -> list[str]:
    """The fake tokenizer: words with their trailing spaces."""
    return re.findall(r"\S+\s*|\s+", text)


def canned_reply(text: str, stop: Any, limit: Any) -> tuple[list[str], str]:
    """`text` as tokens, cut at the first stop string and at `limit` tokens,
    with the finish reason a real server would give ("stop" or "length")."""
    for marker in [stop] if isinstance(stop, str) else stop or []:
        if marker in text:
            text = text[: text.index(marker)]
    pieces, reason = tokens_of(text), "stop"
    if isinstance(limit, int) and 0 <= limit < len(pieces):
        pieces, reason = pieces[:limit], "length"
    return pieces, reason


def hash_vector(text: str, dimensions: int) -> list[float]:
    """A unit vector that depends only on `text`: what the test servers embed.
    Its first `k` values, renormalised, are its `dimensions=k` version."""
    stream = b"".join(hashlib.sha256(f"{text}\x00{i}".encode()).digest() for i in range(dimensions // 8 + 1))
    raw = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dimensions}I", stream[:4 * dimensions])]
    return unit_vector(raw)


def unit_vector(values: list[float]) -> list[float]:
    """`values` scaled to length 1 (as Ollama and OpenAI return embeddings)."""
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _Embeddings:
    """`POST /api/embed`, kept apart from the generation endpoints."""

    #: The embedding models among `models`, and the length of their vectors.
    embedding_dims: dict[str, int] = {"all-minilm:latest": 384, "nomic-embed-text:latest": 768}

    def add_embedding_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/embed", self.embed)

    async def embed(self, request: web.Request) -> web.Response:
        started = time.monotonic_ns()
        body, problem = await self._body(request)  # type: ignore[attr-defined]
        if problem is not None:
            return problem
        model = body["model"]
        native = self.embedding_dims.get(model) or self.embedding_dims.get(f"{model}:latest")
        if native is None:
            return _error(400, f'"{model}" does not support embeddings')
        texts = body.get("input", [])
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return _error(400, "invalid input type")
        size = body.get("dimensions") or native
        if type(size) is not int or not 0 < size <= native:
            return _error(400, f"invalid dimensions: {size}, the model has {native}")
        if self.prefill_delay:  # type: ignore[attr-defined]
            await asyncio.sleep(self.prefill_delay)  # type: ignore[attr-defined]
        vectors = [unit_vector(hash_vector(text, native)[:size]) for text in texts]
        total = time.monotonic_ns() - started
        return web.json_response({
            "model": model, "embeddings": vectors, "total_duration": total, "load_duration": 1_000_000,
            # the words, and the [CLS] and [SEP] a BERT-family embedding model adds to each text
            "prompt_eval_count": sum(len(tokens_of(t)) + 2 for t in texts),
        })


class OllamaServer(_Embeddings):
    """An Ollama API on 127.0.0.1 (`port`, by default a free one), started with `async with`."""

    def __init__(self, models: tuple[str, ...] = ("llama3:8b",), *,
                 reply: str = "Hello from the Ollama protocol test server, one word at a time.",
                 token_delay: float = 0.0, port: int = 0) -> None:
        self.models = list(models)
        self.port = port
        self.reply = reply
        self.token_delay = token_delay
        self.prefill_delay = 0.0
        self.stall_after: int | None = None
        self.fail_status: int | None = None
        self.malformed_after: int | None = None
        self.error_after: int | None = None
        self.drop_after: int | None = None
        self.requests: list[tuple[str, dict[str, Any]]] = []
        #: client (host, port) of each request: one port for many requests = a kept connection
        self.peers: list[tuple[str, int]] = []
        self.disconnects = 0
        self.active = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> OllamaServer:
        app = web.Application()
        app.router.add_get("/api/tags", self.tags)
        app.router.add_post("/api/show", self.show)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/generate", self.generate)
        self.add_embedding_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def heal(self) -> None:
        """Stop failing."""
        self.fail_status = self.malformed_after = self.error_after = self.drop_after = self.stall_after = None

    # -- endpoints -------------------------------------------------------------

    async def tags(self, request: web.Request) -> web.Response:
        if self.fail_status:
            return _error(self.fail_status, "something went wrong")
        return web.json_response({"models": [self._tag(name) for name in self.models]})

    def _tag(self, name: str) -> dict[str, Any]:
        return {
            "name": name, "model": name, "modified_at": "2024-06-01T10:00:00.000000000Z",
            "size": 4_661_224_676, "digest": "365c0bd3c000a25d28ddbf732fe1c6add414de7275464c4e4d1c3b5fcb5d8ad1",
            "details": self._details(),
        }

    @staticmethod
    def _details() -> dict[str, Any]:
        return {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                "parameter_size": "8.0B", "quantization_level": "Q4_0"}

    async def show(self, request: web.Request) -> web.Response:
        body, problem = await self._body(request)
        if problem is not None:
            return problem
        return web.json_response({
            "modelfile": f"FROM {body['model']}\n", "parameters": "stop \"<|eot_id|>\"",
            "template": "{{ .Prompt }}", "details": self._details(),
            "model_info": {"general.architecture": "llama", "llama.context_length": 8192},
            "capabilities": ["completion"], "modified_at": "2024-06-01T10:00:00.000000000Z",
        })

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, chat=True)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, chat=False)

    # -- generation ------------------------------------------------------------

    async def _body(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        if self.fail_status:
            return {}, _error(self.fail_status, "llama runner process has terminated: exit status 2")
        try:
            body = await request.json()
        except ValueError:
            return {}, _error(400, "invalid character 'x' looking for beginning of value")
        self.requests.append((request.path, body))
        self.peers.append(request.transport.get_extra_info("peername") if request.transport else ("", 0))
        model = body.get("model") if isinstance(body, dict) else None
        if not model:
            return {}, _error(400, "model is required")
        if model not in self.models and f"{model}:latest" not in self.models:
            return {}, _error(404, f'model "{model}" not found, try pulling it first')
        return body, None

    async def _generation(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        started = time.monotonic_ns()
        body, problem = await self._body(request)
        if problem is not None:
            return problem
        if chat and not isinstance(body.get("messages"), list):
            return _error(400, "messages is required")
        options = body.get("options") or {}
        pieces, reason = self._reply(options)
        prompt_text = json.dumps(body.get("messages")) if chat else str(body.get("prompt", ""))
        counts = {"prompt_eval_count": len(tokens_of(prompt_text)), "eval_count": len(pieces)}
        if body.get("stream") is False:
            return web.json_response(self._last(body, chat, "".join(pieces), reason, counts, started))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        self.active += 1
        try:
            if self.prefill_delay:
                await asyncio.sleep(self.prefill_delay)
            for index, piece in enumerate(pieces):
                if await self._fault(request, response, index):
                    return response
                await self._line(response, self._chunk(body, chat, piece))
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
            if await self._fault(request, response, len(pieces)):
                return response
            await self._line(response, self._last(body, chat, "", reason, counts, started))
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        finally:
            self.active -= 1
        return response

    def _reply(self, options: dict[str, Any]) -> tuple[list[str], str]:
        return canned_reply(self.reply, options.get("stop"), options.get("num_predict"))

    async def _fault(self, request: web.Request, response: web.StreamResponse, index: int) -> bool:
        """Fail as switched at chunk `index`; True when the stream is over."""
        if self.malformed_after == index:
            await response.write(b'{"model": "llama3:8b", "message": {"content": "\n')
            await response.write(b"this is not json\n")
            return False
        if self.error_after == index:
            await self._line(response, {"error": "an error was encountered while running the model"})
            await response.write_eof()
            return True
        if self.drop_after == index:
            assert request.transport is not None
            request.transport.abort()  # the connection cut mid-stream
            return True
        if self.stall_after == index:
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.02)
            self.disconnects += 1
            return True
        return False

    @staticmethod
    async def _line(response: web.StreamResponse, obj: dict[str, Any]) -> None:
        await response.write(json.dumps(obj).encode() + b"\n")

    @staticmethod
    def _chunk(body: dict[str, Any], chat: bool, piece: str) -> dict[str, Any]:
        chunk: dict[str, Any] = {"model": body["model"], "created_at": _now()}
        if chat:
            chunk["message"] = {"role": "assistant", "content": piece}
        else:
            chunk["response"] = piece
        chunk["done"] = False
        return chunk

    @staticmethod
    def _last(body: dict[str, Any], chat: bool, text: str, reason: str, counts: dict[str, int],
              started: int) -> dict[str, Any]:
        total = time.monotonic_ns() - started
        last: dict[str, Any] = {"model": body["model"], "created_at": _now()}
        if chat:
            last["message"] = {"role": "assistant", "content": text}
        else:
            last["response"] = text
        last.update(done=True, done_reason=reason, total_duration=total, load_duration=1_000_000,
                    prompt_eval_count=counts["prompt_eval_count"], prompt_eval_duration=total // 4,
                    eval_count=counts["eval_count"], eval_duration=total // 2)
        if not chat:
            last["context"] = list(range(counts["prompt_eval_count"] + counts["eval_count"]))
        return last


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
