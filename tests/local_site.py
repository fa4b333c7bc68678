"""Serving a test server's aiohttp app on loopback, on a port of the system's choosing."""

from __future__ import annotations

from aiohttp import web

__all__ = ["serve_locally"]


async def serve_locally(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    """`app` served on 127.0.0.1:`port` (0: any free port); its runner (to clean up) and the port."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
