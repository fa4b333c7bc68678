"""`python -m services.web`: the web process.

Reads WebConfig from the environment, joins the mesh (the runner also serves
an RPC endpoint, which answers `rpc.ping` for the health monitor), and serves
HTTP on INFERSWARM_WEB_HOST:INFERSWARM_WEB_PORT until SIGTERM. The ready line
gains `"http": "<url>"`, the address actually bound (useful with port 0).
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

from shared.config import load_or_exit
from shared.logging import get_logger
from shared.runner import MeshNode, run
from services.web.app import create_app, start_site
from services.web.config import WebConfig

log = get_logger(__name__)


async def build(config: WebConfig, bound: dict[str, str], stack: AsyncExitStack, node: MeshNode) -> list[object]:
    app = create_app(config, node.mesh, node.metrics)
    runner, url = await start_site(app, config)
    stack.push_async_callback(runner.cleanup)
    bound["http"] = url
    log.info("web listening", url=url)
    return []


def main() -> None:
    config = load_or_exit(WebConfig, "web")
    bound: dict[str, str] = {}

    def ready(info: dict[str, Any]) -> None:
        print(json.dumps({**info, **bound}), flush=True)

    run("web", partial(build, config, bound), config.mesh, ready=ready)


if __name__ == "__main__":
    main()
