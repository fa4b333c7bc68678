"""Gateway building blocks without a network: UTC windows, the usage journal
(replay after a crash, torn lines, the shipped mark, segment retention), the
shipper's batching and retries, the metrics' bounded labels, routing figures,
and the router's catalog within the caller's deadline (real workers' RPC servers
on loopback, one of them slow to answer)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import subprocess
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from shared.dht import Provider, service_topic
from shared.dht.memory import MemoryDiscovery, MemoryRegistry
from shared.errors import InvalidParams, Timeout, Unavailable
from shared.identity import CurveKeyPair, MeshCredential, NodeIdentity
from shared.rpc import Dispatcher, MeshClient, RpcServer, method
from services.gateway.router import Router
from services.gateway.journal import Journal
from services.gateway.quota.leases import window_of
from services.gateway.recovery import replay_journal, usage_journal
from services.gateway.counts import Counts
from services.gateway.shipper import UsageShipper


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.unit
def test_windows_are_utc_days_and_months_and_the_hour_rolls():
    hour = window_of("requests_per_hour", at("2026-03-31T23:59:59"))
    assert hour.start == datetime(1970, 1, 1, tzinfo=UTC)  # one key per subject: a GCRA, no calendar
    day = window_of("spend_per_day", at("2026-03-31T23:59:59"))
    assert (day.start, day.reset) == (datetime(2026, 3, 31, tzinfo=UTC), at("2026-04-01T00:00:00"))
    month = window_of("tokens_per_month", at("2026-12-15T08:00:00"))
    assert (month.start, month.end) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert window_of("requests_per_month", at("2026-02-01T00:00:00")).start == datetime(2026, 2, 1, tzinfo=UTC)


def record(request_id: str, **extra) -> dict:
    return {"request_id": request_id, "user_id": 1, "model": "m", "prompt_tokens": 1,
            "completion_tokens": 2, "status": "ok", **extra}


@pytest.mark.unit
def test_journal_replays_an_interrupted_run(tmp_path):
    journal = usage_journal(tmp_path)
    journal.open()
    assert replay_journal(journal).entries == 0
    journal.append({"t": "L", "l": 7})
    journal.append({"t": "A", "r": "r1", "p": [[7, 1]], "u": {"user_id": 1}})
    journal.append({"t": "D", "r": "r1", "p": [[7, 1]], "rec": record("r1")})
    journal.append({"t": "A", "r": "r2", "p": [[7, 1], [8, 300]], "u": {"user_id": 1}})
    journal.append({"t": "A", "r": "r3", "p": [[7, 1]], "u": {"user_id": 1}})
    journal.append({"t": "D", "r": "r3", "p": [[7, 0]], "rec": record("r3", status="unavailable")})
    journal.close()  # killed: r2 never finished, nothing was shipped
    with open(tmp_path / "00000001.jsonl", "ab") as f:
        f.write(b'{"t":"D","r":"r9","p":[[7,')  # a write cut in half

    again = usage_journal(tmp_path)
    again.open()
    replay = replay_journal(again, lambda entry: record(entry["r"], status="interrupted"))
    assert replay.torn == 1 and replay.leases == {7}
    assert replay.used == {7: 2, 8: 300}  # r1 and the cut r2 used lease 7; r3 gave its unit back
    assert [r["request_id"] for r in replay.interrupted] == ["r2"]
    pending = again.pending(10)
    assert [r["request_id"] for _, r in pending] == ["r1", "r3", "r2"]
    again.shipped(pending[1][0], 2)
    again.close()

    third = usage_journal(tmp_path)
    third.open()
    assert [r["request_id"] for _, r in third.pending(10)] == ["r2"]  # the mark survived
    with pytest.raises(RuntimeError, match="in use"):
        usage_journal(tmp_path).open()  # one process per journal
    third.close()


@pytest.mark.unit
def test_a_journal_is_a_log_of_json_entries_read_back_by_the_next_run(tmp_path):
    journal = Journal(tmp_path)  # nothing to ship
    journal.open()
    assert list(journal.earlier()) == []
    journal.append({"k": 1})
    journal.append({"t": "D", "rec": record("r1")})
    journal.close()
    with open(tmp_path / "00000001.jsonl", "ab") as f:
        f.write(b'[1, 2]\n{"k": ')  # not an object; a write cut in half
    again = Journal(tmp_path)
    again.open()
    again.append({"k": 3})  # this run's entries are not earlier ones
    assert list(again.earlier()) == [{"k": 1}, {"t": "D", "rec": record("r1")}]
    assert again.torn == 2 and again.pending(10) == [] and again.unshipped == 0
    again.close()


@pytest.mark.unit
def test_journal_segments_go_once_shipped_and_nothing_live_began_in_them(tmp_path):
    journal = usage_journal(tmp_path, segment_bytes=400)
    journal.open()
    journal.begin("lease-1")
    for i in range(12):
        journal.append({"t": "D", "r": f"r{i}", "p": [], "rec": record(f"r{i}")})
    segments = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert len(segments) > 3
    batch = journal.pending(100)
    assert len(batch) == 12
    journal.shipped(batch[-1][0], 12)
    assert len(list(tmp_path.glob("*.jsonl"))) == len(segments)  # lease-1 began in the first
    journal.end("lease-1")
    journal.append({"t": "D", "r": "r12", "p": [], "rec": record("r12")})
    journal.shipped(journal.pending(1)[0][0], 1)
    assert len(list(tmp_path.glob("*.jsonl"))) <= 2
    lines = [json.loads(line) for p in tmp_path.glob("*.jsonl") for line in p.read_text().splitlines()]
    assert all("prompt" not in entry.get("rec", {}) for entry in lines)
    journal.close()


@pytest.mark.unit
async def test_shipper_batches_retries_and_drops_only_invalid_records(tmp_path):
    journal = usage_journal(tmp_path)
    journal.open()
    for i in range(7):
        journal.append({"t": "D", "r": f"r{i}", "p": [], "rec": record(f"r{i}")})
    sent: list[list[str]] = []
    fail = {"times": 2}

    async def send(batch):
        if fail["times"]:
            fail["times"] -= 1
            raise Unavailable("auth is away")
        ids = [r["request_id"] for r in batch]
        if "r3" in ids:
            raise InvalidParams("batch[x].model: bad", {"index": ids.index("r3")})
        sent.append(ids)
        return {"inserted": len(batch), "duplicates": 0, "rejected": 0}

    shipper = UsageShipper(journal, send, interval=0.02, max_batch=3, max_backoff=0.05)
    async with shipper:
        for _ in range(100):
            if journal.pending(10) == []:
                break
            await asyncio.sleep(0.02)
    assert [i for batch in sent for i in batch] == ["r0", "r1", "r2", "r4", "r5", "r6"]
    assert all(len(batch) <= 3 for batch in sent)
    assert shipper.failures >= 1 and shipper.rejected == 1
    journal.close()


@pytest.mark.unit
async def test_shipper_sends_one_batch_an_interval_under_load(tmp_path):
    """Records arriving all the time go in one batch an interval, not in back-to-back
    batches as small as a round trip lets them be (each is a transaction at auth)."""
    journal = usage_journal(tmp_path)
    journal.open()
    sent: list[int] = []

    async def send(batch):
        await asyncio.sleep(0.005)  # auth's round trip
        sent.append(len(batch))
        return {"inserted": len(batch), "duplicates": 0, "rejected": 0}

    async with UsageShipper(journal, send, interval=0.1, max_batch=500):
        began = time.monotonic()
        for i in range(250):  # about 0.5 s of a steady load
            journal.append({"t": "D", "r": f"r{i}", "p": [], "rec": record(f"r{i}")})
            await asyncio.sleep(0.002)
        elapsed = time.monotonic() - began
        for _ in range(100):
            if not journal.pending(1):
                break
            await asyncio.sleep(0.02)
    assert sum(sent) == 250
    assert len(sent) <= elapsed / 0.1 + 3, sent
    journal.close()


@pytest.mark.unit
async def test_shipper_sends_full_batches_back_to_back(tmp_path):
    """A backlog does not wait an interval between full batches."""
    journal = usage_journal(tmp_path)
    journal.open()
    sent: list[int] = []

    async def send(batch):
        sent.append(len(batch))
        return {"inserted": len(batch), "duplicates": 0, "rejected": 0}

    async with UsageShipper(journal, send, interval=30.0, max_batch=500) as shipper:
        for i in range(1200):
            journal.append({"t": "D", "r": f"r{i}", "p": [], "rec": record(f"r{i}")})
        shipper.poke()
        for _ in range(100):
            if sum(sent) == 1200:
                break
            await asyncio.sleep(0.02)
        assert sent == [500, 500, 200]  # before the stop's own flush
    journal.close()


@pytest.mark.unit
def test_counts_keep_outcomes_bounded():
    counts = Counts()
    for status in [f"s{i}" for i in range(40)] + ["ok", "ok"]:
        counts.ended(status)
    assert len(counts.outcomes) <= 33 and counts.outcomes["other"] >= 8
    assert sum(counts.outcomes.values()) == 42


_CLOSE_MANY = """
import asyncio, zmq.asyncio
from nacl.public import PrivateKey
from shared.identity import CurveKeyPair
from shared.rpc import Connection

