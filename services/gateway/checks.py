"""What `gateway.infer` checks before it spends anything, and what it derives.

The generation parameters are checked with the workers' own rules (the
generation contract, `shared/generation/`), so a request the gateway admits
is one a worker accepts, and bad input is refused before it costs quota. The
gateway also derives:

* `reserve`: the tokens to hold against `tokens_per_month` before the work --
  `max_tokens` plus an upper bound of the prompt's tokens (its UTF-8 bytes:
  no byte-level tokenizer makes more tokens than bytes, plus room for the
  chat template), so the settled count can only be lower;
* `prompt_hash`: SHA-256 of the prompt (messages and tool definitions), the
  only trace of it that is kept.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.dht import Provider
from shared.embedding import build_embed_request
from shared.errors import InvalidParams
from shared.generation import GenerateRequest, Limits, build_request

__all__ = ["Checked", "Limits", "check_capabilities", "check_embedding", "check_request", "check_model"]

_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,63}")
_TEMPLATE_TOKENS_PER_MESSAGE = 8
_TEMPLATE_TOKENS = 16
_TOOL_INSTRUCTIONS = 512  #: what a worker may add to show a model its tools (backends/tool_prompt.py)


@dataclass(frozen=True, slots=True)
class Checked:
    """A request fit to send to a worker."""

    request: GenerateRequest | None  #: a generation's (None for an embedding)
    params: dict[str, Any]  #: the parameters of `inference.generate`
    reserve: int
    prompt_hash: str
    prompt_reserve: int = 0  #: the part of `reserve` for the prompt (the rest is for the output)


def check_model(model: str) -> str:
    if not _MODEL.fullmatch(model):
        raise InvalidParams("gateway.infer: model must be 1-64 of A-Z a-z 0-9 . _ : / + -", {"param": "model"})
    return model


def check_request(limits: Limits, *, model: str, generation: Mapping[str, Any], stream: bool) -> Checked:
    """The worker's parameters, the token reservation and the prompt's hash.

    A request that leaves `max_tokens` to the model reserves `limits.max_tokens`,
    the most any worker of this deployment generates for one request (workers
    read the same INFERSWARM_MAX_TOKENS); the settled count can only be lower.
    When the caller's token budget has less left, the request gets what it
    leaves instead (request.py, `_admit`)."""
    check_model(model)
    try:
        request = build_request(limits, generation)
    except InvalidParams as exc:
        raise InvalidParams(f"gateway.infer: {exc.message}", exc.data) from None
    params: dict[str, Any] = {"model": model, **request.to_params(), "stream": stream}
    text = request.prompt_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    prompt = _prompt_bound(request) + _TEMPLATE_TOKENS
    return Checked(request, params, (request.max_tokens or limits.max_tokens) + prompt, digest, prompt)


def _prompt_bound(request: GenerateRequest) -> int:
    """At least the prompt's tokens: its UTF-8 bytes, with room for the template of each message."""
    if request.messages is None:
        return len((request.prompt or "").encode())
    bound = sum(len(m.text.encode()) + sum(len(c.arguments.encode()) + len(c.name) for c in m.tool_calls)
                + _TEMPLATE_TOKENS_PER_MESSAGE for m in request.messages)
    if request.tools:
        bound += len(json.dumps([tool.to_dict() for tool in request.tools]).encode()) + _TOOL_INSTRUCTIONS
    return bound


def check_embedding(limits: Limits, *, model: str, input: Any, dimensions: Any) -> Checked:
    """An embedding request's worker parameters, reservation (its texts' UTF-8 bytes:
    no more tokens than that) and the hash of its texts."""
    check_model(model)
    try:
        request = build_embed_request(limits, input=input, dimensions=dimensions)
    except InvalidParams as exc:
        raise InvalidParams(exc.message.replace("inference.embed:", "gateway.embed:"), exc.data) from None
    params: dict[str, Any] = {"model": model, "input": list(request.texts)}
    if request.dimensions is not None:
        params["dimensions"] = request.dimensions
    text = json.dumps(list(request.texts), ensure_ascii=False)
    reserve = sum(len(t.encode()) + 2 for t in request.texts)  # and the [CLS] [SEP] of each
    return Checked(None, params, reserve, hashlib.sha256(text.encode()).hexdigest(), reserve)


def check_capabilities(request: GenerateRequest | None, workers: list[Provider]) -> None:
    """Refuse what no worker of the model can do (tools, structured output, logprobs), naming
    the parameter.

    Workers announce what each model can do (`capabilities` in the model's
    load: "chat,tools,json,logprobs"); a worker that announces nothing is taken at its
    word later."""
    needs = [("embeddings", "model")] if request is None else [("chat", "model")]
    if request is not None and request.calls_tools:
        needs.append(("tools", "tools"))
    if request is not None and request.wants_json:
        needs.append(("json", "response_format"))
    if request is not None and request.logprobs:
        needs.append(("logprobs", "logprobs"))
    for capability, param in needs:
        known = [w.load.get("capabilities") for w in workers if isinstance(w.load.get("capabilities"), str)]
        if known and not any(capability in str(caps).split(",") for caps in known):
            raise InvalidParams(f"{param}: this model does not support {capability}",
                                {"param": param, "reason": "unsupported"})
