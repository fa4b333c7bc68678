"""Wait for a condition instead of sleeping a fixed time before an assertion.

`await wait_until(lambda: server.in_flight == 0, 5.0)` returns as soon as the
predicate holds and fails with `message` if it still does not after `timeout`
seconds: fast on an idle machine, patient on a loaded one. The predicate may be
a plain function or a coroutine function; `wait_until_sync` is the twin for
tests without an event loop. Both return the predicate's last (truthy) value.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["wait_until", "wait_until_sync"]


async def wait_until(predicate: Callable[[], Any | Awaitable[Any]], timeout: float, *, interval: float = 0.01,
                     message: str = "the condition never held") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (waited {timeout:g} s)")
        await asyncio.sleep(interval)


def wait_until_sync(predicate: Callable[[], Any], timeout: float, *, interval: float = 0.01,
                    message: str = "the condition never held") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (waited {timeout:g} s)")
        time.sleep(interval)
