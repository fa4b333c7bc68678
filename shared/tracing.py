"""OpenTelemetry spans on the request path, exported over OTLP/HTTP when configured.

    configure_tracing("gateway", config.traces_endpoint)   # once, at start (runner.run)
    if tracing.tracer is not None:                          # the one check when tracing is off
        span = start_rpc_server("gateway.infer", request.trace_id)
        ...
        finish(span, error_code)

Tracing is on when MeshConfig names an OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT,
or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) and OTEL_SDK_DISABLED is not true: then
spans go through a BatchSpanProcessor to the OTLP/HTTP protobuf exporter (which
reads its own OTEL_EXPORTER_OTLP_* headers, timeout and compression), resource
`service.name=inferswarm-<service>`. Off, `tracer` is None, the SDK is never
imported (only the small API is), and the request path pays for that one
attribute check.

One trace per request across processes: a span's trace id is the trace id of
its logs. A root span (a new HTTP request, a call made with a trace id bound
but no span, a server whose caller sent no parent) takes the trace id bound to
the context (shared/logging.py) or handed to it; a child takes its parent's.
The RPC wire carries the parent as a W3C `traceparent` in the REQUEST's trace
field (see shared/rpc/PROTOCOL.md, "Trace context"); a plain 32-hex trace id
still works. A call made outside any request (housekeeping: metrics pushes,
health pings) is sent unsampled and recorded by neither side.

This module is the only one that imports opentelemetry; the provider is ours,
not installed as the process-global one, so tests may configure it again.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode, Tracer

from shared.errors import MeshError
from shared.logging import current_trace_id

if TYPE_CHECKING:  # the SDK is imported only when tracing is turned on
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "tracer",
    "configure_tracing",
    "shutdown_tracing",
    "flush",
    "TraceParent",
    "parse_traceparent",
    "trace_id_of",
    "Span",
    "start_rpc_server",
    "start_rpc_client",
    "start_http_server",
    "finish",
    "error_code",
]

#: None when tracing is off: the request path checks this and nothing else.
tracer: Tracer | None = None
_provider: TracerProvider | None = None

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_TRACEPARENT_LENGTH = 55
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
#: The trace id the next root span should take (see `_wire_ids`).
_wanted_trace: ContextVar[str | None] = ContextVar("wanted_trace", default=None)


# --- configuration -----------------------------------------------------------------


def configure_tracing(service: str, endpoint: str | None, *, exporter: SpanExporter | None = None) -> bool:
    """Export this process's spans to `endpoint`, an OTLP/HTTP traces URL
    (`MeshConfig.traces_endpoint`), or to `exporter` (the tests' in-memory one).

    Neither: tracing is off. Replaces an earlier set-up (flushing it); True when on.
    """
    global tracer, _provider
    shutdown_tracing()
    if endpoint is None and exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint)
    provider = TracerProvider(resource=Resource.create({"service.name": f"inferswarm-{service}"}),
                              id_generator=_wire_ids(), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider, tracer = provider, provider.get_tracer("inferswarm")
    return True


def shutdown_tracing() -> None:
    """Export what is still buffered and turn tracing off."""
    global tracer, _provider
    provider, _provider, tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def flush(timeout_s: float = 5.0) -> bool:
    """Export the finished spans now (tests; True when done in time or off)."""
    return _provider is None or _provider.force_flush(int(timeout_s * 1000))


def _wire_ids() -> Any:
    """The SDK's random ids, except that a root span takes the trace id it was
    handed, or else the one bound to the logs: span and log lines agree."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class WireIds(RandomIdGenerator):
        def generate_trace_id(self) -> int:
            wanted = _wanted_trace.get() or current_trace_id()
            if wanted is not None and _TRACE_ID.fullmatch(wanted) and wanted != _ZERO_TRACE:
                return int(wanted, 16)
            return super().generate_trace_id()

    return WireIds()


# --- the trace context on the wire ---------------------------------------------------


class TraceParent(NamedTuple):
    """A W3C trace context parent: `00-<trace_id>-<span_id>-<flags>`."""

    trace_id: str
    span_id: str
    flags: int

    def __str__(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


def parse_traceparent(value: str | None) -> TraceParent | None:
    """A valid version-00 `traceparent`, else None: wrong length, not lowercase
    hex, version ff, an all-zero trace or span id are all ignored."""
    if value is None or len(value) != _TRACEPARENT_LENGTH:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceParent(trace_id, span_id, int(flags, 16))


def trace_id_of(wire: str) -> str:
    """The trace id a REQUEST's trace field names: a traceparent's, or the field itself."""
    if len(wire) == _TRACEPARENT_LENGTH:
        parent = parse_traceparent(wire)
        if parent is not None:
            return parent.trace_id
    return wire


# --- spans ----------------------------------------------------------------------------


class Span:
    """A started span; a server's is the context's current span until `finish`."""

    __slots__ = ("otel", "_token")

    def __init__(self, otel: trace.Span, token: Token[Context] | None) -> None:
        self.otel = otel
        self._token = token

    @property
    def traceparent(self) -> str:
        """This span as the parent for the next hop (the REQUEST's trace field)."""
        context = self.otel.get_span_context()
        return str(TraceParent(f"{context.trace_id:032x}", f"{context.span_id:016x}", int(context.trace_flags)))


def _rpc_attributes(method: str) -> dict[str, str]:
    return {"rpc.system": "inferswarm", "rpc.service": method.partition(".")[0], "rpc.method": method}


def _start(name: str, kind: trace.SpanKind, attributes: dict[str, Any], parent: TraceParent | None,
           trace_id: str | None, *, root: bool, current: bool) -> Span:
    """A span under `parent` (a remote one), else the current span unless `root`;
    a root takes `trace_id` (else the logs')."""
    assert tracer is not None
    if parent is not None:
        remote = trace.SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
                                   trace_flags=trace.TraceFlags(parent.flags))
        context: Context | None = trace.set_span_in_context(trace.NonRecordingSpan(remote))
    else:
        context = otel_context.Context() if root else None
    wanted = _wanted_trace.set(trace_id)
    try:
        span = tracer.start_span(name, context, kind, attributes)
    finally:
        _wanted_trace.reset(wanted)
    token = otel_context.attach(trace.set_span_in_context(span)) if current else None
    return Span(span, token)


def start_rpc_server(method: str, wire: str) -> Span:
    """The SERVER span of one handled request, current until finished; `wire` is
    the REQUEST's trace field (a traceparent, or a plain trace id)."""
    parent = parse_traceparent(wire) if len(wire) == _TRACEPARENT_LENGTH else None
    return _start(method, trace.SpanKind.SERVER, _rpc_attributes(method), parent, wire, root=True, current=True)


def start_rpc_client(method: str, trace_id: str | None = None) -> Span:
    """The CLIENT span of one call or stream, under the current span (if none, a
    root taking `trace_id` or the logs').

    A call made outside any request -- no current span, no trace id bound or
    given: a metrics push, a health ping, a background loop's -- is put under an
    unsampled parent, so that neither this side nor the server (whose sampler
    follows the caller's flags) records it: traces are of requests, not of
    the mesh's housekeeping."""
    parent = None
    if trace_id is None and current_trace_id() is None and not trace.get_current_span().get_span_context().is_valid:
        parent = TraceParent(secrets.token_hex(16), secrets.token_hex(8), 0)
    return _start(method, trace.SpanKind.CLIENT, _rpc_attributes(method), parent, trace_id, root=False, current=False)


def start_http_server(method: str, route: str, parent: TraceParent | None, trace_id: str) -> Span:
    """The SERVER span of one HTTP request, current until finished: under the
    caller's `traceparent` when it sent a valid one, else a root of `trace_id`."""
    attributes = {"http.request.method": method, "http.route": route}
    return _start(f"{method} {route}", trace.SpanKind.SERVER, attributes, parent, trace_id, root=True, current=True)


def finish(span: Span, error: str | None = None, attributes: dict[str, Any] | None = None) -> None:
    """End `span`: `error` (a stable error code) marks it failed."""
    otel = span.otel
    if attributes:
        otel.set_attributes(attributes)
    if error is not None:
        otel.set_attribute("error.type", error)
        otel.set_status(Status(StatusCode.ERROR, error))
    if span._token is not None:
        otel_context.detach(span._token)
        span._token = None
    otel.end()


def error_code(exc: BaseException) -> str:
    """The stable code a span records for `exc`."""
    if isinstance(exc, MeshError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return type(exc).__name__
