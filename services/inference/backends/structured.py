"""Tools and structured output for a model that only completes text: the local one.

A chat template like SmolLM2's knows nothing of tools, so this module does
what a model server's tool parser does, in three parts:

* **prompt**: the tools are shown to the model in the system message (their
  JSON definitions, and how to call them: `<tool_call>[{"name": ..., "arguments":
  {...}}]</tool_call>`, the format SmolLM2 was trained on); a call in the
  history and its results fold into the user turn they answer
  (`get_weather({"city": "Paris"}) returned: ...`), from which a small model
  answers (`_history`); `developer` messages become system messages.
* **grammar**: llama.cpp's grammar-constrained decoding makes the output valid
  by construction, even from a 135M model: for `tool_choice` "required" or a
  named function, the call block whose items match the tools' parameter
  schemas; for "auto", either that block or an answer that does not start
  with `<`; for `response_format`, the JSON Schema (or any JSON object) --
  also as the answer of "auto". The JSON Schema is converted to GBNF by
  llama-cpp-python's `SchemaConverter`, which writes repetitions out one by
  one (the contract bounds them: `shared/generation/`, `MAX_REPEAT`); a
  schema it cannot convert, or whose grammar would pass `MAX_GRAMMAR_CHARS`,
  is INVALID_PARAMS naming the parameter.
* **parse**: an answer that starts with `<tool_call>` is parsed into
  `ToolCall`s with fresh ids (`call_` + 24 hex digits).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

from shared.errors import InvalidParams
from shared.generation import GenerateRequest, Tool, ToolCall

__all__ = ["CALL_OPEN", "grammar_of", "parse_calls", "prompt_messages"]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

_INSTRUCTIONS = (
    "You have access to the following tools:\n<tools>{tools}</tools>\n\n"
    "{rule} tools by answering with only <tool_call>[{{\"name\": \"function name\", "
    "\"arguments\": {{\"argument\": \"value\"}}}}]</tool_call>{parallel}."
)
_RULES = {"auto": "When a tool helps to answer, call", "required": "You must call", "function": "You must call"}
_ANSWER_TEXT = r"[^<\x00] [^\x00]*"


def prompt_messages(request: GenerateRequest) -> list[dict[str, Any]]:
    """The chat messages to render with the model's template: tools in the system message."""
    out = _history(request)
    if request.calls_tools:
        tools = request.tools
        choice = request.choice
        if choice.mode == "function":
            tools = tuple(t for t in tools if t.name == choice.name)
        parallel = ", one or more calls in the list" if request.parallel_tool_calls else ", one call"
        text = _INSTRUCTIONS.format(tools=json.dumps([_shown(t) for t in tools]), rule=_RULES[choice.mode],
                                    parallel=parallel)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _shown(tool: Tool) -> dict[str, Any]:
    return {"name": tool.name, "description": tool.description, "parameters": dict(tool.parameters)}


def _history(request: GenerateRequest) -> list[dict[str, Any]]:
    """The conversation as plain turns. A small model answers from a tool's result when the
    result is in the user's turn ("get_weather({...}) returned: ..."), and tends to copy
    the format of a call turn or a `<tool_response>` turn instead; so a call and its
    results fold into the user turn they answer (the call's own text, if any, stays)."""
    out: list[dict[str, Any]] = []
    for message in request.messages or ():
        if message.role == "developer":
            out.append({"role": "system", "content": message.text})
        elif message.role == "tool":
            name = request.call_name(message.tool_call_id) or "a tool"
            line = f"{name}({_shown_arguments(request, message.tool_call_id)}) returned: {message.text}"
            if out and out[-1]["role"] == "user":
                out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n\n{line}"}
            else:
                out.append({"role": "user", "content": line})
        elif message.tool_calls:
            if message.text:
                out.append({"role": "assistant", "content": message.text})
        else:
            out.append({"role": message.role, "content": message.text})
    return out


def _shown_arguments(request: GenerateRequest, call_id: str | None) -> str:
    for message in request.messages or ():
        for call in message.tool_calls:
            if call.id == call_id:
                return json.dumps(_arguments(call.arguments), ensure_ascii=False)
    return ""


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# -- grammar ---------------------------------------------------------------------------


def grammar_of(request: GenerateRequest) -> str | None:
    """The GBNF grammar the output must match, or None for free text."""
    calls_schema = _calls_schema(request) if request.calls_tools else None
    answer_schema = _answer_schema(request)
    if calls_schema is None and answer_schema is None:
        return None
    converter = _converter()
    rules = []
    if calls_schema is not None:
        _visit(converter, calls_schema, "tc-calls", "tools")
        rules.append(f'"{CALL_OPEN}" tc-calls "{CALL_CLOSE}"')
    if calls_schema is None or request.choice.mode == "auto":
        if answer_schema is not None:
            _visit(converter, answer_schema, "tc-answer", "response_format")
            rules.append("tc-answer")
        else:
            rules.append(_ANSWER_TEXT)
    grammar: str = converter.format_grammar()
    if len(grammar) > MAX_GRAMMAR_CHARS:
        param = "tools" if calls_schema is not None else "response_format"
        raise InvalidParams(f"{param}: the schema's grammar is over {MAX_GRAMMAR_CHARS} characters",
                            {"param": param, "reason": "unsupported"})
    return f"root ::= {' | '.join(f'({rule})' for rule in rules)}\n{grammar}"


def _answer_schema(request: GenerateRequest) -> Mapping[str, Any] | None:
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    return fmt.schema or {}


def _calls_schema(request: GenerateRequest) -> dict[str, Any]:
    choice = request.choice
    tools = [t for t in request.tools if choice.mode != "function" or t.name == choice.name]
    items = [
        {"type": "object", "properties": {"name": {"const": t.name}, "arguments": _object(t.parameters)},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items},
                              "minItems": 1}
    if not request.parallel_tool_calls or choice.mode == "function":
        schema["maxItems"] = 1
    return schema


def _object(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A tool's parameters as a schema of an object (an empty schema means no arguments)."""
    schema = dict(parameters)
    if not schema or schema == {"type": "object"}:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return schema


def _converter() -> Any:
    from llama_cpp.llama_grammar import SchemaConverter

    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


#: The largest grammar built for one request, in characters.
MAX_GRAMMAR_CHARS = 512 * 1024


def _visit(converter: Any, schema: Mapping[str, Any], name: str, param: str) -> None:
    try:
        resolved = converter.resolve_refs(dict(schema), "request")
        converter.visit(resolved, name)
    except Exception as exc:  # noqa: BLE001 - the converter raises anything on a schema it cannot do
        raise InvalidParams(f"{param}: a JSON Schema this model cannot follow ({type(exc).__name__}: {exc})",
                            {"param": param, "reason": "unsupported"}) from None


# -- parse -----------------------------------------------------------------------------


def parse_calls(text: str) -> tuple[ToolCall, ...]:
    """The tool calls of an answer that starts with the call block (valid by its grammar)."""
    body = text.strip()
    body = body.removeprefix(CALL_OPEN).strip()
    body = body[: body.rfind(CALL_CLOSE)] if CALL_CLOSE in body else body
    items = json.loads(body)
    return tuple(
        ToolCall("call_" + secrets.token_hex(12), item["name"],
                 json.dumps(item.get("arguments", {}), ensure_ascii=False))
        for item in items
    )