async def main():
    ctx = zmq.asyncio.Context()
    keys, server = (CurveKeyPair.from_private(PrivateKey.generate()) for _ in range(2))
    for i in range(300):
        connection = Connection("tcp://127.0.0.1:1", server.public, keys, context=ctx)
        connection.open()
        await asyncio.sleep(0.01 * (i % 2))
        await connection.close()
    print("closed")

asyncio.run(main())
"""


@pytest.mark.rpc
def test_closing_a_connection_never_blocks_the_loop():
    """The gateway closes connections to failed workers (cooldown): closing must not
    block. Stopping the socket monitor after its reader had closed used to hang."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _CLOSE_MANY], cwd=root, capture_output=True, text=True,
                          timeout=20)
    assert done.stdout.strip() == "closed", done.stderr[-2000:]


# -- routing -------------------------------------------------------------------------


def _worker(n: int, **load: object) -> Provider:
    return Provider(topic="t", service="inference", endpoint=f"tcp://127.0.0.1:{n}", node_key=bytes([n]) * 32,
                    curve_key=b"", version="0", seq=0, ttl=30.0,
                    load={"free_slots": 2, "slots": 2, "queued": 0, "queue_limit": 4, "healthy": True, **load})


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _router(clock: _Clock) -> Router:
    discovery = MemoryDiscovery(MemoryRegistry(), NodeIdentity.generate())
    return Router(MeshClient(discovery, CurveKeyPair.from_private(PrivateKey.generate())), default_latency=1.0,
                  forget=2.0, clock=clock)


