"""`inferswarm up` as a user runs it: a subprocess on a temporary data directory."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from shared.identity import MemberCredential
from stack import Cli, alive, free_tcp_port, free_udp_port, read_ready, start_up

pytestmark = pytest.mark.stack


@pytest.fixture
def stack(tmp_path):
    port = free_udp_port()
    # A mesh secret in the operator's shell must not reach any child.
    proc = start_up(tmp_path / "data", port, env={"INFERSWARM_MESH_SECRET": "ab" * 32})
    try:
        yield proc, read_ready(proc), tmp_path / "data", port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.mark.timeout(180)
def test_up_starts_stops_cleanly_and_refuses_a_second_instance(stack):
    proc, ready, data_dir, port = stack
    assert ready["bootstrap"] == f"127.0.0.1:{port}"
    assert len(bytes.fromhex(ready["mesh_id"])) == 32
    pids = [child["pid"] for child in ready["children"]]
    assert {child["name"] for child in ready["children"]} >= {"bootstrap"}
    assert all(alive(pid) for pid in pids)
    # Each child holds its role's credential, never the mesh secret (shared/roles.py).
    for child in ready["children"]:
        environ = dict(item.split("=", 1) for item in
                       open(f"/proc/{child['pid']}/environ").read().split("\0") if "=" in item)
        assert "INFERSWARM_MESH_SECRET" not in environ, child["name"]
        role = "dht" if child["name"] == "bootstrap" else child["name"].split("-")[0]
        assert MemberCredential.from_text(environ["INFERSWARM_CREDENTIAL"]).role == role
        assert MemberCredential.from_text(environ["INFERSWARM_CREDENTIAL"]).mesh_id.hex() == ready["mesh_id"]

    second = subprocess.run(
        [sys.executable, "-m", "inferswarm.cli", "up", "--data-dir", str(data_dir), "--dht-port", str(port)],
        capture_output=True, text=True, timeout=30,
    )
    assert second.returncode == 1
    assert "already running" in second.stderr

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert not any(alive(pid) for pid in pids)
    postmaster = data_dir / "postgres" / "postmaster.pid"
    assert not postmaster.exists(), "PostgreSQL was left running"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))  # the bootstrap's port is free again
    assert (data_dir / "mesh.secret").exists()  # data kept for the next start


@pytest.mark.timeout(300)
def test_a_restart_on_the_same_data_directory_keeps_users_and_keys(tmp_path):
    data_dir, port = tmp_path / "data", free_udp_port()
    cli = Cli(data_dir, port, tmp_path / "config")
    password = "restart-me-please-7"

    first = start_up(data_dir, port, "--workers", "1")
    try:
        read_ready(first)
        assert cli("register", "gus", "gus@example.com", "--password-stdin", stdin=password).returncode == 0
        assert cli("login", "gus", "--password-stdin", stdin=password).returncode == 0
        key = json.loads(cli("keys", "create", "kept", "--json").stdout)
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0

    second = start_up(data_dir, port, "--workers", "1")
    try:
        read_ready(second)
        assert cli("login", "gus", "--password-stdin", stdin=password).returncode == 0
        keys = json.loads(cli("keys", "list", "--json").stdout)
        assert [(k["id"], k["name"], k["status"]) for k in keys] == [(key["id"], "kept", "active")]
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0


def read_until(proc: subprocess.Popen, last: str, timeout: float) -> list[str]:
    """The stdout lines of `proc` up to the first that starts with `last`."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not seen or not seen[-1].startswith(last):
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            raise AssertionError(f"no {last!r} within {timeout} s; got {seen}") from None
        if line is None:
            raise AssertionError(f"up exited ({proc.wait()}) before {last!r}; got {seen}")
        seen.append(line)
    return seen


@pytest.mark.timeout(240)
def test_up_says_each_step_as_it_is_ready_and_its_try_it_lines_run(tmp_path):
    data_dir, port = tmp_path / "data", free_udp_port()
    # One environment for `up` and for the shell the Try-it lines are pasted
    # into, as in one terminal: nothing that would point the CLI at the stack.
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "INFERSWARM_API_KEY", "INFERSWARM_MESH_ID",
                        "INFERSWARM_DATA_DIR", "INFERSWARM_BOOTSTRAP")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    with open(tmp_path / "up.stderr", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inferswarm.cli", "up", "--data-dir", str(data_dir), "--dht-port", str(port),
             "--metrics-port", str(free_tcp_port()), "--web-port", str(free_tcp_port()), "--workers", "1"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        lines = read_until(proc, "Press Ctrl-C", timeout=180)
        assert lines[0] == f"Starting inferswarm (data in {data_dir.resolve()}) ..."
        ready = [(i, m[1]) for i, line in enumerate(lines) if (m := re.match(r"  (\S+) +ready\b", line))]
        assert [name for _, name in ready] == ["postgres", "bootstrap", "auth", "metrics", "inference",
                                               "gateway", "web"]
        assert "(embedded, " in lines[ready[0][0]]
        assert f" ready 127.0.0.1:{port} " in lines[ready[1][0]]
        summary = next(i for i, line in enumerate(lines) if line.startswith("inferswarm is up"))
        assert ready[-1][0] < summary

        # The Try-it lines, pasted as printed into a shell started where `up` was.
        try_it = [line.strip() for line in lines[lines.index("Try it:") + 1:-1]]
        exports = [line for line in try_it if line.startswith("export ")]
        assert exports == []  # up wrote mesh.json: the CLI needs no environment to find this stack
        cli = next(line for line in try_it if line.endswith(" keys create laptop")).removesuffix(" keys create laptop")
        pasted = subprocess.run(["bash", "-c", "\n".join([*exports, f"{cli} models --json"])],
                                capture_output=True, text=True, timeout=60, env=env)
        assert pasted.returncode == 0, (cli, exports, pasted.stderr)
        assert [m["name"] for m in json.loads(pasted.stdout)["models"]] == ["minilm", "smollm2"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "up.stderr").read_text()[-2000:]
