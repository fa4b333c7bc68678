"""From a Responses API body (`POST /v1/responses`) to the generation contract.

The Responses API says in its own words what chat completions says with
messages; this module translates, so the answer comes from the same path
(`gateway.infer`, shared/generation/) as `/v1/chat/completions`:

    input (a string)           one user message
    input (a list of items)    messages `{role, content}` (`type: "message"`
                               optional; content a string or `input_text` /
                               `output_text` parts); `function_call` items (one
                               assistant message with `tool_calls`, consecutive
                               calls joined); `function_call_output` (a tool message)
    instructions               a leading system message
    max_output_tokens          max_tokens
    temperature, top_p,
    parallel_tool_calls        unchanged
    tools                      `{type: "function", name, ...}` -> chat's
                               `{type: "function", function: {name, ...}}`
    tool_choice                auto | none | required | `{type: "function", name}`
    text.format                response_format (text, json_object, json_schema)

Like params.py, nothing is silently ignored: a name that is no Responses
parameter is a 400 naming it; OpenAI's parameters we do not do (`reasoning`,
`include`, `background`, ...) are a 400 naming them, or dropped and listed in
`x-inferswarm-dropped-params` under INFERSWARM_DROP_PARAMS. Two are refused
even then, because dropping them would answer another conversation:
`previous_response_id` and `conversation` (nothing is stored here, so there
is nothing to continue: send the whole conversation in `input`). `store` is
accepted either way -- we store no response, whatever it says. Images, files,
hosted tools (web_search, file_search, ...) and other item types are 400s
naming `input`, `tools` or `tool_choice`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.errors import InvalidParams

__all__ = ["ResponsesRequest", "responses_request"]

#: OpenAI's Responses parameters we do not do, and the values that ask for nothing.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "background": (False,), "include": ([],), "max_tool_calls": (), "prompt": (), "prompt_cache_key": (),
    "prompt_cache_retention": (), "prompt_cache_options": (), "reasoning": (), "safety_identifier": (),
    "service_tier": ("auto", "default"), "top_logprobs": (0,), "truncation": ("disabled",),
    "context_management": (), "access_programs": (), "image": (), "moderation": (), "background_options": (),
}
#: Never dropped: without them the answer would be to another conversation.
_REFUSED = ("previous_response_id", "conversation")
_KNOWN = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools",
                    "tool_choice", "parallel_tool_calls", "text", "stream", "stream_options", "user",
                    "metadata", "store"})
_TEXT_PARTS = ("input_text", "output_text")
_MESSAGE_KEYS = {"type", "role", "content", "id", "status", "phase"}
_CALL_KEYS = {"type", "call_id", "name", "arguments", "id", "status"}
_OUTPUT_KEYS = {"type", "call_id", "output", "id", "status"}
_TOOL_KEYS = {"type", "name", "description", "parameters", "strict"}


def _refuse(param: str, text: str, **data: Any) -> InvalidParams:
    return InvalidParams(f"{param}: {text}", {"param": param, **data})


def _unsupported(param: str, text: str = "is not supported by this server") -> InvalidParams:
    return _refuse(param, text, reason="unsupported")


@dataclass
class ResponsesRequest:
    """A Responses body translated: the contract's parameters, and what the reply echoes."""

    model: str
    stream: bool
    params: dict[str, Any]  #: the generation contract's parameters (shared/generation/)
    echo: dict[str, Any] = field(default_factory=dict)  #: the request's settings, as `response` repeats them
    dropped: list[str] = field(default_factory=list)


def responses_request(body: Mapping[str, Any], *, drop_unsupported: bool) -> ResponsesRequest:
    """The translated request; InvalidParams naming the parameter for anything we cannot honour."""
    dropped = _check_names(body, drop_unsupported)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _refuse("model", "must be a non-empty string")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _refuse("stream", "must be a boolean")
    _check_extras(body)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _refuse("instructions", "must be a string")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + _input(body.get("input"))
    params: dict[str, Any] = {"messages": messages}
    for name, target in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls")):
        if body.get(name) is not None:
            params[target] = body[name]
    tools = _tools(body.get("tools"))
    if tools:
        params["tools"] = tools
    if body.get("tool_choice") is not None:
        params["tool_choice"] = _tool_choice(body["tool_choice"])
    text = _text(body.get("text"))
    response_format = _response_format(text["format"])
    if response_format["type"] != "text":
        params["response_format"] = response_format
    echo = {"instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
            "tools": list(body.get("tools") or []), "tool_choice": body.get("tool_choice") or "auto",
            "text": text, "metadata": body.get("metadata") or {}, "user": body.get("user")}
    return ResponsesRequest(model, stream, params, echo, dropped)


