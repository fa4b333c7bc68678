"""Start a coroutine now, in its own task, instead of on the next loop turn.

A handler that answers from memory (a cached key check, a ping) then replies in
the same event-loop iteration that received its request -- one loop turn (about
20 µs of Python here) less per call. Python 3.12 does this natively
(`Task(eager_start=True)`); on 3.11 we create the task, make it the current
task while the coroutine runs its first synchronous step (so `asyncio.timeout`,
`TaskGroup` and `current_task()` behave exactly as inside the task), and let
the task carry on from where that step suspended. Must be called from a plain
callback (no task running), as the socket pump's receive callback is.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import types
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["start_eager"]


def start_eager(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], context: contextvars.Context
) -> asyncio.Task[None] | None:
    """Run `coro` until it first suspends; return its task, or None if it finished."""
    if sys.version_info >= (3, 12):
        task = asyncio.Task(coro, loop=loop, context=context, eager_start=True)  # type: ignore[call-arg]
        return None if task.done() else task
    step = _FirstStep()
    task = loop.create_task(_continue(coro, step), context=context)
    asyncio.tasks._enter_task(loop, task)
    try:
        step.yielded = context.run(coro.send, None)
    except StopIteration:
        step.finished = True
    except BaseException as exc:  # surfaces through the task, as an exception would
        step.error = exc
    finally:
        asyncio.tasks._leave_task(loop, task)
    return None if step.finished else task


class _FirstStep:
    """What the eager first step of a coroutine produced."""

    __slots__ = ("yielded", "finished", "error")

    def __init__(self) -> None:
        self.yielded: Any = None
        self.finished = False
        self.error: BaseException | None = None


@types.coroutine
def _continue(coro: Coroutine[Any, Any, None], step: _FirstStep) -> Generator[Any, Any, None]:
    """The task's body: resume `coro` after its eager first step, forwarding
    every value and exception between the task and the coroutine."""
    if step.finished:
        return
    if step.error is not None:
        raise step.error
    yielded = step.yielded
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # cancellation and the like go to the coroutine
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration:
                return
