"""Hostile input (issue 9): property-based fuzzing of the wire decoders and of
live servers on 127.0.0.1.

- the RPC envelope decoder (`codec.decode`, `codec.decode_inbound`) and the
  dispatcher's parameter binding: only `DecodeError` / `InvalidParams`;
- a live `RpcServer` over real CURVE sockets fed random frames: a typed error
  or a logged drop, and a normal call is answered afterwards;
- DHT datagram framing (`wire.py`) and record parsing (`record.py`) on random
  bytes and mutated valid records: only `WireError` / `InvalidRecord`; a live
  DHT node fed random datagrams still answers a ping;
- many idle CURVE connections, and a slow reader of a stream (back-pressure
  pauses the generator instead of buffering without bound).

Live servers run on an event loop in a background thread, so hypothesis drives
plain synchronous test functions. Example counts are sized for < 60 s in all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import errors
from shared.dht import DHTConfig, KademliaDiscovery
from shared.dht import wire
from shared.dht.record import (
    RECORD_CONTEXT,
    InvalidRecord,
    RecordVerifier,
    peek,
    sign_record,
    wall_ms,
)
from shared.identity import MeshCredential, NodeIdentity
from shared.rpc import Connection, Dispatcher, RpcServer, method
from shared.rpc import codec

pytestmark = pytest.mark.timeout(60)

def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))

# -- strategies ------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
#: Anything msgpack can carry (ext types included), nested a little.
values = st.recursive(
    st.one_of(scalars, st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))),
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=4)), children, max_size=6),
    ),
    max_leaves=20,
)


def packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


#: Envelopes that are close to valid: the right version, any kind, any tail.
near_envelopes = st.builds(
    lambda kind, rid, tail: packed([codec.VERSION, kind, rid, *tail]),
    st.one_of(st.integers(0, 8), values),
    st.one_of(st.integers(0, 2**64 - 1), values),
    st.lists(values, max_size=6),
)
#: Requests with well-formed framing and random contents.
near_requests = st.builds(
    lambda rid, meth, params, timeout, trace: packed([codec.VERSION, codec.REQUEST, rid, meth, params, timeout, trace]),
    st.integers(0, 2**63 - 1),
    st.one_of(st.sampled_from(["target.plain", "target.kinds", "target.anything", "target.stream", "rpc.ping", "nope"]), values),
    st.one_of(st.dictionaries(st.text(max_size=10), values, max_size=6), values),
    st.one_of(st.integers(-5, 2000), values),
    st.one_of(st.text(max_size=70), values),
)
frames = st.one_of(
    st.binary(max_size=300),
    st.builds(packed, values),
    near_envelopes,
    near_requests,
)

# -- a target service covering every annotation kind the binder checks -------------------


class Target:
    name = "target"

    @method
    async def plain(self, a: str, b: int = 0) -> list:
        return [a, b]

    @method
    async def kinds(
        self,
        s: str,
        i: int = 0,
        f: float = 0.0,
        b: bool = False,
        raw: bytes = b"",
        items: list = [],  # noqa: B006 - never mutated
        mapping: dict | None = None,
        choice: Literal["a", "b", 3] = "a",
        either: int | str = 0,
        untyped=None,
    ) -> str:
        return "ok"

    @method
    async def anything(self, first: int | None = None, **rest: Any) -> int:
        return len(rest)

    @method
    async def stream(self, n: int = 3):
        for i in range(min(max(n, 0), 5)):
            yield i


TARGET = Dispatcher(Target())


# -- the envelope decoder ----------------------------------------------------------------


@fuzz(600)
@given(st.one_of(st.binary(max_size=200), st.builds(packed, values), near_envelopes, near_requests))
@pytest.mark.rpc  # pure Python, but hundreds of fuzzed examples: too long for the unit tier
def test_decoder_raises_only_decode_error(data):
    for decoder in (codec.decode, codec.decode_inbound):
        try:
            message = decoder(data)
        except errors.DecodeError as exc:
            assert exc.code == "DECODE_ERROR" and exc.message
            codec.encode_error(exc.data.get("id", 0), *exc.to_wire())  # always answerable
            continue
        if decoder is codec.decode_inbound:
            assert type(message) in (codec.Request, codec.Cancel, codec.Credit)
            if type(message) is codec.Request:
                assert type(message.method) is str and type(message.params) is dict


# -- the dispatcher's parameter binding ----------------------------------------------------


async def _call(handler, params: dict) -> Any:
    outcome = handler.call(params)
    if handler.stream:
        return [item async for item in outcome]
    return await outcome


@fuzz(400)
@given(
    st.sampled_from(TARGET.names),
    st.dictionaries(
        st.one_of(st.sampled_from(["a", "b", "s", "i", "f", "raw", "items", "mapping", "choice", "either",
                                   "untyped", "first", "n"]), st.text(max_size=6), st.binary(max_size=4)),
        values,
        max_size=6,
    ),
)
@pytest.mark.rpc  # pure Python, but hundreds of fuzzed examples: too long for the unit tier
def test_binding_gives_a_result_or_invalid_params(name, params):
    handler = TARGET.get(name)
    try:
        asyncio.run(_call(handler, params))
    except errors.InvalidParams as exc:
        assert exc.code == "INVALID_PARAMS"


# -- DHT wire framing and records ------------------------------------------------------------


datagrams = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda kind, mid, payload: bytes([kind]) + mid + payload,
              st.integers(0, 3), st.binary(min_size=20, max_size=20),
              st.one_of(st.builds(packed, values), st.binary(max_size=60))),
)


@fuzz(400)
@given(datagrams, values)
@pytest.mark.rpc  # pure Python, but hundreds of fuzzed examples: too long for the unit tier
def test_dht_wire_raises_only_wire_error(data, reply):
    try:
        kind, msg_id, _payload = wire.decode_datagram(data, 8192)
        assert kind in (wire.REQUEST, wire.RESPONSE) and len(msg_id) == wire.MSG_ID_SIZE
    except wire.WireError:
        pass
    for triple in wire.node_list(reply, 20):
        assert wire.is_node_id(triple[0]) and 0 < triple[2] < 65536
    blobs, nodes = wire.value_reply(reply, 20, 1024)
    assert all(type(blob) is bytes for blob in blobs) and len(nodes) <= 20


MESH = MeshCredential(MeshCredential.new_secret())
SIGNER = NodeIdentity.generate()
VERIFIER = RecordVerifier(MESH.mesh_id, max_ttl=60, clock_skew=2)
TOPIC = "inferswarm/auth/v1"


def valid_blob() -> bytes:
    return sign_record(SIGNER, MESH.certify(SIGNER.public_key), topic=TOPIC, service="auth",
                       endpoint="tcp://127.0.0.1:5555", version="1.0", ttl=30, load={"queue": 1})


def check_record(blob: Any) -> None:
    try:
        VERIFIER.verify(blob, topic=TOPIC)
    except InvalidRecord as exc:
        assert exc.reason
    try:
        peek(blob)
    except InvalidRecord:
        pass


@fuzz(300)
@given(st.one_of(st.binary(max_size=300), st.builds(packed, values), values))
@pytest.mark.rpc  # pure Python, but hundreds of fuzzed examples: too long for the unit tier
def test_random_records_are_rejected_typed(blob):
    check_record(blob)


@fuzz(300)
@given(st.data())
@pytest.mark.unit
def test_mutated_records_are_rejected_typed(data):
    valid = valid_blob()
    blob = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(blob) - 1))
        if action == "flip":
            blob[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del blob[at:at + data.draw(st.integers(1, 8))]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        if not blob:
            break
    if bytes(blob) == valid:
        return  # mutations that cancelled out
    with pytest.raises(InvalidRecord):  # any change breaks the format or the signature
        VERIFIER.verify(bytes(blob), topic=TOPIC)


BODY_FIELDS = ["t", "s", "e", "k", "c", "v", "l", "q", "d", "x"]


@fuzz(300)
@given(st.dictionaries(st.sampled_from(BODY_FIELDS), values, max_size=4), st.sets(st.sampled_from(BODY_FIELDS), max_size=2))
@pytest.mark.rpc  # pure Python, but hundreds of fuzzed examples: too long for the unit tier
def test_resigned_bodies_with_random_fields_are_typed(changes, dropped):
    """Validly signed bodies whose fields have random values: accepted or typed."""
    body = {"t": TOPIC, "s": "auth", "e": "tcp://127.0.0.1:5555", "k": SIGNER.public_key,
            "c": MESH.certify(SIGNER.public_key), "v": "1.0", "l": {}, "q": wall_ms(), "d": 30}
    body.update(changes)
    for key in dropped:
        body.pop(key, None)
    body_bytes = packed(body)
    blob = packed([body_bytes, SIGNER.sign(RECORD_CONTEXT + body_bytes)])
    try:
        record = VERIFIER.verify(blob)
    except InvalidRecord as exc:
        assert exc.reason
    else:
        assert type(record.topic) is str and 0 <= record.ttl <= 60 and math.isfinite(record.ttl)


# -- live servers on a background loop ---------------------------------------------------------


class BackgroundLoop:
    """An event loop in a thread, so synchronous hypothesis tests can drive live servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hostile-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def background() -> Iterator[BackgroundLoop]:
    runner = BackgroundLoop()
    yield runner
    runner.stop()


