"""A request cancelled before its task first ran (shared/rpc/eager.py).

The server runs a handler's first step at once, in the loop turn that received the
request, and lets a task carry it on. A CANCEL handled in that same turn (the two in
one frame, or read in one drain of the socket) cancels the task before it first ran.
On Python 3.11 that cancellation used to end the task without telling the handler:
its `finally` never ran, and whatever it held stayed held -- under wrk's load with
cancelled requests, a worker's 100 HTTP connections to its upstream and a gateway's
admissions, until every request hung (found by bench/peer_litellm.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from nacl.public import PrivateKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.identity import CurveKeyPair, MeshCredential, NodeIdentity  # noqa: E402
from shared.rpc import Connection, Dispatcher, RpcServer, codec, method  # noqa: E402
from shared.rpc.eager import start_eager  # noqa: E402


class Holder:
    """Handlers that hold something until they end, and say when they let it go."""

    name = "hold"

    def __init__(self) -> None:
        self.held = 0
        self.released = 0
        self.gate = asyncio.Event()

    @method(public=True)
    async def stream(self):
        self.held += 1
        try:
            yield "first"
            await self.gate.wait()
            yield "never"
        finally:
            self.released += 1

    @method(public=True)
    async def call(self) -> str:
        self.held += 1
        try:
            await self.gate.wait()
            return "never"
        finally:
            self.released += 1


@pytest.mark.unit
def test_a_task_cancelled_before_it_ran_cancels_the_coroutine_where_it_stands():
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        waited: asyncio.Future[None] = loop.create_future()

        async def handler() -> None:
            try:
                log.append("first step")
                await waited
                log.append("resumed")
            except asyncio.CancelledError:
                log.append("cancelled")
                raise
            finally:
                log.append("finally")

        tasks: list[asyncio.Task[None]] = []

        def receive() -> None:  # a plain callback, as the socket pump's
            task = start_eager(loop, handler(), contextvars.copy_context())
            assert task is not None
            task.cancel()  # before the task's first step
            tasks.append(task)

        loop.call_soon(receive)
        while not tasks or not tasks[0].done():
            await asyncio.sleep(0)
        assert tasks[0].cancelled() and waited.cancelled()
        return log

    assert asyncio.run(main()) == ["first step", "cancelled", "finally"]


@pytest.mark.unit
def test_an_eager_task_still_returns_raises_and_resumes():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        results: list[Any] = []

        async def quick() -> None:
            results.append("quick")

        async def slow() -> None:
            await asyncio.sleep(0)
            results.append("slow")

        async def failing() -> None:
            await asyncio.sleep(0)
            raise ValueError("boom")

        def receive() -> None:
            assert start_eager(loop, quick(), contextvars.copy_context()) is None  # done in its first step
            results.append(start_eager(loop, slow(), contextvars.copy_context()))
            results.append(start_eager(loop, failing(), contextvars.copy_context()))

        loop.call_soon(receive)
        await asyncio.sleep(0.01)
        assert results[0] == "quick" and results[-1] == "slow"
        with pytest.raises(ValueError, match="boom"):
            results[2].result()

    asyncio.run(main())


@pytest.fixture
async def served() -> AsyncIterator[tuple[RpcServer, Holder, bytes, MeshCredential]]:
    mesh = MeshCredential(MeshCredential.new_secret())
    node = NodeIdentity.generate()
    holder = Holder()
    async with RpcServer(Dispatcher(holder), curve=node.curve, members=mesh.roster, drain_timeout=1.0) as server:
        yield server, holder, node.curve.public, mesh


async def until(check, within: float = 5.0) -> None:
    try:
        async with asyncio.timeout(within):
            while not check():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError("condition not reached in time") from None


@pytest.mark.rpc
@pytest.mark.parametrize("name", ["hold.stream", "hold.call"])
async def test_a_request_and_its_cancel_in_one_frame_release_what_the_handler_held(served, name):
    server, holder, key, _ = served
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    own = CurveKeyPair.from_private(PrivateKey.generate())
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = key, own.public, own.secret
    sock.linger = 0
    sock.connect(server.endpoint)
    try:
        for round_ in range(3):  # within a public key's cap on requests in flight (32)
            for request_id in range(round_ * 20 + 1, round_ * 20 + 21):
                # The request, then its cancel, handled in one loop turn.
                await sock.send(codec.encode_batch([codec.encode_request(request_id, name, {}, 30_000, "t"),
                                                    codec.encode_cancel(request_id)]))
            await until(lambda: holder.held == (round_ + 1) * 20)
            await until(lambda: holder.released == holder.held and server.in_flight == 0)
    finally:
        sock.close(0)
        ctx.destroy(linger=0)


@pytest.mark.rpc
async def test_streams_left_at_once_by_a_real_connection_free_the_server(served):
    server, holder, key, mesh = served
    ctx = zmq.asyncio.Context()
    connection = Connection(server.endpoint, key, mesh.client, context=ctx)  # a member: no per-key cap
    connection.open()
    try:
        for _ in range(20):  # opened and left in the same turn: the CANCEL follows the request
            streams = [await connection.stream("hold.stream") for _ in range(10)]
            for stream in streams:
                await stream.aclose()
        await until(lambda: holder.held == 200)
        await until(lambda: holder.released == 200 and server.in_flight == 0)
    finally:
        await connection.close()
        ctx.destroy(linger=0)
