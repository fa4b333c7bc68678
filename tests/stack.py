"""Helpers to run `inferswarm up` and the `inferswarm` CLI as a user would."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["free_udp_port", "free_tcp_port", "alive", "xdg_homes", "start_up", "read_ready", "Cli"]


#: Ports handed to servers the tests start are taken below the kernel's
#: ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default): a
#: port from inside it may be taken, between our check and the server's bind,
#: as the local port of some outgoing connection ("address already in use").
_BELOW_EPHEMERAL = (20000, 32000)


def _free_port(kind: int) -> int:
    for _ in range(200):
        port = random.randrange(*_BELOW_EPHEMERAL)
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def free_udp_port() -> int:
    return _free_port(socket.SOCK_DGRAM)


def free_tcp_port() -> int:
    return _free_port(socket.SOCK_STREAM)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")  # a zombie is dead for our purposes
    return status.exists() and "zombie" not in status.read_text()


def xdg_homes(data_dir: Path) -> dict[str, str]:
    """The config and cache homes of the stack on `data_dir` and of its CLIs
    (where `up` writes mesh.json): beside it, never the real home's."""
    base = data_dir.parent / f"{data_dir.name}-home"
    return {"XDG_CONFIG_HOME": str(base / "config"), "XDG_CACHE_HOME": str(base / "cache")}


def start_up(data_dir: Path, dht_port: int, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`inferswarm up --json` on `data_dir`, with XDG homes of its own (`xdg_homes`)."""
    env = {**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"}, **xdg_homes(data_dir), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "inferswarm.cli", "up", "--json", "--data-dir", str(data_dir),
         "--dht-port", str(dht_port), "--metrics-port", str(free_tcp_port()),
         "--web-port", str(free_tcp_port()), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def read_ready(proc: subprocess.Popen) -> dict:
    """The one JSON line `up --json` prints once everything is ready."""
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"up exited early ({proc.wait()}): {proc.stderr.read()[-2000:]}")
    return json.loads(line)


class Cli:
    """Runs `inferswarm` client commands against one stack, as one user."""

    def __init__(self, data_dir: Path, dht_port: int, config_home: Path, cache_home: Path | None = None) -> None:
        # The provider cache beside the credentials unless told: one user, one machine.
        cache_home = cache_home or config_home.with_name(config_home.name + "-cache")
        self.env = {**os.environ, "INFERSWARM_DATA_DIR": str(data_dir),
                    "INFERSWARM_BOOTSTRAP": f"127.0.0.1:{dht_port}", "XDG_CONFIG_HOME": str(config_home),
                    "XDG_CACHE_HOME": str(cache_home)}
        self.env.pop("INFERSWARM_API_KEY", None)

    def __call__(self, *args: str, stdin: str | None = None, timeout: float = 60, **env: str):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "inferswarm.cli", *args], input=stdin,
                                capture_output=True, text=True, timeout=timeout, env={**self.env, **env})
        result.seconds = time.monotonic() - started
        return result
