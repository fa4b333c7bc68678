"""A standalone DHT node, e.g. the bootstrap node of a mesh.

    python -m shared.dht --host 127.0.0.1 --port 7400 [--seed host:port ...] --data-dir DIR

The identity is DIR/node.key (created on first start); the credential is the
`dht` role's (`INFERSWARM_CREDENTIAL` or `INFERSWARM_CREDENTIAL_FILE`), else
derived from the mesh secret, `INFERSWARM_MESH_SECRET` (hex) or
DIR/mesh.secret (created on first start).
Once listening it prints one JSON line, `{"dht": "host:port"}`, to stdout
(logs go to stderr) and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import replace
from pathlib import Path

from shared.config import ConfigError, MeshConfig, load
from shared.dht.node import KademliaDiscovery
from shared.identity import NodeIdentity
from shared.membership import mesh_credential
from shared.logging import configure_logging

__all__ = ["main"]


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shared.dht", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7400, help="UDP port (0 = any free port)")
    parser.add_argument("--seed", action="append", default=[], help="host:port of a known node (repeatable)")
    parser.add_argument("--data-dir", type=Path, required=True, help="node.key, mesh.secret, neighbours.json")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace, config: MeshConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    node = KademliaDiscovery(
        identity=NodeIdentity.load_or_create(args.data_dir / "node.key"),
        mesh=mesh_credential(config, "dht"),
        host=args.host,
        port=args.port,
        seeds=args.seed,
        neighbours_path=args.data_dir / "neighbours.json",
    )
    async with node:
        print(json.dumps({"dht": node.address}), flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Run the node; 0 on a clean stop, 2 on a configuration error.

    The environment is read through `shared/config.py` like every process's
    (`MeshConfig`: the credential, the log level); the command line gives the
    addresses and the data directory."""
    args = _arguments(argv)
    try:
        config = replace(load(MeshConfig), data_dir=args.data_dir, bootstrap=())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # stdout carries the one readiness line; logs go to stderr as JSON.
    configure_logging(config.log_level, "json", service="dht")
    try:
        asyncio.run(_serve(args, config))
    except ValueError as exc:  # a bad seed, key file, credential (ConfigError) or mesh secret
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
