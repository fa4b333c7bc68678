"""RED metrics of the web service and the gateway's per-model histograms.

Unit tests: the label folding of the HTTP families, the decode time per token
and what `Counts.generated` records. The middleware runs in a small real
aiohttp application (routes of every kind, a stream a client walks away
from). The stack test makes requests through a whole `inferswarm up` (the
OpenAI SDK and aiohttp) and reads the metrics service's `/metrics`.
"""

from __future__ import annotations

import asyncio
import math
import urllib.request

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shared.metrics import (HTTP_REQUEST_DURATION, HTTP_REQUESTS, MODEL_REQUEST_DURATION, MODEL_REQUESTS, OTHER, QUEUE_WAIT,
                            TIME_PER_OUTPUT_TOKEN, TOKENS_PER_REQUEST, Metrics)
from services.gateway.counts import Counts, time_per_output_token
from services.web.http_metrics import METRICS, HttpMetrics, code_class, metrics_middleware, note_status
from metrics_support import samples, value
from waiting import wait_until, wait_until_sync
from web_support import MODEL, new_key, web_stack

HELLO = [{"role": "user", "content": "Say something."}]


# -- label folding and arithmetic ----------------------------------------------------------------------


@pytest.mark.unit
def test_status_classes_methods_and_routes_fold_to_bounded_values():
    assert [code_class(s) for s in (101, 200, 204, 302, 401, 404, 499, 500, 503)] == [
        "1xx", "2xx", "2xx", "3xx", "4xx", "4xx", "4xx", "5xx", "5xx"]
    assert code_class(99) == code_class(600) == OTHER
    fold = HTTP_REQUESTS.fold
    assert fold(["/v1/chat/completions", "POST", "2xx"]) == ("/v1/chat/completions", "POST", "2xx")
    assert fold(["/api/auth/api-keys/{key_id}", "PROPFIND", "7xx"]) == ("/api/auth/api-keys/{key_id}", OTHER, OTHER)
    assert fold(["/v1/models/a b?c=1", "get", "2xx"]) == (OTHER, OTHER, "2xx")  # not a template; case matters
    assert fold(["/" + "x" * 200, "GET", "2xx"])[0] == OTHER
    assert HTTP_REQUEST_DURATION.buckets[0] == 0.005 and HTTP_REQUEST_DURATION.buckets[-1] == 300.0
    assert TOKENS_PER_REQUEST.buckets == tuple(float(2 ** n) for n in range(16))  # 1 .. 32768
    assert QUEUE_WAIT.buckets[-1] == TIME_PER_OUTPUT_TOKEN.buckets[-1] == 300.0


@pytest.mark.unit
def test_time_per_output_token_is_the_decode_time_after_the_first_token():
    timing = {"queue_ms": 5.0, "ttft_ms": 100.0, "tokens_per_s": 50.0, "total_ms": 1100.0}
    assert math.isclose(time_per_output_token(timing, 11), 0.1)  # 1 s over the 10 tokens after the first
    assert math.isclose(time_per_output_token(timing, 2), 1.0)
    assert time_per_output_token(timing, 1) is None  # no token after the first
    assert time_per_output_token(timing, 0) is None
    assert time_per_output_token({**timing, "total_ms": 50.0}, 11) is None  # does not add up
    assert time_per_output_token({"ttft_ms": 100.0}, 11) is None
    assert time_per_output_token({**timing, "ttft_ms": True}, 11) is None
    assert time_per_output_token({**timing, "total_ms": math.inf}, 11) is None
    assert time_per_output_token({**timing, "ttft_ms": "100"}, 11) is None


@pytest.mark.unit
def test_counts_record_tokens_per_request_queue_wait_and_tpot_by_model():
    metrics = Metrics()
    counts = Counts(metrics)
    timing = {"queue_ms": 250.0, "ttft_ms": 300.0, "tokens_per_s": 10.0, "total_ms": 700.0}
    counts.generated("smollm2", timing, 12, 5, cached=False)
    counts.generated("smollm2", timing, 3, 0, cached=True)  # a replay: tokens only
    counts.generated("smollm2", None, 3, 1, cached=False)  # no timing: tokens only
    histograms = metrics.drain().histograms
    tpot = histograms[(TIME_PER_OUTPUT_TOKEN.name, ("smollm2",))]
    assert sum(tpot[:-1]) == 1 and math.isclose(tpot[-1], 0.1)  # (700 - 300) ms / 4 tokens
    queue = histograms[(QUEUE_WAIT.name, ("smollm2",))]
    assert sum(queue[:-1]) == 1 and math.isclose(queue[-1], 0.25)
    tokens_in = histograms[(TOKENS_PER_REQUEST.name, ("smollm2", "in"))]
    tokens_out = histograms[(TOKENS_PER_REQUEST.name, ("smollm2", "out"))]
    assert sum(tokens_in[:-1]) == sum(tokens_out[:-1]) == 3
    assert tokens_in[-1] == 18 and tokens_out[-1] == 6
    assert tokens_in[TOKENS_PER_REQUEST.buckets.index(16.0)] == 1  # 12 tokens: in the `le="16"` bucket
    Counts(None).generated("smollm2", timing, 12, 5, cached=False)  # in-process only: nothing to record


