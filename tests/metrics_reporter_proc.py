"""A reporting process for the metrics tests (run as a script, not collected).

    python tests/metrics_reporter_proc.py <count> [tag]   # environment: the mesh's (see metrics_support)

Joins the mesh, counts `count` successful gateway requests (method
`gateway.<tag>`, default `gateway.infer`) and observes as many request
durations of 0.3 s (labels: `metrics_support.labels_of`), pushes them, prints `{"pushed": n, "instance": ...}` once
every metrics service found acknowledged them, then keeps reporting (to every
metrics service it finds) until it is killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.config import MeshConfig, load
from shared.logging import configure_logging
from shared.metrics import REQUEST_DURATION, REQUESTS, Metrics, MetricsReporter
from shared.runner import join_mesh
from metrics_support import labels_of


async def main(count: int, tag: str) -> None:
    config = load(MeshConfig)
    async with AsyncExitStack() as stack:
        node = await join_mesh(stack, "reporter", config)
        metrics = Metrics()
        reporter = MetricsReporter.for_node(node, metrics, service="gateway", interval=0.2, timeout=0.5)
        await stack.enter_async_context(reporter)
        metrics.counter(REQUESTS).inc(count, **labels_of(REQUESTS, tag))
        for _ in range(count):
            metrics.histogram(REQUEST_DURATION).observe(0.3, **labels_of(REQUEST_DURATION, tag))
        for _ in range(150):  # at most ~15 s
            if await reporter.flush():
                break
            await asyncio.sleep(0.1)
        print(json.dumps({"pushed": reporter.sent, "instance": reporter.source.instance}), flush=True)
        await asyncio.sleep(120)  # until killed


if __name__ == "__main__":
    configure_logging("warning", "json", service="reporter")
    asyncio.run(main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "infer"))
