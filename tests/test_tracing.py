"""shared.tracing: spans of real RPC calls (real CurveZMQ sockets on loopback) in
the SDK's in-memory exporter, the trace context on the wire, the log lines of a
request, tracing off, and one OTLP/HTTP round trip to a receiver."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from shared import tracing
from shared.config import MeshConfig, load
from shared.errors import NotFound
from shared.identity import MeshCredential, NodeIdentity
from shared.logging import bind_trace, get_logger, new_trace_id
from shared.rpc import Connection, Dispatcher, RpcServer, current_request, method
from otlp_receiver import CLIENT, SERVER, OtlpReceiver, in_thread
from waiting import wait_until

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
log = get_logger("tests.tracing")


class Probe:
    name = "probe"

    @method
    async def echo(self, value: str) -> str:
        log.info("echoing", value=value)
        return value

    @method
    async def context(self) -> str:
        ctx = current_request.get()
        assert ctx is not None
        return ctx.trace_id

    @method
    async def missing(self) -> None:
        raise NotFound("no such thing")

    @method
    async def count(self, n: int):
        for i in range(n):
            yield {"i": i}


class Forward:
    """Calls the probe from inside its own handler: the second hop of a trace."""

    name = "forward"

    def __init__(self, probe: Connection) -> None:
        self._probe = probe

    @method
    async def echo(self, value: str) -> str:
        return await self._probe.call("probe.echo", {"value": value})


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing("test", None, exporter=exporter)
    yield exporter
    tracing.shutdown_tracing()


@pytest.fixture
def mesh() -> MeshCredential:
    return MeshCredential(MeshCredential.new_secret())


@pytest.fixture
async def zmq_context():
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def probe(mesh, zmq_context):
    """A real server of `Probe` and a real connection to it."""
    node = NodeIdentity.generate()
    async with RpcServer(Dispatcher(Probe()), curve=node.curve, members=mesh.roster) as server:
        connection = Connection(server.endpoint, node.curve.public, mesh.client, context=zmq_context)
        connection.open()
        yield connection
        await connection.close()


async def finished(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The finished spans once there are `count` (a server's span ends after its reply is sent)."""
    def enough() -> list[ReadableSpan] | None:
        tracing.flush()
        spans = list(exporter.get_finished_spans())
        return spans if len(spans) >= count else None

    return await wait_until(enough, 5.0, message=f"fewer than {count} spans")


def of_kind(spans: list[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in spans if span.kind == kind]


def hex_ids(span: ReadableSpan) -> tuple[str, str, str]:
    """(trace id, span id, parent span id or "") in hex."""
    context = span.get_span_context()
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else ""
    return f"{context.trace_id:032x}", f"{context.span_id:016x}", parent


# -- the trace context ---------------------------------------------------------------------


HOSTILE_TRACEPARENTS = [
    "", "00", "garbage", "00-" + TRACE + "-00f067aa0ba902b7",  # too short
    "00-" + TRACE + "-00f067aa0ba902b7-01-extra", "00-" + TRACE + "-00f067aa0ba902b7-01" + "0" * 4000,
    "00-" + TRACE.upper() + "-00f067aa0ba902b7-01",  # W3C: lowercase only
    "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "00-" + TRACE + "-" + "0" * 16 + "-01",  # all-zero ids
    "ff-" + TRACE + "-00f067aa0ba902b7-01",  # the forbidden version
    "00-" + TRACE[:-1] + "g-00f067aa0ba902b7-01", "00_" + TRACE + "_00f067aa0ba902b7_01",
    "00-" + TRACE + "-00f067aa0ba902b7-0x", "\u00e9" * 55, None,
]


@pytest.mark.unit
@pytest.mark.parametrize("value", HOSTILE_TRACEPARENTS)
def test_hostile_traceparents_are_ignored(value: str | None) -> None:
    assert tracing.parse_traceparent(value) is None
    if value is not None:
        assert tracing.trace_id_of(value) == value  # a plain (opaque) trace id, as before


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.text(alphabet="0123456789abcdefF-", min_size=53, max_size=57)))
def test_any_text_is_a_valid_traceparent_or_ignored(value: str) -> None:
    parent = tracing.parse_traceparent(value)
    assert parent is None or str(parent)[2:] == value[2:]  # (a later version is read as 00)
    assert tracing.trace_id_of(value) in (value, getattr(parent, "trace_id", None))


