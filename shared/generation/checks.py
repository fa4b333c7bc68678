"""`build_request`: the parameters of a generation to a checked `GenerateRequest`.

Every refusal is INVALID_PARAMS naming the parameter (`data.param`); the
bounds are the package doc's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from shared.errors import InvalidParams
from shared.generation.request import (
    MAX_TOP_LOGPROBS, PARAMETERS, ROLES, GenerateRequest, Limits, Message, ResponseFormat, Tool, ToolCall,
    ToolChoice, compact_json,
)
from shared.tiers import TierTable

__all__ = ["MAX_REPEAT", "build_request", "priority_of"]

_MAX_STOPS = 4
_MAX_STOP_CHARS = 64
_MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ID = re.compile(r"[\x21-\x7e]{1,128}")
_TIERS = TierTable()


def _refuse(param: str, text: str, **data: Any) -> InvalidParams:
    return InvalidParams(f"{param} {text}", {"param": param, **data})


def build_request(limits: Limits, params: Mapping[str, Any], *, max_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None) -> GenerateRequest:
    """The validated request; `InvalidParams` naming the parameter for anything unknown, out of
    shape or bounds. The keywords fill what `params` leaves out (a worker's model defaults)."""
    if not params.keys() <= PARAMETERS:
        unknown = sorted(str(name) for name in params if name not in PARAMETERS)
        raise _refuse(unknown[0], "is not a supported parameter", reason="unsupported")
    get = params.get
    messages, prompt = get("messages"), get("prompt")
    if (messages is None) == (prompt is None):
        raise _refuse("messages", "or prompt: give exactly one of them")
    parsed = _messages(messages, limits) if messages is not None else None
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise _refuse("prompt", "must be a non-empty string")
    tools = _tools(get("tools")) if get("tools") is not None else ()
    choice = _tool_choice(get("tool_choice"), tools) if get("tool_choice") is not None else None
    asked_max = _max_tokens(get("max_tokens"), limits)
    asked_temperature = _number(params, "temperature", 0.0, 2.0)
    asked_top_p = _number(params, "top_p", 0.0, 1.0, open_low=True)
    request = GenerateRequest(
        messages=parsed, prompt=prompt,
        max_tokens=asked_max if asked_max is not None else max_tokens,
        temperature=asked_temperature if asked_temperature is not None else temperature,
        top_p=asked_top_p if asked_top_p is not None else top_p,
        frequency_penalty=_number(params, "frequency_penalty", -2.0, 2.0),
        presence_penalty=_number(params, "presence_penalty", -2.0, 2.0),
        stop=_stops(get("stop")) if get("stop") is not None else (),
        seed=_seed(get("seed")),
        tools=tools, tool_choice=choice,
        parallel_tool_calls=_flag(params, "parallel_tool_calls", True),
        response_format=_response_format(get("response_format")) if get("response_format") is not None else None,
        logprobs=_flag(params, "logprobs", False),
        top_logprobs=_top_logprobs(params) if get("top_logprobs") is not None else 0,
    )
    if prompt is not None and (tools or request.tool_choice is not None):
        raise _refuse("tools", "need messages (a chat request), not a prompt")
    size = _size(request)
    if size > limits.max_prompt_chars:
        what = "messages" if parsed is not None else "prompt"
        raise _refuse(what, f"too long: {size} characters, at most {limits.max_prompt_chars}")
    return request


def _size(request: GenerateRequest) -> int:
    """What bounds the work: the characters the model reads (contents, arguments of past
    calls, tool definitions) and the response_format schema, whose grammar is built."""
    size = len(request.prompt or "")
    if request.messages is not None:
        size = sum(len(m.text) + sum(len(c.arguments) for c in m.tool_calls) for m in request.messages)
    if request.tools:
        size += len(compact_json([tool.to_dict() for tool in request.tools]))
    if request.response_format is not None and request.response_format.schema is not None:
        size += len(compact_json(dict(request.response_format.schema)))  # its grammar grows with it
    return size


def _max_tokens(value: Any, limits: Limits) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= limits.max_tokens:
        raise _refuse("max_tokens", f"must be an integer between 1 and {limits.max_tokens}")
    return value


def _number(params: Mapping[str, Any], name: str, low: float, high: float, *, open_low: bool = False
            ) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    ok = type(value) in (int, float) and math.isfinite(value) and (low < value if open_low else low <= value)
    if not ok or value > high:
        interval = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        raise _refuse(name, f"must be a number in {interval}")
    return float(value)


def _flag(params: Mapping[str, Any], name: str, default: bool) -> bool:
    value = params.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _refuse(name, "must be a boolean")
    return value


def _top_logprobs(params: Mapping[str, Any]) -> int:
    """`top_logprobs`: 0..20, and above 0 only with `logprobs: true` (as OpenAI has it)."""
    value = params.get("top_logprobs")
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise _refuse("top_logprobs", f"must be an integer between 0 and {MAX_TOP_LOGPROBS}")
    if value and params.get("logprobs") is not True:
        raise _refuse("top_logprobs", "needs logprobs: true")
    return value


def _seed(seed: Any) -> int | None:
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2**32):
        raise _refuse("seed", "must be an integer in [0, 2^32)")
    return seed


