"""The RPC server: a CurveZMQ ROUTER socket in front of a `Dispatcher`.

Frames in, frames out: this module owns the socket, the ZAP policy, deadlines,
cancellation and draining; the dispatcher owns the method table; services see
only Python values.

Access (see identity.py and roles.py): `members` maps each member role's
client key to its role. A server whose methods are all internal admits only
those keys at the CURVE handshake (ZAP allow-list). A server with a public
method admits any CURVE client and checks each request: an internal method
requires the caller's key (ZAP `User-Id`) to be a member's, and a method that
names roles requires one of them (or the operator's): else `FORBIDDEN`.

Cost (see limits.py and PROTOCOL.md, Limits): libzmq drops a connection whose
frame is over the size cap; a public caller's message is decoded with an item
budget; requests in flight are capped in total, for public callers together
and per public key; a public caller's deadline is capped; a stream or reply
whose reader stalls is cut after `stall_timeout`.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, cast

import structlog
import zmq
import zmq.asyncio
from zmq.auth import CURVE_ALLOW_ANY
from zmq.auth.asyncio import AsyncioAuthenticator

from shared.errors import (
    DecodeError,
    Forbidden,
    Internal,
    MeshError,
    MethodNotFound,
    Timeout,
    TooLarge,
    Unavailable,
)
from shared import tracing
from shared.identity import CurveKeyPair
from shared.rpc import codec
from shared.rpc.deadlines import DeadlineQueue
from shared.rpc.eager import start_eager
from shared.rpc.limits import Admission, Limits
from shared.rpc.outbox import Outbox, reads_batches
from shared.rpc.pump import SocketPump
from shared.rpc.dispatcher import Dispatcher, Handler, RequestContext, current_request, method
from shared.roles import may_call

__all__ = ["RpcServer", "Limits"]

log = structlog.get_logger(__name__)

_SEND_RETRY_S = 0.002
_ZAP_DOMAIN = "inferswarm"


def _ignore(method: str, status: str, seconds: float) -> None:
    pass


class _Stalled(Timeout):
    """A stream's reader granted no credit for `stall_timeout`."""