#: The live RPC server's frame cap.
LIVE_MAX_BYTES = 16 * 1024


@pytest.fixture(scope="module")
def live_rpc(background) -> Iterator[tuple[RpcServer, NodeIdentity, MeshCredential]]:
    mesh = MeshCredential(MeshCredential.new_secret())
    node = NodeIdentity.generate()

    async def start() -> RpcServer:
        server = RpcServer(Dispatcher(Target()), curve=node.curve, members=mesh.roster,
                           max_message_bytes=LIVE_MAX_BYTES, drain_timeout=1.0)
        await server.start()
        return server

    server = background.run(start())
    yield server, node, mesh
    background.run(server.close())


@pytest.fixture(scope="module")
def dealer(live_rpc) -> Iterator[zmq.Socket]:
    server, node, mesh = live_rpc
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.curve_serverkey = node.curve.public
    sock.curve_publickey, sock.curve_secretkey = mesh.client.public, mesh.client.secret
    sock.linger = 0
    sock.connect(server.endpoint)
    yield sock
    sock.close(linger=0)
    ctx.term()


_probe_ids = iter(range(10**12, 10**12 + 10**6))


def assert_still_answers(sock: zmq.Socket) -> list[list[Any]]:
    """A normal call gets its reply; returns whatever arrived before it (all typed)."""
    probe_id = next(_probe_ids)
    sock.send(codec.encode_request(probe_id, "target.plain", {"a": "alive"}, 5000, "probe"))
    others = []
    deadline = time.monotonic() + 5.0
    for _ in range(50):  # replies to the hostile frames may come first
        left = deadline - time.monotonic()
        assert left > 0 and sock.poll(int(left * 1000)), "the server stopped answering"
        reply = codec.decode(sock.recv())  # every reply is a well-formed envelope
        if reply[2] == probe_id and reply[1] == codec.REPLY:
            assert reply[3] == ["alive", 0]
            return others
        assert reply[1] in (codec.REPLY, codec.ERROR, codec.CHUNK, codec.END), reply
        if reply[1] == codec.ERROR:
            assert reply[3] in errors.ERROR_CLASSES and reply[3] != "INTERNAL", reply
        others.append(reply)
    raise AssertionError("no reply to the probe call")


