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
(done_reason "length") and `options.stop`.

Tools and structured output, deterministic:

* `/api/chat` with `tools` (OpenAI's function shape, checked) and a last
  message from the user that mentions tools by name calls each of them, in
  the order of `tools`, with arguments built from its parameters schema
  (`sample_of`: the first choice, the minimum, the shortest everywhere):
  one line `{"message": {"role": "assistant", "content": "", "tool_calls":
  [{"id": "call_...", "function": {"index", "name", "arguments": {...}}}]}}`
  then the done line, whose `done_reason` is "stop" as Ollama's is.
  `call_ids = False` answers in the shape of Ollama before 0.12: no `id`,
  no `index`.
* `format`: "json" makes the reply `{"reply": reply}`, a JSON Schema object
  makes it `sample_of(schema)`, as JSON text split into word tokens.
* History is checked as Ollama decodes it: a past call's `arguments` must be
  an object (400 with Go's unmarshal error otherwise).

`requests` records every request's path and body, the last one last.

Switches make it fail the ways a real server does: `fail_status` (every call answers that status),
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

from local_site import serve_locally

__all__ = ["OllamaServer", "tokens_of", "canned_reply", "hash_vector", "unit_vector", "mentioned_tools",
           "sample_of", "structured_reply"]


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


def sample_of(schema: Any) -> Any:
    """A JSON value valid against `schema` (the parts of JSON Schema tools use),
    the same every time: the first choice, the smallest length, the minimum."""
    if not isinstance(schema, dict):
        return {}
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return sample_of(schema[key][0])
    kind = schema.get("type", "object" if "properties" in schema else None)
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or kind is None:
        return {name: sample_of(sub) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        count = min(max(1, schema.get("minItems", 1)), schema.get("maxItems", 1))
        return [sample_of(schema.get("items", {})) for _ in range(count)]
    if kind == "string":
        text = "example" * (1 + schema.get("minLength", 0) // 7)
        return text[: schema.get("maxLength", len(text))]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0) + 1 if "exclusiveMinimum" in schema else 1)
        low = min(low, schema.get("maximum", low))
        return int(low) if kind == "integer" else float(low)
    return {"boolean": True, "null": None}.get(kind)


def mentioned_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The tools (their `function`) the last message names, when it is the user's."""
    messages = body.get("messages") or [{}]
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    text = last.get("content") if last.get("role") == "user" else None
    if not isinstance(text, str):
        return []
    functions = [t["function"] for t in body.get("tools") or []]
    return [f for f in functions if f["name"] in text]


def _tools_problem(body: dict[str, Any]) -> str | None:
    """What Ollama would refuse in the tools, history or format of a chat request."""
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return "json: cannot unmarshal tools: a tool is {type: function, function: {name, ...}}"
    for message in body.get("messages") or []:
        for call in message.get("tool_calls") or [] if isinstance(message, dict) else []:
            arguments = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
            if not isinstance(arguments, dict):
                kind = "string" if isinstance(arguments, str) else type(arguments).__name__
                return (f"json: cannot unmarshal {kind} into Go struct field ToolCallFunction.messages.tool_calls"
                        ".function.arguments of type api.ToolCallFunctionArguments")
    fmt = body.get("format")
    if fmt not in (None, "", "json") and not isinstance(fmt, dict):
        return f"invalid format: {json.dumps(fmt)}; expected \"json\" or a valid JSON Schema"
    return None


def structured_reply(reply: str, fmt: Any) -> str:
    """The reply as the JSON a `format` / `response_format` asks for."""
    if isinstance(fmt, dict):
        return json.dumps(sample_of(fmt))
    return json.dumps({"reply": reply})


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
        self.call_ids = True
        self.requests: list[tuple[str, dict[str, Any]]] = []
        #: generation calls received, failed ones (`fail_status`) included
        self.calls = 0
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
        self._runner, self.port = await serve_locally(app, self.port)
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
        self.calls += 1
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
        problem_text = _tools_problem(body) if chat else None
        if problem_text is not None:
            return _error(400, problem_text)
        calls = self._calls(body) if chat else []
        pieces, reason = self._reply(body) if not calls else ([], "stop")
        prompt_text = json.dumps(body.get("messages")) if chat else str(body.get("prompt", ""))
        eval_count = len(pieces) + sum(len(tokens_of(json.dumps(c))) for c in calls)
        counts = {"prompt_eval_count": len(tokens_of(prompt_text)), "eval_count": eval_count}
        if body.get("stream") is False:
            last = self._last(body, chat, "".join(pieces), reason, counts, started)
            if calls:
                last["message"]["tool_calls"] = calls
            return web.json_response(last)
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
            if calls:
                line = self._chunk(body, chat, "")
                line["message"]["tool_calls"] = calls
                await self._line(response, line)
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

    def _reply(self, body: dict[str, Any]) -> tuple[list[str], str]:
        options = body.get("options") or {}
        text = structured_reply(self.reply, body["format"]) if body.get("format") else self.reply
        return canned_reply(text, options.get("stop"), options.get("num_predict"))

    def _calls(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The tool calls this answer makes, in Ollama's shape (see the module doc)."""
        calls = []
        for index, function in enumerate(mentioned_tools(body)):
            call: dict[str, Any] = {"function": {"name": function["name"],
                                                 "arguments": sample_of(function.get("parameters"))}}
            if self.call_ids:
                call = {"id": f"call_{index:08x}", "function": {"index": index, **call["function"]}}
            calls.append(call)
        return calls

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