def _content(content: Any, where: str, *, nullable: bool) -> str | None:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if content is None and nullable:
        return None
    if isinstance(content, list) and content:
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _refuse("messages", f"{where}.content: only text parts are supported, not {kind!r}",
                              reason="unsupported")
            parts.append(part["text"])
        return "".join(parts)
    raise _refuse("messages", f"{where}.content must be a string or a list of text parts")


def _messages(messages: Any, limits: Limits) -> tuple[Message, ...]:
    if not isinstance(messages, list) or not messages:
        raise _refuse("messages", "must be a non-empty list")
    if len(messages) > limits.max_messages:
        raise _refuse("messages", f"too many: {len(messages)}, at most {limits.max_messages}")
    return tuple(_message(item, index) for index, item in enumerate(messages))


_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}
#: Fields of an assistant message as servers return it, which apps send back
#: as they got it (`messages.append(reply.message)`): accepted when empty.
_EMPTY_ECHOES = {"function_call", "audio", "annotations", "reasoning_content"}


def _message(item: Any, index: int) -> Message:
    where = f"[{index}]"
    if not isinstance(item, dict):
        raise _refuse("messages", f"{where} must be an object with a role")
    if not item.keys() <= _MESSAGE_KEYS:
        extra = sorted(str(k) for k, v in item.items()
                       if k not in _MESSAGE_KEYS and not (k in _EMPTY_ECHOES and v in (None, [], "")))
        if extra:
            raise _refuse("messages", f"{where}.{extra[0]} is not supported", reason="unsupported")
    role = item.get("role")
    if role == "user" and len(item) == 2 and isinstance(item.get("content"), str):  # the common case
        return Message("user", item["content"])
    if role not in ROLES:
        raise _refuse("messages", f"{where}.role must be one of {', '.join(ROLES)}")
    calls = _history_calls(item.get("tool_calls"), where) if role == "assistant" else ()
    if role != "assistant" and item.get("tool_calls") is not None:
        raise _refuse("messages", f"{where}.tool_calls belong to assistant messages")
    content = _content(item.get("content"), where, nullable=role == "assistant" and bool(calls))
    name = item.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
        raise _refuse("messages", f"{where}.name must be 1-64 of A-Z a-z 0-9 _ -")
    call_id = item.get("tool_call_id")
    if role == "tool":
        if not isinstance(call_id, str) or not _ID.fullmatch(call_id):
            raise _refuse("messages", f"{where}.tool_call_id is required for a tool message (1-128 printable)")
    elif call_id is not None:
        raise _refuse("messages", f"{where}.tool_call_id belongs to tool messages")
    return Message(role, content, name, calls, call_id)


def _history_calls(calls: Any, where: str) -> tuple[ToolCall, ...]:
    if calls is None:
        return ()
    if not isinstance(calls, list):
        raise _refuse("messages", f"{where}.tool_calls must be a list")
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        ok = (isinstance(function, dict) and isinstance(call.get("id"), str) and _ID.fullmatch(call["id"])
              and call.get("type", "function") == "function" and isinstance(function.get("name"), str)
              and isinstance(function.get("arguments"), str))
        if not ok or not isinstance(function, dict):
            raise _refuse("messages", f"{where}.tool_calls[{index}] must be "
                          "{id, type: function, function: {name, arguments}}")
        out.append(ToolCall(call["id"], function["name"], function["arguments"]))
    return tuple(out)


