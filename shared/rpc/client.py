"""The RPC client: one CurveZMQ DEALER connection to one server endpoint.

A `Connection` is opened once and shared by every call to that endpoint;
replies are matched to calls by request id. A socket monitor turns transport
events into typed errors at once instead of at the deadline: a refused key is
`UNAUTHENTICATED`, an unreachable or vanished server `UNAVAILABLE`. An
`UNAVAILABLE` whose `data["retry_safe"]` is true never reached a server, so
the mesh client may retry it anywhere.

Replies are untrusted input too: libzmq drops a connection whose frame is
over the size cap, and replies are decoded with the codec's limits (size,
structure, depth); one that fails fails its call with the typed error.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, cast

import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from shared.errors import (
    Internal,
    MeshError,
    Timeout,
    TooLarge,
    Unauthenticated,
    Unavailable,
    from_wire,
)
from shared import tracing
from shared.identity import CurveKeyPair
from shared.logging import new_trace_id
from shared.rpc import codec
from shared.rpc.deadlines import DeadlineQueue
from shared.rpc.outbox import next_frame, reads_batches
from shared.rpc.pump import SocketPump

__all__ = ["Connection", "Stream", "new_trace_id"]

log = structlog.get_logger(__name__)

_MONITORED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
)
_END = object()
_monitor_ids = itertools.count()


def _current_trace_id() -> str:
    trace_id = structlog.contextvars.get_contextvars().get("trace_id")
    return trace_id if isinstance(trace_id, str) else new_trace_id()


class Connection:
    """A kept-open DEALER socket to one server, multiplexing calls and streams."""

    def __init__(
        self,
        endpoint: str,
        server_key: bytes,
        client_keys: CurveKeyPair,
        *,
        context: zmq.asyncio.Context,
        max_message_bytes: int = codec.MAX_BYTES,
        connect_timeout: float = 3.0,
        stream_window: int = 64,
    ) -> None:
        """`stream_window`: chunks a stream's server may send ahead of the reader (0: unbounded)."""
        self.endpoint = endpoint
        self.server_key = server_key  #: the server's CurveZMQ public key (Z85) this connection trusts
        self._client_keys = client_keys
        self._ctx = context
        self._max = max_message_bytes
        self._decoder = codec.Decoder(max_bytes=max_message_bytes)
        self._connect_timeout = connect_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any] | asyncio.Queue[Any]] = {}
        self._window = stream_window
        self._windows: dict[int, int] = {}  #: request id -> window, for flow-controlled streams
        self._deadlines = DeadlineQueue(self._expire, self._pending)
        self._connected = False
        self._failure: MeshError | None = None
        self._changed = asyncio.Event()
        self._sock: zmq.Socket[bytes] | None = None
        self._pump: SocketPump | None = None
        #: Whether the server reads BATCH frames (its handshake metadata, read off its first message).
        self._batching = False
        #: This loop turn's messages when batching, with the request id of each request (0: none).
        self._queued: list[bytes] = []
        self._queued_ids: list[int] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def __repr__(self) -> str:
        return f"Connection({self.endpoint}, connected={self._connected})"

    # -- lifecycle -------------------------------------------------------------

    def open(self) -> None:
        """Create the socket and start connecting (calls wait for the handshake)."""
        # A plain (non-asyncio) socket driven by a SocketPump (see pump.py),
        # made by the context so that its destroy() always closes it; the
        # monitor socket, rarely busy, stays an asyncio one.
        # (pyzmq's stubs type an asyncio context's sockets as asyncio ones, whatever the class)
        sock = cast("zmq.Socket[bytes]", self._ctx.socket(zmq.DEALER, socket_class=zmq.Socket))  # type: ignore[arg-type]
        sock.curve_serverkey = self.server_key
        sock.curve_publickey = self._client_keys.public
        sock.curve_secretkey = self._client_keys.secret
        sock.linger = 0
        # A larger reply drops the connection, its body never read.
        sock.maxmsgsize = self._max + codec.CURVE_OVERHEAD
        sock.immediate = True  # never queue requests for a server not yet there
        # Tell the server, in the handshake, that we read BATCH frames (outbox.py).
        sock.setsockopt(zmq.METADATA, f"{codec.BATCH_FEATURE}:1".encode())
        sock.reconnect_ivl = 100
        sock.reconnect_ivl_max = 2000
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        monitor_address = f"inproc://rpc-monitor-{id(self):x}-{next(_monitor_ids)}"
        sock.monitor(monitor_address, _MONITORED)
        monitor = self._ctx.socket(zmq.PAIR)
        monitor.connect(monitor_address)
        sock.connect(self.endpoint)
        self._sock = sock
        # Zero-copy until the first message, which carries the server's handshake metadata.
        self._pump = SocketPump(sock, self._on_frames, copy=False)
        self._pump.start()
        self._tasks = [asyncio.create_task(self._watch(monitor), name=f"rpc-monitor {self.endpoint}")]

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._fail_pending(Unavailable("connection closed", {"retry_safe": False}))
        self._deadlines.close()
        if self._sock is not None:
            # Before the monitor's reader closes: stopping a monitor sends it a
            # last event, a blocking send that never returns once the reader is gone.
            self._sock.disable_monitor()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pump is not None:
            self._pump.close()
            self._pump = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def flow_controlled(self) -> int:
        """Streams of this connection that grant credit, still open."""
        return len(self._windows)

    # -- calls -----------------------------------------------------------------

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 10.0,
        trace_id: str | None = None,
    ) -> Any:
        """Call `method` and return its result, or raise its typed error."""
        span = None if tracing.tracer is None else tracing.start_rpc_client(method, trace_id)
        try:
            deadline = time.monotonic() + timeout
            if not self._connected:
                await self._wait_connected(deadline)
            request_id = next(self._ids)
            loop = asyncio.get_running_loop()
            future: asyncio.Future[Any] = loop.create_future()
            self._pending[request_id] = future
            self._deadlines.add(loop, deadline - time.monotonic(), request_id)
            try:
                self._send_request(request_id, method, params, deadline,
                                   trace_id if span is None else span.traceparent)
                result = await future
            except asyncio.CancelledError:
                self._send_cancel(request_id)
                raise
            finally:
                self._pending.pop(request_id, None)
        except BaseException as exc:
            if span is not None:
                tracing.finish(span, tracing.error_code(exc))
            raise
        if span is not None:
            tracing.finish(span)
        return result

    def _expire(self, request_id: Any) -> None:
        """The deadline of a call or stream passed: fail it and tell the server."""
        sink = self._pending.pop(request_id, None)
        self._windows.pop(request_id, None)
        error = Timeout(f"no answer from {self.endpoint} before the deadline")
        if isinstance(sink, asyncio.Queue):
            sink.put_nowait(error)
        elif sink is not None and not sink.done():
            sink.set_exception(error)
        self._send_cancel(request_id)

    async def stream(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 60.0,
        trace_id: str | None = None,
    ) -> Stream:
        """Start a streaming call; iterate the returned `Stream` for its chunks."""
        span = None if tracing.tracer is None else tracing.start_rpc_client(method, trace_id)
        try:
            deadline = time.monotonic() + timeout
            if not self._connected:
                await self._wait_connected(deadline)
            request_id = next(self._ids)
            queue: asyncio.Queue[Any] = asyncio.Queue()
            self._pending[request_id] = queue
            if self._window:
                self._windows[request_id] = self._window
            self._deadlines.add(asyncio.get_running_loop(), deadline - time.monotonic(), request_id)
            try:
                self._send_request(request_id, method, params, deadline,
                                   trace_id if span is None else span.traceparent, window=self._window)
            except BaseException:
                self._forget(request_id, cancel=False)
                raise
        except BaseException as exc:
            if span is not None:
                tracing.finish(span, tracing.error_code(exc))
            raise
        return Stream(self, request_id, queue, self._window, span)

    def _send_request(
        self, request_id: int, method: str, params: dict[str, Any] | None, deadline: float,
        trace_id: str | None, *, window: int = 0,
    ) -> None:
        timeout_ms = int((deadline - time.monotonic()) * 1000)
        if timeout_ms <= 0:  # e.g. spent on connecting or on discovery: the server would refuse it
            raise Timeout(f"no time left to call {method} on {self.endpoint}")
        data = codec.encode_request(
            request_id, method, params or {}, timeout_ms, trace_id or _current_trace_id(), window
        )
        if len(data) > self._max:
            raise TooLarge(f"request of {len(data)} bytes exceeds {self._max}", {"limit": self._max})
        self._send(data, request_id)

    def _send(self, data: bytes, request_id: int = 0) -> None:
        """Send a request now, or queue it for this loop turn's batch when the server reads
        batches; a request that cannot go fails with `UNAVAILABLE` (`retry_safe`)."""
        if self._pump is None:
            raise Unavailable("connection closed", {"retry_safe": True})
        if self._batching:
            self._queue(data, request_id)
            return
        try:
            self._pump.send_one(data)
        except zmq.ZMQError:
            # IMMEDIATE: EAGAIN means no live connection took the message.
            raise Unavailable(f"not connected to {self.endpoint}", {"retry_safe": True}) from None

    def _send_quietly(self, data: bytes) -> None:
        """A cancel or credit: lost with the connection, which the server loses the request with."""
        if self._pump is None or self.closed:
            return
        if self._batching:
            self._queue(data, 0)
            return
        try:
            self._pump.send_one(data)
        except zmq.ZMQError:
            pass

    def _send_cancel(self, request_id: int) -> None:
        self._send_quietly(codec.encode_cancel(request_id))

    def _send_credit(self, request_id: int, chunks: int) -> None:
        if request_id in self._pending:
            self._send_quietly(codec.encode_credit(request_id, chunks))

    def _queue(self, data: bytes, request_id: int) -> None:
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queued.append(data)
        self._queued_ids.append(request_id)
        if len(self._queued) >= codec.MAX_BATCH:
            self._flush()

    def _flush(self) -> None:
        """Send this turn's messages, several to a frame (outbox.py); the requests of a frame
        libzmq refused fail as if their own send had (`UNAVAILABLE`, `retry_safe`)."""
        queued, ids = self._queued, self._queued_ids
        self._queued, self._queued_ids = [], []
        sent = 0
        while sent < len(queued):
            count, frame = next_frame(queued[sent:], self._max)
            try:
                if self._pump is None:
                    raise zmq.ZMQError(zmq.ENOTSOCK)
                self._pump.send_one(frame)
            except zmq.ZMQError:
                error = Unavailable(f"not connected to {self.endpoint}", {"retry_safe": True})
                for request_id in ids[sent:]:
                    sink = self._pending.get(request_id) if request_id else None
                    if sink is not None:
                        self._deliver(request_id, sink, error, final=True)
                return
            sent += count

    def _forget(self, request_id: int, *, cancel: bool) -> None:
        self._windows.pop(request_id, None)
        if self._pending.pop(request_id, None) is not None and cancel:
            self._send_cancel(request_id)

    # -- connection state ------------------------------------------------------

    async def _wait_connected(self, deadline: float) -> None:
        if self._connected:
            return
        if self.closed:
            raise Unavailable("connection closed", {"retry_safe": True})
        limit = min(deadline, time.monotonic() + self._connect_timeout)
        while not self._connected:
            if self._failure is not None:
                raise type(self._failure)(self._failure.message, self._failure.data)
            remaining = limit - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"could not connect to {self.endpoint}", {"retry_safe": True})
            changed = self._changed
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                continue

    def _set_state(self, connected: bool, failure: MeshError | None) -> None:
        self._connected, self._failure = connected, failure
        self._changed.set()
        self._changed = asyncio.Event()

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        # Ends only by cancellation, from close(), after disable_monitor(): a
        # reader closed before that would make disable_monitor() block forever.
        try:
            while True:
                frames = await monitor.recv_multipart()
                try:
                    self._on_event(parse_monitor_message(frames)["event"])
                except Exception:
                    log.exception("bad monitor event", endpoint=self.endpoint)
        finally:  # an open socket would block the context's term()
            monitor.close(linger=0)

    def _on_event(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._set_state(True, None)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            failure: MeshError = Unauthenticated(f"{self.endpoint} refused this client's key", {"retry_safe": True})
            self._set_state(False, failure)
            self._fail_pending(failure)
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            failure = Unavailable(f"handshake with {self.endpoint} failed", {"retry_safe": True})
            self._set_state(False, failure)
        elif event == zmq.EVENT_DISCONNECTED:
            # Keep a handshake failure: a refused client is disconnected next.
            self._set_state(False, self._failure)
            self._fail_pending(Unavailable(f"lost connection to {self.endpoint}", {"retry_safe": False}))
        elif event == zmq.EVENT_CONNECT_RETRIED and not self._connected:
            self._set_state(False, Unavailable(f"{self.endpoint} is unreachable", {"retry_safe": True}))

    def _fail_pending(self, error: MeshError) -> None:
        pending, self._pending = self._pending, {}
        for sink in pending.values():
            if isinstance(sink, asyncio.Queue):
                sink.put_nowait(error)
            elif not sink.done():
                sink.set_exception(type(error)(error.message, error.data))

    # -- receiving -------------------------------------------------------------

    def _on_frames(self, frames: list[Any]) -> None:
        try:
            if len(frames) == 1:
                data = frames[0]
                if type(data) is not bytes:  # the first message: the server's metadata, then copies
                    self._batching = reads_batches(data)
                    if self._pump is not None:
                        self._pump.copy = True
                    data = data.bytes
                self._on_message(data)
        except Exception:
            log.exception("rpc client dropped a reply", endpoint=self.endpoint)

    def _on_message(self, data: bytes, *, batched: bool = False) -> None:
        try:
            message = self._decoder.decode(data)
            kind, request_id = message[1], message[2]
            if kind == codec.BATCH and not batched:  # several messages in one frame, in order
                for part in codec.unbatch(message):
                    self._on_message(part, batched=True)
                return
        except MeshError as exc:  # DECODE_ERROR or TOO_LARGE
            log.warning("undecodable reply", endpoint=self.endpoint, code=exc.code, error=exc.message)
            self._fail_undecodable(exc)
            return
        sink = self._pending.get(request_id)
        if sink is None:
            return  # a late answer to a call that already ended
        if kind == codec.ERROR and len(message) == 6:
            code, text, extra = message[3], message[4], message[5]
            error = from_wire(str(code), str(text), extra if isinstance(extra, dict) else {})
            self._deliver(request_id, sink, error, final=True)
        elif kind == codec.REPLY and len(message) == 4 and isinstance(sink, asyncio.Future):
            if not sink.done():
                sink.set_result(message[3])
        elif kind == codec.CHUNK and len(message) == 4 and isinstance(sink, asyncio.Queue):
            window = self._windows.get(request_id)
            if window is not None and sink.qsize() >= window:
                # The server sent past its credit: stop it rather than buffer without bound.
                log.warning("stream server ignored its window", endpoint=self.endpoint, window=window)
                self._deliver(request_id, sink, Internal(f"the server sent more than {window} chunks "
                                                         "ahead of the reader"), final=True)
                self._send_cancel(request_id)
                return
            sink.put_nowait(message[3])
        elif kind == codec.END and isinstance(sink, asyncio.Queue):
            self._deliver(request_id, sink, _END, final=True)
        else:
            log.warning("unexpected reply kind", endpoint=self.endpoint, kind=kind)

    def _fail_undecodable(self, exc: MeshError) -> None:
        """Fail the call a bad reply was for, when its id could be read, rather
        than leave the caller waiting for its deadline."""
        request_id = exc.data.pop("id", None)
        sink = self._pending.get(request_id) if request_id is not None else None
        if sink is not None:
            self._deliver(request_id, sink, exc, final=True)
            self._send_cancel(request_id)

    def _deliver(self, request_id: int, sink: Any, item: Any, *, final: bool) -> None:
        if isinstance(sink, asyncio.Queue):
            sink.put_nowait(item)
            if final:
                self._pending.pop(request_id, None)
                self._windows.pop(request_id, None)
        elif not sink.done():
            sink.set_exception(item)


class Stream:
    """The chunks of one streaming call, as an async iterator.

    Leaving it early -- `break`, an exception, `aclose()`, or the consuming
    task being cancelled -- sends CANCEL so the server stops generating.
    Use `async with` to make that prompt.
    """

    def __init__(self, connection: Connection, request_id: int, queue: asyncio.Queue[Any], window: int = 0,
                 span: tracing.Span | None = None) -> None:
        self._conn = connection
        self._id = request_id
        self._queue = queue
        self._done = False
        self._span = span  #: the call's CLIENT span, ended with the stream
        self.chunks = 0
        #: Read chunks not yet given back as credit; given back a half window at a time.
        self._unacked = 0
        self._batch = max(1, window // 2) if window else 0

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()  # the deadline arrives as a Timeout item
        except asyncio.CancelledError:
            await self.aclose()
            raise
        if item is _END:
            self._end(None)
            raise StopAsyncIteration
        if isinstance(item, MeshError):
            self._end(item.code)
            raise item
        self.chunks += 1
        if self._batch:
            self._unacked += 1
            if self._unacked >= self._batch:
                self._conn._send_credit(self._id, self._unacked)
                self._unacked = 0
        return item

    async def aclose(self) -> None:
        """Stop the stream; the server is told to cancel if it is still going."""
        if not self._done:
            self._end("CANCELLED")
            self._conn._forget(self._id, cancel=True)

    def _end(self, error: str | None) -> None:
        self._done = True
        if self._span is not None:
            tracing.finish(self._span, error)
            self._span = None

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not self._done and not self._conn.closed:
            self._conn._forget(self._id, cancel=True)
        if self._span is not None:  # dropped unread: still a span that ends
            tracing.finish(self._span, "CANCELLED")

