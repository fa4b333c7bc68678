"""A server's answers, sent once a loop turn: a client's messages of one turn in one frame.

Every ZeroMQ send costs the sender a syscall that wakes libzmq's I/O thread
(which then encrypts the message on its own), and the receiver one receive
and one decryption: on two busy cores, py-spy put a quarter of a gateway's
samples in `Socket.send`. A request through the gateway is three messages each
way (a chunk, the final chunk, the end), and at 64 in flight a loop turn
finishes many requests of the same client. So the server does not send an
answer when it is made: `put` queues it for its client and the queue goes at
the end of the turn (`call_soon`) -- one message as it is, several as one
`BATCH` frame (codec.py) when the client announced it reads batches in its
handshake (`codec.BATCH_FEATURE`), else one by one as before. Order per client
is kept, which is all the protocol needs (a request's chunks, then its end).

Back-pressure is unchanged in effect: when the client's queue in libzmq is
full (`EAGAIN`), the rest waits here and is retried every `retry_s` (one timer
for all such clients), and
`blocked` tells a stream to wait before making more. A client that is gone
(`EHOSTUNREACH`) is remembered, so its streams stop at their next chunk. A
queue that grows past `max_queued` messages within one turn (a stream whose
reader has no window) is sent at once, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

import zmq

from shared.rpc import codec

__all__ = ["Outbox", "next_frame", "reads_batches"]

#: Clients remembered as gone or as reading batches, at most; past it the memory
#: is cleared (it is a cache: a gone client's next send fails again and is remembered).
_MAX_REMEMBERED = 65_536


class Outbox:
    """Per-client queues of encoded messages, flushed at the end of each loop turn."""

    def __init__(
        self, send: Callable[[list[bytes]], None], max_bytes: int, *, retry_s: float = 0.002,
        max_queued: int = 256,
    ) -> None:
        """`send(frames)` sends `[ident, data]` now or raises `zmq.ZMQError` (`SocketPump.send`)."""
        self._send = send
        self._max = max_bytes
        self._retry_s = retry_s
        self._max_queued = max_queued
        self._queues: dict[bytes, list[bytes]] = {}
        self._blocked: set[bytes] = set()  #: clients whose libzmq queue was full at the last try
        self._gone: set[bytes] = set()
        self._batching: dict[bytes, bool] = {}  #: whether each client reads BATCH frames
        self._scheduled = False
        self._retry: asyncio.TimerHandle | None = None  #: the one pending retry of blocked clients
        self._loop: asyncio.AbstractEventLoop | None = None

    def knows(self, ident: bytes) -> bool:
        return ident in self._batching

    def learn(self, ident: bytes, batching: bool) -> None:
        """Whether the client at `ident` reads BATCH frames (from its handshake metadata)."""
        if len(self._batching) >= _MAX_REMEMBERED:
            self._batching.clear()
        self._batching[ident] = batching

    def gone(self, ident: bytes) -> bool:
        return ident in self._gone

    def blocked(self, ident: bytes) -> bool:
        return ident in self._blocked

    def put(self, ident: bytes, data: bytes) -> bool:
        """Queue `data` for the client; False when the client is gone (nothing queued)."""
        if ident in self._gone:
            return False
        queue = self._queues.get(ident)
        if queue is None:
            self._queues[ident] = queue = []
        queue.append(data)
        if len(queue) >= self._max_queued and ident not in self._blocked:
            self._flush_one(ident, queue)
        elif not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        """Send everything queued that the clients' queues take."""
        self._scheduled = False
        for ident, queue in list(self._queues.items()):
            if ident not in self._blocked:  # those wait for the retry (`_retry_blocked`)
                self._flush_one(ident, queue)

    def _retry_blocked(self) -> None:
        self._retry = None
        for ident in list(self._blocked):
            queue = self._queues.get(ident)
            if queue is None:
                self._blocked.discard(ident)
            else:
                self._flush_one(ident, queue)

    def _flush_one(self, ident: bytes, queue: list[bytes]) -> None:
        batching = self._batching.get(ident, False)
        while queue:
            count, frame = next_frame(queue, self._max) if batching else (1, queue[0])
            try:
                self._send([ident, frame])
            except zmq.ZMQError as exc:
                if exc.errno == errno.EHOSTUNREACH:  # the client disconnected
                    self._forget(ident)
                    if len(self._gone) >= _MAX_REMEMBERED:
                        self._gone.clear()
                    self._gone.add(ident)
                    return
                if exc.errno != zmq.EAGAIN:
                    raise
                self._blocked.add(ident)  # its queue in libzmq is full: try again shortly
                if self._retry is None:  # one timer for every blocked client
                    if self._loop is None:
                        self._loop = asyncio.get_running_loop()
                    self._retry = self._loop.call_later(self._retry_s, self._retry_blocked)
                return
            del queue[:count]
        self._blocked.discard(ident)
        del self._queues[ident]

    def _forget(self, ident: bytes) -> None:
        self._queues.pop(ident, None)
        self._blocked.discard(ident)
        self._batching.pop(ident, None)

    def close(self) -> None:
        """Send what the clients' queues take now, and drop the rest."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._blocked.clear()
        self.flush()
        self._queues.clear()
        self._blocked.clear()


def next_frame(queue: list[bytes], max_bytes: int) -> tuple[int, bytes]:
    """How many of the first messages of `queue` fit one frame, and that frame: the message
    itself when only one does, else a BATCH of them (at most `codec.MAX_BATCH` messages and
    `codec.MAX_BATCH_BYTES`, or `max_bytes` if smaller)."""
    if len(queue) == 1:
        return 1, queue[0]
    limit = min(max_bytes, codec.MAX_BATCH_BYTES)
    size, count = len(queue[0]), 1
    for data in queue[1:codec.MAX_BATCH]:
        if size + len(data) + codec.batch_overhead(count + 1) > limit:
            break
        size += len(data)
        count += 1
    return count, queue[0] if count == 1 else codec.encode_batch(queue[:count])


def reads_batches(frame: zmq.Frame) -> bool:
    """Whether the peer that sent `frame` announced in its handshake that it reads BATCH frames."""
    try:
        return frame.get(codec.BATCH_FEATURE) is not None
    except zmq.ZMQError:  # the property is absent: a peer older than batches
        return False
