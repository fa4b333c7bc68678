"""Traces of a whole stack (`inferswarm up`) exported over OTLP/HTTP to a receiver
in this test: one /v1 request is one trace across web, gateway, auth and worker, its
log lines carry the trace id and the x-request-id, and a malformed
`traceparent` header gets a normal reply."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from otlp_receiver import CLIENT, SERVER, OtlpReceiver, ReceivedSpan, in_thread
from test_tracing import HOSTILE_TRACEPARENTS, TRACE as HOSTILE_TRACE
from waiting import wait_until_sync
from web_support import MODEL, WebStack, new_key, web_stack

pytestmark = pytest.mark.stack

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WebStack, OtlpReceiver]]:
    with in_thread(OtlpReceiver()) as receiver, web_stack(
            tmp_path_factory.mktemp("tracing"), OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_BSP_SCHEDULE_DELAY="100", INFERSWARM_LOG_LEVEL="debug") as stack:
        yield stack, receiver


def request(stack: WebStack, path: str, key: str, body: dict | None = None,
            traceparent: str | None = None) -> tuple[int, dict[str, str]]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if traceparent is not None:
        headers["traceparent"] = traceparent
    sent = urllib.request.Request(f"{stack.base_url}{path}", data=json.dumps(body).encode() if body else None,
                                  headers=headers, method="POST" if body else "GET")
    with urllib.request.urlopen(sent, timeout=30) as reply:
        reply.read()
        return reply.status, dict(reply.headers)


def log_lines(stack: WebStack, process: str) -> list[dict]:
    """A process's JSON log lines so far."""
    text = (stack.data_dir / "logs" / f"{process}.log").read_text()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def web_lines(stack: WebStack, path: str) -> list[dict]:
    """The web process's `http request` log lines for `path`."""
    return [line for line in log_lines(stack, "web") if line.get("event") == "http request" and line.get("path") == path]


def one(spans: list[ReceivedSpan], service: str, kind: int, name: str) -> ReceivedSpan:
    found = [s for s in spans if s.service == f"inferswarm-{service}" and s.kind == kind and s.name == name]
    assert len(found) == 1, (service, kind, name, [(s.service, s.kind, s.name) for s in spans])
    return found[0]


def test_a_v1_request_is_one_trace_across_web_gateway_auth_and_worker(traced) -> None:
    stack, receiver = traced
    key = new_key(stack, "tracer")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    status, headers = request(stack, "/v1/chat/completions", key, body, f"00-{TRACE}-{PARENT}-01")
    assert status == 200

    wanted = {("inferswarm-web", SERVER, "POST /v1/chat/completions"), ("inferswarm-web", CLIENT, "gateway.infer"),
              ("inferswarm-gateway", SERVER, "gateway.infer"), ("inferswarm-gateway", CLIENT, "inference.generate"),
              ("inferswarm-inference", SERVER, "inference.generate"),
              # a new key: the gateway asks auth about it (then caches it)
              ("inferswarm-gateway", CLIENT, "auth.validate_key"), ("inferswarm-auth", SERVER, "auth.validate_key")}

    def whole() -> list[ReceivedSpan] | None:
        spans = receiver.trace(TRACE)  # each process exports when its spans end
        return spans if wanted <= {(span.service, span.kind, span.name) for span in spans} else None

    spans = wait_until_sync(whole, 30.0, message="the spans of web, gateway and worker never arrived")
    http = one(spans, "web", SERVER, "POST /v1/chat/completions")
    assert http.parent_id == PARENT  # the caller's traceparent was honoured
    assert http.attributes["http.response.status_code"] == 200
    assert http.attributes["http.route"] == "/v1/chat/completions"
    web_call = one(spans, "web", CLIENT, "gateway.infer")
    gateway = one(spans, "gateway", SERVER, "gateway.infer")
    gateway_call = one(spans, "gateway", CLIENT, "inference.generate")
    worker = one(spans, "inference", SERVER, "inference.generate")
    auth_call = one(spans, "gateway", CLIENT, "auth.validate_key")
    auth = one(spans, "auth", SERVER, "auth.validate_key")
    for parent, child in ((http, web_call), (web_call, gateway), (gateway, gateway_call), (gateway_call, worker),
                          (gateway, auth_call), (auth_call, auth)):
        assert child.parent_id == parent.span_id, (parent.name, child.name)
    assert gateway.attributes["rpc.system"] == "inferswarm" and gateway.status != 2

    lines = wait_until_sync(lambda: [line for line in web_lines(stack, "/v1/chat/completions")
                                     if line["trace_id"] == TRACE], 10.0)
    assert lines[0]["request_id"] == headers["x-request-id"]
    for process in ("gateway", "inference"):  # the gateway's id, sent along to the worker
        lines = wait_until_sync(lambda p=process: [line for line in log_lines(stack, p)
                                                   if line.get("trace_id") == TRACE], 10.0,
                                message=f"no {process} log line of the request")
        assert {line.get("request_id") for line in lines} == {headers["x-request-id"]}, (process, lines)


def test_malformed_traceparent_headers_get_a_normal_reply(traced) -> None:
    stack, receiver = traced
    key = new_key(stack, "hostile")
    for value in HOSTILE_TRACEPARENTS:
        if value is None or not value.isascii():
            continue  # no header at all; a header is latin-1 text
        status, headers = request(stack, "/v1/models", key, traceparent=value)
        assert status == 200 and headers["x-request-id"], value
    lines = wait_until_sync(lambda: len(web_lines(stack, "/v1/models")) >= 13 and web_lines(stack, "/v1/models"),
                            10.0)
    trace_ids = {line["trace_id"] for line in lines}
    assert len(trace_ids) == len(lines)  # each a new trace: no header was taken
    assert all(len(trace_id) == 32 and trace_id != HOSTILE_TRACE for trace_id in trace_ids)
    assert all(line["request_id"] and line["status"] == 200 for line in lines)


def test_a_refused_request_is_an_error_span_and_a_log_line_of_its_trace(traced) -> None:
    stack, receiver = traced
    key = new_key(stack, "refused")
    trace_id = "5ee0c7ef8d6b4f2fa1c3b2e4d5f60718"
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hello"}]}
    with pytest.raises(urllib.error.HTTPError) as refused:
        request(stack, "/v1/chat/completions", key, body, f"00-{trace_id}-{PARENT}-01")
    assert refused.value.code == 404

    def gateway_span() -> ReceivedSpan | None:
        return next((span for span in receiver.trace(trace_id)
                     if span.service == "inferswarm-gateway" and span.kind == SERVER), None)

    span = wait_until_sync(gateway_span, 30.0, message="no span of the gateway")
    assert span.status == 2 and span.attributes["error.type"] == "NOT_FOUND"
    refusal = wait_until_sync(lambda: [line for line in log_lines(stack, "gateway")
                                       if line.get("trace_id") == trace_id and line["event"] == "request refused"], 10.0)
    assert refusal[0]["code"] == "NOT_FOUND"
