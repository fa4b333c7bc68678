"""`inferswarm up`: the whole stack on this machine, supervised.

Order: lock the data directory, load (or create) the mesh secret, start
PostgreSQL (embedded, unless `DATABASE_URL` is set) with one database per
service, the DHT bootstrap node, then every service. Once all are ready it
prints where things are (or one JSON line with `--json`) and runs until
SIGINT/SIGTERM, then stops the children newest first and PostgreSQL last,
keeping the data for the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import importlib.util
import json
import os
import signal
import sys
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from shared.db import EmbeddedPostgres, ensure_database
from shared.identity import MeshCredential
from inferswarm.supervisor import ChildFailed, ChildSpec, Supervisor

__all__ = ["add_arguments", "up"]

#: Services in start order; those whose package has no `__main__` yet are skipped.
SERVICES = ("auth", "metrics", "inference", "gateway", "web")
#: Stop order, highest first: entry points, then what they call, then auth
#: (gateways ship their last usage records to it), the bootstrap node last.
STOP_GROUPS = {"web": 3, "gateway": 3, "inference": 2, "metrics": 2, "auth": 1}
#: Services that keep data in PostgreSQL (each gets a database of its own).
WITH_DATABASE = ("auth", "gateway", "metrics")


class AlreadyRunning(RuntimeError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("INFERSWARM_DATA_DIR", ".data")),
                        help="where keys, PostgreSQL data and logs live (default .data)")
    parser.add_argument("--dht-port", type=int, default=7400, help="UDP port of the bootstrap node")
    parser.add_argument("--gateways", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--web-port", type=int, default=8080)
    parser.add_argument("--metrics-port", type=int, default=9100)
    parser.add_argument("--models", type=Path, metavar="FILE",
                        help="which backends serve which models (JSON or TOML; see services/inference/README.md)")
    parser.add_argument("--json", action="store_true", help="print one JSON line once ready")


@contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the data directory for as long as `up` runs."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "up.lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise AlreadyRunning(f"inferswarm is already running on {data_dir} (pid {holder})") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        handle.close()


def service_specs(args: argparse.Namespace, base_env: dict[str, str], databases: dict[str, str]) -> list[ChildSpec]:
    """One child per service instance whose package can be run."""
    counts = {"gateway": args.gateways, "inference": args.workers}
    specs = []
    for service in SERVICES:
        if importlib.util.find_spec(f"services.{service}.__main__") is None:
            continue
        count = counts.get(service, 1)
        for index in range(1, count + 1):
            name = service if count == 1 else f"{service}-{index}"
            env = {**base_env, "INFERSWARM_NODE_NAME": name}
            if service in databases:
                env["DATABASE_URL"] = databases[service]
            if service == "web":
                env["INFERSWARM_WEB_PORT"] = str(args.web_port)
            if service == "inference" and args.models is not None:
                env["INFERSWARM_MODELS_FILE"] = str(args.models.resolve())
            if service == "metrics":
                env["INFERSWARM_METRICS_PORT"] = str(args.metrics_port)
            specs.append(ChildSpec(name, [sys.executable, "-m", f"services.{service}"], env,
                                   stop_group=STOP_GROUPS[service]))
    return specs


async def start_postgres(stack: AsyncExitStack, data_dir: Path) -> dict[str, str]:
    """One database per service, on DATABASE_URL's server or the embedded one."""
    url = os.environ.get("DATABASE_URL")
    if url is None:
        server = await stack.enter_async_context(EmbeddedPostgres(data_dir / "postgres"))
        url = server.dsn
    return {service: await ensure_database(url, f"inferswarm_{service}") for service in WITH_DATABASE}


async def run_stack(args: argparse.Namespace, stop: asyncio.Event) -> int:
    data_dir = args.data_dir.resolve()
    secret_path = data_dir / "mesh.secret"
    credential = MeshCredential.load_or_create(secret_path)  # the first start creates it (0600)
    credential_hex = secret_path.read_text().strip()
    args.mesh_id = credential.mesh_id.hex()
    async with AsyncExitStack() as stack:
        databases = await start_postgres(stack, data_dir)
        supervisor = Supervisor(data_dir / "logs")
        stack.push_async_callback(supervisor.stop)
        bootstrap = await supervisor.start(ChildSpec("bootstrap", [
            sys.executable, "-m", "shared.dht", "--port", str(args.dht_port),
            "--data-dir", str(data_dir / "nodes" / "bootstrap")], {"INFERSWARM_MESH_SECRET": credential_hex}))
        base_env = {
            "INFERSWARM_DATA_DIR": str(data_dir),
            "INFERSWARM_BOOTSTRAP": bootstrap.ready["dht"],
            "INFERSWARM_MESH_SECRET": credential_hex,
        }
        for spec in service_specs(args, base_env, databases):
            await supervisor.start(spec)
        announce(args, bootstrap.ready["dht"], supervisor, data_dir)
        await stop.wait()
    return 0


def announce(args: argparse.Namespace, bootstrap: str, supervisor: Supervisor, data_dir: Path) -> None:
    summary: dict[str, Any] = {
        "dashboard": f"http://127.0.0.1:{args.web_port}/",
        "metrics": f"http://127.0.0.1:{args.metrics_port}/metrics",
        "bootstrap": bootstrap,
        "mesh_id": args.mesh_id,
        "data_dir": str(data_dir),
        "children": [{"name": c.spec.name, "pid": c.pid} for c in supervisor.children],
    }
    if args.json:
        print(json.dumps(summary), flush=True)
        return
    names = ", ".join(c.spec.name for c in supervisor.children)
    print(f"inferswarm is up ({names})", flush=True)
    print(f"  bootstrap  {bootstrap}   (INFERSWARM_BOOTSTRAP for nodes on other machines)")
    print(f"  mesh id    {args.mesh_id}   (INFERSWARM_MESH_ID for CLIs on other machines)")
    print(f"  dashboard  {summary['dashboard']}")
    print(f"  metrics    {summary['metrics']}")
    print(f"  logs       {data_dir / 'logs'}")
    print("Try it:")
    print("  inferswarm register alice alice@example.com && inferswarm login alice")
    print("  inferswarm keys create laptop")
    print('  inferswarm infer "Write a haiku about the sea."')
    print("Press Ctrl-C to stop.", flush=True)


def up(args: argparse.Namespace) -> int:
    """Run the stack until interrupted; the process exit code."""
    try:
        with data_dir_lock(args.data_dir):
            return asyncio.run(_main(args))
    except AlreadyRunning as exc:
        print(f"inferswarm: {exc}", file=sys.stderr)
        return 1
    except ChildFailed as exc:
        print(f"inferswarm: {exc}", file=sys.stderr)
        return 1


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return await run_stack(args, stop)
