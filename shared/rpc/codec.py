"""The msgpack envelope: encoding and strict decoding (see PROTOCOL.md).

Every message is one msgpack array whose first two items are the protocol
version and the message kind. The socket layer sees bytes, the dispatcher sees
the tuples this module returns; nothing else parses the wire.

Decoding untrusted bytes has a bounded cost (PROTOCOL.md, Limits); a
`Decoder` checks, in this order:

1. the size cap, before anything is parsed (`TOO_LARGE`);
2. that every array holds the items its header claims. msgpack allocates an
   array's claimed length up front, so 5 KB of nested "65535 items" headers
   would cost ~66 MB before any other check could run. Arrays of at most 256
   items cost at most 2 MB that way (1023 levels, msgpack's own depth limit),
   so a message is first built with that limit; only one with a longer array
   is walked first in C, building nothing (`Unpacker.skip`) (`DECODE_ERROR`);
3. while building: at most `max_items` items in all, when set -- elements,
   map entries and containers, each costing 16-230 bytes of Python objects
   for 1-3 bytes of wire (`TOO_LARGE`);
4. containers nested at most `max_depth` deep, the envelope counting as one
   (`DECODE_ERROR`). msgpack has no such limit; hooks count the containers
   built, and only a message with more containers than `max_depth` is walked.
"""

from __future__ import annotations

from itertools import compress
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import msgpack

from shared.errors import DecodeError, InvalidParams, MeshError, TooLarge

__all__ = [
    "VERSION",
    "REQUEST",
    "REPLY",
    "CHUNK",
    "END",
    "ERROR",
    "CANCEL",
    "CREDIT",
    "BATCH",
    "BATCH_FEATURE",
    "MAX_BATCH",
    "MAX_BATCH_BYTES",
    "MAX_WINDOW",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_TIMEOUT_MS",
    "CURVE_OVERHEAD",
    "Decoder",
    "Request",
    "Cancel",
    "Credit",
    "Batch",
    "encode_request",
    "encode_reply",
    "encode_chunk",
    "encode_end",
    "encode_error",
    "encode_cancel",
    "encode_credit",
    "encode_batch",
    "batch_overhead",
    "unbatch",
    "decode",
    "decode_inbound",
]

VERSION = 1

REQUEST = 1  # [V, REQUEST, id, method, params, timeout_ms, trace_id(, window)]; trace_id may be a traceparent
REPLY = 2  # [V, REPLY, id, result]
CHUNK = 3  # [V, CHUNK, id, data]
END = 4  # [V, END, id]
ERROR = 5  # [V, ERROR, id, code, message, data]
CANCEL = 6  # [V, CANCEL, id]
CREDIT = 7  # [V, CREDIT, id, chunks]
BATCH = 8  # [V, BATCH, 0, [message bytes, ...]]: to a peer that announced BATCH_FEATURE

#: The most messages one batch holds (senders send a full batch at once).
MAX_BATCH = 256
#: The largest batch a sender makes (a larger message goes alone): libzmq holds up to its
#: high-water mark (1,000) of frames per peer, so a peer that stops reading costs at most
#: that many times this, as it did before batches with messages of this size.
MAX_BATCH_BYTES = 64 * 1024

#: The ZMQ_METADATA property a peer sets in its handshake to say it reads BATCH
#: frames (a server: from members); nobody sends them to a peer that did not
#: (PROTOCOL.md, Batches).
BATCH_FEATURE = "X-Inferswarm-Batch"

#: The largest stream window and the most chunks one CREDIT may grant.
MAX_WINDOW = 1 << 20
#: Default size cap of one message (INFERSWARM_MAX_MESSAGE_BYTES).
MAX_BYTES = 1 << 20
#: Default nesting cap, the envelope included (INFERSWARM_RPC_MAX_DEPTH).
MAX_DEPTH = 32
#: The longest deadline a request may carry: one day.
MAX_TIMEOUT_MS = 86_400_000
#: What CurveZMQ adds to a message on the wire ("\x07MESSAGE", an 8-byte
#: nonce, a 16-byte MAC, a flags byte). libzmq applies ZMQ_MAXMSGSIZE to that
#: encrypted frame: a cap of N bytes of message is a MAXMSGSIZE of N + 33.
CURVE_OVERHEAD = 33

_MAX_ID = 2**63 - 1
#: Arrays up to this long are built without the checking pass: allocated up
#: front 1023 levels deep, they cost at most 2 MB.
_SHORT_ARRAY = 256
_CONTAINER = cast("Callable[[type], bool | None]", {list: True, dict: True}.get)


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


