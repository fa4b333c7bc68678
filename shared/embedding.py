"""The embedding contract: what `inference.embed` accepts.

`build_embed_request` checks the parameters of an embedding request into an
`EmbedRequest`, as `shared.generation.build_request` does for a generation:
here so that a gateway can run the same checks before it spends any quota.

Every refusal is INVALID_PARAMS naming the parameter (`data.param`):

* `input`: a non-empty list of at most `MAX_INPUTS` (2048, OpenAI's limit)
  non-empty strings; each at most `Limits.max_prompt_chars` characters (what
  one prompt may be), all of them together at most `INPUT_CHARS_FACTOR` (8)
  times that. An embedding reads its text once and generates nothing, so a
  batch may carry more text than one prompt; with the default 32768 that is
  256 Ki characters, well inside the RPC's 1 MiB message cap.
* `dimensions`: absent, or an integer from 1 to `MAX_DIMENSIONS`; whether the
  model can make vectors of that length is its backend's answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidParams
from shared.generation import Limits

__all__ = ["EmbedRequest", "MAX_INPUTS", "INPUT_CHARS_FACTOR", "MAX_DIMENSIONS", "build_embed_request"]

#: Most texts in one request (OpenAI's `/embeddings` takes 2048).
MAX_INPUTS = 2048
#: All texts together: at most this many times `Limits.max_prompt_chars`.
INPUT_CHARS_FACTOR = 8
#: Longest vector a caller may ask for (the largest models make 4096).
MAX_DIMENSIONS = 16384


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """A validated embedding request."""

    texts: tuple[str, ...]
    dimensions: int | None = None


def _refuse(param: str, text: str) -> InvalidParams:
    return InvalidParams(f"inference.embed: {param} {text}", {"param": param})


def build_embed_request(limits: Limits, *, input: Any, dimensions: Any = None) -> EmbedRequest:
    """The validated request; `InvalidParams` for anything out of shape or bounds."""
    if not isinstance(input, list) or not input:
        raise _refuse("input", "must be a non-empty list of strings")
    if len(input) > MAX_INPUTS:
        raise _refuse("input", f"too many texts: {len(input)}, at most {MAX_INPUTS}")
    total = 0
    for index, text in enumerate(input):
        if not isinstance(text, str) or not text:
            raise _refuse("input", f"[{index}] must be a non-empty string")
        if len(text) > limits.max_prompt_chars:
            raise _refuse("input", f"[{index}] too long: {len(text)} characters, at most {limits.max_prompt_chars}")
        total += len(text)
    budget = INPUT_CHARS_FACTOR * limits.max_prompt_chars
    if total > budget:
        raise _refuse("input", f"too long: {total} characters in all, at most {budget}")
    if dimensions is not None and (type(dimensions) is not int or not 1 <= dimensions <= MAX_DIMENSIONS):
        raise _refuse("dimensions", f"must be an integer from 1 to {MAX_DIMENSIONS}")
    return EmbedRequest(tuple(input), dimensions)
