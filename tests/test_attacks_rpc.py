"""Attacks on the RPC layer (issue 15, finding 3: unauthenticated resource
exhaustion on public RPC), each against a real `RpcServer` over CurveZMQ,
each with a legitimate caller served alongside:

(a) decode bombs -- 1 MB of empty maps, maps nested 500,000 deep, nested
    headers claiming 65,535 items each, a params map of small items -- sent
    by a public caller to a server in a child process, whose RSS is read from
    /proc before and after;
(b) a frame over the size cap: libzmq drops that connection without reading
    the body; a message of exactly the cap still passes;
(c) requests in flight: per public key over all its connections, for public
    callers together, and in total, each refused typed past its cap;
(d) a public caller's one-day deadline cut to the configured cap;
(e) streams whose reader grants no credit, or reads nothing, cut after the
    stall timeout, their slots freed;
(f) the bombs and the per-key cap against a real gateway process.

Run as a script, this file is the child server of (a) and (b).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey
from zmq.utils.monitor import recv_monitor_message

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared import errors  # noqa: E402
from shared.identity import CurveKeyPair, MeshCredential, NodeIdentity  # noqa: E402
from shared.rpc import Connection, Dispatcher, Limits, RpcServer, codec, current_request, method  # noqa: E402

CAP = 1 << 20  # the default size cap, as every service runs with


class Target:
    """Public methods for the attackers and the legitimate callers, one internal."""

    name = "target"

    def __init__(self) -> None:
        self.generated = 0

    @method(public=True)
    async def echo(self, value: Any = None) -> Any:
        return value

    @method(public=True)
    async def sink(self, value: Any = None) -> None:
        pass

    @method(public=True)
    async def remaining(self) -> float:
        return current_request.get().remaining()  # type: ignore[union-attr]

    @method(public=True)
    async def sleep(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "slept"

    @method(public=True)
    async def count(self, n: int, delay: float = 0.0, size: int = 0):
        for i in range(n):
            if delay:
                await asyncio.sleep(delay)
            self.generated += 1
            yield b"z" * size if size else i

    @method
    async def internal(self) -> str:
        return "members only"


def new_keys() -> CurveKeyPair:
    """A fresh CURVE key: a public caller, as anyone may be."""
    return CurveKeyPair.from_private(PrivateKey.generate())


def raw_dealer(ctx: zmq.asyncio.Context, endpoint: str, server_key: bytes, keys: CurveKeyPair,
               options: dict[int, int | bytes] | None = None) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.curve_serverkey = server_key
    sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
    sock.linger = 0
    for option, value in (options or {}).items():
        sock.setsockopt(option, value)
    sock.connect(endpoint)
    return sock


async def answer(sock: zmq.asyncio.Socket, within: float = 10.0) -> list[Any]:
    return codec.decode(await asyncio.wait_for(sock.recv(), within))


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll `check` until it holds, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def refused(awaitable: Awaitable[Any], error: type[errors.MeshError]) -> errors.MeshError:
    with pytest.raises(error) as caught:
        await awaitable
    return caught.value


# -- bombs: requests to target.echo whose `value` is raw msgpack ------------------------


def packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def envelope(request_id: int, value: bytes) -> bytes:
    """[1, REQUEST, id, "target.echo", {"value": <value>}, 5000, "bomb"], `value` spliced in raw."""
    return (b"\x97" + packed(1) + packed(codec.REQUEST) + packed(request_id) + packed("target.echo")
            + b"\x81" + packed("value") + value + packed(5000) + packed("bomb"))


def bomb(kind: str, request_id: int, size: int = CAP) -> bytes:
    """A request of at most `size` bytes whose value is one decoding bomb."""
    room = size - len(envelope(request_id, b"")) - 8
    if kind == "empty maps":  # ~1M empty maps in one array: ~70 MB of dicts if decoded
        value = b"\xdd" + room.to_bytes(4, "big") + b"\x80" * room
    elif kind == "nested maps":  # {"": {"": {"": ...}}} 500,000 deep
        value = b"\x81\xa0" * (room // 2) + b"\x80"
    elif kind == "claims":  # arrays nested 1,000 deep, each claiming 65,535 items, 8 bytes each up front
        value = b"\xdc\xff\xff" * 1000 + b"\xc0" * (room - 3000)
    elif kind == "small items":  # a map of ~130,000 distinct short keys
        entries = [packed(f"{i:x}") + b"\xc0" for i in range(int(room // 6.7))]
        value = b"\xdf" + len(entries).to_bytes(4, "big") + b"".join(entries)
    elif kind == "arrays of maps":  # 64 arrays of 16,000 empty maps: every container under its own cap
        inner = b"\xdc" + (16_000).to_bytes(2, "big") + b"\x80" * 16_000
        value = b"\xdc" + (64).to_bytes(2, "big") + inner * 64
    else:
        raise ValueError(kind)
    frame = envelope(request_id, value)
    assert len(frame) <= size, (kind, len(frame))
    return frame


#: What each bomb is refused with: too many items, or bad nesting.
BOMBS = {"empty maps": "TOO_LARGE", "nested maps": "DECODE_ERROR", "claims": "DECODE_ERROR",
         "small items": "TOO_LARGE", "arrays of maps": "TOO_LARGE"}


# -- every decoder, on hostile bytes ----------------------------------------------------


def hostile_bytes() -> st.SearchStrategy[bytes]:
    from test_hostile import near_envelopes, near_requests, values

    headers = st.sampled_from([b"\x97", b"\x81\xa1v", b"\xdc\x01\x00", b"\xdd\xff\xff\xff\xff", b"\xde\x00\x20",
                               b"\xdf\x00\x01\x00\x00", b"\x91", b"\x80", b"\xc0", b"\x01"])
    return st.one_of(st.binary(max_size=300), st.builds(packed, values), near_envelopes, near_requests,
                     st.lists(headers, max_size=60).map(b"".join))


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(hostile_bytes())
@example(b"\x81\x81\xa0\x91\x81\xa0\x81\xa0\x80")  # over the item cap, then truncated: malformed
@example(b"\x94\x80\x80\x80\x80\x00")  # over the item cap, then a byte after the message: malformed
@example(b"\x81\x81\xa0\x00\x91\x81\xa0\x81\xa0\x80")  # over the cap before a map key a map
@pytest.mark.rpc  # pure Python, but hundreds of fuzzed examples: too long for the unit tier
def test_every_decoder_raises_only_typed_errors(data):
    for decoder in (codec.Decoder(), codec.Decoder(max_items=8), codec.Decoder(max_depth=3),
                    codec.Decoder(max_bytes=64)):
        try:
            decoder.decode_inbound(data)
        except errors.TooLarge:  # only what is over the byte cap, or whole (not truncated, nothing after it)
            assert len(data) > decoder.max_bytes or _whole(data)
        except errors.DecodeError:
            pass


def _whole(data: bytes) -> bool:
    """One complete msgpack object, nothing after it (what may be called too large; a
    message refused for its size is not built, so a bad map key further on goes unseen)."""
    walker = msgpack.Unpacker(max_buffer_size=len(data))
    walker.feed(data)
    try:
        walker.skip()
    except Exception:
        return False
    return walker.tell() == len(data)


# -- a server in a child process, for its RSS --------------------------------------------


def serve_child() -> None:
    """The child: one RpcServer serving `Target`, until its stdin closes."""
    from shared.logging import configure_logging

    spec = json.loads(sys.stdin.readline())
    configure_logging("warning", "console", service="attack-target")

    async def main() -> None:
        keys = CurveKeyPair(spec["public"].encode(), spec["secret"].encode())
        server = RpcServer(Dispatcher(Target()), curve=keys, members={spec["member"].encode(): "operator"},
                           max_message_bytes=spec["cap"])
        async with server:
            print(json.dumps({"endpoint": server.endpoint}), flush=True)
            await asyncio.to_thread(sys.stdin.read)  # EOF: the test is over

    asyncio.run(main())


def status_kb(pid: int, field: str) -> int:
    """A field of /proc/PID/status in kB, e.g. VmRSS (resident now) or VmHWM (its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class Child:
    def __init__(self, proc: subprocess.Popen[str], endpoint: str, key: bytes, mesh: MeshCredential) -> None:
        self.proc, self.endpoint, self.key, self.mesh = proc, endpoint, key, mesh

    @property
    def pid(self) -> int:
        return self.proc.pid


@pytest.fixture
def child(tmp_path: Path) -> Any:
    mesh = MeshCredential(MeshCredential.new_secret())
    keys = NodeIdentity.generate().curve
    with open(tmp_path / "child.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, text=True, cwd=ROOT)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps({"public": keys.public.decode(), "secret": keys.secret.decode(),
                                 "member": mesh.client.public.decode(), "cap": CAP}) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    assert line, (tmp_path / "child.log").read_text()
    yield Child(proc, json.loads(line)["endpoint"], keys.public, mesh)
    proc.stdin.close()
    proc.wait(10)


