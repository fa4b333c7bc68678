"""From an HTTP body to the parameters of `gateway.infer`: nothing silently ignored.

The generation parameters are the contract's (shared/generation/) and pass
through unchanged: the gateway checks them with the workers' own rules and
its refusals name the parameter, which becomes a 400 with OpenAI's `param`.
This module only decides which names of a body reach the contract:

* the contract's own names (`messages`, `tools`, `response_format`, ...) and
  `max_completion_tokens` (OpenAI's newer name of `max_tokens`);
* the transport's: `model`, `stream`, `stream_options` (handled by the caller);
* `fallback` (ours, `extra_body={"fallback": False}` in OpenAI's SDKs), or the
  header `x-inferswarm-fallback: false`: false keeps the request on the model
  (or the alias's first model) it names, without falling back to others
  (`fallback_of`; services/gateway/fallback.py);
* `user`: accepted, informational only (as OpenAI documents it: an end-user id
  for abuse monitoring); it changes nothing in the answer;
* `logprobs` and `top_logprobs` are the contract's; on legacy completions
  (`chat=False`) `logprobs` is OpenAI's count, 0..5, which becomes `logprobs:
  true` with that `top_logprobs`. A model without the "logprobs" capability
  refuses them (the gateway's 400 naming `logprobs`), whatever
  INFERSWARM_DROP_PARAMS says: some models do support them;
* OpenAI parameters we do not support (`n` > 1 here -- openai_api.py takes
  `n` itself --, `logit_bias`, ...): refused with a 400 naming the parameter
  -- unless the operator set `INFERSWARM_DROP_PARAMS=true` (LiteLLM's
  `drop_params`), in which case they are dropped and the reply says so in
  `x-inferswarm-dropped-params`. A value equal to OpenAI's default (`n: 1`,
  `store: false`, ...) asks for nothing and is accepted;
* anything else is not an OpenAI parameter: refused by name, as OpenAI does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from shared.config import parse_bool
from shared.errors import InvalidParams
from shared.generation import PARAMETERS

__all__ = ["DROP_PARAMS", "DROPPED_HEADER", "FALLBACK_HEADER", "MAX_N", "fallback_of", "generation_params"]

DROP_PARAMS = web.AppKey("drop_params", bool)
MAX_N = web.AppKey("max_n", int)  #: the most choices (`n`) one request may ask for (INFERSWARM_MAX_N)
DROPPED_HEADER = "x-inferswarm-dropped-params"
FALLBACK_HEADER = "x-inferswarm-fallback"


def fallback_of(request: web.Request, body: Mapping[str, Any]) -> bool:
    """Whether the request may fall back to other models: its body's `fallback`, else
    the `x-inferswarm-fallback` header, else true."""
    if "fallback" in body and body["fallback"] is not None:
        if not isinstance(body["fallback"], bool):
            raise InvalidParams("fallback must be a boolean", {"param": "fallback"})
        return bool(body["fallback"])
    header = request.headers.get(FALLBACK_HEADER)
    if header is None:
        return True
    try:
        return parse_bool(header)
    except ValueError:
        raise InvalidParams(f"{FALLBACK_HEADER} must be true or false", {"param": "fallback"}) from None

_TRANSPORT = frozenset({"model", "stream", "stream_options", "user", "fallback"})
_LEGACY_MAX_LOGPROBS = 5  #: OpenAI's bound of the legacy completions' `logprobs`

#: OpenAI's parameters this platform does not do, and the values that ask for nothing.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logit_bias": ({},), "echo": (False,),
    "best_of": (1,), "suffix": ("",), "functions": (), "function_call": ("none",), "audio": (),
    "modalities": (["text"],), "prediction": (), "reasoning_effort": (), "service_tier": ("auto", "default"),
    "store": (False,), "metadata": ({},), "web_search_options": (), "verbosity": (), "prompt_cache_key": (),
    "safety_identifier": (),
}


def generation_params(body: Mapping[str, Any], *, drop_unsupported: bool, chat: bool | None = True
                      ) -> tuple[dict[str, Any], list[str]]:
    """The contract's parameters of an OpenAI request body, and the names dropped.

    `chat`: True for chat completions (messages), False for completions (a
    prompt), None for our REST `/api/inference` (either)."""
    params: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in body.items():
        if chat is False and name == "logprobs":
            params.update(_legacy_logprobs(value))
        elif name in PARAMETERS:
            if value is not None:
                params[name] = value
        elif name == "max_completion_tokens":
            if value is not None:
                params["max_tokens"] = value
        elif name in _TRANSPORT:
            continue
        elif name in _UNSUPPORTED:
            if value is None or value in _UNSUPPORTED[name]:
                continue
            if not drop_unsupported:
                raise InvalidParams(f"{name} is not supported by this server", {"param": name, "reason": "unsupported"})
            dropped.append(name)
        else:
            raise InvalidParams(f"Unrecognized request argument supplied: {name}", {"param": name})
    if chat is False and "messages" in params:
        raise InvalidParams("Unrecognized request argument supplied: messages", {"param": "messages"})
    if chat and "prompt" in params:
        raise InvalidParams("Unrecognized request argument supplied: prompt", {"param": "prompt"})
    return params, dropped


def _legacy_logprobs(value: Any) -> dict[str, Any]:
    """The legacy completions' `logprobs: <count>` (0..5: the sampled token's logprob and
    the `count` most likely) as the contract's `logprobs` and `top_logprobs`."""
    if value is None or value is False:
        return {}
    if type(value) is not int or not 0 <= value <= _LEGACY_MAX_LOGPROBS:
        raise InvalidParams(f"logprobs must be an integer between 0 and {_LEGACY_MAX_LOGPROBS}", {"param": "logprobs"})
    return {"logprobs": True, "top_logprobs": value}
