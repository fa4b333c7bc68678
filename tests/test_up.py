"""`inferswarm up` as a user runs it: a subprocess on a temporary data directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def start_up(data_dir: Path, dht_port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.Popen(
        [sys.executable, "-m", "inferswarm.cli", "up", "--json", "--data-dir", str(data_dir),
         "--dht-port", str(dht_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def read_ready(proc: subprocess.Popen, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"up exited early: {proc.wait()} {proc.stderr.read()}")
        return json.loads(line)  # --json: the one and only stdout line
    raise AssertionError("up did not become ready")


@pytest.fixture
def stack(tmp_path):
    port = free_udp_port()
    proc = start_up(tmp_path / "data", port)
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
    pids = [child["pid"] for child in ready["children"]]
    assert {child["name"] for child in ready["children"]} >= {"bootstrap"}
    assert all(alive(pid) for pid in pids)

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
