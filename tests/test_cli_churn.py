"""A script calling the CLI in a loop, and many at once: the mesh must not notice.

Real `inferswarm` processes against a real stack. Each command here gets an
empty provider cache, so every one of them joins the DHT -- the worst case,
and what every command did before the cache. Afterwards every DHT node of the
stack is asked, from outside, for its contacts: only the stack's own nodes
may be named, each alive (a CLI node that entered a table, and was handed
out after its process exited, is what made later lookups wait on the dead).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest

from stack import Cli, free_udp_port, read_ready, start_up, xdg_homes

pytestmark = pytest.mark.stack

PASSWORD = "churning-horse-battery-5"
CATALOG = {"smollm2": {"backend": "echo", "slots": 256, "queue": 1024}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("churn")
    models = root / "models.json"
    models.write_text(json.dumps(CATALOG))
    port = free_udp_port()
    proc = start_up(root / "data", port, "--workers", "1", "--models", str(models))
    try:
        yield root, port, read_ready(proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def datagram(method: str, args: list) -> tuple[bytes, bytes]:
    msg_id = os.urandom(20)
    return msg_id, b"\x00" + msg_id + msgpack.packb([method, args, {"ro": True}], use_bin_type=True)


def ask(sock: socket.socket, address: tuple[str, int], method: str, args: list) -> object:
    """One read-only request (so the probe itself enters no table); its reply, or None."""
    msg_id, data = datagram(method, args)
    sock.sendto(data, address)
    try:
        while True:
            reply, _ = sock.recvfrom(65535)
            if reply[1:21] == msg_id:
                return msgpack.unpackb(reply[21:])
    except TimeoutError:
        return None


def handed_out(bootstrap: str) -> dict[bytes, tuple[str, int]]:
    """Every contact any stack node names, from the bootstrap node outwards."""
    host, port = bootstrap.rsplit(":", 1)
    me = os.urandom(20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(1.0)
        seen: dict[bytes, tuple[str, int]] = {}
        asked: set[tuple[str, int]] = set()
        queue = [(host, int(port))]
        while queue:
            address = queue.pop()
            if address in asked:
                continue
            asked.add(address)
            for _ in range(4):  # a few targets: together they cover a table of up to 80 contacts
                for node_id, ip, node_port in ask(sock, address, "find_node", [me, os.urandom(20)]) or []:
                    seen[node_id] = (ip, node_port)
                    queue.append((ip, node_port))
        return seen


def alive(address: tuple[str, int], node_id: bytes) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(1.0)
        return ask(sock, address, "ping", [os.urandom(20)]) == node_id


@pytest.mark.timeout(300)
def test_clis_in_a_loop_and_at_once_leave_no_trace_in_the_mesh(stack, tmp_path):
    root, port, ready = stack
    cli = Cli(root / "data", port, tmp_path / "config")
    assert cli("register", "churn", "churn@example.com", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert cli("login", "churn", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert cli("keys", "create", "loop").returncode == 0

    def fresh(*args: str) -> subprocess.CompletedProcess:
        """A command with an empty provider cache: it must join the DHT."""
        cache = tmp_path / f"cache-{os.urandom(6).hex()}"
        return cli(*args, XDG_CACHE_HOME=str(cache))

    loop = [fresh("models", "--json") for _ in range(30)]
    assert [r.returncode for r in loop] == [0] * 30, [r.stderr for r in loop if r.returncode][:3]
    assert all(json.loads(r.stdout)["models"][0]["name"] == "smollm2" for r in loop)
    # Dead contacts handed out would make each command slower than the last (1 s per dead contact met).
    first, last = statistics.median(r.seconds for r in loop[:10]), statistics.median(r.seconds for r in loop[-10:])
    assert last < first + 0.5, (first, last)

    with ThreadPoolExecutor(16) as pool:
        at_once = list(pool.map(lambda _: fresh("infer", "hi", "--no-stream", "--max-tokens", "1", "--json"),
                                range(16)))
    assert [r.returncode for r in at_once] == [0] * 16, [r.stderr for r in at_once if r.returncode][:3]

    contacts = handed_out(ready["bootstrap"])
    assert len(contacts) == len(ready["children"])  # the bootstrap node and each service: no CLI
    assert all(alive(address, node_id) for node_id, address in contacts.items())


@pytest.mark.timeout(120)
def test_the_cli_works_from_any_directory(stack, tmp_path):
    root, port, ready = stack
    homes = {"XDG_CONFIG_HOME": xdg_homes(root / "data")["XDG_CONFIG_HOME"],  # where up wrote mesh.json
             "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERSWARM_", "XDG_"))} | homes
    for cwd in (tmp_path, Path("/"), Path(__file__).parent):
        result = subprocess.run([sys.executable, "-m", "inferswarm.cli", "models", "--json"], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (cwd, result.stderr)
        assert [m["name"] for m in json.loads(result.stdout)["models"]] == ["smollm2"]