class _WarnOncePerSecond:
    """Warnings any peer can trigger at will, at most one a second per event
    (with how many were left out), so a flood of garbage is no flood of logs."""

    def __init__(self) -> None:
        self._quiet_until: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def __call__(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._quiet_until.get(event, 0.0):
            self._left_out[event] = self._left_out.get(event, 0) + 1
            return
        self._quiet_until[event] = now + 1.0
        log.warning(event, left_out=self._left_out.pop(event, 0), **fields)


class _KeyAllowList:
    """ZAP credentials provider admitting a fixed set of Z85 client keys."""

    def __init__(self, keys: Collection[bytes]) -> None:
        self._keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._keys


class _Builtins:
    """Methods every server answers: `rpc.ping` for health checks."""

    name = "rpc"

    def __init__(self, server: RpcServer) -> None:
        self._server = server
        self._started = time.time()

    @method(idempotent=True)
    async def ping(self) -> dict[str, Any]:
        """Liveness and load: members only, like every internal method."""
        return {
            "time": time.time(),
            "uptime_s": round(time.time() - self._started, 3),
            "in_flight": self._server.in_flight,
            "methods": len(self._server._dispatcher.names),
        }


class RpcServer:
    """Serve a dispatcher's methods on a CurveZMQ ROUTER socket.

    Use as an async context manager: on exit it drains (new requests get
    `UNAVAILABLE` with `retry_safe`, in-flight ones get `drain_timeout` to
    finish), then closes the socket. `limits` bound what callers may cost
    (see limits.py); `max_message_bytes` is the size cap of every frame.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        curve: CurveKeyPair,
        members: Mapping[bytes, str],
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        max_message_bytes: int = codec.MAX_BYTES,
        limits: Limits | None = None,
        drain_timeout: float = 10.0,
        observe: Callable[[str, str, float], None] | None = None,
    ) -> None:
        """`observe(method, status, seconds)` is told how every request ended and how
        long it was handled: status is "ok" or the error code; method is "other" for
        names not served here."""
        self._observe = observe or _ignore
        self._dispatcher = dispatcher
        if dispatcher.get("rpc.ping") is None:
            dispatcher.add(_Builtins(self))
        self._curve = curve
        self._members = frozenset(members)
        self._roles = {key.decode(): role for key, role in members.items()}  #: by ZAP's User-Id
        self._host, self._port = host, port
        self._advertise_host = advertise_host or host
        self._max = max_message_bytes
        self.limits = limits = limits or Limits()
        self._decoder = codec.Decoder(max_bytes=max_message_bytes, max_depth=limits.max_depth)
        self._public_decoder = codec.Decoder(max_bytes=max_message_bytes, max_depth=limits.max_depth,
                                             max_items=limits.public_max_items)
        self._admission = Admission(limits)
        self._public_timeout_ms = max(1, int(limits.public_max_timeout * 1000))
        self._warn = _WarnOncePerSecond()
        self._drain_timeout = drain_timeout
        #: Only a mixed (public + internal) server checks membership per
        #: request; one with methods for some roles only, the caller's role.
        self._check_members = dispatcher.has_public
        self._check_roles = dispatcher.has_roles
        self._tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self._expired: set[tuple[bytes, int]] = set()
        self._windows: dict[tuple[bytes, int], _Window] = {}  #: flow-controlled streams
        self._deadlines = DeadlineQueue(self._expire, self._tasks)
        self._draining = False
        self._ctx: zmq.asyncio.Context | None = None
        self._auth: AsyncioAuthenticator | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._pump: SocketPump | None = None
        self._outbox: Outbox | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.endpoint = ""

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> RpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drain()
        await self.close()

    async def start(self) -> None:
        # One context per server: the ZAP handler is per context, so two
        # servers in one process (tests, `up`) never share an access policy.
        self._ctx = zmq.asyncio.Context()
        self._auth = AsyncioAuthenticator(self._ctx)
        self._auth.start()
        if self._check_members:
            self._auth.configure_curve(domain=_ZAP_DOMAIN, location=CURVE_ALLOW_ANY)
        else:
            self._auth.configure_curve_callback(_ZAP_DOMAIN, _KeyAllowList(self._members))
        # The ROUTER is a plain socket on the same libzmq context (so the ZAP
        # handler above serves it), driven by a SocketPump: see pump.py.
        # (pyzmq's stubs type an asyncio context's sockets as asyncio ones, whatever the class)
        sock = cast("zmq.Socket[bytes]", self._ctx.socket(zmq.ROUTER, socket_class=zmq.Socket))  # type: ignore[arg-type]
        sock.curve_server = True
        sock.curve_publickey = self._curve.public
        sock.curve_secretkey = self._curve.secret
        sock.zap_domain = _ZAP_DOMAIN.encode()
        sock.router_mandatory = True  # unroutable replies raise instead of vanishing
        # Tell clients, in the handshake, that we read BATCH frames.
        sock.setsockopt(zmq.METADATA, f"{codec.BATCH_FEATURE}:1".encode())
        # libzmq drops the connection of a peer whose frame is over the cap,
        # reading only its size, never its body: nothing larger ever reaches us.
        sock.maxmsgsize = self._max + codec.CURVE_OVERHEAD
        sock.linger = 0
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        if self._port:
            sock.bind(f"tcp://{self._host}:{self._port}")
        else:
            self._port = sock.bind_to_random_port(f"tcp://{self._host}")
        self._sock = sock
        self.endpoint = f"tcp://{self._advertise_host}:{self._port}"
        self._loop = asyncio.get_running_loop()
        # Zero-copy frames carry the caller's key (ZAP User-Id); only a server
        # that checks membership or roles per request needs it, and copies
        # are faster.
        self._pump = SocketPump(sock, self._on_frames, copy=not (self._check_members or self._check_roles))
        self._outbox = Outbox(self._pump.send, self._max, retry_s=_SEND_RETRY_S, max_queued=codec.MAX_BATCH)
        self._pump.start()
        log.info("rpc server listening", endpoint=self.endpoint, methods=self._dispatcher.names)

    async def drain(self) -> None:
        """Refuse new requests, then give in-flight ones `drain_timeout` to end."""
        self._draining = True
        pending = list(self._tasks.values())
        if pending:
            log.info("draining", in_flight=len(pending))
            _, still = await asyncio.wait(pending, timeout=self._drain_timeout)
            if still:
                log.warning("drain timed out; cancelling", methods=sorted(t.get_name() for t in still))
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)

    async def close(self) -> None:
        if self._outbox is not None:
            self._outbox.close()  # the answers of the last loop turn
            self._outbox = None
        if self._pump is not None:
            self._pump.close()
            self._pump = None
        for task in list(self._tasks.values()):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=1.0)
        self._deadlines.close()
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        self._sock = self._auth = self._ctx = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def flow_controlled(self) -> int:
        """Streams whose reader grants credit, still open."""
        return len(self._windows)

    @property
    def public_peers(self) -> int:
        """Public callers' keys with a request in flight."""
        return self._admission.peers

    @property
    def port(self) -> int:
        return self._port

    # -- receiving -------------------------------------------------------------

    def _on_frames(self, frames: list[Any]) -> None:
        try:
            self._on_message(frames)
        except Exception:  # the server must survive anything a peer sends
            log.exception("rpc server dropped a message")

    def _on_message(self, frames: list[Any]) -> None:
        if len(frames) != 2:
            self._warn("dropped message with unexpected frame count", frames=len(frames))
            return
        ident, payload = frames[0], frames[1]
        peer_addr = ""
        if isinstance(payload, bytes):  # copied frames: members only, every role alike
            data, peer, member, role = payload, "", True, ""
        else:  # zero-copy frames carry the caller's key (ZAP User-Id) and address
            ident = ident.bytes
            outbox = self._outbox
            if outbox is not None and not outbox.knows(ident):
                outbox.learn(ident, reads_batches(payload))
            data, peer = payload.buffer, payload.get("User-Id") or ""
            role = self._roles.get(peer, "")
            member = role != ""
            if not member:
                peer_addr = payload.get("Peer-Address") or ""
        self._on_data(ident, data, peer, member, role, peer_addr)

    def _on_data(
        self, ident: bytes, data: bytes | memoryview, peer: str, member: bool, role: str, peer_addr: str,
        batched: bool = False,
    ) -> None:
        # Public callers' messages are decoded with an item budget (codec.py).
        decoder = self._decoder if member else self._public_decoder
        try:
            message = decoder.decode_inbound(data)
            if batched and type(message) is codec.Batch:
                raise DecodeError("a batch holds no batch")
        except MeshError as exc:  # DECODE_ERROR or TOO_LARGE
            self._warn("undecodable request", code=exc.code, error=exc.message, member=member)
            self._send(ident, self._error(exc.data.get("id", 0), exc))
            return
        if type(message) is codec.Batch:  # a client's messages of one loop turn, in order
            for part in message.parts:
                self._on_data(ident, part, peer, member, role, peer_addr, True)
            return
        if type(message) is codec.Cancel:
            self._cancel(ident, message.id)  # an unknown id costs a lookup, nothing more
            return
        if type(message) is codec.Credit:
            window = self._windows.get((ident, message.id))
            if window is not None:  # else a stream that already ended
                window.grant(message.chunks)
            return
        self._on_request(ident, message, peer, role, peer_addr)  # type: ignore[arg-type]

    def _on_request(self, ident: bytes, request: codec.Request, peer: str, role: str, peer_addr: str) -> None:
        member = bool(role) or not self._check_members  # a members-only server admitted no one else
        try:
            handler = self._admit(request, peer, member, role)
        except MeshError as exc:
            known = self._dispatcher.get(request.method) is not None
            self._observe(request.method if known else "other", exc.code, 0.0)
            self._send(ident, self._error(request.id, exc))
            return
        key = (ident, request.id)
        if key in self._tasks:
            error = DecodeError("request id already in flight on this connection")
            self._send(ident, codec.encode_error(request.id, *error.to_wire()))
            return
        if not member and request.timeout_ms > self._public_timeout_ms:
            request = request._replace(timeout_ms=self._public_timeout_ms)
        loop = self._loop
        assert loop is not None
        # Most handlers answer without waiting: run them now, in this loop
        # turn; only one that suspends keeps a task (and a deadline).
        task = start_eager(loop, self._run(ident, request, handler, peer, member, peer_addr, role),
                           contextvars.copy_context())
        if task is not None and not task.done():
            task.set_name(request.method)  # a drain that times out names what it cut
            self._tasks[key] = task
            self._admission.enter(peer, member)
            self._deadlines.add(loop, request.timeout_ms / 1000, key)

    def _expire(self, key: Any) -> None:
        task = self._tasks.get(key)
        if task is not None:
            self._expired.add(key)
            task.cancel()

    def _admit(self, request: codec.Request, peer: str, member: bool, role: str) -> Handler:
        """Decide whether a decoded request may run; raise the typed refusal."""
        handler = self._dispatcher.get(request.method)
        if handler is None:
            raise MethodNotFound(f"no method {request.method!r}")
        if not handler.spec.public:
            if not member:
                raise Forbidden(f"{request.method} is open to mesh members only")
            if not may_call(role, handler.spec.roles):
                raise Forbidden(f"{request.method} is not open to the {role or 'unknown'} role",
                                {"role": role})
        if self._draining:
            raise Unavailable("server is shutting down", {"retry_safe": True})
        if request.timeout_ms <= 0:
            raise Timeout("deadline passed before the request was started")
        if request.method != "rpc.ping":  # a ping never waits: a busy server is still alive
            self._admission.check(peer, member)  # the in-flight caps
        return handler

    def _cancel(self, ident: bytes, request_id: int) -> None:
        task = self._tasks.get((ident, request_id))
        if task is not None:
            task.cancel()

    # -- running a handler -----------------------------------------------------

    async def _run(
        self, ident: bytes, request: codec.Request, handler: Handler, peer: str, member: bool, peer_addr: str,
        role: str,
    ) -> None:
        budget = request.timeout_ms / 1000
        started = time.monotonic()
        trace_id = tracing.trace_id_of(request.trace_id)  # the field may be a traceparent
        span = None if tracing.tracer is None else tracing.start_rpc_server(request.method, request.trace_id)
        current_request.set(
            RequestContext(
                method=request.method,
                trace_id=trace_id,
                deadline=started + budget,
                peer=peer,
                member=member,  # a members-only server admitted nobody else at the handshake
                peer_addr=peer_addr,
                role=role,
            )
        )
        structlog.contextvars.bind_contextvars(trace_id=trace_id)
        status = "ok"
        try:
            if handler.stream:
                await self._run_stream(ident, request, handler)
            else:
                result = await handler.call(request.params)
                await self._send_waiting(ident, self._fitting(codec.encode_reply(request.id, result)))
        except _Stalled as exc:  # the reader is not reading: tell it without waiting on it
            status = exc.code
            log.info("stream reader stalled; stopping", method=request.method, error=exc.message)
            self._send(ident, self._error(request.id, exc))
        except MeshError as exc:
            status = exc.code
            self._log_error(request, exc)
            await self._send_waiting(ident, self._error(request.id, exc))
        except asyncio.CancelledError:
            if (ident, request.id) in self._expired:
                status = Timeout.code
                error: MeshError = Timeout(f"{request.method} did not finish within {budget:.3f}s")
                self._send(ident, codec.encode_error(request.id, *error.to_wire()))
            else:
                # The caller cancelled, or we are closing: no one awaits an answer.
                status = "CANCELLED"
                log.debug("request cancelled", method=request.method)
        except Exception:
            status = Internal.code
            log.exception("handler failed", method=request.method)
            error = Internal(f"internal error (trace {trace_id})")
            await self._send_waiting(ident, codec.encode_error(request.id, *error.to_wire()))
        finally:
            if span is not None:
                tracing.finish(span, None if status == "ok" else status)
            self._observe(request.method, status, time.monotonic() - started)
            key = (ident, request.id)
            if self._tasks.pop(key, None) is not None:  # else it never suspended, never counted
                self._admission.leave(peer, member)
            self._expired.discard(key)

    async def _run_stream(self, ident: bytes, request: codec.Request, handler: Handler) -> None:
        key = (ident, request.id)
        window = _Window(request.window) if request.window else None
        if window is not None:
            self._windows[key] = window
        stream = handler.call(request.params)
        try:
            async for item in stream:
                if window is not None:
                    # The reader's credit: it holds at most `window` chunks unread.
                    await window.take(self.limits.stall_timeout)
                if not await self._send_waiting(ident, self._fitting(codec.encode_chunk(request.id, item))):
                    log.info("stream reader gone; stopping", method=request.method)
                    return
            await self._send_waiting(ident, codec.encode_end(request.id))
        finally:
            self._windows.pop(key, None)
            await stream.aclose()

    def _log_error(self, request: codec.Request, exc: MeshError) -> None:
        if exc.expected:
            log.warning("request refused", method=request.method, code=exc.code, error=exc.message)
        else:
            log.error("request failed", method=request.method, code=exc.code, exc_info=exc)

    # -- sending ---------------------------------------------------------------

    def _fitting(self, data: bytes) -> bytes:
        """`data`, or `TooLarge` when the peer's libzmq would drop it (and
        with it the whole connection, every other call of that client too)."""
        if len(data) > self._max:
            raise TooLarge(f"answer of {len(data)} bytes exceeds {self._max}", {"limit": self._max})
        return data

    def _error(self, request_id: int, exc: MeshError) -> bytes:
        """An error frame; one whose message or data is over the cap keeps only its code."""
        data = codec.encode_error(request_id, *exc.to_wire())
        if len(data) > self._max:
            code = exc.to_wire()[0]
            data = codec.encode_error(request_id, code, f"{code} (details over the size cap)", {})
        return data

    def _send(self, ident: bytes, data: bytes) -> bool:
        """Queue one answer without waiting (outbox.py); False when the peer is gone."""
        if self._outbox is None:
            return False
        return self._outbox.put(ident, data)

    async def _send_waiting(self, ident: bytes, data: bytes) -> bool:
        """Queue a chunk, reply or error, waiting while the peer's queue is full:
        within the deadline, and for at most `stall_timeout` on end.

        Only a request's first refusal and a deadline's TIMEOUT use `_send`:
        under load a full queue must delay the END or the reply, not drop it
        (the caller would wait for it until its deadline)."""
        give_up = 0.0
        while True:
            outbox = self._outbox
            if outbox is None:
                return False
            if not outbox.blocked(ident):
                return outbox.put(ident, data)  # False: the client disconnected, stop generating
            now = time.monotonic()
            if not give_up:
                give_up = now + self.limits.stall_timeout
            elif now >= give_up:
                log.info("reader stalled; stopping", stalled_s=self.limits.stall_timeout)
                return False  # a reader that reads nothing holds no slot for ever
            await asyncio.sleep(_SEND_RETRY_S)  # a slow reader: back-pressure


class _Window:
    """A stream's credit: chunks the server may still send before the reader asks for more."""

    __slots__ = ("available", "_more")

    def __init__(self, size: int) -> None:
        self.available = size
        self._more = asyncio.Event()

    async def take(self, patience: float) -> None:
        """One chunk's credit; `_Stalled` when none comes within `patience` seconds."""
        while self.available <= 0:
            self._more.clear()
            try:  # the request's deadline or a CANCEL also ends the wait
                async with asyncio.timeout(patience):
                    await self._more.wait()
            except TimeoutError:
                raise _Stalled(f"the reader granted no credit for {patience:g}s",
                               {"stalled_s": patience}) from None
        self.available -= 1

    def grant(self, chunks: int) -> None:
        self.available = min(self.available + chunks, codec.MAX_WINDOW)
        self._more.set()
