"""Process metrics of every process and the gateway's operational figures:
the sampler on its own (plausible values, deltas, a platform without /proc,
its cost), the gateway's gauges over its real journal and dispatch, and a
real mesh (auth, a worker and a gateway as processes, the metrics service)
whose Prometheus exposition shows them and passes promtool."""

from __future__ import annotations

import asyncio
import gc
import shutil
import sys
import time
from contextlib import AsyncExitStack

import pytest

from shared.metrics import (
    BUILD_INFO,
    PROCESS_CPU,
    PROCESS_OPEN_FDS,
    PROCESS_RESIDENT_MEMORY,
    PROCESS_START_TIME,
    PYTHON_GC_COLLECTIONS,
    Batch,
    Metrics,
    ProcessSampler,
)
from shared.metrics.families import (
    GATEWAY_DISPATCH_IN_FLIGHT,
    GATEWAY_DISPATCH_WAITING,
    GATEWAY_STREAMS_CUT,
    GATEWAY_USAGE_UNSHIPPED,
    GATEWAY_WORKER_RETRIES,
)
from shared.runner import VERSION
from services.gateway.dispatch import Dispatch
from services.gateway.gauges import GatewayGauges
from services.gateway.recovery import usage_journal
from services.gateway.relay import Relay
from services.gateway.router import Router
from gateway_support import running_mesh
from metrics_support import Mesh, samples, scrape, value
from waiting import wait_until

INSTANCE = "0123456789ab"
LABELS = ("gateway", INSTANCE)
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def _cpu_work(seconds: float) -> None:
    start = time.process_time()
    while time.process_time() - start < seconds:
        sum(range(1000))


@pytest.mark.unit
def test_the_sampler_reports_plausible_figures_and_counter_deltas():
    metrics = Metrics()
    sampler = ProcessSampler(metrics, service="gateway", instance=INSTANCE)
    sampler.sample()
    first = metrics.drain()
    assert first.gauges[(PROCESS_RESIDENT_MEMORY.name, LABELS)] > 1 << 20
    assert first.gauges[(PROCESS_OPEN_FDS.name, LABELS)] >= 3
    started = first.gauges[(PROCESS_START_TIME.name, LABELS)]
    assert time.time() - 24 * 3600 < started <= time.time()
    assert first.gauges[(BUILD_INFO.name, (*LABELS, VERSION, PYTHON))] == 1
    assert first.counters[(PROCESS_CPU.name, LABELS)] > 0  # the first delta: everything since start
    assert first.counters[(PYTHON_GC_COLLECTIONS.name, (*LABELS, "0"))] > 0

    _cpu_work(0.02)
    gc.collect()  # a full collection counts in generation 2
    sampler.sample()
    second = metrics.drain()
    assert second.counters[(PROCESS_CPU.name, LABELS)] >= 0.015
    assert second.counters[(PYTHON_GC_COLLECTIONS.name, (*LABELS, "2"))] >= 1
    assert all(delta > 0 for delta in second.counters.values())  # zero deltas record nothing
    total = first.counters[(PROCESS_CPU.name, LABELS)] + second.counters[(PROCESS_CPU.name, LABELS)]
    assert total == pytest.approx(time.process_time(), abs=0.05)  # the deltas add up to the process's total


@pytest.mark.unit
def test_without_proc_the_sampler_leaves_out_what_it_cannot_know(tmp_path):
    metrics = Metrics()
    ProcessSampler(metrics, service="web", instance=INSTANCE, proc=tmp_path / "no-proc").sample()
    batch = metrics.drain()
    names = {name for name, _ in batch.gauges} | {name for name, _ in batch.counters}
    assert names == {BUILD_INFO.name, PROCESS_CPU.name, PYTHON_GC_COLLECTIONS.name}


@pytest.mark.unit
def test_a_sample_costs_well_under_a_millisecond():
    sampler = ProcessSampler(Metrics(), service="gateway", instance=INSTANCE)
    rounds = 500
    started = time.perf_counter()
    for _ in range(rounds):
        sampler.sample()
    each = (time.perf_counter() - started) / rounds
    print(f"process sample: {each * 1e6:.1f} µs")
    assert each < 1e-3


