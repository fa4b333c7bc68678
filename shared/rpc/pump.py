"""Drive a plain ZeroMQ socket from the asyncio loop, without per-message futures.

`zmq.asyncio` wraps every send and receive in a Future and re-polls socket
events through Python enums -- measured here as the largest cost of a call.
A `SocketPump` instead watches the socket's `ZMQ_FD` with `loop.add_reader`
and, when it fires, receives every message waiting (the FD is edge-triggered:
it only signals *changes*, so the queue must be drained to `EAGAIN`, and any
send -- which may consume the edge -- must be followed by a check of
`ZMQ_EVENTS`). Messages are handed to a callback, which runs outside any task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import zmq

__all__ = ["SocketPump"]


class SocketPump:
    """Receive from `sock` into `on_message(frames)`; send without blocking."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        on_message: Callable[[list[Any]], None],
        *,
        copy: bool = True,
        batch: int = 512,
    ) -> None:
        self.sock = sock
        self._on_message = on_message
        #: Receive copies (bytes; faster for small messages) or zero-copy frames,
        #: which carry the connection's metadata; may be changed at any time.
        self.copy = copy
        self._batch = batch  # yield to the loop after this many, so no peer starves others
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._draining = False
        self._scheduled = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = cast(int, self.sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._drain)
        self._schedule()  # messages may already be queued: the edge is gone

    def close(self) -> None:
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
        self._fd = None

    def send(self, frames: list[bytes]) -> None:
        """Send now or raise (`zmq.Again` when the peer's queue is full or absent)."""
        self.sock.send_multipart(frames, zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
        if not self._draining:
            self._check_after_send()

    def send_one(self, data: bytes) -> None:
        """Send a single-frame message (the DEALER side)."""
        self.sock.send(data, zmq.NOBLOCK, copy=len(data) < 65536)
        if not self._draining:
            self._check_after_send()

    def _check_after_send(self) -> None:
        if not self._scheduled and cast(int, self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._schedule()

    def _schedule(self) -> None:
        if self._loop is not None and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if self._fd is None:
            return
        self._draining = True
        recv = self.sock.recv_multipart
        try:
            for _ in range(self._batch):
                try:
                    frames = recv(zmq.NOBLOCK, copy=self.copy)
                except zmq.Again:
                    return
                self._on_message(frames)
            self._schedule()  # more may be waiting: continue on the next loop turn
        finally:
            self._draining = False
