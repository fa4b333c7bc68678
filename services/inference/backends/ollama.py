"""The ollama backend: a model on an Ollama server, over its HTTP API.

* `GET /api/tags` is the probe: the server is up and has the model.
* `POST /api/show` once the model is found: family, size, quantization, context.
* `POST /api/chat` for messages, `POST /api/generate` with `"raw": true` for a
  prompt (sent as is, like the local backend's completion), both streaming
  NDJSON: one JSON object per line, text in `message.content` / `response`,
  and a last line with `"done": true`, `done_reason`, `prompt_eval_count`
  and `eval_count` (the token counts reported as usage; Ollama omits
  `prompt_eval_count` when the prompt was cached, reported then as 0).
  Since that count comes only at the end, the first line with output (the
  prompt has been evaluated) is preceded by `Prompt(estimate_tokens(...))`:
  what a generation cut short bills for its prompt.

Generation options map to Ollama's `options`: `num_predict` (max_tokens),
`temperature`, `top_p`, `seed`, `stop`, `frequency_penalty`,
`presence_penalty`.

Tools and structured output, in Ollama's terms:

* `tools` go as they are (Ollama takes OpenAI's function shape). Ollama
  answers calls in `message.tool_calls: [{"id"?, "function": {"index"?,
  "name", "arguments": {...}}}]` -- arguments as an object, and `id` only
  from recent versions: a call without one gets `call_` + 24 hex digits.
  They become one `ToolCalls` event (with `parallel_tool_calls` false, the
  first call only) after any text, then `Done("tool_calls")`: Ollama itself
  says "stop" when it made calls.
* The history is written in Ollama's shape: an assistant's calls as
  `tool_calls: [{"function": {"name", "arguments": {object}}}]`, a tool
  result as `{"role": "tool", "content", "tool_name"}` (the name of the call
  with that `tool_call_id`); `developer` messages are `system` messages.
* Ollama has no `tool_choice`. "none" sends no tools; "auto" sends them.
  "required" and a named function send no tools either, but a `format`: the
  JSON Schema of the call, so that the answer is a valid call by
  construction, as with the local backend's llama.cpp grammar. For a named
  function it is the function's parameters schema, and the answer is that
  call's arguments; for "required" it is `{"name": ..., "arguments": ...}`
  with one branch per tool (`anyOf`), and the answer is one call. A system
  message tells the model which function(s) to call, since it does not see
  the tools otherwise. An answer cut at max_tokens is `Done("length")` and
  no call.
* `response_format` becomes `format`: "json" for json_object, the schema for
  json_schema. When a call is forced as well, the call wins: the response is
  the call.

No "logprobs" capability: the API this backend was written and tested against
(tests/ollama_server.py) has no log probabilities, and recent Ollama releases'
`logprobs` option could not be checked here, so a request with `logprobs` to an
Ollama model is refused rather than answered without them.

Failures are typed as in `http.py`; an `{"error": ...}` line inside the stream
is UNAVAILABLE. Closing the generation early closes the connection, which
stops Ollama generating.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

from shared.errors import InvalidParams, MeshError, NotFound
from shared.generation import Message, Tool
from shared.logging import get_logger
from services.inference.backends.base import (
    Done, Event, GenerateRequest, Prompt, ToolCall, ToolCalls, estimate_tokens,
)
from services.inference.backends.http import DEFAULT_CONNECTIONS, HttpBackend, HttpClient, dropped, malformed

__all__ = ["OllamaBackend"]

log = get_logger(__name__)


class OllamaBackend(HttpBackend):
    """One model on one Ollama server."""

    kind = "ollama"

    capabilities = ("chat", "tools", "json")

    def __init__(self, url: str, model: str, *, timeout: float = 120.0,
                 connections: int = DEFAULT_CONNECTIONS) -> None:
        super().__init__()
        self.model = model
        self.http = HttpClient(url, timeout=timeout, name="ollama", connections=connections)
        self.info = {"upstream": model, "url": self.http.base_url}

    async def probe(self) -> None:
        tags = await self.http.get_json("/api/tags")
        models = tags.get("models") if isinstance(tags, dict) else None
        if not isinstance(models, list):
            raise malformed(self.http.name, "/api/tags has no model list")
        names = {m.get("name") for m in models if isinstance(m, dict)} | {
            m.get("model") for m in models if isinstance(m, dict)
        }
        if self.model not in names and f"{self.model}:latest" not in names:
            raise NotFound(f"{self.http.name} has no model {self.model!r} (try `ollama pull {self.model}`)")
        if "details" not in self.info:
            await self._describe()

    async def _describe(self) -> None:
        try:
            shown = await self.http.post_json("/api/show", {"model": self.model})
        except MeshError as exc:
            log.warning("ollama show failed", model=self.model, error=exc.message)
            return
        details = shown.get("details") if isinstance(shown, dict) else None
        if isinstance(details, dict):
            keep = ("family", "parameter_size", "quantization_level", "format")
            self.info["details"] = {k: details[k] for k in keep if k in details}
        model_info = shown.get("model_info") if isinstance(shown, dict) else None
        if isinstance(model_info, dict):
            for key, value in model_info.items():
                if key.endswith(".context_length"):
                    self.info["context_length"] = value

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        path, body = _body(request, self.model)
        answer = _Answer(request, self.http.name)
        prompted = False
        async with self.http.request("POST", path, body) as response:
            async for line in self.http.lines(response):
                obj = self._object(line)
                field = "message" if path == "/api/chat" else "response"
                done = obj.get("done") is True
                text = answer.feed(obj, field) if not done or field in obj else ""
                if answer.output and not prompted:
                    yield Prompt(estimate_tokens(request))
                    prompted = True
                if text:
                    yield text
                if done:
                    for event in answer.end(self._done(obj)):
                        yield event
                    return
        raise dropped(self.http.name, "the stream ended before \"done\": true")

    def _object(self, line: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(line)
        except ValueError:
            raise malformed(self.http.name, f"not a JSON line: {line[:80]!r}") from None
        if not isinstance(obj, dict):
            raise malformed(self.http.name, "a stream line is not an object")
        if "error" in obj:
            raise dropped(self.http.name, str(obj["error"])[:500])
        return obj

    def _done(self, obj: dict[str, Any]) -> Done:
        prompt_tokens, completion_tokens = obj.get("prompt_eval_count", 0), obj.get("eval_count", 0)
        if type(prompt_tokens) is not int or type(completion_tokens) is not int:
            raise malformed(self.http.name, "token counts are not integers")
        reason = "length" if obj.get("done_reason") == "length" else "stop"
        return Done(reason, prompt_tokens, completion_tokens)


# -- the request -----------------------------------------------------------------------


def _body(request: GenerateRequest, model: str) -> tuple[str, dict[str, Any]]:
    """The path and body of the request to Ollama."""
    options: dict[str, Any] = {
        "num_predict": request.max_tokens, "temperature": request.temperature, "top_p": request.top_p,
    }
    for name in ("seed", "frequency_penalty", "presence_penalty"):
        if getattr(request, name) is not None:
            options[name] = getattr(request, name)
    if request.stop:
        options["stop"] = list(request.stop)
    body: dict[str, Any] = {"model": model, "stream": True, "options": options}
    fmt = _format(request)
    if request.messages is None:
        body.update(prompt=request.prompt, raw=True)
        if fmt is not None:
            body["format"] = fmt
        return "/api/generate", body
    messages = [_message(m, request) for m in request.messages]
    forced = _forced(request)
    if forced:
        body["format"] = _call_schema(request, forced)
        _instruct(messages, _instructions(request, forced))
    else:
        if request.calls_tools:
            body["tools"] = [tool.to_dict() for tool in request.tools]
        if fmt is not None:
            body["format"] = fmt
    body["messages"] = messages
    return "/api/chat", body


def _forced(request: GenerateRequest) -> tuple[Tool, ...]:
    """The tools one of which must be called ("required", or the named one); () when not forced."""
    choice = request.choice
    if not request.calls_tools or choice.mode == "auto":
        return ()
    return tuple(t for t in request.tools if choice.mode == "required" or t.name == choice.name)


def _format(request: GenerateRequest) -> str | dict[str, Any] | None:
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    return "json" if fmt.type == "json_object" else dict(fmt.schema or {})


def _message(message: Message, request: GenerateRequest) -> dict[str, Any]:
    if message.role == "developer":
        return {"role": "system", "content": message.text}
    if message.role == "tool":
        out = {"role": "tool", "content": message.text}
        name = request.call_name(message.tool_call_id)
        return {**out, "tool_name": name} if name is not None else out
    out = {"role": message.role, "content": message.text}
    if message.tool_calls:
        out["tool_calls"] = [{"function": {"name": c.name, "arguments": _arguments(c)}} for c in message.tool_calls]
    return out


def _arguments(call: ToolCall) -> dict[str, Any]:
    """A past call's arguments as the object Ollama wants."""
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise InvalidParams(f"messages: the arguments of tool call {call.id!r} must be a JSON object "
                            "for an Ollama model", {"param": "messages"})
    return arguments