@pytest.fixture
async def context() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


async def open_connection(ctx: zmq.asyncio.Context, endpoint: str, server_key: bytes, keys: CurveKeyPair,
                          stack: AsyncExitStack, **options: Any) -> Connection:
    connection = Connection(endpoint, server_key, keys, context=ctx, **options)
    connection.open()
    stack.push_async_callback(connection.close)
    return connection


# -- (a) decode bombs ----------------------------------------------------------------------


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.mark.rpc
async def test_decode_bombs_cost_the_server_almost_nothing(child, context):
    async with AsyncExitStack() as stack:
        legit = await open_connection(context, child.endpoint, child.key, new_keys(), stack)
        for _ in range(50):  # warm up: imports, buffers, the first connections
            assert await legit.call("target.echo", {"value": "hello"}) == "hello"
        attacker = raw_dealer(context, child.endpoint, child.key, new_keys())
        stack.callback(attacker.close, 0)
        kinds = [kind for kind in BOMBS for _ in range(6)]  # 30 frames of ~1 MB
        frames = [bomb(kind, i) for i, kind in enumerate(kinds)]
        assert len(frames) == 30 and all(0.97 * CAP <= len(f) <= CAP for f in frames)
        await attacker.send(frames[0])  # the attacker's connection is up once it is answered
        assert (await answer(attacker))[3] == "TOO_LARGE"
        # 30 ordinary requests of the same size, at once: what libzmq holds while the
        # server catches up stays in the allocator, and is the baseline bombs are held to.
        ordinary = raw_dealer(context, child.endpoint, child.key, new_keys())
        stack.callback(ordinary.close, 0)
        for i in range(30):
            await ordinary.send(codec.encode_request(i, "target.sink", {"value": b"\x80" * (CAP - 64)}, 5000, "t"))
        assert sorted([(await answer(ordinary))[1:3] for _ in range(30)]) == [[codec.REPLY, i] for i in range(30)]

        # One at a time: the peak shows what decoding one costs (~70 MB each, before).
        rss = status_kb(child.pid, "VmRSS")
        reset_peak(child.pid)
        codes: dict[int, str] = {}
        for i, frame in enumerate(frames):
            await attacker.send(frame)
            reply = await answer(attacker)
            assert reply[1:3] == [codec.ERROR, i]
            codes[i] = reply[3]
        peak_kb = status_kb(child.pid, "VmHWM") - rss
        assert codes == {i: BOMBS[kind] for i, kind in enumerate(kinds)}

        # All at once, a legitimate caller served while they are refused.
        started = time.monotonic()
        for frame in frames:
            await attacker.send(frame)
        codes = {}
        while len(codes) < len(frames):
            reply = await answer(attacker)
            codes[reply[2]] = reply[3]
            assert await legit.call("target.echo", {"value": "still"}, timeout=5) == "still"
        elapsed = time.monotonic() - started
        assert codes == {i: BOMBS[kind] for i, kind in enumerate(kinds)}
        grown_kb = status_kb(child.pid, "VmRSS") - rss

    print(f"\nbombs one at a time: peak RSS +{peak_kb} kB; 30 at once in {elapsed:.2f}s: RSS +{grown_kb} kB")
    assert peak_kb < 6144, f"decoding one bomb at a time raised the peak RSS by {peak_kb} kB"
    assert grown_kb < 8192, f"RSS grew by {grown_kb} kB"  # each bomb decoded cost ~70 MB before


