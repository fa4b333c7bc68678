"""`inferswarm up`: the whole stack on this machine, supervised.

Order: lock the data directory, load (or create) the mesh secret, start
PostgreSQL (embedded, unless `DATABASE_URL` is set) with one database per
service, the DHT bootstrap node, then every service -- each child given its
role's credential only, never the mesh secret. Once all are ready it
prints where things are (or one JSON line with `--json`) and runs until
SIGINT/SIGTERM, then stops the children newest first and PostgreSQL last,
keeping the data for the next start. Each step says when it is ready (on
stderr with `--json`, whose stdout is that one line).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import shlex
import shutil
import signal
import sys
import time
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from shared.identity import MeshCredential
from inferswarm.config import client_config
from inferswarm.localmesh import LocalMesh, save_local_mesh
from inferswarm.supervisor import Child, ChildFailed, ChildSpec, Supervisor

__all__ = ["add_arguments", "up"]

#: Services in start order.
SERVICES = ("auth", "metrics", "inference", "gateway", "web")
#: Stop order, highest first: entry points, then what they call, then auth
#: (gateways ship their last usage records to it), the bootstrap node last.
STOP_GROUPS = {"web": 3, "gateway": 3, "inference": 2, "metrics": 2, "auth": 1}
#: What the operator's shell may hold that no child gets: children are given
#: their role's credential instead (shared/roles.py).
OPERATOR_ONLY = ("INFERSWARM_MESH_SECRET", "INFERSWARM_CREDENTIAL_FILE")
#: Services that keep data in PostgreSQL (each gets a database of its own).
WITH_DATABASE = ("auth", "gateway", "metrics")


class AlreadyRunning(RuntimeError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=client_config().data_dir or Path(".data"),
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


def service_specs(args: argparse.Namespace, base_env: dict[str, str], databases: dict[str, str],
                  mesh: MeshCredential) -> list[ChildSpec]:
    """One child per service instance, each given
    its role's credential only (never the mesh secret: shared/roles.py)."""
    counts = {"gateway": args.gateways, "inference": args.workers}
    specs = []
    for service in SERVICES:
        count = counts.get(service, 1)
        for index in range(1, count + 1):
            name = service if count == 1 else f"{service}-{index}"
            env = {**base_env, "INFERSWARM_NODE_NAME": name, "INFERSWARM_CREDENTIAL": mesh.member(service).to_text()}
            if service in databases:
                env["DATABASE_URL"] = databases[service]
            if service == "web":
                env["INFERSWARM_WEB_PORT"] = str(args.web_port)
            if service == "inference" and args.models is not None:
                env["INFERSWARM_MODELS_FILE"] = str(args.models.resolve())
            if service == "metrics":
                env["INFERSWARM_METRICS_PORT"] = str(args.metrics_port)
            specs.append(ChildSpec(name, [sys.executable, "-m", f"services.{service}"], env,
                                   stop_group=STOP_GROUPS[service], unset=OPERATOR_ONLY))
    return specs


async def start_postgres(stack: AsyncExitStack, data_dir: Path) -> dict[str, str]:
    """One database per service, on DATABASE_URL's server or the embedded one."""
    # Imported here: asyncpg and pgserver would cost every client command ~0.15 s.
    from shared.db import EmbeddedPostgres, ensure_database

    database_url = client_config().database_url
    url = database_url.reveal() if database_url is not None else None
    if url is None:
        server = await stack.enter_async_context(EmbeddedPostgres(data_dir / "postgres"))
        url = server.dsn
    return {service: await ensure_database(url, f"inferswarm_{service}") for service in WITH_DATABASE}