def _shares(router: Router, a: Provider, b: Provider) -> Counter:
    return Counter(router.choose("m", [a, b], set()).endpoint for _ in range(300))


@pytest.mark.unit
async def test_a_worker_not_measured_yet_is_tried_like_the_fastest_known_one():
    router = _router(_Clock())
    known, slow, joined = _worker(1), _worker(2), _worker(3)
    router.first_token(known, 0.002)
    router.first_token(slow, 0.2)
    assert router.expected_wait(joined) == router.expected_wait(known) < router.expected_wait(slow)
    assert _shares(router, known, joined)[joined.endpoint] > 60  # a tie is drawn at random: it takes its share
    # Its own figure replaces the guess once it has answered.
    router.first_token(joined, 0.5)
    assert router.expected_wait(joined) == 0.5
    # Backlog beyond the free slots raises the expected wait.
    busy = _worker(4, free_slots=0, queued=2)
    router.first_token(busy, 0.002)
    assert router.expected_wait(busy) == pytest.approx(2 * 0.002)


@pytest.mark.unit
async def test_an_old_slow_figure_fades_so_the_worker_is_tried_again():
    clock = _Clock()
    router = _router(clock)
    fast, unlucky = _worker(1), _worker(2)
    router.first_token(fast, 0.002)
    router.first_token(unlucky, 0.05)  # one slow answer
    assert _shares(router, fast, unlucky)[unlucky.endpoint] == 0  # the better of two wins every draw
    clock.now += 2.0  # one time constant: 0.002 + 0.048 / e
    assert router.expected_wait(unlucky) == pytest.approx(0.002 + 0.048 / math.e)
    clock.now += 10.0  # faded to within 10% of the fast one: a tie again
    assert _shares(router, fast, unlucky)[unlucky.endpoint] > 60
    # Unrefreshed for a minute, a figure is dropped: the worker counts as unmeasured.
    router.first_token(fast, 0.002)
    clock.now += 61.0
    router.first_token(fast, 0.002)
    assert router.expected_wait(unlucky) == router.expected_wait(fast)
    assert router.measured(unlucky) is None


@pytest.mark.unit
async def test_a_restarted_worker_is_measured_afresh_not_by_its_previous_life():
    router = _router(_Clock())
    survivor, before = _worker(1), _worker(2)
    router.first_token(survivor, 0.002)
    router.first_token(before, 0.2)  # its last figure before kill -9
    # Same node key, new endpoint: the restarted process. With the old figure
    # it would lose every draw against the survivor and never be measured again.
    after = dataclasses.replace(before, endpoint="tcp://127.0.0.1:99")
    assert router.expected_wait(after) == router.expected_wait(survivor)
    picks = Counter(router.choose("m", [survivor, after], set()).endpoint for _ in range(200))
    assert picks[after.endpoint] > 40


