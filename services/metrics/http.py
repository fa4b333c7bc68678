"""The HTTP side of the metrics service (aiohttp): what Prometheus and people read.

    GET /metrics   Prometheus text format 0.0.4 (the whole mesh)
    GET /health    the health report as JSON: 200 when "ok" or "degraded", 503 when "down"

Both are read-only views of state kept fresh in the background; a scrape or a
health check never waits on the mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from shared.logging import get_logger

__all__ = ["MetricsHttp"]

log = get_logger(__name__)

# The classic text format, which every Prometheus reads; our names need nothing newer.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsHttp:
    """An aiohttp server for `/metrics` and `/health`; `port=0` picks a free one."""

    def __init__(self, render: Callable[[], bytes], health: Callable[[], dict[str, Any]], *,
                 host: str = "127.0.0.1", port: int = 9100, idle_timeout: float = 30.0) -> None:
        self._render = render
        self._health = health
        self.host, self.port = host, port
        # From a connection's start: one that sends no whole request is closed
        # too (aiohttp's default waits an hour). Above Prometheus's usual 15 s
        # scrape interval, so a scraper keeps its connection.
        self._idle_timeout = idle_timeout
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> MetricsHttp:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health_view)
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=self._idle_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("metrics http listening", url=self.url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._render(), headers={"Content-Type": CONTENT_TYPE})

    async def _health_view(self, request: web.Request) -> web.Response:
        report = self._health()
        return web.json_response(report, status=503 if report["status"] == "down" else 200)
