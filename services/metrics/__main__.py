"""`python -m services.metrics`: the metrics process.

Reads MetricsConfig from the environment, joins the mesh, serves
`metrics.record` and `metrics.health` over RPC and `/metrics`, `/health` over
HTTP until SIGTERM. Its ready line is the runner's, with `"http"` added:
``{"ready": "metrics", ..., "http": "http://127.0.0.1:9100"}``.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import Any

from shared.config import load_or_exit
from shared.runner import MeshNode, run
from services.metrics.app import MetricsApp, open_metrics
from services.metrics.config import MetricsConfig


def main() -> None:
    config = load_or_exit(MetricsConfig, "metrics")
    opened: list[MetricsApp] = []

    async def build(stack: AsyncExitStack, node: MeshNode) -> list[object]:
        opened.append(await open_metrics(stack, config, node))
        return [opened[0].service]

    def ready(info: dict[str, Any]) -> None:
        print(json.dumps({**info, "http": opened[0].http.url}), flush=True)

    run("metrics", build, config.mesh, ready=ready)


if __name__ == "__main__":
    main()