def _parameters(tool: Tool) -> dict[str, Any]:
    """A tool's parameters as a schema of an object (an empty schema means no arguments)."""
    schema = dict(tool.parameters)
    if not schema or schema == {"type": "object"}:
        return {"type": "object", "properties": {}}
    return schema


def _call_schema(request: GenerateRequest, tools: tuple[Tool, ...]) -> dict[str, Any]:
    """The `format` of a forced call: the named function's arguments, or one `{name, arguments}`."""
    if request.choice.mode == "function":
        return _parameters(tools[0])
    branches = [
        {"type": "object", "properties": {"name": {"enum": [t.name]}, "arguments": _parameters(t)},
         "required": ["name", "arguments"]}
        for t in tools
    ]
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def _instructions(request: GenerateRequest, tools: tuple[Tool, ...]) -> str:
    if request.choice.mode == "function":
        tool = tools[0]
        about = f" ({tool.description})" if tool.description else ""
        return (f"Call the function {tool.name}{about}: answer with only its arguments, a JSON object "
                f"valid against this JSON Schema: {json.dumps(_parameters(tool))}")
    shown = [{"name": t.name, "description": t.description, "parameters": _parameters(t)} for t in tools]
    return (f"Call one of these functions: {json.dumps(shown)}. Answer with only "
            '{"name": "function name", "arguments": {its arguments}}.')