@pytest.mark.unit
def test_a_valid_traceparent_names_trace_span_and_flags() -> None:
    wire = f"00-{TRACE}-00f067aa0ba902b7-01"
    parent = tracing.parse_traceparent(wire)
    assert parent == tracing.TraceParent(TRACE, "00f067aa0ba902b7", 1)
    assert str(parent) == wire
    assert tracing.trace_id_of(wire) == TRACE
    assert tracing.trace_id_of(TRACE) == TRACE


@pytest.mark.unit
def test_the_endpoint_comes_from_the_standard_variables() -> None:
    def endpoint(**env: str) -> str | None:
        return load(MeshConfig, env).traces_endpoint

    assert endpoint() is None
    assert endpoint(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318/") == "http://collector:4318/v1/traces"
    assert endpoint(OTEL_EXPORTER_OTLP_ENDPOINT="http://a:4318",
                    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://b/traces") == "http://b/traces"
    assert endpoint(OTEL_EXPORTER_OTLP_ENDPOINT="http://a:4318", OTEL_SDK_DISABLED="true") is None


@pytest.mark.unit
def test_only_shared_tracing_imports_opentelemetry() -> None:
    root = Path(__file__).resolve().parents[1]
    importers = {path.relative_to(root).as_posix() for folder in ("shared", "services", "inferswarm")
                 for path in (root / folder).rglob("*.py")
                 if re.search(r"^\s*(from|import) opentelemetry", path.read_text(), re.M)}
    assert importers == {"shared/tracing.py"}


@pytest.mark.unit
def test_off_is_no_provider_and_no_tracer() -> None:
    assert tracing.configure_tracing("test", None) is False
    assert tracing.tracer is None and tracing._provider is None
    assert tracing.flush()


# -- spans of real calls ---------------------------------------------------------------------


@pytest.mark.rpc
async def test_a_call_is_a_client_span_parent_of_the_server_span(exporter, probe) -> None:
    with bind_trace(TRACE):
        assert await probe.call("probe.context") == TRACE  # the handler sees the trace id, not the traceparent
    spans = await finished(exporter, 2)
    client, server = of_kind(spans, SpanKind.CLIENT), of_kind(spans, SpanKind.SERVER)
    assert len(client) == 1 and len(server) == 1
    client_trace, client_span, client_parent = hex_ids(client[0])
    server_trace, _, server_parent = hex_ids(server[0])
    assert client_trace == server_trace == TRACE  # the logs' trace id is the spans'
    assert server_parent == client_span and client_parent == ""
    assert server[0].parent is not None and server[0].parent.is_remote
    assert server[0].name == client[0].name == "probe.context"
    assert dict(server[0].attributes or {}) == {"rpc.system": "inferswarm", "rpc.service": "probe",
                                                "rpc.method": "probe.context"}
    assert server[0].status.status_code == StatusCode.UNSET
    assert server[0].resource.attributes["service.name"] == "inferswarm-test"


@pytest.mark.rpc
async def test_a_call_made_by_a_handler_joins_the_callers_trace(exporter, probe, mesh, zmq_context) -> None:
    node = NodeIdentity.generate()
    async with RpcServer(Dispatcher(Forward(probe)), curve=node.curve, members=mesh.roster) as server:
        forward = Connection(server.endpoint, node.curve.public, mesh.client, context=zmq_context)
        forward.open()
        try:
            with bind_trace():
                assert await forward.call("forward.echo", {"value": "hi"}) == "hi"
        finally:
            await forward.close()
    spans = {(span.kind, span.name): span for span in await finished(exporter, 4)}
    chain = [spans[SpanKind.CLIENT, "forward.echo"], spans[SpanKind.SERVER, "forward.echo"],
             spans[SpanKind.CLIENT, "probe.echo"], spans[SpanKind.SERVER, "probe.echo"]]
    assert len({hex_ids(span)[0] for span in chain}) == 1
    for parent, child in zip(chain, chain[1:]):
        assert hex_ids(child)[2] == hex_ids(parent)[1], (parent.name, child.name)


@pytest.mark.rpc
async def test_a_failing_call_records_its_error_code(exporter, probe) -> None:
    with bind_trace(), pytest.raises(NotFound):
        await probe.call("probe.missing")
    spans = await finished(exporter, 2)
    for span in spans:
        assert span.status.status_code == StatusCode.ERROR, span.kind
        assert (span.attributes or {})["error.type"] == "NOT_FOUND"


@pytest.mark.rpc
async def test_a_streams_span_ends_when_the_stream_ends(exporter, probe) -> None:
    with bind_trace():
        stream = await probe.stream("probe.count", {"n": 3})
    assert await stream.__anext__() == {"i": 0}
    await finished(exporter, 1)  # the server's: it sent everything
    assert not of_kind(exporter.get_finished_spans(), SpanKind.CLIENT)  # still being read
    assert [chunk async for chunk in stream] == [{"i": 1}, {"i": 2}]
    client = of_kind(await finished(exporter, 2), SpanKind.CLIENT)
    assert client[0].status.status_code == StatusCode.UNSET
    with bind_trace():
        async with await probe.stream("probe.count", {"n": 100}) as early:
            await early.__anext__()  # left early: cancelled
    spans = of_kind(await finished(exporter, 4), SpanKind.CLIENT)
    assert (spans[-1].attributes or {})["error.type"] == "CANCELLED"


@pytest.mark.rpc
async def test_a_call_outside_any_request_is_recorded_by_neither_side(exporter, probe) -> None:
    assert await probe.call("probe.context")  # a metrics push, a health ping: no trace bound
    with bind_trace(TRACE):
        await probe.call("probe.echo", {"value": "traced"})  # after it: its spans came later
    spans = await finished(exporter, 2)
    assert {span.name for span in spans} == {"probe.echo"}


@pytest.mark.rpc
async def test_log_lines_of_a_request_carry_its_trace_id(exporter, probe, log_stream) -> None:
    with bind_trace(TRACE):
        await probe.call("probe.echo", {"value": "logged"})
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    echoed = [line for line in lines if line["event"] == "echoing"]
    assert len(echoed) == 1 and echoed[0]["trace_id"] == TRACE


@pytest.mark.rpc
async def test_tracing_off_sends_the_plain_trace_id_and_records_nothing(probe) -> None:
    assert not tracing.configure_tracing("test", None)
    trace_id = new_trace_id()
    with bind_trace(trace_id):
        assert await probe.call("probe.context") == trace_id
    assert tracing.tracer is None


@pytest.mark.rpc
async def test_spans_reach_an_otlp_http_receiver(probe) -> None:
    with in_thread(OtlpReceiver()) as receiver:  # our loop blocks in flush(): the receiver has its own
        tracing.configure_tracing("roundtrip", receiver.url + "/v1/traces")
        try:
            with bind_trace(TRACE):
                await probe.call("probe.echo", {"value": "exported"})
            await wait_until(lambda: tracing.flush() and len(receiver.trace(TRACE)) >= 2, 10.0)
        finally:
            tracing.shutdown_tracing()
    spans = receiver.trace(TRACE)
    assert {span.service for span in spans} == {"inferswarm-roundtrip"}
    client = next(span for span in spans if span.kind == CLIENT)
    server = next(span for span in spans if span.kind == SERVER)
    assert server.parent_id == client.span_id and server.attributes["rpc.method"] == "probe.echo"