class Batch(NamedTuple):
    """Several messages in one frame (kind BATCH), each still to be decoded on its own."""

    parts: list[bytes]


def _pack(message: list[Any]) -> bytes:
    try:
        packed: bytes = msgpack.packb(message, use_bin_type=True, datetime=True)
        return packed
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


def encode_batch(messages: list[bytes]) -> bytes:
    """Several encoded server -> client messages in one frame, in order (see `batch_overhead`)."""
    return _pack([VERSION, BATCH, 0, messages])


def batch_overhead(count: int) -> int:
    """What a batch of `count` messages adds to their sizes, at most: the envelope (10 bytes
    with the list's array header) and a bin header (up to 5 bytes) per message."""
    return 10 + 5 * count


def unbatch(message: list[Any]) -> list[bytes]:
    """The messages of a decoded BATCH envelope, each to be decoded on its own; a batch
    holding anything but encoded messages is malformed."""
    if len(message) != 4 or type(message[3]) is not list or not 0 < len(message[3]) <= MAX_BATCH:
        raise DecodeError(f"a batch must be [version, 8, 0, [message, ...]] with 1-{MAX_BATCH} messages")
    parts: list[bytes] = message[3]
    if not all(type(part) is bytes for part in parts):
        raise DecodeError("a batch holds encoded messages (bin) only")
    return parts


class _OverBudget(Exception):
    """Raised from a decoding hook: the message holds more items than allowed."""


class _LongArray(Exception):
    """An array longer than the first attempt allows: check, then build again."""


class _TooLong(Exception):
    """An array or map header claims more items than allowed."""


