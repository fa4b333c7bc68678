"""Wiring the web application: routes, middleware, templates and resources.

Middleware, outermost first: the request's trace id and span (traces.py),
the HTTP RED metrics (http_metrics.py), errors
to replies (middleware.py), then `/v1` CORS preflights (cors.py); every reply
then passes `on_response_prepare`: security headers, the `/v1` request id,
`/v1` CORS headers, the status noted for the metrics.

`create_app(config, mesh, metrics)` is used by `__main__` (inside the runner's
lifecycle), by the tests (with aiohttp's test server) and by the benchmark.
Resources are wired with `cleanup_ctx`, entered on startup and left in
reverse on cleanup: the CSRF secret and templates, then the upstream calls
(whose cleanup cancels every inference still streaming).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from shared.metrics import Metrics
from shared.rpc import MeshClient
from services.web import (account_pages, api, audit_pages, cost_pages, dead_letter_pages, embeddings_api, openai_api,
                          org_api, org_pages, pages, responses_api, setting_pages, tier_pages, webhook_api,
                          webhook_pages)
from services.web.config import WebConfig
from services.web.cors import CORS, CorsPolicy, add_cors_headers, cors_middleware
from services.web.http_metrics import METRICS, HttpMetrics, metrics_middleware, note_status
from services.web.middleware import add_request_id, error_middleware
from services.web.params import DROP_PARAMS, MAX_N
from services.web.security import (FORCE_SECURE, TRUST_PROXY, Csrf, add_security_headers,
                                   load_or_create_secret)
from services.web.session import UPSTREAM
from services.web.traces import trace_middleware
from services.web.upstream import Upstream
from services.web.views import CSRF, TEMPLATES, make_environment

__all__ = ["CONFIG", "MESH", "STATIC_DIR", "create_app", "ssl_context", "start_site"]

STATIC_DIR = Path(__file__).with_name("static")
CONFIG = web.AppKey("config", WebConfig)
MESH = web.AppKey("mesh", MeshClient)


async def _pages_ctx(app: web.Application) -> AsyncIterator[None]:
    """The CSRF key (kept in the data directory, shared by restarts) and the templates."""
    app[CSRF] = Csrf(load_or_create_secret(app[CONFIG].secret_path))
    app[TEMPLATES] = make_environment()
    yield


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    upstream = Upstream(app[MESH], rpc_timeout=config.rpc_timeout, infer_timeout=config.infer_timeout)
    app[UPSTREAM] = upstream
    yield
    await upstream.close()


def create_app(config: WebConfig, mesh: MeshClient, metrics: Metrics | None = None) -> web.Application:
    """The aiohttp application; request bodies over `config.max_body_bytes` are 413.

    `metrics`: the registry the HTTP metrics go to (the process's `MeshNode.metrics`,
    pushed to the metrics service); None keeps them in a registry of their own."""
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[trace_middleware, metrics_middleware, error_middleware, cors_middleware])
    app[METRICS] = HttpMetrics(metrics if metrics is not None else Metrics())
    app[CONFIG], app[MESH], app[CORS] = config, mesh, CorsPolicy(config.cors_origins)
    app[DROP_PARAMS] = config.drop_params
    app[MAX_N] = config.max_n
    app[TRUST_PROXY], app[FORCE_SECURE] = config.trust_proxy, config.secure_cookies or config.tls
    app.cleanup_ctx.append(_pages_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.on_response_prepare.append(add_security_headers)
    app.on_response_prepare.append(add_request_id)
    app.on_response_prepare.append(add_cors_headers)
    app.on_response_prepare.append(note_status)
    for table in (pages.routes, account_pages.routes, audit_pages.routes, cost_pages.routes, tier_pages.routes,
                  setting_pages.routes, dead_letter_pages.routes,
                  webhook_pages.routes, org_pages.routes, api.routes, webhook_api.routes, org_api.routes,
                  openai_api.routes, embeddings_api.routes,
                  responses_api.routes):
        app.router.add_routes(table)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    return app


def ssl_context(config: WebConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


async def start_site(app: web.Application, config: WebConfig) -> tuple[web.AppRunner, str]:
    """Serve `app` on the configured host and port; the runner (to clean up) and the URL.

    `handler_cancellation`: a client that disconnects cancels its handler, which
    closes its inference stream -- the cancellation reaches the worker.
    `keepalive_timeout` runs from a connection's start, so it also closes one
    that never completes a request head (aiohttp's default waits an hour).
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=10.0,
                           keepalive_timeout=config.idle_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context(config),
                           backlog=1024)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = site._server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
    scheme = "https" if config.tls else "http"
    shown = f"[{host}]" if ":" in host else host
    return runner, f"{scheme}://{shown}:{port}/"