def _instruct(messages: list[dict[str, Any]], text: str) -> None:
    """Add `text` to the system message (the first message, made one if needed)."""
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
    else:
        messages.insert(0, {"role": "system", "content": text})


# -- the answer ------------------------------------------------------------------------


class _Answer:
    """What the lines of one answer said: text, and calls (Ollama's, or the forced call's JSON)."""

    def __init__(self, request: GenerateRequest, name: str) -> None:
        self.request, self.name = request, name
        self.forced = _forced(request)
        self.held: list[str] = []
        self.calls: list[ToolCall] = []
        self.output = False

    def feed(self, obj: dict[str, Any], field: str) -> str:
        """The text of one line (held back when it is a forced call's JSON)."""
        if field == "message":
            message = obj.get("message")
            if not isinstance(message, dict):
                raise malformed(self.name, "a stream line without 'message'")
            text = message.get("content", "")
            self.calls.extend(self._calls(message.get("tool_calls")))
        else:
            text = obj.get("response")
        if not isinstance(text, str):
            raise malformed(self.name, f"a stream line without {field!r} text")
        self.output = self.output or bool(text) or bool(self.calls)
        if self.forced:
            self.held.append(text)
            return ""
        return text

    def _calls(self, items: Any) -> list[ToolCall]:
        if items is None:
            return []
        if not isinstance(items, list):
            raise malformed(self.name, "message.tool_calls is not a list")
        calls = []
        for item in items:
            function = item.get("function") if isinstance(item, dict) else None
            ok = (isinstance(function, dict) and isinstance(function.get("name"), str)
                  and isinstance(function.get("arguments", {}), dict) and isinstance(item.get("id", ""), str))
            if not ok or not isinstance(function, dict):
                raise malformed(self.name, "a tool call is not {id?, function: {name, arguments: {...}}}")
            call_id = item.get("id") or "call_" + secrets.token_hex(12)
            arguments = json.dumps(function.get("arguments", {}), ensure_ascii=False)
            calls.append(ToolCall(call_id, function["name"], arguments))
        return calls

    def end(self, done: Done) -> list[Event]:
        """The last events: `ToolCalls` when calls were made, then `Done`."""
        if self.forced:
            if done.finish_reason == "length":  # cut inside the call's JSON: no valid call to give
                return [done]
            self.calls = [self._forced_call("".join(self.held))]
        if not self.calls:
            return [done]
        calls = self.calls if self.request.parallel_tool_calls else self.calls[:1]
        return [ToolCalls(tuple(calls)), Done("tool_calls", done.prompt_tokens, done.completion_tokens)]

    def _forced_call(self, text: str) -> ToolCall:
        """The call a forced answer is: its JSON, valid by the `format` Ollama was given."""
        try:
            value = json.loads(text)
        except ValueError:
            raise malformed(self.name, f"a forced call that is not JSON: {text[:80]!r}") from None
        if self.request.choice.mode == "function":
            name, arguments = self.forced[0].name, value
        else:
            names = {t.name for t in self.forced}
            if not isinstance(value, Mapping) or value.get("name") not in names:
                raise malformed(self.name, f"a forced call that names none of the tools: {text[:80]!r}")
            name, arguments = value["name"], value.get("arguments", {})
        if not isinstance(arguments, Mapping):
            raise malformed(self.name, f"a forced call whose arguments are not an object: {text[:80]!r}")
        return ToolCall("call_" + secrets.token_hex(12), name, json.dumps(arguments, ensure_ascii=False))
