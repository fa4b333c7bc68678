"""The RPC layer over real CurveZMQ sockets on loopback: codec, errors,
deadlines, cancellation, streaming, hostile input and access control."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import zmq
import zmq.asyncio
from nacl.public import PrivateKey

from shared import errors
from shared.identity import CurveKeyPair, MeshCredential, NodeIdentity
from shared.rpc import Connection, Dispatcher, RpcServer, current_request, method
from shared.rpc import codec
from waiting import wait_until


class Probe:
    """A test service whose handlers record what happened to them."""

    name = "probe"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled = asyncio.Event()
        self.finished = asyncio.Event()
        self.produced = 0  #: chunks `count` has generated

    @method
    async def echo(self, value: str, times: int = 1) -> str:
        return value * times

    @method
    async def types(self, a: int, b: float, c: bool, d: list, e: dict, f: bytes | None = None) -> list:
        return [a, b, c, d, e, f]

    @method
    async def fail(self, code: str, retry_after: int = 0) -> None:
        raise errors.ERROR_CLASSES[code](f"failing with {code}", {"retry_after": retry_after})

    @method
    async def crash(self) -> None:
        raise RuntimeError("secret internals /etc/passwd")

    @method
    async def sleep(self, seconds: float) -> str:
        self.started.append("sleep")
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished.set()
        return "slept"

    @method
    async def count(self, n: int, delay: float = 0.0):
        try:
            for i in range(n):
                if delay:
                    await asyncio.sleep(delay)
                self.produced += 1
                yield {"i": i}
        finally:
            if n and delay:
                self.cancelled.set()

    @method
    async def context(self) -> dict:
        ctx = current_request.get()
        assert ctx is not None
        return {"trace_id": ctx.trace_id, "member": ctx.member, "remaining": ctx.remaining()}

    async def not_exposed(self) -> str:
        return "should never be callable"


@pytest.fixture
def mesh() -> MeshCredential:
    return MeshCredential(MeshCredential.new_secret())


@pytest.fixture
def node() -> NodeIdentity:
    return NodeIdentity.generate()


@pytest.fixture
async def context():
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
async def probe_server(mesh, node):
    probe = Probe()
    server = RpcServer(Dispatcher(probe), curve=node.curve, members=mesh.roster, max_message_bytes=64 * 1024)
    async with server:
        yield probe, server


@pytest.fixture
async def client(probe_server, mesh, node, context):
    _, server = probe_server
    connection = Connection(server.endpoint, node.curve.public, mesh.client, context=context)
    connection.open()
    yield connection
    await connection.close()


def outsider_keys() -> CurveKeyPair:
    return CurveKeyPair.from_private(PrivateKey.generate())


# -- codec ---------------------------------------------------------------------


@pytest.mark.unit
def test_codec_round_trips_every_kind():
    request = codec.decode_inbound(codec.encode_request(7, "a.b", {"x": [1, "y"]}, 1500, "t" * 32))
    assert request == codec.Request(7, "a.b", {"x": [1, "y"]}, 1500, "t" * 32)
    assert codec.decode_inbound(codec.encode_cancel(9)) == codec.Cancel(9)
    windowed = codec.decode_inbound(codec.encode_request(8, "a.b", {}, 1500, "t", window=64))
    assert windowed.window == 64 and request.window == 0
    assert codec.decode_inbound(codec.encode_credit(8, 32)) == codec.Credit(8, 32)
    assert codec.decode(codec.encode_reply(3, {"ok": True})) == [1, codec.REPLY, 3, {"ok": True}]
    assert codec.decode(codec.encode_chunk(3, "tok")) == [1, codec.CHUNK, 3, "tok"]
    assert codec.decode(codec.encode_end(3)) == [1, codec.END, 3]
    assert codec.decode(codec.encode_error(3, "NOT_FOUND", "m", {"k": 1})) == [1, codec.ERROR, 3, "NOT_FOUND", "m", {"k": 1}]


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # a byte msgpack never uses
        msgpack.packb({"not": "a list"}),
        msgpack.packb([1, 1]),
        msgpack.packb([2, codec.REQUEST, 1, "a.b", {}, 100, "t"]),  # wrong version
        msgpack.packb([1, codec.REQUEST, -1, "a.b", {}, 100, "t"]),  # negative id
        msgpack.packb([1, codec.REQUEST, 1, 5, {}, 100, "t"]),  # method not a string
        msgpack.packb([1, codec.REQUEST, 1, "a.b", [], 100, "t"]),  # params not a map
        msgpack.packb([1, codec.REQUEST, 1, "a.b", {}, "soon", "t"]),  # timeout not an int
        msgpack.packb([1, codec.REQUEST, 1, "a.b", {}, 100, "t" * 65]),  # trace id too long
        msgpack.packb([1, codec.REPLY, 1, None]),  # a server never accepts replies
        msgpack.packb([1, codec.REQUEST, 1, "a.b", {}, 100, "t", -1]),  # negative window
        msgpack.packb([1, codec.REQUEST, 1, "a.b", {}, 100, "t", 2**21]),  # window too large
        msgpack.packb([1, codec.CREDIT, 1, 0]),  # credit of nothing
        msgpack.packb([1, codec.CREDIT, 1, "lots"]),
        msgpack.packb([1, codec.CREDIT, 1]),
    ],
)
@pytest.mark.unit
def test_decode_inbound_rejects_malformed_envelopes(payload):
    with pytest.raises(errors.DecodeError):
        codec.decode_inbound(payload)


@pytest.mark.unit
def test_unencodable_params_are_invalid_params():
    with pytest.raises(errors.InvalidParams):
        codec.encode_request(1, "a.b", {"x": {1, 2}}, 100, "t")


# -- calls and errors ------------------------------------------------------------


@pytest.mark.rpc
async def test_call_returns_result(client):
    assert await client.call("probe.echo", {"value": "ab", "times": 3}) == "ababab"


@pytest.mark.rpc
async def test_every_server_answers_ping(client):
    pong = await client.call("rpc.ping")
    assert pong["in_flight"] == 0 and pong["uptime_s"] >= 0 and pong["methods"] >= 2


@pytest.mark.parametrize("code", sorted(errors.ERROR_CLASSES))
@pytest.mark.rpc
async def test_every_error_code_round_trips_as_its_class(client, code):
    with pytest.raises(errors.ERROR_CLASSES[code]) as caught:
        await client.call("probe.fail", {"code": code, "retry_after": 12})
    assert caught.value.code == code
    assert caught.value.data == {"retry_after": 12}


@pytest.mark.unit
def test_unknown_code_becomes_remote_error_keeping_the_code():
    error = errors.from_wire("QUOTA_MELTED", "new in v9", {"x": 1})
    assert isinstance(error, errors.RemoteError)
    assert error.to_wire() == ("QUOTA_MELTED", "new in v9", {"x": 1})


@pytest.mark.rpc
async def test_crash_is_internal_without_traceback(client):
    with pytest.raises(errors.Internal) as caught:
        await client.call("probe.crash", trace_id="f" * 32)
    assert "f" * 32 in caught.value.message
    assert "passwd" not in caught.value.message and "Traceback" not in caught.value.message


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"value": 3}, "must be str"),
        ({"value": "x", "times": True}, "must be int"),
        ({"value": "x", "extra": 1}, "unknown parameter"),
        ({}, "missing parameter"),
    ],
)
@pytest.mark.rpc
async def test_params_are_bound_to_the_signature(client, params, fragment):
    with pytest.raises(errors.InvalidParams, match=fragment):
        await client.call("probe.echo", params)


@pytest.mark.rpc
async def test_annotations_accept_what_they_declare(client):
    result = await client.call("probe.types", {"a": 1, "b": 2, "c": False, "d": [1], "e": {"k": "v"}, "f": b"\x00"})
    assert result == [1, 2, False, [1], {"k": "v"}, b"\x00"]
    with pytest.raises(errors.InvalidParams):
        await client.call("probe.types", {"a": 1.5, "b": 2, "c": False, "d": [], "e": {}})


@pytest.mark.rpc
async def test_unmarked_and_unknown_methods_are_not_found(client):
    for name in ("probe.not_exposed", "probe.__init__", "nope.echo", "probe"):
        with pytest.raises(errors.MethodNotFound):
            await client.call(name)


@pytest.mark.rpc
async def test_request_context_carries_trace_and_deadline(client):
    result = await client.call("probe.context", timeout=5.0, trace_id="a" * 32)
    assert result["trace_id"] == "a" * 32
    assert result["member"] is True
    assert 4.0 < result["remaining"] <= 5.0


# -- deadlines and cancellation ---------------------------------------------------


@pytest.mark.rpc
async def test_client_times_out_and_server_cancels_the_handler(client, probe_server):
    probe, _ = probe_server
    started = time.monotonic()
    with pytest.raises(errors.Timeout):
        await client.call("probe.sleep", {"seconds": 5}, timeout=0.3)
    assert time.monotonic() - started < 2.0  # the 0.3 s timeout, not the 5 s sleep (room for a loaded box)
    await asyncio.wait_for(probe.cancelled.wait(), 1.0)  # the server's deadline fired too


@pytest.mark.rpc
async def test_a_call_with_no_time_left_is_not_sent(client, probe_server):
    probe, _ = probe_server
    await client.call("probe.echo", {"value": "x"})  # connected
    with pytest.raises(errors.Timeout, match="no time left"):
        await client.call("probe.sleep", {"seconds": 1}, timeout=0)
    with pytest.raises(errors.Timeout, match="no time left"):
        await client.stream("probe.count", {"n": 3}, timeout=-1)
    await asyncio.sleep(0.05)  # a fixed wait on purpose: nothing may arrive during it
    assert probe.started == []  # the server never saw them


@pytest.mark.rpc
async def test_an_expired_stream_leaves_nothing_behind(client, probe_server):
    stream = await client.stream("probe.count", {"n": 10, "delay": 1.0}, timeout=0.2)
    with pytest.raises(errors.Timeout):
        async for _ in stream:
            pass
    assert client.in_flight == 0 and client.flow_controlled == 0


@pytest.mark.rpc
async def test_server_does_not_start_expired_work(probe_server, mesh, node, context):
    probe, server = probe_server
    sock = raw_dealer(context, server, node, mesh.client)
    await sock.send(codec.encode_request(1, "probe.sleep", {"seconds": 0.01}, 0, "t"))
    reply = codec.decode(await asyncio.wait_for(sock.recv(), 2))
    assert reply[1] == codec.ERROR and reply[3] == "TIMEOUT"
    assert probe.started == []
    sock.close()


@pytest.mark.rpc
async def test_cancelling_the_caller_cancels_the_handler(client, probe_server):
    probe, _ = probe_server
    call = asyncio.create_task(client.call("probe.sleep", {"seconds": 10}))
    await wait_until(lambda: probe.started == ["sleep"], 5, message="the handler never started")
    cancelled_at = time.monotonic()
    call.cancel()
    await asyncio.wait_for(probe.cancelled.wait(), 1.0)
    assert time.monotonic() - cancelled_at < 0.5  # prompt (the handler sleeps 10 s), with room for a loaded box
    assert not probe.finished.is_set()


# -- streaming -----------------------------------------------------------------------


@pytest.mark.rpc
async def test_stream_delivers_many_chunks_in_order(client):
    stream = await client.stream("probe.count", {"n": 5000})
    items = [chunk["i"] async for chunk in stream]
    assert items == list(range(5000))


@pytest.mark.rpc
async def test_leaving_a_stream_early_cancels_the_generator(client, probe_server):
    probe, server = probe_server
    async with await client.stream("probe.count", {"n": 1000, "delay": 0.01}) as stream:
        async for chunk in stream:
            if chunk["i"] == 3:
                break
    await asyncio.wait_for(probe.cancelled.wait(), 1.0)
    await wait_until(lambda: server.in_flight == 0, 5, message="the cancelled stream is still in flight")


@pytest.mark.parametrize("window", [8, 0])
@pytest.mark.rpc
async def test_a_slow_reader_holds_the_server_to_its_window(probe_server, mesh, node, context, window):
    probe, server = probe_server
    connection = Connection(server.endpoint, node.curve.public, mesh.client, context=context, stream_window=window)
    connection.open()
    try:
        stream = await connection.stream("probe.count", {"n": 200})
        first = [await anext(stream) for _ in range(3)]
        await asyncio.sleep(0.3)  # the reader dawdles
        if window:
            # Eight chunks ahead of the reader, one more generated and waiting for credit.
            assert probe.produced == window + 1
        else:  # no flow control: the server ran ahead, the client buffered everything
            assert probe.produced == 200
        await anext(stream)  # the fourth read gives back half a window of credit
        expected = window + 1 + window // 2 if window else 200
        await wait_until(lambda: probe.produced >= expected, 5, message="the credit never reached the server")
        await asyncio.sleep(0.05)  # a fixed wait on purpose: the server must stop at `expected`, not run past it
        assert probe.produced == expected
        rest = [chunk async for chunk in stream]
        assert [c["i"] for c in first + rest] == [0, 1, 2] + list(range(4, 200))
    finally:
        await connection.close()


@pytest.mark.rpc
async def test_a_server_ignoring_the_window_is_stopped_not_buffered(mesh, context):
    keys = outsider_keys()
    router = context.socket(zmq.ROUTER)  # a misbehaving server: CURVE, but deaf to credit
    router.curve_server = True
    router.curve_publickey, router.curve_secretkey = keys.public, keys.secret
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    connection = Connection(f"tcp://127.0.0.1:{port}", keys.public, mesh.client, context=context, stream_window=4)
    connection.open()
    try:
        stream = await connection.stream("x.flood", {}, timeout=5)
        ident, payload = await router.recv_multipart()
        request = codec.decode_inbound(payload)
        assert request.window == 4
        for i in range(20):
            await router.send_multipart([ident, codec.encode_chunk(request.id, i)])
        await asyncio.sleep(0.2)  # kept: the 20 chunks reach the client's socket; nothing public to wait on
        received = []
        with pytest.raises(errors.Internal, match="more than 4 chunks ahead"):
            async for chunk in stream:
                received.append(chunk)
        assert received == [0, 1, 2, 3]
        _, cancel = await asyncio.wait_for(router.recv_multipart(), 2)
        assert codec.decode_inbound(cancel) == codec.Cancel(request.id)
    finally:
        await connection.close()
        router.close()


@pytest.mark.rpc
async def test_stream_error_is_typed(client):
    stream = await client.stream("probe.count", {"n": "many"})
    with pytest.raises(errors.InvalidParams):
        async for _ in stream:
            pass


# -- hostile input ---------------------------------------------------------------------


def raw_dealer(context, server, node, keys) -> zmq.asyncio.Socket:
    sock = context.socket(zmq.DEALER)
    sock.curve_serverkey = node.curve.public
    sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
    sock.linger = 0
    sock.connect(server.endpoint)
    return sock


@pytest.mark.rpc
async def test_garbage_gets_decode_error_and_server_survives(probe_server, mesh, node, context, client):
    _, server = probe_server
    sock = raw_dealer(context, server, node, mesh.client)
    for garbage in (b"", b"\xc1\xc1", msgpack.packb([1, codec.REQUEST]), msgpack.packb([1, 99, 5])):
        await sock.send(garbage)
        reply = codec.decode(await asyncio.wait_for(sock.recv(), 2))
        assert reply[1] == codec.ERROR and reply[3] == "DECODE_ERROR"
    await sock.send_multipart([b"two", b"frames"])  # dropped, logged
    sock.close()
    assert await client.call("probe.echo", {"value": "still alive"}) == "still alive"


@pytest.mark.rpc
async def test_oversized_request_is_too_large(probe_server, mesh, node, context, client):
    _, server = probe_server
    same_cap = Connection(server.endpoint, node.curve.public, mesh.client, context=context,
                          max_message_bytes=64 * 1024)
    same_cap.open()
    try:
        # The client refuses to send it at all (the server's libzmq would drop the connection).
        with pytest.raises(errors.TooLarge):
            await same_cap.call("probe.echo", {"value": "x" * 100_000})
        # A reply over the cap is TOO_LARGE too, not a frame the client's libzmq would drop.
        with pytest.raises(errors.TooLarge):
            await same_cap.call("probe.echo", {"value": "x" * 1000, "times": 100})
        assert await same_cap.call("probe.echo", {"value": "fine"}) == "fine"
    finally:
        await same_cap.close()
    # A client with a larger cap than the server's loses that connection, at once and typed.
    started = time.monotonic()
    with pytest.raises(errors.Unavailable):
        await client.call("probe.echo", {"value": "x" * 100_000}, timeout=5)
    assert time.monotonic() - started < 2


@pytest.mark.rpc
async def test_frame_over_the_cap_drops_only_that_peer(probe_server, mesh, node, context, client):
    _, server = probe_server
    sock = raw_dealer(context, server, node, mesh.client)
    await sock.send(b"\x00" * (64 * 1024 + 1))  # one byte over the cap: libzmq drops the connection
    await asyncio.sleep(0.2)  # kept: give libzmq the time to drop it; the call below must work either way
    sock.close()
    assert await client.call("probe.echo", {"value": "fine"}) == "fine"


@pytest.mark.rpc
async def test_duplicate_request_id_in_flight_is_refused(probe_server, mesh, node, context):
    _, server = probe_server
    sock = raw_dealer(context, server, node, mesh.client)
    await sock.send(codec.encode_request(1, "probe.sleep", {"seconds": 0.3}, 2000, "t"))
    await sock.send(codec.encode_request(1, "probe.sleep", {"seconds": 0.3}, 2000, "t"))
    first = codec.decode(await asyncio.wait_for(sock.recv(), 2))
    assert first[1] == codec.ERROR and first[3] == "DECODE_ERROR"
    second = codec.decode(await asyncio.wait_for(sock.recv(), 2))
    assert second[1:4] == [codec.REPLY, 1, "slept"]
    sock.close()


# -- access control ----------------------------------------------------------------------


@pytest.mark.rpc
async def test_internal_server_refuses_an_unknown_key_at_once(probe_server, node, context):
    _, server = probe_server
    connection = Connection(server.endpoint, node.curve.public, outsider_keys(), context=context)
    connection.open()
    started = time.monotonic()
    with pytest.raises(errors.Unauthenticated):
        await connection.call("probe.echo", {"value": "x"}, timeout=5)
    assert time.monotonic() - started < 2.5  # at once, not at the 5 s timeout (room for a loaded box)
    await connection.close()


@pytest.mark.rpc
async def test_wrong_server_key_never_connects(probe_server, mesh, context):
    _, server = probe_server
    impostor = NodeIdentity.generate().curve.public  # not the key the server holds
    connection = Connection(server.endpoint, impostor, mesh.client, context=context, connect_timeout=0.5)
    connection.open()
    with pytest.raises(errors.Unavailable):
        await connection.call("probe.echo", {"value": "x"}, timeout=2)
    await connection.close()


@pytest.mark.rpc
async def test_public_server_admits_anyone_to_public_methods_only(mesh, node, context):
    class Gate:
        name = "gate"

        @method(public=True)
        async def open(self) -> str:
            return current_request.get().peer

        @method
        async def internal(self) -> str:
            return "members only"

    async with RpcServer(Dispatcher(Gate()), curve=node.curve, members=mesh.roster) as server:
        outsider = outsider_keys()
        stranger = Connection(server.endpoint, node.curve.public, outsider, context=context)
        member = Connection(server.endpoint, node.curve.public, mesh.client, context=context)
        stranger.open()
        member.open()
        assert await stranger.call("gate.open") == outsider.public.decode()
        with pytest.raises(errors.Forbidden):
            await stranger.call("gate.internal")
        assert await member.call("gate.internal") == "members only"
        await stranger.close()
        await member.close()


# -- draining --------------------------------------------------------------------------------


@pytest.mark.rpc
async def test_drain_finishes_in_flight_and_refuses_new_work(mesh, node, context):
    probe = Probe()
    server = RpcServer(Dispatcher(probe), curve=node.curve, members=mesh.roster, drain_timeout=5)
    await server.start()
    connection = Connection(server.endpoint, node.curve.public, mesh.client, context=context)
    connection.open()
    slow = asyncio.create_task(connection.call("probe.sleep", {"seconds": 0.3}))
    await wait_until(lambda: probe.started == ["sleep"], 5, message="the slow call never started")
    drain = asyncio.create_task(server.drain())
    await asyncio.sleep(0.05)  # kept: let the drain begin (it has no public "draining" flag to wait on)
    with pytest.raises(errors.Unavailable) as refused:
        await connection.call("probe.echo", {"value": "late"})
    assert refused.value.data["retry_safe"] is True
    assert await slow == "slept"
    await drain
    await server.close()
    await connection.close()


@pytest.mark.rpc
async def test_server_killed_mid_call_fails_the_call_promptly(mesh, node, context):
    probe = Probe()
    server = RpcServer(Dispatcher(probe), curve=node.curve, members=mesh.roster)
    await server.start()
    connection = Connection(server.endpoint, node.curve.public, mesh.client, context=context)
    connection.open()
    call = asyncio.create_task(connection.call("probe.sleep", {"seconds": 10}, timeout=10))
    await wait_until(lambda: probe.started == ["sleep"], 5, message="the call never started")
    await server.close()  # the socket goes away mid-call
    with pytest.raises(errors.Unavailable) as lost:
        await asyncio.wait_for(call, 2)
    assert lost.value.data["retry_safe"] is False
    await connection.close()


# -- tracing ------------------------------------------------------------------------------------


@pytest.mark.rpc
async def test_trace_id_crosses_rpc_hops(mesh, context):
    """A handler's own calls carry its request's trace id to the next service."""

    class Back:
        name = "back"

        @method
        async def trace(self) -> str:
            return current_request.get().trace_id

    class Front:
        name = "front"

        def __init__(self, downstream: Connection) -> None:
            self.downstream = downstream

        @method
        async def relay(self) -> list:
            here = current_request.get().trace_id
            return [here, await self.downstream.call("back.trace")]

    back_node, front_node = NodeIdentity.generate(), NodeIdentity.generate()
    async with RpcServer(Dispatcher(Back()), curve=back_node.curve, members=mesh.roster) as back:
        downstream = Connection(back.endpoint, back_node.curve.public, mesh.client, context=context)
        downstream.open()
        async with RpcServer(Dispatcher(Front(downstream)), curve=front_node.curve,
                             members=mesh.roster) as front:
            caller = Connection(front.endpoint, front_node.curve.public, mesh.client, context=context)
            caller.open()
            assert await caller.call("front.relay", trace_id="c0ffee" * 4) == ["c0ffee" * 4] * 2
            await caller.close()
        await downstream.close()
