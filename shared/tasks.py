"""Background tasks a component owns: started with it, stopped with it.

    self._background = Background()
    self._background.start(self._run(), name="usage shipper")   # in __aenter__ / start
    await self._background.stop()                                # in __aexit__ / close

`stop` cancels every task still running and waits for them all, whatever
they raised (a loop's own errors are its to log), so nothing outlives its
owner; it may be called again, or before anything started.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["Background"]


class Background:
    """The tasks of one component (see the module doc)."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run `coro` in a task of its own, until it ends or `stop`."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    @property
    def running(self) -> bool:
        """True while some task has not ended."""
        return any(not task.done() for task in self._tasks)

    async def stop(self) -> None:
        """Cancel the tasks and wait for every one of them."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def halt(self) -> None:
        """Cancel the tasks without waiting: their owner stops dead, as `kill -9`
        would stop it (the fault tests' way to crash a component)."""
        for task in self._tasks:
            task.cancel()
