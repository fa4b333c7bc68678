"""BATCH frames (shared/rpc/outbox.py, PROTOCOL.md "Batches"), against a real `RpcServer`
over CurveZMQ: a loop turn's messages to one peer go in one frame, only to a peer that
announced it reads them in its handshake; the `Connection` batches its own requests once the
server has said it reads batches; hostile batches are refused typed, one part at a time.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from nacl.public import PrivateKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.errors import Unavailable  # noqa: E402
from shared.identity import CurveKeyPair, MeshCredential, NodeIdentity  # noqa: E402
from shared.rpc import Connection, Dispatcher, RpcServer, codec, method  # noqa: E402
from shared.rpc.outbox import next_frame  # noqa: E402

pytestmark = pytest.mark.rpc

ANNOUNCE = f"{codec.BATCH_FEATURE}:1".encode()


class Target:
    name = "target"

    @method(public=True)
    async def echo(self, value: Any = None) -> Any:
        return value

    @method(public=True)
    async def count(self, n: int):
        for i in range(n):
            yield i


@pytest.fixture
async def served() -> AsyncIterator[tuple[RpcServer, bytes]]:
    mesh = MeshCredential(MeshCredential.new_secret())
    node = NodeIdentity.generate()
    async with RpcServer(Dispatcher(Target()), curve=node.curve, members=mesh.roster, drain_timeout=1.0) as server:
        yield server, node.curve.public


@pytest.fixture
async def context() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


def keys() -> CurveKeyPair:
    return CurveKeyPair.from_private(PrivateKey.generate())


def dealer(ctx: zmq.asyncio.Context, endpoint: str, server_key: bytes, *, announce: bool) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.curve_serverkey = server_key
    own = keys()
    sock.curve_publickey, sock.curve_secretkey = own.public, own.secret
    sock.linger = 0
    if announce:
        sock.setsockopt(zmq.METADATA, ANNOUNCE)
    sock.connect(endpoint)
    return sock


def bare_router(ctx: zmq.asyncio.Context, *, announce: bool) -> tuple[zmq.asyncio.Socket, CurveKeyPair, int]:
    """A bare ROUTER playing the server (CURVE, announcing batches or not): it, its keys, its port."""
    server_keys = keys()
    router = ctx.socket(zmq.ROUTER)
    router.curve_server = True
    router.curve_publickey, router.curve_secretkey = server_keys.public, server_keys.secret
    if announce:
        router.setsockopt(zmq.METADATA, ANNOUNCE)
    router.linger = 0
    return router, server_keys, router.bind_to_random_port("tcp://127.0.0.1")


def echo(request_id: int, value: Any) -> bytes:
    return codec.encode_request(request_id, "target.echo", {"value": value}, 10_000, "t")


async def frames(sock: zmq.asyncio.Socket, messages: int, within: float = 10.0) -> list[list[Any]]:
    """Frames received until they hold `messages` messages: each frame as the messages it holds."""
    got: list[list[Any]] = []
    async with asyncio.timeout(within):
        while sum(len(f) for f in got) < messages:
            message = codec.decode(await sock.recv())
            got.append([codec.decode(part) for part in codec.unbatch(message)]
                       if message[1] == codec.BATCH else [message])
    return got


async def test_a_turns_answers_go_to_an_announcing_client_in_one_frame(served, context):
    server, key = served
    sock = dealer(context, server.endpoint, key, announce=True)
    try:
        await sock.send(codec.encode_batch([echo(i, f"v{i}") for i in range(1, 41)]))
        got = await frames(sock, 40)
        assert len(got) == 1  # forty replies made in one loop turn: one frame
        assert [(m[1], m[2], m[3]) for m in got[0]] == [(codec.REPLY, i, f"v{i}") for i in range(1, 41)]
    finally:
        sock.close(0)


async def test_a_client_that_did_not_announce_gets_a_frame_per_message(served, context):
    server, key = served
    sock = dealer(context, server.endpoint, key, announce=False)
    try:
        await sock.send(codec.encode_batch([echo(i, i) for i in range(1, 21)]))
        got = await frames(sock, 20)
        assert [len(f) for f in got] == [1] * 20  # an older client never sees a BATCH
        assert sorted(f[0][3] for f in got) == list(range(1, 21))
    finally:
        sock.close(0)


async def test_a_streams_chunks_and_end_keep_their_order_in_batches(served, context):
    server, key = served
    sock = dealer(context, server.endpoint, key, announce=True)
    try:
        await sock.send(codec.encode_request(7, "target.count", {"n": 1000}, 10_000, "t"))
        got = await frames(sock, 1001)
        messages = [m for f in got for m in f]
        assert [m[3] for m in messages[:-1]] == list(range(1000))
        assert messages[-1][1:3] == [codec.END, 7]
        assert len(got) < 1001 / 4  # batched: far fewer frames than messages
        assert all(len(f) <= codec.MAX_BATCH for f in got)
    finally:
        sock.close(0)


async def test_hostile_batches_are_refused_typed_part_by_part(served, context):
    server, key = served
    sock = dealer(context, server.endpoint, key, announce=False)
    try:
        nested = codec.encode_batch([codec.encode_batch([echo(1, "deep")])])
        await sock.send(nested)
        [[error]] = await frames(sock, 1)
        assert error[1] == codec.ERROR and error[3] == "DECODE_ERROR" and "no batch" in error[4]

        too_many = codec.encode_batch([echo(i, i) for i in range(1, codec.MAX_BATCH + 2)])
        await sock.send(too_many)
        [[error]] = await frames(sock, 1)
        assert error[3] == "DECODE_ERROR" and str(codec.MAX_BATCH) in error[4]

        for bad in ([1, codec.BATCH, 0, []], [1, codec.BATCH, 0, ["text"]], [1, codec.BATCH, 0, b"x"],
                    [1, codec.BATCH, 0]):
            await sock.send(msgpack.packb(bad, use_bin_type=True))
            [[error]] = await frames(sock, 1)
            assert error[3] == "DECODE_ERROR", bad

        # A garbage part fails alone: the parts before and after it are served.
        await sock.send(codec.encode_batch([echo(1, "before"), b"\xc1garbage", echo(3, "after")]))
        got = [m for f in await frames(sock, 3) for m in f]
        assert sorted((m[2], m[1]) for m in got) == [(0, codec.ERROR), (1, codec.REPLY), (3, codec.REPLY)]
        assert server.in_flight == 0
    finally:
        sock.close(0)


@pytest.mark.parametrize("announced", [True, False], ids=["server reads batches", "older server"])
async def test_the_connection_batches_its_requests_once_the_server_reads_batches(context, announced):
    """A bare ROUTER playing the server: when it announces batches, after its first answer
    the Connection sends a loop turn's requests in one frame, and reads a batched answer;
    to a server that announced nothing (older than batches) it sends a frame per request."""
    router, server_keys, port = bare_router(context, announce=announced)
    async with AsyncExitStack() as stack:
        stack.callback(router.close, 0)
        connection = Connection(f"tcp://127.0.0.1:{port}", server_keys.public, keys(), context=context)
        connection.open()
        stack.push_async_callback(connection.close)

        async def serve_one() -> list[bytes]:
            ident, data = await asyncio.wait_for(router.recv_multipart(), 10)
            message = codec.decode(data)
            parts = codec.unbatch(message) if message[1] == codec.BATCH else [data]
            replies = [codec.encode_reply(codec.decode(p)[2], codec.decode(p)[4]["value"]) for p in parts]
            batch = announced and len(replies) > 1  # an older server answers a frame each
            for frame in [codec.encode_batch(replies)] if batch else replies:
                await router.send_multipart([ident, frame])
            return parts

        first = asyncio.ensure_future(connection.call("target.echo", {"value": 0}))
        assert len(await serve_one()) == 1  # before any answer the client does not know: one frame
        assert await first == 0
        calls = asyncio.gather(*(connection.call("target.echo", {"value": i}) for i in range(1, 31)))
        if announced:
            assert len(await serve_one()) == 30  # one loop turn's thirty requests: one frame
        else:
            assert [len(await serve_one()) for _ in range(30)] == [1] * 30
        assert await calls == list(range(1, 31))


async def test_a_real_connection_and_server_answer_everything_batched(served, context):
    server, key = served
    connection = Connection(server.endpoint, key, keys(), context=context)
    connection.open()
    try:
        assert await connection.call("target.echo", {"value": "first"}) == "first"
        values = await asyncio.gather(*(connection.call("target.echo", {"value": i}) for i in range(500)))
        assert values == list(range(500))

        async def count(n: int) -> list[int]:
            async with await connection.stream("target.count", {"n": n}) as stream:
                return [i async for i in stream]

        assert await asyncio.gather(*(count(300) for _ in range(20))) == [list(range(300))] * 20
    finally:
        await connection.close()


def test_a_frame_holds_what_fits_and_one_large_message_goes_alone():
    small = [b"x" * 100] * 1000
    count, frame = next_frame(small, codec.MAX_BYTES)
    assert count == codec.MAX_BATCH and len(frame) <= codec.MAX_BATCH_BYTES
    large = [b"y" * 70_000, b"z" * 10]
    assert next_frame(large, codec.MAX_BYTES) == (1, large[0])
    halves = [b"a" * 40_000, b"b" * 40_000]
    assert next_frame(halves, codec.MAX_BYTES) == (1, halves[0])  # together over 64 KiB
    assert next_frame([b"only"], codec.MAX_BYTES) == (1, b"only")


def test_clients_whose_queues_are_full_share_one_retry_and_keep_their_order():
    """The outbox alone, its socket a function: ten clients refuse (EAGAIN) for 50 ms, one
    takes everything. One retry timer serves them all (not one more per failed try, which
    grew without bound); the one that takes is never held up; order is kept."""
    from shared.rpc.outbox import Outbox

    async def main() -> None:
        sent: dict[bytes, list[bytes]] = {}
        tries = 0
        full: set[bytes] = {b"c%d" % i for i in range(10)}

        def send(frames: list[bytes]) -> None:
            nonlocal tries
            tries += 1
            ident, data = frames
            if ident in full:
                raise zmq.Again()
            sent.setdefault(ident, []).append(data)

        outbox = Outbox(send, codec.MAX_BYTES, retry_s=0.002)
        for ident in [*sorted(full), b"free"]:
            outbox.learn(ident, False)
            for n in range(3):
                assert outbox.put(ident, b"%s-%d" % (ident, n))
        await asyncio.sleep(0)  # the turn's flush
        assert sent[b"free"] == [b"free-0", b"free-1", b"free-2"]
        assert all(outbox.blocked(ident) for ident in full)
        await asyncio.sleep(0.05)
        assert tries <= 1 + 10 + 10 * 40, tries  # about one try per client per 2 ms, not compounding
        full.clear()  # their readers caught up
        await asyncio.sleep(0.02)
        assert all(sent[b"c%d" % i] == [b"c%d-%d" % (i, n) for n in range(3)] for i in range(10))
        assert not any(outbox.blocked(b"c%d" % i) for i in range(10))
        outbox.close()

    asyncio.run(main())


async def test_requests_of_a_batched_frame_libzmq_refuses_fail_retry_safe_and_the_rest_still_go(context):
    """A server (a bare ROUTER announcing batches) that stops reading: once the socket's queue
    and the kernel's buffers are full, libzmq refuses the client's next batched frame, and the
    requests in it fail at once with UNAVAILABLE `retry_safe` (they never left), none hangs;
    when the server reads again, every request that did go is answered."""
    router, server_keys, port = bare_router(context, announce=True)
    router.rcvhwm, router.rcvbuf = 1, 4096  # for the connection to come: it takes little
    async with AsyncExitStack() as stack:
        stack.callback(router.close, 0)
        connection = Connection(f"tcp://127.0.0.1:{port}", server_keys.public, keys(), context=context)
        connection.open()
        stack.push_async_callback(connection.close)

        async def answer(frames: int) -> int:
            """Answer every request of `frames` frames; how many requests they held."""
            answered = 0
            for _ in range(frames):
                ident, data = await asyncio.wait_for(router.recv_multipart(), 10)
                message = codec.decode(data)
                for part in codec.unbatch(message) if message[1] == codec.BATCH else [data]:
                    request = codec.decode(part)
                    await router.send_multipart([ident, codec.encode_reply(request[2], len(request[4]["value"]))])
                    answered += 1
            return answered

        first = asyncio.ensure_future(connection.call("target.echo", {"value": "x"}))
        await answer(1)
        assert await first == 1  # the server's answer said it reads batches: the connection batches now
        connection._sock.sndhwm = 4  # the real socket's queue: four frames (libzmq applies it to the live pipe)
        big = "v" * 60_000  # a frame each (a batch holds at most 64 KiB)
        calls: list[asyncio.Future[Any]] = []
        refused: list[BaseException] = []
        for _ in range(400):  # at most 24 MB, far beyond the kernel's buffers
            calls += [asyncio.ensure_future(connection.call("target.echo", {"value": big}, timeout=60))
                      for _ in range(8)]
            for _ in range(3):  # the calls run, then the turn's frames go (or are refused)
                await asyncio.sleep(0)
            refused = [call.exception() for call in calls if call.done()]
            if refused:
                break
        assert refused, "libzmq never refused a frame"
        assert all(isinstance(exc, Unavailable) and exc.data.get("retry_safe") is True for exc in refused)
        went = [call for call in calls if not call.done()]
        assert went  # those before the refusal are in flight, not failed
        answered = 0
        async with asyncio.timeout(30):
            while answered < len(went):
                answered += await answer(1)
        assert [await call for call in went] == [60_000] * len(went)