@pytest.mark.rpc
async def test_a_members_bombs_are_bounded_by_depth_and_structure(child, context):
    """Members get no item budget (a metrics batch holds ~150,000 items a MB);
    nesting and claimed lengths are checked for them too."""
    async with AsyncExitStack() as stack:
        member = raw_dealer(context, child.endpoint, child.key, child.mesh.client)
        stack.callback(member.close, 0)
        deep: Any = []
        for _ in range(40):
            deep = [deep]
        frames = {1: bomb("nested maps", 1), 2: bomb("claims", 2),
                  3: codec.encode_request(3, "target.echo", {"value": deep}, 5000, "t")}
        for frame in frames.values():
            await member.send(frame)
        codes = {}
        for _ in frames:
            reply = await answer(member)
            codes[reply[2]] = (reply[3], reply[4])
        assert codes[1] == ("DECODE_ERROR", "malformed msgpack: nested deeper than 1023")
        assert codes[2][0] == "DECODE_ERROR"
        assert codes[3] == ("DECODE_ERROR", "containers nested deeper than 32")
        legit = await open_connection(context, child.endpoint, child.key, child.mesh.client, stack)
        assert await legit.call("target.internal") == "members only"


# -- (b) frames over the cap -----------------------------------------------------------------


@pytest.mark.rpc
async def test_a_frame_over_the_cap_is_dropped_by_libzmq_unread(child, context):
    async with AsyncExitStack() as stack:
        legit = await open_connection(context, child.endpoint, child.key, new_keys(), stack)
        assert await legit.call("target.echo", {"value": "warm"}) == "warm"
        attacker = raw_dealer(context, child.endpoint, child.key, new_keys())
        stack.callback(attacker.close, 0)
        monitor = attacker.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        stack.callback(attacker.disable_monitor)

        async def next_event() -> int:
            return (await asyncio.wait_for(recv_monitor_message(monitor), 10))["event"]

        assert await next_event() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        # Exactly the cap passes (libzmq's limit is set for the encrypted frame).
        empty = len(codec.encode_request(1, "target.echo", {"value": ""}, 5000, "t"))
        exact = codec.encode_request(1, "target.echo", {"value": "x" * (CAP - empty - 4)}, 5000, "t")
        assert len(exact) == CAP  # (a str of this length has a 5-byte header, "" a 1-byte one)
        await attacker.send(exact)
        assert (await answer(attacker))[1:3] == [codec.REPLY, 1]

        rss = status_kb(child.pid, "VmRSS")
        await attacker.send(b"\x00" * (8 * CAP))  # 8 MB: libzmq reads its size, drops the connection
        assert await next_event() == zmq.EVENT_DISCONNECTED
        assert await legit.call("target.echo", {"value": "served"}) == "served"
        assert status_kb(child.pid, "VmRSS") - rss < 4096  # the 8 MB body was never buffered

        # One byte over the cap: dropped too; the socket reconnects and is served again.
        assert await next_event() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        over = exact[:-1] + b"\xc0\xc0"  # CAP + 1 bytes
        await attacker.send(over)
        assert await next_event() == zmq.EVENT_DISCONNECTED
        assert await next_event() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        await attacker.send(codec.encode_request(2, "target.echo", {"value": "back"}, 5000, "t"))
        assert (await answer(attacker))[1:4] == [codec.REPLY, 2, "back"]