@fuzz(150)
@given(st.lists(st.one_of(frames, st.lists(st.binary(max_size=20), min_size=2, max_size=4)), min_size=1, max_size=4))
@pytest.mark.rpc
def test_live_rpc_server_survives_random_frames(dealer, messages):
    for message in messages:
        if isinstance(message, list):  # a multi-frame message: dropped and logged
            dealer.send_multipart(message)
        else:
            dealer.send(message)
    assert_still_answers(dealer)


@pytest.mark.rpc
def test_binary_parameter_names_are_invalid_params_on_the_wire(dealer):
    """msgpack maps may have bin keys; a **kwargs handler once failed INTERNAL on them."""
    dealer.send(codec.encode_request(11, "target.anything", {b"key": 1}, 1000, "t"))
    got = [tuple(reply[1:4]) for reply in assert_still_answers(dealer)]
    assert got == [(codec.ERROR, 11, "INVALID_PARAMS")]


@pytest.mark.rpc
def test_live_rpc_server_refuses_oversized_frames_typed(dealer, live_rpc):
    server, node, mesh = live_rpc
    # under the cap: garbage is DECODE_ERROR, on the request's id when one can be read
    dealer.send(codec.encode_request(7, "target.plain", {"a": "x" * 10_000}, 1000, "t")[:-1])
    dealer.send(b"\x93" + b"\xff" * 10_000)
    got = {tuple(reply[1:4]) for reply in assert_still_answers(dealer)}
    assert (codec.ERROR, 7, "DECODE_ERROR") in got and (codec.ERROR, 0, "DECODE_ERROR") in got
    # over the cap: libzmq drops only that peer
    ctx = zmq.Context()
    try:
        big = ctx.socket(zmq.DEALER)
        big.curve_serverkey = node.curve.public
        big.curve_publickey, big.curve_secretkey = mesh.client.public, mesh.client.secret
        big.linger = 0
        big.connect(server.endpoint)
        big.send(codec.encode_request(8, "target.plain", {"a": "x" * LIVE_MAX_BYTES}, 1000, "t"))
        time.sleep(0.2)  # kept: let libzmq send the frame before the socket closes; nothing to wait on
        big.close(linger=0)
    finally:
        ctx.term()
    assert_still_answers(dealer)


