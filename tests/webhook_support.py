"""A real HTTP receiver for webhook tests: a local aiohttp server that keeps what it was sent.

    async with Receiver(answers=[500, 500]) as receiver:   # then 200 for everything after
        ... receiver.url ...
        await receiver.wait_for(3)

    with receiver_thread() as receiver:                     # for tests without an event loop
        ... receiver.url ... receiver.hits ...

Each request is kept as it arrived (`Hit`: headers, raw body); `answers` are the
statuses of the first requests, in order, `status` that of the others.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web

from local_site import serve_locally

from waiting import wait_until

__all__ = ["Hit", "Receiver", "receiver_thread"]


@dataclass(frozen=True)
class Hit:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    def __init__(self, answers: list[int] | None = None, status: int = 200) -> None:
        self.answers = list(answers or [])
        self.status = status
        self.hits: list[Hit] = []
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits.append(Hit({k.lower(): v for k, v in request.headers.items()}, await request.read()))
        return web.Response(status=self.answers.pop(0) if self.answers else self.status, text="ok")

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner, port = await serve_locally(app, 0)
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._runner.cleanup()

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[Hit]:
        await wait_until(lambda: len(self.hits) >= count, timeout,
                         message=f"the receiver got {len(self.hits)} requests, not {count}")
        return self.hits

    @property
    def events(self) -> list[dict[str, Any]]:
        return [hit.event for hit in self.hits]


@contextmanager
def receiver_thread(**options: object) -> Iterator[Receiver]:
    """A `Receiver` served by an event loop of its own, in a thread, for the block."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    receiver = Receiver(**options)  # type: ignore[arg-type]
    asyncio.run_coroutine_threadsafe(receiver.__aenter__(), loop).result(10)
    try:
        yield receiver
    finally:
        asyncio.run_coroutine_threadsafe(receiver.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