@pytest.mark.unit
async def test_the_gateway_gauges_follow_its_journal_dispatch_and_relay(tmp_path):
    journal = usage_journal(tmp_path / "journal")
    journal.open()
    dispatch = Dispatch(1, queue_limit=4)
    relay = Relay(None, Router(None))  # type: ignore[arg-type]  # neither touches the mesh until used
    metrics = Metrics()
    drained: list[Batch] = []

    def drain() -> Batch:
        drained.append(metrics.drain())
        return drained[-1]

    try:
        async with GatewayGauges(metrics, journal=journal, dispatch=dispatch, relay=relay, instance=INSTANCE,
                                 interval=0.01):
            for n in range(2):
                journal.append({"t": "D", "rec": {"n": n}})
            await dispatch.enter(0, time.monotonic() + 5)
            waiter = asyncio.create_task(dispatch.enter(0, time.monotonic() + 5))
            relay.retries += 3
            relay.cut += 1
            figures = await wait_until(
                lambda: (g := drain().gauges)[(GATEWAY_DISPATCH_WAITING.name, LABELS)] == 1 and g, 5)
            assert figures[(GATEWAY_USAGE_UNSHIPPED.name, LABELS)] == 2
            assert figures[(GATEWAY_DISPATCH_IN_FLIGHT.name, LABELS)] == 1
            dispatch.leave()
            await waiter
            dispatch.leave()
    finally:
        journal.close()
    last = drain().gauges  # sampled once more on exit
    assert last[(GATEWAY_DISPATCH_IN_FLIGHT.name, LABELS)] == last[(GATEWAY_DISPATCH_WAITING.name, LABELS)] == 0
    totals: dict = {}
    for batch in drained:
        for key, delta in batch.counters.items():
            totals[key] = totals.get(key, 0) + delta
    assert totals == {(GATEWAY_WORKER_RETRIES.name, LABELS): 3, (GATEWAY_STREAMS_CUT.name, LABELS): 1}


@pytest.mark.unit
def test_the_gateway_counts_are_pushed_as_deltas(tmp_path):
    relay = Relay(None, Router(None))  # type: ignore[arg-type]
    journal = usage_journal(tmp_path / "journal")
    metrics = Metrics()
    gauges = GatewayGauges(metrics, journal=journal, dispatch=Dispatch(1, queue_limit=1), relay=relay,
                           instance=INSTANCE)
    gauges.sample()
    assert metrics.drain().counters == {}
    relay.retries += 3
    relay.cut += 1
    gauges.sample()
    assert metrics.drain().counters == {(GATEWAY_WORKER_RETRIES.name, LABELS): 3,
                                        (GATEWAY_STREAMS_CUT.name, LABELS): 1}
    relay.retries += 2
    gauges.sample()
    gauges.sample()
    assert metrics.drain().counters == {(GATEWAY_WORKER_RETRIES.name, LABELS): 2}


@pytest.mark.stack
async def test_every_process_and_the_gateway_show_in_the_exposition(pg_server, tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's `prometheus` package"
    async with running_mesh(pg_server, tmp_path, workers=1, gateways=1) as net, AsyncExitStack() as stack:
        app = await Mesh(tmp_path, net.secret, net.client, stack).start_metrics()
        instances = {name: child.ready["id"][:12] for name, child in net.children.items()}
        processes = {("gateway", instances["g1"]), ("inference", instances["w1"])}

        def shown(text: str) -> bool:
            parsed = samples(text)
            for service, instance in processes:
                labels = dict(service=service, instance=instance)
                if not ((value(parsed, PROCESS_RESIDENT_MEMORY.name, **labels) or 0) > 0
                        and (value(parsed, PROCESS_OPEN_FDS.name, **labels) or 0) > 0
                        and (value(parsed, PROCESS_START_TIME.name, **labels) or 0) > 1e9
                        and (value(parsed, PROCESS_CPU.name, **labels) or 0) > 0
                        and (value(parsed, PYTHON_GC_COLLECTIONS.name, generation="0", **labels) or 0) > 0
                        and value(parsed, BUILD_INFO.name, version=VERSION, python=PYTHON, **labels) == 1):
                    return False
            gateway = dict(service="gateway", instance=instances["g1"])
            return all(value(parsed, fam.name, **gateway) == 0 for fam in (
                GATEWAY_USAGE_UNSHIPPED, GATEWAY_DISPATCH_WAITING, GATEWAY_DISPATCH_IN_FLIGHT))

        async def scraped() -> str | None:
            text = await scrape(app.http.url)
            return text if shown(text) else None

        text = await wait_until(scraped, 20, interval=0.2, message="the processes' figures never showed")
        own = [v for (name, labels), v in samples(text).items()  # the metrics service's own process
               if name == BUILD_INFO.name and ("service", "metrics") in labels]
        assert own == [1]
        checked = await asyncio.create_subprocess_exec(
            promtool, "check", "metrics", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(checked.communicate(text.encode()), 30)
        assert checked.returncode == 0 and not output.strip(), output.decode()
