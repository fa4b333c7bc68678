"""The ollama backend: a model on an Ollama server, over its HTTP API.

* `GET /api/tags` is the probe: the server is up and has the model.
* `POST /api/show` once the model is found: family, size, quantization, context.
* `POST /api/chat` for messages, `POST /api/generate` with `"raw": true` for a
  prompt (sent as is, like the local backend's completion), both streaming
  NDJSON: one JSON object per line, text in `message.content` / `response`,
  and a last line with `"done": true`, `done_reason`, `prompt_eval_count`
  and `eval_count` (the token counts reported as usage; Ollama omits
  `prompt_eval_count` when the prompt was cached, reported then as 0).
  Since that count comes only at the end, the first line of the answer (the
  prompt has been evaluated) is preceded by `Prompt(estimate_tokens(...))`:
  what a generation cut short bills for its prompt.

Generation options map to Ollama's `options`: `num_predict` (max_tokens),
`temperature`, `top_p`, `seed`, `stop`. Failures are typed as in `http.py`;
an `{"error": ...}` line inside the stream is UNAVAILABLE. Closing the
generation early closes the connection, which stops Ollama generating.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from shared.errors import MeshError, NotFound
from shared.logging import get_logger
from services.inference.backends.base import Done, Event, GenerateRequest, Prompt, estimate_tokens
from services.inference.backends.http import HttpBackend, HttpClient, dropped, malformed

__all__ = ["OllamaBackend"]

log = get_logger(__name__)


class OllamaBackend(HttpBackend):
    """One model on one Ollama server."""

    kind = "ollama"

    def __init__(self, url: str, model: str, *, timeout: float = 120.0) -> None:
        super().__init__()
        self.model = model
        self.http = HttpClient(url, timeout=timeout, name="ollama")
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
        options: dict[str, Any] = {
            "num_predict": request.max_tokens, "temperature": request.temperature, "top_p": request.top_p,
        }
        if request.seed is not None:
            options["seed"] = request.seed
        if request.stop:
            options["stop"] = list(request.stop)
        body: dict[str, Any] = {"model": self.model, "stream": True, "options": options}
        if request.messages is not None:
            path, field = "/api/chat", "message"
            body["messages"] = request.message_dicts()
        else:
            path, field = "/api/generate", "response"
            body.update(prompt=request.prompt, raw=True)
        prompted = False
        async with self.http.request("POST", path, body) as response:
            async for line in self.http.lines(response):
                event = self._parse(line, field)
                if event is not None:
                    if not prompted and isinstance(event, str):
                        yield Prompt(estimate_tokens(request))
                        prompted = True
                    yield event
                    if isinstance(event, Done):
                        return
        raise dropped(self.http.name, "the stream ended before \"done\": true")

    def _parse(self, line: bytes, field: str) -> Event | None:
        try:
            obj = json.loads(line)
        except ValueError:
            raise malformed(self.http.name, f"not a JSON line: {line[:80]!r}") from None
        if not isinstance(obj, dict):
            raise malformed(self.http.name, "a stream line is not an object")
        if "error" in obj:
            raise dropped(self.http.name, str(obj["error"])[:500])
        if obj.get("done") is True:
            return self._done(obj)
        if field == "message":
            message = obj.get("message")
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = obj.get("response")
        if not isinstance(text, str):
            raise malformed(self.http.name, f"a stream line without {field!r} text")
        return text or None

    def _done(self, obj: dict[str, Any]) -> Done:
        prompt_tokens, completion_tokens = obj.get("prompt_eval_count", 0), obj.get("eval_count", 0)
        if type(prompt_tokens) is not int or type(completion_tokens) is not int:
            raise malformed(self.http.name, "token counts are not integers")
        reason = "length" if obj.get("done_reason") == "length" else "stop"
        return Done(reason, prompt_tokens, completion_tokens)
