"""What `gateway.infer` checks before it spends anything, and what it derives.

The generation parameters are checked with the workers' own rules (the
generation contract, `shared/generation.py`), so a request the gateway admits
is one a worker accepts, and bad input is refused before it costs quota. The
gateway also derives:

* `reserve`: the tokens to hold against `tokens_per_month` before the work --
  `max_tokens` plus an upper bound of the prompt's tokens (its UTF-8 bytes:
  no byte-level tokenizer makes more tokens than bytes, plus room for the
  chat template), so the settled count can only be lower;
* `prompt_hash`: SHA-256 of the prompt, the only trace of it that is kept.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidParams
from shared.generation import Limits, build_request

__all__ = ["Checked", "Limits", "check_request", "check_model"]

_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,63}")
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_TEMPLATE_TOKENS_PER_MESSAGE = 8
_TEMPLATE_TOKENS = 16


@dataclass(frozen=True, slots=True)
class Checked:
    """A request fit to send to a worker."""

    params: dict[str, Any]  #: the parameters of `inference.generate`
    reserve: int
    prompt_hash: str


def check_model(model: str) -> str:
    if not _MODEL.fullmatch(model):
        raise InvalidParams("gateway.infer: model must be 1-64 of A-Z a-z 0-9 . _ : / + -", {"param": "model"})
    return model


def check_request(
    limits: Limits, *, model: str, messages: list[Any] | None, prompt: str | None, max_tokens: int,
    temperature: float, top_p: float, stop: str | list[Any] | None, seed: int | None, stream: bool,
) -> Checked:
    """The worker's parameters, the token reservation and the prompt's hash."""
    check_model(model)
    try:
        request = build_request(limits, messages=messages, prompt=prompt, max_tokens=max_tokens,
                                temperature=temperature, top_p=top_p, stop=stop, seed=seed)
    except InvalidParams as exc:
        raise InvalidParams(exc.message.replace("inference.generate:", "gateway.infer:"), exc.data) from None
    params: dict[str, Any] = {"model": model, "max_tokens": request.max_tokens,
                              "temperature": request.temperature, "top_p": request.top_p, "stream": stream}
    if request.messages is not None:
        params["messages"] = request.message_dicts()
        text = _encode(params["messages"])
        bound = sum(len(m.content.encode()) + _TEMPLATE_TOKENS_PER_MESSAGE for m in request.messages)
    else:
        params["prompt"] = text = request.prompt or ""
        bound = len(text.encode())
    if request.stop:
        params["stop"] = list(request.stop)
    if request.seed is not None:
        params["seed"] = request.seed
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Checked(params, request.max_tokens + bound + _TEMPLATE_TOKENS, digest)
