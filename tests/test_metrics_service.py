"""The metrics service on a real mesh (DHT nodes, CurveZMQ RPC, HTTP): pushed
counters add up across processes and restarts, exactly once; the exposition
parses and passes promtool; a flood of label values stays within the cap.
Several metrics services at once: tests/test_metrics_replicas.py."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics.http import MetricsHttp
from services.metrics.served import MAX_KEYS, ModelState, parse_models, tally
from shared.errors import InvalidParams
from shared.metrics.families import METRICS_BATCHES
from shared.metrics import (
    CACHE_HITS,
    CACHE_MISSES,
    DHT_PEERS,
    FAMILIES,
    OTHER,
    RATE_LIMIT_VIOLATIONS,
    REQUEST_DURATION,
    REQUESTS,
    RPC_ERRORS,
    SERIES_CAP,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    Batch,
    Metrics,
    MetricsReporter,
    Source,
    instance_id,
)
from metrics_support import Child, eventually, mesh, samples, scrape, value

pytestmark = pytest.mark.rpc

INFER = dict(service="gateway", method="gateway.infer", code="OK")
SERIES = tuple(INFER[name] for name in REQUESTS.label_names)


def requests_total(text: str) -> float:
    return value(samples(text), "inferswarm_requests_total", **INFER) or 0.0


async def test_counters_from_two_processes_add_up_and_survive_a_restart(tmp_path):
    async with mesh(tmp_path) as net:
        app = await net.start_metrics()
        url = app.http.url
        seen: list[float] = []

        async def watch() -> None:  # every scrape during the test, to check monotonicity
            for _ in range(600):
                seen.append(requests_total(await scrape(url)))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        script = "tests/metrics_reporter_proc.py"
        first, second = Child([script, "5"], net.env("a")), Child([script, "7"], net.env("b"))
        async with first, second:
            assert first.ready["pushed"] >= 1 and second.ready["pushed"] >= 1
            await eventually(lambda: requests_total(app.exposition.render().decode()) == 12, timeout=5)
            await first.kill()  # a crash, right after its batch was acknowledged
            async with Child([script, "4"], net.env("a")) as again:  # same node, new process
                assert again.ready["instance"] == first.ready["instance"]
                await eventually(lambda: requests_total(app.exposition.render().decode()) == 16, timeout=5)
                parsed = samples(await scrape(url))
                for child in (second, again):
                    peers = value(parsed, "inferswarm_dht_peers", service="gateway",
                                  instance=child.ready["instance"])
                    assert peers is not None and peers >= 1
                assert value(parsed, "inferswarm_metrics_sources") >= 2
        watcher.cancel()
        seen.append(requests_total(await scrape(url)))  # the reporters are gone: nothing is lost
        assert seen and seen == sorted(seen), "a counter went backwards"
        assert max(seen) == 16


async def test_a_resent_push_counts_once_and_an_invalid_one_not_at_all(tmp_path):
    async with mesh(tmp_path) as net:
        app = await net.start_metrics()
        client = net.seed.mesh("metrics")
        source = Source("gateway", "0123456789ab", "run-1")

        async def record(seq: int, total: float, full: bool = True) -> dict:
            batch = Batch(counters={(REQUESTS.name, SERIES): total}, full=full)
            return await client.call("metrics.record", {"batch": batch.to_wire(source, seq)})

        assert await record(1, 3, full=False) == {"result": "unknown", "seq": 1}  # partial, never heard of
        assert await record(1, 3) == {"result": "ok", "seq": 1}
        assert await record(1, 3) == {"result": "duplicate", "seq": 1}  # an answer lost, the push resent
        assert await record(3, 6, full=False) == {"result": "ok", "seq": 3}  # cumulative: 6 in all
        assert await record(2, 5, full=False) == {"result": "duplicate", "seq": 2}  # arrived late: ignored
        bad = Batch(counters={(REQUESTS.name, SERIES): 9.0}).to_wire(source, 4)
        bad["counters"][0][2] = -5
        with pytest.raises(InvalidParams):
            await client.call("metrics.record", {"batch": bad})
        parsed = samples(app.exposition.render().decode())
        assert value(parsed, REQUESTS.name, **INFER) == 6
        assert value(parsed, METRICS_BATCHES.name, result="duplicate") == 2
        assert value(parsed, METRICS_BATCHES.name, result="unknown") == 1
        assert value(parsed, METRICS_BATCHES.name, result="invalid") == 1


async def test_reporter_never_blocks_and_delivers_everything_after_an_outage(tmp_path):
    async with mesh(tmp_path) as net:
        node = await net.node("gateway")
        metrics = Metrics()
        async with MetricsReporter.for_node(node, metrics, service="gateway", interval=0.1, timeout=0.5) as reporter:
            requests = metrics.counter(REQUESTS)
            started = time.perf_counter()
            for _ in range(1000):
                requests.inc(**INFER)
            assert time.perf_counter() - started < 0.5
            assert not await reporter.flush()  # nobody to push to yet: the registry keeps the totals
            for _ in range(500):
                requests.inc(**INFER)
            assert reporter.destinations == 0
            app = await net.start_metrics()
            await eventually(lambda: requests_total(app.exposition.render().decode()) == 1500, timeout=8)
            assert reporter.dropped == 0 and reporter.destinations == 1


async def test_exposition_parses_and_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's `prometheus` package"
    async with mesh(tmp_path) as net:
        app = await net.start_metrics()
        node = await net.node("inference")
        metrics = Metrics()
        await eventually(lambda: app.health.report()["services"]["metrics"]["ok"] == 1, timeout=5)
        async with MetricsReporter.for_node(node, metrics, service="inference", interval=0.1) as reporter:
            metrics.counter(REQUESTS).inc(**INFER)
            metrics.counter(REQUESTS).inc(service="gateway", method="gateway.infer", code="RATE_LIMITED")
            metrics.histogram(REQUEST_DURATION).observe(0.42, service="inference", method="inference.generate")
            metrics.histogram(TIME_TO_FIRST_TOKEN).observe(0.05, model="smollm2-135m")
            metrics.counter(RATE_LIMIT_VIOLATIONS).inc(tier="free")
            metrics.counter(TOKENS).inc(12, model="smollm2-135m", direction="in")
            metrics.counter(TOKENS).inc(30, model="smollm2-135m", direction="out")
            metrics.counter(CACHE_HITS).inc(model="smollm2-135m")
            metrics.counter(CACHE_MISSES).inc(model="smollm2-135m")
            metrics.counter(RPC_ERRORS).inc(service="inference", code="TIMEOUT")
            assert await reporter.flush()
        text = await scrape(app.http.url)
        kinds = {fam.name: fam.type for fam in text_string_to_metric_families(text)}
        for fam in FAMILIES.values():  # prometheus-client names counters without `_total`
            assert kinds[fam.name.removesuffix("_total")] == str(fam.kind), fam.name
        parsed = samples(text)
        duration = dict(service="inference", method="inference.generate")
        assert value(parsed, "inferswarm_request_duration_seconds_count", **duration) == 1
        assert value(parsed, "inferswarm_request_duration_seconds_bucket", le="0.5", **duration) == 1
        assert value(parsed, "inferswarm_request_duration_seconds_bucket", le="0.25", **duration) == 0
        assert value(parsed, "inferswarm_tokens_total", model="smollm2-135m", direction="out") == 30
        (itself,) = app.health.instances.values()
        assert value(parsed, "inferswarm_service_up", service="metrics", instance=itself.instance) == 1
        assert value(parsed, "inferswarm_dht_peers", service="metrics", instance=itself.instance) >= 1
        assert value(parsed, "inferswarm_system_status", status="ok") == 1
        checked = await asyncio.create_subprocess_exec(
            promtool, "check", "metrics", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(checked.communicate(text.encode()), 30)
        assert checked.returncode == 0 and not output.strip(), output.decode()  # not even a lint warning


async def test_a_flood_of_distinct_label_values_stays_within_the_series_cap(tmp_path):
    cap = 30
    async with mesh(tmp_path) as net:
        app = await net.start_metrics(series_cap=cap)
        node = await net.node("inference")
        metrics = Metrics(series_cap=10_000)  # a reporter that does not fold: the service must
        async with MetricsReporter.for_node(node, metrics, service="inference", interval=0.1) as reporter:
            tokens = metrics.counter(TOKENS)
            for i in range(3000):
                tokens.inc(model=f"model-{i}", direction="out")
            assert await reporter.flush()
        client = net.seed.mesh("metrics")  # and a raw batch of never-seen method names
        flood = Batch(counters={(REQUESTS.name, ("web", f"web.m{i}", "OK")): 1.0 for i in range(500)})
        await client.call("metrics.record", {"batch": flood.to_wire(Source("web", "0123456789ab", "x"), 1)})
        parsed = samples(await scrape(app.http.url))
        token_series = {k: v for k, v in parsed.items() if k[0] == "inferswarm_tokens_total"}
        request_series = {k: v for k, v in parsed.items() if k[0] == "inferswarm_requests_total"}
        assert len(token_series) == cap and len(request_series) == cap
        # A source holds at most max(cap, SERIES_CAP) = 500 series per family (a reporter folds at
        # 500 itself): past that a non-folding reporter's series are dropped, and counted.
        assert sum(token_series.values()) == SERIES_CAP and sum(request_series.values()) == 500
        assert value(parsed, "inferswarm_tokens_total", model=OTHER, direction=OTHER) == SERIES_CAP - (cap - 1)
        overflow = value(parsed, "inferswarm_metrics_series_overflow_total", family="inferswarm_tokens_total")
        assert overflow == 3000 - (cap - 1)
        assert value(parsed, "inferswarm_metrics_series", family="inferswarm_tokens_total") == cap
        assert value(parsed, "inferswarm_dht_peers", service="inference",
                     instance=instance_id(node.identity.public_key)) >= 1
        assert DHT_PEERS.name in {k[0] for k in parsed}


async def test_metrics_http_closes_connections_that_send_no_request():
    async with MetricsHttp(lambda: b"up 1\n", lambda: {"status": "ok"}, port=0, idle_timeout=0.5) as http:
        opened = time.monotonic()
        silent = [await asyncio.open_connection("127.0.0.1", http.port) for _ in range(50)]
        reader, writer = await asyncio.open_connection("127.0.0.1", http.port)  # served meanwhile
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"up 1" in await asyncio.wait_for(reader.read(), 5)
        writer.close()
        for silent_reader, _ in silent:
            assert await asyncio.wait_for(silent_reader.read(), 5) == b""  # closed by the server
        assert 0.4 <= time.monotonic() - opened <= 4.0
        for _, silent_writer in silent:
            silent_writer.close()


def test_what_a_worker_says_of_breakers_and_keys_is_checked_and_counted():
    answer = {"models": [
        {"name": "a", "breaker": {"state": "open", "failures": 5, "retry_after": 1.5, "opened": 1, "x": [1]},
         "keys": [{"key": "key-1", "state": "ok", "requests": 3, "nested": {"no": 1}},
                  {"key": "key-2", "state": "weird"}] + [{"state": "disabled"}] * 100},
        {"name": "b", "breaker": {"state": "melted"}, "keys": None},
        {"name": ""}, "junk",
    ]}
    a, b = parse_models(answer)
    assert a.breaker == {"state": "open", "failures": 5, "retry_after": 1.5, "opened": 1}
    assert a.keys is not None and a.keys[0] == {"key": "key-1", "state": "ok", "requests": 3}
    assert len(a.keys) == MAX_KEYS - 1  # the unknown state dropped, at most MAX_KEYS looked at
    assert b == ModelState("b")
    breakers, keys = tally([a, b, ModelState("a", {"state": "closed"}, ())])
    assert breakers == {"a": {"closed": 1, "open": 1, "half_open": 0}}
    assert keys == {"a": {"ok": 1, "exhausted": 0, "disabled": MAX_KEYS - 2, "open": 0}}
