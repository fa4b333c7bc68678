"""A small OTLP/HTTP trace receiver: what a collector does with `POST /v1/traces`.

    async with OtlpReceiver() as receiver:           # aiohttp on 127.0.0.1, a free port
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
        ...
        receiver.spans                               # every span received, decoded

The body is the protobuf `ExportTraceServiceRequest` (gzip-compressed or not),
decoded with opentelemetry-proto, as a collector decodes it; the reply is an
empty `ExportTraceServiceResponse`. `in_thread(receiver)` runs it on an event
loop of its own, for a test or benchmark whose loop is busy or which has none.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)

__all__ = ["ReceivedSpan", "OtlpReceiver", "in_thread"]

SERVER, CLIENT = 2, 3  #: OTLP's SpanKind numbers
STATUS_ERROR = 2


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  #: the resource's service.name
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str  #: "" for a root span
    attributes: dict[str, Any]
    status: int  #: 0 unset, 1 ok, 2 error


def _value(any_value: Any) -> Any:
    field = any_value.WhichOneof("value")
    return getattr(any_value, field) if field else None


def _attributes(items: Any) -> dict[str, Any]:
    return {item.key: _value(item.value) for item in items}


class OtlpReceiver:
    """Accepts OTLP/HTTP protobuf trace exports and keeps their spans."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._runner: web.AppRunner | None = None
        self.spans: list[ReceivedSpan] = []
        self.exports = 0
        self.url = ""  #: the base URL (OTEL_EXPORTER_OTLP_ENDPOINT)

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self._host}:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(ReceivedSpan(
                    service, span.name, span.kind, span.trace_id.hex(), span.span_id.hex(),
                    span.parent_span_id.hex(), _attributes(span.attributes), span.status.code,
                ) for span in scope_spans.spans)
        self.exports += 1
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans of one trace received so far."""
        return [span for span in list(self.spans) if span.trace_id == trace_id]


@contextmanager
def in_thread(receiver: OtlpReceiver) -> Iterator[OtlpReceiver]:
    """Run `receiver` on an event loop in a daemon thread for the block."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(receiver.__aenter__(), loop).result(10)
        try:
            yield receiver
        finally:
            asyncio.run_coroutine_threadsafe(receiver.__aexit__(None, None, None), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
