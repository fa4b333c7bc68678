"""Several hosts on one machine: Linux network namespaces joined by a bridge.

`Network` makes one namespace per host, each with its own address on a
private /24, plus one more namespace holding the bridge (a switch) that every
host's veth cable plugs into. Nothing is added to the machine's own namespace,
so no traffic can leave the namespaces the test made; deleting them (on exit,
also after a failure) removes every link with them.

`HostProcess` runs a command on one host (`ip netns exec`) and reads the one
JSON "ready" line our processes print. `NetworkPostgres` is PostgreSQL from the
pgserver wheel listening on a host's address with password authentication,
as a database server on its own machine would.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's `ip`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import IO, Any

import asyncpg
import pgserver

from shared.db import EmbeddedPostgres, ensure_database

__all__ = ["Network", "HostProcess", "NetworkPostgres", "can_make_namespaces"]


def can_make_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Network:
    """Hosts `names` at 10.<x>.<y>.1, .2, ... on one switch; a context manager."""

    def __init__(self, *names: str) -> None:
        self.tag = secrets.token_hex(3)
        octets = secrets.randbelow(200) + 20, secrets.randbelow(250) + 1
        self.subnet = f"10.{octets[0]}.{octets[1]}.0/24"
        self.addresses = {name: f"10.{octets[0]}.{octets[1]}.{i}" for i, name in enumerate(names, start=1)}
        self.switch = f"isw-{self.tag}-sw"
        self._made: list[str] = []

    def namespace(self, host: str) -> str:
        return f"isw-{self.tag}-{host}"

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host)]

    def __enter__(self) -> Network:
        try:
            self._up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _up(self) -> None:
        self._add_namespace(self.switch)
        bridge = f"br{self.tag}"
        _ip("-n", self.switch, "link", "add", bridge, "type", "bridge")
        _ip("-n", self.switch, "link", "set", bridge, "up")
        for index, (host, address) in enumerate(self.addresses.items()):
            ns = self.namespace(host)
            self._add_namespace(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # Both ends are made inside their namespaces: none ever exists in ours.
            inside, outside = f"eth{self.tag}", f"v{index}{self.tag}"
            _ip("link", "add", inside, "netns", ns, "type", "veth", "peer", "name", outside, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", outside, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def __exit__(self, *exc_info: object) -> None:
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        self._made.clear()


class HostProcess:
    """One of our processes on one host; its stderr goes to `log`."""

    def __init__(self, network: Network, host: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.host = host
        self.log = log
        with log.open("ab") as err:
            self.proc = subprocess.Popen(
                [*network.exec_prefix(host), *argv], stdout=subprocess.PIPE, stderr=err, env=env, text=True,
            )
        self.pid = self.proc.pid  # `ip netns exec` execs the command: this is its pid

    def ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """The process's JSON ready line (AssertionError with its log if it never comes)."""
        line = _readline(self.proc.stdout, timeout)
        if not line:
            self.stop()
            raise AssertionError(f"no ready line from {self.proc.args}:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def _readline(stream: IO[str] | None, timeout: float) -> str:
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline() if stream else ""), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0] if line else ""


class NetworkPostgres:
    """PostgreSQL on `host`'s address (TCP, scram-sha-256 from the subnet).

    The cluster is made by `EmbeddedPostgres` (initdb, and under root the
    `pgserver` system user that owns it), then served by `postgres` itself on
    the host's namespace. The test reaches it through its unix socket (the
    file system is shared), the services over the network with a password.
    """

    PORT = 5432

    def __init__(self, network: Network, host: str, root: Path) -> None:
        self.network, self.host = network, host
        self.pgdata = root / "pgdata"
        self.password = secrets.token_urlsafe(16)
        self.process: HostProcess | None = None
        self._log = root / "postgres.log"

    async def start(self, databases: list[str]) -> dict[str, str]:
        """Serve on the network; the DATABASE_URL of each database, by name."""
        embedded = EmbeddedPostgres(self.pgdata)
        dsn = await embedded.start()
        try:
            for name in databases:
                await ensure_database(dsn, name)
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(f"ALTER USER postgres PASSWORD '{self.password}'")
            finally:
                await conn.close()
        finally:
            await embedded.stop()
        with (self.pgdata / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {self.network.subnet} scram-sha-256\n")
        owner = self.pgdata.stat()
        as_owner = ([] if os.geteuid() != 0 else
                    ["setpriv", f"--reuid={owner.st_uid}", f"--regid={owner.st_gid}", "--init-groups"])
        binary = Path(pgserver.__file__).parent / "pginstall" / "bin" / "postgres"
        address = self.network.addresses[self.host]
        self.process = HostProcess(
            self.network, self.host,
            [*as_owner, str(binary), "-D", str(self.pgdata), "-h", address, "-p", str(self.PORT),
             "-k", str(self.pgdata)],
            {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}, self._log,
        )
        await self._wait_ready()
        return {name: f"postgresql://postgres:{self.password}@{address}:{self.PORT}/{name}" for name in databases}

    @property
    def local_dsn(self) -> str:
        """The superuser DSN through the unix socket, for the test's own queries."""
        return f"postgresql://postgres@/postgres?host={self.pgdata}&port={self.PORT}"

    async def _wait_ready(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                conn = await asyncpg.connect(self.local_dsn, timeout=2)
            except (OSError, asyncpg.PostgresError):
                if loop.time() > deadline or self.process is None or self.process.proc.poll() is not None:
                    raise AssertionError(f"postgres did not start:\n{self._log.read_text()[-3000:]}") from None
                await asyncio.sleep(0.2)
            else:
                await conn.close()
                return

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30)
            self.process = None