@pytest.mark.unit
def test_counts_record_requests_by_model_and_code():
    metrics = Metrics()
    counts = Counts(metrics)
    for status in ("ok", "ok", "worker_failed", "cancelled", "unavailable", "timeout", "rate_limited"):
        counts.served("smollm2", status, 0.2, 5, 3)
    batch = metrics.drain()
    assert {labels[1]: n for (name, labels), n in batch.counters.items() if name == MODEL_REQUESTS.name} == {
        "OK": 2, "UNAVAILABLE": 2, "CANCELLED": 1, "TIMEOUT": 1, "RATE_LIMITED": 1}  # a cut stream: UNAVAILABLE
    assert sum(batch.histograms[(MODEL_REQUEST_DURATION.name, ("smollm2",))][:-1]) == 7


# -- the middleware, in a real aiohttp application ------------------------------------------------------


def _app(metrics: Metrics, tmp_path, left: asyncio.Event) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/keys/{key_id:[0-9]{1,18}}/edit")
    async def edit(request: web.Request) -> web.Response:
        return web.Response(text=request.match_info["key_id"])

    @routes.post("/boom")
    async def boom(request: web.Request) -> web.Response:
        raise web.HTTPServiceUnavailable()

    @routes.get("/stream")
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        try:
            await asyncio.Event().wait()  # until the client goes away
        finally:
            left.set()
        return response

    @routes.get("/hang")
    async def hang(request: web.Request) -> web.Response:
        try:
            await asyncio.Event().wait()
        finally:
            left.set()
        return web.Response()

    (tmp_path / "app.js").write_text("1")
    app = web.Application(middlewares=[metrics_middleware])
    app[METRICS] = HttpMetrics(metrics)
    app.on_response_prepare.append(note_status)
    app.router.add_routes(routes)
    app.router.add_static("/static/", tmp_path)
    return app


def _requests(metrics: Metrics) -> dict[tuple[str, ...], float]:
    return {labels: n for (name, labels), n in metrics.drain().counters.items() if name == HTTP_REQUESTS.name}


@pytest.mark.rpc
async def test_the_middleware_counts_route_templates_and_clients_that_left(tmp_path):
    metrics, left = Metrics(), asyncio.Event()
    async with TestClient(TestServer(_app(metrics, tmp_path, left), handler_cancellation=True)) as client:
        for method, path, status in (("GET", "/keys/42/edit", 200), ("HEAD", "/keys/7/edit", 200),
                                     ("GET", "/static/app.js", 200), ("GET", "/no/such/page", 404),
                                     ("POST", "/keys/42/edit", 405), ("OPTIONS", "/keys/1/edit", 405),
                                     ("POST", "/boom", 503)):
            async with client.request(method, path) as reply:
                assert reply.status == status
        seen = _requests(metrics)
        assert seen == {("/keys/{key_id}/edit", "GET", "2xx"): 1, ("/keys/{key_id}/edit", "HEAD", "2xx"): 1,
                        ("/static/", "GET", "2xx"): 1, (OTHER, "GET", "4xx"): 1,
                        ("/keys/{key_id}/edit", "POST", "4xx"): 1, ("/keys/{key_id}/edit", "OPTIONS", "4xx"): 1,
                        ("/boom", "POST", "5xx"): 1}

        async with client.get("/stream") as reply:  # the reply started: counted with its status
            assert await reply.content.readline() == b"data: first\n"
        await wait_until(left.is_set, 10, message="the stream's handler was never cancelled")
        assert await wait_until(lambda: _requests(metrics), 10) == {("/stream", "GET", "2xx"): 1}

        left.clear()
        with pytest.raises(asyncio.TimeoutError):  # nothing sent yet: counted as nginx's 499
            async with client.get("/hang", timeout=aiohttp.ClientTimeout(total=0.3)):
                pass
        await wait_until(left.is_set, 10, message="the handler was never cancelled")
        assert await wait_until(lambda: _requests(metrics), 10) == {("/hang", "GET", "4xx"): 1}


