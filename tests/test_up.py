"""`inferswarm up` as a user runs it: a subprocess on a temporary data directory."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest

from stack import Cli, alive, free_udp_port, read_ready, start_up


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
    assert len(bytes.fromhex(ready["mesh_id"])) == 32
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
