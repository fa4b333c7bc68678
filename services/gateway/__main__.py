"""`python -m services.gateway`: one gateway process.

Reads GatewayConfig from the environment, joins the mesh, opens PostgreSQL
(DATABASE_URL, or the embedded server's "gateway" database under the data
directory), replays its usage journal, and serves `gateway.*` (public
methods: any CURVE client, each call carrying an API key or a token) until
SIGTERM, then drains, ships the last usage and gives unused quota back.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from functools import partial

from shared.config import load_or_exit
from shared.db import database_dsn
from shared.runner import MeshNode, run
from services.gateway.app import open_gateway
from services.gateway.config import GatewayConfig


async def build(config: GatewayConfig, stack: AsyncExitStack, node: MeshNode) -> list[object]:
    dsn = await stack.enter_async_context(database_dsn(config.mesh.data_dir, config.db.url, database="gateway"))
    service = await open_gateway(stack, config, node.mesh, dsn=dsn, signer=node.identity,
                                 state_dir=node.state_dir, metrics=node.metrics)
    return [service]


def main() -> None:
    config = load_or_exit(GatewayConfig, "gateway")
    run("gateway", partial(build, config), config.mesh)


if __name__ == "__main__":
    main()
