"""`ReplicaReader` (shared/replica.py) on its own: which server answers, the breaker, the warnings.

The two servers are real implementations of what the reader calls (`fetch`), answering or
failing as the test says; the clock is the test's. tests/test_replica.py runs the same reader
over a real streaming replica.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from shared.replica import ReplicaReader

pytestmark = pytest.mark.unit


class Server:
    """A pool's `fetch`: rows naming the server, or `error` raised."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.error: BaseException | None = None
        self.calls = 0

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return [(self.name, query, args)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def events(stream, level: str) -> list[dict]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [line for line in lines if line["level"] == level and line["logger"] == "shared.replica"]


def reader(**options: Any) -> tuple[ReplicaReader, Server, Server, Clock]:
    replica, primary, clock = Server("replica"), Server("primary"), Clock()
    return ReplicaReader(replica, primary, clock=clock, **options), replica, primary, clock  # type: ignore[arg-type]


async def test_the_replica_answers_while_it_can():
    read, replica, primary, _ = reader()
    assert await read.fetch("SELECT $1", 1) == [("replica", "SELECT $1", (1,))]
    assert (replica.calls, primary.calls, read.state, read.fallbacks) == (1, 0, "closed", 0)


@pytest.mark.parametrize("error", [
    ConnectionRefusedError(111, "refused"), FileNotFoundError(2, "no socket"), TimeoutError(),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.SerializationError("canceling statement due to conflict with recovery"),
    asyncpg.UndefinedTableError('relation "usage_daily_costs" does not exist'),
])
async def test_a_failing_replica_costs_the_read_nothing(error, log_stream):
    read, replica, primary, clock = reader(cooldown=5.0)
    replica.error = error
    assert await read.fetch("SELECT 1") == [("primary", "SELECT 1", ())]
    assert (read.state, read.fallbacks) == ("open", 1)
    # Resting: the next reads go straight to the primary, the replica is not even tried.
    assert (await read.fetch("SELECT 2"))[0][0] == "primary"
    assert (replica.calls, primary.calls) == (1, 2)
    [warning] = events(log_stream, "warning")
    assert warning["event"].startswith("read replica failing") and type(error).__name__ in warning["error"]
    # The cooldown over, one read probes it; it answers: back to the replica, said once.
    replica.error = None
    clock.now += 5.0
    assert (await read.fetch("SELECT 3"))[0][0] == "replica"
    assert read.state == "closed"
    assert [e["event"] for e in events(log_stream, "info")] == [
        "read replica answers again: lag-tolerant reads go to it"]


async def test_a_query_at_fault_reaches_the_caller():
    read, replica, primary, _ = reader()
    replica.error = asyncpg.PostgresSyntaxError('syntax error at or near "SELCT"')
    with pytest.raises(asyncpg.PostgresSyntaxError):
        await read.fetch("SELCT 1")
    assert (primary.calls, read.state) == (0, "closed")


async def test_one_warning_per_outage_at_most_once_a_minute(log_stream):
    read, replica, primary, clock = reader(cooldown=1.0, max_cooldown=4.0, warn_every=60.0)
    replica.error = OSError("down")
    await read.fetch("SELECT 1")
    for _ in range(6):  # failed probes: longer rests, no new warning
        clock.now += 5.0
        await read.fetch("SELECT 1")
    assert read.state == "open" and len(events(log_stream, "warning")) == 1
    replica.error = None
    clock.now += 5.0
    await read.fetch("SELECT 1")  # back
    replica.error = OSError("down again")
    clock.now += 1.0
    await read.fetch("SELECT 1")  # a flap within the minute: not warned again
    assert len(events(log_stream, "warning")) == 1
    replica.error = None
    clock.now += 5.0
    await read.fetch("SELECT 1")
    replica.error = OSError("down a third time")
    clock.now += 60.0
    await read.fetch("SELECT 1")  # a minute on: warned
    assert [w["error"] for w in events(log_stream, "warning")] == ["OSError: down", "OSError: down a third time"]