def _tools(tools: Any) -> tuple[Tool, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list) or len(tools) > _MAX_TOOLS:
        raise _refuse("tools", f"must be a list of at most {_MAX_TOOLS} tools")
    out, names = [], set()
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise _refuse("tools", f"[{index}] must be {{type: function, function: {{name, ...}}}}")
        name, parameters = function.get("name"), function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _refuse("tools", f"[{index}].function.name must be 1-64 of A-Z a-z 0-9 _ -")
        if name in names:
            raise _refuse("tools", f"[{index}]: two tools are named {name!r}")
        names.add(name)
        if not isinstance(parameters, dict):
            raise _refuse("tools", f"[{index}].function.parameters must be a JSON Schema object")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise _refuse("tools", f"[{index}].function.description must be a string")
        strict = function.get("strict") is True
        _bounded(parameters, "tools")
        out.append(Tool(name, description, parameters, strict))
    return tuple(out)


def _tool_choice(choice: Any, tools: tuple[Tool, ...]) -> ToolChoice | None:
    if choice is None:
        return None
    if choice in ("auto", "none", "required"):
        mode: Any = choice
        if mode != "none" and not tools:
            raise _refuse("tool_choice", f"{choice!r} needs tools")
        return ToolChoice(mode)
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise _refuse("tool_choice", "must be auto, none, required or {type: function, function: {name}}")
    if name not in {tool.name for tool in tools}:
        raise _refuse("tool_choice", f"names {name!r}, which is not one of the tools")
    return ToolChoice("function", name)


def _response_format(value: Any) -> ResponseFormat | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object"):
        return ResponseFormat(kind)
    if kind != "json_schema":
        raise _refuse("response_format", "type must be text, json_object or json_schema")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise _refuse("response_format", "json_schema must be {name, schema: {...}, strict?}")
    name = spec.get("name", "response")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _refuse("response_format", "json_schema.name must be 1-64 of A-Z a-z 0-9 _ -")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise _refuse("response_format", "json_schema.description must be a string")
    _bounded(spec["schema"], "response_format")
    return ResponseFormat("json_schema", name, spec["schema"], spec.get("strict") is True, description)


#: The largest repetition a schema may ask (minItems, maxLength, a pattern's
#: {n}): grammar-constrained decoding writes each repetition out, so a schema
#: of a few bytes asking for 10^9 items would take gigabytes to build --
#: in our workers or in the Ollama or model server behind them.
MAX_REPEAT = 1000
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
_QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def _bounded(schema: Any, param: str) -> None:
    """Refuse repetitions over `MAX_REPEAT` anywhere in `schema`, before any grammar is built."""
    if isinstance(schema, list):
        for item in schema:
            _bounded(item, param)
        return
    if not isinstance(schema, Mapping):
        return
    for key, value in schema.items():
        if key in _COUNTS and isinstance(value, int) and value > MAX_REPEAT:
            raise InvalidParams(f"{param}: {key} {value} is over {MAX_REPEAT}, the most a grammar repeats",
                                {"param": param, "reason": "unsupported"})
        if key == "pattern" and isinstance(value, str):
            for low, high in _QUANTIFIER.findall(value):
                if int(low) > MAX_REPEAT or (high and int(high) > MAX_REPEAT):
                    raise InvalidParams(f"{param}: pattern repeats over {MAX_REPEAT} times",
                                        {"param": param, "reason": "unsupported"})
        _bounded(value, param)


def _stops(stop: Any) -> tuple[str, ...]:
    items = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or len(items) > _MAX_STOPS:
        raise _refuse("stop", f"must be a string or a list of at most {_MAX_STOPS} strings")
    for item in items:
        if not isinstance(item, str) or not 1 <= len(item) <= _MAX_STOP_CHARS:
            raise _refuse("stop", f"items must be strings of 1-{_MAX_STOP_CHARS} characters")
    return tuple(items)


def priority_of(priority: int | str) -> int:
    """A queue priority from a tier name (free 0 < pro 1 < enterprise 2 <
    unlimited 3, as in shared/tiers.py) or an integer given by a gateway."""
    if isinstance(priority, int):
        if not -1000 <= priority <= 1000:
            raise _refuse("priority", "must be between -1000 and 1000")
        return priority
    if priority not in _TIERS:
        raise _refuse("priority", f"must be an integer or a tier name ({', '.join(_TIERS.names())})")
    return _TIERS[priority].priority
