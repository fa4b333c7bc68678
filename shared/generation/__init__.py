"""The generation contract: what `inference.generate` and `gateway.infer` accept.

One function, `build_request`, checks the parameters of a generation request
into a `GenerateRequest`. Workers run it on what they are asked, gateways run
it before they spend any quota, and the web service runs it on what it made of
an OpenAI body -- so a request a gateway admits is one a worker accepts, and
the three cannot disagree about a bound. The parameters have OpenAI's names
and shapes (chat completions), so the web service passes them through:

    messages | prompt      exactly one; messages are OpenAI's: roles system,
                           developer, user, assistant (`content` may be null
                           when it has `tool_calls`), tool (`tool_call_id`);
                           content a string or a list of text parts
    max_tokens             1..limit, or absent: the model decides (what its
                           context leaves, bounded by its documented maximum)
    temperature, top_p     [0, 2] and (0, 1], or absent: the model's defaults
    frequency_penalty,
    presence_penalty       [-2, 2], or absent
    stop                   a string or up to 4 strings of 1-64 characters
    (schemas)              no repetition (minItems, maxLength, a pattern's {n}, ...)
                           over MAX_REPEAT (1000): grammars write them out
    seed                   [0, 2^32)
    tools                  up to 128 `{"type": "function", "function": {name,
                           description?, parameters?, strict?}}`
    tool_choice            "auto" | "none" | "required" |
                           {"type": "function", "function": {"name"}} (a tool given)
    parallel_tool_calls    bool (default true)
    response_format        {"type": "text" | "json_object"} |
                           {"type": "json_schema", "json_schema": {name, schema, strict?, description?}}
    logprobs               bool (default false): text chunks carry the log probabilities
                           of their tokens (a model with the "logprobs" capability)
    top_logprobs           0..20, only with logprobs true: the most likely alternatives
                           given with each token

Anything else is refused, and every refusal is INVALID_PARAMS naming the
parameter (`data.param`): nothing is silently dropped here. (The web service
has an operator switch to drop OpenAI parameters we do not support before
they reach this contract; it says which it dropped.)

The chunks of a generation stream are part of the contract too (`is_final`,
`text_of`, `tool_calls_of`; services/inference/README.md, "Chunks").

The package: `request.py` (the values: `GenerateRequest` and its parts),
`checks.py` (`build_request`: parameters to a request, every bound),
`chunks.py` (telling the chunks of a stream apart).
"""

from shared.generation.checks import MAX_REPEAT, build_request, priority_of
from shared.generation.chunks import is_final, logprobs_of, output_of, text_of, tool_calls_of
from shared.generation.request import (
    MAX_TOP_LOGPROBS, PARAMETERS, GenerateRequest, Limits, Message, ResponseFormat, Tool, ToolCall, ToolChoice,
)

__all__ = [
    "MAX_REPEAT", "MAX_TOP_LOGPROBS", "PARAMETERS", "GenerateRequest", "Limits", "Message", "ResponseFormat",
    "Tool", "ToolCall", "ToolChoice", "build_request", "is_final", "logprobs_of", "output_of", "priority_of",
    "text_of", "tool_calls_of",
]