# -- in-process servers for (c), (d), (e) -------------------------------------------------------


SMALL = Limits(peer_max_in_flight=8, public_max_in_flight=12, max_in_flight=16,
               public_max_timeout=0.5, stall_timeout=60.0)
STALL = Limits(stall_timeout=0.5)
# SMALL's caps, with public calls allowed long enough to stay held while a slow machine opens the rest.
HELD = Limits(peer_max_in_flight=8, public_max_in_flight=12, max_in_flight=16,
              public_max_timeout=60.0, stall_timeout=60.0)


@pytest.fixture
async def small(request) -> AsyncIterator[tuple[RpcServer, Target, bytes, MeshCredential]]:
    """A server with small limits: SMALL, or those the test parametrizes it with."""
    mesh = MeshCredential(MeshCredential.new_secret())
    node = NodeIdentity.generate()
    target = Target()
    async with RpcServer(Dispatcher(target), curve=node.curve, members=mesh.roster,
                         limits=getattr(request, "param", SMALL), drain_timeout=1.0) as server:
        yield server, target, node.curve.public, mesh


async def first_chunks(connection: Connection, count: int, n: int = 10_000) -> list[Any]:
    """Open `count` slow streams; each one's first chunk, or its error."""
    outcomes = []
    for _ in range(count):
        stream = await connection.stream("target.count", {"n": n, "delay": 0.02}, timeout=30)
        try:
            outcomes.append((stream, await anext(stream)))
        except errors.MeshError as exc:
            outcomes.append((stream, exc))
    return outcomes


