"""No single point for metrics: two metrics services on one real mesh (real
`python -m services.metrics` processes, DHT, CurveZMQ, HTTP) show the same
totals; one is killed (SIGKILL) and the survivor still counts everything; a
new one started late reaches the survivor's totals for every process still
alive (those that died before it started never reached it: documented).
Two in-process services show that metrics processes push to each other too."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from shared.metrics import REQUEST_DURATION, REQUESTS, TOKENS, Metrics, MetricsReporter
from metrics_support import Child, Mesh, eventually, labels_of, mesh, samples, scrape

pytestmark = pytest.mark.rpc

REPORTER = "tests/metrics_reporter_proc.py"
Sample = tuple[str, frozenset[tuple[str, str]]]


def gateway_view(text: str) -> dict[Sample, float]:
    """The samples the reporter processes pushed: requests and request durations of `gateway`."""
    names = {REQUESTS.name, *(f"{REQUEST_DURATION.name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))}
    return {key: v for key, v in samples(text).items()
            if key[0] in names and ("service", "gateway") in key[1]}


def counted(view: dict[Sample, float], tag: str) -> tuple[float | None, float | None]:
    """(requests, duration observations) of the reporter tagged `tag`."""
    requests = view.get((REQUESTS.name, frozenset(labels_of(REQUESTS, tag).items())))
    durations = view.get((f"{REQUEST_DURATION.name}_count", frozenset(labels_of(REQUEST_DURATION, tag).items())))
    return requests, durations


def of(view: dict[Sample, float], *tags: str) -> dict[Sample, float]:
    """The samples of the reporters tagged `tags` only."""
    labels = {("method", f"gateway.{t}") for t in tags} | {("model", t) for t in tags}
    return {key: v for key, v in view.items() if labels & key[1]}


def metrics_service(net: Mesh, name: str) -> Child:
    return Child(["-m", "services.metrics"], net.env(
        name, INFERSWARM_METRICS_PORT="0", INFERSWARM_METRICS_REQUIRED="metrics",
        INFERSWARM_METRICS_PROBE_INTERVAL="0.5"))


async def views(*services: Child) -> list[dict[Sample, float]]:
    return [gateway_view(await scrape(s.ready["http"])) for s in services]


async def test_two_metrics_services_agree_and_one_survives_the_other(tmp_path):
    async with mesh(tmp_path) as net:
        first, second = metrics_service(net, "m1"), metrics_service(net, "m2")
        for child in (first, second):
            net.stack.push_async_callback(child.kill)  # whatever happens below
        await asyncio.gather(first.start(), second.start())
        async with Child([REPORTER, "5", "ra"], net.env("ra")) as ra, \
                Child([REPORTER, "7", "rb"], net.env("rb")):

            async def both_have_everything() -> bool:
                one, two = await views(first, second)
                return all(counted(v, "ra") == (5, 5) and counted(v, "rb") == (7, 7) for v in (one, two))

            await eventually(both_have_everything, timeout=15)
            one, two = await views(first, second)
            assert one == two  # every bucket, count and sum of the histogram too
            assert sum(v for (name, _), v in one.items() if name == REQUESTS.name) == 12

            # SIGKILL one metrics service; the reporters keep pushing to the other.
            assert first.proc is not None
            os.kill(first.proc.pid, signal.SIGKILL)
            await asyncio.wait_for(first.proc.wait(), 10)
            survivor: list[float] = []

            async def survivor_counts(tags: tuple[str, ...], expected: list[tuple[int, int]]) -> bool:
                (view,) = await views(second)
                survivor.append(sum(v for (name, _), v in view.items() if name == REQUESTS.name))
                return [counted(view, tag) for tag in tags] == expected

            async with Child([REPORTER, "4", "rc"], net.env("rc")) as rc:
                assert rc.ready["pushed"] >= 1  # acknowledged by every metrics service it found
                await eventually(lambda: survivor_counts(("ra", "rb", "rc"), [(5, 5), (7, 7), (4, 4)]),
                                 timeout=15)

                # A reporter dies; then a new metrics service starts: it lacks only the dead one.
                await ra.kill()
                third = metrics_service(net, "m3")
                async with third:

                    async def late_one_caught_up() -> bool:
                        two, three = await views(second, third)
                        return of(three, "rb", "rc") == of(two, "rb", "rc") and counted(three, "rc") == (4, 4)

                    await eventually(late_one_caught_up, timeout=15)
                    two, three = await views(second, third)
                    assert counted(two, "ra") == (5, 5)  # the survivor keeps the dead reporter's totals
                    assert counted(three, "ra") == (None, None)  # it died before the late one started
                    assert of(three, "rb", "rc") == of(two, "rb", "rc")
                    assert sum(v for (name, _), v in three.items() if name == REQUESTS.name) == 11
                    assert survivor == sorted(survivor) and survivor[-1] == 16  # never went backwards


async def test_metrics_services_report_their_own_figures_to_each_other_once(tmp_path):
    async with mesh(tmp_path) as net:
        one, two = await net.start_metrics("ma"), await net.start_metrics("mb")
        node = await net.node("inference")
        metrics = Metrics()
        async with MetricsReporter.for_node(node, metrics, service="inference", interval=0.1) as reporter:
            metrics.counter(TOKENS).inc(42, model="smollm2", direction="out")
            await eventually(lambda: reporter.destinations == 2, timeout=10)
            # each holds three sources: the reporter and both metrics processes (theirs pushed locally
            # to themselves, over the mesh to the other; their own record is skipped, not pushed twice)
            await eventually(lambda: one.aggregator.sources == two.aggregator.sources == 3, timeout=10)
            assert await reporter.flush()
        for app in (one, two):
            assert app.aggregator.counters(TOKENS.name) == {("smollm2", "out"): 42.0}
            assert app.aggregator.batches["duplicate"] == 0 and app.aggregator.batches["invalid"] == 0
        served = {sum(v for series, v in app.aggregator.counters(REQUESTS.name).items()
                      if "metrics.record" in series) for app in (one, two)}
        assert min(served) > 0  # the metrics processes' own figures: the pushes they served