async def run_stack(args: argparse.Namespace, stop: asyncio.Event) -> int:
    data_dir = args.data_dir.resolve()
    progress(args, f"Starting inferswarm (data in {data_dir}) ...")
    mesh = MeshCredential.load_or_create(data_dir / "mesh.secret")  # the first start creates it (0600)
    args.mesh_id = mesh.mesh_id.hex()
    async with AsyncExitStack() as stack:
        started = time.monotonic()
        databases = await start_postgres(stack, data_dir)
        where = "server of DATABASE_URL" if client_config().database_url is not None else "embedded"
        progress(args, f"  {'postgres':<12} ready ({where}, {time.monotonic() - started:.1f} s)")
        supervisor = Supervisor(data_dir / "logs")
        stack.push_async_callback(supervisor.stop)
        bootstrap = await start_child(args, supervisor, ChildSpec("bootstrap", [
            sys.executable, "-m", "shared.dht", "--port", str(args.dht_port),
            "--data-dir", str(data_dir / "nodes" / "bootstrap")], {"INFERSWARM_CREDENTIAL": mesh.member("dht").to_text()},
            unset=OPERATOR_ONLY))
        args.remembered = remember_mesh(args, bootstrap.ready["dht"], data_dir)
        base_env = {
            "INFERSWARM_DATA_DIR": str(data_dir),
            "INFERSWARM_BOOTSTRAP": bootstrap.ready["dht"],
        }
        for spec in service_specs(args, base_env, databases, mesh):
            await start_child(args, supervisor, spec)
        announce(args, bootstrap.ready["dht"], supervisor, data_dir)
        await stop.wait()
    return 0


async def start_child(args: argparse.Namespace, supervisor: Supervisor, spec: ChildSpec) -> Child:
    """Start one child and say so once it is ready (the bootstrap with its address)."""
    started = time.monotonic()
    child = await supervisor.start(spec)
    where = f" {child.ready['dht']}" if spec.name == "bootstrap" else ""
    progress(args, f"  {spec.name:<12} ready{where} ({time.monotonic() - started:.1f} s)")
    return child


def progress(args: argparse.Namespace, line: str) -> None:
    """A step of the start: on stdout for people; with --json on stderr, as
    stdout is then one JSON line."""
    print(line, file=sys.stderr if args.json else sys.stdout, flush=True)


def cli_command() -> str:
    """How to run this `inferswarm` from a shell in our working directory:
    `inferswarm` if the PATH finds this very script, else its path (relative
    when it is under the cwd: `.venv/bin/inferswarm`)."""
    entry = Path(sys.argv[0])
    if entry.suffix == ".py":  # `python -m inferswarm.cli`: the script installed beside that python
        entry = Path(sys.executable).parent / "inferswarm"
        if not entry.is_file():
            return f"{shlex.quote(sys.executable)} -m inferswarm.cli"
    entry = entry.resolve()
    on_path = shutil.which("inferswarm")
    if on_path and Path(on_path).resolve() == entry:
        return "inferswarm"
    if entry.is_relative_to(Path.cwd()):
        relative = str(entry.relative_to(Path.cwd()))
        return shlex.quote(relative if "/" in relative else f"./{relative}")  # a bare name would search the PATH
    return shlex.quote(str(entry))


def remember_mesh(args: argparse.Namespace, bootstrap: str, data_dir: Path) -> bool:
    """Tell CLIs on this machine, whatever their directory, which mesh runs here
    and where to join it (`mesh.json` in the user's config directory)."""
    try:
        save_local_mesh(LocalMesh(mesh_id=args.mesh_id, bootstrap=bootstrap, data_dir=str(data_dir)))
    except OSError as exc:  # a read-only home: CLIs then need INFERSWARM_MESH_ID and INFERSWARM_BOOTSTRAP
        print(f"inferswarm: could not save the mesh for local CLIs: {exc}", file=sys.stderr, flush=True)
        return False
    return True


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
    if not getattr(args, "remembered", True):  # no mesh.json: say what a CLI here needs
        print(f"  export INFERSWARM_MESH_ID={args.mesh_id} INFERSWARM_BOOTSTRAP={shlex.quote(bootstrap)}")
    cli = cli_command()
    print(f"  {cli} register alice alice@example.com && {cli} login alice")
    print(f"  {cli} keys create laptop")
    print(f'  {cli} infer "Write a haiku about the sea."')
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