# -- (c) requests in flight ------------------------------------------------------------------


@pytest.mark.rpc
@pytest.mark.parametrize("small", [HELD], indirect=True, ids=["public calls held 60s"])
async def test_one_key_is_held_to_its_cap_over_all_its_connections(small, context):
    server, _, key, mesh = small
    cap = HELD.peer_max_in_flight
    async with AsyncExitStack() as stack:
        greedy = new_keys()
        first = await open_connection(context, server.endpoint, key, greedy, stack)
        second = await open_connection(context, server.endpoint, key, greedy, stack)  # same key, new connection
        outcomes = await first_chunks(first, cap // 2) + await first_chunks(second, cap // 2 + 10)
        served = [o for _, o in outcomes if o == 0]
        refusals = [o for _, o in outcomes if isinstance(o, errors.MeshError)]
        assert len(served) == cap and len(refusals) == 10
        for refusal in refusals:
            assert isinstance(refusal, errors.RateLimited)
            assert refusal.data == {"retry_safe": True, "retry_after": 1, "limit": cap}
        assert server.in_flight == cap

        other = await open_connection(context, server.endpoint, key, new_keys(), stack)  # another caller
        assert await other.call("target.echo", {"value": "served"}) == "served"
        [(stream, chunk)] = await first_chunks(other, 1)
        assert chunk == 0
        await stream.aclose()

        for stream, _ in outcomes:
            await stream.aclose()
        await eventually(lambda: server.in_flight == 0)
        # Its slots back, the greedy key is served again.
        assert [o for _, o in await first_chunks(first, 1, n=2)] == [0]


@pytest.mark.rpc
@pytest.mark.parametrize("small", [HELD], indirect=True, ids=["public calls held 60s"])
async def test_public_callers_together_and_everyone_are_capped_typed(small, context):
    server, _, key, mesh = small
    async with AsyncExitStack() as stack:
        # Keys minted one after another: each under its own cap, together at the public cap.
        publics = [await open_connection(context, server.endpoint, key, new_keys(), stack) for _ in range(3)]
        held = []
        for connection in publics[:2]:
            held += await first_chunks(connection, 6)
        assert [o for _, o in held] == [0] * 12  # the public cap
        [(_, busy)] = await first_chunks(publics[2], 1)
        assert isinstance(busy, errors.Unavailable)
        assert busy.data == {"retry_safe": True, "retry_after": 1, "limit": HELD.public_max_in_flight}

        # Members are not crowded out by outsiders: up to the total cap.
        member = await open_connection(context, server.endpoint, key, mesh.client, stack)
        assert await member.call("target.internal") == "members only"
        mine = await first_chunks(member, 5)
        assert [o for _, o in mine[:4]] == [0] * 4
        total = mine[4][1]
        assert isinstance(total, errors.Unavailable)
        assert total.data == {"retry_safe": True, "retry_after": 1, "limit": HELD.max_in_flight}
        assert server.in_flight == HELD.max_in_flight
        assert await member.call("rpc.ping") is not None  # answered at once, no slot needed

        for stream, _ in held + mine:
            await stream.aclose()
        await eventually(lambda: server.in_flight == 0)


@pytest.mark.rpc
async def test_cancels_and_credits_for_unknown_ids_cost_nothing(small, context):
    server, _, key, _ = small
    async with AsyncExitStack() as stack:
        attacker = raw_dealer(context, server.endpoint, key, new_keys())
        stack.callback(attacker.close, 0)
        for request_id in range(1, 5001):
            await attacker.send(codec.encode_cancel(request_id))
            await attacker.send(codec.encode_credit(request_id, codec.MAX_WINDOW))
        await attacker.send(codec.encode_request(9, "target.echo", {"value": "after"}, 5000, "t"))
        assert (await answer(attacker))[1:4] == [codec.REPLY, 9, "after"]  # nothing else was answered
        assert server.in_flight == 0 and server.flow_controlled == 0 and server.public_peers == 0


# -- (d) deadlines -------------------------------------------------------------------------------


@pytest.mark.rpc
async def test_a_public_callers_one_day_deadline_is_capped(small, context):
    server, _, key, mesh = small
    async with AsyncExitStack() as stack:
        public = await open_connection(context, server.endpoint, key, new_keys(), stack)
        assert await public.call("target.remaining", timeout=86_400) <= SMALL.public_max_timeout
        started = time.monotonic()
        timeout = await refused(public.call("target.sleep", {"seconds": 60}, timeout=86_400), errors.Timeout)
        elapsed = time.monotonic() - started
        assert SMALL.public_max_timeout - 0.05 <= elapsed < SMALL.public_max_timeout + 1.0, elapsed
        assert "did not finish" in timeout.message  # the server's deadline, not the client's
        assert server.in_flight == 0
        # Members keep the deadline they ask for.
        member = await open_connection(context, server.endpoint, key, mesh.client, stack)
        assert await member.call("target.remaining", timeout=86_400) > 86_000
        assert await member.call("target.sleep", {"seconds": 0.8}, timeout=5) == "slept"


# -- (e) stalled readers ------------------------------------------------------------------------


@pytest.mark.parametrize("small", [STALL], indirect=True, ids=["stall 0.5s"])
@pytest.mark.rpc
async def test_a_stream_granted_no_credit_is_cut_and_its_slot_freed(small, context):
    server, target, key, _ = small
    async with AsyncExitStack() as stack:
        reader = raw_dealer(context, server.endpoint, key, new_keys())
        stack.callback(reader.close, 0)
        await reader.send(codec.encode_request(1, "target.count", {"n": 10**9}, 86_400_000, "t", window=4))
        chunks = [await answer(reader) for _ in range(4)]
        assert [c[1] for c in chunks] == [codec.CHUNK] * 4
        assert server.in_flight == 1
        started = time.monotonic()
        cut = await answer(reader, within=STALL.stall_timeout + 5)  # no credit sent
        assert cut[1:4] == [codec.ERROR, 1, "TIMEOUT"] and "no credit" in cut[4]
        assert STALL.stall_timeout - 0.1 <= time.monotonic() - started
        await eventually(lambda: server.in_flight == 0)
        assert target.generated == 5  # four sent, one waiting for credit

        legit = await open_connection(context, server.endpoint, key, new_keys(), stack)
        async with await legit.stream("target.count", {"n": 200}) as stream:
            assert [i async for i in stream] == list(range(200))  # credit flows: never stalled


@pytest.mark.parametrize("small", [STALL], indirect=True, ids=["stall 0.5s"])
@pytest.mark.parametrize("batches", [False, True], ids=["frame per chunk", "batched chunks"])
@pytest.mark.rpc
async def test_a_stream_whose_reader_reads_nothing_is_cut_and_its_slot_freed(small, context, batches):
    server, target, key, _ = small
    async with AsyncExitStack() as stack:
        options: dict[int, int | bytes] = {zmq.RCVHWM: 4, zmq.RCVBUF: 64 * 1024}
        if batches:  # the reader says it reads BATCH frames: up to 64 KiB of chunks a frame
            options[zmq.METADATA] = f"{codec.BATCH_FEATURE}:1".encode()
        reader = raw_dealer(context, server.endpoint, key, new_keys(), options)
        stack.callback(reader.close, 0)
        # No window: only the queues hold the server back, and nothing is read from them.
        await reader.send(codec.encode_request(1, "target.count", {"n": 10**9, "size": 16 * 1024},
                                               86_400_000, "t"))
        await eventually(lambda: server.in_flight == 1)
        await eventually(lambda: server.in_flight == 0, within=STALL.stall_timeout + 10)
        assert target.generated < 5_000  # stopped at the full queue, then cut


# -- (f) a real gateway process --------------------------------------------------------------------


@pytest.fixture
async def gateway_stack(pg_server, tmp_path, monkeypatch) -> AsyncIterator[Any]:
    """Auth, one worker and one gateway process whose public callers may have 3 requests in flight."""
    import gateway_support

    monkeypatch.setitem(gateway_support.GATEWAY_ENV, "INFERSWARM_RPC_PEER_MAX_IN_FLIGHT", "3")
    async with gateway_support.running_mesh(pg_server, tmp_path, workers=1, gateways=1) as running:
        yield running


@pytest.mark.stack
async def test_a_gateway_process_refuses_bombs_and_holds_a_key_to_its_cap(gateway_stack, context):
    from gateway_support import infer

    mesh = gateway_stack
    member = await mesh.gateway("g1")
    endpoint, key, pid = member.endpoint, member.server_key, mesh.children["g1"].proc.pid
    ada = await mesh.user("ada")
    async with AsyncExitStack() as stack:
        legit = await open_connection(context, endpoint, key, new_keys(), stack)  # a CLI: a public key
        assert (await infer(legit, ada.api_key, max_tokens=2))[-1]["done"]

        attacker = raw_dealer(context, endpoint, key, new_keys())
        stack.callback(attacker.close, 0)
        kinds = [kind for kind in BOMBS for _ in range(6)]
        rss = status_kb(pid, "VmRSS")
        reset_peak(pid)
        for i, kind in enumerate(kinds):
            await attacker.send(bomb(kind, i))
            reply = await answer(attacker)
            assert reply[1:4] == [codec.ERROR, i, BOMBS[kind]]
        peak_kb = status_kb(pid, "VmHWM") - rss
        assert peak_kb < 8192, f"the gateway's peak RSS grew by {peak_kb} kB"
        assert (await infer(legit, ada.api_key, max_tokens=2))[-1]["done"]

        # One key, two connections: 3 streams in flight (INFERSWARM_RPC_PEER_MAX_IN_FLIGHT), the rest refused.
        mesh.ollama.token_delay = 0.2
        greedy = new_keys()
        connections = [await open_connection(context, endpoint, key, greedy, stack) for _ in range(2)]
        outcomes = []
        for i in range(5):
            request = {"api_key": ada.api_key, "model": "m1", "max_tokens": 100,
                       "messages": [{"role": "user", "content": f"no cached answer {i}"}]}
            stream = await connections[i % 2].stream("gateway.infer", request, timeout=60)
            stack.push_async_callback(stream.aclose)
            try:
                outcomes.append(await anext(stream))
            except errors.MeshError as exc:
                outcomes.append(exc)
        assert [type(o) for o in outcomes] == [dict] * 3 + [errors.RateLimited] * 2, outcomes
        assert outcomes[3].data == {"retry_safe": True, "retry_after": 1, "limit": 3}
        mesh.ollama.token_delay = 0.0
        assert (await infer(legit, ada.api_key, max_tokens=2))[-1]["done"]  # another key: served


if __name__ == "__main__":
    serve_child()
