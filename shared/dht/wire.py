"""DHT datagram framing and decoding; nothing here ever trusts its input.

rpcudp's framing is kept: one UDP datagram is

    kind (1 byte: 0x00 request, 0x01 response) | msg id (20 bytes) | payload

where a request payload is msgpack `[method, [args...]]` -- or
`[method, [args...], {"ro": true}]` from a read-only node (BEP 43) -- and a
response payload is the msgpack result. Unlike rpcudp, decoding uses the C `msgpack`
package with explicit limits, and every failure is a `WireError` for the
caller to drop, never an exception escaping into the event loop.

Replies are checked here too (`node_list`, `value_reply`), so the crawls only
ever see well-formed node triples and byte blobs.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import msgpack

__all__ = [
    "REQUEST",
    "RESPONSE",
    "MSG_ID_SIZE",
    "HEADER_SIZE",
    "WireError",
    "encode_request",
    "request_parts",
    "encode_response",
    "decode_datagram",
    "is_node_id",
    "node_list",
    "value_reply",
]

REQUEST = 0x00
RESPONSE = 0x01
MSG_ID_SIZE = 20
HEADER_SIZE = 1 + MSG_ID_SIZE
_MAX_ITEMS = 512  # no message of ours holds more elements in one array/map


class WireError(ValueError):
    """A datagram that is not a well-formed DHT message."""


_READ_ONLY = {"ro": True}


def encode_request(msg_id: bytes, method: str, args: list[Any], *, read_only: bool = False) -> bytes:
    """A request datagram calling `method(*args)`; `read_only` marks a client node's."""
    payload = [method, args, _READ_ONLY] if read_only else [method, args]
    packed: bytes = msgpack.packb(payload, use_bin_type=True)
    return bytes([REQUEST]) + msg_id + packed


def request_parts(payload: Any) -> tuple[Any, list[Any], bool] | None:
    """`(method, args, read_only)` of a request payload, or None if malformed.

    Options other than `ro` are ignored, so that later versions may add some.
    """
    if not (isinstance(payload, list) and len(payload) in (2, 3) and isinstance(payload[1], list)):
        return None
    options = payload[2] if len(payload) == 3 else {}
    if not isinstance(options, dict):
        return None
    return payload[0], payload[1], options.get("ro") is True


def encode_response(msg_id: bytes, result: Any) -> bytes:
    """A response datagram carrying `result`."""
    packed: bytes = msgpack.packb(result, use_bin_type=True)
    return bytes([RESPONSE]) + msg_id + packed


def decode_datagram(data: bytes, max_size: int) -> tuple[int, bytes, Any]:
    """`(kind, msg_id, payload)` of a datagram, or `WireError`."""
    if len(data) < HEADER_SIZE + 1:
        raise WireError("datagram too short")
    if len(data) > max_size:
        raise WireError(f"datagram of {len(data)} bytes over the {max_size} byte cap")
    kind = data[0]
    if kind not in (REQUEST, RESPONSE):
        raise WireError(f"unknown datagram kind {kind}")
    try:
        payload = msgpack.unpackb(
            data[HEADER_SIZE:],
            raw=False,
            strict_map_key=True,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=_MAX_ITEMS,
            max_map_len=_MAX_ITEMS,
            max_ext_len=0,
        )
    except Exception as exc:  # any decoding failure of untrusted bytes
        raise WireError(f"undecodable payload ({type(exc).__name__})") from None
    return kind, bytes(data[1:HEADER_SIZE]), payload


def is_node_id(value: Any) -> bool:
    """True for a 160-bit node id or key as carried on the wire."""
    return type(value) is bytes and len(value) == MSG_ID_SIZE


def _node_triple(item: Any) -> tuple[bytes, str, int] | None:
    if not (isinstance(item, list) and len(item) == 3):
        return None
    node_id, ip, port = item
    if not is_node_id(node_id) or type(ip) is not str or type(port) is not int:
        return None
    if not 0 < port < 65536:
        return None
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return None
    return node_id, ip, port


def node_list(value: Any, limit: int) -> list[tuple[bytes, str, int]]:
    """The well-formed `(id, ip, port)` triples of a reply, at most `limit`."""
    if not isinstance(value, list):
        return []
    triples = (_node_triple(item) for item in value[:limit])
    return [triple for triple in triples if triple is not None]


def value_reply(value: Any, limit: int, max_blob: int) -> tuple[list[bytes], list[tuple[bytes, str, int]]]:
    """`(blobs, nodes)` of a find_value reply `{"v": [...], "n": [...]}`."""
    if not isinstance(value, dict):
        return [], []
    blobs = value.get("v")
    blobs = blobs[:_MAX_ITEMS] if isinstance(blobs, list) else []
    good = [blob for blob in blobs if type(blob) is bytes and len(blob) <= max_blob]
    return good, node_list(value.get("n"), limit)
