"""The values of the generation contract: a checked request and its parts.

Built by `checks.build_request` only; frozen, so what a gateway checked is
what it sends on (`GenerateRequest.to_params`) and what a worker runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "MAX_TOP_LOGPROBS", "PARAMETERS", "ROLES", "GenerateRequest", "Limits", "Message", "ResponseFormat", "Role",
    "Tool", "ToolCall", "ToolChoice", "compact_json",
]

Role = Literal["system", "developer", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "developer", "user", "assistant", "tool")
compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

#: The parameters `build_request` knows; any other name is refused.
PARAMETERS = frozenset({
    "messages", "prompt", "max_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty",
    "stop", "seed", "tools", "tool_choice", "parallel_tool_calls", "response_format", "logprobs", "top_logprobs",
})
#: The most alternatives `top_logprobs` may ask for (OpenAI's bound).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model made: `arguments` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message. `content` is None only for an assistant message that calls tools."""

    role: Role
    content: str | None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        return self.content or ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; `parameters` is its arguments' JSON Schema."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False

    def to_dict(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": dict(self.parameters)}
        if self.description:
            function["description"] = self.description
        if self.strict:
            function["strict"] = True
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """`auto`, `none`, `required`, or `function` with the one tool's `name`."""

    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None

    def to_wire(self) -> str | dict[str, Any]:
        if self.mode == "function":
            return {"type": "function", "function": {"name": self.name}}
        return self.mode


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """`text`, `json_object` (any JSON object) or `json_schema` (a JSON value valid against `schema`)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: Mapping[str, Any] | None = None
    strict: bool = False
    description: str = ""

    def to_wire(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        spec: dict[str, Any] = {"name": self.name, "schema": dict(self.schema or {}), "strict": self.strict}
        if self.description:
            spec["description"] = self.description
        return {"type": "json_schema", "json_schema": spec}


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A validated generation request; exactly one of `messages` and `prompt` is set.

    `max_tokens`, `temperature` and `top_p` are None when the caller left them
    to the model; a worker fills them (`resolved`) before it generates."""

    messages: tuple[Message, ...] | None
    prompt: str | None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def deterministic(self) -> bool:
        """Greedy decoding or a fixed seed: the same request gives the same answer."""
        return self.temperature == 0 or self.seed is not None

    @property
    def choice(self) -> ToolChoice:
        """The tool choice in force: OpenAI's default is `auto` with tools, `none` without."""
        if self.tool_choice is not None:
            return self.tool_choice
        return ToolChoice("auto" if self.tools else "none")

    @property
    def calls_tools(self) -> bool:
        """Whether the model may answer with tool calls."""
        return bool(self.tools) and self.choice.mode != "none"

    @property
    def wants_json(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"

    def call_name(self, call_id: str | None) -> str | None:
        """The function name of the call `call_id` in the history (what a tool message answers)."""
        for message in self.messages or ():
            for call in message.tool_calls:
                if call.id == call_id:
                    return call.name
        return None

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.messages or ()]

    def resolved(self, *, max_tokens: int, temperature: float, top_p: float) -> GenerateRequest:
        """This request with what the caller left to the model filled in."""
        return replace(
            self, max_tokens=self.max_tokens if self.max_tokens is not None else max_tokens,
            temperature=self.temperature if self.temperature is not None else temperature,
            top_p=self.top_p if self.top_p is not None else top_p,
        )

    def to_params(self) -> dict[str, Any]:
        """The wire parameters of this request (those set), as `build_request` takes them."""
        out: dict[str, Any] = {}
        if self.messages is not None:
            out["messages"] = self.message_dicts()
        else:
            out["prompt"] = self.prompt
        for name in ("max_tokens", "temperature", "top_p", "seed", "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.stop:
            out["stop"] = list(self.stop)
        if self.tools:
            out["tools"] = [tool.to_dict() for tool in self.tools]
        if self.tool_choice is not None:
            out["tool_choice"] = self.tool_choice.to_wire()
        if not self.parallel_tool_calls:
            out["parallel_tool_calls"] = False
        if self.response_format is not None:
            out["response_format"] = self.response_format.to_wire()
        if self.logprobs:
            out["logprobs"] = True
            if self.top_logprobs:
                out["top_logprobs"] = self.top_logprobs
        return out

    def prompt_text(self) -> str:
        """Everything the model reads, as one text: what the prompt hash and size bounds are taken over."""
        if self.messages is None:
            return self.prompt or ""
        parts: list[Any] = self.message_dicts()
        if self.tools:
            parts.append([tool.to_dict() for tool in self.tools])
        return compact_json(parts)


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds a request must fit."""

    max_tokens: int = 4096
    max_prompt_chars: int = 32768
    max_messages: int = 256
