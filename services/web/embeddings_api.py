"""`POST /v1/embeddings`: OpenAI's embeddings endpoint, forwarded to `gateway.embed`.

    {"model", "input": str | [str, ...], "encoding_format"?: "float" | "base64",
     "dimensions"?: int, "user"?: str}
    -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
        "model", "usage": {"prompt_tokens", "total_tokens"}}

The gateway routes the request to a worker whose model says "embeddings",
holds and settles its prompt tokens like a generation's, and records it. A
worker sends each vector as little-endian float32 bytes: `base64` is exactly
those bytes encoded (what the OpenAI SDKs ask for by default and decode with
NumPy), `float` the list of numbers. Token arrays as input (OpenAI accepts
lists of token ids) are refused by name: our models take text. Headers as on
the other `/v1` replies: `x-request-id` (the usage record's id), the
rate-limit facts and `x-inferswarm-receipt` (the signed usage receipt,
shared/receipts.py).
"""

from __future__ import annotations

import array
import base64
import sys
from typing import Any

from aiohttp import web

from shared.errors import InvalidParams
from shared.receipts import HEADER as RECEIPT_HEADER
from services.web.api import bearer, json_body
from services.web.ratelimits import facts_of, openai_headers
from services.web.session import UPSTREAM

__all__ = ["routes"]

routes = web.RouteTableDef()

_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise InvalidParams("input must be a string or a list of strings (token arrays are not supported)",
                        {"param": "input"})


def _floats(vector: bytes) -> list[float]:
    values = array.array("f")
    values.frombytes(vector)
    if sys.byteorder != "little":
        values.byteswap()
    return values.tolist()


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    api_key = bearer(request)
    body = await json_body(request)
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InvalidParams(f"Unrecognized request argument supplied: {unknown[0]}", {"param": unknown[0]})
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidParams("model must be a non-empty string", {"param": "model"})
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidParams("encoding_format must be float or base64", {"param": "encoding_format"})
    answer = await request.app[UPSTREAM].gateway.embed(
        model=model, input=_texts(body.get("input")), api_key=api_key, dimensions=body.get("dimensions"))
    data = [
        {"object": "embedding", "index": index,
         "embedding": base64.b64encode(vector).decode() if encoding == "base64" else _floats(vector)}
        for index, vector in enumerate(answer["vectors"])
    ]
    usage = answer["usage"]
    headers = openai_headers(facts_of(answer))
    headers["x-request-id"] = answer["request_id"]
    if isinstance(answer.get("receipt"), str):
        headers[RECEIPT_HEADER] = answer["receipt"]
    return web.json_response({"object": "list", "data": data, "model": answer["model"],
                              "usage": {"prompt_tokens": usage["prompt_tokens"],
                                        "total_tokens": usage["total_tokens"]}}, headers=headers)