# -- the catalog, within the caller's deadline ---------------------------------------------


class _Lister:
    """The `inference.models` of a worker that takes `delay` seconds to answer."""

    name = "inference"

    def __init__(self, model: str, delay: float) -> None:
        self.model, self.delay = model, delay

    @method(idempotent=True)
    async def models(self) -> dict:
        await asyncio.sleep(self.delay)  # the worker's own slowness, not the test's wait
        return {"models": [{"name": self.model, "healthy": True}]}


@pytest.mark.rpc
async def test_the_catalog_takes_the_callers_time_and_keeps_only_a_full_answer():
    """A worker answering in 0.4 s is missed by a caller with 0.2 s left, and that partial
    catalog is not kept for the next caller, who has the time and sees both workers."""
    async with AsyncExitStack() as stack:
        credential = MeshCredential(MeshCredential.new_secret())
        registry = MemoryRegistry()
        for model, delay in (("quick", 0.0), ("slow", 0.4)):
            node = NodeIdentity.generate()
            server = await stack.enter_async_context(RpcServer(
                Dispatcher(_Lister(model, delay)), curve=node.curve, members=credential.roster))
            await MemoryDiscovery(registry, node).announce(service_topic("inference"), service="inference",
                                                           endpoint=server.endpoint, version="test")
        mesh = await stack.enter_async_context(
            MeshClient(MemoryDiscovery(registry, NodeIdentity.generate()), credential.client))
        router = Router(mesh, catalog_timeout=1.0)

        started = time.monotonic()
        hurried = await router.catalog(deadline=started + 0.2)
        assert sorted(hurried) == ["quick"] and time.monotonic() - started < 0.5
        patient = await router.catalog(deadline=time.monotonic() + 30)
        assert sorted(patient) == ["quick", "slow"]  # not the hurried caller's catalog
        assert await router.catalog(deadline=time.monotonic() + 0.05) == patient  # a full one is kept
        with pytest.raises(Timeout):
            await router.catalog(deadline=time.monotonic())
        with pytest.raises(Timeout):  # a model not looked up yet, no time left to look
            await router.workers("quick", deadline=time.monotonic())


@pytest.mark.unit
def test_routing_settings_name_the_models_to_try_in_order():
    from shared.errors import NotFound
    from services.gateway.routing_settings import RoutingSettings

    settings = RoutingSettings(None)  # type: ignore[arg-type]  # not polled here: the table as auth gives it
    with pytest.raises(NotFound) as nothing:
        settings.candidates("default")
    assert nothing.value.data["param"] == "model"
    assert settings.candidates("m1") == ["m1"]
    settings._apply({"default_model": "big", "fallback_models": ["small", "big"], "cache_ttl": 0})
    assert settings.candidates("default") == ["big", "small"] and settings.candidates("m1") == ["m1", "small", "big"]
    assert settings.cache_ttl == 0
    assert settings.first_token_timeout is None and settings.aliases == {}
    settings._apply({"default_model": "big", "fallback_models": ["small"], "cache_ttl": None,
                     "aliases": {"fast": ["tiny", "small"], "empty": []}, "first_token_timeout": 2.5})
    assert settings.candidates("fast") == ["tiny", "small"]  # an alias's own chain, without the global fallbacks
    assert settings.candidates("fast", fallback=False) == ["tiny"]
    assert settings.candidates("default", fallback=False) == ["big"]
    assert settings.candidates("empty") == ["empty", "small"]  # an empty chain is no alias
    assert settings.first_token_timeout == 2.5


@pytest.mark.unit
async def test_a_model_failure_cools_that_model_of_the_worker_and_an_unreachable_worker_cools_all():
    from dataclasses import replace

    from shared.errors import Unavailable, from_wire

    assert from_wire("UNAVAILABLE", "backend down", {}).remote and not Unavailable("unreachable").remote
    clock = _Clock()
    router = _router(clock)
    worker = _worker(1)
    primary, fallback = replace(worker, topic="inferswarm/model/primary"), replace(worker, topic="inferswarm/model/fb")
    router.started(primary)
    router.finished(primary, failed=True, answered=True)  # the worker said: this model failed
    assert not router.can_take([primary]) and router.can_take([fallback])  # its other models still serve
    clock.now += 5.0
    assert router.can_take([primary])  # cooled
    router.started(primary)
    router.finished(primary, failed=True)  # not reached: the whole worker waits
    assert not router.can_take([primary]) and not router.can_take([fallback])