# -- many idle connections, slow readers ------------------------------------------------------------


class Producer:
    """A stream whose generator records how far it has run ahead."""

    name = "producer"

    def __init__(self) -> None:
        self.yielded = 0
        self.closed = asyncio.Event()

    @method
    async def flood(self, n: int, size: int):
        chunk = b"z" * size
        try:
            for _ in range(n):
                self.yielded += 1
                yield chunk
        finally:
            self.closed.set()


@pytest.fixture
async def producer_server():
    mesh = MeshCredential(MeshCredential.new_secret())
    node = NodeIdentity.generate()
    producer = Producer()
    server = RpcServer(Dispatcher(producer), curve=node.curve, members=mesh.roster, drain_timeout=1.0)
    ctx = zmq.asyncio.Context()
    async with server:
        yield producer, server, node, mesh, ctx
    ctx.destroy(linger=0)


def raw_dealer(ctx, server, node, keys, options: dict[int, int] | None = None) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.curve_serverkey = node.curve.public
    sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
    sock.linger = 0
    for option, value in (options or {}).items():
        sock.setsockopt(option, value)
    sock.connect(server.endpoint)
    return sock


@pytest.mark.rpc
async def test_many_idle_connections_do_not_starve_others(producer_server):
    _, server, node, mesh, ctx = producer_server
    idle = [raw_dealer(ctx, server, node, mesh.client) for _ in range(200)]
    try:
        await asyncio.sleep(1.0)  # let the 200 CURVE handshakes happen; none sends anything
        connection = Connection(server.endpoint, node.curve.public, mesh.client, context=ctx)
        connection.open()
        try:
            start = time.monotonic()
            for _ in range(20):
                assert (await connection.call("rpc.ping", {}, timeout=5.0))["in_flight"] == 0
            assert time.monotonic() - start < 5.0
        finally:
            await connection.close()
    finally:
        for sock in idle:
            sock.close(linger=0)
    assert server.in_flight == 0


@pytest.mark.rpc
async def test_slow_stream_reader_pauses_the_generator(producer_server):
    producer, server, node, mesh, ctx = producer_server
    size, total = 16 * 1024, 200_000  # 3.2 GB if it were buffered without bound
    sock = raw_dealer(ctx, server, node, mesh.client, {zmq.RCVHWM: 10, zmq.RCVBUF: 64 * 1024})
    try:
        await sock.send(codec.encode_request(1, "producer.flood", {"n": total, "size": size}, 30_000, "slow"))
        # read one chunk, then stop reading: the server must stop producing
        first = codec.decode(await asyncio.wait_for(sock.recv(), 5))
        assert first[1] == codec.CHUNK
        await asyncio.sleep(0.5)  # kept (the behaviour): the generator fills the queues, then pauses
        paused_at = producer.yielded
        await asyncio.sleep(0.5)  # kept (the behaviour): nothing may be produced during it
        assert producer.yielded == paused_at, "the generator kept running while nobody read"
        # bounded by the socket queues (HWMs + kernel buffers), far below the total
        assert paused_at < 5_000, paused_at
        assert server.in_flight == 1
        # reading resumes it (once the queues drain below their low-water marks)
        for _ in range(5_000):
            reply = codec.decode(await asyncio.wait_for(sock.recv(), 5))
            assert reply[1] == codec.CHUNK
            if producer.yielded > paused_at:
                break
        assert producer.yielded > paused_at
        # cancelling ends it
        await sock.send(codec.encode_cancel(1))
        await asyncio.wait_for(producer.closed.wait(), 5)
    finally:
        sock.close(linger=0)
    for _ in range(50):  # bounded wait for the task to be forgotten
        if server.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert server.in_flight == 0


