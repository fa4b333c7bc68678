"""The gateway's dispatch (services/gateway/dispatch.py): slots toward workers, by priority."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from shared.errors import Timeout, Unavailable
from services.gateway.dispatch import Dispatch
from services.gateway.fallback import BASE, CAP, backoff

pytestmark = pytest.mark.unit

LATER = 60.0


async def _queued(dispatch: Dispatch, count: int) -> None:
    for _ in range(200):
        if dispatch.waiting == count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{dispatch.waiting} waiting, not {count}")


async def test_a_free_slot_is_taken_without_waiting_and_given_back():
    dispatch = Dispatch(2, queue_limit=4)
    await dispatch.enter(0, time.monotonic() + LATER)
    await dispatch.enter(0, time.monotonic() + LATER)
    assert dispatch.in_flight == 2 and dispatch.waited == 0
    dispatch.leave()
    dispatch.leave()
    assert dispatch.in_flight == 0


async def test_when_full_the_highest_priority_goes_first_then_the_earliest():
    dispatch = Dispatch(1, queue_limit=10)
    await dispatch.enter(0, time.monotonic() + LATER)
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        await dispatch.enter(priority, time.monotonic() + LATER)
        order.append(name)

    tasks = []
    for name, priority in [("free-1", 0), ("pro-1", 5), ("free-2", 0), ("enterprise", 9), ("pro-2", 5)]:
        tasks.append(asyncio.create_task(wait(name, priority)))
        await _queued(dispatch, len(tasks))
    for _ in tasks:
        dispatch.leave()  # one slot at a time: each goes to the first waiter by priority
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["enterprise", "pro-1", "pro-2", "free-1", "free-2"]
    assert dispatch.in_flight == 1 and dispatch.waiting == 0


async def test_a_late_arrival_does_not_overtake_the_queue():
    dispatch = Dispatch(1, queue_limit=10)
    await dispatch.enter(0, time.monotonic() + LATER)
    first = asyncio.create_task(dispatch.enter(0, time.monotonic() + LATER))
    await _queued(dispatch, 1)
    dispatch.leave()  # handed to the waiter, not freed
    late = asyncio.create_task(dispatch.enter(0, time.monotonic() + LATER))
    await first
    await _queued(dispatch, 1)
    assert not late.done() and dispatch.in_flight == 1
    dispatch.leave()
    await late


async def test_waiting_past_the_deadline_is_a_typed_timeout_and_frees_its_place():
    dispatch = Dispatch(1, queue_limit=10)
    await dispatch.enter(0, time.monotonic() + LATER)
    with pytest.raises(Timeout) as raised:
        await dispatch.enter(5, time.monotonic() + 0.05)
    assert raised.value.data == {"retry_safe": True, "reason": "queue_timeout"}
    assert dispatch.waiting == 0
    dispatch.leave()
    assert dispatch.in_flight == 0  # nobody was handed the slot


async def test_a_full_queue_refuses_at_once_with_retry_after():
    dispatch = Dispatch(1, queue_limit=2)
    await dispatch.enter(0, time.monotonic() + LATER)
    waiters = [asyncio.create_task(dispatch.enter(0, time.monotonic() + LATER)) for _ in range(2)]
    await _queued(dispatch, 2)
    with pytest.raises(Unavailable) as raised:
        await dispatch.enter(9, time.monotonic() + LATER)
    assert raised.value.data == {"retry_safe": True, "retry_after": 1, "reason": "gateway_busy"}
    assert dispatch.refused == 1
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert dispatch.waiting == 0
    dispatch.leave()
    assert dispatch.in_flight == 0


async def test_a_waiter_cancelled_as_its_slot_came_passes_it_on():
    dispatch = Dispatch(1, queue_limit=10)
    await dispatch.enter(0, time.monotonic() + LATER)
    first = asyncio.create_task(dispatch.enter(5, time.monotonic() + LATER))
    second = asyncio.create_task(dispatch.enter(0, time.monotonic() + LATER))
    await _queued(dispatch, 2)
    dispatch.leave()  # handed to `first` ...
    first.cancel()  # ... which is cancelled before it runs
    [outcome] = await asyncio.gather(first, return_exceptions=True)
    if outcome is None:  # the slot won the race: `first` holds it, as its caller knows
        assert not second.done()
        dispatch.leave()
    else:  # the cancellation won: the slot went on to `second`, not lost
        assert isinstance(outcome, asyncio.CancelledError)
    await asyncio.wait_for(second, 5)
    assert dispatch.in_flight == 1 and dispatch.waiting == 0


def test_the_fallback_backoff_grows_with_jitter_up_to_its_cap():
    rng = random.Random(7)
    for step in range(1, 12):
        ceiling = min(CAP, BASE * 2 ** (step - 1))
        waits = [backoff(step, rng=rng) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1  # jittered