def _check_names(body: Mapping[str, Any], drop_unsupported: bool) -> list[str]:
    dropped = []
    for name, value in body.items():
        if name in _KNOWN or value is None:
            continue
        if name in _REFUSED:
            raise _unsupported(name, "is not supported: no response or conversation is stored here; "
                                     "send the whole conversation in `input`")
        if name not in _UNSUPPORTED:
            raise _refuse(name, f"Unrecognized request argument supplied: {name}")
        if value in _UNSUPPORTED[name]:
            continue
        if not drop_unsupported:
            raise _unsupported(name)
        dropped.append(name)
    return dropped


def _check_extras(body: Mapping[str, Any]) -> None:
    """The parameters that change nothing in the answer, checked for their shape."""
    if body.get("store") is not None and not isinstance(body["store"], bool):
        raise _refuse("store", "must be a boolean")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in metadata.items())):
        raise _refuse("metadata", "must be at most 16 string keys (64 characters) and values (512)")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _refuse("user", "must be a string")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_obfuscation"}):
        raise _refuse("stream_options", "only include_obfuscation is known (and no padding is sent)")


def _input(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _refuse("input", "must be a string or a non-empty list of input items")
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        where = f"input[{index}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            messages.append({"role": _role(item, where), "content": _text_of(item.get("content"), where)})
            _only(item, _MESSAGE_KEYS, where)
        elif kind == "function_call":
            _function_call(messages, item, where)
        elif kind == "function_call_output":
            _only(item, _OUTPUT_KEYS, where)
            call_id = _string(item, "call_id", where)
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _text_of(item.get("output"), where, field="output")})
        else:
            what = repr(kind) if isinstance(kind, str) else "this item"
            raise _unsupported("input", f"{where}: items of type {what} are not supported "
                                        "(message, function_call and function_call_output are)")
    return messages


def _function_call(messages: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    """A past call: it joins the assistant message just before it, or starts one."""
    _only(item, _CALL_KEYS, where)
    call = {"id": _string(item, "call_id", where), "type": "function",
            "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
        if last["content"] == "":
            last["content"] = None
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _role(item: dict[str, Any], where: str) -> str:
    role = item.get("role")
    if not isinstance(role, str) or role not in ("user", "system", "developer", "assistant"):
        raise _refuse("input", f"{where}.role must be user, system, developer or assistant")
    return role


def _text_of(content: Any, where: str, *, field: str = "content") -> str:
    """A string, or the text of a list of input_text / output_text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse("input", f"{where}.{field} must be a string or a list of text parts")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise _unsupported("input", f"{where}.{field}[{index}]: only input_text and output_text parts "
                                        f"are supported, not {kind!r}")
        texts.append(part["text"])
    return "".join(texts)


def _only(item: dict[str, Any], keys: set[str], where: str) -> None:
    extra = sorted(str(k) for k in item if k not in keys)
    if extra:
        raise _unsupported("input", f"{where}.{extra[0]} is not supported")


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value and key != "arguments":
        raise _refuse("input", f"{where}.{key} must be a non-empty string")
    return value


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _refuse("tools", "must be a list of tools")
    out = []
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function" or not isinstance(tool, dict):
            raise _unsupported("tools", f"[{index}]: tools of type {kind!r} are not supported (function tools are)")
        extra = sorted(str(k) for k in tool if k not in _TOOL_KEYS)
        if extra:
            raise _unsupported("tools", f"[{index}].{extra[0]} is not supported")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _unsupported("tool_choice", "must be auto, none, required or {type: function, name}")


def _text(text: Any) -> dict[str, Any]:
    """`text` with its defaults: `{"format": {"type": "text"}}`."""
    if text is None:
        return {"format": {"type": "text"}}
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise _refuse("text", "must be {format, verbosity?}")
    if text.get("verbosity") not in (None, "medium"):
        raise _unsupported("text", "verbosity is not supported by this server")
    form = text.get("format") or {"type": "text"}
    if not isinstance(form, dict):
        raise _refuse("text.format", "must be an object")
    return {"format": form}


def _response_format(form: dict[str, Any]) -> dict[str, Any]:
    kind = form.get("type")
    if kind in ("text", "json_object"):
        if set(form) != {"type"}:
            raise _refuse("text.format", f"format of type {kind} takes no other field")
        return {"type": kind}
    if kind != "json_schema":
        raise _refuse("text.format", "type must be text, json_object or json_schema")
    extra = sorted(set(form) - {"type", "name", "schema", "strict", "description"})
    if extra:
        raise _refuse("text.format", f"{extra[0]} is not supported")
    spec = {k: form[k] for k in ("name", "schema", "strict", "description") if form.get(k) is not None}
    return {"type": "json_schema", "json_schema": spec}