# -- a live DHT node fed random datagrams ------------------------------------------------------------

FAST = DHTConfig(ttl=1.5, max_ttl=10.0, clock_skew=1.0, rpc_timeout=0.3, ping_interval=0.5, dead_ttl=3.0,
                 cache_ttl=0.2, backoff_initial=0.1, backoff_max=0.4, save_interval=0.5)


@pytest.fixture(scope="module")
def live_dht(background) -> Iterator[KademliaDiscovery]:
    node = KademliaDiscovery(identity=NodeIdentity.generate(), mesh=MeshCredential(MeshCredential.new_secret()),
                             seeds=[], config=FAST)
    background.run(node.__aenter__())
    errors_seen: list[dict] = []
    background.loop.call_soon_threadsafe(background.loop.set_exception_handler,
                                         lambda _loop, context: errors_seen.append(context))
    yield node
    background.run(node.__aexit__(None, None, None))
    assert errors_seen == [], errors_seen


@pytest.fixture(scope="module")
def udp() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5.0)  # a busy machine may delay a reply; a dead node never answers
    yield sock
    sock.close()


def dht_ping(sock: socket.socket, port: int, within: float = 5.0) -> Any:
    """The node's answer to a ping, skipping for at most `within` seconds
    what else arrives: replies to earlier datagrams, the node's own pings."""
    msg_id = os.urandom(20)
    sock.sendto(b"\x00" + msg_id + packed(["ping", [os.urandom(20)]]), ("127.0.0.1", port))
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(65536)
        except TimeoutError:
            break
        if data[1:21] == msg_id:
            return msgpack.unpackb(data[21:])
    raise AssertionError(f"no ping reply within {within} s")


dht_requests = st.builds(
    lambda method, args: b"\x00" + os.urandom(20) + packed([method, args]),
    st.one_of(st.sampled_from(["ping", "store", "find_node", "find_value", "rpc_ping", "__init__"]), values),
    st.one_of(st.lists(st.one_of(values, st.binary(min_size=20, max_size=20)), max_size=4), values),
)


@fuzz(150)
@given(st.lists(st.one_of(datagrams.filter(bool), dht_requests), min_size=1, max_size=4))
@pytest.mark.rpc
def test_live_dht_node_survives_random_datagrams(live_dht, udp, batch):
    for data in batch:
        udp.sendto(data, ("127.0.0.1", live_dht.port))
    assert dht_ping(udp, live_dht.port) == live_dht.identity.node_id


# -- a flooding peer ---------------------------------------------------------------------------


@pytest.mark.rpc
def test_a_flooding_peer_is_held_to_its_budget_and_answered_again_later(background):
    # Loopback is exempt by default (it is this host); here it stands for a remote peer.
    config = dataclasses.replace(FAST, peer_exempt_loopback=False, peer_bytes_per_s=5_120.0, peer_burst=61_440.0)
    node = KademliaDiscovery(identity=NodeIdentity.generate(), mesh=MeshCredential(MeshCredential.new_secret()),
                             seeds=[], config=config)
    background.run(node.__aenter__())
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.bind(("127.0.0.1", 0))
    try:
        started = time.monotonic()
        for i in range(1000):  # 1,000 pings in ~0.1 s (paced so the kernel's buffer drops none)
            flood.sendto(b"\x00" + os.urandom(20) + packed(["ping", [os.urandom(20)]]), ("127.0.0.1", node.port))
            if i % 50 == 49:
                time.sleep(0.005)
        answered = 0
        flood.settimeout(0.5)
        try:
            while True:
                data, _ = flood.recvfrom(65536)
                answered += data[:1] != b"\x00"  # a reply (the node also pings its new "contacts")
        except TimeoutError:
            pass
        elapsed = time.monotonic() - started
        # The burst pays for 120 requests at 512 bytes; the rate for 10 more a second.
        assert 100 <= answered <= 120 + 10 * elapsed + 5, (answered, elapsed)
        assert node.server.protocol.budget.refused >= 800  # the rest: dropped unanswered
        time.sleep(0.3)  # refilled enough for a request or two
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fresh:  # same address, same budget
            fresh.bind(("127.0.0.1", 0))
            fresh.settimeout(5.0)
            assert dht_ping(fresh, node.port) == node.identity.node_id
    finally:
        flood.close()
        background.run(node.__aexit__(None, None, None))
