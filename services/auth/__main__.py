"""`python -m services.auth`: the auth process.

Reads AuthConfig from the environment, joins the mesh, opens PostgreSQL
(DATABASE_URL, or the embedded server's "auth" database under the data
directory; DATABASE_REPLICA_URL's replica for the reports), applies
migrations, and serves `auth.*` until SIGTERM.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from functools import partial

from shared.config import load_or_exit
from shared.db import database_dsn
from shared.runner import MeshNode, run
from services.auth.app import open_auth
from services.auth.config import AuthConfig


async def build(config: AuthConfig, stack: AsyncExitStack, node: MeshNode) -> list[object]:
    dsn = await stack.enter_async_context(
        database_dsn(config.mesh.data_dir, config.db.url, database="auth")
    )
    return [await open_auth(stack, config, dsn, metrics=node.metrics)]


def main() -> None:
    config = load_or_exit(AuthConfig, "auth")
    run("auth", partial(build, config), config.mesh)


if __name__ == "__main__":
    main()
