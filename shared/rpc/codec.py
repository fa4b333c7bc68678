"""The msgpack envelope: encoding and strict decoding (see PROTOCOL.md).

Every message is one msgpack array whose first two items are the protocol
version and the message kind. The socket layer sees bytes, the dispatcher sees
the tuples this module returns; nothing else parses the wire.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from shared.errors import DecodeError, InvalidParams

__all__ = [
    "VERSION",
    "REQUEST",
    "REPLY",
    "CHUNK",
    "END",
    "ERROR",
    "CANCEL",
    "CREDIT",
    "MAX_WINDOW",
    "Request",
    "Cancel",
    "Credit",
    "encode_request",
    "encode_reply",
    "encode_chunk",
    "encode_end",
    "encode_error",
    "encode_cancel",
    "encode_credit",
    "decode",
    "decode_inbound",
]

VERSION = 1

REQUEST = 1  # [V, REQUEST, id, method, params, timeout_ms, trace_id(, window)]
REPLY = 2  # [V, REPLY, id, result]
CHUNK = 3  # [V, CHUNK, id, data]
END = 4  # [V, END, id]
ERROR = 5  # [V, ERROR, id, code, message, data]
CANCEL = 6  # [V, CANCEL, id]
CREDIT = 7  # [V, CREDIT, id, chunks]

#: The largest stream window and the most chunks one CREDIT may grant.
MAX_WINDOW = 1 << 20

_MAX_ID = 2**63 - 1


class Request(NamedTuple):
    id: int
    method: str
    params: dict[str, Any]
    timeout_ms: int
    trace_id: str
    #: Chunks the server may send before it waits for CREDIT; 0 = no flow control.
    window: int = 0


class Cancel(NamedTuple):
    id: int


class Credit(NamedTuple):
    id: int
    chunks: int


def _pack(message: list[Any]) -> bytes:
    try:
        return msgpack.packb(message, use_bin_type=True, datetime=True)
    except (TypeError, ValueError, OverflowError) as exc:
        # A value msgpack cannot carry (a set, a naive datetime, an object...).
        raise InvalidParams(f"value cannot be encoded: {exc}") from None


def encode_request(
    request_id: int, method: str, params: dict[str, Any], timeout_ms: int, trace_id: str, window: int = 0
) -> bytes:
    message = [VERSION, REQUEST, request_id, method, params, timeout_ms, trace_id]
    return _pack([*message, window] if window else message)


def encode_reply(request_id: int, result: Any) -> bytes:
    return _pack([VERSION, REPLY, request_id, result])


def encode_chunk(request_id: int, data: Any) -> bytes:
    return _pack([VERSION, CHUNK, request_id, data])


def encode_end(request_id: int) -> bytes:
    return _pack([VERSION, END, request_id])


def encode_error(request_id: int, code: str, message: str, data: dict[str, Any]) -> bytes:
    try:
        return _pack([VERSION, ERROR, request_id, code, message, data])
    except InvalidParams:  # error data that cannot be encoded is dropped, not the error
        return _pack([VERSION, ERROR, request_id, code, message, {}])


def encode_cancel(request_id: int) -> bytes:
    return _pack([VERSION, CANCEL, request_id])


def encode_credit(request_id: int, chunks: int) -> bytes:
    return _pack([VERSION, CREDIT, request_id, chunks])


def decode(data: bytes | memoryview) -> list[Any]:
    """Decode bytes into a checked envelope: a list starting [VERSION, kind, id]."""
    try:
        message = msgpack.unpackb(data, raw=False, timestamp=3, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}") from None
    if not isinstance(message, list) or len(message) < 3:
        raise DecodeError("envelope must be an array [version, kind, id, ...]")
    version, _kind, request_id = message[0], message[1], message[2]
    if version != VERSION:
        raise DecodeError(f"unsupported protocol version {version!r}", {"supported": [VERSION]})
    if type(request_id) is not int or not 0 <= request_id <= _MAX_ID:
        raise DecodeError("request id must be a non-negative integer")
    return message


def decode_inbound(data: bytes | memoryview) -> Request | Cancel | Credit:
    """Decode what a server receives: a request, a cancel or a credit.

    Raises `DecodeError` whose `data["id"]` holds the request id when the
    envelope got that far, so the error can still be answered.
    """
    message = decode(data)
    kind, request_id = message[1], message[2]
    try:
        if kind == REQUEST and len(message) in (7, 8):
            method, params, timeout_ms, trace_id = message[3:7]
            window = message[7] if len(message) == 8 else 0
            if type(method) is not str or not method:
                raise DecodeError("method must be a non-empty string")
            if type(params) is not dict:
                raise DecodeError("params must be a map")
            if type(timeout_ms) is not int or timeout_ms > 86_400_000:
                raise DecodeError("timeout_ms must be an integer of at most a day")
            if type(trace_id) is not str or len(trace_id) > 64:
                raise DecodeError("trace_id must be a string of at most 64 characters")
            if type(window) is not int or not 0 <= window <= MAX_WINDOW:
                raise DecodeError(f"window must be an integer 0-{MAX_WINDOW}")
            return Request(request_id, method, params, timeout_ms, trace_id, window)
        if kind == CANCEL and len(message) == 3:
            return Cancel(request_id)
        if kind == CREDIT and len(message) == 4:
            chunks = message[3]
            if type(chunks) is not int or not 0 < chunks <= MAX_WINDOW:
                raise DecodeError(f"credit must be an integer 1-{MAX_WINDOW}")
            return Credit(request_id, chunks)
        raise DecodeError(f"unexpected message kind {kind!r} of {len(message)} items")
    except DecodeError as exc:
        exc.data["id"] = request_id
        raise