class Decoder:
    """Decode untrusted bytes into checked envelopes, at a bounded cost.

    `max_items` (None: only the size cap bounds it) limits elements, map
    entries and containers together. One instance serves one event loop
    (it keeps per-call counters).
    """

    def __init__(self, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH,
                 max_items: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.max_items = max_items
        #: The most items one array or map may hold.
        self.max_length = min(max_items, max_bytes) if max_items else max_bytes
        #: [containers built, items left in the budget], reset for every message.
        self._tally = tally = [0, 0]

        def count(container: Any, tally: list[int] = tally) -> Any:
            tally[0] += 1
            return container

        def spend(container: Any, tally: list[int] = tally) -> Any:
            tally[0] += 1
            tally[1] -= len(container) + 1
            if tally[1] < 0:
                raise _OverBudget
            return container

        self._hook = spend if max_items else count
        #: The first attempt's limit: short arrays only (maps are not allocated up front).
        self._short = min(_SHORT_ARRAY, self.max_length)

    def decode(self, data: bytes | memoryview) -> list[Any]:
        """Decode bytes into a checked envelope: a list starting [VERSION, kind, id]."""
        size = len(data)
        if size > self.max_bytes:
            raise TooLarge(f"message of {size} bytes exceeds {self.max_bytes}",
                           _with_id({"limit": self.max_bytes}, data))
        try:
            message = self._parse(data)
        except MeshError as exc:
            _with_id(exc.data, data)
            raise
        if not isinstance(message, list) or len(message) < 3:
            raise DecodeError("envelope must be an array [version, kind, id, ...]")
        version, _kind, request_id = message[0], message[1], message[2]
        if version != VERSION:
            raise DecodeError(f"unsupported protocol version {version!r}", {"supported": [VERSION]})
        if type(request_id) is not int or not 0 <= request_id <= _MAX_ID:
            raise DecodeError("request id must be a non-negative integer")
        return message

    def decode_inbound(self, data: bytes | memoryview) -> Request | Cancel | Credit | Batch:
        """Decode what a server receives: a request, a cancel, a credit or a batch of them.

        Raises `DecodeError` (or `TooLarge`) whose `data["id"]` holds the
        request id when one could be read, so the error can still be answered.
        """
        return _inbound(self.decode(data))

    def _parse(self, data: bytes | memoryview) -> Any:
        """Build the message; check it in C first only if it has a long array."""
        try:
            return self._build(data, self._short)
        except _LongArray:
            pass
        except _TooLong:
            _check_complete(data)  # a claim the bytes cannot back is malformed, not large
            raise self._too_long() from None
        _check_complete(data)
        try:
            return self._build(data, self.max_length)
        except _TooLong:
            raise self._too_long() from None

    def _too_long(self) -> TooLarge:
        return TooLarge(f"an array or map holds more than {self.max_length} items",
                        {"max_items": self.max_length})

    def _build(self, data: bytes | memoryview, max_array_len: int) -> Any:
        tally = self._tally
        tally[0], tally[1] = 0, self.max_items or 0
        try:
            # Strings, binaries and extensions are bounded by the size check;
            # msgpack's defaults raw=False and strict_map_key=True are ours.
            message = msgpack.unpackb(data, timestamp=3, max_array_len=max_array_len,
                                      max_map_len=self.max_length, list_hook=self._hook,
                                      object_hook=self._hook)
        except _OverBudget:
            _check_complete(data)  # truncated or trailing bytes: malformed, not large
            raise TooLarge(f"message holds more than {self.max_items} items",
                           {"max_items": self.max_items}) from None
        except ValueError as exc:  # among others: an array or map over its length limit
            text = str(exc)
            if "exceeds max_array_len" in text and max_array_len < self.max_length:
                raise _LongArray from None
            if "exceeds max_array_len" in text or "exceeds max_map_len" in text:
                raise _TooLong from None
            raise DecodeError(_describe(exc)) from None
        except Exception as exc:
            raise DecodeError(_describe(exc)) from None
        if tally[0] > self.max_depth and _deeper_than(message, self.max_depth):
            raise DecodeError(f"containers nested deeper than {self.max_depth}")
        return message


def _check_complete(data: bytes | memoryview) -> None:
    """Walk the bytes in C without building anything: every container's
    items present, nothing after the envelope, at most 1023 levels."""
    checker = msgpack.Unpacker(max_buffer_size=len(data))
    try:
        checker.feed(data)
        checker.skip()
        if checker.tell() != len(data):
            raise msgpack.ExtraData(None, None)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(_describe(exc)) from None


def _describe(exc: Exception) -> str:
    if isinstance(exc, msgpack.StackError):
        return "malformed msgpack: nested deeper than 1023"
    if isinstance(exc, msgpack.ExtraData):
        return "malformed msgpack: bytes after the message"
    if isinstance(exc, msgpack.OutOfData) or "incomplete input" in str(exc):
        return "malformed msgpack: truncated"
    return f"malformed msgpack: {type(exc).__name__}"


def _deeper_than(root: Any, limit: int) -> bool:
    """Whether `root` nests containers more than `limit` deep (breadth first;
    the C iterators keep the cost per item small)."""
    level, depth = [root], 1
    while level:
        if depth > limit:
            return True
        below: list[Any] = []
        for container in level:
            items = container.values() if type(container) is dict else container
            below.extend(compress(items, map(_CONTAINER, map(type, items))))
        level, depth = below, depth + 1
    return False


def _with_id(data: dict[str, Any], message: bytes | memoryview) -> dict[str, Any]:
    """`data` with the request id read from the message's first bytes, if any:
    an error answered on the right id fails that call at once."""
    if "id" not in data:
        request_id = _peek_id(message)
        if request_id is not None:
            data["id"] = request_id
    return data


def _peek_id(message: bytes | memoryview) -> int | None:
    head = msgpack.Unpacker(max_buffer_size=64, max_array_len=0, max_map_len=0, max_str_len=16,
                            max_bin_len=16, max_ext_len=16)
    try:
        head.feed(bytes(message[:40]))
        if head.read_array_header() < 3 or head.unpack() != VERSION:
            return None
        head.unpack()  # the kind
        request_id = head.unpack()
    except Exception:  # anything short of an envelope's first three items
        return None
    return request_id if type(request_id) is int and 0 <= request_id <= _MAX_ID else None


def _inbound(message: list[Any]) -> Request | Cancel | Credit | Batch:
    kind, request_id = message[1], message[2]
    try:
        if kind == BATCH:
            return Batch(unbatch(message))
        if kind == REQUEST and len(message) in (7, 8):
            method, params, timeout_ms, trace_id = message[3:7]
            window = message[7] if len(message) == 8 else 0
            if type(method) is not str or not method:
                raise DecodeError("method must be a non-empty string")
            if type(params) is not dict:
                raise DecodeError("params must be a map")
            if type(timeout_ms) is not int or timeout_ms > MAX_TIMEOUT_MS:
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


def decode(data: bytes | memoryview) -> list[Any]:
    """`Decoder().decode` with the default limits (tools and tests; a server
    or a connection keeps its own `Decoder`)."""
    return Decoder().decode(data)


def decode_inbound(data: bytes | memoryview) -> Request | Cancel | Credit | Batch:
    """`Decoder().decode_inbound` with the default limits."""
    return Decoder().decode_inbound(data)