# -- on a whole stack ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("http-metrics"),
                   INFERSWARM_WEB_CORS_ORIGINS="https://app.example.com") as running:
        yield running


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return samples(reply.read().decode())


@pytest.mark.stack
@pytest.mark.timeout(180)
async def test_http_red_and_per_model_histograms_reach_the_metrics_service(stack):
    api_key = await asyncio.to_thread(new_key, stack, "red-rita")
    sdk = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key, max_retries=0)
    answer = await sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6)
    assert answer.choices[0].message.content
    chunks = [c async for c in await sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6,
                                                                   stream=True)]
    assert chunks
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="sk-not-a-key",
                                 max_retries=0).models.list()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.base_url}/v1/no-such-route") as reply:
            assert reply.status == 404
        async with http.delete(f"{stack.base_url}/api/auth/api-keys/12345") as reply:
            assert reply.status == 401  # no session
        async with http.options(f"{stack.base_url}/v1/chat/completions", headers={
                "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}) as reply:
            assert reply.status == 204

    http_wanted = [("/v1/chat/completions", "POST", "2xx"), ("/v1/models", "GET", "4xx"),
                   (OTHER, "GET", "4xx"), ("/api/auth/api-keys/{key_id}", "DELETE", "4xx"),
                   ("/v1/chat/completions", "OPTIONS", "2xx"), ("/api/auth/api-keys", "POST", "2xx")]
    model_wanted = [("inferswarm_tokens_per_request_count", {"model": MODEL, "direction": "in"}),
                    ("inferswarm_tokens_per_request_count", {"model": MODEL, "direction": "out"}),
                    ("inferswarm_time_per_output_token_seconds_count", {"model": MODEL}),
                    ("inferswarm_queue_wait_seconds_count", {"model": MODEL}),
                    ("inferswarm_model_requests_total", {"model": MODEL, "code": "OK"}),
                    ("inferswarm_model_request_duration_seconds_count", {"model": MODEL}),
                    ("inferswarm_requests_total", {"service": "gateway", "method": "gateway.infer", "code": "OK"}),
                    ("inferswarm_request_duration_seconds_count", {"service": "gateway",
                                                                   "method": "gateway.infer"})]

    def arrived() -> dict | None:  # reporters push every second
        parsed = _scrape(stack.ready["metrics"])
        requests = [value(parsed, "inferswarm_http_requests_total", route=r, method=m, code=c)
                    for r, m, c in http_wanted]
        per_model = [value(parsed, name, **labels) for name, labels in model_wanted]
        return parsed if all(requests) and all(per_model) else None

    parsed = await asyncio.to_thread(wait_until_sync, arrived, 30, interval=0.5,
                                     message="the HTTP and per-model series never reached /metrics")
    assert value(parsed, "inferswarm_http_requests_total", route="/v1/chat/completions", method="POST",
                 code="2xx") >= 2  # the plain and the streamed chat
    assert value(parsed, "inferswarm_http_request_duration_seconds_count", route="/v1/chat/completions",
                 method="POST") >= 2
    assert value(parsed, "inferswarm_http_request_duration_seconds_bucket", route="/v1/chat/completions",
                 method="POST", le="300.0") >= 2
    assert value(parsed, "inferswarm_tokens_per_request_count", model=MODEL, direction="out") >= 2
    assert value(parsed, "inferswarm_time_per_output_token_seconds_sum", model=MODEL) > 0
    assert value(parsed, "inferswarm_model_requests_total", model=MODEL, code="OK") >= 2
    assert value(parsed, "inferswarm_model_request_duration_seconds_bucket", model=MODEL, le="300.0") >= 2
    # RED of the RPC layer: gateway.infer by code and duration; the workers' generate calls too
    assert value(parsed, "inferswarm_requests_total", service="gateway", method="gateway.infer", code="OK") >= 2
    assert value(parsed, "inferswarm_request_duration_seconds_bucket", service="gateway", method="gateway.infer",
                 le="300.0") >= 2
    # The streamed chat asked the gateway nothing but gateway.infer: its headers' rate-limit facts came
    # with the first chunk, not from a gateway.quota call of their own (a database read each).
    assert value(parsed, "inferswarm_requests_total", service="gateway", method="gateway.quota", code="OK") is None
    routes = {dict(labels)["route"] for name, labels in parsed if name == "inferswarm_http_requests_total"}
    assert not any("12345" in route or "no-such-route" in route for route in routes)  # never a raw path
